"""seedslot.app.data on tiny files written in the real formats (IDX gz and raw, CIFAR-10 pickles)."""

import gzip
import os
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch

from seedslot.app import data as D

FASHION = "/usr/share/datasets/fashion-mnist"


def write_idx(path, array: np.ndarray, *, gz: bool) -> None:
    array = np.asarray(array, dtype=np.uint8)
    raw = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)


def write_mnist(directory, n_train=40, n_test=10, size=8, *, gz=True, seed=0):
    """IDX files in ``directory``; returns (train images, train labels, test images, test labels)."""
    rng = np.random.default_rng(seed)
    arrays = (rng.integers(0, 256, (n_train, size, size)), rng.integers(0, 10, n_train),
              rng.integers(0, 256, (n_test, size, size)), rng.integers(0, 10, n_test))
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    os.makedirs(directory, exist_ok=True)
    for name, a in zip(names, arrays):
        write_idx(os.path.join(directory, name + (".gz" if gz else "")), a, gz=gz)
    return tuple(np.asarray(a, dtype=np.uint8) for a in arrays)


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` opcodes (BINSTRING), as the real CIFAR-10 files are."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def write_cifar(directory, n=4, seed=0, *, py2=False):
    """data_batch_1..5 and test_batch with ``n`` images each; returns the (data, labels) written."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    written = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
        with open(os.path.join(directory, name), "wb") as f:
            (_Py2Pickler(f, protocol=2).dump if py2 else lambda o: pickle.dump(o, f, protocol=2))(batch)
        written.append((batch[b"data"], batch[b"labels"]))
    return written


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip_and_split(tmp_path, gz):
    x, y, tx, ty = write_mnist(tmp_path, n_train=40, gz=gz)
    d = D.load("mnist", tmp_path, seed=3)
    assert d.train.images.dtype == torch.uint8 and d.train.images.shape[1:] == (1, 8, 8)
    assert d.train.labels.dtype == torch.int64
    assert len(d.val) == 6 and len(d.train) == 34  # 15% of 40
    assert torch.equal(d.test.images[:, 0], torch.from_numpy(tx)) and torch.equal(d.test.labels, torch.from_numpy(ty).long())
    # train and val partition the training file
    both = torch.cat([d.train.images, d.val.images])[:, 0].reshape(40, -1)
    assert sorted(map(bytes, both.numpy())) == sorted(map(bytes, x.reshape(40, -1)))
    assert d.normalize == "unit" and "normalize=unit" in d.describe()  # the paper's MNIST choice


def test_split_is_fixed_by_seed(tmp_path):
    write_mnist(tmp_path, n_train=100)
    a, b, c = (D.load("mnist", tmp_path, seed=s).val.labels for s in (1, 1, 2))
    assert torch.equal(a, b)
    va, vc = (D.load("mnist", tmp_path, seed=s).val.images for s in (1, 2))
    assert not torch.equal(va, vc)


def test_limit_train_keeps_the_first_examples(tmp_path):
    x, *_ = write_mnist(tmp_path, n_train=100)
    d = D.load("mnist", tmp_path, limit_train=20)
    assert len(d.train) + len(d.val) == 20
    both = torch.cat([d.train.images, d.val.images])[:, 0].reshape(20, -1)
    assert sorted(map(bytes, both.numpy())) == sorted(map(bytes, x[:20].reshape(20, -1)))


def test_read_idx_rejects_malformed_files(tmp_path):
    p = tmp_path / "f"
    write_idx(p, np.zeros((3, 4), np.uint8), gz=False)
    assert D.read_idx(p).shape == (3, 4)
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(D.DataError, match=r"f: IDX header announces shape \(3, 4\)"):
        D.read_idx(p)
    p.write_bytes(b"\0\0\x0d\x01" + struct.pack(">I", 1) + b"\0" * 4)  # float IDX
    with pytest.raises(D.DataError, match="not an IDX file of unsigned bytes"):
        D.read_idx(p)
    p.write_bytes(b"\x1f\x8bgarbage")
    with pytest.raises(D.DataError, match="corrupted gzip"):
        D.read_idx(p)


def test_missing_or_mismatched_files_name_the_file_and_how_to_get_it(tmp_path):
    with pytest.raises(D.DataError, match=r"train-images-idx3-ubyte.*apt-get install dataset-fashion-mnist"):
        D.load("fashion-mnist", tmp_path)
    with pytest.raises(D.DataError, match="does not exist"):
        D.load("mnist", tmp_path / "nope")
    with pytest.raises(D.DataError, match="no default data directory"):
        D.load("cifar10")
    write_mnist(tmp_path, n_train=10)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(9, np.uint8), gz=True)
    with pytest.raises(D.DataError, match="train-labels-idx1-ubyte.gz: expected 10 labels"):
        D.load("mnist", tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.full(10, 10, np.uint8), gz=True)
    with pytest.raises(D.DataError, match="labels must lie in 0..9"):
        D.load("mnist", tmp_path)
    assert issubclass(D.DataError, ValueError)


@pytest.mark.parametrize("normalize", ["meanstd", "unit"])
def test_empty_training_file_names_the_file(tmp_path, normalize):
    write_mnist(tmp_path, n_train=0)
    with pytest.raises(D.DataError, match="train-images-idx3-ubyte.gz: holds 0 images; training needs at least 2"):
        D.load("mnist", tmp_path, normalize=normalize)


def test_zero_pixel_images_name_the_file(tmp_path):
    write_mnist(tmp_path, n_train=4, size=0)
    with pytest.raises(D.DataError, match=r"train-images-idx3-ubyte.gz: images of 0x0 pixels"):
        D.load("mnist", tmp_path)


def test_directory_in_place_of_a_file_or_of_the_data_directory(tmp_path):
    write_mnist(tmp_path, n_train=4)
    os.remove(tmp_path / "t10k-images-idx3-ubyte.gz")
    os.mkdir(tmp_path / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(D.DataError, match="t10k-images-idx3-ubyte.gz: is not a regular file"):
        D.load("mnist", tmp_path)
    with pytest.raises(D.DataError, match="is not a directory"):
        D.load("mnist", tmp_path / "train-labels-idx1-ubyte.gz")


@pytest.mark.parametrize("label", [2**70, 1.7, "3", -(2**70)])
def test_cifar_labels_must_be_ints(tmp_path, label):
    path = tmp_path / "b"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, label]}))
    with pytest.raises(D.DataError, match="b: expected 'labels', a list of 2 ints"):
        D.read_cifar_batch(path)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="name must be one of 'mnist', 'fashion-mnist', 'cifar10'"):
        D.load("svhn", tmp_path)
    with pytest.raises(ValueError, match="normalize must be one of 'meanstd', 'unit'"):
        D.load("mnist", tmp_path, normalize="zscore")


# ---------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("py2", [False, True])
def test_cifar_round_trip(tmp_path, py2):
    written = write_cifar(tmp_path / "cifar-10-batches-py", n=10, py2=py2)
    assert (b"_codecs" in (tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes()) != py2
    d = D.load("cifar10", tmp_path, seed=0)  # the parent of cifar-10-batches-py works too
    assert (len(d.train), len(d.val), len(d.test)) == (45, 5, 10)  # 10% validation
    assert d.train.images.shape[1:] == (3, 32, 32) and d.train.images.dtype == torch.uint8
    data, labels = written[5]
    # row layout: 1024 red, 1024 green, 1024 blue values, each plane row-major
    assert torch.equal(d.test.images[:, 1], torch.from_numpy(data[:, 1024:2048].reshape(-1, 32, 32)))
    assert d.test.labels.tolist() == labels
    assert d.preprocess.flip and d.preprocess.mean == (0.4914, 0.4822, 0.4465)


def test_cifar_refuses_arbitrary_objects(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(D.DataError, match="data_batch_1: not a CIFAR-10 python batch.*refusing to load posix.mkdir"):
        D.read_cifar_batch(path)
    assert not marker.exists()


def test_cifar_malformed_batches(tmp_path):
    path = tmp_path / "b"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(D.DataError, match=r"expected 'data' to be a uint8 array of shape \(N, 3072\)"):
        D.read_cifar_batch(path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}))
    with pytest.raises(D.DataError, match="expected 'labels', a list of 2 ints"):
        D.read_cifar_batch(path)
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(D.DataError, match="expected a dict"):
        D.read_cifar_batch(path)
    write_cifar(tmp_path / "c", n=2)
    os.remove(tmp_path / "c" / "data_batch_3")
    with pytest.raises(D.DataError, match="missing .*data_batch_3.*cs.toronto.edu"):
        D.load("cifar10", tmp_path / "c")


# ---------------------------------------------------------------- preprocessing and batches


def test_meanstd_uses_the_training_split_statistics(tmp_path):
    write_mnist(tmp_path, n_train=60)
    d = D.load("mnist", tmp_path, normalize="meanstd")
    pixels = d.train.images.double() / 255
    assert d.preprocess.mean[0] == pytest.approx(pixels.mean().item(), abs=1e-12)
    assert d.preprocess.std[0] == pytest.approx(pixels.std(unbiased=False).item(), abs=1e-12)
    x = d.preprocess(d.train.images)
    assert x.dtype == torch.float32 and abs(x.mean().item()) < 1e-5 and x.std().item() == pytest.approx(1, abs=1e-3)
    u = D.load("mnist", tmp_path, normalize="unit").preprocess(d.train.images)
    assert torch.allclose(u, d.train.images.float() / 255, rtol=0, atol=1e-6)  # fp32 rounding order


def test_flip_is_per_image_seeded_and_training_only():
    pre = D.Preprocess((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), flip=True)
    images = torch.randint(0, 256, (64, 3, 4, 4), dtype=torch.uint8)
    plain = pre(images)
    assert torch.allclose(plain, (images.float() / 255 - 0.5) / 0.25, rtol=0, atol=1e-5)  # fp32 rounding order
    a = pre(images, torch.Generator().manual_seed(1))
    flipped = torch.tensor([torch.equal(a[i], plain[i].flip(-1)) for i in range(64)])
    kept = torch.tensor([torch.equal(a[i], plain[i]) for i in range(64)])
    assert bool((flipped | kept).all()) and 10 < int(flipped.sum()) < 54
    assert torch.equal(a, pre(images, torch.Generator().manual_seed(1)))


def test_batches_cover_the_split_in_order():
    split = D.Split(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1), torch.arange(10))
    got = list(D.batches(split, 4))
    assert [len(y) for _, y in got] == [4, 4, 2] and torch.cat([y for _, y in got]).tolist() == list(range(10))
    order = torch.tensor([3, 1, 2])
    (x, y), = D.batches(split, 8, order)
    assert y.tolist() == [3, 1, 2] and x.view(-1).tolist() == [3, 1, 2]


@pytest.mark.skipif(not os.path.exists(os.path.join(FASHION, "train-images-idx3-ubyte.gz")), reason="no Fashion-MNIST")
def test_real_fashion_mnist():
    d = D.load("fashion-mnist")
    assert (len(d.train), len(d.val), len(d.test)) == (51000, 9000, 10000)
    assert d.train.images.shape[1:] == (1, 28, 28) and d.normalize == "meanstd"
    assert sorted(torch.bincount(d.test.labels).tolist()) == [1000] * 10


# ---------------------------------------------------------------- hostile dataset files (issue 24, items 13, 14)


def _gz_bomb(path, shape, zeros: int) -> int:
    """A gzipped IDX file whose header announces ``shape`` and whose stream inflates to ``zeros``
    zero bytes after it; returns the file's size."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = b"\0\0\x08" + bytes([len(shape)]) + struct.pack(f">{len(shape)}I", *shape)
    parts = [c.compress(head)]
    block = bytes(1 << 24)
    for _ in range(zeros >> 24):
        parts.append(c.compress(block))
    parts.append(c.flush())
    path.write_bytes(b"".join(parts))
    return path.stat().st_size


def test_a_gzip_bomb_is_refused_before_it_is_inflated(tmp_path):
    from seedslot.memory import track

    path = tmp_path / "train-images-idx3-ubyte.gz"
    size = _gz_bomb(path, (65536, 256, 256), 2**28)  # announces 4 GiB, inflates to 256 MiB, holds ~260 KB
    assert size < 2**20
    with track() as m:
        with pytest.raises(D.DataError, match=f"{path}: IDX header announces shape"):
            D.read_idx(path)
    assert m.peak_increment_bytes < 2**26
    (tmp_path / "plain").write_bytes(bytes(1 << 20))  # a CIFAR batch that inflates beyond any batch
    bomb = tmp_path / "data_batch_1"
    bomb.write_bytes(gzip.compress(bytes(2**28)))
    with track() as m:
        with pytest.raises(D.DataError, match="inflates to more than"):
            D.read_cifar_batch(bomb)
    assert m.peak_increment_bytes < 2**28


def test_idx_dimensions_whose_product_overflows_name_the_file(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\0\0\x08\x04" + struct.pack(">4I", 2**16, 2**16, 2**16, 2**16))  # 2**64 wraps to 0
    with pytest.raises(D.DataError, match=f"{path}: IDX header announces shape"):
        D.read_idx(path)


def test_a_device_or_fifo_is_not_read_as_a_dataset_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for path in ("/dev/zero", str(tmp_path / "fifo")):
        with pytest.raises(D.DataError, match="regular file"):
            D.read_idx(path)
