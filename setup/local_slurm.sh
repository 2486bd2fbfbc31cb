#!/usr/bin/env bash
# Make this machine a one-node SLURM cluster (partition `debug`), for the tests and for trying
# `python -m lingua.stool` on a workstation. Needs root. Idempotent: a second call leaves a
# running cluster alone.
#   bash setup/local_slurm.sh          install (Debian slurm-wlm + munge) if missing, configure, start
#   bash setup/local_slurm.sh stop     stop slurmd, slurmctld and munged
# No accounting daemon: `sacct` does not work here; use squeue / scontrol.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)

stop_cluster() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  pkill -x munged 2>/dev/null || true
  echo "local SLURM stopped"
}

if [ "${1:-start}" = "stop" ]; then
  stop_cluster
  exit 0
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

# Memory SLURM may hand out: what is available now, less a margin for the system.
MEM_MB=$(awk '/MemAvailable/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
NEW_CONF=$(cat <<EOF
# Written by setup/local_slurm.sh: a one-node cluster on $HOST.
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
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
MinJobAge=30
NodeName=$HOST CPUs=$(nproc) RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)

running() { pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null; }
if running && [ -f "$CONF" ] && grep -q "^# Written by setup/local_slurm.sh" "$CONF"; then
  echo "local SLURM already running on $HOST"
else
  if [ -f "$CONF" ] && ! grep -q "^# Written by setup/local_slurm.sh" "$CONF"; then
    cp "$CONF" "$CONF.before-local_slurm.$(date +%s)"  # never lose a config someone else wrote
  fi
  echo "$NEW_CONF" > "$CONF"
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
fi

for _ in $(seq 1 60); do
  state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null | head -1 || true)
  case "$state" in
    idle*|mix*|alloc*) echo "local SLURM ready: node $HOST is $state (partition debug)"; exit 0 ;;
    down*|drain*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 1
done
echo "local SLURM did not become ready; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
exit 1
