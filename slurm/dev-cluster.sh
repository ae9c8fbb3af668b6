#!/usr/bin/env bash
# slurm/dev-cluster.sh - a real, single-host Slurm test cluster for tests and CI.
#
# Usage:
#   slurm/dev-cluster.sh up       install (apt) + start, idempotent; exit 0 once jobs run
#   slurm/dev-cluster.sh down     cancel all jobs, stop every daemon, idempotent
#   slurm/dev-cluster.sh status   print sinfo/squeue; exit 0 if healthy, 1 if not
#   slurm/dev-cluster.sh env      print `export SLURM_CONF=...` (for eval)
#
# Environment (all optional):
#   SLURM_DEV_DIR            state dir (default /tmp/orchestrator-slurm): slurm.conf,
#                            pidfiles, logs (log/), spool dirs, controller state
#   SLURM_DEV_NODES          number of slurmd instances/nodes: 2 (default) or 1
#   SLURM_DEV_CPUS_PER_NODE  CPUs declared per node (default: max(nproc, 4))
#   SLURM_DEV_CTLD_PORT      slurmctld port (default 16817)
#   SLURM_DEV_SLURMD_PORT    port of node1; nodeN uses +N-1 (default 16818, 16819)
#   SLURM_DEV_CRED_EXPIRE    AuthInfo cred_expire seconds (default 5, Slurm minimum)
#
# How client commands find the config:
#   `up` writes $SLURM_DEV_DIR/slurm.conf and an identical copy to
#   /etc/slurm/slurm.conf, the path Debian's sbatch/srun/squeue/scontrol read by
#   default, so client commands work from any shell (and from subprocesses of the
#   test suite) without any environment variable. The daemons are started with
#   `-f $SLURM_DEV_DIR/slurm.conf`. If /etc/slurm/slurm.conf exists and was NOT
#   written by this script it is left alone; then use `eval "$(slurm/dev-cluster.sh env)"`
#   (export SLURM_CONF=$SLURM_DEV_DIR/slurm.conf), which always works as well.
#
# Design for an unprivileged container (no systemd, no cgroups):
#   * munged: a private instance (socket, pidfile, log under $SLURM_DEV_DIR/munge,
#     key /etc/munge/munge.key, created if missing) referenced by
#     AuthInfo=socket=... in slurm.conf, so a system munged is never touched.
#   * ProctrackType=proctrack/linuxproc, TaskPlugin=task/none,
#     JobAcctGatherType=jobacct_gather/none, no slurmdbd, no cgroup.conf.
#   * select/cons_tres with CR_CPU_Memory. RealMemory = memory detected on the host.
#     Memory is bookkeeping only (nothing enforces it without cgroups).
#   * TWO nodes (node1, node2) on this one host: two slurmd processes started as
#     `slurmd -N nodeX`, each with its own Port, spool dir, pidfile and log (%n).
#     This works reliably with Debian bookworm's Slurm 22.05 build (verified:
#     `sbatch -N 2 --wrap 'srun hostname'`, `srun -N1 -n1 -w node2 ...`).
#     Both nodes report the same hostname, so use $SLURMD_NODENAME to tell them
#     apart in jobs. Each node declares CPUs=max(nproc,4) and the full RealMemory,
#     i.e. the cluster advertises more CPUs/memory than the host has
#     (SlurmdParameters=config_overrides keeps slurmd from draining the nodes).
#     This is deliberate oversubscription for a test cluster. Use
#     SLURM_DEV_NODES=1 for a single node.
#   * JobRequeue=1, MinJobAge=3600 (finished jobs stay visible to
#     `scontrol show job`), KillWait=5, sched_interval/bf_interval=1s.
#   * AuthInfo cred_expire=5: Slurm holds a requeued job with
#     BeginTime = requeue time + cred_expire + 1s; the default (120) would delay
#     every requeue by two minutes; 5 is the minimum slurmctld accepts.
#   * Jobs run as the submitting user; daemons run as root (SlurmUser=root).
#   * `up` on a stale or misconfigured cluster runs `down` first and starts a
#     fresh one (controller state, i.e. old job records, is wiped).
#   * `down` kills by pidfile (SIGTERM, then SIGKILL), then SIGKILLs any remaining
#     process named exactly slurmctld/slurmd/slurmstepd (also *-wlm) on the host,
#     our private munged, and leftover job processes (processes whose environment
#     has SLURM_CLUSTER_NAME of this cluster).
set -euo pipefail

STATE_DIR=${SLURM_DEV_DIR:-/tmp/orchestrator-slurm}
NNODES=${SLURM_DEV_NODES:-2}
CTLD_PORT=${SLURM_DEV_CTLD_PORT:-16817}
SLURMD_PORT=${SLURM_DEV_SLURMD_PORT:-16818}
CRED_EXPIRE=${SLURM_DEV_CRED_EXPIRE:-5}
CLUSTER=orchdev
PARTITION=debug
ETC_CONF=/etc/slurm/slurm.conf
CONF=$STATE_DIR/slurm.conf
MUNGE_DIR=$STATE_DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
MUNGE_PID=$MUNGE_DIR/munged.pid
MUNGE_KEY=/etc/munge/munge.key
RUN_DIR=$STATE_DIR/run
LOG_DIR=$STATE_DIR/log
SLURM_PROCS=(slurmctld slurmscriptd slurmd slurmstepd slurmctld-wlm slurmd-wlm)
MARKER="# managed-by: orchestrator slurm/dev-cluster.sh"

TMP_FILES=()
trap 'rm -f "${TMP_FILES[@]}"' EXIT
if [[ $(id -u) -eq 0 ]]; then SUDO=(); else SUDO=(sudo); fi
# Client commands run by this script always use our config, whatever /etc says.
export SLURM_CONF=$CONF

log() { printf '[dev-cluster] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
as_root() { "${SUDO[@]}" "$@"; }
# Start a daemon with a clean environment and stdio detached from the caller (so
# e.g. subprocess.run(..., capture_output=True) on this script never hangs).
# fd 9 (the lock) is closed so that daemons do not keep holding it.
daemon() {
  # shellcheck disable=SC2016
  as_root sh -c 'log=$1; shift; exec "$@" </dev/null >>"$log" 2>&1' sh \
    "$LOG_DIR/daemon-start.log" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LANG=C.UTF-8 "$@" 9>&-
}

node_names() { local i; for ((i = 1; i <= NNODES; i++)); do echo "node$i"; done; }

# ----------------------------------------------------------------- install
install_packages() {
  local missing=() cmd pkg
  for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
    cmd=${pair%%:*}; pkg=${pair##*:}
    command -v "$cmd" >/dev/null 2>&1 || [[ -x /usr/sbin/$cmd ]] || missing+=("$pkg")
  done
  ((${#missing[@]} == 0)) && return 0
  log "installing: ${missing[*]}"
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}")
  # apt-get update only if the package lists do not know the packages (or install fails).
  if ! apt-cache policy "${missing[@]}" 2>/dev/null | grep -q 'Candidate: [0-9]' \
    || ! as_root "${apt[@]}"; then
    as_root apt-get update
    as_root "${apt[@]}"
  fi
}

# ------------------------------------------------------------ process utils
proc_alive() { # pid expected-comm-prefix
  local comm
  [[ $1 =~ ^[0-9]+$ ]] || return 1
  comm=$(cat "/proc/$1/comm" 2>/dev/null) || return 1
  [[ $comm == "$2"* ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

pid_alive() { # pidfile expected-comm-prefix
  local pid
  [[ -r $1 ]] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  proc_alive "$pid" "$2"
}

stop_pidfile() { # pidfile comm-prefix: TERM, wait up to 10 s, then KILL
  local pidfile=$1 name=$2 pid i
  pid=$(cat "$pidfile" 2>/dev/null) || pid=
  if proc_alive "$pid" "$name"; then
    # Watch the process, not the pidfile: daemons remove it before they exit.
    as_root kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      proc_alive "$pid" "$name" || break
      sleep 0.2
    done
    if proc_alive "$pid" "$name"; then as_root kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  as_root rm -f "$pidfile"
}

# PIDs of live (non-zombie) processes whose comm is exactly one of the given
# names, and whose command line contains $FILTER (if set).
pids_by_name() {
  local p comm
  for p in /proc/[0-9]*; do
    read -r comm 2>/dev/null <"$p/comm" || continue
    for n in "$@"; do
      if [[ $comm == "$n" ]]; then
        # zombies are dead already (this container's PID 1 may never reap them)
        grep -q '^State:[[:space:]]*Z' "$p/status" 2>/dev/null && continue
        if [[ -n ${FILTER:-} ]]; then
          tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF -- "$FILTER" || continue
        fi
        echo "${p#/proc/}"
      fi
    done
  done
}

# PIDs of leftover job processes of this cluster (not us or our ancestors).
job_pids() {
  local f pid self_chain=" " q=$$
  while [[ $q =~ ^[0-9]+$ && $q -gt 1 ]]; do
    self_chain+="$q "
    q=$(awk '/^PPid:/{print $2}' "/proc/$q/status" 2>/dev/null) || break
  done
  as_root grep -lsxzF "SLURM_CLUSTER_NAME=$CLUSTER" /proc/[0-9]*/environ 2>/dev/null \
    | while read -r f; do
      pid=${f#/proc/}; pid=${pid%/environ}
      [[ $self_chain == *" $pid "* ]] || echo "$pid"
    done
  return 0
}

# ------------------------------------------------------------------ config
detect_mem_mb() {
  local m
  m=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
  [[ -n $m ]] || m=$(awk '/^MemTotal:/{print int($2/1024)}' /proc/meminfo)
  echo "$m"
}

gen_conf() {
  local host cpus mem defmem i
  host=$(hostname -s)
  cpus=${SLURM_DEV_CPUS_PER_NODE:-$(nproc)}
  [[ -n ${SLURM_DEV_CPUS_PER_NODE:-} ]] || ((cpus >= 4)) || cpus=4
  mem=$(detect_mem_mb)
  defmem=$((mem / cpus))
  cat <<EOF
$MARKER
# state dir: $STATE_DIR (regenerated by every 'up'; do not edit)
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
TmpFS=/tmp
# no cgroups in an unprivileged container
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SwitchType=switch/none
MpiDefault=none
# scheduling
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=5
InactiveLimit=0
Waittime=0
SlurmdTimeout=60
MessageTimeout=10
EOF
  for ((i = 1; i <= NNODES; i++)); do
    echo "NodeName=node$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + i - 1))" \
      "CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1" \
      "RealMemory=$mem State=UNKNOWN"
  done
  echo "PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=$defmem"
}

etc_conf_is_ours() { [[ ! -e $ETC_CONF ]] || head -1 "$ETC_CONF" 2>/dev/null | grep -qxF "$MARKER"; }

# ------------------------------------------------------------------ health
healthy() { # quiet; 0 if daemons alive, config current, all nodes usable
  local n states
  pid_alive "$MUNGE_PID" munged || return 1
  pid_alive "$RUN_DIR/slurmctld.pid" slurmctld || return 1
  for n in $(node_names); do pid_alive "$RUN_DIR/slurmd-$n.pid" slurmd || return 1; done
  [[ -r $CONF ]] || return 1
  if [[ -n ${1:-} ]]; then cmp -s "$1" "$CONF" || return 1; fi
  if etc_conf_is_ours; then cmp -s "$CONF" "$ETC_CONF" || return 1; fi
  timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP' || return 1
  states=$(timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
  [[ $(wc -l <<<"$states") -eq $NNODES ]] || return 1
  ! grep -vqE ' (idle|mixed|allocated|completing)$' <<<"$states"
}

wait_until() { # seconds description command...
  local secs=$1 what=$2 i; shift 2
  for ((i = 0; i < secs * 4; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.25
  done
  log "timed out after ${secs}s waiting for: $what"
  return 1
}

nodes_idle() {
  local s
  s=$(sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
  [[ $(grep -c ' idle$' <<<"$s") -eq $NNODES ]]
}

show_logs() {
  local f
  for f in "$MUNGE_DIR/munged.log" "$LOG_DIR"/*.log; do
    [[ -r $f ]] || continue
    log "---- tail $f"; tail -n 15 "$f" >&2 || true
  done
}

# ------------------------------------------------------------------ up
start_munged() {
  if [[ ! -s $MUNGE_KEY ]]; then
    log "creating munge key $MUNGE_KEY"
    as_root install -d -o munge -g munge -m 0700 /etc/munge
    as_root sh -c "umask 077; dd if=/dev/urandom of='$MUNGE_KEY' bs=1 count=1024 status=none"
    as_root chown munge:munge "$MUNGE_KEY"
    as_root chmod 0400 "$MUNGE_KEY"
  fi
  # munged requires its socket dir to be owned by it and not group/world writable.
  as_root install -d -o munge -g munge -m 0711 "$MUNGE_DIR"
  daemon runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCKET" \
    --pid-file="$MUNGE_PID" --log-file="$MUNGE_DIR/munged.log" \
    --seed-file="$MUNGE_DIR/munged.seed" --key-file="$MUNGE_KEY"
  wait_until 10 "munged" sh -c "munge -n --socket='$MUNGE_SOCKET' | unmunge --socket='$MUNGE_SOCKET'"
}

cmd_up() {
  install_packages
  local newconf
  newconf=$(mktemp)
  TMP_FILES+=("$newconf")
  gen_conf >"$newconf"
  if healthy "$newconf"; then
    log "cluster already up and healthy ($NNODES node(s), config $CONF)"
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  if [[ -e $RUN_DIR || -e $MUNGE_DIR ]] || [[ -n $(pids_by_name slurmctld slurmd slurmctld-wlm slurmd-wlm) ]]; then
    log "cluster not healthy or config changed: restarting"
    cmd_down
  fi
  as_root mkdir -p "$STATE_DIR" "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/spool"
  as_root chmod 755 "$STATE_DIR"
  as_root rm -rf "$STATE_DIR/ctld"
  as_root mkdir -p "$STATE_DIR/ctld"
  local n
  for n in $(node_names); do as_root mkdir -p "$STATE_DIR/spool/$n"; done
  as_root install -m 0644 "$newconf" "$CONF"
  if etc_conf_is_ours; then
    as_root mkdir -p "$(dirname "$ETC_CONF")"
    as_root install -m 0644 "$CONF" "$ETC_CONF"
  else
    log "WARNING: $ETC_CONF was not written by this script; left alone."
    log "         Run: export SLURM_CONF=$CONF"
  fi

  start_munged || { show_logs; die "munged did not start"; }
  daemon slurmctld -f "$CONF" || { show_logs; die "slurmctld failed to start"; }
  wait_until 20 "slurmctld ping" sh -c 'scontrol ping | grep -q "is UP"' \
    || { show_logs; die "slurmctld not responding"; }
  for n in $(node_names); do
    daemon slurmd -f "$CONF" -N "$n" || { show_logs; die "slurmd $n failed to start"; }
  done
  wait_until 30 "all $NNODES node(s) idle" nodes_idle || { sinfo -N >&2 || true; show_logs; die "nodes not idle"; }

  # Smoke test: a trivial step on every node, and a batch job.
  timeout 30 srun -N "$NNODES" -n "$NNODES" -J dev-cluster-smoke true \
    || { show_logs; die "smoke srun failed"; }
  timeout 30 sbatch --wait -Q -o /dev/null -J dev-cluster-smoke --wrap true >/dev/null \
    || { show_logs; die "smoke sbatch failed"; }
  log "cluster up: $NNODES node(s), slurmctld 127.0.0.1:$CTLD_PORT, config $CONF"
  sinfo -N >&2
  echo "export SLURM_CONF=$CONF"
}

# ------------------------------------------------------------------ down
cmd_down() {
  local ids i pids
  if [[ -r $CONF ]] && pid_alive "$RUN_DIR/slurmctld.pid" slurmctld \
    && timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
    ids=$(timeout 10 squeue -h -o '%A' 2>/dev/null | sort -u | tr '\n' ' ') || ids=
    if [[ -n ${ids// /} ]]; then
      log "cancelling jobs: $ids"
      # shellcheck disable=SC2086
      timeout 10 scancel $ids 2>/dev/null || true
      for ((i = 0; i < 60; i++)); do
        [[ -z $(timeout 5 squeue -h -o '%A' 2>/dev/null) ]] && break
        sleep 0.25
      done
      # Give the jobs' slurmstepd processes time to finish (KillWait=5).
      for ((i = 0; i < 40; i++)); do
        [[ -z $(pids_by_name slurmstepd) ]] && break
        sleep 0.25
      done
    fi
  fi
  local f
  for f in "$RUN_DIR"/slurmd-*.pid; do [[ -e $f ]] && stop_pidfile "$f" slurmd; done
  stop_pidfile "$RUN_DIR/slurmctld.pid" slurmctld
  # Fallback: anything still alive, by exact process name.
  pids=$(pids_by_name "${SLURM_PROCS[@]}")
  if [[ -n $pids ]]; then
    log "SIGKILL leftover slurm processes: $(for p in $pids; do printf '%s(%s) ' "$p" "$(cat /proc/"$p"/comm 2>/dev/null)"; done)"
    # shellcheck disable=SC2086
    as_root kill -KILL $pids 2>/dev/null || true
  fi
  pids=$(job_pids)
  if [[ -n $pids ]]; then
    log "SIGKILL leftover job processes: $(tr '\n' ' ' <<<"$pids")"
    # shellcheck disable=SC2086
    as_root kill -KILL $pids 2>/dev/null || true
  fi
  stop_pidfile "$MUNGE_PID" munged
  pids=$(FILTER="--socket=$MUNGE_SOCKET" pids_by_name munged)
  # shellcheck disable=SC2086
  [[ -z $pids ]] || as_root kill -KILL $pids 2>/dev/null || true
  for ((i = 0; i < 20; i++)); do
    [[ -z $(pids_by_name "${SLURM_PROCS[@]}") ]] && break
    sleep 0.25
  done
  as_root rm -rf "$RUN_DIR" "$MUNGE_DIR"
  log "cluster down"
}

# ------------------------------------------------------------------ status
cmd_status() {
  if [[ ! -r $CONF ]]; then
    echo "no dev cluster config at $CONF (not up)"
    return 1
  fi
  echo "config: $CONF"
  timeout 10 sinfo -N -l 2>&1 || true
  timeout 10 squeue 2>&1 || true
  if healthy; then echo "status: healthy"; return 0; fi
  echo "status: NOT healthy"
  return 1
}

# Serialize concurrent invocations (e.g. parallel CI workers calling `up`).
lock() {
  exec 9>>"${STATE_DIR%/}.lock"
  flock -w 180 9 || die "could not lock ${STATE_DIR%/}.lock"
}

case ${1:-} in
  up) lock; cmd_up ;;
  down) lock; cmd_down ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
