#!/usr/bin/env bash
# h2spec (the HTTP/2 conformance suite) against pilotfish's and real Envoy 1.40's connection
# managers, side by side: one listener in cleartext (h2c by prior knowledge) and one over TLS
# (ALPN h2), each answering every request with a direct response, as the same configuration in
# both. Prints each run's summary line; the full reports go to target/h2spec/.
#   bench/h2spec/run.sh            (h2spec from $H2SPEC, PATH, or built by bench/h2spec/build.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=target/h2spec
mkdir -p "$out"
h2spec=${H2SPEC:-$(command -v h2spec || true)}
if [ -z "$h2spec" ]; then
  [ -x "$out/bin/h2spec" ] || bench/h2spec/build.sh
  h2spec=$out/bin/h2spec
fi
cargo build --release -q -p pilotfish
envoy=$(python3 -c "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))")
tmp=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2> /dev/null || true; rm -rf "$tmp"' EXIT
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$tmp/key.pem" -out "$tmp/cert.pem" \
  -days 1 -subj /CN=localhost -addext subjectAltName=DNS:localhost 2> /dev/null
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

config() { # config ADMIN H2C TLS
  local hcm='{ name: envoy.filters.network.http_connection_manager, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: h, route_config: { virtual_hosts: [{ name: v, domains: ["*"], routes: [{ match: { prefix: "/" }, direct_response: { status: 200, body: { inline_string: "hello from h2spec'"'"'s server\n" } } }] }] }, http_filters: [{ name: envoy.filters.http.router, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router } }] } }'
  cat <<YAML
admin: { address: { socket_address: { address: 127.0.0.1, port_value: $1 } } }
static_resources:
  listeners:
  - name: h2c
    address: { socket_address: { address: 127.0.0.1, port_value: $2 } }
    filter_chains: [{ filters: [$hcm] }]
  - name: tls
    address: { socket_address: { address: 127.0.0.1, port_value: $3 } }
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: [h2]
            tls_certificates: [{ certificate_chain: { filename: "$tmp/cert.pem" }, private_key: { filename: "$tmp/key.pem" } }]
      filters: [$hcm]
YAML
}

run() { # run NAME BINARY ARGS...
  local name=$1; shift
  local admin h2c tls
  admin=$(free_port); h2c=$(free_port); tls=$(free_port)
  config "$admin" "$h2c" "$tls" > "$tmp/$name.yaml"
  "$@" -c "$tmp/$name.yaml" -l error > "$tmp/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do curl -sf "localhost:$admin/ready" > /dev/null 2>&1 && break; sleep 0.1; done
  "$h2spec" -h 127.0.0.1 -p "$h2c" -o 2 > "$out/$name-h2c.txt" 2>&1 || true
  "$h2spec" -h 127.0.0.1 -p "$tls" -t -k -o 2 > "$out/$name-tls.txt" 2>&1 || true
  printf "  %-10s h2c: %s\n" "$name" "$(tail -1 "$out/$name-h2c.txt")"
  printf "  %-10s TLS: %s\n" "$name" "$(tail -1 "$out/$name-tls.txt")"
}

echo "h2spec $("$h2spec" --version 2>&1 | head -1)"
run pilotfish ./target/release/pilotfish
run envoy "$envoy" --disable-hot-restart --base-id "$$"
echo "reports: $out/{pilotfish,envoy}-{h2c,tls}.txt"
