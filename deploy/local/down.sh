#!/usr/bin/env bash
# Stops the servers that deploy/local/up.sh started (found by their pidfiles), waits until
# they have exited, and keeps their data unless --purge is given. Installed jars and the
# Maven cache are always kept; delete the whole local directory for a full reset.
#
# Usage: deploy/local/down.sh [--purge] [redis|kafka|cassandra ...]   (no names: all three)
# Environment: LOCAL_SERVERS_DIR (default <repo>/.local), LOCAL_SERVERS_STOP_TIMEOUT
# (seconds to wait for a graceful exit before SIGKILL, default 60).
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

stop_service() {
  local svc=$1 pid started timeout=${LOCAL_SERVERS_STOP_TIMEOUT:-60}
  if ! pid="$(running_pid "$svc")"; then
    log "$svc: not running"
    rm -f "$(pidfile "$svc")"
    return 0
  fi
  started="$(now_ms)"
  log "$svc: stopping pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + timeout))
  while pid_alive "$pid"; do
    if ((SECONDS >= deadline)); then
      log "$svc: still running after ${timeout}s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      deadline=$((SECONDS + 10))
      while pid_alive "$pid"; do
        ((SECONDS < deadline)) || die "$svc: pid $pid did not exit"
        sleep 0.2
      done
      break
    fi
    sleep 0.2
  done
  rm -f "$(pidfile "$svc")"
  log "$svc: stopped in $(elapsed_since "$started")"
}

# Deletes everything of the service but its installed jars.
purge_service() {
  local svc=$1 dir
  dir="$(service_dir "$svc")"
  [[ -d $dir ]] || return 0
  find "$dir" -mindepth 1 -maxdepth 1 ! -name lib -exec rm -rf {} +
  log "$svc: data, logs and generated configuration removed from $dir"
}

main() {
  local purge=false arg names=()
  for arg in "$@"; do
    case $arg in
    --purge) purge=true ;;
    -h | --help)
      usage
      return 0
      ;;
    *) names+=("$arg") ;;
    esac
  done
  parse_services "${names[@]}"
  local svc i
  # Stop in the reverse of the start order.
  for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
    svc="${SERVICES[i]}"
    stop_service "$svc"
    if $purge; then
      purge_service "$svc"
    fi
  done
}

main "$@"
