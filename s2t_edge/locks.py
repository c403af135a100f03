"""An exclusive lock on an output folder, so two runs (eval, collect, label) never write into one.

`flock` on `<folder>/.lock`: released when the file is closed or the process ends, even by
`kill -9`, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO

from s2t_edge.errors import S2TError


def lock_folder(folder: Path) -> IO[str]:
    """Hold the folder's lock until the returned file is closed; refuse if another run holds it."""
    f = (Path(folder) / ".lock").open("a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise S2TError(
            f"{folder} is in use by another run (its .lock is held); wait for it or use another --out"
        ) from None
    return f
