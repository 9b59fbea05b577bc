#!/bin/sh
# The walkthrough of deploy/README.md, as a script: bring the stack up, issue a client
# certificate, connect over HTTPS and raw TCP, renew the client. `make test-compose` runs
# it, so the README's commands are the ones tested.
#
#   deploy/walkthrough.sh          from the repository root; files go to ./walkthrough/
#   deploy/walkthrough.sh --down   the same, then take the stack down (volumes too)
#
# Settings: MTLSPROXY_HTTPS_PORT (8443), MTLSPROXY_TCP_PORT (8444), COMPOSE_PROJECT_NAME,
# WALKTHROUGH_DIR (./walkthrough).
set -eu
cd "$(dirname "$0")/.."
HTTPS_PORT=${MTLSPROXY_HTTPS_PORT:-8443}
TCP_PORT=${MTLSPROXY_TCP_PORT:-8444}
OUT=${WALKTHROUGH_DIR:-walkthrough}

# Compose v2 is `docker compose` (a plugin); Debian's docker.io has only `docker-compose`.
export COMPOSE_FILE="$PWD/deploy/docker-compose.yml"
if docker compose version >/dev/null 2>&1; then
    C="docker compose"
elif command -v docker-compose >/dev/null 2>&1; then
    C="docker-compose"
else
    echo "walkthrough: neither 'docker compose' nor 'docker-compose' is installed" >&2
    exit 1
fi
step() { printf '\n== %s\n' "$*"; }

step "bring the stack up (the proxy is healthy once its /readyz answers)"
$C up -d --build
healthy=""
for _ in $(seq 90); do
    if [ "$(docker inspect --format '{{.State.Health.Status}}' "$($C ps -q proxy)")" = healthy ]; then
        healthy=yes && break
    fi
    sleep 2
done
$C ps
[ -n "$healthy" ] || { echo "walkthrough: the proxy is not healthy after 180 s: $C logs proxy" >&2; exit 1; }

step "issue a client certificate at the stack's CA and copy it out"
mkdir -p "$OUT" && cd "$OUT"
# -T: no terminal, so the files are copied byte for byte (with one, lines end in CRLF)
$C exec -T ca mtlsproxy ca issue --dir /var/lib/mtlsproxy/ca --kind client --name player-1 \
    --uri spiffe://game.example/player/1 --out /tmp/player-1
$C exec -T ca cat /tmp/player-1.crt > player-1.crt
(umask 077 && $C exec -T ca cat /tmp/player-1.key > player-1.key)
$C exec -T ca cat /var/lib/mtlsproxy/ca/ca.crt > ca.crt
$C exec -T ca rm /tmp/player-1.key

step "HTTPS: the backend answers with the identity the proxy forwarded"
curl -fsS --cacert ca.crt --capath /dev/null --cert player-1.crt --key player-1.key \
    "https://localhost:$HTTPS_PORT/hello"
echo

step "HTTPS without a client certificate: refused in the handshake"
if curl -fsS --cacert ca.crt --capath /dev/null "https://localhost:$HTTPS_PORT/" 2>/dev/null; then
    echo "walkthrough: a client without a certificate got in" >&2
    exit 1
fi
echo "refused, as it should be"

step "raw TCP: a JSON line with the identity (from PROXY protocol v2), then an echo"
# -cert_chain: send the issuing CA with the leaf (player-1.crt holds both; -cert alone
# sends only the leaf, which the proxy cannot tie to its root).
printf 'hello over tcp\n' | timeout 10 openssl s_client -connect "localhost:$TCP_PORT" \
    -servername localhost -cert player-1.crt -cert_chain player-1.crt -key player-1.key \
    -CAfile ca.crt -verify_return_error -quiet -ign_eof 2>/dev/null | head -n 2 | tee tcp.out
grep -qx 'hello over tcp' tcp.out || { echo "walkthrough: no echo over raw TCP" >&2; exit 1; }

step "renew the client at the renewal service, from a one-off container on the stack's network"
# As your own uid, with this folder mounted: the container can read the key it renews.
$C run --rm --no-deps -T -v "$PWD:/work" -w /work --user "$(id -u):$(id -g)" \
    --entrypoint mtlsproxy backend client renew --url https://ca:9443 --ca ca.crt --cert player-1
curl -fsS --cacert ca.crt --capath /dev/null --cert player-1.crt --key player-1.key \
    -o /dev/null -w 'after renewal: HTTP %{http_code}\n' "https://localhost:$HTTPS_PORT/"

if [ "${1:-}" = "--down" ]; then
    step "take the stack down, volumes (the CA) included"
    cd ..
    $C down -v
fi
