#!/usr/bin/env bash
# Real Apache Kafka (KRaft, single combined node) and PostgreSQL on 127.0.0.1
# for herald's tests, benchmarks and CI.
#
#   scripts/services.sh up [--secure] [--kafka-nodes 1|3]
#                                      install (first time) and start both; idempotent
#   scripts/services.sh down           stop what `up` started
#   scripts/services.sh status         say what runs
#   scripts/services.sh env            print the environment to use
#
# `up --secure` starts the same services with TLS on as well: a throwaway CA
# (made here with openssl, in <cache>/tls) signs a certificate for 127.0.0.1
# and localhost; Kafka gets a SASL_SSL listener (SCRAM-SHA-512 user) on
# 127.0.0.1:9094 beside the plaintext one, PostgreSQL gets `ssl = on` and a
# role that may only connect over TLS. `env` then prints what a client needs.
# The plaintext endpoints stay as they are, so every other test keeps working.
#
# `up --kafka-nodes 3` starts a replicated cluster instead of the single node:
# three combined broker+controller nodes (node.id 1..3) whose controllers form
# a three-voter KRaft quorum (formatted with StorageTool's
# --initial-controllers, the multi-voter form of the single node's
# --standalone), with broker defaults for replication: replication factor 3,
# min.insync.replicas 2, and the same for the internal topics. Each node has
# its own config, data and logs under <cache>/kafka/cluster/node-<n>/ and a
# 512 MB heap. `env` lists all three brokers in KAFKA_BROKERS. The node count
# is remembered (<cache>/kafka/nodes): `up` without --kafka-nodes keeps what
# runs (one node when nothing does), `up --kafka-nodes N` with another N stops
# what runs and starts N. With --secure every node gets a SASL_SSL listener.
#
# Ports: P = HERALD_KAFKA_PORT (default 9092). Node n (the single node is
# node 1) listens on P+10(n-1) (plaintext), P+10(n-1)+1 (controller) and
# P+10(n-1)+2 (SASL_SSL, --secure only):
#   node 1: 9092 9093 9094   node 2: 9102 9103 9104   node 3: 9112 9113 9114
#
# Kafka comes from the jars on Maven Central (scripts/kafka/pom.xml, fetched
# with the machine's Maven) and runs on the machine's Java 17. PostgreSQL comes
# from Debian's packages. Settings (environment, all optional):
#   HERALD_CACHE_DIR     where jars, Kafka data and logs live (default: <repo>/.cache)
#   HERALD_KAFKA_VERSION Kafka release to fetch (default: the pom's)
#   HERALD_KAFKA_PORT    first Kafka port, P above (default: 9092)
#   HERALD_PGDATA        PostgreSQL data directory (default: /var/lib/herald/postgresql)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${HERALD_CACHE_DIR:-$ROOT/.cache}
KAFKA_HOME=$CACHE/kafka
KAFKA_VERSION=${HERALD_KAFKA_VERSION:-$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$ROOT/scripts/kafka/pom.xml")}
KAFKA_LIBS=$KAFKA_HOME/libs-$KAFKA_VERSION
KAFKA_DATA=$KAFKA_HOME/data
KAFKA_LOGS=$KAFKA_HOME/logs
KAFKA_PID=$KAFKA_HOME/kafka.pid
KAFKA_PORT=${HERALD_KAFKA_PORT:-9092}
if ! [[ "$KAFKA_PORT" =~ ^[0-9]+$ ]] || ((KAFKA_PORT < 1024 || KAFKA_PORT > 65500)); then
  echo "HERALD_KAFKA_PORT must be a port number from 1024 to 65500 (got '$KAFKA_PORT')" >&2
  exit 2
fi
KAFKA_CONTROLLER_PORT=$((KAFKA_PORT + 1))
KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT
# --kafka-nodes: how many nodes `up` was asked for (empty: keep what runs),
# and how many the last `up` started.
KAFKA_NODES=
KAFKA_NODES_FILE=$KAFKA_HOME/nodes
KAFKA_CLUSTER=$KAFKA_HOME/cluster

PG_PORT=5432
PG_DATA=${HERALD_PGDATA:-/var/lib/herald/postgresql}
PG_LOG=$(dirname "$PG_DATA")/postgresql.log
PG_SOCKET_DIR=/var/run/postgresql
PG_MARKER=$CACHE/postgres.started
PG_USER=herald
PG_PASSWORD=herald
PG_DB=herald
DATABASE_URL="postgres://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"

# --secure: throwaway test credentials, printed by `env` (never use them
# anywhere else).
TLS_DIR=$CACHE/tls
TLS_CA=$TLS_DIR/ca.crt
KAFKA_SECURE_PORT=$((KAFKA_PORT + 2))
KAFKA_SECURE_BROKERS=127.0.0.1:$KAFKA_SECURE_PORT
KAFKA_SASL_MECHANISM=SCRAM-SHA-512
KAFKA_SASL_USERNAME=herald
KAFKA_SASL_PASSWORD=herald-scram-secret
KAFKA_MODE=$KAFKA_HOME/mode
PG_TLS_USER=herald_tls
PG_TLS_PASSWORD=herald-tls-secret
DATABASE_URL_TLS="postgres://$PG_TLS_USER:$PG_TLS_PASSWORD@localhost:$PG_PORT/$PG_DB?sslmode=verify-full&sslrootcert=$TLS_CA"
SECURE=0

log() { printf '[services] %s\n' "$*" >&2; }
fail() {
  # $1 = step, $2 = log file to read
  log "FAILED: $1"
  if [[ -n "${2:-}" ]]; then
    log "log: $2"
    if [[ -f "$2" ]]; then tail -n 30 "$2" | sed 's/^/[services]   | /' >&2; fi
  fi
  exit 1
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pg_bindir() {
  local ctl
  ctl=$(ls -d /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | sort -V | tail -n 1 || true)
  [[ -n "$ctl" ]] && dirname "$ctl"
}

as_postgres() { runuser -u postgres -- "$@"; }

# ---------------------------------------------------------------- TLS

# A CA and one server certificate (127.0.0.1 and localhost), made once. The
# PKCS#12 keystore is the same key and certificate for Kafka's JVM.
tls_material() {
  if [[ -f "$TLS_DIR/.complete" ]]; then return 0; fi
  command -v openssl >/dev/null || fail "tls: openssl not found"
  rm -rf "$TLS_DIR" && mkdir -p "$TLS_DIR"
  log "tls: making a throwaway CA and a server certificate in $TLS_DIR"
  {
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=herald test CA" \
      -keyout "$TLS_DIR/ca.key" -out "$TLS_CA" &&
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
      -keyout "$TLS_DIR/server.key" -out "$TLS_DIR/server.csr" &&
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$TLS_DIR/server.ext" &&
    openssl x509 -req -in "$TLS_DIR/server.csr" -CA "$TLS_CA" -CAkey "$TLS_DIR/ca.key" \
      -CAcreateserial -days 3650 -extfile "$TLS_DIR/server.ext" -out "$TLS_DIR/server.crt" &&
    openssl pkcs12 -export -in "$TLS_DIR/server.crt" -inkey "$TLS_DIR/server.key" \
      -name kafka -passout pass:herald-keystore -out "$TLS_DIR/server.p12"
  } >"$TLS_DIR/make.log" 2>&1 || fail "tls: openssl" "$TLS_DIR/make.log"
  # PostgreSQL refuses a key that others can read.
  cp "$TLS_DIR/server.key" "$TLS_DIR/postgres.key" && cp "$TLS_DIR/server.crt" "$TLS_DIR/postgres.crt"
  chown postgres:postgres "$TLS_DIR/postgres.key" "$TLS_DIR/postgres.crt" 2>/dev/null || true
  chmod 600 "$TLS_DIR/postgres.key"
  touch "$TLS_DIR/.complete"
}

# ---------------------------------------------------------------- Kafka

# A short-lived Kafka tool run with its own quiet logging configuration.
kafka_tool() {
  java -Xmx256m -Dlog4j2.configurationFile="$ROOT/scripts/kafka/tools-log4j2.properties" \
    -cp "$KAFKA_LIBS/*" "$@"
}

kafka_install() {
  if [[ -f "$KAFKA_LIBS/.complete" ]]; then return 0; fi
  command -v java >/dev/null || fail "kafka install: java not found (Java 17 is required)"
  command -v mvn >/dev/null || fail "kafka install: mvn not found"
  mkdir -p "$KAFKA_HOME"
  log "kafka: fetching Apache Kafka $KAFKA_VERSION from Maven Central (first time only)"
  rm -rf "$KAFKA_LIBS"
  (cd "$ROOT/scripts/kafka" && mvn -B -q dependency:copy-dependencies \
      -Dkafka.version="$KAFKA_VERSION" -DincludeScope=runtime \
      -DoutputDirectory="$KAFKA_LIBS") >"$KAFKA_HOME/install.log" 2>&1 \
    || fail "kafka install: mvn dependency:copy-dependencies" "$KAFKA_HOME/install.log"
  ls "$KAFKA_LIBS"/kafka_2.13-*.jar >/dev/null 2>&1 \
    || fail "kafka install: kafka_2.13 jar missing after fetch" "$KAFKA_HOME/install.log"
  touch "$KAFKA_LIBS/.complete"
}

kafka_configure() {
  mkdir -p "$KAFKA_HOME/config" "$KAFKA_LOGS" "$KAFKA_DATA"
  sed "s:@KAFKA_LOGS@:$KAFKA_LOGS:g" "$ROOT/scripts/kafka/log4j2.properties" >"$KAFKA_HOME/config/log4j2.properties"
  sed -e "s:@KAFKA_DATA@:$KAFKA_DATA:g" \
      -e "s:@KAFKA_PORT@:$KAFKA_PORT:g" \
      -e "s:@KAFKA_CONTROLLER_PORT@:$KAFKA_CONTROLLER_PORT:g" \
      "$ROOT/scripts/kafka/server.properties" >"$KAFKA_HOME/config/server.properties"
  if ((SECURE)); then
    # Later keys win in a Java properties file: this block widens the
    # listeners of the template above.
    cat >>"$KAFKA_HOME/config/server.properties" <<PROPERTIES

# --secure (scripts/services.sh): a SASL_SSL listener beside the plaintext one.
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT,SASL_SSL://127.0.0.1:$KAFKA_SECURE_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,SASL_SSL://127.0.0.1:$KAFKA_SECURE_PORT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL
sasl.enabled.mechanisms=$KAFKA_SASL_MECHANISM
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PKCS12
ssl.keystore.location=$TLS_DIR/server.p12
ssl.keystore.password=herald-keystore
ssl.key.password=herald-keystore
PROPERTIES
  fi
}

kafka_running_pid() {
  [[ -f "$KAFKA_PID" ]] || return 1
  local pid
  pid=$(cat "$KAFKA_PID")
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

kafka_metadata_ok() {
  kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BROKERS" --list >/dev/null 2>&1
}

# The SCRAM user of the SASL_SSL listener, set through the plaintext one
# (KRaft keeps SCRAM credentials in its metadata log; setting it again is a
# no-op change).
kafka_scram_user() {
  kafka_tool org.apache.kafka.tools.ConfigCommand --bootstrap-server "$KAFKA_BROKERS" --alter \
    --add-config "$KAFKA_SASL_MECHANISM=[iterations=4096,password=$KAFKA_SASL_PASSWORD]" \
    --entity-type users --entity-name "$KAFKA_SASL_USERNAME" >"$KAFKA_LOGS/scram.log" 2>&1 \
    || fail "kafka: creating the SCRAM user $KAFKA_SASL_USERNAME" "$KAFKA_LOGS/scram.log"
}

kafka_up() {
  if kafka_running_pid >/dev/null; then
    if ((SECURE)) && [[ "$(cat "$KAFKA_MODE" 2>/dev/null)" != secure ]]; then
      # Started without the SASL_SSL listener: restart with it (data kept).
      log "kafka: restarting with the SASL_SSL listener (--secure)"
      kafka_down
    else
      log "kafka: already running (pid $(cat "$KAFKA_PID"))"
      return 0
    fi
  fi
  if port_open "$KAFKA_PORT"; then
    # Not ours, but usable if it speaks Kafka: use it instead of fighting for the port.
    kafka_install
    kafka_metadata_ok || fail "kafka: port $KAFKA_PORT is taken by something that does not answer a Kafka metadata request"
    log "kafka: a broker not started by this script already answers on $KAFKA_BROKERS; using it"
    return 0
  fi
  kafka_install
  kafka_configure
  if [[ ! -f "$KAFKA_DATA/meta.properties" ]]; then
    local cluster_id
    cluster_id=$(kafka_tool kafka.tools.StorageTool random-uuid 2>"$KAFKA_LOGS/format.log") \
      || fail "kafka: StorageTool random-uuid" "$KAFKA_LOGS/format.log"
    kafka_tool kafka.tools.StorageTool format --standalone -t "$cluster_id" \
      -c "$KAFKA_HOME/config/server.properties" >>"$KAFKA_LOGS/format.log" 2>&1 \
      || fail "kafka: StorageTool format --standalone" "$KAFKA_LOGS/format.log"
  fi
  log "kafka: starting $KAFKA_VERSION (KRaft, broker+controller) on $KAFKA_BROKERS"
  : >"$KAFKA_LOGS/stdout.log"
  nohup bash -c 'exec "$@"' _ java -Xms512m -Xmx1g -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -Djava.awt.headless=true -Dkafka.logs.dir="$KAFKA_LOGS" \
    -Dlog4j2.configurationFile="$KAFKA_HOME/config/log4j2.properties" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_HOME/config/server.properties" \
    >"$KAFKA_LOGS/stdout.log" 2>&1 </dev/null &
  echo $! >"$KAFKA_PID"
  local deadline=$((SECONDS + 120))
  until grep -q "Kafka Server started" "$KAFKA_LOGS/server.log" 2>/dev/null; do
    kafka_running_pid >/dev/null || fail "kafka: broker process exited during start-up" "$KAFKA_LOGS/server.log"
    ((SECONDS < deadline)) || fail "kafka: not started within 120 s" "$KAFKA_LOGS/server.log"
    sleep 0.5
  done
  until kafka_metadata_ok; do
    ((SECONDS < deadline)) || fail "kafka: no answer to a metadata request within 120 s" "$KAFKA_LOGS/server.log"
    sleep 1
  done
  if ((SECURE)); then
    kafka_scram_user
    until port_open "$KAFKA_SECURE_PORT"; do
      ((SECONDS < deadline)) || fail "kafka: SASL_SSL listener not open within 120 s" "$KAFKA_LOGS/server.log"
      sleep 0.5
    done
    echo secure >"$KAFKA_MODE"
  else
    echo plain >"$KAFKA_MODE"
  fi
  log "kafka: up (log: $KAFKA_LOGS/server.log)"
}

kafka_down() {
  local pid
  if ! pid=$(kafka_running_pid); then
    log "kafka: not running (not started by this script)"
    rm -f "$KAFKA_PID"
    return 0
  fi
  log "kafka: stopping pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then
    log "kafka: still running after 30 s, killing"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$KAFKA_PID"
}

# ---------------------------------------------------------------- Kafka, three nodes

CLUSTER_SIZE=3

node_home() { echo "$KAFKA_CLUSTER/node-$1"; }
node_port() { echo $((KAFKA_PORT + 10 * ($1 - 1))); }

# host:port of every node, `offset` above its plaintext port (0 plaintext,
# 1 controller, 2 SASL_SSL), comma-separated.
cluster_list() {
  local n list=""
  for n in $(seq 1 "$CLUSTER_SIZE"); do
    list+="${list:+,}127.0.0.1:$(($(node_port "$n") + $1))"
  done
  echo "$list"
}

# How many nodes the last `up` started (1 when it never said).
remembered_nodes() {
  local nodes
  nodes=$(cat "$KAFKA_NODES_FILE" 2>/dev/null || true)
  echo "${nodes:-1}"
}

node_running_pid() {
  local file pid
  file=$(node_home "$1")/kafka.pid
  [[ -f "$file" ]] || return 1
  pid=$(cat "$file")
  # A node just killed may linger a moment as a zombie: not running.
  kill -0 "$pid" 2>/dev/null && [[ "$(ps -o stat= -p "$pid" 2>/dev/null)" != Z* ]] && echo "$pid"
}

# True when any node of the cluster runs.
cluster_running() {
  local n
  for n in $(seq 1 "$CLUSTER_SIZE"); do
    if node_running_pid "$n" >/dev/null; then return 0; fi
  done
  return 1
}

cluster_configure() {
  local n home port controller quorum
  quorum=$(cluster_list 1)
  for n in $(seq 1 "$CLUSTER_SIZE"); do
    home=$(node_home "$n")
    port=$(node_port "$n")
    controller=$((port + 1))
    mkdir -p "$home/config" "$home/logs" "$home/data"
    sed "s:@KAFKA_LOGS@:$home/logs:g" "$ROOT/scripts/kafka/log4j2.properties" >"$home/config/log4j2.properties"
    # The single node's template, then this node's identity and replication
    # settings (later keys win in a Java properties file).
    sed -e "s:@KAFKA_DATA@:$home/data:g" \
        -e "s:@KAFKA_PORT@:$port:g" \
        -e "s:@KAFKA_CONTROLLER_PORT@:$controller:g" \
        "$ROOT/scripts/kafka/server.properties" >"$home/config/server.properties"
    cat >>"$home/config/server.properties" <<PROPERTIES

# --kafka-nodes $CLUSTER_SIZE (scripts/services.sh): node $n of a replicated cluster.
node.id=$n
controller.quorum.bootstrap.servers=$quorum
# Three replicas, and a write acknowledged by all in-sync replicas (acks=all)
# is on at least two of them: one node may be lost without losing it.
default.replication.factor=3
min.insync.replicas=2
offsets.topic.replication.factor=3
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
PROPERTIES
    if ((SECURE)); then
      cat >>"$home/config/server.properties" <<PROPERTIES

# --secure (scripts/services.sh): a SASL_SSL listener beside the plaintext one.
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller,SASL_SSL://127.0.0.1:$((port + 2))
advertised.listeners=PLAINTEXT://127.0.0.1:$port,SASL_SSL://127.0.0.1:$((port + 2))
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL
sasl.enabled.mechanisms=$KAFKA_SASL_MECHANISM
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PKCS12
ssl.keystore.location=$TLS_DIR/server.p12
ssl.keystore.password=herald-keystore
ssl.key.password=herald-keystore
PROPERTIES
    fi
  done
}

# Formats all three data directories for one new cluster, unless all three
# already are: a partly formatted cluster (an interrupted first `up`) would
# have nodes with different cluster ids, so it starts over.
cluster_format() {
  local n formatted=0 home
  for n in $(seq 1 "$CLUSTER_SIZE"); do
    [[ -f "$(node_home "$n")/data/meta.properties" ]] && formatted=$((formatted + 1))
  done
  ((formatted == CLUSTER_SIZE)) && return 0
  local format_log=$KAFKA_CLUSTER/format.log cluster_id voters="" dir_id
  : >"$format_log"
  cluster_id=$(kafka_tool kafka.tools.StorageTool random-uuid 2>>"$format_log") \
    || fail "kafka: StorageTool random-uuid" "$format_log"
  # The initial voters: every controller by id, endpoint and the directory
  # id its metadata log will have; each node is formatted with the same list.
  for n in $(seq 1 "$CLUSTER_SIZE"); do
    dir_id=$(kafka_tool kafka.tools.StorageTool random-uuid 2>>"$format_log") \
      || fail "kafka: StorageTool random-uuid" "$format_log"
    voters+="${voters:+,}$n@127.0.0.1:$(($(node_port "$n") + 1)):$dir_id"
  done
  for n in $(seq 1 "$CLUSTER_SIZE"); do
    home=$(node_home "$n")
    rm -rf "$home/data" && mkdir -p "$home/data"
    kafka_tool kafka.tools.StorageTool format -t "$cluster_id" --initial-controllers "$voters" \
      -c "$home/config/server.properties" >>"$format_log" 2>&1 \
      || fail "kafka: StorageTool format --initial-controllers (node $n)" "$format_log"
  done
}

# The quorum's leader id and voter count, e.g. "1 3" ("-1 0" when unknown).
cluster_quorum() {
  kafka_tool org.apache.kafka.tools.MetadataQuorumCommand --bootstrap-server "$(cluster_list 0)" \
    describe --status 2>/dev/null | awk '
      /^LeaderId:/ { leader = $2 }
      /^CurrentVoters:/ { voters = gsub(/"id":/, "") }
      END { print (leader == "" ? -1 : leader), voters + 0 }'
}

cluster_up() {
  if cluster_running; then
    if ((SECURE)) && [[ "$(cat "$KAFKA_MODE" 2>/dev/null)" != secure ]]; then
      log "kafka: restarting the cluster with the SASL_SSL listeners (--secure)"
      cluster_down
    elif [[ "$(cluster_pids | wc -w)" -eq $CLUSTER_SIZE ]]; then
      log "kafka: cluster already running (pids $(cluster_pids))"
      return 0
    elif [[ "$(cat "$KAFKA_MODE" 2>/dev/null)" == secure ]]; then
      # A node that died (or was killed) comes back into the running
      # cluster with its data, as its peers run: with their listeners.
      SECURE=1
      tls_material
    fi
  fi
  local n port
  for n in $(seq 1 "$CLUSTER_SIZE"); do
    node_running_pid "$n" >/dev/null && continue
    port=$(node_port "$n")
    for port in "$port" $((port + 1)) $((port + 2)); do
      port_open "$port" && fail "kafka: port $port (node $n of the cluster) is taken by something this script did not start; stop it, or set HERALD_KAFKA_PORT (the cluster uses $(cluster_list 0))"
    done
  done
  kafka_install
  cluster_configure
  if ! cluster_running; then cluster_format; fi
  log "kafka: starting $KAFKA_VERSION, $CLUSTER_SIZE nodes (KRaft, broker+controller each) on $(cluster_list 0)"
  local home
  for n in $(seq 1 "$CLUSTER_SIZE"); do
    if node_running_pid "$n" >/dev/null; then
      log "kafka: node $n already running (pid $(node_running_pid "$n"))"
      continue
    fi
    home=$(node_home "$n")
    # A restarted node's old log would tell the wait below it has started.
    if [[ -f "$home/logs/server.log" ]]; then mv "$home/logs/server.log" "$home/logs/server.log.previous"; fi
    : >"$home/logs/stdout.log"
    # A smaller heap than the single node's: three JVMs share the machine.
    nohup bash -c 'exec "$@"' _ java -Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
      -Djava.awt.headless=true -Dkafka.logs.dir="$home/logs" \
      -Dlog4j2.configurationFile="$home/config/log4j2.properties" \
      -cp "$KAFKA_LIBS/*" kafka.Kafka "$home/config/server.properties" \
      >"$home/logs/stdout.log" 2>&1 </dev/null &
    echo $! >"$home/kafka.pid"
  done
  # A broker reports started once the quorum has a leader and has let it in.
  local deadline=$((SECONDS + 180))
  for n in $(seq 1 "$CLUSTER_SIZE"); do
    home=$(node_home "$n")
    until grep -q "Kafka Server started" "$home/logs/server.log" 2>/dev/null; do
      node_running_pid "$n" >/dev/null || fail "kafka: node $n exited during start-up" "$home/logs/server.log"
      ((SECONDS < deadline)) || fail "kafka: node $n not started within 180 s" "$home/logs/server.log"
      sleep 0.5
    done
  done
  local quorum
  until quorum=$(cluster_quorum) && [[ "${quorum% *}" -ge 1 && "${quorum#* }" -eq $CLUSTER_SIZE ]]; do
    ((SECONDS < deadline)) || fail "kafka: the controller quorum has no leader with $CLUSTER_SIZE voters within 180 s (leader, voters: $quorum)" "$(node_home 1)/logs/server.log"
    sleep 1
  done
  until KAFKA_BROKERS=$(cluster_list 0) kafka_metadata_ok; do
    ((SECONDS < deadline)) || fail "kafka: no answer to a metadata request within 180 s" "$(node_home 1)/logs/server.log"
    sleep 1
  done
  if ((SECURE)); then
    KAFKA_BROKERS=$(cluster_list 0) KAFKA_LOGS=$KAFKA_CLUSTER kafka_scram_user
    for n in $(seq 1 "$CLUSTER_SIZE"); do
      until port_open $(($(node_port "$n") + 2)); do
        ((SECONDS < deadline)) || fail "kafka: SASL_SSL listener of node $n not open within 180 s" "$(node_home "$n")/logs/server.log"
        sleep 0.5
      done
    done
    echo secure >"$KAFKA_MODE"
  else
    echo plain >"$KAFKA_MODE"
  fi
  echo "$CLUSTER_SIZE" >"$KAFKA_NODES_FILE"
  log "kafka: cluster up, quorum leader node ${quorum% *} (logs: $KAFKA_CLUSTER/node-*/logs/server.log)"
}

cluster_pids() {
  local n pid pids=""
  for n in $(seq 1 "$CLUSTER_SIZE"); do
    pid=$(node_running_pid "$n") && pids+="${pids:+ }$pid"
  done
  echo "$pids"
}

# Stops every node at once: one by one, the last nodes would wait for a
# quorum that is already gone before they give up their controlled shutdown.
cluster_down() {
  local pids pid
  pids=$(cluster_pids)
  if [[ -z "$pids" ]]; then
    log "kafka: cluster not running"
  else
    log "kafka: stopping the cluster (pids $pids)"
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 60); do
      [[ -z "$(cluster_pids)" ]] && break
      sleep 0.5
    done
    pids=$(cluster_pids)
    if [[ -n "$pids" ]]; then
      log "kafka: still running after 30 s, killing $pids"
      # shellcheck disable=SC2086
      kill -KILL $pids 2>/dev/null || true
    fi
  fi
  local n
  for n in $(seq 1 "$CLUSTER_SIZE"); do rm -f "$(node_home "$n")/kafka.pid"; done
}

# `up`'s Kafka: the node count asked for, else the one that runs, else one
# node. Another count than what runs stops that first (the single node and
# node 1 of the cluster share their ports).
kafka_start() {
  local running=0 want
  if cluster_running; then running=$CLUSTER_SIZE; elif kafka_running_pid >/dev/null; then running=1; fi
  want=${KAFKA_NODES:-$((running > 0 ? running : 1))}
  if ((running > 0 && running != want)); then
    log "kafka: $running node(s) running, $want asked for (--kafka-nodes $want): stopping them first"
    if ((running == 1)); then kafka_down; else cluster_down; fi
  fi
  if ((want == 1)); then
    kafka_up
    echo 1 >"$KAFKA_NODES_FILE"
  else
    cluster_up
  fi
}

# ---------------------------------------------------------------- PostgreSQL

pg_ready() { "${1:-pg_isready}" -h 127.0.0.1 -p "$PG_PORT" -q 2>/dev/null; }

pg_install() {
  if [[ -n "$(pg_bindir)" ]]; then return 0; fi
  log "postgres: installing from Debian's packages (first time only)"
  mkdir -p "$CACHE"
  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql postgresql-contrib; } \
    >"$CACHE/postgres-install.log" 2>&1 \
    || fail "postgres install: apt-get install postgresql" "$CACHE/postgres-install.log"
  [[ -n "$(pg_bindir)" ]] || fail "postgres install: no pg_ctl after install" "$CACHE/postgres-install.log"
}

pg_start_own() {
  local bin
  bin=$(pg_bindir)
  mkdir -p "$PG_SOCKET_DIR" "$(dirname "$PG_DATA")"
  chown postgres:postgres "$PG_SOCKET_DIR" "$(dirname "$PG_DATA")"
  if [[ ! -f "$PG_DATA/PG_VERSION" ]]; then
    log "postgres: initdb $PG_DATA"
    # initdb refuses to run as root.
    as_postgres "$bin/initdb" -D "$PG_DATA" -U postgres -E UTF8 --no-locale \
      --auth-local=peer --auth-host=scram-sha-256 >"$PG_DATA.initdb.log" 2>&1 \
      || fail "postgres: initdb" "$PG_DATA.initdb.log"
  fi
  touch "$PG_LOG" && chown postgres:postgres "$PG_LOG"
  # TLS is switched on by pg_secure after every start, with this checkout's
  # certificate: settings left by an earlier one may name files that are
  # gone, and the server would refuse to start.
  if [[ -f "$PG_DATA/postgresql.auto.conf" ]]; then
    sed -i -E '/^(ssl|ssl_cert_file|ssl_key_file) = /d' "$PG_DATA/postgresql.auto.conf"
  fi
  log "postgres: starting $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT"
  # Durable defaults (fsync, synchronous_commit on): tests relax durability
  # per session themselves; benchmarks never do.
  as_postgres "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=$PG_SOCKET_DIR -c max_connections=400 -c shared_buffers=256MB -c shared_preload_libraries=pg_stat_statements" \
    >/dev/null 2>&1 || fail "postgres: pg_ctl start" "$PG_LOG"
  mkdir -p "$CACHE"
  echo "$PG_DATA" >"$PG_MARKER"
}

# SQL that creates login role $1 with password $2 (CREATEDB), or sets the
# password and rights of the role if it exists.
pg_role_sql() {
  printf '%s\n' "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$1') THEN
        CREATE ROLE $1 LOGIN CREATEDB PASSWORD '$2';
      ELSE
        ALTER ROLE $1 LOGIN CREATEDB PASSWORD '$2';
      END IF;
    END \$\$;"
}

pg_provision() {
  if PGPASSWORD=$PG_PASSWORD psql "$DATABASE_URL" -Atqc 'select 1' >/dev/null 2>&1; then return 0; fi
  log "postgres: creating role $PG_USER and database $PG_DB"
  as_postgres psql -h "$PG_SOCKET_DIR" -p "$PG_PORT" -v ON_ERROR_STOP=1 -Atqc "$(pg_role_sql "$PG_USER" "$PG_PASSWORD")" >"$CACHE/postgres-provision.log" 2>&1 \
    || fail "postgres: create role $PG_USER (as the postgres user over $PG_SOCKET_DIR)" "$CACHE/postgres-provision.log"
  if ! as_postgres psql -h "$PG_SOCKET_DIR" -p "$PG_PORT" -Atqc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'" | grep -q 1; then
    as_postgres psql -h "$PG_SOCKET_DIR" -p "$PG_PORT" -v ON_ERROR_STOP=1 -qc "CREATE DATABASE $PG_DB OWNER $PG_USER" \
      >>"$CACHE/postgres-provision.log" 2>&1 || fail "postgres: create database $PG_DB" "$CACHE/postgres-provision.log"
  fi
  PGPASSWORD=$PG_PASSWORD psql "$DATABASE_URL" -Atqc 'select 1' >/dev/null 2>&1 \
    || fail "postgres: cannot connect as $DATABASE_URL" "$PG_LOG"
}

# pg_stat_statements in template1, so that every database created from it
# (herald-bench's, one per run) counts its statements: `herald-bench
# orders` reports statements per order from it. Our own server preloads the
# library; another server may not, and then the benchmark reports none.
pg_statements() {
  as_postgres psql -h "$PG_SOCKET_DIR" -p "$PG_PORT" -d template1 -v ON_ERROR_STOP=1 -Atqc \
    'CREATE EXTENSION IF NOT EXISTS pg_stat_statements' >"$CACHE/postgres-statements.log" 2>&1 \
    || log "postgres: no pg_stat_statements (see $CACHE/postgres-statements.log); herald-bench orders reports no statements"
}

# ssl = on with the throwaway certificate (a reload applies it), and a role
# that pg_hba.conf lets in over TLS only, so a test that reaches the database
# as it proves the connection was encrypted.
pg_secure() {
  local data hba
  data=$(cat "$PG_MARKER" 2>/dev/null || echo "$PG_DATA")
  hba=$data/pg_hba.conf
  [[ -f "$hba" ]] || fail "postgres --secure: $hba not found (a server not started by this script cannot be reconfigured)"
  as_postgres psql -h "$PG_SOCKET_DIR" -p "$PG_PORT" -v ON_ERROR_STOP=1 -Atq >"$CACHE/postgres-secure.log" 2>&1 <<SQL || fail "postgres --secure: ssl settings and role $PG_TLS_USER" "$CACHE/postgres-secure.log"
ALTER SYSTEM SET ssl = on;
ALTER SYSTEM SET ssl_cert_file = '$TLS_DIR/postgres.crt';
ALTER SYSTEM SET ssl_key_file = '$TLS_DIR/postgres.key';
$(pg_role_sql "$PG_TLS_USER" "$PG_TLS_PASSWORD")
GRANT $PG_USER TO $PG_TLS_USER;
SQL
  if ! grep -q "herald --secure" "$hba"; then
    { printf '# herald --secure: %s connects over TLS only\n' "$PG_TLS_USER"
      printf 'hostnossl all %s 127.0.0.1/32 reject\n' "$PG_TLS_USER"
      printf 'hostnossl all %s ::1/128 reject\n' "$PG_TLS_USER"
      cat "$hba"; } >"$hba.new" && chown postgres:postgres "$hba.new" && mv "$hba.new" "$hba"
  fi
  as_postgres psql -h "$PG_SOCKET_DIR" -p "$PG_PORT" -Atqc 'SELECT pg_reload_conf()' >>"$CACHE/postgres-secure.log" 2>&1 \
    || fail "postgres --secure: reload" "$CACHE/postgres-secure.log"
  local deadline=$((SECONDS + 30))
  until [[ "$(as_postgres psql -h "$PG_SOCKET_DIR" -p "$PG_PORT" -Atqc 'SHOW ssl' 2>/dev/null)" == on ]]; do
    ((SECONDS < deadline)) || fail "postgres --secure: ssl still off after a reload" "$PG_LOG"
    sleep 0.2
  done
}

pg_up() {
  mkdir -p "$CACHE"
  pg_install
  if pg_ready "$(pg_bindir)/pg_isready"; then
    log "postgres: already accepting connections on 127.0.0.1:$PG_PORT"
  else
    pg_start_own
  fi
  local deadline=$((SECONDS + 60))
  until pg_ready "$(pg_bindir)/pg_isready"; do
    ((SECONDS < deadline)) || fail "postgres: not accepting connections within 60 s" "$PG_LOG"
    sleep 0.5
  done
  pg_provision
  pg_statements
  if ((SECURE)); then pg_secure; fi
  log "postgres: up (log: $PG_LOG)"
}

pg_down() {
  if [[ ! -f "$PG_MARKER" ]]; then
    log "postgres: not started by this script; leaving it alone"
    return 0
  fi
  local data bin
  data=$(cat "$PG_MARKER")
  bin=$(pg_bindir)
  log "postgres: stopping ($data)"
  as_postgres "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || log "postgres: was not running"
  rm -f "$PG_MARKER"
}

# ---------------------------------------------------------------- commands

print_env() {
  local brokers=$KAFKA_BROKERS secure_brokers=$KAFKA_SECURE_BROKERS
  if (($(remembered_nodes) > 1)); then
    brokers=$(cluster_list 0) secure_brokers=$(cluster_list 2)
  fi
  echo "KAFKA_BROKERS=$brokers"
  echo "DATABASE_URL=$DATABASE_URL"
  if [[ "$(cat "$KAFKA_MODE" 2>/dev/null)" == secure ]]; then
    # A client of the secure services passes these librdkafka settings
    # (orders: --kafka-setting key=value, or KAFKA_SETTINGS=k=v,k=v) and
    # DATABASE_URL_TLS as its DATABASE_URL.
    echo "KAFKA_SECURE_BROKERS=$secure_brokers"
    echo "KAFKA_SECURITY_PROTOCOL=SASL_SSL"
    echo "KAFKA_SASL_MECHANISM=$KAFKA_SASL_MECHANISM"
    echo "KAFKA_SASL_USERNAME=$KAFKA_SASL_USERNAME"
    echo "KAFKA_SASL_PASSWORD=$KAFKA_SASL_PASSWORD"
    echo "HERALD_TLS_CA=$TLS_CA"
    echo "DATABASE_URL_TLS=$DATABASE_URL_TLS"
  fi
}

# The cluster's line for `status`, and whether all its nodes run.
cluster_status() {
  local n pid running="" stopped=""
  for n in $(seq 1 "$CLUSTER_SIZE"); do
    if pid=$(node_running_pid "$n"); then
      running+="${running:+, }node $n pid $pid"
    else
      stopped+="${stopped:+, }node $n"
    fi
  done
  local secure=""
  [[ "$(cat "$KAFKA_MODE" 2>/dev/null)" == secure ]] && secure=", SASL_SSL on $(cluster_list 2)"
  if [[ -z "$stopped" ]]; then
    echo "kafka:    running, $CLUSTER_SIZE nodes ($running; $(cluster_list 0)$secure, version $KAFKA_VERSION, logs $KAFKA_CLUSTER/node-*/logs/server.log)"
  else
    echo "kafka:    degraded, $CLUSTER_SIZE-node cluster with $stopped stopped (${running:-no node running}; logs $KAFKA_CLUSTER/node-*/logs/server.log)"
    return 1
  fi
}

status() {
  local rc=0 pid
  if cluster_running; then
    cluster_status || rc=1
  elif pid=$(kafka_running_pid); then
    local secure=""
    [[ "$(cat "$KAFKA_MODE" 2>/dev/null)" == secure ]] && secure=", SASL_SSL on $KAFKA_SECURE_BROKERS"
    echo "kafka:    running (pid $pid, $KAFKA_BROKERS$secure, version $KAFKA_VERSION, log $KAFKA_LOGS/server.log)"
  elif port_open "$KAFKA_PORT"; then
    echo "kafka:    something not started by this script listens on $KAFKA_BROKERS"
  else
    echo "kafka:    stopped"; rc=1
  fi
  local bin
  bin=$(pg_bindir || true)
  if [[ -n "$bin" ]] && pg_ready "$bin/pg_isready"; then
    if [[ -f "$PG_MARKER" ]]; then
      echo "postgres: running (127.0.0.1:$PG_PORT, data $(cat "$PG_MARKER"), log $PG_LOG)"
    else
      echo "postgres: running (127.0.0.1:$PG_PORT, not started by this script)"
    fi
  else
    echo "postgres: stopped${bin:+}"; rc=1
  fi
  return $rc
}

case "${1:-}" in
  up)
    shift
    while (($#)); do
      case "$1" in
        --secure) SECURE=1 ;;
        --kafka-nodes=*) KAFKA_NODES=${1#*=} ;;
        --kafka-nodes)
          (($# > 1)) || { echo "$0 up: --kafka-nodes needs a node count (1 or 3)" >&2; exit 2; }
          KAFKA_NODES=$2; shift ;;
        *) echo "usage: $0 up [--secure] [--kafka-nodes 1|3]" >&2; exit 2 ;;
      esac
      shift
    done
    case "$KAFKA_NODES" in
      "" | 1 | 3) ;;
      *) echo "$0 up: --kafka-nodes must be 1 (one combined node) or 3 (a replicated cluster), not '$KAFKA_NODES'" >&2; exit 2 ;;
    esac
    started=$SECONDS
    if ((SECURE)); then tls_material; fi
    pg_up
    kafka_start
    log "ready in $((SECONDS - started)) s; use:"
    print_env
    ;;
  down)
    if cluster_running; then cluster_down; else kafka_down; fi
    pg_down
    ;;
  status) status ;;
  env) print_env ;;
  *)
    echo "usage: $0 up [--secure] [--kafka-nodes 1|3]|down|status|env" >&2
    exit 2
    ;;
esac
