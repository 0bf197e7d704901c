// SPDX-License-Identifier: GPL-2.0
/* Instantiates the pf_sched tracepoints (exactly one file defines them). */
#define CREATE_TRACE_POINTS
#include "pf_sched_trace.h"
