"""spa3d refine3d: RELION's auto-refine rules, honest gold-standard resolution, --continue, outputs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import check_estimate

from spa3d.geometry.sampling import angular_step
from spa3d.jobs.refine3d import (RefineState, Refine3dOptions, fsc_tau2, orientation_changes,
                                 update_hidden_variable_changes, update_sampling)


def _state(**kw) -> RefineState:
    st = RefineState(1, np.ones(33), 2.0, np.ones(1), 20.0, 10.0, np.zeros((4, 2)), np.zeros((4, 3)),
                     np.array([0, 1, 0, 1]), 2, 5.0, 2.0)
    for k, v in kw.items():
        setattr(st, k, v)
    return st


def test_sampling_gets_finer_only_when_resolution_and_poses_stall():
    """RELION's updateAngularSampling: no change while the resolution improves or the poses still move."""
    o = Refine3dOptions(auto_local_healpix_order=4)
    st = _state(iter_wo_resol_gain=0, iter_wo_large_changes=3, acc_rot=2.0, acc_trans=2.0, change_offset=0.5)
    assert not update_sampling(st, o, 2.0) and st.order == 2
    st.iter_wo_resol_gain, st.iter_wo_large_changes = 1, 0
    assert not update_sampling(st, o, 2.0) and st.order == 2
    st.iter_wo_large_changes = 1
    assert update_sampling(st, o, 2.0) and st.order == 3 and st.sigma_ang == 0.0
    # counters reset; the offset step never coarser than before; range ≥ 1.5 steps
    assert st.iter_wo_resol_gain == 0 and st.iter_wo_large_changes == 0
    assert st.offset_step <= 2.0 and st.offset_range >= 1.5 * st.offset_step
    # from the auto-local order on: local searches with σ = 2 fine steps
    st.iter_wo_resol_gain = st.iter_wo_large_changes = 1
    assert update_sampling(st, o, 2.0) and st.order == 4
    assert st.sigma_ang == pytest.approx(2 * angular_step(5))


def test_sampling_fine_enough_when_below_the_accuracy():
    """A step under 75 % of the estimated rotational accuracy is fine enough: no change (convergence may follow)."""
    o = Refine3dOptions()
    st = _state(iter_wo_resol_gain=1, iter_wo_large_changes=1, acc_rot=angular_step(3) / 0.7, acc_trans=1.0)
    assert not update_sampling(st, o, 2.0)
    assert st.fine_enough and st.order == 2


def test_hidden_variable_changes_count_as_relion():
    """An iteration counts as 'without large changes' when changes stop falling (3 %) or are under 40 % of a step."""
    st = _state(smallest_change_classes=0.0, smallest_change_orient=5.0, smallest_change_offset=1.0,
                change_orient=2.0, change_offset=0.9)
    update_hidden_variable_changes(st)  # both fell by more than 3 %, but 2° < 0.4·7.5° and 0.9 px ≥ 0.4·1 px
    assert st.iter_wo_large_changes == 0  # the offsets still fell
    st.change_orient, st.change_offset = 1.9, 0.2  # offsets now under 40 % of the fine step (1 px)
    update_hidden_variable_changes(st)
    assert st.iter_wo_large_changes == 1
    first = _state(change_orient=0.0, change_offset=0.0)  # the first iteration never counts (as RELION)
    update_hidden_variable_changes(first)
    assert first.iter_wo_large_changes == 0
    # at 0.94° (order 5) a change of 0.5° that still falls is large against the current step, but not against
    # the run's initial 7.5° step, the one RELION's MPI leader keeps dividing by (refine3d passes it)
    fine = _state(order=5, smallest_change_classes=0.0, smallest_change_orient=0.7, smallest_change_offset=0.2, change_orient=0.5,
                  change_offset=0.1, offset_step=0.5)
    update_hidden_variable_changes(fine)
    assert fine.iter_wo_large_changes == 0
    update_hidden_variable_changes(fine, angular_step(3), 2.0)
    assert fine.iter_wo_large_changes == 1


def test_orientation_changes_use_symmetry_mates():
    from spa3d.geometry.euler import euler_to_matrix
    from spa3d.geometry.symmetry import symmetry_matrices

    ops = symmetry_matrices("D2")
    a = euler_to_matrix(np.array([10.0]), np.array([40.0]), np.array([70.0]))
    mate = a @ ops[2]
    assert orientation_changes(a, mate, symmetry_matrices("C1"))[0] > 90
    assert orientation_changes(a, mate, ops)[0] < 1e-3


def test_fsc_tau2_follows_the_half_maps_ssnr():
    fsc = np.array([1.0, 0.9, 0.5, 0.2, 0.0, -0.1])
    w = np.full(6, 2.0)
    t = fsc_tau2(fsc, w, 1.0, r_max=5)
    assert t[2] == pytest.approx(0.5 / 0.5 / 2.0) and t[4] == 0 and t[5] == 0
    assert fsc_tau2(fsc, w, 1.0, r_max=5, full=True)[2] == pytest.approx(2 * t[2])
    assert fsc_tau2(fsc, w, 1.0, r_max=2)[3] == 0


def test_a_mirrored_half_is_turned_onto_the_other_with_poses_that_project_the_same(truth_map):
    """align_halves' pieces: a half map in the other hand and frame is found, and turning it with its poses
    leaves every particle's projection unchanged."""
    from spa3d.fourier.projector import Projector
    from spa3d.geometry.euler import euler_to_matrix, random_rotations
    from spa3d.maps.align import relative_orientation, transform_map, transform_poses

    vol = truth_map[0]
    rng = np.random.default_rng(3)
    s0 = np.diag([-1.0, 1.0, 1.0]) @ euler_to_matrix(np.array([40.0]), np.array([70.0]), np.array([-20.0]))[0]
    other = transform_map(vol, s0)  # the mirror image, turned: vol(S0·x)
    rel = relative_orientation(vol, other)
    assert rel.mirrored and rel.correlation > rel.correlation_as_is + 0.2
    err = np.rad2deg(np.arccos(np.clip((np.trace(rel.matrix @ s0) - 1) / 2, -1, 1)))
    assert err < 3.0  # other(S·x) ≈ vol(x): S = S0ᵀ
    poses = random_rotations(6, rng)

    def agreement(other_poses):
        a_, b_ = Projector(vol).project(poses, r_max=12), Projector(other).project(other_poses, r_max=12)
        return [float((a.conj() * b).real.sum() / (a.abs().square().sum() * b.abs().square().sum()).sqrt())
                for a, b in zip(a_, b_)]

    assert min(agreement(transform_poses(poses, s0))) > 0.99  # vol(S0·x) under D·A·S0 projects as vol under A
    assert max(agreement(transform_poses(poses, s0.T))) < 0.97
    assert not relative_orientation(vol, vol).mirrored

    # in a refinement: half 2 (the particles of half 2 and their poses) had settled in the other hand and frame
    from spa3d.jobs.refine3d import align_halves
    from spa3d.maps.transform import fourier_resample

    st = _state(angles=np.array([[10.0, 50.0, 80.0], [20.0, 60.0, 90.0], [-30.0, 100.0, 0.0], [170.0, 20.0, -60.0]]),
                resolution_shell=12.0, reference_small=fourier_resample(vol, 32))
    old = st.angles.copy()
    maps = align_halves(np.stack([vol, other]), st, "C1", 5)
    assert np.corrcoef(maps[1].ravel(), vol.ravel())[0, 1] > 0.95 and np.array_equal(maps[0], vol)
    assert np.allclose(st.angles[st.halves == 0], old[st.halves == 0])  # half 1's poses untouched
    moved = euler_to_matrix(*st.angles[st.halves == 1].T)
    before = euler_to_matrix(*old[st.halves == 1].T)
    # each moved pose projects the turned map as the old pose projected the old one: D·A·S
    s_fit = np.linalg.inv(s0)  # other(S·x) ≈ vol(x)
    assert np.allclose(moved, transform_poses(before, s_fit), atol=0.05)
    again = st.angles.copy()
    assert np.array_equal(align_halves(maps, st, "C1", 6), maps) and np.array_equal(st.angles, again)  # now agree
    assert st.halves_agreed == 1  # clearly: anything else correlates far less than the halves as they are
    align_halves(maps, st, "C1", 7)
    assert st.halves_agreed == 2  # settled: later iterations skip the check
    assert np.array_equal(align_halves(np.stack([vol, other]), st, "C1", 8)[1], other)
    rel = relative_orientation(vol, vol)
    assert rel.correlation_as_is > 0.99 and rel.correlation_other < rel.correlation_as_is - 0.15


# ---- a refinement of simulated particles (1TII, box 64, 2 Å/px, CTF, SNR 0.1) from the truth at 50 Å ----

from spa3d.io.mrc import read_map, write_map  # noqa: E402
from spa3d.io.star import read_star, write_star  # noqa: E402
from spa3d.jobs.refine3d import run_refine3d  # noqa: E402


def _opts(**kw) -> Refine3dOptions:
    # RELION's GUI: 7.5°, offsets 5/1 px (coarse step 2 px); local searches from 3.75° to reach them in the test
    base = dict(healpix_order=2, offset_range=5.0, offset_step=2.0, auto_local_healpix_order=3, ini_high=50.0,
                particle_diameter=110.0, ctf=True, zero_mask=True, flatten_solvent=True, seed=1, max_iter=30)
    base.update(kw)
    return Refine3dOptions(**base)


@pytest.fixture(scope="module")
def picked(make_dataset):
    """800 particles as picked (no poses, no offsets) and the ground truth."""
    d = make_dataset(800, 0.1, 11)
    t = read_star(d / "particles.star")
    parts = t["particles"].drop(columns=[c for c in t["particles"].columns if c.startswith(("rlnOrigin", "rlnAngle"))])
    write_star(d / "picked.star", {"optics": t["optics"], "particles": parts})
    return d


@pytest.fixture(scope="module")
def refined(picked, tmp_path_factory):
    job = tmp_path_factory.mktemp("refine3d")
    vol, st = run_refine3d(str(picked / "picked.star"), str(picked / "truth_class001.mrc"), str(job), _opts())
    return job, st


def test_refine3d_converges_to_an_honest_gold_standard_resolution(picked, refined):
    """The half maps' FSC 0.143 (what refine3d reports) is within 2 shells of the final map's FSC 0.5 against the
    truth (the resolution it stands for: sqrt(2·0.143/1.143) = 0.5), and the map is good."""
    from spa3d.fourier.filters import fsc
    from spa3d.jobs.class3d import resolution_shell
    from spa3d.maps.align import superpose

    job, st = refined
    assert st.finished and st.sigma_ang > 0  # converged, after reaching local searches
    truth = read_map(picked / "truth_class001.mrc")[0]
    final = read_map(job / "run_class001.mrc")[0]
    halves = [read_map(job / f"run_half{h}_class001_unfil.mrc")[0] for h in (1, 2)]
    half_shell = resolution_shell(fsc(*halves), 0.143)
    aligned, _ = superpose(final, truth, try_mirror=False)  # a refinement from a 50 Å reference may settle a few degrees off
    truth_shell = resolution_shell(fsc(aligned, truth), 0.5)
    assert abs(half_shell - truth_shell) <= 2, (half_shell, truth_shell)
    assert 128 / truth_shell < 12.0  # Å
    reported = float(read_star(job / "run_model.star")["model_general"]["rlnCurrentResolution"].iloc[0])
    assert reported == pytest.approx(128 / half_shell, rel=1e-3)


def test_refine3d_poses_and_relion_outputs(picked, refined):
    """Poses within a few degrees of the truth; RELION's output names and columns, both half sets used."""
    from spa3d.geometry.euler import euler_to_matrix

    job, st = refined
    for f in ("run_class001.mrc", "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc", "run_model.star",
              "run_data.star", f"run_it{st.iteration:03d}_half2_class001.mrc", "run.log"):
        assert (job / f).exists(), f
    data = read_star(job / "run_data.star")["particles"]
    truth = read_star(picked / "particles_truth.star")["particles"]
    sub = data["rlnRandomSubset"].astype(int).to_numpy()
    assert set(np.unique(sub)) == {1, 2} and 300 < (sub == 1).sum() < 500
    a = euler_to_matrix(*data[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float).T)
    b = euler_to_matrix(*truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float).T)
    err = orientation_changes(a, b, np.eye(3)[None])
    assert np.median(err) < 5.0 and np.mean(err < 10) > 0.8, (np.median(err), np.mean(err < 10))
    off = data[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float) - truth[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)
    assert np.median(np.hypot(*off.T)) < 2.0  # Å
    fsc_curve = read_star(job / "run_model.star")["model_class_1"]["rlnGoldStandardFsc"].astype(float).to_numpy()
    assert fsc_curve[1] > 0.9 and len(fsc_curve) == 33


def test_refine3d_estimate_before_launch_is_within_a_factor_of_two(picked, refined, tmp_path):
    """run.log starts with the expected wall time (one batch timed at each stage of the usual course); the run
    took within 2x of it; --dry-run prints it and writes nothing."""
    from spa3d.cli.main import main

    job, _ = refined
    est = check_estimate(job)
    assert 0.05 < est["memory_gib"] < 16
    assert main(["refine3d", "--i", str(picked / "picked.star"), "--ref", str(picked / "truth_class001.mrc"),
                 "--o", str(tmp_path / "dry"), "--ini-high", "50", "--ctf", "--particle-diameter", "110",
                 "--dry-run", "--quiet"]) == 0
    assert not (tmp_path / "dry").exists()


def test_refine3d_continue_equals_an_uninterrupted_run(picked, tmp_path):
    """Stopped by --max-iter after 2 iterations and continued to 3: the same maps and poses as 3 in one go."""
    ref = str(picked / "truth_class001.mrc")
    star = str(picked / "picked.star")
    _, full = run_refine3d(star, ref, str(tmp_path / "a"), _opts(max_iter=3))
    run_refine3d(star, ref, str(tmp_path / "b"), _opts(max_iter=2))
    _, cont = run_refine3d(None, None, str(tmp_path / "b"), _opts(max_iter=3), continue_from=str(tmp_path / "b"),
                           given={"max_iter"})
    assert cont.iteration == full.iteration == 3
    np.testing.assert_allclose(cont.angles, full.angles, atol=1e-3)
    for h in (1, 2):
        a = read_map(tmp_path / "a" / f"run_it003_half{h}_class001.mrc")[0]
        b = read_map(tmp_path / "b" / f"run_it003_half{h}_class001.mrc")[0]
        assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()


def test_refine3d_bad_reference_is_one_clear_error(picked, tmp_path, capsys):
    from spa3d.cli.main import main

    write_map(tmp_path / "small.mrc", np.zeros((32, 32, 32), np.float32), 2.0)
    rc = main(["refine3d", "--i", str(picked / "picked.star"), "--ref", str(tmp_path / "small.mrc"), "--o",
               str(tmp_path / "job"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "small.mrc" in err[0] and "rescale" in err[0]
    assert not list((tmp_path / "job").glob("run_it*"))


def test_rescaled_reference_matches_relion_image_handler(truth_map, relion, tmp_path):
    """--rescale-ref: a reference at another pixel size and box, as relion_image_handler makes it."""
    from spa3d.maps.transform import rescale_map

    vol, path = truth_map
    relion("relion_image_handler", "--i", path, "--o", tmp_path / "r.mrc", "--angpix", "2", "--rescale_angpix", "2.5",
           "--new_box", "56")
    theirs, apix = read_map(tmp_path / "r.mrc")
    ours, got = rescale_map(vol, 2.0, 2.5, 56)
    assert ours.shape == theirs.shape == (56, 56, 56) and got == pytest.approx(apix, rel=1e-3)
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.99
    assert np.abs(ours.sum() / theirs.sum() - 1) < 0.05  # the same density scale


def test_a_reference_off_the_particles_greyscale_is_scored_by_cross_correlation_first(picked, tmp_path, monkeypatch):
    """A reference 30x too bright (a map from an atomic model, say) is caught before the first iteration, which then
    scores by cross-correlation as --firstiter-cc; without that, the Gaussian noise model scores the reference's
    power and the poses go wrong."""
    import re

    from spa3d.geometry.euler import euler_to_matrix
    from spa3d.io.particles import ParticleSet
    from spa3d.jobs import class3d
    from spa3d.jobs.class3d import Class3dOptions, _image_mask, greyscale_ratio, load_reference

    truth, apix = read_map(picked / "truth_class001.mrc")
    write_map(tmp_path / "bright.mrc", 30 * truth, apix)
    ps = ParticleSet(picked / "picked.star")
    o = Class3dOptions(ctf=True, zero_mask=True)
    mask = _image_mask(ps.box, 55 / 2)
    on = greyscale_ratio(ps, load_reference(str(picked / "truth_class001.mrc"), ps, 50.0), mask, o, 50.0)
    off = greyscale_ratio(ps, load_reference(str(tmp_path / "bright.mrc"), ps, 50.0), mask, o, 50.0)
    assert on < 1.5 and off == pytest.approx(900 * on, rel=1e-3), (on, off)
    truth_rot = euler_to_matrix(*read_star(picked / "particles_truth.star")["particles"][
        ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float).T)

    def median_error(job: str, **kw) -> float:
        _, st = run_refine3d(str(picked / "picked.star"), str(tmp_path / "bright.mrc"), str(tmp_path / job),
                             _opts(max_iter=5, **kw))
        return float(np.median(orientation_changes(euler_to_matrix(*st.angles.T), truth_rot, np.eye(3)[None])))

    caught = median_error("caught")
    assert "not on their greyscale" in (tmp_path / "caught" / "run.log").read_text()
    assert re.search(r"firstiter_cc\s+true", (tmp_path / "caught" / "run_it005_optimiser.star").read_text())
    monkeypatch.setattr(class3d, "GREYSCALE_RATIO_MAX", float("inf"))
    missed = median_error("missed")
    assert caught < 10.0 and missed > 3 * caught, (caught, missed)


def test_reconstruction_images_switch_to_unmasked_where_the_ctf_moves_signal_beyond_the_mask():
    """Default refine3d back-projection: masked transforms below k0 = radius / (λ·Δf), unmasked beyond (per image)."""
    import torch

    from spa3d.fourier.ctf import CtfParams, wavelength_angstrom
    from spa3d.fourier.grid import half_plane_radius, rfft2_centered
    from spa3d.jobs.class3d import split_reconstruction_images

    rng = np.random.default_rng(0)
    n, apix, radius = 64, 2.0, 55.0
    imgs = rng.normal(size=(2, n, n)).astype(np.float32)
    masked = rfft2_centered(torch.as_tensor(imgs * (np.hypot(*np.mgrid[-32:32, -32:32]) < 20)))
    defocus = np.array([10000.0, 30000.0])
    ctf = CtfParams(defocus, defocus, np.zeros(2), np.full(2, 300.0), np.full(2, 2.7), np.full(2, 0.1), np.zeros(2),
                    np.ones(2), np.zeros(2))
    out = split_reconstruction_images(masked, imgs, ctf, apix, radius)
    unmasked = rfft2_centered(torch.as_tensor(imgs))
    k = half_plane_radius(n) / (n * apix)
    for i, df in enumerate(defocus):
        k0 = radius / (float(wavelength_angstrom(300.0)) * df)  # 1/Å: 0.28 (beyond Nyquist, 0.25) and 0.093
        low = k < k0
        assert torch.equal(out[i][low], masked[i][low]) and torch.equal(out[i][~low], unmasked[i][~low])
    assert (k >= radius / (float(wavelength_angstrom(300.0)) * 30000.0)).float().mean() > 0.3
    # close to focus (δ = λ·Δf·k below the radius everywhere in the box): the masked images alone
    near = CtfParams(np.full(2, 5000.0), np.full(2, 5000.0), np.zeros(2), np.full(2, 300.0), np.full(2, 2.7),
                     np.full(2, 0.1), np.zeros(2), np.ones(2), np.zeros(2))
    assert split_reconstruction_images(masked, imgs, near, apix, radius) is None
