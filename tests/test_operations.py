"""For the people who run the agent: health, metrics, access logs, config file, service files."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REMOTE, Agent

ROOT = Path(__file__).resolve().parent.parent
AGENT_BIN = Path(sys.executable).with_name("diskover-storage-agent")


def get(agent: Agent, path: str, token: str | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" ([0-9.e+]+)$"
    for line in text.splitlines():
        m = re.match(pattern, line)
        if m:
            return float(m.group(1))
    return 0.0


def wait_for_log(agent: Agent, needle: str, timeout: float = 5) -> list[str]:
    deadline = time.monotonic() + timeout
    while not any(needle in line for line in agent.log):
        assert time.monotonic() < deadline, f"{needle!r} never logged:\n{''.join(agent.log)}"
        time.sleep(0.01)
    return [line for line in agent.log if needle in line]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    top = tmp_path / "tree"
    (top / "sub").mkdir(parents=True)
    for i in range(25):
        (top / f"f{i}").write_bytes(b"x" * i)
    (top / "sub" / "g").touch()
    return top


def test_health_needs_no_token_but_metrics_do(tree, start_agent, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    agent = start_agent([(REMOTE, str(tree))], extra=("--token-file", str(token_file)))
    status, _, body = get(agent, "/_agent/health")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    assert get(agent, "/_agent/metrics")[0] == 401
    status, headers, _ = get(agent, "/_agent/metrics", token="s3cret-token")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")


def test_metrics_count_what_was_served(tree, start_agent):
    agent = start_agent([(REMOTE, str(tree))])
    assert get(agent, REMOTE)[0] == 200
    assert get(agent, REMOTE + "/nope")[0] == 404
    assert get(agent, "/etc")[0] == 403
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    conn.request("POST", "/_agent/v1/walk", body=json.dumps({"paths": [REMOTE]}),
                 headers={"Content-Type": "application/json"})
    walked = conn.getresponse().read()
    _, _, body = get(agent, "/_agent/metrics")
    text = body.decode()
    assert metric(text, "diskover_agent_requests_total", 'endpoint="listing",status="200"') == 1
    assert metric(text, "diskover_agent_requests_total", 'endpoint="listing",status="404"') == 1
    assert metric(text, "diskover_agent_requests_total", 'endpoint="listing",status="403"') == 1
    assert metric(text, "diskover_agent_requests_total", 'endpoint="walk",status="200"') == 1
    entries = len(os.listdir(tree))
    # the listing, then the walk: the top again and sub/
    assert metric(text, "diskover_agent_entries_total") == entries + entries + 1
    assert metric(text, "diskover_agent_directories_total") == 1 + 2
    assert metric(text, "diskover_agent_errors_total", 'error="ENOENT"') == 1
    assert metric(text, "diskover_agent_errors_total", 'error="not_exported"') == 1
    assert metric(text, "diskover_agent_request_duration_seconds_count", 'endpoint="listing"') == 3
    assert metric(text, "diskover_agent_response_bytes_total") >= len(walked)
    assert metric(text, "diskover_agent_open_connections") >= 1  # the walk's connection is still open
    assert metric(text, "diskover_agent_requests_in_flight") == 0
    conn.close()


def test_access_log_text_and_json(tree, start_agent):
    quiet = start_agent([(REMOTE, str(tree))])
    get(quiet, REMOTE)
    get(quiet, "/_agent/health")
    assert not [line for line in quiet.log if '"GET ' in line]  # no access lines without -v

    text = start_agent([(REMOTE, str(tree))], extra=("-v",))
    get(text, REMOTE + "/sub")
    (line,) = wait_for_log(text, f'"GET {REMOTE}/sub"')
    assert re.search(r'127\.0\.0\.1 "GET /mnt/isilon/sub" 200 entries=1 bytes=\d+ \d+\.\d{3}s', line)

    js = start_agent([(REMOTE, str(tree))], extra=("-v", "--log-format", "json"))
    get(js, REMOTE + "/nope")
    (line,) = wait_for_log(js, '"path":"/mnt/isilon/nope"')
    rec = json.loads(line)
    assert rec["client"] == "127.0.0.1" and rec["status"] == 404 and rec["method"] == "GET"
    assert rec["entries"] == 0 and rec["seconds"] >= 0 and rec["level"] == "info"
    assert all(json.loads(x) for x in js.log)  # every line is JSON, start-up lines too


def test_config_file(tree, tmp_path, start_agent):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'listen = "127.0.0.1"\nport = 0\nmaxconnections = 3\nverbose = 1\n'
                   f'replacepath = [["{REMOTE}", "{tree}"], ["/mnt/other", "{tree / "sub"}"]]\n')
    agent = start_agent([], extra=("--config", str(cfg)))
    assert get(agent, REMOTE)[0] == 200
    assert get(agent, "/mnt/other")[2] == b"g\n"
    wait_for_log(agent, '"GET /mnt/other"')  # verbose = 1 from the file
    # the command line wins: -r replaces the file's exports
    agent2 = start_agent([("/mnt/cli", str(tree))], extra=("--config", str(cfg)))
    assert get(agent2, "/mnt/cli")[0] == 200
    assert get(agent2, REMOTE)[0] == 403


@pytest.mark.parametrize("content, message", [
    ("bogus = 1\n", "unknown option 'bogus'"),
    ("port = 'x'\n", "port must be an integer"),
    ('replacepath = ["/a", "/b"]\n', "replacepath must be a list of [REMOTE, LOCAL] pairs"),
    ('log-format = "xml"\n', "log-format must be one of text, json"),
    ("port = \n", "--config"),
])
def test_bad_config_file(tmp_path, content, message):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(content)
    proc = subprocess.run([str(AGENT_BIN), "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_example_config_is_valid(tmp_path, start_agent):
    example = (ROOT / "contrib" / "diskover-storage-agent.toml").read_text()
    assert 'replacepath = [\n    ["/mnt/isilon", "/ifs/data"],\n]' in example
    token = tmp_path / "token"
    token.write_text("abc\n")
    data = tmp_path / "data"
    data.mkdir()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(example.replace("/ifs/data", str(data)).replace("/etc/diskover-storage-agent/token", str(token))
                   + 'listen = "127.0.0.1"\nport = 0\n')  # the example leaves them at their defaults
    agent = start_agent([], extra=("--config", str(cfg)))
    assert get(agent, REMOTE)[0] == 401
    assert get(agent, REMOTE, token="abc")[0] == 200


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_verifies(tmp_path):
    unit = (ROOT / "contrib" / "systemd" / "diskover-storage-agent.service").read_text()
    exec_line = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert "--config /etc/diskover-storage-agent/agent.toml $DISKOVER_AGENT_OPTS" in exec_line
    local = tmp_path / "diskover-storage-agent.service"
    local.write_text(unit.replace("/opt/diskover-storage-agent/bin/diskover-storage-agent", str(AGENT_BIN)))
    proc = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                if "diskover" in line and "User=" not in line]  # the service user exists only on a node
    assert problems == [], problems
    env = (ROOT / "contrib" / "systemd" / "diskover-storage-agent.env").read_text()
    assert 'DISKOVER_AGENT_OPTS=""' in env
