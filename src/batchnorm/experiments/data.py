"""Data for the experiments: scikit-learn's embedded digits, or MNIST from IDX files.

Two sources, one result type (:class:`Dataset`: float32 images in ``[0, 1]`` of shape
``(N, 1, H, W)`` and int64 labels):

* ``digits`` (default) - the 1,797 8x8 handwritten digits that ship inside
  scikit-learn, split once into 1,297 training and 500 test images by a fixed
  permutation (independent of the training seed, so every run tests on the same
  images). Needs no download.
* ``mnist`` - the four standard IDX files (gzip-compressed or plain) in a directory.
  If only the two ``t10k`` files are there (the 10,000-image test set), they are
  split 8,000 / 2,000 by a fixed permutation and the report says so.
  :func:`download_mnist` fetches the ``.gz`` files from the usual mirrors and checks
  their SHA-256 before they are used.

IDX format (LeCun et al.): a big-endian header ``0x00 0x00 <type> <ndim>`` followed by
``ndim`` uint32 sizes and the data. Images are type ``0x08`` (uint8) with 3 dims,
labels ``0x08`` with 1 dim. :func:`read_idx` checks the magic number, the sizes and the
exact length, and names the file in every error.

Example::

    >>> ds = load_dataset("digits")
    >>> ds.train_x.shape, ds.test_x.shape
    (torch.Size([1297, 1, 8, 8]), torch.Size([500, 1, 8, 8]))
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MNIST_FILES",
    "MNIST_MIRRORS",
    "Dataset",
    "IDXError",
    "download_mnist",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "read_idx",
    "write_idx",
]

#: the fixed permutation seed used to split data sets that come without a split
SPLIT_SEED = 20150211  # the arXiv date of Ioffe & Szegedy (2015)

#: file name -> SHA-256 of the published ``.gz`` file
MNIST_FILES = {
    "train-images-idx3-ubyte": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

#: mirrors tried in order by :func:`download_mnist` (the original site is often unavailable)
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class IDXError(ValueError):
    """A missing, corrupt or truncated IDX file; the message names the file and what to do."""


@dataclass
class Dataset:
    """Images ``(N, 1, H, W)`` float32 in ``[0, 1]`` and labels ``(N,)`` int64, split into train/test.

    ``name`` and ``note`` describe the source for reports (``note`` says e.g. that a
    split was made from the MNIST test set).
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    note: str = ""
    num_classes: int = 10

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    @property
    def num_inputs(self) -> int:
        return int(np.prod(self.image_shape))

    def describe(self) -> str:
        h, w = self.image_shape[1:]
        s = f"{self.name}: {len(self.train_y)} training / {len(self.test_y)} test images of {h}x{w}"
        return s + (f" ({self.note})" if self.note else "")

    def fingerprint(self) -> str:
        """A short hash of all images and labels (reused results must come from the same data)."""
        h = hashlib.sha256()
        for t in (self.train_x, self.train_y, self.test_x, self.test_y):
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]

    def subset(self, n_train: int, n_test: int) -> Dataset:
        """The first ``n_train`` / ``n_test`` examples (used by ``--fast``)."""
        return Dataset(self.name, self.train_x[:n_train], self.train_y[:n_train], self.test_x[:n_test],
                       self.test_y[:n_test], (self.note + "; " if self.note else "") + "subset for --fast",
                       self.num_classes)


# ----------------------------------------------------------------------------- IDX


def _open_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise IDXError(f"{path}: file not found")
    raw = path.read_bytes()
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise IDXError(
                f"{path}: not a valid gzip file ({err}); the download was probably interrupted - "
                f"delete it and fetch it again (--download)"
            ) from None
    return raw


def read_idx(path) -> np.ndarray:
    """Read an IDX file (plain or gzip) into a NumPy array of its declared shape and type.

    Raises :class:`IDXError` (a ``ValueError``) naming the file when it is missing, not
    gzip though named ``.gz``, has a bad magic number, or is shorter/longer than its
    header says.

    Example::

        >>> read_idx("t10k-labels-idx1-ubyte.gz").shape
        (10000,)
    """
    path = Path(path)
    data = _open_bytes(path)
    if len(data) < 4:
        raise IDXError(f"{path}: truncated IDX file ({len(data)} bytes, no header); fetch it again")
    zero, type_code, ndim = data[0] << 8 | data[1], data[2], data[3]
    if zero != 0 or type_code not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise IDXError(
            f"{path}: bad IDX magic number {data[:4].hex()} (expected 0000 08 01 for labels or 0000 08 03 for "
            f"images); is this an MNIST IDX file?"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXError(f"{path}: truncated IDX header; fetch the file again")
    shape = struct.unpack(">" + "I" * ndim, data[4:header])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise IDXError(
            f"{path}: {what}: header says shape {shape} ({expected} bytes) but the file has {len(data)} bytes; "
            f"fetch it again"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).copy()


def write_idx(path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip-compressed when ``path`` ends in ``.gz``).

    Used by the tests to build tiny MNIST-like files. Example::

        >>> write_idx("labels-idx1-ubyte.gz", np.array([3, 1, 4], dtype=np.uint8))
    """
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"write_idx: only uint8 arrays are supported, got {array.dtype}")
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape) + array.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(payload, mtime=0) if path.suffix == ".gz" else payload)


def _find(data_dir: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):  # also the t10k-images.idx3-ubyte spelling
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def _images_labels(data_dir: Path, prefix: str):
    img_path, lab_path = _find(data_dir, f"{prefix}-images-idx3-ubyte"), _find(data_dir, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3:
        raise IDXError(f"{img_path}: expected 3-D images (N, H, W), got shape {images.shape}")
    if labels.ndim != 1:
        raise IDXError(f"{lab_path}: expected 1-D labels (N,), got shape {labels.shape}")
    if len(images) != len(labels):
        raise IDXError(f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels; "
                       f"the files belong to different sets")
    if labels.size and labels.max() > 9:
        raise IDXError(f"{lab_path}: labels must be digits 0-9, found {int(labels.max())}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def _split(x: Tensor, y: Tensor, n_test: int):
    perm = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def load_mnist(data_dir) -> Dataset:
    """MNIST from IDX files in ``data_dir`` (``.gz`` or plain).

    With all four standard files: the standard 60,000 / 10,000 split. With only the
    ``t10k`` pair: a fixed 80/20 split of the test set (8,000 / 2,000), noted in
    :attr:`Dataset.note`. Raises :class:`IDXError` naming the missing/corrupt file.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise IDXError(f"{data_dir}: --data-dir is not a directory; point it at the folder holding the MNIST IDX "
                       f"files, or add --download to fetch them there")
    has_train = _find(data_dir, "train-images-idx3-ubyte") or _find(data_dir, "train-labels-idx1-ubyte")
    has_test = _find(data_dir, "t10k-images-idx3-ubyte") or _find(data_dir, "t10k-labels-idx1-ubyte")
    if not has_train and not has_test:
        raise IDXError(
            f"{data_dir}: no MNIST IDX files found (expected {', '.join(s + '.gz' for s in MNIST_FILES)}); "
            f"add --download to fetch them"
        )
    if not has_test:
        raise IDXError(f"{data_dir}: t10k-images-idx3-ubyte(.gz) / t10k-labels-idx1-ubyte(.gz) missing")
    for stem in MNIST_FILES:
        if (has_train or stem.startswith("t10k")) and _find(data_dir, stem) is None:
            raise IDXError(f"{data_dir / (stem + '.gz')}: file not found (the other MNIST files are there); "
                           f"add --download to fetch it")
    test_x, test_y = _images_labels(data_dir, "t10k")
    if has_train:
        train_x, train_y = _images_labels(data_dir, "train")
        return Dataset("mnist", train_x, train_y, test_x, test_y)
    n_test = len(test_y) // 5
    tx, ty, vx, vy = _split(test_x, test_y, n_test)
    return Dataset("mnist", tx, ty, vx, vy,
                   note=f"only the t10k files were found: split {len(ty)}/{len(vy)} with a fixed permutation")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_mnist(data_dir, mirrors: Sequence[str] = MNIST_MIRRORS, quiet: bool = False) -> Path:
    """Fetch the four MNIST ``.gz`` files into ``data_dir`` and verify their SHA-256.

    Files already present with the right checksum are kept. Each file is downloaded to
    a temporary name, checked, and only then renamed into place, so a failed or
    corrupted download never leaves a file that looks valid. Raises ``RuntimeError``
    when no mirror serves a file with the right checksum.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    for stem, digest in MNIST_FILES.items():
        target = data_dir / (stem + ".gz")
        if target.is_file() and _sha256(target) == digest:
            continue
        errors = []
        for mirror in mirrors:
            tmp = target.with_name(target.name + ".part")
            try:
                if not quiet:
                    print(f"downloading {mirror}{target.name}")
                with urllib.request.urlopen(mirror + target.name, timeout=60) as resp, open(tmp, "wb") as f:
                    while block := resp.read(1 << 20):
                        f.write(block)
                got = _sha256(tmp)
                if got != digest:
                    errors.append(f"{mirror}: sha256 {got} != expected {digest}")
                    continue
                os.replace(tmp, target)
                break
            except OSError as err:
                errors.append(f"{mirror}: {err}")
            finally:
                if tmp.exists():
                    tmp.unlink()
        else:
            raise RuntimeError(f"could not download {target.name} with a valid checksum:\n  " + "\n  ".join(errors))
    return data_dir


def load_digits() -> Dataset:
    """scikit-learn's embedded 8x8 digits (pixel values 0..16 scaled to [0, 1]), split 1,297 / 500."""
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ImportError("the embedded digits need scikit-learn: pip install 'batchnorm[experiments]'") from err
    d = _sk_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    tx, ty, vx, vy = _split(x, y, 500)
    return Dataset("digits", tx, ty, vx, vy, note="scikit-learn's embedded copy of the UCI 8x8 digits")


def load_dataset(source: str = "digits", data_dir=None, download: bool = False, quiet: bool = False) -> Dataset:
    """``"digits"`` (embedded) or ``"mnist"`` (from ``data_dir``; ``download`` fetches it first)."""
    if source == "digits" and data_dir is None and not download:
        return load_digits()
    if data_dir is None:
        raise ValueError("--download needs --data-dir DIR (where to put the MNIST files)")
    if download:
        download_mnist(data_dir, quiet=quiet)
    return load_mnist(data_dir)
