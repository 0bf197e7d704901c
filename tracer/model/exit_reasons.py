"""Names of KVM exit reasons as the ``kvm:kvm_exit`` tracepoint reports them.

The number is the vendor's own code: the SVM exit code on AMD (``kvm_amd``), the basic
VMX exit reason on Intel (``kvm_intel``); the tables follow the kernel's
``arch/x86/include/uapi/asm/{svm,vmx}.h`` (kvm_stat uses the same ones).
"""
from __future__ import annotations

from pathlib import Path

SVM = {
    0x060: "INTR", 0x061: "NMI", 0x062: "SMI", 0x063: "INIT", 0x064: "VINTR",
    0x065: "CR0_SEL_WRITE", 0x06e: "RDTSC", 0x06f: "RDPMC", 0x070: "PUSHF", 0x071: "POPF",
    0x072: "CPUID", 0x073: "RSM", 0x074: "IRET", 0x075: "SWINT", 0x076: "INVD",
    0x077: "PAUSE", 0x078: "HLT", 0x079: "INVLPG", 0x07a: "INVLPGA", 0x07b: "IOIO",
    0x07c: "MSR", 0x07d: "TASK_SWITCH", 0x07e: "FERR_FREEZE", 0x07f: "SHUTDOWN",
    0x080: "VMRUN", 0x081: "VMMCALL", 0x082: "VMLOAD", 0x083: "VMSAVE", 0x084: "STGI",
    0x085: "CLGI", 0x086: "SKINIT", 0x087: "RDTSCP", 0x088: "ICEBP", 0x089: "WBINVD",
    0x08a: "MONITOR", 0x08b: "MWAIT", 0x08c: "MWAIT_COND", 0x08d: "XSETBV", 0x08e: "RDPRU",
    0x08f: "EFER_WRITE_TRAP", 0x0a2: "INVPCID", 0x0a5: "BUS_LOCK", 0x0a6: "IDLE_HLT",
    0x400: "NPF", 0x401: "AVIC_INCOMPLETE_IPI", 0x402: "AVIC_UNACCELERATED_ACCESS",
    0x403: "VMGEXIT",
}
SVM.update({i: f"READ_CR{i}" for i in range(16)})
SVM.update({0x10 + i: f"WRITE_CR{i}" for i in range(16)})
SVM.update({0x20 + i: f"READ_DR{i}" for i in range(16)})
SVM.update({0x30 + i: f"WRITE_DR{i}" for i in range(16)})
SVM.update({0x40 + i: f"EXCP_{i}" for i in range(32)})
SVM.update({0x90 + i: f"CR{i}_WRITE_TRAP" for i in range(16)})

VMX = {
    0: "EXCEPTION_NMI", 1: "EXTERNAL_INTERRUPT", 2: "TRIPLE_FAULT", 3: "INIT_SIGNAL",
    4: "SIPI_SIGNAL", 7: "INTERRUPT_WINDOW", 8: "NMI_WINDOW", 9: "TASK_SWITCH",
    10: "CPUID", 12: "HLT", 13: "INVD", 14: "INVLPG", 15: "RDPMC", 16: "RDTSC", 18: "VMCALL",
    19: "VMCLEAR", 20: "VMLAUNCH", 21: "VMPTRLD", 22: "VMPTRST", 23: "VMREAD",
    24: "VMRESUME", 25: "VMWRITE", 26: "VMOFF", 27: "VMON", 28: "CR_ACCESS", 29: "DR_ACCESS",
    30: "IO_INSTRUCTION", 31: "MSR_READ", 32: "MSR_WRITE", 33: "INVALID_STATE",
    34: "MSR_LOAD_FAIL", 36: "MWAIT_INSTRUCTION", 37: "MONITOR_TRAP_FLAG",
    39: "MONITOR_INSTRUCTION", 40: "PAUSE_INSTRUCTION", 41: "MCE_DURING_VMENTRY",
    43: "TPR_BELOW_THRESHOLD", 44: "APIC_ACCESS", 45: "EOI_INDUCED", 46: "GDTR_IDTR",
    47: "LDTR_TR", 48: "EPT_VIOLATION", 49: "EPT_MISCONFIG", 50: "INVEPT", 51: "RDTSCP",
    52: "PREEMPTION_TIMER", 53: "INVVPID", 54: "WBINVD", 55: "XSETBV", 56: "APIC_WRITE",
    57: "RDRAND", 58: "INVPCID", 59: "VMFUNC", 60: "ENCLS", 61: "RDSEED", 62: "PML_FULL",
    63: "XSAVES", 64: "XRSTORS", 67: "UMWAIT", 68: "TPAUSE", 74: "BUS_LOCK", 75: "NOTIFY",
}

TABLES = {"svm": SVM, "vmx": VMX}


def vendor(sys_module: Path = Path("/sys/module")) -> str | None:
    """"svm" when kvm_amd is loaded, "vmx" for kvm_intel, None when neither is."""
    if (sys_module / "kvm_amd").exists():
        return "svm"
    if (sys_module / "kvm_intel").exists():
        return "vmx"
    return None


def name(reason: int, vendor: str | None) -> str:
    """The reason's name, or its number when the vendor or the code is unknown."""
    found = TABLES.get(vendor or "", {}).get(reason)
    return found if found else f"{vendor or 'reason'}_{reason:#x}"
