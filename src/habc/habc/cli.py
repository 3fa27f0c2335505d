"""The `habc` command: one entry point for every tool of the workspace.

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args) -> int`;
the same functions back the console scripts of the ROS packages (`ros2 run habc doctor`).
Later capabilities add their module to SUBCOMMANDS.
"""

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only for the chosen subcommand
# (and for --help), so `habc launch` does not pay for torch.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    'doctor': ('habc.doctor',
               'check rclpy/RMW, DDS discovery range and profile, GL, torch and GPU, Qt'),
    'launch': ('habc.launcher',
               'start a bringup (default: bringup) in the pip environment, like ros2 launch'),
    'credit': ('habc_learner.credit',
               'show which windows of an episode get the outcome label, and their weights'),
    'sim': ('habc_sim.cli', 'simulated robot tools: scripted expert success rates'),
    'bench': ('habc_sim.bench', "the paper's comparison in simulation, every method, seeds"),
    'train': ('habc_learner.train_cli', 'train a policy offline from bags (ros2 bag record too)'),
    'calibrate': ('habc_learner.calibrate_cli',
                  'help-request thresholds for a stated false-alarm rate, into a checkpoint'),
    'demo': ('habc.demo', 'the main job on the simulated robot: SFT if needed, then the '
             'closed loop with learner rounds'),
    'play': ('habc.play', 'replay bags on ROS topics like ros2 bag play, or as a new episode'),
    'episodes': ('habc.episodes', 'list, show, label and export (LeRobot) recorded episodes'),
    'dashboard': ('rqt_habc.standalone', 'label episodes, watch interventions and the learner'),
    'keys': ('habc.keys', 'the key pair that signs policy updates; sign a checkpoint by hand'),
}

EPILOG = """\
examples:
  habc doctor                         is this machine ready?
  habc launch bringup                 the simulated robot and the habc loop
  habc launch bringup use_sim:=false  on a real robot (remap topics in config/bringup.yaml)
  habc launch fleet robots:=2         several robots in their namespaces, one learner
  habc train ... --nproc 2            offline training in 2 processes (torchrun, DDP)
  habc credit episode.json            how the outcome of one episode is credited
  habc sim expert --task transfer_cube --episodes 50 --json

Every command takes --help. Source env.sh first, or use .venv/bin/habc which does it."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Build the argument parser; with `only`, import just that subcommand's module.

    Every subcommand is listed either way; the others get no options, so `habc dashboard`
    does not pay for importing torch through `habc bench`.
    """
    parser = argparse.ArgumentParser(
        prog='habc', description='habc: online RL fine-tuning of VLA robot policies on ROS 2 '
        'with HABC (hierarchical advantage-weighted behaviour cloning).', epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        child = sub.add_parser(name, help=help_text,
                               description=getattr(module, 'HELP', module.__doc__),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(child)
        child.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of `habc`."""
    words = sys.argv[1:] if argv is None else argv
    command = next((w for w in words if not w.startswith('-')), '')
    parser = build_parser(only=command if command in SUBCOMMANDS else '')
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take positionals after an option that follows other positionals
    # (`habc launch bringup --dry-run use_sim:=false`); launch arguments are recognisable by
    # their ':=' and are collected here.
    if extra and hasattr(args, 'arguments') and all(':=' in item for item in extra):
        args.arguments = [*args.arguments, *extra]
    elif extra:
        parser.error(f'unrecognized arguments: {" ".join(extra)}')
    if args.command is None:
        parser.print_help()
        sys.exit(2)
    sys.exit(args.run(args))


if __name__ == '__main__':
    main()
