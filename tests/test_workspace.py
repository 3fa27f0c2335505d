"""Workspace-level checks: package metadata, lint, parameter files, no /opt/python hacks."""

import ast
import importlib
import importlib.metadata
import os
from pathlib import Path
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from ros_helpers import ROOT

from habc.bringup import description_path, load_description
from habc_common.params import check_parameter_file

PACKAGES = {'habc_msgs': 'ament_cmake', 'habc_common': 'ament_python',
            'habc_policy': 'ament_python', 'habc_learner': 'ament_python',
            'habc_sim': 'ament_python', 'habc': 'ament_python', 'rqt_habc': 'ament_python'}


def tracked_files() -> list[Path]:
    out = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]


def test_lint_ament_style():
    """ament-compatible lint: 99 columns, single quotes, import order, pep257."""
    result = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache', '.'],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize('name', sorted(PACKAGES))
def test_package_metadata(name):
    folder = ROOT / 'src' / name
    root = ET.parse(folder / 'package.xml').getroot()
    assert root.get('format') == '3'
    assert root.findtext('name') == name
    assert root.findtext('license') == 'Apache-2.0'
    assert root.findtext('description').strip()
    assert root.find('maintainer').get('email')
    assert root.findtext('export/build_type') == PACKAGES[name]
    if PACKAGES[name] == 'ament_python':
        assert (folder / 'resource' / name).is_file()
        assert (folder / 'setup.cfg').read_text().count(f'$base/lib/{name}') == 2
        setup_tree = ast.parse((folder / 'setup.py').read_text())
        strings = {n.value for n in ast.walk(setup_tree) if isinstance(n, ast.Constant)}
        assert name in strings and 'Apache-2.0' in strings


def test_console_scripts_resolve_to_callables():
    """Every console script of every package is installed and points at a real function."""
    count = 0
    for name, build_type in PACKAGES.items():
        if build_type != 'ament_python':
            continue
        for entry in importlib.metadata.distribution(name).entry_points:
            if entry.group != 'console_scripts':
                continue
            module_name, func_name = entry.value.split(':')
            assert callable(getattr(importlib.import_module(module_name), func_name))
            count += 1
    assert count >= 5


def test_parameter_files_match_node_declarations():
    """Each node's YAML files only set parameters its dataclass declares, within bounds."""
    description = load_description(description_path('bringup'))
    for node in description.nodes:
        scripts = {e.name: e.value for e in importlib.metadata.distribution(node.package)
                   .entry_points if e.group == 'console_scripts'}
        module = importlib.import_module(scripts[node.executable].split(':')[0])
        for path in node.parameters:
            assert check_parameter_file(module.PARAMS, path), path


def test_nothing_creates_opt_python_or_edits_site_packages():
    writers = ('mkdir', 'ln ', 'ln -', 'cp ', 'mv ', 'install ', 'tee ', '>')
    for path in tracked_files():
        if path.suffix in ('.png', '.mcap', '.db3') or path.name == 'test_workspace.py':
            continue
        for number, line in enumerate(path.read_text(errors='ignore').splitlines(), 1):
            code = line.split('#', 1)[0]
            for target in ('/opt/python', 'site-packages'):
                # A throwaway venv under /tmp (the LeRobot fixtures' regeneration recipes)
                # is not the workspace's environment.
                throwaway = target == 'site-packages' and '/tmp/' in code
                if target in code and any(w in code for w in writers) and not throwaway:
                    pytest.fail(f'{path.relative_to(ROOT)}:{number} may write {target}: '
                                f'{line.strip()}')
    assert not Path('/opt/python').exists(), 'something created /opt/python'


@pytest.mark.pip_env
def test_discovery_range_is_forced_everywhere():
    """Every entry point that can start rclpy sets LOCALHOST first (hard rule 1)."""
    env = {k: v for k, v in os.environ.items() if k != 'ROS_AUTOMATIC_DISCOVERY_RANGE'}
    sourced = subprocess.run(['bash', '-c', '. ./env.sh && echo "$ROS_AUTOMATIC_DISCOVERY_RANGE"'
                              ' && echo "$FASTRTPS_DEFAULT_PROFILES_FILE"'],
                             cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert sourced.stdout.split() == ['LOCALHOST',
                                      str(ROOT / 'config' / 'dds' / 'fastdds_localhost.xml')]
    assert 'ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST' in (ROOT / '.ci' / 'run').read_text()
    # Test modules run under the root conftest.py, which forces the variable before imports.
    assert "os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'" in \
        (ROOT / 'conftest.py').read_text()
    for path in tracked_files():
        if path.suffix != '.py' or 'rclpy.init(' not in path.read_text():
            continue
        if path.parent.name in ('test', 'tests'):
            continue
        text = path.read_text()
        assert 'apply_project_defaults()' in text, \
            f'{path.relative_to(ROOT)} starts rclpy without apply_project_defaults()'


@pytest.mark.pip_env
def test_setup_is_idempotent():
    """A second setup run with nothing changed installs and builds nothing."""
    result = subprocess.run(['bash', str(ROOT / 'tools' / 'setup.sh')], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'requirements.lock already installed' in result.stdout
    assert 'workspace already built' in result.stdout
