"""Nothing outside an export is ever listed: not through ``..`` in any encoding, not through
prefix tricks, not through symlinks inside the export that lead out of it.

Layout (``tmp`` is a fresh temporary directory)::

    tmp/exported/            exported as /mnt/isilon
        sub/ inner-file subsub/deep-file up-out -> ../../outside up-in -> ../sub/subsub
        file
        link-out  -> ../outside            (relative escape)
        abs-out   -> <tmp>/outside         (absolute escape)
        abs-out2  -> <tmp>/exported2       (sibling sharing the export's name as a prefix)
        rel-out2  -> ../exported2
        abs-sneak -> <tmp>/exported/sub/../../outside
        root-link -> /
        chain     -> link-out
        abs-in    -> <tmp>/exported/sub    (absolute but inside: works)
        rel-in    -> sub                   (works)
    tmp/exported2/canary-exported2-<random>
    tmp/outside/canary-outside-<random>  outside/x/canary-x-<random>
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import uuid
from pathlib import Path
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diskover_agent
from diskover_agent.protocol import DirFrame, EndFrame, EntriesFrame, read_frames

from conftest import REMOTE, Agent


class Layout:
    def __init__(self, tmp: Path) -> None:
        tag = uuid.uuid4().hex[:12]
        self.tmp = tmp
        self.exported = tmp / "exported"
        self.exported2 = tmp / "exported2"
        self.outside = tmp / "outside"
        self.canaries = [f"canary-exported2-{tag}", f"canary-outside-{tag}", f"canary-x-{tag}"]
        for d in (self.exported / "sub" / "subsub", self.exported2, self.outside / "x"):
            d.mkdir(parents=True)
        (self.exported2 / self.canaries[0]).write_text("secret")
        (self.outside / self.canaries[1]).write_text("secret")
        (self.outside / "x" / self.canaries[2]).write_text("secret")
        (self.exported / "file").write_text("f")
        (self.exported / "sub" / "inner-file").write_text("i")
        (self.exported / "sub" / "subsub" / "deep-file").write_text("d")
        links = {
            "link-out": "../outside",
            "abs-out": str(self.outside),
            "abs-out2": str(self.exported2),
            "rel-out2": "../exported2",
            "abs-sneak": f"{self.exported}/sub/../../outside",
            "root-link": "/",
            "chain": "link-out",
            "abs-in": str(self.exported / "sub"),
            "rel-in": "sub",
            "sub/up-out": "../../outside",
            "sub/up-in": "../sub/subsub",
        }
        for name, target in links.items():
            os.symlink(target, self.exported / name)
        # every directory really inside the export, as the text format lists it
        self.inside_text: dict[bytes, bytes] = {}
        self.inside_names: set[frozenset] = set()
        for dirpath, _dirs, _files in os.walk(os.fsencode(self.exported)):
            self.inside_text[dirpath] = text_listing(dirpath)
            self.inside_names.add(frozenset(os.listdir(dirpath)))
        assert len(self.inside_text) == 3


ESCAPES = ["link-out", "abs-out", "abs-out2", "rel-out2", "abs-sneak", "root-link", "chain", "sub/up-out"]
INSIDE = {"abs-in": "sub", "rel-in": "sub", "sub/up-in": "sub/subsub", "abs-in/subsub": "sub/subsub",
          "rel-in/up-in": "sub/subsub", "abs-in/up-in": "sub/subsub"}


def text_listing(local: bytes) -> bytes:
    with os.scandir(local) as it:
        items = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
    return b"".join(n + (b"/\n" if d else b"\n") for n, d in items)


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Layout:
    return Layout(tmp_path_factory.mktemp("confine"))


@pytest.fixture(scope="module")
def agent(layout):
    a = Agent([(REMOTE, str(layout.exported))])
    yield a
    a.stop()


def exchange(port: int, target: bytes) -> tuple[int, str, bytes]:
    """One request with a raw request target (bytes exactly as given) on a fresh socket."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        resp = http.client.HTTPResponse(sock, method="GET")
        resp.begin()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()


def structured_names(ctype: str, body: bytes) -> frozenset:
    if "msgpack" in ctype:
        frames = list(read_frames(io.BytesIO(body).read))
        assert isinstance(frames[0], DirFrame) and isinstance(frames[-1], EndFrame)
        return frozenset(e.name for f in frames if isinstance(f, EntriesFrame) for e in f.entries)
    frames = [json.loads(line) for line in body.splitlines()]
    assert frames[0][0] == "dir" and frames[-1][0] == "end"
    return frozenset(e[0].encode() if isinstance(e[0], str) else base64.b64decode(e[0]["b64"])
                     for f in frames if f[0] == "entries" for e in f[1])


def assert_no_canary(layout: Layout, body: bytes) -> None:
    assert b"canary" not in body, body[:500]
    for c in layout.canaries:
        assert c.encode() not in body


# -- symlinks ------------------------------------------------------------------------------

@pytest.mark.parametrize("query", ["", "?format=msgpack", "?format=ndjson&stat=1"])
def test_symlinks_leading_out_are_refused(layout, agent, query):
    problems = []
    for link in ESCAPES:
        for suffix in ("", "/", "/x", "/x/", "/./x", "/" + layout.canaries[1]):
            target = f"{REMOTE}/{link}{suffix}{query}".encode()
            status, ctype, body = exchange(agent.port, target)
            if ctype.startswith("application/json"):  # an error may echo the path asked for
                echoed = json.loads(body)
                echoed.pop("path", None)
                assert_no_canary(layout, json.dumps(echoed).encode())
            else:
                assert_no_canary(layout, body)
            if status != 403:
                problems.append(f"{target!r}: {status} {body[:200]!r}")
            elif json.loads(body).get("error") not in ("not_exported", "EACCES"):
                problems.append(f"{target!r}: error body {body!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("query", ["", "?format=msgpack", "?format=ndjson"])
def test_symlinks_staying_inside_work(layout, agent, query):
    for link, real in INSIDE.items():
        status, ctype, body = exchange(agent.port, f"{REMOTE}/{link}{query}".encode())
        assert status == 200, (link, body)
        local = os.fsencode(layout.exported / real)
        if query:
            assert structured_names(ctype, body) == frozenset(os.listdir(local)), link
        else:
            assert body == layout.inside_text[local], link


def test_export_listing_shows_links_without_following_them(layout, agent):
    status, _, body = exchange(agent.port, REMOTE.encode())
    assert status == 200
    assert body == layout.inside_text[os.fsencode(layout.exported)]
    lines = body.split(b"\n")
    assert b"sub/" in lines
    for link in [*ESCAPES, "abs-in", "rel-in"]:
        if "/" not in link:
            assert link.encode() in lines, link  # listed as an entry, not followed
    for query in ("?format=msgpack&stat=1", "?format=ndjson&stat=1"):
        status, _, body = exchange(agent.port, (REMOTE + query).encode())
        assert status == 200
        assert_no_canary(layout, body)


def test_prefix_and_dotdot_tricks(layout, agent):
    outside = quote_from_bytes(os.fsencode(layout.outside))
    cases = {
        "/mnt/isilon2": 403, "/mnt/isilon2/": 403, "/mnt": 403, "/mnt/": 403, "/": 403, "/etc": 403,
        outside: 403, outside + "/x": 403, quote_from_bytes(os.fsencode(layout.exported2)): 403,
        "/mnt/isilon/..": 400, "/mnt/isilon/%2e%2e/isilon2": 400, "/mnt/isilon/%2E%2e/outside": 400,
        "/mnt/isilon/sub/../../outside": 400, "/mnt/isilon/%2e%2e%2foutside": 400,
        "/mnt/isilon/sub%2f..%2f..%2foutside": 400, "/mnt/isilon/..%5c..%5coutside": 404,
        "/mnt/isilon/%252e%252e/outside": 404, "/mnt/isilon/%00/../outside": 400,
        "/mnt/isilon/abs-in/../../outside": 400,
    }
    problems = []
    for target, want in cases.items():
        status, _, body = exchange(agent.port, target.encode())
        assert_no_canary(layout, body)
        if status != want:
            problems.append(f"{target}: {status}, want {want}: {body[:200]!r}")
    assert not problems, "\n".join(problems)


def test_client_sees_permission_errors_and_a_confined_walk(layout, agent):
    c = diskover_agent.AgentConnection(hosts=[agent.hostspec])
    for link in ESCAPES:
        with pytest.raises(PermissionError) as info:
            c.listdir(f"{REMOTE}/{link}")
        assert info.value.filename == f"{REMOTE}/{link}"
    _, dirs, files = c.listdir(REMOTE + "/abs-in")
    # split as os.walk splits the local directory (symlinks to directories are dirs)
    local = next((r, sorted(d), sorted(f)) for r, d, f in os.walk(layout.exported / "sub"))
    assert (sorted(dirs), sorted(files)) == (local[1], local[2]) == (["subsub", "up-in", "up-out"], ["inner-file"])
    c.close()
    errors = []
    rows = list(diskover_agent.parallel_walk(REMOTE, hosts=[agent.hostspec], workers=4, onerror=errors.append))
    assert errors == []
    names = [n for root, dirs, files in rows for n in [root, *dirs, *files]]
    assert not [n for n in names if "canary" in n]
    assert sorted(r for r, _, _ in rows) == [REMOTE, REMOTE + "/sub", REMOTE + "/sub/subsub"]


# -- fuzzing the path and query handling ----------------------------------------------------

#: Names found in (or around) the layout, and tricks: dot-dot in every encoding, separators,
#: NUL, bytes that are not UTF-8 (encoded and raw), over-long names.
NAMES = ["isilon", "isilon2", "mnt", "exported", "exported2", "outside", "x", "link-out", "abs-out", "abs-out2",
         "rel-out2", "abs-sneak", "root-link", "chain", "abs-in", "rel-in", "sub", "subsub", "up-out", "up-in",
         "inner-file", "file", "etc", "passwd", ".", "", "%73ub", "%2e"]
TRICKS = ["..", "%2e%2e", "%2E%2e", "%2e.", ".%2E", "%252e%252e", "%25%32%65", "%2f", "%2F", "\\", "%5c",
          "..\\..", "%5c..", "..%2f..", "%2e%2e%2f%2e%2e", "%c0%ae%c0%ae", "...", "%00", "%ff", "%FF%FE",
          "a" * 255, "b" * 300, "c" * 1500, "%61" * 90, "?", "#", ";", "%3f", "%23", "\xff", "\xc3\xa9", " "]
SEPARATORS = ["/", "/", "/", "/", "//", "/./", "%2f", "\\", "%5c", "/%2e/"]
PREFIXES = ["/mnt/isilon", "/mnt/isilon", "/mnt/isilon", "/mnt/isilon", "/mnt", "", "/mnt/isilon2", "/etc",
            "//mnt//isilon", "/mnt/./isilon", "/mnt%2fisilon", "/%6dnt/isilon", "/mnt/isilon%2f", "/mnt/isilon/sub",
            "/mnt/isilon/abs-in", "/mnt/isilon/rel-in/up-in", "/mnt/isilon/link-out", "/mnt/isilon/chain"]
#: Names that lead somewhere inside the export, to reach its directories often.
INSIDE_NAMES = ["sub", "subsub", "abs-in", "rel-in", "up-in", ".", ""]
QUERIES = ["", "", "", "", "", "?format=msgpack", "?format=ndjson&stat=1", "?stat=1&format=msgpack",
           "?format=text", "?format=%00", "?x=..", "?format=../etc", "?", "?format=ndjson&format=msgpack"]
COMPONENT = st.one_of(st.sampled_from(INSIDE_NAMES), st.sampled_from(NAMES), st.sampled_from(TRICKS))


@st.composite
def targets(draw) -> bytes:
    parts = draw(st.lists(st.tuples(st.sampled_from(SEPARATORS), COMPONENT), max_size=5))
    target = draw(st.sampled_from(PREFIXES)) + "".join(sep + comp for sep, comp in parts)
    if draw(st.booleans()):
        target += draw(st.sampled_from(["/", "//", "/.", "%2f"]))
    if not target.startswith("/"):
        target = "/" + target
    # latin-1: characters stand for the raw bytes sent (some are not valid in a request line)
    return (target + draw(st.one_of(st.just(""), st.sampled_from(QUERIES)))).encode("latin-1")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          database=None)
@given(target=targets())
def test_fuzz_requests_stay_inside_the_export(layout, agent, target):
    status, ctype, body = exchange(agent.port, target)
    assert status in (200, 400, 403, 404), (target, status, body[:300])
    assert_no_canary(layout, body)
    assert b"Traceback" not in body
    if status == 200:
        if ctype.startswith("text/plain"):
            assert body in layout.inside_text.values(), (target, body)
        else:
            assert structured_names(ctype, body) in layout.inside_names, (target, body[:300])
    assert agent.proc.poll() is None, f"agent died on {target!r}"


def test_agent_survived_the_fuzzing(layout, agent):
    assert agent.proc.poll() is None
    status, _, body = exchange(agent.port, REMOTE.encode())
    assert status == 200 and body == layout.inside_text[os.fsencode(layout.exported)]
