"""Data for the experiments: scikit-learn's embedded digits, or MNIST from IDX files.

Two sources, one result type (:class:`Dataset`: float32 images in ``[0, 1]`` of shape
``(N, 1, H, W)`` and int64 labels in ``0..9``, split into *train*, *validation* and
*test*):

* ``digits`` (default) - the 1,797 8x8 handwritten digits that ship inside
  scikit-learn. A fixed permutation (independent of the training seed) sets 500 images
  aside as the test set; a fifth of the rest (259) is the validation split, the other
  1,038 are the training set. Needs no download.
* ``mnist`` - the four standard IDX files (gzip-compressed or plain) in a directory:
  the 60,000 training images are split 48,000 / 12,000 into train / validation, the
  10,000 ``t10k`` images are the test set. If only the two ``t10k`` files are there,
  they are split 8,000 / 2,000 into (train + validation) / test first, and the report
  says so. :func:`download_mnist` fetches the ``.gz`` files from the usual mirrors and
  checks their SHA-256 before they are used.

The validation split is what the experiments tune learning rates on; the test split is
only ever reported, never used for a choice.

IDX format (LeCun et al.): a big-endian header ``0x00 0x00 <type> <ndim>`` followed by
``ndim`` uint32 sizes and the data. MNIST images are type ``0x08`` (uint8) with 3 dims,
labels ``0x08`` with 1 dim. :func:`read_idx` checks the magic number, the declared size
against a hard limit, and the exact length; ``.gz`` files are decompressed as a stream
that stops one byte after the size the header declares, so a gzip bomb costs no more
memory than a genuine file of its declared size. :func:`load_mnist` additionally checks
types (uint8 only), dimensions, counts (images vs labels, at least a few of each) and
the label range (0-9). Every error is an :class:`IDXError` naming the file.

Example::

    >>> ds = load_dataset("digits")
    >>> ds.train_x.shape, ds.val_x.shape, ds.test_x.shape
    (torch.Size([1038, 1, 8, 8]), torch.Size([259, 1, 8, 8]), torch.Size([500, 1, 8, 8]))
"""

from __future__ import annotations

import gzip
import hashlib
import math
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
    "MAX_IDX_BYTES",
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

#: the largest payload an IDX file may declare (the MNIST training images are 47 MB)
MAX_IDX_BYTES = 2 << 30

#: fewest images a split may have (a split of one image cannot even form a batch of two)
MIN_SPLIT = 2

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

#: IDX type code -> (NumPy dtype, name)
_IDX_DTYPES = {0x08: (np.dtype(np.uint8), "uint8"), 0x09: (np.dtype(np.int8), "int8"),
               0x0B: (np.dtype(">i2"), "int16"), 0x0C: (np.dtype(">i4"), "int32"),
               0x0D: (np.dtype(">f4"), "float32"), 0x0E: (np.dtype(">f8"), "float64")}

_CHUNK = 1 << 20


class IDXError(ValueError):
    """A missing, corrupt, truncated or wrongly typed IDX file; the message names the file and what to do."""


@dataclass
class Dataset:
    """Images ``(N, 1, H, W)`` float32 in ``[0, 1]`` and labels ``(N,)`` int64, split train / validation / test.

    The validation split is held out of the training data: experiments choose learning
    rates on it; the test split is only reported. ``name`` and ``note`` describe the
    source for reports (``note`` says e.g. that a split was made from the MNIST test set).
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
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
        s = (f"{self.name}: {len(self.train_y)} training / {len(self.val_y)} validation / {len(self.test_y)} test "
             f"images of {h}x{w}")
        return s + (f" ({self.note})" if self.note else "")

    def fingerprint(self) -> str:
        """A short hash of all images and labels (reused results must come from the same data)."""
        h = hashlib.sha256()
        for t in (self.train_x, self.train_y, self.val_x, self.val_y, self.test_x, self.test_y):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]

    def subset(self, n_train: int, n_val: int, n_test: int) -> Dataset:
        """The first ``n_train`` / ``n_val`` / ``n_test`` examples of each split (used by ``--fast``)."""
        return Dataset(self.name, self.train_x[:n_train], self.train_y[:n_train], self.val_x[:n_val],
                       self.val_y[:n_val], self.test_x[:n_test], self.test_y[:n_test],
                       (self.note + "; " if self.note else "") + "subset for --fast", self.num_classes)


# ----------------------------------------------------------------------------- IDX


def _is_gzip(path: Path) -> bool:
    if path.suffix == ".gz":
        return True
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _read_exact(f, n: int, path: Path, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise IDXError(f"{path}: truncated IDX file: {what} needs {n} bytes, the file has {len(data)}; "
                       f"fetch it again")
    return data


def _read_payload(f, nbytes: int, path: Path, shape, header: int) -> np.ndarray:
    """Read exactly ``nbytes`` in chunks into a new buffer, then require end of file."""
    buf = np.empty(nbytes, dtype=np.uint8)
    view, got = memoryview(buf), 0
    while got < nbytes:
        n = f.readinto(view[got:got + min(_CHUNK, nbytes - got)])
        if not n:
            raise IDXError(f"{path}: truncated: header says shape {tuple(shape)} ({header + nbytes} bytes) but "
                           f"the data ends after {header + got} bytes; fetch it again")
        got += n
    if f.read(1):
        raise IDXError(f"{path}: has trailing bytes: header says shape {tuple(shape)} ({header + nbytes} bytes) "
                       f"but there is more data after that; this is not a well-formed IDX file")
    return buf


def read_idx(path) -> np.ndarray:
    """Read an IDX file (plain or gzip) into a NumPy array of its declared shape and type.

    Checks, before reading the data: the file exists and is a regular file, the magic
    number (``00 00``, a known type code, 1-4 dimensions), and that the declared payload
    (product of the sizes times the item size, computed without overflow) is at most
    :data:`MAX_IDX_BYTES`. A plain file's size must match the header exactly; a gzip
    file is decompressed as a stream into a buffer of the declared size and rejected as
    soon as one byte more arrives, so memory never exceeds that of a genuine file.

    Raises :class:`IDXError` (a ``ValueError``) naming the file for every problem.

    Example::

        >>> read_idx("t10k-labels-idx1-ubyte.gz").shape
        (10000,)
    """
    path = Path(path)
    if path.is_dir():
        raise IDXError(f"{path}: is a directory, not an IDX file")
    if not path.is_file():
        raise IDXError(f"{path}: file not found" if not path.exists() else f"{path}: not a regular file")
    gz = _is_gzip(path)
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            magic = _read_exact(f, 4, path, "the 4-byte magic number")
            zero, type_code, ndim = magic[0] << 8 | magic[1], magic[2], magic[3]
            if zero != 0 or type_code not in _IDX_DTYPES or not 1 <= ndim <= 4:
                raise IDXError(
                    f"{path}: bad IDX magic number {magic.hex()} (expected 0000 08 01 for labels or 0000 08 03 "
                    f"for images); is this an MNIST IDX file?")
            shape = struct.unpack(">" + "I" * ndim, _read_exact(f, 4 * ndim, path, f"the header ({ndim} sizes)"))
            dtype, dname = _IDX_DTYPES[type_code]
            nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
            header = 4 + 4 * ndim
            if nbytes > MAX_IDX_BYTES:
                raise IDXError(
                    f"{path}: header declares shape {tuple(shape)} of {dname} = {nbytes:,} bytes, more than the "
                    f"{MAX_IDX_BYTES:,}-byte limit for an IDX file; the header is corrupt")
            if not gz:
                size = os.fstat(f.fileno()).st_size
                if size != header + nbytes:
                    what = "truncated" if size < header + nbytes else "has trailing bytes"
                    raise IDXError(f"{path}: {what}: header says shape {tuple(shape)} ({header + nbytes} bytes) "
                                   f"but the file has {size} bytes; fetch it again")
            buf = _read_payload(f, nbytes, path, shape, header)
    except (OSError, EOFError, zlib.error) as err:  # gzip: bad magic, corrupt stream, missing trailer
        raise IDXError(f"{path}: not a valid {'gzip' if gz else 'IDX'} file ({err}); the download was probably "
                       f"interrupted - delete it and fetch it again (--download)") from None
    return buf.view(dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def write_idx(path, array: np.ndarray) -> None:
    """Write an array as an IDX file (gzip-compressed when ``path`` ends in ``.gz``).

    Any IDX type is accepted (uint8, int8, int16, int32, float32, float64; the tests
    build wrongly typed files with it). Example::

        >>> write_idx("labels-idx1-ubyte.gz", np.array([3, 1, 4], dtype=np.uint8))
    """
    array = np.ascontiguousarray(array)
    codes = {d.newbyteorder("=").str: code for code, (d, _) in _IDX_DTYPES.items()}
    key = array.dtype.newbyteorder("=").str
    if key not in codes:
        raise TypeError(f"write_idx: IDX has no type for {array.dtype}; use uint8, int8, int16, int32, float32 "
                        f"or float64")
    code = codes[key]
    body = array.astype(_IDX_DTYPES[code][0], copy=False).tobytes()
    payload = bytes([0, 0, code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape) + body
    path = Path(path)
    path.write_bytes(gzip.compress(payload, mtime=0) if path.suffix == ".gz" else payload)


def _find(data_dir: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):  # also the t10k-images.idx3-ubyte spelling
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def _check_uint8(arr: np.ndarray, path: Path, what: str) -> None:
    if arr.dtype != np.uint8:
        raise IDXError(f"{path}: MNIST {what} must be unsigned bytes (IDX type 0x08), this file holds {arr.dtype}; "
                       f"convert it to uint8 (images 0-255, labels 0-9)")


def _images_labels(data_dir: Path, prefix: str):
    img_path, lab_path = _find(data_dir, f"{prefix}-images-idx3-ubyte"), _find(data_dir, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3:
        raise IDXError(f"{img_path}: expected 3-D images (N, H, W), got shape {images.shape}")
    if labels.ndim != 1:
        raise IDXError(f"{lab_path}: expected 1-D labels (N,), got shape {labels.shape}")
    _check_uint8(images, img_path, "images")
    _check_uint8(labels, lab_path, "labels")
    if len(images) == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise IDXError(f"{img_path}: holds no images (shape {images.shape})")
    if len(images) != len(labels):
        raise IDXError(f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels; "
                       f"the files belong to different sets")
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise IDXError(f"{lab_path}: labels must be digits 0-9, found {int(labels[bad])} at index {bad}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64)), img_path


def _split(x: Tensor, y: Tensor, n_second: int, source, what: str):
    """Fixed-permutation split into (first, second) with ``n_second`` in the second; both need >= MIN_SPLIT."""
    if n_second < MIN_SPLIT or len(y) - n_second < MIN_SPLIT:
        raise IDXError(f"{source}: only {len(y)} image(s), too few to split into {what} "
                       f"(each part needs at least {MIN_SPLIT}); use a larger data set")
    perm = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(y)))
    a, b = perm[n_second:], perm[:n_second]
    return x[a], y[a], x[b], y[b]


def _with_validation(name, x, y, test_x, test_y, note, source) -> Dataset:
    """Hold a fifth of the training images out as the validation split."""
    tx, ty, vx, vy = _split(x, y, len(y) // 5, source, "training and validation")
    return Dataset(name, tx, ty, vx, vy, test_x, test_y, note)


def load_mnist(data_dir) -> Dataset:
    """MNIST from IDX files in ``data_dir`` (``.gz`` or plain), split train / validation / test.

    With all four standard files: the 60,000 training images split 48,000 / 12,000 into
    train / validation, and the 10,000 test images. With only the ``t10k`` pair: a fixed
    80/20 split of the test set into (train + validation) / test, noted in
    :attr:`Dataset.note`. Raises :class:`IDXError` naming the missing/corrupt file.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        what = "is not a directory" if data_dir.exists() else "does not exist"
        raise IDXError(f"{data_dir}: --data-dir {what}; point it at the folder holding the MNIST IDX "
                       f"files, or add --download to fetch them there")
    has_train = _find(data_dir, "train-images-idx3-ubyte") or _find(data_dir, "train-labels-idx1-ubyte")
    has_test = _find(data_dir, "t10k-images-idx3-ubyte") or _find(data_dir, "t10k-labels-idx1-ubyte")
    if not has_train and not has_test:
        raise IDXError(
            f"{data_dir}: no MNIST IDX files found (expected {', '.join(s + '.gz' for s in MNIST_FILES)}); "
            f"add --download to fetch them"
        )
    for stem in MNIST_FILES:
        if (has_train or stem.startswith("t10k")) and _find(data_dir, stem) is None:
            raise IDXError(f"{data_dir / (stem + '.gz')}: file not found (the other MNIST files are there); "
                           f"add --download to fetch it")
    test_x, test_y, test_src = _images_labels(data_dir, "t10k")
    if has_train:
        train_x, train_y, train_src = _images_labels(data_dir, "train")
        if train_x.shape[1:] != test_x.shape[1:]:
            raise IDXError(f"{train_src}: images of {tuple(train_x.shape[2:])} but {test_src} has "
                           f"{tuple(test_x.shape[2:])}; the files belong to different data sets")
        return _with_validation("mnist", train_x, train_y, test_x, test_y, "", train_src)
    x, y, tx, ty = _split(test_x, test_y, len(test_y) // 5, test_src, "training and test")
    return _with_validation("mnist", x, y, tx, ty,
                            f"only the t10k files were found: split {len(y)}/{len(ty)} into training/test with a "
                            f"fixed permutation", test_src)


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
    """scikit-learn's embedded 8x8 digits (pixel values 0..16 scaled to [0, 1]), split 1,038 / 259 / 500."""
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ImportError("the embedded digits need scikit-learn: pip install 'batchnorm[experiments]'") from err
    d = _sk_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    tx, ty, vx, vy = _split(x, y, 500, "digits", "training and test")
    return _with_validation("digits", tx, ty, vx, vy, "scikit-learn's embedded copy of the UCI 8x8 digits", "digits")


def load_dataset(source: str = "digits", data_dir=None, download: bool = False, quiet: bool = False) -> Dataset:
    """``"digits"`` (embedded) or ``"mnist"`` (from ``data_dir``; ``download`` fetches it first)."""
    if source == "digits" and data_dir is None and not download:
        return load_digits()
    if data_dir is None:
        raise ValueError("--download needs --data-dir DIR (where to put the MNIST files)")
    if download:
        download_mnist(data_dir, quiet=quiet)
    return load_mnist(data_dir)
