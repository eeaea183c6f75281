"""diskover-storage-agent: serve directory listings of a storage node over HTTP."""

from diskover_wire import __version__

__all__ = ["__version__"]
