#!/bin/sh
# Build kmod/ (pf_sched) for every kernel whose headers are installed, each into
# build/kmod/<release>/ so several lab kernels can coexist.  Kbuild builds external
# modules in their source directory, hence the copy.  Warnings (W=1) fail the build.
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
built=0
for kdir in /lib/modules/*/build; do
  [ -f "$kdir/Makefile" ] || continue
  rel=$(basename "$(dirname "$kdir")")
  out="$repo/build/kmod/$rel"
  mkdir -p "$out"
  # Copy only what changed so an unchanged tree rebuilds in well under a second.
  for f in "$repo"/kmod/Kbuild "$repo"/kmod/Makefile "$repo"/kmod/*.c "$repo"/kmod/*.h; do
    [ -e "$f" ] || continue
    cmp -s "$f" "$out/$(basename "$f")" || cp "$f" "$out/"
  done
  log="$out/build.log"
  if ! make -C "$out" KDIR="$kdir" W=1 >"$log" 2>&1; then
    cat "$log" >&2
    echo "build-kmod: pf_sched failed to build for $rel (log: $log)" >&2
    exit 1
  fi
  if grep -q 'warning:' "$log"; then
    grep 'warning:' "$log" >&2
    echo "build-kmod: pf_sched has warnings at W=1 for $rel" >&2
    exit 1
  fi
  built=$((built + 1))
done
[ "$built" -gt 0 ] || { echo "build-kmod: no kernel headers under /lib/modules/*/build" >&2; exit 1; }
