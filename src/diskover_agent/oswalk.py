"""``parallel_walk`` and ``parallel_walk_entries``: ``os.walk``'s keywords, with their
meaning, over the :class:`~diskover_agent.walk.Walker` engine.

The engine hands over directories as the agents list them. This module turns them into
what ``os.walk`` yields, in one of three ways:

* **top-down, read ahead** (the default): each directory as soon as it is listed. The
  agents read ahead of the loop body, so each directory is as the agent read it.
* **bottom-up, read ahead** (``topdown=False``): a directory is yielded once every
  subdirectory it walks into was yielded (or failed). Only directories whose subtree is
  still incomplete are held, each with a count of its subdirectories not yet yielded:
  every one of them is an ancestor of a directory still queued, in flight or waiting,
  so what is held is at most the depth times what is pending, never the tree.
* **os.walk's order and timing** (``readahead=False``): depth first, children in the
  order of ``dirs``; top-down, a directory is read only after its parent was yielded
  and the loop body ran. Up to ``workers`` of the next directories in that order are
  read at once (one directory per request), and nothing else is held but the
  ``dirs`` still to visit on the current path, as ``os.walk`` holds them.

``followlinks=True`` walks into symlinks to directories as further roots, which the
agent opens following links only inside its exports: a link that leads outside every
export reaches ``onerror`` as a ``PermissionError``. As with ``os.walk``, visited
directories are not remembered; a link loop ends where the path holds more than 40
symlinks, with ``ELOOP`` to ``onerror``, as the kernel ends ``os.walk``'s.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator, Sequence
from itertools import compress, repeat
from operator import attrgetter
from typing import Any, AnyStr, Optional, Union

from .entry import AgentDirEntry
from .protocol import FS_ENCODING, FS_ERRORS, KIND_DIR, KIND_SYMLINK, Entry
from .transport import DEFAULT_PORT
from .walk import Walker, _Dir, _join

OnError = Optional[Callable[[OSError], object]]
#: ``(dirs, files, links)`` of one listing, ``links`` the names in ``dirs`` that are symlinks.
Split = tuple[list[Any], list[Any], set[Any]]


def _typed(top: AnyStr) -> Callable[[bytes], AnyStr]:
    return (lambda b: b) if isinstance(top, bytes) else os.fsdecode  # type: ignore[return-value]


def _name(item: Any) -> Any:
    return item if isinstance(item, (str, bytes)) else item.name


def _key(path: bytes) -> bytes:
    return path.rstrip(b"/")


def _parent_key(path: bytes) -> bytes:
    return _key(path[: path.rindex(b"/")])


#: ``kinds.encode().translate(...)``: 1 for each entry ``os.walk`` puts in ``dirs``
#: (symlinks aside), and for each it puts in ``files``.
_DIR_FLAGS = bytes(int(c == ord(KIND_DIR)) for c in range(256))
_FILE_FLAGS = bytes(int(c not in (ord(KIND_DIR), ord(KIND_SYMLINK))) for c in range(256))
_NO_LINKS: frozenset[Any] = frozenset()
_kind = attrgetter("kind")
_entry_name = attrgetter("name")


def _names_of(typed: Callable[[bytes], Any], entries: list[Entry]) -> list[Any]:
    """The names of ``entries``, typed: for text, decoded in one call (as ``os.fsdecode``)."""
    names = list(map(_entry_name, entries))
    if typed is os.fsdecode and names:
        return b"\0".join(names).decode(FS_ENCODING, FS_ERRORS).split("\0")
    return names


def _split_names(typed: Callable[[bytes], Any]) -> Callable[[Any, _Dir], Split]:
    def split(root: Any, d: _Dir) -> Split:
        names = d.names
        if names is None:  # entries frames (per-directory mode, or an agent without names frames)
            entries = d.entries
            if not entries:
                return [], [], _NO_LINKS
            names = _names_of(typed, entries)
            kinds = "".join(map(_kind, entries))
            targets = "".join([e.target or "-" for e in entries if e.kind == KIND_SYMLINK])
        else:
            kinds = d.kinds
            targets = d.targets
        if KIND_SYMLINK not in kinds:
            count = kinds.count(KIND_DIR)
            if not count:
                return [], names, _NO_LINKS
            if count > 3:
                dirs = list(compress(names, kinds.encode("ascii").translate(_DIR_FLAGS)))
                return dirs, list(compress(names, kinds.encode("ascii").translate(_FILE_FLAGS))), _NO_LINKS
            at = [kinds.index(KIND_DIR)]  # a few directories: found with C-level searches
            while len(at) < count:
                at.append(kinds.index(KIND_DIR, at[-1] + 1))
            files = names[:]
            for i in reversed(at):
                del files[i]
            return [names[i] for i in at], files, _NO_LINKS
        dirs = []
        files = []
        links = set()
        link_targets = iter(targets)
        for name, kind in zip(names, kinds, strict=True):
            if kind == KIND_DIR:
                dirs.append(name)
            elif kind == KIND_SYMLINK and next(link_targets) == KIND_DIR:
                dirs.append(name)
                links.add(name)
            else:
                files.append(name)
        return dirs, files, links
    return split


def _split_entries(typed: Callable[[bytes], Any]) -> Callable[[Any, _Dir], Split]:
    def split(root: Any, d: _Dir) -> Split:
        entries = d.entries
        if not entries:
            return [], [], _NO_LINKS
        made = list(map(AgentDirEntry, repeat(root), _names_of(typed, entries), entries))
        kinds = "".join(map(_kind, entries))
        if KIND_SYMLINK not in kinds:
            if KIND_DIR not in kinds:
                return [], made, _NO_LINKS
            flags = kinds.encode("ascii")
            dirs = list(compress(made, flags.translate(_DIR_FLAGS)))
            return dirs, list(compress(made, flags.translate(_FILE_FLAGS))), _NO_LINKS
        dirs = []
        files = []
        links = set()
        for x in made:
            if x.is_dir():
                dirs.append(x)
                if x.is_symlink():
                    links.add(x.name)
            else:
                files.append(x)
        return dirs, files, links
    return split


class _Walk:
    """One ``parallel_walk``: the engine, and how its listings become ``os.walk``'s yields."""

    def __init__(self, top: Any, walker: Walker, onerror: OnError, followlinks: bool, window: int,
                 split: Callable[[Callable[[bytes], Any]], Callable[[Any, _Dir], Split]]) -> None:
        self.top = top
        self.walker = walker
        self.onerror = onerror
        self.follow = followlinks
        self.window = window
        self.typed = _typed(top)
        self.split = split(self.typed)
        #: Bottom-up read ahead: directory (path without trailing slashes) -> [its subdirectories
        #: not yet done, its yield], for each directory listed whose subtree is incomplete.
        self.held: dict[bytes, list[Any]] = {}
        #: os.walk's order: the directories asked for and not yet yielded (at most ``window``
        #: besides the one awaited), listed ones in ``stash``.
        self.ahead: set[bytes] = set()
        self.stash: dict[bytes, _Dir] = {}

    def listing(self, d: _Dir) -> tuple[Any, list[Any], list[Any], set[Any]]:
        root = self.top if d.path == self.walker.top else self.typed(d.path)
        dirs, files, links = self.split(root, d)
        return root, dirs, files, links

    def error(self, exc: OSError) -> None:
        if self.onerror is not None:
            self.onerror(exc)

    def children(self, path: bytes, dirs: list[Any], links: set[Any]) -> list[bytes]:
        """The paths ``os.walk`` walks into from ``dirs``: not symlinks, unless following them."""
        return [_join(path, os.fsencode(n)) for n in map(_name, dirs) if self.follow or n not in links]

    # -- read ahead ----------------------------------------------------------------------

    def top_down(self, results: Iterator[_Dir]) -> Iterator[tuple[Any, list[Any], list[Any]]]:
        for d in results:
            if d.error is not None:
                self.error(d.error)
                continue
            if d.skipped:  # a symlink now: os.walk does not descend into it
                continue
            root, dirs, files, links = self.listing(d)
            before = dirs[:]
            yield root, dirs, files
            if dirs != before or (self.follow and links):
                self._after_yield(d.path, [_name(x) for x in before], [_name(x) for x in dirs], links)

    def _after_yield(self, path: bytes, before: list[Any], after: list[Any], links: set[Any]) -> None:
        """Apply what the loop body did to ``dirs``: removed names prune, names it added
        are walked, and so are the symlinks it kept when following them."""
        walker = self.walker
        kept = set(after)
        for name in before:
            if name not in kept and name not in links:
                walker.prune(_join(path, os.fsencode(name)))
        known = set(before)
        for name in after:
            if (self.follow and name in links) or (name not in known and name not in links):
                walker.add(_join(path, os.fsencode(name)), follow=self.follow)

    def bottom_up(self, results: Iterator[_Dir]) -> Iterator[tuple[Any, list[Any], list[Any]]]:
        waiting = self.held
        top = _key(self.walker.top)
        for d in results:
            path = d.path
            if d.error is not None:
                self.error(d.error)
            elif not d.skipped:
                root, dirs, files, links = self.listing(d)
                below = len(dirs) - (0 if self.follow else len(links))  # the engine walks real ones
                if self.follow:
                    for name in links:
                        self.walker.add(_join(path, os.fsencode(name)), follow=True)
                if below:
                    waiting[_key(path)] = [below, (root, dirs, files)]
                    continue
                yield root, dirs, files
            # ``path`` is done: its parent may be complete now, and its parent's parent...
            while _key(path) != top:
                path = _parent_key(path)
                parent = waiting[path]
                parent[0] -= 1
                if parent[0]:
                    break
                del waiting[path]
                yield parent[1]

    # -- os.walk's order and timing --------------------------------------------------------

    def in_order(self, results: Iterator[_Dir], topdown: bool) -> Iterator[tuple[Any, list[Any], list[Any]]]:
        """Depth first, children in ``dirs`` order, each read when ``os.walk`` would reach
        it or a little before (the next ``window`` directories in that order)."""
        walker = self.walker
        stash = self.stash
        asked = self.ahead
        asked.add(walker.top)
        # per directory on the current path: (its yield, for bottom-up; the children still to visit)
        stack: list[tuple[Any, collections.deque[bytes]]] = []

        def ask(path: bytes) -> None:
            asked.add(path)
            walker.add(path, follow=self.follow)  # os.walk opens every one following, with followlinks

        def read_ahead() -> None:
            for _, todo in reversed(stack):
                for p in todo:
                    if len(asked) >= self.window:
                        return
                    if p not in asked:
                        ask(p)

        def take(path: bytes) -> Optional[_Dir]:
            while path not in stash:
                d = next(results, None)
                if d is None:
                    return None  # the walk stopped
                stash[d.path] = d
            asked.discard(path)
            return stash.pop(path)

        path = walker.top
        while True:
            d = take(path)
            if d is None:
                return
            if d.error is not None:
                self.error(d.error)
            elif not d.skipped:
                root, dirs, files, links = self.listing(d)
                if topdown:
                    yield root, dirs, files  # the body may change dirs, and the tree below
                stack.append(((root, dirs, files), collections.deque(self.children(d.path, dirs, links))))
            while True:  # the next directory to read, yielding the finished ones bottom-up
                if not stack:
                    return
                done, todo = stack[-1]
                if todo:
                    path = todo.popleft()
                    if path not in asked:
                        ask(path)
                    read_ahead()
                    break
                stack.pop()
                if not topdown:
                    yield done


def _walk(top: AnyStr, hosts: Union[str, Sequence[str], None], onerror: OnError, topdown: bool,
          followlinks: bool, readahead: bool, split: Callable[[Callable[[bytes], Any]], Callable[[Any, _Dir], Split]],
          **walker_args: Any) -> Iterator[tuple[Any, list[Any], list[Any]]]:
    if hosts is None:
        raise ValueError("hosts is required")
    top = os.fspath(top)
    if not readahead:
        if walker_args.get("mode", "auto") == "subtree":
            raise ValueError("readahead=False reads one directory per request: mode='subtree' does not apply")
        walker_args.update(mode="listdir", expand=False)
    walker = Walker(top, hosts, **walker_args)
    walk = _Walk(top, walker, onerror, followlinks, walker_args["workers"], split)
    results = walker.dirs(skips=True)
    try:
        if not readahead:
            yield from walk.in_order(results, topdown)
        elif topdown:
            yield from walk.top_down(results)
        else:
            yield from walk.bottom_up(results)
    finally:
        results.close()  # stops every thread and closes every socket


def parallel_walk(
    top: AnyStr,
    workers: int = 40,
    hosts: Union[str, Sequence[str], None] = None,
    port: int = DEFAULT_PORT,
    onerror: OnError = None,
    *,
    topdown: bool = True,
    followlinks: bool = False,
    readahead: bool = True,
    **options: Any,
) -> Iterator[tuple[AnyStr, list[AnyStr], list[AnyStr]]]:
    """Walk a remote tree like ``os.walk(top, topdown, onerror, followlinks)``.

    Directories are listed ``workers`` requests at a time, spread over ``hosts``.
    ``dirs`` and ``files`` are in the order the agent read them (as ``os.walk`` gives
    ``os.scandir``'s order: sort them if you need an order). With ``readahead`` (the default)
    the agents read ahead of the loop body and directories are yielded as they
    arrive (top-down: each after its parent; ``topdown=False``: each after all its
    subdirectories), each as the agent read it; ``readahead=False`` gives
    ``os.walk``'s order and timing (a directory is read only after its parent was
    yielded). Top-down, changing ``dirs`` in the loop body prunes or extends the walk;
    bottom-up it has no effect, as with ``os.walk``. ``followlinks=True`` walks into
    symlinks to directories inside the agents' exports. Errors listing a directory go
    to ``onerror`` (an ``OSError`` with ``filename`` set), as with ``os.walk``;
    :class:`AgentConnectionError` is raised when no agent answers for ``retry_for``
    seconds. Leaving the loop early stops every thread and socket. ``options`` are
    :class:`Walker`'s (``mode``, ``retry_for``, ``exclude_dirs``, ``exclude_files``,
    ``one_fs``: pruning applied by the agents, which never read what it prunes) and
    :class:`~diskover_agent.transport.ClientOptions`' (``timeout``, ``connect_timeout``,
    ``token``, ``tls``, ``cafile``, ``verify``, ``compress``).
    """
    yield from _walk(top, hosts, onerror, topdown, followlinks, readahead, _split_names,
                     port=port, workers=workers, **options)


def parallel_walk_entries(
    top: AnyStr,
    workers: int = 40,
    hosts: Union[str, Sequence[str], None] = None,
    port: int = DEFAULT_PORT,
    onerror: OnError = None,
    *,
    topdown: bool = True,
    followlinks: bool = False,
    readahead: bool = True,
    **options: Any,
) -> Iterator[tuple[AnyStr, list[AgentDirEntry[AnyStr]], list[AgentDirEntry[AnyStr]]]]:
    """:func:`parallel_walk` yielding ``(root, dirs, files)`` of :class:`AgentDirEntry`.

    Every entry carries its lstat record from the listing itself (``entry.stat()``
    makes no request). Top-down, removing entries from ``dirs`` prunes the walk.
    """
    yield from _walk(top, hosts, onerror, topdown, followlinks, readahead, _split_entries,
                     port=port, workers=workers, stat=True, **options)
