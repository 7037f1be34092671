#!/usr/bin/env bash
# A real SLURM cluster on this machine, for tests and local runs (root, Debian/Ubuntu):
#
#   slurm/testing/cluster.sh up      # install if missing, write slurm.conf, start, wait idle
#   slurm/testing/cluster.sh run sbatch --wait slurm/tiny_cpu_metaapo.sbatch
#   slurm/testing/cluster.sh status  # sinfo + squeue
#   slurm/testing/cluster.sh down    # cancel jobs, stop exactly what `up` started
#
# Layout ("two-node"): the root network namespace is left as it is. Three network + UTS +
# mount namespaces of our own: <prefix>-ctl (host "slurmctl", slurmctld, the clients) and
# <prefix>-node1/-node2 (hosts "node1"/"node2", one slurmd each), joined by veth pairs on a
# bridge inside the ctl namespace; the subnet exists only there. Each namespace sees a
# private hosts file (bind-mounted over /etc/hosts inside its own mount namespace; the
# machine's file is untouched), so MASTER_ADDR=node1 resolves for the tasks. The file system
# is shared by all namespaces: the run directory is the "shared file system".
# Fallback ("one-node"): when namespaces cannot be made, one slurmd named after this host in
# the root namespace (2 tasks on 1 node). $STATE/mode says which one is up.
#
# munged runs with its own key and socket under $STATE; nothing under /etc is written.
# Every daemon's pid is recorded in $STATE; `down` stops those pids and the processes left in
# the namespaces it created (job steps), then deletes the namespaces.
#
# Environment: SLURM_TEST_DIR (state dir, default /tmp/metaapo-slurm), SLURM_TEST_PREFIX
# (namespace prefix, default mtapo), SLURM_TEST_SUBNET (default 10.231.16), SLURM_TEST_MODE
# (auto | two-node | one-node), SLURM_TEST_NODE_MEMORY_MB (default 8000), SLURM_TEST_CRED_EXPIRE
# (seconds a requeued job waits before it may start again; SLURM default 120, here 15).
set -euo pipefail

STATE=${SLURM_TEST_DIR:-/tmp/metaapo-slurm}
PREFIX=${SLURM_TEST_PREFIX:-mtapo}
SUBNET=${SLURM_TEST_SUBNET:-10.231.16}
MODE=${SLURM_TEST_MODE:-auto}
NODE_MEM=${SLURM_TEST_NODE_MEMORY_MB:-8000}
NODES=(node1 node2)
CTL_HOST=slurmctl
CTL_ADDR=$SUBNET.1
CONF=$STATE/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge)

trap 'echo "cluster.sh: failed at line $LINENO (logs: $STATE/log)" >&2' ERR
die() { echo "cluster.sh: $*" >&2; exit 1; }
log() { echo "cluster.sh: $*" >&2; }
node_addr() { echo "$SUBNET.$((10 + ${1#node}))"; }

install_packages() {
  local missing=()
  for bin in slurmctld slurmd sinfo munged; do command -v "$bin" >/dev/null || missing+=("$bin"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]} and not root: cannot install ${PACKAGES[*]}"
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install ${PACKAGES[*]}"
  log "installing ${PACKAGES[*]} (apt, --no-install-recommends)"
  # -dev packages of every plugin come in as "recommends": not needed to run daemons.
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Runs "$@" inside namespace $1 (network from `ip netns`, plus fresh UTS + mount namespaces)
# with host name $2 and the private hosts file. Daemons fork and keep those namespaces.
in_ns() {
  local ns=$1 host=$2; shift 2
  # nsenter, not `ip netns exec`: the latter remounts /sys, hiding /sys/fs/cgroup from slurmd
  nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private \
    sh -c 'hostname "$0" && mount --bind "$1" /etc/hosts && shift && exec "$@"' \
    "$host" "$STATE/hosts" env SLURM_CONF="$CONF" "$@"
}

make_namespaces() {
  ip netns add "$PREFIX-ctl" || return 1
  for n in "${NODES[@]}"; do ip netns add "$PREFIX-$n" || return 1; done
  ip -n "$PREFIX-ctl" link set lo up
  ip -n "$PREFIX-ctl" link add br0 type bridge
  ip -n "$PREFIX-ctl" addr add "$CTL_ADDR/24" dev br0
  ip -n "$PREFIX-ctl" link set br0 up
  for n in "${NODES[@]}"; do
    ip -n "$PREFIX-ctl" link add "v$n" type veth peer name eth0 netns "$PREFIX-$n"
    ip -n "$PREFIX-ctl" link set "v$n" master br0 up
    ip -n "$PREFIX-$n" link set lo up
    ip -n "$PREFIX-$n" addr add "$(node_addr "$n")/24" dev eth0
    ip -n "$PREFIX-$n" link set eth0 up
  done
  # the UTS + mount namespaces must work too (hostname, bind-mounted hosts file)
  in_ns "$PREFIX-ctl" "$CTL_HOST" true
}

delete_namespaces() {
  for ns in "$PREFIX-ctl" "${NODES[@]/#/$PREFIX-}"; do
    ip netns list 2>/dev/null | grep -qw "^$ns" && ip netns del "$ns"
  done
  return 0
}

write_conf() {
  local mode=$1
  {
    echo "# written by slurm/testing/cluster.sh ($mode)"
    echo "ClusterName=metaapo-test"
    if [ "$mode" = two-node ]; then
      echo "SlurmctldHost=$CTL_HOST($CTL_ADDR)"
    else
      echo "SlurmctldHost=$(hostname -s)"
    fi
    cat <<EOF
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=${SLURM_TEST_CRED_EXPIRE:-15}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmUser=root
ReturnToService=2
MpiDefault=none
JobRequeue=1
# a node whose slurmd stops answering is DOWN after this many seconds
SlurmdTimeout=30
# KillWait (SIGTERM -> SIGKILL, 30 s) and KillOnBadExit (0) keep SLURM's defaults: that a dead
# rank ends the step is slurm/launch.sh's `srun --kill-on-bad-exit=1`, as on a real cluster
EOF
    if [ "$mode" = two-node ]; then
      for n in "${NODES[@]}"; do
        echo "NodeName=$n NodeAddr=$(node_addr "$n") CPUs=2 RealMemory=$NODE_MEM State=UNKNOWN"
      done
      echo "PartitionName=cpu Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
    else
      echo "NodeName=$(hostname -s) CPUs=2 RealMemory=$NODE_MEM State=UNKNOWN"
      echo "PartitionName=cpu Nodes=$(hostname -s) Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
    fi
  } >"$CONF"
}

write_hosts() {
  {
    echo "127.0.0.1 localhost"
    echo "$CTL_ADDR $CTL_HOST"
    for n in "${NODES[@]}"; do echo "$(node_addr "$n") $n"; done
  } >"$STATE/hosts"
}

start_munge() {
  mkdir -p "$STATE/munge" && chmod 711 "$STATE/munge"  # clients need x to reach the socket
  [ -s "$STATE/munge/munge.key" ] || mungekey --create --keyfile="$STATE/munge/munge.key" 2>/dev/null \
    || dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$STATE/munge/munge.key"
  munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/log/munged.log" \
    --seed-file="$STATE/munge/munged.seed"
  munge -n -S "$STATE/munge/munge.socket" | unmunge -S "$STATE/munge/munge.socket" >/dev/null \
    || die "munge credential round trip failed (see $STATE/log/munged.log)"
}

wait_idle() {
  local want=$1 deadline=$((SECONDS + ${2:-60})) states
  while [ $SECONDS -lt $deadline ]; do
    states=$(client sinfo -h -N -o '%N %T' 2>/dev/null || true)
    if [ "$(grep -c ' idle$' <<<"$states")" -eq "$want" ]; then
      log "up: $(tr '\n' ' ' <<<"$states")"
      return 0
    fi
    sleep 1
  done
  die "nodes not idle after ${2:-60} s: ${states:-no answer from slurmctld} (logs: $STATE/log)"
}

# Runs a client command where slurmctld is reachable (the ctl namespace in two-node mode).
client() {
  if [ "$(cat "$STATE/mode" 2>/dev/null)" = two-node ]; then
    in_ns "$PREFIX-ctl" "$CTL_HOST" "$@"
  else
    SLURM_CONF="$CONF" "$@"
  fi
}

up() {
  [ "$(id -u)" -eq 0 ] || die "needs root (it starts munged, slurmctld and slurmd)"
  if alive "$STATE/slurmctld.pid"; then die "already up ($STATE); run '$0 down' first"; fi
  install_packages
  rm -rf "$STATE"; mkdir -p "$STATE"/{log,ctld,spool/node1,spool/node2,spool/"$(hostname -s)"}
  local mode=$MODE
  write_hosts
  if [ "$mode" != one-node ]; then
    if (make_namespaces) 2>"$STATE/log/namespaces.err"; then
      mode=two-node
    else
      [ "$mode" = two-node ] && die "cannot make namespaces: $(cat "$STATE/log/namespaces.err")"
      log "namespaces unavailable ($(tail -n1 "$STATE/log/namespaces.err")): one node, two tasks"
      delete_namespaces; mode=one-node
    fi
  fi
  echo "$mode" >"$STATE/mode"
  write_conf "$mode"
  start_munge
  if [ "$mode" = two-node ]; then
    in_ns "$PREFIX-ctl" "$CTL_HOST" slurmctld -c
    for n in "${NODES[@]}"; do in_ns "$PREFIX-$n" "$n" slurmd -N "$n"; done
    wait_idle 2
  else
    SLURM_CONF="$CONF" slurmctld -c
    SLURM_CONF="$CONF" slurmd
    wait_idle 1
  fi
  echo "$mode"
}

stop_pid_file() {
  local f=$1 pid i
  alive "$f" || return 0
  pid=$(cat "$f"); kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
}

down() {
  [ -d "$STATE" ] || { log "nothing to stop ($STATE absent)"; return 0; }
  if alive "$STATE/slurmctld.pid"; then
    client scancel --full --quiet --user=root 2>/dev/null || true
    for _ in $(seq 30); do [ -z "$(client squeue -h 2>/dev/null)" ] && break; sleep 1; done
  fi
  for f in "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid" "$STATE/munge/munged.pid"; do
    [ -e "$f" ] && stop_pid_file "$f"
  done
  # job steps left in our namespaces (slurmstepd and its tasks): they live nowhere else
  for ns in "$PREFIX-ctl" "${NODES[@]/#/$PREFIX-}"; do
    ip netns list 2>/dev/null | grep -qw "^$ns" || continue
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  done
  delete_namespaces
  log "down ($STATE kept for its logs)"
}

status() {
  echo "mode: $(cat "$STATE/mode" 2>/dev/null || echo down)"
  client sinfo -N
  client squeue
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  install) install_packages ;;
  run) shift; client "$@" ;;
  *) echo "usage: $0 up|down|status|install|run CMD..." >&2; exit 2 ;;
esac
