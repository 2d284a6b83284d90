"""Re-extraction: agreement with relion_preprocess, particles centred to sub-pixel, clear errors on bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from spa3d.analysis.metrics import image_shift
from spa3d.cli.main import main
from spa3d.data import default_structure
from spa3d.fourier.ctf import CtfParams
from spa3d.fourier.projector import Projector
from spa3d.geometry.euler import euler_to_matrix
from spa3d.io.atomic import model_density
from spa3d.io.particles import ParticleSet
from spa3d.io.star import read_particles_star, read_star, write_star
from spa3d.jobs.simulate import SimulationOptions, render_particles, simulate


@pytest.fixture(scope="module")
def clean_project(tmp_path_factory):
    """The same with nearly no noise (SNR 10⁶), for measuring where particles sit."""
    d = tmp_path_factory.mktemp("clean")
    simulate([default_structure()], d, SimulationOptions(n_particles=20, snr=1e6, seed=8, n_micrographs=4,
                                                         offset_sigma_px=3.0))
    return d


def _compare(a_star, b_star, origin_tol=0.01):
    a, b = ParticleSet(a_star), ParticleSet(b_star)
    ta, tb = a.table, b.table
    assert len(ta.particles) == len(tb.particles)
    for col in ("rlnImagePixelSize", "rlnImageSize", "rlnMicrographOriginalPixelSize", "rlnVoltage"):
        assert np.allclose(ta.optics[col].astype(float), tb.optics[col].astype(float)), col
    for col in ("rlnCoordinateX", "rlnCoordinateY"):
        assert np.allclose(ta.particles[col].astype(float), tb.particles[col].astype(float), atol=1e-3), col
    for col in ("rlnOriginXAngst", "rlnOriginYAngst"):
        err = np.abs(ta.particles[col].astype(float).to_numpy() - tb.particles[col].astype(float).to_numpy()).max()
        assert err <= origin_tol, f"{col} differs by {err:.4f} Å"
    assert list(ta.particles["rlnMicrographName"]) == list(tb.particles["rlnMicrographName"])
    ia, ib = a.read(np.arange(len(a))), b.read(np.arange(len(b)))
    cc = [np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(ia, ib)]
    assert min(cc) >= 0.99, f"lowest image correlation {min(cc):.4f}"


@pytest.mark.parametrize("relion_opts, spa3d_opts", [
    (["--extract_size", "96", "--scale", "64", "--norm", "--bg_radius", "25", "--invert_contrast"],
     ["--box", "96", "--rescale", "64", "--norm", "--bg-diameter", "76", "--invert"]),
    (["--extract_size", "128", "--norm", "--bg_radius", "48", "--recenter"],
     ["--box", "128", "--norm", "--bg-diameter", "96", "--recenter"]),
    (["--extract_size", "100", "--reset_offsets"], ["--box", "100", "--reset-offsets"]),
], ids=["rescale-norm-invert", "recenter", "reset-offsets"])
def test_extract_agrees_with_relion_preprocess(relion, mic_project, relion_opts, spa3d_opts):
    d = mic_project
    tag = spa3d_opts[1] + spa3d_opts[-1]
    relion("relion_preprocess", "--i", "micrographs_ctf.star", "--reextract_data_star", "particles.star",
           "--part_dir", f"R{tag}/", "--part_star", f"R{tag}/particles.star", "--extract", *relion_opts, cwd=d)
    import os

    cwd = os.getcwd()
    os.chdir(d)
    try:
        assert main(["extract", "--mics", "micrographs_ctf.star", "--reextract", "particles.star",
                     "--o", f"S{tag}", "--quiet", *spa3d_opts]) == 0
    finally:
        os.chdir(cwd)
    _compare(d / f"R{tag}" / "particles.star", d / f"S{tag}" / "particles.star")
    assert (d / f"S{tag}" / "Micrographs" / "mic001.mrcs").exists()


def test_reextract_of_downscaled_particles_with_recenter_on_a_point_agrees_with_relion(relion, mic_project):
    """Particles at 3 Å/px (extracted 96 → 64) re-extracted at the micrographs' 2 Å/px, re-centred on a point of
    the reference: the pixel-size conversion and the projection of the point must follow RELION."""
    d = mic_project
    relion("relion_preprocess", "--i", "micrographs_ctf.star", "--reextract_data_star", "particles.star",
           "--part_dir", "Small/", "--part_star", "Small/particles.star", "--extract", "--extract_size", "96",
           "--scale", "64", cwd=d)
    opts_r = ["--extract_size", "128", "--recenter", "--recenter_x", "3", "--recenter_y", "-2", "--recenter_z", "5"]
    relion("relion_preprocess", "--i", "micrographs_ctf.star", "--reextract_data_star", "Small/particles.star",
           "--part_dir", "R2/", "--part_star", "R2/particles.star", "--extract", *opts_r, cwd=d)
    import os

    cwd = os.getcwd()
    os.chdir(d)
    try:
        assert main(["extract", "--mics", "micrographs_ctf.star", "--reextract", "Small/particles.star", "--o", "S2",
                     "--quiet", "--box", "128", "--recenter", "--recenter-x", "3", "--recenter-y", "-2",
                     "--recenter-z", "5"]) == 0
    finally:
        os.chdir(cwd)
    _compare(d / "R2" / "particles.star", d / "S2" / "particles.star")


def _clean_reference(project, row, box):
    """The noise-free particle of ``row`` rendered centred (zero shift) in a ``box`` box."""
    vol = model_density(default_structure(), 64, 2.0, None)
    mats = euler_to_matrix(*(np.array([float(row[f"rlnAngle{a}"])]) for a in ("Rot", "Tilt", "Psi")))
    ctf = CtfParams(np.array([row.rlnDefocusU]), np.array([row.rlnDefocusV]), np.array([row.rlnDefocusAngle]),
                    np.array([300.0]), np.array([2.7]), np.array([0.1]), np.zeros(1), np.ones(1), np.zeros(1))
    img = render_particles([Projector(vol)], np.zeros(1, int), mats, np.zeros((1, 2)), ctf, 64, 2.0)[0]
    out = np.zeros((box, box), np.float32)
    a = box // 2 - 32
    out[a:a + 64, a:a + 64] = img
    return out


@pytest.mark.parametrize("recenter", [False, True], ids=["origins-kept", "recentred"])
def test_extracted_particles_sit_at_minus_origin(clean_project, tmp_path, recenter, monkeypatch):
    """Particles simulated at known micrograph positions with known offsets: after extract each sits at
    −origin from the box centre (sub-pixel error < 0.1 px); with --recenter the origin left is under half a pixel."""
    d = clean_project
    monkeypatch.chdir(d)
    out = tmp_path / "ext"
    args = ["extract", "--mics", "micrographs_ctf.star", "--reextract", "particles.star", "--o", str(out),
            "--box", "96", "--invert", "--quiet"] + (["--recenter"] if recenter else [])
    assert main(args) == 0
    ps = ParticleSet(out / "particles.star")
    imgs = ps.read(np.arange(len(ps)))
    origins = ps.origins_px()
    if recenter:
        assert np.abs(origins).max() <= 0.5 + 1e-6
    else:
        assert np.abs(origins).max() > 1.0  # the test has something to measure
    errs = []
    for i, row in enumerate(ps.table.particles.itertuples()):
        ref = _clean_reference(d, ps.table.particles.iloc[i], 96)
        shift = image_shift(imgs[i], ref)
        errs.append(np.hypot(*(shift + origins[i])))
    print(f"centring error: max {max(errs):.4f} px, mean {np.mean(errs):.4f} px")
    assert max(errs) < 0.1, f"largest centring error {max(errs):.3f} px"


# -- bad input -------------------------------------------------------------------------------------------

def _run(d, out, *extra, particles="particles.star", mics="micrographs_ctf.star"):
    import os

    cwd = os.getcwd()
    os.chdir(d)
    try:
        return main(["extract", "--mics", mics, "--reextract", particles, "--o", str(out), "--quiet", *extra])
    finally:
        os.chdir(cwd)


def _nothing_written(out):
    return not out.exists() or not any(p.is_file() and p.suffix in (".star", ".mrcs") for p in out.rglob("*"))


@pytest.mark.parametrize("extra, problem", [
    (["--box", "97"], "even"),
    (["--box", "96", "--rescale", "63"], "even"),
    (["--box", "64", "--rescale", "96"], "larger than --box"),
    (["--box", "600"], "larger than the micrograph"),
], ids=["odd-box", "odd-rescale", "rescale-above-box", "box-above-micrograph"])
def test_extract_rejects_bad_sizes(mic_project, tmp_path, capsys, extra, problem):
    out = tmp_path / "bad"
    assert _run(mic_project, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0]
    assert _nothing_written(out)


def test_extract_missing_or_unreadable_micrograph(mic_project, tmp_path, capsys):
    d = tmp_path / "proj"
    shutil.copytree(mic_project, d, ignore=shutil.ignore_patterns("R*", "S*", "Small"))
    (d / "Micrographs" / "mic002.mrc").unlink()
    assert _run(d, d / "Ext", "--box", "96") == 2
    err = capsys.readouterr().err
    assert "mic002.mrc" in err and "not found" in err
    assert _nothing_written(d / "Ext")
    (d / "Micrographs" / "mic002.mrc").write_bytes(b"not an MRC file" * 10)
    assert _run(d, d / "Ext", "--box", "96") == 2
    err = capsys.readouterr().err
    assert "mic002.mrc" in err and "MRC" in err
    assert _nothing_written(d / "Ext")


def test_extract_leaves_out_particles_of_unlisted_micrographs_with_a_warning(mic_project, tmp_path, capsys):
    d = mic_project
    mics = read_star(d / "micrographs_ctf.star")
    write_star(tmp_path / "three_mics.star", {"optics": mics["optics"], "micrographs": mics["micrographs"].iloc[:3]})
    assert _run(d, tmp_path / "Ext", "--box", "96", mics=str(tmp_path / "three_mics.star")) == 0
    assert "10 particle(s) on 1 micrograph(s) not in" in capsys.readouterr().err
    n_all = len(read_particles_star(d / "particles.star").particles)
    n_out = len(read_particles_star(tmp_path / "Ext" / "particles.star").particles)
    assert n_out == n_all - 10  # mic004 held 10 of the 40 particles
    # none listed: an error, nothing written
    write_star(tmp_path / "no_mics.star", {"optics": mics["optics"],
                                            "micrographs": mics["micrographs"].assign(rlnMicrographName="Micrographs/x.mrc")})
    assert _run(d, tmp_path / "Ext2", "--box", "96", mics=str(tmp_path / "no_mics.star")) == 2
    assert "none of its micrographs" in capsys.readouterr().err
    assert _nothing_written(tmp_path / "Ext2")


def test_dust_removal_replaces_outliers_with_background_noise():
    from spa3d.jobs.extract import normalise

    rng = np.random.default_rng(0)
    imgs = rng.normal(5.0, 2.0, (3, 64, 64)).astype(np.float32)
    imgs[0, 10, 10] = 200.0   # white dust
    imgs[1, 50, 20] = -200.0  # black dust
    kept = normalise(imgs, 24)
    assert kept[0, 10, 10] > 20 and kept[1, 50, 20] < -20  # without dust removal the outliers stay
    out = normalise(imgs, 24, white_dust=5.0, black_dust=5.0, rng=rng)
    assert np.abs(out).max() < 6.0
    assert abs(out[2].mean()) < 0.1 and abs(out[2].std() - 1.0) < 0.1


def test_extract_gives_the_same_particles_whatever_the_number_of_threads(mic_project, tmp_path):
    """Micrographs are processed one per thread; the stacks (dust noise included) must not depend on how many."""
    opts = ["--box", "96", "--rescale", "64", "--norm", "--invert", "--white-dust", "2", "--black-dust", "2"]
    assert _run(mic_project, tmp_path / "T1", *opts, "--threads", "1") == 0
    assert _run(mic_project, tmp_path / "T3", *opts, "--threads", "3") == 0
    stacks = sorted(p.relative_to(tmp_path / "T1") for p in (tmp_path / "T1").rglob("*.mrcs"))
    assert len(stacks) == 4
    for rel in stacks:  # the header's label holds the time of writing: compare all else
        a, b = (tmp_path / "T1" / rel).read_bytes(), (tmp_path / "T3" / rel).read_bytes()
        assert a[:224] == b[:224] and a[1024:] == b[1024:], rel
    a = read_particles_star(tmp_path / "T1" / "particles.star").particles
    b = read_particles_star(tmp_path / "T3" / "particles.star").particles
    assert list(a["rlnImageName"].str.replace("T1", "T3")) == list(b["rlnImageName"])
    # the dust threshold of 2 SDs replaced pixels: the stacks differ from a run without it
    assert _run(mic_project, tmp_path / "T0", *opts[:6]) == 0
    assert (tmp_path / "T0" / stacks[0]).read_bytes() != (tmp_path / "T1" / stacks[0]).read_bytes()


def test_a_bad_micrograph_part_way_leaves_no_stack_behind(mic_project, tmp_path, capsys):
    """A micrograph with NaN found while other threads have written their stacks: an error, nothing left."""
    import mrcfile

    d = tmp_path / "proj"
    shutil.copytree(mic_project, d, ignore=shutil.ignore_patterns("R*", "S*", "T*", "Small"))
    with mrcfile.open(d / "Micrographs" / "mic003.mrc", "r+") as m:
        m.data[100, 100] = np.nan
    assert _run(d, d / "Ext", "--box", "96", "--threads", "2") == 2
    err = capsys.readouterr().err
    assert "mic003.mrc" in err and "NaN" in err
    assert _nothing_written(d / "Ext")
