"""IDX reading/writing, MNIST loading from tiny self-made files, checksummed download, clear errors."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest
import torch

from batchnorm.experiments import data as D
from batchnorm.experiments.data import IDXError, read_idx, write_idx


def _digits(n, h=6, w=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def _write_set(folder, prefix, n, gz=True, seed=0):
    x, y = _digits(n, seed=seed)
    ext = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", x)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", y)
    return x, y


# (shape, why): odd sizes so a transposed H/W would be caught; 1-D labels; a single image
@pytest.mark.parametrize("shape", [(7, 6, 5), (13,), (1, 3, 2)])
@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, shape, gz):
    a = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / ("f.idx" + (".gz" if gz else ""))
    write_idx(path, a)
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == gz
    b = read_idx(path)
    assert b.dtype == np.uint8 and b.shape == shape
    np.testing.assert_array_equal(a, b)


def test_idx_header_is_the_standard_one(tmp_path):
    write_idx(tmp_path / "l", np.arange(3, dtype=np.uint8))
    assert (tmp_path / "l").read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 0, 1, 2])


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_file_names_the_file(tmp_path, gz):
    path = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    write_idx(path, _digits(4)[0])
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 7])
    with pytest.raises(IDXError, match=str(path).replace(".", r"\.")) as err:
        read_idx(path)
    assert ("gzip" in str(err.value)) if gz else ("truncated" in str(err.value))


def test_plain_truncated_payload_reports_sizes(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    write_idx(path, _digits(4)[0])
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(IDXError, match=r"truncated: header says shape \(4, 6, 5\)"):
        read_idx(path)


def test_trailing_bytes_and_bad_magic(tmp_path):
    path = tmp_path / "x"
    write_idx(path, np.arange(5, dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(IDXError, match="trailing bytes"):
        read_idx(path)
    path.write_bytes(b"\x50\x4b\x03\x04" + b"\0" * 20)  # a zip file, not IDX
    with pytest.raises(IDXError, match="bad IDX magic"):
        read_idx(path)
    bad = tmp_path / "y.gz"
    bad.write_bytes(gzip.compress(b"\0\0"))
    with pytest.raises(IDXError, match="truncated IDX file"):
        read_idx(bad)
    with pytest.raises(IDXError, match="file not found"):
        read_idx(tmp_path / "missing")


def test_write_idx_rejects_non_uint8(tmp_path):
    with pytest.raises(TypeError, match="uint8"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.float32))


@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_four_files(tmp_path, gz):
    tx, ty = _write_set(tmp_path, "train", 12, gz, seed=1)
    vx, vy = _write_set(tmp_path, "t10k", 5, gz, seed=2)
    ds = D.load_mnist(tmp_path)
    assert ds.name == "mnist" and ds.note == ""
    assert ds.train_x.shape == (12, 1, 6, 5) and ds.test_x.shape == (5, 1, 6, 5)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    np.testing.assert_array_equal(ds.train_x[:, 0].numpy(), tx.astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.test_y.numpy(), vy)


def test_load_mnist_test_set_only_is_split_deterministically(tmp_path):
    vx, vy = _write_set(tmp_path, "t10k", 20)
    a, b = D.load_mnist(tmp_path), D.load_mnist(tmp_path)
    assert len(a.train_y) == 16 and len(a.test_y) == 4 and "t10k" in a.note
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_y, b.train_y)
    # the split is a partition of the 20 images
    all_x = torch.cat([a.train_x, a.test_x])[:, 0].numpy()
    got = sorted(tuple(r) for r in np.round(all_x * 255).astype(int).reshape(20, -1))
    assert got == sorted(tuple(r) for r in vx.astype(int).reshape(20, -1))


def test_load_mnist_errors_name_the_file(tmp_path):
    with pytest.raises(IDXError, match="not a directory"):
        D.load_mnist(tmp_path / "nope")
    with pytest.raises(IDXError, match="no MNIST IDX files found.*--download"):
        D.load_mnist(tmp_path)
    _write_set(tmp_path, "t10k", 5)
    _write_set(tmp_path, "train", 5)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(IDXError, match="train-labels-idx1-ubyte.gz: file not found"):
        D.load_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4, dtype=np.uint8))  # 5 images, 4 labels
    with pytest.raises(IDXError, match="5 images but .*train-labels-idx1-ubyte.gz has 4 labels"):
        D.load_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.full(5, 11, dtype=np.uint8))
    with pytest.raises(IDXError, match="labels must be digits 0-9"):
        D.load_mnist(tmp_path)


def _mirror(tmp_path, monkeypatch):
    """A local 'mirror' (file:// URL) holding tiny .gz files, with MNIST_FILES pointing at their checksums."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    _write_set(mirror, "train", 8, seed=3)
    _write_set(mirror, "t10k", 4, seed=4)
    sums = {stem: hashlib.sha256((mirror / (stem + ".gz")).read_bytes()).hexdigest() for stem in D.MNIST_FILES}
    monkeypatch.setattr(D, "MNIST_FILES", sums)
    return mirror


def test_download_verifies_checksums(tmp_path, monkeypatch):
    mirror = _mirror(tmp_path, monkeypatch)
    dest = tmp_path / "data"
    D.download_mnist(dest, mirrors=[mirror.as_uri() + "/"], quiet=True)
    assert sorted(p.name for p in dest.iterdir()) == sorted(s + ".gz" for s in D.MNIST_FILES)
    assert len(D.load_mnist(dest).train_y) == 8
    # a file already present and valid is kept (not fetched again): a dead mirror is fine
    D.download_mnist(dest, mirrors=["file:///nonexistent/"], quiet=True)


def test_download_rejects_bad_checksum_and_leaves_nothing(tmp_path, monkeypatch):
    mirror = _mirror(tmp_path, monkeypatch)
    sums = dict(D.MNIST_FILES)
    sums["t10k-labels-idx1-ubyte"] = "0" * 64
    monkeypatch.setattr(D, "MNIST_FILES", sums)
    dest = tmp_path / "data"
    with pytest.raises(RuntimeError, match="t10k-labels-idx1-ubyte.gz with a valid checksum"):
        D.download_mnist(dest, mirrors=[mirror.as_uri() + "/"], quiet=True)
    assert not (dest / "t10k-labels-idx1-ubyte.gz").exists()
    assert not any(p.name.endswith(".part") for p in dest.iterdir())


def test_published_checksums_of_the_real_test_set():
    # the two t10k digests must match the published files (as listed with the shared copy)
    assert D.MNIST_FILES["t10k-images-idx3-ubyte"].startswith("8d422c7b0a1c")
    assert D.MNIST_FILES["t10k-labels-idx1-ubyte"].startswith("f7ae60f92e00")
    assert all(len(v) == 64 for v in D.MNIST_FILES.values())


def test_digits_split_is_fixed():
    a, b = D.load_digits(), D.load_digits()
    assert a.train_x.shape == (1297, 1, 8, 8) and a.test_x.shape == (500, 1, 8, 8)
    assert float(a.train_x.min()) == 0.0 and float(a.train_x.max()) == 1.0
    assert torch.equal(a.test_y, b.test_y) and a.fingerprint() == b.fingerprint()
    assert set(a.test_y.tolist()) == set(range(10))
