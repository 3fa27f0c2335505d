"""sensor_msgs/Image <-> numpy for 8-bit encodings (no rclpy, no cv_bridge).

The pip ROS 2 environment has no cv_bridge, and the policy only needs three encodings:
rgb8 (what the cameras of this project publish), bgr8 (many camera drivers' default) and
mono8. Works with any object that has Image's fields (rclpy messages, rosbags messages).

Receive: `image_to_numpy` returns a view of the message's buffer (np.frombuffer), so a
640x480 frame costs no copy; the view keeps the buffer alive, and writing into it writes
into the message. Row padding (step > width * channels) is sliced away as a view too.
Send: `numpy_to_image` assigns `arr.tobytes()` to `data`: rclpy converts bytes into its
array('B') field in C, whereas a numpy array would be converted element by element.
"""

from typing import Any

import numpy as np

# Encoding -> channels; all are one byte per channel.
CHANNELS = {'rgb8': 3, 'bgr8': 3, 'mono8': 1}


def image_to_numpy(msg: Any, rgb: bool = False) -> np.ndarray:
    """Return the pixels of an Image message as an array without copying them.

    Returns (height, width, 3) for rgb8 and bgr8 in the message's channel order, and
    (height, width) for mono8. With `rgb=True` the result is always (height, width, 3) in
    RGB order: bgr8 is reversed and mono8 repeated as views (not contiguous, and the mono8
    one read-only; np.ascontiguousarray makes a compact copy where one is needed).
    Raises ValueError for other encodings or a buffer that does not match the header.
    """
    encoding = msg.encoding
    if encoding not in CHANNELS:
        raise ValueError(f'image encoding {encoding!r} is not supported; use one of '
                         f'{sorted(CHANNELS)}')
    channels = CHANNELS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    row = width * channels
    if step < row:
        raise ValueError(f'{encoding} image {width}x{height}: step {step} is below '
                         f'width * channels = {row}')
    flat = np.frombuffer(msg.data, dtype=np.uint8)
    if flat.size != height * step:
        raise ValueError(f'{encoding} image {width}x{height} with step {step} needs '
                         f'{height * step} bytes, got {flat.size}')
    pixels = flat.reshape(height, step)[:, :row]
    if channels == 1:
        pixels = pixels.reshape(height, width)
        if rgb:
            return np.broadcast_to(pixels[:, :, None], (height, width, 3))
        return pixels
    pixels = pixels.reshape(height, width, channels)
    if rgb and encoding == 'bgr8':
        return pixels[:, :, ::-1]
    return pixels


def numpy_to_image(array: np.ndarray, encoding: str = 'rgb8', msg: Any = None) -> Any:
    """Fill an Image message from a uint8 array and return it.

    `array` is (height, width, 3) for rgb8/bgr8 (channel order as `encoding` says) and
    (height, width) or (height, width, 1) for mono8. `msg` defaults to a new
    sensor_msgs/Image; its header is left as is, for the caller to stamp.
    """
    if encoding not in CHANNELS:
        raise ValueError(f'image encoding {encoding!r} is not supported; use one of '
                         f'{sorted(CHANNELS)}')
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f'{encoding} images are uint8, got {array.dtype}')
    channels = CHANNELS[encoding]
    if channels == 1 and array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    expected = 2 if channels == 1 else 3
    if array.ndim != expected or (channels == 3 and array.shape[2] != 3):
        shape = '(height, width)' if channels == 1 else '(height, width, 3)'
        raise ValueError(f'{encoding} needs a {shape} array, got shape {array.shape}')
    if msg is None:
        from sensor_msgs.msg import Image  # here, so the receive side needs no ROS package
        msg = Image()
    msg.height, msg.width = int(array.shape[0]), int(array.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = msg.width * channels
    msg.data = array.tobytes()  # C order, so rows are packed with no padding
    return msg
