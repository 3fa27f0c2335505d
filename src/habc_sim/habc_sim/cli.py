"""`habc sim`: the simulated robot's tools.

habc sim expert --task transfer_cube|insertion --episodes N [--seed S] [--noise X] --json
roll out the scripted expert and report its success rate (last line JSON with
--json: {"task", "episodes", "successes", "success_rate", "mean_steps"})
"""

import argparse
from dataclasses import dataclass
import json
import os
import sys

import numpy as np

HELP = __doc__


@dataclass(frozen=True)
class ExpertJob:
    task: str
    seed: int
    waypoint_noise: float
    action_noise: float
    max_steps: int


def _expert_episode(job: ExpertJob) -> dict:
    from habc_sim.aloha import AlohaConfig
    from habc_sim.expert import ExpertConfig, run_expert_episode
    from habc_sim.rollouts import worker_env
    env = worker_env(AlohaConfig(task=job.task, cameras=[], max_steps=job.max_steps))
    config = ExpertConfig(waypoint_noise=job.waypoint_noise, action_noise=job.action_noise)
    return run_expert_episode(env, job.seed, config)


def expert_report(task: str, episodes: int, seed: int = 0, noise: float = 0.0,
                  action_noise: float = 0.0, workers: int = 1, max_steps: int = 300,
                  progress: bool = True) -> dict:
    """Roll out the expert on seeds seed..seed+episodes-1; return the summary."""
    from habc_sim.rollouts import run_parallel
    jobs = [ExpertJob(task, seed + i, noise, action_noise, max_steps) for i in range(episodes)]
    results = list(run_parallel(_expert_episode, jobs, workers, f'expert {task}', progress))
    successes = [r for r in results if r['success']]
    return {'task': task, 'episodes': episodes, 'successes': len(successes),
            'success_rate': len(successes) / episodes,
            'mean_steps': float(np.mean([r['steps'] for r in successes])) if successes else None,
            'physics_errors': sum(r['physics_error'] for r in results),
            'failed_seeds': [r['seed'] for r in results if not r['success']]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `habc sim` subcommands."""
    sub = parser.add_subparsers(dest='sim_command', metavar='SIM_COMMAND', required=True)
    expert = sub.add_parser('expert', help='success rate of the scripted expert',
                            description='Roll out the scripted IK expert on seeded initial '
                            'object poses and report its success rate.')
    expert.add_argument('--task', choices=['transfer_cube', 'insertion'], required=True)
    expert.add_argument('--episodes', type=int, default=50, help='episodes (default 50)')
    expert.add_argument('--seed', type=int, default=0, help='first seed (default 0)')
    expert.add_argument('--noise', type=float, default=0.0, metavar='M',
                        help='std (m) of the per-episode offset of grasp and meeting points')
    expert.add_argument('--action-noise', type=float, default=0.0, metavar='RAD',
                        help='std (rad) of per-step noise on the joint targets')
    expert.add_argument('--max-steps', type=int, default=300, help='time limit (steps)')
    expert.add_argument('--workers', type=int, default=min(2, os.cpu_count() or 1),
                        help='parallel processes, one robot each (default: 2)')
    expert.add_argument('--json', action='store_true',
                        help='print the summary as JSON on the last line')


def run(args: argparse.Namespace) -> int:
    """Run a `habc sim` subcommand."""
    if args.sim_command == 'expert':
        if args.episodes < 1:
            print('habc sim expert: --episodes must be at least 1', file=sys.stderr)
            return 2
        report = expert_report(args.task, args.episodes, args.seed, args.noise,
                               args.action_noise, args.workers, args.max_steps)
        steps = report['mean_steps']
        print(f"{report['task']}: {report['successes']}/{report['episodes']} successes "
              f"({100 * report['success_rate']:.0f}%), mean steps of successes "
              f"{'-' if steps is None else f'{steps:.1f}'}, "
              f"physics errors {report['physics_errors']}")
        if report['failed_seeds']:
            print(f"failed seeds: {report['failed_seeds']}")
        if args.json:
            keys = ('task', 'episodes', 'successes', 'success_rate', 'mean_steps')
            print(json.dumps({k: report[k] for k in keys}))
    return 0
