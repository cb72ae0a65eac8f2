"""ADM's .npz formats (openai/guided-diffusion `evaluations/`), read in streaming batches and written atomically.

Sample batch:    arr_0 uint8 (N, H, W, 3) images, NHWC; optionally arr_1 int64 (N,) class labels (ADM's sampler
                 writes them; the evaluator never reads them).
Reference batch: mu (2048,), sigma (2048, 2048), mu_s (2023,), sigma_s (2023, 2023) float64, plus arr_0 images
                 (ADM's `VIRTUAL_imagenet256_labeled.npz`: 10k images, used only for precision/recall).

A 50k x 256 x 256 x 3 batch is 9.8 GB, so images are never loaded whole: `iter_images` reads the .npy header of
`arr_0` inside the zip and then streams fixed-size batches (like ADM's evaluator), and `NpzImageWriter` streams
them out. Wrong layouts (NCHW, float, greyscale), corrupt or truncated files and missing keys raise NpzFormatError
with a hint; missing files raise MissingResourceError.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from dd2_eval.errors import MissingResourceError, NpzFormatError
from dd2_eval.fid import FeatureStats

logger = logging.getLogger(__name__)

IMAGES_KEY = "arr_0"
LABELS_KEY = "arr_1"


@dataclass(frozen=True)
class NpzEntry:
    """Header of one array in an .npz: its key (without `.npy`), shape and dtype."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype


def npz_entries(path: str | os.PathLike, *, what: str = "npz file") -> dict[str, NpzEntry]:
    """Shape and dtype of every array in an .npz, read from the headers only (no data is loaded)."""
    path = Path(path)
    with _open_zip(path, what) as zf:
        out = {}
        for name in zf.namelist():
            if not name.endswith(".npy"):
                continue
            with _member(zf, path, name) as f:
                shape, dtype = _read_header(f, path, name)
            out[name[: -len(".npy")]] = NpzEntry(name[: -len(".npy")], shape, dtype)
    return out


def check_images_layout(name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Raise NpzFormatError unless (shape, dtype) is ADM's uint8 (N, H, W, 3), with a hint for common mistakes."""
    dtype = np.dtype(dtype)
    if len(shape) != 4:
        hint = " (one image? add a batch axis: x[None])" if len(shape) == 3 else ""
        raise NpzFormatError(f"{name}: expected uint8 images of shape (N, H, W, 3), got shape {shape}{hint}")
    n, h, w, c = shape
    if c != 3:
        if shape[1] in (1, 3) and c not in (1, 3):
            hint = "this looks like NCHW; convert with x.transpose(0, 2, 3, 1)"
        elif c == 1:
            hint = "greyscale; repeat the channel with np.repeat(x, 3, axis=-1)"
        else:
            hint = "ADM batches hold RGB images in NHWC order"
        raise NpzFormatError(f"{name}: expected shape (N, H, W, 3), got {shape}: {hint}")
    if dtype != np.uint8:
        hint = ""
        if dtype.kind == "f":
            hint = (
                "; ADM samples are uint8 in [0, 255]: from [0, 1] use np.clip(np.rint(x * 255), 0, 255)"
                ".astype(np.uint8), from [-1, 1] use np.clip(np.rint(127.5 * x + 127.5), 0, 255).astype(np.uint8)"
            )
        raise NpzFormatError(f"{name}: expected dtype uint8 (N, H, W, 3), got {dtype} {shape}{hint}")
    if n < 1 or h < 1 or w < 1:
        raise NpzFormatError(f"{name}: expected at least one image of at least 1x1 pixels, got shape {shape}")


def images_entry(path: str | os.PathLike, *, what: str = "sample batch") -> NpzEntry:
    """The checked `arr_0` header of an ADM image batch: uint8 (N, H, W, 3)."""
    path = Path(path)
    entries = npz_entries(path, what=what)
    if IMAGES_KEY not in entries:
        raise NpzFormatError(
            f"{what} {str(path)!r}: expected images under key {IMAGES_KEY!r} (ADM layout, np.savez(path, arr_0=x)), "
            f"found keys {sorted(entries)}"
        )
    entry = entries[IMAGES_KEY]
    check_images_layout(f"{what} {str(path)!r} [{IMAGES_KEY}]", entry.shape, entry.dtype)
    return entry


def iter_images(path: str | os.PathLike, batch_size: int = 64, *, what: str = "sample batch") -> Iterator[np.ndarray]:
    """Stream `arr_0` of an ADM image batch in order, `batch_size` images at a time (the last batch may be smaller).

    Shapes: yields uint8 (b, H, W, 3), b <= batch_size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    path = Path(path)
    entry = images_entry(path, what=what)
    n, h, w, c = entry.shape
    per_image = h * w * c
    member = IMAGES_KEY + ".npy"
    with _open_zip(path, what) as zf, _member(zf, path, member) as f:
        _read_header(f, path, member)
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            try:
                data = f.read(b * per_image)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
                raise NpzFormatError(
                    f"{what} {str(path)!r}: corrupt data in {member} near image {start} ({type(e).__name__}: {e})"
                ) from e
            if len(data) != b * per_image:
                raise NpzFormatError(
                    f"{what} {str(path)!r}: truncated: the header promises {n} images of {h}x{w}x{c}, "
                    f"but the data ends inside image {start + len(data) // per_image}"
                )
            yield np.frombuffer(data, dtype=np.uint8).reshape(b, h, w, c)  # (b, H, W, 3)


def read_images(path: str | os.PathLike, *, what: str = "sample batch") -> np.ndarray:
    """All of `arr_0` in memory (use `iter_images` for large batches). Shapes: -> uint8 (N, H, W, 3)."""
    return np.concatenate(list(iter_images(path, batch_size=4096, what=what)), axis=0)


def read_labels(path: str | os.PathLike, *, what: str = "sample batch") -> np.ndarray | None:
    """`arr_1` class labels (N,) int64 when present, else None."""
    path = Path(path)
    entries = npz_entries(path, what=what)
    if LABELS_KEY not in entries:
        return None
    entry = entries[LABELS_KEY]
    if len(entry.shape) != 1 or entry.dtype.kind not in "iu":
        raise NpzFormatError(
            f"{what} {str(path)!r}: expected integer labels (N,) under {LABELS_KEY!r}, got {entry.dtype} {entry.shape}"
        )
    return _load_array(path, LABELS_KEY, what).astype(np.int64)


def write_images(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Write an ADM sample batch (uint8 (N, H, W, 3) as arr_0, optional (N,) labels as arr_1), atomically."""
    images = np.asarray(images)
    check_images_layout("images", images.shape, images.dtype)
    with NpzImageWriter(path, num_images=images.shape[0]) as writer:
        writer.write(images, labels)


class NpzImageWriter:
    """Stream an ADM sample batch to disk: `arr_0` uint8 (N, H, W, 3) (+ `arr_1` labels), without holding N images.

    N must be known up front (it goes into the .npy header). The file appears at `path` only on a successful
    `close()` (written to a temporary file in the same folder, then renamed), so a crash never leaves a file that
    looks complete. Use as a context manager; on an exception the temporary file is removed.
    """

    def __init__(self, path: str | os.PathLike, num_images: int) -> None:
        if num_images < 1:
            raise NpzFormatError(f"NpzImageWriter: num_images must be >= 1, got {num_images}")
        self.path = Path(path)
        self.num_images = num_images
        self.written = 0
        self._labels: list[np.ndarray] = []
        self._with_labels: bool | None = None
        self._hw: tuple[int, int] | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self._zf: zipfile.ZipFile | None = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._f: IO[bytes] | None = None

    def write(self, images: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Append a batch. Shapes: images uint8 (b, H, W, 3), labels (b,) or None (all batches alike)."""
        images = np.asarray(images)
        check_images_layout("images", images.shape, images.dtype)
        b, h, w, _ = images.shape
        if self._hw is None:
            self._hw = (h, w)
            self._with_labels = labels is not None
            assert self._zf is not None
            self._f = self._zf.open(IMAGES_KEY + ".npy", "w", force_zip64=True)
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
            np.lib.format.write_array_header_1_0(self._f, header | {"shape": (self.num_images, h, w, 3)})
        elif self._hw != (h, w):
            raise NpzFormatError(f"images: every batch must be {self._hw[0]}x{self._hw[1]}, got a batch of {h}x{w}")
        if (labels is not None) != self._with_labels:
            raise NpzFormatError("labels: pass labels with every batch or with none")
        if self.written + b > self.num_images:
            raise NpzFormatError(f"images: {self.written + b} images written, more than num_images={self.num_images}")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (b,) or labels.dtype.kind not in "iu":
                raise NpzFormatError(f"labels: expected integer shape ({b},), got {labels.dtype} {labels.shape}")
            self._labels.append(labels.astype(np.int64))
        assert self._f is not None
        self._f.write(np.ascontiguousarray(images).tobytes())
        self.written += b

    def close(self) -> None:
        """Finish the archive and move it to `path`; raises if fewer than num_images images were written."""
        if self._zf is None:
            return
        if self.written != self.num_images:
            self.abort()
            raise NpzFormatError(f"NpzImageWriter: wrote {self.written} images, expected num_images={self.num_images}")
        assert self._f is not None
        self._f.close()
        if self._with_labels:
            with self._zf.open(LABELS_KEY + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.concatenate(self._labels), allow_pickle=False)
        self._zf.close()
        self._zf = None
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the temporary file; `path` is left untouched."""
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._zf is not None:
            self._zf.close()
            self._zf = None
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __enter__(self) -> NpzImageWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self.close()
            except OSError as e:
                self.abort()
                raise _named(e, self.path) from e
        else:
            self.abort()
            if isinstance(exc, OSError) and exc.filename is None:
                raise _named(exc, self.path) from exc


def _named(error: OSError, path: Path) -> OSError:
    """The OSError with the file it was writing named (a full disk's ENOSPC from write() names none)."""
    return error if error.filename is not None else OSError(error.errno, error.strerror, str(path))


@dataclass(frozen=True)
class ReferenceBatch:
    """What an ADM reference .npz holds: pool3 statistics (mu, sigma), spatial statistics (mu_s, sigma_s), images.

    Any part may be missing (None); `images` is the header of `arr_0` (read the pixels with `iter_images`).
    """

    path: Path
    stats: FeatureStats | None
    stats_spatial: FeatureStats | None
    images: NpzEntry | None


def read_reference(path: str | os.PathLike, *, what: str = "reference batch") -> ReferenceBatch:
    """Read an ADM reference batch (or any image batch, which then has images only)."""
    path = Path(path)
    entries = npz_entries(path, what=what)
    stats = _read_stats(path, entries, "mu", "sigma", what)
    stats_s = _read_stats(path, entries, "mu_s", "sigma_s", what)
    images = images_entry(path, what=what) if IMAGES_KEY in entries else None
    if stats is None and images is None:
        raise NpzFormatError(
            f"{what} {str(path)!r}: expected statistics (mu, sigma) or images (arr_0), found keys {sorted(entries)}"
        )
    return ReferenceBatch(path, stats, stats_s, images)


def write_reference(
    path: str | os.PathLike,
    stats: FeatureStats,
    stats_spatial: FeatureStats | None = None,
    images: np.ndarray | None = None,
) -> None:
    """Write an ADM reference batch atomically: mu, sigma (+ mu_s, sigma_s) float64 (+ arr_0 uint8 images)."""
    arrays: dict[str, np.ndarray] = {"mu": stats.mu, "sigma": stats.sigma}
    if stats_spatial is not None:
        arrays |= {"mu_s": stats_spatial.mu, "sigma_s": stats_spatial.sigma}
    if images is not None:
        images = np.asarray(images)
        check_images_layout("images", images.shape, images.dtype)
        arrays[IMAGES_KEY] = images
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _named(e, path) from e
        raise


def _read_stats(
    path: Path, entries: dict[str, NpzEntry], mu_key: str, sigma_key: str, what: str
) -> FeatureStats | None:
    has_mu, has_sigma = mu_key in entries, sigma_key in entries
    if not has_mu and not has_sigma:
        return None
    if has_mu != has_sigma:
        present, absent = (mu_key, sigma_key) if has_mu else (sigma_key, mu_key)
        raise NpzFormatError(f"{what} {str(path)!r}: has {present!r} but not {absent!r}; both are needed")
    mu_e, sigma_e = entries[mu_key], entries[sigma_key]
    if len(mu_e.shape) != 1 or sigma_e.shape != (mu_e.shape[0], mu_e.shape[0]):
        raise NpzFormatError(
            f"{what} {str(path)!r}: expected {mu_key} (D,) and {sigma_key} (D, D), "
            f"got {mu_key} {mu_e.shape} and {sigma_key} {sigma_e.shape}"
        )
    for e in (mu_e, sigma_e):
        if e.dtype.kind != "f":
            raise NpzFormatError(f"{what} {str(path)!r}: expected a float array for {e.key!r}, got {e.dtype}")
    mu, sigma = _load_array(path, mu_key, what), _load_array(path, sigma_key, what)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise NpzFormatError(f"{what} {str(path)!r}: {mu_key} or {sigma_key} holds NaN or inf")
    return FeatureStats(mu, sigma)


def _load_array(path: Path, key: str, what: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data[key])
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        raise NpzFormatError(f"{what} {str(path)!r}: could not read {key!r} ({type(e).__name__}: {e})") from e


def _open_zip(path: Path, what: str) -> zipfile.ZipFile:
    if not path.exists():
        raise MissingResourceError(f"{what}: no such file {str(path)!r}")
    if path.is_dir():
        raise NpzFormatError(f"{what}: expected an .npz file, got the folder {str(path)!r}")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        with open(path, "rb") as f:
            head = f.read(6)
        hint = (
            "it is a bare .npy array: wrap it with np.savez(out, arr_0=np.load(path))"
            if head == b"\x93NUMPY"
            else "is the file complete (an interrupted copy or download)? It must be an np.savez archive"
        )
        raise NpzFormatError(f"{what} {str(path)!r}: not a valid .npz (zip) archive ({e}); {hint}") from e


def _member(zf: zipfile.ZipFile, path: Path, name: str) -> IO[bytes]:
    try:
        return zf.open(name)
    except (zipfile.BadZipFile, zlib.error, OSError) as e:
        raise NpzFormatError(f"{str(path)!r}: cannot open {name} inside the archive ({type(e).__name__}: {e})") from e


def _read_header(f: IO[bytes], path: Path, name: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise NpzFormatError(f"{str(path)!r}: {name} has no valid .npy header ({type(e).__name__}: {e})") from e
    if fortran and len(shape) > 1:
        raise NpzFormatError(f"{str(path)!r}: {name} is stored in Fortran order; save np.ascontiguousarray(x) instead")
    if dtype.hasobject:
        raise NpzFormatError(f"{str(path)!r}: {name} holds Python objects (dtype {dtype}); expected numeric arrays")
    return tuple(int(s) for s in shape), dtype
