"""Files vftrace writes for the user (reports, exports, copies out of the lab): checked
before any work is done, never written through a symlink planted at the path, and
replaced whole."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator

from tracer.errors import VftraceError


class OutputError(VftraceError):
    """An output file that cannot be written: one line naming the flag and the fix."""


def check_output(path: str | os.PathLike | None, flag: str,
                 inputs: tuple[Path, ...] = ()) -> Path | None:
    """An output file that can be created: its directory exists and is writable, nothing
    is planted at the path (a symlink is refused, never followed) and it would not
    overwrite one of the ``inputs``."""
    if path is None:
        return None
    p = Path(path)
    if not str(path):
        raise OutputError(f"{flag}: give a file name")
    if p.is_symlink():
        raise OutputError(f"{flag} {path}: is a symlink; refusing to write through it "
                          "(remove it or give another name)")
    if p.is_dir():
        raise OutputError(f"{flag} {path}: is a directory; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise OutputError(f"{flag} {path}: directory {parent} {what}")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{flag} {path}: directory {parent} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise OutputError(f"{flag} {path}: the file is not writable")
    for src in inputs:
        if p.exists() and src.exists() and p.resolve() == src.resolve():
            raise OutputError(f"{flag} {p}: is an input; give another file name")
    return p


@contextlib.contextmanager
def atomic_output(path: Path, mode: str = "w") -> Iterator[IO]:
    """Write beside ``path``, then rename over it: a failed export leaves no half-written
    file.  The temporary file is created fresh (O_EXCL, O_NOFOLLOW: a symlink planted at
    its predictable name is never written through) with the user's umask; a symlink at
    ``path`` itself is refused, and the rename would replace it, not follow it."""
    if path.is_symlink():
        raise VftraceError(f"{path}: is a symlink; refusing to write through it (remove it "
                           "or give another name)")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        if os.path.lexists(tmp):             # left by a crashed run with our pid, or planted
            os.unlink(tmp)
        with os.fdopen(os.open(tmp, flags, 0o666), mode) as f:
            yield f
        os.replace(tmp, path)
    except OSError as e:
        raise VftraceError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)                   # gone already after the rename
