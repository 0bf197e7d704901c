/* SPDX-License-Identifier: GPL-2.0 */
/*
 * pf_sched tracepoints.  The TP_PROTO arguments are plain scalars in a fixed order
 * so raw tracepoint / BTF programs can read them positionally:
 *   vf_switch_begin(pf, seq, from_vf, to_vf)
 *   vf_switch_end(pf, seq, from_vf, to_vf, revoke_ns, grant_ns, total_ns)
 *   vf_access_wait(pf, vf, wait_ns, seq)
 */
#undef TRACE_SYSTEM
#define TRACE_SYSTEM pf_sched

#if !defined(_PF_SCHED_TRACE_H) || defined(TRACE_HEADER_MULTI_READ)
#define _PF_SCHED_TRACE_H

#include <linux/tracepoint.h>
#include <linux/types.h>

TRACE_EVENT(vf_switch_begin,
	TP_PROTO(u32 pf, u64 seq, s32 from_vf, s32 to_vf),
	TP_ARGS(pf, seq, from_vf, to_vf),
	TP_STRUCT__entry(
		__field(u32, pf)
		__field(u64, seq)
		__field(s32, from_vf)
		__field(s32, to_vf)
	),
	TP_fast_assign(
		__entry->pf = pf;
		__entry->seq = seq;
		__entry->from_vf = from_vf;
		__entry->to_vf = to_vf;
	),
	TP_printk("pf=%u seq=%llu from=%d to=%d",
		  __entry->pf, __entry->seq, __entry->from_vf, __entry->to_vf)
);

TRACE_EVENT(vf_switch_end,
	TP_PROTO(u32 pf, u64 seq, s32 from_vf, s32 to_vf,
		 u64 revoke_ns, u64 grant_ns, u64 total_ns),
	TP_ARGS(pf, seq, from_vf, to_vf, revoke_ns, grant_ns, total_ns),
	TP_STRUCT__entry(
		__field(u32, pf)
		__field(u64, seq)
		__field(s32, from_vf)
		__field(s32, to_vf)
		__field(u64, revoke_ns)
		__field(u64, grant_ns)
		__field(u64, total_ns)
	),
	TP_fast_assign(
		__entry->pf = pf;
		__entry->seq = seq;
		__entry->from_vf = from_vf;
		__entry->to_vf = to_vf;
		__entry->revoke_ns = revoke_ns;
		__entry->grant_ns = grant_ns;
		__entry->total_ns = total_ns;
	),
	TP_printk("pf=%u seq=%llu from=%d to=%d revoke_ns=%llu grant_ns=%llu total_ns=%llu",
		  __entry->pf, __entry->seq, __entry->from_vf, __entry->to_vf,
		  __entry->revoke_ns, __entry->grant_ns, __entry->total_ns)
);

TRACE_EVENT(vf_access_wait,
	TP_PROTO(u32 pf, s32 vf, u64 wait_ns, u64 seq),
	TP_ARGS(pf, vf, wait_ns, seq),
	TP_STRUCT__entry(
		__field(u32, pf)
		__field(s32, vf)
		__field(u64, wait_ns)
		__field(u64, seq)
	),
	TP_fast_assign(
		__entry->pf = pf;
		__entry->vf = vf;
		__entry->wait_ns = wait_ns;
		__entry->seq = seq;
	),
	TP_printk("pf=%u vf=%d wait_ns=%llu seq=%llu",
		  __entry->pf, __entry->vf, __entry->wait_ns, __entry->seq)
);

#endif /* _PF_SCHED_TRACE_H */

/* This part must be outside the multi-read protection. */
#undef TRACE_INCLUDE_PATH
#define TRACE_INCLUDE_PATH .
#undef TRACE_INCLUDE_FILE
#define TRACE_INCLUDE_FILE pf_sched_trace
#include <trace/define_trace.h>
