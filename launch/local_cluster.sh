#!/usr/bin/env bash
# A real 2-node SLURM cluster on this one machine, to rehearse a submission before spending cluster time (and for
# tests/test_launch.py): munge, slurmctld and two slurmd daemons named node1 and node2 on their own ports, with
# NodeAddr=127.0.0.1 so the node names need no DNS entry, and a slurm.conf of its own in the cluster directory.
#
#   launch/local_cluster.sh start    # prints the `export SLURM_CONF=...` line to use (eval "$(... start)")
#   launch/local_cluster.sh status   # sinfo + squeue
#   launch/local_cluster.sh stop     # cancels its jobs and stops its daemons
#
# Environment: SKIPTRON_CLUSTER_DIR (default /tmp/skiptron-slurm), SKIPTRON_CLUSTER_PORT (slurmctld's port, the
# nodes use the next two; default 17000), SKIPTRON_CLUSTER_CPUS (CPUs per node, default: this machine's).
# Needs root (slurmd starts jobs as their users). On Debian/Ubuntu it installs slurm-wlm and munge when missing.
# Exit status 3: the cluster cannot run here (not root, or no SLURM and no apt-get), with the reason on stderr.
set -euo pipefail
# Job credentials live CRED_EXPIRE seconds, and a requeued job waits that long before it starts again (slurmd
# refuses a job whose credential it revoked until the revocation expires; SLURM's default is 120 s).
CRED_EXPIRE="${SKIPTRON_CLUSTER_CRED_EXPIRE:-20}"
DIR="${SKIPTRON_CLUSTER_DIR:-/tmp/skiptron-slurm}"
CONF="$DIR/slurm.conf"
PORT="${SKIPTRON_CLUSTER_PORT:-17000}"
CPUS="${SKIPTRON_CLUSTER_CPUS:-$(nproc)}"
NODES=(node1 node2)
log() { echo "local_cluster: $*" >&2; }
unavailable() { log "unavailable: $*"; exit 3; }

install_if_missing() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
  [ "$(id -u)" = 0 ] || unavailable "slurmctld/munged are not installed and we are not root to install them"
  command -v apt-get >/dev/null || unavailable "slurmctld/munged are not installed and there is no apt-get"
  log "installing slurm-wlm and munge with apt-get"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) >&2
}

# A munged of its own (own key, socket and pid file in $DIR), so clusters of concurrent test runs never share or
# stop each other's daemon, and the machine's munge setup is left alone.
MUNGE_SOCKET="$DIR/munge.socket"
munge_works() { munge -S "$MUNGE_SOCKET" -n </dev/null 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }

start_munge() {
  [ -f "$DIR/munge.key" ] || mungekey --create --keyfile="$DIR/munge.key" >&2
  chmod 400 "$DIR/munge.key"
  /usr/sbin/munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge.key" --pid-file="$DIR/munged.pid" \
    --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed"
  for _ in $(seq 50); do munge_works && return 0; sleep 0.1; done
  unavailable "munged started but munge/unmunge do not work (see $DIR/munged.log)"
}

write_conf() {
  local host
  host="$(hostname)"
  mkdir -p "$DIR/state" "$DIR/spool"
  cat >"$CONF" <<EOF
# Written by launch/local_cluster.sh: two nodes on one machine, for rehearsals and tests.
ClusterName=skiptron-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SlurmUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmdLogFile=$DIR/slurmd-%n.log
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmctldLogFile=$DIR/slurmctld.log
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=10
NodeName=${NODES[0]} NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 1)) CPUs=$CPUS RealMemory=4000
NodeName=${NODES[1]} NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 2)) CPUs=$CPUS RealMemory=4000
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  [ "$(id -u)" = 0 ] || unavailable "needs root (slurmd launches jobs as their users)"
  install_if_missing
  mkdir -p "$DIR" && chmod 700 "$DIR"
  if alive "$DIR/slurmctld.pid"; then
    log "already running ($CONF)"
  else
    start_munge
    write_conf
    slurmctld -c -f "$CONF"  # -c: a fresh cluster, no jobs left from an earlier start
    for node in "${NODES[@]}"; do slurmd -f "$CONF" -N "$node"; done
    for _ in $(seq 100); do
      [ "$(SLURM_CONF="$CONF" sinfo -h -N -o %T 2>/dev/null | grep -c '^idle')" = "${#NODES[@]}" ] && break
      sleep 0.3
    done
    if [ "$(SLURM_CONF="$CONF" sinfo -h -N -o %T 2>/dev/null | grep -c '^idle')" != "${#NODES[@]}" ]; then
      log "not every node came up (a port of $PORT-$((PORT + 2)) taken?); see $DIR/*.log"
      stop >/dev/null
      exit 1
    fi
    log "${#NODES[@]} nodes idle ($CONF)"
  fi
  echo "export SLURM_CONF=$CONF"
}

stop() {
  if alive "$DIR/slurmctld.pid"; then
    SLURM_CONF="$CONF" scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(SLURM_CONF="$CONF" squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  local pidfile
  for pidfile in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid" "$DIR/munged.pid"; do
    if alive "$pidfile"; then
      kill "$(cat "$pidfile")"
      for _ in $(seq 50); do alive "$pidfile" || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
  done
  log "stopped ($DIR)"
}

status() {
  alive "$DIR/slurmctld.pid" || { log "not running ($DIR)"; exit 1; }
  SLURM_CONF="$CONF" sinfo
  SLURM_CONF="$CONF" squeue
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
