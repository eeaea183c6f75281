"""diskover alternative scanner: crawl through diskover storage agents.

diskover 2 (``diskover.py --altscanner scandir_agent``) imports ``scanners/scandir_agent.py``
(the one-line shim in ``contrib/diskover/``, which star-imports this module) and replaces
``os.scandir`` with :func:`scandir`. It calls :func:`check_dirpath` and :func:`abspath` on
the top path, then ``scandir`` of every directory from many threads, and ``is_symlink()``,
``is_dir()`` and ``stat()`` on each entry; :func:`stat` only for the top (diskover 2.3.5),
or for every directory (older versions).

Each :func:`scandir` is one listing request (with stat records); no entry method makes a
request. :func:`stat` of a directory fetches the listing that the following ``scandir`` of
it then uses. Nothing else is cached: the scanner holds no stat record diskover will not ask for.

A busy agent (503) or one that does not answer is not an error: the request goes to the
other agents first, then waits (the agent's ``Retry-After``, or a backoff from 0.2 s doubling
to 5 s) and tries again, for as long as some agent answered within ``retry-for`` seconds.
Past that, :class:`AgentsUnavailableError` is raised, which diskover treats as fatal (it
deletes the partial index and exits 1); a directory's own file-system error stays the
``OSError`` the local scanner would raise, which diskover logs and skips.

Settings come from ``DISKOVER_AGENT_*`` environment variables over an optional TOML file
(``DISKOVER_AGENT_CONFIG``, default ``~/.config/diskover_scandir_agent/config.toml``); they
are read on first use, or by :func:`init`. :func:`close` forgets them with every connection
and kept listing, so the next call starts afresh.
"""

from __future__ import annotations

# Today's public names, in the modules that hold them (``noqa``: re-exports).
from ..backoff import BACKOFF_FIRST, BACKOFF_MAX  # noqa: F401
from .api import (  # noqa: F401
    LISTINGS_MAX,
    abspath,
    add_meta,
    check_dirpath,
    close,
    get_storage_size,
    init,
    kept_listings,
    scandir,
    settings,
    stat,
    walk,
)
from .config import DEFAULT_CONFIG, DEFAULT_RETRY_FOR, DEFAULT_WORKERS, ScannerConfigError, Settings, load_settings  # noqa: F401
from .hosts import AgentsUnavailableError
from .logs import log_setup, logger, warn_logger  # noqa: F401
from .records import ScandirIterator, ScannerDirEntry, StatResult  # noqa: F401

__all__ = [
    "AgentsUnavailableError",
    "abspath",
    "add_meta",
    "check_dirpath",
    "close",
    "get_storage_size",
    "init",
    "log_setup",
    "scandir",
    "stat",
    "walk",
]
