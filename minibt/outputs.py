"""Every file minibt writes goes through here: checked before the work starts, written atomically, never through a
link planted in its place.

  * `check_target(path)`: the output's folder exists; the output itself is not a symbolic link (even a dangling
    one), a folder, a FIFO or a device. Called before any work, so a bad path costs nothing.
  * `atomic(path)`: a context manager giving a temporary file in the same folder, created exclusively (O_EXCL, a
    random name: a link planted at a predictable temporary name is never followed), then renamed over `path`
    (os.replace never follows a link at the destination). On an error the temporary is removed and `path` is
    unchanged.
  * `create_new(path)`: a file appended to in place (embed --file's vectors), created exclusively: an existing
    file or a planted link is refused, never followed.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError

_UMASK = os.umask(0)
os.umask(_UMASK)                  # read once: mkstemp makes 0600 files, outputs get the usual 0666 & ~umask


def check_target(path, error=InputError, what: str = "output") -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise error(f"{what} {path}: the folder {path.parent} does not exist")
    if path.is_symlink():
        raise error(f"{what} {path} is a symbolic link; refused (outputs are never written through a link)")
    if path.exists() and not path.is_file():
        raise error(f"{what} {path} exists and is not a regular file; refused")
    return path


@contextmanager
def atomic(path, error=InputError, what: str = "output"):
    """with atomic(path) as tmp: write tmp (a Path, empty) -> it replaces path whole, or nothing changes."""
    path = check_target(path, error, what)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise error(f"cannot write {what} {path}: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as e:
        raise error(f"cannot write {what} {path}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path, data: bytes, error=InputError, what: str = "output") -> Path:
    with atomic(path, error, what) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def create_new(path, error=InputError, what: str = "output"):
    """A new file opened for writing (binary), created exclusively: refused if anything, a link included, is there."""
    path = check_target(path, error, what)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except FileExistsError:
        raise error(f"{what} {path} exists: remove it or pick another path") from None
    except OSError as e:
        raise error(f"cannot write {what} {path}: {e.strerror or e}") from None
    return os.fdopen(fd, "wb")


def open_existing(path, error=InputError, what: str = "output"):
    """An existing regular file opened for reading and writing (a resume), never through a link."""
    path = check_target(path, error, what)
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise error(f"cannot open {what} {path}: {e.strerror or e}") from None
    return os.fdopen(fd, "r+b")
