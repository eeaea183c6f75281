"""The agent's optional compiled read loop, as the root setup.py builds it (``optional=True``:
without a C compiler or Python's headers the install goes on, with the pure-Python loop)."""

import sys

from setuptools import Extension, setup

READ_LOOP = Extension(
    "diskover_storage_agent._readdir",
    ["../../src/diskover_storage_agent/_readdir.c"],
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
    optional=True,
)

setup(ext_modules=[READ_LOOP] if sys.platform.startswith("linux") else [])
