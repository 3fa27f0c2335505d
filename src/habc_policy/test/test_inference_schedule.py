"""The inference scheduler, alone and in a closed loop with the executor, on virtual time."""

import math

import numpy as np
import pytest

from habc_episodes.vocabulary import PolicyVersion
from habc_policy.chunk_executor import ChunkExecutor, ChunkExecutorParams
from habc_policy.inference_schedule import InferenceScheduler, MAX_SWAP_DEFERRALS, swap_now

PERIOD = 0.02
VERSION = PolicyVersion.parse('1:sft')


def test_the_deadline_is_plan_end_minus_the_latency_quantile_and_the_margin():
    scheduler = InferenceScheduler(margin_s=0.01, window=10, quantile=0.9,
                                   initial_latency_s=0.2)
    assert scheduler.deadline(None) is None
    assert scheduler.deadline(1.0) == pytest.approx(1.0 - 0.2 - 0.01)  # before any sample
    scheduler.record_latency(5.0, cold=True)  # a cold start says nothing about the next one
    assert scheduler.latency_s is None
    for latency in (0.03, 0.04, 0.05, 0.03, 0.04):
        scheduler.record_latency(latency)
    expected = float(np.quantile([0.03, 0.04, 0.05, 0.03, 0.04], 0.9))
    assert scheduler.latency_s == pytest.approx(expected)
    assert scheduler.deadline(1.0) == pytest.approx(1.0 - expected - 0.01)
    scheduler.record_latency(math.nan)
    scheduler.record_latency(-1.0)
    assert scheduler.latency_s == pytest.approx(expected)
    with pytest.raises(ValueError, match='quantile'):
        InferenceScheduler(quantile=0.0)


def test_it_starts_on_the_last_observation_that_still_lands_in_time():
    scheduler = InferenceScheduler(margin_s=0.01)
    scheduler.record_latency(0.045)
    for stamp in (0.0, 0.02, 0.04):
        scheduler.record_observation(stamp)
    assert scheduler.observation_period_s == pytest.approx(0.02)
    plan_end = 0.2  # deadline 0.2 - 0.045 - 0.01 = 0.145
    assert not scheduler.on_observation(0.12, plan_end).start  # 0.14 still comes in time
    decision = scheduler.on_observation(0.13, plan_end)  # the next (0.15) would be late
    assert decision.start and decision.deadline == pytest.approx(0.145)
    assert not scheduler.on_tick(0.14, plan_end).start
    assert scheduler.on_tick(0.146, plan_end).start  # no observation came: start anyway
    assert scheduler.on_observation(0.0, None).start  # nothing planned: start at once


def closed_loop(latency_s, use_scheduler, seconds=6.0, sync_delay_s=0.003, execute_steps=20,
                horizon=20):
    """Run executor + trigger on virtual time (1 ms resolution).

    Observations are stamped every control period and arrive sync_delay_s later; an
    inference takes latency_s from its start to the chunk's acceptance. Returns the
    executor, the observation age at each inference start (s) and the skipped counts.
    """
    params = ChunkExecutorParams(control_period_s=PERIOD, execute_steps=execute_steps,
                                 stale_after_s=0.75 * PERIOD, min_remaining_steps=5,
                                 latency_trigger=True)
    executor = ChunkExecutor(params)
    scheduler = InferenceScheduler(margin_s=0.01)
    newest_stamp = None
    running = None  # (done_at, observation stamp, started_at)
    ages, skipped = [], []
    chunk_id = 0
    step_ms = 1
    ticks_per_period = round(PERIOD * 1000)
    obs_every = ticks_per_period

    def start(now):
        nonlocal running
        if running is None and newest_stamp is not None:
            ages.append(now - newest_stamp)
            running = (now + latency_s, newest_stamp, now)
    for ms in range(0, int(seconds * 1000), step_ms):
        now = ms / 1000.0
        if running is not None and now >= running[0] - 1e-9:
            _, stamp, started = running
            running = None
            start_time = stamp + PERIOD
            actions = np.full((horizon, 2), float(chunk_id))
            executor.add_chunk(actions, start_time, PERIOD, VERSION, chunk_id)
            skipped.append(executor.past_due(start_time, horizon, now))
            scheduler.record_latency(now - started, cold=chunk_id == 0)
            chunk_id += 1
        arrival = ms - round(sync_delay_s * 1000)
        if arrival >= 0 and arrival % obs_every == 0:
            newest_stamp = arrival / 1000.0
            scheduler.record_observation(newest_stamp)
            if use_scheduler and scheduler.on_observation(now, executor.plan_end()).start:
                start(now)
        if ms % ticks_per_period == 0:
            executor.next_action(now)
            if use_scheduler:
                if scheduler.on_tick(now, executor.plan_end()).start:
                    start(now)
            elif executor.needs_inference(now):
                start(now)
    return executor, np.array(ages), np.array(skipped)


@pytest.mark.parametrize('latency_s', [0.025, 0.045, 0.11])
def test_in_closed_loop_chunks_land_before_the_plan_runs_out_from_fresh_observations(latency_s):
    executor, ages, skipped = closed_loop(latency_s, use_scheduler=True)
    counters = executor.diagnostics()
    assert counters['underruns'] == 0  # the robot never waited for a chunk
    # Every inference after the first one started on the observation that had just arrived.
    assert ages[1:].max() <= 0.003 + 1e-9
    # It replans once per plan, not on every observation: the plan of 20 actions is used.
    assert counters['chunks_accepted'] < 6.0 / (20 * PERIOD) * 2
    # Skipped per chunk: the actions that fell due during sync + inference, as counted.
    late = 0.003 + latency_s - 0.75 * PERIOD - PERIOD  # first action due at stamp + PERIOD
    assert set(skipped[1:]) == {max(0, math.ceil(late / PERIOD - 1e-9))}


def test_the_remaining_actions_trigger_plans_from_older_observations():
    # The previous trigger (fewer than N actions left) starts on control ticks, on whatever
    # observation is newest then: the scheduler's observations are fresher, with no more
    # empty ticks.
    _, ages_threshold, _ = closed_loop(0.045, use_scheduler=False)
    _, ages_scheduled, _ = closed_loop(0.045, use_scheduler=True)
    assert ages_scheduled[1:].mean() < ages_threshold[1:].mean()


def test_executor_reports_the_plan_and_its_end():
    executor = ChunkExecutor(ChunkExecutorParams(control_period_s=PERIOD, execute_steps=5,
                                                 stale_after_s=0.015))
    assert executor.planned_actions(1.0, 3) is None and executor.plan_end() is None
    chunk = np.arange(10 * 2, dtype=float).reshape(10, 2)
    assert executor.add_chunk(chunk, 1.0, PERIOD, VERSION, 0)
    # The whole chunk is the plan (10 steps), the queue only its first 5.
    np.testing.assert_array_equal(executor.planned_actions(1.04, 3), chunk[2:5])
    np.testing.assert_array_equal(executor.planned_actions(1.16, 5), chunk[8:10])
    assert executor.planned_actions(1.2, 3) is None
    assert executor.plan_end() == pytest.approx(1.0 + 4 * PERIOD)
    # Past due: action i is stale when 1.0 + i * 0.02 < now - 0.015.
    assert executor.past_due(1.0, 10, 1.015) == 0
    assert executor.past_due(1.0, 10, 1.016) == 1
    assert executor.past_due(1.0, 10, 1.035) == 1
    assert executor.past_due(1.0, 10, 1.036) == 2
    assert executor.past_due(1.0, 10, 9.0) == 10
    executor.clear(1.1)
    assert executor.planned_actions(1.04, 3) is None and executor.plan_end() is None


def test_staged_weights_wait_for_a_plan_that_covers_their_first_inference_but_not_forever():
    # 0.2 s of plan left covers a 0.15 s first inference (+ 0.01 margin): swap now.
    assert swap_now(0.2, 0.15, 0.01, deferrals=0)
    # 0.1 s does not: the old weights refill the queue first ...
    assert not swap_now(0.1, 0.15, 0.01, deferrals=0)
    assert not swap_now(0.1, 0.15, 0.01, deferrals=MAX_SWAP_DEFERRALS - 1)
    # ... but weights slower than any plan swap after the last allowed wait.
    assert swap_now(0.1, 5.0, 0.01, deferrals=MAX_SWAP_DEFERRALS)
    assert swap_now(None, 5.0, 0.01, deferrals=0)  # nothing queued: nothing to protect
