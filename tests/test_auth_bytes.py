"""Authorization bytes and token files: any ``Authorization`` header but the right token is a
401, never a 500 nor a logged traceback, whatever its bytes; a token file (agent or client)
holding anything but one line of printable ASCII is refused at start-up with one line that
never quotes the file. Real agent processes on loopback, raw sockets."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from diskover_agent import AgentConnection
from diskover_agent.transport import read_token_file

from conftest import REMOTE, Agent, http_get

TOKEN = "s3cr3t-T0ken_for.tests~42"
TOKEN_ENV = "DISKOVER_AGENT_TOKEN"
#: A file given by mistake: a private key (fake), many lines.
FAKE_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "QyNTUxOQAAACBmYWtlLWtleS1mb3ItdGVzdHMtb25seS1ub3QtYS1yZWFsLWtleQAAAJh0\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)


@pytest.fixture(autouse=True)
def _no_token_in_env(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    top = tmp_path_factory.mktemp("auth") / "tree"
    (top / "a").mkdir(parents=True)
    (top / "f").write_bytes(b"x")
    return top


@pytest.fixture(scope="module")
def agent(tree, tmp_path_factory):
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN + "\n")
    a = Agent([(REMOTE, str(tree))], extra=("--token-file", str(path), "-v"))
    yield a
    a.stop()


def raw_request(port: int, auth: list[bytes], target: bytes = REMOTE.encode(),
                method: bytes = b"GET", body: bytes = b"") -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request whose Authorization headers are exactly the bytes given."""
    head = [method + b" " + target + b" HTTP/1.1", b"Host: x", b"Connection: close"]
    head += [b"Authorization: " + value for value in auth]
    if body:
        head += [b"Content-Type: application/json", b"Content-Length: %d" % len(body)]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        resp = http.client.HTTPResponse(s, method=method.decode())
        resp.begin()
        return resp.status, resp.headers, resp.read()


WRONG = {
    "utf-8 text": ["Bearer tökén-ünïcødé".encode()],
    "latin-1 bytes": [b"Bearer caf\xe9-cr\xe8me"],
    "invalid utf-8": [b"Bearer \xc3\x28\xff\xfe"],
    "non-ascii scheme": [b"B\xe9arer " + TOKEN.encode()],
    "right token then latin-1": [b"Bearer " + TOKEN.encode() + b"\xe9"],
    "very long": [b"Bearer " + b"x" * 7000],
    "very long non-ascii": [b"Bearer " + b"\xff" * 7000],
    "Bearer alone": [b"Bearer"],
    "Bearer and a space": [b"Bearer "],
    "empty": [b""],
    "Basic": [b"Basic dXNlcjpwYXNz"],
    "other scheme, right token": [b"Token " + TOKEN.encode()],
    "token alone": [TOKEN.encode()],
    "prefix of the token": [b"Bearer " + TOKEN[:-1].encode()],
    "token twice": [b"Bearer " + TOKEN.encode() + b" " + TOKEN.encode()],
    "two headers, one right": [b"Bearer " + TOKEN.encode(), b"Bearer wrong"],
    "two right headers": [b"Bearer " + TOKEN.encode(), b"Bearer " + TOKEN.encode()],
}


def log_since(agent: Agent, since: int) -> str:
    """What the agent logged since line ``since``, once a marker request has been logged."""
    marker = f"sync-{uuid.uuid4().hex}"
    assert raw_request(agent.port, [b"Bearer " + TOKEN.encode()], f"{REMOTE}/{marker}".encode())[0] == 404
    deadline = time.monotonic() + 10
    while marker not in "".join(agent.log[since:]):
        assert time.monotonic() < deadline, "the agent did not log the marker request"
        time.sleep(0.02)
    return "".join(agent.log[since:])


@pytest.mark.parametrize("case", WRONG)
@pytest.mark.parametrize("where", ["listing", "walk", "metrics"])
def test_any_other_authorization_is_401(agent, case, where):
    since = len(agent.log)
    if where == "walk":
        args = {"target": b"/_agent/v1/walk", "method": b"POST", "body": b'{"paths": ["/mnt/isilon"]}'}
    else:
        args = {"target": REMOTE.encode() if where == "listing" else b"/_agent/metrics"}
    status, headers, body = raw_request(agent.port, WRONG[case], **args)
    assert status == 401, (status, body)
    assert headers["WWW-Authenticate"].startswith('Bearer realm="diskover-storage-agent"')
    assert b"unauthorized" in body
    log = log_since(agent, since)
    assert "Traceback" not in log and "internal error" not in log, log
    assert TOKEN not in log


@pytest.mark.parametrize("value", [b"Bearer " + TOKEN.encode(), b"bearer " + TOKEN.encode(),
                                   b"BEARER  " + TOKEN.encode() + b"  "])
def test_the_right_token_lists(agent, value):
    status, _, body = raw_request(agent.port, [value])
    assert (status, body) == (200, b"a/\nf\n")


# -- token files -----------------------------------------------------------------------------

BAD_FILES = {
    "private key": FAKE_KEY.encode(),
    "two lines": b"first-line-of-secret\nsecond-line-of-secret\n",
    "non-ascii": "s3cr\u00e9t-with-acc\u00e9nt\n".encode(),
    "latin-1": b"s3cr\xe9t-latin-1\n",
    "invalid utf-8": b"s3cr\xc3\x28t\xff\n",
    "inner space": b"s3cr3t-one s3cr3t-two\n",
    "control character": b"secret\x07bell\n",
    "huge": b"A" * 100_000,
}


def secrets_of(content: bytes) -> list[str]:
    """Pieces of a file's content that no message may show."""
    text = content.decode("latin-1")
    return [piece for piece in text.replace("\n", " ").split() if len(piece) >= 6] or [text.strip()]


@pytest.mark.parametrize("case", BAD_FILES)
def test_agent_refuses_a_bad_token_file_without_quoting_it(tree, tmp_path, case):
    path = tmp_path / "token"
    path.write_bytes(BAD_FILES[case])
    cmd = [sys.executable, "-m", "diskover_storage_agent", "-l", "127.0.0.1", "-p", "0",
           "-r", REMOTE, str(tree), "--token-file", str(path)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=20)
    except subprocess.TimeoutExpired:
        raise AssertionError("the agent started with a bad token file") from None
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], r.stderr
    for piece in secrets_of(BAD_FILES[case]):
        assert piece[:20] not in r.stderr


@pytest.mark.parametrize("case", BAD_FILES)
def test_client_refuses_a_bad_token_file_without_quoting_it(tmp_path, case):
    path = tmp_path / "token"
    path.write_bytes(BAD_FILES[case])
    script = Path(sys.executable).with_name("diskover-agent")
    cmd = [str(script), "--hosts", "127.0.0.1:9", "--token-file", str(path), "ls", REMOTE]
    r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=60)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(path) in r.stderr, r.stderr
    for piece in secrets_of(BAD_FILES[case]):
        assert piece[:20] not in r.stderr
    with pytest.raises(ValueError) as info:
        read_token_file(str(path))
    for piece in secrets_of(BAD_FILES[case]):
        assert piece[:20] not in str(info.value)


def test_client_refuses_a_bad_token_in_the_environment(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, FAKE_KEY)
    script = Path(sys.executable).with_name("diskover-agent")
    r = subprocess.run([str(script), "--hosts", "127.0.0.1:9", "ls", REMOTE], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert TOKEN_ENV in r.stderr
    for piece in secrets_of(FAKE_KEY.encode()):
        assert piece[:20] not in r.stderr
    with pytest.raises(ValueError) as info:
        AgentConnection(["127.0.0.1:9"])
    assert "BEGIN" not in str(info.value)


def test_a_good_token_file_with_its_newline_works(agent, tmp_path):
    path = tmp_path / "token"
    path.write_bytes(b"  " + TOKEN.encode() + b"\r\n")
    assert read_token_file(str(path)) == TOKEN
    script = Path(sys.executable).with_name("diskover-agent")
    r = subprocess.run([str(script), "--hosts", agent.hostspec, "--token-file", str(path), "ls", REMOTE],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["a", "f"] or "a" in r.stdout
    assert http_get(agent.port, REMOTE, headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    os.unlink(path)
