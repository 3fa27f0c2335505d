"""Image <-> numpy conversion without cv_bridge."""

import array

import numpy as np
import pytest
from sensor_msgs.msg import Image

from habc_policy.image_convert import image_to_numpy, numpy_to_image


def pattern(height: int, width: int, channels: int) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return (np.arange(np.prod(shape)) % 251).astype(np.uint8).reshape(shape)


def test_rgb8_round_trip_and_receive_is_zero_copy():
    pixels = pattern(4, 6, 3)
    msg = numpy_to_image(pixels, 'rgb8')
    assert (msg.height, msg.width, msg.step, msg.encoding) == (4, 6, 18, 'rgb8')
    assert isinstance(msg.data, array.array)  # bytes went in, rclpy stored its own array
    received = image_to_numpy(msg)
    np.testing.assert_array_equal(received, pixels)
    # A view of the message's buffer, not a copy.
    assert np.shares_memory(received, np.frombuffer(msg.data, dtype=np.uint8))


def test_bgr8_is_reversed_to_rgb_only_when_asked():
    rgb = pattern(3, 5, 3)
    msg = numpy_to_image(rgb[:, :, ::-1], 'bgr8')  # a non-contiguous view is packed
    np.testing.assert_array_equal(image_to_numpy(msg), rgb[:, :, ::-1])
    as_rgb = image_to_numpy(msg, rgb=True)
    np.testing.assert_array_equal(as_rgb, rgb)
    assert np.shares_memory(as_rgb, np.frombuffer(msg.data, dtype=np.uint8))


def test_mono8_shapes():
    gray = pattern(5, 7, 1)
    msg = numpy_to_image(gray[:, :, None], 'mono8')
    assert msg.step == 7
    np.testing.assert_array_equal(image_to_numpy(msg), gray)
    as_rgb = image_to_numpy(msg, rgb=True)
    assert as_rgb.shape == (5, 7, 3)
    np.testing.assert_array_equal(as_rgb[:, :, 2], gray)


def test_padded_rows_are_sliced_away():
    pixels = pattern(3, 2, 3)
    padded = np.zeros((3, 8), np.uint8)
    padded[:, :6] = pixels.reshape(3, 6)
    msg = Image(height=3, width=2, encoding='rgb8', step=8)
    msg.data = padded.tobytes()
    np.testing.assert_array_equal(image_to_numpy(msg), pixels)


def test_errors_name_the_problem():
    msg = numpy_to_image(pattern(2, 2, 3))
    msg.encoding = '16UC1'
    with pytest.raises(ValueError, match="'16UC1' is not supported"):
        image_to_numpy(msg)
    msg = numpy_to_image(pattern(2, 2, 3))
    msg.height = 3
    with pytest.raises(ValueError, match='needs 18 bytes, got 12'):
        image_to_numpy(msg)
    with pytest.raises(ValueError, match='uint8'):
        numpy_to_image(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match=r'\(height, width, 3\)'):
        numpy_to_image(np.zeros((2, 2), np.uint8), 'rgb8')


def test_works_on_plain_objects_with_numpy_data():
    # rosbags messages carry data as a numpy array; any object with the fields works.
    class Plain:
        height, width, step, encoding = 2, 2, 6, 'rgb8'
        data = pattern(2, 2, 3).reshape(-1)

    np.testing.assert_array_equal(image_to_numpy(Plain()), pattern(2, 2, 3))
