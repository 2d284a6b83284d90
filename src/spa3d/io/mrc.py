"""MRC maps and image stacks (via ``mrcfile``).

Arrays are in numpy order (z, y, x) with x fastest, as MRC stores them.
Pixel sizes are in Å. The box centre is at index ``n // 2`` on each axis.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

from spa3d.errors import InputError
from spa3d.io.atomic_write import atomic_path

#: MRC mode -> numpy dtype (little endian; byte order is taken from the file).
_MODE_DTYPE = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16, 12: np.float16}


@dataclass(frozen=True)
class MrcHeader:
    """What is needed to read an MRC file's data directly from disk."""

    path: str
    shape: tuple[int, int, int]  # (nz, ny, nx): for a stack nz is the number of images
    dtype: np.dtype
    data_offset: int  # bytes
    pixel_size: float  # Å (0 when the header has none)
    is_volume: bool  # ispg 1 (volume) vs 0 (image stack), as RELION writes them


def read_header(path: str | os.PathLike) -> MrcHeader:
    """Read and check an MRC header; raise :class:`InputError` on a bad file."""
    path = str(path)
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    try:
        with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
            h = mrc.header
            mode = int(h.mode)
            nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
            ext = int(h.nsymbt)
            voxel = float(mrc.voxel_size.x)
            ispg = int(h.ispg)
            byteorder = "<" if mrc.header.mode.dtype.byteorder in ("<", "=", "|") else ">"
    except Exception as exc:  # mrcfile raises ValueError on a bad map id etc.
        raise InputError(path, f"not a readable MRC file ({exc})") from None
    if mode not in _MODE_DTYPE:
        raise InputError(path, f"unsupported MRC mode {mode}")
    if min(nx, ny, nz) < 1:
        raise InputError(path, f"bad MRC dimensions {nx}x{ny}x{nz}")
    dtype = np.dtype(_MODE_DTYPE[mode]).newbyteorder(byteorder)
    offset = 1024 + ext
    need = offset + nx * ny * nz * dtype.itemsize
    have = os.path.getsize(path)
    if have < need:
        raise InputError(path, f"truncated MRC file: {have} bytes, header says {need}")
    return MrcHeader(path, (nz, ny, nx), dtype, offset, voxel, ispg == 1 or (ispg >= 401))


def read_map(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a 3D map: returns (float32 array (z, y, x), pixel size in Å)."""
    hdr = read_header(path)
    data = np.fromfile(hdr.path, dtype=hdr.dtype, count=int(np.prod(hdr.shape)), offset=hdr.data_offset)
    data = data.reshape(hdr.shape).astype(np.float32)
    if not np.all(np.isfinite(data)):
        raise InputError(path, "map contains NaN or infinite values")
    return data, hdr.pixel_size


def read_images(hdr: MrcHeader, indices: np.ndarray) -> np.ndarray:
    """Read 2D images ``indices`` (0-based) of a stack as float32 (n, ny, nx).

    Contiguous runs are read with one ``pread`` each, so memory holds only the
    requested images (no page cache is pinned in the process, unlike a
    long-lived memory map).
    """
    nz, ny, nx = hdr.shape
    per = ny * nx * hdr.dtype.itemsize
    indices = np.asarray(indices, dtype=np.int64)
    out = np.empty((len(indices), ny, nx), dtype=np.float32)
    if len(indices) == 0:
        return out
    if indices.min() < 0 or indices.max() >= nz:
        bad = int(indices[(indices < 0) | (indices >= nz)][0])
        raise InputError(hdr.path, f"image {bad + 1} requested but the stack holds {nz}")
    order = np.argsort(indices, kind="stable")
    sorted_idx = indices[order]
    fd = os.open(hdr.path, os.O_RDONLY)
    try:
        start = 0
        while start < len(sorted_idx):
            stop = start + 1
            while stop < len(sorted_idx) and sorted_idx[stop] == sorted_idx[stop - 1] + 1:
                stop += 1
            first = int(sorted_idx[start])
            count = stop - start
            at = int(order[start])
            if hdr.dtype == np.dtype("<f4") and np.array_equal(order[start:stop], np.arange(at, at + count)):
                # float32 images wanted in file order (a micrograph, a whole stack): straight into the output
                got = os.preadv(fd, [memoryview(out[at:at + count]).cast("B")], hdr.data_offset + first * per)
                if got != per * count:
                    raise InputError(hdr.path, "truncated MRC stack")
            else:
                buf = os.pread(fd, per * count, hdr.data_offset + first * per)
                if len(buf) != per * count:
                    raise InputError(hdr.path, "truncated MRC stack")
                out[order[start:stop]] = np.frombuffer(buf, dtype=hdr.dtype).reshape(count, ny, nx)
            start = stop
    finally:
        os.close(fd)
    return out


def write_map(path: str | os.PathLike, data: np.ndarray, pixel_size: float) -> None:
    """Write a 3D map (z, y, x) or a 2D image (y, x) as float32 with its pixel size in Å, atomically."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            mrc.voxel_size = pixel_size
            if data.ndim == 3:
                mrc.set_volume()
            mrc.update_header_stats()


def write_stack(path: str | os.PathLike, images: np.ndarray, pixel_size: float) -> None:
    """Write a 2D image stack (n, y, x) as RELION's .mrcs (ispg 0), atomically.

    The header is mrcfile's for such a stack, with its statistics (float32 minimum, maximum, mean and SD, as
    mrcfile's update_header_stats); the data follow it directly (2.5× faster than through mrcfile).
    """
    images = np.ascontiguousarray(images, dtype="<f4")
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"an image stack is (n, box, box), got {images.shape}")
    if images.size:
        stats = (images.min(), images.max(), images.mean(dtype=np.float32), images.std(dtype=np.float32))
    else:
        stats = (0.0, -1.0, -2.0, -1.0)  # mrcfile's unset statistics
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(_stack_header(images.shape[0], images.shape[1], pixel_size, stats, mz_images=False))
            fh.write(memoryview(images).cast("B"))


def _stack_header(n_images: int, box: int, pixel_size: float, stats=None, mz_images: bool = True) -> bytes:
    """The 1024-byte MRC header of a stack of ``n_images`` float32 images of ``box`` pixels.

    ``mz_images``: the z sampling (mz, cella.z) counts the images; otherwise it is one section, as mrcfile's
    and RELION's image stacks have it."""
    with tempfile.TemporaryDirectory() as d:
        with mrcfile.new(os.path.join(d, "h.mrcs")) as mrc:
            mrc.set_data(np.zeros((1, box, box), np.float32))
            mrc.set_image_stack()
            mrc.voxel_size = pixel_size
            h = mrc.header
            h.nz = n_images
            if mz_images:
                h.mz = n_images
                h.cella.z = pixel_size * n_images
            if stats is not None:
                h.dmin, h.dmax, h.dmean, h.rms = stats
            return h.tobytes()


class StackWriter:
    """Write a large image stack chunk by chunk without holding it in memory.

    Data go to a temporary file beside ``path``; the header (with statistics)
    is written and the file renamed into place on :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, n_images: int, box: int, pixel_size: float):
        self.path = Path(path)
        self._n, self._box, self._apix = n_images, box, pixel_size
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._fh = open(self._tmp, "wb")
        self._fh.write(b"\0" * 1024)
        self._written = 0
        self._min, self._max, self._sum, self._sumsq = np.inf, -np.inf, 0.0, 0.0

    def write(self, images: np.ndarray) -> None:
        images = np.ascontiguousarray(images, dtype="<f4")
        self._fh.write(images.tobytes())
        self._written += len(images)
        self._min = min(self._min, float(images.min()))
        self._max = max(self._max, float(images.max()))
        x = images.astype(np.float64)
        self._sum += float(x.sum())
        self._sumsq += float((x * x).sum())

    def close(self, ok: bool = True) -> None:
        """Finish the file (``ok``) or remove it (not ``ok``, e.g. after an error)."""
        if ok and self._written != self._n:
            self._fh.close()
            self._ctx.__exit__(RuntimeError, RuntimeError("incomplete"), None)
            raise RuntimeError(f"{self.path}: wrote {self._written} of {self._n} images")
        if ok:
            count = max(self._n * self._box * self._box, 1)
            mean = self._sum / count
            rms = float(np.sqrt(max(self._sumsq / count - mean**2, 0.0)))
            self._fh.seek(0)
            self._fh.write(_stack_header(self._n, self._box, self._apix, (self._min, self._max, mean, rms)))
            self._fh.close()
            self._ctx.__exit__(None, None, None)
        else:
            self._fh.close()
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
