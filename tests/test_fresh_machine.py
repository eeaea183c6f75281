"""What a fresh machine meets: the example configuration's commented-out settings are the
defaults the agent applies, and a test that needs an optional system package skips (never
errors) with a reason naming the package."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from diskover_storage_agent.cli import build_parser, make_config, parse_args
from diskover_storage_agent.config import AgentConfig

from conftest import REMOTE

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "contrib" / "diskover-storage-agent.toml"
#: A setting of the example, live or commented out (``#key = value``).
_SETTING = re.compile(r"^(#?)([a-z][a-z-]*) = ")


def _options() -> dict[str, argparse.Action]:
    """The agent's long options (without the dashes), but --help, --version and --config."""
    return {a.option_strings[-1][2:]: a for a in build_parser()._actions
            if a.option_strings and a.dest not in ("help", "version", "config")}


def test_example_config_comments_show_the_applied_defaults(tmp_path, monkeypatch):
    """The example with its commented-out defaults switched on runs the agent exactly as
    no setting at all does; every option with a fixed default is shown."""
    monkeypatch.delenv("DISKOVER_AGENT_TOKEN", raising=False)
    options = _options()
    lines = EXAMPLE.read_text().splitlines()
    shown, defaults = set(), []
    for line in lines:
        m = _SETTING.match(line)
        if m:
            assert m.group(2) in options, f"the example sets an unknown option: {line}"
            shown.add(m.group(2))
            if m.group(1) and options[m.group(2)].default is not None:  # not an example (no fixed default)
                defaults.append(line[1:])
    assert len(defaults) >= 10, defaults
    missing = {name for name, a in options.items() if a.default not in (None, 0) or name == "verbose"} - shown
    assert not missing, f"the example does not show these options: {sorted(missing)}"
    cfg = tmp_path / "defaults.toml"
    cfg.write_text("\n".join([*defaults, f'replacepath = [["{REMOTE}", "{tmp_path}"]]', ""]))
    from_file = applied(["--config", str(cfg)])
    built_in = applied(["-r", REMOTE, str(tmp_path)])
    assert from_file == built_in
    for line in defaults:  # and each one is in force: a value of its own changes what is applied
        key, value = line.split(" = ", 1)
        other = '"127.0.0.2"' if value.startswith('"0.') else '"json"' if value == '"text"' else str(int(value) + 1)
        cfg.write_text("\n".join([f"{key} = {other}", f'replacepath = [["{REMOTE}", "{tmp_path}"]]', ""]))
        assert applied(["--config", str(cfg)]) != built_in, key


def applied(argv: list[str]) -> tuple[AgentConfig, str]:
    """What the agent runs with, given these arguments: its settings and its log format."""
    args = parse_args(argv)
    return make_config(args), args.log_format


def test_fuse_tests_skip_naming_the_package_without_libfuse(tmp_path):
    """Without libfuse2 (fusepy raises OSError at import, which importorskip would not catch)
    the FUSE test module is skipped, with a reason that names the package."""
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:randomly",
         f"--basetemp={tmp_path / 'bt'}", str(ROOT / "tests" / "test_slow_directory.py")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "FUSE_LIBRARY_PATH": str(tmp_path / "nonexistent" / "libfuse.so.2")},
    )
    assert r.returncode in (0, 5), r.stdout + r.stderr  # 5: every test of the module skipped (none collected)
    assert re.search(r"SKIPPED \[\d+\] tests/test_slow_directory.py:\d+: needs libfuse2 \(apt-get install libfuse2\)",
                     r.stdout), r.stdout
    assert " skipped" in r.stdout and "error" not in r.stdout.lower()
