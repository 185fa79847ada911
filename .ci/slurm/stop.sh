#!/usr/bin/env bash
# Stop the test cluster started by .ci/slurm/setup.sh (slurmd n1/n2, slurmctld, slurmdbd, MariaDB, munged), each by
# the pid it recorded. State (accounting DB, job ids) is kept; setup.sh starts them again.
set -uo pipefail

stop_pidfile() {
  [[ -s "$1" ]] || return 0
  local pid
  pid=$(cat "$1")
  kill -0 "$pid" 2>/dev/null || return 0
  echo "slurm-stop: stopping $(basename "$1" .pid) (pid $pid)" >&2
  kill -TERM "$pid"
  for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

for f in /run/slurm/slurmd-n1.pid /run/slurm/slurmd-n2.pid /run/slurm/slurmctld.pid /run/slurm/slurmdbd.pid; do
  stop_pidfile "$f"
done
if mariadb-admin ping --silent >/dev/null 2>&1; then
  echo "slurm-stop: stopping mariadb" >&2
  mariadb-admin shutdown
fi
stop_pidfile /run/munge/munged.pid
