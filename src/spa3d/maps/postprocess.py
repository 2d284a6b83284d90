"""Solvent masks and post-processing of two half maps (relion_mask_create, relion_postprocess).

Conventions: maps (n, n, n) in (z, y, x) order; shells in cycles per box
(shell i is n·pixel/i Å), rounded to the nearest integer radius as RELION
rounds them; B-factors in Å² (negative sharpens); lengths in pixels where
named ``_px``, resolutions in Å.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from spa3d.fourier.filters import fsc, lowpass_shells


def create_mask(vol: np.ndarray, pixel_size: float, lowpass_a: float | None, threshold: float,
                extend_px: float, soft_edge_px: float, invert: bool = False) -> np.ndarray:
    """A soft solvent mask (0..1) from a map, as relion_mask_create.

    The map is low-passed to ``lowpass_a`` Å as RELION does (skipped when None or <= 0),
    thresholded (voxels >= ``threshold`` are 1), the binary mask is extended
    by ``extend_px`` pixels (voxels closer than that to a 1 become 1; a
    negative value shrinks it the same way) and given a raised-cosine edge of
    ``soft_edge_px`` pixels (0.5 + 0.5·cos(π·d/width) at distance d < width).
    """
    v = np.asarray(vol, dtype=np.float32)
    if lowpass_a and lowpass_a > 0:
        v = lowpass_shells(v, pixel_size, lowpass_a)
    binary = v >= threshold
    if extend_px > 0:
        binary |= ndimage.distance_transform_edt(~binary) < extend_px
    elif extend_px < 0:
        binary &= ~(ndimage.distance_transform_edt(binary) < -extend_px)
    mask = binary.astype(np.float32)
    if soft_edge_px > 0:
        d = ndimage.distance_transform_edt(~binary)
        edge = (~binary) & (d < soft_edge_px)
        mask[edge] = 0.5 + 0.5 * np.cos(np.pi * d[edge] / soft_edge_px)
    if invert:
        mask = 1.0 - mask
    return mask


def _shells(n: int) -> np.ndarray:
    """Rounded radius (cycles per box) of every voxel of an n³ rfftn."""
    f = np.fft.fftfreq(n, 1.0 / n)
    fx = np.fft.rfftfreq(n, 1.0 / n)
    r = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2)
    return np.round(r).astype(int)


def randomize_phases_beyond(vol: np.ndarray, shell: int, rng: np.random.Generator) -> np.ndarray:
    """The map with the phases of every Fourier component from ``shell`` on (radius >= shell) made random."""
    ft = np.fft.rfftn(vol.astype(np.float64))
    n = vol.shape[0]
    f = np.fft.fftfreq(n, 1.0 / n)
    fx = np.fft.rfftfreq(n, 1.0 / n)
    r2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2
    sel = r2 >= shell * shell
    ft[sel] = np.abs(ft[sel]) * np.exp(2j * np.pi * rng.random(int(sel.sum())))
    return np.fft.irfftn(ft, s=vol.shape, axes=(0, 1, 2)).astype(np.float32)


def fit_line(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float, float]:
    """Weighted least-squares line y = slope·x + intercept: (slope, intercept, r²), as RELION's fitStraightLine."""
    sw = w.sum()
    if sw <= 0 or (w > 0).sum() < 2:
        return 0.0, 0.0, 0.0
    mx, my = (w * x).sum() / sw, (w * y).sum() / sw
    sxx = (w * (x - mx) ** 2).sum()
    sxy = (w * (x - mx) * (y - my)).sum()
    syy = (w * (y - my) ** 2).sum()
    slope = sxy / sxx if sxx > 0 else 0.0
    corr = sxy**2 / (sxx * syy) if sxx > 0 and syy > 0 else 0.0
    return float(slope), float(my - slope * mx), float(corr)


def guinier(ft: np.ndarray, shells: np.ndarray, n: int, pixel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """(1/d² in Å⁻², ln of the mean |F| per shell) for shells 0 .. n/2 (−99 where the shell is empty).

    ``ft`` is an unnormalised rfftn; |F| is taken over n³ as RELION's transforms are normalised.
    """
    nsh = n // 2 + 1
    keep = shells < nsh
    s = np.bincount(shells[keep], weights=np.abs(ft[keep]) / float(n) ** 3, minlength=nsh)
    c = np.bincount(shells[keep], minlength=nsh)
    mean = s / np.maximum(c, 1)
    return (np.arange(nsh) / (n * pixel_size)) ** 2, np.where(mean > 0, np.log(np.maximum(mean, 1e-300)), -99.0)


@dataclass
class PostprocessResult:
    """What :func:`postprocess` measured and made; FSC curves per shell 0 .. n/2."""

    fsc_unmasked: np.ndarray
    fsc_masked: np.ndarray | None
    fsc_random_masked: np.ndarray | None
    fsc_corrected: np.ndarray  # RELION's FSC_true (the masked FSC corrected by phase randomisation)
    randomize_at: int  # shell beyond which the phases were randomised (-1 without a mask)
    resolution: float  # Å, where the corrected FSC falls below 0.143
    resolution_shell: int
    bfactor: float  # Å², the one applied (negative sharpens)
    fit_slope: float
    fit_intercept: float
    fit_corr: float
    guinier_x: np.ndarray  # 1/d² per shell 0 .. n/2
    guinier_original: np.ndarray
    guinier_weighted: np.ndarray
    guinier_sharpened: np.ndarray
    sharpened: np.ndarray  # the average of the halves, FSC-weighted, sharpened (and low-passed if asked)
    unmasked_used: bool = False  # the masked FSC fell short of the unmasked one: the unmasked curve was used


def last_shell_above(curve: np.ndarray, threshold: float) -> int:
    """The last shell before ``curve`` first falls below ``threshold`` (RELION's loop; 0 if shell 0 already does)."""
    last = 0
    for i, v in enumerate(curve):
        if v < threshold:
            break
        last = i
    return last


def postprocess(half1: np.ndarray, half2: np.ndarray, pixel_size: float, mask: np.ndarray | None = None,
                autob_lowres: float = 10.0, autob_highres: float = 0.0, adhoc_bfac: float = 0.0,
                randomize_at_fsc: float = 0.8, randomize_at_a: float = -1.0, low_pass: float = 0.0,
                fsc_weighting: bool = True, mtf: tuple[np.ndarray, np.ndarray] | None = None,
                mtf_pixel_size: float | None = None, seed: int = 0) -> PostprocessResult:
    """relion_postprocess on two half maps.

    1. FSC of the unmasked halves; with a ``mask``: FSC of the masked halves,
       and of the masked halves with their phases randomised beyond the shell
       where the unmasked FSC first falls below ``randomize_at_fsc`` (or
       beyond ``randomize_at_a`` Å); the corrected FSC is
       (FSC_masked − FSC_random)/(1 − FSC_random) from two shells beyond the
       randomisation on, the masked FSC before (Chen et al. 2013). Where the
       unmasked FSC reaches further than the corrected one, the unmasked is
       used (as RELION does without --force_mask).
    2. Resolution: the last shell before the corrected FSC falls below 0.143.
    3. The halves' average, divided by the detector's MTF (``mtf``:
       (frequency in 1/pixel of the micrographs at ``mtf_pixel_size`` Å, MTF)),
       weighted by sqrt(2·FSC/(1 + FSC)) up to where the FSC falls below 1e-4
       (zero beyond; Rosenthal & Henderson 2003), then sharpened by
       exp(−B/4·s²) with B = 4 × the slope of ln|F| against 1/d² fitted from
       ``autob_lowres`` Å to ``autob_highres`` Å (to Nyquist when 0, over the
       shells the FSC weighting left non-zero, as RELION 3.1), or
       by ``adhoc_bfac``; low-passed at ``low_pass`` Å (the resolution when
       negative; not when 0).
    """
    n = half1.shape[0]
    h1, h2 = np.asarray(half1, np.float32), np.asarray(half2, np.float32)
    fsc_unmasked = np.asarray(fsc(h1, h2))
    fsc_unmasked[0] = 1.0 if fsc_unmasked[0] <= 0 else fsc_unmasked[0]
    fsc_masked = fsc_random = None
    randomize_at = -1
    unmasked_used = False
    if mask is not None:
        fsc_masked = np.asarray(fsc(h1 * mask, h2 * mask))
        if randomize_at_a > 0:
            randomize_at = int(pixel_size * n / randomize_at_a)
        else:
            below = [i for i in range(1, len(fsc_unmasked)) if fsc_unmasked[i] < randomize_at_fsc]
            if not below:
                raise ValueError(f"the unmasked FSC never falls below {randomize_at_fsc}: phases cannot be randomised")
            randomize_at = below[0]
        rng = np.random.default_rng(seed)
        r1 = randomize_phases_beyond(h1, randomize_at, rng) * mask
        r2 = randomize_phases_beyond(h2, randomize_at, rng) * mask
        fsc_random = np.asarray(fsc(r1, r2))
        for c in (fsc_masked, fsc_random):
            if c[0] <= 0:
                c[0] = 1.0
        i = np.arange(len(fsc_masked))
        with np.errstate(divide="ignore", invalid="ignore"):
            corrected = np.where(i < randomize_at + 2, fsc_masked, (fsc_masked - fsc_random) / (1 - fsc_random))
        corrected = np.nan_to_num(corrected)
        if last_shell_above(fsc_unmasked, 0.143) > last_shell_above(corrected, 0.143):
            corrected, unmasked_used = fsc_unmasked.copy(), True
    else:
        corrected = fsc_unmasked.copy()
    res_shell = last_shell_above(corrected, 0.143)
    resolution = n * pixel_size / res_shell if res_shell > 0 else 999.0

    ft = np.fft.rfftn(0.5 * (h1.astype(np.float64) + h2))
    shells = _shells(n)
    s2 = (np.sqrt(np.fft.fftfreq(n)[:, None, None] ** 2 + np.fft.fftfreq(n)[None, :, None] ** 2
                  + np.fft.rfftfreq(n)[None, None, :] ** 2) / pixel_size) ** 2  # (1/Å)²
    gx, g_orig = guinier(ft, shells, n, pixel_size)
    if mtf is not None and mtf_pixel_size:
        f_mtf = np.sqrt(s2) * mtf_pixel_size  # 1/pixel of the micrographs
        ft = ft / np.clip(np.interp(f_mtf, mtf[0], mtf[1]), 1e-2, None)
    if fsc_weighting:
        ires_max = last_shell_above(corrected, 1e-4)
        c = np.clip(corrected, 0, None)
        weight = np.sqrt(2 * c / (1 + c))
        weight[ires_max + 1:] = 0.0
        ft = ft * weight[np.minimum(shells, len(weight) - 1)] * (shells <= ires_max)
    _, g_weighted = guinier(ft, shells, n, pixel_size)
    slope = intercept = corr = 0.0
    if adhoc_bfac:
        bfactor = float(adhoc_bfac)
    else:
        highres = autob_highres if autob_highres > 0 else 0.0  # RELION 3.1: to Nyquist by default
        with np.errstate(divide="ignore"):
            d = 1 / np.sqrt(gx)
        w = ((d <= autob_lowres) & (d >= highres) & (g_weighted > -99)).astype(float)
        slope, intercept, corr = fit_line(gx, g_weighted, w)
        bfactor = 4 * slope
    if bfactor:
        ft = ft * np.exp(-bfactor / 4 * s2)
    _, g_sharp = guinier(ft, shells, n, pixel_size)
    if low_pass:
        cut = resolution if low_pass < 0 else low_pass
        out = lowpass_shells(np.fft.irfftn(ft, s=h1.shape, axes=(0, 1, 2)), pixel_size, cut)
    else:
        out = np.fft.irfftn(ft, s=h1.shape, axes=(0, 1, 2)).astype(np.float32)
    return PostprocessResult(fsc_unmasked, fsc_masked, fsc_random, corrected, randomize_at, resolution, res_shell,
                             bfactor, slope, intercept, corr, gx, g_orig, g_weighted, g_sharp, out, unmasked_used)
