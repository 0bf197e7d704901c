"""What a lab guest was doing when it is stopped for hanging: asked of QEMU, not the guest.

A guest that stops making progress (a test stuck past its own timeout, or a VM past
``--timeout``) may be alive with a task blocked, or wedged with every vCPU spinning.
Before the VM is killed, QEMU's monitor (QMP, on a socket the lab adds) is asked for:

- where each vCPU is, a few times over, named with the symbols the guest copied from
  /proc/kallsyms at boot: this works even when the guest takes no interrupt at all;
- the guest's own dumps, by magic SysRq keys on its emulated keyboard: the log level
  raised (9), blocked tasks (w) and a backtrace of every CPU (l), which land in the
  kernel log (``--kernel-log``) if the guest still takes interrupts.

QMP is a JSON line protocol; the few commands used here need no client library.
"""
from __future__ import annotations

import bisect
import json
import re
import socket
import time
from pathlib import Path

from . import LabError

SYSRQ_KEYS = ("9", "w", "l")      # log level 9, blocked tasks, every CPU's backtrace
RIP_SAMPLES = 3
QMP_TIMEOUT_S = 10.0


class QMPError(LabError):
    """QEMU's monitor refused a command or went away."""


class QMP:
    """A QMP connection: greeting, capabilities, then one command at a time."""

    def __init__(self, path: Path, timeout: float = QMP_TIMEOUT_S):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.reader = self.sock.makefile("r", encoding="utf-8", errors="replace")
        self._reply()                                       # the greeting
        self.execute("qmp_capabilities")

    def _reply(self) -> dict:
        while True:
            line = self.reader.readline()
            if not line:
                raise QMPError("QEMU closed the monitor")
            msg = json.loads(line)
            if "event" not in msg:                          # events may come any time
                return msg

    def execute(self, command: str, **arguments):
        msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        reply = self._reply()
        if "error" in reply:
            raise QMPError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def hmp(self, line: str) -> str:
        return self.execute("human-monitor-command", **{"command-line": line}) or ""

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class KernelSymbols:
    """Addresses to ``function+0xoff [module]`` from a /proc/kallsyms copy (text only)."""

    def __init__(self, kallsyms: Path | None):
        self.addrs: list[int] = []
        self.names: list[str] = []
        if kallsyms is None:
            return
        try:
            lines = kallsyms.read_text(errors="replace").splitlines()
        except OSError:
            return
        syms = []
        for line in lines:
            parts = line.split()
            if len(parts) >= 3 and parts[1] in ("t", "T", "w", "W"):
                syms.append((int(parts[0], 16), " ".join(parts[2:])))
        syms.sort()
        self.addrs = [a for a, _ in syms]
        self.names = [n for _, n in syms]

    def name(self, addr: int) -> str:
        if addr < 1 << 63:
            return "user space"
        i = bisect.bisect_right(self.addrs, addr) - 1
        if i < 0 or i + 1 >= len(self.addrs):
            return "not in the boot's symbols (a module loaded later, or BPF)" if self.addrs \
                else "no kernel symbols"
        name, _, module = self.names[i].partition(" ")
        return f"{name}+{addr - self.addrs[i]:#x}{' ' + module if module else ''}"


_CPU_RE = re.compile(r"^CPU#(\d+)", re.M)
_RIP_RE = re.compile(r"\bRIP=([0-9a-fA-F]+)")


def vcpu_rips(registers: str) -> dict[int, int]:
    """{cpu: RIP} from HMP ``info registers -a``."""
    out: dict[int, int] = {}
    starts = [(m.start(), int(m.group(1))) for m in _CPU_RE.finditer(registers)]
    for k, (pos, cpu) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else len(registers)
        rip = _RIP_RE.search(registers, pos, end)
        if rip:
            out[cpu] = int(rip.group(1), 16)
    return out


def examine(qmp_path: Path, kallsyms: Path | None, sysrq: bool = True,
            settle_s: float = 3.0) -> list[str]:
    """Lines saying where the vCPUs were; with ``sysrq`` the guest is also asked for its
    dumps (into its kernel log).  Never raises: a dead monitor is one line of the answer."""
    lines: list[str] = []
    try:
        qmp = QMP(qmp_path)
    except (OSError, QMPError, ValueError) as e:
        return [f"no QEMU monitor ({e})"]
    try:
        syms = KernelSymbols(kallsyms)
        for k in range(RIP_SAMPLES):
            rips = vcpu_rips(qmp.hmp("info registers -a"))
            where = ", ".join(f"cpu{c} {syms.name(r)}" for c, r in sorted(rips.items()))
            lines.append(f"vCPUs, sample {k + 1}: {where or 'no registers'}")
            time.sleep(0.5)
        if sysrq:
            for key in SYSRQ_KEYS:
                qmp.execute("send-key", keys=[{"type": "qcode", "data": q}
                                              for q in ("alt", "sysrq", key)])
                time.sleep(0.5)
            time.sleep(settle_s)                            # let the dumps reach the log
            lines.append(f"asked the guest for SysRq {'/'.join(SYSRQ_KEYS)} "
                         "(blocked tasks, every CPU's backtrace) into its kernel log")
    except (OSError, QMPError, ValueError) as e:
        lines.append(f"QEMU monitor: {e}")
    finally:
        qmp.close()
    return lines
