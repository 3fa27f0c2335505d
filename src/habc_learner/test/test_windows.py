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
