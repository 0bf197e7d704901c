"""The kernels the lab boots: a ``/boot/vmlinuz-*`` with its modules, chosen by series
(``6.1``, ``6.12``), release or image path."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import LabError

BOOT = Path("/boot")
MODULES = Path("/lib/modules")


@dataclass(frozen=True)
class LabKernel:
    release: str
    image: Path

    @property
    def headers(self) -> Path | None:
        build = MODULES / self.release / "build"
        return build if (build / "Makefile").is_file() else None


def version_key(release: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", release.split("-")[0].split("+")[0]))


def installed_kernels(boot: Path = BOOT, modules: Path = MODULES) -> list[LabKernel]:
    """Kernels the lab can boot: an image in /boot with its modules, oldest first."""
    found = []
    for image in boot.glob("vmlinuz-*"):
        release = image.name[len("vmlinuz-"):]
        if (modules / release).is_dir():
            found.append(LabKernel(release, image))
    return sorted(found, key=lambda k: (version_key(k.release), k.release))


def resolve_kernel(spec: str | None, kernels: list[LabKernel]) -> LabKernel:
    """``None`` (newest), a series (``6.1``, ``6.12``), a release string or an image path."""
    if spec and ("/" in spec or Path(spec).is_file()):
        image = Path(spec)
        if not image.is_file():
            raise LabError(f"kernel image {spec} does not exist")
        release = image.name.removeprefix("vmlinuz-")
        if not (MODULES / release).is_dir():
            raise LabError(f"{spec}: no modules at {MODULES / release} (the lab needs the "
                           f"image's modules; install its linux-image package)")
        return LabKernel(release, image.resolve())
    if not kernels:
        raise LabError("no lab kernel installed (no /boot/vmlinuz-* with /lib/modules): run `make setup`")
    if spec is None:
        return kernels[-1]
    exact = [k for k in kernels if k.release == spec]
    if exact:
        return exact[0]
    series = [k for k in kernels if re.fullmatch(r"\d+\.\d+", spec) and
              version_key(k.release)[:2] == version_key(spec)]
    if series:
        return series[-1]
    have = ", ".join(k.release for k in kernels)
    raise LabError(f"no installed kernel matches '{spec}' (installed: {have}); "
                   "give a series like 6.1, a release, or a path to a vmlinuz")
