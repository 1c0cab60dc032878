#!/usr/bin/env bash
# Installs Redis, Kafka and Cassandra from the package registries (Debian packages and Maven
# Central) and starts them on 127.0.0.1 for tests and development, then waits until each one
# answers. Idempotent: what is installed is not installed again, what runs is left running.
#
# Usage: deploy/local/up.sh [redis|kafka|cassandra ...]   (no names: all three)
# Environment: LOCAL_SERVERS_DIR (default <repo>/.local), LOCAL_SERVERS_TIMEOUT
# (seconds to wait for each server), SWITCHBOARD_<SERVICE>_PORT (see README.md), JAVA_HOME.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MAVEN_DEPENDENCY_PLUGIN="org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
APT_UPDATED=false
JAVA=""

usage() {
  sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    die "need root to run: $*"
  fi
}

apt_install() {
  command -v apt-get >/dev/null || die "apt-get not found; install these yourself: $*"
  if ! $APT_UPDATED; then
    log "apt-get update"
    as_root apt-get update -qq
    APT_UPDATED=true
  fi
  log "apt-get install $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

java_major() {
  local version
  version="$("$1" -version 2>&1 | sed -n 's/.*version "\([0-9][0-9.]*\).*/\1/p' | head -n 1)"
  version="${version#1.}"
  printf '%s\n' "${version%%.*}"
}

# Sets JAVA to a Java 17 runtime (Kafka 4 needs 17 or newer, Cassandra 5.0 runs on 11 or 17).
ensure_java() {
  [[ -n $JAVA ]] && return 0
  local candidate
  for candidate in "${JAVA_HOME:+$JAVA_HOME/bin/java}" "$(command -v java || true)" \
    /usr/lib/jvm/java-17-openjdk-*/bin/java; do
    if [[ -n $candidate && -x $candidate && $(java_major "$candidate") == 17 ]]; then
      JAVA="$candidate"
      return 0
    fi
  done
  apt_install openjdk-17-jre-headless
  for candidate in /usr/lib/jvm/java-17-openjdk-*/bin/java; do
    [[ -x $candidate ]] && JAVA="$candidate" && return 0
  done
  die "no Java 17 runtime found (set JAVA_HOME to one)"
}

ensure_command() {
  local cmd=$1 package=$2
  command -v "$cmd" >/dev/null || apt_install "$package"
  command -v "$cmd" >/dev/null || die "'$cmd' still missing after installing $package"
}

# Copies the runtime class path described by deploy/local/<service>/pom.xml into
# <local>/<service>/lib, unless the jars for exactly that pom are already there.
install_jars() {
  local svc=$1 dir lib want started
  dir="$(service_dir "$svc")"
  lib="$dir/lib"
  want="$(sha256sum "$DEPLOY_LOCAL_DIR/$svc/pom.xml" | cut -d' ' -f1)"
  if [[ -f $lib/.pom.sha256 && $(<"$lib/.pom.sha256") == "$want" ]]; then
    return 0
  fi
  ensure_command mvn maven
  started="$(now_ms)"
  log "$svc: resolving jars from Maven Central into $lib"
  mkdir -p "$dir/pom"
  cp "$DEPLOY_LOCAL_DIR/$svc/pom.xml" "$dir/pom/pom.xml"
  rm -rf "$lib.tmp"
  if ! (cd "$dir/pom" && mvn -B -Dstyle.color=never -Dmaven.repo.local="$LOCAL_DIR/m2" \
    "$MAVEN_DEPENDENCY_PLUGIN:copy-dependencies" \
    -DincludeScope=runtime -DoutputDirectory="$lib.tmp") >"$dir/pom/maven.log" 2>&1; then
    show_tail "$dir/pom/maven.log"
    die "$svc: Maven could not resolve the jars of $DEPLOY_LOCAL_DIR/$svc/pom.xml"
  fi
  printf '%s\n' "$want" >"$lib.tmp/.pom.sha256"
  rm -rf "$lib"
  mv "$lib.tmp" "$lib"
  log "$svc: $(find "$lib" -name '*.jar' | wc -l) jars installed in $(elapsed_since "$started")"
}

# Fails when one of the given ports is already taken by a process we did not start.
require_free_ports() {
  local svc=$1 port
  shift
  for port in "$@"; do
    if port_open "$port"; then
      die "$svc: port $port on 127.0.0.1 is already in use by another process (stop it or set the SWITCHBOARD_*_PORT override, see deploy/local/README.md)"
    fi
  done
}

# Starts "$@" detached in its own session with the service directory as working directory,
# output appended to $2, and records its pid (setsid does not fork here: a background
# subshell of a non-interactive script is never a process group leader).
launch() {
  local svc=$1 out=$2 dir
  shift 2
  dir="$(service_dir "$svc")"
  (cd "$dir" && exec setsid "$@" </dev/null >>"$out" 2>&1) &
  printf '%s\n' "$!" >"$(pidfile "$svc")"
}

stop_started() {
  local svc=$1 pid
  if pid="$(running_pid "$svc")"; then
    kill -TERM "$pid" 2>/dev/null || true
    local waited=0
    while pid_alive "$pid" && ((waited < 30)); do
      sleep 1
      waited=$((waited + 1))
    done
    pid_alive "$pid" && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$(pidfile "$svc")"
}

show_tail() {
  [[ -s $1 ]] || return 0
  log "last lines of $1 (long lines cut):"
  tail -n 40 "$1" | cut -c1-300 >&2
}

# Reports why $1 did not start with the last lines of its log $2 (and of the JVM's own
# output, where that is where the reason went), stops what is left of it and exits.
fail_start() {
  local svc=$1 logfile=$2 reason=$3 stdout
  stdout="$(service_dir "$svc")/logs/stdout.log"
  log "error: $svc: $reason"
  show_tail "$logfile"
  [[ $stdout == "$logfile" ]] || show_tail "$stdout"
  stop_started "$svc"
  exit 1
}

# Polls check function $3 until it succeeds; fails (showing the log $2) when the server exits
# or does not answer within the timeout $4.
wait_ready() {
  local svc=$1 logfile=$2 check=$3 timeout=${LOCAL_SERVERS_TIMEOUT:-$4} started=$5
  local deadline=$((SECONDS + timeout))
  until "$check"; do
    if ! running_pid "$svc" >/dev/null; then
      fail_start "$svc" "$logfile" "the server exited during start-up"
    fi
    if ((SECONDS >= deadline)); then
      fail_start "$svc" "$logfile" "not answering after ${timeout}s (raise LOCAL_SERVERS_TIMEOUT if this machine is busy); stopped it"
    fi
    sleep 1
  done
  log "$svc: ready (pid $(running_pid "$svc"), started in $(elapsed_since "$started"))"
}

# ---------------------------------------------------------------- TLS material

# Generates once, with the openssl command line, a throwaway CA and a server and a client
# certificate it signs, into $TLS_DIR: ca.pem, server.{pem,key} (names 127.0.0.1 and
# localhost), client.{pem,key} (for mutual TLS), and server.p12 (the server key and chain
# as a PKCS12 keystore for Kafka and Cassandra, password $TLS_STORE_PASSWORD).
ensure_tls_material() {
  if [[ -s $TLS_DIR/server.p12 && -s $TLS_DIR/client.pem ]]; then
    return 0
  fi
  ensure_command openssl openssl
  local tmp="$TLS_DIR.tmp" started
  started="$(now_ms)"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  # Every command checks its status: `set -e` does not apply inside an `if` condition.
  if ! (
    cd "$tmp" || exit 1
    umask 077
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=switchboard local CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -keyout ca.key -out ca.pem || exit 1
    for name in server client; do
      usage=serverAuth
      [[ $name == client ]] && usage=clientAuth
      openssl req -newkey rsa:2048 -nodes -subj "/CN=switchboard local $name" \
        -keyout "$name.key" -out "$name.csr" || exit 1
      printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=%s\n' "$usage" >"$name.ext"
      openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile "$name.ext" -out "$name.pem" || exit 1
      rm -f "$name.csr" "$name.ext"
    done
    openssl pkcs12 -export -in server.pem -inkey server.key -certfile ca.pem -name server \
      -passout "pass:$TLS_STORE_PASSWORD" -out server.p12
  ) >"$LOCAL_DIR/tls-gen.log" 2>&1; then
    show_tail "$LOCAL_DIR/tls-gen.log"
    die "generating the local TLS certificates failed"
  fi
  rm -rf "$TLS_DIR"
  mv "$tmp" "$TLS_DIR"
  log "tls: throwaway CA and certificates in $TLS_DIR ($(elapsed_since "$started"))"
}

# ---------------------------------------------------------------- redis

redis_ready() {
  [[ $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
}

# Opens the TLS listener and sets the password of the TLS test user, at run time (so that
# a Redis started without them gets them too, without a restart), then checks both with a
# ping over TLS as that user. Clients may present a certificate of the local CA.
redis_tls() {
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" CONFIG SET \
    tls-cert-file "$TLS_DIR/server.pem" tls-key-file "$TLS_DIR/server.key" \
    tls-ca-cert-file "$TLS_DIR/ca.pem" tls-auth-clients optional \
    tls-port "$REDIS_TLS_PORT" >/dev/null ||
    die "redis: cannot open the TLS listener on 127.0.0.1:$REDIS_TLS_PORT"
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ACL SETUSER "$REDIS_TLS_USER" reset on \
    ">$REDIS_TLS_PASSWORD" '~*' '&*' +@all >/dev/null ||
    die "redis: cannot set up the user $REDIS_TLS_USER"
  [[ $(REDISCLI_AUTH="$REDIS_TLS_PASSWORD" redis-cli --tls --cacert "$TLS_DIR/ca.pem" \
    -h 127.0.0.1 -p "$REDIS_TLS_PORT" --user "$REDIS_TLS_USER" ping 2>&1) == PONG ]] ||
    die "redis: no answer over TLS on 127.0.0.1:$REDIS_TLS_PORT"
}

up_redis() {
  local dir pid version started
  dir="$(service_dir redis)"
  ensure_command redis-server redis-server
  ensure_command redis-cli redis-tools
  version="$(redis-server --version | sed -n 's/.* v=\([0-9.]*\).*/\1/p')"
  [[ $version == 7.* ]] || log "warning: redis-server $version found, version 7 expected"
  ensure_tls_material
  if pid="$(running_pid redis)"; then
    log "redis: already running (pid $pid) on 127.0.0.1:$REDIS_PORT"
    redis_tls
    return 0
  fi
  require_free_ports redis "$REDIS_PORT" "$REDIS_TLS_PORT"
  mkdir -p "$dir/data"
  cat >"$dir/redis.conf" <<EOF
# Generated by deploy/local/up.sh; rewritten on every start.
bind 127.0.0.1
port $REDIS_PORT
protected-mode yes
daemonize yes
supervised no
pidfile $(pidfile redis)
logfile $dir/redis.log
dir $dir/data
save ""
appendonly no
maxmemory 256mb
maxmemory-policy noeviction
EOF
  started="$(now_ms)"
  log "redis: starting redis-server $version on 127.0.0.1:$REDIS_PORT"
  rm -f "$(pidfile redis)"
  redis-server "$dir/redis.conf" || fail_start redis "$dir/redis.log" "redis-server failed to start"
  # redis writes its pidfile right after daemonizing.
  local waited=0
  until [[ -s $(pidfile redis) ]] || ((waited >= 50)); do
    sleep 0.1
    waited=$((waited + 1))
  done
  wait_ready redis "$dir/redis.log" redis_ready 30 "$started"
  redis_tls
}

# ---------------------------------------------------------------- kafka

kafka_ready() {
  local dir
  dir="$(service_dir kafka)"
  port_open "$KAFKA_PORT" || return 1
  # A real metadata round trip: list topics through the admin client.
  timeout 60 "$JAVA" -Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile="$dir/tools-log4j2.properties" -cp "$dir/lib/*" \
    org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" \
    --command-config "$dir/admin.properties" --list >/dev/null 2>>"$dir/logs/ready-check.log"
}

write_kafka_config() {
  local dir=$1
  cat >"$dir/server.properties" <<EOF
# Generated by deploy/local/up.sh; rewritten on every start.
# One KRaft node that is both broker and controller.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT,SASL_SSL://127.0.0.1:$KAFKA_SASL_SSL_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,SASL_SSL://127.0.0.1:$KAFKA_SASL_SSL_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL
# The SASL_SSL listener: SCRAM-SHA-512 users live in the cluster metadata (created at
# format time and again after every start), PLAIN users in the JAAS line below.
sasl.enabled.mechanisms=SCRAM-SHA-512,PLAIN
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$KAFKA_SASL_USER="$KAFKA_SASL_PASSWORD";
ssl.keystore.type=PKCS12
ssl.keystore.location=$TLS_DIR/server.p12
ssl.keystore.password=$TLS_STORE_PASSWORD
ssl.key.password=$TLS_STORE_PASSWORD
ssl.client.auth=none
log.dirs=$dir/data
num.partitions=1
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
log.retention.hours=24
log.segment.bytes=67108864
EOF
  cat >"$dir/log4j2.properties" <<EOF
# Generated by deploy/local/up.sh.
status = warn
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = $dir/logs/server.log
appender.file.filePattern = $dir/logs/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
EOF
  cat >"$dir/tools-log4j2.properties" <<EOF
# Generated by deploy/local/up.sh: command line tools log warnings to stderr.
status = warn
appender.err.type = Console
appender.err.name = STDERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = STDERR
EOF
  cat >"$dir/admin.properties" <<EOF
request.timeout.ms=5000
default.api.timeout.ms=15000
EOF
}

# A random Kafka cluster id: 16 random bytes, URL-safe base64 without padding.
# Creates (or resets) the SCRAM-SHA-512 user of the SASL_SSL listener through the plain
# listener; idempotent.
kafka_scram_user() {
  local dir
  dir="$(service_dir kafka)"
  timeout 60 "$JAVA" -Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile="$dir/tools-log4j2.properties" -cp "$dir/lib/*" \
    org.apache.kafka.tools.ConfigCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" \
    --command-config "$dir/admin.properties" --alter --entity-type users \
    --entity-name "$KAFKA_SASL_USER" \
    --add-config "SCRAM-SHA-512=[iterations=4096,password=$KAFKA_SASL_PASSWORD]" \
    >>"$dir/logs/ready-check.log" 2>&1 ||
    fail_start kafka "$dir/logs/ready-check.log" "cannot create the SCRAM user $KAFKA_SASL_USER"
}

new_cluster_id() {
  head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n'
}

up_kafka() {
  local dir pid started cluster_id
  dir="$(service_dir kafka)"
  ensure_java
  install_jars kafka
  ensure_tls_material
  if pid="$(running_pid kafka)"; then
    log "kafka: already running (pid $pid) on 127.0.0.1:$KAFKA_PORT"
    port_open "$KAFKA_SASL_SSL_PORT" ||
      log "warning: kafka: no SASL_SSL listener on 127.0.0.1:$KAFKA_SASL_SSL_PORT (started by an older up.sh); restart it: deploy/local/down.sh kafka && deploy/local/up.sh kafka"
    return 0
  fi
  require_free_ports kafka "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$KAFKA_SASL_SSL_PORT"
  mkdir -p "$dir/data" "$dir/logs"
  write_kafka_config "$dir"
  started="$(now_ms)"
  if [[ ! -f $dir/data/meta.properties ]]; then
    cluster_id="$(new_cluster_id)"
    log "kafka: formatting $dir/data with cluster id $cluster_id"
    "$JAVA" -Xmx256m -Dlog4j2.configurationFile="$dir/tools-log4j2.properties" \
      -cp "$dir/lib/*" kafka.tools.StorageTool format \
      --config "$dir/server.properties" --cluster-id "$cluster_id" \
      --add-scram "SCRAM-SHA-512=[name=$KAFKA_SASL_USER,password=$KAFKA_SASL_PASSWORD]" \
      >"$dir/logs/format.log" 2>&1 ||
      fail_start kafka "$dir/logs/format.log" "formatting the storage directory failed"
  fi
  log "kafka: starting kafka_2.13 $(kafka_version "$dir") on 127.0.0.1:$KAFKA_PORT (controller :$KAFKA_CONTROLLER_PORT)"
  launch kafka "$dir/logs/stdout.log" "$JAVA" -Xms256m -Xmx512m \
    -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
    -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
    -Dkafka.logs.dir="$dir/logs" -Dlog4j2.configurationFile="$dir/log4j2.properties" \
    -cp "$dir/lib/*" kafka.Kafka "$dir/server.properties"
  wait_ready kafka "$dir/logs/server.log" kafka_ready 120 "$started"
  kafka_scram_user
  port_open "$KAFKA_SASL_SSL_PORT" ||
    fail_start kafka "$dir/logs/server.log" "no SASL_SSL listener on 127.0.0.1:$KAFKA_SASL_SSL_PORT"
}

kafka_version() {
  local jar
  jar="$(find "$1/lib" -name 'kafka_2.13-*.jar' | head -n 1)"
  jar="${jar##*/kafka_2.13-}"
  printf '%s\n' "${jar%.jar}"
}

# ---------------------------------------------------------------- cassandra

cassandra_ready() {
  python3 "$DEPLOY_LOCAL_DIR/cql_ping.py" 127.0.0.1 "$CASSANDRA_PORT" >/dev/null 2>&1
}

write_cassandra_config() {
  local dir=$1
  cat >"$dir/conf/cassandra.yaml" <<EOF
# Generated by deploy/local/up.sh; rewritten on every start. One node on 127.0.0.1.
cluster_name: switchboard-local
num_tokens: 16
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:$CASSANDRA_STORAGE_PORT"
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: $CASSANDRA_STORAGE_PORT
native_transport_port: $CASSANDRA_PORT
start_native_transport: true
storage_compatibility_mode: NONE
# TLS on the same CQL port, optional: plain and TLS clients both connect.
client_encryption_options:
  enabled: true
  optional: true
  keystore: $TLS_DIR/server.p12
  keystore_password: $TLS_STORE_PASSWORD
  store_type: PKCS12
  require_client_auth: false

data_file_directories:
  - $dir/data/data
commitlog_directory: $dir/data/commitlog
saved_caches_directory: $dir/data/saved_caches
hints_directory: $dir/data/hints
cdc_raw_directory: $dir/data/cdc_raw

commitlog_sync: periodic
commitlog_sync_period: 10000ms
commitlog_segment_size: 8MiB
commitlog_total_space: 256MiB

# Small footprint for a development machine.
memtable_heap_space: 64MiB
memtable_offheap_space: 64MiB
memtable_allocation_type: heap_buffers
key_cache_size: 16MiB
counter_cache_size: 4MiB
file_cache_size: 64MiB
concurrent_reads: 8
concurrent_writes: 8
concurrent_counter_writes: 8
concurrent_materialized_view_writes: 4
concurrent_compactors: 1
native_transport_max_threads: 32
EOF
  cat >"$dir/conf/logback.xml" <<EOF
<!-- Generated by deploy/local/up.sh. -->
<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.rolling.RollingFileAppender">
    <file>$dir/logs/system.log</file>
    <rollingPolicy class="ch.qos.logback.core.rolling.FixedWindowRollingPolicy">
      <fileNamePattern>$dir/logs/system.log.%i</fileNamePattern>
      <minIndex>1</minIndex>
      <maxIndex>3</maxIndex>
    </rollingPolicy>
    <triggeringPolicy class="ch.qos.logback.core.rolling.SizeBasedTriggeringPolicy">
      <maxFileSize>20MB</maxFileSize>
    </triggeringPolicy>
    <encoder>
      <pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern>
    </encoder>
  </appender>
  <root level="INFO">
    <appender-ref ref="FILE"/>
  </root>
</configuration>
EOF
}

up_cassandra() {
  local dir pid started jamm
  dir="$(service_dir cassandra)"
  ensure_java
  ensure_command python3 python3
  install_jars cassandra
  ensure_tls_material
  if pid="$(running_pid cassandra)"; then
    log "cassandra: already running (pid $pid) on 127.0.0.1:$CASSANDRA_PORT"
    grep -q '^client_encryption_options:' "$dir/conf/cassandra.yaml" ||
      log "warning: cassandra: started without TLS by an older up.sh; restart it: deploy/local/down.sh cassandra && deploy/local/up.sh cassandra"
    return 0
  fi
  require_free_ports cassandra "$CASSANDRA_PORT" "$CASSANDRA_STORAGE_PORT" "$CASSANDRA_JMX_PORT"
  mkdir -p "$dir/conf/triggers" "$dir/logs" "$dir/data"
  write_cassandra_config "$dir"
  jamm="$(find "$dir/lib" -name 'jamm-*.jar' | head -n 1)"
  [[ -n $jamm ]] || die "cassandra: jamm jar missing from $dir/lib"
  # JVM options: heap and GC sized for a development machine, the rest as in Cassandra 5.0's
  # conf/jvm-server.options and conf/jvm17-server.options.
  local jvm=(
    -Xms256m -Xmx1g -Xss256k
    -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1
    -XX:G1RSetUpdatingPauseTimePercent=5 -XX:MaxGCPauseMillis=300
    -XX:InitiatingHeapOccupancyPercent=70 -XX:+PerfDisableSharedMem
    -XX:+ExitOnOutOfMemoryError
    -Djava.net.preferIPv4Stack=true
    "-javaagent:$jamm"
    -Djdk.attach.allowAttachSelf=true
    --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
    --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
    --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
    --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
    --add-exports java.sql/java.sql=ALL-UNNAMED
    --add-exports java.base/java.lang.ref=ALL-UNNAMED
    --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
    --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
    --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
    --add-opens java.base/java.lang.module=ALL-UNNAMED
    --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
    --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
    --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
    --add-opens java.base/jdk.internal.math=ALL-UNNAMED
    --add-opens java.base/jdk.internal.module=ALL-UNNAMED
    --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
    --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
    --add-opens java.base/sun.nio.ch=ALL-UNNAMED
    --add-opens java.base/java.io=ALL-UNNAMED
    --add-opens java.base/java.lang.reflect=ALL-UNNAMED
    --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
    --add-opens java.base/java.lang=ALL-UNNAMED
    --add-opens java.base/java.util=ALL-UNNAMED
    -Dio.netty.tryReflectionSetAccessible=true
    -Dio.netty.allocator.useCacheForAllThreads=true
    -Dio.netty.allocator.maxOrder=11
    -Dcassandra-foreground=yes
    -Dcassandra.jmx.local.port="$CASSANDRA_JMX_PORT"
    -Dcassandra.storagedir="$dir/data"
    -Dcassandra.logdir="$dir/logs"
    -Dcassandra.config="file://$dir/conf/cassandra.yaml"
    -Dcassandra.triggers_dir="$dir/conf/triggers"
    -Dcassandra.skip_wait_for_gossip_to_settle=0
    -Dlogback.configurationFile="$dir/conf/logback.xml"
  )
  started="$(now_ms)"
  log "cassandra: starting cassandra-all $(cassandra_version "$dir") on 127.0.0.1:$CASSANDRA_PORT"
  launch cassandra "$dir/logs/stdout.log" "$JAVA" "${jvm[@]}" -cp "$dir/conf:$dir/lib/*" \
    org.apache.cassandra.service.CassandraDaemon
  wait_ready cassandra "$dir/logs/system.log" cassandra_ready 240 "$started"
}

cassandra_version() {
  local jar
  jar="$(find "$1/lib" -name 'cassandra-all-*.jar' | head -n 1)"
  jar="${jar##*/cassandra-all-}"
  printf '%s\n' "${jar%.jar}"
}

# ---------------------------------------------------------------- main

main() {
  case "${1:-}" in
  -h | --help)
    usage
    return 0
    ;;
  esac
  parse_services "$@"
  log "local directory: $LOCAL_DIR"
  local svc
  for svc in "${SERVICES[@]}"; do
    "up_$svc"
  done
  for svc in "${SERVICES[@]}"; do
    case $svc in
    redis) log "redis:     redis://127.0.0.1:$REDIS_PORT, rediss://$REDIS_TLS_USER@127.0.0.1:$REDIS_TLS_PORT" ;;
    kafka) log "kafka:     127.0.0.1:$KAFKA_PORT (PLAINTEXT), 127.0.0.1:$KAFKA_SASL_SSL_PORT (SASL_SSL, user $KAFKA_SASL_USER)" ;;
    cassandra) log "cassandra: 127.0.0.1:$CASSANDRA_PORT (CQL, plain or TLS)" ;;
    esac
  done
  log "tls:       CA $TLS_DIR/ca.pem, client certificate $TLS_DIR/client.pem and client.key"
}

main "$@"
