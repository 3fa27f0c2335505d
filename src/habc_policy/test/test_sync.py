"""The observation synchronizer pairs frame sets with joint states interpolated at their stamp.

Most joint trajectories are linear in time, q(t) = [100 (t - 1), 1 + 200 (t - 1)], so the
expected interpolated values can be read off.
"""

import numpy as np
import pytest

from habc_common.params import from_mapping
from habc_policy.sync import ObservationSynchronizer, SyncParams

NAMES = ['j1', 'j2']


def _q(t: float) -> list[float]:
    return [100.0 * (t - 1.0), 1.0 + 200.0 * (t - 1.0)]


def _sync(**overrides) -> ObservationSynchronizer:
    return ObservationSynchronizer(SyncParams(**overrides))


def _feed_joints(sync: ObservationSynchronizer, stamps: list[float]) -> None:
    for t in stamps:
        sync.add_joint_state(t, NAMES, _q(t))


def test_interpolates_between_bracketing_joint_states():
    sync = _sync()
    sync.add_joint_state(1.00, NAMES, [0.0, 1.0], [0.0, 2.0])
    sync.add_joint_state(1.01, NAMES, [1.0, 3.0], [2.0, 4.0])
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    sync.add_image(0, 1.0025, image, now=1.03)
    (obs,) = sync.pop_ready(now=1.03)
    assert obs.stamp == 1.0025
    assert obs.positions == pytest.approx([0.25, 1.5])
    assert obs.velocities == pytest.approx([0.5, 2.5])
    assert obs.joint_match == 'interpolated'
    assert obs.joint_names == NAMES
    assert obs.images[0] is image
    assert obs.image_stamps == [1.0025]
    assert sync.counters['emitted'] == 1
    assert sync.pop_ready(now=1.04) == []


def test_frame_set_stamp_is_the_mean_of_its_image_stamps():
    sync = _sync(num_cameras=2)
    sync.add_joint_state(1.00, NAMES, [0.0, 1.0])
    sync.add_joint_state(1.01, NAMES, [1.0, 3.0])
    sync.add_image(1, 1.006, 'right', now=1.02)
    assert sync.pop_ready(now=1.02) == []  # camera 0 is still missing
    sync.add_image(0, 1.002, 'left', now=1.025)
    (obs,) = sync.pop_ready(now=1.025)
    assert obs.stamp == pytest.approx(1.004)
    assert obs.positions == pytest.approx([0.4, 1.8])
    assert obs.velocities is None  # the joint states carried none
    assert obs.images == ['left', 'right']  # by camera index, not arrival
    assert obs.image_stamps == [1.002, 1.006]


def test_nearest_joint_state_within_slop_outside_the_coverage():
    sync = _sync(slop_s=0.02)
    sync.add_joint_state(1.00, NAMES, [0.0, 1.0], [5.0, 6.0])
    sync.add_joint_state(1.01, NAMES, [1.0, 3.0], [7.0, 8.0])
    sync.add_image(0, 0.985, 'before', now=1.02)  # 15 ms before the oldest joint state
    sync.add_image(0, 1.025, 'after', now=1.03)  # 15 ms after the newest one
    before, after = sync.pop_ready(now=1.03)
    assert before.positions == pytest.approx([0.0, 1.0])
    assert before.velocities == pytest.approx([5.0, 6.0])
    assert before.joint_match == 'nearest'
    assert after.positions == pytest.approx([1.0, 3.0])
    assert after.velocities == pytest.approx([7.0, 8.0])
    assert after.joint_match == 'nearest'


def test_frame_before_the_joint_coverage_beyond_slop_is_dropped_at_once():
    sync = _sync(slop_s=0.02)
    _feed_joints(sync, [1.00, 1.01])
    sync.add_image(0, 0.975, 'old', now=1.01)
    assert sync.pop_ready(now=1.01) == []
    assert sync.counters['dropped_no_joint_state'] == 1
    assert sync.diagnostics()['waiting_sets'] == 0


def test_hole_in_joint_stream_uses_nearest_side_within_slop_only():
    sync = _sync(slop_s=0.02)
    sync.add_joint_state(1.00, NAMES, [0.0, 1.0])
    sync.add_joint_state(1.10, NAMES, [10.0, 21.0])
    sync.add_image(0, 1.015, 'near the first', now=1.11)
    sync.add_image(0, 1.05, 'in the middle', now=1.11)
    (obs,) = sync.pop_ready(now=1.11)
    assert obs.stamp == 1.015
    assert obs.positions == pytest.approx([0.0, 1.0])
    assert obs.joint_match == 'nearest'
    assert sync.counters['dropped_no_joint_state'] == 1


def test_waits_for_a_later_joint_state_then_interpolates():
    sync = _sync(slop_s=0.02, late_after_s=0.2)
    _feed_joints(sync, [1.00, 1.01])
    sync.add_image(0, 1.05, 'img', now=1.06)  # 40 ms past the newest joint state
    assert sync.pop_ready(now=1.06) == []
    assert sync.diagnostics()['waiting_sets'] == 1
    sync.add_joint_state(1.04, NAMES, [4.0, 9.0])
    sync.add_joint_state(1.06, NAMES, [6.0, 13.0])
    (obs,) = sync.pop_ready(now=1.07)
    assert obs.positions == pytest.approx([5.0, 11.0])
    assert obs.joint_match == 'interpolated'
    assert sync.counters['dropped_no_joint_state'] == 0


def test_set_waiting_for_joint_states_is_dropped_once_late():
    sync = _sync(slop_s=0.02, late_after_s=0.2)
    _feed_joints(sync, [1.00, 1.01])
    sync.add_image(0, 1.05, 'img', now=1.06)
    assert sync.pop_ready(now=1.24) == []  # 190 ms: the joint states may still come
    assert sync.counters['dropped_no_joint_state'] == 0
    assert sync.pop_ready(now=1.26) == []  # 210 ms: late
    assert sync.counters['dropped_no_joint_state'] == 1
    sync.add_joint_state(1.06, NAMES, _q(1.06))
    assert sync.pop_ready(now=1.27) == []
    assert sync.counters['emitted'] == 0


def test_late_frame_set_is_dropped_and_counted():
    sync = _sync(num_cameras=2, late_after_s=0.2)
    _feed_joints(sync, [0.99, 1.00, 1.01])
    sync.add_image(0, 1.000, 'a', now=1.05)
    sync.add_image(1, 1.004, 'b', now=1.25)  # completes 248 ms after the set's stamp
    assert sync.pop_ready(now=1.25) == []
    assert sync.counters['dropped_late'] == 1
    assert sync.counters['emitted'] == 0
    # The next set is on time again.
    _feed_joints(sync, [1.03, 1.04])
    sync.add_image(0, 1.033, 'c', now=1.06)
    sync.add_image(1, 1.035, 'd', now=1.06)
    (obs,) = sync.pop_ready(now=1.06)
    assert obs.images == ['c', 'd']
    assert obs.positions == pytest.approx(_q(1.034))


def test_unmatched_camera_frame_is_dropped_when_superseded():
    sync = _sync(num_cameras=2, max_image_skew_s=0.01)
    _feed_joints(sync, [1.00, 1.01, 1.02, 1.03])
    sync.add_image(0, 1.000, 'a0', now=1.02)
    sync.add_image(1, 1.020, 'b1', now=1.03)  # 20 ms from a0: a0 can never be matched
    assert sync.counters['dropped_unmatched'] == 1
    assert sync.pop_ready(now=1.03) == []
    sync.add_image(0, 1.024, 'a1', now=1.035)
    (obs,) = sync.pop_ready(now=1.035)
    assert obs.images == ['a1', 'b1']
    assert obs.stamp == pytest.approx(1.022)
    assert obs.positions == pytest.approx(_q(1.022))
    assert sync.counters == {'emitted': 1, 'dropped_late': 0, 'dropped_unmatched': 1,
                             'dropped_no_joint_state': 0, 'dropped_out_of_order': 0}


def test_frames_of_a_silent_camera_partner_expire_as_unmatched():
    sync = _sync(num_cameras=2, late_after_s=0.2, max_image_skew_s=0.01)
    sync.add_image(0, 1.00, 'a', now=1.01)
    sync.add_image(0, 1.05, 'b', now=1.06)
    assert sync.pop_ready(now=1.20) == []
    assert sync.diagnostics()['pending_frames'] == 2
    assert sync.pop_ready(now=1.215) == []  # 'a' waited past late + skew: 1.21
    assert sync.counters['dropped_unmatched'] == 1
    assert sync.diagnostics()['pending_frames'] == 1


def test_out_of_order_frames_are_dropped():
    sync = _sync()
    _feed_joints(sync, [1.00, 1.01, 1.02, 1.03, 1.04, 1.05, 1.06])
    sync.add_image(0, 1.05, 'new', now=1.06)
    assert len(sync.pop_ready(now=1.06)) == 1
    sync.add_image(0, 1.04, 'older than the emitted one', now=1.07)
    sync.add_image(0, 1.05, 'duplicate stamp', now=1.07)
    assert sync.pop_ready(now=1.07) == []
    assert sync.counters['dropped_out_of_order'] == 2
    assert sync.counters['emitted'] == 1


def test_out_of_order_frame_of_one_camera_before_emission_is_dropped():
    sync = _sync(num_cameras=2)
    sync.add_image(0, 1.02, 'a', now=1.03)
    sync.add_image(0, 1.01, 'older', now=1.03)
    assert sync.counters['dropped_out_of_order'] == 1
    assert sync.diagnostics()['pending_frames'] == 1


def test_joint_state_with_other_names_raises():
    sync = _sync()
    sync.add_joint_state(1.00, NAMES, [0.0, 1.0])
    with pytest.raises(ValueError, match=r"has joints \['j1', 'j3'\], but the first joint "
                                         r"state had \['j1', 'j2'\]"):
        sync.add_joint_state(1.01, ['j1', 'j3'], [0.0, 1.0])
    with pytest.raises(ValueError, match='2 names but 3 positions'):
        sync.add_joint_state(1.01, NAMES, [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match='2 names but 1 velocities'):
        sync.add_joint_state(1.01, NAMES, [0.0, 1.0], [0.0])
    assert sync.diagnostics()['joint_states_buffered'] == 1


def test_reordered_joint_names_keep_the_first_order():
    sync = _sync()
    sync.add_joint_state(1.00, NAMES, [0.0, 1.0], [10.0, 20.0])
    sync.add_joint_state(1.01, ['j2', 'j1'], [3.0, 1.0], [40.0, 30.0])
    sync.add_image(0, 1.005, 'img', now=1.02)
    (obs,) = sync.pop_ready(now=1.02)
    assert obs.joint_names == NAMES
    assert obs.positions == pytest.approx([0.5, 2.0])
    assert obs.velocities == pytest.approx([20.0, 30.0])


def test_joint_states_out_of_order_are_sorted_in():
    sync = _sync()
    sync.add_joint_state(1.02, NAMES, _q(1.02))
    sync.add_joint_state(1.00, NAMES, _q(1.00))
    sync.add_joint_state(1.01, NAMES, [5.0, 5.0])
    sync.add_joint_state(1.01, NAMES, _q(1.01))  # same stamp again: the newer one wins
    sync.add_image(0, 1.015, 'img', now=1.03)
    (obs,) = sync.pop_ready(now=1.03)
    assert obs.positions == pytest.approx(_q(1.015))
    assert sync.diagnostics()['joint_states_buffered'] == 3


def test_joint_buffer_keeps_only_the_configured_history():
    sync = _sync(joint_buffer_s=0.5, late_after_s=0.2, slop_s=0.02)
    # Dyadic stamps 1 + i/128 up to 2.0, so the horizon 1.5 is hit exactly (i = 64).
    _feed_joints(sync, [1.0 + i / 128 for i in range(129)])
    diag = sync.diagnostics()
    # Everything after 1.5 plus the state at the horizon itself: i = 64 .. 128.
    assert diag['joint_states_buffered'] == 65
    assert diag['joint_coverage_s'] == pytest.approx(0.5)


def test_diagnostics_ratios():
    sync = _sync(num_cameras=2)
    assert sync.diagnostics()['set_drop_ratio'] == 0.0
    _feed_joints(sync, [1.00, 1.01, 1.02, 1.03])
    sync.add_image(0, 1.000, 'a0', now=1.01)
    sync.add_image(1, 1.020, 'b0', now=1.03)  # a0 unmatched
    sync.add_image(0, 1.021, 'a1', now=1.03)  # set at 1.0205
    sync.add_image(0, 1.010, 'stale', now=1.03)  # out of order
    assert len(sync.pop_ready(now=1.03)) == 1
    diag = sync.diagnostics()
    assert diag['frames_received'] == 4
    assert diag['frame_drop_ratio'] == pytest.approx(0.5)
    assert diag['set_drop_ratio'] == 0.0
    assert diag['last_emitted_stamp'] == pytest.approx(1.0205)


def test_params_are_validated():
    with pytest.raises(ValueError, match='joint_buffer_s'):
        SyncParams(joint_buffer_s=0.1, late_after_s=0.2)
    with pytest.raises(ValueError, match="parameter 'num_cameras'"):
        SyncParams(num_cameras=0)
    params = from_mapping(SyncParams, {'num_cameras': 3, 'slop_s': 0.01})
    assert params.num_cameras == 3 and params.max_image_skew_s == 0.01
    with pytest.raises(ValueError, match='camera index 3 out of range'):
        ObservationSynchronizer(params).add_image(3, 1.0, 'img', now=1.0)
