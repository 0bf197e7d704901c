"""Other vftrace recorders tracing at the same time.

Two recorders both work, but each one's probes run inside the other's windows and inflate
its timings, so the second one says so.  Each tracing process holds an exclusive flock on
``/run/vftrace/<pid>.lock`` while armed; a file whose lock can be taken is left over from
a process that died, and is removed."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

RUN_DIR = Path("/run/vftrace")


class Registration:
    def __init__(self, run_dir: Path = RUN_DIR) -> None:
        self.path = run_dir / f"{os.getpid()}.lock"
        self.fd: int | None = None
        self.others: list[int] = []
        try:
            run_dir.mkdir(mode=0o700, exist_ok=True)
            self.others = _live_holders(run_dir)
            self.fd = os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW
                              | os.O_CLOEXEC, 0o600)
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.close()            # no /run to write to: nothing to compare with

    def warning(self) -> str | None:
        if not self.others:
            return None
        pids = ", ".join(str(p) for p in self.others)
        return (f"another vftrace is tracing (pid {pids}): each one's probes inflate the"
                " other's timings; trace with one at a time for figures you compare")

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self.fd)
            self.fd = None


def _live_holders(run_dir: Path) -> list[int]:
    holders = []
    for path in sorted(run_dir.glob("*.lock")):
        if not path.stem.isdigit() or int(path.stem) == os.getpid():
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holders.append(int(path.stem))          # held: that recorder is running
        else:
            with contextlib.suppress(OSError):
                path.unlink()                       # its holder died without cleaning up
        finally:
            os.close(fd)
    return holders
