"""Second process of test_interfaces: echoes every habc_msgs message and serves the services.

For each message type T it subscribes to habc_test/in/T and republishes what it received on
habc_test/out/T. LabelEpisode and EpisodeControl are served with answers computed from the
request, so the test can check values that crossed DDS in both directions.
"""

from habc_common.ros_env import apply_project_defaults

apply_project_defaults()

import rclpy  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402

from habc_msgs import msg, srv  # noqa: E402

MESSAGE_TYPES = ['ActionChunk', 'EpisodeEvent', 'ExecutedAction', 'HelpRequest',
                 'InterventionState', 'Observation', 'PolicyCommand', 'PolicyUpdate']
QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE,
                 durability=DurabilityPolicy.TRANSIENT_LOCAL)
KNOWN_EPISODES = {'ep-0001'}


class InterfacePeer(Node):

    def __init__(self) -> None:
        super().__init__('interface_peer')
        self.echo_publishers = {}
        for name in MESSAGE_TYPES:
            msg_type = getattr(msg, name)
            publisher = self.create_publisher(msg_type, f'habc_test/out/{name}', QOS)
            self.echo_publishers[name] = publisher
            self.create_subscription(msg_type, f'habc_test/in/{name}', publisher.publish, QOS)
        self.create_service(srv.LabelEpisode, 'habc_test/label_episode', self.label)
        self.create_service(srv.EpisodeControl, 'habc_test/episode_control', self.control)
        self.started = 0

    def label(self, request, response):
        valid_outcomes = (request.OUTCOME_SUCCESS, request.OUTCOME_FAILURE,
                          request.OUTCOME_DISCARDED)
        response.accepted = (request.episode_id in KNOWN_EPISODES
                             and request.outcome in valid_outcomes)
        response.message = (f'{request.episode_id}|{request.outcome}|{request.labeler}|'
                            f'{request.note}')
        return response

    def control(self, request, response):
        if request.command == request.COMMAND_START:
            self.started += 1
            response.episode_id = f'ep-{self.started:04d}'
        else:
            response.episode_id = f'ep-{self.started:04d}'
        response.accepted = request.command in (request.COMMAND_START, request.COMMAND_END,
                                                request.COMMAND_ABORT)
        response.message = f'{request.command}|{request.instruction}'
        return response


def main() -> None:
    rclpy.init()
    peer = InterfacePeer()
    print('interface peer ready', flush=True)
    try:
        rclpy.spin(peer)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    finally:
        peer.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()


if __name__ == '__main__':
    main()
