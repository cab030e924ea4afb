#!/usr/bin/env bash
# Start (or stop) a one-node SLURM cluster on this machine for tests and demos (root needed).
#   scripts/local_slurm.sh start DIR   -> writes DIR/slurm.conf, starts munged/slurmctld/slurmd,
#                                         waits until the node is idle, prints `export SLURM_CONF=...`
#   scripts/local_slurm.sh stop DIR
set -euo pipefail
cmd=${1:?start|stop}
dir=$(realpath -m "${2:?state directory}")
conf="$dir/slurm.conf"
if [ "$cmd" = stop ]; then
  for f in "$dir"/slurmd.pid "$dir"/slurmctld.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  pkill -f "slurmd -N localhost -f $conf" 2>/dev/null || true
  pkill -f "slurmctld -i -f $conf" 2>/dev/null || true
  exit 0
fi
mkdir -p "$dir"/{spool,state,log}
cpus=$(( $(nproc) < 4 ? 4 : $(nproc) ))   # declare >= 4 CPUs so small multi-task tests can be placed
mem=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)
cat > "$conf" <<CONF
ClusterName=k2sys-local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmdSpoolDir=$dir/spool
StateSaveLocation=$dir/state
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=$(( 6817 + RANDOM % 500 ))
SlurmdPort=$(( 7400 + RANDOM % 500 ))
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
slurmctld -i -f "$conf"
slurmd -N localhost -f "$conf"
for _ in $(seq 1 60); do
  state=$(SLURM_CONF="$conf" sinfo -h -n localhost -o %t 2>/dev/null || true)
  [ "$state" = idle ] && { echo "export SLURM_CONF=$conf"; exit 0; }
  sleep 0.5
done
echo "local SLURM did not become idle; see $dir/log" >&2
exit 1
