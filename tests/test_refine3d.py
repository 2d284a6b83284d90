"""spa3d refine3d: RELION's auto-refine rules, honest gold-standard resolution, --continue, outputs."""

from __future__ import annotations

import numpy as np
import pytest

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
