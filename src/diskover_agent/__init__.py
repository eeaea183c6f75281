"""diskover_agent: list and walk storage trees through diskover storage agents.

>>> import diskover_agent
>>> c = diskover_agent.AgentConnection(hosts=["stornode1", "stornode2"])
>>> for root, dirs, files in diskover_agent.parallel_walk("/mnt/isilon", hosts=["stornode1"]):
...     ...
"""

from .connection import AgentConnection
from .entry import AgentDirEntry
from .errors import AgentBusyError, AgentConnectionError, AgentError, AgentHTTPError, AgentProtocolError
from .oswalk import parallel_walk, parallel_walk_entries

__all__ = [
    "AgentBusyError",
    "AgentConnection",
    "AgentConnectionError",
    "AgentDirEntry",
    "AgentError",
    "AgentHTTPError",
    "AgentProtocolError",
    "__version__",
    "parallel_walk",
    "parallel_walk_entries",
]



def __getattr__(name: str) -> str:
    """``__version__``, looked up on first use (importlib.metadata costs start-up time)."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("diskover-storage-agent")
    except PackageNotFoundError:  # running from a source tree
        found = "0.0.0"
    globals()["__version__"] = found
    return found
