#!/bin/sh
# The lab's interactive shell (`make lab`): pf_sched switching on every PF, then bash.
repo=$(cd "$(dirname "$0")/.." && pwd)
export VFTRACE_LAB=1 PATH="$repo/.venv/bin:$PATH"
cd "$repo" || exit 1
vftrace pf-sched up || echo "(pf_sched could not start; see above)"
cat <<'MSG'

This is the vftrace lab (emulated: compare ratios, not absolute ns).
  vftrace record -o build/cap.csv -d 10      # 10 s of switches to a CSV capture
  vftrace pf-sched status                    # the module's own counters
  vftrace doctor                             # what this kernel offers
Exit the shell (Ctrl-D or `exit`) to stop the VM.
MSG
exec bash -i
