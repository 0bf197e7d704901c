/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Record layouts shared by vftrace.bpf.c and the Python decoder (tracer/kernel/layout.py
 * parses this file).  Keep to one scalar or fixed array field per line, __u64 first so
 * the structs have no padding.
 */
#ifndef VFTRACE_H
#define VFTRACE_H

/* What a timed call is (vft_call.kind); also the keys of start-time and totals maps. */
#define VFT_IOMMU_MAP 1
#define VFT_IOMMU_UNMAP 2
#define VFT_IOTLB_SYNC 3
#define VFT_MMU_ZAP 4
#define VFT_MMU_NOTIFIER 5
#define VFT_VFIO_MAP_DMA 6
#define VFT_VFIO_UNMAP_DMA 7
#define VFT_KVM_EXIT 8
#define VFT_VCPU_KICK 9
#define VFT_CALIB_FENTRY 10
#define VFT_CALIB_KPROBE 11
#define VFT_NR_KINDS 12

/* Indexes of the per-CPU lost-record counters, one per output buffer. */
#define VFT_LOST_SWITCH 0
#define VFT_LOST_CALL 1
#define VFT_LOST_JOIN 2
#define VFT_NR_LOST 3
/* the ring buffers, for their per-CPU emit counts (wake-up batching) */
#define VFT_RING_SWITCHES 0
#define VFT_RING_JOINS 1
#define VFT_RING_CALLS 2
#define VFT_NR_RINGS 3

/*
 * Indexes of the per-CPU counters of what the kernel side could not keep, other than
 * full output buffers (VFT_LOST_*): each is a map that was full or a window that had to
 * be dropped.  Read into the capture's meta as kernel_drops.
 */
#define VFT_DROP_NO_SLOT 0      /* a switch not recorded: VFT_MAX_OPEN windows were open */
#define VFT_DROP_NESTED 1       /* a begin on a task whose window was open: that one dropped */
#define VFT_DROP_STALE 2        /* a window whose end never came, reclaimed (VFT_STALE_NS) */
#define VFT_DROP_TASK_SLOT 3    /* a switch not recorded: task_slot map full */
#define VFT_DROP_STARTS 4       /* a call not timed: starts map full */
#define VFT_DROP_EXIT_STARTS 5  /* a KVM exit not timed: exit_starts map full */
#define VFT_DROP_BG 6           /* a call's background total not kept: bg_calls full */
#define VFT_DROP_EXITS 7        /* an exit's per-vCPU total not kept: exits map full */
/* VFT_DROP_UNFINISHED: a call whose return never ran (a kretprobe out of instances, an
 * exit program the kernel skipped), seen at the task's next call of that kind. */
#define VFT_DROP_UNFINISHED 8   /* a call's return never ran: its time lost */
#define VFT_DROP_HIST_SLOT 9    /* a switch not in the kernel histograms: no (pf, vf) slot left */
#define VFT_NR_DROPS 10
/* kernel_drops also has skipped_runs: runs of these programs the kernel itself skipped
 * (one would have nested in another on its CPU), its own recursion_misses per program
 * (background.skipped_runs), read by tracer/kernel/proginfo.py. */

/* What a vft_join record adds to the switch (pf, seq) after that switch's record. */
#define VFT_JOIN_RELEASE 0      /* a blocked guest access it released (blocked_*) */
#define VFT_JOIN_EXIT 1         /* an exit that began in it and ended after it (exit_ns) */

#ifndef VFT_MAX_OPEN            /* a power of two <= 32; smaller only in a test build */
#define VFT_MAX_OPEN 16         /* switch windows open at once, over all PFs and tasks */
#endif
#define VFT_CALIB_SAMPLES 4096

/*
 * Cost calibration (tracer/kernel/costs.py): before arming, our own task opens windows
 * with prctl(VFT_COST_BEGIN) and closes them with prctl(VFT_COST_END), and in between
 * calls a near-empty kernel function (COST_FUNC) to which the production programs of one
 * hook type are attached.  Those windows have pf VFT_COST_PF; their record goes to the
 * cost_window map, never to the switches buffer.
 */
#define VFT_COST_PF 4294967294
#define VFT_COST_BEGIN 1447449601       /* prctl options no kernel has: 0x56465401 */
#define VFT_COST_END 1447449602

/* One switch window, assembled in the kernel and emitted at the window's end. */
struct vft_switch {
	__u64 seq;
	__u64 t_ns;             /* window start, bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u64 switch_ns;        /* window end - start */
	__u64 revoke_ns;        /* start to the first iommu_map entry (all of it if none) */
	__u64 grant_ns;         /* first iommu_map entry to the end */
	__u64 unmap_ns;
	__u64 unmap_max_ns;
	__u64 unmap_bytes;
	__u64 map_ns;
	__u64 map_max_ns;
	__u64 map_bytes;
	__u64 sync_ns;          /* IOTLB flush; inside unmap_ns when the unmap syncs itself */
	__u64 mmu_ns;           /* unmap_mapping_range */
	__u64 mmu_notifier_ns;  /* KVM's MMU notifier invalidation, inside mmu_ns */
	__u64 exit_ns;          /* vCPU time in exits begun in the window (VFT_JOIN_EXIT) */
	__u64 source_ns;        /* the switch source's own timing (pf_sched total_ns) */
	__u64 source_revoke_ns;
	__u64 source_grant_ns;
	__u32 pf;
	__s32 from_vf;
	__s32 to_vf;
	__u32 cpu;
	__u32 tid;
	__u32 unmap_calls;
	__u32 map_calls;
	__u32 sync_calls;
	__u32 mmu_calls;
	__u32 kvm_exits;
	__u32 vcpu_kicks;
	__u32 exits_pending;    /* of kvm_exits, not ended at the close: VFT_JOIN_EXITs to come */
	__u32 mmu_notifier_calls;
	/* below: our own probe runs on the window's task while it was open, by type */
	__u32 fentry_hits;      /* fentry+fexit pairs (tracer/model/correction.py) */
	__u32 kprobe_hits;      /* kprobe+kretprobe pairs */
	__u32 entry_hits;       /* single entry kprobes (vCPU kicks) */
};

/* One timed call (written only with --calls). */
struct vft_call {
	__u64 t_ns;
	__u64 ns;
	__u64 size;             /* bytes; the exit reason for VFT_KVM_EXIT */
	__u64 seq;              /* the window it belongs to, 0 for background */
	__u32 kind;
	__u32 pid;
	__u32 tid;
	__u32 cpu;
	__u32 vcpu;
	__u32 pf;
};

/*
 * A cost of switch (pf, seq) known only after its record left (joined in user space):
 * VFT_JOIN_RELEASE, a guest access released after blocking on a switched-off VF
 * (pf_sched:vf_access_wait; ns: how long it waited), or VFT_JOIN_EXIT, a KVM exit that
 * began in the window and ended after it (ns: the whole exit; vf: -1).
 */
struct vft_join {
	__u64 seq;
	__u64 ns;
	__u64 t_ns;
	__u32 kind;
	__u32 pf;
	__s32 vf;
	__u32 pid;
	__u32 cpu;
	__u32 pad;
};

/* Background totals, per process and kind (VFIO DMA map/unmap, iommu calls). */
struct vft_bg_key {
	__u32 pid;
	__u32 kind;
};

struct vft_bg_val {
	__u64 count;
	__u64 ns;
	__u64 max_ns;
	__u64 bytes;
};

/* KVM exits, per VM process, vCPU and reason, inside windows or not. */
struct vft_exit_key {
	__u32 pid;
	__u32 vcpu;
	__u32 reason;
	__u32 in_window;
};

struct vft_exit_val {
	__u64 count;
	__u64 ns;
};

/*
 * In-kernel histograms (tracer/kernel/histograms.py) of every switch that closed, whether
 * or not its record reached user space: per (pf, incoming vf) slot and phase, the
 * statistics core's log-linear buckets (tracer/model/stats.py: values below 2 << SUB_BITS
 * exact, then 1 << SUB_BITS buckets per power of two), up to 1 << VFT_HIST_MAX_BITS ns;
 * larger values share the last bucket (their max is kept exact beside it).
 */
#define VFT_HIST_SUB_BITS 10
#define VFT_HIST_MAX_BITS 32
#define VFT_HIST_BUCKETS 23552  /* (2 << SUB_BITS) + (MAX_BITS - SUB_BITS - 1) << SUB_BITS */
#define VFT_HIST_SWITCH 0       /* phases: switch_ns, revoke_ns, grant_ns, */
#define VFT_HIST_REVOKE 1
#define VFT_HIST_GRANT 2
#define VFT_HIST_CORRECTED 3    /* and vft_corrected_ns, once user space set the costs */
#define VFT_HIST_PHASES 4
#define VFT_COST_TYPES 3        /* fentry, kprobe, entry (correction.HIT_TYPES) */
#ifndef VFT_HIST_SLOTS
#define VFT_HIST_SLOTS 32       /* (pf, vf) pairs with histograms: record --hist-pairs */
#endif

struct vft_hist_key {
	__u32 pf;
	__s32 vf;
};

/* What one probe hit of each type costs, in milli-ns (tracer/model/correction.py); set
 * is 1 once user space wrote them (after calibrating, before arming). */
struct vft_hist_costs {
	__u64 fentry_milli_ns;
	__u64 kprobe_milli_ns;
	__u64 entry_milli_ns;
	__u64 set;
};

/* Beside each (slot, phase)'s buckets; min is kept as ~min so both extremes grow by
 * compare-and-swap from 0 (empty). */
struct vft_hist_sum {
	__u64 count;
	__u64 sum;
	__u64 not_min;
	__u64 max;
};

/* A value's bucket: plain C (no helpers), so that a unit test compiles this very function
 * and holds it to tracer/model/stats.py's bucket_index at every boundary. */
static inline __u32 vft_hist_bucket(__u64 v)
{
	__u64 x;
	__u32 k = 0;

	if (v < (2ull << VFT_HIST_SUB_BITS))
		return (__u32)v;
	if (v >> VFT_HIST_MAX_BITS)
		return VFT_HIST_BUCKETS - 1;
	x = v;                  /* k = floor(log2(v)), in steps the verifier follows */
	if (x >> 16) { x >>= 16; k += 16; }
	if (x >> 8) { x >>= 8; k += 8; }
	if (x >> 4) { x >>= 4; k += 4; }
	if (x >> 2) { x >>= 2; k += 2; }
	if (x >> 1) { k += 1; }
	return (2u << VFT_HIST_SUB_BITS) + ((k - VFT_HIST_SUB_BITS - 1) << VFT_HIST_SUB_BITS) +
	       (__u32)((v >> (k - VFT_HIST_SUB_BITS)) - (1u << VFT_HIST_SUB_BITS));
}

/* The switch time with vftrace's own cost taken off (tracer/model/correction.py, the same
 * integer rule): the source's own timing where it has one, else the window's, minus the
 * window's probe hits times their costs in milli-ns, rounded half up to ns; 0 where the
 * costs come to more (an overcorrection).  Plain C, compiled and tested like the bucket. */
static inline __u64 vft_corrected_ns(__u64 switch_ns, __u64 source_ns, __u32 fentry_hits,
				     __u32 kprobe_hits, __u32 entry_hits, __u64 fentry_milli_ns,
				     __u64 kprobe_milli_ns, __u64 entry_milli_ns)
{
	__u64 base = source_ns ? source_ns : switch_ns;
	__u64 own = ((__u64)fentry_hits * fentry_milli_ns + (__u64)kprobe_hits * kprobe_milli_ns +
		     (__u64)entry_hits * entry_milli_ns + 500) / 1000;

	return base > own ? base - own : 0;
}

#endif /* VFTRACE_H */
