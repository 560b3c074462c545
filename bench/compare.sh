#!/bin/bash
# Side-by-side load comparison of snigress with HAProxy, nginx (stream,
# ssl_preread) and sniproxy, and of its CONNECT front with Squid, on
# loopback, on this machine, in one run.
#
#   bench/compare.sh                 # RUNS=3 DURATION=5 by default
#   RUNS=5 DURATION=10 bench/compare.sh
#   SKIP_LOAD=1 IDLE_COUNTS=9000 bench/compare.sh   # idle memory only, added to bench/results.tsv
#   BASELINE=/path/to/older/snigress bench/compare.sh  # also an earlier build, as "snigress-before"
#
# Every proxy does the same job with the same worker count (WORKERS, 1 by
# default: tokio worker threads, nbthread, worker_processes, Squid workers;
# sniproxy is single-threaded): terminate
# the mesh mTLS (mtls targets) or take TLS directly (passthrough targets),
# read the inner SNI, check it against *.allowed.test, resolve it through the
# same DNS server (sniproxy: a static table, it cannot use a DNS port other
# than 53), connect and splice. "direct" is the client talking to the
# upstream without any proxy. The load generator (examples/loadgen.rs) and
# the upstream run in their own processes; each proxy's CPU time is read
# from /proc for its whole process tree. Results: bench/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
DURATION=${DURATION:-5}
WORKERS=${WORKERS:-1}
CONCURRENCY=${CONCURRENCY:-64}
BULK_BYTES=${BULK_BYTES:-1073741824}
# The bulk row: BULK_BYTES shared by this many connections downloading at once.
BULK_STREAMS=${BULK_STREAMS:-4}
LATENCY_RATE=${LATENCY_RATE:-200}
IDLE_COUNTS=${IDLE_COUNTS:-"2000"}
# Concurrent bulk downloads through the passthrough listeners (BULK_BYTES
# shared between them): the zero-copy relay's pipes under many streams.
# (STREAM_COUNTS= skips them.)
STREAM_COUNTS=${STREAM_COUNTS-"1 64 200"}
# The runtime of each snigress process under test gets WORKERS threads.
export TOKIO_WORKER_THREADS=$WORKERS
BASELINE=${BASELINE:-}
# Only these targets (names, space-separated), e.g. ONLY="snigress snigress-proxyv2";
# results then go to RESULTS and REPORT instead of bench/results.{tsv,md}.
ONLY=${ONLY:-}
RESULTS=${RESULTS:-bench/results.tsv}
REPORT=${REPORT:-bench/results.md}

need=""
command -v haproxy >/dev/null || need="$need haproxy"
command -v nginx >/dev/null || need="$need nginx-light libnginx-mod-stream"
command -v sniproxy >/dev/null || need="$need sniproxy"
command -v squid >/dev/null || need="$need squid"
if [ -n "$need" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need
fi
cargo build --release --quiet --bin snigress --example loadgen
LG=$PWD/target/release/examples/loadgen
SNIGRESS=$PWD/target/release/snigress

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_file() { # FILE [SECONDS]
    for _ in $(seq $((${2:-10} * 10))); do [ -s "$1" ] && return 0; sleep 0.1; done
    echo "timeout waiting for $1" >&2; exit 1
}
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

PKI=$work/pki
$LG pki "$PKI"
export LOADGEN_PKI=$PKI
$LG dns "$work/dns.port" & pids+=($!)
$LG upstream "$PKI" "$work/up.port" & pids+=($!)
wait_file "$work/dns.port"; wait_file "$work/up.port"
DNS=$(cat "$work/dns.port"); UP=$(cat "$work/up.port")

SN_MTLS=$(free_port); SN_PT=$(free_port); HA_MTLS=$(free_port); HA_PT=$(free_port)
NG_MTLS=$(free_port); NG_PT=$(free_port); SP_PT=$(free_port)
SB_MTLS=$(free_port); SB_PT=$(free_port); SN_PP=$(free_port)
SN_CX=$(free_port); SQ=$(free_port)

cat > "$work/snigress.yaml" <<YAML
listeners:
  - {name: mtls, address: "127.0.0.1:$SN_MTLS", mode: mtls, upstream_port: $UP}
  - {name: pt, address: "127.0.0.1:$SN_PT", mode: passthrough, upstream_port: $UP}
  # As an Istio ambient waypoint: a PROXY v2 header with the caller's identity first.
  - name: pt-proxy-v2
    address: "127.0.0.1:$SN_PP"
    mode: passthrough
    upstream_port: $UP
    proxy_protocol: {versions: [v2], trusted_sources: [127.0.0.0/8], identity: istio_tlv}
  # An HTTP proxy for HTTPS_PROXY clients, against Squid.
  - {name: connect, address: "127.0.0.1:$SN_CX", mode: passthrough, protocol: connect}
connect: {allowed_ports: [$UP]}
mtls: {cert: pki/gateway.pem, key: pki/gateway.key, client_ca: pki/ca.pem}
policy: {allow: ["*.allowed.test"]}
resolver: {nameservers: ["127.0.0.1:$DNS"], allow_cidrs: [127.0.0.0/8]}
limits: {max_connections: 9500, max_connections_per_source: 9500}
access_log: {path: /dev/null}
YAML

# The same config for the earlier build, on its own ports.
# (Without the PROXY listener: an earlier build may not have it.)
sed -e "s/127.0.0.1:$SN_MTLS/127.0.0.1:$SB_MTLS/" -e "s/127.0.0.1:$SN_PT/127.0.0.1:$SB_PT/" \
    -e '/# As an Istio ambient/,/proxy_protocol:/d' -e '/# An HTTP proxy/,/^connect:/d' \
    "$work/snigress.yaml" > "$work/snigress-before.yaml"

rules="  tcp-request inspect-delay 5s
  tcp-request content reject unless { req.ssl_hello_type 1 }
  tcp-request content set-var(sess.sni) req.ssl_sni,lower
  tcp-request content reject unless { var(sess.sni) -m end .allowed.test }
  tcp-request content do-resolve(sess.dstip,mydns,ipv4) var(sess.sni)
  tcp-request content reject unless { var(sess.dstip) -m found }
  tcp-request content set-dst var(sess.dstip)
  default_backend be"
cat > "$work/haproxy.cfg" <<CFG
global
  nbthread $WORKERS
  maxconn 9500
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
resolvers mydns
  nameserver local 127.0.0.1:$DNS
  hold valid 10s
frontend mtls
  bind 127.0.0.1:$HA_MTLS ssl crt $PKI/gateway-with-key.pem ca-file $PKI/ca.pem verify required
$rules
frontend pt
  bind 127.0.0.1:$HA_PT
$rules
backend be
  server s 0.0.0.0:$UP
CFG

cat > "$work/nginx.conf" <<CFG
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes $WORKERS;
worker_rlimit_nofile 20000;
pid $work/nginx.pid;
events { worker_connections 10000; }
stream {
  resolver 127.0.0.1:$DNS valid=10s ipv6=off;
  map \$ssl_preread_server_name \$target {
    hostnames;
    *.allowed.test \$ssl_preread_server_name:$UP;
    default 127.0.0.1:1;
  }
  server { listen 127.0.0.1:$NG_PT; ssl_preread on; proxy_pass \$target; }
  server {
    listen 127.0.0.1:$NG_MTLS ssl;
    ssl_certificate $PKI/gateway.pem;
    ssl_certificate_key $PKI/gateway.key;
    ssl_client_certificate $PKI/ca.pem;
    ssl_verify_client on;
    ssl_preread on;
    proxy_pass \$target;
  }
}
CFG

cat > "$work/sniproxy.conf" <<CFG
user root
pidfile $work/sniproxy.pid
error_log {
    filename $work/sniproxy-error.log
}
listener 127.0.0.1:$SP_PT {
    protocol tls
    table bench
}
table bench {
    bench\.allowed\.test 127.0.0.1:$UP
}
CFG

# Squid as an HTTPS_PROXY with an allowlist: CONNECT to *.allowed.test on
# the upstream's port only, no cache, no access log (as snigress's goes to
# /dev/null). It resolves from a hosts file: its DNS client talks to port 53
# only (as sniproxy's), which gives it the cheaper lookup.
# (Its workers run as the proxy user: the work directory must be passable.)
chmod 711 "$work"
mkdir -p "$work/squid" && chmod 777 "$work/squid"
printf '127.0.0.1 bench.allowed.test\n' > "$work/squid/hosts"
cat > "$work/squid.conf" <<CFG
http_port 127.0.0.1:$SQ
workers $WORKERS
acl allowed_names dstdomain .allowed.test
acl tunnel_ports port $UP
acl CONNECT method CONNECT
http_access deny !CONNECT
http_access deny !tunnel_ports
http_access allow allowed_names
http_access deny all
hosts_file $work/squid/hosts
dns_nameservers 127.0.0.1
cache deny all
cache_mem 0 MB
access_log none
cache_log $work/squid/cache.log
pid_filename $work/squid/squid.pid
coredump_dir $work/squid
max_filedescriptors 20000
shutdown_lifetime 0 seconds
cache_effective_user proxy
CFG

# Starts every proxy (again), fresh: memory measurements must not inherit
# what an earlier measurement left in a process's allocator.
start_proxies() {
    SNIGRESS_LOG=warn "$SNIGRESS" run --config "$work/snigress.yaml" & SN_PID=$!
    haproxy -db -f "$work/haproxy.cfg" & HA_PID=$!
    nginx -p "$work" -e "$work/nginx-error.log" -c "$work/nginx.conf" -g 'daemon off;' & NG_PID=$!
    sniproxy -f -c "$work/sniproxy.conf" & SP_PID=$!
    squid --foreground -f "$work/squid.conf" & SQ_PID=$!
    pids+=("$SN_PID" "$HA_PID" "$NG_PID" "$SP_PID" "$SQ_PID")
    SB_PID=""
    if [ -n "$BASELINE" ]; then
        SNIGRESS_LOG=warn "$BASELINE" run --config "$work/snigress-before.yaml" & SB_PID=$!
        pids+=("$SB_PID")
        wait_port "$SB_MTLS"; wait_port "$SB_PT"
    fi
    for p in $SN_MTLS $SN_PT $SN_PP $SN_CX $HA_MTLS $HA_PT $NG_MTLS $NG_PT $SP_PT $SQ; do wait_port "$p"; done
    # target name, address, proxy pid (empty: none), m for mTLS, p for a PROXY v2 header first,
    # c for an HTTP CONNECT first
    targets_pt="direct:127.0.0.1:$UP:: snigress:127.0.0.1:$SN_PT:$SN_PID: snigress-proxyv2:127.0.0.1:$SN_PP:$SN_PID:p haproxy:127.0.0.1:$HA_PT:$HA_PID: nginx:127.0.0.1:$NG_PT:$NG_PID: sniproxy:127.0.0.1:$SP_PT:$SP_PID:"
    targets_mtls="snigress:127.0.0.1:$SN_MTLS:$SN_PID:m haproxy:127.0.0.1:$HA_MTLS:$HA_PID:m nginx:127.0.0.1:$NG_MTLS:$NG_PID:m"
    targets_connect="snigress:127.0.0.1:$SN_CX:$SN_PID:c squid:127.0.0.1:$SQ:$SQ_PID:c"
    if [ -n "$BASELINE" ]; then
        targets_pt="$targets_pt snigress-before:127.0.0.1:$SB_PT:$SB_PID:"
        targets_mtls="$targets_mtls snigress-before:127.0.0.1:$SB_MTLS:$SB_PID:m"
    fi
    if [ -n "$ONLY" ]; then
        keep() { local out=""; for t in $1; do case " $ONLY " in *" ${t%%:*} "*) out="$out $t" ;; esac; done; echo "$out"; }
        targets_pt=$(keep "$targets_pt"); targets_mtls=$(keep "$targets_mtls"); targets_connect=$(keep "$targets_connect")
    fi
}
stop_proxies() {
    kill -TERM "$SN_PID" "$HA_PID" "$NG_PID" "$SP_PID" "$SQ_PID" $SB_PID 2>/dev/null || true
    sleep 0.2
    kill -TERM "$SN_PID" $SB_PID 2>/dev/null || true # a second signal: no drain
    wait "$SN_PID" "$HA_PID" "$NG_PID" "$SP_PID" "$SQ_PID" $SB_PID 2>/dev/null || true
}
start_proxies

tree() { echo "$1"; for c in $(pgrep -P "$1" 2>/dev/null); do tree "$c"; done; }
ticks() { # user+system clock ticks of a process tree
    [ -z "$1" ] && { echo 0; return; }
    local t=0
    for p in $(tree "$1"); do
        t=$((t + $(awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo $t
}
rss_kib() { local t=0; for p in $(tree "$1"); do t=$((t + $(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0))); done; echo $t; }

# Raw measurements, kept beside the report (appended to with SKIP_LOAD=1,
# so the idle counts can be measured separately).
results=$RESULTS
[ -n "${SKIP_LOAD:-}" ] || : > "$results"
measure() { # scenario mode target addr pid mtlsflag -- loadgen args
    local scenario=$1 mode=$2 name=$3 addr=$4 pid=$5 flag=$6; shift 6
    local extra=()
    [ "$flag" = m ] && extra=(--mtls "$PKI")
    [ "$flag" = p ] && extra=(--proxy-v2)
    [ "$flag" = c ] && extra=(--connect "$UP")
    local before after out
    before=$(ticks "$pid")
    out=$("$LG" "$@" "${extra[@]}") || out='{"failed":true}'
    after=$(ticks "$pid")
    printf '%s\t%s\t%s\t%s\t%s\n' "$scenario" "$mode" "$name" "$out" "$((after - before))" >> "$results"
    echo "$scenario $mode $name: $out cpu_ticks=$((after - before))" >&2
}
each() { # mode targets -- callback
    local mode=$1 list=$2; shift 2
    for t in $list; do
        IFS=: read -r name host port pid flag <<< "$t"
        "$@" "$mode" "$name" "$host:$port" "$pid" "$flag"
    done
}
rate_one() { measure rate "$1" "$2" "$3" "$4" "$5" rate "$3" "$DURATION" "$CONCURRENCY"; }
bulk_one() { measure bulk "$1" "$2" "$3" "$4" "$5" bulk "$3" "$BULK_BYTES" "$BULK_STREAMS"; }
latency_one() { measure latency "$1" "$2" "$3" "$4" "$5" latency "$3" "$DURATION" "$LATENCY_RATE"; }
streams_one() { measure "streams-$STREAMS" "$1" "$2" "$3" "$4" "$5" bulk "$3" "$BULK_BYTES" "$STREAMS"; }

# Warm-up: one short pass over every target.
for t in $targets_pt $targets_mtls $targets_connect; do
    IFS=: read -r name host port pid flag <<< "$t"
    extra=(); [ "$flag" = m ] && extra=(--mtls "$PKI"); [ "$flag" = p ] && extra=(--proxy-v2)
    [ "$flag" = c ] && extra=(--connect "$UP")
    "$LG" rate "$host:$port" 1 4 "${extra[@]}" > /dev/null
done

for run in $(seq "$RUNS"); do
    [ -n "${SKIP_LOAD:-}" ] && break
    echo "== run $run of $RUNS" >&2
    each passthrough "$targets_pt" rate_one
    each mtls "$targets_mtls" rate_one
    each connect "$targets_connect" rate_one
    each passthrough "$targets_pt" bulk_one
    each mtls "$targets_mtls" bulk_one
    each connect "$targets_connect" bulk_one
    each passthrough "$targets_pt" latency_one
    each mtls "$targets_mtls" latency_one
    each connect "$targets_connect" latency_one
    for STREAMS in $STREAM_COUNTS; do
        each passthrough "$targets_pt" streams_one
    done
done

# Memory per idle established connection: each count and mode measured on
# freshly started proxies, RUNS times.
for _ in $(seq "$RUNS"); do
for count in $IDLE_COUNTS; do
  for mode_targets in pt mtls connect; do
    stop_proxies
    start_proxies
    case $mode_targets in pt) list=$targets_pt ;; mtls) list=$targets_mtls ;; *) list=$targets_connect ;; esac
    for t in $list; do
        IFS=: read -r name host port pid flag <<< "$t"
        [ -z "$pid" ] && continue
        # The PROXY v2 listener lives in the process the plain passthrough
        # target has just grown: its RSS growth would measure nothing.
        [ "$flag" = p ] && continue
        mode=passthrough; extra=()
        [ "$flag" = m ] && { mode=mtls; extra=(--mtls "$PKI"); }
        [ "$flag" = p ] && extra=(--proxy-v2)
        [ "$flag" = c ] && { mode=connect; extra=(--connect "$UP"); }
        before=$(rss_kib "$pid")
        fifo=$work/idle.fifo; rm -f "$fifo"; mkfifo "$fifo"
        "$LG" idle "$host:$port" "$count" "${extra[@]}" < "$fifo" > "$work/idle.out" & lg=$!
        exec 4>"$fifo"
        wait_file "$work/idle.out" 600
        after=$(rss_kib "$pid")
        held=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["held"])' "$work/idle.out")
        exec 4>&-
        wait "$lg" || true
        rm -f "$work/idle.out"
        printf 'idle\t%s\t%s\t{"count":%s,"held":%s,"rss_before_kib":%s,"rss_after_kib":%s}\t0\n' \
            "$mode" "$name" "$count" "$held" "$before" "$after" >> "$results"
        echo "idle $mode $name $count: held $held, RSS $before -> $after KiB" >&2
    done
  done
done
done

python3 bench/report.py "$results" "$(nproc)" "$RUNS" "$DURATION" "$CONCURRENCY" "$BULK_BYTES" "$LATENCY_RATE" \
    "$WORKERS" "$BULK_STREAMS" > "$REPORT"
cat "$REPORT"
