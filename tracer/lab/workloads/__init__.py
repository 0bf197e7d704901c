"""Real workloads for the lab: KVM guests and VFIO DMA mapping driven from Python."""
