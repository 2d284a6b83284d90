"""spa3d mask and spa3d postprocess against relion_mask_create and relion_postprocess on the same maps."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from spa3d.io.mrc import read_map, write_map
from spa3d.io.star import read_star
from spa3d.maps.postprocess import create_mask, postprocess

B_BLUR = 150.0  # Å², the half maps' blur


@pytest.fixture(scope="module")
def half_maps(truth_map, tmp_path_factory):
    """Two half maps of 1TII (box 64, 2 Å/px): the map blurred by B = 150 Å² plus independent white noise."""
    vol, _ = truth_map
    d = tmp_path_factory.mktemp("halves")
    n = vol.shape[0]
    f, fx = np.fft.fftfreq(n), np.fft.rfftfreq(n)
    s2 = (f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2) / 2.0**2
    blurred = np.fft.irfftn(np.fft.rfftn(vol) * np.exp(-B_BLUR / 4 * s2), s=vol.shape, axes=(0, 1, 2))
    rng = np.random.default_rng(0)
    for h in (1, 2):
        write_map(d / f"run_half{h}_class001_unfil.mrc",
                  (blurred + 0.5 * blurred.std() * rng.standard_normal(vol.shape)).astype(np.float32), 2.0)
    return d


def test_mask_matches_relion_mask_create(truth_map, relion, tmp_path):
    """Low-pass, threshold, extension and soft edge as relion_mask_create: the same mask to float precision."""
    vol, path = truth_map
    relion("relion_mask_create", "--i", path, "--o", tmp_path / "relion_mask.mrc", "--lowpass", "15",
           "--ini_threshold", "0.1", "--extend_inimask", "3", "--width_soft_edge", "3", "--angpix", "2")
    theirs = read_map(tmp_path / "relion_mask.mrc")[0]
    ours = create_mask(vol, 2.0, 15.0, 0.1, 3.0, 3.0)
    assert 0.1 < ours.mean() < 0.6  # a mask around the particle, not the box
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_postprocess_matches_relion_postprocess(half_maps, relion, tmp_path):
    """Same FSC curves; resolution within one shell and B-factor within 10 % of relion_postprocess's."""
    h1 = half_maps / "run_half1_class001_unfil.mrc"
    h2 = half_maps / "run_half2_class001_unfil.mrc"
    mask = tmp_path / "mask.mrc"
    write_map(mask, create_mask(read_map(h1)[0] + read_map(h2)[0], 2.0, 15.0, 0.2, 3.0, 6.0), 2.0)
    (tmp_path / "relion").mkdir()
    relion("relion_postprocess", "--i", h1, "--i2", h2, "--mask", mask, "--o", tmp_path / "relion" / "postprocess",
           "--angpix", "2", "--auto_bfac", "--autob_lowres", "10")
    theirs = read_star(tmp_path / "relion" / "postprocess.star")
    out = tmp_path / "spa3d"
    res = subprocess.run([sys.executable, "-m", "spa3d", "postprocess", "--i", h1, "--mask", mask, "--o", out],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    ours = read_star(out / "postprocess.star")
    for col in ("rlnFourierShellCorrelationUnmaskedMaps", "rlnFourierShellCorrelationMaskedMaps"):
        np.testing.assert_allclose(np.asarray(ours["fsc"][col], float), np.asarray(theirs["fsc"][col], float),
                                   atol=1e-4)
    n, apix = 64, 2.0
    r_ours = float(ours["general"]["rlnFinalResolution"].iloc[0])
    r_theirs = float(theirs["general"]["rlnFinalResolution"].iloc[0])
    assert abs(n * apix / r_ours - n * apix / r_theirs) <= 1.0 + 1e-6, (r_ours, r_theirs)
    b_ours = float(ours["general"]["rlnBfactorUsedForSharpening"].iloc[0])
    b_theirs = float(theirs["general"]["rlnBfactorUsedForSharpening"].iloc[0])
    assert b_theirs < 0 and abs(b_ours - b_theirs) <= 0.1 * abs(b_theirs), (b_ours, b_theirs)
    np.testing.assert_allclose(np.asarray(ours["guinier"]["rlnLogAmplitudesOriginal"], float)[1:],
                               np.asarray(theirs["guinier"]["rlnLogAmplitudesOriginal"], float)[1:], atol=1e-3)
    sharp = read_map(out / "postprocess.mrc")[0]
    assert sharp.shape == (n, n, n) and np.isfinite(sharp).all() and (out / "postprocess_masked.mrc").exists()
    _check_report_in_chromium(out)


def _check_report_in_chromium(job):
    """The job's report.html in headless Chromium (software WebGL): its images load and its 3D views (NGL,
    bundled beside the page: works offline) load the maps and draw their isosurfaces without an error."""
    import os
    import re

    from test_project import _chromium

    page = job / "report.html"
    assert (job / "report" / "ngl.js").exists()
    res = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader",
                          "--enable-unsafe-swiftshader", "--virtual-time-budget=20000", "--dump-dom",
                          page.resolve().as_uri()], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "HOME": str(job)})
    dom = res.stdout
    m = re.search(r'id="spa3d-image-status" data-loaded="(\d+)" data-total="(\d+)"', dom)
    assert m and int(m.group(1)) == int(m.group(2)) >= 2, "report images did not load"
    v = re.search(r'id="spa3d-viewer-status" data-ready="(\d+)" data-total="(\d+)" data-errors="(\d+)"', dom)
    assert v, "the 3D views' script did not run"
    assert int(v.group(1)) == int(v.group(2)) == 2 and int(v.group(3)) == 0, v.group(0)
    assert "<canvas" in dom


def test_phase_randomisation_removes_the_mask_correlation(half_maps):
    """Beyond the randomisation shell the phase-randomised masked FSC is noise, and the corrected FSC is below
    the masked one (the mask's own correlation removed)."""
    h1 = read_map(half_maps / "run_half1_class001_unfil.mrc")[0]
    h2 = read_map(half_maps / "run_half2_class001_unfil.mrc")[0]
    sharp_mask = create_mask(h1 + h2, 2.0, 15.0, 0.2, 0.0, 0.0)  # a hard mask correlates the noise most
    r = postprocess(h1, h2, 2.0, sharp_mask)
    beyond = np.arange(len(r.fsc_corrected)) >= r.randomize_at + 2
    assert r.randomize_at > 2
    assert np.all(r.fsc_corrected[beyond] <= r.fsc_masked[beyond] + 1e-9)
    assert abs(float(np.mean(r.fsc_random_masked[r.randomize_at + 6:]))) < 0.1 < float(r.fsc_masked[-8:].mean()) + 0.1
    assert 2 * 2.0 <= r.resolution < 20.0 and r.bfactor < 0


@pytest.mark.parametrize("problem", ["mask_range", "shape"])
def test_postprocess_bad_input_is_one_line(half_maps, tmp_path, problem):
    h1 = half_maps / "run_half1_class001_unfil.mrc"
    args = ["--i", str(h1), "--o", str(tmp_path / "out")]
    bad = tmp_path / "bad.mrc"
    if problem == "mask_range":
        write_map(bad, np.full((64, 64, 64), 2.0, np.float32), 2.0)
        args += ["--mask", str(bad)]
    else:
        write_map(bad, np.zeros((32, 32, 32), np.float32), 2.0)
        args += ["--i2", str(bad)]
    res = subprocess.run([sys.executable, "-m", "spa3d", "postprocess", *args], capture_output=True, text=True)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("spa3d postprocess: error:") and str(bad) in lines[-1]
    assert not (tmp_path / "out" / "postprocess.star").exists()
