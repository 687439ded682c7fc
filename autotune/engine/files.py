"""Files a user keeps are written whole or not at all: a temp file in the same folder, fsync,
rename over the target, fsync of the folder. Torch-free, so the planner and `reports` use it too."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_writer(path: str | Path, executable: bool = False) -> Iterator[IO[bytes]]:
    """A binary file that replaces `path` when the block ends without error; on any failure the
    old file (if any) is untouched and no temp file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the target, so os.replace is a rename within one filesystem (atomic on POSIX).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755 if executable else 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | Path, data: str | bytes, executable: bool = False) -> None:
    """Replace `path` with `data` in one step."""
    with atomic_writer(path, executable) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in `folder` durable across a power loss; not every filesystem allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
