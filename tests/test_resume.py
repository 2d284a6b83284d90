"""--continue restores the run: real jobs killed (SIGKILL) at random moments and resumed with
``--continue JOBDIR`` alone give the uninterrupted run's outputs; options given again are applied or refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from spa3d.cli.main import main
from spa3d.io.mrc import read_map
from spa3d.io.star import read_star
from spa3d.jobs.resume import last_complete_iteration, read_recorded
from conftest import write_mixture

CLASS3D = ["--K", "2", "--healpix-order", "0", "--offset-range", "3", "--offset-step", "1", "--ctf", "--zero-mask",
           "--particle-diameter", "110", "--ini-high", "50", "--iter", "3", "--seed", "3", "--batch-size", "40",
           "--threads", "1", "--quiet"]
INITIAL_MODEL = ["--sgd-ini-iter", "2", "--sgd-inbetween-iter", "3", "--sgd-fin-iter", "2", "--sgd-ini-subset", "40",
                 "--sgd-fin-subset", "60", "--sgd-write-iter", "2", "--particle-diameter", "110", "--offset-range", "4",
                 "--seed", "4", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    write_mixture(d, 120, seed=11)
    return d


def _spa3d(args, kill_after: float | None = None) -> int | None:
    """Run ``spa3d ARGS`` in a subprocess; with ``kill_after`` (s) SIGKILL it then (None if it was killed)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # its own process group, so that SIGKILL also reaches Dask's worker processes
    proc = subprocess.Popen([sys.executable, "-m", "spa3d", *map(str, args)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_after is None:
        _, err = proc.communicate()
        assert proc.returncode == 0, err[-2000:]
        return 0
    try:
        proc.wait(timeout=kill_after)
        return proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def _with(args: list, option: str, value: str) -> list:
    """``args`` with ``option``'s value replaced."""
    i = args.index(option)
    return [*args[:i + 1], value, *args[i + 2:]]


def _outputs(job: Path, it: int, n_classes: int):
    data = read_star(job / f"run_it{it:03d}_data.star")["particles"]
    cols = [c for c in ("rlnClassNumber", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                        "rlnOriginYAngst") if c in data]
    maps = np.array([read_map(job / f"run_it{it:03d}_class{k + 1:03d}.mrc")[0] for k in range(n_classes)])
    return data[cols].to_numpy(dtype=float), maps


def _kill_and_resume(job: Path, first: list, fractions, duration: float, rng) -> list[str]:
    """Start ``first`` into ``job``, SIGKILL it at each fraction of ``duration`` (resuming in between with
    --continue JOBDIR alone), then finish with --continue. Returns what happened, for the assertion messages."""
    what = []
    args = first
    for f in fractions:
        t = float(f * duration * rng.uniform(0.9, 1.1))
        rc = _spa3d(args, kill_after=t)
        what.append(f"killed at {t:.1f} s" if rc is None else f"ended before {t:.1f} s")
        # never a half-written iteration: every optimiser.star has all of its iteration's files
        if any(job.glob("run_it*_optimiser.star")):
            last = last_complete_iteration(job)
            it = int(last.name[6:9])
            for name in (f"run_it{it:03d}_data.star", f"run_it{it:03d}_model.star", f"run_it{it:03d}_class001.mrc"):
                assert (job / name).exists(), f"{name} missing beside {last.name} ({what})"
            args = [first[0], "--continue", job]
    _spa3d(args if args is first else [first[0], "--continue", job])  # killed before iteration 1: run again
    return what


@pytest.mark.parametrize("seed", [0, 1])
def test_class3d_killed_anywhere_resumes_to_the_same_result(data, tmp_path, seed):
    ref_job = tmp_path / "uninterrupted"
    t0 = time.perf_counter()
    _spa3d(["class3d", "--i", data / "particles.star", "--ref", data / "reference.mrc", "--o", ref_job, *CLASS3D])
    duration = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    job = tmp_path / "killed"
    fractions = sorted(rng.uniform(0.2, 0.95, size=2))
    what = _kill_and_resume(job, ["class3d", "--i", data / "particles.star", "--ref", data / "reference.mrc",
                                  "--o", job, *CLASS3D], fractions, duration, rng)
    a, maps_a = _outputs(ref_job, 3, 2)
    b, maps_b = _outputs(job, 3, 2)
    np.testing.assert_array_equal(a[:, 0], b[:, 0], err_msg=f"classes differ ({what})")
    np.testing.assert_allclose(a[:, 1:], b[:, 1:], atol=1e-3, err_msg=f"poses differ ({what})")
    np.testing.assert_allclose(maps_a, maps_b, atol=1e-5 * np.abs(maps_a).max(), err_msg=f"maps differ ({what})")
    assert not list(job.glob(".staging_it*"))
    log = (job / "run.log").read_text()
    assert "continuing from iteration" in log or "ended before" in " ".join(what)


def test_initial_model_killed_anywhere_resumes_to_the_same_result(data, tmp_path):
    ref_job = tmp_path / "uninterrupted"
    t0 = time.perf_counter()
    _spa3d(["initial-model", "--i", data / "particles.star", "--o", ref_job, *INITIAL_MODEL])
    duration = time.perf_counter() - t0
    job = tmp_path / "killed"
    rng = np.random.default_rng(5)
    what = _kill_and_resume(job, ["initial-model", "--i", data / "particles.star", "--o", job, *INITIAL_MODEL],
                            [0.45, 0.8], duration, rng)
    a, maps_a = _outputs(ref_job, 7, 1)
    b, maps_b = _outputs(job, 7, 1)
    np.testing.assert_allclose(a, b, atol=1e-3, err_msg=f"poses differ ({what})")
    np.testing.assert_allclose(maps_a, maps_b, atol=1e-5 * np.abs(maps_a).max(), err_msg=f"maps differ ({what})")


def test_class3d_on_dask_workers_killed_and_resumed(data, tmp_path):
    args = [a for a in CLASS3D if a != "--quiet"] + ["--workers", "2", "--quiet"]
    ref_job = tmp_path / "uninterrupted"
    t0 = time.perf_counter()
    _spa3d(["class3d", "--i", data / "particles.star", "--ref", data / "reference.mrc", "--o", ref_job, *args])
    duration = time.perf_counter() - t0
    job = tmp_path / "killed"
    rng = np.random.default_rng(7)
    what = _kill_and_resume(job, ["class3d", "--i", data / "particles.star", "--ref", data / "reference.mrc",
                                  "--o", job, *args], [rng.uniform(0.4, 0.9)], duration, rng)
    a, maps_a = _outputs(ref_job, 3, 2)
    b, maps_b = _outputs(job, 3, 2)
    np.testing.assert_array_equal(a[:, 0], b[:, 0], err_msg=f"classes differ ({what})")
    np.testing.assert_allclose(a[:, 1:], b[:, 1:], atol=1e-3, err_msg=f"poses differ ({what})")
    np.testing.assert_allclose(maps_a, maps_b, atol=1e-5 * np.abs(maps_a).max(), err_msg=f"maps differ ({what})")


def test_continue_restores_options_and_applies_or_refuses_changes(data, tmp_path, capsys):
    job = tmp_path / "job"
    base = ["class3d", "--i", data / "particles.star", "--ref", data / "reference.mrc", "--o", job]
    opts = _with(CLASS3D, "--iter", "1")
    assert main([*base, *opts]) == 0
    rec = read_recorded(job / "run_it001_optimiser.star")
    assert rec["healpix_order"] == 0 and rec["offset_range"] == 3.0 and rec["ctf"] is True and rec["n_classes"] == 2
    assert rec["batch_size"] == 40 and rec["input_star"] == str((data / "particles.star").resolve())
    # a change that cannot work: one clear line, nothing written
    assert main(["class3d", "--continue", job, "--K", "3", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "n_classes" in err[0] and "run_it001_optimiser.star" in err[0]
    assert main(["class3d", "--continue", job, "--i", data / "species1.mrc", "--quiet"]) == 2
    assert "cannot change" in capsys.readouterr().err
    assert not (job / "run_it002_optimiser.star").exists()
    # the same value again is accepted silently; --iter runs longer and is said in the log
    assert main(["class3d", "--continue", job, "--healpix-order", "0", "--iter", "2", "--quiet"]) == 0
    log = (job / "run.log").read_text()
    assert "n_iter changed from 1 to 2" in log and "healpix_order changed" not in log
    rec2 = read_recorded(job / "run_it002_optimiser.star")
    assert {k: v for k, v in rec2.items() if k != "n_iter"} == {k: v for k, v in rec.items() if k != "n_iter"}
    # and the resumed run searched as the run did (order 0: 30°, not the default 7.5° of the command line)
    assert "search 30.0°" in log.split("continuing from iteration 1")[1]


def test_continue_in_a_project_resumes_in_place(data, tmp_path):
    from spa3d.jobs.pipeline import Pipeline

    proj = tmp_path / "proj"
    opts = _with(CLASS3D, "--iter", "1")
    assert main(["class3d", "--project", proj, "--i", data / "particles.star", "--ref", data / "reference.mrc",
                 *opts]) == 0
    jobs = sorted(p.name for p in (proj / "Class3D").iterdir())
    assert jobs == ["job001"]
    assert main(["class3d", "--project", proj, "--continue", "Class3D/job001/", "--iter", "2", "--quiet"]) == 0
    assert sorted(p.name for p in (proj / "Class3D").iterdir()) == ["job001"]
    job = proj / "Class3D" / "job001"
    assert (job / "run_it002_optimiser.star").exists() and (job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert (job / "note.txt").read_text().count("Executing new job") == 2
    procs = Pipeline(proj).processes
    assert list(procs["rlnPipeLineProcessStatus"]) == [2]  # finished
