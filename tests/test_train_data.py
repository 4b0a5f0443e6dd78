"""fastnin.train.data: the IDX and CIFAR-10 readers on small synthetic files, the embedded digits,
and the clear errors for bad files (each naming the file)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastnin.train import data as D


def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write(path, payload: bytes, gz: bool) -> str:
    path = str(path) + (".gz" if gz else "")
    with open(path, "wb") as f:
        f.write(gzip.compress(payload) if gz else payload)
    return path


def _write_mnist(d, n_train=12, n_test=5, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for stem, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        lbls = rng.integers(0, 10, n, dtype=np.uint8)
        _write(d / f"{stem}-images-idx3-ubyte", _idx_bytes(imgs), gz)
        _write(d / f"{stem}-labels-idx1-ubyte", _idx_bytes(lbls), gz)
        arrays[stem] = (imgs, lbls)
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_read_idx_roundtrip(tmp_path, gz):
    a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    p = _write(tmp_path / "x-idx3-ubyte", _idx_bytes(a), gz)
    np.testing.assert_array_equal(D.read_idx(p, ndim=3), a)
    # Other IDX types are big-endian.
    b = np.array([1, -2, 70000], dtype=">i4")
    p = _write(tmp_path / "y-idx1", _idx_bytes(b, 0x0C), gz)
    np.testing.assert_array_equal(D.read_idx(p, ndim=1), [1, -2, 70000])


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_read_idx_errors_name_the_file(tmp_path, gz):
    a = np.zeros((4, 28, 28), np.uint8)
    good = _idx_bytes(a)
    # wrong magic: not starting with two zero bytes
    p = _write(tmp_path / "bad-magic", b"\x12\x34" + good[2:], gz)
    with pytest.raises(ValueError, match=r"bad-magic.*not an IDX file"):
        D.read_idx(p, ndim=3)
    # a labels file where an images file is expected: right type, wrong dimension count
    p = _write(tmp_path / "labels-as-images", _idx_bytes(np.zeros(4, np.uint8)), gz)
    with pytest.raises(ValueError, match=r"labels-as-images.*magic number 0x00000801.*1 dimensions, expected 3"):
        D.read_idx(p, ndim=3)
    # truncated data
    p = _write(tmp_path / "truncated", good[:-100], gz)
    with pytest.raises(ValueError, match=r"truncated.*truncated IDX file.*\[4, 28, 28\]"):
        D.read_idx(p, ndim=3)
    # truncated header
    p = _write(tmp_path / "short-header", good[:9], gz)
    with pytest.raises(ValueError, match=r"short-header.*truncated IDX file \(header"):
        D.read_idx(p, ndim=3)
    # trailing garbage
    p = _write(tmp_path / "too-long", good + b"\0" * 7, gz)
    with pytest.raises(ValueError, match=r"too-long.*7 bytes after"):
        D.read_idx(p, ndim=3)


def test_read_idx_truncated_gzip_and_missing_file(tmp_path):
    p = tmp_path / "cut.gz"
    p.write_bytes(gzip.compress(_idx_bytes(np.zeros((3, 28, 28), np.uint8)))[:-20])
    with pytest.raises(ValueError, match=r"cut\.gz.*gzip"):
        D.read_idx(str(p), ndim=3)
    with pytest.raises(FileNotFoundError, match=r"nothere"):
        D.read_idx(str(tmp_path / "nothere"))


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_load_mnist_dir(tmp_path, gz):
    arrays = _write_mnist(tmp_path, gz=gz)
    train, test = D.load_dataset("fashion-mnist", str(tmp_path))
    assert (len(train), len(test), train.channels) == (12, 5, 1)
    torch.testing.assert_close(train.images[:, 0], torch.from_numpy(arrays["train"][0]))
    torch.testing.assert_close(test.labels, torch.from_numpy(arrays["t10k"][1].astype(np.int64)))
    # Normalization: the training set's own statistics, reused for the test set.
    x = train.images.double() / 255
    assert train.mean[0] == pytest.approx(x.mean().item())
    assert train.std[0] == pytest.approx(x.std(unbiased=False).item())
    assert (test.mean, test.std) == (train.mean, train.std)
    xs = torch.stack([train[i][0] for i in range(len(train))])
    assert abs(xs.mean().item()) < 1e-5 and xs.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    # Resizing: bilinear (antialiased) to the model's side.
    train.side = 32
    x0, y0 = train[3]
    assert x0.shape == (1, 32, 32) and y0.item() == arrays["train"][1][3]
    native = (torch.from_numpy(arrays["train"][0][3]).float() / 255 - train.mean[0]) / train.std[0]
    want = F.interpolate(native[None, None], size=(32, 32), mode="bilinear", align_corners=False, antialias=True)[0]
    torch.testing.assert_close(x0, want, atol=1e-5, rtol=1e-5)


def test_load_mnist_torchvision_layout(tmp_path):
    # torchvision keeps the files in DIR/MNIST/raw
    sub = tmp_path / "MNIST" / "raw"
    sub.mkdir(parents=True)
    _write_mnist(sub, gz=True)
    train, test = D.load_dataset("mnist", str(tmp_path))
    assert (len(train), len(test)) == (12, 5)


def test_mnist_count_mismatch_and_missing(tmp_path):
    _write_mnist(tmp_path)
    _write(tmp_path / "t10k-labels-idx1-ubyte", _idx_bytes(np.zeros(4, np.uint8)), False)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte holds 5 images but .*t10k-labels-idx1-ubyte holds 4"):
        D.load_dataset("mnist", str(tmp_path))
    os.remove(tmp_path / "train-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match=r"mnist train labels: not found in .*train-labels-idx1-ubyte"):
        D.load_dataset("mnist", str(tmp_path))


def _cifar_batch(n, seed, protocol=2):
    rng = np.random.default_rng(seed)
    d = {b"batch_label": b"synthetic", b"labels": rng.integers(0, 10, n).tolist(),
         b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
    return d, pickle.dumps(d, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_dir(tmp_path, protocol):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    batches = []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        d, b = _cifar_batch(3, i, protocol)
        (base / name).write_bytes(b)
        batches.append(d)
    train, test = D.load_dataset("cifar10", str(tmp_path))
    assert (len(train), len(test), train.channels) == (15, 3, 3)
    # data rows are RRR...GGG...BBB, each 32x32 row-major
    np.testing.assert_array_equal(train.images[4].numpy(), batches[1][b"data"][1].reshape(3, 32, 32))
    assert test.labels.tolist() == batches[5][b"labels"]
    assert len(train.mean) == 3 and test.mean == train.mean


def test_cifar10_errors(tmp_path):
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(_cifar_batch(2, i)[1])
    # truncated
    b = _cifar_batch(2, 9)[1]
    (tmp_path / "data_batch_3").write_bytes(b[: len(b) // 2])
    with pytest.raises(ValueError, match=r"data_batch_3: not a readable CIFAR-10 python batch.*truncated"):
        D.load_dataset("cifar10", str(tmp_path))
    # label count disagrees with the image count
    d = _cifar_batch(4, 9)[0]
    d[b"labels"] = d[b"labels"][:3]
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_3: 4 images but 3 labels"):
        D.load_dataset("cifar10", str(tmp_path))
    # a pickle that would run code is refused, not executed
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": os.getcwd, b"labels": []}))
    with pytest.raises(ValueError, match=r"data_batch_3.*refusing to load posix.getcwd"):
        D.load_dataset("cifar10", str(tmp_path))
    os.remove(tmp_path / "test_batch")
    with pytest.raises(FileNotFoundError, match=r"test_batch: no such file"):
        D.load_dataset("cifar10", str(tmp_path))


def test_digits_split_is_fixed_and_stratified():
    train, test = D.load_dataset("digits", None)
    assert (len(train), len(test), train.channels) == (1437, 360, 1)
    assert train.images.shape[2:] == (8, 8) and int(train.images.max()) == 16
    train2, test2 = D.load_digits()
    assert torch.equal(test.images, test2.images) and torch.equal(test.labels, test2.labels)
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    # no image index is in both splits: the sets together are the whole 1,797
    assert len(train) + len(test) == 1797


def test_unknown_dataset_and_missing_dir(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet' \(--dataset\)"):
        D.load_dataset("imagenet", None)
    with pytest.raises(ValueError, match=r"--dataset mnist needs --data"):
        D.load_dataset("mnist", None)
    with pytest.raises(FileNotFoundError, match=r"--data .*nope: no such directory"):
        D.load_dataset("mnist", str(tmp_path / "nope"))
