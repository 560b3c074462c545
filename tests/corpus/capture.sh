#!/bin/sh
# Re-captures the ClientHello corpus: each client connects to capture.py,
# which keeps its first flight's records. Needs curl, openssl, python3, go
# and chromium (Debian packages). The name is one the test policy allows.
set -eu
cd "$(dirname "$0")"
NAME=capture.allowed.test
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

capture() { # OUT, then the client command with PORT in it
    out=$1; shift
    rm -f "$tmp/port"
    python3 capture.py "$tmp/port" "$out" &
    pid=$!
    while [ ! -s "$tmp/port" ]; do sleep 0.1; done
    PORT=$(cat "$tmp/port")
    eval "$*" >/dev/null 2>&1 || true
    wait $pid
    echo "$out: $(wc -c < "$out") bytes"
}

capture curl.bin 'curl -sk --max-time 5 --connect-to $NAME:443:127.0.0.1:$PORT https://$NAME/'
capture openssl-tls13.bin 'openssl s_client -connect 127.0.0.1:$PORT -servername $NAME -tls1_3 </dev/null'
capture openssl-tls12.bin 'openssl s_client -connect 127.0.0.1:$PORT -servername $NAME -tls1_2 </dev/null'
capture python.bin 'python3 -c "import socket,ssl; ssl.create_default_context().wrap_socket(socket.create_connection((\"127.0.0.1\", $PORT)), server_hostname=\"$NAME\")"'
capture go.bin 'go run hello.go 127.0.0.1:$PORT $NAME'
capture chromium.bin 'timeout 20 chromium --headless=new --no-sandbox --disable-gpu --user-data-dir=$tmp/chromium --host-resolver-rules="MAP $NAME 127.0.0.1:$PORT" https://$NAME/'
