"""Simulated ALOHA bimanual robot (gym-aloha's MuJoCo scenes), stepped and rendered fast.

gym-aloha as shipped renders three 480x640 cameras with MSAA and shadows on every step
(5-7 steps/s here). This environment loads the same scene files with MuJoCo directly, steps
the physics itself at gym-aloha's 50 Hz control rate, and renders only the cameras in use,
at a small size, without MSAA or shadows (~100-190 steps/s here).

Actions are gym-aloha's: 14 absolute joint targets, per arm 6 joint angles (rad) and a
gripper opening 0..1 (its declared Box(-1, 1) action space is wrong). Observations: the
14-D joint state, joint velocities, 1-3 camera images, the instruction, and a privileged
state (object poses, gripper positions, contacts) for the scripted expert and operator only.

Success predicates:
    transfer_cube  strict: the cube touches the LEFT fingers, not the right ones, not the
                   table, and is lifted (gym-aloha's reward 4 already fires when the left
                   finger touches a cube the right gripper still holds)
    insertion      the peg touches the pin inside the socket (gym-aloha's reward 4)
held for `success_hold_steps` consecutive control steps.

A diverging simulation (MuJoCo's bad qpos/qvel/qacc warnings, or non-finite state) ends the
episode as a failed, truncated one instead of raising: dm_control's PhysicsError case.
The object poses are sampled from a seed by this class (no module-global state), so one
process may hold several environments, but mujoco's GL context is per process: run
parallel rollouts as one environment per process.
"""

from dataclasses import dataclass, field
from pathlib import Path
import time

import mujoco
import numpy as np

DT = 0.02                      # control period (50 Hz), as gym-aloha
START_ARM_POSE = np.array([0.0, -0.96, 1.16, 0.0, -0.3, 0.0, 0.02239, -0.02239,
                           0.0, -0.96, 1.16, 0.0, -0.3, 0.0, 0.02239, -0.02239])
PUPPET_GRIPPER_OPEN = 0.05800  # finger joint position (m) at normalised opening 1
PUPPET_GRIPPER_CLOSE = 0.01844
CAMERAS = ('top', 'angle', 'front_close', 'left_wrist', 'right_wrist', 'left_pillar',
           'right_pillar')
ARMS = ('left', 'right')
# The task's objects (names of their bodies), in the order of object_state().
TASK_OBJECTS = {'transfer_cube': ('box',), 'insertion': ('peg', 'socket')}
OFF_TABLE_Z = -0.05            # m: an object centre below this has fallen off the table

INSTRUCTIONS = {
    'transfer_cube': 'pick up the red cube with the right arm and hand it over to the left arm',
    'insertion': 'pick up the peg and the socket and insert the peg into the socket',
}
_SCENES = {'transfer_cube': 'bimanual_viperx_transfer_cube.xml',
           'insertion': 'bimanual_viperx_insertion.xml'}


def _quiet_mujoco_warning(message: str) -> None:
    # MuJoCo prints instability warnings to stdout and MUJOCO_LOG.TXT; this environment
    # detects and reports them itself (StepResult.physics_error), so they are not repeated.
    del message


mujoco.set_mju_user_warning(_quiet_mujoco_warning)


def gripper_to_joint(opening: float) -> float:
    """Normalised gripper opening 0..1 -> finger joint position (m)."""
    return opening * (PUPPET_GRIPPER_OPEN - PUPPET_GRIPPER_CLOSE) + PUPPET_GRIPPER_CLOSE


def joint_to_gripper(position: float) -> float:
    """Finger joint position (m) -> normalised gripper opening."""
    return (position - PUPPET_GRIPPER_CLOSE) / (PUPPET_GRIPPER_OPEN - PUPPET_GRIPPER_CLOSE)


def scene_path(task: str) -> Path:
    """Path of gym-aloha's MuJoCo scene file for `task`."""
    import gym_aloha
    if task not in _SCENES:
        raise ValueError(f'unknown task {task!r}; choose one of {sorted(_SCENES)}')
    return Path(gym_aloha.__file__).parent / 'assets' / _SCENES[task]


def sample_object_poses(task: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Object positions (x, y, z) on the table, in gym-aloha's ranges."""
    if task == 'transfer_cube':
        return {'box': rng.uniform([0.0, 0.4, 0.05], [0.2, 0.6, 0.05])}
    return {'peg': rng.uniform([0.1, 0.4, 0.05], [0.2, 0.6, 0.05]),
            'socket': rng.uniform([-0.2, 0.4, 0.05], [-0.1, 0.6, 0.05])}


def policy_observation(observation: dict, track: str) -> dict:
    """Return what a policy sees: object positions (privileged) only on the state track."""
    if track == 'state':
        return {'state': np.concatenate([observation['state'], observation['objects']])}
    if track == 'pixels':
        return {'state': observation['state'], 'images': observation['images'],
                'instruction': observation['instruction']}
    raise ValueError(f"track must be 'state' or 'pixels', got {track!r}")


@dataclass(frozen=True)
class AlohaConfig:
    """Settings of the simulated robot."""

    task: str = 'transfer_cube'
    cameras: list[str] = field(default_factory=lambda: ['angle'])
    image_size: int = 96
    max_steps: int = 300
    success_hold_steps: int = 10
    lift_height: float = 0.08     # m: cube centre above this counts as lifted

    def __post_init__(self) -> None:
        if self.task not in _SCENES:
            raise ValueError(f'unknown task {self.task!r}; choose one of {sorted(_SCENES)}')
        unknown = [c for c in self.cameras if c not in CAMERAS]
        if unknown or len(self.cameras) > 3:
            raise ValueError(f'cameras must be 0-3 of {list(CAMERAS)}, got {self.cameras}')
        if not 16 <= self.image_size <= 480:
            raise ValueError(f'image_size must be in [16, 480], got {self.image_size}')
        if self.max_steps < 1 or self.success_hold_steps < 1:
            raise ValueError('max_steps and success_hold_steps must be >= 1')


@dataclass
class StepResult:
    """What one control step returns."""

    observation: dict
    stage: int            # gym-aloha's staged contact reward 0..4 (diagnostics)
    success: bool         # the strict predicate held for success_hold_steps steps
    truncated: bool       # time limit, or the simulation diverged
    physics_error: bool


class AlohaEnv:
    """One simulated ALOHA scene (one per process for rendering)."""

    def __init__(self, config: AlohaConfig = AlohaConfig()) -> None:
        self.config = config
        self.model = mujoco.MjModel.from_xml_path(str(scene_path(config.task)))
        self.model.vis.quality.offsamples = 0      # no MSAA
        self.data = mujoco.MjData(self.model)
        self.substeps = max(1, round(DT / self.model.opt.timestep))
        self.instruction = INSTRUCTIONS[config.task]
        self._renderer = None
        if config.cameras:
            self._renderer = mujoco.Renderer(self.model, config.image_size, config.image_size)
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        self._geom = {name: mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_GEOM, name)
                      for name in self._geom_names()}
        self._object_joints = [self.model.joint(name) for name in self._object_joint_names()]
        self.steps = 0
        self._held = 0
        self.seed: int | None = None
        self.render_seconds = 0.0  # time spent rendering cameras, for benchmark breakdowns

    def _geom_names(self) -> list[str]:
        names = ['table']
        for arm in ARMS:
            names += [f'vx300s_{arm}/10_left_gripper_finger',
                      f'vx300s_{arm}/10_right_gripper_finger']
        if self.config.task == 'transfer_cube':
            names.append('red_box')
        else:
            names += ['red_peg', 'pin'] + [f'socket-{i}' for i in range(1, 5)]
        return names

    def _object_joint_names(self) -> list[str]:
        if self.config.task == 'transfer_cube':
            return ['red_box_joint']
        return ['red_peg_joint', 'blue_socket_joint']

    # --- episode ---------------------------------------------------------------------------
    def reset(self, seed: int) -> dict:
        """Start an episode with object poses drawn from `seed`; return the observation."""
        self.seed = int(seed)
        rng = np.random.default_rng(self.seed)
        mujoco.mj_resetData(self.model, self.data)
        self.data.qpos[:16] = START_ARM_POSE
        self.data.ctrl[:] = START_ARM_POSE
        for joint, position in zip(self._object_joints, sample_object_poses(
                self.config.task, rng).values(), strict=True):
            address = joint.qposadr[0]
            self.data.qpos[address:address + 7] = [*position, 1.0, 0.0, 0.0, 0.0]
        mujoco.mj_forward(self.model, self.data)
        self.steps = 0
        self._held = 0
        return self.observation()

    def step(self, action: np.ndarray) -> StepResult:
        """Apply 14 joint targets for one control period (DT)."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (14,):
            raise ValueError(f'action must have 14 values (per arm 6 joints + gripper), got '
                             f'shape {action.shape}')
        if not np.all(np.isfinite(action)):
            raise ValueError('action contains NaN or infinite values')
        ctrl = np.empty(16)
        for arm in range(2):
            ctrl[8 * arm:8 * arm + 6] = action[7 * arm:7 * arm + 6]
            finger = gripper_to_joint(float(action[7 * arm + 6]))
            ctrl[8 * arm + 6:8 * arm + 8] = [finger, -finger]
        self.data.ctrl[:] = ctrl
        warnings_before = self._instability_warnings()
        for _ in range(self.substeps):
            mujoco.mj_step(self.model, self.data)
        self.steps += 1
        # MuJoCo resets the state itself after a bad qpos/qvel/qacc and only warns.
        diverged = (self._instability_warnings() > warnings_before
                    or not np.all(np.isfinite(self.data.qpos)))
        if diverged:
            return StepResult(self.observation(render=False), 0, False, True, True)
        stage, strict = self._stage_and_success()
        self._held = self._held + 1 if strict else 0
        success = self._held >= self.config.success_hold_steps
        # An object knocked off the table cannot be recovered: end the episode as a failure.
        truncated = not success and (self.steps >= self.config.max_steps
                                     or self.object_state().reshape(-1, 3)[:, 2].min()
                                     < OFF_TABLE_Z)
        return StepResult(self.observation(), stage, success, truncated, False)

    def _instability_warnings(self) -> int:
        return sum(int(self.data.warning[w].number) for w in (
            mujoco.mjtWarning.mjWARN_BADQPOS, mujoco.mjtWarning.mjWARN_BADQVEL,
            mujoco.mjtWarning.mjWARN_BADQACC))

    # --- observations ----------------------------------------------------------------------
    def joint_state(self) -> np.ndarray:
        """14 values: per arm 6 joint angles (rad) and the gripper opening 0..1."""
        q = self.data.qpos
        return np.array([*q[0:6], joint_to_gripper(q[6]), *q[8:14], joint_to_gripper(q[14])],
                        dtype=np.float32)

    def joint_velocity(self) -> np.ndarray:
        v = self.data.qvel
        scale = PUPPET_GRIPPER_OPEN - PUPPET_GRIPPER_CLOSE
        return np.array([*v[0:6], v[6] / scale, *v[8:14], v[14] / scale], dtype=np.float32)

    def render(self) -> np.ndarray:
        """Images of the configured cameras, (V, S, S, 3) uint8."""
        if self._renderer is None:
            return np.zeros((0, self.config.image_size, self.config.image_size, 3), np.uint8)
        frames = []
        for camera in self.config.cameras:
            self._renderer.update_scene(self.data, camera=camera)
            frames.append(self._renderer.render())
        return np.stack(frames)

    def observation(self, render: bool = True) -> dict:
        if render:
            start = time.perf_counter()
            images = self.render()
            self.render_seconds += time.perf_counter() - start
        else:
            images = np.zeros((len(self.config.cameras), self.config.image_size,
                               self.config.image_size, 3), np.uint8)
        return {'state': self.joint_state(), 'velocity': self.joint_velocity(),
                'objects': self.object_state(), 'images': images,
                'instruction': self.instruction}

    def object_state(self) -> np.ndarray:
        """Positions of the task's objects (3 per object), for the low-dimensional track."""
        return np.concatenate([self.object_position(n) for n in TASK_OBJECTS[self.config.task]]
                              ).astype(np.float32)

    # --- privileged state (scripted expert and operator only) ------------------------------
    def contacts(self) -> set[tuple[int, int]]:
        pairs = set()
        for i in range(self.data.ncon):
            contact = self.data.contact[i]
            pairs.add((min(contact.geom1, contact.geom2), max(contact.geom1, contact.geom2)))
        return pairs

    def touching(self, a: str, b: str, pairs: set | None = None) -> bool:
        pairs = self.contacts() if pairs is None else pairs
        ga, gb = self._geom[a], self._geom[b]
        return (min(ga, gb), max(ga, gb)) in pairs

    def _fingers(self, arm: str) -> list[str]:
        return [f'vx300s_{arm}/10_left_gripper_finger', f'vx300s_{arm}/10_right_gripper_finger']

    def _stage_and_success(self) -> tuple[int, bool]:
        pairs = self.contacts()
        touch = lambda a, b: self.touching(a, b, pairs)  # noqa: E731
        if self.config.task == 'transfer_cube':
            left = any(touch('red_box', f) for f in self._fingers('left'))
            right = any(touch('red_box', f) for f in self._fingers('right'))
            on_table = touch('red_box', 'table')
            stage = 0
            if right:
                stage = 1
            if right and not on_table:
                stage = 2
            if left:
                stage = 3
            if left and not on_table:
                stage = 4
            lifted = self.object_position('box')[2] > self.config.lift_height
            return stage, left and not right and not on_table and lifted
        sockets = [f'socket-{i}' for i in range(1, 5)]
        left = any(touch(s, f) for s in sockets for f in self._fingers('left'))
        right = any(touch('red_peg', f) for f in self._fingers('right'))
        peg_table = touch('red_peg', 'table')
        socket_table = any(touch(s, 'table') for s in sockets)
        stage = 0
        if left and right:
            stage = 1
        if left and right and not peg_table and not socket_table:
            stage = 2
        if any(touch('red_peg', s) for s in sockets) and not peg_table and not socket_table:
            stage = 3
        pin = touch('red_peg', 'pin')
        if pin:
            stage = 4
        return stage, pin

    def object_position(self, name: str) -> np.ndarray:
        """World position of 'box', 'peg' or 'socket'."""
        return self.data.body(name).xpos.copy()

    def privileged(self) -> dict:
        """Object poses, gripper (site) positions and contact flags."""
        state = {'step': self.steps}
        for name in TASK_OBJECTS[self.config.task]:
            state[f'{name}_pos'] = self.object_position(name)
            state[f'{name}_quat'] = self.data.body(name).xquat.copy()
        for arm in ARMS:
            state[f'{arm}_gripper_pos'] = self.data.body(f'vx300s_{arm}/gripper_link').xpos.copy()
        stage, strict = self._stage_and_success()
        state['stage'] = stage
        state['strict_success'] = strict
        return state

    def close(self) -> None:
        """Free the GL renderer (avoids EGL noise at interpreter exit)."""
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
