"""Scripted experts for the ALOHA tasks: waypoints in Cartesian space, closed-loop IK.

The plan follows ACT's scripted policies (grasp poses tilted down, a meeting point
above the table), but instead of mocap bodies (whose route fails under MuJoCo 3.x)
each control step solves damped-least-squares inverse kinematics for both arms from the
MEASURED joint state to the interpolated waypoint, and commands the resulting joint
targets. Insertion re-aims the peg at the socket's measured position while the arms meet
and slides it along the socket's axis onto the pin ("live alignment"). Noise knobs make
imperfect demonstrations: a per-episode offset of the grasp and meeting points (m) and
per-step joint target noise (rad).
"""

from dataclasses import dataclass, replace

import mujoco
import numpy as np

from habc_sim.aloha import AlohaEnv, policy_observation

ROLL_PULL = 0.05                           # weight of the forearm roll's pull home (ArmIK)
GRASP_OFFSET = np.array([0.1, 0.0, 0.0])   # between the finger pads, gripper_link frame
# Orientations of the gripper_link frames (columns: x = approach, y = finger axis, z).
LEFT_HOME = np.eye(3)
RIGHT_HOME = np.diag([-1.0, -1.0, 1.0])
TABLE_TOP = 0.0                            # world z of the table's surface


def rot_x(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def rot_y(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    return np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])


@dataclass(frozen=True)
class Waypoint:
    """Where one gripper should be at control step t."""

    t: int
    position: np.ndarray      # grasp point, world frame (m), or offset from `track`
    rotation: np.ndarray      # gripper_link orientation, world frame
    gripper: float            # opening 0..1
    track: str | None = None  # object whose MEASURED position `position` is relative to


def _quat(matrix: np.ndarray) -> np.ndarray:
    q = np.empty(4)
    mujoco.mju_mat2Quat(q, np.asarray(matrix, dtype=np.float64).ravel())
    return q


def _slerp(q0: np.ndarray, q1: np.ndarray, s: float) -> np.ndarray:
    dot = float(np.dot(q0, q1))
    if dot < 0.0:
        q1, dot = -q1, -dot
    if dot > 0.9995:
        q = q0 + s * (q1 - q0)
        return q / np.linalg.norm(q)
    theta = np.arccos(dot)
    return (np.sin((1 - s) * theta) * q0 + np.sin(s * theta) * q1) / np.sin(theta)


def interpolate(waypoints: list[Waypoint], t: float,
                objects: dict[str, np.ndarray] | None = None
                ) -> tuple[np.ndarray, np.ndarray, float]:
    """Position, rotation and gripper at time t (linear / slerp between waypoints).

    Waypoints that `track` an object are resolved against its measured position in
    `objects` first, so the plan follows an object that moved (closed loop).
    """
    def where(w: Waypoint) -> np.ndarray:
        return w.position + objects[w.track] if w.track else w.position

    if t <= waypoints[0].t:
        w = waypoints[0]
        return where(w), w.rotation, w.gripper
    for a, b in zip(waypoints[:-1], waypoints[1:], strict=True):
        if a.t <= t <= b.t:
            s = (t - a.t) / max(b.t - a.t, 1e-9)
            quat = _slerp(_quat(a.rotation), _quat(b.rotation), s)
            rotation = np.empty(9)
            mujoco.mju_quat2Mat(rotation, quat)
            return ((1 - s) * where(a) + s * where(b), rotation.reshape(3, 3),
                    (1 - s) * a.gripper + s * b.gripper)
    w = waypoints[-1]
    return where(w), w.rotation, w.gripper


class ArmIK:
    """Damped-least-squares IK of one arm's 6 joints for the grasp point's pose."""

    def __init__(self, model: mujoco.MjModel, arm: str) -> None:
        self.model = model
        self.scratch = mujoco.MjData(model)
        names = ['waist', 'shoulder', 'elbow', 'forearm_roll', 'wrist_angle', 'wrist_rotate']
        joints = [model.joint(f'vx300s_{arm}/{n}') for n in names]
        self.qpos_index = np.array([j.qposadr[0] for j in joints])
        self.dof_index = np.array([j.dofadr[0] for j in joints])
        self.lower = np.array([j.range[0] for j in joints])
        self.upper = np.array([j.range[1] for j in joints])
        # The arm can reach the same gripper orientation with a half turn of both rolls
        # (forearm -pi, wrist +pi): solutions then flip between episodes, which makes
        # demonstrations needlessly multimodal for a policy to imitate. A weak pull of the
        # forearm roll toward home (an extra least-squares row) keeps the solver on one
        # branch; the wrist roll stays free for the grasp orientations.
        self.roll_pull = np.zeros((1, 6))
        self.roll_pull[0, 3] = ROLL_PULL
        self.body = model.body(f'vx300s_{arm}/gripper_link').id

    def solve(self, qpos: np.ndarray, position: np.ndarray, rotation: np.ndarray,
              iterations: int = 15, damping: float = 0.05,
              rotation_weight: float = 0.3) -> np.ndarray:
        """Joint angles (6) that bring the grasp point to `position` with `rotation`."""
        data = self.scratch
        data.qpos[:] = qpos
        q = qpos[self.qpos_index].copy()
        jacp = np.zeros((3, self.model.nv))
        jacr = np.zeros((3, self.model.nv))
        for _ in range(iterations):
            data.qpos[self.qpos_index] = q
            mujoco.mj_kinematics(self.model, data)
            mujoco.mj_comPos(self.model, data)
            frame = data.xmat[self.body].reshape(3, 3)
            point = data.xpos[self.body] + frame @ GRASP_OFFSET
            error_p = position - point
            error_r = 0.5 * sum(np.cross(frame[:, i], rotation[:, i]) for i in range(3))
            if np.linalg.norm(error_p) < 1e-4 and np.linalg.norm(error_r) < 1e-3:
                break
            mujoco.mj_jac(self.model, data, jacp, jacr, point, self.body)
            jac = np.vstack([jacp[:, self.dof_index], rotation_weight * jacr[:, self.dof_index],
                             self.roll_pull])
            error = np.concatenate([error_p, rotation_weight * error_r,
                                    -self.roll_pull @ q])
            step = jac.T @ np.linalg.solve(jac @ jac.T + damping ** 2 * np.eye(7), error)
            q = np.clip(q + step, self.lower, self.upper)
        return q


@dataclass(frozen=True)
class ExpertConfig:
    """Noise knobs of the scripted expert (all zero: the clean expert)."""

    waypoint_noise: float = 0.0   # m, per-episode offset of grasp and meeting points
    action_noise: float = 0.0     # rad, per-step noise on the joint targets
    slowdown: float = 1.0         # >1 stretches the timeline (slower demonstrations)


class ScriptedExpert:
    """Plans waypoints from the privileged start state, then tracks them with IK."""

    def __init__(self, env: AlohaEnv, config: ExpertConfig = ExpertConfig(),
                 seed: int = 0) -> None:
        self.env = env
        self.config = config
        self.rng = np.random.default_rng(seed)
        self.ik = {arm: ArmIK(env.model, arm) for arm in ('left', 'right')}
        self.plan: dict[str, list[Waypoint]] = {}
        self._objects = (['box'] if env.config.task == 'transfer_cube'
                         else ['peg', 'socket'])

    def reset(self) -> None:
        """Plan the episode from the object poses the environment was reset to."""
        self._plan(start_step=0)

    def replan(self) -> None:
        """Plan again from the current state: a takeover in the middle of an episode.

        The plan starts from where the grippers are now; phases already done (the object
        in the right gripper, lifted; both insertion objects held) are skipped, and an
        object already handed over is simply held.
        """
        self._plan(start_step=self.env.steps)

    def _plan(self, start_step: int) -> None:
        self.t0 = start_step
        state = self.env.privileged()
        offset = lambda: self.rng.normal(0.0, self.config.waypoint_noise, 3)  # noqa: E731
        k = self.config.slowdown
        data = self.env.data
        home = {arm: data.body(f'vx300s_{arm}/gripper_link') for arm in ('left', 'right')}
        start = {arm: (home[arm].xpos + home[arm].xmat.reshape(3, 3) @ GRASP_OFFSET,
                       home[arm].xmat.reshape(3, 3).copy()) for arm in home}
        def wp(t: float, p, r: np.ndarray, g: float, track: str | None = None) -> Waypoint:
            return Waypoint(int(round(t * k)), np.asarray(p, float), r, g, track)

        if self.env.config.task == 'transfer_cube':
            box = state['box_pos'] + offset()
            meet = np.array([0.0, 0.5, 0.25]) + offset()
            pick = rot_y(-60) @ RIGHT_HOME
            meet_left = LEFT_HOME @ rot_x(90)
            self.plan['right'] = [
                wp(0, *start['right'], 1.0),
                wp(50, box + [0, 0, 0.08], pick, 1.0),
                wp(75, box + [0, 0, 0.0], pick, 1.0),
                wp(90, box + [0, 0, 0.0], pick, 0.0),
                wp(125, meet + [0.05, 0, 0], pick, 0.0),
                wp(140, meet, pick, 0.0),
                wp(185, meet, pick, 0.0),
                wp(200, meet, pick, 1.0),
                wp(230, meet + [0.12, 0, 0], pick, 1.0),
            ]
            grab = offset() * 0.5 + [-0.012, 0, 0]
            self.plan['left'] = [
                wp(0, *start['left'], 1.0),
                wp(70, meet + [-0.12, 0, 0], meet_left, 1.0),
                wp(145, [-0.12, 0, 0], meet_left, 1.0, track='box'),
                wp(170, grab, meet_left, 1.0, track='box'),
                wp(185, grab, meet_left, 0.0, track='box'),
                wp(230, meet + [-0.10, 0, 0.02], meet_left, 0.0),
            ]
        else:
            # The scene drops both objects onto the table at reset: plan from where they rest.
            peg = self._resting('peg') + offset()
            socket = self._resting('socket') + offset()
            meet = np.array([0.0, 0.5, 0.15]) + offset()
            # The right gripper takes the 2 cm high peg nearly level (25 degrees down) and by
            # its outer half, fingertips 3 mm above the table: the fingers' lower edges then
            # lie along the peg and hold it level, and 5 cm of it stick out past the
            # fingertips to go into the socket. (Tilted 60 degrees, as in ACT, only the
            # fingertips reach the peg: it pivots in them and drops.) The socket, 4.4 cm high,
            # is taken as in ACT, the fingertips pressed onto the table (aimed below it): that
            # held it best against pushes and joint noise.
            pick_right = rot_y(-25) @ RIGHT_HOME
            pick_left = rot_y(60) @ LEFT_HOME
            peg_grasp = peg + [0.045, 0, 0.022]
            socket_grasp = socket + [0, 0, 0.008]
            self.plan['right'] = [
                wp(0, *start['right'], 1.0),
                wp(50, peg_grasp + [0, 0, 0.08], pick_right, 1.0),
                wp(75, peg_grasp, pick_right, 1.0),
                wp(90, peg_grasp, pick_right, 0.0),
                wp(100, peg_grasp, pick_right, 0.0),                 # the grip settles
                wp(125, peg_grasp + [0, 0, 0.05], pick_right, 0.0),  # straight up first
                wp(145, meet + [0.18, 0, 0], pick_right, 0.0),
            ]
            self.plan['left'] = [
                wp(0, *start['left'], 1.0),
                wp(50, socket_grasp + [0, 0, 0.08], pick_left, 1.0),
                wp(75, socket_grasp, pick_left, 1.0),
                wp(90, socket_grasp, pick_left, 0.0),
                wp(100, socket_grasp, pick_left, 0.0),
                wp(125, socket_grasp + [0, 0, 0.05], pick_left, 0.0),
                wp(145, meet + [-0.10, 0, 0], pick_left, 0.0),
            ]
            # From then on the right arm follows a plan for the peg centre's offset from the
            # measured socket along x, the socket's axis (see _aim_peg). The peg touches the
            # pin at 10 cm: lined up at 16 cm (its tip 4 cm from the opening), fast to 1 cm
            # short of the pin, then slowly to 1.5 cm past it, so that the peg stays pressed
            # on the pin while it slides back in the fingers.
            self._peg_stages = [(int(round(t * k)), dx)
                                for t, dx in ((175, 0.16), (195, 0.11), (225, 0.085))]
            self._align_from = int(round(145 * k))
            self.peg_plan = None
            self._peg_offset = None
        if start_step:
            self._skip_done_phases(state, start, k)

    def _skip_done_phases(self, state: dict, start: dict, k: float) -> None:
        """Cut the plan for a mid-episode takeover according to what is already done."""
        def skip(plan: list[Waypoint], cut: float, shift: float, arm: str) -> list[Waypoint]:
            kept = [replace(w, t=w.t - int(round(shift * k))) for w in plan
                    if w.t >= int(round(cut * k))]
            return [Waypoint(0, *start[arm], plan[0].gripper)] + kept

        opening = self.env.joint_state()[[6, 13]]
        stage = state['stage']
        if self.env.config.task == 'transfer_cube':
            if stage == 4:    # already handed over: hold it where it is
                for index, arm in enumerate(('left', 'right')):
                    self.plan[arm] = [Waypoint(0, *start[arm], float(opening[index]))]
            elif stage == 2:  # in the right gripper, lifted: go straight to the handover
                self.plan['right'] = skip(self.plan['right'], 125, 95, 'right')
                self.plan['left'] = skip(self.plan['left'], 145, 95, 'left')
                self.plan['right'][0] = replace(self.plan['right'][0], gripper=0.0)
        elif stage >= 2:      # both objects held: go straight to the meeting point
            for arm in ('left', 'right'):
                self.plan[arm] = skip(self.plan[arm], 145, 115, arm)
                self.plan[arm][0] = replace(self.plan[arm][0], gripper=0.0)
            self._align_from -= int(round(115 * k))
            self._peg_stages = [(t - int(round(115 * k)), dx) for t, dx in self._peg_stages]

    def act(self) -> np.ndarray:
        """Return the 14 joint targets for this step (closed loop on the measured state)."""
        t = self.env.steps - self.t0
        qpos = self.env.data.qpos.copy()
        objects = {name: self.env.object_position(name) for name in self._objects}
        action = np.empty(14)
        for index, arm in enumerate(('left', 'right')):
            position, rotation, gripper = interpolate(self.plan[arm], t, objects)
            if arm == 'right' and self.env.config.task == 'insertion' and t >= self._align_from:
                position = self._aim_peg(t)     # rotation and gripper stay the plan's
            joints = self.ik[arm].solve(qpos, position, rotation)
            if self.config.action_noise:
                joints = joints + self.rng.normal(0.0, self.config.action_noise, 6)
            action[7 * index:7 * index + 6] = joints
            action[7 * index + 6] = gripper
        return action

    def _aim_peg(self, t: int) -> np.ndarray:
        """Live alignment: where the right grasp point goes to put the peg on its plan.

        The plan is the peg centre's position relative to the measured socket, starting
        from where it is when alignment starts; the measured grasp offset (grasp point -
        peg centre) maps it to the grasp point, so a peg that sits shifted in the fingers
        is still aimed along the socket's axis. Along the axis the offset stops following
        the peg once it is lined up: pushed onto the pin the peg slides back in the
        fingers, and following it would push on without end. A jump in the offset (a
        dropped peg) is ignored rather than chased.
        """
        peg, socket = self.env.object_position('peg'), self.env.object_position('socket')
        offset = self._grasp_point('right') - peg
        if self.peg_plan is None:
            # Only the positions of these waypoints are used (the gripper keeps its pose).
            self.peg_plan = [Waypoint(t, peg - socket, np.eye(3), 0.0)] + [
                Waypoint(t_, np.array([dx, 0.0, 0.0]), np.eye(3), 0.0)
                for t_, dx in self._peg_stages]
            self._peg_offset = offset
        elif np.linalg.norm(offset - self._peg_offset) < 0.03:
            if t > self._peg_stages[0][0]:
                offset[0] = self._peg_offset[0]
            self._peg_offset = offset
        return socket + interpolate(self.peg_plan, t)[0] + self._peg_offset

    def _resting(self, name: str) -> np.ndarray:
        """Where object `name` comes to rest on the table.

        The scene spawns the objects unrotated 4 cm above the table; each drops straight
        down until the bottom of its lowest box geom is on the table.
        """
        body = self.env.model.body(name)
        geoms = range(body.geomadr[0], body.geomadr[0] + body.geomnum[0])
        bottom = min(self.env.model.geom_pos[g][2] - self.env.model.geom_size[g][2]
                     for g in geoms)
        return np.array([*self.env.object_position(name)[:2], TABLE_TOP - bottom])

    def _grasp_point(self, arm: str) -> np.ndarray:
        body = self.env.data.body(f'vx300s_{arm}/gripper_link')
        return body.xpos + body.xmat.reshape(3, 3) @ GRASP_OFFSET


def run_expert_episode(env: AlohaEnv, seed: int, config: ExpertConfig = ExpertConfig(),
                       record_track: str | None = None) -> dict:
    """Roll out the expert from `seed`; return success and steps.

    With `record_track` ('state' or 'pixels') the episode's actions and what a policy on
    that track would have observed are returned too (demonstrations), with the objects'
    true positions per step ('objects': labels for the pixel track's object locator).
    """
    observation = env.reset(seed)
    expert = ScriptedExpert(env, config, seed)
    expert.reset()
    observations: dict[str, list] = {}
    actions, objects = [], []
    while True:
        action = expert.act()
        if record_track:
            for key, value in policy_observation(observation, record_track).items():
                if key != 'instruction':
                    observations.setdefault(key, []).append(np.asarray(value))
            actions.append(action.astype(np.float32))
            objects.append(np.asarray(observation['objects'], dtype=np.float32))
        result = env.step(action)
        observation = result.observation
        if result.success or result.truncated:
            break
    episode = {'success': bool(result.success), 'steps': env.steps,
               'physics_error': result.physics_error, 'seed': seed}
    if record_track:
        episode.update(actions=np.stack(actions), objects=np.stack(objects),
                       observations={k: np.stack(v) for k, v in observations.items()})
    return episode
