"""spa3d class3d vs relion_refine 3D classification on the same particles, in the same run.

Simulates a mixture of three species with relion_project (1TII's AB5 complex,
its B5 ring alone, and an unrelated compact "junk" protein; or with
``--mixture d2`` a D2 tetramer built from 1TII's A subunit, its dimer and its
monomer; box 64, 2 Å/pixel, CTF, white noise), then runs RELION 3.1's 3D
classification and spa3d's with the tutorial's settings scaled to 2 cores
(reference: the intact complex at 50 Å, not on absolute greyscale; T=4,
offsets 5/1, CTF, zero mask). The reference is a map made from an atomic
model, so RELION is told it is CTF-corrected (``--ctf_corrected_ref``, the
GUI's "Has reference been CTF-corrected? Yes", as the tutorial sets it):
without it RELION's first iteration compares the images with projections that
lack the CTF, and on these particles its poses after that iteration are nearly
random. For each program it prints wall time, the adjusted Rand index of the
classes against the true species, and the FSC resolution of the class that
holds most intact complexes against that species' ground truth.

    python benchmarks/class3d_vs_relion.py [--n 800] [--K 3] [--iter 15] [--sampling 7.5] [--mixture d2] [--workdir DIR]

``--reuse-relion`` keeps a finished RELION run (and its recorded time) found
in the working directory instead of running it again.

``--realistic MIC.mrc`` makes the particles with ``spa3d simulate`` instead:
noise with the spectrum of the real micrograph MIC.mrc (e.g. mrcfile's
epu2.9_example.mrc), plus 10 % junk and 5 % empty picks (true classes 4 and
5), a per-particle intensity scale (log-normal SD 0.1), ice thickness (SD
15 %) and defocus errors (SD 200 Å) written to the STAR file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from relion_data import d2_mixture, print_tail, relion_mixture, timed

from spa3d.analysis.metrics import adjusted_rand_index

from spa3d.fourier.filters import fsc, lowpass, resolution_at
from spa3d.io.mrc import read_map, write_map
from spa3d.io.star import read_star
from spa3d.maps.align import superpose

HEALPIX = {15.0: 1, 7.5: 2, 3.7: 3}


def relion_cmd(a, out: str) -> list[str]:
    return ["relion_refine", "--o", out, "--i", "noisy.star", "--ref", "reference.mrc", "--firstiter_cc",
            "--ini_high", "50", "--ctf", "--ctf_corrected_ref", "--K", str(a.K), "--tau2_fudge", "4",
            "--iter", str(a.iter), "--particle_diameter", str(a.diameter), "--zero_mask", "--flatten_solvent", "--sym", "C1",
            "--healpix_order", str(HEALPIX[a.sampling]), "--oversampling", "1", "--offset_range", "5",
            "--offset_step", "1", "--norm", "--scale", "--j", "2", "--pool", "3", "--dont_combine_weights_via_disc",
            "--random_seed", "1"]


def spa3d_cmd(a, out: str) -> list[str]:
    exe = shutil.which("spa3d") or str(Path(sys.executable).parent / "spa3d")
    return [exe, "class3d", "--i", "noisy.star", "--ref", "reference.mrc", "--o", out, "--firstiter-cc",
            "--ini-high", "50", "--ctf", "--K", str(a.K), "--tau2-fudge", "4", "--iter", str(a.iter),
            "--particle-diameter", str(a.diameter), "--zero-mask", "--flatten-solvent", "--sym", "C1",
            "--angular-sampling", str(a.sampling), "--offset-range", "5", "--offset-step", "1", "--seed", str(a.seed),
            *a.spa3d_args.split()]


def score(job: Path, it: int, k_cls: int, truth_labels: np.ndarray, truths: list[np.ndarray], apix: float):
    """(ARI, FSC 0.5 Å, FSC 0.143 Å, reported resolution Å, class sizes) of a run's last iteration.

    The FSCs are of the class holding most intact complexes against that species' truth; the reported
    resolution is that class's rlnEstimatedResolution in the run's model.star (honest if not finer than
    the FSC 0.143 against the truth).
    """
    parts = read_star(job / f"run_it{it:03d}_data.star")["particles"]
    # both programs keep the input order of particles
    labels = parts["rlnClassNumber"].to_numpy().astype(int)
    ari = adjusted_rand_index(truth_labels, labels)
    intact = truth_labels == 1
    best = np.bincount(labels[intact], minlength=k_cls + 1).argmax()
    vol, _ = read_map(job / f"run_it{it:03d}_class{best:03d}.mrc")
    aligned, _ = superpose(vol, truths[0])
    c = fsc(aligned, truths[0])
    n = truths[0].shape[0]
    sizes = np.bincount(labels, minlength=k_cls + 1)[1:]
    model = read_star(job / f"run_it{it:03d}_model.star")["model_classes"]
    reported = float(model["rlnEstimatedResolution"].to_numpy()[best - 1])
    return ari, resolution_at(c, n, apix, 0.5), resolution_at(c, n, apix, 0.143), reported, sizes


def realistic_mixture(work: Path, n: int, fractions: list[float], snr: float, micrograph: str, maps=None) -> None:
    """The mixture made by ``spa3d simulate`` with its realism options (see the module docstring): noisy.star
    (the particles as a user has them) and truth.star (true classes: the species, then junk, then empty)."""
    from spa3d.data import default_mixture
    from spa3d.jobs.simulate import SimulationOptions, simulate

    maps = default_mixture() if maps is None else maps
    for k, m in enumerate(maps):
        write_map(work / f"truth_class{k + 1:03d}.mrc", m, 2.0)
    simulate([str(work / f"truth_class{k + 1:03d}.mrc") for k in range(len(maps))], work,
             SimulationOptions(n_particles=n, snr=snr, seed=21, fractions=fractions, noise_spectrum=micrograph,
                               junk_fraction=0.1, empty_fraction=0.05, scale_sd=0.1, defocus_error=200.0,
                               ice_sd=0.15))
    shutil.copy(work / "particles.star", work / "noisy.star")
    shutil.copy(work / "particles_truth.star", work / "truth.star")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=800)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--K", type=int, default=3)
    ap.add_argument("--iter", type=int, default=15)
    ap.add_argument("--sampling", type=float, default=7.5, choices=sorted(HEALPIX))
    ap.add_argument("--diameter", type=float, default=110.0)
    ap.add_argument("--fractions", default="0.5,0.3,0.2", help="intact complex, B5 ring, junk")
    ap.add_argument("--skip-relion", action="store_true")
    ap.add_argument("--reuse-relion", action="store_true")
    ap.add_argument("--mixture", choices=("1tii", "d2"), default="1tii",
                    help="1TII's AB5 complex / B5 ring / junk, or a D2 tetramer / its dimer / its monomer")
    ap.add_argument("--seed", type=int, default=1, help="spa3d's --seed (RELION's run keeps seed 1)")
    ap.add_argument("--spa3d-args", default="", help="extra spa3d class3d options, e.g. '--no-direction-prior'")
    ap.add_argument("--realistic", default=None, metavar="MIC.mrc",
                    help="realistic particles from spa3d simulate, with the noise spectrum of this real micrograph")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="spa3d_bench_c3d_"))
    work.mkdir(parents=True, exist_ok=True)
    apix = 2.0
    if not (work / "truth.star").exists():
        maps = d2_mixture(work) if a.mixture == "d2" else None
        fractions = [float(f) for f in a.fractions.split(",")]
        if a.realistic:
            realistic_mixture(work, a.n, fractions, a.snr, a.realistic, maps)
        else:
            relion_mixture(work, a.n, fractions, a.snr, seed=21, maps=maps)
    truths = [read_map(work / f"truth_class{k:03d}.mrc")[0] for k in (1, 2, 3)]
    # the reference: the intact complex at 50 Å, scaled arbitrarily (not on absolute greyscale)
    write_map(work / "reference.mrc", 3.0 * lowpass(truths[0], apix, 50.0), apix)
    truth_labels = read_star(work / "truth.star")["particles"]["rlnClassNumber"].to_numpy().astype(int)

    rows = []
    tag = f"K{a.K}_it{a.iter}_{a.sampling:g}"
    out = work / f"spa3d_{tag}"
    out.mkdir(exist_ok=True)
    t_s = timed(spa3d_cmd(a, str(out.relative_to(work))), work)
    rows.append(("spa3d class3d", t_s, *score(out, a.iter, a.K, truth_labels, truths, apix)))
    if not a.skip_relion:
        rdir = work / f"relion_{tag}"
        stamp = rdir / "wall_seconds.json"
        if not (a.reuse_relion and stamp.exists()):
            rdir.mkdir(exist_ok=True)
            t_r = timed(relion_cmd(a, f"{rdir.name}/run"), work)
            stamp.write_text(json.dumps({"wall_s": t_r}))
        t_r = json.loads(stamp.read_text())["wall_s"]
        rows.append(("relion_refine", t_r, *score(rdir, a.iter, a.K, truth_labels, truths, apix)))

    species = "D2 tetramer / dimer / monomer" if a.mixture == "d2" else "AB5 complex / B5 ring / junk"
    source = (f"spa3d simulate, noise of {Path(a.realistic).name}, 10 % junk, 5 % empty, scale, ice and defocus "
              f"errors" if a.realistic else "relion_project")
    print(f"\n3D classification of {a.n} particles ({source}; {species} = {a.fractions}; "
          f"box 64, {apix} Å/px, SNR {a.snr}), K={a.K}, T=4, {a.iter} iterations, {a.sampling}° sampling, "
          f"offsets 5/1 px, {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}")
    print(f"{'program':<16} {'wall (s)':>9} {'ARI':>6} {'FSC0.5 (Å)':>11} {'FSC0.143 (Å)':>13} {'reported (Å)':>13}"
          "  class sizes")
    for prog, t, ari, r5, r1, rep, sizes in rows:
        print(f"{prog:<16} {t:9.1f} {ari:6.3f} {r5:11.2f} {r1:13.2f} {rep:13.2f}  {[int(x) for x in sizes]}")
    print_tail(rows, out / "run.log", work)


if __name__ == "__main__":
    main()
