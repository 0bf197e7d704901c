// SPDX-License-Identifier: GPL-2.0
/*
 * pf_sched - a time-slicing "PF driver" for the vftrace lab.
 *
 * Binds (through driver_override only) to QEMU's edu device and pretends it is an
 * SR-IOV PF with nr_vfs VFs that share the device by time slicing.  Each VF has a
 * "BAR" of bar_pages host pages, mapped for user space through /dev/pf_sched<N> and
 * into an unmanaged IOMMU domain attached to the device.  A kthread per PF switches
 * the active VF every slice_us: the outgoing VF is revoked (user PTEs zapped with
 * unmap_mapping_range(), IOVA window iommu_unmap()ed) and the incoming VF granted
 * (iommu_map()).  Accesses to a VF that is off block until it is on again.
 *
 * Test knob irq_dma: each switch also arms a pinned hard-irq hrtimer that maps and
 * unmaps one scratch page in the PF's domain, as a device driver's DMA completion does
 * from its interrupt, on whatever task it interrupts (often the switching thread).
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/debugfs.h>
#include <linux/delay.h>
#include <linux/fs.h>
#include <linux/hrtimer.h>
#include <linux/idr.h>
#include <linux/iommu.h>
#include <linux/kref.h>
#include <linux/kthread.h>
#include <linux/ktime.h>
#include <linux/list.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/mount.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/pseudo_fs.h>
#include <linux/rwsem.h>
#include <linux/sched/signal.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/wait.h>

#include "pf_sched_trace.h"

#define PF_SCHED_VENDOR		0x1234
#define PF_SCHED_DEVICE		0x11e8
#define PF_SCHED_IOVA_BASE	0x100000000ULL
#define PF_SCHED_IOVA_WINDOW	0x1000000ULL	/* 16 MiB per VF, >= max BAR */
#define PF_SCHED_FS_MAGIC	0x70667363	/* "pfsc" */
/* irq_dma's scratch page: above the last possible VF window */
#define PF_SCHED_IRQ_IOVA	(PF_SCHED_IOVA_BASE + NR_VFS_MAX * PF_SCHED_IOVA_WINDOW)
#define PF_SCHED_IRQ_DELAYS	8		/* timer delays 0, 2, ... 14 us, by seq */

#define NR_VFS_MIN	1
#define NR_VFS_MAX	64
#define BAR_PAGES_MIN	1
#define BAR_PAGES_MAX	256
#define SLICE_US_MAX	10000000

enum pf_unmap_mode { PF_UNMAP_STRICT, PF_UNMAP_BATCHED };
static const char * const unmap_mode_names[] = {
	[PF_UNMAP_STRICT] = "strict",
	[PF_UNMAP_BATCHED] = "batched",
};

/* ---- module parameters ------------------------------------------------- */

static unsigned int nr_vfs = 4;
static unsigned int bar_pages = 4;
static unsigned int slice_us = 2000;
static bool enabled = true;
static int unmap_mode = PF_UNMAP_STRICT;
static bool irq_dma;

/* Bumped on every control change so sleeping scheduler threads re-evaluate. */
static atomic_t pf_ctl_gen = ATOMIC_INIT(0);

static LIST_HEAD(pf_list);
static DEFINE_MUTEX(pf_list_lock);
static DEFINE_IDA(pf_ida);
static struct dentry *pf_debugfs_root;
static struct vfsmount *pf_mnt;

struct pf_stat {
	u64 count, sum, min, max;
};

/*
 * A histogram of the module's own switch timings (t2 - t0, what total_ns sums), so that
 * untraced switches have percentiles and not only count, sum, min and max: the timing
 * and this add cost the same with or without a tracer attached.  Log-linear: values
 * below PF_HIST_SUB are exact, above them each power of two has PF_HIST_SUB buckets
 * (widths 1/16 of an octave, under 4.5%), up to 2^PF_HIST_TOP_BIT ns (~550 s).
 */
#define PF_HIST_SUB_BITS 4
#define PF_HIST_SUB (1u << PF_HIST_SUB_BITS)
#define PF_HIST_TOP_BIT 39
#define PF_HIST_BUCKETS (PF_HIST_SUB + (PF_HIST_TOP_BIT + 1 - PF_HIST_SUB_BITS) * PF_HIST_SUB)

static unsigned int pf_hist_bucket(u64 v)
{
	unsigned int e;

	if (v < PF_HIST_SUB)
		return v;
	e = fls64(v) - 1;				/* v >= 2^e, e >= PF_HIST_SUB_BITS */
	if (e > PF_HIST_TOP_BIT)
		return PF_HIST_BUCKETS - 1;
	return PF_HIST_SUB + (e - PF_HIST_SUB_BITS) * PF_HIST_SUB +
	       ((v >> (e - PF_HIST_SUB_BITS)) & (PF_HIST_SUB - 1));
}

/* The smallest value in bucket i (what debugfs prints for it). */
static u64 pf_hist_low(unsigned int i)
{
	unsigned int e;

	if (i < PF_HIST_SUB)
		return i;
	e = (i - PF_HIST_SUB) / PF_HIST_SUB + PF_HIST_SUB_BITS;
	return (u64)(PF_HIST_SUB + (i - PF_HIST_SUB) % PF_HIST_SUB) << (e - PF_HIST_SUB_BITS);
}

struct pf_counters {
	u64 grant_seq;			/* seq of the switch that granted 'active' */
	u64 seq;			/* last completed switch */
	u64 switches;
	struct pf_stat revoke, grant, total;
	u64 map_calls, map_bytes, unmap_calls, unmap_bytes, map_errors;
	u64 zap_calls;			/* unmap_mapping_range() of a revoked VF */
	u64 blocked_accesses, blocked_wait_ns;
};

struct pf_dev {
	struct kref kref;
	struct list_head node;
	struct pci_dev *pdev;		/* NULL-safe only until remove() */
	int index;			/* N in /dev/pf_sched<N> */
	char name[24];			/* pf_sched<N> */
	char pci_name[32];
	unsigned int nr_vfs;
	unsigned int bar_pages;
	size_t bar_size;

	struct miscdevice misc;
	struct inode *inode;		/* anon inode: the address_space of all opens */
	struct dentry *dbg;
	struct task_struct *thread;

	struct iommu_domain *domain;	/* NULL in noiommu mode */
	bool attached;
	void **bar;			/* per-VF kernel address, NULL after remove */

	/*
	 * map_sem: write-held by a switch across revoke+grant and by remove; read-held
	 * by an access (fault, pread/pwrite) across "VF is on" check + the access, so
	 * no PTE can be installed for a VF after it was revoked.
	 */
	struct rw_semaphore map_sem;
	int active;			/* active VF, -1 during a switch, after a failed
					 * grant, and after remove */
	unsigned int turn;		/* VF of the latest switch, granted or not
					 * (thread only): the rotation goes on from it */
	bool dead;			/* device removed */
	wait_queue_head_t wq;		/* accesses waiting for their VF */

	struct mutex switch_lock;	/* held across one switch */
	wait_queue_head_t ctl_wq;	/* scheduler thread control */
	bool pf_enabled;		/* debugfs "enabled" */
	u64 next_seq;			/* seq of the next switch (thread only) */

	spinlock_t lock;		/* protects c and total_hist's updates */
	struct pf_counters c;
	u64 total_hist[PF_HIST_BUCKETS];	/* kept apart from c: too big for a stack copy */

	/* irq_dma: armed by each switch (thread only), cancelled at remove */
	struct hrtimer irq_timer;
	bool in_switch;			/* inside vf_switch_begin .. vf_switch_end */
	atomic64_t irq_map_calls, irq_unmap_calls, irq_map_errors;
	atomic64_t irq_in_switch;	/* fires that interrupted this PF's switch */
};

static void pf_wake_all_threads(bool sync);

static int param_set_uint_range(const char *val, const struct kernel_param *kp,
				unsigned int min, unsigned int max)
{
	unsigned int v;
	int ret = kstrtouint(val, 0, &v);

	if (ret || v < min || v > max) {
		pr_err("invalid %s=%.*s: must be an integer in %u..%u\n",
		       kp->name, (int)strcspn(val, "\n"), val, min, max);
		return -EINVAL;
	}
	WRITE_ONCE(*(unsigned int *)kp->arg, v);	/* read with READ_ONCE */
	return 0;
}

static int nr_vfs_set(const char *val, const struct kernel_param *kp)
{
	return param_set_uint_range(val, kp, NR_VFS_MIN, NR_VFS_MAX);
}

static int bar_pages_set(const char *val, const struct kernel_param *kp)
{
	return param_set_uint_range(val, kp, BAR_PAGES_MIN, BAR_PAGES_MAX);
}

static int slice_us_set(const char *val, const struct kernel_param *kp)
{
	int ret = param_set_uint_range(val, kp, 0, SLICE_US_MAX);

	if (!ret)
		pf_wake_all_threads(READ_ONCE(slice_us) == 0);
	return ret;
}

static int param_parse_bool(const char *val, const struct kernel_param *kp, bool *v)
{
	if (kstrtobool(val, v)) {
		pr_err("invalid %s=%.*s: must be a boolean (0 or 1)\n",
		       kp->name, (int)strcspn(val, "\n"), val);
		return -EINVAL;
	}
	return 0;
}

static int enabled_set(const char *val, const struct kernel_param *kp)
{
	bool v;

	if (param_parse_bool(val, kp, &v))
		return -EINVAL;
	WRITE_ONCE(enabled, v);
	pf_wake_all_threads(!v);
	return 0;
}

static int irq_dma_set(const char *val, const struct kernel_param *kp)
{
	bool v;

	if (param_parse_bool(val, kp, &v))
		return -EINVAL;
	WRITE_ONCE(irq_dma, v);		/* read by the next switch */
	return 0;
}

static int unmap_mode_set(const char *val, const struct kernel_param *kp)
{
	int i = sysfs_match_string(unmap_mode_names, val);

	if (i < 0) {
		pr_err("invalid %s=%.*s: must be \"strict\" or \"batched\"\n",
		       kp->name, (int)strcspn(val, "\n"), val);
		return -EINVAL;
	}
	WRITE_ONCE(unmap_mode, i);
	pf_wake_all_threads(false);
	return 0;
}

static int unmap_mode_get(char *buf, const struct kernel_param *kp)
{
	return sysfs_emit(buf, "%s\n", unmap_mode_names[READ_ONCE(unmap_mode)]);
}

static const struct kernel_param_ops nr_vfs_ops = {
	.set = nr_vfs_set, .get = param_get_uint,
};
static const struct kernel_param_ops bar_pages_ops = {
	.set = bar_pages_set, .get = param_get_uint,
};
static const struct kernel_param_ops slice_us_ops = {
	.set = slice_us_set, .get = param_get_uint,
};
static const struct kernel_param_ops enabled_ops = {
	.set = enabled_set, .get = param_get_bool,
};
static const struct kernel_param_ops unmap_mode_ops = {
	.set = unmap_mode_set, .get = unmap_mode_get,
};
static const struct kernel_param_ops irq_dma_ops = {
	.set = irq_dma_set, .get = param_get_bool,
};

module_param_cb(nr_vfs, &nr_vfs_ops, &nr_vfs, 0444);
MODULE_PARM_DESC(nr_vfs, "VFs per PF, 1..64 (default 4; read at probe)");
module_param_cb(bar_pages, &bar_pages_ops, &bar_pages, 0444);
MODULE_PARM_DESC(bar_pages, "pages per VF BAR, 1..256 (default 4; read at probe)");
module_param_cb(slice_us, &slice_us_ops, &slice_us, 0644);
MODULE_PARM_DESC(slice_us, "time slice in us, 0..10000000, 0 stops switching (default 2000)");
module_param_cb(enabled, &enabled_ops, &enabled, 0644);
MODULE_PARM_DESC(enabled, "global switch gate (default 1)");
module_param_cb(unmap_mode, &unmap_mode_ops, &unmap_mode, 0644);
MODULE_PARM_DESC(unmap_mode, "IOVA revoke: strict (iommu_unmap) or batched (unmap_fast + one iotlb sync)");
module_param_cb(irq_dma, &irq_dma_ops, &irq_dma, 0644);
MODULE_PARM_DESC(irq_dma, "test: each switch arms a hard-irq timer mapping and unmapping a scratch page");

/* ---- helpers ------------------------------------------------------------ */

static void pf_release(struct kref *kref)
{
	struct pf_dev *pf = container_of(kref, struct pf_dev, kref);

	if (pf->inode)
		iput(pf->inode);
	kfree(pf->bar);
	kfree(pf);
}

static void pf_put(struct pf_dev *pf)
{
	kref_put(&pf->kref, pf_release);
}

static unsigned long pf_iova(unsigned int vf)
{
	return PF_SCHED_IOVA_BASE + (u64)vf * PF_SCHED_IOVA_WINDOW;
}

static void pf_stat_add(struct pf_stat *s, u64 v)
{
	if (!s->count || v < s->min)
		s->min = v;
	if (v > s->max)
		s->max = v;
	s->sum += v;
	s->count++;
}

static bool pf_switching_allowed(struct pf_dev *pf)
{
	return READ_ONCE(enabled) && READ_ONCE(pf->pf_enabled) &&
	       READ_ONCE(slice_us) > 0;
}

/*
 * Wake every scheduler thread to pick up a control change.  With @sync, also wait
 * for an in-flight switch to finish, so that once a write turning switching off
 * returns, no switch is running or will start.
 */
static void pf_wake_all_threads(bool sync)
{
	struct pf_dev *pf;

	atomic_inc(&pf_ctl_gen);
	mutex_lock(&pf_list_lock);
	list_for_each_entry(pf, &pf_list, node) {
		wake_up_all(&pf->ctl_wq);
		if (sync) {
			mutex_lock(&pf->switch_lock);
			mutex_unlock(&pf->switch_lock);
		}
	}
	mutex_unlock(&pf_list_lock);
}

/* Grant: one iommu_map() of the whole BAR.  Caller holds map_sem for write. */
static int pf_iommu_grant(struct pf_dev *pf, unsigned int vf)
{
	int ret;

	if (!pf->domain)
		return 0;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	ret = iommu_map(pf->domain, pf_iova(vf), virt_to_phys(pf->bar[vf]),
			pf->bar_size, IOMMU_READ | IOMMU_WRITE, GFP_KERNEL);
#else
	ret = iommu_map(pf->domain, pf_iova(vf), virt_to_phys(pf->bar[vf]),
			pf->bar_size, IOMMU_READ | IOMMU_WRITE);
#endif
	spin_lock(&pf->lock);
	pf->c.map_calls++;
	if (!ret)
		pf->c.map_bytes += pf->bar_size;
	else
		pf->c.map_errors++;
	spin_unlock(&pf->lock);
	if (ret)
		dev_err_ratelimited(&pf->pdev->dev, "iommu_map VF %u failed: %d\n", vf, ret);
	return ret;
}

/* Revoke the IOVA window: one unmap call for the whole BAR.  The caller has just zapped
 * the VF's user mappings (one unmap_mapping_range()), counted here under the same lock. */
static void pf_iommu_revoke(struct pf_dev *pf, unsigned int vf, bool batched)
{
	struct iommu_iotlb_gather gather;
	size_t n = 0;

	if (pf->domain && batched) {
		iommu_iotlb_gather_init(&gather);
		n = iommu_unmap_fast(pf->domain, pf_iova(vf), pf->bar_size, &gather);
		iommu_iotlb_sync(pf->domain, &gather);
	} else if (pf->domain) {
		n = iommu_unmap(pf->domain, pf_iova(vf), pf->bar_size);
	}
	spin_lock(&pf->lock);
	pf->c.zap_calls++;
	if (pf->domain) {
		pf->c.unmap_calls++;
		pf->c.unmap_bytes += n;
	}
	spin_unlock(&pf->lock);
	if (pf->domain && n != pf->bar_size)
		dev_err_ratelimited(&pf->pdev->dev, "unmap VF %u: %zu of %zu bytes\n",
				    vf, n, pf->bar_size);
}

/*
 * irq_dma: one iommu_map() and iommu_unmap() of a scratch page (the zero page, read-only)
 * in hard-irq context, as a DMA API user's completion interrupt does.  Counts whether it
 * interrupted this PF's switching thread inside its switch window.  Its counters are
 * atomics: pf->lock is taken with interrupts on.
 */
static enum hrtimer_restart pf_irq_dma(struct hrtimer *timer)
{
	struct pf_dev *pf = container_of(timer, struct pf_dev, irq_timer);
	phys_addr_t zero = page_to_phys(ZERO_PAGE(0));
	int ret;

	if (current == pf->thread && READ_ONCE(pf->in_switch))
		atomic64_inc(&pf->irq_in_switch);
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	ret = iommu_map(pf->domain, PF_SCHED_IRQ_IOVA, zero, PAGE_SIZE, IOMMU_READ,
			GFP_ATOMIC);
#else
	ret = iommu_map_atomic(pf->domain, PF_SCHED_IRQ_IOVA, zero, PAGE_SIZE, IOMMU_READ);
#endif
	atomic64_inc(&pf->irq_map_calls);
	if (ret) {
		atomic64_inc(&pf->irq_map_errors);
		return HRTIMER_NORESTART;
	}
	iommu_unmap(pf->domain, PF_SCHED_IRQ_IOVA, PAGE_SIZE);
	atomic64_inc(&pf->irq_unmap_calls);
	return HRTIMER_NORESTART;
}

/* irq_dma: fire on this CPU a few us from now, spread over the switch by seq. */
static void pf_irq_dma_arm(struct pf_dev *pf, u64 seq)
{
	u64 delay_ns = (u64)(seq % PF_SCHED_IRQ_DELAYS) * 2 * NSEC_PER_USEC;

	if (READ_ONCE(irq_dma) && pf->domain)
		hrtimer_start(&pf->irq_timer, ns_to_ktime(delay_ns),
			      HRTIMER_MODE_REL_PINNED_HARD);
}

/*
 * One VF switch; runs on the PF's kthread with switch_lock held.  noinline keeps it a
 * real symbol, as a hardware PF driver's switch routine would be, so it can be traced
 * as a window of its own (vftrace record --switch func:pf_switch).
 */
static noinline void pf_switch(struct pf_dev *pf)
{
	bool batched = READ_ONCE(unmap_mode) == PF_UNMAP_BATCHED;
	u64 seq = pf->next_seq;
	int from = pf->active;          /* -1 if the last grant failed: nothing to revoke */
	int to = (pf->turn + 1) % pf->nr_vfs;
	bool granted;
	unsigned int bucket;
	u64 t0, t1, t2;

	pf_irq_dma_arm(pf, seq);
	trace_vf_switch_begin(pf->index, seq, from, to);
	WRITE_ONCE(pf->in_switch, true);
	t0 = ktime_get_ns();

	/* revoke */
	down_write(&pf->map_sem);
	WRITE_ONCE(pf->active, -1);
	if (from >= 0) {
		unmap_mapping_range(pf->inode->i_mapping, (loff_t)from * pf->bar_size,
				    pf->bar_size, 1);
		pf_iommu_revoke(pf, from, batched);
	}
	t1 = ktime_get_ns();

	/* grant: a VF whose IOVA window could not be mapped is not made active; its
	 * accesses go on blocking until a later switch grants it (map_errors counts it) */
	granted = !pf_iommu_grant(pf, to);
	pf->turn = to;
	if (granted) {
		spin_lock(&pf->lock);
		pf->c.grant_seq = seq;
		spin_unlock(&pf->lock);
		WRITE_ONCE(pf->active, to);
	}
	up_write(&pf->map_sem);
	wake_up_all(&pf->wq);
	t2 = ktime_get_ns();

	spin_lock(&pf->lock);
	pf->c.seq = seq;
	pf->c.switches++;
	pf_stat_add(&pf->c.revoke, t1 - t0);
	pf_stat_add(&pf->c.grant, t2 - t1);
	pf_stat_add(&pf->c.total, t2 - t0);
	bucket = pf_hist_bucket(t2 - t0);
	WRITE_ONCE(pf->total_hist[bucket], pf->total_hist[bucket] + 1);
	spin_unlock(&pf->lock);

	WRITE_ONCE(pf->in_switch, false);
	trace_vf_switch_end(pf->index, seq, from, to, t1 - t0, t2 - t1, t2 - t0);
	pf->next_seq++;
}

static unsigned int pf_ctl_snapshot(void)
{
	return atomic_read(&pf_ctl_gen);
}

static bool pf_thread_wake_cond(struct pf_dev *pf, unsigned int gen)
{
	return kthread_should_stop() || pf_ctl_snapshot() != gen;
}

static int pf_thread(void *data)
{
	struct pf_dev *pf = data;
	u64 start = ktime_get_ns();	/* start of the current slice */

	while (!kthread_should_stop()) {
		unsigned int gen = pf_ctl_snapshot();
		u64 slice_ns = (u64)READ_ONCE(slice_us) * NSEC_PER_USEC;
		u64 now;
		long ret;

		if (!pf_switching_allowed(pf)) {
			wait_event_interruptible(pf->ctl_wq, pf_thread_wake_cond(pf, gen));
			start = ktime_get_ns();	/* a new slice once switching resumes */
			continue;
		}
		/*
		 * hrtimer-based sleep until the end of the slice; a control change ends
		 * it early and the slice end is recomputed with the new settings.
		 */
		now = ktime_get_ns();
		if (now - start < slice_ns) {
			ret = wait_event_interruptible_hrtimeout(pf->ctl_wq,
					pf_thread_wake_cond(pf, gen),
					ns_to_ktime(start + slice_ns - now));
			if (ret != -ETIME)
				continue;
		}

		mutex_lock(&pf->switch_lock);
		if (pf_switching_allowed(pf) && !kthread_should_stop())
			pf_switch(pf);
		mutex_unlock(&pf->switch_lock);
		start = ktime_get_ns();
	}
	return 0;
}

/*
 * Sleep, holding nothing, until @vf is the active VF or @pf is removed.  Interruptible
 * where the caller can restart (read/write return -ERESTARTSYS; a fault with
 * FAULT_FLAG_INTERRUPTIBLE is retried once the signal is handled), killable elsewhere.
 */
static int pf_wait_active(struct pf_dev *pf, int vf, bool interruptible)
{
	if (interruptible)
		return wait_event_interruptible(pf->wq, READ_ONCE(pf->active) == vf ||
						READ_ONCE(pf->dead));
	return wait_event_killable(pf->wq, READ_ONCE(pf->active) == vf ||
				   READ_ONCE(pf->dead));
}

/* Count an access that blocked since @t0, and the switch that released it. */
static void pf_count_blocked(struct pf_dev *pf, int vf, u64 t0, int ret)
{
	u64 waited = ktime_get_ns() - t0, seq;

	spin_lock(&pf->lock);
	pf->c.blocked_accesses++;
	pf->c.blocked_wait_ns += waited;
	seq = ret ? pf->c.seq : pf->c.grant_seq;
	spin_unlock(&pf->lock);
	trace_vf_access_wait(pf->index, vf, waited, seq);
}

/*
 * Wait until @vf is the active VF.  On success returns 0 with map_sem held for
 * read (the caller does its access and up_read()s).  Returns -ENODEV after remove
 * or the wait's error when a signal arrives.
 */
static int pf_access_begin(struct pf_dev *pf, int vf, bool interruptible)
{
	bool blocked = false;
	u64 t0 = 0;
	int ret;

	for (;;) {
		down_read(&pf->map_sem);
		if (pf->dead) {
			ret = -ENODEV;
			break;
		}
		if (pf->active == vf) {
			ret = 0;
			break;
		}
		up_read(&pf->map_sem);
		if (!blocked) {
			blocked = true;
			t0 = ktime_get_ns();
		}
		ret = pf_wait_active(pf, vf, interruptible);
		if (ret) {
			down_read(&pf->map_sem);
			break;
		}
	}
	if (blocked)
		pf_count_blocked(pf, vf, t0, ret);
	if (ret)
		up_read(&pf->map_sem);
	return ret;
}

/* ---- device file ------------------------------------------------------- */

static void pf_release_fault_lock(struct vm_fault *vmf)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 5, 0)
	release_fault_lock(vmf);        /* the per-VMA lock or mmap_lock */
#else
	mmap_read_unlock(vmf->vma->vm_mm);
#endif
}

static vm_fault_t pf_vm_fault(struct vm_fault *vmf)
{
	struct pf_dev *pf = vmf->vma->vm_private_data;
	unsigned long vf = vmf->pgoff / pf->bar_pages;
	unsigned long page = vmf->pgoff % pf->bar_pages;
	vm_fault_t ret;
	u64 t0;
	int err;

	if (vf >= pf->nr_vfs)
		return VM_FAULT_SIGBUS;
	/*
	 * Never sleep holding mmap_lock (a whole rotation would stall every mmap, munmap
	 * and fault of the guest's process): where the caller can retry, drop the lock,
	 * wait, and have the fault retried, as filemap_fault() does for a locked folio.
	 * Every retry may do so again (the VF can go off again before it runs).
	 */
	if ((vmf->flags & FAULT_FLAG_ALLOW_RETRY) && READ_ONCE(pf->active) != vf &&
	    !READ_ONCE(pf->dead)) {
		if (vmf->flags & FAULT_FLAG_RETRY_NOWAIT)
			return VM_FAULT_RETRY;
		kref_get(&pf->kref);    /* the vma may go once the lock is dropped */
		pf_release_fault_lock(vmf);
		t0 = ktime_get_ns();
		err = pf_wait_active(pf, vf, vmf->flags & FAULT_FLAG_INTERRUPTIBLE);
		pf_count_blocked(pf, vf, t0, err ?: (READ_ONCE(pf->dead) ? -ENODEV : 0));
		pf_put(pf);
		return VM_FAULT_RETRY;  /* the retry finds the VF on, or SIGBUS if removed */
	}
	/* No retry possible (e.g. get_user_pages() without a lock to drop): wait here. */
	if (pf_access_begin(pf, vf, false))
		return VM_FAULT_SIGBUS;	/* removed, or killed while waiting */
	ret = vmf_insert_pfn(vmf->vma, vmf->address,
			     virt_to_phys(pf->bar[vf] + page * PAGE_SIZE) >> PAGE_SHIFT);
	up_read(&pf->map_sem);
	return ret;
}

static const struct vm_operations_struct pf_vm_ops = {
	.fault = pf_vm_fault,
};

static int pf_open(struct inode *inode, struct file *file)
{
	/* misc_open() holds misc_mtx: remove() cannot free pf under us. */
	struct pf_dev *pf = container_of(file->private_data, struct pf_dev, misc);

	kref_get(&pf->kref);
	file->private_data = pf;
	/* one address_space for all opens, so a revoke zaps every mapping */
	file->f_mapping = pf->inode->i_mapping;
	return 0;
}

static int pf_file_release(struct inode *inode, struct file *file)
{
	pf_put(file->private_data);
	return 0;
}

static int pf_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct pf_dev *pf = file->private_data;
	unsigned long pages = vma_pages(vma);
	unsigned long vf = vma->vm_pgoff / pf->bar_pages;
	unsigned long first = vma->vm_pgoff % pf->bar_pages;

	if (!(vma->vm_flags & VM_MAYSHARE))
		return -EINVAL;
	if (vf >= pf->nr_vfs || pages > pf->bar_pages - first)
		return -EINVAL;
	if (READ_ONCE(pf->dead))
		return -ENODEV;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_set(vma, VM_PFNMAP | VM_IO | VM_DONTEXPAND | VM_DONTDUMP);
#else
	vma->vm_flags |= VM_PFNMAP | VM_IO | VM_DONTEXPAND | VM_DONTDUMP;
#endif
	vma->vm_private_data = pf;
	vma->vm_ops = &pf_vm_ops;
	return 0;
}

/* Validate a trapped register access; returns the VF or -EINVAL. */
static long pf_reg_check(struct pf_dev *pf, size_t count, loff_t pos)
{
	u64 vf;

	if (count != 1 && count != 2 && count != 4 && count != 8)
		return -EINVAL;
	if (pos < 0 || (pos & (count - 1)))
		return -EINVAL;
	vf = div_u64(pos, pf->bar_size);
	if (vf >= pf->nr_vfs)
		return -EINVAL;
	/* natural alignment and bar_size % 8 == 0 keep it inside one BAR */
	return vf;
}

static ssize_t pf_read(struct file *file, char __user *buf, size_t count, loff_t *ppos)
{
	struct pf_dev *pf = file->private_data;
	long vf = pf_reg_check(pf, count, *ppos);
	u64 val = 0;
	int ret;

	if (vf < 0)
		return vf;
	ret = pf_access_begin(pf, vf, true);
	if (ret)
		return ret;
	memcpy(&val, pf->bar[vf] + (*ppos - (loff_t)vf * pf->bar_size), count);
	up_read(&pf->map_sem);
	if (copy_to_user(buf, &val, count))
		return -EFAULT;
	*ppos += count;
	return count;
}

static ssize_t pf_write(struct file *file, const char __user *buf, size_t count,
			loff_t *ppos)
{
	struct pf_dev *pf = file->private_data;
	long vf = pf_reg_check(pf, count, *ppos);
	u64 val = 0;
	int ret;

	if (vf < 0)
		return vf;
	if (copy_from_user(&val, buf, count))
		return -EFAULT;
	ret = pf_access_begin(pf, vf, true);
	if (ret)
		return ret;
	memcpy(pf->bar[vf] + (*ppos - (loff_t)vf * pf->bar_size), &val, count);
	up_read(&pf->map_sem);
	*ppos += count;
	return count;
}

static const struct file_operations pf_fops = {
	.owner = THIS_MODULE,
	.open = pf_open,
	.release = pf_file_release,
	.mmap = pf_mmap,
	.read = pf_read,
	.write = pf_write,
	.llseek = default_llseek,
};

/* ---- debugfs ----------------------------------------------------------- */

static void pf_stat_show(struct seq_file *m, const char *name, const struct pf_stat *s)
{
	seq_printf(m, "%s_count %llu\n%s_sum %llu\n%s_min %llu\n%s_max %llu\n",
		   name, s->count, name, s->sum, name, s->min, name, s->max);
}

/* total_hist: "LOW COUNT" per non-empty bucket, LOW its smallest ns; a bucket from LOW
 * >= 16 spans LOW / 16 ns.  Read without the lock: each count only grows, so a reader
 * racing a switch sees it or not, never a torn total of another bucket. */
static int pf_hist_show(struct seq_file *m, void *unused)
{
	struct pf_dev *pf = m->private;
	unsigned int i;

	seq_printf(m, "# sub_buckets %u\n", PF_HIST_SUB);
	for (i = 0; i < PF_HIST_BUCKETS; i++) {
		u64 n = READ_ONCE(pf->total_hist[i]);

		if (n)
			seq_printf(m, "%llu %llu\n", pf_hist_low(i), n);
	}
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(pf_hist);

static int pf_stats_show(struct seq_file *m, void *unused)
{
	struct pf_dev *pf = m->private;
	struct pf_counters snap;
	int active;

	/*
	 * Copy under the lock, print outside it: a consistent snapshot.  switch_lock
	 * keeps it between switches: taken mid-switch, it would show the revoke's
	 * unmap counted and the grant's map not yet (map_calls == unmap_calls).
	 */
	mutex_lock(&pf->switch_lock);
	spin_lock(&pf->lock);
	snap = pf->c;
	active = READ_ONCE(pf->active);
	spin_unlock(&pf->lock);
	mutex_unlock(&pf->switch_lock);

	seq_printf(m, "pf %d\n", pf->index);
	seq_printf(m, "mode %s\n", pf->domain ? "iommu" : "noiommu");
	seq_printf(m, "unmap_mode %s\n", unmap_mode_names[READ_ONCE(unmap_mode)]);
	seq_printf(m, "nr_vfs %u\n", pf->nr_vfs);
	seq_printf(m, "bar_pages %u\n", pf->bar_pages);
	seq_printf(m, "active_vf %d\n", active);
	seq_printf(m, "seq %llu\n", snap.seq);
	seq_printf(m, "switches %llu\n", snap.switches);
	pf_stat_show(m, "revoke_ns", &snap.revoke);
	pf_stat_show(m, "grant_ns", &snap.grant);
	pf_stat_show(m, "total_ns", &snap.total);
	seq_printf(m, "map_calls %llu\n", snap.map_calls);
	seq_printf(m, "map_bytes %llu\n", snap.map_bytes);
	seq_printf(m, "map_errors %llu\n", snap.map_errors);
	seq_printf(m, "unmap_calls %llu\n", snap.unmap_calls);
	seq_printf(m, "unmap_bytes %llu\n", snap.unmap_bytes);
	seq_printf(m, "zap_calls %llu\n", snap.zap_calls);
	seq_printf(m, "blocked_accesses %llu\n", snap.blocked_accesses);
	seq_printf(m, "blocked_wait_ns %llu\n", snap.blocked_wait_ns);
	seq_printf(m, "grant_seq %llu\n", snap.grant_seq);
	/* irq_dma: atomics, outside the snapshot */
	seq_printf(m, "irq_map_calls %lld\n", atomic64_read(&pf->irq_map_calls));
	seq_printf(m, "irq_unmap_calls %lld\n", atomic64_read(&pf->irq_unmap_calls));
	seq_printf(m, "irq_map_errors %lld\n", atomic64_read(&pf->irq_map_errors));
	seq_printf(m, "irq_in_switch %lld\n", atomic64_read(&pf->irq_in_switch));
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(pf_stats);

static int pf_enabled_get(void *data, u64 *val)
{
	struct pf_dev *pf = data;

	*val = READ_ONCE(pf->pf_enabled);
	return 0;
}

static int pf_enabled_set(void *data, u64 val)
{
	struct pf_dev *pf = data;

	if (val > 1)
		return -EINVAL;
	WRITE_ONCE(pf->pf_enabled, val);
	atomic_inc(&pf_ctl_gen);
	wake_up_all(&pf->ctl_wq);
	if (!val) {	/* return only once no switch is in flight */
		mutex_lock(&pf->switch_lock);
		mutex_unlock(&pf->switch_lock);
	}
	return 0;
}
DEFINE_DEBUGFS_ATTRIBUTE(pf_enabled_fops, pf_enabled_get, pf_enabled_set, "%llu\n");

/* ---- anon inode filesystem (one address_space per PF) ------------------- */

static int pf_fs_init_fs_context(struct fs_context *fc)
{
	return init_pseudo(fc, PF_SCHED_FS_MAGIC) ? 0 : -ENOMEM;
}

static struct file_system_type pf_fs_type = {
	.name = "pf_sched",
	.init_fs_context = pf_fs_init_fs_context,
	.kill_sb = kill_anon_super,
};

/* ---- PCI driver --------------------------------------------------------- */

static void pf_free_bars(struct pf_dev *pf)
{
	unsigned int vf;

	for (vf = 0; vf < pf->nr_vfs; vf++) {
		if (pf->bar[vf])
			free_pages_exact(pf->bar[vf], pf->bar_size);
		pf->bar[vf] = NULL;
	}
}

static void pf_iommu_setup(struct pf_dev *pf)
{
	struct device *dev = &pf->pdev->dev;
	struct iommu_domain *dom = NULL;
	int ret;

	if (!device_iommu_mapped(dev)) {
		dev_warn(dev, "no IOMMU for this device: scheduling in noiommu mode\n");
		return;
	}
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 11, 0)
	dom = iommu_paging_domain_alloc(dev);
	if (IS_ERR(dom))
		dom = NULL;
#else
	dom = iommu_domain_alloc(&pci_bus_type);
#endif
	if (!dom) {
		dev_warn(dev, "IOMMU domain allocation failed: scheduling in noiommu mode\n");
		return;
	}
	ret = iommu_attach_device(dom, dev);
	if (ret) {
		iommu_domain_free(dom);
		dev_warn(dev, "IOMMU attach failed (%d): scheduling in noiommu mode\n", ret);
		return;
	}
	pf->domain = dom;
	pf->attached = true;
}

static int pf_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct pf_dev *pf;
	unsigned int vf;
	int ret;

	/* bound through driver_override only; still insist on the edu device */
	if (pdev->vendor != PF_SCHED_VENDOR || pdev->device != PF_SCHED_DEVICE)
		return -ENODEV;

	pf = kzalloc(sizeof(*pf), GFP_KERNEL);
	if (!pf)
		return -ENOMEM;
	kref_init(&pf->kref);
	INIT_LIST_HEAD(&pf->node);
	pf->pdev = pdev;
	pf->nr_vfs = READ_ONCE(nr_vfs);
	pf->bar_pages = READ_ONCE(bar_pages);
	pf->bar_size = (size_t)pf->bar_pages * PAGE_SIZE;
	pf->pf_enabled = true;
	pf->next_seq = 1;
	pf->active = -1;
	init_rwsem(&pf->map_sem);
	init_waitqueue_head(&pf->wq);
	init_waitqueue_head(&pf->ctl_wq);
	mutex_init(&pf->switch_lock);
	spin_lock_init(&pf->lock);
	hrtimer_init(&pf->irq_timer, CLOCK_MONOTONIC, HRTIMER_MODE_REL_HARD);
	pf->irq_timer.function = pf_irq_dma;
	strscpy(pf->pci_name, pci_name(pdev), sizeof(pf->pci_name));

	pf->index = ida_alloc(&pf_ida, GFP_KERNEL);
	if (pf->index < 0) {
		ret = pf->index;
		goto err_free;
	}
	snprintf(pf->name, sizeof(pf->name), "pf_sched%d", pf->index);

	pf->bar = kcalloc(pf->nr_vfs, sizeof(*pf->bar), GFP_KERNEL);
	if (!pf->bar) {
		ret = -ENOMEM;
		goto err_ida;
	}
	for (vf = 0; vf < pf->nr_vfs; vf++) {
		pf->bar[vf] = alloc_pages_exact(pf->bar_size, GFP_KERNEL | __GFP_ZERO);
		if (!pf->bar[vf]) {
			ret = -ENOMEM;
			goto err_bars;
		}
	}

	pf->inode = alloc_anon_inode(pf_mnt->mnt_sb);
	if (IS_ERR(pf->inode)) {
		ret = PTR_ERR(pf->inode);
		pf->inode = NULL;
		goto err_bars;
	}

	pf_iommu_setup(pf);

	/* VF 0 is granted at probe */
	down_write(&pf->map_sem);
	ret = pf_iommu_grant(pf, 0);
	pf->active = 0;
	pf->turn = 0;
	up_write(&pf->map_sem);
	if (ret)
		goto err_iommu;

	pci_set_drvdata(pdev, pf);

	pf->thread = kthread_create(pf_thread, pf, "pf_sched/%d", pf->index);
	if (IS_ERR(pf->thread)) {
		ret = PTR_ERR(pf->thread);
		goto err_unmap;
	}

	pf->misc.minor = MISC_DYNAMIC_MINOR;
	pf->misc.name = pf->name;
	pf->misc.fops = &pf_fops;
	pf->misc.mode = 0600;
	pf->misc.parent = &pdev->dev;
	ret = misc_register(&pf->misc);
	if (ret)
		goto err_thread;

	pf->dbg = debugfs_create_dir(pf->pci_name, pf_debugfs_root);
	debugfs_create_file("stats", 0444, pf->dbg, pf, &pf_stats_fops);
	debugfs_create_file("total_hist", 0444, pf->dbg, pf, &pf_hist_fops);
	debugfs_create_file_unsafe("enabled", 0644, pf->dbg, pf, &pf_enabled_fops);

	mutex_lock(&pf_list_lock);
	list_add_tail(&pf->node, &pf_list);
	mutex_unlock(&pf_list_lock);

	wake_up_process(pf->thread);
	dev_info(&pdev->dev, "/dev/%s: %u VFs x %u pages, %s mode, slice %u us\n",
		 pf->name, pf->nr_vfs, pf->bar_pages,
		 pf->domain ? "iommu" : "noiommu", READ_ONCE(slice_us));
	return 0;

err_thread:
	kthread_stop(pf->thread);
err_unmap:
	pci_set_drvdata(pdev, NULL);
	pf_iommu_revoke(pf, 0, false);
err_iommu:
	if (pf->domain) {
		iommu_detach_device(pf->domain, &pdev->dev);
		iommu_domain_free(pf->domain);
		pf->domain = NULL;
	}
err_bars:
	pf_free_bars(pf);
err_ida:
	ida_free(&pf_ida, pf->index);
err_free:
	pf_put(pf);
	return ret;
}

static void pf_remove(struct pci_dev *pdev)
{
	struct pf_dev *pf = pci_get_drvdata(pdev);
	unsigned int vf, left = 0;
	unsigned long off;
	int active;

	mutex_lock(&pf_list_lock);
	list_del_init(&pf->node);
	mutex_unlock(&pf_list_lock);

	debugfs_remove_recursive(pf->dbg);
	kthread_stop(pf->thread);
	hrtimer_cancel(&pf->irq_timer);	/* armed by switches only: none after this */
	misc_deregister(&pf->misc);	/* no new opens; open files keep pf */

	/* revoke everything: user PTEs, and wake blocked accesses with -ENODEV */
	down_write(&pf->map_sem);
	active = pf->active;
	pf->dead = true;
	WRITE_ONCE(pf->active, -1);
	unmap_mapping_range(pf->inode->i_mapping, 0, 0, 1);
	if (active >= 0)
		pf_iommu_revoke(pf, active, false);
	up_write(&pf->map_sem);
	wake_up_all(&pf->wq);

	if (pf->domain) {
		for (vf = 0; vf < pf->nr_vfs; vf++)
			for (off = 0; off < pf->bar_size; off += PAGE_SIZE)
				if (iommu_iova_to_phys(pf->domain, pf_iova(vf) + off))
					left++;
		iommu_detach_device(pf->domain, &pdev->dev);
		iommu_domain_free(pf->domain);
		pf->domain = NULL;
	}
	pf_free_bars(pf);
	if (left)
		dev_err(&pdev->dev, "released: %u pages freed, domain NOT empty (%u pages still mapped)\n",
			pf->nr_vfs * pf->bar_pages, left);
	else
		dev_info(&pdev->dev, "released: %u pages freed, domain empty\n",
			 pf->nr_vfs * pf->bar_pages);

	ida_free(&pf_ida, pf->index);
	pci_set_drvdata(pdev, NULL);
	pf->pdev = NULL;
	pf_put(pf);
}

static struct pci_driver pf_sched_driver = {
	.name = "pf_sched",
	.id_table = NULL,	/* bind only through driver_override */
	.probe = pf_probe,
	.remove = pf_remove,
	.driver_managed_dma = true,
};

static int __init pf_sched_init(void)
{
	int ret;

	pf_mnt = kern_mount(&pf_fs_type);
	if (IS_ERR(pf_mnt))
		return PTR_ERR(pf_mnt);
	pf_debugfs_root = debugfs_create_dir("pf_sched", NULL);
	ret = pci_register_driver(&pf_sched_driver);
	if (ret) {
		debugfs_remove_recursive(pf_debugfs_root);
		kern_unmount(pf_mnt);
		return ret;
	}
	pr_info("loaded: nr_vfs=%u bar_pages=%u slice_us=%u enabled=%d unmap_mode=%s irq_dma=%d\n",
		nr_vfs, bar_pages, slice_us, enabled, unmap_mode_names[unmap_mode], irq_dma);
	return 0;
}

static void __exit pf_sched_exit(void)
{
	pci_unregister_driver(&pf_sched_driver);
	debugfs_remove_recursive(pf_debugfs_root);
	kern_unmount(pf_mnt);
	pr_info("unloaded\n");
}

module_init(pf_sched_init);
module_exit(pf_sched_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("vftrace lab: time-slicing SR-IOV PF scheduler on QEMU edu devices");
MODULE_AUTHOR("vftrace");
