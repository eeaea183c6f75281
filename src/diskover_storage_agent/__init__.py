"""diskover-storage-agent: serve directory listings of a storage node over HTTP."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("diskover-storage-agent")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]
