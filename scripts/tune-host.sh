#!/usr/bin/env bash
# Checks, applies or reverts the kernel settings of tuning/sysctl.d/90-switchboard.conf.
#   tune-host.sh --check    print each knob (current, wanted, ok?); exit 1 when one falls short
#   tune-host.sh --apply    save the current values (once) and raise what falls short
#   tune-host.sh --revert   restore the saved values
# Idempotent. SYSCTL_ROOT (default /proc/sys) and TUNE_STATE (where old values are kept) exist
# for tests and for running against another root.
set -euo pipefail
root=${SYSCTL_ROOT:-/proc/sys}
state=${TUNE_STATE:-/var/lib/switchboard/tune-host.saved}

# knob | wanted | how to compare (ge: every field >=; range: hi-lo >=; mid-le: 2nd field <=)
KNOBS="
fs.nr_open|4194304|ge
fs.file-max|4194304|ge
net.core.somaxconn|65535|ge
net.ipv4.tcp_max_syn_backlog|65535|ge
net.core.netdev_max_backlog|65536|ge
net.ipv4.ip_local_port_range|1024 65535|range
net.ipv4.tcp_mem|1572864 2097152 3145728|ge
net.ipv4.tcp_rmem|4096 16384 16777216|mid-le
net.ipv4.tcp_wmem|4096 16384 16777216|mid-le
net.netfilter.nf_conntrack_max|2097152|ge
"

path_of() { echo "$root/${1//.//}"; }
read_knob() { tr -s ' \t' '  ' <"$(path_of "$1")" | sed 's/ *$//'; }

ok_value() { # current wanted mode
  python3 - "$1" "$2" "$3" <<'PY'
import sys
cur = [int(x) for x in sys.argv[1].split()]
want = [int(x) for x in sys.argv[2].split()]
mode = sys.argv[3]
if mode == "ge":
    ok = len(cur) == len(want) and all(c >= w for c, w in zip(cur, want))
elif mode == "range":
    ok = cur[1] - cur[0] >= want[1] - want[0]
elif mode == "mid-le":
    ok = cur[1] <= want[1]
else:
    ok = False
sys.exit(0 if ok else 1)
PY
}

check() {
  local short=0
  printf '%-34s %-28s %-28s %s\n' knob current wanted ok
  while IFS='|' read -r knob want mode; do
    [ -z "$knob" ] && continue
    if [ ! -e "$(path_of "$knob")" ]; then
      printf '%-34s %-28s %-28s %s\n' "$knob" "(absent)" "$want" "ok (not active here)"
      continue
    fi
    cur=$(read_knob "$knob")
    if ok_value "$cur" "$want" "$mode"; then v=ok; else v=SHORT; short=1; fi
    printf '%-34s %-28s %-28s %s\n' "$knob" "$cur" "$want" "$v"
  done <<<"$KNOBS"
  return $short
}

apply() {
  mkdir -p "$(dirname "$state")"
  if [ ! -e "$state" ]; then
    : >"$state.tmp"
    while IFS='|' read -r knob want mode; do
      [ -z "$knob" ] && continue
      [ -e "$(path_of "$knob")" ] && echo "$knob|$(read_knob "$knob")" >>"$state.tmp"
    done <<<"$KNOBS"
    mv "$state.tmp" "$state"
  fi
  while IFS='|' read -r knob want mode; do
    [ -z "$knob" ] && continue
    p=$(path_of "$knob")
    [ -e "$p" ] || continue
    cur=$(read_knob "$knob")
    if ! ok_value "$cur" "$want" "$mode"; then
      if echo "$want" >"$p" 2>/dev/null; then
        echo "set $knob = $want (was $cur)"
      else
        echo "cannot set $knob (need root?)" >&2
        return 1
      fi
    fi
  done <<<"$KNOBS"
}

revert() {
  if [ ! -e "$state" ]; then
    echo "nothing to revert ($state not found)"
    return 0
  fi
  while IFS='|' read -r knob old; do
    [ -z "$knob" ] && continue
    p=$(path_of "$knob")
    if [ -e "$p" ] && [ "$(read_knob "$knob")" != "$old" ]; then
      echo "$old" >"$p" && echo "restored $knob = $old"
    fi
  done <"$state"
  rm -f "$state"
}

case "${1:-}" in
  --check) check ;;
  --apply) apply && check ;;
  --revert) revert ;;
  *) echo "usage: $0 --check | --apply | --revert" >&2; exit 2 ;;
esac
