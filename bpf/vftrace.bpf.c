// SPDX-License-Identifier: GPL-2.0
/*
 * vftrace: one timing record per VF switch, assembled in the kernel.
 *
 * A switch window opens and closes on one task (pf_sched's tracepoints, a PF driver
 * function's entry and return, or a pair of tracepoints).  Calls made by that task
 * inside the window (iommu_unmap/map, the IOTLB flush, the MMU zap and KVM's MMU
 * notifier, vCPU kicks) are added to its record; so several PFs switching at once on
 * different CPUs each get their own calls.  Calls made in interrupt context (a device
 * driver's DMA unmap from its completion interrupt, on whatever task it interrupted) are
 * not that task's: they are counted apart per kind (irq_calls), never timed.  A duration
 * that comes out negative is counted (negative), never written.  KVM exits happen on
 * vCPU threads: an exit counts, and its time is charged, in every window open when it
 * began.  The record is emitted when the window closes.  What a switch costs after its
 * record left (a guest access it released, the end of an exit that outlived it) is
 * emitted on its own as a vft_join and added by (pf, seq) in user space.
 *
 * Windows live in VFT_MAX_OPEN array slots, taken by compare-and-swap at the begin, so
 * their memory is never freed under a reader on another CPU.  What another CPU adds to
 * a window (KVM exits and their time) goes into counters, added by compare-and-swap
 * only while they are open and of the generation the exit began in; the end swaps them
 * for VFT_CLOSED.  An add either lands before the swap, in the window the exit began in,
 * and is in the record, or goes out as a join.  Maps that fill up, windows that cannot be recorded, and records the
 * buffers could not take are counted (drops, lost), never lost silently.
 *
 * Compile-time parameters (-D, set by tracer/kernel/probes.py):
 *   SWITCH_SRC     SRC_PF_SCHED_RAW | SRC_PF_SCHED_TP | SRC_FUNC | SRC_TP
 *   SWITCH_FUNC    with SRC_FUNC and FUNC_MODE == MODE_FENTRY: the function
 *   <HOOK>_MODE    MODE_ABSENT | MODE_FENTRY | MODE_KPROBE per hook below
 *   SYNC_FUNC      the IOMMU driver's iotlb_sync (fentry only; kprobes attach by name)
 *   HAVE_KVM_TP, HAVE_ACCESS_TP, USE_RINGBUF, EMIT_CALLS, RINGBUF_PAGES
 *   WAKE_BATCH     1: ring-buffer wake-ups batched (see ring_flags), 0: the kernel's own
 *   CALIB_FUNC, CALIB_MODE, CALIB_TGID: the floor's near-empty function, and who calls it
 *   COST_FUNC, COST_FENTRY: the cost calibration's near-empty function, and whether an
 *                  fentry pair of the production handlers is compiled for it
 *   VFT_TASK_STACK_OFFSET  offsetof(struct task_struct, stack) from the kernel's BTF
 *                  (tracer/kernel/btf.py); without it, <linux/sched.h> gives it
 */
#include <uapi/linux/ptrace.h>
#ifdef VFT_TASK_STACK_OFFSET    /* offsetof(struct task_struct, stack), from BTF */
#include <asm/page_types.h>     /* THREAD_SIZE: sched.h was ~40% of the compile */
#else
#include <linux/sched.h>        /* struct task_struct, THREAD_SIZE */
#endif
#include "vftrace.h"

#define MODE_ABSENT 0
#define MODE_FENTRY 1
#define MODE_KPROBE 2

#define SRC_PF_SCHED_RAW 1
#define SRC_PF_SCHED_TP 2
#define SRC_FUNC 3
#define SRC_TP 4

#ifndef EEXIST
#define EEXIST 17
#endif

#define VFIO_IOMMU_MAP_DMA 0x3b71
#define VFIO_IOMMU_UNMAP_DMA 0x3b72

/*
 * A window's two counters, window.exits and window.exit_ns, each one u64 that other
 * CPUs change by compare-and-swap only:
 *   bit 63       VFT_CLOSED: the window has closed, nothing more is added
 *   bits 48..62  the window's generation (a slot's count of begins), so that an add
 *                lands in the window the exit began in and never in a later one that
 *                reopened the slot between the exit's check and its add
 *   exits:       bits 0..47 the kvm_exits that began in the window
 *   exit_ns:     bits 36..47 the exits that ended before the close, bits 0..35 their ns:
 *                one word, so the record says exactly how many ends are still to come.
 * An add that would overflow a field goes out as a join instead, as a late end does.
 */
#define VFT_CLOSED (1ull << 63)
#define VFT_GEN_SHIFT 48
#define VFT_GEN_MASK 0x7fffull
#define VFT_COUNT_MASK ((1ull << VFT_GEN_SHIFT) - 1)
#define VFT_ENDED_SHIFT 36
#define VFT_ENDED_MAX 0xfffull
#define VFT_EXIT_NS_MASK ((1ull << VFT_ENDED_SHIFT) - 1)
#define VFT_ADD_TRIES 4         /* compare-and-swap attempts before the add goes elsewhere */
#define VFT_READ_ONCE(x) (*(volatile typeof(x) *)&(x))
/* In window.owner while its task begins or ends it: a stale-window reclaim, which takes
 * an owner by compare-and-swap, then cannot take it from under that task. */
#define VFT_OWNER_BUSY (1ull << 32)
#ifndef VFT_STALE_NS               /* shorter only in a test build */
#define VFT_STALE_NS 10000000000ull /* an open window older than this lost its end */
#endif

struct window {
	struct vft_switch rec;
	u64 grant_start;
	u64 exits;              /* VFT_CLOSED | generation | kvm_exits so far */
	u64 exit_ns;            /* VFT_CLOSED | generation | ended exits | their ns */
	u64 gen;                /* this slot's begins: written by its owner only */
	u64 owner;              /* tid of the task whose window this is, 0: a free slot;
				 * | VFT_OWNER_BUSY while it begins or ends */
};

struct start_key {
	u32 tid;
	u32 kind;
};

struct start_val {
	u64 ts;
	u64 size;
};

struct exit_start {
	u64 ts;
	u32 reason;
	u32 vcpu;
	u32 open_mask;          /* slots whose windows were open when the exit began */
	u32 pad;
	u64 seq[VFT_MAX_OPEN];  /* ... and which windows those were */
	u32 pf[VFT_MAX_OPEN];
	u16 gen[VFT_MAX_OPEN];
};

/* Map sizes: overridable (-D) only so that a test build can fill each map and see its
 * drop counter fire (VFTRACE_BPF_SIZES, tracer/kernel/probes.py). */
#ifndef VFT_TASK_SLOTS
#define VFT_TASK_SLOTS 1024
#endif
#ifndef VFT_STARTS_MAX
#define VFT_STARTS_MAX 16384
#endif
#ifndef VFT_EXIT_STARTS_MAX
#define VFT_EXIT_STARTS_MAX 4096
#endif
#ifndef VFT_BG_MAX
#define VFT_BG_MAX 4096
#endif
#ifndef VFT_EXITS_MAX
#define VFT_EXITS_MAX 8192
#endif

BPF_ARRAY(windows, struct window, VFT_MAX_OPEN);      /* slot -> window */
BPF_HASH(task_slot, u32, u32, VFT_TASK_SLOTS);        /* switching task -> its slot */
BPF_ARRAY(open_mask, u64, 1);     /* slots with an open window (u64: BPF atomics are 64-bit) */
BPF_HASH(starts, struct start_key, struct start_val, VFT_STARTS_MAX);
/* vCPU thread -> exit in progress.  A plain hash, not LRU: a full map refuses the new
 * exit (counted, VFT_DROP_EXIT_STARTS) where an LRU would evict another vCPU's silently.
 * A thread that dies mid-exit is removed at sched_process_exit. */
BPF_HASH(exit_starts, u32, struct exit_start, VFT_EXIT_STARTS_MAX);
BPF_HASH(bg_calls, struct vft_bg_key, struct vft_bg_val, VFT_BG_MAX);
BPF_HASH(exits, struct vft_exit_key, struct vft_exit_val, VFT_EXITS_MAX);
BPF_PERCPU_ARRAY(lost, u64, VFT_NR_LOST);
BPF_PERCPU_ARRAY(drops, u64, VFT_NR_DROPS);
BPF_ARRAY(calib, u64, VFT_CALIB_SAMPLES);
BPF_ARRAY(calib_count, u64, 1);
BPF_ARRAY(func_seq, u64, 1);                           /* seq for func:/tp: windows */
BPF_ARRAY(partial, u64, 1);                            /* window ends with no begin */
/* Calls in interrupt context, per kind: counted here, never timed nor attributed. */
struct irq_count {
	u64 count;
	u64 bytes;
};
BPF_PERCPU_ARRAY(irq_calls, struct irq_count, VFT_NR_KINDS);
/* Durations that came out negative, per kind (0: a switch window): counted, not written. */
BPF_PERCPU_ARRAY(negative, u64, VFT_NR_KINDS);
BPF_ARRAY(calib_irq, u64, 1);     /* calibration calls (ours, task context) seen as irq */
BPF_ARRAY(irq_test_off, u32, 1);  /* set by user space when that self-check failed */
/* Set by user space once every probe is attached: BCC attaches them one by one, and a
 * window or call seen half-way (its begin missed, its window's probe not yet in) would
 * be misattributed. */
BPF_ARRAY(armed, u32, 1);
/* Set by user space while it calibrates the probes' costs (before arming): then our own
 * task (CALIB_TGID), and only it, opens cost windows and has its calls counted. */
BPF_ARRAY(calibrating, u32, 1);
BPF_ARRAY(cost_window, struct vft_switch, 1);         /* the last cost window's record */
/* In-kernel histograms (vftrace.h): (pf, vf) -> slot, given out in order; per (slot,
 * phase), VFT_HIST_BUCKETS counts and their sums.  HIST_MAP_FLAGS is BPF_F_MMAPABLE
 * where the kernel has it (>= 5.5): user space then maps both arrays and reads them in
 * one go. */
#define VFT_HIST_CELLS (VFT_HIST_SLOTS * VFT_HIST_PHASES)
BPF_HASH(hist_slots, struct vft_hist_key, u32, VFT_HIST_SLOTS);
BPF_ARRAY(hist_next, u64, 1);
BPF_F_TABLE("array", u32, u64, hist_buckets, VFT_HIST_CELLS * VFT_HIST_BUCKETS,
	    HIST_MAP_FLAGS);
BPF_F_TABLE("array", u32, struct vft_hist_sum, hist_sums, VFT_HIST_CELLS, HIST_MAP_FLAGS);
/* The probe costs for the corrected histogram (vftrace.h); none is kept until set. */
BPF_ARRAY(hist_costs, struct vft_hist_costs, 1);

#if USE_RINGBUF
#define JOINS_PAGES 64
BPF_RINGBUF_OUTPUT(switches, RINGBUF_PAGES);
BPF_RINGBUF_OUTPUT(joins, JOINS_PAGES);  /* a zap can release every guest vCPU at once */
#if EMIT_CALLS
BPF_RINGBUF_OUTPUT(calls, RINGBUF_PAGES);
#endif
/* Records emitted per CPU and ring (VFT_RING_*), for batching the reader's wake-ups. */
BPF_PERCPU_ARRAY(emitted, u64, VFT_NR_RINGS);
#else
BPF_PERF_OUTPUT(switches);
BPF_PERF_OUTPUT(joins);
#if EMIT_CALLS
BPF_PERF_OUTPUT(calls);
#endif
#endif

/* Atomic though per-CPU: an fentry program can be preempted by another on its CPU. */
static __always_inline void count_lost(int idx)
{
	u64 *n = lost.lookup(&idx);
	if (n)
		__sync_fetch_and_add(n, 1);
}

static __always_inline void count_drop(int idx)
{
	u64 *n = drops.lookup(&idx);
	if (n)
		__sync_fetch_and_add(n, 1);
}

/* ---- in-kernel histograms ------------------------------------------------------- */

static __always_inline void grow_to(u64 *word, u64 v)
{
	/* Only a PF's own switches, one at a time, share a word: a try or two suffices. */
#pragma clang loop unroll(disable)
	for (int t = 0; t < VFT_ADD_TRIES; t++) {
		u64 old = VFT_READ_ONCE(*word);
		if (old >= v || __sync_val_compare_and_swap(word, old, v) == old)
			return;
	}
}

/* Every closed switch, before its record goes out (so lost records are still counted):
 * all three phases, as the record has them; user space ignores the revoke and grant
 * histograms where those columns are unmeasured (no iommu_map hook). */
static __always_inline void hist_add(struct vft_switch *rec)
{
	struct vft_hist_key k = { .pf = rec->pf, .vf = rec->to_vf };
	u32 zero = 0, *slot = hist_slots.lookup(&k);

	if (!slot) {
		u64 *next = hist_next.lookup(&zero);
		if (!next)
			return;
		u64 n = __sync_fetch_and_add(next, 1);
		if (n >= VFT_HIST_SLOTS) {
			count_drop(VFT_DROP_HIST_SLOT);
			return;
		}
		u32 fresh = n;
		hist_slots.insert(&k, &fresh);  /* a racing first switch of the pair may win */
		slot = hist_slots.lookup(&k);
		if (!slot) {
			count_drop(VFT_DROP_HIST_SLOT);
			return;
		}
	}
	struct vft_hist_costs *c = hist_costs.lookup(&zero);
	u32 phases = VFT_HIST_PHASES;
	u64 values[VFT_HIST_PHASES] = { rec->switch_ns, rec->revoke_ns, rec->grant_ns, 0 };
	if (c && c->set)
		values[VFT_HIST_CORRECTED] = vft_corrected_ns(rec->switch_ns, rec->source_ns,
				rec->fentry_hits, rec->kprobe_hits, rec->entry_hits,
				c->fentry_milli_ns, c->kprobe_milli_ns, c->entry_milli_ns);
	else
		phases = VFT_HIST_CORRECTED;
	u32 first = *slot * VFT_HIST_PHASES;
#pragma clang loop unroll(disable)
	for (u32 p = 0; p < VFT_HIST_PHASES; p++) {
		if (p >= phases)
			break;
		u64 v = values[p];
		u32 cell = first + p;
		u32 b = cell * VFT_HIST_BUCKETS + vft_hist_bucket(v);
		u64 *count = hist_buckets.lookup(&b);
		struct vft_hist_sum *sum = hist_sums.lookup(&cell);
		if (!count || !sum)
			return;
		__sync_fetch_and_add(count, 1);
		__sync_fetch_and_add(&sum->count, 1);
		__sync_fetch_and_add(&sum->sum, v);
		grow_to(&sum->not_min, ~v);
		grow_to(&sum->max, v);
	}
}

#if USE_RINGBUF
/* The kernel's default wakes the reader for every record it has caught up with: one
 * wake-up, and under TCG one stolen emulation thread, per switch.  With WAKE_BATCH a
 * record wakes the reader only as each CPU's every (ring / 8)-th record, so it is woken
 * before the ring is a quarter full (two CPUs) and otherwise by its poll timeout, which
 * is the 100 ms a trickle may wait (tracer/kernel/ringread.py). */
#define RING_SLOT(size) (((size) + 8 + 7) & ~7)     /* 8-byte header, 8-byte aligned */
static __always_inline u64 ring_flags(u32 ring, u32 pages, u32 size)
{
#if WAKE_BATCH
	u64 *n = emitted.lookup(&ring);
	u64 every = (u64)pages * PAGE_SIZE / RING_SLOT(size) / 8;
	if (!n || every < 2)
		return 0;
	*n += 1;
	return *n % every ? BPF_RB_NO_WAKEUP : BPF_RB_FORCE_WAKEUP;
#else
	return 0;
#endif
}
#endif

/* One function per buffer: BCC rewrites table methods, which it cannot inside macros. */
static __always_inline void emit_switch(void *ctx, struct vft_switch *rec)
{
#if USE_RINGBUF
	if (switches.ringbuf_output(rec, sizeof(*rec),
				    ring_flags(VFT_RING_SWITCHES, RINGBUF_PAGES, sizeof(*rec))))
#else
	if (switches.perf_submit(ctx, rec, sizeof(*rec)))
#endif
		count_lost(VFT_LOST_SWITCH);
}

static __always_inline void emit_join(void *ctx, u32 kind, u32 pf, s32 vf, u64 seq,
				      u64 ns, u64 t_ns)
{
	u64 id = bpf_get_current_pid_tgid();
	struct vft_join j = { .seq = seq, .ns = ns, .t_ns = t_ns, .kind = kind, .pf = pf,
			      .vf = vf, .pid = id >> 32, .cpu = bpf_get_smp_processor_id() };
#if USE_RINGBUF
	if (joins.ringbuf_output(&j, sizeof(j),
				 ring_flags(VFT_RING_JOINS, JOINS_PAGES, sizeof(j))))
#else
	if (joins.perf_submit(ctx, &j, sizeof(j)))
#endif
		count_lost(VFT_LOST_JOIN);
}

static __always_inline int is_armed(void)
{
	u32 zero = 0;
	u32 *a = armed.lookup(&zero);
	return a && *a;
}

static __always_inline u32 current_tid(void)
{
	return (u32)bpf_get_current_pid_tgid();
}

/* Armed, or calibrating and this is our own task: checked only when not armed, so a
 * recording's programs pay one lookup for it, as before. */
static __always_inline int is_open(void)
{
	u32 zero = 0;
	u32 *c;

	if (is_armed())
		return 1;
	c = calibrating.lookup(&zero);
	return c && *c && (bpf_get_current_pid_tgid() >> 32) == CALIB_TGID;
}

/*
 * Is @sp, an address on the stack the probed call runs on, on the current task's stack?
 * x86-64 runs hardirqs and softirqs (at irq exit, and when bottom halves are re-enabled,
 * do_softirq_own_stack()) on the per-CPU IRQ stack, NMIs and exceptions on their own
 * stacks: outside [current->stack, +THREAD_SIZE) means interrupt context.  @sp is the
 * probed code's sp (kprobes: pt_regs) or the trampoline's argument block (fentry/fexit),
 * not this program's frame, which newer kernels may put on a private stack.  Blind spots,
 * both harmless for attribution: an interrupt taken from user mode runs on the task stack
 * of a task that is in user space (no call of its own in progress, no window open), and
 * ksoftirqd runs softirqs in task context (its own, never a switching task's).  The root
 * verifier allows comparing a pointer (fentry's ctx) with a scalar; not subtracting.
 */
static __always_inline int on_task_stack(u64 sp)
{
#ifdef VFT_TASK_STACK_OFFSET
	u64 base = 0;

	bpf_probe_read_kernel(&base, sizeof(base),
			      (void *)(bpf_get_current_task() + VFT_TASK_STACK_OFFSET));
#else
	struct task_struct *t = (struct task_struct *)bpf_get_current_task();
	u64 base = (u64)t->stack;
#endif

	return sp >= base && sp < base + THREAD_SIZE;
}

static __always_inline int in_interrupt_ctx(u64 sp)
{
	u32 zero = 0;
	u32 *off = irq_test_off.lookup(&zero);

	return !(off && *off) && !on_task_stack(sp);
}

static __always_inline void count_negative(u32 kind)
{
	u64 *n = negative.lookup(&kind);
	if (n)
		__sync_fetch_and_add(n, 1);
}

/* ---- switch windows -------------------------------------------------------------- */

static __always_inline u64 *open_mask_word(void)
{
	u32 zero = 0;
	return open_mask.lookup(&zero);
}

/* The open window of the current task, or NULL. */
static __always_inline struct window *task_window(u32 tid)
{
	u32 *slot = task_slot.lookup(&tid);
	if (!slot)
		return 0;
	u32 i = *slot;
	struct window *w = windows.lookup(&i);
	return w && w->owner == tid ? w : 0;
}

/*
 * A window's life, as KVM exits on other CPUs see it (an exit reads its clock, then
 * open_mask, then adds to each window it found open whose start stamp is not after its
 * own clock): the begin stamps t_ns, then publishes the slot in open_mask; the end
 * unpublishes it, then stamps its end, then swaps the counters for VFT_CLOSED.  So every
 * exit counted in a window began between its two stamps.  One that began there but was
 * held up (an interrupt) until after the swap is counted outside windows.
 */
static __always_inline void unpublish(u32 i)
{
	u64 *mask = open_mask_word();
	if (mask)
		__sync_fetch_and_and(mask, ~(1ull << i));
}

/* The exits a window got, and the time and number of those that ended before its close;
 * no more are added to it after this. */
static __always_inline void close_counters(struct window *w, u64 *exits, u64 *exit_ns,
					   u64 *ended)
{
	*exits = __sync_lock_test_and_set(&w->exits, VFT_CLOSED) & VFT_COUNT_MASK;
	u64 v = __sync_lock_test_and_set(&w->exit_ns, VFT_CLOSED) & VFT_COUNT_MASK;
	*exit_ns = v & VFT_EXIT_NS_MASK;
	*ended = v >> VFT_ENDED_SHIFT;
}

/* Add @delta to the counter @word while it is open and of generation @gen, without
 * carrying out of the bits in @field (nor out of the count bits); false if the window
 * closed or was reopened, the add would overflow, or VFT_ADD_TRIES attempts met other
 * adds: the caller then counts the exit elsewhere (outside windows, or as a join). */
static __always_inline bool add_if_gen(u64 *word, u64 gen, u64 delta, u64 field)
{
#pragma clang loop unroll(disable)
	for (int t = 0; t < VFT_ADD_TRIES; t++) {
		u64 v = VFT_READ_ONCE(*word);
		if ((v & VFT_CLOSED) || ((v >> VFT_GEN_SHIFT) & VFT_GEN_MASK) != gen ||
		    (v & field) + (delta & field) > field ||
		    (v & VFT_COUNT_MASK) + delta > VFT_COUNT_MASK)
			return false;
		if (__sync_val_compare_and_swap(word, v, v + delta) == v)
			return true;
	}
	return false;
}

static __always_inline void close_window(u32 i, struct window *w)
{
	u64 x, y, z;

	unpublish(i);
	close_counters(w, &x, &y, &z);
}

static __always_inline void release_slot(struct window *w)
{
	__sync_lock_test_and_set(&w->owner, 0);
}

/* Take a free slot for @tid (or reclaim one whose window's end never came). */
static __always_inline int take_slot(u32 tid, u64 now)
{
#pragma unroll
	for (u32 i = 0; i < VFT_MAX_OPEN; i++) {
		u32 k = i;
		struct window *w = windows.lookup(&k);
		if (w && __sync_val_compare_and_swap(&w->owner, 0, tid | VFT_OWNER_BUSY) == 0)
			return i;
	}
#pragma unroll
	for (u32 i = 0; i < VFT_MAX_OPEN; i++) {
		u32 k = i;
		struct window *w = windows.lookup(&k);
		if (!w)
			continue;
		u64 old = w->owner, t = w->rec.t_ns;
		/* t after now: stamped since this begin read its clock, so fresh (as an
		 * unsigned difference it would look older than any limit) */
		if (old && !(old & VFT_OWNER_BUSY) && t && t < now && now - t > VFT_STALE_NS &&
		    __sync_val_compare_and_swap(&w->owner, old, tid | VFT_OWNER_BUSY) == old) {
			u32 gone = old;
			close_window(i, w);
			task_slot.delete(&gone);
			count_drop(VFT_DROP_STALE);
			return i;
		}
	}
	return -1;
}

static __always_inline int window_begin(u32 pf, u64 seq, s32 from_vf, s32 to_vf)
{
	u32 tid = current_tid();

	if (!is_armed() && !(pf == VFT_COST_PF && is_open()))
		return 0;
	u32 *held = task_slot.lookup(&tid);
	if (held) {             /* a source that nests, or a missed end: drop the open one */
		u32 i = *held;
		struct window *old = windows.lookup(&i);
		if (old && __sync_val_compare_and_swap(&old->owner, tid, tid | VFT_OWNER_BUSY) ==
			   tid) {
			close_window(i, old);
			release_slot(old);
		}
		task_slot.delete(&tid);
		count_drop(VFT_DROP_NESTED);
	}
	int got = take_slot(tid, bpf_ktime_get_ns());
	if (got < 0) {
		count_drop(VFT_DROP_NO_SLOT);
		return 0;
	}
	u32 slot = got;
	struct window *w = windows.lookup(&slot);
	if (!w)
		return 0;
	if (task_slot.update(&tid, &slot)) {
		release_slot(w);
		count_drop(VFT_DROP_TASK_SLOT);
		return 0;
	}
	__builtin_memset(&w->rec, 0, sizeof(w->rec));
	w->grant_start = 0;
	w->rec.seq = seq;
	w->rec.pf = pf;
	w->rec.from_vf = from_vf;
	w->rec.to_vf = to_vf;
	w->rec.tid = tid;
	/* Who it is first (t_ns zeroed, seq, pf), then open the counters in a new
	 * generation, then stamp, then publish the slot: kvm_exit reads the counter, then
	 * t_ns, seq and pf, and adds only to the generation it read, so it never takes a
	 * half-begun window for the one before (the barrier keeps the compiler's order; the
	 * atomics keep the CPU's).  The map updates above are the tracer's cost, not the
	 * switch's; the publish is inside the window, so that an exit counted in it began
	 * after its stamp. */
	w->gen = (w->gen + 1) & VFT_GEN_MASK;
	asm volatile("" ::: "memory");
	__sync_lock_test_and_set(&w->exits, w->gen << VFT_GEN_SHIFT);
	__sync_lock_test_and_set(&w->exit_ns, w->gen << VFT_GEN_SHIFT);
	w->rec.t_ns = bpf_ktime_get_ns();
	u64 *mask = open_mask_word();
	if (mask)
		__sync_fetch_and_or(mask, 1ull << slot);
	__sync_lock_test_and_set(&w->owner, tid);      /* begun: reclaimable if it goes stale */
	return 0;
}

static __always_inline int window_end(void *ctx, u64 source_ns, u64 source_revoke_ns,
				      u64 source_grant_ns)
{
	u32 tid = current_tid();
	u32 zero = 0;
	u32 *slot = task_slot.lookup(&tid);
	struct window *w = 0;
	u32 i = 0;

	if (slot) {
		i = *slot;
		w = windows.lookup(&i);
	}
	/* Ours to end, unless a stale-window reclaim took it first. */
	if (!w || __sync_val_compare_and_swap(&w->owner, tid, tid | VFT_OWNER_BUSY) != tid) {
		if (slot)
			task_slot.delete(&tid);
		/* Before arming every end is unmatched (begins are gated): not a loss. */
		u64 *p = is_armed() ? partial.lookup(&zero) : 0;
		if (p)
			__sync_fetch_and_add(p, 1);
		return 0;
	}
	/* Unpublished before the stamp: no exit that began after the stamp is counted. */
	unpublish(i);
	u64 now = bpf_ktime_get_ns();
	u64 exits, exit_ns, ended;
	close_counters(w, &exits, &exit_ns, &ended);
	task_slot.delete(&tid);
	if (now < w->rec.t_ns || (w->grant_start && (w->grant_start < w->rec.t_ns ||
						     w->grant_start > now))) {
		count_negative(0);      /* e.g. a begin from an interrupt on this task */
		release_slot(w);
		return 0;
	}
	w->rec.switch_ns = now - w->rec.t_ns;
	if (w->grant_start) {
		w->rec.revoke_ns = w->grant_start - w->rec.t_ns;
		w->rec.grant_ns = now - w->grant_start;
	} else {
		w->rec.revoke_ns = w->rec.switch_ns;
	}
	w->rec.kvm_exits = exits;
	w->rec.exit_ns = exit_ns;
	w->rec.exits_pending = exits > ended ? exits - ended : 0;
	w->rec.source_ns = source_ns;
	w->rec.source_revoke_ns = source_revoke_ns;
	w->rec.source_grant_ns = source_grant_ns;
	w->rec.cpu = bpf_get_smp_processor_id();
	if (w->rec.pf == VFT_COST_PF) {
		cost_window.update(&zero, &w->rec);
	} else {
		hist_add(&w->rec);
		emit_switch(ctx, &w->rec);
	}
	release_slot(w);
	return 0;
}

#if SWITCH_SRC == SRC_PF_SCHED_RAW
/* TP_PROTO(u32 pf, u64 seq, s32 from_vf, s32 to_vf[, u64 revoke_ns, grant_ns, total_ns]) */
RAW_TRACEPOINT_PROBE(vf_switch_begin)
{
	return window_begin((u32)ctx->args[0], ctx->args[1], (s32)ctx->args[2], (s32)ctx->args[3]);
}

RAW_TRACEPOINT_PROBE(vf_switch_end)
{
	return window_end(ctx, ctx->args[6], ctx->args[4], ctx->args[5]);
}
#elif SWITCH_SRC == SRC_PF_SCHED_TP
TRACEPOINT_PROBE(pf_sched, vf_switch_begin)
{
	return window_begin(args->pf, args->seq, args->from_vf, args->to_vf);
}

TRACEPOINT_PROBE(pf_sched, vf_switch_end)
{
	return window_end(args, args->total_ns, args->revoke_ns, args->grant_ns);
}
#else
/* A PF driver's own function or tracepoint pair: one PF, our own sequence numbers. */
static __always_inline int generic_begin(void)
{
	u32 zero = 0;
	u64 *seq = func_seq.lookup(&zero);
	if (!seq)
		return 0;
	return window_begin(0, __sync_fetch_and_add(seq, 1) + 1, -1, -1);
}

int switch_begin(void *ctx)
{
	return generic_begin();
}

int switch_end(void *ctx)
{
	return window_end(ctx, 0, 0, 0);
}

#if SWITCH_SRC == SRC_FUNC && FUNC_MODE == MODE_FENTRY
#define VFT_KFUNC(fn) KFUNC_PROBE(fn)
#define VFT_KRETFUNC(fn) KRETFUNC_PROBE(fn)
VFT_KFUNC(SWITCH_FUNC)
{
	return generic_begin();
}

VFT_KRETFUNC(SWITCH_FUNC)
{
	return window_end(ctx, 0, 0, 0);
}
#endif
#endif

/* ---- timed calls ----------------------------------------------------------------- */

static __always_inline void count_irq(u32 kind, u64 size)
{
	struct irq_count *n = irq_calls.lookup(&kind);

	if (n) {        /* atomic: a hardirq can interrupt a softirq's update */
		__sync_fetch_and_add(&n->count, 1);
		__sync_fetch_and_add(&n->bytes, size);
	}
}

/* @sp: see on_task_stack() */
static __always_inline int call_enter(u64 sp, u32 kind, u64 size)
{
	struct start_key k = { .tid = current_tid(), .kind = kind };
	struct start_val v = { .size = size }, *started;

	if (kind == VFT_CALIB_FENTRY || kind == VFT_CALIB_KPROBE) {
		/* Our own calls, in task context: the self-check of the stack test. */
		u32 zero = 0;
		u64 *n = calib_irq.lookup(&zero);
		if (!on_task_stack(sp) && (bpf_get_current_pid_tgid() >> 32) == CALIB_TGID && n)
			__sync_fetch_and_add(n, 1);
	} else {
		if (!is_open())
			return 0;
		/* Not the interrupted task's call: never its start (keyed by tid), never timed. */
		if (in_interrupt_ctx(sp)) {
			count_irq(kind, size);
			return 0;
		}
	}
	/* A start already there is a call whose return never ran: count it, replace it. */
	int err = starts.insert(&k, &v);
	if (err == -EEXIST) {
		count_drop(VFT_DROP_UNFINISHED);
		err = starts.update(&k, &v);
	}
	if (err) {
		count_drop(VFT_DROP_STARTS);
		return 0;
	}
	/* Stamp after the update, so the call's time does not include our map write. */
	started = starts.lookup(&k);
	if (started)
		started->ts = bpf_ktime_get_ns();
	return 0;
}

static __always_inline void add_bg(u32 pid, u32 kind, u64 ns, u64 size)
{
	struct vft_bg_key k = { .pid = pid, .kind = kind };
	struct vft_bg_val zero = {}, *v;

	v = bg_calls.lookup_or_try_init(&k, &zero);
	if (!v) {
		count_drop(VFT_DROP_BG);
		return;
	}
	__sync_fetch_and_add(&v->count, 1);
	__sync_fetch_and_add(&v->ns, ns);
	__sync_fetch_and_add(&v->bytes, size);
	if (ns > v->max_ns)
		v->max_ns = ns;         /* racy max: good enough for a display */
}

static __always_inline void emit_call(void *ctx, u32 kind, u64 start, u64 ns, u64 size,
				      u64 seq, u32 pf, u32 vcpu)
{
#if EMIT_CALLS
	struct vft_call c = {};
	u64 id = bpf_get_current_pid_tgid();

	c.t_ns = start;
	c.ns = ns;
	c.size = size;
	c.seq = seq;
	c.kind = kind;
	c.pid = id >> 32;
	c.tid = (u32)id;
	c.cpu = bpf_get_smp_processor_id();
	c.vcpu = vcpu;
	c.pf = pf;
#if USE_RINGBUF
	if (calls.ringbuf_output(&c, sizeof(c),
				 ring_flags(VFT_RING_CALLS, RINGBUF_PAGES, sizeof(c))))
#else
	if (calls.perf_submit(ctx, &c, sizeof(c)))
#endif
		count_lost(VFT_LOST_CALL);
#endif
}

/* @mode: MODE_FENTRY or MODE_KPROBE, the probe pair this return ends (a hit counted) */
static __always_inline int call_exit(void *ctx, u64 sp, u32 kind, u32 mode)
{
	u64 now = bpf_ktime_get_ns();
	u32 tid = current_tid();
	struct start_key k = { .tid = tid, .kind = kind };

	/* Counted at entry; the interrupted task's own call in progress keeps its start. */
	if (in_interrupt_ctx(sp) && kind != VFT_CALIB_FENTRY && kind != VFT_CALIB_KPROBE)
		return 0;
	struct start_val *s = starts.lookup(&k);
	if (!s)
		return 0;
	u64 start = s->ts, size = s->size, ns = now - start;
	starts.delete(&k);
	if (now < start) {
		count_negative(kind);
		return 0;
	}

	if (kind == VFT_CALIB_FENTRY || kind == VFT_CALIB_KPROBE) {
		u32 zero = 0;
		if ((bpf_get_current_pid_tgid() >> 32) != CALIB_TGID)
			return 0;
		u64 *n = calib_count.lookup(&zero);
		if (!n)
			return 0;
		u32 i = __sync_fetch_and_add(n, 1);
		if (i < VFT_CALIB_SAMPLES)
			calib.update(&i, &ns);
		return 0;
	}

	struct window *w = task_window(tid);
	if (!w) {
		add_bg(bpf_get_current_pid_tgid() >> 32, kind, ns, size);
		emit_call(ctx, kind, start, ns, size, 0, 0, 0);
		return 0;
	}
	if (mode == MODE_FENTRY)
		w->rec.fentry_hits++;
	else
		w->rec.kprobe_hits++;
	switch (kind) {
	case VFT_IOMMU_MAP:
		if (!w->grant_start)
			w->grant_start = start;
		w->rec.map_calls++;
		w->rec.map_ns += ns;
		w->rec.map_bytes += size;
		if (ns > w->rec.map_max_ns)
			w->rec.map_max_ns = ns;
		break;
	case VFT_IOMMU_UNMAP:
		w->rec.unmap_calls++;
		w->rec.unmap_ns += ns;
		w->rec.unmap_bytes += size;
		if (ns > w->rec.unmap_max_ns)
			w->rec.unmap_max_ns = ns;
		break;
	case VFT_IOTLB_SYNC:
		w->rec.sync_calls++;
		w->rec.sync_ns += ns;
		break;
	case VFT_MMU_ZAP:
		w->rec.mmu_calls++;
		w->rec.mmu_ns += ns;
		break;
	case VFT_MMU_NOTIFIER:
		w->rec.mmu_notifier_calls++;
		w->rec.mmu_notifier_ns += ns;
		break;
	}
	emit_call(ctx, kind, start, ns, size, w->rec.seq, w->rec.pf, 0);
	return 0;
}

static __always_inline int count_kick(u64 sp)
{
	u32 tid = current_tid();      /* only windows count kicks, and they need arming */

	if (in_interrupt_ctx(sp)) {   /* e.g. KVM's APIC timer: not the interrupted task's */
		if (is_armed())
			count_irq(VFT_VCPU_KICK, 0);
		return 0;
	}
	struct window *w = task_window(tid);
	if (w) {
		w->rec.vcpu_kicks++;
		w->rec.entry_hits++;
	}
	return 0;
}

/*
 * Each hook in fentry or kprobe form.  Kprobe handlers are always compiled and
 * attached by name from Python; fentry ones only when selected (BCC loads every
 * KFUNC_PROBE it compiles).
 */
#define FENTRY_PAIR(fn, kind, size_expr, args...)                               \
	KFUNC_PROBE(fn, args) { return call_enter((u64)ctx, kind, size_expr); }  \
	KRETFUNC_PROBE(fn) { return call_exit(ctx, (u64)ctx, kind, MODE_FENTRY); }
#define FENTRY_PAIR_X(fn, kind, size_expr, args...) FENTRY_PAIR(fn, kind, size_expr, args)

#if MAP_MODE == MODE_FENTRY
/* iommu_map(domain, iova, paddr, size, prot[, gfp]) */
FENTRY_PAIR(iommu_map, VFT_IOMMU_MAP, size, void *domain, u64 iova, u64 paddr, u64 size)
#endif
#if UNMAP_MODE == MODE_FENTRY
/* iommu_unmap(domain, iova, size), iommu_unmap_fast(domain, iova, size, gather) */
FENTRY_PAIR(iommu_unmap, VFT_IOMMU_UNMAP, size, void *domain, u64 iova, u64 size)
FENTRY_PAIR(iommu_unmap_fast, VFT_IOMMU_UNMAP, size, void *domain, u64 iova, u64 size)
#endif
#if SYNC_MODE == MODE_FENTRY
FENTRY_PAIR_X(SYNC_FUNC, VFT_IOTLB_SYNC, 0, void *domain)
#endif
#if ZAP_MODE == MODE_FENTRY
/* unmap_mapping_range(mapping, holebegin, holelen, even_cows) */
FENTRY_PAIR(unmap_mapping_range, VFT_MMU_ZAP, holelen, void *mapping, s64 holebegin, s64 holelen)
#endif
#if CALIB_MODE == MODE_FENTRY
FENTRY_PAIR_X(CALIB_FUNC, VFT_CALIB_FENTRY, 0, void *p)
#endif
#if COST_FENTRY
/* The production fentry pair's code on the cost calibration's function (an fentry
 * program is bound to its function at load); attached only while calibrating. */
FENTRY_PAIR_X(COST_FUNC, VFT_IOMMU_UNMAP, 0, void *p)
#endif

/* kprobes: the probed code's stack pointer, for on_task_stack() */
#define SP(ctx) PT_REGS_SP(ctx)
int kp_map(struct pt_regs *ctx) { return call_enter(SP(ctx), VFT_IOMMU_MAP, PT_REGS_PARM4(ctx)); }
int krp_map(struct pt_regs *ctx) { return call_exit(ctx, SP(ctx), VFT_IOMMU_MAP, MODE_KPROBE); }
int kp_unmap(struct pt_regs *ctx)
{
	return call_enter(SP(ctx), VFT_IOMMU_UNMAP, PT_REGS_PARM3(ctx));
}
int krp_unmap(struct pt_regs *ctx)
{
	return call_exit(ctx, SP(ctx), VFT_IOMMU_UNMAP, MODE_KPROBE);
}
int kp_sync(struct pt_regs *ctx) { return call_enter(SP(ctx), VFT_IOTLB_SYNC, 0); }
int krp_sync(struct pt_regs *ctx)
{
	return call_exit(ctx, SP(ctx), VFT_IOTLB_SYNC, MODE_KPROBE);
}
int kp_zap(struct pt_regs *ctx) { return call_enter(SP(ctx), VFT_MMU_ZAP, PT_REGS_PARM3(ctx)); }
int krp_zap(struct pt_regs *ctx) { return call_exit(ctx, SP(ctx), VFT_MMU_ZAP, MODE_KPROBE); }
int kp_notifier(struct pt_regs *ctx) { return call_enter(SP(ctx), VFT_MMU_NOTIFIER, 0); }
int krp_notifier(struct pt_regs *ctx)
{
	return call_exit(ctx, SP(ctx), VFT_MMU_NOTIFIER, MODE_KPROBE);
}
int kp_calib(struct pt_regs *ctx) { return call_enter(SP(ctx), VFT_CALIB_KPROBE, 0); }
int krp_calib(struct pt_regs *ctx)
{
	return call_exit(ctx, SP(ctx), VFT_CALIB_KPROBE, MODE_KPROBE);
}
int kp_kick(struct pt_regs *ctx) { return count_kick(SP(ctx)); }

/* Cost windows' bookends: security_task_prctl(option, ...), attached while calibrating.
 * Other options, and other tasks' prctl calls, pass through. */
int kp_cost_bookend(struct pt_regs *ctx)
{
	u64 option = PT_REGS_PARM1(ctx);

	if (option == VFT_COST_BEGIN)
		return window_begin(VFT_COST_PF, 1, -1, -1);
	if (option == VFT_COST_END && is_open())
		return window_end(ctx, 0, 0, 0);
	return 0;
}

/* vfio_iommu_type1_ioctl(iommu_data, cmd, arg): DMA map/unmap from user space. */
int kp_vfio_ioctl(struct pt_regs *ctx)
{
	u32 cmd = (u32)PT_REGS_PARM2(ctx);
	void *uarg = (void *)PT_REGS_PARM3(ctx);
	u64 size = 0;

	if (cmd == VFIO_IOMMU_MAP_DMA) {
		bpf_probe_read_user(&size, sizeof(size), uarg + 24);   /* .size */
		return call_enter(SP(ctx), VFT_VFIO_MAP_DMA, size);
	}
	if (cmd == VFIO_IOMMU_UNMAP_DMA) {
		bpf_probe_read_user(&size, sizeof(size), uarg + 16);   /* .size */
		return call_enter(SP(ctx), VFT_VFIO_UNMAP_DMA, size);
	}
	return 0;
}

int krp_vfio_ioctl(struct pt_regs *ctx)
{
	call_exit(ctx, SP(ctx), VFT_VFIO_MAP_DMA, MODE_KPROBE);      /* only the one entered has a start */
	return call_exit(ctx, SP(ctx), VFT_VFIO_UNMAP_DMA, MODE_KPROBE);
}

/* ---- KVM exits --------------------------------------------------------------------- */

#if HAVE_KVM_TP
TRACEPOINT_PROBE(kvm, kvm_exit)
{
	u32 tid = current_tid();
	struct exit_start init = { .ts = bpf_ktime_get_ns(), .reason = args->exit_reason,
				   .vcpu = args->vcpu_id };

	if (!is_armed())
		return 0;
	/* Kept in the map from the start: the windows it began in are written into the
	 * map value, whose contents the verifier does not track (a mask built on the stack
	 * took it past its state limit, each combination of slots a state of its own). */
	if (exit_starts.update(&tid, &init)) {
		count_drop(VFT_DROP_EXIT_STARTS);
		return 0;
	}
	struct exit_start *e = exit_starts.lookup(&tid);
	if (!e)
		return 0;
	u64 *maskp = open_mask_word();
	u64 mask = maskp ? *maskp : 0;
	if (mask) {             /* most exits come while no window is open */
#pragma clang loop unroll(disable)
		for (u32 i = 0; i < VFT_MAX_OPEN; i++) {
			if (!(mask & (1ull << i)))
				continue;
			u32 slot = i;
			struct window *w = windows.lookup(&slot);
			if (!w)
				continue;
			/* The counter first, then what the begin wrote before opening it (it
			 * zeroes t_ns, writes seq and pf, opens the counter, then stamps): the
			 * add below lands only if the counter is still this generation's. */
			u64 v = VFT_READ_ONCE(w->exits);
			if (v & VFT_CLOSED)
				continue;
			u64 gen = (v >> VFT_GEN_SHIFT) & VFT_GEN_MASK;
			u64 t = VFT_READ_ONCE(w->rec.t_ns);
			/* Not stamped yet, or stamped after this exit began: not its window. */
			if (!t || t > init.ts)
				continue;
			u64 seq = VFT_READ_ONCE(w->rec.seq);
			u32 pf = VFT_READ_ONCE(w->rec.pf);
			if (!add_if_gen(&w->exits, gen, 1, VFT_COUNT_MASK))
				continue;       /* closed since: the exit began after it */
			u32 j = i & (VFT_MAX_OPEN - 1);
			e->seq[j] = seq;
			e->pf[j] = pf;
			e->gen[j] = gen;
			e->open_mask |= 1u << i;
		}
	}
	/* Counted now: a vCPU whose VM is torn down never enters again. */
	struct vft_exit_key k = { .pid = bpf_get_current_pid_tgid() >> 32, .vcpu = init.vcpu,
				  .reason = init.reason, .in_window = e->open_mask != 0 };
	struct vft_exit_val zero = {}, *v = exits.lookup_or_try_init(&k, &zero);
	if (v)
		__sync_fetch_and_add(&v->count, 1);
	else
		count_drop(VFT_DROP_EXITS);
	return 0;
}

TRACEPOINT_PROBE(kvm, kvm_entry)
{
	u64 now = bpf_ktime_get_ns();
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id;
	struct exit_start *e = exit_starts.lookup(&tid);

	if (!e)
		return 0;
	if (now < e->ts) {
		count_negative(VFT_KVM_EXIT);
		exit_starts.delete(&tid);
		return 0;
	}
	u64 ns = now - e->ts;
	u64 seq = 0;
	u32 pf = 0, mask = e->open_mask;
	if (mask) {             /* a loop, as in kvm_exit */
#pragma clang loop unroll(disable)
		for (u32 i = VFT_MAX_OPEN; i-- > 0;) {  /* downwards: the call row gets the lowest */
			if (!(mask & (1u << i)))
				continue;
			u32 slot = i & (VFT_MAX_OPEN - 1);
			seq = e->seq[slot];
			pf = e->pf[slot];
			u64 gen = e->gen[slot]; /* read before the lookup spills slot */
			struct window *w = windows.lookup(&slot);
			/* Still the window the exit began in (same generation), still open:
			 * added in time, and counted among its ended exits. */
			if (w && ns <= VFT_EXIT_NS_MASK &&
			    add_if_gen(&w->exit_ns, gen, (1ull << VFT_ENDED_SHIFT) + ns,
				       VFT_EXIT_NS_MASK))
				continue;
			/* It outlived that window: its time goes to it by (pf, seq). */
			emit_join(args, VFT_JOIN_EXIT, pf, -1, seq, ns, e->ts);
		}
	}
	struct vft_exit_key k = { .pid = id >> 32, .vcpu = e->vcpu, .reason = e->reason,
				  .in_window = mask != 0 };
	struct vft_exit_val *v = exits.lookup(&k);
	if (v)
		__sync_fetch_and_add(&v->ns, ns);
	emit_call(args, VFT_KVM_EXIT, e->ts, ns, e->reason, seq, pf, e->vcpu);
	exit_starts.delete(&tid);
	return 0;
}

/* A vCPU thread whose VM is torn down mid-exit never enters again: its start goes with
 * it, or it would hold one of the map's entries for good. */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u32 tid = current_tid();

	exit_starts.delete(&tid);
	return 0;
}
#endif

/* ---- blocked guest accesses ------------------------------------------------------ */

#if HAVE_ACCESS_TP
static __always_inline int access_released(void *ctx, u32 pf, s32 vf, u64 wait_ns, u64 seq)
{
	if (!is_armed())
		return 0;
	emit_join(ctx, VFT_JOIN_RELEASE, pf, vf, seq, wait_ns, bpf_ktime_get_ns());
	return 0;
}

#if SWITCH_SRC == SRC_PF_SCHED_TP
TRACEPOINT_PROBE(pf_sched, vf_access_wait)
{
	return access_released(args, args->pf, args->vf, args->wait_ns, args->seq);
}
#else
/* TP_PROTO(u32 pf, s32 vf, u64 wait_ns, u64 seq) */
RAW_TRACEPOINT_PROBE(vf_access_wait)
{
	return access_released(ctx, (u32)ctx->args[0], (s32)ctx->args[1], ctx->args[2],
			       ctx->args[3]);
}
#endif
#endif
