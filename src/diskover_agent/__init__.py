"""diskover_agent: list and walk storage trees through diskover storage agents.

>>> import diskover_agent
>>> c = diskover_agent.AgentConnection(hosts=["stornode1", "stornode2"])
>>> for root, dirs, files in diskover_agent.parallel_walk("/mnt/isilon", hosts=["stornode1"]):
...     ...
"""

from importlib.metadata import PackageNotFoundError, version

from .connection import AgentConnection
from .entry import AgentDirEntry
from .errors import AgentBusyError, AgentConnectionError, AgentError, AgentHTTPError, AgentProtocolError
from .oswalk import parallel_walk, parallel_walk_entries

try:
    __version__ = version("diskover-storage-agent")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

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
