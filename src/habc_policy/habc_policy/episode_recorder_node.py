"""episode_recorder_node: records each episode into one MCAP bag and the SQLite episode index.

A thin rclpy adapter over habc_policy.episode_recorder.EpisodeRecorder (bags, index rows,
labels, crash recovery); see docs/ros_interfaces.md.

Services:
    recorder/episode_control (habc_msgs/EpisodeControl): START opens a new bag and index row,
        END closes and indexes it, ABORT closes it and labels it discarded.
    recorder/label_episode (habc_msgs/LabelEpisode): sets or changes the outcome of any
        recorded episode (relabelling included).
Publishes recorder/events (habc_msgs/EpisodeEvent, latched depth 1): START, END, LABELLED,
DISCARDED (an ABORT publishes END, then DISCARDED).
Subscribes (raw CDR, written unchanged) to the `topics` parameter: by default observation,
forward_position_controller/commands, intervention, executed_action, policy/chunk and
joint_states.

Storage: `<storage_dir>/episodes.sqlite` and `<storage_dir>/bags/<episode_id>/`. Topic names
in the bags are fully qualified, as `ros2 bag record` writes them (`/robot1/observation` in
namespace robot1).
"""

import time

from rclpy.node import Node

from habc_common.messages import message_class
from habc_common.node_main import spin_node
from habc_common.params import declare_node_parameters
from habc_common.qos import COMMANDS, LATCHED, qos_for_topic
from habc_episodes.episode import robot_label
from habc_episodes.index import EpisodeRecord
from habc_episodes.vocabulary import Outcome, RecorderEvent
from habc_msgs.msg import EpisodeEvent
from habc_msgs.srv import EpisodeControl, LabelEpisode
from habc_policy.episode_recorder import (
    EpisodeRecorder,
    EpisodeRecorderParams,
    parse_topics,
    Reply,
    storage_path,
)

PARAMS = EpisodeRecorderParams


class EpisodeRecorderNode:
    """Thin rclpy adapter over EpisodeRecorder."""

    def __init__(self, **node_options: object) -> None:
        """Create the node; `node_options` go to rclpy's Node (e.g. parameter_overrides)."""
        self.node = Node('episode_recorder', **node_options)
        self.params = declare_node_parameters(self.node, EpisodeRecorderParams)
        p = self.params
        self.log = self.node.get_logger()
        self.events = self.node.create_publisher(EpisodeEvent, 'recorder/events', LATCHED)
        # Every callback is in the node's default, mutually exclusive callback group (the
        # recorder core is not thread-safe); main() spins it on one thread.
        subscriptions = {}
        for name, msgtype in parse_topics(p.topics):
            # The publishers' QoS: a reliable subscription would not match the best-effort
            # observation and image publishers at all.
            subscriptions[name] = self.node.create_subscription(
                message_class(msgtype), name,
                lambda data, name=name: self.message_callback(name, data),
                qos_for_topic(name, msgtype) or COMMANDS, raw=True)
        # Relative name -> fully qualified name, as rosbag2 stores it.
        self.bag_topics = {name: sub.topic_name for name, sub in subscriptions.items()}
        self.recorder = EpisodeRecorder(
            storage_path(p.storage_dir), robot_label(p.robot, self.node.get_namespace()),
            {self.bag_topics[name]: msgtype for name, msgtype in parse_topics(p.topics)},
            clock=time.time, instruction=p.instruction, flush_interval_s=p.flush_interval_s,
            required_topics=[self.bag_topics[name] for name in p.required_topics],
            on_event=self.publish_event)
        recovered = self.recorder.recover()
        for result in recovered:
            (self.log.warning if result.ok else self.log.error)(result.message)
        self.node.create_service(EpisodeControl, 'recorder/episode_control',
                                 self.episode_control_callback)
        self.node.create_service(LabelEpisode, 'recorder/label_episode',
                                 self.label_callback)
        # The writer flushes on write once flush_interval_s has passed; this timer covers
        # quiet stretches, when no write comes to trigger it.
        self.node.create_timer(p.flush_interval_s / 2.0, self.flush_callback)
        self.log.info(f'ready: robot {self.recorder.robot}, {len(self.bag_topics)} topics, '
                      f'storage {self.recorder.storage_dir}, {len(recovered)} episode(s) '
                      'recovered')

    def message_callback(self, name: str, data: bytes) -> None:
        error = self.recorder.on_message(self.bag_topics[name], data,
                                         self.node.get_clock().now().nanoseconds)
        if error:
            self.log.error(error, throttle_duration_sec=5.0)

    def flush_callback(self) -> None:
        error = self.recorder.flush()
        if error:
            self.log.error(error, throttle_duration_sec=5.0)

    def episode_control_callback(self, request: EpisodeControl.Request,
                                 response: EpisodeControl.Response) -> EpisodeControl.Response:
        command = request.command
        if command == EpisodeControl.Request.COMMAND_START:
            reply = self.recorder.start(request.instruction)
        elif command in (EpisodeControl.Request.COMMAND_END,
                         EpisodeControl.Request.COMMAND_ABORT):
            reply = self.recorder.stop(abort=command == EpisodeControl.Request.COMMAND_ABORT)
        else:
            reply = Reply(False, self.recorder.last_episode_id, (
                f'unknown command {command}; use COMMAND_START (0), COMMAND_END (1) or '
                'COMMAND_ABORT (2)'))
        response.accepted, response.episode_id, response.message = (
            reply.accepted, reply.episode_id, reply.message)
        self._log_reply(reply)
        return response

    def label_callback(self, request: LabelEpisode.Request,
                       response: LabelEpisode.Response) -> LabelEpisode.Response:
        reply = self.recorder.label(request.episode_id, request.outcome, request.labeler,
                                    request.note)
        response.accepted, response.message = reply.accepted, reply.message
        self._log_reply(reply)
        return response

    def _log_reply(self, reply: Reply) -> None:
        # Two call sites: rclpy's logger refuses another severity from the same line.
        if reply.accepted:
            self.log.info(reply.message)
        else:
            self.log.warning(reply.message)

    def publish_event(self, event: RecorderEvent, record: EpisodeRecord) -> None:
        """Publish an EpisodeEvent for `record` (the core passes live counts)."""
        msg = EpisodeEvent(episode_id=record.episode_id, event=int(event),
                           outcome=int(Outcome.parse(record.outcome)),
                           policy_version=record.policy_version,
                           num_steps=record.num_steps,
                           num_interventions=record.num_interventions)
        msg.header.stamp = self.node.get_clock().now().to_msg()
        self.events.publish(msg)

    def close(self) -> None:
        """Close a running episode as incomplete (shutdown mid-episode) and the index."""
        warning = self.recorder.close()
        if warning:
            self.log.warning(warning)


def main(args: list[str] | None = None) -> None:
    """Run episode_recorder_node until shutdown."""
    spin_node(EpisodeRecorderNode, args)
