"""Centred FFTs and frequency grids.

Real-space arrays are centred at index ``n // 2``. Images use the half-plane
(rfft) layout: shape (n, n // 2 + 1), ky in FFT order (0, 1, ..., -1) along
dim -2 and kx = 0 .. n/2 along dim -1. Frequencies are in cycles per box
(integers); divide by ``n * pixel_size`` for 1/Å.
"""

from __future__ import annotations

import torch


def rfft2_centered(images: torch.Tensor) -> torch.Tensor:
    """Half-plane FT (..., n, n//2+1) of images (..., n, n) centred at n//2."""
    return torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))


def irfft2_centered(ft: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`rfft2_centered`: images (..., n, n) centred at n//2."""
    return torch.fft.fftshift(torch.fft.irfft2(ft, s=(n, n)), dim=(-2, -1))


def fftn_centered(vol: torch.Tensor) -> torch.Tensor:
    """Full 3D FT with the zero frequency at index n//2 on every axis."""
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(vol)))


def ifftn_centered(ft: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fftn_centered` (real part)."""
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(ft))).real


def half_plane_freqs(n: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(kx, ky) grids of shape (n, n//2+1), in cycles per box."""
    ky = torch.fft.fftfreq(n, d=1.0 / n, device=device, dtype=dtype)
    kx = torch.fft.rfftfreq(n, d=1.0 / n, device=device, dtype=dtype)
    return kx[None, :].expand(n, -1), ky[:, None].expand(-1, n // 2 + 1)


def half_plane_radius(n: int, device=None) -> torch.Tensor:
    """Radius in cycles per box of every half-plane pixel, shape (n, n//2+1)."""
    kx, ky = half_plane_freqs(n, device=device)
    return torch.sqrt(kx**2 + ky**2)


def _shift_factors(n: int, shifts_px: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The separable phase factors exp(−2πi·s_x·kx/n) (B, 1, n//2+1) and exp(−2πi·s_y·ky/n) (B, n, 1)."""
    kx, ky = half_plane_freqs(n, device=shifts_px.device, dtype=shifts_px.dtype)
    ax = -2 * torch.pi / n * shifts_px[:, 0, None, None] * kx[:1, :]
    ay = -2 * torch.pi / n * shifts_px[:, 1, None, None] * ky[:, :1]
    return torch.polar(torch.ones_like(ax), ax), torch.polar(torch.ones_like(ay), ay)


def phase_shift_2d(n: int, shifts_px: torch.Tensor) -> torch.Tensor:
    """Phase factors (B, n, n//2+1) that shift images by ``shifts_px`` (B, 2) = (x, y) pixels.

    Multiplying a half-plane FT by these moves the image content by +shift
    (towards larger x and y indices).
    """
    ex, ey = _shift_factors(n, shifts_px)
    return ex * ey


def shift_half_plane(ft: torch.Tensor, shifts_px, inplace: bool = False) -> torch.Tensor:
    """Half-plane FTs (B, n, n//2+1) moved by ``shifts_px`` (B, 2) = (x, y) pixels: ``ft · phase_shift_2d``.

    The factors are formed in float64 per row and column (the shift is separable) and applied in ``ft``'s
    precision, which is 2n instead of n²/2 complex exponentials per image. ``inplace``: ``ft`` is overwritten
    (and returned). A shift by n/2 on both axes is what :func:`rfft2_centered`'s ifftshift does to the
    transform, so ``shift_half_plane(torch.fft.rfft2(x), s - n/2)`` equals
    ``shift_half_plane(rfft2_centered(x), s)`` without the shifted copy of the images.
    """
    s = torch.as_tensor(shifts_px, device=ft.device, dtype=torch.float64)
    ex, ey = _shift_factors(ft.shape[-2], s)
    if inplace:
        return ft.mul_(ex.to(ft.dtype)).mul_(ey.to(ft.dtype))
    return ft * ex.to(ft.dtype) * ey.to(ft.dtype)
