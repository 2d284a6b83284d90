"""The contrast transfer function exactly as RELION 3.1 computes it.

With the spatial frequency k in 1/Å, the electron wavelength λ in Å,
defocus Δf(α) = (U+V)/2 + (U−V)/2·cos(2(α − angle)) in Å (positive =
underfocus), Cs in Å, amplitude contrast Q0 and phase shift φ:

    γ(k) = π·λ·Δf·k² − (π/2)·Cs·λ³·k⁴ + φ + atan(Q0 / √(1 − Q0²))
    CTF(k) = scale · sin(γ(k)) · exp(−B·k²/4)

so the CTF is positive at low frequency (positive-density maps keep positive
contrast). ``intact_first_peak`` sets the CTF to 1 while |γ| < π/2;
``phase_flipped`` returns |CTF| (for images already multiplied by sign(CTF)).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from spa3d.fourier.grid import half_plane_freqs


def wavelength_angstrom(voltage_kv: float | np.ndarray) -> np.ndarray:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(v * (1 + 0.978466e-6 * v))


@dataclass
class CtfParams:
    """Per-particle CTF parameters (arrays of length B).

    defocus_u, defocus_v: Å; defocus_angle: degrees; voltage: kV; cs: mm;
    amplitude_contrast: fraction; bfactor: Å²; scale; phase_shift: degrees.
    """

    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    voltage: np.ndarray
    cs: np.ndarray
    amplitude_contrast: np.ndarray
    bfactor: np.ndarray
    scale: np.ndarray
    phase_shift: np.ndarray

    def __len__(self) -> int:
        return len(self.defocus_u)

    def subset(self, idx) -> "CtfParams":
        return CtfParams(*(np.asarray(getattr(self, f))[idx] for f in self.__dataclass_fields__))


@functools.lru_cache(maxsize=8)
def _phase_basis(box: int, pixel_size: float, device: torch.device) -> torch.Tensor:
    """Per half-plane pixel (5, box·(box//2+1)), float64: k², k²·cos 2α, k²·sin 2α, k⁴ and 1 (k in 1/Å, α its
    azimuth): γ of every image is one product of its 5 coefficients with these rows."""
    kx, ky = half_plane_freqs(box, device=device, dtype=torch.float64)
    kx = kx / (box * pixel_size)
    ky = ky / (box * pixel_size)
    k2 = kx**2 + ky**2
    ang = torch.atan2(ky, kx)
    rows = [k2, k2 * torch.cos(2 * ang), k2 * torch.sin(2 * ang), k2 * k2, torch.ones_like(k2)]
    return torch.stack([r.reshape(-1) for r in rows])


def ctf_half_plane(
    p: CtfParams,
    box: int,
    pixel_size: float,
    device=None,
    dtype=torch.float32,
    intact_first_peak: bool = False,
    phase_flipped: bool = False,
) -> torch.Tensor:
    """CTF images (B, box, box//2+1) in the half-plane layout of :mod:`spa3d.fourier.grid`."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    lam = np.asarray(wavelength_angstrom(p.voltage), dtype=np.float64)
    q0 = np.clip(np.asarray(p.amplitude_contrast, dtype=np.float64), 0, 0.999999)
    u, v = np.asarray(p.defocus_u, dtype=np.float64), np.asarray(p.defocus_v, dtype=np.float64)
    azimuth = np.deg2rad(np.asarray(p.defocus_angle, dtype=np.float64))
    # per image: γ = k²·(a + b·cos 2α + c·sin 2α) − e·k⁴ + φ0, with α the pixel's azimuth: the astigmatic
    # defocus (U+V)/2 + (U−V)/2·cos(2(α − angle)) expanded, so γ for all pixels is one (B, 5) × (5, P) product.
    # In float64 (the phase reaches ~10³ rad at box 256, 0.5 Å/px; RELION computes it in double), in turns
    # (γ/2π), so that the sine's argument is reduced exactly before it is taken.
    b = len(u)
    coef = np.empty((b, 5))
    coef[:, 0] = np.pi * lam * 0.5 * (u + v)
    coef[:, 1] = np.pi * lam * 0.5 * (u - v) * np.cos(2 * azimuth)
    coef[:, 2] = np.pi * lam * 0.5 * (u - v) * np.sin(2 * azimuth)
    coef[:, 3] = -0.5 * np.pi * np.asarray(p.cs, dtype=np.float64) * 1e7 * lam**3
    coef[:, 4] = np.deg2rad(np.asarray(p.phase_shift, dtype=np.float64)) + np.arctan(q0 / np.sqrt(1 - q0**2))
    basis = _phase_basis(int(box), float(pixel_size), device)
    turns = torch.as_tensor(coef / (2 * np.pi), device=device) @ basis  # (B, P) float64
    first_peak = turns.abs() < 0.25 if intact_first_peak else None
    # the sine of the fractional turn (|x| < 1): a float32 CTF takes it in float32, the same values to 4e-7
    # (where torch's float64 sine took 30× longer: 0.25 s per 64 images at box 256); a float64 CTF in float64
    frac = turns.frac_()
    if dtype == torch.float64:
        ctf = frac.mul_(2 * np.pi).sin_()
    else:
        ctf = frac.to(torch.float32).mul_(2 * np.pi).sin_()
    del turns, frac
    if intact_first_peak:
        ctf = torch.where(first_peak, torch.ones_like(ctf), ctf)
    bfac = np.asarray(p.bfactor, dtype=np.float64)
    if np.any(bfac != 0):
        k2 = basis[0].to(ctf.dtype)
        ctf = ctf * torch.exp(-torch.as_tensor(bfac, device=device, dtype=ctf.dtype)[:, None] * k2 / 4)
    if phase_flipped:
        ctf = ctf.abs()
    scale = np.asarray(p.scale, dtype=np.float64)
    if np.any(scale != 1):
        ctf = ctf * torch.as_tensor(scale, device=device, dtype=ctf.dtype)[:, None]
    return ctf.to(dtype).reshape(b, box, box // 2 + 1)
