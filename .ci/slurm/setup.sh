#!/usr/bin/env bash
# A real single-host Slurm cluster for tests and CI: munge, MariaDB + slurmdbd (so sacct and submitit work),
# slurmctld, and two slurmd acting as nodes n1 and n2 (distinct ports, `slurmd -N`), each with 2 fake GPUs
# declared as gres on character devices.
#
# Idempotent: installs packages only when missing, rewrites configs only when they change (then reconfigures),
# and starts only the daemons that are not already answering. Needs root; no systemd (daemons started by hand).
#
#   bash .ci/slurm/setup.sh          # install + configure + start, then wait until both nodes are idle
#   bash .ci/slurm/stop.sh           # stop every daemon started here
#
# Knobs (environment): SLURM_CLUSTER_NAME (dflashci), SLURM_NODE_CPUS (4), SLURM_NODE_MEMORY_MB (8000),
# SLURM_FAKE_GPUS (2 per node).
set -euo pipefail

CLUSTER=${SLURM_CLUSTER_NAME:-dflashci}
NODE_CPUS=${SLURM_NODE_CPUS:-4}
NODE_MEM=${SLURM_NODE_MEMORY_MB:-8000}
FAKE_GPUS=${SLURM_FAKE_GPUS:-2}
HOST=$(hostname -s)
ETC=/etc/slurm
LOGS=/var/log/slurm
DB_PASS=slurmdbd-ci  # local-only MariaDB account for slurmdbd in a throwaway CI machine

say() { echo "slurm-setup: $*" >&2; }
die() { say "$*"; exit 1; }
[[ $(id -u) == 0 ]] || die "run as root"

# --- packages -------------------------------------------------------------------------------------------------
need=()
for bin in munged slurmctld slurmd slurmdbd sinfo mariadbd; do command -v "$bin" >/dev/null || need+=("$bin"); done
if ((${#need[@]})); then
  say "installing packages (missing: ${need[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d keeps the packages' init scripts from starting daemons we start ourselves below.
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client slurmdbd mariadb-server \
    >/tmp/slurm-setup-apt.log 2>&1 || { tail -20 /tmp/slurm-setup-apt.log >&2; die "apt-get install failed"; }
fi

mkdir -p "$ETC" "$LOGS" /var/spool/slurmctld /var/spool/slurmd /run/munge /run/mysqld /run/slurm /var/log/mysql
chown munge:munge /run/munge
chown mysql:mysql /run/mysqld /var/log/mysql

# --- fake GPUs: character devices with /dev/null's numbers, one set per node -------------------------------------
for ((g = 0; g < FAKE_GPUS; g++)); do
  [[ -c /dev/fakegpu$g ]] || mknod -m 666 "/dev/fakegpu$g" c 1 3
done

# Node names resolve like on a real cluster (train.sbatch rendezvouses on the first node's name).
if ! grep -Eq '^127\.0\.0\.1\s.*\bn1\b' /etc/hosts; then
  echo "127.0.0.1 n1 n2" >>/etc/hosts || say "warning: cannot add n1/n2 to /etc/hosts; multi-node rendezvous will fail"
fi

# --- configs --------------------------------------------------------------------------------------------------
changed=0
# write_if_changed PATH MODE: stdin -> PATH, only when the content differs (a rerun must not reconfigure for nothing).
write_if_changed() {
  local tmp
  tmp=$(mktemp)
  cat >"$tmp"
  if [[ -f "$1" ]] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; return 0; fi
  install -m "$2" "$tmp" "$1" && rm -f "$tmp"
  changed=1
}

write_if_changed "$ETC/slurm.conf" 644 <<EOF
# Written by .ci/slurm/setup.sh: a two-node test cluster on one host.
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120): short, so preemption tests are.
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in this container: track processes through /proc, no task confinement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Node sizes below are declared, not detected: the host has fewer cores than two nodes claim.
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu
GresTypes=gpu
NodeName=n1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=6821 CPUs=$NODE_CPUS RealMemory=$NODE_MEM Gres=gpu:fake:$FAKE_GPUS State=UNKNOWN
NodeName=n2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=6822 CPUs=$NODE_CPUS RealMemory=$NODE_MEM Gres=gpu:fake:$FAKE_GPUS State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

write_if_changed "$ETC/gres.conf" 644 <<EOF
AutoDetect=off
NodeName=n[1-2] Name=gpu Type=fake File=/dev/fakegpu[0-$((FAKE_GPUS - 1))]
EOF

write_if_changed "$ETC/slurmdbd.conf" 600 <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=/run/slurm/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF

# --- daemons --------------------------------------------------------------------------------------------------
# pid_alive PIDFILE: the daemon recorded there is still running.
pid_alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() {  # wait_for SECONDS WHAT CMD...: poll CMD every 0.2 s
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what did not come up in ${limit}s"
    sleep 0.2
  done
}

if ! pid_alive /run/munge/munged.pid; then
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged --force
fi
wait_for 10 munge bash -c 'munge -n | unmunge'

if ! mariadb-admin ping --silent >/dev/null 2>&1; then
  say "starting mariadb"
  # A fresh container may come without the system tables.
  [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  (setsid mariadbd-safe --user=mysql --skip-syslog --log-error=/var/log/mysql/error.log </dev/null >/dev/null 2>&1 &)
  wait_for 60 mariadb mariadb-admin ping --silent
fi
mariadb -uroot <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF

# stop_pidfile PIDFILE: TERM the daemon and wait until it is gone.
stop_pidfile() {
  pid_alive "$1" || return 0
  local pid
  pid=$(cat "$1")
  kill -TERM "$pid"
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}
if ((changed)); then
  # Some settings (AuthInfo, node ports) take effect only at start: restart rather than `scontrol reconfigure`.
  for f in /run/slurm/slurmd-n1.pid /run/slurm/slurmd-n2.pid /run/slurm/slurmctld.pid /run/slurm/slurmdbd.pid; do
    pid_alive "$f" && say "config changed: restarting $(basename "$f" .pid)"
    stop_pidfile "$f"
  done
fi
if ! pid_alive /run/slurm/slurmdbd.pid; then
  say "starting slurmdbd"
  slurmdbd
fi
wait_for 60 slurmdbd sacctmgr -n list cluster
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
  sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi

if ! pid_alive /run/slurm/slurmctld.pid; then
  say "starting slurmctld"
  slurmctld
fi
wait_for 30 slurmctld scontrol ping

for node in n1 n2; do
  if ! pid_alive "/run/slurm/slurmd-$node.pid"; then
    say "starting slurmd -N $node"
    slurmd -N "$node"
  fi
done

# Nodes left DOWN/DRAIN by an earlier run (a killed slurmd, a changed config) come back here.
for node in n1 n2; do
  if sinfo -h -n "$node" -o '%t' | grep -Eq 'down|drain|fail'; then
    scontrol update NodeName="$node" State=RESUME 2>/dev/null || true
  fi
done
wait_for 60 "idle nodes" bash -c '[[ $(sinfo -h -N -t idle,mix,alloc -o %N | sort -u | wc -l) == 2 ]]'
say "cluster $CLUSTER up: $(sinfo -h -N -o '%N:%t' | sort -u | tr '\n' ' ')"
