"""Bad input and failing disks: one clear line naming the file, a non-zero exit, nothing half-written, nothing lost."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from spa3d.cli.main import main
from spa3d.io.mrc import read_map, write_map
from spa3d.io.star import read_particles_star, read_star
from conftest import write_mixture

FAST = ["--K", "2", "--healpix-order", "0", "--offset-range", "2", "--offset-step", "1", "--ctf", "--zero-mask",
        "--particle-diameter", "110", "--ini-high", "50", "--seed", "1", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    d = tmp_path_factory.mktemp("failures")
    write_mixture(d, 60, seed=13)
    return d


def _err(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_particles_in_an_undefined_optics_group(mix, tmp_path, capsys):
    t = read_particles_star(mix / "particles.star")
    t.particles.loc[[3, 7], "rlnOpticsGroup"] = 5
    t.write(mix / "badoptics.star")
    rc = main(["reconstruct", "--i", mix / "badoptics.star", "--o", tmp_path / "out.mrc", "--quiet"])
    err = _err(capsys)
    assert rc == 2 and len(err) == 1
    assert "badoptics.star" in err[0] and "2 particle(s) in optics group(s) 5" in err[0]
    assert not (tmp_path / "out.mrc").exists()


def test_reference_with_nan(mix, tmp_path, capsys):
    vol, apix = read_map(mix / "reference.mrc")
    vol[10, 20, 30] = np.nan
    write_map(tmp_path / "nanref.mrc", vol, apix)
    rc = main(["class3d", "--i", mix / "particles.star", "--ref", tmp_path / "nanref.mrc", "--o", tmp_path / "job",
               "--iter", "1", *FAST])
    err = _err(capsys)
    assert rc == 2 and len(err) == 1 and "nanref.mrc" in err[0] and "NaN" in err[0]
    assert not list((tmp_path / "job").glob("run_it*"))


def test_output_directory_that_cannot_be_made(mix, tmp_path, capsys):
    (tmp_path / "afile").write_text("not a directory")
    rc = main(["class3d", "--i", mix / "particles.star", "--ref", mix / "reference.mrc", "--o",
               tmp_path / "afile" / "job", "--iter", "1", *FAST])
    err = _err(capsys)
    assert rc == 2 and len(err) == 1 and "afile/job" in err[0] and "cannot write" in err[0]


def test_disk_full_while_writing_an_iteration(mix, tmp_path, capsys, monkeypatch):
    """The disk fills up while iteration 2's maps are written: one line, exit 1, iteration 1 untouched, and
    nothing of iteration 2 (not even part of it) under a final name; --continue then finishes the run."""
    import spa3d.jobs.class3d as c3

    job = tmp_path / "job"
    args = ["class3d", "--i", mix / "particles.star", "--ref", mix / "reference.mrc", "--o", job, *FAST]
    assert main([*args, "--iter", "1"]) == 0
    before = {p.name: p.read_bytes() for p in job.glob("run_it001_*")}
    real = c3.write_map
    calls = []

    def full_disk(path, data, apix):
        calls.append(path)
        if len(calls) == 2:  # the second class map of the iteration
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data, apix)

    monkeypatch.setattr(c3, "write_map", full_disk)
    rc = main(["class3d", "--continue", job, "--iter", "2", "--quiet"])
    err = _err(capsys)
    assert rc == 1 and len(err) == 1 and "No space left on device" in err[0] and "run_it002_class002.mrc" in err[0]
    assert {p.name: p.read_bytes() for p in job.glob("run_it001_*")} == before
    assert not list(job.glob("run_it002_*")) and not list(job.glob(".staging*"))
    monkeypatch.setattr(c3, "write_map", real)
    assert main(["class3d", "--continue", job, "--iter", "2", "--quiet"]) == 0
    assert (job / "run_it002_optimiser.star").exists()


def test_interrupted_extract_rerun_finishes_without_duplicates(mic_project, tmp_path, monkeypatch):
    """Extraction interrupted at its third micrograph (and a truncated stack left as a kill would leave it):
    running the same command again gives the uninterrupted result, each particle once."""
    import spa3d.jobs.extract as ex

    args = ["extract", "--mics", mic_project / "micrographs_ctf.star", "--reextract", mic_project / "particles.star",
            "--box", "64", "--norm", "--invert", "--quiet"]
    assert main([*args, "--o", tmp_path / "clean"]) == 0
    real, n_calls = ex.write_stack, []

    def interrupted(path, imgs, apix):
        n_calls.append(path)
        if len(n_calls) == 3:
            raise KeyboardInterrupt
        real(path, imgs, apix)

    monkeypatch.setattr(ex, "write_stack", interrupted)
    job = tmp_path / "job"
    assert main([*args, "--o", job]) == 130
    assert not (job / "particles.star").exists()
    monkeypatch.setattr(ex, "write_stack", real)
    # what SIGKILL leaves: a stack cut short
    clean_stacks = sorted((tmp_path / "clean").rglob("*.mrcs"))
    stale = job / clean_stacks[0].relative_to(tmp_path / "clean")
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(clean_stacks[0].read_bytes()[:3000])
    assert main([*args, "--o", job]) == 0
    a = read_star(tmp_path / "clean" / "particles.star")["particles"]
    b = read_star(job / "particles.star")["particles"]
    assert len(b) == len(a) and b["rlnImageName"].is_unique
    from spa3d.io.particles import ParticleSet

    ia = ParticleSet(tmp_path / "clean" / "particles.star", tmp_path / "clean").read(np.arange(len(a)))
    ib = ParticleSet(job / "particles.star", job).read(np.arange(len(b)))
    np.testing.assert_array_equal(ia, ib)
