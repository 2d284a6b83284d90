"""spa3d initial-model vs relion_refine --denovo_3dref --sgd on the same particles, in the same run.

Simulates particles of PDB 1TII (or, with ``--protein d2``, a D2 tetramer of
its A subunit) with relion_project (box 64, 2 Å/pixel, SNR ≈ 0.1, CTF), runs RELION 3.1's SGD initial model and spa3d's with the same
schedule, superposes each result on the ground truth (rotation, shift, both
hands) and prints wall time and FSC resolution (0.5 and 0.143) for both.
``--full`` also times spa3d on the tutorial's full schedule (25/100/25,
100→500); ``--relion-full`` runs RELION on it too (40 min on 2 cores).
``--reuse-relion`` keeps a finished RELION run (and its recorded wall time,
relion_<schedule>/wall_seconds.json) found in ``--workdir``; ``--seeds``
runs spa3d with several seeds.

    python benchmarks/initial_model_vs_relion.py [--n 2000] [--full] [--relion-full] [--workdir DIR]
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
from relion_data import d2_tetramer, estep_rate_line, relion_particles, sgemm_rate, timed

from spa3d.fourier.filters import fsc, resolution_at
from spa3d.io.mrc import read_map
from spa3d.maps.align import superpose

SHORT = dict(ini=10, inbetween=30, fin=10, ini_subset=100, fin_subset=300)
FULL = dict(ini=25, inbetween=100, fin=25, ini_subset=100, fin_subset=500)


def relion_cmd(s: dict, diameter: float, out: str) -> list[str]:
    return ["relion_refine", "--o", out, "--i", "noisy.star", "--denovo_3dref", "--sgd", "--ctf", "--K", "1",
            "--sym", "C1", "--flatten_solvent", "--zero_mask", "--particle_diameter", str(diameter),
            "--healpix_order", "1", "--oversampling", "1", "--offset_range", "6", "--offset_step", "2",
            "--sgd_ini_iter", str(s["ini"]), "--sgd_inbetween_iter", str(s["inbetween"]), "--sgd_fin_iter", str(s["fin"]),
            "--sgd_ini_subset", str(s["ini_subset"]), "--sgd_fin_subset", str(s["fin_subset"]),
            "--sgd_ini_resol", "35", "--sgd_fin_resol", "15", "--sgd_write_iter", "10", "--j", "2", "--pool", "3",
            "--dont_combine_weights_via_disc"]


def spa3d_cmd(s: dict, diameter: float, out: str, seed: int, extra: list[str]) -> list[str]:
    exe = shutil.which("spa3d") or str(Path(sys.executable).parent / "spa3d")
    return [exe, "initial-model", "--i", "noisy.star", "--o", out, "--particle-diameter", str(diameter),
            "--sgd-ini-iter", str(s["ini"]), "--sgd-inbetween-iter", str(s["inbetween"]), "--sgd-fin-iter", str(s["fin"]),
            "--sgd-ini-subset", str(s["ini_subset"]), "--sgd-fin-subset", str(s["fin_subset"]), "--seed", str(seed),
            "--quiet", *extra]


def score(path: Path, truth: np.ndarray, apix: float) -> tuple[float, float, bool]:
    vol, _ = read_map(path)
    aligned, sup = superpose(vol, truth)
    c = fsc(aligned, truth)
    n = truth.shape[0]
    return resolution_at(c, n, apix, 0.5), resolution_at(c, n, apix, 0.143), sup.mirrored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--diameter", type=float, default=110.0, help="mask diameter in Å (1TII is about 80 Å across)")
    ap.add_argument("--full", action="store_true", help="also run spa3d on the tutorial's full schedule")
    ap.add_argument("--relion-full", action="store_true", help="also run RELION on the full schedule (slow)")
    ap.add_argument("--skip-relion", action="store_true")
    ap.add_argument("--reuse-relion", action="store_true", help="reuse finished RELION runs in --workdir")
    ap.add_argument("--seeds", default="1", help="spa3d seeds, comma-separated (default 1)")
    ap.add_argument("--spa3d-args", default="", help="extra spa3d initial-model options, e.g. '--final-em 0'")
    ap.add_argument("--protein", choices=("1tii", "d2"), default="1tii",
                    help="1TII's AB5 complex, or a D2 tetramer of its A subunit (relion_data.d2_tetramer)")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="spa3d_bench_im_"))
    work.mkdir(parents=True, exist_ok=True)
    if a.reuse_relion and (work / "noisy.star").exists():  # the particles RELION's recorded runs saw
        truth, apix = read_map(work / "truth_class001.mrc")
    else:
        structure = str(d2_tetramer(work / "d2_tetramer.pdb")) if a.protein == "d2" else None
        truth, apix = relion_particles(work, a.n, a.snr, seed=12, structure=structure)

    rows, ran = [], []
    plans = [("short", SHORT, not a.skip_relion)]
    if a.full:
        plans.append(("full", FULL, a.relion_full))
    for label, s, with_relion in plans:
        total = s["ini"] + s["inbetween"] + s["fin"]
        times = []
        for seed in [int(x) for x in a.seeds.split(",")]:
            out = f"spa3d_{label}_seed{seed}"
            (work / out).mkdir(exist_ok=True)
            ran.append(out)
            t_s = timed(spa3d_cmd(s, a.diameter, out, seed, a.spa3d_args.split()), work)
            times.append(t_s)
            rows.append((label, f"spa3d (seed {seed})", t_s, *score(work / out / f"run_it{total:03d}_class001.mrc",
                                                                    truth, apix)))
        if with_relion:
            rdir = work / f"relion_{label}"
            stamp = rdir / "wall_seconds.json"
            if not (a.reuse_relion and stamp.exists()):
                rdir.mkdir(exist_ok=True)
                stamp.write_text(json.dumps({"wall_s": timed(relion_cmd(s, a.diameter, f"relion_{label}/run"), work)}))
            t_r = json.loads(stamp.read_text())["wall_s"]
            r_r = score(rdir / f"run_it{total:03d}_class001.mrc", truth, apix)
            rows.append((label, "relion_refine --sgd", t_r, *r_r))
            rows.append((label, "time ratio spa3d/RELION", max(times) / t_r, float("nan"), float("nan"), False))

    print(f"\nSGD initial model from {a.n} particles of {a.protein} (relion_project, box {truth.shape[0]}, {apix} Å/px, SNR {a.snr}), "
          f"{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}; schedules: short 10/30/10, 100->300; full 25/100/25, 100->500; 35->15 Å")
    print(f"{'schedule':<9} {'program':<24} {'wall (s)':>9} {'FSC0.5 (Å)':>11} {'FSC0.143 (Å)':>13} {'hand':>9}")
    for label, prog, t, r5, r1, mir in rows:
        hand = "" if np.isnan(r5) else ("mirrored" if mir else "correct")
        print(f"{label:<9} {prog:<24} {t:9.2f} {r5:11.2f} {r1:13.2f} {hand:>9}")
    rate = sgemm_rate()
    for out in ran:
        print(f"{out}: {estep_rate_line(work / out / 'run.log', rate)}")
    print(f"\nworking directory: {work}")


if __name__ == "__main__":
    main()
