"""diskover_agent: list and walk storage trees through diskover storage agents.

>>> import diskover_agent
>>> c = diskover_agent.AgentConnection(hosts=["stornode1", "stornode2"])
>>> for root, dirs, files in diskover_agent.parallel_walk("/mnt/isilon", hosts=["stornode1"]):
...     ...
>>> diskover_agent.walk_to_dataset(["stornode1"], "/mnt/isilon", "/data/crawl")  # resume=True continues it
"""

from diskover_wire import __version__

from .connection import AgentConnection
from .dataset import AlreadyComplete, ResumeRefused
from .dataset_walk import WalkInterrupted, walk_to_dataset
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
    "AlreadyComplete",
    "ResumeRefused",
    "WalkInterrupted",
    "__version__",
    "parallel_walk",
    "parallel_walk_entries",
    "walk_to_dataset",
]

