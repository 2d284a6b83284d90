"""Benchmark data shared by the benchmarks: particles of PDB 1TII projected by relion_project.

Poses, origins and CTFs come from ``spa3d simulate``; the images from
``relion_project`` (noise-free ``clean.star`` and, with white noise at the
requested SNR, ``noisy.star``), so both programs see RELION-made data.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from spa3d.data import default_structure
from spa3d.io.mrc import read_map
from spa3d.io.particles import ParticleSet
from spa3d.jobs.simulate import SimulationOptions, simulate


def relion_particles(work: Path, n: int, snr: float, seed: int) -> tuple[np.ndarray, float]:
    """Write truth_class001.mrc, particles.star, clean.* and noisy.* into ``work``; return (truth map, pixel size)."""
    if shutil.which("relion_project") is None:
        raise SystemExit("relion_project not found: apt-get install -y relion")
    simulate([default_structure()], work / "poses", SimulationOptions(n_particles=n, snr=1.0, seed=seed))
    for f in ("particles.star", "truth_class001.mrc"):
        shutil.copy(work / "poses" / f, work / f)
    project = ["relion_project", "--i", "truth_class001.mrc", "--ang", "particles.star", "--ctf"]
    subprocess.run([*project, "--o", "clean"], cwd=work, check=True, capture_output=True)
    clean = ParticleSet(work / "clean.star").read(np.arange(min(n, 500)))
    sigma = float(np.sqrt(clean.var(axis=(1, 2)).mean() / snr))
    subprocess.run([*project, "--o", "noisy", "--add_noise", "--white_noise", f"{sigma:.5f}"], cwd=work, check=True,
                   capture_output=True)
    return read_map(work / "truth_class001.mrc")
