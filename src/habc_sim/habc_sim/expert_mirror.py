"""A kinematic mirror of the simulated scene, set from what the robot publishes (no rclpy).

The scripted expert plans in Cartesian space and solves IK on a MuJoCo model: it needs the
gripper poses and the object positions of the robot it drives. Across ROS it cannot read the
simulator's memory, so the scripted operator keeps its own copy of the scene: the arm joints
from `joint_states` (gripper openings mapped back to finger positions), the objects and the
task progress from `sim/privileged`. Forward kinematics then gives the same gripper poses the
simulator has, and the unmodified ScriptedExpert runs on this mirror as on an AlohaEnv.
"""

from collections.abc import Mapping, Sequence

import mujoco
import numpy as np

from habc_sim.aloha import AlohaConfig, AlohaEnv, ARMS, gripper_to_joint, TASK_OBJECTS

_IDENTITY_QUAT = (1.0, 0.0, 0.0, 0.0)


class ExpertMirror:
    """The attributes ScriptedExpert uses (model, data, config, steps, privileged(), ...)."""

    def __init__(self, task: str) -> None:
        # The same scene, without cameras: no renderer, so any thread may use it.
        self._env = AlohaEnv(AlohaConfig(task=task, cameras=[]))
        self._env.reset(0)
        self.model = self._env.model
        self.data = self._env.data
        self.config = self._env.config
        self.task = task
        self.objects = TASK_OBJECTS[task]
        # qpos address of each object's free joint: position (3) then quaternion (4).
        self._object_qpos = {
            name: int(self.model.jnt_qposadr[self.model.body_jntadr[self.model.body(name).id]])
            for name in self.objects}
        self.steps = 0
        self.stage = 0
        self.strict_success = False

    def update(self, joints: Sequence[float], objects: Mapping[str, Sequence[float]],
               step: int, stage: int = 0, strict_success: bool = False,
               quats: Mapping[str, Sequence[float]] | None = None) -> None:
        """Set the mirror to one published robot tick.

        Args:
            joints: the 14 joint_states positions in ALOHA order (per arm 6 angles in rad
                and the gripper opening 0..1).
            objects: object name -> world position (m), as sim/privileged sends them.
            step: the robot's control step since its reset (the expert's clock).
            stage, strict_success: task progress from sim/privileged (contacts cannot be
                mirrored faithfully, so they are taken as reported).
            quats: object name -> orientation (w, x, y, z); identity where missing.
        """
        joints = np.asarray(joints, dtype=np.float64).reshape(-1)
        if joints.size != 14:
            raise ValueError(f'joint state has {joints.size} values, expected 14')
        missing = [name for name in self.objects if name not in objects]
        if missing:
            raise ValueError(f'object positions missing for {missing} (task {self.task})')
        qpos = self.data.qpos
        for arm in range(len(ARMS)):
            qpos[8 * arm:8 * arm + 6] = joints[7 * arm:7 * arm + 6]
            finger = gripper_to_joint(float(joints[7 * arm + 6]))
            qpos[8 * arm + 6:8 * arm + 8] = (finger, -finger)   # the fingers move mirrored
        quats = quats or {}
        for name, address in self._object_qpos.items():
            qpos[address:address + 3] = objects[name]
            qpos[address + 3:address + 7] = quats.get(name, _IDENTITY_QUAT)
        # Kinematics only: body poses is all the expert reads from `data`.
        mujoco.mj_kinematics(self.model, self.data)
        self.steps = int(step)
        self.stage = int(stage)
        self.strict_success = bool(strict_success)

    def update_from_privileged(self, joints: Sequence[float], privileged: Mapping) -> None:
        """Set the mirror from joint positions and a decoded sim/privileged message."""
        self.update(joints, privileged['objects'], privileged['step'],
                    privileged.get('stage', 0), privileged.get('strict_success', False),
                    privileged.get('quats'))

    # --- what ScriptedExpert and ScriptedOperator read, as AlohaEnv provides it -------------
    def object_position(self, name: str) -> np.ndarray:
        """World position of 'box', 'peg' or 'socket'."""
        return self._env.object_position(name)

    def joint_state(self) -> np.ndarray:
        """14 values: per arm 6 joint angles (rad) and the gripper opening 0..1."""
        return self._env.joint_state()

    def privileged(self) -> dict:
        """Return AlohaEnv.privileged()'s keys, with stage and success as the robot reported."""
        state = {'step': self.steps}
        for name in self.objects:
            state[f'{name}_pos'] = self.object_position(name)
            state[f'{name}_quat'] = self.data.body(name).xquat.copy()
        for arm in ARMS:
            state[f'{arm}_gripper_pos'] = self.data.body(f'vx300s_{arm}/gripper_link').xpos.copy()
        state['stage'] = self.stage
        state['strict_success'] = self.strict_success
        return state

    def close(self) -> None:
        self._env.close()
