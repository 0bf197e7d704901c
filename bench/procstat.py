"""What /proc says of the recorder the lab benches run: its memory, its CPU time and
the machine's, its threads' nice values (bench/soak.py, bench/lab_bench.py)."""
from __future__ import annotations

import os
import time
from pathlib import Path


def rss_kb(pid: int) -> int | None:
    """The process's resident set in KiB; None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_ticks(pid: int) -> int:
    """The process's user + system time, all threads, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])      # utime, stime (fields 14, 15)


def thread_nices(pid: int) -> list[int]:
    """The nice values the threads of ``pid`` have (field 19 of each /proc task's stat)."""
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out.add(int((task / "stat").read_text().rsplit(")", 1)[1].split()[16]))
        except FileNotFoundError:                    # a thread that ended meanwhile
            pass
    return sorted(out)


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of every CPU since boot (/proc/stat's cpu line)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = v[3] + v[4]                               # idle, iowait
    total = sum(v[:8])                               # guest time is inside user already
    return total - idle, total


class CpuShare:
    """The recorder's CPU and the machine's over a run, from two readings: a reader that
    loses records with the CPUs busy and a low share was starved, one with CPU to spare
    that still loses is slow or stalled."""

    def __init__(self, pid: int) -> None:
        self.pid, self.t0 = pid, time.monotonic()
        self.rec0, self.mach0 = cpu_ticks(pid), machine_ticks()

    def result(self) -> dict:
        hz = os.sysconf("SC_CLK_TCK")
        wall = time.monotonic() - self.t0
        busy, total = (b - a for a, b in zip(self.mach0, machine_ticks()))
        return {"recorder_cpu_s": round((cpu_ticks(self.pid) - self.rec0) / hz, 1),
                "wall_s": round(wall, 1), "cpus": os.cpu_count(),
                "machine_busy": round(busy / total, 3) if total else None}
