"""``python -m diskover_agent.cli``: the ``diskover-agent`` command."""

import sys

from .main import main

sys.exit(main())
