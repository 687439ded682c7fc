"""Files a user keeps are written whole or not at all: a temp file in the same folder, fsync,
rename over the target, fsync of the folder. Torch-free, so the planner and `reports` use it too."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path, executable: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """A temp path beside `path` for a writer that wants a file name (safetensors' save_file); the
    file written there replaces `path` when the block ends without error. On any failure the old
    file (if any) is untouched and no temp file is left. `keep_existing`: a file already at `path`
    (or one another process puts there first) stays, and the new one is dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the target, so the rename stays within one filesystem (atomic on POSIX).
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:  # fsync is per file, whichever descriptor asks
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755 if executable else 0o644)
        if keep_existing:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)  # fails, rather than replaces, when the target exists
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_writer(path: str | Path, executable: bool = False, keep_existing: bool = False) -> Iterator[IO[bytes]]:
    """A binary file that replaces `path` when the block ends without error (see atomic_path)."""
    with atomic_path(path, executable, keep_existing) as tmp, open(tmp, "wb") as f:
        yield f


def write_atomic(path: str | Path, data: str | bytes, executable: bool = False, keep_existing: bool = False) -> None:
    """Replace `path` with `data` in one step."""
    with atomic_writer(path, executable, keep_existing) as f:
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
