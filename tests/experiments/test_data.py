"""IDX reading/writing, MNIST loading from tiny self-made files, hostile files, checksummed download."""

from __future__ import annotations

import gzip
import hashlib
import struct
import tracemalloc
import zlib

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


def _esc(path) -> str:
    return str(path).replace(".", r"\.")


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


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_roundtrip_other_types_big_endian(tmp_path, dtype):
    a = (np.arange(12).reshape(3, 4) - 5).astype(dtype)
    write_idx(tmp_path / "x", a)
    raw = (tmp_path / "x").read_bytes()
    assert raw[2] == {np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}[dtype]
    assert raw[12:12 + a.itemsize] == a.astype(np.dtype(dtype).newbyteorder(">"))[0, :1].tobytes()  # big-endian
    b = read_idx(tmp_path / "x")
    assert b.dtype == np.dtype(dtype) and np.array_equal(a, b)


def test_idx_header_is_the_standard_one(tmp_path):
    write_idx(tmp_path / "l", np.arange(3, dtype=np.uint8))
    assert (tmp_path / "l").read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 0, 1, 2])


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_file_names_the_file(tmp_path, gz):
    path = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    write_idx(path, _digits(4)[0])
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 7])
    with pytest.raises(IDXError, match=_esc(path)) as err:
        read_idx(path)
    assert ("gzip" in str(err.value)) if gz else ("truncated" in str(err.value))


def test_plain_truncated_payload_reports_sizes(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    write_idx(path, _digits(4)[0])
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(IDXError, match=r"truncated: header says shape \(4, 6, 5\) \(136 bytes\) but the file has 135"):
        read_idx(path)


def test_gzip_with_short_payload_is_truncated_not_trailing(tmp_path):
    path = tmp_path / "x.gz"
    payload = bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + bytes(7)  # 10 declared, 7 present
    path.write_bytes(gzip.compress(payload))
    with pytest.raises(IDXError, match=r"truncated: header says shape \(10,\) \(18 bytes\) but the data ends after 15"):
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
    with pytest.raises(IDXError, match="truncated IDX file: the 4-byte magic number needs 4 bytes, the file has 2"):
        read_idx(bad)
    with pytest.raises(IDXError, match="file not found"):
        read_idx(tmp_path / "missing")
    with pytest.raises(IDXError, match="is a directory, not an IDX file"):
        read_idx(tmp_path)


def test_oversize_header_has_a_sane_message_and_reads_nothing(tmp_path):
    """Sizes whose product overflows int64 (the old message showed a negative byte count)."""
    path = tmp_path / "huge-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x0C, 3]) + struct.pack(">III", 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF) + bytes(16))
    with pytest.raises(IDXError) as err:
        read_idx(path)
    msg = str(err.value)
    assert str(path) in msg and "more than the" in msg and "limit" in msg and "-" not in msg.split("=")[1].split("bytes")[0]
    n = 0xFFFFFFFF ** 3 * 4
    assert f"{n:,}" in msg


def _bomb(path, declared: int, extra: int):
    """A gzip file whose header declares ``declared`` uint8 labels, followed by ``declared + extra`` zero bytes."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: gzip container
    chunks = [comp.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", declared))]
    block = bytes(1 << 20)
    left = declared + extra
    while left > 0:
        chunks.append(comp.compress(block[:min(left, len(block))]))
        left -= len(block)
    chunks.append(comp.flush())
    path.write_bytes(b"".join(chunks))


def test_gzip_bomb_costs_no_more_memory_than_its_declared_size(tmp_path):
    """A 64 MiB-of-zeros bomb behind a header that declares 100 labels: rejected after reading ~101 bytes."""
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    _bomb(path, 100, 64 << 20)
    assert path.stat().st_size < 200_000  # tiny on disk
    tracemalloc.start()
    try:
        with pytest.raises(IDXError, match=_esc(path) + ": has trailing bytes"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak} bytes while reading a bomb declaring 100 bytes"


def test_gzip_genuine_file_reads_in_bounded_memory(tmp_path):
    """A genuine 8 MiB payload: peak memory about the payload (plus chunk buffers), not a multiple of it."""
    path = tmp_path / "x.gz"
    a = np.zeros((128, 256, 256), dtype=np.uint8)
    write_idx(path, a)
    tracemalloc.start()
    try:
        b = read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert b.shape == a.shape
    assert peak < a.nbytes + (4 << 20)


def test_write_idx_rejects_types_idx_cannot_hold(tmp_path):
    with pytest.raises(TypeError, match="IDX has no type for"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.complex64))


def _pair(tmp_path, prefix, images, labels):
    write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)


@pytest.mark.parametrize("labels, message", [
    (np.array([3, -1, 2, 0, 1], dtype=np.int8), "labels must be unsigned bytes .* holds int8"),
    (np.array([3, np.nan, 2, 0, 1], dtype=np.float32), "labels must be unsigned bytes .* holds float32"),
    (np.array([3.0, 1.0, 2.0, 0.0, 1.0], dtype=np.float32), "labels must be unsigned bytes .* holds float32"),
    (np.array([3, 1, 2, 0, 1], dtype=np.int32), "labels must be unsigned bytes .* holds int32"),
    (np.array([3, 1, 12, 0, 1], dtype=np.uint8), "labels must be digits 0-9, found 12 at index 2"),
    (np.array([3, 1, 2, 0, 255], dtype=np.uint8), "labels must be digits 0-9, found 255 at index 4"),
])
def test_bad_labels_are_rejected_naming_the_file(tmp_path, labels, message):
    _pair(tmp_path, "t10k", _digits(5)[0], labels)
    with pytest.raises(IDXError, match=_esc(tmp_path / "t10k-labels-idx1-ubyte.gz") + ": .*" + message):
        D.load_mnist(tmp_path)


@pytest.mark.parametrize("images, message", [
    (np.full((5, 6, 5), np.nan, dtype=np.float32), "images must be unsigned bytes .* holds float32"),
    (np.zeros((5, 6, 5), dtype=np.int32), "images must be unsigned bytes .* holds int32"),
    (np.zeros((0, 6, 5), dtype=np.uint8), r"holds no images \(shape \(0, 6, 5\)\)"),
    (np.zeros((5, 30), dtype=np.uint8), r"expected 3-D images \(N, H, W\), got shape \(5, 30\)"),
])
def test_bad_images_are_rejected_naming_the_file(tmp_path, images, message):
    _pair(tmp_path, "t10k", images, np.zeros(len(images), dtype=np.uint8))
    with pytest.raises(IDXError, match=_esc(tmp_path / "t10k-images-idx3-ubyte.gz") + ": .*" + message):
        D.load_mnist(tmp_path)


@pytest.mark.parametrize("n", [1, 4])
def test_too_few_images_to_split_is_a_clear_error(tmp_path, n):
    _pair(tmp_path, "t10k", *_digits(n))
    with pytest.raises(IDXError, match=rf"only {n} image\(s\), too few to split"):
        D.load_mnist(tmp_path)


def test_reproduce_rejects_a_one_image_data_set_with_exit_2(tmp_path, capsys):
    from batchnorm.cli import main

    _pair(tmp_path, "t10k", *_digits(1))
    assert main(["reproduce", "fig1", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "too few to split" in err and "Traceback" not in err and not (tmp_path / "out").exists()
    _pair(tmp_path, "t10k", *_digits(40))  # splits fine, but 20 training images cannot make a batch of 60
    assert main(["reproduce", "fig1", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "use a larger data set" in capsys.readouterr().err


@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_four_files(tmp_path, gz):
    tx, ty = _write_set(tmp_path, "train", 20, gz, seed=1)
    vx, vy = _write_set(tmp_path, "t10k", 5, gz, seed=2)
    ds = D.load_mnist(tmp_path)
    assert ds.name == "mnist" and ds.note == ""
    assert ds.train_x.shape == (16, 1, 6, 5) and ds.val_x.shape == (4, 1, 6, 5) and ds.test_x.shape == (5, 1, 6, 5)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    np.testing.assert_array_equal(ds.test_x[:, 0].numpy(), vx.astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.test_y.numpy(), vy)
    # train + validation is a partition of the training file
    got = sorted(tuple(r) for r in np.round(torch.cat([ds.train_x, ds.val_x])[:, 0].numpy() * 255).astype(int)
                 .reshape(20, -1))
    assert got == sorted(tuple(r) for r in tx.astype(int).reshape(20, -1))


def test_train_and_test_image_sizes_must_match(tmp_path):
    _write_set(tmp_path, "t10k", 5)
    _pair(tmp_path, "train", np.zeros((20, 7, 7), np.uint8), np.zeros(20, np.uint8))
    with pytest.raises(IDXError, match=r"images of \(7, 7\) but .*t10k-images-idx3-ubyte.gz has \(6, 5\)"):
        D.load_mnist(tmp_path)


def test_load_mnist_test_set_only_is_split_deterministically(tmp_path):
    vx, vy = _write_set(tmp_path, "t10k", 50)
    a, b = D.load_mnist(tmp_path), D.load_mnist(tmp_path)
    assert (len(a.train_y), len(a.val_y), len(a.test_y)) == (32, 8, 10) and "t10k" in a.note
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_y, b.train_y) and torch.equal(a.val_x, b.val_x)
    # the three splits are a partition of the 50 images
    all_x = torch.cat([a.train_x, a.val_x, a.test_x])[:, 0].numpy()
    got = sorted(tuple(r) for r in np.round(all_x * 255).astype(int).reshape(50, -1))
    assert got == sorted(tuple(r) for r in vx.astype(int).reshape(50, -1))


def test_digits_split_is_fixed_and_disjoint():
    a = D.load_digits()
    assert (len(a.train_y), len(a.val_y), len(a.test_y)) == (1038, 259, 500)
    rows = {tuple(r) for r in torch.cat([a.train_x, a.val_x, a.test_x]).flatten(1).numpy().round(4).tolist()}
    assert len(rows) > 1700  # the digits have a few exact duplicates; the splits do not repeat images
    assert a.fingerprint() == D.load_digits().fingerprint()
    assert a.subset(10, 5, 7).fingerprint() != a.fingerprint()


def test_load_mnist_errors_name_the_file(tmp_path):
    with pytest.raises(IDXError, match="--data-dir does not exist"):
        D.load_mnist(tmp_path / "nope")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(IDXError, match="--data-dir is not a directory"):
        D.load_mnist(tmp_path / "afile")
    with pytest.raises(IDXError, match="no MNIST IDX files found.*--download"):
        D.load_mnist(tmp_path)
    _write_set(tmp_path, "t10k", 5)
    _write_set(tmp_path, "train", 20)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(IDXError, match="train-labels-idx1-ubyte.gz: file not found"):
        D.load_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(19, dtype=np.uint8))  # 20 images, 19 labels
    with pytest.raises(IDXError, match="20 images but .*train-labels-idx1-ubyte.gz has 19 labels"):
        D.load_mnist(tmp_path)


def _mirror(tmp_path, monkeypatch):
    """A local 'mirror' (file:// URL) holding tiny .gz files, with MNIST_FILES pointing at their checksums."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    _write_set(mirror, "train", 20, seed=3)
    _write_set(mirror, "t10k", 4, seed=4)
    sums = {stem: hashlib.sha256((mirror / (stem + ".gz")).read_bytes()).hexdigest() for stem in D.MNIST_FILES}
    monkeypatch.setattr(D, "MNIST_FILES", sums)
    return mirror


def test_download_verifies_checksums(tmp_path, monkeypatch):
    mirror = _mirror(tmp_path, monkeypatch)
    dest = tmp_path / "data"
    D.download_mnist(dest, mirrors=[mirror.as_uri() + "/"], quiet=True)
    assert sorted(p.name for p in dest.iterdir()) == sorted(s + ".gz" for s in D.MNIST_FILES)
    assert len(D.load_mnist(dest).train_y) == 16
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
