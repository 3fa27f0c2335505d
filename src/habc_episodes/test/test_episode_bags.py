"""Episodes from recorded bags: alignment of actions and observations, views, clear errors."""

from episode_bags import SEC as BAG_SEC
from episode_bags import TICK_NS, write_episode
import numpy as np
import pytest

from habc_episodes.episode_bags import episode_from_bag, match_topic, TopicMapping
from habc_episodes.help_requests import HelpRequestRecord, Takeover
from habc_episodes.vocabulary import Controller, EpisodeKind, Outcome

MS = 1_000_000


def alignment_bag(tmp_path, bags, *, views=1, pad=0):
    """Observations at 1.000, 1.100, 1.200 s; actions at 0.950 ... 1.250 s.

    The observation of 1.100 s is written after the action of 1.100 s (a slow recorder):
    alignment must follow header stamps, not the order in the bag.
    """
    sec = bags.SEC
    obs = {k: bags.observation(sec + 100 * MS * k, [10.0 + k] * 14, k, views=views, pad=pad)
           for k in range(3)}
    act = [(950, 2, 0.5), (1000, 0, 1.0), (1050, 0, 2.0), (1100, 1, 3.0), (1150, 1, 4.0),
           (1250, 2, 5.0)]
    actions = [bags.action(ms * MS, source, [value] * 14, episode_id='ep-7',
                           policy_version=f'v{i}')
               for i, (ms, source, value) in enumerate(act)]
    messages = [
        ('/robot1/executed_action', 950 * MS, actions[0]),
        ('/robot1/observation', 1000 * MS, obs[0]),
        ('/robot1/executed_action', 1000 * MS, actions[1]),
        ('/robot1/executed_action', 1050 * MS, actions[2]),
        ('/robot1/executed_action', 1100 * MS, actions[3]),
        ('/robot1/observation', 1101 * MS, obs[1]),
        ('/robot1/executed_action', 1150 * MS, actions[4]),
        ('/robot1/observation', 1200 * MS, obs[2]),
        ('/robot1/executed_action', 1250 * MS, actions[5]),
        ('/robot1/joint_states', 1250 * MS, obs[2].joint_state),
    ]
    return bags.write(tmp_path / 'ep-7', messages)


def test_one_step_per_action_with_the_newest_observation_before_it(tmp_path, bags):
    episode = episode_from_bag(alignment_bag(tmp_path, bags, pad=2), 'success')
    # The action at 0.95 s comes before any observation: skipped.
    assert len(episode) == 5
    assert episode.actions[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert episode.actions.shape == (5, 14) and episode.actions.dtype == np.float32
    assert episode.controllers.tolist() == [Controller.POLICY, Controller.POLICY,
                                            Controller.HUMAN, Controller.HUMAN,
                                            Controller.HOLD]
    # 1.00 -> obs 1.00; 1.05 -> obs 1.00; 1.10 -> obs 1.10 (stamp <=); 1.15 -> 1.10; 1.25 -> 1.20
    state = episode.observations['state']
    assert state.dtype == np.float32 and state.shape == (5, 14)
    assert state[:, 0].tolist() == [10.0, 10.0, 11.0, 11.0, 12.0]
    images = episode.observations['images']
    assert images.shape == (5, 1, 8, 8, 3) and images.dtype == np.uint8
    assert images[:, 0, 0, 0, 0].tolist() == [0, 0, 1, 1, 2]
    assert (images[3] == 1).all()  # the row padding (255) is cut off
    assert episode.policy_versions == ['v1', 'v2', 'v3', 'v4', 'v5']
    np.testing.assert_allclose(episode.timestamps, [1.0, 1.05, 1.1, 1.15, 1.25])
    assert episode.outcome == Outcome.SUCCESS and episode.kind == EpisodeKind.ROLLOUT
    assert episode.instruction == 'transfer the cube'
    assert episode.episode_id == 'ep-7'
    assert episode.num_interventions == 1


def test_ticks_stamped_with_a_neighbouring_episode_are_not_steps(tmp_path, bags):
    # The arbiter learns of START/END on its own: the first tick recorded here still carries
    # the previous episode's id and the last one the next's. Neither is a step of ep-7.
    sec = bags.SEC
    obs = bags.observation(sec, [1.0] * 14, 0)
    ids = ['ep-6', 'ep-7', 'ep-7', 'ep-7', 'ep-8']
    messages = [('/observation', sec, obs)] + [
        ('/executed_action', sec + k * 20 * MS,
         bags.action(sec + k * 20 * MS, 0, [float(k)] * 14, episode_id=episode_id))
        for k, episode_id in enumerate(ids)]
    episode = episode_from_bag(bags.write(tmp_path / 'ep-7', messages), 'failure')
    assert episode.episode_id == 'ep-7'
    assert episode.actions[:, 0].tolist() == [1.0, 2.0, 3.0]


def test_views_are_chosen_and_resized(tmp_path, bags):
    bag = alignment_bag(tmp_path, bags, views=2)
    both = episode_from_bag(bag, 'failure')
    assert both.observations['images'].shape == (5, 2, 8, 8, 3)
    assert both.observations['images'][0, 1, 0, 0, 0] == 10
    second = episode_from_bag(bag, 'failure', cameras=[1], image_size=4, episode_id='x')
    assert second.observations['images'].shape == (5, 1, 4, 4, 3)
    assert second.observations['images'][:, 0, 0, 0, 0].tolist() == [10, 10, 11, 11, 12]
    assert second.episode_id == 'x' and second.outcome == Outcome.FAILURE
    # What the cameras recorded, before the resize: a policy trained on them records it.
    assert both.camera_shapes == ((8, 8), (8, 8)) and second.camera_shapes == ((8, 8),)
    odd = episode_from_bag(bag, 'failure', image_size=3)  # not a whole factor: nearest pixel
    assert odd.observations['images'].shape == (5, 2, 3, 3, 3)
    with pytest.raises(ValueError, match=r'camera indices \[2\] do not fit the 2 images'):
        episode_from_bag(bag, 'failure', cameras=[2])


def test_a_bag_without_the_needed_topics_says_what_is_missing_and_what_is_there(tmp_path,
                                                                              bags):
    obs = bags.observation(bags.SEC, [0.0] * 14, 0)
    bag = bags.write(tmp_path / 'no-actions', [('/observation', bags.SEC, obs),
                                              ('/joint_states', bags.SEC, obs.joint_state)])
    with pytest.raises(ValueError) as error:
        episode_from_bag(bag, 'success')
    message = str(error.value)
    assert "no topic 'executed_action' (habc_msgs/msg/ExecutedAction)" in message
    assert '/observation (habc_msgs/msg/Observation, 1)' in message
    assert '/joint_states (sensor_msgs/msg/JointState, 1)' in message


def test_a_topic_of_the_wrong_type_is_named(tmp_path, bags):
    obs = bags.observation(bags.SEC, [0.0] * 14, 0)
    bag = bags.write(tmp_path / 'wrong', [('/observation', bags.SEC, obs),
                                          ('/executed_action', bags.SEC, obs.joint_state)])
    with pytest.raises(ValueError, match="topic '/executed_action' has type "
                                         'sensor_msgs/msg/JointState, expected'):
        episode_from_bag(bag, 'success')


def test_actions_before_any_observation_only_is_an_error(tmp_path, bags):
    messages = [('/observation', 2 * bags.SEC, bags.observation(2 * bags.SEC, [0.0] * 14, 0)),
                ('/executed_action', bags.SEC, bags.action(bags.SEC, 0, [0.0] * 14))]
    with pytest.raises(ValueError, match='nothing to train on'):
        episode_from_bag(bags.write(tmp_path / 'early', messages), 'success')


def test_not_a_bag(tmp_path):
    with pytest.raises(FileNotFoundError, match='not a rosbag2 directory'):
        episode_from_bag(tmp_path, 'success')


def test_topic_mapping_matches_relative_names_in_any_namespace():
    topics = ['/observation', '/robot1/observation', '/robot1/sync/observation_raw']
    assert match_topic('observation', topics[:1]) == ['/observation']
    assert match_topic('observation', topics[1:]) == ['/robot1/observation']
    assert match_topic('/robot1/observation', topics) == ['/robot1/observation']
    assert len(match_topic('observation', topics)) == 2  # ambiguous: caller reports it
    assert TopicMapping() == TopicMapping('observation', 'executed_action')


def test_an_ambiguous_topic_asks_for_an_absolute_name(tmp_path, bags):
    obs = bags.observation(bags.SEC, [0.0] * 14, 0)
    act = bags.action(bags.SEC, 0, [0.0] * 14)
    bag = bags.write(tmp_path / 'two', [('/a/observation', bags.SEC, obs),
                                        ('/b/observation', bags.SEC, obs),
                                        ('/a/executed_action', bags.SEC, act)])
    with pytest.raises(ValueError, match='matches several topics'):
        episode_from_bag(bag, 'success')
    episode = episode_from_bag(bag, 'success', topics=TopicMapping(observation='/b/observation'))
    assert len(episode) == 1


# Help requests (issue 15): requested and spontaneous takeovers --------------------------------

START_NS = 100 * BAG_SEC


def tick_ns(k: int) -> int:
    """Stamp of tick k's InterventionState and ExecutedAction (tests/episode_bags.py)."""
    return START_NS + k * TICK_NS + 1000


def test_a_request_answered_by_a_takeover_reads_back_with_its_record(tmp_path):
    # p_v fell at tick 1's observation; the pedal took over at tick 3, which answered it
    # (the policy node clears with the stamp of the first human tick).
    sources = [0, 0, 0, 1, 1, 2, 1, 0, 0]
    reasons = ['start'] * 3 + ['engage'] * 2 + ['watchdog', 'engage'] + ['handback'] * 2
    bag = write_episode(tmp_path / 'asked', sources, reasons, start_ns=START_NS, help_requests=[
        (START_NS + TICK_NS, True, 'low', 0.125), (tick_ns(3), False, 'answered', 0.125)])
    episode = episode_from_bag(bag, 'success')
    first = tick_ns(0) * 1e-9
    (record,) = episode.help_requests
    assert record == HelpRequestRecord(
        raised_at=pytest.approx((START_NS + TICK_NS) * 1e-9 - first), reason='low',
        p_v=0.125, cleared_at=pytest.approx(3 * TICK_NS * 1e-9), cleared_reason='answered',
        answered_by='engage', policy_version='1')
    # One takeover: the watchdog hold at step 5 is inside it.
    assert episode.takeovers == (Takeover(pytest.approx(0.06), 'engage', True, 3),)
    help_summary = episode.help
    assert (help_summary.requested_takeovers, help_summary.spontaneous_takeovers) == (1, 0)


def test_a_spontaneous_takeover_and_a_recovered_request(tmp_path):
    # The leader arm was pulled away at tick 2 with no request open; later p_v stalled at
    # tick 6 and recovered at tick 8 without help.
    sources = [0, 0, 1, 1, 0, 0, 0, 0, 0, 0]
    reasons = ['start'] * 2 + ['deviation'] * 2 + ['handback'] * 6
    bag = write_episode(tmp_path / 'own', sources, reasons, start_ns=START_NS, help_requests=[
        (START_NS + 6 * TICK_NS, True, 'stalled', 0.375),
        (START_NS + 8 * TICK_NS, False, 'recovered', 0.5)])
    episode = episode_from_bag(bag, 'failure')
    (record,) = episode.help_requests
    assert (record.reason, record.cleared_reason, record.answered_by, record.outcome) == (
        'stalled', 'recovered', '', 'recovered')
    assert record.raised_at == pytest.approx(6 * TICK_NS * 1e-9 - 1e-6)
    assert episode.takeovers == (Takeover(pytest.approx(0.04), 'deviation', False, 2),)
    assert (episode.help.requested_takeovers, episode.help.spontaneous_takeovers) == (0, 1)


def test_an_old_bag_without_help_requests_reads_as_before(tmp_path):
    bag = write_episode(tmp_path / 'old', [0, 0, 1, 1, 0], ['start'] * 2 + ['engage'] * 2
                        + ['handback'], start_ns=START_NS)
    episode = episode_from_bag(bag, 'success')
    assert episode.help_requests == ()
    # Its takeover is known from the steps, spontaneous; who engaged it is not read.
    assert episode.takeovers == (Takeover(pytest.approx(0.04), '', False, 2),)
    assert episode.num_interventions == 1 and len(episode) == 5


def test_help_requests_come_from_the_executed_actions_namespace(tmp_path):
    # A robot namespace: help_request and intervention are found beside executed_action.
    bag = write_episode(tmp_path / 'ns', [0, 1, 1], ['start', 'engage', 'engage'],
                        start_ns=START_NS, namespace='/robot2', help_requests=[
                            (START_NS, True, 'low', 0.25),
                            (tick_ns(1), False, 'answered', 0.25)])
    episode = episode_from_bag(bag, 'success')
    assert [r.answered_by for r in episode.help_requests] == ['engage']
    assert episode.takeovers[0].requested
