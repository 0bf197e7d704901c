"""DMA mapping through a VFIO type1 container, as QEMU does for a passthrough device.

``VFIO_IOMMU_MAP_DMA`` / ``UNMAP_DMA`` reach ``iommu_map`` / ``iommu_unmap`` in the
kernel, so this is real background IOMMU traffic for the tracer to see and keep apart
from VF switches.
"""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
from pathlib import Path

VFIO_TYPE = ord(";")


def _io(nr: int) -> int:
    return (VFIO_TYPE << 8) | (100 + nr)


VFIO_GET_API_VERSION = _io(0)
VFIO_CHECK_EXTENSION = _io(1)
VFIO_SET_IOMMU = _io(2)
VFIO_GROUP_GET_STATUS = _io(3)
VFIO_GROUP_SET_CONTAINER = _io(4)
VFIO_IOMMU_MAP_DMA = _io(13)
VFIO_IOMMU_UNMAP_DMA = _io(14)
VFIO_TYPE1_IOMMU, VFIO_TYPE1v2_IOMMU = 1, 3
VFIO_GROUP_FLAGS_VIABLE = 1
VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE = 1, 2
DMA_MAP = struct.Struct("=IIQQQ")       # argsz, flags, vaddr, iova, size
DMA_UNMAP = struct.Struct("=IIQQ")      # argsz, flags, iova, size


class VfioError(OSError):
    pass


def iommu_group(bdf: str) -> int:
    link = Path("/sys/bus/pci/devices", bdf, "iommu_group")
    if not link.exists():
        raise VfioError(f"{bdf} has no IOMMU group (is the IOMMU on?)")
    return int(link.resolve().name)


class Container:
    """A type1 container holding one device's IOMMU group."""

    def __init__(self, bdf: str):
        self.container = os.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
        try:
            if fcntl.ioctl(self.container, VFIO_GET_API_VERSION) != 0:
                raise VfioError("unexpected VFIO API version")
            self.iommu_type = next((t for t in (VFIO_TYPE1v2_IOMMU, VFIO_TYPE1_IOMMU)
                                    if fcntl.ioctl(self.container, VFIO_CHECK_EXTENSION, t)), None)
            if self.iommu_type is None:
                raise VfioError("the VFIO container has no type1 IOMMU backend")
            self.group = os.open(f"/dev/vfio/{iommu_group(bdf)}", os.O_RDWR | os.O_CLOEXEC)
            status = bytearray(struct.pack("=II", 8, 0))
            fcntl.ioctl(self.group, VFIO_GROUP_GET_STATUS, status)
            if not struct.unpack("=II", status)[1] & VFIO_GROUP_FLAGS_VIABLE:
                raise VfioError(f"IOMMU group of {bdf} is not viable (all its devices must use vfio-pci)")
            fcntl.ioctl(self.group, VFIO_GROUP_SET_CONTAINER, struct.pack("=i", self.container))
            fcntl.ioctl(self.container, VFIO_SET_IOMMU, self.iommu_type)
        except BaseException:
            self.close()
            raise

    def map_dma(self, buf: mmap.mmap, iova: int) -> None:
        vaddr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE
        fcntl.ioctl(self.container, VFIO_IOMMU_MAP_DMA,
                    DMA_MAP.pack(DMA_MAP.size, flags, vaddr, iova, len(buf)))

    def unmap_dma(self, iova: int, size: int) -> int:
        arg = bytearray(DMA_UNMAP.pack(DMA_UNMAP.size, 0, iova, size))
        fcntl.ioctl(self.container, VFIO_IOMMU_UNMAP_DMA, arg)
        return DMA_UNMAP.unpack(arg)[3]          # the kernel writes back the size unmapped

    def close(self) -> None:
        for name in ("group", "container"):
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def map_unmap_cycles(container: Container, cycles: int, size: int = 1 << 20,
                     iova: int = 1 << 32) -> int:
    """Map and unmap one anonymous buffer ``cycles`` times; returns bytes unmapped."""
    buf = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.write(b"\0" * size)                        # fault the pages in before pinning
    total = 0
    try:
        for _ in range(cycles):
            container.map_dma(buf, iova)
            total += container.unmap_dma(iova, size)
    finally:
        buf.close()
    return total
