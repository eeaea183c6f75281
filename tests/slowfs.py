"""A read-only FUSE file system whose directories ``/slowN`` take SLOW seconds to list,
like a directory on a hung or overloaded NFS server. Run: ``python slowfs.py MOUNTPOINT``.
With ``SLOWFS_GATE=FILE`` they take until FILE exists instead (60 s at most);
``SLOWFS_COUNT=N``: N of them (10)."""

import errno
import os
import stat
import sys
import time

from fuse import FUSE, FuseOSError, Operations

DELAY = float(os.environ.get("SLOW", "2"))
#: Each slow listing that starts appends a line here, so a test can see it begin.
LOG = os.environ.get("SLOWFS_LOG")
GATE = os.environ.get("SLOWFS_GATE")
# Ten slow directories: the kernel lists one FUSE directory at a time.
COUNT = int(os.environ.get("SLOWFS_COUNT", "10"))
DIRS = {"/": [*(f"slow{i}" for i in range(COUNT)), "fast"], "/fast": ["x", "y"],
        **{f"/slow{i}": ["a", "b"] for i in range(COUNT)}}


class SlowFS(Operations):
    def getattr(self, path, fh=None):
        now = time.time()
        if path in DIRS:
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_ctime": now, "st_mtime": now, "st_atime": now}
        parent, _, name = path.rpartition("/")
        if name in DIRS.get(parent or "/", ()):
            return {"st_mode": stat.S_IFREG | 0o644, "st_nlink": 1, "st_size": 0, "st_ctime": now,
                    "st_mtime": now, "st_atime": now}
        raise FuseOSError(errno.ENOENT)

    def readdir(self, path, fh):
        if path.startswith("/slow"):
            if LOG:
                with open(LOG, "a") as f:
                    f.write(path + "\n")
            if GATE:
                deadline = time.monotonic() + 60
                while not os.path.exists(GATE) and time.monotonic() < deadline:
                    time.sleep(0.01)
            else:
                time.sleep(DELAY)
        return [".", "..", *DIRS[path]]


if __name__ == "__main__":
    FUSE(SlowFS(), sys.argv[1], foreground=True, nothreads=False, ro=True)
