"""Realistic simulation: noise coloured like a real micrograph, junk and empty picks, per-micrograph variation."""

from __future__ import annotations

import numpy as np

from spa3d.cli.main import main
from spa3d.io.mrc import read_map, write_map
from spa3d.io.star import read_star
from spa3d.jobs.simulate import make_noise, measure_noise_spectrum


def _coloured_micrograph(path, size=1024, apix=1.0, seed=0):
    """A 'real' micrograph whose noise power falls as 1/(1 + (f/0.05)²) (f in 1/Å), plus a flat floor."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(size)[:, None] / apix
    fx = np.fft.rfftfreq(size)[None, :] / apix
    f = np.sqrt(fx**2 + fy**2)
    amp = np.sqrt(1.0 / (1.0 + (f / 0.05) ** 2) + 0.05)
    img = np.fft.irfft2(np.fft.rfft2(rng.normal(size=(size, size))) * amp, s=(size, size))
    write_map(path, (1000 + 50 * img).astype(np.float32), apix)


def test_realistic_simulation(tmp_path, truth_map):
    _coloured_micrograph(tmp_path / "real.mrc")
    real = measure_noise_spectrum(tmp_path / "real.mrc")
    out = tmp_path / "sim"
    assert main(["simulate", "--i", str(truth_map[1]), "--o", str(out), "--n", "400", "--micrographs", "4",
                 "--mic-size", "512", "--snr", "0.05", "--noise-spectrum", str(tmp_path / "real.mrc"),
                 "--realistic", "--seed", "3", "--quiet"]) == 0
    truth = read_star(out / "particles_truth.star")["particles"]
    given = read_star(out / "particles.star")["particles"]
    cls = truth["rlnClassNumber"].to_numpy()
    # one species: class 1; junk: 2 (10 %); empty picks: 3 (5 %)
    assert np.bincount(cls, minlength=4)[1:].tolist() == [340, 40, 20]
    # the defocus in particles.star is the truth plus one error per micrograph (SD 200 Å)
    err = given["rlnDefocusU"].to_numpy() - truth["rlnDefocusU"].to_numpy()
    per_mic = {m: np.unique(np.round(err[given["rlnMicrographName"] == m], 6)) for m in set(given["rlnMicrographName"])}
    assert all(len(v) == 1 for v in per_mic.values())
    assert 20 < np.std([v[0] for v in per_mic.values()]) < 600
    # per-micrograph signal scale and noise level vary
    assert truth["rlnSpa3dTrueScale"].nunique() == 4 and truth["rlnSpa3dNoiseSigma"].nunique() == 4
    # the noise has the real micrograph's spectrum (at 2 Å/px: frequencies up to 0.25/Å)
    noise = make_noise((1024, 1024), 30.0, real, 2.0, np.random.default_rng(0))
    assert abs(noise.std() - 30.0) < 1.5
    write_map(tmp_path / "noise.mrc", noise, 2.0)
    sim = measure_noise_spectrum(tmp_path / "noise.mrc")
    f = np.linspace(0.01, 0.24, 40)
    a, b = np.interp(f, real.freq, real.power), np.interp(f, sim.freq, sim.power)
    ratio = (a / a.mean()) / (b / b.mean())
    assert np.abs(np.log(ratio)).max() < np.log(1.5), ratio
    assert a[0] / a[-1] > 5  # the spectrum is far from white
    mic, _ = read_map(out / "Micrographs" / "mic001.mrc")
    assert mic.shape[-2:] == (512, 512)


def test_noise_spectrum_from_a_text_file(tmp_path):
    rows = np.array([[0.0, 4.0], [0.1, 2.0], [0.25, 1.0]])
    np.savetxt(tmp_path / "spec.txt", rows)
    sp = measure_noise_spectrum(tmp_path / "spec.txt")
    assert np.allclose(sp.power / sp.power[-1], [4.0, 2.0, 1.0])
    filt = sp.filter((64, 64), 2.0)
    assert filt[0, 0] > filt[32, 16]  # strong low frequencies
