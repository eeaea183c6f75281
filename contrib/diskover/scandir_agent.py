"""diskover alternative scanner that crawls through diskover storage agents.

Copy this file into diskover's ``scanners/`` folder, in a Python environment where the
``diskover-storage-agent`` package is installed, and run
``python3 diskover.py --altscanner scandir_agent -i diskover-INDEX /mnt/isilon/...``.
Settings: ``DISKOVER_AGENT_*`` environment variables, or
``~/.config/diskover_scandir_agent/config.toml`` (see ``config.toml`` next to this file).
The code lives in ``diskover_agent.scanner``.
"""

from diskover_agent.scanner import *  # noqa: F403
