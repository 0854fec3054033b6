#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for CI and local tests of launcher=slurm.
#
#   bash .ci/slurm.sh          install (once), start munged + slurmctld + slurmd n1/n2, wait idle
#   bash .ci/slurm.sh stop     stop the daemons this script started
#   bash .ci/slurm.sh status   print sinfo (exit 1 if the cluster does not answer)
#
# Run as root. Idempotent: a second run finds the daemons up and returns at once; a changed
# slurm.conf restarts them. Both "nodes" are 127.0.0.1 with their own slurmd port; each declares
# the machine's CPUs (oversubscribed on purpose) so a 2-node x 1-task job fits on 2 cores.
set -euo pipefail

STATE=/var/lib/plait-slurm              # pid files
LOGS=/var/log/slurm                     # slurmctld.log, slurmd-n1.log, slurmd-n2.log
CONF=/etc/slurm/slurm.conf              # the default path, so plain sinfo/srun/sbatch find it
MARK="# written by plait .ci/slurm.sh"
NODES=(n1 n2)
CTLD_PORT=${PLAIT_SLURMCTLD_PORT:-6817}
SLURMD_BASE_PORT=${PLAIT_SLURMD_BASE_PORT:-17001}   # n1 gets this port, n2 the next
READY_TIMEOUT_S=${PLAIT_SLURM_READY_TIMEOUT_S:-60}

log() { echo "[slurm.sh] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

dump_logs() {
  for f in "$LOGS"/slurmctld.log "$LOGS"/slurmd-*.log /var/log/munge/munged.log; do
    [[ -f $f ]] || continue
    echo "----- tail -n 30 $f" >&2
    tail -n 30 "$f" >&2
  done
}

# SIGTERM to every daemon named by these pid files at once (each takes ~2 s to save its state and
# exit), then SIGKILL whatever is still up after 10 s.
stop_pidfiles() {
  local f pids=()
  for f in "$@"; do
    if alive "$f"; then pids+=("$(cat "$f")"); kill "${pids[-1]}" 2>/dev/null || true; fi
  done
  local pid
  for _ in $(seq 100); do
    local up=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && up=1; done
    ((up)) || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid ignored SIGTERM; sending SIGKILL"
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  rm -f "$@"
}

stop_slurm() {
  local n files=("$STATE/slurmctld.pid")
  for n in "${NODES[@]}"; do files+=("$STATE/slurmd-$n.pid"); done
  stop_pidfiles "${files[@]}"
}

install_packages() {
  local missing=() p
  for p in slurmctld slurmd slurm-client munge; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # the package index may be missing on a fresh image; update only when the install needs it
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/plait-slurm-apt.log 2>&1 || {
    apt-get update -q >>/tmp/plait-slurm-apt.log 2>&1
    apt-get install -y -q --no-install-recommends "${missing[@]}" >>/tmp/plait-slurm-apt.log 2>&1 ||
      { tail -n 20 /tmp/plait-slurm-apt.log >&2; die "apt-get install ${missing[*]} failed"; }
  }
}

start_munge() {
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "writing /etc/munge/munge.key"
    install -d -m 0700 -o munge -g munge /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  install -d -m 0755 -o munge -g munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged --force ||
    { dump_logs; die "munged did not start"; }
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  dump_logs
  die "munged started but munge -n | unmunge fails"
}

short_hostname() { local h; h=$(uname -n); echo "${h%%.*}"; }

# slurm.conf text on stdout. CPUs: at least 2 per node; RealMemory: 90% of the machine per node.
render_conf() {
  local host cpus mem_mb port=$SLURMD_BASE_PORT n
  host=$(short_hostname)
  cpus=$(nproc); ((cpus < 2)) && cpus=2
  mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  cat <<EOF
$MARK; regenerated on every run, do not edit
ClusterName=plait
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmctldTimeout=10
SlurmdTimeout=30
MessageTimeout=20
InactiveLimit=0
KillWait=5
MinJobAge=300
# refuse at submission a job no partition can ever run, instead of leaving it pending
EnforcePartLimits=ALL
# nodes declare what this config says, never drained for "low" CPUs or memory on a small machine
SlurmdParameters=config_overrides
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
EOF
  for n in "${NODES[@]}"; do
    echo "NodeName=$n NodeAddr=127.0.0.1 NodeHostname=$host Port=$port CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
    port=$((port + 1))
  done
  echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP"
}

cluster_up() {
  local n
  alive "$STATE/slurmctld.pid" || return 1
  for n in "${NODES[@]}"; do alive "$STATE/slurmd-$n.pid" || return 1; done
  scontrol ping >/dev/null 2>&1
}

nodes_idle() {
  # every node answers and is usable (idle, or already running jobs)
  local states
  states=$(sinfo -h -N -o "%N %t" 2>/dev/null | sort -u) || return 1
  local n
  for n in "${NODES[@]}"; do
    grep -Eq "^$n (idle|mix|alloc)$" <<<"$states" || return 1
  done
}

start_slurm() {
  local n
  install -d -m 0755 "$STATE" "$LOGS" /var/spool/slurmctld
  if ! alive "$STATE/slurmctld.pid"; then
    # recover the saved state (-i: ignore what cannot be read): job ids keep counting up across
    # restarts, so a reused submitit folder never holds another job's files under the same id
    slurmctld -i || { dump_logs; die "slurmctld did not start"; }
  fi
  for n in "${NODES[@]}"; do
    install -d -m 0755 "/var/spool/slurmd/$n"
    alive "$STATE/slurmd-$n.pid" && continue
    slurmd -N "$n" || { dump_logs; die "slurmd -N $n did not start"; }
  done
}

wait_ready() {
  local deadline=$((SECONDS + READY_TIMEOUT_S))
  until nodes_idle; do
    if ((SECONDS >= deadline)); then
      sinfo -N -l >&2 || true
      scontrol show node >&2 || true
      dump_logs
      die "nodes ${NODES[*]} not idle after ${READY_TIMEOUT_S}s (logs above; 'bash $0 stop' then retry)"
    fi
    # a node left DOWN by an earlier run is told to come back
    if sinfo -h -N -o "%N %t" 2>/dev/null | grep -Eq " (down|drain|drng)"; then
      scontrol update NodeName="$(IFS=,; echo "${NODES[*]}")" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 0.2
  done
  # sinfo can show a recovered "idle" before a slurmd has registered: prove it with a real step
  local out
  if ! out=$(timeout 30 srun -N "${#NODES[@]}" -n "${#NODES[@]}" --time=1 hostname 2>&1); then
    echo "$out" >&2
    dump_logs
    die "nodes look idle but a ${#NODES[@]}-node srun failed (logs above)"
  fi
}

main() {
  [[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts daemons)"
  case "${1:-start}" in
    stop)
      stop_slurm
      stop_pidfiles /run/munge/munged.pid
      log "slurmctld, slurmd ${NODES[*]} and munged stopped"
      return 0 ;;
    status)
      scontrol ping && sinfo -N
      return ;;
    start) ;;
    *) die "usage: $0 [start|stop|status]" ;;
  esac

  local t0=$SECONDS
  install_packages
  start_munge

  if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; move it away to let it write its own"
  fi
  local conf
  conf=$(render_conf)
  if [[ ! -f $CONF ]] || [[ $conf != "$(cat "$CONF")" ]]; then
    if compgen -G "$STATE/*.pid" >/dev/null; then
      log "slurm.conf changed: restarting the daemons"
      stop_slurm
    fi
    install -d -m 0755 "$(dirname "$CONF")"
    printf '%s\n' "$conf" >"$CONF"
  fi

  if cluster_up && nodes_idle; then
    echo "slurm cluster ready (already running): partition debug, nodes ${NODES[*]}"
    return 0
  fi
  start_slurm
  wait_ready
  echo "slurm cluster ready in $((SECONDS - t0))s: partition debug, nodes ${NODES[*]} ($(sinfo -h -o '%D nodes, %C cpus A/I/O/T'))"
}

main "$@"
