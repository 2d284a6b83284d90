"""Shared fixtures: small simulated datasets and access to RELION (the oracle)."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

from spa3d.data import default_structure
from spa3d.io.atomic import model_density
from spa3d.io.mrc import write_map
from spa3d.jobs.simulate import SimulationOptions, simulate

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _relion(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        msg = f"{program} not found: install RELION 3.1 (apt-get install -y relion)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def relion():
    """Run a RELION program: ``relion('relion_project', '--i', ..., cwd=dir)``."""

    def run(program: str, *args, cwd=None):
        exe = _relion(program)
        res = subprocess.run([exe, *map(str, args)], cwd=cwd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{program} failed ({res.returncode}): {res.stderr[-2000:]}")
        return res

    return run


@pytest.fixture(scope="session")
def truth_map(tmp_path_factory):
    """1TII density, box 64, 2 Å/pixel: (array, path)."""
    d = tmp_path_factory.mktemp("truth")
    vol = model_density(default_structure(), 64, 2.0, 4.0)
    path = d / "truth.mrc"
    write_map(path, vol, 2.0)
    return vol, path


@pytest.fixture(scope="session")
def make_dataset(tmp_path_factory):
    """``make_dataset(n, snr, seed)``: particles of 1TII simulated by spa3d (box 64, 2 Å/px, CTF); the project directory."""

    def make(n: int, snr: float, seed: int):
        d = tmp_path_factory.mktemp("sim")
        simulate([default_structure()], d, SimulationOptions(n_particles=n, snr=snr, seed=seed))
        return d

    return make


@pytest.fixture(scope="session")
def sim_dataset(make_dataset):
    """1,000 particles of 1TII at SNR 0.1."""
    return make_dataset(1000, 0.1, 1)


@pytest.fixture(scope="session")
def relion_dataset(tmp_path_factory, relion):
    """2,000 particles of 1TII projected by relion_project (box 64, 2 Å/px) with spa3d's random poses,
    offsets and CTFs: ``clean.star`` noise-free, ``noisy.star`` with white noise at SNR ≈ 0.1."""
    d = tmp_path_factory.mktemp("relion")
    simulate([default_structure()], d / "poses", SimulationOptions(n_particles=2000, snr=1.0, seed=2))
    for f in ("particles.star", "truth_class001.mrc"):
        shutil.copy(d / "poses" / f, d / f)
    relion("relion_project", "--i", "truth_class001.mrc", "--ang", "particles.star", "--ctf", "--o", "clean", cwd=d)
    from spa3d.io.particles import ParticleSet

    clean = ParticleSet(d / "clean.star").read(np.arange(200))
    sigma = float(np.sqrt(clean.var(axis=(1, 2)).mean() / 0.1))
    relion("relion_project", "--i", "truth_class001.mrc", "--ang", "particles.star", "--ctf", "--o", "noisy",
           "--add_noise", "--white_noise", f"{sigma:.4f}", cwd=d)
    return d


@pytest.fixture(scope="session")
def mic_project(tmp_path_factory):
    """40 particles of 1TII on 4 micrographs (512², 2 Å/px, box 64), SNR 0.1, origins ~2 px: the project directory."""
    d = tmp_path_factory.mktemp("mics")
    simulate([default_structure()], d, SimulationOptions(n_particles=40, snr=0.1, seed=5, n_micrographs=4))
    return d


def write_mixture(d, n: int, seed: int, fractions=(0.5, 0.3, 0.2)):
    """Simulate ``n`` particles of the three-species mixture (1TII complex, B5 ring, junk) into ``d``, with a
    reference: the complex at 50 Å on an arbitrary greyscale (``d/reference.mrc``). Returns the species maps."""
    from spa3d.data import default_mixture
    from spa3d.fourier.filters import lowpass

    maps = default_mixture()
    for k, m in enumerate(maps):
        write_map(d / f"species{k + 1}.mrc", m, 2.0)
    simulate([str(d / f"species{k + 1}.mrc") for k in range(3)], d,
             SimulationOptions(n_particles=n, snr=0.1, seed=seed, fractions=list(fractions)))
    write_map(d / "reference.mrc", 7.0 * lowpass(maps[0], 2.0, 50.0), 2.0)
    return maps


def check_estimate(job_dir) -> dict:
    """Read the estimate a job logged first and its real run time from ``job_dir/run.log``; assert they agree
    within a factor of 2. Returns {"seconds", "took", "memory_gib", "poses"}."""
    import re
    from pathlib import Path

    log = (Path(job_dir) / "run.log").read_text()
    est = re.search(r"estimate: ([\d.]+) (s|min|h) wall time, peak memory ([\d.]+) GiB, ([\d,]+) poses", log)
    assert est, "no estimate in run.log"
    seconds = float(est.group(1)) * {"s": 1, "min": 60, "h": 3600}[est.group(2)]
    took = float(re.search(r"done in ([\d.]+) s", log).group(1))
    assert 0.5 <= took / seconds <= 2.0, f"estimate {seconds:.1f} s, run {took:.1f} s"
    return {"seconds": seconds, "took": took, "memory_gib": float(est.group(3)),
            "poses": int(est.group(4).replace(",", ""))}
