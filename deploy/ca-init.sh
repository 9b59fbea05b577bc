#!/bin/sh
# One-shot: the CA and the first certificates, in the volumes, unless already there.
# Re-running it changes nothing that exists: it is safe on every `docker compose up`.
set -eu
CA=/var/lib/mtlsproxy/ca
CERTS=/var/lib/mtlsproxy/certs
CLIENTS=/var/lib/mtlsproxy/clients
umask 077

if [ ! -f "$CA/ca.crt" ]; then
    mtlsproxy ca init --dir "$CA" --name "${CA_NAME:-mtlsproxy}"
fi
if [ ! -f "$CERTS/server.crt" ]; then
    # The names clients use: the published host name(s), and `proxy` inside the network.
    set -- --dns proxy --dns localhost --ip 127.0.0.1
    for name in ${PROXY_DNS:-}; do set -- "$@" --dns "$name"; done
    mtlsproxy ca issue --dir "$CA" --kind server --name "${PROXY_NAME:-localhost}" "$@" \
        --ttl "${SERVER_TTL:-24h}" --out "$CERTS/server"
fi
# What the proxy and clients trust; renew-server keeps this copy current after rotations.
install -m 0644 "$CA/ca.crt" "$CERTS/ca.crt"
[ -f "$CERTS/deny.txt" ] || install -m 0644 /dev/null "$CERTS/deny.txt"
if [ -d "$CLIENTS" ] && [ ! -f "$CLIENTS/loadgen.crt" ]; then
    mtlsproxy ca issue --dir "$CA" --kind client --name loadgen --ou bench \
        --ttl "${CLIENT_TTL:-24h}" --out "$CLIENTS/loadgen"
    install -m 0644 "$CA/ca.crt" "$CLIENTS/ca.crt"
fi
echo "ca-init: CA and certificates in place"
