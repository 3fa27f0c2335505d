"""Chunk windows of the training buffer: a_{t:t+H} with its mask, zero past the end."""

import numpy as np

from habc_learner.data import all_chunk_targets, chunk_targets


def test_chunk_targets_pad_and_mask_past_the_end():
    actions = np.arange(10, dtype=np.float32).reshape(5, 2)
    chunk, mask = chunk_targets(actions, 3, 4)
    np.testing.assert_array_equal(chunk, [[6, 7], [8, 9], [0, 0], [0, 0]])
    np.testing.assert_array_equal(mask, [1, 1, 0, 0])
    chunks, masks = all_chunk_targets(actions, 4)
    assert chunks.shape == (5, 4, 2)
    np.testing.assert_array_equal(chunks[3], chunk)
    np.testing.assert_array_equal(masks[3], mask)
    np.testing.assert_array_equal(masks[0], [1, 1, 1, 1])


def _takeover_episode():
    from habc_episodes.episode import Episode
    controllers = ['policy'] * 4 + ['human'] * 3 + ['policy'] * 2
    n = len(controllers)
    return Episode(observations={'state': np.zeros((n, 1), np.float32)},
                   actions=np.arange(n, dtype=np.float32)[:, None], controllers=controllers,
                   outcome='success')


def test_human_window_targets_are_masked_to_the_human_steps():
    from habc_learner.credit import CreditConfig
    from habc_learner.data import SampleBuffer
    buffer = SampleBuffer(CreditConfig(horizon=4, min_human_steps=2))
    buffer.add(_takeover_episode())
    table = buffer.table
    # Windows at t = 2..5 hold >= 2 of the human steps 4, 5, 6.
    assert np.flatnonzero(table['is_human']).tolist() == [2, 3, 4, 5]
    masks = table['action_mask']
    assert masks[2].tolist() == [0, 0, 1, 1]   # anchored 2 steps before the takeover
    assert masks[3].tolist() == [0, 1, 1, 1]
    assert masks[5].tolist() == [1, 1, 0, 0]   # the policy's steps after the handback
    assert masks[0].tolist() == [1, 1, 1, 1]   # a policy window keeps its whole chunk
    assert masks[8].tolist() == [1, 0, 0, 0]   # past the episode end, as before


def test_full_chunk_targets_remain_selectable_for_ablations():
    from habc_learner.credit import CreditConfig
    from habc_learner.data import SampleBuffer
    buffer = SampleBuffer(CreditConfig(horizon=4, min_human_steps=2),
                          human_window_targets='full_chunk')
    buffer.add(_takeover_episode())
    assert buffer.table['action_mask'][2].tolist() == [1, 1, 1, 1]
    try:
        SampleBuffer(CreditConfig(horizon=4), human_window_targets='policy')
    except ValueError as exc:
        assert 'human_steps' in str(exc)
    else:
        raise AssertionError('an unknown human_window_targets was accepted')
