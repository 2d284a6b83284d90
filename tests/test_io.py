"""STAR/MRC I/O, particle sets, and clear errors on bad input (one line, exit 2, no output)."""

import os
import shutil

import mrcfile
import numpy as np
import pytest

from spa3d.cli.main import main
from spa3d.io.mrc import read_map, write_map, write_stack
from spa3d.io.particles import ParticleSet
from spa3d.io.star import read_particles_star, write_star


def test_star_round_trip_keeps_every_column(sim_dataset, tmp_path):
    t = read_particles_star(sim_dataset / "particles.star")
    t.particles["rlnMyCustomLabel"] = np.arange(len(t.particles))
    t.write(tmp_path / "out.star")
    assert (tmp_path / "out.star").read_text().lstrip().startswith("# version 30001")
    back = read_particles_star(tmp_path / "out.star")
    assert list(back.particles.columns) == list(t.particles.columns)
    assert list(back.optics.columns) == list(t.optics.columns)
    np.testing.assert_allclose(back.particles["rlnAngleRot"], t.particles["rlnAngleRot"], atol=1e-5)
    assert (back.particles["rlnImageName"] == t.particles["rlnImageName"]).all()


def test_relion30_star_is_converted(sim_dataset, tmp_path):
    t = read_particles_star(sim_dataset / "particles.star")
    p = t.particles.copy()
    apix = 2.0
    p["rlnOriginX"] = p.pop("rlnOriginXAngst") / apix
    p["rlnOriginY"] = p.pop("rlnOriginYAngst") / apix
    p = p.drop(columns=["rlnOpticsGroup"])
    p["rlnVoltage"], p["rlnSphericalAberration"], p["rlnAmplitudeContrast"] = 300.0, 2.7, 0.1
    p["rlnMagnification"], p["rlnDetectorPixelSize"] = 10000.0, 2.0
    # image paths relative to the project directory, which is where the stacks are
    write_star(sim_dataset / "old30.star", {"images": p}, version=30000)
    ps = ParticleSet(sim_dataset / "old30.star")
    assert ps.pixel_size == pytest.approx(2.0)
    assert ps.box == 64
    np.testing.assert_allclose(ps.column("rlnOriginXAngst"), t.particles["rlnOriginXAngst"], atol=1e-4)
    np.testing.assert_allclose(ps.read(np.arange(3)), ParticleSet(sim_dataset / "particles.star").read(np.arange(3)))


def test_particle_set_reads_batches(sim_dataset):
    ps = ParticleSet(sim_dataset / "particles.star")
    assert len(ps) == 1000 and ps.box == 64
    seen = 0
    for b in ps.batches(300, with_ctf=True):
        assert b.images.shape[1:] == (64, 64)
        assert len(b.ctf) == len(b.indices)
        seen += len(b.indices)
    assert seen == 1000
    with mrcfile.open(sim_dataset / "Particles" / "particles.mrcs") as m:
        np.testing.assert_array_equal(ps.read(np.array([5, 2, 999])), m.data[[5, 2, 999]])


def test_map_round_trip(tmp_path):
    v = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    write_map(tmp_path / "m.mrc", v, 1.5)
    back, apix = read_map(tmp_path / "m.mrc")
    np.testing.assert_array_equal(back, v)
    assert apix == pytest.approx(1.5)


# -- bad input: one clear line naming the file, exit 2, no output -------------------------------------

def _run_reconstruct(star, out, capsys, *extra):
    code = main(["reconstruct", "--i", str(star), "--o", str(out), "--quiet", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _copy_dataset(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_stack(sim_dataset, tmp_path, capsys):
    d = _copy_dataset(sim_dataset, tmp_path / "d")
    os.remove(d / "Particles" / "particles.mrcs")
    code, err = _run_reconstruct(d / "particles.star", tmp_path / "out.mrc", capsys)
    assert code == 2 and len(err) == 1 and "particles.mrcs" in err[0] and "not found" in err[0]
    assert not (tmp_path / "out.mrc").exists()


def test_truncated_stack(sim_dataset, tmp_path, capsys):
    d = _copy_dataset(sim_dataset, tmp_path / "d")
    stack = d / "Particles" / "particles.mrcs"
    with open(stack, "r+b") as fh:
        fh.truncate(os.path.getsize(stack) // 2)
    code, err = _run_reconstruct(d / "particles.star", tmp_path / "out.mrc", capsys)
    assert code == 2 and len(err) == 1 and "particles.mrcs" in err[0] and "truncated" in err[0]
    assert not (tmp_path / "out.mrc").exists()


def test_star_without_needed_columns(sim_dataset, tmp_path, capsys):
    t = read_particles_star(sim_dataset / "particles.star")
    t.particles = t.particles.drop(columns=["rlnDefocusU", "rlnDefocusV"])
    t.write(sim_dataset / "noctf.star")
    code, err = _run_reconstruct(sim_dataset / "noctf.star", tmp_path / "out.mrc", capsys, "--ctf")
    assert code == 2 and len(err) == 1 and "noctf.star" in err[0] and "rlnDefocus" in err[0]
    t.particles = t.particles.drop(columns=["rlnImageName"])
    t.write(sim_dataset / "noimg.star")
    code, err = _run_reconstruct(sim_dataset / "noimg.star", tmp_path / "out.mrc", capsys)
    assert code == 2 and len(err) == 1 and "rlnImageName" in err[0]
    assert not (tmp_path / "out.mrc").exists()


def test_mismatched_box_sizes(sim_dataset, tmp_path, capsys):
    d = _copy_dataset(sim_dataset, tmp_path / "d")
    write_stack(d / "Particles" / "small.mrcs", np.zeros((5, 32, 32), np.float32), 2.0)
    t = read_particles_star(d / "particles.star")
    t.particles.loc[0:4, "rlnImageName"] = [f"{i + 1:06d}@Particles/small.mrcs" for i in range(5)]
    t.write(d / "mixed.star")
    code, err = _run_reconstruct(d / "mixed.star", tmp_path / "out.mrc", capsys)
    assert code == 2 and len(err) == 1 and "box sizes" in err[0]
    # optics table disagreeing with the stacks
    t = read_particles_star(d / "particles.star")
    t.optics["rlnImageSize"] = 128
    t.write(d / "optics.star")
    code, err = _run_reconstruct(d / "optics.star", tmp_path / "out.mrc", capsys)
    assert code == 2 and len(err) == 1 and "rlnImageSize" in err[0]
    assert not (tmp_path / "out.mrc").exists()


def test_nan_in_stack(sim_dataset, tmp_path, capsys):
    d = _copy_dataset(sim_dataset, tmp_path / "d")
    with mrcfile.open(d / "Particles" / "particles.mrcs", mode="r+") as m:
        m.data[700, 3, 3] = np.nan
    code, err = _run_reconstruct(d / "particles.star", tmp_path / "out.mrc", capsys)
    assert code == 2 and len(err) == 1 and "particles.mrcs" in err[0] and "image 701" in err[0] and "NaN" in err[0]
    assert not (tmp_path / "out.mrc").exists()


def test_not_a_star_file(tmp_path, capsys):
    (tmp_path / "bad.star").write_bytes(b"\x00\x01garbage")
    code, err = _run_reconstruct(tmp_path / "bad.star", tmp_path / "out.mrc", capsys)
    assert code == 2 and len(err) == 1 and "bad.star" in err[0]
