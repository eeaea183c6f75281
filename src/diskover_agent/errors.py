"""The client's exceptions.

File-system failures reported by an agent are raised as the matching ``OSError``
subclass (``FileNotFoundError``, ``NotADirectoryError``, ``PermissionError``...),
exactly as the local call would raise them. Everything else derives from
:class:`AgentError`.
"""

from __future__ import annotations

from typing import Optional


class AgentError(Exception):
    """Base class of the client's own errors."""


class AgentConnectionError(AgentError, ConnectionError):
    """No agent could be reached (every host refused, timed out or broke off)."""


class AgentProtocolError(AgentError):
    """An answer that is not a valid diskover-agent answer."""


class AgentHTTPError(AgentError):
    """An agent refused the request for a reason that is not a file-system error."""

    def __init__(self, host: str, status: int, code: str, message: str) -> None:
        super().__init__(f"{host}: HTTP {status} {code}: {message}")
        self.host = host
        self.status = status
        self.code = code
        self.message = message


class AgentBusyError(AgentHTTPError):
    """The agent is overloaded (503); the request may be retried later."""

    def __init__(self, host: str, status: int, code: str, message: str,
                 retry_after: Optional[float] = None) -> None:
        super().__init__(host, status, code, message)
        self.retry_after = retry_after
