"""Deterministic synthetic directory trees for benchmarking a remote ``os.walk``.

The generated tree imitates a real file share: a random directory hierarchy
about eight levels deep, heavy-tailed directory sizes (most directories hold
0-20 entries, a handful hold thousands, two or three hold ~10% of all entries
each), about 6% directories, ~0.1% symbolic links (to files, to directories and
exactly one dangling link), empty directories, and a few awkward names (spaces,
non-ASCII, a leading dot, a 200-byte name and names that are not valid UTF-8).
Files are empty, so creating 100,000 entries takes a few seconds and 1,000,000
entries well under a minute.

The same ``(entries, seed)`` always yields byte-identical names; the exact
entry count equals ``entries``.  A marker file *beside* the tree
(``<root>.complete.json``, so that walking ``root`` does not see it) records a
finished build and lets later calls reuse it.

Command line::

    python bench/tree.py /tmp/tree-100k --entries 100000
    python bench/tree.py /tmp/huge-dir --huge --entries 1000000
    python bench/tree.py /tmp/tree-100k --entries 100000 --verify
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import stat
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["build_huge_dir", "build_tree", "marker_path", "walk_digest"]

# Bump when the generator changes in a way that alters the produced names, so
# stale trees left on disk by an older version are rebuilt instead of reused.
FORMAT_VERSION = 1

MAX_DEPTH = 8  # deepest directory level (the root is level 0)
DIR_FRACTION = 0.06
SYMLINK_FRACTION = 0.001
# Entries of the few very large directories, as fractions of the total.
BIG_DIR_FRACTIONS = (0.12, 0.10, 0.08)

_DIR_WORDS = tuple(
    "src lib data docs build assets images logs backup archive projects "
    "reports tmp cache config home users media photos scans exports raw "
    "results shared team finance legal design video audio 2019 2020 "
    "2021 2022 2023 2024 old new misc".split()
)
_FILE_STEMS = tuple(
    "report image IMG DSC notes invoice data log index main test config "
    "readme draft scan photo export summary budget contract chunk part "
    "frame sample record backup meeting slide table module".split()
)
_EXTENSIONS = tuple("txt jpg png pdf docx xlsx csv log json py c h html xml mp4 mp3 gz zip bin dat md".split())
_BIG_DIR_STYLES = (("IMG_", "jpg"), ("frame_", "png"), ("part-", "parquet"))

# Awkward names given to a few of the planned entries (renamed in place, so the
# entry counts are unchanged).  Each is unique and cannot collide with the
# generated "<word>_<n>" names.
_SPECIAL_DIR_NAMES = (
    os.fsencode("Program Files (x86)"),
    "données partagées".encode(),
    b"latin1-caf\xe9",  # not valid UTF-8
    b".hidden_dir",
)
_SPECIAL_FILE_NAMES = (
    b"My Document (final) v2.docx",
    "résumé \u2013 2024.pdf".encode(),
    "日本語のファイル.txt".encode(),
    "emoji \U0001f389 party.png".encode(),
    b"bad\xff",  # not valid UTF-8
    b"mixed \xe9\xff name.bin",  # not valid UTF-8
    b" leading and trailing space ",
    b".bashrc",
    b"-starts-with-dash",
    b"long_" + b"x" * 195,  # 200 bytes; the usual limit is 255
)

_MKNOD_MODE = stat.S_IFREG | 0o644


@dataclass
class _Dir:
    parent: int  # index of the parent directory; -1 for the root
    depth: int  # the root is 0
    name: bytes
    subdirs: list[int] = field(default_factory=list)
    files: list[bytes] = field(default_factory=list)
    links: list[tuple[bytes, bytes]] = field(default_factory=list)  # (name, target)

    @property
    def size(self) -> int:
        return len(self.subdirs) + len(self.files) + len(self.links)


def marker_path(path: str | os.PathLike[str]) -> str:
    """Return the marker file used for ``path``: ``<path>.complete.json``.

    It lives outside the tree so that walking ``path`` never sees it.
    """
    return os.fspath(path).rstrip(os.sep) + ".complete.json"


# --------------------------------------------------------------------------
# Planning: decide every name in memory first, then create them in one pass.
# --------------------------------------------------------------------------


def _plan(entries: int, seed: int) -> list[_Dir]:
    """Plan a tree of exactly ``entries`` entries below a root directory."""
    if entries < 50:
        raise ValueError("entries must be at least 50")
    rng = random.Random(f"bench.tree:{seed}:{entries}")

    n_links = max(3, round(entries * SYMLINK_FRACTION))
    n_dirs = max(len(_SPECIAL_DIR_NAMES) + 2, round(entries * DIR_FRACTION))
    n_files = entries - n_dirs - n_links

    dirs = [_Dir(parent=-1, depth=0, name=b"")]
    _plan_hierarchy(rng, dirs, n_dirs)
    _plan_files(rng, dirs, n_files)
    _plan_special_names(rng, dirs)
    _plan_links(rng, dirs, n_links)
    return dirs


def _plan_hierarchy(rng: random.Random, dirs: list[_Dir], n_dirs: int) -> None:
    """Grow a random recursive tree of ``n_dirs`` directories.

    Each new directory picks a parent among the existing directories that are
    less than MAX_DEPTH deep: usually a uniformly random one (which produces
    the long tail of directories with 0-2 subdirectories), sometimes a shallow
    one (wide upper levels), sometimes the directory created last (deep
    chains such as ``a/b/c/d``).
    """
    eligible = [0]  # directories that may still receive subdirectories
    shallow = [0]  # directories at depth <= 2
    for index in range(1, n_dirs + 1):
        roll = rng.random()
        if roll < 0.15:
            parent = rng.choice(shallow)
        elif roll < 0.35 and dirs[index - 1].depth < MAX_DEPTH:
            parent = index - 1
        else:
            parent = rng.choice(eligible)
        depth = dirs[parent].depth + 1
        siblings = dirs[parent].subdirs
        word = rng.choice(_DIR_WORDS)
        dirs.append(_Dir(parent=parent, depth=depth, name=f"{word}_{len(siblings)}".encode()))
        siblings.append(index)
        if depth < MAX_DEPTH:
            eligible.append(index)
        if depth <= 2:
            shallow.append(index)


def _plan_files(rng: random.Random, dirs: list[_Dir], n_files: int) -> None:
    """Distribute ``n_files`` files with heavy-tailed directory sizes."""
    counts = [0] * len(dirs)
    total = len(dirs) - 1 + n_files  # entries excluding links
    candidates = [i for i, d in enumerate(dirs) if 2 <= d.depth <= 6] or list(range(1, len(dirs)))

    # A few huge directories (think camera dumps, build outputs, shards).
    big: list[int] = []
    if total >= 2_000:
        for fraction in BIG_DIR_FRACTIONS:
            index = rng.choice(candidates)
            while index in big:
                index = rng.choice(candidates)
            big.append(index)
            counts[index] = max(0, round(total * fraction) - dirs[index].size)

    # Some directories with hundreds to a few thousand entries.
    medium: list[int] = []
    for _ in range(max(1, total // 10_000)):
        index = rng.randrange(1, len(dirs))
        if index not in big and index not in medium:
            medium.append(index)
            counts[index] = int(10 ** rng.uniform(2.3, 3.4))

    # If the special directories got too much (tiny trees), scale them down.
    special = set(big + medium)
    assigned = sum(counts[i] for i in special)
    budget = max(0, n_files - (len(dirs) - 1) * 2)
    if assigned > budget:
        for i in special:
            counts[i] = counts[i] * budget // assigned
        assigned = sum(counts[i] for i in special)

    # Everybody else: Pareto-distributed weights, with many empty directories
    # (more among the ones that only hold subdirectories).
    weights = [0.0] * len(dirs)
    for index, d in enumerate(dirs):
        if index in special:
            continue
        p_empty = 0.4 if d.subdirs else 0.08
        if rng.random() >= p_empty:
            weights[index] = min(rng.paretovariate(1.3), 40.0)
    remaining = n_files - assigned
    weight_sum = sum(weights)
    if weight_sum == 0.0:  # pathological tiny case: put everything in the root
        weights[0] = weight_sum = 1.0
    for index, weight in enumerate(weights):
        counts[index] += int(remaining * weight / weight_sum)
    leftover = n_files - sum(counts)
    populated = [i for i, w in enumerate(weights) if w > 0.0]
    for index in rng.choices(populated, weights=[weights[i] for i in populated], k=leftover):
        counts[index] += 1

    for index, d in enumerate(dirs):
        count = counts[index]
        if index in big:
            prefix, ext = _BIG_DIR_STYLES[big.index(index)]
            width = len(str(count))
            d.files = [f"{prefix}{j:0{width}d}.{ext}".encode() for j in range(count)]
        else:
            stems, exts = _FILE_STEMS, _EXTENSIONS
            d.files = [f"{rng.choice(stems)}_{j}.{rng.choice(exts)}".encode() for j in range(count)]


def _plan_special_names(rng: random.Random, dirs: list[_Dir]) -> None:
    """Rename a few planned directories and files to awkward names."""
    renamed: set[int] = set()
    for name in _SPECIAL_DIR_NAMES:
        index = rng.randrange(1, len(dirs))
        while index in renamed:
            index = rng.randrange(1, len(dirs))
        renamed.add(index)
        dirs[index].name = name
    with_files = [d for d in dirs if d.files]
    used: set[tuple[int, int]] = set()
    for name in _SPECIAL_FILE_NAMES:
        d = rng.choice(with_files)
        slot = rng.randrange(len(d.files))
        while (id(d), slot) in used:
            d = rng.choice(with_files)
            slot = rng.randrange(len(d.files))
        used.add((id(d), slot))
        d.files[slot] = name


def _relpath(dirs: list[_Dir], index: int) -> bytes:
    parts = []
    while index > 0:
        parts.append(dirs[index].name)
        index = dirs[index].parent
    return b"/".join(reversed(parts))


def _plan_links(rng: random.Random, dirs: list[_Dir], n_links: int) -> None:
    """Add relative symlinks: ~40% to directories, the rest to files, one dangling.

    A directory link always points from a directory to one created after it.
    Parents also precede their children, so following links and
    subdirectories only ever moves to higher directory indices: there are no
    cycles and even ``os.walk(followlinks=True)`` terminates.
    """
    with_files = [i for i, d in enumerate(dirs) if d.files]
    for k in range(n_links):
        where = rng.randrange(len(dirs) - 1)
        if k == 0:
            name, target_path = b"dangling_link", b"does/not/exist"
        elif rng.random() < 0.4:
            target = rng.randrange(where + 1, len(dirs))
            name, target_path = f"link_dir_{k}".encode(), _relpath(dirs, target)
        else:
            owner = rng.choice(with_files)
            file_name = rng.choice(dirs[owner].files)
            name = f"link_file_{k}".encode()
            target_path = os.path.join(_relpath(dirs, owner), file_name)
        target_rel = os.path.relpath(target_path, _relpath(dirs, where) or b".")
        dirs[where].links.append((name, target_rel))


def _summarize(dirs: list[_Dir], entries: int, seed: int) -> dict:
    n_files = sum(len(d.files) for d in dirs)
    n_links = sum(len(d.links) for d in dirs)
    n_dirs = len(dirs) - 1
    sizes = sorted((d.size for d in dirs), reverse=True)
    return {
        "entries": n_dirs + n_files + n_links,
        "dirs": n_dirs,
        "files": n_files,
        "symlinks": n_links,
        "empty_dirs": sum(1 for d in dirs[1:] if d.size == 0),
        "largest_dir": sizes[0],
        "top_dir_sizes": sizes[:5],
        "dirs_with_at_most_20_entries": sum(1 for s in sizes if s <= 20),
        "max_depth": max(d.depth for d in dirs),
        "requested_entries": entries,
        "seed": seed,
        "format_version": FORMAT_VERSION,
    }


# --------------------------------------------------------------------------
# Creation
# --------------------------------------------------------------------------


class _FileMaker:
    """Create empty files relative to a directory fd, as cheaply as possible."""

    def __init__(self) -> None:
        self._use_mknod = True

    def create(self, name: bytes, dir_fd: int) -> None:
        if self._use_mknod:
            try:
                os.mknod(name, _MKNOD_MODE, dir_fd=dir_fd)
                return
            except FileExistsError:
                raise
            except OSError:  # e.g. a file system that refuses mknod
                self._use_mknod = False
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
        os.close(os.open(name, flags, 0o644, dir_fd=dir_fd))


def _create(root: bytes, dirs: list[_Dir]) -> None:
    paths = [root] * len(dirs)
    for index in range(1, len(dirs)):  # parents always precede their children
        d = dirs[index]
        paths[index] = os.path.join(paths[d.parent], d.name)
        os.mkdir(paths[index])
    maker = _FileMaker()
    open_flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
    for index, d in enumerate(dirs):
        if not d.files and not d.links:
            continue
        fd = os.open(paths[index], open_flags)
        try:
            for name in d.files:
                maker.create(name, fd)
            for name, target in d.links:
                os.symlink(target, name, dir_fd=fd)
        finally:
            os.close(fd)


def _read_marker(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def _write_marker(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _prepare_root(root: str, marker: str) -> None:
    """Make ``root`` an empty directory, deleting only trees built by us."""
    if os.path.lexists(root):
        ours = os.path.exists(marker)
        if not ours and (not os.path.isdir(root) or os.listdir(root)):
            raise FileExistsError(f"{root!r} exists, is not empty and has no marker {marker!r}; refusing to delete it")
        if ours:
            shutil.rmtree(root)
    os.makedirs(root, exist_ok=True)


def build_tree(root: str, entries: int = 100_000, seed: int = 1) -> dict:
    """Create (or reuse) a synthetic tree of exactly ``entries`` entries under ``root``.

    Entries are files, directories and symlinks below ``root`` (not counting
    ``root`` itself), i.e. ``sum(len(d) + len(f) for _, d, f in os.walk(root))``.
    If ``root`` already holds a finished tree for the same ``entries`` and
    ``seed`` it is reused; a tree built by an earlier call with other
    parameters is deleted and rebuilt; any other non-empty ``root`` raises
    FileExistsError.

    Returns a summary dict with the keys ``entries``, ``dirs``, ``files``,
    ``symlinks``, ``empty_dirs``, ``largest_dir`` (entries in the biggest
    directory), ``top_dir_sizes``, ``dirs_with_at_most_20_entries``,
    ``max_depth`` (deepest directory, root = 0), ``requested_entries``,
    ``seed``, ``format_version``, ``path`` and ``reused``.
    """
    root = os.path.abspath(os.fspath(root))
    marker = marker_path(root)
    saved = _read_marker(marker)
    if (
        saved is not None
        and saved.get("status") == "complete"
        and saved.get("kind") == "tree"
        and saved.get("requested_entries") == entries
        and saved.get("seed") == seed
        and saved.get("format_version") == FORMAT_VERSION
        and os.path.isdir(root)
    ):
        summary = dict(saved["summary"])
        summary.update(path=root, reused=True)
        return summary

    dirs = _plan(entries, seed)
    summary = _summarize(dirs, entries, seed)
    _prepare_root(root, marker)
    key = {"kind": "tree", "requested_entries": entries, "seed": seed, "format_version": FORMAT_VERSION}
    _write_marker(marker, {**key, "status": "building"})
    _create(os.fsencode(root), dirs)
    _write_marker(marker, {**key, "status": "complete", "summary": summary})
    summary = dict(summary)
    summary.update(path=root, reused=False)
    return summary


def _huge_names(entries: int) -> list[bytes]:
    width = max(7, len(str(max(entries - 1, 0))))
    return [f"file_{i:0{width}d}.dat".encode() for i in range(entries)]


def build_huge_dir(path: str, entries: int = 1_000_000) -> None:
    """Create (or reuse) one flat directory holding ``entries`` empty files.

    Names are ``file_0000000.dat`` ... .  A marker ``<path>.complete.json``
    records a finished build, so later calls return at once; an interrupted or
    differently sized build left by an earlier call is completed or trimmed
    in place.  A non-empty directory without a marker raises FileExistsError.
    """
    path = os.path.abspath(os.fspath(path))
    marker = marker_path(path)
    saved = _read_marker(marker)
    key = {"kind": "huge_dir", "entries": entries, "format_version": FORMAT_VERSION}
    if (
        saved is not None
        and saved.get("status") == "complete"
        and all(saved.get(k) == v for k, v in key.items())
        and os.path.isdir(path)
    ):
        return
    if saved is None and os.path.lexists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{path!r} exists, is not empty and has no marker {marker!r}; refusing to reuse it")
    os.makedirs(path, exist_ok=True)
    _write_marker(marker, {**key, "status": "building"})

    wanted = _huge_names(entries)
    wanted_set = set(wanted)
    bpath = os.fsencode(path)
    existing = set(os.listdir(bpath))
    for name in existing - wanted_set:  # left over from a bigger build
        full = os.path.join(bpath, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.unlink(full)
    maker = _FileMaker()
    fd = os.open(bpath, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        for name in wanted:
            if name not in existing:
                maker.create(name, fd)
    finally:
        os.close(fd)
    _write_marker(marker, {**key, "status": "complete"})


# --------------------------------------------------------------------------
# Comparing walks
# --------------------------------------------------------------------------


def walk_digest(
    walk_iter: Iterable[tuple[str | bytes, Iterable[str | bytes], Iterable[str | bytes]]],
) -> tuple[int, str]:
    """Return ``(entries, sha256 hex)`` for the output of an ``os.walk``-like iterator.

    ``entries`` is ``sum(len(dirs) + len(files))``.  The digest covers the
    sorted list of ``(os.fsencode(root), sorted(dirs), sorted(files))`` with
    every name fsencoded, so it does not depend on the order in which
    directories are visited or entries listed: a parallel or remote walk can
    be compared with ``os.walk`` of the same tree (str and bytes walks of the
    same tree give the same digest).
    """
    records: list[tuple[bytes, bytes]] = []
    entries = 0
    fsencode = os.fsencode
    for top, dirnames, filenames in walk_iter:
        dir_list = sorted(map(fsencode, dirnames))
        file_list = sorted(map(fsencode, filenames))
        entries += len(dir_list) + len(file_list)
        # NUL cannot occur in a path, so this serialisation is unambiguous.
        record = b"%d\0%d\0%s%s" % (
            len(dir_list),
            len(file_list),
            b"".join(name + b"\0" for name in dir_list),
            b"".join(name + b"\0" for name in file_list),
        )
        records.append((fsencode(top), record))
    records.sort()
    digest = hashlib.sha256()
    for top, record in records:
        digest.update(b"%d\0%s\0" % (len(top), top))
        digest.update(record)
    return entries, digest.hexdigest()


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a deterministic synthetic directory tree for walk benchmarks.")
    parser.add_argument("path", help="directory to create (its marker goes beside it)")
    parser.add_argument("--entries", type=int, default=100_000, help="entries to create")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--huge", action="store_true", help="build one flat directory of --entries files instead")
    parser.add_argument("--verify", action="store_true", help="afterwards os.walk the result and print its digest")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if args.huge:
        build_huge_dir(args.path, args.entries)
        summary: dict = {"path": os.path.abspath(args.path), "entries": args.entries}
    else:
        summary = build_tree(args.path, args.entries, args.seed)
    elapsed = time.perf_counter() - start
    print(json.dumps(summary, sort_keys=True))
    print(f"built in {elapsed:.2f} s")
    if args.verify:
        start = time.perf_counter()
        count, digest = walk_digest(os.walk(os.fsencode(os.path.abspath(args.path))))
        elapsed = time.perf_counter() - start
        print(f"os.walk: {count} entries, sha256 {digest}, {elapsed:.2f} s")
        if count != summary["entries"]:
            print("entry count mismatch", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
