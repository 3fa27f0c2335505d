"""The offline episode runner: synchronous chunks, and the loop's timing with a chunk delay."""

import numpy as np
import pytest

from habc_episodes.vocabulary import Controller
from habc_sim.aloha import AlohaConfig, AlohaEnv
from habc_sim.runner import DelayedChunks, run_policy_episode, RunnerConfig


def _chunks():
    """Return an inference function whose chunk c holds actions 100 * c + i (one value per row)."""
    calls = []

    def infer() -> np.ndarray:
        calls.append(len(calls))
        return 100.0 * (len(calls) - 1) + np.arange(6, dtype=np.float64)[:, None]

    return infer, calls


def test_delayed_chunks_follow_the_policy_nodes_timing():
    # k = 4 executed actions per chunk, chunks land 2 steps after their observation, a new
    # inference starts when fewer than 2 queued actions lie ahead. Worked by hand:
    #   step 0: infer C0 (lands at 2), hold   step 1: hold
    #   step 2: C0 lands, C0[0..1] stale; C0[2]   step 3: infer C1 (lands at 5); C0[3]
    #   step 4: hold   step 5: C1[0..1] stale; C1[2]   step 6: infer C2; C1[3]   step 7: hold
    infer, calls = _chunks()
    chunks = DelayedChunks(execute_steps=4, delay=2, min_remaining=2, latency_trigger=False)
    got = [chunks.action(step, infer) for step in range(8)]
    values = [None if a is None else int(a[0]) for a in got]
    assert values == [None, None, 2, 3, None, 102, 103, None]
    assert len(calls) == 3
    assert chunks.stale_dropped == 4 and chunks.hold_steps == 4


def test_a_new_chunk_replaces_the_queued_remainder_from_its_first_due_step():
    # k = 4, delay 1, infer below 3 ahead. step 0: infer C0, hold; 1: C0 lands (C0[0] stale),
    # C0[1]; 2: 2 ahead, infer C1 (observed 2); C0[2]; 3: C1 lands and replaces C0[3] by C1[1],
    # its own action for step 3; 4: infer C2; C1[2]; 5: C2 replaces C1[3] by C2[1].
    infer, _ = _chunks()
    chunks = DelayedChunks(execute_steps=4, delay=1, min_remaining=3, latency_trigger=False)
    values = [None if (a := chunks.action(step, infer)) is None else int(a[0])
              for step in range(6)]
    assert values == [None, 1, 2, 101, 102, 201]
    chunks.clear(5)
    assert chunks.action(6, infer) is None  # cleared: a new inference, nothing due yet


def test_clear_forgets_a_chunk_in_flight():
    infer, calls = _chunks()
    chunks = DelayedChunks(execute_steps=4, delay=3, min_remaining=2, latency_trigger=False)
    assert chunks.action(0, infer) is None
    chunks.clear(0)  # a takeover: the chunk planned at step 0 must never act
    assert chunks.action(5, infer) is None and len(calls) == 2
    assert chunks.action(8, infer)[0] == 100 + 3


@pytest.fixture(scope='module')
def env():
    environment = AlohaEnv(AlohaConfig(task='transfer_cube', cameras=[], max_steps=30))
    yield environment
    environment.close()


def test_an_episode_with_a_delay_holds_until_the_first_chunk_lands(env):
    commanded = []

    def policy(seen: dict) -> np.ndarray:
        # Hold the arms where they are; record the observation each chunk is planned from.
        commanded.append(seen['state'][:14].copy())
        return np.repeat(seen['state'][None, :14], 20, axis=0)

    episode, summary = run_policy_episode(
        env, 3, policy, config=RunnerConfig(track='state', inference_delay_steps=3,
                                            min_remaining_steps=8))
    assert summary['steps'] == 30 and len(episode.actions) == 30
    # Only until the first chunk lands at step 3: with 7 of its actions ahead (< 8) the next
    # inference starts at once, and each later chunk lands before the queue runs dry.
    assert summary['hold_steps'] == 3
    # Every chunk that landed did so 3 steps late: 3 of its 10 queued actions were stale
    # (the last one may still have been in flight when the episode ended).
    assert summary['stale_dropped'] in (3 * (len(commanded) - 1), 3 * len(commanded))
    synchronous, plain = run_policy_episode(env, 3, policy,
                                            config=RunnerConfig(track='state'))
    assert 'hold_steps' not in plain and len(synchronous.actions) == 30


def test_runner_config_rejects_a_negative_delay():
    with pytest.raises(ValueError, match='inference_delay_steps'):
        RunnerConfig(inference_delay_steps=-1)


def test_an_actuation_delay_holds_the_reset_pose_until_the_first_command_arrives(env):
    def policy(seen: dict) -> np.ndarray:
        target = seen['state'][:14].copy()
        target[0] += 0.3  # left waist
        return np.repeat(target[None], 20, axis=0)

    def waist_after_each_step(delay: int) -> np.ndarray:
        episode, _ = run_policy_episode(
            env, 3, policy, config=RunnerConfig(track='state', actuation_delay_steps=delay))
        # observations[k] is the state before step k: step k's effect shows at k + 1.
        return episode.observations['state'][1:, 0]

    prompt, delayed = waist_after_each_step(0), waist_after_each_step(3)
    assert prompt[0] > 0.01                      # moving after the first step
    assert np.allclose(delayed[:3], 0.0, atol=1e-3)  # the reset pose for 3 steps
    assert delayed[3] > 0.01
    # The commands are recorded as the policy gave them, not as the robot got them.
    with pytest.raises(ValueError, match='actuation_delay_steps'):
        RunnerConfig(actuation_delay_steps=-1)


def test_a_low_viability_raises_a_help_request_that_the_on_request_operator_answers(env):
    from habc_policy.help_request import HelpRequestParams
    from habc_sim.operator import OperatorConfig, ScriptedOperator

    def policy(seen: dict) -> np.ndarray:
        return np.repeat(seen['state'][None, :14], 20, axis=0)  # stands still

    def viability(seen: dict) -> float:
        return 0.05    # the critic gives up on this episode at once

    operator = ScriptedOperator(OperatorConfig(watch='on_request', reaction_delay_steps=3),
                                np.random.default_rng(0))
    # Inferences every 5 steps (0.1 s): below 0.3 for 0.2 s at steps 0, 5, 10 -> raised by
    # step 10's inference, after the operator's decision of that step. The operator sees it
    # from step 11, arrives 3 steps later and takes over at 14, which answers the request.
    episode, summary = run_policy_episode(
        env, 3, policy, operator,
        RunnerConfig(track='state', execute_steps=5,
                     help=HelpRequestParams(help_below_for_s=0.2, help_stall_window_s=0.0)),
        viability=viability)
    assert summary['viability'][:3] == [(0, 0.05), (5, 0.05), (10, 0.05)]
    assert summary['help_events'] == [(10, 'raised', 'low'), (14, 'cleared', 'answered')]
    assert summary['help_requests'] == 1 and summary['takeover_causes'] == ['help_request']
    human = np.flatnonzero(episode.controllers == Controller.HUMAN)
    assert human[0] == 14
    # Watching from step 11 on: 3 steps coming over, then every driven step.
    assert summary['attention_steps'] == summary['steps'] - 11


def test_without_a_viability_function_there_are_no_help_requests(env):
    from habc_policy.help_request import HelpRequestParams

    _, summary = run_policy_episode(
        env, 3, lambda seen: np.repeat(seen['state'][None, :14], 20, axis=0),
        config=RunnerConfig(track='state', help=HelpRequestParams()))
    assert 'help_events' not in summary and 'viability' not in summary
