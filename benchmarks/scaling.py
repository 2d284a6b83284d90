"""Throughput and memory of spa3d class3d: in process, on Dask workers, on a GPU (and initial-model).

Simulates the three-species mixture of :func:`spa3d.data.default_mixture`
(box 64, 2 Å/pixel, CTF, SNR 0.1) with spa3d, runs the tutorial's 3D
classification settings (K=4, T=4, offsets 5/1, 50 Å, CTF, zero mask) and
prints wall time, particle-iterations/s, peak memory (host RSS of the job;
per Dask worker; GPU allocator peak on CUDA) and the adjusted Rand index
against the true species.

``--workers 2`` runs the same job on a local Dask cluster of 2 processes
(one torch thread each) after the in-process run (``--threads`` torch
threads, default all cores), on the same data. With ``--initial-model`` it
also times the tutorial's SGD initial model (25/100/25, 100→500) on 2,000
particles of 1TII simulated by spa3d (SNR 0.1).

    python benchmarks/scaling.py --n 1000 --iter 5 --sampling 15 --workers 2      # 2-core CPU
    python benchmarks/scaling.py --n 5000 --iter 25 --device cuda --initial-model  # one GPU
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from spa3d.analysis.metrics import adjusted_rand_index
from spa3d.data import default_mixture
from spa3d.fourier.filters import fsc, lowpass, resolution_at
from spa3d.io.mrc import write_map
from spa3d.io.star import read_star, write_star
from spa3d.jobs.class3d import Class3dOptions, run_class3d
from spa3d.jobs.progress import setup_logging
from spa3d.jobs.simulate import SimulationOptions, simulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--iter", type=int, default=25)
    ap.add_argument("--sampling", type=float, default=7.5)
    ap.add_argument("--device", default=None)
    ap.add_argument("--initial-model", action="store_true")
    ap.add_argument("--workers", type=int, default=0, help="also run on a local Dask cluster of this many workers")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    setup_logging(quiet=True)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="spa3d_scaling_"))
    work.mkdir(parents=True, exist_ok=True)
    maps = default_mixture()
    if not (work / "picked.star").exists():
        for k, m in enumerate(maps):
            write_map(work / f"species{k + 1}.mrc", m, 2.0)
        simulate([str(work / f"species{k + 1}.mrc") for k in range(3)], work,
                 SimulationOptions(n_particles=a.n, snr=0.1, seed=11, fractions=[0.5, 0.3, 0.2]))
        t = read_star(work / "particles.star")
        p = t["particles"]
        write_star(work / "picked.star", {"optics": t["optics"], "particles": p.drop(
            columns=[c for c in p.columns if c.startswith(("rlnOrigin", "rlnAngle"))])})
        write_map(work / "reference.mrc", 5.0 * lowpass(maps[0], 2.0, 50.0), 2.0)
    labels = read_star(work / "particles_truth.star")["particles"]["rlnClassNumber"].to_numpy()
    order = {15.0: 1, 7.5: 2}[a.sampling]
    cuda = (a.device or "").startswith("cuda")
    dev = torch.cuda.get_device_name() if cuda else "CPU"
    modes = [("in process", {"device": a.device, "threads": a.threads})]
    if a.workers:
        modes.append((f"{a.workers} Dask workers", {"device": "cpu", "workers": a.workers}))
    print(f"\nclass3d: {a.n} particles, box 64, K={a.K}, {a.iter} iterations, {a.sampling}°, device {dev}")
    for label, extra in modes:
        o = Class3dOptions(n_classes=a.K, n_iter=a.iter, healpix_order=order, ctf=True, zero_mask=True,
                           flatten_solvent=True, particle_diameter=110.0, firstiter_cc=True, seed=1, **extra)
        if cuda and "workers" not in extra:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out_maps, st = run_class3d(str(work / "picked.star"), str(work / "reference.mrc"),
                                   str(work / ("class3d_" + label.replace(" ", "_"))), o)
        wall = time.perf_counter() - t0
        ari = adjusted_rand_index(labels, st.classes)
        best = np.bincount(st.classes[labels == 1], minlength=a.K + 1).argmax()
        from spa3d.maps.align import superpose
        aligned, _ = superpose(out_maps[best - 1], maps[0])
        res = resolution_at(fsc(aligned, maps[0]), 64, 2.0, 0.5)
        if "workers" in extra:
            from spa3d.backend import distributed
            mem = f"peak RSS {distributed.last_worker_peak_kib / 1024:.0f} MB per worker"
        else:
            mem = f"peak host RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
        if cuda and "workers" not in extra:
            mem += f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MB"
        print(f"  {label:<16} wall {wall:7.1f} s, {a.n * a.iter / wall:6.0f} particle-iterations/s, ARI {ari:.3f}, "
              f"intact-complex class FSC0.5 {res:.1f} Å; {mem}")
    if a.initial_model:
        from spa3d.data import default_structure
        from spa3d.io.mrc import read_map
        from spa3d.jobs.initial_model import InitialModelOptions, run_initial_model

        im = work / "initial_model_data"
        if not (im / "particles.star").exists():
            simulate([default_structure()], im, SimulationOptions(n_particles=2000, snr=0.1, seed=12))
        truth = read_map(im / "truth_class001.mrc")[0]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        state = run_initial_model(str(im / "particles.star"), str(work / "initial_model"),
                                  InitialModelOptions(particle_diameter=110.0, seed=1, device=a.device))
        wall = time.perf_counter() - t0
        aligned, _ = superpose(state.maps[0], truth)
        res = resolution_at(fsc(aligned, truth), 64, 2.0, 0.5)
        print(f"initial-model: 2000 particles of 1TII (SNR 0.1), tutorial schedule 25/100/25, 100->500, device {dev}: "
              f"wall {wall:.1f} s, FSC0.5 vs truth {res:.1f} Å"
              + (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MB" if cuda else ""))

if __name__ == "__main__":
    main()
