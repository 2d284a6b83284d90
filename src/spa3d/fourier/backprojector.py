"""Back-projection of 2D images into 3D Fourier accumulators, and reconstruction.

Each image's half-plane FT is inserted (trilinear weights) at
``pad·A.T @ (kx, ky, 0)`` into a data accumulator, its weight (CTF² or 1)
into a weight accumulator, on the padded grid cropped to the sphere of the
largest frequency. The map is reconstructed by gridding with
iterative density compensation (as RELION does, after Pipe & Menon 1999),
optionally regularised by a τ² spectrum (``weight + 1/τ²``), inverse
transformed on the padded grid, windowed to the box and divided by the
transform of the trilinear kernel (gridding correction).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from spa3d.fourier.grid import ifftn_centered
from spa3d.fourier.projector import cube_halfwidth, gridding_correct, slice_coordinates


class BackProjector:
    """3D Fourier accumulators for a box of ``n`` pixels (padding ``pad``).

    ``data`` (D, D, D, 2: real, imag) and ``weight`` (D, D, D), D = 2h+1,
    float64, centre at index h. Accumulators of several back-projectors (e.g.
    from several workers) can be added with :meth:`add`.
    """

    def __init__(self, n: int, pad: int = 2, r_max: float | None = None, device=None):
        self.n, self.pad = n, pad
        self.r_max = float(n // 2 if r_max is None else min(r_max, n // 2))
        self.h = cube_halfwidth(n, pad, self.r_max)
        d = 2 * self.h + 1
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.data = torch.zeros((d, d, d, 2), dtype=torch.float64, device=self.device)
        self.weight = torch.zeros((d, d, d), dtype=torch.float64, device=self.device)

    def insert(self, fts: torch.Tensor, rotations: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add images' half-plane FTs (B, n, n//2+1) with rotations (B, 3, 3).

        ``fts`` should already be CTF-multiplied when ``weights`` are CTF².
        ``weights`` (B, n, n//2+1) default to 1.
        """
        d = 2 * self.h + 1
        rot = torch.as_tensor(rotations, device=self.device, dtype=torch.float32)
        coords, mask = slice_coordinates(rot, self.n, self.pad, self.r_max)
        b = coords.shape[0]
        coords = coords + self.h
        mask = mask.expand(b, -1, -1)
        coords = coords[mask]  # (M, 3) in (x, y, z)
        vals = torch.view_as_real(fts.to(self.device).to(torch.complex64))[mask]  # (M, 2)
        if weights is None:
            w = torch.ones(vals.shape[0], device=self.device, dtype=torch.float32)
        else:
            w = weights.to(self.device).to(torch.float32)[mask]
        base = torch.floor(coords)
        frac = coords - base
        base = base.long()
        flat_data = self.data.view(-1, 2)
        flat_w = self.weight.view(-1)
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    ix, iy, iz = base[:, 0] + dx, base[:, 1] + dy, base[:, 2] + dz
                    fx = frac[:, 0] if dx else 1 - frac[:, 0]
                    fy = frac[:, 1] if dy else 1 - frac[:, 1]
                    fz = frac[:, 2] if dz else 1 - frac[:, 2]
                    t = fx * fy * fz
                    ok = (ix >= 0) & (ix < d) & (iy >= 0) & (iy < d) & (iz >= 0) & (iz < d)
                    idx = ((iz * d + iy) * d + ix)[ok]
                    t = t[ok]
                    flat_data.index_add_(0, idx, (vals[ok] * t[:, None]).to(torch.float64))
                    flat_w.index_add_(0, idx, (w[ok] * t).to(torch.float64))

    def add(self, other: "BackProjector") -> None:
        """Add another back-projector's accumulators (same n, pad, r_max)."""
        self.data += other.data.to(self.device)
        self.weight += other.weight.to(self.device)

    def _hermitian_full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulators with each insertion's Friedel mate (-k, conjugate) added."""
        flip_d = torch.flip(self.data, dims=(0, 1, 2))
        data = self.data.clone()
        data[..., 0] += flip_d[..., 0]
        data[..., 1] -= flip_d[..., 1]
        weight = self.weight + torch.flip(self.weight, dims=(0, 1, 2))
        return data, weight

    def _symmetrise(self, data: torch.Tensor, weight: torch.Tensor, ops: np.ndarray):
        """Sum of the accumulators rotated by every operator of a point group."""
        if ops is None or len(ops) <= 1:
            return data, weight
        d = data.shape[0]
        c = torch.arange(d, device=self.device, dtype=torch.float64) - self.h
        zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
        pts = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)
        inp = torch.cat([data.permute(3, 0, 1, 2), weight[None]], dim=0)[None]  # (1, 3, D, D, D)
        total = inp.clone()
        for r in ops[1:]:
            rk = pts @ torch.as_tensor(r, device=self.device, dtype=torch.float64).T
            grid = (rk / self.h).reshape(1, d, d, d, 3)
            total += F.grid_sample(inp, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        total = total[0]
        return total[:2].permute(1, 2, 3, 0).contiguous(), total[2]

    def shell_index(self) -> torch.Tensor:
        """Shell (cycles per box, rounded) of every accumulator voxel."""
        c = torch.arange(2 * self.h + 1, device=self.device, dtype=torch.float64) - self.h
        r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2) / self.pad
        return torch.round(r).long()

    def _smooth(self, x: torch.Tensor, sigma: float = 0.8, radius: int = 2) -> torch.Tensor:
        """Separable Gaussian convolution (sigma in padded voxels) of a (D, D, D) grid."""
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = k / k.sum()
        y = x[None, None]
        for dim in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + dim] = len(t)
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = radius
            y = F.conv3d(F.pad(y, pad), k.view(shape))
        return y[0, 0]

    def reconstruct(self, symmetry_ops: np.ndarray | None = None, tau2: np.ndarray | None = None,
                    n_iter_gridding: int = 10) -> torch.Tensor:
        """The map (n, n, n), float32, from the accumulators.

        Density compensation (Pipe & Menon 1999): find d with
        ``(d·W) ⊛ κ ≈ 1`` (κ a small Gaussian) inside the sphere, W the weight
        plus ``1/tau2`` when a τ² spectrum (per shell, cycles per box) is
        given; the map's transform is ``data·d``, which is the data convolved
        with the trilinear kernel: the real-space map is divided by its sinc².
        """
        data, weight = self._hermitian_full()
        data, weight = self._symmetrise(data, weight, symmetry_ops)
        shell = self.shell_index()
        c = torch.arange(2 * self.h + 1, device=self.device, dtype=torch.float64) - self.h
        r2 = c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2
        inside = r2 < (self.r_max * self.pad) ** 2
        w = weight.clone()
        if tau2 is not None:
            nshell = int(shell.max()) + 1
            t2 = torch.zeros(nshell, dtype=torch.float64, device=self.device)
            tt = torch.as_tensor(np.asarray(tau2, dtype=np.float64), device=self.device)[:nshell]
            t2[: len(tt)] = tt
            t2s = t2[shell]
            # 1/tau2 per padded voxel: tau2 is per original voxel, pad**3 padded voxels share it
            w = w + torch.where(t2s > 0, 1.0 / (self.pad**3 * t2s.clamp_min(1e-300)), 1e3 * weight)
        w = torch.where(inside, w, torch.zeros_like(w))
        d = inside.to(torch.float64)
        for _ in range(n_iter_gridding):
            conv = self._smooth(d * w)
            floor = 1e-6 * float(conv.max()) if float(conv.max()) > 0 else 1.0
            d = torch.where(inside, d / conv.clamp_min(floor), torch.zeros_like(d))
        ft = torch.complex(data[..., 0], data[..., 1]) * d
        npad = self.pad * self.n
        full = torch.zeros((npad,) * 3, dtype=torch.complex128, device=self.device)
        c0 = npad // 2
        h = self.h
        full[c0 - h : c0 + h + 1, c0 - h : c0 + h + 1, c0 - h : c0 + h + 1] = ft
        vol = ifftn_centered(full)
        lo = c0 - self.n // 2
        vol = vol[lo : lo + self.n, lo : lo + self.n, lo : lo + self.n]
        return gridding_correct(vol, self.pad).to(torch.float32)
