#!/bin/sh
# One idempotent set-up for a Debian bookworm machine (as root): the Debian packages,
# both lab kernels with headers (bookworm 6.1, bookworm-backports 6.12), the Python
# environment (.venv, seeing Debian's python3-bpfcc) and pf_sched for every kernel.
# When everything is already there it only checks, in a few seconds.
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
venv="$repo/.venv"
say() { echo "setup: $*"; }
die() { echo "setup: error: $*" >&2; exit 1; }

DEBS="python3-bpfcc python3-venv qemu-system-x86 busybox-static make gcc kmod \
      iproute2 pciutils tmux bpftrace bpfcc-tools libelf-dev libc6-dev linux-libc-dev \
      prometheus"
BACKPORTS_SUITE=bookworm-backports
BACKPORTS_LIST=/etc/apt/sources.list.d/vftrace-backports.sources

missing_debs() {
  for p in $DEBS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || printf '%s ' "$p"
  done
}

# A lab kernel series counts as installed when an image and its headers are both there.
have_kernel() {  # $1: version prefix, e.g. 6.1. or 6.12.
  for img in /boot/vmlinuz-"$1"*; do
    [ -e "$img" ] || continue
    rel=${img#/boot/vmlinuz-}
    [ -f "/lib/modules/$rel/build/Makefile" ] && return 0
  done
  return 1
}

apt_ready=0
apt_update() {
  [ "$apt_ready" = 1 ] && return
  [ "$(id -u)" = 0 ] || die "missing system packages and not root: run 'sudo make setup'"
  if [ ! -e "$BACKPORTS_LIST" ] && ! grep -rqs "$BACKPORTS_SUITE" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    say "adding the $BACKPORTS_SUITE suite ($BACKPORTS_LIST)"
    cat >"$BACKPORTS_LIST" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: $BACKPORTS_SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  say "apt-get update"
  apt-get update -qq
  apt_ready=1
}

apt_install() {
  say "installing: $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# The versioned image a metapackage from one suite points at (image and headers metas
# exist once per suite, so both series are installed by their versioned names).
meta_target() {  # $1: linux-image-amd64 | linux-headers-amd64, $2: suite
  apt-cache show "$1/$2" 2>/dev/null | sed -n 's/^Depends: \([^ ,]*\).*/\1/p' | head -n 1
}

debs=$(missing_debs)
if [ -n "$debs" ]; then apt_update; apt_install $debs; fi

for series in "6.1.:bookworm" "6.12.:$BACKPORTS_SUITE"; do
  prefix=${series%%:*}; suite=${series#*:}
  have_kernel "$prefix" && continue
  apt_update
  img=$(meta_target linux-image-amd64 "$suite"); hdr=$(meta_target linux-headers-amd64 "$suite")
  if [ "$suite" = bookworm ]; then
    # bookworm-security carries newer 6.1 builds than bookworm itself: take apt's candidate.
    img=linux-image-amd64; hdr=linux-headers-amd64
  fi
  [ -n "$img" ] && [ -n "$hdr" ] || die "no linux-image/headers-amd64 in $suite"
  apt_install "$img" "$hdr"
  have_kernel "$prefix" || die "installed $img but no /boot/vmlinuz-${prefix}* with headers"
done

# Python: a venv that sees the system site packages, for Debian's BCC module.
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
stamp="$venv/.vftrace-installed"
want=$(cat "$repo/requirements.txt" "$repo/pyproject.toml" | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing Python packages (requirements.txt, vftrace in editable mode)"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$repo/requirements.txt"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e "$repo"
  echo "$want" >"$stamp"
fi
"$venv/bin/python" -c "import bcc" 2>/dev/null || \
  die "the venv cannot import bcc: is python3-bpfcc installed for /usr/bin/python3?"

sh "$repo/scripts/build-kmod.sh"
say "ready: $(ls -d "$repo"/build/kmod/* | xargs -n1 basename | tr '\n' ' ')"
