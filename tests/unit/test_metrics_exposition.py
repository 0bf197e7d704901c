"""The Prometheus exposition's rules, without a server: bucket counts against the values
themselves, which histograms a state takes, and the tap's answers to a scrape."""
from __future__ import annotations

import threading
import time

import numpy as np
from hypothesis import given, settings, strategies as st

from prometheus_client.parser import text_string_to_metric_families

from tracer.metrics.exposition import BOUNDS_NS, LE, MetricsState, cumulative, render
from tracer.metrics.tap import MetricsTap, state_from
from tracer.model.kernel_hist import KernelHist
from tracer.model.schema import SwitchRecord, COLUMNS
from tracer.model.stats import EXACT_LIMIT, Histogram, Stats


def hist_of(values) -> Histogram:
    h = Histogram()
    h.add_array(np.array(values, dtype=np.int64))
    return h


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 3000), st.integers(0, 200_000_000),
                          st.sampled_from(BOUNDS_NS), st.sampled_from([b + 1 for b in BOUNDS_NS])),
                min_size=1, max_size=300))
def test_each_bound_counts_the_values_at_or_below_it(values):
    got = dict(cumulative(hist_of(values)))
    assert got["+Inf"] == len(values)
    for b in BOUNDS_NS:
        true = sum(v <= b for v in values)
        if b < EXACT_LIMIT:
            assert got[LE[b]] == true, b
        else:       # only values within 0.1% of the bound can be on its wrong side
            near = sum(abs(v - b) <= b * 0.001 for v in values)
            assert abs(got[LE[b]] - true) <= near, b


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 1 << 40), min_size=1, max_size=200),
       st.lists(st.integers(0, 1 << 40), min_size=1, max_size=50))
def test_the_vectorised_count_is_count_above_s_complement(values, thresholds):
    h = hist_of(values)
    t = np.array(sorted(thresholds), dtype=np.int64)
    assert h.counts_at_or_below(t).tolist() == [h.total - h.count_above(int(x)) for x in t]


def test_bounds_are_e12_from_10ns_to_100ms_at_most_25_percent_apart():
    assert BOUNDS_NS[0] == 10 and BOUNDS_NS[-1] == 100_000_000
    assert max(b / a for a, b in zip(BOUNDS_NS, BOUNDS_NS[1:])) <= 1.25
    assert LE[100] == "1e-07" and LE[1000] == "1e-06" and LE[82_000] == "8.2e-05"


def record(seq, pf, to_vf, switch_ns, **kw) -> SwitchRecord:
    values = {c: 0 for c in COLUMNS}
    values.update(seq=seq, pf=pf, from_vf=(to_vf - 1) % 4, to_vf=to_vf, switch_ns=switch_ns,
                  revoke_ns=switch_ns // 2, grant_ns=switch_ns - switch_ns // 2, **kw)
    return SwitchRecord(**values)


def samples(state: MetricsState) -> dict:
    """Every sample of the scrape, as prometheus_client's own parser reads the text."""
    out = {}
    for fam in text_string_to_metric_families(render(state).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_switches_come_from_the_kernel_histograms_when_there_are_any():
    stats = Stats(100)
    stats.add_many([record(i, 0, i % 2, 90 + i, kvm_exits=1) for i in range(1, 11)])
    kernel = [KernelHist(0, 0, "switch", hist_of([95] * 7 + [500]), 7 * 95 + 500),
              KernelHist(1, 0, "switch", hist_of([50]), 50)]
    got = samples(state_from(stats, {}, kernel))
    assert got[("vftrace_switches_total", (("pf", "0"), ("vf", "0")))] == 8
    assert got[("vftrace_switches_over_budget_total", (("pf", "0"), ("vf", "0")))] == 1
    assert got[("vftrace_switch_records_total", (("pf", "0"), ("vf", "0")))] == 5
    assert got[("vftrace_switch_guest_exits_total", (("pf", "0"), ("vf", "1")))] == 5
    key = ("vftrace_switch_duration_seconds_bucket",
           (("le", "1e-07"), ("pf", "0"), ("phase", "switch"), ("vf", "0")))
    assert got[key] == 7
    # A PF filter keeps its PFs' histograms; a VF filter cannot pick them out (the
    # kernel keys by incoming VF): the records then.
    got = samples(state_from(stats, {"filters": {"pfs": [0]}}, kernel))
    assert ("vftrace_switches_total", (("pf", "1"), ("vf", "0"))) not in got
    got = samples(state_from(stats, {"filters": {"vfs": [0]}}, kernel))
    assert got[("vftrace_switches_total", (("pf", "0"), ("vf", "0")))] == 5


def test_losses_exits_and_info_from_a_meta():
    meta = {"version": "9", "probe_modes": {"switch": "raw_tp", "iommu_map": "fentry"},
            "lost_by_kind": {"switch": 3, "call": 4},
            "background": {"out_of_range_records": 2, "unreadable_ring_records": 7,
                           "kernel_drops": {"no_slot": 1},
                           "kvm_exits": [{"pid": 1, "vcpu": 0, "reason": 48, "in_window": 1,
                                          "count": 5, "ns": 2000},
                                         {"pid": 2, "vcpu": 0, "reason": 48, "in_window": 1,
                                          "count": 1, "ns": 1000}]},
            "kvm_vendor": "vmx", "floor_ns": {"fentry": {"median_ns": 50}}}
    got = samples(state_from(Stats(100), meta, None))
    assert got[("vftrace_lost_records_total", (("kind", "switch"), ("side", "kernel")))] == 3
    assert got[("vftrace_lost_records_total", (("kind", "out_of_range"), ("side", "user")))] == 2
    assert got[("vftrace_lost_records_total", (("kind", "unreadable"), ("side", "user")))] == 7
    assert got[("vftrace_kernel_drops_total", (("what", "no_slot"),))] == 1
    assert got[("vftrace_guest_exits_total", (("reason", "EPT_VIOLATION"), ("window", "in")))] == 6
    assert got[("vftrace_probe_floor_seconds", (("mode", "fentry"),))] == 50e-9
    info = [k for k in got if k[0] == "vftrace_info"][0]
    assert ("probe_modes", "iommu_map=fentry,switch=raw_tp") in info[1]


def test_a_scrape_is_answered_by_the_owners_loop_or_gets_the_last_state_marked_stale():
    built = []
    tap = MetricsTap(lambda: built.append(1) or MetricsState({}, len(built), {}), wait_s=0.3)
    assert tap.state() is None                   # nobody answers, nothing yet
    stop = threading.Event()

    def owner():
        while not stop.is_set():
            tap.service()
            time.sleep(0.01)

    t = threading.Thread(target=owner)
    t.start()
    try:
        first = tap.state()
        assert first.budget_ns >= 1 and not first.stale
        assert tap.state().budget_ns > first.budget_ns     # built anew for each scrape
    finally:
        stop.set()
        t.join()
    n = len(built)
    late = tap.state()                           # the owner is gone: the last, stale
    assert late.stale and late.budget_ns == n
    tap.close()                                  # final: served at once, not stale
    t0 = time.monotonic()
    final = tap.state()
    assert not final.stale and final.budget_ns == n + 1 and time.monotonic() - t0 < 0.2


def test_a_failing_read_out_keeps_the_previous_state():
    calls = []

    def build():
        calls.append(1)
        if len(calls) > 1:
            raise OSError("map gone")
        return MetricsState({}, 1, {})

    tap = MetricsTap(build, wait_s=0.5)
    threading.Timer(0.05, tap.service).start()
    assert tap.state().budget_ns == 1
    threading.Timer(0.05, tap.service).start()
    again = tap.state()
    assert again.budget_ns == 1 and again.stale and tap.build_errors == 1


def test_addresses_parse_as_documented_and_bad_ones_say_how_to_write_them():
    from tracer.metrics.server import MetricsEndpoint, MetricsError, parse_address
    import pytest
    assert parse_address("127.0.0.1:9435") == ("127.0.0.1", 9435)
    assert parse_address("9435") == ("127.0.0.1", 9435)          # a bare port: loopback
    assert parse_address("[::1]:9435") == ("::1", 9435)
    assert parse_address("localhost:0") == ("localhost", 0)
    for bad, hint in (("::1:9435", "brackets"), (":9435", "HOST:PORT"), ("[::1]9435", "[IPV6]"),
                      ("host:99999", "0 to 65535"), ("host:x", "0 to 65535")):
        with pytest.raises(MetricsError, match=hint):
            parse_address(bad)
    tap = MetricsTap(lambda: MetricsState({}, 1, {}))
    assert "warning" not in MetricsEndpoint("127.0.0.1:0", tap).notice()
    assert "warning" not in MetricsEndpoint("[::1]:0", tap).notice()
    assert "no authentication" in MetricsEndpoint("0.0.0.0:0", tap).notice()


def test_the_histogram_text_is_what_prometheus_client_would_write():
    """The histograms formatted by hand read back, through prometheus_client's parser,
    as the same samples its own HistogramMetricFamily gives for the same counts."""
    from prometheus_client import generate_latest
    from prometheus_client.core import HistogramMetricFamily
    from tracer.metrics.exposition import histograms_text
    rng = np.random.default_rng(7)
    stats = Stats(100)
    stats.add_many([record(i, i % 2, i % 3, int(rng.lognormal(9, 1))) for i in range(1, 3000)])
    kernel = [KernelHist(pf, vf, phase, hist_of(rng.lognormal(9, 1, 500).astype(np.int64)),
                         12345 + pf)
              for pf in (0, 1) for vf in (0, 2) for phase in ("grant", "revoke", "switch")]
    kernel.append(KernelHist(1, 1, "switch", Histogram(), 0))       # empty: no series
    state = state_from(stats, {}, kernel)

    class Reference:
        def collect(self):
            raw = HistogramMetricFamily("vftrace_switch_duration_seconds", "h",
                                        labels=("pf", "vf", "phase"))
            for k in kernel:
                if k.count:
                    raw.add_metric([str(k.pf), str(k.vf), k.phase], cumulative(k.hist),
                                   k.sum_ns / 1e9)
            yield raw

    def parsed(text):
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    ours = parsed(histograms_text(state))
    want = parsed(generate_latest(Reference()).decode())
    assert {k: v for k, v in ours.items() if k[0].startswith("vftrace_switch_duration")} == want
    assert len(want) == 12 * (len(BOUNDS_NS) + 3)
    # the records' corrected histograms, where the stats have a correction: none here
    assert not any(k[0].startswith("vftrace_switch_corrected") for k in ours)


def test_the_corrected_histograms_come_from_the_kernel_when_it_kept_them():
    """Every switch's corrected time, from the kernel, not the records' (which miss the
    lost ones); and "corrected" is not a raw phase."""
    from tracer.model.correction import Correction
    stats = Stats(100, correction=Correction.from_meta(
        {"probe_costs": {"types": ["fentry"], "fentry": {"median_ns": 10}}}))
    stats.add_many([record(i, 0, 1, 500, fentry_hits=2) for i in range(1, 6)])
    kernel = [KernelHist(0, 1, "switch", hist_of([500] * 9), 4500),
              KernelHist(0, 1, "corrected", hist_of([480] * 9), 4320)]
    got = samples(state_from(stats, {}, kernel))
    corr = "vftrace_switch_corrected_duration_seconds"
    assert got[(f"{corr}_count", (("pf", "0"), ("vf", "1")))] == 9
    assert got[(f"{corr}_sum", (("pf", "0"), ("vf", "1")))] == 4320e-9
    assert not any(dict(k[1]).get("phase") == "corrected" for k in got)
    # without the kernel's: the records' five
    got = samples(state_from(stats, {}, kernel[:1]))
    assert got[(f"{corr}_count", (("pf", "0"), ("vf", "1")))] == 5
