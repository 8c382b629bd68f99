#!/usr/bin/env bash
# Resident memory of pilotfish and of real Envoy 1.40 with the seed sidecar's configuration
# loaded, side by side on this machine in the same run: pilotfish runs the config dump itself,
# Envoy the standalone bootstrap pilotfish derives from it (the same resources, inline). Each
# runs alone in a fresh network namespace (root needed), with --concurrency 2, and is measured
# 3 s after /ready.
#   bench/seed-rss.sh [CONFIG_DUMP]
set -euo pipefail
cd "$(dirname "$0")/.."
seed=${1:-../shared/corpus/istio-1.14-sidecar-fortio-server.config_dump.yaml}
cargo build --release -q -p pilotfish
envoy=$(python3 -c "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))")
tmp=$(mktemp -d)
./target/release/pilotfish bootstrap "$seed" > "$tmp/bootstrap.yaml"
ns=pf-rss-$$
ip netns add "$ns"
trap 'ip netns del "$ns"; rm -rf "$tmp"' EXIT
ip netns exec "$ns" ip link set lo up

measure() {
  ip netns exec "$ns" "$@" > "$tmp/log" 2>&1 &
  local pid=$!
  for _ in $(seq 300); do
    ip netns exec "$ns" curl -sf localhost:15000/ready > /dev/null 2>&1 && break
    sleep 0.1
  done
  sleep 3
  local rss
  rss=$(awk '/VmRSS/ { print $2 }' "/proc/$pid/status")
  kill "$pid"
  wait "$pid" 2> /dev/null || true
  echo "$rss"
}

ours=$(measure ./target/release/pilotfish -c "$seed" --concurrency 2 -l error)
theirs=$(measure "$envoy" -c "$tmp/bootstrap.yaml" --concurrency 2 -l error --disable-hot-restart)
echo "seed dump loaded, --concurrency 2, RSS after /ready:"
printf "  pilotfish  %6d KiB\n  envoy      %6d KiB\n  ratio      %.2f\n" "$ours" "$theirs" "$(echo "$ours / $theirs" | bc -l)"
