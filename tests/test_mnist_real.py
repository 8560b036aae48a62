"""A few training steps on the real MNIST, when it is beside the repository (../shared/data/mnist,
or SEEDSLOT_MNIST_DIR); skipped with the reason otherwise. The long runs live in docs/RESULTS.md."""

import os
from pathlib import Path

import pytest
import torch

from seedslot.app import data as D
from seedslot.app.train import TrainConfig, run

MNIST = Path(os.environ.get("SEEDSLOT_MNIST_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))
pytestmark = pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").exists(),
                                reason=f"the real MNIST is not at {MNIST} (set SEEDSLOT_MNIST_DIR)")

# label counts of the official test set (../shared/data/README.md)
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_the_real_mnist_loads_as_published():
    data = D.load("mnist", MNIST)
    assert torch.bincount(data.test.labels, minlength=10).tolist() == TEST_COUNTS
    assert (len(data.train), len(data.val)) == (51000, 9000)  # 15% held out, as the paper


def test_a_few_steps_on_the_real_mnist_learn(tmp_path):
    threads = torch.get_num_threads()
    try:
        summary = run(TrainConfig(dataset="mnist", data_dir=str(MNIST), k=8, epochs=1, limit_train=3000,
                                  threads=1, out=str(tmp_path)), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert summary["global_steps"] == 20  # 2550 training images, batch 128
    assert summary["test_accuracy"] > 0.6  # chance is 0.1; the paper's K = 8 reaches 0.982 in 120 epochs
