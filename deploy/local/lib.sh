# shellcheck shell=bash
# Paths, ports and process helpers shared by up.sh and down.sh. Sourced, never run.

DEPLOY_LOCAL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd "$DEPLOY_LOCAL_DIR/../.." && pwd -P)"

# Everything (Maven cache, jars, configs, data, logs, pidfiles) lives under this directory.
LOCAL_DIR="${LOCAL_SERVERS_DIR:-$REPO_ROOT/.local}"
mkdir -p "$LOCAL_DIR"
LOCAL_DIR="$(cd "$LOCAL_DIR" && pwd -P)"

ALL_SERVICES=(redis kafka cassandra)

# Read by the scripts that source this file.
# shellcheck disable=SC2034
{
  REDIS_PORT="${LOCAL_REDIS_PORT:-6379}"
  KAFKA_PORT="${LOCAL_KAFKA_PORT:-9092}"
  KAFKA_CONTROLLER_PORT="${LOCAL_KAFKA_CONTROLLER_PORT:-9093}"
  CASSANDRA_PORT="${LOCAL_CASSANDRA_PORT:-9042}"
  CASSANDRA_STORAGE_PORT="${LOCAL_CASSANDRA_STORAGE_PORT:-7000}"
  CASSANDRA_JMX_PORT="${LOCAL_CASSANDRA_JMX_PORT:-7199}"
  # TLS listeners next to the plain ones (Cassandra takes TLS on its one CQL port).
  REDIS_TLS_PORT="${LOCAL_REDIS_TLS_PORT:-6380}"
  KAFKA_SASL_SSL_PORT="${LOCAL_KAFKA_SASL_SSL_PORT:-9094}"
  # Throwaway CA, server and client certificates (see tls_material in up.sh), and the
  # test users of the TLS listeners.
  TLS_DIR="$LOCAL_DIR/tls"
  TLS_STORE_PASSWORD="switchboard-local"
  REDIS_TLS_USER="sbtls"
  REDIS_TLS_PASSWORD="sbtls-local-password"
  KAFKA_SASL_USER="sbtls"
  KAFKA_SASL_PASSWORD="sbtls-local-password"
}

log() { printf '[local] %s\n' "$*" >&2; }

die() {
  log "error: $*"
  exit 1
}

service_dir() { printf '%s/%s' "$LOCAL_DIR" "$1"; }

pidfile() { printf '%s/%s/%s.pid' "$LOCAL_DIR" "$1" "$1"; }

now_ms() { date +%s%3N; }

# Prints "N.Ns" elapsed since the now_ms value $1.
elapsed_since() {
  local ms=$(($(now_ms) - $1))
  printf '%d.%ds' $((ms / 1000)) $((ms % 1000 / 100))
}

# True while pid $1 exists and is not a zombie.
pid_alive() {
  local state
  [[ -r /proc/$1/stat ]] || return 1
  state="$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" || return 1
  [[ -n $state && $state != Z && $state != X ]]
}

# Prints the pid recorded for service $1 when that process is alive and was started from
# LOCAL_DIR (its command line names LOCAL_DIR or its working directory is inside it), so a
# stale pidfile whose pid was reused by an unrelated process is never mistaken for ours.
running_pid() {
  local file pid cmdline cwd
  file="$(pidfile "$1")"
  [[ -s $file ]] || return 1
  pid="$(<"$file")"
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  pid_alive "$pid" || return 1
  cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
  cwd="$(readlink "/proc/$pid/cwd" 2>/dev/null || true)"
  if [[ $cmdline == *"$LOCAL_DIR/"* || $cwd == "$LOCAL_DIR" || $cwd == "$LOCAL_DIR"/* ]]; then
    printf '%s\n' "$pid"
    return 0
  fi
  return 1
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
  # shellcheck disable=SC2016 # $0 is expanded by the inner shell.
  timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0"' "$1" 2>/dev/null
}

# Validates service names into the global SERVICES array; no names means all of them.
parse_services() {
  SERVICES=()
  local name known
  for name in "$@"; do
    known=false
    local svc
    for svc in "${ALL_SERVICES[@]}"; do
      [[ $name == "$svc" ]] && known=true
    done
    $known || die "unknown service '$name' (expected: ${ALL_SERVICES[*]})"
    SERVICES+=("$name")
  done
  if [[ ${#SERVICES[@]} -eq 0 ]]; then
    SERVICES=("${ALL_SERVICES[@]}")
  fi
}
