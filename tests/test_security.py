"""Authentication and transport: the bearer token (``--token-file`` / ``DISKOVER_AGENT_TOKEN``),
TLS (``--tls-cert`` / ``--tls-key``) on agent and client, and the start-up warnings when either
is missing. Every test talks to a real agent process on loopback."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from diskover_agent import AgentConnection, parallel_walk
from diskover_agent.errors import AgentConnectionError, AgentError, AgentHTTPError

from conftest import REMOTE, agent_starter, as_bytes_rows, http_get, reference_walk

trustme = pytest.importorskip("trustme", reason="trustme makes the test certificates")

TOKEN_ENV = "DISKOVER_AGENT_TOKEN"
TOKEN = "s3cr3t-T0ken_for.tests~42"
CHALLENGE = 'Bearer realm="diskover-storage-agent"'


# -- helpers -------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _no_token_in_env(monkeypatch):
    """Agents and clients start without a token from the environment unless a test sets one."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)


def make_tree(top: Path) -> Path:
    for d in ("a/x", "a/y", "b", "c/deep/er"):
        (top / d).mkdir(parents=True)
    for f in ("f1", "a/f2", "a/x/f3", "c/deep/er/f4"):
        (top / f).write_bytes(b"data")
    (top / "link").symlink_to("a")
    return top


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("security") / "tree")


#: Like conftest's ``start_agent``, for agents shared by the tests of this module.
module_agent = pytest.fixture(agent_starter, scope="module", name="module_agent")


def text_listing(local: Path) -> bytes:
    """The agent's plain listing of ``local``: sorted by name bytes, directories as ``name/``."""
    with os.scandir(os.fsencode(local)) as it:
        entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
    return b"".join(name + (b"/\n" if is_dir else b"\n") for name, is_dir in entries)


def get(agent, target: str = REMOTE, **kwargs) -> tuple[int, http.client.HTTPMessage, bytes]:
    return http_get(agent.port, target, **kwargs)


def token_file(tmp_path: Path, content: str = TOKEN + "\n") -> str:
    path = tmp_path / "token"
    path.write_text(content)
    path.chmod(0o600)
    return str(path)


def run_agent_cli(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    """Run the agent's command line to completion (for start-up errors)."""
    cmd = [sys.executable, "-m", "diskover_storage_agent", "-l", "127.0.0.1", "-p", "0", *args]
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # it started serving instead of refusing to
        raise AssertionError(f"the agent did not exit: {exc.stderr!r}") from None


def assert_clear_startup_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert " listening on " not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines, "no message at all"
    message = lines[-1]
    assert message.startswith("diskover-storage-agent: error:"), r.stderr
    for needle in needles:
        assert needle in message, (needle, r.stderr)


def walk_rows(agent, **options):
    return as_bytes_rows(parallel_walk(REMOTE, hosts=[agent.hostspec], workers=4, **options))


# -- the bearer token: the agent's side ------------------------------------------------------

@pytest.fixture(scope="module")
def token_agent(tree, module_agent, tmp_path_factory):
    return module_agent([(REMOTE, str(tree))], extra=("--token-file", token_file(tmp_path_factory.mktemp("tok"))))


def test_no_authorization_header_is_401_with_challenge(tree, token_agent):
    for method, target, body in (("GET", REMOTE, None), ("GET", REMOTE + "/a?format=ndjson&stat=1", None),
                                 ("HEAD", REMOTE, None),
                                 ("POST", "/_agent/v1/walk?format=ndjson", b'{"paths": ["/mnt/isilon"]}')):
        headers = {"Content-Type": "application/json"} if body else {}
        status, hdrs, data = get(token_agent, target, method=method, headers=headers, body=body)
        assert status == 401, (method, target, status, data)
        challenge = hdrs.get("WWW-Authenticate", "")
        assert challenge.startswith(CHALLENGE), challenge
        assert "invalid_token" not in challenge  # nothing was sent, so nothing was invalid
        assert b"f1" not in data and b"deep" not in data  # nothing of the listing leaks
        if method == "GET":
            assert json.loads(data)["error"] == "unauthorized"


WRONG = ["Bearer wrong", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Bearer x{TOKEN}", "Bearer ",
         f"Basic {TOKEN}", TOKEN, f"Token {TOKEN}", f"Bearer {TOKEN.upper()}", f"Bearer {TOKEN} {TOKEN}"]


@pytest.mark.parametrize("endpoint", ["statvfs", "info"])
def test_agent_endpoints_need_the_token(tree, token_agent, endpoint):
    """The agent's own endpoints answer only with the token (``/_agent/health`` alone is open)."""
    target = {"statvfs": "/_agent/v1/statvfs" + REMOTE, "info": "/_agent/v1/info"}[endpoint]
    for method in ("GET", "HEAD"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, hdrs, data = get(token_agent, target, method=method, headers=headers)
            assert status == 401, (method, headers, status, data)
            assert hdrs.get("WWW-Authenticate", "").startswith(CHALLENGE)
            assert REMOTE.encode() not in data and b"f_blocks" not in data  # nothing of the answer leaks
    status, _, data = get(token_agent, target, headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200, data
    answer = json.loads(data)
    if endpoint == "statvfs":
        assert answer["f_blocks"] == os.statvfs(tree).f_blocks
    else:
        assert answer["exports"] == [REMOTE]


def test_wrong_token_is_401_invalid_token(tree, token_agent):
    for authorization in WRONG:
        status, hdrs, data = get(token_agent, headers={"Authorization": authorization})
        assert status == 401, (authorization, status, data)
        challenge = hdrs.get("WWW-Authenticate", "")
        assert challenge.startswith(CHALLENGE), challenge
        assert 'error="invalid_token"' in challenge, (authorization, challenge)
        assert b"f1" not in data


def test_right_token_lists(tree, token_agent):
    for scheme in ("Bearer", "bearer", "BEARER"):
        check_right_token(tree, token_agent, scheme)


def check_right_token(tree, token_agent, scheme):
    status, _, data = get(token_agent, headers={"Authorization": f"{scheme} {TOKEN}"})
    assert status == 200, data
    assert data == text_listing(tree)
    # and the walk endpoint, too
    status, _, data = get(token_agent, "/_agent/v1/walk?format=ndjson", method="POST",
                          headers={"Authorization": f"{scheme} {TOKEN}", "Content-Type": "application/json"},
                          body=b'{"paths": ["/mnt/isilon"]}')
    assert status == 200, data
    assert json.loads(data.splitlines()[0])[:2] == ["dir", REMOTE]


def test_token_from_agent_environment(tree, start_agent, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    agent = start_agent([(REMOTE, str(tree))])
    monkeypatch.delenv(TOKEN_ENV)
    status, hdrs, _ = get(agent)
    assert status == 401 and hdrs["WWW-Authenticate"].startswith(CHALLENGE)
    status, hdrs, _ = get(agent, headers={"Authorization": "Bearer nope"})
    assert status == 401 and 'error="invalid_token"' in hdrs["WWW-Authenticate"]
    status, _, data = get(agent, headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and data == text_listing(tree)


def test_token_never_logged(tree, tmp_path, start_agent):
    agent = start_agent([(REMOTE, str(tree))], extra=("--token-file", token_file(tmp_path), "-vv"))
    wrong = "WrongTokenValue-0123456789"
    for auth in (f"Bearer {TOKEN}", f"Bearer {wrong}", f"Bearer {TOKEN}{wrong}", f"Basic {TOKEN}", TOKEN):
        get(agent, REMOTE + "/a", headers={"Authorization": auth})
        get(agent, REMOTE + "/nope", headers={"Authorization": auth})
    rows = walk_rows(agent, token=TOKEN)
    assert rows == reference_walk(tree)[0]
    assert AgentConnection([agent.hostspec], token=TOKEN).listdir(REMOTE)[0] == REMOTE
    assert agent.terminate() == 0  # the whole log is in once the agent has exited
    log = "".join(agent.log)
    assert "/mnt/isilon/nope" in log, "the requests should be logged at -vv"
    assert TOKEN not in log
    assert wrong not in log
    assert TOKEN[: len(TOKEN) // 2] not in log  # not even in part


# -- the bearer token: the client's side -----------------------------------------------------

def test_client_token_option(tree, token_agent):
    conn = AgentConnection([token_agent.hostspec], token=TOKEN)
    with os.scandir(tree) as it:
        names = sorted(it, key=lambda e: e.name)
    dirs = sorted(e.name for e in names if e.is_dir())
    files = sorted(e.name for e in names if not e.is_dir())
    path, got_dirs, got_files = conn.listdir(REMOTE)
    assert (path, sorted(got_dirs), sorted(got_files)) == (REMOTE, dirs, files)
    assert walk_rows(token_agent, token=TOKEN) == reference_walk(tree)[0]


def test_client_token_from_environment(tree, token_agent, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    path, dirs, files = AgentConnection([token_agent.hostspec]).listdir(REMOTE + "/a")
    assert (path, sorted(dirs), sorted(files)) == (REMOTE + "/a", ["x", "y"], ["f2"])
    assert walk_rows(token_agent) == reference_walk(tree)[0]
    # the option wins over the environment
    monkeypatch.setenv(TOKEN_ENV, "not-the-token")
    assert walk_rows(token_agent, token=TOKEN) == reference_walk(tree)[0]


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_client_refused_token_is_fatal_and_fast(tree, token_agent, token):
    with pytest.raises(AgentHTTPError) as info:
        AgentConnection([token_agent.hostspec], token=token).listdir(REMOTE)
    assert info.value.status == 401
    start = time.monotonic()
    with pytest.raises(AgentHTTPError) as info:
        list(parallel_walk(REMOTE, hosts=[token_agent.hostspec], token=token, retry_for=30))
    assert info.value.status == 401
    assert not isinstance(info.value, AgentConnectionError)
    assert time.monotonic() - start < 5, "a refused token must not be retried for retry_for seconds"


@pytest.mark.parametrize("content", ["", "   \n\t\n"])
def test_empty_token_file_is_a_startup_error(tree, tmp_path, content):
    path = token_file(tmp_path, content)
    r = run_agent_cli("-r", REMOTE, str(tree), "--token-file", path)
    assert_clear_startup_error(r, "--token-file", path)
    assert "empty" in r.stderr.lower()


def test_missing_token_file_is_a_startup_error(tree, tmp_path):
    path = str(tmp_path / "no-such-token")
    r = run_agent_cli("-r", REMOTE, str(tree), "--token-file", path)
    assert_clear_startup_error(r, "--token-file", path)
    assert "No such file" in r.stderr


def test_unreadable_token_file_is_a_startup_error(tree, tmp_path):
    path = str(tmp_path)  # a directory: cannot be read as a token
    r = run_agent_cli("-r", REMOTE, str(tree), "--token-file", path)
    assert_clear_startup_error(r, "--token-file", path)


# -- TLS -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> SimpleNamespace:
    """A CA, a server certificate for the loopback names, and one for another name."""
    d = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server = ca.issue_cert("127.0.0.1", "localhost", "::1")
    server.private_key_pem.write_to_path(str(d / "key.pem"))
    server.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    for blob in server.cert_chain_pems[1:]:
        blob.write_to_path(str(d / "cert.pem"), append=True)
    other = ca.issue_cert("storage.example.com")
    other.private_key_pem.write_to_path(str(d / "other-key.pem"))
    other.cert_chain_pems[0].write_to_path(str(d / "other-cert.pem"))
    (d / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    return SimpleNamespace(ca=str(d / "ca.pem"), cert=str(d / "cert.pem"), key=str(d / "key.pem"),
                           other_cert=str(d / "other-cert.pem"), other_key=str(d / "other-key.pem"),
                           garbage=str(d / "garbage.pem"), dir=d)


@pytest.fixture(scope="module")
def tls_agent(tree, certs, module_agent):
    return module_agent([(REMOTE, str(tree))], extra=("--tls-cert", certs.cert, "--tls-key", certs.key))


def test_tls_agent_serves_https(tree, certs, tls_agent):
    assert tls_agent.url.startswith("https://"), tls_agent.url
    ctx = ssl.create_default_context(cafile=certs.ca)
    status, _, data = get(tls_agent, context=ctx)
    assert status == 200 and data == text_listing(tree)


def test_tls_client_with_cafile(tree, certs, tls_agent):
    conn = AgentConnection([tls_agent.hostspec], tls=True, cafile=certs.ca)
    path, dirs, files = conn.listdir(REMOTE)
    assert (path, sorted(dirs), sorted(files)) == (REMOTE, ["a", "b", "c", "link"], ["f1"])
    conn.close()
    expected, _ = reference_walk(tree)
    assert walk_rows(tls_agent, tls=True, cafile=certs.ca) == expected
    assert as_bytes_rows(parallel_walk(REMOTE, hosts=[f"localhost:{tls_agent.port}"], tls=True,
                                       cafile=certs.ca)) == expected


def test_tls_client_verifies_by_default(tree, tls_agent):
    start = time.monotonic()
    with pytest.raises(AgentError) as info:
        AgentConnection([tls_agent.hostspec], tls=True, timeout=5, connect_timeout=5).listdir(REMOTE)
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value) or "certificate verify failed" in str(info.value)
    with pytest.raises(AgentError):
        list(parallel_walk(REMOTE, hosts=[tls_agent.hostspec], tls=True, retry_for=1, timeout=5, connect_timeout=5))
    assert time.monotonic() - start < 10


def test_tls_walk_error_says_the_certificate_failed(tree, tls_agent):
    """A walk that cannot verify the agent's certificate says so: "no agent answered"
    would send the operator looking for a network problem."""
    with pytest.raises(AgentError) as info:
        list(parallel_walk(REMOTE, hosts=[tls_agent.hostspec], tls=True, retry_for=1, timeout=5, connect_timeout=5))
    chain, exc = [], info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    text = " | ".join(chain).lower()
    assert "certificate" in text, text


def test_tls_client_checks_the_name(tree, certs, start_agent):
    agent = start_agent([(REMOTE, str(tree))], extra=("--tls-cert", certs.other_cert, "--tls-key", certs.other_key))
    with pytest.raises(AgentError) as info:
        AgentConnection([agent.hostspec], tls=True, cafile=certs.ca, timeout=5, connect_timeout=5).listdir(REMOTE)
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value) or "certificate verify failed" in str(info.value)
    # told explicitly not to verify, the same agent is listed
    _, dirs, _ = AgentConnection([agent.hostspec], tls=True, verify=False).listdir(REMOTE)
    assert sorted(dirs) == ["a", "b", "c", "link"]


def test_tls_client_verify_false(tree, tls_agent):
    path, dirs, files = AgentConnection([tls_agent.hostspec], tls=True, verify=False).listdir(REMOTE + "/a")
    assert (path, sorted(dirs), sorted(files)) == (REMOTE + "/a", ["x", "y"], ["f2"])
    assert walk_rows(tls_agent, tls=True, verify=False) == reference_walk(tree)[0]


def test_plain_http_client_against_tls_agent_fails_cleanly(tree, tls_agent):
    start = time.monotonic()
    with pytest.raises(AgentError):
        AgentConnection([tls_agent.hostspec], timeout=3, connect_timeout=3).listdir(REMOTE)
    assert time.monotonic() - start < 6
    start = time.monotonic()
    with pytest.raises(AgentError):
        list(parallel_walk(REMOTE, hosts=[tls_agent.hostspec], retry_for=1, timeout=3, connect_timeout=3))
    assert time.monotonic() - start < 1 + 3 + 3
    # and the agent still serves TLS clients afterwards
    assert AgentConnection([tls_agent.hostspec], tls=True, verify=False).listdir(REMOTE)[0] == REMOTE


def test_tls_client_against_plain_agent_fails_cleanly(tree, certs, start_agent):
    agent = start_agent([(REMOTE, str(tree))])
    start = time.monotonic()
    with pytest.raises(AgentError):
        AgentConnection([agent.hostspec], tls=True, cafile=certs.ca, timeout=3, connect_timeout=3).listdir(REMOTE)
    assert time.monotonic() - start < 6


def test_token_and_tls_together(tree, certs, tmp_path, start_agent):
    agent = start_agent([(REMOTE, str(tree))], extra=("--tls-cert", certs.cert, "--tls-key", certs.key,
                                                       "--token-file", token_file(tmp_path)))
    ctx = ssl.create_default_context(cafile=certs.ca)
    status, hdrs, _ = get(agent, context=ctx)
    assert status == 401 and hdrs["WWW-Authenticate"].startswith(CHALLENGE)
    with pytest.raises(AgentHTTPError) as info:
        AgentConnection([agent.hostspec], tls=True, cafile=certs.ca).listdir(REMOTE)
    assert info.value.status == 401
    _, dirs, _ = AgentConnection([agent.hostspec], tls=True, cafile=certs.ca, token=TOKEN).listdir(REMOTE)
    assert sorted(dirs) == ["a", "b", "c", "link"]


#: Bad TLS files, as (--tls-cert, --tls-key): attributes of ``certs``, "missing" for a file
#: that does not exist, None to leave the option out.
BAD_TLS = {
    "missing-cert": ("missing", "key"),
    "missing-key": ("cert", "missing"),
    "garbage-cert": ("garbage", "key"),
    "key-of-other-cert": ("cert", "other_key"),
    "cert-without-key": ("cert", None),
    "key-without-cert": (None, "key"),
}


@pytest.mark.parametrize("case", list(BAD_TLS))
def test_bad_tls_files_are_a_startup_error(tree, certs, case):
    args = []
    for option, name in zip(("--tls-cert", "--tls-key"), BAD_TLS[case], strict=True):
        if name is not None:
            args += [option, str(certs.dir / "no-such.pem") if name == "missing" else getattr(certs, name)]
    r = run_agent_cli("-r", REMOTE, str(tree), *args)
    assert_clear_startup_error(r)
    assert "--tls-cert" in r.stderr or "--tls-key" in r.stderr, r.stderr


# -- start-up warnings --------------------------------------------------------------------------

def warnings_of(agent) -> list[str]:
    """The agent's WARNING lines, once it has exited (so that its whole log is in)."""
    assert agent.terminate() == 0
    return [line for line in agent.log if " WARNING " in line or '"level": "warning"' in line
            or '"level":"warning"' in line]


def test_warns_without_token_and_tls(tree, start_agent):
    warnings = warnings_of(start_agent([(REMOTE, str(tree))]))
    text = " ".join(warnings).lower()
    assert "token" in text, warnings
    assert "tls" in text or "unencrypted" in text, warnings


def test_warns_about_tls_with_a_token_alone(tree, tmp_path, start_agent):
    warnings = warnings_of(start_agent([(REMOTE, str(tree))], extra=("--token-file", token_file(tmp_path))))
    assert warnings, "listings (and the token) travel in clear text: that deserves a warning"
    assert not any("--token-file" in w for w in warnings), warnings


def test_warns_about_the_token_with_tls_alone(tree, certs, start_agent):
    warnings = warnings_of(start_agent([(REMOTE, str(tree))], extra=("--tls-cert", certs.cert,
                                                                     "--tls-key", certs.key)))
    assert warnings, "without a token any client can list the exports: that deserves a warning"
    assert not any("unencrypted" in w or "--tls-cert" in w for w in warnings), warnings


def test_no_warning_with_token_and_tls(tree, certs, tmp_path, start_agent):
    agent = start_agent([(REMOTE, str(tree))], extra=("--tls-cert", certs.cert, "--tls-key", certs.key,
                                                       "--token-file", token_file(tmp_path)))
    assert warnings_of(agent) == []
