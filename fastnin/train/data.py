"""Data for fastnin.train: the IDX files of MNIST / Fashion-MNIST, the CIFAR-10 python batches, and
the embedded default (scikit-learn's handwritten digits), as in-memory uint8 images.

Every loader returns a pair of `ImageSet`s (train, test). An ImageSet keeps the images at their
native size as uint8 (60,000 MNIST images at 224x224 in float32 would take 12 GB) and converts one
image at a time in __getitem__, in the DataLoader's workers:

    x = (uint8 / max_value - mean) / std          per channel; mean/std of the *training* images
    x = resize(x, side)                           bilinear (align_corners=False, antialias=True)

Resizing: the seeds resize with `tf.image.resize_with_pad` (seed 000, square to square, i.e. a
plain bilinear resize) and torchvision's `Resize` (bilinear by default); we use bilinear too, with
antialiasing so that shrinking (CIFAR-10 32x32 to LeNet's 28x28) does not alias. Normalizing before
resizing equals normalizing after (both are affine per channel and bilinear weights sum to 1).

Bad input raises a ValueError (or FileNotFoundError) naming the file.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DATASETS",
    "ImageSet",
    "read_idx",
    "read_cifar10_batch",
    "load_dataset",
    "load_idx_dataset",
    "load_cifar10",
    "load_digits",
]

# --dataset names. "digits" is the embedded default (no --data needed).
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")

# The test split of the embedded digits: 20% of the 1,797 images, stratified by class, drawn with this
# fixed seed (independent of --seed, so that every run is scored on the same 360 images).
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@dataclass(eq=False)
class ImageSet(torch.utils.data.Dataset):
    """Images kept as uint8 Tensor[N, C, H, W] with int64 labels Tensor[N]; item i is
    (float32 Tensor[C, side, side], label), normalized and resized as the module docstring says."""

    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    max_value: float  # the value that maps to 1.0 (255 for 8-bit files, 16 for the digits)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    side: int | None = None  # resize target; None keeps the native size
    num_classes: int = 10

    def __post_init__(self):
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise ValueError(
                f"ImageSet: images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"ImageSet: {self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")
        if not self.mean:
            self.mean, self.std = channel_stats(self.images, self.max_value)
        c = self.images.shape[1]
        self._scale = torch.tensor([1.0 / (self.max_value * s) for s in self.std]).view(c, 1, 1)
        self._shift = torch.tensor([m / s for m, s in zip(self.mean, self.std)]).view(c, 1, 1)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        x = self.images[i].float() * self._scale - self._shift
        if self.side is not None and tuple(x.shape[1:]) != (self.side, self.side):
            x = F.interpolate(x[None], size=(self.side, self.side), mode="bilinear", align_corners=False,
                              antialias=True)[0]
        return x, self.labels[i]

    def subset(self, n: int | None) -> ImageSet:
        """The first n items (all when n is None), with the same normalization."""
        if n is None or n >= len(self):
            return self
        return ImageSet(self.images[:n], self.labels[:n], self.max_value, self.mean, self.std, self.side,
                        self.num_classes)

    def with_stats_of(self, other: ImageSet) -> ImageSet:
        """This set normalized with `other`'s mean and std (the test set uses the training set's)."""
        return ImageSet(self.images, self.labels, self.max_value, other.mean, other.std, self.side, self.num_classes)


def channel_stats(images: torch.Tensor, max_value: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images scaled by 1/max_value, accumulated in float64 in
    chunks (CIFAR-10's 150M values would take 600 MB as one float32 tensor)."""
    c = images.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    count = 0
    for chunk in images.split(8192):
        x = chunk.to(torch.float64).transpose(0, 1).reshape(c, -1) / max_value
        s += x.sum(1)
        s2 += x.square().sum(1)
        count += x.shape[1]
    if count == 0:
        return (0.0,) * c, (1.0,) * c
    mean = s / count
    std = (s2 / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


# ------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST): magic 0x00 0x00 <type> <ndim>, ndim big-endian uint32 sizes, data.

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
              0x0E: np.dtype(">f8")}


def _read_bytes(path: str) -> bytes:
    """The file's bytes, gunzipped when it is gzip (by its magic bytes, whatever its name)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError, gzip.BadGzipFile) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip file ({e})") from None
    return raw


def read_idx(path: str, ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (raw or gzip) into an array of its declared shape.

    Checks the magic number (two zero bytes, a known type code, `ndim` dimensions when given) and
    that the data is exactly as long as the header says (shorter: truncated; longer: not IDX).
    """
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(data)} bytes, shorter than its 4-byte magic number)")
    z0, z1, code, nd = data[0], data[1], data[2], data[3]
    if z0 != 0 or z1 != 0 or code not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (magic number 0x{data[:4].hex()}; expected 0x0000TTNN with "
                         "type TT in 08 09 0b 0c 0d 0e)")
    if ndim is not None and nd != ndim:
        raise ValueError(f"{path}: wrong IDX magic number 0x{data[:4].hex()}: {nd} dimensions, expected {ndim} "
                         f"({'labels' if ndim == 1 else 'images'} file)")
    header = 4 + 4 * nd
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX file (header needs {header} bytes, file has {len(data)})")
    shape = struct.unpack(f">{nd}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = len(data) - header
    if have < expected:
        raise ValueError(f"{path}: truncated IDX file: header declares shape {list(shape)} ({expected} bytes of data) "
                         f"but only {have} bytes follow")
    if have > expected:
        raise ValueError(f"{path}: {have - expected} bytes after the {expected} bytes of data declared by its "
                         f"header (shape {list(shape)}): not a valid IDX file")
    return np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=header).reshape(shape)


# The file names of the MNIST distributions: "train-images-idx3-ubyte" (LeCun, Zalando) and
# "train-images.idx3-ubyte" (some mirrors), each raw or .gz; in DIR, DIR/raw or DIR/<Name>/raw
# (torchvision's layout).
_IDX_STEMS = {
    "train": ("train-images", "train-labels"),
    "test": ("t10k-images", "t10k-labels"),
}


def _find(data_dir: str, subdirs: tuple[str, ...], names: list[str], what: str) -> str:
    tried = []
    for sub in subdirs:
        for n in names:
            p = os.path.join(data_dir, sub, n) if sub else os.path.join(data_dir, n)
            if os.path.isfile(p):
                return p
            tried.append(p)
    raise FileNotFoundError(f"{what}: not found in {data_dir} (looked for {', '.join(sorted(set(names)))} in "
                            f"{', '.join(repr(s) or 'DIR' for s in subdirs)})")


def _idx_names(stem: str, kind: str) -> list[str]:
    # kind "idx3" (images) or "idx1" (labels)
    base = [f"{stem}-{kind}-ubyte", f"{stem}.{kind}-ubyte"]
    return base + [b + ".gz" for b in base]


def load_idx_dataset(data_dir: str, name: str = "mnist") -> tuple[ImageSet, ImageSet]:
    """MNIST or Fashion-MNIST from the four IDX files in data_dir (raw or .gz)."""
    sub = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name]
    subdirs = ("", "raw", os.path.join(sub, "raw"))
    sets = []
    for split, (img_stem, lbl_stem) in _IDX_STEMS.items():
        ip = _find(data_dir, subdirs, _idx_names(img_stem, "idx3"), f"{name} {split} images")
        lp = _find(data_dir, subdirs, _idx_names(lbl_stem, "idx1"), f"{name} {split} labels")
        images = read_idx(ip, ndim=3)
        labels = read_idx(lp, ndim=1)
        if images.dtype != np.uint8 or labels.dtype != np.uint8:
            raise ValueError(f"{ip if images.dtype != np.uint8 else lp}: expected unsigned bytes (IDX type 0x08)")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{ip} holds {images.shape[0]} images but {lp} holds {labels.shape[0]} labels")
        if labels.size and labels.max() > 9:
            raise ValueError(f"{lp}: label {int(labels.max())} out of range 0..9")
        sets.append((torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64))))
    train = ImageSet(*sets[0], max_value=255.0)
    return train, ImageSet(*sets[1], max_value=255.0).with_stats_of(train)


# ------------------------------------------------------------------------------------------------
# CIFAR-10 python batches: pickled dicts {b"data": uint8 [10000, 3072] (RRR..GGG..BBB, row-major
# 32x32), b"labels": [int] * 10000, ...}, written by Python 2 (hence encoding="bytes").


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and builtin containers only: a pickle can run arbitrary code, and a
    data file has no business doing so."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are expected)")


def read_cifar10_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: (uint8 [N, 3, 32, 32], int64 [N])."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    try:
        d = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # truncated (EOFError, UnpicklingError), or not a pickle at all
        raise ValueError(f"{path}: not a readable CIFAR-10 python batch ({type(e).__name__}: {e}); "
                         "truncated or corrupt?") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise ValueError(f"{path}: missing key {'data' if 'data' not in d else 'labels'} (keys: {sorted(d)})")
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: data must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {data.shape[0]} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels out of range 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str) -> tuple[ImageSet, ImageSet]:
    """CIFAR-10 from data_batch_1..5 and test_batch in data_dir (or data_dir/cifar-10-batches-py)."""
    sub = "cifar-10-batches-py"
    base = os.path.join(data_dir, sub) if os.path.isdir(os.path.join(data_dir, sub)) else data_dir
    names = [f"data_batch_{i}" for i in range(1, 6)]
    for n in names + ["test_batch"]:
        if not os.path.isfile(os.path.join(base, n)):
            raise FileNotFoundError(f"cifar10: {os.path.join(base, n)}: no such file (expected data_batch_1..5 "
                                    "and test_batch, the CIFAR-10 python version)")
    parts = [read_cifar10_batch(os.path.join(base, n)) for n in names]
    train = ImageSet(torch.from_numpy(np.concatenate([p[0] for p in parts])),
                     torch.from_numpy(np.concatenate([p[1] for p in parts])), max_value=255.0)
    ti, tl = read_cifar10_batch(os.path.join(base, "test_batch"))
    return train, ImageSet(torch.from_numpy(ti.copy()), torch.from_numpy(tl), max_value=255.0).with_stats_of(train)


# ------------------------------------------------------------------------------------------------
# The embedded default.


def load_digits() -> tuple[ImageSet, ImageSet]:
    """scikit-learn's handwritten digits (1,797 8x8 images, values 0..16, shipped inside the package):
    1,437 train and 360 test images, a stratified split with a fixed seed (DIGITS_SPLIT_SEED)."""
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError(
            "fastnin.train: the default dataset (digits) needs scikit-learn (`pip install fastnin[train]`); "
            f"or pass --data DIR --dataset mnist|fashion-mnist|cifar10 ({e})"
        ) from None
    d = _sk_load_digits()
    images = d.images.astype(np.uint8)  # integers 0..16 stored as float64
    idx_train, idx_test = train_test_split(np.arange(len(images)), test_size=DIGITS_TEST_FRACTION,
                                           random_state=DIGITS_SPLIT_SEED, stratify=d.target)
    def make(idx, stats=None):
        s = ImageSet(torch.from_numpy(images[idx])[:, None], torch.from_numpy(d.target[idx].astype(np.int64)),
                     max_value=16.0)
        return s if stats is None else s.with_stats_of(stats)
    train = make(idx_train)
    return train, make(idx_test, train)


def load_dataset(name: str, data_dir: str | None) -> tuple[ImageSet, ImageSet]:
    """(train, test) ImageSets for --dataset `name` from --data `data_dir`."""
    if name not in DATASETS:
        raise ValueError(f"fastnin.train: unknown dataset {name!r} (--dataset); expected one of {', '.join(DATASETS)}")
    if name == "digits":
        if data_dir is not None:
            raise ValueError("fastnin.train: --dataset digits is embedded and takes no --data directory")
        return load_digits()
    if data_dir is None:
        raise ValueError(f"fastnin.train: --dataset {name} needs --data DIR (the directory holding its files)")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"fastnin.train: --data {data_dir}: no such directory")
    if name == "cifar10":
        return load_cifar10(data_dir)
    return load_idx_dataset(data_dir, name)
