"""``spa3d initial-model``: de novo 3D initial model by SGD (RELION 3.1's InitialModel job).

Writes into the job directory, with RELION's names, every ``write_iter``
iterations and at the last: run_itNNN_classKKK.mrc, run_itNNN_model.star,
run_itNNN_data.star, run_itNNN_optimiser.star (and run_itNNN_sgd_state.npz,
which ``--continue run_itNNN_optimiser.star`` resumes from), plus run.log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spa3d.errors import InputError
from spa3d.fourier.filters import relion_power
from spa3d.geometry.euler import euler_to_matrix, matrix_to_euler
from spa3d.geometry.sampling import angular_step, orientation_grid, translation_grid
from spa3d.geometry.symmetry import symmetry_matrices
from spa3d.inference.search import coarse_radius, make_search_grid
from spa3d.inference.sgd import SgdOptions, SgdSchedule, SgdState, initial_state, sgd_iteration
from spa3d.io.atomic_write import atomic_path
from spa3d.io.mrc import write_map
from spa3d.io.particles import ParticleSet
from spa3d.io.star import write_star
from spa3d.jobs.estimate import estimate_initial_model
from spa3d.jobs.progress import EStepRate
from spa3d.jobs.resume import IterationFiles, append_options_block, prepare_continue, start_job, state_file

log = logging.getLogger("spa3d")


@dataclass
class InitialModelOptions:
    n_classes: int = 1
    symmetry: str = "C1"
    particle_diameter: float = 200.0
    flatten_solvent: bool = True
    ctf: bool = True
    ctf_intact_first_peak: bool = False
    ctf_phase_flipped: bool = False
    healpix_order: int = 1  # GUI 15°: coarse order 1, searched at the fine step (order + 1)
    offset_range: float = 6.0
    offset_step: float = 2.0
    schedule: SgdSchedule = None
    write_iter: int = 10
    incr_size: float = 10.0  # Fourier shells beyond the scheduled resolution (RELION's default)
    step_size: float = 0.5  # SGD step size η (RELION's default)
    momentum: float = 0.9  # SGD momentum μ (RELION's default)
    final_em: int = 1  # the last iterations done as EM steps over all particles (spa3d's default 1; RELION 0)
    tau2_fudge: float = 4.0  # regularisation T of every gradient step (spa3d's default; RELION's InitialModel: 1)
    positivity: str = "always"  # negative densities zeroed in every iteration (spa3d's); "initial": phase only (RELION)
    sampling_refinement: bool = True  # finer HEALPix order after the initial phase when the resolution needs it
    anneal: bool = True  # K > 1: RELION's annealing of the classes towards their mean (--sgd-skip-anneal: off)
    exhaustive: bool = False  # every pose at the fine sampling, instead of coarse-to-fine (RELION's oversampling)
    coarse_radius_px: float | None = None  # radius of the coarse pass (cycles per box; default RELION's rule)
    estimate: bool = True  # log the expected wall time and memory first (a short calibration)
    dry_run: bool = False  # only print that estimate
    seed: int = 0
    device: str | None = None
    threads: int | None = None
    workers: int = 0  # > 0: the mini-batch E-step on a local Dask cluster of this many processes
    dask_scheduler: str | None = None


def _save_state(path: Path, state: SgdState) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, maps=state.maps, momentum=state.momentum, sigma2=state.sigma2,
                     class_fractions=state.class_fractions, iteration=state.iteration,
                     rng=np.frombuffer(json.dumps(state.rng_state).encode(), dtype=np.uint8))


def _load_state(path: Path) -> SgdState:
    with np.load(path) as z:
        rng_state = json.loads(bytes(z["rng"]).decode())
        return SgdState(z["maps"].copy(), z["momentum"].copy(), z["sigma2"].copy(), z["class_fractions"].copy(),
                        int(z["iteration"]), rng_state)


def _write_iteration(job: Path, ps: ParticleSet, state: SgdState, poses: dict, res: float, o: InitialModelOptions,
                     input_star: str) -> None:
    with IterationFiles(job, state.iteration) as files:
        _write_iteration_files(files, job, ps, state, poses, res, o, input_star)


def _write_iteration_files(files: IterationFiles, job: Path, ps: ParticleSet, state: SgdState, poses: dict, res: float,
                           o: InitialModelOptions, input_star: str) -> None:
    it = state.iteration
    apix = ps.pixel_size
    names = []
    for k in range(len(state.maps)):
        name = job / f"run_it{it:03d}_class{k + 1:03d}.mrc"
        write_map(files.path(name), state.maps[k], apix)
        names.append(str(name))
    general = {"rlnReferenceDimensionality": 3, "rlnDataDimensionality": 2, "rlnOriginalImageSize": ps.box,
               "rlnCurrentResolution": res, "rlnCurrentImageSize": ps.box, "rlnNrClasses": len(state.maps),
               "rlnPixelSize": apix, "rlnTau2FudgeFactor": o.tau2_fudge}
    classes = pd.DataFrame({"rlnReferenceImage": names, "rlnClassDistribution": state.class_fractions,
                            "rlnEstimatedResolution": res})
    sigma = pd.DataFrame({"rlnSpectralIndex": np.arange(len(state.sigma2)), "rlnSigma2Noise": relion_power(state.sigma2, ps.box)})
    write_star(files.path(job / f"run_it{it:03d}_model.star"), {"model_general": general, "model_classes": classes,
                                                    "model_group_1": sigma})
    table = ps.table.copy()
    p = table.particles
    seen = np.array(sorted(poses))
    if len(seen):
        vals = np.array([poses[i] for i in seen])
        for j, col in enumerate(["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                                 "rlnClassNumber", "rlnMaxValueProbDistribution"]):
            if col not in p:
                p[col] = 0.0
            p.loc[seen, col] = vals[:, j]
        p["rlnClassNumber"] = p["rlnClassNumber"].astype(int)
    table.write(files.path(job / f"run_it{it:03d}_data.star"))
    _save_state(files.path(job / f"run_it{it:03d}_sgd_state.npz"), state)
    optimiser = files.path(job / f"run_it{it:03d}_optimiser.star")
    write_star(optimiser, {"optimiser_general": {
        "rlnOutputRootName": str(job / "run"), "rlnModelStarFile": str(job / f"run_it{it:03d}_model.star"),
        "rlnExperimentalDataStarFile": str(job / f"run_it{it:03d}_data.star"), "rlnCurrentIteration": it,
        "rlnRandomSeed": o.seed, "rlnSgdStateFile": str(job / f"run_it{it:03d}_sgd_state.npz")}})
    append_options_block(optimiser, o, {"input_star": input_star})


def run_initial_model(star: str | None, job_dir: str, o: InitialModelOptions, continue_from: str | None = None,
                      given: set[str] | None = None) -> SgdState:
    """Run the SGD initial model (see module docstring); with ``o.workers`` / ``o.dask_scheduler`` each
    mini-batch's E-step is split over Dask workers.

    ``continue_from``: a run_itNNN_optimiser.star or a job directory (its last complete iteration); the
    run's recorded options are restored except those named in ``given`` (None: all of ``o``'s), see
    :mod:`spa3d.jobs.resume`.
    """
    o = dataclasses.replace(o, schedule=dataclasses.replace(o.schedule or SgdSchedule()))
    input_star = str(Path(star).resolve()) if star else None
    if continue_from:
        continue_from, o, first = prepare_continue(o, continue_from, job_dir, star, given, {"n_classes"})
        input_star = first or input_star
    from spa3d.backend.distributed import cluster_for

    with cluster_for(o) as cluster:
        return _run_initial_model(star, job_dir, o, continue_from, cluster, input_star)


def _run_initial_model(star, job_dir, o: InitialModelOptions, continue_from, cluster, input_star) -> SgdState:
    job, device = start_job(job_dir, o)
    sched = o.schedule or SgdSchedule()
    if o.n_classes < 1:
        raise InputError(None, "--K must be at least 1")
    if continue_from:
        sfile = state_file(continue_from)
        if sfile is None or not sfile.exists():
            raise InputError(continue_from, f"state file {sfile} not found")
        state = _load_state(sfile)
        if len(state.maps) != o.n_classes:
            raise InputError(continue_from, f"--continue cannot change K ({len(state.maps)} classes in the run)")
        # the poses found so far are in the iteration's data.star
        star = str(Path(continue_from).parent / f"run_it{state.iteration:03d}_data.star")
        rng = np.random.default_rng()
        rng.bit_generator.state = state.rng_state
        log.info(f"initial model: continuing from iteration {state.iteration} ({continue_from})")
    if star is None:
        raise InputError(None, "--i particles.star is required")
    # a resumed run reads the poses found so far from the iteration's data.star, and the images from where
    # the run's particles were (their names are relative to that STAR file's project)
    ps = ParticleSet(star, ParticleSet(input_star).project_dir if continue_from and input_star else None)
    if o.ctf and not ps.has_ctf():
        raise InputError(star, "--ctf needs rlnDefocusU/V, rlnVoltage and rlnSphericalAberration")
    apix = ps.pixel_size
    if o.particle_diameter / apix > ps.box:
        log.info(f"particle diameter {o.particle_diameter} Å exceeds the box; using the box")
        o.particle_diameter = ps.box * apix
    opts = SgdOptions(n_classes=o.n_classes, particle_diameter=o.particle_diameter, flatten_solvent=o.flatten_solvent,
                      ctf=o.ctf, ctf_intact_first_peak=o.ctf_intact_first_peak, ctf_phase_flipped=o.ctf_phase_flipped,
                      translations=translation_grid(o.offset_range, o.offset_step),
                      offset_sigma_px=max(o.offset_range / 2, 1.0), symmetry_ops=symmetry_matrices(o.symmetry),
                      device=device, incr_size=o.incr_size, step_size=o.step_size, momentum=o.momentum,
                      tau2_fudge=o.tau2_fudge, positivity=o.positivity, anneal=o.anneal, final_em=o.final_em,
                      final_translations=translation_grid(o.offset_range, o.offset_step / 2))
    order = sampling_order(o, sched, state.iteration + 1 if continue_from else 1, ps.box, apix)
    opts, grid, search = _with_sampling(opts, o, order, ps.box, apix, device)
    if not continue_from:
        rng = np.random.default_rng(o.seed)
        state = initial_state(ps, opts, sched, rng)
    if search is None:
        how = f"{len(grid)} orientations x {len(opts.translations)} translations (every pose)"
    else:
        how = (f"{len(search.coarse_rot)} x {len(search.coarse_trans)} coarse poses (radius ≤ "
               f"{opts.coarse_radius_px:.0f} px), then {len(grid)} orientations x {len(search.fine_trans)} "
               f"translations around the significant ones")
    log.info(f"initial model: {len(ps)} particles, box {ps.box}, {apix:.3f} Å/px, K={o.n_classes}, {how}, "
             f"{sched.total} iterations")
    if o.estimate or o.dry_run:
        by_order = {order: opts}

        def opts_at(it: int) -> SgdOptions:  # the options of iteration ``it``, at its angular sampling
            k = sampling_order(o, sched, it, ps.box, apix)
            if k not in by_order:
                by_order[k] = _with_sampling(opts, o, k, ps.box, apix, device)[0]
            return by_order[k]

        est = estimate_initial_model(ps, state, opts, sched, device, opts_at)
        for line in est.lines():
            log.info(line)
        if o.dry_run:
            return state
    poses: dict[int, tuple] = {}
    start = time.perf_counter()
    first_it = state.iteration
    res = sched.resolution(max(state.iteration, 1), ps.box, apix)
    rate = EStepRate()
    while state.iteration < sched.total:
        t0 = time.perf_counter()
        new_order = sampling_order(o, sched, state.iteration + 1, ps.box, apix)
        if new_order != order:
            order = new_order
            opts, grid, search = _with_sampling(opts, o, order, ps.box, apix, device)
            log.info(f"iteration {state.iteration + 1}: angular sampling {angular_step(order + 1):g}° "
                     f"({len(grid)} orientations; the resolution {sched.resolution(state.iteration + 1, ps.box, apix):.1f} "
                     f"Å needs ≤ {360.0 / math.ceil(math.pi * o.particle_diameter / sched.resolution(state.iteration + 1, ps.box, apix)):.1f}°)")
        out = sgd_iteration(ps, state, opts, sched, rng, cluster)
        post = out["posterior"]
        res = out["resolution"]
        rate.add(post.flops, out["estep_seconds"], post.poses, out["subset"])
        r, t, p = matrix_to_euler(np.asarray(post.best_rotation, dtype=np.float64))
        tr = np.asarray(post.best_translation) * apix
        for j, i in enumerate(out["indices"]):
            poses[int(i)] = (r[j], t[j], p[j], tr[j, 0], tr[j, 1], post.best_class[j] + 1, post.max_posterior[j])
        done = state.iteration - first_it
        elapsed = time.perf_counter() - start
        left = elapsed / done * (sched.total - state.iteration)
        log.info(f"iteration {state.iteration}/{sched.total}: {res:.1f} Å, mini-batch {out['subset']}, "
                 f"{rate.line()}, {out['subset'] / (time.perf_counter() - t0):.0f} particles/s, {left:.0f} s left")
        state.rng_state = rng.bit_generator.state
        if state.iteration % o.write_iter == 0 or state.iteration == sched.total:
            _write_iteration(job, ps, state, poses, res, o, input_star or str(Path(ps.star_path).resolve()))
    if rate.particles:
        log.info(rate.summary())
    log.info(f"done in {time.perf_counter() - start:.1f} s: {job / f'run_it{state.iteration:03d}_class001.mrc'}")
    return state


def sampling_order(o: InitialModelOptions, sched: SgdSchedule, it: int, box: int, pixel_size: float) -> int:
    """The coarse HEALPix order of iteration ``it`` (its fine step is one order finer).

    RELION's rule for SGD (ml_optimiser.cpp, updateAngularSampling, at the start of each iteration after the
    initial phase): one order finer whenever the fine step exceeds 360°/⌈π·D/res⌉, D the particle diameter and
    res the iteration's resolution (Å). Without ``o.sampling_refinement`` the order stays ``o.healpix_order``.
    """
    order = o.healpix_order
    if not o.sampling_refinement:
        return order
    for i in range(sched.ini_iter + 1, it + 1):
        res = sched.resolution(i, box, pixel_size)
        if angular_step(order + 1) > 360.0 / math.ceil(math.pi * o.particle_diameter / res):
            order += 1
    return order


def _with_sampling(opts: SgdOptions, o: InitialModelOptions, order: int, box: int, pixel_size: float, device):
    """``opts`` searching at coarse HEALPix ``order`` (fine: order + 1), the fine orientation grid and the search."""
    grid = orientation_grid(order + 1, o.symmetry)
    search = None if o.exhaustive else make_search_grid(order, o.symmetry, o.offset_range, o.offset_step, device)
    radius = o.coarse_radius_px or coarse_radius(order, o.particle_diameter, box, pixel_size)
    return dataclasses.replace(opts, rotations=euler_to_matrix(*grid.T), search=search,
                               coarse_radius_px=radius), grid, search


# ---- command line: ``spa3d initial-model`` ----

DESCRIPTION = ("Build a 3D map from particles alone by stochastic gradient descent. Defaults are the RELION "
               "tutorial's values (step 17).")

#: command-line option (argparse dest) -> field of InitialModelOptions, for the options a user gives again with
#: --continue (see spa3d.jobs.resume); angular_sampling and healpix_order both set healpix_order
CLI_OPTIONS = {"K": "n_classes", "sym": "symmetry", "particle_diameter": "particle_diameter",
               "flatten_solvent": "flatten_solvent", "ctf": "ctf", "ctf_intact_first_peak": "ctf_intact_first_peak",
               "ctf_phase_flipped": "ctf_phase_flipped", "angular_sampling": "healpix_order",
               "healpix_order": "healpix_order", "offset_range": "offset_range", "offset_step": "offset_step",
               "sgd_ini_iter": "schedule.ini_iter", "sgd_inbetween_iter": "schedule.inbetween_iter",
               "sgd_fin_iter": "schedule.fin_iter", "sgd_ini_resol": "schedule.ini_resol",
               "sgd_fin_resol": "schedule.fin_resol", "sgd_ini_subset": "schedule.ini_subset",
               "sgd_fin_subset": "schedule.fin_subset", "sgd_write_iter": "write_iter",
               "incr_size": "incr_size", "sgd_stepsize": "step_size", "mu": "momentum", "final_em": "final_em",
               "exhaustive_search": "exhaustive", "dry_run": "dry_run", "tau2_fudge": "tau2_fudge",
               "positivity": "positivity", "sampling_refinement": "sampling_refinement",
               "sgd_skip_anneal": "anneal", "sgd_resol_ramp": "schedule.ramp",
               "seed": "seed", "device": "device", "threads": "threads", "workers": "workers",
               "dask_scheduler": "dask_scheduler"}


def add_args(p) -> None:
    import argparse

    from spa3d.jobs.args import add_dask, add_device, add_iterative, add_job_output

    p.add_argument("--i", default=None, help="particle STAR file")
    add_job_output(p, "job directory")
    p.add_argument("--K", type=int, default=1, help="number of classes (default 1)")
    p.add_argument("--sym", default="C1", help="point group (default C1)")
    p.add_argument("--particle-diameter", type=float, default=200.0, help="mask diameter in Å (default 200)")
    p.add_argument("--flatten-solvent", action=argparse.BooleanOptionalAction, default=True,
                   help="flatten and enforce non-negative solvent (default on)")
    p.add_argument("--ctf", action=argparse.BooleanOptionalAction, default=True, help="CTF correction (default on)")
    p.add_argument("--ctf-intact-first-peak", action="store_true")
    p.add_argument("--ctf-phase-flipped", action="store_true")
    p.add_argument("--angular-sampling", type=float, default=15.0, help="angular sampling in degrees (default 15)")
    p.add_argument("--healpix-order", type=int, default=None, help="HEALPix order (overrides --angular-sampling)")
    p.add_argument("--offset-range", type=float, default=6.0, help="offset search range in pixels (default 6)")
    p.add_argument("--offset-step", type=float, default=2.0, help="offset search step in pixels (default 2)")
    p.add_argument("--sgd-ini-iter", type=int, default=25)
    p.add_argument("--sgd-inbetween-iter", type=int, default=100)
    p.add_argument("--sgd-fin-iter", type=int, default=25)
    p.add_argument("--sgd-write-iter", type=int, default=10)
    p.add_argument("--sgd-ini-resol", type=float, default=35.0, help="initial resolution in Å (default 35)")
    p.add_argument("--sgd-fin-resol", type=float, default=15.0, help="final resolution in Å (default 15)")
    p.add_argument("--sgd-ini-subset", type=int, default=100)
    p.add_argument("--sgd-fin-subset", type=int, default=500)
    p.add_argument("--incr-size", type=float, default=10.0,
                   help="Fourier shells searched beyond the scheduled resolution (RELION's --incr_size, default 10)")
    p.add_argument("--sgd-stepsize", type=float, default=0.5, help="SGD step size (RELION's default 0.5)")
    p.add_argument("--mu", type=float, default=0.9, help="SGD momentum (RELION's default 0.9)")
    p.add_argument("--final-em", type=int, default=1,
                   help="the last N iterations are EM steps over all particles, offsets searched at half the "
                        "step (default 1; 0 is RELION's behaviour)")
    p.add_argument("--tau2-fudge", type=float, default=4.0,
                   help="regularisation parameter T of every gradient step (default 4; RELION's InitialModel uses 1)")
    p.add_argument("--positivity", choices=("always", "initial"), default="always",
                   help="with --flatten-solvent, set negative densities to zero in every iteration (default: "
                        "closer to the truth on the benchmarks, docs/conventions.md) or during the initial phase "
                        "only (RELION's)")
    p.add_argument("--sampling-refinement", action=argparse.BooleanOptionalAction, default=True,
                   help="after the initial phase, halve the angular step whenever the resolution needs it "
                        "(360°/ceil(π·diameter/resolution); RELION's, default on)")
    p.add_argument("--sgd-skip-anneal", action="store_true",
                   help="K > 1: no annealing of the classes towards their mean (RELION's --sgd_skip_anneal)")
    p.add_argument("--sgd-resol-ramp", choices=("shells", "angstrom"), default="shells",
                   help="the resolution's ramp in the in-between phase: linear in Fourier shells (RELION's, "
                        "default) or in Å")
    p.add_argument("--exhaustive-search", action="store_true",
                   help="score every pose at the fine sampling (default: coarse-to-fine, RELION's adaptive "
                        "oversampling: a coarse pass at the --angular-sampling step, then the significant poses' "
                        "children at half the angular and translational step)")
    add_iterative(p)
    add_device(p)
    add_dask(p)


def main(a) -> None:
    from spa3d.geometry.sampling import healpix_order_for_sampling
    from spa3d.jobs.args import given_options, start_log

    order = a.healpix_order if a.healpix_order is not None else healpix_order_for_sampling(a.angular_sampling)
    sched = SgdSchedule(a.sgd_ini_iter, a.sgd_inbetween_iter, a.sgd_fin_iter, a.sgd_ini_resol, a.sgd_fin_resol,
                        a.sgd_ini_subset, a.sgd_fin_subset, a.sgd_resol_ramp)
    o = InitialModelOptions(n_classes=a.K, symmetry=a.sym, particle_diameter=a.particle_diameter,
                            flatten_solvent=a.flatten_solvent, ctf=a.ctf, ctf_intact_first_peak=a.ctf_intact_first_peak,
                            ctf_phase_flipped=a.ctf_phase_flipped, healpix_order=order, offset_range=a.offset_range,
                            offset_step=a.offset_step, schedule=sched, write_iter=a.sgd_write_iter, seed=a.seed,
                            incr_size=a.incr_size, step_size=a.sgd_stepsize, momentum=a.mu, final_em=a.final_em,
                            exhaustive=a.exhaustive_search, dry_run=a.dry_run, workers=a.workers,
                            tau2_fudge=a.tau2_fudge, positivity=a.positivity,
                            sampling_refinement=a.sampling_refinement, anneal=not a.sgd_skip_anneal,
                            dask_scheduler=a.dask_scheduler, device=a.device, threads=a.threads)
    start_log(a)
    run_initial_model(a.i, a.o, o, continue_from=a.continue_from, given=given_options(a, CLI_OPTIONS))
