"""Build configuration beside pyproject.toml: the agent's optional compiled read loop.

Linux only (it reads directories with getdents64), and ``optional=True``: where no C
compiler or no Python headers are found, the install goes on without it, and the
agent uses its pure-Python read loop (see src/diskover_storage_agent/readloop.py).
"""

import sys

from setuptools import Extension, setup

READ_LOOP = Extension(
    "diskover_storage_agent._readdir",
    ["src/diskover_storage_agent/_readdir.c"],
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
    optional=True,
)

setup(ext_modules=[READ_LOOP] if sys.platform.startswith("linux") else [])
