"""What the kernel counts itself, to check vftrace against: tracefs hist triggers.

``ExitLatency`` counts every KVM exit and its duration per vCPU thread with the kernel's
own event machinery, no BPF involved (Documentation/trace/histogram.rst, "latency"
example): a hist on ``kvm:kvm_exit`` saves the exit's timestamp per thread, the one on
``kvm:kvm_entry`` computes the latency and fires a synthetic event, whose own hist sums
it per thread.  The trace clock is set to ``mono``, the clock of bpf_ktime_get_ns().
"""
from __future__ import annotations

import re
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
SYNTH = "vft_check_exit"
ENTRY_KEY = re.compile(r"\{\s*(\w+):\s*(\d+)\s*\}\s*hitcount:\s*(\d+)(.*)$")


def _write(path: Path, text: str, append: bool = False) -> None:
    with open(path, "a" if append else "w") as f:
        f.write(text + "\n")


def _read_hist(path: Path) -> dict[int, dict[str, int]]:
    """{key value: {"hitcount": n, <val>: sum, ...}} from a hist file."""
    out: dict[int, dict[str, int]] = {}
    for line in path.read_text().splitlines():
        m = ENTRY_KEY.match(line.strip())
        if not m:
            continue
        vals = {"hitcount": int(m.group(3))}
        for name, value in re.findall(r"(\w+):\s*(\d+)", m.group(4)):
            vals[name] = int(value)
        out[int(m.group(2))] = vals
    return out


class ExitLatency:
    """Per-thread KVM exit counts and total exit time, as the kernel's hists saw them."""

    EXIT_TRIGGER = "hist:keys=common_pid:ts0=common_timestamp"
    ENTRY_TRIGGER = (f"hist:keys=common_pid:lat=common_timestamp-$ts0:"
                     f"onmatch(kvm.kvm_exit).trace({SYNTH},common_pid,$lat)")
    SYNTH_TRIGGER = "hist:keys=tid:vals=hitcount,lat"

    def __init__(self) -> None:
        self.exit_dir = TRACEFS / "events/kvm/kvm_exit"
        self.entry_dir = TRACEFS / "events/kvm/kvm_entry"
        self.synth_dir = TRACEFS / "events/synthetic" / SYNTH
        self.old_clock = "local"

    def __enter__(self) -> "ExitLatency":
        clock = (TRACEFS / "trace_clock").read_text()
        self.old_clock = re.search(r"\[(\w+)\]", clock).group(1)
        _write(TRACEFS / "trace_clock", "mono")
        _write(TRACEFS / "synthetic_events", f"{SYNTH} int tid; u64 lat")
        _write(self.synth_dir / "trigger", self.SYNTH_TRIGGER)
        _write(self.exit_dir / "trigger", self.EXIT_TRIGGER)
        _write(self.entry_dir / "trigger", self.ENTRY_TRIGGER)
        return self

    def exits(self) -> dict[int, int]:
        """Exits begun, per thread (the kvm_exit hist's hitcount)."""
        return {tid: v["hitcount"] for tid, v in _read_hist(self.exit_dir / "hist").items()}

    def latency(self) -> dict[int, tuple[int, int]]:
        """Exits ended, per thread: (count, total ns)."""
        return {tid: (v["hitcount"], v.get("lat", 0))
                for tid, v in _read_hist(self.synth_dir / "hist").items()}

    def __exit__(self, *exc) -> None:
        # Removed in reverse order: the entry hist refers to the exit one and the
        # synthetic event; the synthetic event goes last.
        for path, trigger in ((self.entry_dir, self.ENTRY_TRIGGER),
                              (self.exit_dir, self.EXIT_TRIGGER),
                              (self.synth_dir, self.SYNTH_TRIGGER)):
            try:
                _write(path / "trigger", "!" + trigger)
            except OSError:
                pass
        try:
            _write(TRACEFS / "synthetic_events", f"!{SYNTH}", append=True)
        except OSError:
            pass
        _write(TRACEFS / "trace_clock", self.old_clock)
