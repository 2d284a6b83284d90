"""Hand-written CPU kernels (C, loaded with ctypes), with torch fallbacks.

``trilinear_scatter`` is the back-projection's scatter-add; measured on 2 CPU
cores it is about 5x faster than the best torch formulation (a weighted
``bincount``), which is used when the compiled kernel is absent (no C
compiler at install time) or the tensors live on a GPU.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
from pathlib import Path

import torch

_LIB = None


def _load():
    global _LIB
    if _LIB is None:
        _LIB = False
        here = Path(__file__).parent
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            p = here / f"_trilinear{suffix}"
            if p.exists():
                lib = ctypes.CDLL(str(p))
                lib.trilinear_scatter.restype = None
                lib.trilinear_scatter.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                                  ctypes.c_int64, ctypes.c_int64]
                _LIB = lib
                break
    return _LIB


def have_compiled_kernels() -> bool:
    return bool(_load())


def trilinear_scatter(acc: torch.Tensor, coords: torch.Tensor, vals: torch.Tensor, use_compiled: bool = True) -> None:
    """Add ``vals`` (M, C) at ``coords`` (M, 3: x, y, z voxels) into ``acc`` (D, D, D, C), trilinearly.

    Samples whose neighbourhood leaves the grid are skipped.
    """
    d = acc.shape[0]
    nch = acc.shape[-1]
    lib = _load() if use_compiled else None
    if lib and acc.device.type == "cpu" and acc.dtype == torch.float32 and acc.is_contiguous():
        c = coords.to(torch.float32).contiguous()
        v = vals.to(torch.float32).contiguous()
        lib.trilinear_scatter(acc.data_ptr(), d, c.data_ptr(), v.data_ptr(), c.shape[0], nch)
        return
    base = torch.floor(coords)
    frac = (coords - base).to(vals.dtype)
    base = base.long()
    ok = ((base >= 0) & (base + 1 < d)).all(dim=1)
    base, frac, vals = base[ok], frac[ok], vals[ok]
    wz = torch.stack([1 - frac[:, 2], frac[:, 2]])
    wy = torch.stack([1 - frac[:, 1], frac[:, 1]])
    wx = torch.stack([1 - frac[:, 0], frac[:, 0]])
    t = (wz[:, None, None] * wy[None, :, None] * wx[None, None, :]).reshape(8, -1)
    o = torch.arange(2, device=acc.device)
    offs = ((o[:, None, None] * d + o[None, :, None]) * d + o[None, None, :]).reshape(8, 1)
    idx0 = (base[:, 2] * d + base[:, 1]) * d + base[:, 0]
    flat = acc.view(-1, nch)
    if acc.device.type == "cpu":
        # weighted bincount over (voxel, channel) pairs: the fastest torch scatter-add on CPU
        chan = torch.arange(nch, device=acc.device)
        flat_idx = ((idx0[None] + offs)[..., None] * nch + chan).reshape(-1)
        contrib = (t[..., None] * vals[None]).reshape(-1)
        acc.view(-1).add_(torch.bincount(flat_idx, weights=contrib, minlength=acc.numel()).to(acc.dtype))
    else:
        flat.index_add_(0, (idx0[None] + offs).reshape(-1), (t[..., None] * vals[None]).reshape(-1, nch).to(acc.dtype))
