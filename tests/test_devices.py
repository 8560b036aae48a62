"""``--device``: auto picks CUDA only when there is one; an unknown or absent device is one line
naming the argument (exit 2) before anything runs; the data and the model live on the device."""

import pytest
import torch

from seedslot.app import data as D
from seedslot.app.cli import main
from seedslot.app.devices import resolve_device

from test_data import write_mnist

NO_CUDA = not torch.cuda.is_available()


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("auto").type == ("cpu" if NO_CUDA else "cuda")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "CPU", "", 3])
def test_unknown_device_is_a_value_error(name):
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        resolve_device(name)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU")
@pytest.mark.parametrize("command", [["train"], ["demo"], ["bench", "speed", "--model", "lenet"],
                                     ["sweep", "k", "--epochs", "1"]])
def test_cuda_without_a_gpu_is_one_line_and_exit_2(command, tmp_path, capsys):
    assert main(command + ["--device", "cuda", *(["--out", str(tmp_path)] if command[0] == "sweep" else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device 'cuda': no CUDA device is available" in err[0], err


def test_data_moves_whole_and_batches_stay_on_its_device(tmp_path):
    write_mnist(tmp_path, n_train=40, n_test=10, size=8)
    data = D.load("mnist", tmp_path).to("meta")  # a device other than the CPU, without a GPU
    assert data.train.images.device.type == "meta" and data.test.labels.device.type == "meta"
    x, y = next(D.batches(data.train, 8))
    assert x.device.type == y.device.type == "meta"
    assert data.preprocess(x, torch.Generator().manual_seed(0)).device.type == "meta"
