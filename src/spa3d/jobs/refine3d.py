"""``spa3d refine3d``: gold-standard 3D auto-refinement (RELION 3.1's Refine3D job).

As ``relion_refine --auto_refine --split_random_halves`` (ml_optimiser.cpp,
ml_optimiser_mpi.cpp; shared/docs/relion_spec.md for the model):

- The particles are split into two random half sets (rlnRandomSubset where
  the STAR file has it, else at random with the seed). Each half is aligned
  against, and reconstructs, its own map: the two maps never see each
  other's particles, so their FSC measures the resolution honestly.
- Every iteration: the E-step of :mod:`spa3d.jobs.class3d` (coarse-to-fine
  global searches, then local searches), with each particle restricted to its
  half's map; the M-step reconstructs each half with a prior τ² taken from
  the half maps' FSC (SSNR = FSC/(1 − FSC), times ``tau2_fudge``), re-estimates
  the noise power σ² (posterior-weighted residuals, both halves), the offset
  prior and the group scales.
- Resolution: the last shell where the half maps' FSC is at least 0.5 (where
  RELION's data-vs-prior of a half map falls below 1); the next E-step reaches
  ``incr_size`` shells beyond it, or a quarter of the box's radius while the
  FSC at the E-step's limit is above 0.2 and ⟨Pmax⟩ above 0.1.
- Sampling (RELION's updateAngularSampling): once the resolution has not
  improved for an iteration and the poses have stopped changing much, the
  HEALPix order goes up by one (the angular step halves) and the offset step
  and range follow the estimated accuracy and the last changes of the
  offsets; from ``auto_local_healpix_order`` (1.8°) on, searches are local:
  a Gaussian prior of σ = 2 steps around each particle's previous rotation
  (:mod:`spa3d.inference.local_search`).
- Convergence: when the sampling is finer than 75 % of the estimated
  rotational accuracy and neither the resolution nor the poses change, one
  last iteration uses all frequencies to Nyquist, joins the halves and
  writes the final maps.

Outputs (RELION's names): every iteration run_itNNN_half1_class001.mrc,
run_itNNN_half2_class001.mrc, run_itNNN_half1_model.star (with the FSC),
run_itNNN_data.star, run_itNNN_optimiser.star (and run_itNNN_state.npz, for
``--continue``); at the end run_class001.mrc (both halves, FSC-weighted),
run_half1_class001_unfil.mrc and run_half2_class001_unfil.mrc (unregularised,
for post-processing), run_model.star and run_data.star; run.log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from spa3d.errors import InputError
from spa3d.fourier.backprojector import BackProjector
from spa3d.fourier.ctf import ctf_half_plane
from spa3d.fourier.filters import soft_sphere
from spa3d.fourier.projector import Projector
from spa3d.geometry.euler import euler_to_matrix, matrix_to_euler
from spa3d.geometry.sampling import angular_step, oversampled_orientations, oversampled_translations
from spa3d.geometry.symmetry import symmetry_matrices
from spa3d.inference.likelihood import FourierPixels, residual_power
from spa3d.inference.local_search import LOCAL_PREPASS_MARGIN
from spa3d.inference.search import FINE_TABLE_BYTES, coarse_radius, make_search_grid
from spa3d.io.atomic_write import atomic_path
from spa3d.io.mrc import read_map, write_map
from spa3d.io.particles import ParticleSet
from spa3d.io.star import write_star
from spa3d.jobs.class3d import (MIN_RESOLUTION_SHELLS, Class3dOptions, EStepChunk, EStepResult, _batch_size,
                                _class_fsc, _combine, _groups, _image_mask, check_greyscale, initial_sigma2, input_norm,
                                load_reference, model_star_blocks, norm_stats, open_particles, particles_table,
                                random_halves, resolution_shell, run_estep, update_norm)
from spa3d.jobs.progress import EStepRate, Progress
from spa3d.maps.align import _corr_many, relative_orientation, transform_map, transform_poses
from spa3d.maps.transform import fourier_resample
from spa3d.jobs.resume import IterationFiles, append_options_block, load_continued, prepare_continue, start_job

log = logging.getLogger("spa3d")

FSC_CURRENT = 0.5  # the current resolution: a half map's SSNR FSC/(1 − FSC) falls below 1 (RELION's data_vs_prior)
FSC_FINAL = 0.143  # the final (gold-standard) resolution
P_VALUE = 4.60517  # −ln 0.01: a pose change is detectable when it lowers the likelihood by this (RELION)


@dataclass
class Refine3dOptions:
    """Options of an auto-refinement; lengths in Å unless named ``_px``, angles in degrees."""

    healpix_order: int = 2  # initial coarse order (the GUI's 7.5° = order 2, searched one order finer)
    offset_range: float = 5.0  # pixels
    offset_step: float = 1.0  # pixels
    auto_local_healpix_order: int = 4  # local searches from this order on (RELION's --auto_local_healpix_order)
    ini_high: float = 60.0
    particle_diameter: float | None = None
    zero_mask: bool = False
    flatten_solvent: bool = False
    solvent_mask: str | None = None  # reference mask (MRC, 0..1) applied to the half maps every iteration
    rescale_ref: bool = False  # bring a reference of another pixel size or box to the particles'
    low_resol_join_halves: float = 40.0  # Å; the halves share their sums below this resolution (0: never)
    estimate: bool = True  # log the expected wall time and memory first (a short calibration)
    align_halves: bool = True  # bring a half set that settled in the other hand or frame onto the first (not RELION's)
    # which images are back-projected (docs/conventions.md). Default: the masked images that the E-step scores at
    # frequencies whose CTF delocalisation stays inside the mask, the unmasked ones beyond (not RELION's; with
    # CTF correction only); unmasked_reconstruction: the unmasked ones everywhere, as RELION (exp_Fimg_nomask);
    # masked_reconstruction: the masked ones everywhere
    unmasked_reconstruction: bool = False
    masked_reconstruction: bool = False
    # global searches at this HEALPix order or finer (3: 3.75°) go through a pre-pass one order coarser and score
    # only the rotations near its significant samples (inference.pruned_search; not RELION's); 0: never. Local
    # searches then go through their own pre-pass (inference.local_search.local_prepass_cells) unless it is 0
    prepass_from_order: int = 3
    ctf: bool = False
    ctf_intact_first_peak: bool = False
    ctf_phase_flipped: bool = False
    firstiter_cc: bool = False
    perturb: float = 0.5  # RELION's --perturb (global searches)
    norm_correction: bool = True  # RELION's --norm (on in its GUI's Refine3D)
    symmetry: str = "C1"
    tau2_fudge: float = 1.0
    incr_size: int = 10
    max_iter: int = 50
    adaptive_fraction: float = 0.999
    max_significant: int = 256
    initial_sigma_offset: float = 10.0  # Å
    batch_size: int | None = None
    seed: int = 0
    device: str | None = None
    threads: int | None = None
    workers: int = 0
    dask_scheduler: str | None = None
    dry_run: bool = False


@dataclass
class RefineState:
    """Everything a continued refinement needs besides the two half maps (offsets in pixels, angles degrees)."""

    iteration: int
    sigma2: np.ndarray  # (n//2+1,) noise power per shell
    sigma_offset_px: float
    group_scale: np.ndarray
    r_current: float  # E-step radius of the next iteration, cycles per box
    resolution_shell: float  # current resolution: the last shell with half-map FSC >= 0.5
    offsets_px: np.ndarray
    angles: np.ndarray
    halves: np.ndarray  # (N,) 0 or 1
    order: int  # coarse HEALPix order of the next iteration
    offset_range: float  # pixels
    offset_step: float  # pixels (coarse)
    sigma_ang: float = 0.0  # > 0: local searches with this σ (degrees)
    incr_size: int = 10
    acc_rot: float = 999.0  # estimated rotational accuracy, degrees
    acc_trans: float = 999.0  # estimated translational accuracy, pixels
    change_orient: float = 0.0  # mean change of the particles' rotations in the last iteration, degrees
    change_offset: float = 0.0  # RMS change of their offsets per axis, pixels
    iter_wo_resol_gain: int = 0
    iter_wo_large_changes: int = 0
    smallest_change_classes: float = 9999999.0
    smallest_change_orient: float = 999.0
    smallest_change_offset: float = 999.0
    high_fsc_at_limit: bool = False
    halves_agreed: int = 0  # consecutive align_halves checks that found the halves clearly in one frame
    fine_enough: bool = False
    converged: bool = False  # the next iteration is the final one
    finished: bool = False
    map_radius: float = 0.0
    fsc: np.ndarray = field(default_factory=lambda: np.zeros(0))
    reference_small: np.ndarray = field(default_factory=lambda: np.zeros(0))  # the initial reference, box ≤ 32
    norm: np.ndarray | None = None  # (N,) rlnNormCorrection of every particle (None: not corrected)
    avg_norm: float = 1.0
    stats: dict = field(default_factory=dict)
    rng_state: dict = field(default_factory=dict)


def _save_state(path: Path, st: RefineState) -> None:
    arrays, scalars = {}, {}
    for f in dataclasses.fields(st):
        v = getattr(st, f.name)
        if isinstance(v, np.ndarray):
            arrays[f.name] = v
        elif f.name == "stats":
            arrays.update({f"stat_{k}": np.asarray(a) for k, a in v.items()})
        else:
            scalars[f.name] = v
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays, scalars=np.frombuffer(json.dumps(scalars).encode(), dtype=np.uint8))


def _load_state(path: Path) -> RefineState:
    with np.load(path) as z:
        scalars = json.loads(bytes(z["scalars"]).decode())
        arrays = {k: z[k].copy() for k in z.files if k != "scalars" and not k.startswith("stat_")}
        stats = {k[5:]: z[k].copy() for k in z.files if k.startswith("stat_")}
    return RefineState(**scalars, **arrays, stats=stats)


def expected_accuracy(projectors: list[Projector], rots: torch.Tensor, ctf: torch.Tensor, which: np.ndarray,
                      px: FourierPixels, sigma2: torch.Tensor) -> tuple[float, float]:
    """Expected rotational (degrees) and translational (pixels) accuracy of the particles' pose assignment.

    As RELION's calculateExpectedAngularErrors: for each particle at its pose,
    the smallest rotation (about each of the 3 axes in turn) and shift (x, y)
    that change its CTF-modulated projection by Σ w·|ΔP|²/2 > ln(100), the
    likelihood ratio at which the change is detectable with p = 0.01; averaged
    over axes and particles. rots (M, 3, 3), ctf (M, n, n//2+1), ``which``
    (M,) the map (projector) of each particle.
    """
    dev = rots.device
    w = px.multiplicity.to(torch.float32) / sigma2[px.shell].clamp_min(1e-12)
    c2w = px.take(ctf).to(torch.float32) ** 2 * w
    angles = torch.logspace(np.log10(0.02), np.log10(30.0), 48, device=dev)
    shifts = torch.logspace(np.log10(0.01), np.log10(10.0), 48, device=dev)
    acc_r, acc_t = [], []
    for k, proj in enumerate(projectors):
        sel = torch.as_tensor(np.nonzero(which == k)[0], device=dev)
        if len(sel) == 0:
            continue
        p0 = proj.project_pixels(rots[sel], px.kx, px.ky)  # (M, P)
        thresholds = []
        for axis in range(3):
            def change(idx: torch.Tensor) -> torch.Tensor:
                """½ Σ c²w |ΔP|² (M, J) for each particle's rotations by angles[idx] (M, J) about this axis."""
                v = torch.zeros((*idx.shape, 3), device=dev)
                v[..., axis] = torch.deg2rad(angles[idx])
                d = torch.as_tensor(Rotation.from_rotvec(v.reshape(-1, 3).cpu().numpy()).as_matrix(),
                                    dtype=torch.float32, device=dev).reshape(*idx.shape, 3, 3)
                r = torch.matmul(rots[sel][:, None], d)  # (M, J, 3, 3)
                pr = proj.project_pixels(r.reshape(-1, 3, 3), px.kx, px.ky).reshape(*idx.shape, -1)
                return 0.5 * ((pr - p0[:, None]).abs() ** 2 * c2w[sel][:, None]).sum(-1)

            thresholds.append(angles[_first_crossing(change, len(sel), len(angles), dev)])
        acc_r.append(torch.stack(thresholds, 1).mean(1))
        power = (p0.abs() ** 2 * c2w[sel]).float()  # (M, P)
        tr = []
        for kk in (px.kx, px.ky):
            ph = 2 * torch.pi / px.n * shifts[:, None] * kk[None].to(torch.float32)  # (S, P)
            diff = 0.5 * power @ (2 - 2 * torch.cos(ph)).T  # |1 − e^{iφ}|² = 2 − 2cos φ
            tr.append(_first_above(diff, shifts))
        acc_t.append(torch.stack(tr, 1).mean(1))
    return float(torch.cat(acc_r).mean()), float(torch.cat(acc_t).mean())


def _first_crossing(change, m: int, n_steps: int, dev, stride: int = 4) -> torch.Tensor:
    """Per particle, the index of the first of ``n_steps`` increasing steps where ``change`` exceeds P_VALUE
    (the last step if none does), as a scan of every step finds it where the change grows with the step.

    change(idx (M, J) step indices) -> (M, J). Every ``stride``-th step is evaluated first, then only the
    steps between the first one above and the one before it: 15 of 48 steps instead of all of them.
    """
    coarse = list(range(stride - 1, n_steps, stride))
    if coarse[-1] != n_steps - 1:
        coarse.append(n_steps - 1)
    coarse_t = torch.as_tensor(coarse, device=dev)
    above = change(coarse_t.expand(m, -1)) > P_VALUE
    c = torch.where(above.any(1), above.float().argmax(1), torch.full((m,), len(coarse) - 1, device=dev,
                                                                        dtype=torch.long))
    hit = above.any(1)
    start = torch.where(c > 0, coarse_t[(c - 1).clamp_min(0)] + 1, torch.zeros_like(c))  # first unscored step
    between = (start[:, None] + torch.arange(stride - 1, device=dev)[None]).clamp_max(n_steps - 1)  # (M, stride − 1)
    between = torch.minimum(between, coarse_t[c][:, None])
    inner = change(between) > P_VALUE
    first = torch.where(inner.any(1), between.gather(1, inner.float().argmax(1, keepdim=True))[:, 0], coarse_t[c])
    return torch.where(hit, first, torch.full_like(first, n_steps - 1))


def _first_above(diff: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Per row of ``diff`` (M, S), the first of ``steps`` where it exceeds P_VALUE (the largest step if never)."""
    above = diff > P_VALUE
    idx = torch.where(above.any(1), above.float().argmax(1), torch.full_like(above[:, 0], len(steps) - 1,
                                                                             dtype=torch.long))
    return steps[idx]


def orientation_changes(old: np.ndarray, new: np.ndarray, ops: np.ndarray) -> np.ndarray:
    """Angle in degrees from each old rotation (N, 3, 3) to the nearest symmetry mate A·L of the new one."""
    mates = np.einsum("nik,gkj->ngij", new, ops)
    tr = np.einsum("nij,ngij->ng", old, mates).max(1)
    return np.rad2deg(np.arccos(np.clip((tr - 1) / 2, -1, 1)))


def update_hidden_variable_changes(st: RefineState, step_deg: float | None = None,
                                   offset_step_px: float | None = None) -> None:
    """RELION's updateOverallChangesInHiddenVariables: count iterations whose pose changes stopped falling.

    An iteration counts when the changes fell by less than 3 % or are under 40 % of the (fine) sampling step.
    ``step_deg`` / ``offset_step_px`` (coarse): the steps the changes are measured against, default the current
    ones. refine3d passes the run's initial steps, as RELION's auto-refine does in effect: it runs under MPI,
    where only the leader counts the changes (ml_optimiser_mpi.cpp:2474) and only the followers make the
    sampling finer (ml_optimiser_mpi.cpp:883-886; the leader's HealpixSampling keeps the initial order), so the
    leader divides by the initial steps. Once the changes are under 40 % of the initial step (3° at 7.5°),
    every level is left after one iteration without resolution gain (RELION's 16 iterations at box 128 against
    spa3d's 24 with the current steps; docs/conventions.md).
    """
    step = angular_step(st.order + 1) if step_deg is None else step_deg
    ratio_orient = st.change_orient / step
    ratio_trans = st.change_offset / max((st.offset_step if offset_step_px is None else offset_step_px) / 2, 1e-6)
    if (1.03 * 0.0 >= st.smallest_change_classes
            and (ratio_trans < 0.4 or 1.03 * st.change_offset >= st.smallest_change_offset)
            and (ratio_orient < 0.4 or 1.03 * st.change_orient >= st.smallest_change_orient)):
        st.iter_wo_large_changes += 1
    else:
        st.iter_wo_large_changes = 0
    st.smallest_change_classes = min(st.smallest_change_classes, 0.0)
    st.smallest_change_offset = min(st.smallest_change_offset, st.change_offset)
    st.smallest_change_orient = min(st.smallest_change_orient, st.change_orient)


def update_sampling(st: RefineState, o: Refine3dOptions, apix: float) -> bool:
    """RELION's auto-refine updateAngularSampling; True when the sampling became finer.

    When neither the resolution nor the poses improved in the last iteration:
    if the angular step is already below 75 % of the estimated accuracy, the
    sampling is fine enough (convergence may follow); else the HEALPix order
    goes up by one, the coarse offset step becomes min(1.5 Å, 0.75·accuracy)·2
    and the range 5× the last RMS offset change (at most 1.3× the old range,
    at least 1.5 steps, halved when over 4 steps), never coarser than before;
    from ``auto_local_healpix_order`` on, local searches with σ = 2 steps.
    """
    if not (st.iter_wo_resol_gain >= 1 and st.iter_wo_large_changes >= 1):
        return False
    old_step = angular_step(st.order + 1)
    if old_step < 0.75 * st.acc_rot:
        st.fine_enough = True
        return False
    st.fine_enough = False
    new_step = min(1.5 / apix, 0.75 * st.acc_trans) * 2
    new_range = min(1.3 * st.offset_range, 5 * st.change_offset)
    new_range = max(new_range, 1.5 * new_step)
    if new_range > 4 * new_step:
        new_range /= 2
    if new_range > 4 * new_step:
        new_step = new_range / 4
    if new_step > st.offset_step:
        new_step, new_range = st.offset_step, st.offset_range
    st.order += 1
    st.offset_step, st.offset_range = float(new_step), float(new_range)
    st.iter_wo_resol_gain = st.iter_wo_large_changes = 0
    st.smallest_change_classes, st.smallest_change_orient, st.smallest_change_offset = 9999999.0, 999.0, 999.0
    if st.order >= o.auto_local_healpix_order:
        st.sigma_ang = 2 * angular_step(st.order + 1)
    return True


def align_halves(maps: np.ndarray, st: RefineState, symmetry: str, it: int, margin: float = 0.03,
                 clear: float = 0.15, settled_after: int = 2) -> np.ndarray:
    """Bring the two half maps into one hand and frame when they have settled apart (not in RELION).

    Started from one low-resolution reference, the two independent half sets can each build a self-consistent
    map in a different hand (the mirror image) or, for a pseudo-symmetric particle, a different symmetry-related
    frame; their FSC then stays low at every later iteration and the final map averages two structures. The
    relative orientation of the half maps (:func:`spa3d.maps.align.relative_orientation`: rotations in both hands,
    whitened maps cropped to twice the current resolution's shell) decides: when a transform S other than the
    identity (or a symmetry operation) raises their correlation by more than ``margin``, the half that agrees
    less with the initial reference is turned by S (map V(S·x), poses D·A·S, which give the same projections),
    so both halves keep the reference's hand. Their particles and data are untouched, so the halves stay
    independent. Returns the maps (possibly one half changed); ``st.angles`` follow.

    Hands and frames settle in the first iterations, while the reference is still blurred: once
    ``settled_after`` consecutive checks have found the halves as they are better than any other transform by
    more than ``clear`` (``RelativeOrientation.correlation_other``; 0.3–0.6 below in settled runs, within 0.1
    while they are still undecided), the check (about 1 s at box 64) stops for the rest of the run.
    """
    if st.halves_agreed >= settled_after:
        return maps
    n = maps.shape[-1]
    w = int(np.clip(2 * round(st.resolution_shell), 16, 32))
    ops = symmetry_matrices(symmetry)
    rel = relative_orientation(maps[0], maps[1], working_box=w, symmetry_ops=ops)
    near_symmetry_op = min(np.rad2deg(np.arccos(np.clip((np.trace(g.T @ rel.rotation) - 1) / 2, -1, 1)))
                           for g in ops) < 10.0
    if rel.correlation <= rel.correlation_as_is + margin or (not rel.mirrored and near_symmetry_op):
        st.halves_agreed = st.halves_agreed + 1 if rel.correlation_as_is - rel.correlation_other > clear else 0
        if st.halves_agreed == settled_after:
            log.info(f"iteration {it}: the half maps share one hand and frame (whitened correlation "
                     f"{rel.correlation_as_is:.3f}, anything else at most {rel.correlation_other:.3f}): "
                     f"no more comparisons")
        return maps
    st.halves_agreed = 0
    s = rel.matrix  # maps[1](S·x) ≈ maps[0](x)
    moved = 1
    if st.reference_small.size:
        m = st.reference_small.shape[0]
        ref = torch.as_tensor(st.reference_small.astype(np.float32))
        mask = torch.as_tensor(soft_sphere(m, m / 2 - 1, 0) > 0.5)
        small = torch.as_tensor(np.stack([fourier_resample(v, m) if n > m else v for v in maps]))
        agree = _corr_many(ref, small, mask)
        moved = 0 if agree[0] < agree[1] else 1
        if moved == 0:
            s = s.T  # maps[0](Sᵀ·x) ≈ maps[1](x)
    out = maps.copy()
    out[moved] = transform_map(maps[moved], s)
    sel = st.halves == moved
    st.angles[sel] = np.stack(matrix_to_euler(transform_poses(euler_to_matrix(*st.angles[sel].T), s)), axis=1)
    log.info(f"iteration {it}: half set {moved + 1} had settled in "
             f"{'the mirror image' if rel.mirrored else 'another frame'} of half set {2 - moved}'s map "
             f"(turned {rel.angle:.0f}°; whitened correlation {rel.correlation:.3f} against {rel.correlation_as_is:.3f} "
             f"as they were): its map and poses now share the other half's hand and frame")
    return out


def join_halves_below(acc: list, n: int, r_cur: float, r_join: float, device) -> list:
    """The two half sets' accumulators with their data and weights averaged below shell ``r_join``.

    As RELION's ``--low_resol_join_halves`` (40 Å in the GUI): below that
    resolution the halves hold the same map, so they cannot drift apart in
    orientation or position; the FSC there is 1, and the resolution, measured
    far beyond it, stays independent.
    """
    bp = BackProjector(n, r_max=r_cur, device=device)
    inside = (bp.shell_index() <= r_join)[..., None]
    mean = 0.5 * (acc[0].to(device) + acc[1].to(device))
    return [torch.where(inside, mean, a.to(device)) for a in acc[:2]]


def fsc_tau2(fsc: np.ndarray, mean_weight: np.ndarray, fudge: float, r_max: float, full: bool = False) -> np.ndarray:
    """Prior power over noise power per shell from the half maps' FSC (RELION's tau2 from the FSC).

    SSNR of a half map FSC/(1 − FSC) (of the joined map 2·FSC/(1 − FSC) with
    ``full``), over the mean CTF² weight of the shell, times ``fudge``; zero
    where the FSC is not positive or beyond ``r_max`` (those shells are
    suppressed in the reconstruction).
    """
    f = np.clip(fsc, 0.0, 0.999)
    ssnr = (2 if full else 1) * f / (1 - f)
    tau2 = fudge * ssnr / np.maximum(mean_weight[: len(f)], 1e-30)
    tau2[(f <= 1e-3) | (np.arange(len(f)) > r_max)] = 0.0
    return tau2


def run_refine3d(star: str | None, ref: str | None, job_dir: str, o: Refine3dOptions,
                 continue_from: str | None = None, given: set[str] | None = None) -> tuple[np.ndarray, RefineState]:
    """Run the auto-refinement; returns the final map (n, n, n) (the last half maps' sum before convergence) and state."""
    o = dataclasses.replace(o)
    if continue_from:
        continue_from, o, _ = prepare_continue(o, continue_from, job_dir, star, given, set())
    from spa3d.backend.distributed import cluster_for

    with cluster_for(o) as cluster:
        return _run_refine3d(star, ref, job_dir, o, continue_from, cluster)


def _run_refine3d(star, ref, job_dir, o: Refine3dOptions, continue_from, cluster):
    job, device = start_job(job_dir, o)
    st = None
    if continue_from:
        st, first_star = load_continued(continue_from, _load_state, "rlnRefine3dInputStarFile")
        star = star or first_star
        src = Path(continue_from).parent
        halves_maps = []
        for h in (1, 2):
            path = src / f"run_it{st.iteration:03d}_half{h}_class001.mrc"
            if not path.exists():
                raise InputError(continue_from, f"--continue: half map {path} is missing")
            halves_maps.append(read_map(path)[0])
        maps = np.array(halves_maps)
        log.info(f"refine3d: continuing from iteration {st.iteration} ({continue_from})")
    ps = open_particles(star, o.ctf)
    n, apix, n_part = ps.box, ps.pixel_size, len(ps)
    if n_part < 2:
        raise InputError(star, "refine3d needs at least 2 particles (one per half set)")
    diameter = o.particle_diameter if o.particle_diameter and o.particle_diameter > 0 else n * apix
    diameter = min(diameter, n * apix)
    radius_px = diameter / (2 * apix)
    mask2d = _image_mask(n, radius_px)
    mask3d = soft_sphere(n, radius_px, 5.0)
    if o.solvent_mask:
        solvent, _ = read_map(o.solvent_mask)
        if solvent.shape != (n, n, n):
            raise InputError(o.solvent_mask, f"solvent mask is {solvent.shape[0]} pixels, particles are {n}")
        if solvent.min() < -1e-3 or solvent.max() > 1 + 1e-3:
            raise InputError(o.solvent_mask, "a solvent mask holds values between 0 and 1")
        mask3d = np.clip(solvent, 0, 1)
    ops = symmetry_matrices(o.symmetry)
    groups = _groups(ps)
    n_groups = int(groups.max()) + 1
    e_opts = _estep_options(o, 1, 0.0, o.healpix_order, o.offset_range, o.offset_step)
    if st is None:
        if ref is None:
            raise InputError(None, "--ref map.mrc is required")
        vol = load_reference(ref, ps, o.ini_high, o.rescale_ref)
        if not o.firstiter_cc and check_greyscale(ps, vol, mask2d, e_opts, o.ini_high):
            o.firstiter_cc = e_opts.firstiter_cc = True  # recorded with the run's options
        maps = np.stack([vol, vol]).astype(np.float32)
        rng = np.random.default_rng(o.seed)
        r0 = min(n // 2 - 1, n * apix / o.ini_high) if o.ini_high and o.ini_high > 0 else n // 2 - 1
        angles0 = ps.angles() if "rlnAngleRot" in ps.table.particles else np.zeros((n_part, 3))
        st = RefineState(0, initial_sigma2(ps, mask2d, e_opts, rng), o.initial_sigma_offset / apix, np.ones(n_groups),
                         float(min(n // 2 - 1, r0 + o.incr_size)), float(round(r0)), ps.origins_px(), angles0, random_halves(ps, o.seed),
                         o.healpix_order, o.offset_range, o.offset_step, incr_size=o.incr_size, map_radius=float(r0),
                         reference_small=fourier_resample(vol, min(n, 32)) if n > 32 else vol.copy())
    else:
        rng = np.random.default_rng()
        rng.bit_generator.state = st.rng_state
    if o.norm_correction and st.norm is None:
        st.norm, st.avg_norm = input_norm(ps), 1.0
    elif not o.norm_correction:
        st.norm = None
    if st.finished:
        log.info("refine3d: this run has already converged")
        return maps.sum(0), st
    n_rc = len(oversampled_orientations(st.order, o.symmetry)[0]) * len(oversampled_translations(
        st.offset_range, st.offset_step)[0]) if st.sigma_ang <= 0 else 1
    log.info(f"refine3d: {n_part} particles ({int((st.halves == 0).sum())} + {int((st.halves == 1).sum())} in the "
             f"half sets), box {n}, {apix:.3f} Å/px, symmetry {o.symmetry}, start at "
             f"{angular_step(st.order + 1):.2f}°, local searches from {angular_step(o.auto_local_healpix_order + 1):.2f}°"
             f", device {device}")
    if o.dry_run or (o.estimate and st.iteration == 0):
        est = _estimate(ps, maps, st, o, device, diameter, radius_px, groups, n_groups)
        for line in est.lines():
            log.info(line)
        log.info(f"refine3d: the first iteration searches {n_rc:,} coarse (rotation, translation) samples per particle;"
                 " the estimate assumes RELION's usual course (about 10 iterations at the first sampling, 3 at each"
                 " finer one, 4 of local searches and the final one); the data decide")
    if o.dry_run:
        return maps.sum(0), st
    start = time.perf_counter()
    rate = EStepRate()
    first_it = st.iteration
    while not st.finished and st.iteration < o.max_iter:
        t_it = time.perf_counter()
        it = st.iteration + 1
        final = st.converged
        r_cur = float(n // 2 - 1) if final else float(min(n // 2 - 1, st.r_current))
        e_opts = _estep_options(o, 1, st.sigma_ang, st.order, st.offset_range, st.offset_step)
        n_coarse = (len(oversampled_orientations(st.order, o.symmetry)[0]) * len(oversampled_translations(
            st.offset_range, st.offset_step)[0])) if st.sigma_ang <= 0 else 64
        bs = o.batch_size or _batch_size(e_opts, 1, n_coarse, device)
        e_opts.batch_size = bs
        hard = bool(o.firstiter_cc and it == 1)
        if o.align_halves and it >= 2 and not final and st.sigma_ang <= 0:
            maps = align_halves(maps, st, o.symmetry, it)
        r_coarse = coarse_radius(st.order, diameter, n, apix)
        scale_all = st.group_scale[groups]
        prog = Progress(n_part, label=f"iteration {it}: ")
        t_e = time.perf_counter()
        # each half set against its own map only: two E-steps of one class each
        res = _combine_halves([run_estep(np.nonzero(st.halves == h)[0], bs,
                                         _chunk_maker(ps, maps[h:h + 1], st, it, bs, o, e_opts, r_cur, r_coarse, hard,
                                                      radius_px, scale_all, groups, n_groups, h),
                                         device, cluster, prog) for h in range(2)])
        rate.add(res.flops, time.perf_counter() - t_e, res.poses, n_part)
        idx = res.indices
        old_rot = euler_to_matrix(*st.angles[idx].T)
        new_rot = euler_to_matrix(*res.angles.T)
        st.change_orient = float(orientation_changes(old_rot, new_rot, ops).mean())
        st.change_offset = float(np.sqrt(((res.offsets_px - st.offsets_px[idx]) ** 2).sum() / (2 * n_part)))
        st.offsets_px[idx], st.angles[idx] = res.offsets_px, res.angles
        pmax = np.zeros(n_part)
        pmax[idx] = res.pmax
        st.stats = {"pmax": pmax, "n_significant": np.zeros(n_part, dtype=int), "log_likelihood": np.zeros(n_part)}
        st.stats["n_significant"][idx], st.stats["log_likelihood"][idx] = res.n_significant, res.log_likelihood

        # ---- M-step ----
        s_ref = 1.0
        if hard:
            s_ref = float(res.xa_g.sum() / max(res.aa_g.sum(), 1e-30))
            maps = maps * s_ref
            log.info(f"first iteration by cross-correlation; reference greyscale × {s_ref:.4g}")
        elif n_groups > 1:
            scale = st.group_scale * res.xa_g / np.maximum(res.aa_g, 1e-30)
            st.group_scale = scale / scale.mean()
        res_shell = residual_power(res.res_terms, s_ref)
        upd = res.pix_shell > 0
        st.sigma2[upd] = res_shell[upd] / res.pix_shell[upd]
        st.sigma_offset_px = float(np.sqrt(res.off_sq / (2 * n_part)))
        if st.norm is not None and res.norm_residual is not None and not hard:  # RELION's normalisation correction
            st.avg_norm = update_norm(st.norm, st.avg_norm, idx, res.norm_residual, n)
        if o.low_resol_join_halves > 0:  # RELION's: the halves share their sums below this resolution
            res.acc = join_halves_below(res.acc, n, r_cur, n * apix / o.low_resol_join_halves, device)
        fsc = _class_fsc(res.acc[0], res.acc[1], n, r_cur, ops, device)
        st.fsc = fsc
        bps = []
        for h in range(2):
            bp = BackProjector(n, r_max=r_cur, device=device)
            bp.acc = res.acc[h].to(device)
            bps.append(bp)
        tau2s = []
        new_maps = np.empty_like(maps)
        for h, bp in enumerate(bps):
            mean_w, _, _ = bp.shell_weights(ops)
            tau2 = fsc_tau2(fsc, mean_w, o.tau2_fudge, r_cur)
            tau2s.append(tau2)
            vol = bp.reconstruct(symmetry_ops=ops, tau2=tau2).cpu().numpy()
            new_maps[h] = vol * mask3d if (o.flatten_solvent or o.solvent_mask) else vol
        maps = new_maps

        # ---- resolution, pose changes, accuracy, sampling (RELION's order) ----
        res_shell_now = float(max(resolution_shell(fsc, FSC_CURRENT), MIN_RESOLUTION_SHELLS))
        if res_shell_now > st.resolution_shell:
            st.iter_wo_resol_gain = 0
        else:
            st.iter_wo_resol_gain += 1
        st.resolution_shell = res_shell_now
        f05, f0143 = resolution_shell(fsc, FSC_CURRENT) + 1, resolution_shell(fsc, FSC_FINAL) + 1
        st.incr_size = int(max(st.incr_size, f0143 - f05 + 5))
        lim = int(min(len(fsc) - 1, max(1, round(r_cur) - 1)))
        st.high_fsc_at_limit = st.high_fsc_at_limit or bool(fsc[lim] > 0.2)
        ave_pmax = float(pmax.mean())
        grow = round(0.25 * n / 2) if (ave_pmax > 0.1 and st.high_fsc_at_limit) else st.incr_size
        st.r_current = float(min(n // 2 - 1, res_shell_now + grow))
        st.map_radius = r_cur
        update_hidden_variable_changes(st, angular_step(o.healpix_order + 1), o.offset_step)
        st.acc_rot, st.acc_trans = _accuracy(ps, maps, st, o, rng, r_cur, device)
        changed = False if final else update_sampling(st, o, apix)
        st.converged = (not final and st.fine_enough and st.iter_wo_resol_gain >= 1 and st.iter_wo_large_changes >= 1)
        st.iteration = it
        st.finished = final
        st.rng_state = rng.bit_generator.state
        info = _model_info(fsc, tau2s[0], bps[0], ops, n, apix, pmax, res.rot_spread, res.trans_spread, st)
        _write_iteration(job, ps, maps, st, o, info)
        if final:
            _write_final(job, ps, res, fsc, ops, o, mask3d, st, info, device)
        elapsed = time.perf_counter() - start
        log.info(f"iteration {it}: E-step radius {r_cur:.0f} px, resolution {n * apix / st.resolution_shell:.2f} Å "
                 f"(FSC 0.143: {_angstrom(fsc, FSC_FINAL, n, apix):.2f} Å), sampling "
                 f"{angular_step(st.order + 1):.2f}°{' (local)' if st.sigma_ang > 0 else ''}"
                 f"{' (finer next)' if changed else ''}, offsets {st.offset_range:.2f}/{st.offset_step:.2f} px, "
                 f"accuracy {st.acc_rot:.2f}° {st.acc_trans * apix:.2f} Å, changes {st.change_orient:.2f}° "
                 f"{st.change_offset * apix:.2f} Å, <Pmax> {ave_pmax:.3f}, {rate.line()}, "
                 f"{n_part / (time.perf_counter() - t_it):.0f} particles/s, {elapsed:.0f} s"
                 f"{' (converged: final iteration next)' if st.converged else ''}")
    if rate.particles:
        log.info(rate.summary())
    log.info(f"done in {time.perf_counter() - start:.1f} s after {st.iteration - first_it} iterations"
             + (f": final resolution {_angstrom(st.fsc, FSC_FINAL, n, apix):.2f} Å (half maps' FSC 0.143, unmasked), "
                f"{job / 'run_class001.mrc'}" if st.finished else " (not converged)"))
    return maps.sum(0), st


def _chunk_maker(ps, half_map, st, it, bs, o, e_opts, r_cur, r_coarse, hard, radius_px, scale_all, groups, n_groups,
                 h: int):
    """``chunk(indices, first_batch, device, threads)`` -> EStepChunk of half set ``h`` against its map (1, n, n, n).

    Half 2's batches are numbered from 10⁶ on, so that their random numbers differ from half 1's."""

    def chunk(sel: np.ndarray, first_batch: int, dev: str, threads=None) -> EStepChunk:
        return EStepChunk(str(ps.star_path), str(ps.project_dir), sel, first_batch + h * 1_000_000, bs, it, o.seed,
                          half_map, st.sigma2, np.ones(1), st.sigma_offset_px, st.offsets_px[sel], st.angles[sel],
                          scale_all[sel], groups[sel], n_groups, np.full(len(sel), -1), None, e_opts, st.order,
                          r_cur, r_coarse, hard, radius_px, dev, threads,
                          norm_factor=None if st.norm is None else st.avg_norm / st.norm[sel],
                          unmasked_recon=o.unmasked_reconstruction,
                          recon_split_radius=0.0 if o.unmasked_reconstruction or o.masked_reconstruction
                          else radius_px * ps.pixel_size)

    return chunk


# iterations the estimate assumes at each stage (RELION's usual course; the data decide)
EST_GLOBAL_ITERATIONS, EST_ORDER_ITERATIONS, EST_LOCAL_ITERATIONS = 10, 3, 4
EST_ALIGN_CHECKS = 5  # align_halves checks before the halves count as settled
EST_SIGNIFICANT = 4  # significant samples per particle after the first iterations (1–3 in the runs measured)
EST_BATCH = 32  # particles timed per stage (the coarse grid's projections, shared by a batch, timed apart)


def _estimate(ps, maps, st: RefineState, o: Refine3dOptions, device, diameter: float, radius_px: float,
              groups: np.ndarray, n_groups: int):
    """Expected wall time, peak memory and poses of a refinement (see :mod:`spa3d.jobs.estimate`).

    Times the E-step of 32 particles at each stage of the usual course, and apart the projections of the coarse grid
    that a batch of the run's size shares: global searches at the first order
    (at the first radius and at 70 % of Nyquist, where the radius usually settles), one order finer, local
    searches at the auto-local order, and the final iteration's local searches to Nyquist (all but the first
    with at most EST_SIGNIFICANT significant samples and pre-pass rotations per particle, as in a refinement
    under way); plus the reconstructions, the accuracy estimate and the half-map comparison of one iteration.
    The coarse grid's projections and the pre-pass, made once per chunk of images, are timed apart. The stages are
    weighted by EST_*_ITERATIONS; a run that stays longer at one sampling takes longer.
    """
    from spa3d.inference.pruned_search import _INDEX_CACHE
    from spa3d.jobs.class3d import chunk_prepass, estep_chunk
    from spa3d.jobs.estimate import Estimate, host_peak_bytes, synchronize, timed_reconstruction

    t0 = time.perf_counter()
    n, apix = ps.box, ps.pixel_size
    cal = dataclasses.replace(st, offsets_px=st.offsets_px.copy(), angles=st.angles.copy())
    scale_all = cal.group_scale[groups]
    nyq = float(n // 2 - 1)
    r_first = float(min(nyq, st.r_current))
    r_mid = float(max(r_first, round(0.7 * nyq)))
    sigma_local = 2 * angular_step(o.auto_local_healpix_order + 1)

    def timed(order: int, sigma_ang: float, r_cur: float, shrink: float = 1.0, sharp: bool = True):
        cal.order, cal.sigma_ang = order, sigma_ang
        rng_, step_ = st.offset_range * shrink, st.offset_step * shrink
        e_opts = _estep_options(o, 1, sigma_ang, order, rng_, step_)
        n_coarse = (len(oversampled_orientations(order, o.symmetry)[0]) * len(oversampled_translations(rng_, step_)[0])
                     if sigma_ang <= 0 else 64)
        bs = o.batch_size or _batch_size(e_opts, 1, n_coarse, device)
        # on a GPU a batch's time hardly depends on its size (kernel launches): time a whole batch there
        b_cal = min(bs, EST_BATCH if device.type == "cpu" else bs)
        e_opts.batch_size = b_cal
        sel = np.nonzero(st.halves == 0)[0][:b_cal]
        if sharp:  # against the low-passed reference every pose looks alike; a refinement's posteriors are sharp
            e_opts.max_significant = EST_SIGNIFICANT
            e_opts.prepass_max_rotations = EST_SIGNIFICANT
        r_coarse = coarse_radius(order, diameter, n, apix)
        chunk = _chunk_maker(ps, maps[0:1], cal, 1, b_cal, o, e_opts, r_cur, r_coarse, False, radius_px, scale_all,
                             groups, n_groups, 0)
        synchronize(device)
        t = time.perf_counter()
        res = estep_chunk(chunk(sel, 0, str(device)))
        t_batch = time.perf_counter() - t
        t_proj = 0.0
        if sigma_ang <= 0:  # a chunk of images (a half set, in one process) projects the coarse grid once
            grid = make_search_grid(order, o.symmetry, rng_, step_, device)
            px = FourierPixels.make(n, min(r_cur, r_coarse), device=device)
            proj = Projector(maps[0], r_max=min(n // 2, r_cur + 2), device=device)
            t = time.perf_counter()
            proj.project_pixels(grid.coarse_rot, px.kx, px.ky)
            _INDEX_CACHE.clear()  # and makes its pre-pass once (the rotation index: once per iteration)
            chunk_prepass(e_opts, order, cal.iteration + 1, grid, [proj], n, r_cur, r_coarse, device)
            t_proj = min(time.perf_counter() - t, t_batch)
        return (t_batch - t_proj) / len(sel) + t_proj / max(len(sel), len(ps) // 2), res

    timed(st.order, 0.0, r_first)  # one-off costs
    stages = []  # (iterations, seconds per particle, extra seconds per iteration)
    per_first, _ = timed(st.order, 0.0, r_first, sharp=False)
    per_mid, res = timed(st.order, 0.0, r_mid)
    t = time.perf_counter()
    relative_orientation(maps[0], maps[1])
    t_align = time.perf_counter() - t
    t = time.perf_counter()
    _accuracy(ps, maps, st, o, np.random.default_rng(0), r_mid, device)
    t_acc = time.perf_counter() - t
    bp = BackProjector(n, r_max=r_mid, device=device)
    bp.acc = res.acc[0].to(device)
    t_rec = timed_reconstruction(bp, device)
    per_it = 2 * t_rec + t_acc
    if st.order < o.auto_local_healpix_order:
        stages.append((1, per_first, per_it))
        # the half maps are compared until they have settled in one frame (align_halves; 2–8 checks measured)
        n_align = min(EST_ALIGN_CHECKS, EST_GLOBAL_ITERATIONS - 1)
        stages.append((EST_GLOBAL_ITERATIONS - 1, per_mid, per_it + t_align * n_align / (EST_GLOBAL_ITERATIONS - 1)))
        for order in range(st.order + 1, o.auto_local_healpix_order):
            stages.append((EST_ORDER_ITERATIONS, timed(order, 0.0, r_mid, 0.5)[0], per_it))
    stages.append((EST_LOCAL_ITERATIONS, timed(o.auto_local_healpix_order, sigma_local, r_mid, 0.3)[0], per_it))
    # the final iteration: local searches to Nyquist, then three reconstructions at Nyquist (the joined map and
    # the two unfiltered halves), timed here on an empty back-projector of that size (its memory too)
    per_final, _ = timed(o.auto_local_healpix_order, sigma_local, nyq, 0.3)
    t_rec_final = timed_reconstruction(BackProjector(n, r_max=nyq, device=device), device)
    stages.append((1, per_final, per_it + 3 * t_rec_final))
    total = sum(k * (per * len(ps) + extra) for k, per, extra in stages)
    log.info(f"estimate stages (iterations, s per particle, s per iteration): {stages}")
    poses = len(oversampled_orientations(st.order, o.symmetry)[0]) * len(oversampled_translations(
        st.offset_range, st.offset_step)[0]) + 32 * float(np.maximum(res.n_significant, 0).mean())
    # a whole batch's fine-pass rows at Nyquist (the 32 particles timed reach few of them): up to FINE_TABLE_BYTES
    bs = o.batch_size or _batch_size(_estep_options(o, 1, sigma_local, o.auto_local_healpix_order, 1.0, 1.0), 1, 64,
                                     device)
    n_pix = FourierPixels.make(n, nyq).kx.shape[0]
    table = min(FINE_TABLE_BYTES.get(device.type, FINE_TABLE_BYTES["cuda"]),
                bs * 8 * EST_SIGNIFICANT * (40 * n_pix + 4 * bs))
    gpu = int(torch.cuda.max_memory_allocated(device)) + table if device.type == "cuda" else 0
    return Estimate(total, host_peak_bytes() + (table if device.type == "cpu" else 0), gpu, poses,
                    time.perf_counter() - t0)


def _combine_halves(results: list) -> EStepResult:
    """The two half sets' E-step results as one: particles joined, sums added, accumulators [half 1, half 2]."""
    joined = _combine(results)
    joined.acc = [results[0].acc[0], results[1].acc[0]]
    return joined


def _angstrom(fsc: np.ndarray, threshold: float, n: int, apix: float) -> float:
    shell = resolution_shell(fsc, threshold)
    return n * apix / shell if shell >= 1 else 999.0


def _estep_options(o: Refine3dOptions, k: int, sigma_ang: float, order: int, offset_range: float,
                   offset_step: float) -> Class3dOptions:
    """The E-step's options (:class:`Class3dOptions`) for this iteration's sampling."""
    return Class3dOptions(n_classes=k, healpix_order=order, offset_range=offset_range, offset_step=offset_step,
                          zero_mask=o.zero_mask, ctf=o.ctf, ctf_intact_first_peak=o.ctf_intact_first_peak,
                          ctf_phase_flipped=o.ctf_phase_flipped, firstiter_cc=o.firstiter_cc, symmetry=o.symmetry,
                          sigma_ang=sigma_ang, perturb=o.perturb, adaptive_fraction=o.adaptive_fraction,
                          max_significant=o.max_significant, marginalise_broad=False, batch_size=o.batch_size,
                          prepass_from_order=o.prepass_from_order,
                          local_prepass_margin=LOCAL_PREPASS_MARGIN if o.prepass_from_order > 0 else 0.0,
                          seed=o.seed, device=o.device, threads=o.threads, coarse_warmup=False)


def _accuracy(ps: ParticleSet, maps: np.ndarray, st: RefineState, o: Refine3dOptions, rng, r_cur: float, device):
    """Estimated accuracies (degrees, pixels) on up to 100 particles (:func:`expected_accuracy`)."""
    n = ps.box
    sel = np.sort(np.random.default_rng([o.seed, st.iteration, 7]).choice(len(ps), min(100, len(ps)), replace=False))
    px = FourierPixels.make(n, r_cur, device=device)
    projectors = [Projector(m, r_max=min(n // 2, r_cur + 2), device=device) for m in maps]
    if o.ctf:
        c = ctf_half_plane(ps.ctf_params(sel), n, ps.pixel_size, device=device,
                           intact_first_peak=o.ctf_intact_first_peak, phase_flipped=o.ctf_phase_flipped)
    else:
        c = torch.ones((len(sel), n, n // 2 + 1), device=device)
    c = c.to(torch.float32) * torch.as_tensor(st.group_scale[_groups(ps)][sel], dtype=torch.float32,
                                               device=device)[:, None, None]
    rots = torch.as_tensor(euler_to_matrix(*st.angles[sel].T), dtype=torch.float32, device=device)
    return expected_accuracy(projectors, rots, c, st.halves[sel], px,
                             torch.as_tensor(st.sigma2, dtype=torch.float32, device=device))


def _model_info(fsc, tau2, bp, ops, n, apix, pmax, rot_spread, trans_spread, st) -> dict:
    """model.star's per-class values of the refinement (one class: the half maps' FSC, SSNR, τ²)."""
    f = np.clip(fsc, 0, 0.999)
    shell = resolution_shell(fsc, FSC_FINAL)
    mean_w, _, _ = bp.shell_weights(ops)
    return {"resolution": np.array([n * apix / shell if shell >= 1 else 999.0]),
            "completeness": np.array([1.0]), "ssnr": [2 * f / (1 - f)], "tau2": [tau2], "fsc": [fsc],
            "shell_completeness": [(mean_w[: len(fsc)] > 0).astype(float)],
            "accuracy_rot": np.array([st.acc_rot]), "accuracy_trans": np.array([st.acc_trans * apix]),
            "log_likelihood": float(st.stats["log_likelihood"].sum()), "average_pmax": float(pmax.mean())}


def _general(ps: ParticleSet, st: RefineState, o: Refine3dOptions) -> dict:
    n, apix = ps.box, ps.pixel_size
    return {"rlnCurrentResolution": float(n * apix / max(st.resolution_shell, 1e-3)),
            "rlnCurrentImageSize": int(min(n, 2 * round(st.r_current))), "rlnTau2FudgeFactor": o.tau2_fudge,
            "rlnSigmaOffsetsAngst": st.sigma_offset_px * apix, "rlnOrientationalPriorMode": int(st.sigma_ang > 0),
            "rlnSigmaPriorRotAngle": st.sigma_ang, "rlnSigmaPriorTiltAngle": st.sigma_ang,
            "rlnSigmaPriorPsiAngle": st.sigma_ang, "rlnNormCorrectionAverage": st.avg_norm}


def _data_table(ps: ParticleSet, st: RefineState):
    table = particles_table(ps, st.angles, st.offsets_px, np.ones(len(ps), dtype=int), norm_stats(st))
    table.particles["rlnRandomSubset"] = st.halves.astype(int) + 1
    return table


def _write_iteration(job: Path, ps: ParticleSet, maps: np.ndarray, st: RefineState, o: Refine3dOptions,
                     info: dict) -> None:
    """Iteration ``st.iteration``'s files, appearing together (the optimiser.star last)."""
    it, apix = st.iteration, ps.pixel_size
    with IterationFiles(job, it) as files:
        names = []
        for h in range(2):
            name = job / f"run_it{it:03d}_half{h + 1}_class001.mrc"
            write_map(files.path(name), maps[h], apix)
            names.append(str(name))
        for h in range(2):
            write_star(files.path(job / f"run_it{it:03d}_half{h + 1}_model.star"),
                       model_star_blocks(ps, [names[h]], np.ones(1), info, st.sigma2, st.group_scale,
                                         _general(ps, st, o)))
        _data_table(ps, st).write(files.path(job / f"run_it{it:03d}_data.star"))
        _save_state(files.path(job / f"run_it{it:03d}_state.npz"), st)
        optimiser = files.path(job / f"run_it{it:03d}_optimiser.star")
        write_star(optimiser, {"optimiser_general": {
            "rlnOutputRootName": str(job / "run"), "rlnModelStarFile": str(job / f"run_it{it:03d}_half1_model.star"),
            "rlnModelStarFile2": str(job / f"run_it{it:03d}_half2_model.star"),
            "rlnExperimentalDataStarFile": str(job / f"run_it{it:03d}_data.star"),
            "rlnOrientSamplingStarFile": "None", "rlnCurrentIteration": it, "rlnNumberOfIterations": o.max_iter,
            "rlnDoSplitRandomHalves": 1, "rlnDoAutoRefine": 1, "rlnHasConverged": int(st.finished),
            "rlnAutoLocalSearchesHealpixOrder": o.auto_local_healpix_order, "rlnRandomSeed": o.seed,
            "rlnTau2FudgeFactor": o.tau2_fudge, "rlnRefine3dStateFile": str(job / f"run_it{it:03d}_state.npz"),
            "rlnRefine3dInputStarFile": str(Path(ps.star_path).resolve())}})
        append_options_block(optimiser, o, {"input_star": str(Path(ps.star_path).resolve())})


def _write_final(job: Path, ps: ParticleSet, res, fsc: np.ndarray, ops, o: Refine3dOptions, mask3d: np.ndarray,
                 st: RefineState, info: dict, device) -> None:
    """run_class001.mrc (both halves, τ² from the FSC), the unregularised half maps, run_model.star, run_data.star."""
    n, apix = ps.box, ps.pixel_size
    r_max = float(n // 2 - 1)
    joined = BackProjector(n, r_max=r_max, device=device)
    joined.acc = (res.acc[0].to(device) + res.acc[1].to(device))
    mean_w, _, _ = joined.shell_weights(ops)
    tau2 = fsc_tau2(fsc, mean_w, o.tau2_fudge, r_max, full=True)
    vol = joined.reconstruct(symmetry_ops=ops, tau2=tau2).cpu().numpy()
    if o.flatten_solvent or o.solvent_mask:
        vol = vol * mask3d
    for h in range(2):
        bp = BackProjector(n, r_max=r_max, device=device)
        bp.acc = res.acc[h].to(device).clone()
        unfil = bp.reconstruct(symmetry_ops=ops).cpu().numpy()
        with atomic_path(job / f"run_half{h + 1}_class001_unfil.mrc") as tmp:
            write_map(tmp, unfil, apix)
    with atomic_path(job / "run_class001.mrc") as tmp:
        write_map(tmp, vol, apix)
    info = dict(info, tau2=[tau2])
    general = dict(_general(ps, st, o), rlnCurrentResolution=_angstrom(fsc, FSC_FINAL, n, apix),
                   rlnCurrentImageSize=n)
    with atomic_path(job / "run_model.star") as tmp:
        write_star(tmp, model_star_blocks(ps, [str(job / "run_class001.mrc")], np.ones(1), info, st.sigma2,
                                          st.group_scale, general))
    with atomic_path(job / "run_data.star") as tmp:
        _data_table(ps, st).write(tmp)


# ---- command line: ``spa3d refine3d`` ----

DESCRIPTION = ("Gold-standard 3D auto-refinement (RELION's Refine3D): two independent half sets, angular sampling "
               "made finer automatically down to local searches, resolution from the half maps' FSC. Writes RELION's "
               "run_itNNN_half{1,2}_class001.mrc, run_class001.mrc, run_half{1,2}_class001_unfil.mrc, run_model.star "
               "and run_data.star in --o.")

CLI_OPTIONS = {"angular_sampling": "healpix_order", "healpix_order": "healpix_order", "offset_range": "offset_range",
               "offset_step": "offset_step", "auto_local_healpix_order": "auto_local_healpix_order",
               "ini_high": "ini_high", "particle_diameter": "particle_diameter", "zero_mask": "zero_mask",
               "flatten_solvent": "flatten_solvent", "solvent_mask": "solvent_mask", "rescale_ref": "rescale_ref",
               "ctf": "ctf",
               "ctf_intact_first_peak": "ctf_intact_first_peak", "ctf_phase_flipped": "ctf_phase_flipped",
               "firstiter_cc": "firstiter_cc", "perturb": "perturb", "norm": "norm_correction", "sym": "symmetry",
               "tau2_fudge": "tau2_fudge",
               "max_iter": "max_iter", "low_resol_join_halves": "low_resol_join_halves",
               "no_align_halves": "align_halves", "unmasked_reconstruction": "unmasked_reconstruction",
               "masked_reconstruction": "masked_reconstruction",
               "no_prepass": "prepass_from_order",
               "batch_size": "batch_size", "seed": "seed", "device": "device",
               "threads": "threads", "workers": "workers", "dask_scheduler": "dask_scheduler", "dry_run": "dry_run"}


def add_args(p) -> None:
    from spa3d.jobs.args import add_job_output, add_ml_options, add_run_options

    p.add_argument("--i", default=None, help="particle STAR file")
    p.add_argument("--ref", default=None, help="reference map (.mrc), same box and pixel size as the particles")
    add_job_output(p, "job directory")
    add_ml_options(p, ini_high=60.0, maps="half maps")
    p.add_argument("--auto-local-healpix-order", type=int, default=4,
                   help="local searches from this HEALPix order on (default 4: 1.8°)")
    p.add_argument("--solvent-mask", default=None, help="reference mask (.mrc, 0..1) applied to the half maps")
    p.add_argument("--rescale-ref", action="store_true", help="resample a reference of another pixel size and cut "
                   "or pad it to the particles' box (as relion_image_handler --rescale_angpix --new_box)")
    p.add_argument("--tau2-fudge", type=float, default=1.0, help="regularisation parameter T (default 1)")
    p.add_argument("--low-resol-join-halves", type=float, default=40.0,
                   help="the half sets share their maps below this resolution in Å (RELION's GUI: 40; 0: never)")
    p.add_argument("--no-align-halves", action="store_true",
                   help="never turn a half set that settled in the other hand or frame onto the first (RELION's way)")
    rec = p.add_mutually_exclusive_group()
    rec.add_argument("--unmasked-reconstruction", action="store_true",
                     help="back-project the particles without the mask that the E-step applies at every frequency "
                     "(RELION's way; default: the masked particles up to the frequency whose CTF delocalisation "
                     "reaches the mask's radius, the unmasked ones beyond; docs/conventions.md)")
    rec.add_argument("--masked-reconstruction", action="store_true",
                     help="back-project the masked particles at every frequency")
    p.add_argument("--no-prepass", action="store_true",
                   help="score the whole 3.75° grid in the global searches and every coarse rotation of the local "
                   "ones, as RELION, instead of first scoring the 7.5° grid (every other local rotation) and then "
                   "only the rotations near its likely ones (docs/design.md)")
    p.add_argument("--max-iter", type=int, default=50, help="stop after this many iterations even if not converged "
                   "(then without the final maps, as RELION's --iter; --continue with a larger value goes on; default 50)")
    add_run_options(p)


def main(a) -> None:
    from spa3d.jobs.args import given_options, ml_option_values, start_log

    o = Refine3dOptions(auto_local_healpix_order=a.auto_local_healpix_order, solvent_mask=a.solvent_mask,
                        rescale_ref=a.rescale_ref, tau2_fudge=a.tau2_fudge, max_iter=a.max_iter,
                        low_resol_join_halves=a.low_resol_join_halves, align_halves=not a.no_align_halves,
                        unmasked_reconstruction=a.unmasked_reconstruction,
                        masked_reconstruction=a.masked_reconstruction,
                        prepass_from_order=0 if a.no_prepass else 3, **ml_option_values(a))
    start_log(a)
    run_refine3d(a.i, a.ref, a.o, o, continue_from=a.continue_from, given=given_options(a, CLI_OPTIONS))
