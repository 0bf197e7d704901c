// Smoke probes for the lab: count iommu_map/unmap calls and bytes and kvm:kvm_exit
// events of one process (FILTER_TGID), by exit reason.
#include <uapi/linux/ptrace.h>

enum { MAP_CALLS, MAP_BYTES, UNMAP_CALLS, UNMAP_BYTES, KVM_EXITS, NR_COUNTS };

BPF_ARRAY(counts, u64, NR_COUNTS);
BPF_HASH(exit_reasons, u32, u64, 256);

static __always_inline int ours(void)
{
	return (bpf_get_current_pid_tgid() >> 32) == FILTER_TGID;
}

static __always_inline void add(int idx, u64 v)
{
	u64 *c = counts.lookup(&idx);
	if (c)
		__sync_fetch_and_add(c, v);
}

// iommu_map(domain, iova, paddr, size, prot[, gfp])
int on_iommu_map(struct pt_regs *ctx)
{
	if (ours()) {
		add(MAP_CALLS, 1);
		add(MAP_BYTES, PT_REGS_PARM4(ctx));
	}
	return 0;
}

// iommu_unmap(domain, iova, size) and iommu_unmap_fast(domain, iova, size, gather)
int on_iommu_unmap(struct pt_regs *ctx)
{
	if (ours()) {
		add(UNMAP_CALLS, 1);
		add(UNMAP_BYTES, PT_REGS_PARM3(ctx));
	}
	return 0;
}

TRACEPOINT_PROBE(kvm, kvm_exit)
{
	if (ours()) {
		u32 reason = args->exit_reason;
		add(KVM_EXITS, 1);
		exit_reasons.increment(reason);
	}
	return 0;
}
