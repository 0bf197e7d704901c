"""Lab tests of the pf_sched kernel module (kmod/), run as root inside the lab VM.

The module fixture insmods build/kmod/<release>/pf_sched.ko, binds up to two free edu
devices through driver_override and, whatever happens, leaves them unbound and the
module unloaded.  Tests run in file order; the unbind test is last because it removes
a PF under blocked users.
"""
from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.lab import labutil, pfsched
from tracer.pfsched import control

PAGE = 4096
MOD = "pf_sched"
DEBUGFS = control.DEBUGFS
TRACING = Path("/sys/kernel/tracing")
SLOW_SLICE_US = 50_000   # blocking tests: 50 ms windows so a woken waiter never misses one
MAX_PFS = 2          # the lab keeps a third edu device free for other tests
BAD_DMESG = re.compile(r"WARNING:|BUG:|Oops|sleeping function called|lockdep|"
                       r"circular locking|blocked for more than|general protection|"
                       r"Call Trace|refcount_t:|list_(add|del) corruption")


# ---------------------------------------------------------------- helpers

class Pf:
    def __init__(self, bdf: str):
        self.bdf = bdf
        self.dbg = DEBUGFS / bdf
        st = self.stats()
        self.index = st["pf"]
        self.nr_vfs = st["nr_vfs"]
        self.bar_pages = st["bar_pages"]
        self.bar_size = self.bar_pages * PAGE
        self.dev = Path(f"/dev/pf_sched{self.index}")

    def stats(self) -> dict:
        return control.stats(self.bdf)

    def set_enabled(self, on: bool) -> None:
        (self.dbg / "enabled").write_text("1" if on else "0")

    def wait_switch(self, seq: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.stats()["seq"] <= seq:
            assert time.monotonic() < deadline, f"{self.bdf}: no switch after seq {seq}"
            time.sleep(0.005)

    def off_with_other_active(self, vf: int | None = None, tries: int = 50) -> tuple[int, int]:
        """Stop this PF's switching with some VF active; return (active, target) where
        target != active (``vf`` if given).  Lets it switch until ``vf`` is not active."""
        for _ in range(tries):
            self.set_enabled(False)      # returns once no switch is in flight
            st = self.stats()
            active = st["active_vf"]
            target = (active + 1) % self.nr_vfs if vf is None else vf
            if active >= 0 and target != active:
                return active, target
            self.set_enabled(True)
            self.wait_switch(st["seq"])
        raise AssertionError(f"{self.bdf}: VF {vf} stayed active")


def kthread_comms() -> set[str]:
    comms = set()
    for c in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            comms.add(c.read_text().strip())
    return comms


set_param, get_param = control.set_param, control.param


def dmesg_lines() -> list[str]:
    return labutil.dmesg().splitlines()


def new_dmesg(before: list[str]) -> list[str]:
    now = dmesg_lines()
    # the ring buffer only grows during a test here; fall back to the tail if it wrapped
    if len(now) >= len(before) and now[:len(before)][-5:] == before[-5:]:
        return now[len(before):]
    return now[-500:]


def assert_clean_dmesg(lines: list[str]) -> None:
    bad = [line for line in lines if BAD_DMESG.search(line)]
    assert not bad, "kernel complained:\n" + "\n".join(bad[:40])


def delta(a: dict, b: dict, key: str) -> int:
    return b[key] - a[key]


_EVENT = re.compile(r"\s(\w+): (pf=\S+.*)$")


@contextlib.contextmanager
def trace_instance(events: list[str], name: str = "pf_sched_test", event_filter: str = ""):
    """An ftrace instance with ``events`` (``system/event``) enabled.  ``event_filter``
    is set on each event before it is enabled: set after, the buffer can already hold
    events it would have dropped (another task's DMA unmap, say)."""
    inst = TRACING / "instances" / f"{name}_{os.getpid()}"
    inst.mkdir()
    enabled = []
    try:
        (inst / "buffer_size_kb").write_text("8192")
        for ev in events:
            if event_filter:
                (inst / "events" / ev / "filter").write_text(event_filter)
            (inst / "events" / ev / "enable").write_text("1")
            enabled.append(ev)
        yield inst
    finally:
        for ev in enabled:
            with contextlib.suppress(OSError):
                (inst / "events" / ev / "enable").write_text("0")
        inst.rmdir()


def read_events(inst: Path) -> tuple[list[tuple[str, dict]], tuple[int, int]]:
    """Parsed events and (entries-in-buffer, entries-written) of an instance."""
    text = (inst / "trace").read_text()
    m = re.search(r"entries-in-buffer/entries-written: (\d+)/(\d+)", text)
    counts = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
    events = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        em = _EVENT.search(line)
        if not em:
            continue
        fields = dict(kv.split("=", 1) for kv in em.group(2).split())
        events.append((em.group(1), {k: int(v) for k, v in fields.items()}))
    return events, counts


def _kprobe_cmd(cmd: str) -> None:
    fd = os.open(TRACING / "kprobe_events", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, cmd.encode())
    except OSError as e:
        log = (TRACING / "error_log").read_text() if (TRACING / "error_log").exists() else ""
        raise AssertionError(f"kprobe_events {cmd!r}: {e}\n{log[-600:]}") from e
    finally:
        os.close(fd)


@contextlib.contextmanager
def kprobes(probes: dict[str, str]):
    """Define kprobe events pftest/<name> on symbol for the duration."""
    done = []
    try:
        for name, sym in probes.items():
            _kprobe_cmd(f"p:pftest/{name} {sym}\n")
            done.append(name)
        yield
    finally:
        for name in done:
            with contextlib.suppress(OSError, AssertionError):
                _kprobe_cmd(f"-:pftest/{name}\n")


def child_script(body: str) -> subprocess.Popen:
    """A Python child (binary pipes); read its stdout only with read_line()/finish()."""
    proc = subprocess.Popen([sys.executable, "-u", "-c", body], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _pending[proc.pid] = b""
    return proc


_pending: dict[int, bytes] = {}


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """Next stdout line of a child_script() child, unbuffered (select + os.read)."""
    fd = proc.stdout.fileno()
    buf = _pending[proc.pid]
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        r, _, _ = select.select([fd], [], [], max(left, 0))
        if not r:
            try:
                where = Path(f"/proc/{proc.pid}/stack").read_text()
            except OSError as e:
                where = str(e)
            raise AssertionError(f"child said nothing within {timeout}s; kernel stack:\n{where}")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    line, _, _pending[proc.pid] = buf.partition(b"\n")
    return line.decode().strip()


def send(proc: subprocess.Popen, text: str) -> None:
    proc.stdin.write(text.encode())
    proc.stdin.flush()


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """Wait for the child; its remaining stdout (after read_line()s) and stderr."""
    out, err = proc.communicate(timeout=timeout)
    return (_pending.pop(proc.pid, b"") + out).decode(), err.decode()


MMAP_CHILD = """
import mmap, os, sys
fd = os.open({dev!r}, os.O_RDWR)
m = mmap.mmap(fd, {size}, mmap.MAP_SHARED, offset={off})
print("mapped", flush=True)
print(m[8:16].hex(), flush=True)
sys.stdin.readline()
print(m[8:16].hex(), flush=True)
"""


class PreadThread(threading.Thread):
    def __init__(self, fd: int, size: int, off: int):
        super().__init__(daemon=True)
        self.fd, self.size, self.off = fd, size, off
        self.result: bytes | None = None
        self.error: OSError | None = None
        self.elapsed = 0.0

    def run(self):
        t0 = time.monotonic()
        try:
            self.result = os.pread(self.fd, self.size, self.off)
        except OSError as e:
            self.error = e
        self.elapsed = time.monotonic() - t0


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def kmod():
    if os.geteuid() != 0 or not labutil.in_lab():
        pytest.skip("lab test: runs as root inside the lab VM (VFTRACE_LAB=1)")
    ko = labutil.kmod_path()
    if not ko.exists():
        pytest.skip(f"{ko} is not built: run sh scripts/build-kmod.sh")
    if labutil.module_loaded(MOD):
        pfsched.unload()
    labutil.run(["insmod", str(ko)])
    try:
        yield ko
    finally:
        pfsched.unload()
    assert not labutil.module_loaded(MOD), "rmmod pf_sched failed"


@pytest.fixture(scope="module")
def pfs(kmod):
    free = labutil.free_edu_devices()
    if not free:
        pytest.skip("no free edu device in the lab VM (-device edu)")
    with contextlib.ExitStack() as stack:
        bound = []
        for bdf in free[:MAX_PFS]:
            stack.enter_context(labutil.bound_to(bdf, MOD))
            bound.append(Pf(bdf))
        yield bound


@pytest.fixture(autouse=True)
def _defaults_after(request):
    """Restore run-time params and per-PF gates after each test."""
    yield
    if not labutil.module_loaded(MOD):
        return
    set_param("enabled", 1)
    set_param("slice_us", 2000)
    set_param("unmap_mode", "strict")
    for d in DEBUGFS.glob("*/enabled") if DEBUGFS.exists() else []:
        with contextlib.suppress(OSError):
            d.write_text("1")


# ---------------------------------------------------------------- tests

BAD_LOAD_PARAMS = [
    ("nr_vfs=0", "nr_vfs", "1..64"),
    ("nr_vfs=65", "nr_vfs", "1..64"),
    ("bar_pages=0", "bar_pages", "1..256"),
    ("bar_pages=257", "bar_pages", "1..256"),
    ("slice_us=10000001", "slice_us", "0..10000000"),
    ("unmap_mode=lazy", "unmap_mode", "strict"),
]


def test_bad_params_refused_at_load():
    """Out-of-range params make insmod fail with a pr_err naming the param and range."""
    if os.geteuid() != 0 or not labutil.in_lab():
        pytest.skip("lab test: runs as root inside the lab VM (VFTRACE_LAB=1)")
    ko = labutil.kmod_path()
    if not ko.exists():
        pytest.skip(f"{ko} is not built: run sh scripts/build-kmod.sh")
    if labutil.module_loaded(MOD):
        pfsched.unload()
    for arg, name, rng in BAD_LOAD_PARAMS:
        before = dmesg_lines()
        r = labutil.run(["insmod", str(ko), arg], check=False)
        assert r.returncode != 0, f"insmod {arg} succeeded"
        assert not labutil.module_loaded(MOD)
        msgs = [ln for ln in new_dmesg(before) if f"pf_sched: invalid {name}=" in ln]
        assert msgs and rng in msgs[-1], f"no pr_err naming {name} and {rng}: {msgs}"


def test_load_and_bind(pfs):
    assert 1 <= len(pfs) <= MAX_PFS
    assert sorted(p.index for p in pfs) == list(range(len(pfs)))
    for p in pfs:
        st = os.stat(p.dev)
        assert stat.S_ISCHR(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        s0 = p.stats()
        assert s0["mode"] == "iommu"
        assert s0["nr_vfs"] == 4 and s0["bar_pages"] == 4
        assert f"pf_sched/{p.index}" in kthread_comms()
        time.sleep(0.5)
        s1 = p.stats()
        assert s1["seq"] > s0["seq"], "seq does not advance"
        # The counters are read one by one while the PF switches (CI run B read an
        # unmap and not yet its map: 439 maps, 439 unmaps): compared with switching
        # gated off and the counters settled.
        set_param("enabled", 0)
        s1, s2 = None, p.stats()
        while s1 != s2:
            time.sleep(0.1)
            s1, s2 = s2, p.stats()
        set_param("enabled", 1)
        assert s1["switches"] == s1["seq"]
        assert s1["map_calls"] == s1["unmap_calls"] + 1     # VF 0 granted at probe
    assert labutil.current_driver(pfs[0].bdf) == MOD
    lines = dmesg_lines()
    for p in pfs:
        assert any(f"{p.bdf}: /dev/pf_sched{p.index}:" in ln for ln in lines)


def test_gates_stop_switching(pfs):
    """Global enabled, slice_us=0 and per-PF debugfs enabled all stop switching."""
    for gate_off, gate_on in [
        (lambda: set_param("enabled", 0), lambda: set_param("enabled", 1)),
        (lambda: set_param("slice_us", 0), lambda: set_param("slice_us", 2000)),
    ]:
        gate_off()
        a = [p.stats()["seq"] for p in pfs]
        time.sleep(0.4)
        assert [p.stats()["seq"] for p in pfs] == a
        gate_on()
        time.sleep(0.4)
        assert all(p.stats()["seq"] > s for p, s in zip(pfs, a))
    # per-PF gate: only that PF stops
    pfs[0].set_enabled(False)
    assert (pfs[0].dbg / "enabled").read_text().strip() == "0"
    a = [p.stats()["seq"] for p in pfs]
    time.sleep(0.4)
    b = [p.stats()["seq"] for p in pfs]
    assert b[0] == a[0]
    if len(pfs) > 1:
        assert b[1] > a[1]
    with pytest.raises(OSError) as e:
        (pfs[0].dbg / "enabled").write_text("2")
    assert e.value.errno == errno.EINVAL


def test_counters_match_tracepoints(pfs):
    set_param("enabled", 0)              # returns once no switch is in flight
    before = {p.index: p.stats() for p in pfs}
    hist_before = {p.index: control.total_hist(p.bdf) for p in pfs}
    with trace_instance(["pf_sched/vf_switch_begin", "pf_sched/vf_switch_end"]) as inst:
        set_param("enabled", 1)
        time.sleep(1.0)
        set_param("enabled", 0)
        after = {p.index: p.stats() for p in pfs}
        events, (in_buf, written) = read_events(inst)
    assert in_buf == written, f"trace buffer overran: {in_buf}/{written}"
    for p in pfs:
        b, a = before[p.index], after[p.index]
        ends = [f for name, f in events if name == "vf_switch_end" and f["pf"] == p.index]
        begins = [f for name, f in events if name == "vf_switch_begin" and f["pf"] == p.index]
        n = delta(b, a, "switches")
        assert n > 0
        assert len(ends) == n == len(begins)
        assert [f["seq"] for f in ends] == list(range(b["seq"] + 1, a["seq"] + 1))
        assert [f["seq"] for f in begins] == [f["seq"] for f in ends]
        for f in ends:
            assert f["to"] == (f["from"] + 1) % p.nr_vfs
            assert f["total_ns"] == f["revoke_ns"] + f["grant_ns"]
        assert sum(f["total_ns"] for f in ends) == delta(b, a, "total_ns_sum")
        assert sum(f["revoke_ns"] for f in ends) == delta(b, a, "revoke_ns_sum")
        assert sum(f["grant_ns"] for f in ends) == delta(b, a, "grant_ns_sum")
        assert delta(b, a, "total_ns_count") == n
        assert a["total_ns_max"] >= max(f["total_ns"] for f in ends)
        assert a["total_ns_min"] <= min(f["total_ns"] for f in ends)
        assert a["active_vf"] == ends[-1]["to"]
        # total_hist: each switch in the bucket of the total_ns its tracepoint gave.
        hist = control.hist_delta(control.total_hist(p.bdf), hist_before[p.index])
        assert hist == Counter(control.hist_bucket_low(f["total_ns"]) for f in ends)
        exact = sorted(f["total_ns"] for f in ends)
        p50 = control.hist_quantile(hist, 0.5)
        assert abs(p50 - exact[len(exact) // 2]) <= exact[len(exact) // 2] / 16


def test_mmap_blocks_while_vf_off(pfs):
    """A mapping of a VF is zapped when the VF is switched off and the next touch
    blocks in the fault handler until the VF is on again."""
    p = pfs[0]
    set_param("slice_us", SLOW_SLICE_US)    # long windows: robust on a loaded host
    fd = os.open(p.dev, os.O_RDWR)
    try:
        p.set_enabled(False)
        target = p.stats()["active_vf"]
        value = os.urandom(8)
        os.pwrite(fd, value, target * p.bar_size + 8)    # VF on: does not block
        child = child_script(MMAP_CHILD.format(dev=str(p.dev), size=p.bar_size,
                                               off=target * p.bar_size))
        try:
            assert read_line(child, 30) == "mapped"
            assert read_line(child, 30) == value.hex()   # VF on: fault does not block
            with trace_instance(["pf_sched/vf_access_wait"]) as inst:
                active, _ = p.off_with_other_active(target)
                s0 = p.stats()
                # the revoke zapped the child's PTE: the next touch must block
                send(child, "go\n")
                time.sleep(1.5)
                assert child.poll() is None, "mmap access to an off VF did not block"
                assert p.stats()["blocked_accesses"] == s0["blocked_accesses"]
                p.set_enabled(True)
                out, err = finish(child, 60)
                assert child.returncode == 0, err
                assert out.strip() == value.hex()
                s1 = p.stats()
                events, _ = read_events(inst)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert delta(s0, s1, "blocked_accesses") >= 1
        assert delta(s0, s1, "blocked_wait_ns") >= 1_000_000_000
        waits = [f for name, f in events if name == "vf_access_wait"
                 and f["pf"] == p.index and f["vf"] == target]
        assert waits, f"no vf_access_wait event for VF {target}: {events}"
        assert waits[0]["wait_ns"] >= 1_000_000_000
        # released by the switch that granted VF target after re-enabling
        expect = s0["seq"] + (target - active) % p.nr_vfs
        assert waits[0]["seq"] == expect
    finally:
        os.close(fd)


def test_pread_blocks_while_vf_off(pfs):
    p = pfs[-1]
    set_param("slice_us", SLOW_SLICE_US)
    fd = os.open(p.dev, os.O_RDWR)
    try:
        active, target = p.off_with_other_active()
        # the active VF is accessible without blocking
        os.pwrite(fd, b"\x5a" * 4, active * p.bar_size + 16)
        assert os.pread(fd, 4, active * p.bar_size + 16) == b"\x5a" * 4
        s0 = p.stats()
        reader = PreadThread(fd, 8, target * p.bar_size)
        reader.start()
        time.sleep(1.5)
        assert reader.is_alive(), "pread of an off VF did not block"
        assert p.stats()["seq"] == s0["seq"]
        p.set_enabled(True)
        reader.join(60)
        assert not reader.is_alive()
        assert reader.error is None, reader.error
        assert len(reader.result) == 8
        s1 = p.stats()
        assert delta(s0, s1, "blocked_accesses") == 1
        assert delta(s0, s1, "blocked_wait_ns") >= 1_000_000_000
        # pwrite blocks too, and its data lands in the BAR read back through pread
        active, target = p.off_with_other_active()
        val = os.urandom(8)
        w = threading.Thread(target=os.pwrite, args=(fd, val, target * p.bar_size + 24),
                             daemon=True)
        w.start()
        time.sleep(1.0)
        assert w.is_alive(), "pwrite to an off VF did not block"
        p.set_enabled(True)
        w.join(60)
        assert not w.is_alive()
        assert os.pread(fd, 8, target * p.bar_size + 24) == val
    finally:
        os.close(fd)


FAULT_WAITER_CHILD = """
import ctypes, mmap, os, threading, time
fd = os.open({dev!r}, os.O_RDWR)
m = mmap.mmap(fd, {size}, mmap.MAP_SHARED, offset={off})
bar = ctypes.addressof(ctypes.c_char.from_buffer(m))
out = ctypes.create_string_buffer(8)
# ctypes.memmove releases the GIL: this thread blocks in the fault, the main one runs
toucher = threading.Thread(target=ctypes.memmove, args=(out, bar + 8, 8), daemon=True)
toucher.start()
time.sleep(1.5)
print("blocked" if toucher.is_alive() else "not blocked", flush=True)
t0 = time.monotonic()
anon = mmap.mmap(-1, 1 << 20)     # mmap and munmap take mmap_lock for writing
anon.close()
print(f"mapped in {{time.monotonic() - t0:.3f}} s", flush=True)
toucher.join()
print(out.raw.hex(), flush=True)
"""

PREAD_SIGNAL_CHILD = """
import os, signal
class Kicked(Exception):
    pass
def kick(signum, frame):
    raise Kicked
signal.signal(signal.SIGUSR1, kick)
fd = os.open({dev!r}, os.O_RDWR)
print("reading", flush=True)
try:
    os.pread(fd, 8, {off})
    print("read", flush=True)
except Kicked:
    print("kicked", flush=True)
"""


def test_blocked_fault_holds_no_mmap_lock(pfs):
    """A vCPU blocked in the fault handler has dropped mmap_lock (VM_FAULT_RETRY): its
    process can still mmap and munmap, and the access completes once the VF is on."""
    p = pfs[0]
    set_param("slice_us", SLOW_SLICE_US)
    child = None
    try:
        active, target = p.off_with_other_active()
        s0 = p.stats()
        child = child_script(FAULT_WAITER_CHILD.format(dev=str(p.dev), size=p.bar_size,
                                                       off=target * p.bar_size))
        assert read_line(child, 30) == "blocked"
        # Held across the wait, mmap_lock would block this until the VF is on again.
        assert read_line(child, 20).startswith("mapped in "), "mmap waited for the fault"
        assert p.stats()["seq"] == s0["seq"], "switching was not gated off"
        p.set_enabled(True)
        out, err = finish(child, 60)
        assert child.returncode == 0, err
        s1 = p.stats()
        assert delta(s0, s1, "blocked_accesses") >= 1
        assert delta(s0, s1, "blocked_wait_ns") >= 1_000_000_000
        assert len(out.strip()) == 16, out
    finally:
        if child is not None and child.poll() is None:
            p.set_enabled(True)
            child.kill()
            child.wait()


def test_signals_stop_a_blocked_pread(pfs):
    """With switching gated off, a handled signal (a vCPU kick) interrupts a blocked
    pread and SIGTERM ends its process: the waits are interruptible, not just killable."""
    p = pfs[-1]
    set_param("slice_us", SLOW_SLICE_US)
    children = []
    try:
        active, target = p.off_with_other_active()
        s0 = p.stats()
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            child = child_script(PREAD_SIGNAL_CHILD.format(dev=str(p.dev),
                                                           off=target * p.bar_size))
            children.append(child)
            assert read_line(child, 30) == "reading"
            time.sleep(1.5)
            assert child.poll() is None, "pread of an off VF did not block"
            os.kill(child.pid, sig)
            if sig == signal.SIGUSR1:
                assert read_line(child, 10) == "kicked"
                finish(child, 10)
                assert child.returncode == 0
            else:
                child.wait(timeout=10)
                assert child.returncode == -signal.SIGTERM
        s1 = p.stats()
        assert s1["seq"] == s0["seq"], "switching was not gated off"
        # both interrupted waits are counted as blocked accesses
        assert delta(s0, s1, "blocked_accesses") == 2
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def test_bad_mmap_and_pread_einval(pfs):
    p = pfs[0]
    fd = os.open(p.dev, os.O_RDWR)
    try:
        bad_maps = [
            (p.bar_size, p.nr_vfs * p.bar_size, mmap.MAP_SHARED),     # past the last VF
            (2 * p.bar_size, 0, mmap.MAP_SHARED),                     # spans two BARs
            (p.bar_size, PAGE, mmap.MAP_SHARED),                      # crosses into VF 1
            (PAGE, 0, mmap.MAP_PRIVATE),                              # private
        ]
        for length, off, flags in bad_maps:
            with pytest.raises(OSError) as e:
                mmap.mmap(fd, length, flags, offset=off)
            assert e.value.errno == errno.EINVAL, (length, off, flags)
        # good ones for comparison
        mmap.mmap(fd, PAGE, mmap.MAP_SHARED, offset=(p.bar_pages - 1) * PAGE).close()
        mmap.mmap(fd, p.bar_size, mmap.MAP_SHARED, offset=p.bar_size).close()

        bad_rw = [(3, 0), (16, 0), (4, 2), (8, 4), (2, 1), (4, p.nr_vfs * p.bar_size),
                  (1, -1 & ((1 << 63) - 1))]
        for size, off in bad_rw:
            with pytest.raises(OSError) as e:
                os.pread(fd, size, off)
            assert e.value.errno == errno.EINVAL, (size, off)
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"x" * size, off)
            assert e.value.errno == errno.EINVAL, (size, off)
        # run-time params are validated too
        for name, val in [("slice_us", 10000001), ("slice_us", -1), ("enabled", "maybe"),
                          ("unmap_mode", "lazy")]:
            with pytest.raises(OSError) as e:
                set_param(name, val)
            assert e.value.errno == errno.EINVAL, (name, val)
        assert get_param("slice_us") == "2000"
        assert get_param("unmap_mode") == "strict"
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", ["strict", "batched"])
def test_unmap_modes(pfs, mode):
    """Each switch is one map call and one unmap call of exactly one BAR, through
    iommu_unmap (strict) or iommu_unmap_fast (batched), counted with kprobes."""
    set_param("enabled", 0)
    set_param("unmap_mode", mode)
    assert get_param("unmap_mode") == mode
    before = {p.index: p.stats() for p in pfs}
    with kprobes({"unmap": "iommu_unmap", "unmap_fast": "iommu_unmap_fast",
                  "map": "iommu_map"}):
        probes = ["pftest/unmap", "pftest/unmap_fast", "pftest/map"]
        comms = " || ".join(f'comm == "pf_sched/{p.index}"' for p in pfs)
        with trace_instance(probes, name="pf_sched_kp", event_filter=comms) as inst:
            set_param("enabled", 1)
            time.sleep(0.6)
            set_param("enabled", 0)
            after = {p.index: p.stats() for p in pfs}
            text = (inst / "trace").read_text()
    m = re.search(r"entries-in-buffer/entries-written: (\d+)/(\d+)", text)
    assert m and m.group(1) == m.group(2), "kprobe trace buffer overran"
    hits = {ev.split("/")[1]: len(re.findall(rf"\s{ev.split('/')[1]}: \(", text))
            for ev in probes}
    total = 0
    for p in pfs:
        b, a = before[p.index], after[p.index]
        assert a["unmap_mode"] == mode
        n = delta(b, a, "switches")
        assert n > 0
        total += n
        assert delta(b, a, "map_calls") == n == delta(b, a, "unmap_calls")
        assert a["map_calls"] == a["unmap_calls"] + 1
        assert delta(b, a, "map_bytes") == n * p.bar_pages * PAGE
        assert delta(b, a, "unmap_bytes") == n * p.bar_pages * PAGE
        assert a["map_errors"] == 0
        assert a["map_bytes"] // a["map_calls"] == p.bar_pages * PAGE
    assert hits["map"] == total, (hits, total)
    if mode == "strict":
        assert hits["unmap"] == total and hits["unmap_fast"] == 0, (hits, total)
    else:
        assert hits["unmap_fast"] == total and hits["unmap"] == 0, (hits, total)


STRESS_CHILD = """
import mmap, os, sys, time
fd = os.open({dev!r}, os.O_RDWR)
maps = [mmap.mmap(fd, {size}, mmap.MAP_SHARED, offset=v * {size}) for v in range({nvf})]
for v, m in enumerate(maps):
    m[0:8] = (0x1000 + v).to_bytes(8, "little")
print("ready", flush=True)
n = 0
end = time.monotonic() + {secs}
while time.monotonic() < end:
    for v, m in enumerate(maps):
        if int.from_bytes(m[0:8], "little") != 0x1000 + v:
            print("corrupt", v, flush=True)
            sys.exit(3)
        n += 1
print("touches", n, flush=True)
"""


def test_stress_100k_switches(pfs):
    """100k switches over all PFs at a short slice, with mmap and pread users hammering
    every VF, and a clean dmesg."""
    target = 100_000
    slice_us = 20
    before_dmesg = dmesg_lines()
    s0 = {p.index: p.stats() for p in pfs}
    set_param("slice_us", slice_us)
    t0 = time.monotonic()
    p = pfs[0]
    child = child_script(STRESS_CHILD.format(dev=str(p.dev), size=p.bar_size,
                                             nvf=p.nr_vfs, secs=8))
    stop = threading.Event()
    preads = [0]
    errors = []

    def pread_loop(pf: Pf):
        fd = os.open(pf.dev, os.O_RDWR)
        try:
            i = 0
            while not stop.is_set():
                vf = i % pf.nr_vfs
                os.pwrite(fd, (0x2000 + vf).to_bytes(4, "little"), vf * pf.bar_size + 64)
                got = int.from_bytes(os.pread(fd, 4, vf * pf.bar_size + 64), "little")
                if got != 0x2000 + vf:
                    errors.append((pf.index, vf, got))
                preads[0] += 1
                i += 1
        except OSError as e:
            errors.append(e)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=pread_loop, args=(q,), daemon=True) for q in pfs]
    for t in threads:
        t.start()
    try:
        assert read_line(child, 60) == "ready"
        deadline = t0 + 170
        done = 0
        while time.monotonic() < deadline:
            time.sleep(1)
            done = sum(q.stats()["switches"] - s0[q.index]["switches"] for q in pfs)
            if done >= target:
                break
        elapsed = time.monotonic() - t0
        set_param("slice_us", 2000)
        out, err = finish(child, 60)
    finally:
        stop.set()
        if child.poll() is None:
            child.kill()
            child.wait()
        for t in threads:
            t.join(30)
    rate = done / elapsed
    print(f"\n{done} switches on {len(pfs)} PF(s) in {elapsed:.1f}s at slice_us={slice_us}: "
          f"{rate:.0f} switches/s, {preads[0]} pread/pwrite pairs")
    assert done >= target, f"only {done} switches in {elapsed:.0f}s ({rate:.0f}/s)"
    assert child.returncode == 0, (out, err)
    assert "touches" in out
    assert not errors, errors[:5]
    assert preads[0] > 0
    for q in pfs:
        a = q.stats()
        assert a["switches"] == a["seq"]
        assert a["map_errors"] == 0
        assert a["map_calls"] == a["unmap_calls"] + 1
        assert a["blocked_accesses"] > s0[q.index]["blocked_accesses"]
    assert_clean_dmesg(new_dmesg(before_dmesg))


def test_unbind_while_blocked(pfs):
    """Remove a PF under a blocked pread and a blocked mmap fault: -ENODEV and SIGBUS,
    the domain is left empty, open files outlive the device and pin the module."""
    p = pfs[-1]
    set_param("slice_us", SLOW_SLICE_US)
    before_dmesg = dmesg_lines()
    fd = os.open(p.dev, os.O_RDWR)
    child = None
    try:
        active, target = p.off_with_other_active()
        child = child_script(MMAP_CHILD.format(dev=str(p.dev), size=p.bar_size,
                                               off=target * p.bar_size))
        assert read_line(child, 30) == "mapped"
        reader = PreadThread(fd, 4, target * p.bar_size)
        reader.start()
        time.sleep(1.5)
        assert child.poll() is None, "mmap fault did not block"
        assert reader.is_alive(), "pread did not block"

        t0 = time.monotonic()
        labutil.unbind(p.bdf)
        unbind_s = time.monotonic() - t0
        child.wait(timeout=15)
        reader.join(15)
        assert child.returncode == -signal.SIGBUS, (child.returncode, finish(child, 10))
        assert not reader.is_alive(), "pread still blocked after remove"
        assert isinstance(reader.error, OSError) and reader.error.errno == errno.ENODEV
        assert unbind_s < 15
        assert labutil.current_driver(p.bdf) is None
        assert not p.dev.exists()

        # the open file outlives the device: -ENODEV, and it pins the module
        with pytest.raises(OSError) as e:
            os.pread(fd, 4, 0)
        assert e.value.errno == errno.ENODEV
        with pytest.raises(OSError) as e:
            mmap.mmap(fd, PAGE, mmap.MAP_SHARED, offset=0)
        assert e.value.errno == errno.ENODEV
        r = labutil.run(["rmmod", MOD], check=False)
        assert r.returncode != 0 and labutil.module_loaded(MOD), "rmmod with an open file"
        assert "in use" in r.stderr or "busy" in r.stderr.lower(), r.stderr
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        os.close(fd)
    lines = new_dmesg(before_dmesg)
    released = [ln for ln in lines if f"pf_sched {p.bdf}: released:" in ln]
    expect = p.nr_vfs * p.bar_pages
    assert released and released[-1].endswith(f"released: {expect} pages freed, domain empty"), \
        released
    assert_clean_dmesg(lines)
    # after close, the module unloads (the fixture rmmods it and checks)
