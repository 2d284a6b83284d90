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

from spa3d.fourier.filters import soft_sphere
from spa3d.fourier.grid import half_plane_freqs, ifftn_centered
from spa3d.kernels import trilinear_scatter
from spa3d.fourier.projector import cube_halfwidth, gridding_correct, recentre


class BackProjector:
    """3D Fourier accumulators for a box of ``n`` pixels (padding ``pad``).

    ``data`` (D, D, D, 2: real, imag) and ``weight`` (D, D, D), D = 2h+1,
    float32, centre at index h. Accumulators of several back-projectors (e.g.
    from several workers) can be added with :meth:`add`.
    """

    def __init__(self, n: int, pad: int = 2, r_max: float | None = None, device=None):
        self.n, self.pad = n, pad
        self.r_max = float(n // 2 if r_max is None else min(r_max, n // 2))
        self.h = cube_halfwidth(n, pad, self.r_max)
        d = 2 * self.h + 1
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # channels: data real, data imag, weight
        self.acc = torch.zeros((d, d, d, 3), dtype=torch.float32, device=self.device)
        self._sel = None  # half-plane pixels inside r_max, and their (kx, ky)·pad
        self._kxy = None

    @property
    def data(self) -> torch.Tensor:
        """Data accumulator (D, D, D, 2: real, imag)."""
        return self.acc[..., :2]

    @property
    def weight(self) -> torch.Tensor:
        """Weight accumulator (D, D, D)."""
        return self.acc[..., 2]

    def insert(self, fts: torch.Tensor, rotations: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add images' half-plane FTs (B, n, n//2+1) with rotations (B, 3, 3).

        ``fts`` should already be CTF-multiplied when ``weights`` are CTF².
        ``weights`` (B, n, n//2+1) default to 1.
        """
        rot = torch.as_tensor(rotations, device=self.device, dtype=torch.float32)
        if self._sel is None:
            kx, ky = half_plane_freqs(self.n, device=self.device)
            inside = (kx**2 + ky**2 <= self.r_max**2).reshape(-1)
            self._sel = inside.nonzero()[:, 0]
            self._kxy = torch.stack([kx.reshape(-1), ky.reshape(-1)], 1)[self._sel] * self.pad  # (P, 2)
        b = rot.shape[0]
        # pad * A.T @ (kx, ky, 0) for the P frequencies inside r_max: (B, P, 3), then shift to the cube centre
        coords = (torch.matmul(self._kxy, rot[:, :2, :]) + self.h).reshape(-1, 3)
        vals = torch.view_as_real(fts.to(self.device).to(torch.complex64).reshape(b, -1)[:, self._sel]).reshape(-1, 2)
        if weights is None:
            w = torch.ones(vals.shape[0], device=self.device, dtype=torch.float32)
        else:
            w = weights.to(self.device).to(torch.float32).reshape(b, -1)[:, self._sel].reshape(-1)
        trilinear_scatter(self.acc, coords, torch.cat([vals, w[:, None]], dim=1))

    def insert_pixels(self, values: torch.Tensor, weights: torch.Tensor, rotations: torch.Tensor,
                      kx: torch.Tensor, ky: torch.Tensor) -> None:
        """Add per-rotation sums (R, P) at half-plane frequencies (kx, ky) (cycles per box, |k| <= r_max).

        This is how the M-step inserts posterior-weighted image sums: one row per
        rotation instead of one per image and pose.
        """
        rot = torch.as_tensor(rotations, device=self.device, dtype=torch.float32)
        k = torch.stack([kx, ky], dim=1).to(self.device, torch.float32) * self.pad
        coords = (torch.matmul(k, rot[:, :2, :]) + self.h).reshape(-1, 3)
        vals = torch.view_as_real(values.to(self.device).to(torch.complex64)).reshape(-1, 2)
        w = weights.to(self.device).to(torch.float32).reshape(-1)
        trilinear_scatter(self.acc, coords, torch.cat([vals, w[:, None]], dim=1))

    def add(self, other: "BackProjector") -> None:
        """Add another back-projector's accumulators (same n, pad, r_max)."""
        self.acc += other.acc.to(self.device)

    def _hermitian_full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulators with each insertion's Friedel mate (-k, conjugate) added."""
        acc = self.acc
        flip = torch.flip(acc, dims=(0, 1, 2))
        data = acc[..., :2].clone()
        data[..., 0] += flip[..., 0]
        data[..., 1] -= flip[..., 1]
        weight = acc[..., 2] + flip[..., 2]
        return data, weight

    def _symmetrise(self, data: torch.Tensor, weight: torch.Tensor, ops: np.ndarray):
        """Sum of the accumulators rotated by every operator of a point group."""
        if ops is None or len(ops) <= 1:
            return data, weight
        d = data.shape[0]
        c = torch.arange(d, device=self.device, dtype=data.dtype) - self.h
        zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
        pts = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)
        inp = torch.cat([data.permute(3, 0, 1, 2), weight[None]], dim=0)[None]  # (1, 3, D, D, D)
        total = inp.clone()
        for r in ops[1:]:
            rk = pts @ torch.as_tensor(r, device=self.device, dtype=data.dtype).T
            grid = (rk / self.h).reshape(1, d, d, d, 3)
            total += F.grid_sample(inp, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        total = total[0]
        return total[:2].permute(1, 2, 3, 0).contiguous(), total[2]

    def shell_index(self) -> torch.Tensor:
        """Shell (cycles per box, rounded) of every accumulator voxel."""
        c = torch.arange(2 * self.h + 1, device=self.device, dtype=torch.float64) - self.h
        r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2) / self.pad
        return torch.round(r).long()

    def shell_weights(self, symmetry_ops: np.ndarray | None = None) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """Weight per original-grid voxel, by shell: (mean per shell (n//2+1,), voxel weights, voxel shells).

        The padded accumulator spreads each insertion over pad³ voxels, so a
        voxel of the original grid holds pad³ times the mean padded weight.
        Used for the spectral SNR (weight·τ²) that sets the resolution.
        """
        _, weight = self._hermitian_full()
        _, weight = self._symmetrise(torch.zeros(weight.shape + (2,), dtype=weight.dtype, device=self.device), weight,
                                     symmetry_ops)
        w = weight.double() * self.pad**3
        shell = self.shell_index()
        nsh = self.n // 2 + 1
        keep = shell < nsh
        s = torch.zeros(nsh, dtype=torch.float64, device=self.device).index_add_(0, shell[keep], w[keep])
        c = torch.zeros(nsh, dtype=torch.float64, device=self.device).index_add_(0, shell[keep],
                                                                                 torch.ones_like(w[keep]))
        return (s / c.clamp_min(1)).cpu().numpy(), w, shell

    @staticmethod
    def _smooth(x: torch.Tensor, sigma: float = 0.8, radius: int = 2) -> torch.Tensor:
        """Separable Gaussian smoothing (sigma in padded voxels, zero outside) of a (D, D, D) grid."""
        t = np.arange(-radius, radius + 1)
        k = np.exp(-0.5 * (t / sigma) ** 2)
        k = k / k.sum()
        for dim in range(3):
            y = torch.zeros_like(x)
            n = x.shape[dim]
            for off, kk in zip(t, k):
                # y[i] += kk * x[i + off]
                lo, hi = max(0, -off), min(n, n - off)
                y.narrow(dim, lo, hi - lo).add_(x.narrow(dim, lo + off, hi - lo), alpha=float(kk))
            x = y
        return x

    def reconstruct(self, symmetry_ops: np.ndarray | None = None, tau2: np.ndarray | None = None,
                    n_iter_gridding: int = 10, mask_edge: bool = True,
                    unregularised_where_tau2_zero: bool = False) -> torch.Tensor:
        """The map (n, n, n), float32, from the accumulators.

        Density compensation (Pipe & Menon 1999): find d with
        ``(d·W) ⊛ κ ≈ 1`` (κ a small Gaussian) inside the sphere, W the weight
        plus ``1/tau2`` when a τ² spectrum (per shell, cycles per box) is
        given (τ² here is the prior power over the noise power σ², as the
        weights hold Σ CTF² without 1/σ²). Shells where τ² is zero (the
        reference had no power there yet) are suppressed (1000·W added), or,
        with ``unregularised_where_tau2_zero``, left without a prior: that is
        what RELION's rule for such shells (add 1/(0.001·W/σ²)) amounts to
        for normalised particles, and it is how the resolution of a
        classification grows into shells the reference did not have.
        The map's transform is ``data·d``, which is the data convolved
        with the trilinear kernel: the real-space map is divided by its sinc².
        With ``mask_edge`` the map is zero outside the box's inscribed sphere.
        """
        data, weight = self._hermitian_full()
        data, weight = self._symmetrise(data, weight, symmetry_ops)
        c = torch.arange(2 * self.h + 1, device=self.device, dtype=torch.float32) - self.h
        r2 = c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2
        inside = r2 < (self.r_max * self.pad) ** 2
        w = weight.clone()
        if tau2 is not None:
            shell = self.shell_index()
            nshell = int(shell.max()) + 1
            t2 = torch.zeros(nshell, dtype=w.dtype, device=self.device)
            tt = torch.as_tensor(np.asarray(tau2, dtype=np.float64), device=self.device)[:nshell]
            t2[: len(tt)] = tt.to(w.dtype)
            t2s = t2[shell]
            # 1/tau2 per padded voxel: tau2 is per original voxel, pad**3 padded voxels share it
            zero_term = torch.zeros_like(weight) if unregularised_where_tau2_zero else 1e3 * weight
            w = w + torch.where(t2s > 0, 1.0 / (self.pad**3 * t2s.clamp_min(1e-30)), zero_term)
        w = torch.where(inside, w, torch.zeros_like(w))
        d = inside.to(w.dtype)
        for _ in range(n_iter_gridding):
            conv = self._smooth(d * w)
            floor = 1e-6 * float(conv.max()) if float(conv.max()) > 0 else 1.0
            # voxels without data keep d = 0, and voxels whose neighbourhood holds almost no weight keep
            # their d (dividing by the floor every iteration would grow d without bound there)
            upd = torch.where(conv > floor, d / conv.clamp_min(floor), d)
            d = torch.where(inside & (w > 0), upd, torch.zeros_like(d))
        ft = torch.complex(data[..., 0], data[..., 1]).to(torch.complex128) * d
        vol = ifftn_centered(recentre(ft, self.pad * self.n))
        vol = recentre(vol, self.n)
        vol = gridding_correct(vol, self.pad)
        if mask_edge:
            # as RELION: zero beyond the box's inscribed sphere (soft edge of 3 pixels inside it)
            vol = vol * torch.as_tensor(soft_sphere(self.n, self.n / 2 - 3, 3.0), device=vol.device, dtype=vol.dtype)
        return vol.to(torch.float32)
