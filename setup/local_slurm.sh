#!/usr/bin/env bash
# Make this machine a SLURM cluster (partition `debug`), for the tests and for trying
# `python -m lingua.stool` on a workstation. Needs root. Idempotent: a second call with the same
# layout leaves a running cluster alone.
#   bash setup/local_slurm.sh              one node: this host, all its CPUs
#   bash setup/local_slurm.sh --nodes 2    two nodes n1, n2 on this host (one slurmd each, one CPU
#                                          each): multi-node jobs (nodes=2) run here as on a cluster
#   bash setup/local_slurm.sh stop         stop every slurmd, slurmctld and munged
# Installs Debian's slurm-wlm and munge if missing. Switching layouts restarts the daemons, and
# is refused while jobs are queued. No accounting daemon: `sacct` does not work; use squeue /
# scontrol. Node names n1..nN do not resolve in DNS: their address is NodeAddr in
# `scontrol show node` (lingua.distributed reads it there, as on a cluster).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)
NODES=1

any_daemon() { pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null; }
stop_daemons() {  # every slurmd and slurmctld, waiting until they are gone (their ports are then free)
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  for _ in $(seq 1 50); do any_daemon || break; sleep 0.1; done
}
stop_cluster() {
  stop_daemons
  pkill -x munged 2>/dev/null || true
  # A start right after must not mistake a munged still exiting for a running one.
  for _ in $(seq 1 50); do pgrep -x munged >/dev/null || break; sleep 0.1; done
  echo "local SLURM stopped"
}

while [ $# -gt 0 ]; do
  case "$1" in
    stop) stop_cluster; exit 0 ;;
    start) shift ;;
    --nodes) NODES="${2:-}"; shift 2 || { echo "--nodes needs a number" >&2; exit 2; } ;;
    --nodes=*) NODES="${1#--nodes=}"; shift ;;
    *) echo "setup/local_slurm.sh: unknown argument '$1' (use: [--nodes N] | stop)" >&2; exit 2 ;;
  esac
done
if ! [[ "$NODES" =~ ^[1-9][0-9]*$ ]]; then
  echo "setup/local_slurm.sh: --nodes must be a positive integer (got '$NODES')" >&2
  exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "setup/local_slurm.sh needs root (it installs packages and starts slurmctld/slurmd as root)" >&2
  exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  echo "installing slurm-wlm and munge (Debian packages)..."
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
fi

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge
chown -R munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge 2>/dev/null || true

if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
fi
if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged
fi

# Memory SLURM may hand out: what is available now, less a margin for the system, split over the nodes.
MEM_MB=$(awk -v n="$NODES" '/MemAvailable/ {printf "%d", $2 / 1024 * 0.9 / n}' /proc/meminfo)
if [ "$NODES" = 1 ]; then
  NAMES=("$HOST")
  LAYOUT="one node on $HOST"
  NODE_LINES="NodeName=$HOST CPUs=$(nproc) RealMemory=$MEM_MB State=UNKNOWN"
  SLURMD_FILES="SlurmdSpoolDir=/var/spool/slurmd
SlurmdPidFile=/run/slurmd.pid
SlurmdLogFile=/var/log/slurm/slurmd.log"
else
  NAMES=()
  NODE_LINES=""
  for i in $(seq 1 "$NODES"); do
    NAMES+=("n$i")
    # One slurmd per node, each on its own port; all of them reach this host at 127.0.0.1.
    NODE_LINES+="NodeName=n$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((6817 + i)) CPUs=1 RealMemory=$MEM_MB State=UNKNOWN"$'\n'
  done
  LAYOUT="$NODES nodes n1..n$NODES on $HOST"
  SLURMD_FILES="SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdLogFile=/var/log/slurm/slurmd-%n.log"
fi
NODE_LIST=$(IFS=,; echo "${NAMES[*]}")
NEW_CONF=$(cat <<EOF
# Written by setup/local_slurm.sh: $LAYOUT.
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=/var/spool/slurmctld
$SLURMD_FILES
SlurmctldPidFile=/run/slurmctld.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
ReturnToService=2
MinJobAge=30
$NODE_LINES
PartitionName=debug Nodes=$NODE_LIST Default=YES MaxTime=INFINITE State=UP
EOF
)

ours() { [ -f "$CONF" ] && grep -q "^# Written by setup/local_slurm.sh" "$CONF"; }
same_layout() { ours && [ "$(head -1 "$CONF")" = "# Written by setup/local_slurm.sh: $LAYOUT." ]; }
all_slurmd_up() {
  if [ "$NODES" = 1 ]; then pgrep -x slurmd >/dev/null; return; fi
  for n in "${NAMES[@]}"; do pgrep -f "slurmd -N $n\$" >/dev/null || return 1; done
}

if pgrep -x slurmctld >/dev/null && all_slurmd_up && same_layout; then
  echo "local SLURM already running: $LAYOUT"
else
  if any_daemon && ours && ! same_layout; then
    queued=$(squeue -h 2>/dev/null | wc -l || echo 0)
    if [ "$queued" -gt 0 ]; then
      echo "setup/local_slurm.sh: the running cluster ($(head -1 "$CONF" | sed 's/.*: //')) has $queued job(s) queued;" \
           "switching to $LAYOUT would lose them: wait or scancel them first" >&2
      exit 1
    fi
    echo "switching the local SLURM to $LAYOUT"
    stop_daemons
  fi
  if [ -f "$CONF" ] && ! ours; then
    cp "$CONF" "$CONF.before-local_slurm.$(date +%s)"  # never lose a config someone else wrote
  fi
  echo "$NEW_CONF" > "$CONF"
  pgrep -x slurmctld >/dev/null || slurmctld
  if [ "$NODES" = 1 ]; then
    pgrep -x slurmd >/dev/null || slurmd
  else
    for n in "${NAMES[@]}"; do
      mkdir -p "/var/spool/slurmd/$n"
      pgrep -f "slurmd -N $n\$" >/dev/null || slurmd -N "$n"
    done
  fi
fi

for _ in $(seq 1 60); do
  ready=0
  for n in "${NAMES[@]}"; do
    state=$(sinfo -h -n "$n" -o %t 2>/dev/null | head -1 || true)
    case "$state" in
      idle*|mix*|alloc*) ready=$((ready + 1)) ;;
      down*|drain*) scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true ;;
    esac
  done
  if [ "$ready" = "$NODES" ]; then
    echo "local SLURM ready: $LAYOUT, partition debug ($(sinfo -h -p debug -o '%D nodes, %t' | head -1))"
    exit 0
  fi
  sleep 1
done
echo "local SLURM did not become ready; see /var/log/slurm/slurmctld.log and slurmd*.log" >&2
exit 1
