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

    def t(x):
        return torch.as_tensor(np.asarray(x, dtype=np.float64), device=device)[:, None, None]

    kx, ky = half_plane_freqs(box, device=device, dtype=torch.float64)
    # (the phase reaches ~10² rad at Nyquist; float64 keeps it exact to RELION's double precision)
    kx = kx / (box * pixel_size)
    ky = ky / (box * pixel_size)
    k2 = kx**2 + ky**2
    lam = np.asarray(wavelength_angstrom(p.voltage), dtype=np.float64)
    q0 = np.clip(np.asarray(p.amplitude_contrast, dtype=np.float64), 0, 0.999999)
    u, v = np.asarray(p.defocus_u, dtype=np.float64), np.asarray(p.defocus_v, dtype=np.float64)
    azimuth = np.deg2rad(np.asarray(p.defocus_angle, dtype=np.float64))
    # per image: γ = k²·(a + b·cos 2α + c·sin 2α) − e·k⁴ + φ0, with α the pixel's azimuth: the astigmatic
    # defocus (U+V)/2 + (U−V)/2·cos(2(α − angle)) expanded, so the per-pixel work is multiply-adds and one sine
    ang = torch.atan2(ky, kx)
    cos2a, sin2a = torch.cos(2 * ang), torch.sin(2 * ang)
    a = t(np.pi * lam * 0.5 * (u + v))
    b = t(np.pi * lam * 0.5 * (u - v) * np.cos(2 * azimuth))
    c = t(np.pi * lam * 0.5 * (u - v) * np.sin(2 * azimuth))
    e = t(0.5 * np.pi * np.asarray(p.cs, dtype=np.float64) * 1e7 * lam**3)
    phi0 = t(np.deg2rad(np.asarray(p.phase_shift, dtype=np.float64)) + np.arctan(q0 / np.sqrt(1 - q0**2)))
    gamma = b * cos2a
    gamma.addcmul_(c.expand_as(gamma), sin2a.expand_as(gamma)).add_(a).mul_(k2)
    gamma.addcmul_(-e.expand_as(gamma), (k2 * k2).expand_as(gamma)).add_(phi0)
    ctf = torch.sin(gamma) if intact_first_peak else gamma.sin_()
    if intact_first_peak:
        ctf = torch.where(gamma.abs() < torch.pi / 2, torch.ones_like(ctf), ctf)
    bfac = np.asarray(p.bfactor, dtype=np.float64)
    if np.any(bfac != 0):
        ctf = ctf * torch.exp(-t(bfac) * k2 / 4)
    if phase_flipped:
        ctf = ctf.abs()
    scale = np.asarray(p.scale, dtype=np.float64)
    if np.any(scale != 1):
        ctf = ctf * t(scale)
    return ctf.to(dtype)
