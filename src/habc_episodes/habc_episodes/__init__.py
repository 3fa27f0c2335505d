"""The episode as data and its storage (no rclpy, no torch).

Modules, from the vocabulary up:
    vocabulary      Outcome, Controller, EpisodeKind, EpisodeStatus, PolicyVersion
    episode         Episode (arrays over T control steps) and its controller segments
    index           the SQLite episode index (EpisodeIndex, EpisodeRecord)
    bag_format      the MCAP bag of one habc episode: typestore, writer, message reader
    recovery        making the bag of a recorder that died readable again
    bag_files       what every bag reader shares: locating, opening and decoding bags
    episode_bags    habc bags -> Episode
    foreign_bags    other stacks' bags (standard topics, TopicMapping) -> Episode
    topics          topic-name matching
    dataset         directories of bags + labels -> episodes (the offline trainer's input)
    playback        bag contents for replay (`habc play`)
    lerobot_export  episodes -> a LeRobot dataset folder
"""
