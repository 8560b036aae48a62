"""Datasets from local files: MNIST and Fashion-MNIST (IDX, gzipped or not) and CIFAR-10 (python
batches), with the paper's validation split and preprocessing. Nothing is ever downloaded.

Images stay uint8 tensors (N, C, H, W) once decoded; a batch is gathered with one ``index_select``
and turned into floats by :class:`Preprocess` as whole-batch tensor ops, so loading never costs
per-sample Python work. CIFAR-10 pickles are read with an unpickler that can build only dicts,
lists, bytes, numbers and numpy arrays: a hostile file cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import struct
import zlib
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch

from ..files import read_regular
from ..rng import torch_seed
from ..validate import check_choice, check_int

__all__ = [
    "DATASETS",
    "NORMALIZE",
    "DEFAULT_DIRS",
    "DEFAULT_NORMALIZE",
    "DataError",
    "Split",
    "Preprocess",
    "Data",
    "load",
    "read_idx",
    "read_cifar_batch",
    "batches",
]

DATASETS = ("mnist", "fashion-mnist", "cifar10")
NORMALIZE = ("meanstd", "unit")
DEFAULT_DIRS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}

# The paper's choices: [0, 1] pixels for MNIST, per-channel mean/std for CIFAR-10; for
# Fashion-MNIST the training set's mean/std (one Lenet epoch: ~84-85% instead of ~80% on [0, 1]).
DEFAULT_NORMALIZE = {"mnist": "unit", "fashion-mnist": "meanstd", "cifar10": "meanstd"}
_VAL_FRACTION = {"mnist": 0.15, "fashion-mnist": 0.15, "cifar10": 0.10}
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.247, 0.243, 0.261)
_SPLIT = 0x5B17  # stream tag of the validation split

_HOW_TO_GET = {
    "mnist": "get the four IDX files from http://yann.lecun.com/exdb/mnist/ (or a mirror) and pass --data-dir",
    "fashion-mnist": "install them with `apt-get install dataset-fashion-mnist` (files in "
    "/usr/share/datasets/fashion-mnist) or get them from https://github.com/zalandoresearch/fashion-mnist "
    "and pass --data-dir",
    "cifar10": "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
    "extract it and pass --data-dir pointing at cifar-10-batches-py",
}


class DataError(ValueError):
    """A dataset file that is missing or malformed; the message names the file, what was
    expected and how to get it."""


# ---------------------------------------------------------------- file formats


_MAX_FILE_BYTES = 2**31  # what one dataset file may hold once inflated (MNIST's largest: 47 MB)
_MAX_CIFAR_BYTES = 2**27  # a CIFAR-10 batch holds 31 MB
_MAX_RATIO = 1032  # deflate cannot compress further: a larger declared size is not in the file
_CHUNK = 1 << 20


def _read(path: str) -> bytes:
    """The raw bytes of a regular dataset file (a device or FIFO is refused)."""
    try:
        return read_regular(path, _MAX_FILE_BYTES, what="dataset file")
    except ValueError as e:
        raise DataError(str(e)) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None


class _Inflater:
    """A gzip stream (several members allowed) inflated in bounded chunks: :meth:`take` returns at
    most ``n`` more bytes, so nothing is inflated beyond what the caller has checked it needs."""

    def __init__(self, raw: bytes, path: str) -> None:
        self.raw, self.path, self.pos = raw, path, 0
        self.z = zlib.decompressobj(31)
        self.pending = b""

    def take(self, n: int) -> bytes:
        out = [self.pending[:n]]
        got = len(out[0])
        self.pending = self.pending[n:]
        try:
            while got < n:
                if self.z.eof:  # another gzip member may follow
                    rest = self.z.unused_data + self.raw[self.pos :]
                    if not rest:
                        break
                    self.z = zlib.decompressobj(31)
                    self.raw, self.pos = rest, 0
                if self.z.unconsumed_tail:
                    data = self.z.decompress(self.z.unconsumed_tail, min(_CHUNK, n - got))
                elif self.pos < len(self.raw):
                    data = self.z.decompress(self.raw[self.pos : self.pos + _CHUNK], min(_CHUNK, n - got))
                    self.pos += _CHUNK
                else:
                    if not self.z.eof:
                        raise DataError(f"{self.path}: corrupted gzip data (the stream is truncated)")
                    continue
                out.append(data)
                got += len(data)
        except zlib.error as e:
            raise DataError(f"{self.path}: corrupted gzip data ({e})") from None
        return b"".join(out)

    def at_end(self) -> bool:
        """Whether the stream holds nothing more (checked by inflating at most one byte)."""
        return not self.take(1)


def _open(path: str, limit: int = _MAX_FILE_BYTES) -> bytes:
    """The file's bytes, gunzipped (in bounded chunks, at most ``limit`` bytes) when it starts
    with the gzip magic."""
    raw = _read(path)
    if raw[:2] != b"\x1f\x8b":
        return raw
    limit = min(limit, len(raw) * _MAX_RATIO)
    z = _Inflater(raw, path)
    data = z.take(limit)
    if not z.at_end():
        raise DataError(f"{path}: inflates to more than {limit} bytes; a dataset file may hold at most that")
    return data


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """An IDX file of unsigned bytes (gzipped or not) as a uint8 tensor of the file's shape. The
    header is read first and the size it declares checked against what the file can hold, so a
    gzip bomb is refused before it is inflated."""
    path = os.fspath(path)
    raw = _read(path)
    gz = raw[:2] == b"\x1f\x8b"
    z = _Inflater(raw, path) if gz else None
    head4 = z.take(4) if gz else raw[:4]
    if len(head4) < 4 or head4[:2] != b"\0\0" or head4[2] != 0x08 or not 1 <= head4[3] <= 4:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (expected magic 00 00 08 0N, N = 1..4)")
    ndim = head4[3]
    head = 4 + 4 * ndim
    dims = z.take(4 * ndim) if gz else raw[4:head]
    if len(dims) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", dims)
    size = math.prod(shape)  # Python ints: no overflow
    can_hold = len(raw) * _MAX_RATIO if gz else len(raw) - head
    if size > min(can_hold, _MAX_FILE_BYTES):
        held = "inflate to at most" if gz else "holds"
        raise DataError(f"{path}: IDX header announces shape {shape} ({size} bytes), the file {held} "
                        f"{min(can_hold, _MAX_FILE_BYTES)}")
    body = z.take(size) if gz else raw[head:]
    if len(body) != size or (gz and not z.at_end()):
        n = len(body) if len(body) != size else f"more than {size}"
        raise DataError(f"{path}: IDX header announces shape {shape} ({size} bytes), the file holds {n}")
    return torch.from_numpy(np.frombuffer(body, dtype=np.uint8).reshape(shape).copy())


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
    """What pickle protocol 2 under Python 3 calls to rebuild bytes; latin1 only."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("unexpected _codecs.encode call")
    return text.encode("latin1")


_core = getattr(np, "_core", None) or np.core
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _core.multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _core.numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _core.numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs_encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def read_cifar_batch(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 python batch: uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    path = os.fspath(path)
    raw = _open(path, _MAX_CIFAR_BYTES)
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR-10 python batch (expected a dict, got {type(obj).__name__})")
    entries = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    data, labels = entries.get("data"), entries.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: expected 'data' to be a uint8 array of shape (N, 3072)")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != data.shape[0]:
        raise DataError(f"{path}: expected 'labels', a list of {data.shape[0]} ints")
    try:  # ints only: no float truncated to a class, no int beyond int64
        arr = np.asarray(labels)
        if arr.dtype.kind not in "iu" or arr.ndim != 1:
            raise ValueError
        y = torch.as_tensor(arr.astype(np.int64))
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{path}: expected 'labels', a list of {data.shape[0]} ints") from None
    x = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())  # rows: R, G, B planes
    return x, y


# ---------------------------------------------------------------- dataset files


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(name: str, data_dir: str, stem: str) -> str:
    """``stem`` or ``stem.gz`` (or the ``train-images.idx3-ubyte`` spelling) in ``data_dir``."""
    dotted = stem.replace("-idx", ".idx")
    for candidate in (stem + ".gz", stem, dotted + ".gz", dotted):
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
        if os.path.exists(path):
            raise DataError(f"{path}: is not a regular file; expected the IDX file {stem} (gzipped or not)")
    raise DataError(f"{name}: missing {os.path.join(data_dir, stem)}[.gz]: expected the IDX files "
                    f"{', '.join(s for pair in _IDX_FILES.values() for s in pair)} (gzipped or not); "
                    f"{_HOW_TO_GET[name]}")


def _read_idx_pair(name: str, data_dir: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images_path, labels_path = (_find(name, data_dir, s) for s in _IDX_FILES[split])
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dim() != 3:
        raise DataError(f"{images_path}: expected images of shape (N, H, W), got {tuple(images.shape)}")
    if images.shape[1] < 1 or images.shape[2] < 1:
        raise DataError(f"{images_path}: images of {images.shape[1]}x{images.shape[2]} pixels; expected H, W >= 1")
    if split == "train" and images.shape[0] < 2:
        raise DataError(f"{images_path}: holds {images.shape[0]} images; training needs at least 2")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{labels_path}: expected {images.shape[0]} labels, got shape {tuple(labels.shape)}")
    return images.unsqueeze(1), labels.long()  # (N, 1, H, W), (N,)


def _read_cifar(data_dir: str) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    nested = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.isfile(os.path.join(data_dir, "test_batch")) and os.path.isdir(nested):
        data_dir = nested
    paths = [os.path.join(data_dir, f"data_batch_{i}") for i in range(1, 6)] + [os.path.join(data_dir, "test_batch")]
    for p in paths:
        if not os.path.isfile(p):
            raise DataError(f"cifar10: missing {p}: expected data_batch_1..data_batch_5 and test_batch "
                            f"(CIFAR-10 python version); {_HOW_TO_GET['cifar10']}")
    parts = [read_cifar_batch(p) for p in paths]
    train = (torch.cat([x for x, _ in parts[:5]]), torch.cat([y for _, y in parts[:5]]))
    if train[1].shape[0] < 2:
        raise DataError(f"cifar10: {', '.join(paths[:5])} hold {train[1].shape[0]} images; training needs at least 2")
    return train, parts[5]


# ---------------------------------------------------------------- splits and preprocessing


@dataclass
class Split:
    """Decoded examples: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Preprocess:
    """uint8 batch -> float batch ``(x / 255 - mean) / std`` per channel, plus an optional random
    horizontal flip of each image (training only: it needs a generator)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool = False

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        c = images.shape[1]
        dev = images.device
        scale = torch.tensor([1.0 / (255.0 * s) for s in self.std], dtype=torch.float32, device=dev).view(c, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)], dtype=torch.float32, device=dev).view(c, 1, 1)
        x = images.to(torch.float32).mul_(scale).add_(shift)  # (B, C, H, W)
        if self.flip and generator is not None:  # drawn on the CPU generator: the same flips on any device
            flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(dev)  # (B,)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x


@dataclass
class Data:
    """A dataset ready to train on: train/val/test splits and the preprocessing they share."""

    name: str
    data_dir: str
    train: Split
    val: Split
    test: Split
    preprocess: Preprocess
    normalize: str
    num_classes: int = 10

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def input_size(self) -> int:
        return self.train.images.shape[2]

    def to(self, device) -> "Data":
        """The same data with every split's tensors on ``device``."""
        return replace(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))

    def fingerprint(self) -> str:
        """SHA-256 (hex) of every split's images and labels: what a run trains and is evaluated on,
        wherever the files lie, so that a resumed run can tell another dataset's files."""
        digest = hashlib.sha256()
        for split in (self.train, self.val, self.test):
            for t in (split.images, split.labels):
                digest.update(str((tuple(t.shape), t.dtype)).encode())
                digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def describe(self) -> str:
        """One line: where the data came from, the split sizes and the preprocessing."""
        stats = ", ".join(f"{m:.4f}/{s:.4f}" for m, s in zip(self.preprocess.mean, self.preprocess.std))
        how = {"meanstd": f"normalize=meanstd (mean/std {stats})", "unit": "normalize=unit ([0, 1] pixels)"}
        flip = ", random horizontal flip" if self.preprocess.flip else ""
        return (f"{self.name} from {self.data_dir}: train {len(self.train)}, val {len(self.val)}, "
                f"test {len(self.test)}; {how[self.normalize]}{flip}")


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of ``images / 255``, exactly, from a histogram of
    the 256 byte values (no float copy of the dataset)."""
    c = images.shape[1]
    counts = torch.zeros(c, 256, dtype=torch.float64)
    for chunk in images.split(4096):
        flat = chunk.transpose(0, 1).reshape(c, -1).long()  # (C, pixels)
        counts += torch.stack([torch.bincount(flat[i], minlength=256) for i in range(c)]).double()
    v = torch.arange(256, dtype=torch.float64) / 255.0
    n = counts.sum(dim=1)
    mean = counts @ v / n
    std = (counts @ (v * v) / n - mean * mean).clamp_min(0.0).sqrt().clamp_min(1e-8)
    return tuple(mean.tolist()), tuple(std.tolist())


def load(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    normalize: str | None = None,
    limit_train: int | None = None,
) -> Data:
    """Load dataset ``name`` from ``data_dir`` (Fashion-MNIST defaults to the Debian location).

    The validation split (15% MNIST-like, 10% CIFAR-10) is a random subset of the training file
    fixed by ``seed``. ``normalize`` is "meanstd" (MNIST-like: the training split's mean and std;
    CIFAR-10: the paper's per-channel constants) or "unit" ([0, 1] pixels); None takes the
    paper's choice per dataset. ``limit_train`` keeps only the first N examples of the training
    file (before the split), for quick tests.
    """
    check_choice("name", name, DATASETS)
    normalize = check_choice("normalize", DEFAULT_NORMALIZE[name] if normalize is None else normalize, NORMALIZE)
    check_int("limit_train", limit_train, 2, optional=True)
    if data_dir is None:
        if name not in DEFAULT_DIRS:
            raise DataError(f"{name}: no default data directory; {_HOW_TO_GET[name]}")
        data_dir = DEFAULT_DIRS[name]
    data_dir = os.fspath(data_dir)
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"{name}: data directory {data_dir} is not a directory; {_HOW_TO_GET[name]}")
    if not os.path.isdir(data_dir):
        raise DataError(f"{name}: data directory {data_dir} does not exist; {_HOW_TO_GET[name]}")

    if name == "cifar10":
        (x, y), (tx, ty) = _read_cifar(data_dir)
    else:
        (x, y), (tx, ty) = _read_idx_pair(name, data_dir, "train"), _read_idx_pair(name, data_dir, "test")
    if tx.shape[1:] != x.shape[1:]:
        raise DataError(f"{name} in {data_dir}: test images are {tuple(tx.shape[1:])}, training images {tuple(x.shape[1:])}")
    for what, labels in (("training", y), ("test", ty)):
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < 10:
            raise DataError(f"{name} in {data_dir}: {what} labels must lie in 0..9")
    if limit_train is not None:
        x, y = x[:limit_train], y[:limit_train]

    g = torch.Generator().manual_seed(torch_seed(seed, _SPLIT))
    order = torch.randperm(len(y), generator=g)
    n_val = round(_VAL_FRACTION[name] * len(y))
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
    train, val = Split(x[train_idx], y[train_idx]), Split(x[val_idx], y[val_idx])

    c = x.shape[1]
    if normalize == "unit":
        mean, std = (0.0,) * c, (1.0,) * c
    elif name == "cifar10":
        mean, std = _CIFAR_MEAN, _CIFAR_STD
    else:
        mean, std = _channel_stats(train.images)
    return Data(name, data_dir, train, val, Split(tx, ty), Preprocess(mean, std, flip=name == "cifar10"), normalize)


def batches(split: Split, batch_size: int, order: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(uint8 images, labels)`` batches of ``split`` in ``order`` (default: file order)."""
    n = len(split)
    order = torch.arange(n) if order is None else order
    for idx in order.to(split.images.device).split(batch_size):
        yield split.images.index_select(0, idx), split.labels.index_select(0, idx)
