"""Field-by-field equality of rosbags messages, for the tests of our fast readers."""

import numpy as np


def same_message(a: object, b: object) -> None:
    """Assert two rosbags messages hold equal fields.

    Arrays compare by value and dtype, scalars by type and value; nested messages and lists
    of them recursively.
    """
    assert type(a) is type(b)
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), name
        elif isinstance(x, list) and x and hasattr(x[0], '__dataclass_fields__'):
            assert len(x) == len(y)
            for u, v in zip(x, y, strict=True):
                same_message(u, v)
        elif hasattr(x, '__dataclass_fields__'):
            same_message(x, y)
        else:
            assert type(x) is type(y) and x == y, name
