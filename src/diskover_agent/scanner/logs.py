"""The scanner's loggers, and their hook into diskover's log files."""

from __future__ import annotations

import logging
from typing import Any, Optional

logger = logging.getLogger("diskover_agent.scanner")
#: Warnings and errors, also sent to diskover's warnings log (see :func:`log_setup`).
warn_logger = logging.getLogger("diskover_agent.scanner.warnings")


def log_setup(loglevel: Any, logformat: str, filelogging: bool, handler_file: Optional[logging.Handler],
              handler_warnfile: Optional[logging.Handler], handler_con: Optional[logging.Handler]) -> None:
    """Log at diskover's level, through its log file and console handlers when it logs to a
    file; warnings and errors (an agent that does not answer, the crawl given up) also go to
    its warnings log (``handler_warnfile``)."""
    logger.setLevel(loglevel)
    warn_logger.setLevel(logging.WARNING)
    if filelogging:
        for log, handler in ((logger, handler_file), (logger, handler_con), (warn_logger, handler_warnfile)):
            if handler is not None and handler not in log.handlers:
                log.addHandler(handler)
