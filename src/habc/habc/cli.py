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
    'demo': ('habc.demo', 'the main job on the simulated robot: SFT if needed, then the '
             'closed loop with learner rounds'),
}

EPILOG = """\
examples:
  habc doctor                         is this machine ready?
  habc launch bringup                 the simulated robot and the habc loop
  habc launch bringup use_sim:=false  on a real robot (remap topics in config/bringup.yaml)
  habc credit episode.json            how the outcome of one episode is credited
  habc sim expert --task transfer_cube --episodes 50 --json

Every command takes --help. Source env.sh first, or use .venv/bin/habc which does it."""


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog='habc', description='habc: online RL fine-tuning of VLA robot policies on ROS 2 '
        'with HABC (hierarchical advantage-weighted behaviour cloning).', epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        child = sub.add_parser(name, help=help_text,
                               description=getattr(module, 'HELP', module.__doc__),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(child)
        child.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of `habc`."""
    parser = build_parser()
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
