"""Whether a policy checkpoint fits the robot it is about to drive.

One check for every way weights arrive (the policy node's checkpoint parameter, a
PolicyUpdate, weights_uri, `habc train --init`): the state and action sizes, the camera
count, and the camera images' shape. A checkpoint that does not fit would load and then fail
on every observation (or worse, run on distorted images), so it is refused with both sides
named.

Image shape: a checkpoint may state the (H, W) of the camera images it was trained on
(`image_shape` of a LeRobot config; `camera_shape` of habc's own policies, recorded by
`habc train` and `habc demo`). The robot's camera fits when it has the same aspect ratio:
the runtime then scales its images to the checkpoint's input size, as the checkpoint's own
preprocessing did. A different aspect ratio would stretch every image, and is refused.
A checkpoint that states no camera shape takes any camera (resized to its square input).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Relative aspect-ratio difference below which a camera counts as the same shape scaled
# (480 x 640 and 96 x 128 are equal; 480 x 640 and 96 x 96 are not). Rounding a resolution
# to whole pixels moves the ratio by well under 1%.
ASPECT_TOLERANCE = 0.01


@dataclass(frozen=True)
class RobotInterface:
    """What a robot offers a policy, as far as it is known.

    Attributes:
        state_dim: numbers in its state (joint positions); None when not known yet.
        action_dim: numbers in each command; None when not known yet.
        sizes_from: where those numbers come from, for messages.
        image_shapes: (H, W) of each camera's images, in the policy's view order; None when
            no observation has been seen yet.
    """

    state_dim: int | None = None
    action_dim: int | None = None
    sizes_from: str = ''
    image_shapes: tuple[tuple[int, int], ...] | None = None


def trained_camera_shape(config: Any) -> tuple[int, int] | None:
    """Return the (H, W) camera images a policy config was trained on, None when unstated."""
    shape = getattr(config, 'camera_shape', None) or getattr(config, 'image_shape', None)
    return (int(shape[0]), int(shape[1])) if shape else None


def check_camera_shape(shape: Sequence[int], owner: str) -> None:
    """Raise ValueError unless `shape` is [] or [H, W] with positive sizes (configs call it)."""
    if len(shape) not in (0, 2) or any(int(size) < 1 for size in shape):
        raise ValueError(f'{owner}.camera_shape must be [] or [height, width] in pixels, got '
                         f'{list(shape)}')


def fit_problems(config: Any, robot: RobotInterface) -> list[str]:
    """Return what does not fit between a policy config and the robot, one line each.

    Every field is checked at once, so that one message lists all that must change.
    """
    problems = []
    for name in ('state_dim', 'action_dim'):
        own, robots = getattr(config, name, None), getattr(robot, name)
        if own is not None and robots is not None and own != robots:
            where = f' {robot.sizes_from}' if robot.sizes_from else ''
            problems.append(f'{name}: the checkpoint has {own}, the robot {robots}{where}')
    views = getattr(config, 'num_views', None)
    if views is None or robot.image_shapes is None:
        return problems
    if views != len(robot.image_shapes):
        problems.append(f'num_views: the checkpoint has {views}, the robot '
                        f'{len(robot.image_shapes)} camera images in its observations')
    trained = trained_camera_shape(config)
    if trained is not None:
        for index, shape in enumerate(robot.image_shapes[:views]):
            if not same_aspect(trained, shape):
                problems.append(
                    f'image size (H, W) of camera {index}: the checkpoint was trained on '
                    f'{_describe(trained)}, the robot sends {_describe(shape)}; scaling '
                    'cannot make one into the other without stretching: set the camera to '
                    f'{trained[0]} x {trained[1]} or another size with its aspect ratio')
    return problems


def check_fit(config: Any, robot: RobotInterface, source: str = 'the checkpoint') -> None:
    """Raise ValueError naming both sides when a policy config does not fit the robot."""
    problems = fit_problems(config, robot)
    if problems:
        cameras = getattr(config, 'camera_names', None)
        hint = f' (its cameras, in order: {list(cameras)})' if cameras else ''
        raise ValueError(f'{source} does not fit the robot{hint}: ' + '; '.join(problems))


def same_aspect(a: Sequence[int], b: Sequence[int]) -> bool:
    """Return whether two (H, W) shapes have one aspect ratio (up to ASPECT_TOLERANCE)."""
    ratio_a, ratio_b = a[0] / a[1], b[0] / b[1]
    return abs(ratio_a - ratio_b) <= ASPECT_TOLERANCE * ratio_a


def _describe(shape: Sequence[int]) -> str:
    return f'{shape[0]} x {shape[1]} (H/W {shape[0] / shape[1]:.2f})'
