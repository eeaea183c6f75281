"""``python -m diskover_agent``: the ``diskover-agent`` command."""

from .cli.main import main

raise SystemExit(main())
