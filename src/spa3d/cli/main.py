"""``spa3d <job> [options]``: the command-line entry point.

Every job's options use RELION's names with hyphens. Units: lengths in Å
unless the help says pixels; angles in degrees. A problem with the input is
reported as one line ``spa3d <job>: error: <file>: <problem>`` and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from spa3d import __version__
from spa3d.errors import InputError


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")


def _add_job_output(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--o", default=None, help=f"{what} (or --project)")
    p.add_argument("--project", default=None, help="RELION project directory: run there (paths relative to it) and "
                                                    "write into the next <Type>/jobNNN/")


def _add_dask(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=0,
                   help="run on a local Dask cluster of N worker processes (default 0: in this process)")
    p.add_argument("--dask-scheduler", default=None,
                   help="address of a running dask.distributed scheduler (e.g. tcp://host:8786)")


def _cmd_simulate(a) -> None:
    from spa3d.jobs.progress import setup_logging
    from spa3d.jobs.simulate import SimulationOptions, simulate

    from pathlib import Path

    Path(a.o).mkdir(parents=True, exist_ok=True)
    setup_logging(Path(a.o) / "simulate.log", quiet=a.quiet)
    logging.getLogger("spa3d").info(" ".join(a.command_line))
    opts = SimulationOptions(
        n_particles=a.n, box=a.box, pixel_size=a.angpix, snr=a.snr,
        fractions=[float(x) for x in a.fractions.split(",")] if a.fractions else None,
        seed=a.seed, ctf=not a.no_ctf, defocus_min=a.defocus_min, defocus_max=a.defocus_max,
        offset_sigma_px=a.offset_sigma, model_resolution=a.model_resolution,
        n_micrographs=a.micrographs, micrograph_size=a.mic_size,
        star_prefix=a.o if getattr(a, "project", None) else "")
    simulate(a.i, a.o, opts)


def _cmd_reconstruct(a) -> None:
    from spa3d.jobs.progress import setup_logging
    from spa3d.jobs.reconstruct import ReconstructOptions, reconstruct

    setup_logging(quiet=a.quiet)
    opts = ReconstructOptions(ctf=a.ctf, ctf_intact_first_peak=a.ctf_intact_first_peak,
                              ctf_phase_flipped=a.ctf_phase_flipped, symmetry=a.sym, maxres=a.maxres, pad=a.pad,
                              subset=a.subset, class_number=a.klass, device=a.device, threads=a.threads,
                              batch_size=a.batch_size, workers=a.workers, dask_scheduler=a.dask_scheduler)
    reconstruct(a.i, a.o, opts)


def _cmd_demo(a) -> None:
    from spa3d.jobs.demo import run_demo
    from spa3d.jobs.progress import setup_logging

    setup_logging(quiet=a.quiet)
    run_demo(a.project, n_particles=a.n, seed=a.seed, device=a.device, quick=a.quick)


def _cmd_symmetrize(a) -> None:
    from spa3d.jobs.symmetry import run_symmetrize

    run_symmetrize(a.i, a.o, a.sym)


def _cmd_align_symmetry(a) -> None:
    from spa3d.jobs.symmetry import run_align_symmetry

    run_align_symmetry(a.i, a.o, a.sym, working_box=a.box_size, keep_centre=a.keep_centre)


def _cmd_initial_model(a) -> None:
    from spa3d.geometry.sampling import healpix_order_for_sampling
    from spa3d.inference.sgd import SgdSchedule
    from spa3d.jobs.initial_model import InitialModelOptions, run_initial_model

    order = a.healpix_order if a.healpix_order is not None else healpix_order_for_sampling(a.angular_sampling)
    sched = SgdSchedule(a.sgd_ini_iter, a.sgd_inbetween_iter, a.sgd_fin_iter, a.sgd_ini_resol, a.sgd_fin_resol,
                        a.sgd_ini_subset, a.sgd_fin_subset)
    o = InitialModelOptions(n_classes=a.K, symmetry=a.sym, particle_diameter=a.particle_diameter,
                            flatten_solvent=a.flatten_solvent, ctf=a.ctf, ctf_intact_first_peak=a.ctf_intact_first_peak,
                            ctf_phase_flipped=a.ctf_phase_flipped, healpix_order=order, offset_range=a.offset_range,
                            offset_step=a.offset_step, schedule=sched, write_iter=a.sgd_write_iter, seed=a.seed,
                            incr_size=a.incr_size, step_size=a.sgd_stepsize, momentum=a.mu, final_em=a.final_em,
                            exhaustive=a.exhaustive_search, dry_run=a.dry_run, workers=a.workers,
                            dask_scheduler=a.dask_scheduler, device=a.device, threads=a.threads)
    from spa3d.jobs.progress import setup_logging

    setup_logging(quiet=a.quiet)
    logging.getLogger("spa3d").info(" ".join(a.command_line))
    run_initial_model(a.i, a.o, o, continue_from=a.continue_from, given=_given_options(a, INITIAL_MODEL_OPTIONS))


#: command-line option (argparse dest) -> field of the job's options, for the options a user gives again
#: with --continue (see spa3d.jobs.resume); angular_sampling and healpix_order both set healpix_order
CLASS3D_OPTIONS = {"K": "n_classes", "iter": "n_iter", "tau2_fudge": "tau2_fudge", "angular_sampling": "healpix_order",
                   "healpix_order": "healpix_order", "offset_range": "offset_range", "offset_step": "offset_step",
                   "ini_high": "ini_high", "particle_diameter": "particle_diameter", "zero_mask": "zero_mask",
                   "flatten_solvent": "flatten_solvent", "ctf": "ctf", "ctf_intact_first_peak": "ctf_intact_first_peak",
                   "ctf_phase_flipped": "ctf_phase_flipped", "firstiter_cc": "firstiter_cc", "sym": "symmetry",
                   "strict_highres_exp": "strict_highres_exp", "skip_align": "skip_align", "sigma_ang": "sigma_ang",
                   "fast_subsets": "fast_subsets", "batch_size": "batch_size", "seed": "seed", "device": "device",
                   "threads": "threads", "workers": "workers", "dask_scheduler": "dask_scheduler",
                   "dry_run": "dry_run"}
INITIAL_MODEL_OPTIONS = {"K": "n_classes", "sym": "symmetry", "particle_diameter": "particle_diameter",
                         "flatten_solvent": "flatten_solvent", "ctf": "ctf", "ctf_intact_first_peak": "ctf_intact_first_peak",
                         "ctf_phase_flipped": "ctf_phase_flipped", "angular_sampling": "healpix_order",
                         "healpix_order": "healpix_order", "offset_range": "offset_range", "offset_step": "offset_step",
                         "sgd_ini_iter": "schedule.ini_iter", "sgd_inbetween_iter": "schedule.inbetween_iter",
                         "sgd_fin_iter": "schedule.fin_iter", "sgd_ini_resol": "schedule.ini_resol",
                         "sgd_fin_resol": "schedule.fin_resol", "sgd_ini_subset": "schedule.ini_subset",
                         "sgd_fin_subset": "schedule.fin_subset", "sgd_write_iter": "write_iter",
                         "incr_size": "incr_size", "sgd_stepsize": "step_size", "mu": "momentum", "final_em": "final_em",
                         "exhaustive_search": "exhaustive", "dry_run": "dry_run",
                         "seed": "seed", "device": "device", "threads": "threads", "workers": "workers",
                         "dask_scheduler": "dask_scheduler"}


def _given_options(a, mapping: dict) -> set[str]:
    """The job options the user gave on the command line (not left at their defaults)."""
    return {mapping[d] for d in getattr(a, "given_dests", set()) if d in mapping}


def _cmd_class3d(a) -> None:
    from spa3d.geometry.sampling import healpix_order_for_sampling
    from spa3d.jobs.class3d import Class3dOptions, run_class3d
    from spa3d.jobs.progress import setup_logging

    order = a.healpix_order if a.healpix_order is not None else healpix_order_for_sampling(a.angular_sampling)
    o = Class3dOptions(n_classes=a.K, n_iter=a.iter, tau2_fudge=a.tau2_fudge, healpix_order=order,
                       offset_range=a.offset_range, offset_step=a.offset_step, ini_high=a.ini_high,
                       particle_diameter=a.particle_diameter, zero_mask=a.zero_mask, flatten_solvent=a.flatten_solvent,
                       ctf=a.ctf, ctf_intact_first_peak=a.ctf_intact_first_peak, ctf_phase_flipped=a.ctf_phase_flipped,
                       firstiter_cc=a.firstiter_cc, symmetry=a.sym, strict_highres_exp=a.strict_highres_exp,
                       skip_align=a.skip_align, sigma_ang=a.sigma_ang, fast_subsets=a.fast_subsets,
                       batch_size=a.batch_size, seed=a.seed, dry_run=a.dry_run,
                       device=a.device, threads=a.threads, workers=a.workers, dask_scheduler=a.dask_scheduler)
    setup_logging(quiet=a.quiet)
    logging.getLogger("spa3d").info(" ".join(a.command_line))
    run_class3d(a.i, a.ref, a.o, o, continue_from=a.continue_from, given=_given_options(a, CLASS3D_OPTIONS))


def _cmd_select(a) -> None:
    from pathlib import Path

    from spa3d.jobs.progress import setup_logging
    from spa3d.jobs.select import SelectOptions, parse_classes, run_select

    Path(a.o).mkdir(parents=True, exist_ok=True)
    setup_logging(Path(a.o) / "run.log", quiet=a.quiet)
    logging.getLogger("spa3d").info(" ".join(a.command_line))
    run_select(a.i, a.o, SelectOptions(classes=parse_classes(a.classes), best=a.best, recenter=a.recenter,
                                       regroup=a.regroup, min_fraction=a.min_fraction))


def _cmd_extract(a) -> None:
    from pathlib import Path

    from spa3d.jobs.extract import ExtractOptions, run_extract
    from spa3d.jobs.progress import setup_logging

    o = ExtractOptions(box=a.box, rescale=a.rescale, invert=a.invert, norm=a.norm, bg_diameter=a.bg_diameter,
                       white_dust=a.white_dust, black_dust=a.black_dust, ramp=not a.no_ramp,
                       reset_offsets=a.reset_offsets, recenter=a.recenter,
                       recenter_xyz=(a.recenter_x, a.recenter_y, a.recenter_z), ref_angpix=a.ref_angpix,
                       angpix=a.angpix, seed=a.seed)
    from spa3d.jobs.extract import _check_options

    _check_options(o)  # before creating the job directory
    Path(a.o).mkdir(parents=True, exist_ok=True)
    setup_logging(Path(a.o) / "run.log", quiet=a.quiet)
    logging.getLogger("spa3d").info(" ".join(a.command_line))
    run_extract(a.mics, a.reextract, a.o, o)


def _cmd_fit(a) -> None:
    from spa3d.maps.fit import run_fit

    run_fit(a.map, a.model, a.o, a.resolution)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spa3d", description="Single-particle cryo-EM: 2D particles to 3D maps, "
                                     "RELION-compatible (STAR, MRC, RELION conventions).")
    parser.add_argument("--version", action="version", version=f"spa3d {__version__}")
    sub = parser.add_subparsers(dest="job", metavar="<job>")

    p = sub.add_parser("simulate", help="simulate particles (and micrographs) with known ground truth",
                       description="Simulate a particle dataset from maps (MRC) or atomic models (PDB/mmCIF): "
                                   "random poses and offsets, per-particle CTF, white noise at a given SNR. Writes "
                                   "particles.star, particles_truth.star, truth_classNNN.mrc and stacks into --o.")
    p.add_argument("--i", nargs="+", required=True, help="maps (.mrc) or atomic models (.pdb, .cif), one per species")
    _add_job_output(p, "output (project) directory")
    p.add_argument("--n", type=int, default=1000, help="number of particles (default 1000)")
    p.add_argument("--fractions", default=None, help="comma-separated fraction of each species (default equal)")
    p.add_argument("--box", type=int, default=64, help="box size in pixels (default 64)")
    p.add_argument("--angpix", type=float, default=2.0, help="pixel size in Å (default 2.0)")
    p.add_argument("--snr", type=float, default=0.1, help="signal-to-noise ratio (variances, default 0.1)")
    p.add_argument("--no-ctf", action="store_true", help="no CTF (default: random defocus per particle)")
    p.add_argument("--defocus-min", type=float, default=10000.0, help="smallest defocus in Å (default 10000)")
    p.add_argument("--defocus-max", type=float, default=30000.0, help="largest defocus in Å (default 30000)")
    p.add_argument("--offset-sigma", type=float, default=2.0, help="std of random origins in pixels (default 2)")
    p.add_argument("--model-resolution", type=float, default=None,
                   help="resolution in Å of the density simulated from atomic models (default 2 pixels)")
    p.add_argument("--micrographs", type=int, default=0,
                   help="also simulate this many micrographs holding the particles (default 0: none)")
    p.add_argument("--mic-size", type=int, default=512, help="micrograph size in pixels (default 512)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("reconstruct", help="3D map from particles with known poses (as relion_reconstruct)",
                       description="Reconstruct a map from the particles of a STAR file at their poses "
                                   "(rlnAngleRot/Tilt/Psi in degrees, rlnOriginX/YAngst in Å).")
    p.add_argument("--i", required=True, help="particle STAR file (RELION 3.1, or 3.0)")
    p.add_argument("--o", required=True, help="output map (.mrc)")
    p.add_argument("--ctf", action="store_true", help="apply CTF correction")
    p.add_argument("--ctf-intact-first-peak", action="store_true", help="leave CTFs intact until their first peak")
    p.add_argument("--ctf-phase-flipped", action="store_true", help="images have been phase-flipped")
    p.add_argument("--sym", default="C1", help="point group: Cn, Dn, T, O, I (default C1)")
    p.add_argument("--maxres", type=float, default=None, help="maximum resolution in Å (default Nyquist)")
    p.add_argument("--pad", type=int, default=2, help="padding factor (default 2)")
    p.add_argument("--subset", type=int, default=None, help="only rlnRandomSubset 1 or 2")
    p.add_argument("--class", dest="klass", type=int, default=None, help="only particles of this rlnClassNumber")
    p.add_argument("--batch-size", type=int, default=256, help="particles per batch (default 256)")
    _add_device(p)
    _add_dask(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_reconstruct)

    p = sub.add_parser("initial-model", help="de novo initial model by SGD (RELION 3.1 InitialModel)",
                       description="Build a 3D map from particles alone by stochastic gradient descent. Defaults "
                                   "are the RELION tutorial's values (step 17).")
    p.add_argument("--i", default=None, help="particle STAR file")
    _add_job_output(p, "job directory")
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
    p.add_argument("--dry-run", action="store_true",
                   help="print the expected wall time, peak memory and poses per particle (from a short "
                        "calibration on this machine) and stop; every run logs this estimate first")
    p.add_argument("--exhaustive-search", action="store_true",
                   help="score every pose at the fine sampling (default: coarse-to-fine, RELION's adaptive "
                        "oversampling: a coarse pass at the --angular-sampling step, then the significant poses' "
                        "children at half the angular and translational step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--continue", dest="continue_from", default=None,
                   help="run_itNNN_optimiser.star, or a job directory (its last complete iteration), to continue "
                        "from: the run's options are restored; options given again replace them")
    p.add_argument("--quiet", action="store_true", help="no progress on the terminal (the job's run.log still has it)")
    _add_device(p)
    _add_dask(p)
    p.set_defaults(func=_cmd_initial_model)

    p = sub.add_parser("class3d", help="3D classification by maximum likelihood (RELION 3.1 Class3D)",
                       description="Classify particles into K 3D classes against a reference map, with "
                                   "orientations and offsets searched coarse-to-fine. Outputs RELION's "
                                   "run_itNNN_{classKKK.mrc,model.star,data.star,optimiser.star} in --o.")
    p.add_argument("--i", default=None, help="particle STAR file")
    p.add_argument("--ref", default=None, help="reference map (.mrc), same box and pixel size as the particles")
    _add_job_output(p, "job directory")
    p.add_argument("--K", type=int, default=4, help="number of classes (default 4)")
    p.add_argument("--iter", type=int, default=25, help="number of iterations (default 25)")
    p.add_argument("--tau2-fudge", type=float, default=4.0, help="regularisation parameter T (default 4)")
    p.add_argument("--angular-sampling", type=float, default=7.5, help="angular sampling in degrees: 15, 7.5, "
                   "3.7 (default 7.5)")
    p.add_argument("--healpix-order", type=int, default=None,
                   help="coarse HEALPix order (overrides --angular-sampling; 7.5° = 2)")
    p.add_argument("--offset-range", type=float, default=5.0, help="offset search range in pixels (default 5)")
    p.add_argument("--offset-step", type=float, default=1.0, help="offset search step in pixels (default 1)")
    p.add_argument("--ini-high", type=float, default=50.0, help="initial low-pass of the reference in Å (default 50)")
    p.add_argument("--particle-diameter", type=float, default=None, help="mask diameter in Å (default: the box)")
    p.add_argument("--zero-mask", action="store_true", help="zeros outside the mask (default: noise)")
    p.add_argument("--flatten-solvent", action="store_true", help="mask the class maps with the particle sphere")
    p.add_argument("--ctf", action="store_true", help="CTF correction")
    p.add_argument("--ctf-intact-first-peak", action="store_true")
    p.add_argument("--ctf-phase-flipped", action="store_true")
    p.add_argument("--firstiter-cc", action="store_true",
                   help="first iteration by cross-correlation (reference not on absolute greyscale)")
    p.add_argument("--sym", default="C1", help="point group (default C1)")
    p.add_argument("--strict-highres-exp", type=float, default=-1.0,
                   help="never use frequencies beyond this resolution (Å) in the E-step")
    p.add_argument("--skip-align", action="store_true", help="classify at the particles' stored poses")
    p.add_argument("--sigma-ang", type=float, default=-1.0,
                   help="local searches: σ in degrees of the prior on angles around the stored poses")
    p.add_argument("--fast-subsets", action="store_true",
                   help="random subsets in the first 15 iterations: K*1500, K*4500 particles, then 30%%")
    p.add_argument("--batch-size", type=int, default=None, help="particles per batch (default: from free memory)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the expected wall time, peak memory and poses per particle (from a short "
                        "calibration on this machine) and stop; every run logs this estimate first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--continue", dest="continue_from", default=None,
                   help="run_itNNN_optimiser.star, or a job directory (its last complete iteration), to continue "
                        "from: the run's options are restored; options given again replace them")
    p.add_argument("--quiet", action="store_true", help="no progress on the terminal (the job's run.log still has it)")
    _add_device(p)
    _add_dask(p)
    p.set_defaults(func=_cmd_class3d)

    p = sub.add_parser("symmetrize", help="impose a point group on a map (as relion_image_handler --sym)",
                       description="Average a map over the rotations of a point group (RELION's axes).")
    p.add_argument("--i", required=True, help="input map (.mrc)")
    p.add_argument("--o", required=True, help="output map (.mrc)")
    p.add_argument("--sym", required=True, help="point group: Cn, Dn, T, O, I (I2), I1, I3, I4")
    p.set_defaults(func=_cmd_symmetrize)

    p = sub.add_parser("align-symmetry", help="rotate a map so its symmetry axes lie on RELION's axes",
                       description="Find the rotation (after re-centring on the centre of mass) that puts the "
                                   "map's symmetry axes on RELION's convention for the group, as "
                                   "relion_align_symmetry does; print it and how symmetric the map is.")
    p.add_argument("--i", required=True, help="input map (.mrc)")
    p.add_argument("--o", required=True, help="output map (.mrc)")
    p.add_argument("--sym", required=True, help="point group: Cn, Dn, T, O, I")
    p.add_argument("--box-size", type=int, default=32, help="working box in pixels for the search (default 32)")
    p.add_argument("--keep-centre", action="store_true", help="do not re-centre the map on its centre of mass")
    p.set_defaults(func=_cmd_align_symmetry)

    p = sub.add_parser("select", help="keep the particles of chosen 3D classes (RELION's Select)",
                       description="Write SELDIR/particles.star with the particles of the chosen classes of a "
                                   "classification (read from the run_itNNN_data.star beside the model.star). "
                                   "Prints a ranking of the classes with the reasons.")
    p.add_argument("--i", required=True, help="a classification's run_itNNN_model.star")
    _add_job_output(p, "job directory (writes particles.star)")
    p.add_argument("--classes", default=None, help="class numbers to keep, e.g. 3,4")
    p.add_argument("--best", type=int, default=None, help="keep the N best-ranked classes")
    p.add_argument("--recenter", action="store_true",
                   help="move each particle's origin so its class's centre of mass is at the box centre")
    p.add_argument("--regroup", type=int, default=0, help="merge groups into about N groups (default 0: keep)")
    p.add_argument("--min-fraction", type=float, default=0.02,
                   help="classes with a smaller share of the particles rank last (default 0.02)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_select)

    p = sub.add_parser("extract", help="re-extract particles from micrographs (relion_preprocess --reextract_data_star)",
                       description="Cut the particles of a STAR file again from their micrographs, in a new box, "
                                   "optionally rescaled, normalised and contrast-inverted; writes one stack per "
                                   "micrograph and EXTDIR/particles.star with the new optics.")
    p.add_argument("--mics", required=True, help="micrographs STAR file (micrographs_ctf.star)")
    p.add_argument("--reextract", required=True, help="particle STAR file to re-extract (e.g. Select/job019/particles.star)")
    _add_job_output(p, "job directory")
    p.add_argument("--box", type=int, default=360, help="box size in pixels of the micrograph (even; default 360)")
    p.add_argument("--rescale", type=int, default=None, help="rescale the box to this many pixels (even; default: no)")
    p.add_argument("--invert", action="store_true", help="invert contrast (dark protein becomes white)")
    p.add_argument("--norm", action="store_true", help="normalise with the background outside the circle")
    p.add_argument("--bg-diameter", type=float, default=-1.0,
                   help="diameter of the background circle in pixels before rescaling (default 75%% of the box)")
    p.add_argument("--no-ramp", action="store_true", help="subtract only the background mean, not a fitted plane")
    p.add_argument("--white-dust", type=float, default=-1.0, help="remove white dust above S SDs (-1: off)")
    p.add_argument("--black-dust", type=float, default=-1.0, help="remove black dust below S SDs (-1: off)")
    p.add_argument("--reset-offsets", action="store_true", help="set rlnOriginX/YAngst to zero")
    p.add_argument("--recenter", action="store_true", help="move the refined offsets into the coordinates")
    p.add_argument("--recenter-x", type=float, default=0.0, help="re-centre on this x (pixels of the reference)")
    p.add_argument("--recenter-y", type=float, default=0.0, help="re-centre on this y (pixels of the reference)")
    p.add_argument("--recenter-z", type=float, default=0.0, help="re-centre on this z (pixels of the reference)")
    p.add_argument("--ref-angpix", type=float, default=-1.0,
                   help="pixel size of the reference for --recenter-x/y/z in Å (default: the particles')")
    p.add_argument("--angpix", type=float, default=None,
                   help="micrograph pixel size in Å (default: rlnMicrographPixelSize of the micrograph STAR file)")
    p.add_argument("--seed", type=int, default=0, help="random seed of dust replacement (default 0)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("fit", help="fit an atomic model into a map and tell the map's hand (Chimera's Fit in Map)",
                       description="Rigid-body fit of an atomic model (PDB/mmCIF) into a map: global search over "
                                   "rotations and translations, then local refinement, on the model's density "
                                   "simulated at the map's resolution. Prints the correlation, the transformation, "
                                   "the correlation with the mirrored map and the hand; writes the fitted model.")
    p.add_argument("--map", required=True, help="map (.mrc)")
    p.add_argument("--model", required=True, help="atomic model (.pdb, .cif, optionally gzipped)")
    p.add_argument("--o", default=None, help="fitted model (.pdb or .cif; default <model>_fitted.pdb beside the map)")
    p.add_argument("--resolution", type=float, default=None,
                   help="resolution in Å of the simulated model density (default 3 pixels)")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("report", help="(re)write a job's report.html and PNGs",
                       description="Write JOBDIR/report.html (self-contained, images embedded) and JOBDIR/report/*.png: "
                                   "per-iteration plots, slices, projections and isosurfaces of the maps, class gallery, "
                                   "orientation distribution, FSC against a ground truth, particle gallery.")
    p.add_argument("job_dir", help="job directory")
    p.add_argument("--truth", default=None, help="ground-truth map for FSC curves (.mrc)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("demo", help="run the workflow end to end on the embedded default data (PDB 1TII)",
                       description="Simulate micrographs and particles of the embedded structure, then run spa3d's "
                                   "jobs on them and report resolution against the ground truth.")
    p.add_argument("--project", default=None, help="project directory (default: a new ./spa3d_demo*)")
    p.add_argument("--n", type=int, default=2000, help="number of particles (default 2000)")
    p.add_argument("--quick", action="store_true", help="shorter schedules (a smoke test, not for the results)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)
    return parser


#: jobs that can run in a RELION project directory (--project), with their RELION job type
PROJECT_JOBS = {"simulate": "Import", "initial-model": "InitialModel", "class3d": "Class3D", "select": "Select",
                "extract": "Extract"}
#: jobs that write report.html into their job directory when they end
REPORTED_JOBS = ("simulate", "initial-model", "class3d", "select", "extract")


def _continued_job_dir(args) -> str | None:
    """The job directory a ``--continue`` resumes in: the directory given, or the optimiser.star's."""
    cont = getattr(args, "continue_from", None)
    if not cont:
        return None
    from pathlib import Path

    p = Path(cont)
    project = getattr(args, "project", None)
    where = Path(project) / p if project and not p.is_absolute() else p  # --project: relative to the project
    return str(p if where.is_dir() else p.parent)


def _run_job(args) -> None:
    if getattr(args, "dry_run", False):  # an estimate only: no job directory, no pipeline entry, no report
        if getattr(args, "o", None) is None:
            args.o = _continued_job_dir(args) or "."
        args.func(args)
        return
    if args.job in PROJECT_JOBS and getattr(args, "project", None):
        from spa3d.jobs.pipeline import job_nodes, project_job

        if args.o is not None:
            raise InputError(None, "give either --o or --project, not both")
        with project_job(args.project, PROJECT_JOBS[args.job], args.command_line,
                         continue_job=_continued_job_dir(args)) as record:
            args.o = str(record.job_dir)
            args.func(args)
            record.inputs, record.outputs = job_nodes(args.job, args, record.job_dir)
            _report(args)
        return
    if args.job in PROJECT_JOBS and args.o is None:
        args.o = _continued_job_dir(args)
        if args.o is None:
            raise InputError(None, "give --o JOBDIR or --project DIR")
    args.func(args)
    _report(args)


def _report(args) -> None:
    if args.job in REPORTED_JOBS and not getattr(args, "no_report", False):
        from spa3d.report.job_report import make_report

        make_report(args.o)


def _cmd_report(a) -> None:
    from pathlib import Path

    from spa3d.jobs.progress import setup_logging
    from spa3d.report.job_report import make_report

    setup_logging()
    if not Path(a.job_dir).is_dir():
        raise InputError(a.job_dir, "not a directory")
    make_report(a.job_dir, a.truth)


def _explicit_dests(argv: list[str]) -> set[str]:
    """Names (argparse dests) of the options that ``argv`` gives, as opposed to those left at their defaults."""
    parser = build_parser()
    for sub in parser._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            action.default = argparse.SUPPRESS
    try:
        return set(vars(parser.parse_args(argv))) - {"job", "func"}
    except SystemExit:
        return set()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(x) for x in argv]
    args = parser.parse_args(argv)
    args.command_line = ["spa3d", *argv]
    args.given_dests = _explicit_dests(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        _run_job(args)
    except InputError as exc:
        print(f"spa3d {args.job}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, read-only or vanished directory...: say which file, no traceback
        where = exc.filename or getattr(args, "o", None) or "output"
        print(f"spa3d {args.job}: error: {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"spa3d {args.job}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
