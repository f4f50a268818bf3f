#!/usr/bin/env bash
# Stop what benchmarks/slurm/start_slurm.sh started: slurmd, slurmctld, then munged (configuration and state stay).
#   benchmarks/slurm/stop_slurm.sh            # SLURM_KEEP_MUNGE=1 leaves munged running
set -uo pipefail
say() { echo "stop_slurm: $*"; }
stop_pidfile() {  # name pidfile
  if [ -f "$2" ] && kill -0 "$(cat "$2")" 2>/dev/null; then
    local pid; pid=$(cat "$2"); kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; say "$1 (pid $pid) killed"; else say "$1 (pid $pid) stopped"; fi
  else
    say "$1 not running"
  fi
}
stop_pidfile slurmd /run/slurmd.pid
stop_pidfile slurmctld /run/slurmctld.pid
if [ "${SLURM_KEEP_MUNGE:-0}" != 1 ]; then stop_pidfile munged /run/munge/munged.pid; fi
