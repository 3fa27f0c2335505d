"""The episode as data and its storage (no rclpy, no torch).

Modules, from the vocabulary up:
    vocabulary      Outcome, Controller, EpisodeKind, EpisodeStatus, PolicyVersion
    episode         Episode (arrays over T control steps), its controller segments, episode ids
    index           the SQLite episode index (EpisodeIndex, EpisodeRecord; read-only mode)
    stats           index records summarised per policy version (dashboard, habc demo)
    bag_format      the MCAP bag of one habc episode: typestore, writer, message reader
    recovery        making the bag of a recorder that died readable again
    episode_bags    bags -> Episode: habc bags, and other stacks' standard topics through a
                    TopicMapping; topic-name matching
    dataset         directories of bags + labels -> episodes (the offline trainer's input)
    playback        bag contents for replay (`habc play`)
    lerobot_export  episodes -> a LeRobot dataset folder
"""
