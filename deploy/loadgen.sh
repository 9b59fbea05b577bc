#!/bin/sh
# run-loadgen HOST:PORT CLIENT_DIR: every benchmark mode against the stack's proxy, one
# JSON line each (see benchmarks/README.md for what the figures mean).
set -eu
target=$1
dir=$2
host=${target%:*}
port=${target##*:}
addr=$(getent hosts "$host" | cut -d' ' -f1 | head -n1)
for mode in full resumed keepalive; do
    loadgen --connect "$addr:$port" --sni "$host" --ca "$dir/ca.crt" \
        --cert "$dir/loadgen.crt" --key "$dir/loadgen.key" \
        --mode "$mode" --duration "${DURATION:-10}" --concurrency 32
done
