"""Local searches: each image scored only at rotations near its previous pose (RELION's --sigma_ang).

RELION's auto-refine switches to local searches once its angular sampling
reaches ``--auto_local_healpix_order`` (1.8°): a Gaussian prior of σ (twice
the sampling step) on the angle to the previous rotation, zero beyond 3σ
(ml_optimiser.cpp, updateAngularSampling; sampling.cpp,
selectOrientationsWithNonZeroPriorProbability). Every image has its own
neighbourhood, so the global search's shared GEMM (every image against every
rotation of the grid) would spend almost all of its work on rotations of
zero prior. Here each image is scored against its own rotations,
``A_prev · Δ_j`` for a fixed set of small rotations Δ_j (a cubic lattice of
rotation vectors, spacing the sampling step, inside the 3σ ball), in one
batched matrix product per chunk of images: exhaustive inside the
neighbourhood, so no coarse-to-fine pass is needed.

Conventions as :mod:`spa3d.inference.search`: half-plane Fourier pixels
inside a radius (cycles per box), translations in pixels moving the image by
+t, the posterior over (class, translation, rotation) of each image.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from spa3d.fourier.backprojector import BackProjector
from spa3d.fourier.projector import Projector
from spa3d.inference.likelihood import FourierPixels, residual_power, residual_power_terms
from spa3d.inference.search import BatchResult, _pixel_weights


def local_rotations(step_deg: float, sigma_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Small rotations Δ (J, 3, 3) and their angles (J,) in degrees: a lattice of ``step_deg`` inside 3σ.

    The rotation vectors lie on a cubic lattice of spacing ``step_deg``
    (nearest neighbours one step apart, as the HEALPix grid's), the identity
    included; J ≈ (4π/3)·(3σ/step)³ (905 for RELION's σ = 2 steps).
    """
    step = float(step_deg)
    m = int(np.floor(3 * sigma_deg / step + 1e-9))
    g = np.arange(-m, m + 1) * step
    v = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    ang = np.linalg.norm(v, axis=1)
    v = v[ang <= 3 * sigma_deg + 1e-9]
    return Rotation.from_rotvec(np.deg2rad(v)).as_matrix(), np.linalg.norm(v, axis=1)


def _rotation_angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between rotations a (..., 3, 3) and b (..., 3, 3) (broadcast)."""
    tr = (a * b).sum((-1, -2))
    return torch.rad2deg(torch.arccos(((tr - 1) / 2).clamp(-1, 1)))


def local_search_batch(x_full: torch.Tensor, ctf_full: torch.Tensor, old_offsets: torch.Tensor,
                       prior_rot: torch.Tensor, deltas: torch.Tensor, delta_deg: torch.Tensor,
                       translations: torch.Tensor, projectors: list[Projector], px: FourierPixels,
                       sigma2_shell: torch.Tensor, log_class_prior: torch.Tensor, offset_sigma_px: float,
                       sigma_ang: float, backprojectors: list[BackProjector] | None = None,
                       allowed_class: torch.Tensor | None = None, adaptive_fraction: float = 0.999,
                       half: torch.Tensor | None = None, chunk_bytes: int = 256 << 20) -> BatchResult:
    """E-step (and M-step sums) of one batch, searching each image's neighbourhood only.

    x_full (B, n, n//2+1): image FTs shifted by ``old_offsets`` (B, 2) pixels;
    ctf_full: CTF times the group scale; prior_rot (B, 3, 3): each image's
    previous rotation; deltas (J, 3, 3) with angles ``delta_deg`` (J,):
    the rotations searched are ``prior_rot[b] @ deltas[j]``, with a Gaussian
    prior of ``sigma_ang`` degrees on the angle; translations (T, 2) pixels
    with a Gaussian prior (``offset_sigma_px``) on the total offset;
    allowed_class (B,) restricts an image to one class (-1 any). The M-step
    sums of the (class, rotation) pairs that hold ``adaptive_fraction`` of an
    image's posterior go to ``backprojectors[k]`` (``[h·K + k]`` with
    ``half``), the posterior renormalised over them, as the global search does.
    """
    dev = x_full.device
    b_all = x_full.shape[0]
    k_cls = len(projectors)
    n_j, n_t = deltas.shape[0], translations.shape[0]
    xs, cs = px.take(x_full), px.take(ctf_full).to(torch.float32)
    w = _pixel_weights(px, sigma2_shell, False)
    phases = px.shift_phases(translations)  # (T, P)
    n_p = xs.shape[1]
    norm_x = ((xs.real**2 + xs.imag**2) * w).sum(1)
    total = old_offsets[:, None, :] + translations[None]
    prior_t = -(total**2).sum(-1) / (2 * max(offset_sigma_px, 1e-3) ** 2)  # (B, T)
    prior_r = -(delta_deg**2) / (2 * sigma_ang**2)  # (J,)
    allowed = allowed_class if allowed_class is not None else torch.full((b_all,), -1, device=dev, dtype=torch.long)
    nsh = int(px.shell.max()) + 1
    res_terms = torch.zeros((3, nsh), dtype=torch.float64, device=dev)
    out = {k: torch.zeros(b_all, device=dev) for k in ("pmax", "loge", "rot_spread", "trans_spread", "xa", "aa")}
    best_k = torch.zeros(b_all, dtype=torch.long, device=dev)
    best_rot = torch.zeros((b_all, 3, 3), device=dev)
    best_t = torch.zeros((b_all, 2), device=dev)
    class_post = torch.zeros((b_all, k_cls), device=dev)
    n_sig = torch.zeros(b_all, dtype=torch.long, device=dev)
    off_sq, flops, poses = 0.0, 0.0, 0.0
    # images per chunk: their projections (J, P complex) per class, and the M-step sums alike
    bc = int(max(1, min(b_all, chunk_bytes // max(1, 4 * 8 * n_j * n_p))))
    m = px.multiplicity.to(torch.float32)
    for s in range(0, b_all, bc):
        sl = slice(s, min(s + bc, b_all))
        nb = sl.stop - sl.start
        rots = torch.matmul(prior_rot[sl, None].to(torch.float32), deltas[None].to(torch.float32))  # (nb, J, 3, 3)
        xs_c, cs_c = xs[sl], cs[sl]
        xsh = xs_c[:, None, :] * phases[None]  # (nb, T, P): X·S_t
        a_ri = torch.view_as_real(xsh * (cs_c * w)[:, None, :]).reshape(nb, n_t, 2 * n_p)
        cw2 = (cs_c * cs_c * w)[:, None, :]  # (nb, 1, P)
        ll = torch.full((nb, k_cls, n_t, n_j), -torch.inf, device=dev)
        projs = {}
        for k in range(k_cls):
            rows = ((allowed[sl] < 0) | (allowed[sl] == k)).nonzero()[:, 0]
            if len(rows) == 0:
                continue
            pr = projectors[k].project_pixels(rots[rows].reshape(-1, 3, 3), px.kx, px.ky).reshape(len(rows), n_j, n_p)
            cross = torch.bmm(a_ri[rows], torch.view_as_real(pr).reshape(len(rows), n_j, 2 * n_p).transpose(1, 2))
            power = torch.bmm(cw2[rows], (pr.real**2 + pr.imag**2).transpose(1, 2))  # (r, 1, J)
            ll[rows, k] = (cross - 0.5 * power - 0.5 * norm_x[sl][rows, None, None] + prior_t[sl][rows, :, None]
                           + prior_r[None, None, :] + log_class_prior[k])
            projs[k] = (rows, pr)
            flops += len(rows) * (2.0 * n_t * 2 * n_p * n_j + 2.0 * n_p * n_j)
            poses += float(len(rows) * n_t * n_j)
        flat = ll.reshape(nb, -1)
        lse = torch.logsumexp(flat, 1)
        post = torch.exp(flat - lse[:, None]).reshape(nb, k_cls, n_t, n_j)
        top = flat.argmax(1)
        kb, tb, jb = top // (n_t * n_j), (top // n_j) % n_t, top % n_j
        ar = torch.arange(nb, device=dev)
        out["pmax"][sl] = post.reshape(nb, -1)[ar, top]
        out["loge"][sl] = lse
        best_k[sl], best_t[sl], best_rot[sl] = kb, translations[tb], rots[ar, jb]
        class_post[sl] = post.sum((2, 3))
        # posterior spreads around the best pose
        ang = _rotation_angle(deltas[None].to(torch.float32), deltas[jb][:, None].to(torch.float32))  # (nb, J)
        p_rot = post.sum((1, 2))  # (nb, J)
        p_t = post.sum((1, 3))  # (nb, T)
        out["rot_spread"][sl] = (p_rot * ang**2).sum(1).sqrt()
        out["trans_spread"][sl] = (p_t * ((translations[None] - translations[tb][:, None]) ** 2).sum(-1)).sum(1).sqrt()
        off_sq += float((p_t * (total[sl] ** 2).sum(-1)).sum())
        # the (class, rotation) pairs that hold adaptive_fraction of each image's posterior
        pkj = post.sum(2).reshape(nb, -1)  # (nb, K·J)
        srt, order = torch.sort(pkj, 1, descending=True)
        keep_sorted = (torch.cumsum(srt, 1) - srt) < adaptive_fraction
        keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
        covered = (pkj * keep).sum(1).clamp_min(1e-30)
        n_sig[sl] = keep.sum(1)
        post = post * keep.reshape(nb, k_cls, 1, n_j) / covered[:, None, None, None]
        for k, (rows, pr) in projs.items():
            pk = post[rows, k]  # (r, T, J)
            sel = keep.reshape(nb, k_cls, n_j)[rows, k].nonzero()  # (U, 2): (row, j)
            if len(sel) == 0:
                continue
            r_i, j_i = sel[:, 0], sel[:, 1]
            # Σ_t p·X·S_t, then × C: the posterior-weighted image of each kept (image, rotation)
            data = torch.bmm(pk.transpose(1, 2).to(torch.complex64), xsh[rows])[r_i, j_i] * cs_c[rows][r_i]
            wsum = pk.sum(1)[r_i, j_i]
            weight = wsum[:, None] * (cs_c[rows][r_i] ** 2)
            res_terms += residual_power_terms(px, xs_c[rows] if k == min(projs) else xs_c[:0], data, weight,
                                              pr[r_i, j_i])
            flops += len(rows) * 8.0 * n_j * n_t * n_p
            if backprojectors is not None:
                dest = k if half is None else None
                if dest is not None:
                    backprojectors[dest].insert_pixels(data, weight, rots[rows][r_i, j_i], px.kx, px.ky)
                else:
                    hh = half[sl][rows][r_i]
                    for h in (0, 1):
                        u = (hh == h).nonzero()[:, 0]
                        if len(u):
                            backprojectors[h * k_cls + k].insert_pixels(data[u], weight[u], rots[rows][r_i[u], j_i[u]],
                                                                         px.kx, px.ky)
            # group-scale statistics at the best pose
            mine = (kb[rows] == k)
            if mine.any():
                rb = rows[mine]
                pb = pr[mine.nonzero()[:, 0], jb[rb]]
                cp = cs_c[rb] * pb
                xb = xsh[rb, tb[rb]]
                out["xa"][sl][rb] = ((xb.real * cp.real + xb.imag * cp.imag) * m).sum(1)
                out["aa"][sl][rb] = ((cp.real**2 + cp.imag**2) * m).sum(1)
    pix_shell = torch.zeros(nsh, dtype=torch.float64, device=dev).index_add_(0, px.shell, m.double() * b_all)
    return BatchResult(best_k.cpu().numpy(), best_rot.cpu().numpy(), best_t.cpu().numpy(), out["pmax"].cpu().numpy(),
                       n_sig.cpu().numpy(), out["loge"].cpu().numpy(), class_post.cpu().numpy(),
                       out["rot_spread"].cpu().numpy(), out["trans_spread"].cpu().numpy(), off_sq,
                       residual_power(res_terms).cpu().numpy(), pix_shell.cpu().numpy(), out["xa"].cpu().numpy(),
                       out["aa"].cpu().numpy(), flops, poses, res_terms.cpu().numpy())
