"""Every ``os.walk`` keyword through real agents: ``topdown=False``, ``followlinks=True``,
``onerror``, and ``readahead=False`` (os.walk's own order and timing)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from diskover_agent import AgentConnectionError, oswalk, parallel_walk, parallel_walk_entries
from diskover_agent.walk import Walker

from conftest import REMOTE, as_bytes_rows, reference_walk

ORDERS = [  # (topdown, readahead)
    pytest.param(True, True, id="topdown-readahead"),
    pytest.param(False, True, id="bottomup-readahead"),
    pytest.param(True, False, id="topdown-oswalk-timing"),
    pytest.param(False, False, id="bottomup-oswalk-timing"),
]


def collect(top, hosts, **kwargs):
    errors: list[OSError] = []
    rows = list(parallel_walk(top, hosts=hosts, onerror=errors.append, **kwargs))
    return rows, errors


def local_rows(local: Path, **kwargs) -> list[tuple[str, list[str], list[str]]]:
    """``os.walk`` of ``local`` with roots mapped to REMOTE, in its own order."""
    base = str(local)
    return [(REMOTE + r[len(base):], d, f) for r, d, f in os.walk(base, **kwargs)]


def below(root: str, other: str) -> bool:
    return other.startswith(root.rstrip("/") + "/")


def assert_order(rows, topdown: bool) -> None:
    """Top-down, no directory comes before its parent; bottom-up, none after it."""
    seen: set[str] = set()
    for root, _, _ in rows:
        parent = os.path.dirname(root)
        if root != REMOTE:
            assert (parent in seen) == topdown, (root, "yielded before" if topdown else "after", parent)
        seen.add(root)


def make_tree(top: Path, width: int = 6, depth: int = 3) -> Path:
    """``width`` subdirectories per level, ``depth`` levels, a file in each directory."""
    def fill(d: Path, level: int) -> None:
        d.mkdir()
        (d / f"f{level}").write_bytes(b"x")
        if level < depth:
            for i in range(width if level else width * 2):
                fill(d / f"d{i}", level + 1)
    fill(top, 0)
    return top


def postorder(rows_topdown_sorted: list[tuple[str, list[str], list[str]]]) -> list[str]:
    """Bottom-up order of a tree given by a top-down walk whose dirs were sorted."""
    children = {r: d for r, d, _ in rows_topdown_sorted}
    out: list[str] = []

    def visit(root: str) -> None:
        for name in children[root]:
            visit(os.path.join(root, name))
        out.append(root)

    visit(rows_topdown_sorted[0][0])
    return out


# -- topdown=False ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["subtree", "listdir"])
def test_bottom_up_is_exact_and_each_directory_after_its_subtree(tmp_path, start_agent, mode):
    top = make_tree(tmp_path / "t")
    os.symlink("d0", top / "link-to-dir")  # in dirs, not walked
    agents = [start_agent([(REMOTE, str(top))]) for _ in range(2)]
    rows, errors = collect(REMOTE, [a.hostspec for a in agents], workers=4, topdown=False, mode=mode,
                           max_budget=8)
    want = local_rows(top, topdown=False)
    assert errors == []
    assert len(rows) == len(want) == 1 + 12 + 72 + 432
    assert as_bytes_rows(rows) == as_bytes_rows(want)
    for i, (root, _, _) in enumerate(rows):  # no descendant comes after its ancestor
        assert not any(below(root, later) for later, _, _ in rows[i + 1:]), root
    assert rows[-1][0] == REMOTE
    assert "link-to-dir" in rows[-1][1]


def test_bottom_up_reports_errors_like_os_walk(awkward_tree, start_agent):
    agent = start_agent([(REMOTE, str(awkward_tree))], nocaps=True)
    expected, expected_errors = reference_walk(awkward_tree)
    rows, errors = collect(REMOTE, [agent.hostspec], workers=4, topdown=False)
    assert as_bytes_rows(rows) == expected and len(rows) == len(expected)
    assert sorted((e.errno, os.fsencode(e.filename)) for e in errors) == expected_errors
    assert {e[0] for e in expected_errors} == {errno.EACCES}  # the tree really has unreadable directories
    assert_order(rows, topdown=False)


def test_bottom_up_holds_only_what_is_incomplete(tmp_path, start_agent):
    """Each directory waiting for its subdirectories is an ancestor of a directory still
    pending in the engine (or of the one just yielded): what is held stays within
    depth x (pending + 1), never the tree."""
    depth = 4
    top = make_tree(tmp_path / "t", width=4, depth=depth)
    agents = [start_agent([(REMOTE, str(top))]) for _ in range(2)]
    walker = Walker(REMOTE, [a.hostspec for a in agents], workers=4, max_budget=8)
    walk = oswalk._Walk(REMOTE, walker, None, False, 4, oswalk._split_names)
    rows = []
    peak = 0
    for row in walk.bottom_up(walker.dirs()):
        rows.append(row)
        held = len(walk.held)
        peak = max(peak, held)
        # each held directory is an ancestor of one still pending (in the engine, or taken by the
        # generator in a batch and not yet yielded) or of the one just yielded
        pending = walker._outstanding + walker.in_hand
        assert held <= depth * (pending + 1), (held, walker._outstanding, walker.in_hand)
    assert len(rows) == 1 + 8 + 32 + 128 + 512
    assert walk.held == {}
    assert peak > 0  # directories did wait for their subdirectories


def test_bottom_up_ignores_changes_to_dirs(tmp_path, start_agent):
    top = make_tree(tmp_path / "t", width=3, depth=2)
    agent = start_agent([(REMOTE, str(top))])
    rows = []
    for root, dirs, files in parallel_walk(REMOTE, hosts=[agent.hostspec], topdown=False):
        rows.append((root, list(dirs), files))
        dirs.clear()  # as with os.walk: no effect bottom-up
    assert as_bytes_rows(rows) == as_bytes_rows(local_rows(top))


def test_bottom_up_entries(tmp_path, start_agent):
    top = make_tree(tmp_path / "t", width=3, depth=2)
    agent = start_agent([(REMOTE, str(top))])
    rows = [(r, [d.name for d in ds], [f.name for f in fs])
            for r, ds, fs in parallel_walk_entries(REMOTE, hosts=[agent.hostspec], topdown=False)]
    assert as_bytes_rows(rows) == as_bytes_rows(local_rows(top))
    assert_order(rows, topdown=False)


# -- followlinks=True ---------------------------------------------------------------------

@pytest.fixture
def linked_tree(tmp_path: Path) -> tuple[Path, Path]:
    """An export with links to directories inside it (relative, absolute) and one outside."""
    top = make_tree(tmp_path / "t", width=2, depth=2)
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "secret").write_bytes(b"s")
    os.symlink("d0/d1", top / "rel-link")
    os.symlink(top / "d1", top / "d0" / "abs-link")
    os.symlink(outside, top / "out-link")
    os.symlink("nowhere", top / "dangling")
    os.symlink("f0", top / "file-link")
    return top, outside


@pytest.mark.parametrize(("topdown", "readahead"), ORDERS)
def test_followlinks_walks_links_inside_the_export(linked_tree, start_agent, topdown, readahead):
    top, _ = linked_tree
    agent = start_agent([(REMOTE, str(top))])
    rows, errors = collect(REMOTE, [agent.hostspec], workers=4, followlinks=True, topdown=topdown,
                           readahead=readahead)
    out = REMOTE + "/out-link"
    want = [r for r in local_rows(top, followlinks=True) if r[0] != out and not below(out, r[0])]
    assert as_bytes_rows(rows) == as_bytes_rows(want) and len(rows) == len(want)
    assert {REMOTE + "/rel-link", REMOTE + "/d0/abs-link/d1"} <= {r for r, _, _ in rows}
    # the link out of the export is in dirs, as os.walk has it, and refused like an unreadable directory
    assert "out-link" in next(d for r, d, _ in rows if r == REMOTE)
    assert [(type(e), e.filename) for e in errors] == [(PermissionError, out)]
    assert_order(rows, topdown)
    # and without followlinks, no link is walked
    plain, _ = collect(REMOTE, [agent.hostspec], topdown=topdown, readahead=readahead)
    assert as_bytes_rows(plain) == as_bytes_rows(local_rows(top))


@pytest.mark.parametrize(("topdown", "readahead"), ORDERS)
def test_followlinks_loop_ends_at_the_symlink_limit(tmp_path, start_agent, topdown, readahead):
    """os.walk does not remember where it went: a link to its own directory is walked
    until the path holds 40 symlinks, the kernel's limit; so here, then ELOOP."""
    top = tmp_path / "t"
    (top / "d").mkdir(parents=True)
    (top / "d" / "f").write_bytes(b"x")
    os.symlink(".", top / "d" / "loop")
    agent = start_agent([(REMOTE, str(top))])
    rows, errors = collect(REMOTE, [agent.hostspec], workers=4, followlinks=True, topdown=topdown,
                           readahead=readahead)
    want = local_rows(top, followlinks=True)
    assert len(want) == 2 + 40
    assert sorted(r for r, _, _ in rows) == sorted(r for r, _, _ in want)
    assert [(e.errno, e.filename) for e in errors] == [(errno.ELOOP, REMOTE + "/d" + "/loop" * 41)]


@pytest.mark.parametrize("readahead", [True, False])
def test_followlinks_pruned_link_is_not_walked(linked_tree, start_agent, readahead):
    top, _ = linked_tree
    agent = start_agent([(REMOTE, str(top))])
    rows = []
    for root, dirs, files in parallel_walk(REMOTE, hosts=[agent.hostspec], followlinks=True, readahead=readahead):
        dirs[:] = [d for d in dirs if d not in ("rel-link", "out-link")]
        rows.append((root, list(dirs), files))
    want = []
    for root, dirs, files in os.walk(str(top), followlinks=True):
        dirs[:] = [d for d in dirs if d not in ("rel-link", "out-link")]
        want.append((REMOTE + root[len(str(top)):], list(dirs), files))
    assert as_bytes_rows(rows) == as_bytes_rows(want)
    assert any("abs-link" in r for r, _, _ in rows)


# -- readahead=False: os.walk's order and timing -----------------------------------------

def test_os_walk_order_exactly(tmp_path, start_agent):
    top = make_tree(tmp_path / "t", width=3, depth=3)
    agents = [start_agent([(REMOTE, str(top))]) for _ in range(2)]
    hosts = [a.hostspec for a in agents]
    want = []
    for root, dirs, files in os.walk(str(top)):  # in the file system's order, as the agents read it
        want.append((REMOTE + root[len(str(top)):], dirs, files))
    got = list(parallel_walk(REMOTE, hosts=hosts, workers=4, readahead=False))
    assert got == want
    got_up = [r for r, _, _ in parallel_walk(REMOTE, hosts=hosts, workers=4, readahead=False, topdown=False)]
    assert got_up == postorder(want)


def test_os_walk_timing_sees_changes_made_by_the_loop_body(tmp_path, start_agent):
    """A directory is read after its parent was yielded: what the loop body creates or
    renames below it is seen, as by os.walk."""
    top = make_tree(tmp_path / "t", width=2, depth=2)
    agent = start_agent([(REMOTE, str(top))])
    errors: list[OSError] = []
    roots = []
    for root, _, _ in parallel_walk(REMOTE, hosts=[agent.hostspec], readahead=False, onerror=errors.append):
        roots.append(root)
        if root == REMOTE:
            (top / "d0" / "made-by-body").mkdir()
            (top / "d1").rename(top / "renamed")
    assert REMOTE + "/d0/made-by-body" in roots
    assert REMOTE + "/d1" not in roots and REMOTE + "/renamed" not in roots
    assert [(type(e), e.filename) for e in errors] == [(FileNotFoundError, REMOTE + "/d1")]


def test_os_walk_timing_reads_a_bounded_window_ahead(tmp_path, start_agent):
    top = make_tree(tmp_path / "t", width=5, depth=3)
    agent = start_agent([(REMOTE, str(top))])
    window = 3
    for topdown in (True, False):
        walker = Walker(REMOTE, [agent.hostspec], workers=window, mode="listdir", expand=False)
        walk = oswalk._Walk(REMOTE, walker, None, False, window, oswalk._split_names)
        results = walker.dirs()
        n = 0
        for _ in walk.in_order(results, topdown):
            n += 1
            assert len(walk.ahead) <= window + 1 and len(walk.stash) <= window + 1
        results.close()
        assert n == 1 + 10 + 50 + 250
        assert not walk.ahead and not walk.stash


@pytest.mark.parametrize("topdown", [True, False])
def test_os_walk_timing_raises_when_the_agents_are_gone(tmp_path, start_agent, topdown):
    """The next directories are read only once the walk reaches them: with the only agent
    stopped at the first yield, the walk raises, as every walk does when no agent answers."""
    top = make_tree(tmp_path / "t", width=3, depth=3)
    agent = start_agent([(REMOTE, str(top))])
    walk = parallel_walk(REMOTE, hosts=[agent.hostspec], workers=2, readahead=False, topdown=topdown,
                         retry_for=1.0)
    next(walk)
    agent.stop()
    with pytest.raises(AgentConnectionError):
        list(walk)


def test_os_walk_timing_refuses_subtree_mode(start_agent, tmp_path):
    agent = start_agent([(REMOTE, str(tmp_path))])
    with pytest.raises(ValueError, match="readahead=False"):
        list(parallel_walk(REMOTE, hosts=[agent.hostspec], readahead=False, mode="subtree"))


# -- onerror --------------------------------------------------------------------------------

@pytest.mark.parametrize(("topdown", "readahead"), ORDERS)
def test_top_errors_reach_onerror_in_every_order(tmp_path, start_agent, topdown, readahead):
    (tmp_path / "file").write_bytes(b"x")
    agent = start_agent([(REMOTE, str(tmp_path))])
    for name, exc_type in (("nope", FileNotFoundError), ("file", NotADirectoryError)):
        local: list[OSError] = []
        assert list(os.walk(str(tmp_path / name), topdown=topdown, onerror=local.append)) == []
        rows, errors = collect(f"{REMOTE}/{name}", [agent.hostspec], topdown=topdown, readahead=readahead)
        assert rows == []
        assert [(type(e), e.errno, e.filename) for e in errors] == [(exc_type, local[0].errno, f"{REMOTE}/{name}")]
    # without onerror, errors are ignored, as by os.walk
    assert list(parallel_walk(REMOTE + "/nope", hosts=[agent.hostspec], topdown=topdown, readahead=readahead)) == []


def test_one_subtree_answer_comes_in_os_walk_order(tmp_path, start_agent):
    """The agent walks children in name order, so a walk that one answer holds yields
    directories in the order os.walk gives with sorted dirs, whatever the file system's."""
    top = tmp_path / "t"
    for i in (j * 7 % 30 for j in range(30)):  # created out of order
        (top / f"n{i:02}" / "sub").mkdir(parents=True)
    agent = start_agent([(REMOTE, str(top))])
    want = []
    for root, dirs, _ in os.walk(str(top)):
        dirs.sort()
        want.append(REMOTE + root[len(str(top)):])
    assert want != [REMOTE + r[len(str(top)):] for r, _, _ in os.walk(str(top))]  # readdir order differs
    got = [r for r, _, _ in parallel_walk(REMOTE, hosts=[agent.hostspec], workers=1)]
    assert got == want
