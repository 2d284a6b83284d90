"""Back-projection of 2D images into 3D Fourier accumulators, and reconstruction.

Each image's half-plane FT is inserted (trilinear weights) at
``pad·A.T @ (kx, ky, 0)`` into a data accumulator, its weight (CTF² or 1)
into a weight accumulator, on the padded grid cropped to the sphere of the
largest frequency. As in RELION, only the half of Fourier space with
kx ≥ 0 is stored (a real map's transform is Hermitian): a frequency with
kx < 0 is inserted as its Friedel mate (−k, complex conjugate), which halves
the memory of the accumulators and of the reconstruction. The map is
reconstructed by gridding with iterative density compensation (as RELION
does, after Pipe & Menon 1999), optionally regularised by a τ² spectrum
(``weight + 1/τ²``), inverse transformed on the padded grid (a real inverse
FFT of the half grid), windowed to the box and divided by the transform of
the trilinear kernel (gridding correction).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from spa3d.fourier.filters import soft_sphere
from spa3d.fourier.grid import half_plane_freqs
from spa3d.fourier.projector import cube_halfwidth, gridding_correct, half_to_rfft_layout
from spa3d.kernels import backproject_half, density_iterations, smooth_half, symmetrise_half, trilinear_scatter


#: The density compensation's kernel, in padded voxels: a separable Gaussian of σ 1.0 cut at 3 voxels, the width of
#: RELION's (a Kaiser-Bessel blob of radius 1.9·2 = 3.8 padded voxels, α 15, close to a Gaussian of
#: σ = 3.8/√15 ≈ 0.98), and GRIDDING_ITERATIONS of Pipe and Menon's iteration (RELION runs 10). Five iterations
#: give the same maps on noiseless data and better maps on noisy ones, the more so the fewer slices reach a voxel:
#: for 200 particles at box 256, FSC 0.143 against the truth at shell 78, against 72 with 10 iterations, 42 with the
#: earlier σ 0.8 cut at 2, and 65 for relion_reconstruct; see docs/conventions.md.
KERNEL_SIGMA = 1.0
KERNEL_RADIUS = 3
GRIDDING_ITERATIONS = 5


@functools.lru_cache(maxsize=4)
def _shell_index(h: int, pad: int, device: str) -> torch.Tensor:
    """Rounded shell (cycles per box) of every voxel of a half grid (2h+1, 2h+1, h+1) padded ``pad`` times."""
    c = torch.arange(2 * h + 1, device=device, dtype=torch.float32) - h
    cx = torch.arange(h + 1, device=device, dtype=torch.float32)
    r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + cx[None, None, :] ** 2) / pad
    return torch.round(r).long()


class BackProjector:
    """Half-grid 3D Fourier accumulators for a box of ``n`` pixels (padding ``pad``).

    ``acc`` (D, D, h+1, 3: data real, data imag, weight), float32, D = 2h+1:
    index ``[z + h, y + h, x]`` holds padded frequency (x, y, z) with x ≥ 0
    (cycles per padded box). Accumulators of several back-projectors of the
    same ``n, pad, r_max`` (e.g. from several workers) add up (:meth:`add`).
    Once :meth:`shell_weights` or :meth:`reconstruct` has run, the x = 0
    plane has been made Hermitian in place and no more images can be inserted.
    """

    def __init__(self, n: int, pad: int = 2, r_max: float | None = None, device=None):
        self.n, self.pad = n, pad
        self.r_max = float(n // 2 if r_max is None else min(r_max, n // 2))
        self.h = cube_halfwidth(n, pad, self.r_max)
        d = 2 * self.h + 1
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._acc = torch.zeros((d, d, self.h + 1, 3), dtype=torch.float32, device=self.device)
        self._final = False  # x = 0 plane made Hermitian (see _finalise)
        self._shell_weights = None  # (operators' bytes, shell_weights' result) once final
        self._sel = None  # half-plane pixels inside r_max, and their (kx, ky)·pad
        self._kxy = None

    @property
    def acc(self) -> torch.Tensor:
        """The accumulators (D, D, h+1, 3); assigning new ones (e.g. summed over workers) is allowed."""
        return self._acc

    @acc.setter
    def acc(self, value: torch.Tensor) -> None:
        if tuple(value.shape) != tuple(self._acc.shape):
            raise ValueError(f"accumulator of shape {tuple(value.shape)}, expected {tuple(self._acc.shape)}")
        self._acc = value.to(self.device, torch.float32).contiguous()
        self._final = False
        self._shell_weights = None

    @property
    def data(self) -> torch.Tensor:
        """Data accumulator (D, D, h+1, 2: real, imag)."""
        return self._acc[..., :2]

    @property
    def weight(self) -> torch.Tensor:
        """Weight accumulator (D, D, h+1)."""
        return self._acc[..., 2]

    def _scatter(self, coords: torch.Tensor, vals: torch.Tensor, w: torch.Tensor) -> None:
        """Insert values (M, 2: real, imag) and weights (M,) at padded frequencies ``coords`` (M, 3: x, y, z)."""
        if self._final:
            raise RuntimeError("BackProjector: insertion after the accumulators were finalised")
        flip = coords[:, 0] < 0  # store the Friedel mate: -k, complex conjugate
        sign = 1.0 - 2.0 * flip.to(coords.dtype)
        c = coords * sign[:, None]
        c[:, 1:] += self.h
        trilinear_scatter(self._acc, c, torch.stack([vals[:, 0], vals[:, 1] * sign, w], dim=1))

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
        if not self._final:
            sel_fts = fts.to(self.device).reshape(b, -1)[:, self._sel]
            sel_w = (torch.ones(sel_fts.shape, dtype=torch.float32, device=self.device) if weights is None
                     else weights.to(self.device).to(torch.float32).reshape(b, -1)[:, self._sel])
            if backproject_half(self._acc, self.h, rot, self._kxy, sel_fts, sel_w):
                return
        # pad * A.T @ (kx, ky, 0) for the P frequencies inside r_max: (B, P, 3)
        coords = torch.matmul(self._kxy, rot[:, :2, :]).reshape(-1, 3)
        vals = torch.view_as_real(fts.to(self.device).to(torch.complex64).reshape(b, -1)[:, self._sel]).reshape(-1, 2)
        if weights is None:
            w = torch.ones(vals.shape[0], device=self.device, dtype=torch.float32)
        else:
            w = weights.to(self.device).to(torch.float32).reshape(b, -1)[:, self._sel].reshape(-1)
        self._scatter(coords, vals, w)

    def insert_pixels(self, values: torch.Tensor, weights: torch.Tensor, rotations: torch.Tensor,
                      kx: torch.Tensor, ky: torch.Tensor) -> None:
        """Add per-rotation sums (R, P) at half-plane frequencies (kx, ky) (cycles per box, |k| <= r_max).

        This is how the M-step inserts posterior-weighted image sums: one row per
        rotation instead of one per image and pose.
        """
        rot = torch.as_tensor(rotations, device=self.device, dtype=torch.float32)
        k = torch.stack([kx, ky], dim=1).to(self.device, torch.float32) * self.pad
        if self._final:
            raise RuntimeError("BackProjector: insertion after the accumulators were finalised")
        if backproject_half(self._acc, self.h, rot, k, values.to(self.device), weights.to(self.device)):
            return
        coords = torch.matmul(k, rot[:, :2, :]).reshape(-1, 3)
        vals = torch.view_as_real(values.to(self.device).to(torch.complex64)).reshape(-1, 2)
        self._scatter(coords, vals, weights.to(self.device).to(torch.float32).reshape(-1))

    def add(self, other: "BackProjector") -> None:
        """Add another back-projector's accumulators (same n, pad, r_max)."""
        self.acc = self._acc + other.acc.to(self.device)

    def _finalise(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Data (D, D, h+1, 2) and weight (D, D, h+1) views, the x = 0 plane made Hermitian (once, in place).

        On the plane x = 0 both k and −k are stored; each gets the other's
        conjugate added, as the full grid would after adding every
        insertion's Friedel mate.
        """
        if not self._final:
            p0 = self._acc[:, :, 0].clone()
            mirror = torch.flip(p0, dims=(0, 1))
            mirror[..., 1] *= -1
            self._acc[:, :, 0] += mirror
            self._final = True
        return self._acc[..., :2], self._acc[..., 2]

    def _centred_coords(self, z: torch.Tensor) -> torch.Tensor:
        """(x, y, z) padded frequencies (len(z)·D·(h+1), 3) of the half-grid voxels in z-planes ``z``."""
        c = torch.arange(2 * self.h + 1, device=self.device, dtype=torch.float32) - self.h
        cx = torch.arange(self.h + 1, device=self.device, dtype=torch.float32)
        zz, yy, xx = torch.meshgrid(z.to(torch.float32), c, cx, indexing="ij")
        return torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)

    def _symmetrise(self, data: torch.Tensor | None, weight: torch.Tensor, ops: np.ndarray, slab: int = 32,
                    use_compiled: bool = True):
        """Sum of the accumulators rotated by every operator of a point group (``data`` None: weights only).

        Each voxel k gathers the accumulators at R·k (trilinear); where R·k has
        x < 0 its Friedel mate is read. Compiled (``kernels.symmetrise_half``: at box 256 with D2 about 10×
        faster than grid_sample); otherwise with grid_sample in slabs of z-planes to bound memory.
        """
        if ops is None or len(ops) <= 1:
            return data, weight
        if use_compiled:
            if data is None:
                out = symmetrise_half(weight.contiguous()[..., None], ops[1:])
                if out is not None:
                    return None, out[..., 0]
            else:
                acc = self._acc if (data.data_ptr() == self._acc.data_ptr() and data.shape[-1] == 2
                                    and weight.data_ptr() == self._acc[..., 2].data_ptr()) else \
                    torch.cat([data, weight[..., None]], dim=-1).contiguous()
                out = symmetrise_half(acc, ops[1:], imag=1)
                if out is not None:
                    return out[..., :2], out[..., 2]
        d, hx = weight.shape[0], weight.shape[2]
        chans = [weight[None]] if data is None else [data.permute(3, 0, 1, 2), weight[None]]
        inp = torch.cat(chans, dim=0)[None].contiguous()  # (1, C, D, D, h+1)
        total = inp[0].clone()
        scale = torch.tensor([2.0 / self.h, 1.0 / self.h, 1.0 / self.h], device=self.device)
        shift = torch.tensor([-1.0, 0.0, 0.0], device=self.device)
        zc = torch.arange(d, device=self.device) - self.h
        for z0 in range(0, d, slab):
            pts = self._centred_coords(zc[z0:z0 + slab])
            s = pts.shape[0] // (d * hx)
            for r in ops[1:]:
                rk = pts @ torch.as_tensor(r, device=self.device, dtype=torch.float32).T
                sign = torch.where(rk[:, 0] < 0, -1.0, 1.0)
                grid = (rk * sign[:, None] * scale + shift).reshape(1, s, d, hx, 3)
                smp = F.grid_sample(inp, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
                if data is not None:
                    smp[1] *= sign.reshape(s, d, hx)
                total[:, z0:z0 + s] += smp
        if data is None:
            return None, total[0]
        return total[:2].permute(1, 2, 3, 0), total[2]

    def shell_index(self) -> torch.Tensor:
        """Shell (cycles per box, rounded) of every half-grid voxel (D, D, h+1); shared, do not modify."""
        return _shell_index(self.h, self.pad, str(self.device))

    def shell_weights(self, symmetry_ops: np.ndarray | None = None) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """Weight per original-grid voxel, by shell: (mean per shell (n//2+1,), voxel weights, voxel shells).

        The padded accumulator spreads each insertion over pad³ voxels, so a
        voxel of the original grid holds pad³ times the mean padded weight.
        Used for the spectral SNR (weight·τ²) that sets the resolution.
        """
        key = None if symmetry_ops is None else np.asarray(symmetry_ops, dtype=np.float64).tobytes()
        if self._final and self._shell_weights is not None and self._shell_weights[0] == key:
            return self._shell_weights[1]  # the accumulators are frozen once final (a refinement asks twice)
        _, weight = self._finalise()
        _, weight = self._symmetrise(None, weight, symmetry_ops)
        w = weight.double() * self.pad**3
        shell = self.shell_index()
        nsh = self.n // 2 + 1
        flat = shell.reshape(-1).clamp_max(nsh)  # shells beyond the box's Nyquist go to a spare bin, dropped
        s = torch.bincount(flat, weights=w.reshape(-1), minlength=nsh + 1)[:nsh]
        c = torch.bincount(flat, minlength=nsh + 1)[:nsh].double()
        result = ((s / c.clamp_min(1)).cpu().numpy(), w, shell)
        self._shell_weights = (key, result)
        return result

    @staticmethod
    def _kernel(sigma: float = KERNEL_SIGMA, radius: int = KERNEL_RADIUS) -> np.ndarray:
        """Taps of the density-compensation kernel: a Gaussian of ``sigma`` padded voxels, summing to 1."""
        t = np.arange(-radius, radius + 1)
        k = np.exp(-0.5 * (t / sigma) ** 2)
        return k / k.sum()

    @staticmethod
    def _smooth(x: torch.Tensor, sigma: float = KERNEL_SIGMA, radius: int = KERNEL_RADIUS,
                use_compiled: bool = True) -> torch.Tensor:
        """Separable Gaussian smoothing (sigma in padded voxels) of a half grid (D, D, h+1) of a symmetric function.

        Beyond the x = 0 plane the values are the mirrored ones, f(−x, −y, −z) = f(x, y, z);
        zero outside the grid elsewhere. ``x`` is work space: the compiled kernel overwrites it.
        """
        k = BackProjector._kernel(sigma, radius)
        t = np.arange(-radius, radius + 1)
        fast = smooth_half(x.contiguous(), k) if use_compiled else None
        if fast is not None:
            return fast
        for dim in range(3):
            src = x
            if dim == 2:  # prepend the mirrored planes x = -radius .. -1 (zero beyond the grid's -(h) plane)
                mirrored = torch.flip(x[:, :, 1:radius + 1], dims=(0, 1, 2))
                zeros = x.new_zeros(x.shape[:2] + (radius - mirrored.shape[2],))
                src = torch.cat([zeros, mirrored, x], dim=2)
            y = torch.zeros_like(x)
            n = x.shape[dim]
            base = radius if dim == 2 else 0
            for off, kk in zip(t, k):
                # y[i] += kk * x[i + off]
                lo, hi = max(0, -off - base), min(n, src.shape[dim] - off - base)
                y.narrow(dim, lo, hi - lo).add_(src.narrow(dim, lo + off + base, hi - lo), alpha=float(kk))
            del src
            x = y
        return x

    def reconstruct(self, symmetry_ops: np.ndarray | None = None, tau2: np.ndarray | None = None,
                    n_iter_gridding: int = GRIDDING_ITERATIONS, mask_edge: bool = True,
                    unregularised_where_tau2_zero: bool = False, out_box: int | None = None) -> torch.Tensor:
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
        Peak memory is a few times the accumulators' (all on the half grid).

        ``out_box`` (even, at most n, holding r_max: ``out_box / 2 > r_max``): the same map Fourier-cropped to
        out_box³ voxels of n/out_box pixels each (the box's size in Å unchanged, so shell k is the same frequency
        in both); the inverse transform is then (out_box/n)³ times smaller. Values are those of the full map at
        the coarser voxels (up to the real-space operations' tiny mixing of frequencies beyond the crop).
        """
        data, weight = self._finalise()
        data, weight = self._symmetrise(data, weight, symmetry_ops)
        c2 = (torch.arange(2 * self.h + 1, device=self.device, dtype=torch.float32) - self.h) ** 2
        cx2 = torch.arange(self.h + 1, device=self.device, dtype=torch.float32) ** 2
        # inside the sphere: x² < R² − y² − z², one comparison per voxel (no radius grid)
        inside = cx2 < ((self.r_max * self.pad) ** 2 - c2[:, None] - c2[None, :])[..., None]
        w = weight.clone()
        if tau2 is not None:
            shell = self.shell_index()
            nshell = int(shell.max()) + 1
            t2 = torch.zeros(nshell, dtype=w.dtype, device=self.device)
            tt = torch.as_tensor(np.asarray(tau2, dtype=np.float64), device=self.device)[:nshell]
            t2[: len(tt)] = tt.to(w.dtype)
            t2s = t2[shell]
            del shell
            # 1/tau2 per padded voxel: tau2 is per original voxel, pad**3 padded voxels share it
            zero_term = torch.zeros_like(weight) if unregularised_where_tau2_zero else 1e3 * weight
            w = w + torch.where(t2s > 0, 1.0 / (self.pad**3 * t2s.clamp_min(1e-30)), zero_term)
            del t2s, zero_term
        w.masked_fill_(~inside, 0.0)
        del inside
        live = w > 0
        d = live.to(w.dtype)
        if not density_iterations(d, w.contiguous(), live, self._kernel(), n_iter_gridding):
            for _ in range(n_iter_gridding):
                conv = self._smooth(d * w)
                cmax = float(conv.max())
                floor = 1e-6 * cmax if cmax > 0 else 1.0
                # voxels without data keep d = 0, and voxels whose neighbourhood holds almost no weight keep
                # their d (dividing by the floor every iteration would grow d without bound there)
                small = conv <= floor
                d.div_(conv.masked_fill_(small, 1.0))
                del conv, small
                d.mul_(live)
        del w, live
        m = self.n if out_box is None else int(out_box)
        if m != self.n and (m % 2 or m > self.n or m // 2 <= self.r_max):
            raise ValueError(f"out_box {m}: must be even, at most {self.n} and hold r_max {self.r_max:.1f} (> 2·r_max)")
        npad = self.pad * m
        # the map's transform data·d, written straight into the inverse transform's layout
        # real space: centre at index 0 (FFT order); only the m voxels around it are kept, centre at m//2
        vol = _irfftn_window(half_to_rfft_layout(data, npad, scale=d), npad, m)
        del d, data, weight
        if m != self.n:
            vol = vol * (m / self.n) ** 3  # irfftn's 1/N³ with N = pad·m: the full map's values
        vol = gridding_correct(vol, self.pad)
        if mask_edge:
            # as RELION: zero beyond the box's inscribed sphere (soft edge of 3 original pixels inside it)
            edge = 3.0 * m / self.n
            vol = vol * torch.as_tensor(soft_sphere(m, m / 2 - edge, edge), device=vol.device, dtype=vol.dtype)
        return vol.to(torch.float32)


def _irfftn_window(ft: torch.Tensor, npad: int, m: int) -> torch.Tensor:
    """The m³ voxels around index 0 of ``torch.fft.irfftn(ft, s=(npad,) * 3)`` (FFT order), centred at m//2 (keep =
    −m//2 … m − m//2 − 1 mod npad on every axis). One axis at a time, each cut to its m kept voxels before the
    next is transformed: the inverse transforms along y and x then run on a half and a quarter of the lines
    (box 256, pad 2: about 1.1 s against 1.4–2.4 s for the whole transform, and no npad³ real map)."""
    lo, hi = m // 2, m - m // 2

    def window(v: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat([v.narrow(dim, npad - lo, lo), v.narrow(dim, 0, hi)], dim=dim)

    v = torch.fft.ifft(ft, dim=0)
    del ft
    # the two kept runs of z (−lo … −1, then 0 … hi − 1) go on separately, joined last as real maps
    return torch.cat([window(torch.fft.irfft(window(torch.fft.ifft(v[zs], dim=1), 1), n=npad, dim=2), 2)
                      for zs in (slice(npad - lo, npad), slice(0, hi))], dim=0)


def half_map_fsc(half1: BackProjector, half2: BackProjector, symmetry_ops: np.ndarray | None = None,
                 cropped: bool = False) -> np.ndarray:
    """FSC per shell (0 .. n//2, cycles per box) of the maps of two half sets, reconstructed without a prior.

    Unmasked (the box's inscribed sphere), so the solvent's noise counts: where
    it falls below 0.143, the FSC of the full set's map against the truth is
    near 0.5. Both back-projectors are finalised (no more insertions).
    ``cropped``: the maps reconstructed Fourier-cropped to the smallest even box that holds r_max plus 4 shells
    (``reconstruct(out_box=...)``; at box 256 and r_max 60 a 128³ map from a 256³ transform instead of a 256³
    map from a 512³ one); zero beyond it.
    """
    from spa3d.fourier.filters import fsc

    n = half1.n
    m = n if not cropped else min(n, 2 * (int(np.ceil(half1.r_max)) + 5))
    maps = [bp.reconstruct(symmetry_ops=symmetry_ops, out_box=m).cpu().numpy() for bp in (half1, half2)]
    curve = np.zeros(n // 2 + 1)
    if not all(np.abs(x).max() > 0 for x in maps):
        return curve
    c = np.asarray(fsc(maps[0], maps[1]), dtype=np.float64)[: m // 2 + 1]
    curve[: len(c)] = c
    return curve
