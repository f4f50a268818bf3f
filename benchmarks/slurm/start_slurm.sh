#!/usr/bin/env bash
# A real single-node SLURM on this machine: munged, slurmctld and slurmd for one node that is its own controller.
#
#   sudo benchmarks/slurm/start_slurm.sh      # install (once), configure, start; idempotent
#   sinfo; srun -n 4 hostname                  # check it
#   benchmarks/slurm/stop_slurm.sh             # stop the daemons (the configuration stays)
#
# Debian 12 (bookworm), run as root, network only to the package mirror. No systemd is needed: the daemons are
# started directly. Settings (environment):
#   SLURM_NODE_CPUS  CPUs the node advertises (default 4: 4 one-CPU tasks fit, oversubscribing a 2-core machine)
#   SLURM_INSTALL    1 (default): apt-get install slurm-wlm and munge if missing; 0: fail if missing
# What this file writes: /etc/slurm/slurm.conf, /etc/slurm/cgroup.conf, /var/spool/slurm{ctld,d}, /var/log/slurm.
set -euo pipefail

say() { echo "start_slurm: $*"; }
die() { echo "start_slurm: error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts system daemons)"

CPUS=${SLURM_NODE_CPUS:-4}
NODE=$(hostname -s)
CONF_DIR=/etc/slurm
# RealMemory: what the node has, in MiB, less 1 GiB for the system
MEM=$(awk '/MemTotal/ {print int($2 / 1024) - 1024}' /proc/meminfo)

# 1. packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
  [ "${SLURM_INSTALL:-1}" = 1 ] || die "slurm-wlm or munge is not installed and SLURM_INSTALL=0"
  say "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || die "apt-get update failed (no network to the package mirror?)"
  apt-get install -y -q slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
else
  say "slurm-wlm $(slurmctld -V | awk '{print $2}') and munge already installed"
fi

# 2. munge: a key (the package makes one; a cluster copies one key to every node) and the daemon
if [ ! -s /etc/munge/munge.key ]; then
  say "creating /etc/munge/munge.key"
  mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "munged already running"
else
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# 3. configuration for one node that is also the controller
mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
chown slurm:slurm /var/spool/slurmctld /var/log/slurm
NEW=$(mktemp)
cat >"$NEW" <<EOF
# written by benchmarks/slurm/start_slurm.sh: one node ($NODE) that is its own controller
ClusterName=jigsaw
SlurmctldHost=$NODE
SlurmUser=slurm
AuthType=auth/munge
# a requeued job may start again this many seconds after it was stopped (default 120)
AuthInfo=cred_expire=30
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# no cgroup plugins (they need a cgroup tree slurmd may manage, which a container seldom has): processes are
# tracked by parentage; a cluster uses proctrack/cgroup and task/cgroup,task/affinity
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# srun's default PMI: none, so the batch script asks for --mpi=pmi2 itself (a cluster often sets MpiDefault)
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# SIGTERM, then SIGKILL this many seconds later (when a job is cancelled, requeued or runs out of time)
KillWait=30
MinJobAge=300
# the node advertises $CPUS CPUs whatever the hardware has (config_overrides), so 4 one-CPU tasks fit on 2 cores
SlurmdParameters=config_overrides
NodeName=$NODE CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=60 State=UP OverSubscribe=NO
EOF
CHANGED=0
if ! cmp -s "$NEW" "$CONF_DIR/slurm.conf"; then
  say "writing $CONF_DIR/slurm.conf (node $NODE, CPUs=$CPUS, RealMemory=${MEM} MiB, partition debug)"
  install -m 644 "$NEW" "$CONF_DIR/slurm.conf"; CHANGED=1
else
  say "$CONF_DIR/slurm.conf unchanged"
fi
rm -f "$NEW"
if [ ! -f "$CONF_DIR/cgroup.conf" ]; then
  # a placeholder: the plugins in slurm.conf above use no cgroups (a cluster's constrains cores, memory, GPUs)
  printf '%s\n' "# written by benchmarks/slurm/start_slurm.sh: no cgroup plugins are configured in slurm.conf" \
    "ConstrainCores=no" "ConstrainRAMSpace=no" "ConstrainDevices=no" >"$CONF_DIR/cgroup.conf"
  say "writing $CONF_DIR/cgroup.conf"
fi

# 4. daemons (restarted when the configuration changed)
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_one() {
  if running "$1"; then kill "$(cat "$1")"; for _ in $(seq 50); do running "$1" || break; sleep 0.1; done; fi
}
if [ "$CHANGED" = 1 ]; then stop_one /run/slurmd.pid; stop_one /run/slurmctld.pid; fi
if running /run/slurmctld.pid; then say "slurmctld already running (pid $(cat /run/slurmctld.pid))"
else say "starting slurmctld"; slurmctld; fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping | grep -q UP || die "slurmctld does not answer (see /var/log/slurm/slurmctld.log)"
if running /run/slurmd.pid; then say "slurmd already running (pid $(cat /run/slurmd.pid))"
else say "starting slurmd"; slurmd; fi

# 5. wait for the node to be usable, resuming it if an earlier run left it down or drained
for i in $(seq 100); do
  state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1)
  case "$state" in
    idle*|mixed*|allocated*|completing*) break ;;
    down*|drain*) [ "$i" = 10 ] && scontrol update NodeName="$NODE" State=RESUME ;;
  esac
  sleep 0.2
done
case "$state" in idle*|mixed*|allocated*|completing*) ;; *) die "node $NODE is '$state' (see /var/log/slurm/slurmd.log and sinfo -R)" ;; esac
say "node $NODE is $state"
sinfo
say "srun -n 1 hostname: $(srun -n 1 -t 1 hostname)"
