"""``spa3d class3d``: maximum-likelihood 3D classification (RELION 3.1's Class3D job).

Model (shared/docs/relion_spec.md): each image is a CTF-modulated projection
of one of K maps, shifted, plus Gaussian noise with a power spectrum σ²
(one per shell). Every iteration runs over all particles:

- E-step: posterior over (class, translation, rotation) with class priors
  π_k and a Gaussian prior (σ_off) on the particle's total offset, searched
  coarse-to-fine (:mod:`spa3d.inference.search`);
- M-step: each class is reconstructed from the posterior-weighted images,
  regularised by T·τ² (τ² from the class map's power, T = ``tau2_fudge``);
  σ², π_k, σ_off and the per-group image scale are re-estimated; the
  resolution of the next iteration is the last shell whose spectral SNR
  (τ²·Σ CTF²/σ²) exceeds 1, plus ``incr_size`` shells (as RELION).

The first iteration starts from the reference low-passed to ``ini_high`` Å.
With K > 1, particles are divided at random over the classes in the first
iteration (RELION does the same) so that the classes can differ. With
``firstiter_cc`` the first iteration scores by cross-correlation and the best
pose takes all the weight (for references not on the data's greyscale).

Empty classes are kept (reported in the log, their map unchanged), as RELION
keeps them: re-seeding would change the number of classes the user asked for.

Outputs in the job directory every iteration, with RELION's names:
run_itNNN_classKKK.mrc, run_itNNN_model.star, run_itNNN_data.star,
run_itNNN_optimiser.star (and run_itNNN_state.npz, which
``--continue run_itNNN_optimiser.star`` resumes from), plus run.log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from spa3d.backend.device import free_memory_bytes
from spa3d.errors import InputError
from spa3d.fourier.backprojector import BackProjector, half_map_fsc
from spa3d.fourier.ctf import ctf_half_plane, wavelength_angstrom
from spa3d.fourier.filters import lowpass, power_spectrum, relion_power, soft_sphere
from spa3d.fourier.grid import half_plane_radius, rfft2_centered, shift_half_plane
from spa3d.fourier.projector import Projector
from spa3d.geometry.euler import euler_to_matrix, matrix_to_euler
from spa3d.geometry.sampling import angular_step, oversampled_orientations, oversampled_translations, psi_angles
from spa3d.geometry.symmetry import symmetry_matrices
from spa3d.inference.likelihood import FourierPixels, residual_power, residual_power_terms
from spa3d.inference.local_search import local_prepass_cells, local_rotations, local_search_batch
from spa3d.inference.pruned_search import (PREPASS_MAX_ROTATIONS, PREPASS_REACH, PrePass, make_prepass,
                                          pruned_search_batch)
from spa3d.inference.search import SearchGrid, coarse_radius, make_search_grid, search_batch
from spa3d.io.atomic_write import atomic_path
from spa3d.io.mrc import read_map, write_map
from spa3d.io.particles import ParticleSet
from spa3d.io.star import write_star
from spa3d.jobs.progress import EStepRate, Progress
from spa3d.jobs.resume import IterationFiles, append_options_block, load_continued, prepare_continue, start_job

log = logging.getLogger("spa3d")

MIN_RESOLUTION_SHELLS = 5  # RELION's --minres_map: the resolution never falls below this shell
FSC_THRESHOLD = 0.143  # the next E-step reaches incr_size shells beyond where the half sets' FSC falls below this
# a class's reported resolution (rlnEstimatedResolution): where its half sets' FSC falls below this. Both halves are
# aligned to the same reference, so their FSC runs higher than independent halves' would: at 0.143 it read up to
# 2 shells finer than the map's FSC 0.143 against the truth on the class3d benchmark's D2 mixture; at 0.5 it is
# never finer (benchmarks/class3d_vs_relion.py)
FSC_REPORTED = 0.5


def random_halves(ps: ParticleSet, seed: int) -> np.ndarray:
    """Half set (0 or 1) of every particle: rlnRandomSubset (1, 2) where the STAR has it, else random (seeded)."""
    if "rlnRandomSubset" in ps.table.particles:
        sub = np.asarray(ps.column("rlnRandomSubset", 1)).astype(int)
        if set(np.unique(sub)) <= {1, 2}:
            return sub - 1
    return np.random.default_rng([seed, 2]).integers(0, 2, len(ps))


def resolution_shell(fsc: np.ndarray, threshold: float) -> float:
    """Last shell (from 1) before the FSC first falls below ``threshold``; 0 when shell 1 already does."""
    below = np.nonzero(fsc[1:] < threshold)[0]
    return float(below[0]) if len(below) else float(len(fsc) - 1)


def _class_fsc(acc1: torch.Tensor, acc2: torch.Tensor, n: int, r_cur: float, ops, device) -> np.ndarray:
    """FSC (n//2+1 shells) of a class's two half sets, from their back-projector accumulators."""
    halves = []
    for acc in (acc1, acc2):
        bp = BackProjector(n, r_max=r_cur, device=device)
        bp.acc = acc.to(device).clone()
        halves.append(bp)
    curve = np.nan_to_num(half_map_fsc(halves[0], halves[1], ops, cropped=True))
    curve[np.arange(len(curve)) > r_cur] = 0.0  # no data beyond the E-step's radius
    return curve


@dataclass
class Class3dOptions:
    """Options of a classification run; lengths in Å unless named ``_px``."""

    n_classes: int = 4
    n_iter: int = 25
    tau2_fudge: float = 4.0
    healpix_order: int = 2  # coarse order; the fine search is one order finer (GUI 7.5° = order 2)
    offset_range: float = 5.0  # pixels
    offset_step: float = 1.0  # pixels
    ini_high: float = 50.0
    particle_diameter: float | None = None
    zero_mask: bool = False
    flatten_solvent: bool = False
    ctf: bool = False
    ctf_intact_first_peak: bool = False
    ctf_phase_flipped: bool = False
    firstiter_cc: bool = False
    symmetry: str = "C1"
    strict_highres_exp: float = -1.0
    skip_align: bool = False
    sigma_ang: float = -1.0  # degrees; > 0: local searches around the previous pose
    perturb: float = 0.5  # RELION's --perturb: the global search grid moves by up to this fraction of its steps
    direction_prior: bool = False  # RELION's pdf_direction, a prior over (class, viewing direction): off (measured)
    norm_correction: bool = True  # RELION's --norm (on in its GUI): each image scaled to the average noise level
    incr_size: int = 10
    adaptive_fraction: float = 0.999
    max_significant: int = 256
    marginalise_broad: bool = False
    # global searches at this HEALPix order or finer first score the grid one order coarser and then only the
    # rotations near its significant samples (inference.pruned_search; not RELION's); 0: never
    prepass_from_order: int = 0
    prepass_max_rotations: int = PREPASS_MAX_ROTATIONS  # pre-pass rotations an image keeps at most
    # local searches: > 0 scores every other coarse rotation first and then only the cells of those within this
    # many nats of the image's best (inference.local_search; not RELION's); 0: every coarse rotation
    local_prepass_margin: float = 0.0
    coarse_warmup: bool = True
    fast_subsets: bool = False
    coarse_radius_px: float | None = None  # radius of the coarse pass (default from the coarse step)
    initial_sigma_offset: float = 10.0  # Å
    batch_size: int | None = None
    seed: int = 0
    device: str | None = None
    threads: int | None = None
    workers: int = 0  # > 0: run the E-step on a local Dask cluster of this many worker processes
    dask_scheduler: str | None = None  # address of an existing dask.distributed scheduler
    estimate: bool = True  # log the expected wall time and memory first (a short calibration)
    dry_run: bool = False  # only print that estimate


@dataclass
class Class3dState:
    """Everything a continued run needs besides the class maps."""

    iteration: int
    sigma2: np.ndarray  # (n//2+1,) noise power per shell
    class_fractions: np.ndarray  # (K,)
    sigma_offset_px: float
    group_scale: np.ndarray  # (G,) per rlnGroupNumber
    r_current: float  # E-step radius of the next iteration, cycles per box
    best_resolution_shell: float
    offsets_px: np.ndarray  # (N, 2)
    angles: np.ndarray  # (N, 3) degrees
    classes: np.ndarray  # (N,) 1-based, 0 = not yet assigned
    map_radius: float = 0.0  # radius (cycles per box) up to which the class maps hold data
    stats: dict = field(default_factory=dict)  # per-particle columns of the last iteration
    rng_state: dict = field(default_factory=dict)
    pdf_direction: np.ndarray | None = None  # (K, D) prior of (class, direction) at HEALPix order pdf_direction_order
    pdf_direction_order: int = -1
    norm: np.ndarray | None = None  # (N,) RELION's rlnNormCorrection of every particle (None: not corrected)
    avg_norm: float = 1.0  # their average (model.star's rlnNormCorrectionAverage)


def _save_state(path: Path, st: Class3dState) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, iteration=st.iteration, sigma2=st.sigma2, class_fractions=st.class_fractions,
                     sigma_offset_px=st.sigma_offset_px, group_scale=st.group_scale, r_current=st.r_current,
                     best_resolution_shell=st.best_resolution_shell, offsets_px=st.offsets_px, angles=st.angles,
                     classes=st.classes, map_radius=st.map_radius, **{f"stat_{k}": v for k, v in st.stats.items()},
                     **({} if st.pdf_direction is None else {"pdf_direction": st.pdf_direction,
                                                            "pdf_direction_order": st.pdf_direction_order}),
                     **({} if st.norm is None else {"norm": st.norm, "avg_norm": st.avg_norm}),
                     rng=np.frombuffer(json.dumps(st.rng_state).encode(), dtype=np.uint8))


def _load_state(path: Path) -> Class3dState:
    with np.load(path) as z:
        stats = {k[5:]: z[k].copy() for k in z.files if k.startswith("stat_")}
        return Class3dState(int(z["iteration"]), z["sigma2"].copy(), z["class_fractions"].copy(),
                            float(z["sigma_offset_px"]), z["group_scale"].copy(), float(z["r_current"]),
                            float(z["best_resolution_shell"]), z["offsets_px"].copy(), z["angles"].copy(),
                            z["classes"].copy(), float(z["map_radius"]), stats, json.loads(bytes(z["rng"]).decode()),
                            z["pdf_direction"].copy() if "pdf_direction" in z.files else None,
                            int(z["pdf_direction_order"]) if "pdf_direction_order" in z.files else -1,
                            z["norm"].copy() if "norm" in z.files else None,
                            float(z["avg_norm"]) if "avg_norm" in z.files else 1.0)


def _image_mask(n: int, radius_px: float) -> torch.Tensor:
    return torch.as_tensor(soft_sphere(n, radius_px, 5.0, ndim=2))


def _prepare_images(imgs: np.ndarray, mask: torch.Tensor, zero_mask: bool, rng: np.random.Generator) -> torch.Tensor:
    """Images with the particle circle kept and the outside zeroed (zero_mask) or filled with matching noise."""
    x = torch.as_tensor(imgs, dtype=torch.float32)
    if zero_mask:
        return x * mask
    outside = mask < 1e-3
    std = x[:, outside].std(1)
    noise = torch.as_tensor(rng.standard_normal(x.shape), dtype=torch.float32) * std[:, None, None]
    return x * mask + noise * (1 - mask)


def _groups(ps: ParticleSet) -> np.ndarray:
    """0-based group index of every particle (rlnGroupNumber, else the optics group)."""
    g = ps.column("rlnGroupNumber", None) if "rlnGroupNumber" in ps.table.particles else None
    if g is None:
        g = ps.column("rlnOpticsGroup", 1)
    _, inv = np.unique(np.asarray(g).astype(int), return_inverse=True)
    return inv


def open_particles(star: str | None, ctf: bool) -> ParticleSet:
    """The particles of a refinement or classification, checked: given, and with CTF columns when ``ctf``."""
    if star is None:
        raise InputError(None, "--i particles.star is required")
    ps = ParticleSet(star)
    if ctf and not ps.has_ctf():
        raise InputError(star, "CTF correction (on by default) needs rlnDefocusU/V, rlnVoltage and "
                               "rlnSphericalAberration; give --no-ctf for particles without CTF")
    return ps


def load_reference(ref: str, ps: ParticleSet, ini_high: float | None, rescale: bool = False) -> np.ndarray:
    """The reference map, checked against the particles' box and pixel size, low-passed to ``ini_high`` Å.

    With ``rescale`` a reference of another pixel size or box is resampled to the particles' pixel size and
    cut or padded to their box (:func:`spa3d.maps.transform.rescale_map`) instead of being refused.
    """
    n, apix = ps.box, ps.pixel_size
    vol, ref_apix = read_map(ref)
    if rescale and (vol.shape != (n, n, n) or (ref_apix > 0 and abs(ref_apix - apix) > 0.01 * apix)):
        from spa3d.maps.transform import rescale_map

        if vol.shape[0] != vol.shape[1] or vol.shape[1] != vol.shape[2]:
            raise InputError(ref, f"reference is not a cube: {vol.shape}")
        vol, got = rescale_map(vol, ref_apix if ref_apix > 0 else apix, apix, n)
        log.info(f"reference {ref} rescaled to {got:.4f} Å/px (particles {apix:.4f}) and box {n}")
        ref_apix = apix
    if vol.shape != (n, n, n):
        raise InputError(ref, f"reference is {vol.shape[2]}x{vol.shape[1]}x{vol.shape[0]}, particles are {n} pixels "
                              "(rescale it: relion_image_handler --angpix --rescale_angpix --new_box)")
    if ref_apix > 0 and abs(ref_apix - apix) > 0.01 * apix:
        raise InputError(ref, f"reference pixel size {ref_apix:.3f} Å differs from the particles' {apix:.3f} Å")
    if ini_high and ini_high > 0:
        vol = lowpass(vol, apix, ini_high)
    return vol


def initial_sigma2(ps: ParticleSet, mask: torch.Tensor, o: Class3dOptions, rng: np.random.Generator) -> np.ndarray:
    """Noise power per shell to start from: of (up to 1,000) masked images, the mean power less the average image's.

    As RELION (ml_optimiser.cpp, calculateSumOfPowerSpectraAndAverageImage):
    the power of the images' average is the part of their power that is
    signal common to all, not noise.
    """
    n = ps.box
    idx = np.sort(rng.choice(len(ps), size=min(len(ps), 1000), replace=False))
    x = rfft2_centered(_prepare_images(ps.read(idx), mask, o.zero_mask, rng))
    px = FourierPixels.make(n, n // 2)
    xp = px.take(x)
    p = ((xp.abs() ** 2).mean(0) - xp.mean(0).abs() ** 2).double()
    s = torch.zeros(n // 2 + 1, dtype=torch.float64).index_add_(0, px.shell, p)
    c = torch.zeros(n // 2 + 1, dtype=torch.float64).index_add_(0, px.shell, torch.ones_like(p))
    return (s / c.clamp_min(1)).numpy()


#: a reference whose projections hold more than this many times the particles' power (shells up to the initial
#: low-pass) cannot be on their greyscale: signal plus noise always holds more than the signal
GREYSCALE_RATIO_MAX = 4.0


def greyscale_ratio(ps: ParticleSet, vol: np.ndarray, mask: torch.Tensor, o, ini_high: float | None,
                    n_sample: int = 200) -> float:
    """Power of the (low-passed) reference's projections, with the particles' CTFs, over the power of the masked
    particle images, in the shells 1 … box·pixel/ini_high (at least 2): about 1 or less for a reference on the
    particles' absolute greyscale (a RELION map of these particles, the projections they were made from), far
    above it for a map from an atomic model or another program (the Gaussian noise model then scores the
    reference's power, not the data: sharp, wrong poses; RELION's answer is --firstiter_cc).

    ``o`` holds ``ctf``, ``ctf_intact_first_peak``, ``ctf_phase_flipped``, ``zero_mask`` and ``seed``; projections
    at random rotations (their average power equals that at the true ones), of up to ``n_sample`` particles."""
    from scipy.spatial.transform import Rotation

    n, apix = ps.box, ps.pixel_size
    rng = np.random.default_rng([o.seed, 23])  # its own stream: the run's random numbers are unchanged
    idx = np.sort(rng.choice(len(ps), size=min(len(ps), n_sample), replace=False))
    x = rfft2_centered(_prepare_images(ps.read(idx), mask, o.zero_mask, rng))
    rots = torch.as_tensor(Rotation.random(len(idx), random_state=int(rng.integers(1 << 31))).as_matrix(),
                           dtype=torch.float32)
    r_ini = max(2.0, n * apix / ini_high) if ini_high and ini_high > 0 else n / 2
    # unpadded, to r_ini: a few low shells need no finer interpolation (box 256: 5.3 s and 1.7 GB with pad 2)
    p = Projector(vol, pad=1, r_max=min(n // 2, r_ini + 2)).project(rots)
    if o.ctf:
        p = p * ctf_half_plane(ps.ctf_params(idx), n, apix, intact_first_peak=o.ctf_intact_first_peak,
                               phase_flipped=o.ctf_phase_flipped).to(torch.float32)
    ky = torch.fft.fftfreq(n) * n
    r = torch.sqrt(ky[:, None] ** 2 + torch.arange(n // 2 + 1, dtype=torch.float32)[None, :] ** 2)
    shells = (r >= 0.5) & (r <= r_ini)
    power_x = float((x.abs() ** 2)[:, shells].mean())
    return float((p.abs() ** 2)[:, shells].mean()) / max(power_x, 1e-30)


def check_greyscale(ps: ParticleSet, vol: np.ndarray, mask: torch.Tensor, o, ini_high: float | None) -> bool:
    """True (and a line in the log) when the reference is far off the particles' greyscale
    (:func:`greyscale_ratio` above ``GREYSCALE_RATIO_MAX``): the caller then scores the first iteration by
    cross-correlation, as --firstiter-cc (RELION's GUI does so unless told the map is on absolute greyscale)."""
    ratio = greyscale_ratio(ps, vol, mask, o, ini_high)
    if ratio <= GREYSCALE_RATIO_MAX:
        return False
    log.info(f"the reference's projections hold {ratio:.3g}x the particles' power up to {ini_high or 0:g} Å: it is "
             "not on their greyscale (a map from an atomic model or another program?); the first iteration "
             "scores by cross-correlation, as --firstiter-cc")
    return True


def _batch_size(o: Class3dOptions, k_cls: int, n_coarse: int, device: torch.device) -> int:
    """Images per batch so that the coarse log-likelihoods (B·K·Tc·Rc floats, ×3 for work) fit in memory."""
    if o.batch_size:
        return int(o.batch_size)
    budget = min(free_memory_bytes(device) // 4, 1 << 30 if device.type == "cpu" else 8 << 30)
    return int(np.clip(budget // (3 * 4 * k_cls * n_coarse), 8, 512))


def _write_iteration(job: Path, ps: ParticleSet, maps: np.ndarray, st: Class3dState, o: Class3dOptions,
                     class_info: dict) -> None:
    """Write iteration ``st.iteration``'s files; they appear together, the optimiser.star last."""
    with IterationFiles(job, st.iteration) as files:
        _write_iteration_files(files, job, ps, maps, st, o, class_info)


def _write_iteration_files(files: IterationFiles, job: Path, ps: ParticleSet, maps: np.ndarray, st: Class3dState,
                           o: Class3dOptions, class_info: dict) -> None:
    it, apix = st.iteration, ps.pixel_size
    names = []
    for k in range(len(maps)):
        name = job / f"run_it{it:03d}_class{k + 1:03d}.mrc"
        write_map(files.path(name), maps[k], apix)
        names.append(str(name))
    general = {"rlnCurrentResolution": float(ps.box * apix / max(st.best_resolution_shell, 1e-3)),
               "rlnCurrentImageSize": int(min(ps.box, 2 * round(st.r_current))), "rlnTau2FudgeFactor": o.tau2_fudge,
               "rlnSigmaOffsetsAngst": st.sigma_offset_px * apix, "rlnNormCorrectionAverage": st.avg_norm}
    write_star(files.path(job / f"run_it{it:03d}_model.star"),
               model_star_blocks(ps, names, st.class_fractions, class_info, st.sigma2, st.group_scale, general))
    particles_table(ps, st.angles, st.offsets_px, st.classes, norm_stats(st)).write(
        files.path(job / f"run_it{it:03d}_data.star"))
    _save_state(files.path(job / f"run_it{it:03d}_state.npz"), st)
    optimiser = files.path(job / f"run_it{it:03d}_optimiser.star")
    write_star(optimiser, {"optimiser_general": {
        "rlnOutputRootName": str(job / "run"), "rlnModelStarFile": str(job / f"run_it{it:03d}_model.star"),
        "rlnExperimentalDataStarFile": str(job / f"run_it{it:03d}_data.star"),
        "rlnOrientSamplingStarFile": "None", "rlnCurrentIteration": it, "rlnNumberOfIterations": o.n_iter,
        "rlnRandomSeed": o.seed, "rlnTau2FudgeFactor": o.tau2_fudge, "rlnClass3dStateFile":
        str(job / f"run_it{it:03d}_state.npz"), "rlnClass3dInputStarFile": str(Path(ps.star_path).resolve())}})
    append_options_block(optimiser, o, {"input_star": str(Path(ps.star_path).resolve())})


def model_star_blocks(ps: ParticleSet, names: list[str], class_fractions: np.ndarray, class_info: dict,
                      sigma2: np.ndarray, group_scale: np.ndarray, general: dict) -> dict:
    """The blocks of a RELION model.star (3D classification or refinement) for the maps ``names``.

    class_info: per class "accuracy_rot" (degrees), "accuracy_trans" (Å),
    "resolution" (Å), "completeness" and per class and shell "ssnr", "fsc",
    "shell_completeness", "tau2"; optionally "log_likelihood", "average_pmax".
    ``general`` adds to (or replaces) model_general's values. ``sigma2`` (noise power) in spa3d's units and
    "tau2" as spa3d's reconstructions take it (τ²/σ²); written in RELION's units (:func:`relion_power`).
    """
    n, apix = ps.box, ps.pixel_size
    k_cls = len(names)
    nsh = n // 2 + 1
    sigma2_r = relion_power(sigma2, n)
    shells = np.arange(nsh)
    res_inv = shells / (n * apix)
    ang_res = np.where(shells > 0, n * apix / np.maximum(shells, 1), 999.0)
    gen = {"rlnReferenceDimensionality": 3, "rlnDataDimensionality": 2, "rlnOriginalImageSize": n,
           "rlnCurrentResolution": 0.0, "rlnCurrentImageSize": n, "rlnPaddingFactor": 2,
           "rlnIsHelix": 0, "rlnFourierSpaceInterpolator": 1, "rlnMinRadiusNnInterpolation": 10,
           "rlnPixelSize": apix, "rlnNrClasses": k_cls, "rlnNrBodies": 1, "rlnNrGroups": len(group_scale),
           "rlnTau2FudgeFactor": 1.0, "rlnNormCorrectionAverage": 1.0,
           "rlnSigmaOffsetsAngst": 0.0, "rlnOrientationalPriorMode": 0,
           "rlnSigmaPriorRotAngle": 0.0, "rlnSigmaPriorTiltAngle": 0.0, "rlnSigmaPriorPsiAngle": 0.0,
           "rlnLogLikelihood": float(class_info.get("log_likelihood", 0.0)),
           "rlnAveragePmax": float(class_info.get("average_pmax", 0.0))}
    gen.update(general)
    classes = pd.DataFrame({
        "rlnReferenceImage": names, "rlnClassDistribution": class_fractions,
        "rlnAccuracyRotations": class_info["accuracy_rot"], "rlnAccuracyTranslationsAngst": class_info["accuracy_trans"],
        "rlnEstimatedResolution": class_info["resolution"], "rlnOverallFourierCompleteness": class_info["completeness"],
        "rlnClassPriorOffsetX": 0.0, "rlnClassPriorOffsetY": 0.0})
    blocks = {"model_general": gen, "model_classes": classes}
    for k in range(k_cls):
        # RELION's units: τ² a signal power like σ² (spa3d's reconstructions take τ²/σ²), the reference's σ² the
        # noise power of the reconstruction, τ²/SSNR (RELION: 1 / the mean data weight)
        tau2 = np.asarray(class_info["tau2"][k]) * sigma2_r
        ssnr = np.asarray(class_info["ssnr"][k])
        ref_sigma2 = np.where((ssnr > 1e-12) & (tau2 > 0), tau2 / np.maximum(ssnr, 1e-12), 0.0)
        blocks[f"model_class_{k + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": shells, "rlnResolution": res_inv, "rlnAngstromResolution": ang_res,
            "rlnSsnrMap": ssnr, "rlnGoldStandardFsc": class_info["fsc"][k],
            "rlnFourierCompleteness": class_info["shell_completeness"][k],
            "rlnReferenceSigma2": ref_sigma2, "rlnReferenceTau2": tau2,
            "rlnSpectralOrientabilityContribution": 0.0})
    counts = np.bincount(_groups(ps), minlength=len(group_scale))
    blocks["model_groups"] = pd.DataFrame({"rlnGroupNumber": np.arange(1, len(group_scale) + 1),
                                           "rlnGroupName": [f"group_{g + 1}" for g in range(len(group_scale))],
                                           "rlnGroupNrParticles": counts, "rlnGroupScaleCorrection": group_scale})
    for g in range(len(group_scale)):
        blocks[f"model_group_{g + 1}"] = pd.DataFrame({"rlnSpectralIndex": shells, "rlnResolution": res_inv,
                                                       "rlnSigma2Noise": sigma2_r})
    return blocks



def norm_stats(st) -> dict:
    """A state's per-particle statistics with its normalisation corrections ("norm"), for :func:`particles_table`."""
    return st.stats if st.norm is None else {**st.stats, "norm": st.norm}


def input_norm(ps: ParticleSet) -> np.ndarray:
    """The particles' rlnNormCorrection where the STAR file has (positive) values, else 1 (RELION's start)."""
    p = ps.table.particles
    if "rlnNormCorrection" not in p:
        return np.ones(len(p))
    v = np.asarray(p["rlnNormCorrection"], dtype=float)
    return np.where(np.isfinite(v) & (v > 0), v, 1.0)


def update_norm(norm: np.ndarray, avg_norm: float, idx: np.ndarray, residual: np.ndarray, n: int) -> float:
    """RELION's normalisation correction (ml_optimiser.cpp, storeWeightedSums), in place on ``norm[idx]``.

    residual: each image's posterior-weighted residual power Σ p·Σ m|X·S − C·P|² over the E-step's pixels plus
    its power Σ m|X|² beyond them (spa3d's unnormalised FFT: Σ over the half plane with multiplicities is
    n² × the real-space Σ), of the image already scaled by ``avg_norm / norm``. The new correction is the old
    one / ``avg_norm`` × the residual's real-space RMS per pixel, so it tends to each image's own noise level.
    Returns the new average over ``idx`` (RELION: over the particles of the iteration).
    """
    rms = np.sqrt(np.maximum(residual, 0.0)) / float(n) ** 2
    norm[idx] = norm[idx] / avg_norm * rms
    return float(norm[idx].mean())


def particles_table(ps: ParticleSet, angles: np.ndarray, offsets_px: np.ndarray, classes: np.ndarray, stats: dict):
    """The particles' table with their poses (degrees; offsets in pixels, written in Å), classes and statistics."""
    table = ps.table.copy()
    p = table.particles
    rot, tilt, psi = angles.T
    p["rlnAngleRot"], p["rlnAngleTilt"], p["rlnAnglePsi"] = rot, tilt, psi
    p["rlnOriginXAngst"] = offsets_px[:, 0] * ps.pixel_size
    p["rlnOriginYAngst"] = offsets_px[:, 1] * ps.pixel_size
    p["rlnClassNumber"] = classes.astype(int)
    p["rlnNormCorrection"] = stats.get("norm", 1.0)
    p["rlnLogLikeliContribution"] = stats.get("log_likelihood", np.zeros(len(p)))
    p["rlnMaxValueProbDistribution"] = stats.get("pmax", np.zeros(len(p)))
    p["rlnNrOfSignificantSamples"] = np.asarray(stats.get("n_significant", np.zeros(len(p)))).astype(int)
    return table


def _spectral_snr(bp: BackProjector, ops, tau2: np.ndarray):
    """Spectral SNR per shell (RELION's data-vs-prior) and per voxel, with each voxel's shell.

    Per voxel W·τ² (τ² over σ², W the original-grid weight): it is below 1
    in shells where the map holds little power, whatever the data there, so
    the resolution it gives follows the maps (ml_optimiser.cpp, data_vs_prior).
    """
    _, wvox, shell = bp.shell_weights(ops)
    nsh = len(tau2)
    t2 = torch.as_tensor(tau2, device=wvox.device)[shell.clamp_max(nsh - 1)]
    ratio = wvox * t2
    inside = shell < nsh
    total = torch.zeros(nsh, dtype=torch.float64, device=wvox.device).index_add_(0, shell[inside], ratio[inside])
    cnt = torch.zeros(nsh, dtype=torch.float64, device=wvox.device).index_add_(0, shell[inside],
                                                                               torch.ones_like(ratio[inside]))
    return (total / cnt.clamp_min(1)).cpu().numpy(), ratio, shell


def iteration_subset(o: Class3dOptions, it: int, n_part: int, rng: np.random.Generator) -> np.ndarray:
    """Particles visited in iteration ``it`` (sorted indices).

    All of them, or with ``fast_subsets`` (RELION's --fast_subsets) random
    subsets: K·1,500 particles in iterations 1–5, K·4,500 in 6–10, the larger
    of K·4,500 and 30 % of the data in 11–15 (ml_optimiser.cpp), then all.
    """
    if not o.fast_subsets:
        return np.arange(n_part)
    size = (o.n_classes * 1500 if it <= 5 else o.n_classes * 4500 if it <= 10
            else max(o.n_classes * 4500, int(0.3 * n_part)) if it <= 15 else n_part)
    if size >= n_part:
        return np.arange(n_part)
    return np.sort(rng.choice(n_part, size=size, replace=False))


def warmup_iterations(o: Class3dOptions) -> int:
    """Iterations searched one HEALPix order coarser before the requested sampling (finer than 15° only).

    A deliberate difference from RELION: with 7.5° from the first iteration,
    the classes of the class3d benchmark's mixture split by view instead of
    by species (adjusted Rand index 0.55 on 400 particles, K=3, 8
    iterations); searching the first third of the iterations at 15° gives
    clean classes (see docs/design.md), and costs less.
    """
    if o.healpix_order < 2 or o.skip_align or o.sigma_ang > 0 or not o.coarse_warmup:
        return 0
    return o.n_iter // 3


@dataclass
class EStepChunk:
    """One chunk of an iteration's E-step: what a worker needs (picklable, sent to Dask workers).

    Per-particle arrays are those of ``indices`` (rows of the STAR file); batches
    are cut from ``indices`` in order, batch ``first_batch + j`` seeding its own
    random numbers from (seed, iteration, batch number), so that any split of
    an iteration into chunks (at batch boundaries) gives the same result.
    """

    star: str
    project_dir: str
    indices: np.ndarray
    first_batch: int
    batch_size: int
    iteration: int
    seed: int
    maps: np.ndarray  # (K, n, n, n)
    sigma2: np.ndarray
    class_fractions: np.ndarray
    sigma_offset_px: float
    offsets_px: np.ndarray  # (B, 2) of indices
    angles: np.ndarray  # (B, 3) of indices
    scale: np.ndarray  # (B,) group scale of each particle
    groups: np.ndarray  # (B,) 0-based group of each particle
    n_groups: int
    allowed: np.ndarray  # (B,) class a particle may take in iteration 1, -1 = any
    halves: np.ndarray | None  # (B,) random half set (0, 1) of each particle (the classes' FSC); None: sums per class
    options: Class3dOptions
    order: int
    r_cur: float
    r_coarse: float
    hard: bool
    radius_px: float
    device: str
    threads: int | None = None
    pdf_direction: np.ndarray | None = None  # (K, D) RELION's prior of (class, direction) at ``order``; None: none
    norm_factor: np.ndarray | None = None  # (B,) each image's scale avg_norm / norm (RELION's --norm); None: none
    unmasked_recon: bool = False  # back-project the unmasked images (refine3d; see estep_chunk)
    # > 0 (Å, refine3d): back-project the unmasked images at the frequencies whose CTF delocalisation exceeds
    # this radius, the masked ones below (see estep_chunk)
    recon_split_radius: float = 0.0


@dataclass
class EStepResult:
    """What a chunk returns: per-particle results (rows ``indices``) and the M-step accumulators."""

    indices: np.ndarray
    offsets_px: np.ndarray
    angles: np.ndarray
    classes: np.ndarray  # 1-based
    pmax: np.ndarray
    n_significant: np.ndarray
    log_likelihood: np.ndarray
    rot_spread: np.ndarray
    trans_spread: np.ndarray
    class_post_sum: np.ndarray
    res_terms: np.ndarray  # (3, n//2+1) terms of the posterior-weighted residual power (likelihood.residual_power_terms)
    pix_shell: np.ndarray
    xa_g: np.ndarray
    aa_g: np.ndarray
    off_sq: float
    acc: list  # per half set h and class k (index h·K + k): BackProjector accumulator tensor (D, D, h+1, 3)
    flops: float = 0.0  # floating-point operations of the E-step's products
    poses: float = 0.0  # samples scored, summed over the particles
    rot_weight: np.ndarray | None = None  # (K, Rc) Σ posterior per (class, coarse rotation), with a direction prior
    norm_residual: np.ndarray | None = None  # (B,) with norm factors: residual power of each image (update_norm)


_GRID_CACHE: dict = {}


def _search_grid(order: int, o: Class3dOptions, device: torch.device) -> SearchGrid:
    key = (order, o.symmetry, o.offset_range, o.offset_step, str(device))
    if key not in _GRID_CACHE:
        _GRID_CACHE[key] = make_search_grid(order, o.symmetry, o.offset_range, o.offset_step, device)
    return _GRID_CACHE[key]


def grid_perturbation(factor: float, seed: int, iteration: int) -> float:
    """RELION's random perturbation of the sampling for ``iteration`` (a fraction of the steps, in [−factor,
    factor)): each iteration adds a uniform draw from [factor/2, factor] to the last and wraps it
    (HealpixSampling::resetRandomlyPerturbedSampling). Drawn from (seed, iteration) alone, so that a continued
    run and every Dask worker get the same value."""
    if factor <= 0:
        return 0.0
    rng = np.random.default_rng([seed, 31415])
    p = 0.0
    for _ in range(iteration):
        p += rng.uniform(0.5 * factor, factor)
        p = (p + factor) % (2 * factor) - factor
    return float(p)


def perturbed_grid(grid: SearchGrid, order: int, o: Class3dOptions, iteration: int) -> SearchGrid:
    """The search grid of this iteration: every rotation A becomes A·R with R = Euler(p, p, p), p the
    perturbation times the coarse angular step, and every translation moves by the perturbation times the offset
    step in x and y (RELION's healpix_sampling.cpp), so that over the iterations the grid's points cover the
    gaps between them."""
    p = grid_perturbation(o.perturb, o.seed, iteration)
    if p == 0.0:
        return grid
    a = p * angular_step(order)
    r = torch.as_tensor(euler_to_matrix(np.array([a]), np.array([a]), np.array([a]))[0], dtype=grid.coarse_rot.dtype,
                        device=grid.coarse_rot.device)
    return SearchGrid(grid.coarse_rot @ r, grid.fine_rot @ r, grid.coarse_trans + p * o.offset_step,
                      grid.fine_trans + p * o.offset_step)


def chunk_prepass(o: Class3dOptions, order: int, iteration: int, grid: SearchGrid, projectors: list[Projector],
                  n: int, r_cur: float, r_coarse: float, device) -> PrePass | None:
    """A chunk's pre-pass for a global search at HEALPix ``order`` (None below ``o.prepass_from_order``): the grid
    one order coarser (perturbed as this iteration's) at its coarse radius, half this order's."""
    if not 0 < o.prepass_from_order <= order:
        return None
    pre_grid = perturbed_grid(_search_grid(order - 1, o, device), order - 1, o, iteration)
    px_p = FourierPixels.make(n, min(r_cur, float(np.ceil(r_coarse / 2))), device=device)
    return make_prepass(pre_grid.coarse_rot, grid, symmetry_matrices(o.symmetry), projectors, px_p,
                        PREPASS_REACH * angular_step(order - 1), o.prepass_max_rotations)


def split_reconstruction_images(x_masked: torch.Tensor, imgs: np.ndarray, ctf, apix: float,
                                radius: float) -> torch.Tensor | None:
    """The transforms to back-project: the masked images' (``x_masked``, (B, n, n//2+1)) at frequencies k (1/Å)
    whose CTF delocalisation λ·Δf·k (Å; Δf the mean defocus) is below ``radius`` (Å, the mask's), the unmasked
    images' (``imgs``, (B, n, n)) beyond; None where no frequency of the box reaches it (then the masked ones).

    The CTF moves the signal of frequency k by λ·Δf·k from where it lies in the particle (the gradient of
    γ = π·λ·Δf·k² over 2π), so beyond that frequency a mask of the particle's size cuts away part of the
    particle's own signal, while below it the mask only removes neighbours and noise. Measured (docs/conventions.md):
    as good as the unmasked images near Nyquist on isolated particles and as the masked ones on crowded micrographs.
    """
    n = imgs.shape[-1]
    dev = x_masked.device
    defocus = 0.5 * (np.asarray(ctf.defocus_u, dtype=np.float64) + np.asarray(ctf.defocus_v, dtype=np.float64))
    k0 = radius / np.maximum(wavelength_angstrom(ctf.voltage) * np.abs(defocus), 1e-6)  # 1/Å
    k_max = np.sqrt(2) * 0.5 / apix
    if np.all(k0 >= k_max):
        return None
    kr = half_plane_radius(n, device=dev) / (n * apix)
    beyond = kr[None] >= torch.as_tensor(k0, dtype=torch.float32, device=dev)[:, None, None]
    x_unmasked = rfft2_centered(torch.as_tensor(imgs, dtype=torch.float32)).to(dev)
    return torch.where(beyond, x_unmasked, x_masked)


def estep_chunk(ch: EStepChunk, progress: Progress | None = None) -> EStepResult:
    """E-step of one chunk of particles and their M-step sums (see :class:`EStepChunk`)."""
    o = ch.options
    if ch.threads:
        torch.set_num_threads(int(ch.threads))
    device = torch.device(ch.device)
    ps = ParticleSet(ch.star, ch.project_dir)
    n, apix = ps.box, ps.pixel_size
    k_cls = len(ch.maps)
    mask2d = _image_mask(n, ch.radius_px)
    local = o.sigma_ang > 0 and not o.skip_align
    grid = None if (o.skip_align or local) else perturbed_grid(_search_grid(ch.order, o, device), ch.order, o,
                                                               ch.iteration)
    px_f = FourierPixels.make(n, ch.r_cur, device=device)
    px_c = FourierPixels.make(n, min(ch.r_cur, ch.r_coarse), device=device)
    projectors = [Projector(ch.maps[k], r_max=min(n // 2, ch.r_cur + 2), device=device) for k in range(k_cls)]
    coarse_refs = ([projectors[k].project_pixels(grid.coarse_rot, px_c.kx, px_c.ky) for k in range(k_cls)]
                   if grid is not None else None)
    pre = None
    if grid is not None and not ch.hard and ch.pdf_direction is None and o.sigma_ang <= 0:
        pre = chunk_prepass(o, ch.order, ch.iteration, grid, projectors, n, ch.r_cur, ch.r_coarse, device)
    if local:  # each image's neighbourhood only, coarse to fine (the fine step: the order's oversampled step)
        local_grid = tuple(torch.as_tensor(a, dtype=torch.float32, device=device)
                           for a in local_rotations(angular_step(ch.order + 1), o.sigma_ang))
        local_t = [torch.as_tensor(t, dtype=torch.float32, device=device)
                   for t in oversampled_translations(o.offset_range, o.offset_step)]
        local_pre = None
        if o.local_prepass_margin > 0:
            cells = local_prepass_cells(angular_step(ch.order + 1), o.sigma_ang)
            local_pre = (torch.as_tensor(cells[0], device=device), torch.as_tensor(cells[1], device=device),
                         o.local_prepass_margin)
    # M-step sums: per class, and per random half set when ``halves`` is given (index h·K + k)
    bps = [BackProjector(n, r_max=ch.r_cur, device=device) for _ in range(k_cls if ch.halves is None else 2 * k_cls)]
    sigma2_t = torch.as_tensor(ch.sigma2, dtype=torch.float32, device=device)
    log_prior = torch.as_tensor(np.log(np.clip(ch.class_fractions, 1e-10, None)), dtype=torch.float32, device=device)
    log_dir = None
    if ch.pdf_direction is not None and grid is not None:  # (class, coarse rotation): its direction's prior
        n_psi = grid.coarse_rot.shape[0] // ch.pdf_direction.shape[1]
        with np.errstate(divide="ignore"):
            lp = np.where(ch.pdf_direction > 0, np.log(ch.pdf_direction), ZERO_PRIOR_LOG)
        log_dir = torch.as_tensor(np.repeat(lp, n_psi, axis=1), dtype=torch.float32, device=device)
    m = len(ch.indices)
    out = EStepResult(ch.indices, ch.offsets_px.copy(), ch.angles.copy(), np.zeros(m, dtype=int), np.zeros(m),
                      np.zeros(m, dtype=int), np.zeros(m), np.zeros(m), np.zeros(m), np.zeros(k_cls),
                      np.zeros((3, n // 2 + 1)), np.zeros(n // 2 + 1), np.zeros(ch.n_groups), np.zeros(ch.n_groups), 0.0, [])
    norm = ch.norm_factor is not None
    if norm:
        out.norm_residual = np.zeros(m)
        px_all = FourierPixels.make(n, n // 2, device=device)
    for j, s in enumerate(range(0, m, ch.batch_size)):
        sl = slice(s, min(s + ch.batch_size, m))
        idx = ch.indices[sl]
        rng = np.random.default_rng([ch.seed, ch.iteration, ch.first_batch + j])
        imgs = ps.read(idx)
        x = rfft2_centered(_prepare_images(imgs, mask2d, o.zero_mask, rng)).to(device)
        # gold-standard refinement, as RELION: the masked images are scored, the unmasked ones reconstructed
        # (exp_Fimg_nomask). Not in classification: there τ² comes from the maps' power, which the noise outside
        # the mask inflates (test_class3d's mixture: ARI 0.75 with the unmasked images, above 0.9 with the masked)
        x_rec = rfft2_centered(torch.as_tensor(imgs, dtype=torch.float32)).to(device) if ch.unmasked_recon else None
        if x_rec is None and ch.recon_split_radius > 0 and o.ctf:
            x_rec = split_reconstruction_images(x, imgs, ps.ctf_params(idx), apix, ch.recon_split_radius)
        if norm:
            f = torch.as_tensor(ch.norm_factor[sl], dtype=torch.float32, device=device)[:, None, None]
            x = x * f
            x_rec = None if x_rec is None else x_rec * f
        old = torch.as_tensor(ch.offsets_px[sl], dtype=torch.float32, device=device)
        x = shift_half_plane(x, old)
        x_rec = None if x_rec is None else shift_half_plane(x_rec, old)
        if o.ctf:
            c = ctf_half_plane(ps.ctf_params(idx), n, apix, device=device, intact_first_peak=o.ctf_intact_first_peak,
                               phase_flipped=o.ctf_phase_flipped).to(torch.float32)
        else:
            c = torch.ones(x.shape, dtype=torch.float32, device=device)
        c = c * torch.as_tensor(ch.scale[sl], dtype=torch.float32, device=device)[:, None, None]
        allowed = torch.as_tensor(ch.allowed[sl], device=device)
        half = None if ch.halves is None else torch.as_tensor(ch.halves[sl], dtype=torch.long, device=device)
        if o.skip_align:
            rots = torch.as_tensor(euler_to_matrix(*ch.angles[sl].T), dtype=torch.float32, device=device)
            r = _skip_align_batch(x, c, rots, projectors, px_f, sigma2_t, log_prior, bps, allowed, half, norm, x_rec)
        elif local:
            prior_rot = torch.as_tensor(euler_to_matrix(*ch.angles[sl].T), dtype=torch.float32, device=device)
            r = local_search_batch(x, c, old, prior_rot, local_grid, local_t[0], local_t[1], projectors, px_c, px_f,
                                   sigma2_t, log_prior, ch.sigma_offset_px, o.sigma_ang, bps, allowed,
                                   o.adaptive_fraction, o.max_significant, half=half, norm_stats=norm,
                                   x_recon=x_rec, prepass=local_pre)
            out.offsets_px[sl] = ch.offsets_px[sl] + r.best_translation
            out.angles[sl] = np.stack(matrix_to_euler(r.best_rotation.astype(np.float64)), 1)
        else:
            prior_rot = (torch.as_tensor(euler_to_matrix(*ch.angles[sl].T), dtype=torch.float32, device=device)
                         if o.sigma_ang > 0 else None)
            if pre is not None:
                r = pruned_search_batch(x, c, old, grid, pre, projectors, coarse_refs, px_c, px_f, sigma2_t,
                                        log_prior, ch.sigma_offset_px, bps, allowed, o.adaptive_fraction,
                                        o.max_significant, o.marginalise_broad, half, norm, x_rec,
                                        torch.as_tensor(euler_to_matrix(*ch.angles[sl].T), dtype=torch.float32,
                                                        device=device) if ch.iteration > 1 else None)
            else:
                r = search_batch(x, c, old, grid, projectors, coarse_refs, px_c, px_f, sigma2_t, log_prior,
                                 ch.sigma_offset_px, bps, allowed, ch.hard, o.adaptive_fraction, o.max_significant,
                                 prior_rot, o.sigma_ang, o.marginalise_broad, half=half, log_dir_prior=log_dir,
                                 norm_stats=norm, x_recon=x_rec)
            if r.rot_weight is not None:
                out.rot_weight = r.rot_weight if out.rot_weight is None else out.rot_weight + r.rot_weight
            out.offsets_px[sl] = ch.offsets_px[sl] + r.best_translation
            out.angles[sl] = np.stack(matrix_to_euler(r.best_rotation.astype(np.float64)), 1)
        out.classes[sl] = r.best_class + 1
        if norm:  # and the image's power beyond the E-step's radius (RELION: exp_power_img of those shells)
            def power(px):
                return ((px.take(x).abs() ** 2) * px.multiplicity.to(torch.float32)).sum(1).double()
            out.norm_residual[sl] = r.residual_image + (power(px_all) - power(px_f)).clamp_min(0).cpu().numpy()
        out.pmax[sl], out.n_significant[sl], out.log_likelihood[sl] = r.max_posterior, r.n_significant, r.log_evidence
        out.rot_spread[sl], out.trans_spread[sl] = r.rot_spread_deg, r.trans_spread_px
        out.class_post_sum += r.class_posterior.sum(0)
        k = r.residual_terms.shape[1]
        out.res_terms[:, :k] += r.residual_terms
        out.pix_shell[:k] += r.pixel_shell
        np.add.at(out.xa_g, ch.groups[sl], r.scale_xa)
        np.add.at(out.aa_g, ch.groups[sl], r.scale_aa)
        out.off_sq += r.offset_sq_sum
        out.flops += getattr(r, "flops", 0.0)
        out.poses += getattr(r, "poses", 0.0)
        if progress is not None:
            progress.update(len(idx))
    out.acc = [bp.acc for bp in bps]
    return out


def _combine(results: list[EStepResult]) -> EStepResult:
    """Sum the accumulators of several chunks (in chunk order) and join their per-particle results."""
    first = results[0]
    if len(results) == 1:
        return first
    cat = {f: np.concatenate([getattr(r, f) for r in results]) for f in
           ("indices", "offsets_px", "angles", "classes", "pmax", "n_significant", "log_likelihood", "rot_spread",
            "trans_spread")}
    if first.norm_residual is not None:
        cat["norm_residual"] = np.concatenate([r.norm_residual for r in results])
    sums = {f: sum(getattr(r, f) for r in results) for f in
            ("class_post_sum", "res_terms", "pix_shell", "xa_g", "aa_g", "off_sq", "flops", "poses")}
    acc = [sum(r.acc[k].cpu() for r in results) for k in range(len(first.acc))]
    weights = [r.rot_weight for r in results if r.rot_weight is not None]
    return EStepResult(**cat, **sums, acc=acc, rot_weight=sum(weights) if weights else None)


def run_estep(todo: np.ndarray, bs: int, chunk, device, cluster, progress: Progress | None) -> EStepResult:
    """The E-step of particles ``todo`` in batches of ``bs``: in this process, or split at batch boundaries
    over the Dask ``cluster``'s workers. ``chunk(indices, first_batch, device, threads)`` makes an EStepChunk."""
    if cluster is None:
        return estep_chunk(chunk(todo, 0, str(device)), progress)
    n_batches = int(np.ceil(len(todo) / bs))
    per = int(np.ceil(n_batches / max(1, cluster.n_chunks)))
    tasks = [chunk(todo[b * bs:(b + per) * bs], b, "cpu", cluster.threads) for b in range(0, n_batches, per)]
    res = _combine(cluster.map(estep_chunk, tasks))
    if progress is not None:
        progress.update(len(todo))
    return res


def run_class3d(star: str | None, ref: str | None, job_dir: str, o: Class3dOptions,
                continue_from: str | None = None, given: set[str] | None = None) -> tuple[np.ndarray, Class3dState]:
    """Run the classification; returns the final class maps (K, n, n, n) and state.

    With ``o.workers`` or ``o.dask_scheduler`` the E-step of every iteration is
    spread over Dask workers (:mod:`spa3d.backend.distributed`); the result is
    the same as in one process, up to the order of floating-point sums.

    ``continue_from``: a run_itNNN_optimiser.star or a job directory (its last
    complete iteration); the run's recorded options are restored except those
    named in ``given`` (None: all of ``o``'s), see :mod:`spa3d.jobs.resume`.
    """
    o = dataclasses.replace(o)  # the run's own copy (it records e.g. the batch size it chose)
    if continue_from:
        continue_from, o, _ = prepare_continue(o, continue_from, job_dir, star, given, {"n_classes"})
    from spa3d.backend.distributed import cluster_for

    with cluster_for(o) as cluster:
        return _run_class3d(star, ref, job_dir, o, continue_from, cluster)


@dataclass
class _RunSetup:
    """What stays fixed over a classification run (set up once by :func:`_set_up`)."""

    job: Path
    ps: ParticleSet
    device: torch.device
    diameter: float  # Å
    radius_px: float
    mask3d: np.ndarray
    ops: np.ndarray  # the point group's rotations
    groups: np.ndarray  # 0-based group of every particle
    n_groups: int
    halves: np.ndarray  # random half set of every particle
    batch_size: int
    n_warm: int  # iterations searched one order coarser first
    cluster: object


@dataclass
class _IterationPlan:
    """What one iteration searches: radius, sampling order, the particles visited and their allowed classes."""

    it: int
    r_cur: float  # E-step radius, cycles per box
    order: int
    r_coarse: float
    hard: bool  # scored by cross-correlation (--firstiter-cc, iteration 1)
    allowed: np.ndarray  # class each particle may take (-1: any)
    todo: np.ndarray  # the particles visited (sorted indices)


def _run_class3d(star, ref, job_dir, o: Class3dOptions, continue_from, cluster):
    """The EM loop as phases: set-up, then per iteration plan → E-step → M-step → write → report."""
    run, maps, st, rng = _set_up(star, ref, job_dir, o, continue_from, cluster)
    if o.estimate or o.dry_run:
        est = _estimate(run.ps, maps, st, o, run.batch_size, run.device, run.n_warm, run.diameter, run.radius_px,
                        run.groups, run.n_groups)
        for line in est.lines():
            log.info(line)
        if o.dry_run:
            return maps, st
    start = time.perf_counter()
    first_it = st.iteration
    rate = EStepRate()
    # radius (cycles per box) up to which the current maps hold data: the initial low-pass, then the E-step radius
    map_radius = st.r_current if st.iteration == 0 else st.map_radius
    while st.iteration < o.n_iter:
        t_it = time.perf_counter()
        plan = _plan_iteration(run, o, st, rng)
        t_estep = time.perf_counter()
        res = _e_step(run, o, maps, st, plan)
        rate.add(res.flops, time.perf_counter() - t_estep, res.poses, len(plan.todo))
        maps, info = _m_step(run, o, maps, st, plan, res, map_radius)
        map_radius = st.map_radius = plan.r_cur
        st.iteration = plan.it
        st.rng_state = rng.bit_generator.state
        _write_iteration(run.job, run.ps, maps, st, o, info)
        _log_iteration(run, o, st, plan, info, rate, start, first_it, t_it)
    if rate.particles:
        log.info(rate.summary())
    log.info(f"done in {time.perf_counter() - start:.1f} s: {run.job / f'run_it{st.iteration:03d}_model.star'}")
    return maps, st


def _set_up(star, ref, job_dir, o: Class3dOptions, continue_from, cluster):
    """Check the input, start (or continue) the run: (set-up, class maps, state, random generator)."""
    if o.n_classes < 1:
        raise InputError(None, "--K must be at least 1")
    job, device = start_job(job_dir, o)
    if continue_from:
        st, first_star = load_continued(continue_from, _load_state, "rlnClass3dInputStarFile")
        # the particles as first given (their image paths are relative to that STAR's project)
        star = star or first_star
        src = Path(continue_from).parent
        maps = np.array([read_map(src / f"run_it{st.iteration:03d}_class{k + 1:03d}.mrc")[0]
                         for k in range(len(st.class_fractions))])
        if o.n_classes != len(maps):
            raise InputError(continue_from, f"--continue cannot change K ({len(maps)} classes in the run)")
        rng = np.random.default_rng()
        rng.bit_generator.state = st.rng_state
        log.info(f"class3d: continuing from iteration {st.iteration} ({continue_from})")
    ps = open_particles(star, o.ctf)
    n, apix = ps.box, ps.pixel_size
    n_part = len(ps)
    diameter = o.particle_diameter if o.particle_diameter and o.particle_diameter > 0 else n * apix
    if diameter / apix > n:
        log.info(f"particle diameter {diameter} Å exceeds the box; using the box")
        diameter = n * apix
    radius_px = diameter / (2 * apix)
    mask2d = _image_mask(n, radius_px)
    groups = _groups(ps)
    n_groups = int(groups.max()) + 1
    if not continue_from:
        if ref is None:
            raise InputError(None, "--ref map.mrc is required")
        vol = load_reference(ref, ps, o.ini_high)
        if not (o.firstiter_cc or o.skip_align) and check_greyscale(ps, vol, mask2d, o, o.ini_high):
            o.firstiter_cc = True  # recorded with the run's options
        maps = np.repeat(vol[None].astype(np.float32), o.n_classes, axis=0)
        rng = np.random.default_rng(o.seed)
        r0 = min(n // 2, n * apix / o.ini_high) if o.ini_high and o.ini_high > 0 else n // 2
        angles0 = ps.angles() if "rlnAngleRot" in ps.table.particles else np.zeros((n_part, 3))
        st = Class3dState(0, initial_sigma2(ps, mask2d, o, rng), np.full(o.n_classes, 1.0 / o.n_classes),
                          o.initial_sigma_offset / apix, np.ones(n_groups), float(r0), float(r0), ps.origins_px(),
                          angles0, np.zeros(n_part, dtype=int))
    if o.norm_correction and st.norm is None:
        st.norm, st.avg_norm = input_norm(ps), 1.0
    elif not o.norm_correction:
        st.norm = None
    if o.skip_align and "rlnAngleRot" not in ps.table.particles:
        raise InputError(star, "--skip-align needs rlnAngleRot/Tilt/Psi in the particles")
    if o.sigma_ang > 0 and "rlnAngleRot" not in ps.table.particles and st.iteration == 0:
        raise InputError(star, "--sigma-ang (local searches) needs rlnAngleRot/Tilt/Psi in the particles")
    coarse_t, fine_t = oversampled_translations(o.offset_range, o.offset_step)
    n_warm = warmup_iterations(o)
    n_coarse_max = len(oversampled_orientations(o.healpix_order, o.symmetry)[0]) * len(coarse_t)
    bs = _batch_size(o, o.n_classes, n_coarse_max, device)
    if cluster is not None and not o.batch_size:
        # several batches per worker, so that the chunks balance (give --batch-size to match an in-process run)
        bs = int(min(bs, max(8, np.ceil(n_part / (4 * cluster.n_chunks)))))
    # recorded with the run: a resumed run cuts the same batches (and so draws the same random numbers)
    o.batch_size = bs
    log.info(f"class3d: {n_part} particles, box {n}, {apix:.3f} Å/px, K={o.n_classes}, T={o.tau2_fudge}, "
             f"{o.n_iter} iterations; search {angular_step(o.healpix_order + 1):.1f}° "
             f"(the first {n_warm} at {angular_step(o.healpix_order):.1f}°), {len(coarse_t)} -> {len(fine_t)} "
             f"translations, batches of {bs}, device {device}")
    run = _RunSetup(job, ps, device, diameter, radius_px, soft_sphere(n, radius_px, 5.0),
                    symmetry_matrices(o.symmetry), groups, n_groups, random_halves(ps, o.seed), bs, n_warm, cluster)
    return run, maps, st, rng


def _plan_iteration(run: _RunSetup, o: Class3dOptions, st: Class3dState, rng: np.random.Generator) -> _IterationPlan:
    """The next iteration's radius, sampling, particles and (in iteration 1, K > 1) random class assignment."""
    n, apix, n_part = run.ps.box, run.ps.pixel_size, len(run.ps)
    it = st.iteration + 1
    r_cur = float(min(n // 2 - 1, st.r_current))
    if o.strict_highres_exp > 0:
        r_cur = min(r_cur, n * apix / o.strict_highres_exp)
    order = o.healpix_order - 1 if it <= run.n_warm else o.healpix_order
    r_coarse = o.coarse_radius_px or coarse_radius(order, run.diameter, n, apix)
    hard = bool(o.firstiter_cc and it == 1)
    allowed = rng.integers(0, o.n_classes, size=n_part) if (it == 1 and o.n_classes > 1) else np.full(n_part, -1)
    todo = iteration_subset(o, it, n_part, rng)
    return _IterationPlan(it, r_cur, order, r_coarse, hard, allowed, todo)


#: log prior of (class, direction) pairs of zero probability: never chosen, as RELION skips them (pdf_orientation = 0)
ZERO_PRIOR_LOG = -np.inf


def _n_directions(order: int, symmetry: str) -> int:
    """Viewing directions of the (symmetry-reduced) HEALPix grid of ``order``."""
    return len(oversampled_orientations(order, symmetry)[0]) // len(psi_angles(order))


def direction_prior(o: Class3dOptions, st: Class3dState, order: int) -> np.ndarray | None:
    """RELION's pdf_direction for an E-step at HEALPix ``order``: (K, D), each class's prior over the viewing
    directions, summing to the class's fraction (so it replaces the class prior). The last M-step's (ml_optimiser.cpp:
    Σ posterior of the class and direction over the particles / their number); at the start 1/(K·D) as RELION's
    initialisePdfDirection; when the sampling changes (spa3d's first iterations a HEALPix order coarser) each
    class's fraction spread evenly over the new directions. None without ``o.direction_prior`` and for local
    searches or --skip-align (RELION: the orientational prior, or none)."""
    if not o.direction_prior or o.skip_align or o.sigma_ang > 0:
        return None
    if st.pdf_direction is not None and st.pdf_direction_order == order:
        return st.pdf_direction
    d = _n_directions(order, o.symmetry)
    return np.repeat(np.asarray(st.class_fractions, dtype=np.float64)[:, None] / d, d, axis=1)


def _e_step(run: _RunSetup, o: Class3dOptions, maps: np.ndarray, st: Class3dState,
            plan: _IterationPlan) -> EStepResult:
    """The E-step of the plan's particles (in this process or on the Dask cluster) and the M-step sums."""
    ps, bs = run.ps, run.batch_size
    scale_all = st.group_scale[run.groups]

    def chunk(sel: np.ndarray, first_batch: int, dev: str, threads=None) -> EStepChunk:
        return EStepChunk(str(ps.star_path), str(ps.project_dir), sel, first_batch, bs, plan.it, o.seed, maps,
                          st.sigma2, st.class_fractions, st.sigma_offset_px, st.offsets_px[sel], st.angles[sel],
                          scale_all[sel], run.groups[sel], run.n_groups, plan.allowed[sel], run.halves[sel], o,
                          plan.order, plan.r_cur, plan.r_coarse, plan.hard, run.radius_px, dev, threads,
                          direction_prior(o, st, plan.order),
                          None if st.norm is None else st.avg_norm / st.norm[sel])

    prog = Progress(len(plan.todo), label=f"iteration {plan.it}/{o.n_iter}: ")
    return run_estep(plan.todo, bs, chunk, run.device, run.cluster, prog)


def _m_step(run: _RunSetup, o: Class3dOptions, maps: np.ndarray, st: Class3dState, plan: _IterationPlan,
            res_all: EStepResult, map_radius: float) -> tuple[np.ndarray, dict]:
    """The M-step: poses, σ², class fractions, offset prior, group scales and the class maps (updates ``st``).

    Returns the new maps and the per-class values model.star reports (resolution from the half sets' FSC).
    """
    n, apix, n_part = run.ps.box, run.ps.pixel_size, len(run.ps)
    k_cls, ops, device, r_cur = o.n_classes, run.ops, run.device, plan.r_cur
    bps = [BackProjector(n, r_max=r_cur, device=device) for _ in range(k_cls)]
    for k, bp in enumerate(bps):
        bp.acc = res_all.acc[k].to(device) + res_all.acc[k_cls + k].to(device)
    # particles outside this iteration's subset (--fast-subsets) keep what they had
    new_off = st.offsets_px.copy()
    new_ang = st.angles.copy()
    new_cls = st.classes.copy()
    pmax = np.array(st.stats.get("pmax", np.zeros(n_part)), dtype=float)
    n_sig = np.array(st.stats.get("n_significant", np.zeros(n_part)), dtype=int)
    loglik = np.array(st.stats.get("log_likelihood", np.zeros(n_part)), dtype=float)
    rot_spread = np.zeros(n_part)
    trans_spread = np.zeros(n_part)
    idx = res_all.indices
    new_off[idx], new_ang[idx], new_cls[idx] = res_all.offsets_px, res_all.angles, res_all.classes
    pmax[idx], n_sig[idx], loglik[idx] = res_all.pmax, res_all.n_significant, res_all.log_likelihood
    rot_spread[idx], trans_spread[idx] = res_all.rot_spread, res_all.trans_spread
    class_post_sum, pix_shell = res_all.class_post_sum, res_all.pix_shell
    xa_g, aa_g, off_sq = res_all.xa_g, res_all.aa_g, res_all.off_sq

    if plan.hard:
        # the reference was on an arbitrary greyscale: bring it to the data's
        s_ref = float(xa_g.sum() / max(aa_g.sum(), 1e-30))
        maps = maps * s_ref
        log.info(f"first iteration by cross-correlation; reference greyscale × {s_ref:.4g}")
    elif run.n_groups > 1:
        scale = st.group_scale * xa_g / np.maximum(aa_g, 1e-30)
        st.group_scale = scale / scale.mean()
    # the noise power: posterior-weighted residuals (as RELION), after a cross-correlation iteration against
    # the reference on the data's greyscale (RELION keeps the initial σ² then: a deliberate difference)
    res_shell = residual_power(res_all.res_terms, s_ref if plan.hard else 1.0)
    upd = pix_shell > 0
    st.sigma2[upd] = res_shell[upd] / pix_shell[upd]
    st.class_fractions = class_post_sum / class_post_sum.sum()
    if res_all.rot_weight is not None:  # RELION's pdf_direction: Σ posterior per (class, direction) / particles
        d = _n_directions(plan.order, o.symmetry)
        w = res_all.rot_weight.reshape(k_cls, d, -1).sum(2)
        st.pdf_direction, st.pdf_direction_order = w / max(w.sum(), 1e-300), plan.order
    if not o.skip_align:
        st.sigma_offset_px = float(np.sqrt(off_sq / (2 * len(plan.todo))))
    # RELION's normalisation correction; not after a cross-correlation iteration (the reference was then on an
    # arbitrary greyscale: a deliberate difference, docs/conventions.md)
    if st.norm is not None and res_all.norm_residual is not None and not plan.hard:
        st.avg_norm = update_norm(st.norm, st.avg_norm, idx, res_all.norm_residual, n)
    new_maps = np.empty_like(maps)
    info = {"resolution": np.zeros(k_cls), "completeness": np.zeros(k_cls), "ssnr": [], "tau2": [], "fsc": [],
            "shell_completeness": [], "accuracy_rot": np.zeros(k_cls), "accuracy_trans": np.zeros(k_cls)}
    best_shell = best_reported = 0.0
    nsh = n // 2 + 1
    for k in range(k_cls):
        # the resolution: FSC of the class's two random half sets (0.143), measured every iteration
        fsc_k = _class_fsc(res_all.acc[k], res_all.acc[k_cls + k], n, r_cur, ops, device)
        info["fsc"].append(fsc_k)
        tau2 = o.tau2_fudge * power_spectrum(maps[k]) / np.maximum(st.sigma2, 1e-30)
        # the map holds data only up to the radius it was reconstructed at: no prior power beyond (those
        # shells are reconstructed without a prior: a deliberate difference, see docs/conventions.md)
        tau2[np.arange(nsh) > map_radius] = 0.0
        ssnr, wvox, shell = _spectral_snr(bps[k], ops, tau2)
        # where there is no prior, the SSNR the half sets measure, 2·FSC/(1 − FSC)
        fsc_ssnr = 2 * np.clip(fsc_k, 0, 0.999) / (1 - np.clip(fsc_k, 0, 0.999))
        ssnr = np.where(tau2 > 0, ssnr, fsc_ssnr)
        info["ssnr"].append(ssnr)
        info["tau2"].append(tau2)
        if class_post_sum[k] < 0.5:
            log.info(f"class {k + 1} is empty; its map is kept")
            new_maps[k] = maps[k]
            info["shell_completeness"].append(np.zeros(nsh))
            info["resolution"][k] = 999.0
            continue
        vol = bps[k].reconstruct(symmetry_ops=ops, tau2=tau2, unregularised_where_tau2_zero=True).cpu().numpy()
        if not np.all(np.isfinite(vol)):
            log.warning(f"class {k + 1}: the reconstruction is not finite; its map is kept")
            vol = maps[k]
        if o.flatten_solvent:
            vol = vol * run.mask3d
        new_maps[k] = vol
        # reported: where the half sets' FSC falls below 0.5 (they share the reference, so their FSC is
        # optimistic; see FSC_REPORTED); the next E-step reaches incr_size shells beyond its 0.143 shell
        idx_res = resolution_shell(fsc_k, FSC_REPORTED)
        best_reported = max(best_reported, idx_res)
        best_shell = max(best_shell, resolution_shell(fsc_k, FSC_THRESHOLD))
        info["resolution"][k] = n * apix / idx_res if idx_res >= 1 else 999.0
        good = (wvox >= 1) & (shell < nsh)
        cnt = torch.zeros(nsh, dtype=torch.float64, device=wvox.device).index_add_(
            0, shell[shell < nsh], torch.ones_like(wvox[shell < nsh]))
        gcnt = torch.zeros(nsh, dtype=torch.float64, device=wvox.device).index_add_(
            0, shell[good], torch.ones_like(wvox[good]))
        comp = (gcnt / cnt.clamp_min(1)).cpu().numpy()
        info["shell_completeness"].append(comp)
        lim = int(max(idx_res, 1))
        info["completeness"][k] = float(gcnt[: lim + 1].sum() / cnt[: lim + 1].sum().clamp_min(1))
        mine = new_cls == k + 1
        if mine.any():
            info["accuracy_rot"][k] = float(rot_spread[mine].mean())
            info["accuracy_trans"][k] = float(trans_spread[mine].mean() * apix)
    # as RELION: the resolution of this iteration (the best class's, at least MIN_RESOLUTION_SHELLS), which
    # may fall; the next E-step reaches incr_size shells beyond it, one shell inside Nyquist (the corner
    # shell n/2 holds only part of a ring)
    st.best_resolution_shell = max(best_reported, float(MIN_RESOLUTION_SHELLS))
    st.r_current = float(min(n // 2 - 1, max(best_shell, float(MIN_RESOLUTION_SHELLS)) + o.incr_size))
    st.offsets_px, st.angles, st.classes = new_off, new_ang, new_cls
    st.stats = {"pmax": pmax, "n_significant": n_sig, "log_likelihood": loglik}
    info["log_likelihood"] = float(loglik.sum())
    info["average_pmax"] = float(pmax.mean())
    return new_maps, info


def _log_iteration(run: _RunSetup, o: Class3dOptions, st: Class3dState, plan: _IterationPlan, info: dict,
                   rate: EStepRate, start: float, first_it: int, t_it: float) -> None:
    """One line per iteration in run.log: radius, class fractions and resolutions, ⟨Pmax⟩, rate, time left."""
    elapsed = time.perf_counter() - start
    left = elapsed / (plan.it - first_it) * (o.n_iter - plan.it)
    fr = " ".join(f"{f:.2f}" for f in st.class_fractions)
    res = " ".join(f"{r:.1f}" for r in info["resolution"])
    log.info(f"iteration {plan.it}/{o.n_iter}: E-step radius {plan.r_cur:.1f} px, classes {fr}, resolution {res} Å, "
             f"σ_offset {st.sigma_offset_px * run.ps.pixel_size:.2f} Å, <Pmax> {info['average_pmax']:.3f}, "
             f"{rate.line()}, {len(plan.todo) / (time.perf_counter() - t_it):.0f} particles/s, {left:.0f} s left")


#: the estimate's model of a classification's course: the posteriors stay flat for this many iterations, and
#: later at most this many significant samples per image go through the fine pass (see :func:`_estimate`)
BROAD_ITERATIONS = 3
SHARP_SIGNIFICANT = 32


def _estimate(ps, maps, st, o: Class3dOptions, bs: int, device, n_warm: int, diameter: float, radius_px: float,
              groups: np.ndarray, n_groups: int):
    """Expected wall time, peak memory and poses of the remaining iterations (see :mod:`spa3d.jobs.estimate`).

    Times the E-step and M-step sums on one batch of particles at the next iteration's radius and at the
    radius two iterations later (``incr_size`` shells per iteration, at most one shell inside Nyquist), and
    one reconstruction. The E-step radius is taken to grow that way and then to stay (the resolution of a
    classification stops growing after a few iterations; where it goes on, the estimate is low); the time
    per particle is a + b·radius² between the two timings.

    Against the starting reference (low-passed) every image's posterior is flat: all ``max_significant``
    samples go through the fine pass. It sharpens after a few iterations (measured: 256 significant samples
    per image in iterations 1–3, then 4–14 on the demo's mixture and 50–190 on a real micrograph's noise), so
    iterations after the first ``BROAD_ITERATIONS`` are timed with at most ``SHARP_SIGNIFICANT`` samples
    (the flat posterior's time had overestimated those runs 3.6–4.5×).
    """
    from spa3d.jobs.estimate import Estimate, host_peak_bytes, synchronize, timed_reconstruction

    t0 = time.perf_counter()
    n, apix = ps.box, ps.pixel_size
    k_cls = len(maps)
    # on a GPU a batch's time hardly depends on its size (kernel launches): time a whole batch there
    sel = np.arange(min(len(ps), bs, 64 if device.type == "cpu" else bs))
    r_lo = float(min(n // 2 - 1, st.r_current))
    r_hi = float(min(n // 2 - 1, r_lo + 2 * o.incr_size))
    cal = dataclasses.replace(o, fast_subsets=False)

    def timed(order: int, r_cur: float):
        ch = EStepChunk(str(ps.star_path), str(ps.project_dir), sel, 0, len(sel), st.iteration + 1, o.seed, maps,
                        st.sigma2, st.class_fractions, st.sigma_offset_px, st.offsets_px[sel], st.angles[sel],
                        st.group_scale[groups][sel], groups[sel], n_groups, np.full(len(sel), -1), np.arange(len(sel)) % 2, cal,
                        order, r_cur,
                        o.coarse_radius_px or coarse_radius(order, diameter, n, apix), False, radius_px, str(device))
        synchronize(device)
        t = time.perf_counter()
        res = estep_chunk(ch)
        return (time.perf_counter() - t) / len(sel), res

    timed(o.healpix_order, r_lo)  # one-off costs
    per_lo, _ = timed(o.healpix_order, r_lo)
    per_hi, res = timed(o.healpix_order, r_hi)
    cal = dataclasses.replace(cal, max_significant=min(o.max_significant, SHARP_SIGNIFICANT))
    per_sharp, _ = timed(o.healpix_order, r_hi)
    bp = BackProjector(n, r_max=r_hi, device=device)
    bp.acc = res.acc[0].to(device)
    t_rec = timed_reconstruction(bp, device)
    slope = (per_hi - per_lo) / max(r_hi**2 - r_lo**2, 1e-9)
    rng = np.random.default_rng(0)
    total, r = 0.0, r_lo
    for it in range(st.iteration + 1, o.n_iter + 1):
        per = per_lo + slope * (r**2 - r_lo**2)
        if it > BROAD_ITERATIONS:
            per *= min(1.0, per_sharp / per_hi)
        if it <= n_warm:
            per /= 4  # a HEALPix order coarser: 8× fewer rotations, the fine pass's cost stays
        total += per * len(iteration_subset(o, it, len(ps), rng)) + k_cls * t_rec
        r = min(r_hi, r + o.incr_size)
    n_sig = np.maximum(res.n_significant, 0).mean()
    coarse_t, _ = oversampled_translations(o.offset_range, o.offset_step)
    n_rc = len(oversampled_orientations(o.healpix_order, o.symmetry)[0])
    poses = k_cls * len(coarse_t) * n_rc + 32 * float(n_sig)
    gpu = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0
    return Estimate(total, host_peak_bytes(), gpu, poses, time.perf_counter() - t0)


def _skip_align_batch(x, c, rots, projectors, px, sigma2, log_prior, bps, allowed, half, norm_stats=False,
                      x_recon=None):
    """Classification only, at the particles' stored poses (--skip-align); ``allowed``, ``half``, ``x_recon`` as in
    search_batch."""
    from spa3d.inference.search import BatchResult

    xf, cf = px.take(x), px.take(c)
    xr = xf if x_recon is None else px.take(x_recon)
    w = px.multiplicity.to(torch.float32) / sigma2[px.shell].clamp_min(1e-12)
    projs = [p.project_pixels(rots, px.kx, px.ky) for p in projectors]
    ll = torch.stack([-0.5 * (((xf - cf * pr).abs() ** 2) * w).sum(1) for pr in projs], 1) + log_prior[None]
    k_all = torch.arange(len(projs), device=x.device)
    ll = ll.masked_fill((allowed[:, None] >= 0) & (allowed[:, None] != k_all[None]), -torch.inf)
    lse = torch.logsumexp(ll, 1)
    post = torch.exp(ll - lse[:, None])
    best = post.argmax(1)
    b = x.shape[0]
    m = px.multiplicity.to(torch.float32)
    bp_ = torch.stack(projs, 1)[torch.arange(b), best]
    cp = cf * bp_
    nsh = int(px.shell.max()) + 1
    # the noise power's statistics: residuals against every class, weighted by its posterior
    terms = sum(residual_power_terms(px, xf if k == 0 else xf[:0], xf * cf * post[:, k:k + 1],
                                     cf * cf * post[:, k:k + 1], pr) for k, pr in enumerate(projs))
    pix_shell = torch.zeros(nsh, dtype=torch.float64, device=x.device).index_add_(0, px.shell, m.double() * b)
    k_cls = len(projs)
    for d, bp in enumerate(bps):
        pk = post[:, d % k_cls] * (1.0 if half is None else (half == d // k_cls).to(post.dtype))
        bp.insert_pixels(xr * cf * pk[:, None], cf * cf * pk[:, None], rots, px.kx, px.ky)
    z = np.zeros(b)
    return BatchResult(best.cpu().numpy(), rots.cpu().numpy(), np.zeros((b, 2)), post.max(1).values.cpu().numpy(),
                       np.ones(b, dtype=int), lse.cpu().numpy(), post.cpu().numpy(), z, z, 0.0,
                       residual_power(terms).cpu().numpy(), pix_shell.cpu().numpy(),
                       ((xf.real * cp.real + xf.imag * cp.imag) * m).sum(1).cpu().numpy(),
                       ((cp.abs() ** 2) * m).sum(1).cpu().numpy(), residual_terms=terms.cpu().numpy(),
                       residual_image=(torch.stack([(((xf - cf * pr).abs() ** 2) * m).sum(1) for pr in projs], 1)
                                       * post).sum(1).double().cpu().numpy() if norm_stats else None)


# ---- command line: ``spa3d class3d`` ----

DESCRIPTION = ("Classify particles into K 3D classes against a reference map, with orientations and offsets searched "
               "coarse-to-fine. Outputs RELION's run_itNNN_{classKKK.mrc,model.star,data.star,optimiser.star} in --o.")

#: command-line option (argparse dest) -> field of Class3dOptions, for the options a user gives again with
#: --continue (see spa3d.jobs.resume); angular_sampling and healpix_order both set healpix_order
CLI_OPTIONS = {"K": "n_classes", "iter": "n_iter", "tau2_fudge": "tau2_fudge", "angular_sampling": "healpix_order",
               "healpix_order": "healpix_order", "offset_range": "offset_range", "offset_step": "offset_step",
               "ini_high": "ini_high", "particle_diameter": "particle_diameter", "zero_mask": "zero_mask",
               "flatten_solvent": "flatten_solvent", "ctf": "ctf", "ctf_intact_first_peak": "ctf_intact_first_peak",
               "ctf_phase_flipped": "ctf_phase_flipped", "firstiter_cc": "firstiter_cc", "sym": "symmetry",
               "strict_highres_exp": "strict_highres_exp", "skip_align": "skip_align", "sigma_ang": "sigma_ang",
               "perturb": "perturb", "direction_prior": "direction_prior", "norm": "norm_correction",
               "fast_subsets": "fast_subsets", "batch_size": "batch_size", "seed": "seed", "device": "device",
               "threads": "threads", "workers": "workers", "dask_scheduler": "dask_scheduler",
               "dry_run": "dry_run"}


def add_args(p) -> None:

    from spa3d.jobs.args import add_job_output, add_ml_options, add_run_options

    p.add_argument("--i", default=None, help="particle STAR file")
    p.add_argument("--ref", default=None, help="reference map (.mrc), same box and pixel size as the particles")
    add_job_output(p, "job directory")
    p.add_argument("--K", type=int, default=4, help="number of classes (default 4)")
    p.add_argument("--iter", type=int, default=25, help="number of iterations (default 25)")
    p.add_argument("--tau2-fudge", type=float, default=4.0, help="regularisation parameter T (default 4)")
    add_ml_options(p, ini_high=50.0, maps="class maps")
    p.add_argument("--strict-highres-exp", type=float, default=-1.0,
                   help="never use frequencies beyond this resolution (Å) in the E-step")
    p.add_argument("--skip-align", action="store_true", help="classify at the particles' stored poses")
    p.add_argument("--sigma-ang", type=float, default=-1.0,
                   help="local searches: σ in degrees of the prior on angles around the stored poses")
    p.add_argument("--direction-prior", action="store_true",
                   help="a prior over each class's viewing directions from the last iteration, as RELION's "
                        "pdf_direction (default off: on the benchmarks it lost small classes; docs/conventions.md)")
    p.add_argument("--fast-subsets", action="store_true",
                   help="random subsets in the first 15 iterations: K*1500, K*4500 particles, then max(K*4500, 30%%) (RELION)")
    add_run_options(p)


def main(a) -> None:
    from spa3d.jobs.args import given_options, ml_option_values, start_log

    o = Class3dOptions(n_classes=a.K, n_iter=a.iter, tau2_fudge=a.tau2_fudge, strict_highres_exp=a.strict_highres_exp,
                       skip_align=a.skip_align, sigma_ang=a.sigma_ang, fast_subsets=a.fast_subsets,
                       direction_prior=a.direction_prior,
                       **ml_option_values(a))
    start_log(a)
    run_class3d(a.i, a.ref, a.o, o, continue_from=a.continue_from, given=given_options(a, CLI_OPTIONS))
