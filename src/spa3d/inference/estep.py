"""Expectation and accumulation for one batch of images against K references.

For each image the posterior over (class k, translation t, rotation r) is

    p(k, t, r | X) ∝ π_k · exp(−|t|²/(2σ_off²)) · L(X | k, t, r)

with L the Gaussian likelihood of :mod:`spa3d.inference.likelihood`. The
posterior-weighted, CTF-multiplied, shifted images are summed per rotation
(a GEMM) and inserted into each class's back-projector; the residuals of the
best pose feed the noise spectrum σ² per shell.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spa3d.fourier.backprojector import BackProjector
from spa3d.inference.likelihood import FourierPixels, log_likelihoods, residual_power, residual_power_terms


@dataclass
class BatchPosterior:
    """Per-image summary of the posterior (arrays of length B)."""

    best_class: np.ndarray
    best_rotation: np.ndarray  # index into the rotation grid
    best_translation: np.ndarray  # index into the translation grid
    max_posterior: np.ndarray
    n_significant: np.ndarray
    log_evidence: np.ndarray
    class_posterior: np.ndarray  # (B, K)
    residual_power: np.ndarray  # (n_shells,) Σ p·m·|X S − C P|² over every pose (posterior-weighted), summed over images
    pixel_count: np.ndarray  # (n_shells,) pixels per shell summed over images


def expectation(x: torch.Tensor, ctf: torch.Tensor, px: FourierPixels, sigma2: torch.Tensor,
                refs: list[torch.Tensor], log_class_prior: np.ndarray, rotations: torch.Tensor,
                translations: torch.Tensor, offset_sigma_px: float,
                backprojectors: list[BackProjector] | None = None, rot_chunk: int = 2048,
                significant: float = 1e-3, residual: bool = False) -> BatchPosterior:
    """E-step (and M-step accumulation when ``backprojectors`` are given) for one batch.

    x: (B, P) image pixels; ctf: (B, P); sigma2: (P,) noise power per pixel;
    refs: K tensors (R, P) of reference projections; rotations: (R, 3, 3);
    translations: (T, 2) pixels (images are shifted by +t).
    With ``residual`` the back-projectors receive the residuals Σ p·CTF·(x − CTF·ref) instead of
    Σ p·CTF·x (RELION's SGD gradient), with the same weights Σ p·CTF².
    """
    b = x.shape[0]
    k_cls = len(refs)
    weights = px.multiplicity.to(sigma2.dtype) / sigma2
    phases = px.shift_phases(translations.to(torch.float32))
    log_prior_t = -(translations**2).sum(1).to(torch.float32) / (2 * max(offset_sigma_px, 1e-3) ** 2)
    r_all = rotations.shape[0]
    # pass 1: log-likelihoods, kept per class as (B, T, R)
    lls = []
    for k in range(k_cls):
        chunks = [log_likelihoods(x, ctf, weights, refs[k][s:s + rot_chunk], phases) for s in range(0, r_all, rot_chunk)]
        ll = torch.cat(chunks, dim=2) + log_prior_t[None, :, None] + float(log_class_prior[k])
        lls.append(ll)
    ll = torch.stack(lls, dim=1)  # (B, K, T, R)
    flat = ll.reshape(b, -1)
    mx = flat.max(1, keepdim=True).values
    post = torch.exp(flat - mx)
    z = post.sum(1, keepdim=True)
    post = (post / z).reshape(ll.shape)
    log_evidence = (mx[:, 0] + torch.log(z[:, 0])).cpu().numpy()
    pflat = post.reshape(b, -1)
    pmax, arg = pflat.max(1)
    n_t = translations.shape[0]
    best_k = arg // (n_t * r_all)
    best_t = (arg // r_all) % n_t
    best_r = arg % r_all
    n_sig = (pflat > significant * pmax[:, None]).sum(1)
    nsh = int(px.shell.max()) + 1
    count = torch.zeros(nsh, dtype=torch.float64, device=x.device).index_add_(
        0, px.shell, px.multiplicity.double() * b)
    # the posterior-weighted residuals of every pose (the noise power's statistics) and the M-step sums
    res_terms = torch.zeros((3, nsh), dtype=torch.float64, device=x.device)
    cxs = ((x[:, None, :] * phases[None]) * ctf[:, None, :]).reshape(b * n_t, -1)  # (B·T, P)
    c2 = ctf * ctf
    x_term = x  # the images' power enters the residual sum once
    for k in range(k_cls):
        pk = post[:, k]  # (B, T, R)
        mass = pk.sum((0, 1))
        keep = (mass > 1e-6 * max(float(mass.max()), 1e-30)).nonzero()[:, 0]
        if len(keep) == 0:
            continue
        pr = pk[:, :, keep].reshape(b * n_t, -1).T  # (R', BT)
        data = torch.complex(pr @ cxs.real, pr @ cxs.imag)  # (R', P)
        wsum = pk[:, :, keep].sum(1).T @ c2  # (R', P)
        res_terms += residual_power_terms(px, x_term, data, wsum, refs[k][keep])
        x_term = x[:0]
        if backprojectors is not None:
            if residual:
                data = data - wsum * refs[k][keep]
            backprojectors[k].insert_pixels(data, wsum, rotations[keep], px.kx, px.ky)
    return BatchPosterior(best_k.cpu().numpy(), best_r.cpu().numpy(), best_t.cpu().numpy(), pmax.cpu().numpy(),
                          n_sig.cpu().numpy(), log_evidence, post.sum((2, 3)).cpu().numpy(), residual_power(res_terms).cpu().numpy(),
                          count.cpu().numpy())
