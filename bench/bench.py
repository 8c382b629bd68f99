#!/usr/bin/env python3
"""pilotfish and real Envoy side by side, on this machine, in one run.

Both proxies get the same configuration and the same worker count, pinned to the same CPU; the
same load (wrk, h2load) is driven at each in alternation, run after run, from the other CPU,
against the same nginx upstream. Results: JSON (every run), a Markdown table (median, min and
max of the runs, and pilotfish/Envoy ratios against the goals) and an SVG chart of the ratios.

    bench/run.sh [--runs N] [--duration S] [--smoke] [--out DIR] [--only NAME,...]

`bench/run.sh` builds pilotfish in release and installs what is missing (Envoy from PyPI,
wrk, h2load and nginx from Debian's packages) before calling this.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PILOTFISH = os.path.join(ROOT, "target", "release", "pilotfish")
PROXY_CPU, LOAD_CPU = "0", "1"


def envoy_binary():
    import envoy  # noqa: PLC0415 (installed by run.sh)

    return os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=1.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except Exception as e:  # noqa: BLE001 (any failure means "not yet")
        return 0, str(e)


def perf_record(pid, out, name, duration):
    """perf sampling the proxy while the load runs (DWARF call graphs: neither proxy keeps frame
    pointers)."""
    data = os.path.join(out, f"{name}.perf.data")
    return subprocess.Popen(["perf", "record", "-q", "-F", "199", "--call-graph", "dwarf,16384", "-p", str(pid),
                             "-o", data, "--", "sleep", str(duration)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), data


def perf_report(rec, out, name):
    """The top functions (self time, with the share spent in the kernel) as text, and a flame
    graph where inferno is installed (`cargo install inferno`)."""
    proc, data = rec
    proc.wait()
    def report(*args):
        return subprocess.run(["perf", "report", "-i", data, "--no-children", "-g", "none", "--stdio", "-q", *args],
                              capture_output=True, text=True).stdout

    top = (f"# {name}: self time by binary\n" + report("--sort", "dso") +
           "\n# by function (0.5% and over)\n" + report("--sort", "dso,symbol", "--percent-limit", "0.5"))
    with open(os.path.join(out, f"{name}.top.txt"), "w") as f:
        f.write(top)
    if shutil.which("inferno-collapse-perf") and shutil.which("inferno-flamegraph"):
        script = subprocess.run(["perf", "script", "-i", data], capture_output=True, text=True).stdout
        folded = subprocess.run(["inferno-collapse-perf"], input=script, capture_output=True, text=True).stdout
        svg = subprocess.run(["inferno-flamegraph", "--title", name], input=folded, capture_output=True, text=True).stdout
        with open(os.path.join(out, f"{name}.flame.svg"), "w") as f:
            f.write(svg)
    os.remove(data)


def cpu_s(pid):
    """User and system CPU time a process has used, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid, field="VmRSS"):
    """VmRSS, or RssAnon: the part that is the process's own. The rest is mapped files, mostly
    the binary's code, which the page cache shares between every sidecar running it."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------------------------------
# The upstream: nginx, one worker on the load generator's CPU.

NGINX_CONF = """
worker_processes 1;
worker_cpu_affinity {affinity};
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    sendfile on;
    server {{
        listen 127.0.0.1:{upstream};
        location = /small {{ return 200 "hello from nginx\\n"; }}
        location / {{ root {dir}/www; }}
    }}
    # The mTLS scenario's client side: plaintext in, the proxy's mTLS listener out, with the
    # client certificate, connections kept.
    upstream mtls_proxy {{ server 127.0.0.1:{mtls}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{mtls_client};
        location / {{
            proxy_pass https://mtls_proxy;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_certificate {dir}/client.pem;
            proxy_ssl_certificate_key {dir}/client.key;
            proxy_ssl_session_reuse on;
        }}
    }}
    # Its HTTP/2 twin: h2c in, HTTP/2 over mTLS (ALPN h2) out. nginx speaks HTTP/2 to an
    # upstream only in its gRPC module, which passes any HTTP/2 exchange through.
    upstream mtls_proxy_h2 {{ server 127.0.0.1:{mtls}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{mtls_h2_client} http2;
        location / {{
            grpc_pass grpcs://mtls_proxy_h2;
            grpc_ssl_certificate {dir}/client.pem;
            grpc_ssl_certificate_key {dir}/client.key;
            grpc_ssl_session_reuse on;
        }}
    }}
}}
"""


def start_nginx(d, ports):
    www = os.path.join(d, "www")
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, "64k"), "wb") as f:
        f.write(b"x" * 65536)
    # Bulk: 1 MiB responses on kept connections (through tcp_proxy, the bytes are all it sees).
    with open(os.path.join(www, "bulk"), "wb") as f:
        f.write(os.urandom(1 << 20))
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(dir=d, affinity="10" if os.cpu_count() > 1 else "1", **ports))
    p = subprocess.Popen(["nginx", "-c", conf, "-p", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if get(f"http://127.0.0.1:{ports['upstream']}/small")[0] == 200:
            return p
        time.sleep(0.05)
    p.terminate()
    raise SystemExit(f"nginx did not start: {open(os.path.join(d, 'nginx-error.log')).read()}")


# ---------------------------------------------------------------------------------------------
# Certificates for the mTLS scenario (openssl: a CA, a server and a client with SPIFFE ids).


def make_certs(d):
    def sh(*a):
        subprocess.run(a, check=True, cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
       "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/O=cluster.local")
    for name in ("server", "client"):
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write(f"subjectAltName=URI:spiffe://cluster.local/ns/bench/sa/{name}\n")
        sh("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
           "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", "/")
        sh("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
           "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")


# ---------------------------------------------------------------------------------------------
# The proxies' configuration: one bootstrap both run.


def hcm(prefix, extra=""):
    return f"""
        - name: envoy.filters.network.http_connection_manager
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
            stat_prefix: {prefix}
            {extra}
            route_config:
              virtual_hosts:
              - name: all
                domains: ["*"]
                routes: [{{ match: {{ prefix: "/" }}, route: {{ cluster: upstream, timeout: 0s }} }}]
            http_filters:
            - name: envoy.filters.http.router
              typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}"""


def bootstrap(d, ports):
    c = d
    xfcc = "forward_client_cert_details: APPEND_FORWARD\n            set_current_client_cert_details: { subject: true, dns: true, uri: true }"
    mtls_filters = hcm("inbound_0.0.0.0_8080", xfcc)
    return f"""
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {ports['admin']} }} }}
static_resources:
  listeners:
  - name: http
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {ports['http']} }} }}
    filter_chains:
    - filters:{hcm("http")}
  # The seed's inbound 0.0.0.0_8080 chain shape: TLS with a required client certificate and a
  # SAN check, XFCC appended.
  - name: mtls
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {ports['mtls']} }} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_certificates:
            - certificate_chain: {{ filename: {c}/server.pem }}
              private_key: {{ filename: {c}/server.key }}
            validation_context:
              trusted_ca: {{ filename: {c}/ca.pem }}
              match_typed_subject_alt_names: [{{ san_type: URI, matcher: {{ prefix: "spiffe://cluster.local/" }} }}]
      filters:{mtls_filters}
  - name: tcp
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {ports['tcp']} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: upstream
  clusters:
  - name: upstream
    connect_timeout: 1s
    circuit_breakers:
      thresholds: [{{ max_connections: 100000, max_pending_requests: 100000, max_requests: 100000 }}]
    load_assignment:
      cluster_name: upstream
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {ports['upstream']} }} }} }} }}] }}]
"""


def many_clusters(n, admin, port):
    """An Istio-shaped configuration with `n` services: a cluster each (EDS-like, one endpoint,
    Istio's transport socket matches and metadata) and a virtual host each in one route
    configuration."""
    out = [f"""admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
  - name: 0.0.0.0_80
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound_0.0.0.0_80
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            name: "80"
            virtual_hosts:
"""]
    for i in range(n):
        host = f"svc-{i}.ns-{i % 50}.svc.cluster.local"
        out.append(f"""            - name: "{host}:80"
              domains: ["{host}", "{host}:80", "svc-{i}.ns-{i % 50}", "svc-{i}.ns-{i % 50}:80"]
              routes: [{{ name: default, match: {{ prefix: "/" }}, route: {{ cluster: "outbound|80||{host}", timeout: 0s }} }}]
""")
    out.append("  clusters:\n")
    for i in range(n):
        host = f"svc-{i}.ns-{i % 50}.svc.cluster.local"
        a, b = divmod(i, 250)
        out.append(f"""  - name: "outbound|80||{host}"
    type: STATIC
    connect_timeout: 10s
    lb_policy: LEAST_REQUEST
    circuit_breakers: {{ thresholds: [{{ max_connections: 4294967295, max_pending_requests: 4294967295, max_requests: 4294967295, max_retries: 4294967295, track_remaining: true }}] }}
    metadata: {{ filter_metadata: {{ istio: {{ services: [{{ host: "{host}", name: svc-{i}, namespace: ns-{i % 50} }}] }} }} }}
    load_assignment:
      cluster_name: "outbound|80||{host}"
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 10.{a % 250}.{b}.10, port_value: 80 }} }} }}, metadata: {{ filter_metadata: {{ envoy.transport_socket_match: {{ tlsMode: istio }} }} }} }}] }}]
    transport_socket_matches:
    - name: tlsMode-istio
      match: {{ tlsMode: istio }}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: "outbound_.80_._.{host}"
          common_tls_context: {{ alpn_protocols: [istio-peer-exchange, istio] }}
    - name: tlsMode-disabled
      match: {{}}
      transport_socket: {{ name: envoy.transport_sockets.raw_buffer, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer }} }}
""")
    return "".join(out)


class Proxy:
    """One proxy process, pinned, with `workers` workers."""

    def __init__(self, kind, config, admin, workers, d, cpus=PROXY_CPU):
        self.kind, self.admin = kind, admin
        log = open(os.path.join(d, f"{kind}.log"), "w")
        if kind == "pilotfish":
            cmd = [PILOTFISH, "-c", config, "--concurrency", str(workers), "-l", "error"]
        else:
            cmd = [envoy_binary(), "-c", config, "--concurrency", str(workers), "-l", "error",
                   "--disable-hot-restart"]
        self.started = time.monotonic()
        self.p = subprocess.Popen(["taskset", "-c", cpus] + cmd, stdout=log, stderr=log)
        self.ready_after = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise SystemExit(f"{kind} exited: {open(log.name).read()[-2000:]}")
            if get(f"http://127.0.0.1:{admin}/ready", timeout=0.5)[0] == 200:
                self.ready_after = time.monotonic() - self.started
                return
            time.sleep(0.02)
        self.stop()
        raise SystemExit(f"{kind} not ready after 120 s")

    def rss(self):
        # taskset execs the proxy: same pid.
        return rss_kib(self.p.pid)

    def stop(self):
        self.p.send_signal(signal.SIGKILL)
        self.p.wait()


# ---------------------------------------------------------------------------------------------
# Load.


def unit(v, u):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[u]


def wrk(url, duration, conns=50, threads=1, headers=()):
    cmd = ["taskset", "-c", LOAD_CPU, "wrk", "-t", str(threads), "-c", str(conns), "-d", f"{duration}s", "--latency"]
    for h in headers:
        cmd += ["-H", h]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = dict((p, unit(v, u)) for p, v, u in re.findall(r"\s+(50|99)%\s+([\d.]+)(us|ms|s)", out))
    mb = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    scale = {"B": 1 / 2**20, "KB": 1 / 1024, "MB": 1, "GB": 1024}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": lat.get("50"),
        "p99_ms": lat.get("99"),
        "mib_s": float(mb.group(1)) * scale.get(mb.group(2), 1) if mb else None,
        "errors": int(errors.group(1)) if errors else 0,
    }


def h2load(url, duration, clients=10, streams=10):
    cmd = ["taskset", "-c", LOAD_CPU, "h2load", "-c", str(clients), "-m", str(streams), "-D", str(duration), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    failed = re.search(r"requests: .* (\d+) failed", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    return {
        "rps": float(m.group(1)),
        "mean_ms": unit(mean.group(1), mean.group(2)) if mean else None,
        # A proxy's 502 is a completed request to h2load: answers other than 2xx count too.
        "errors": (int(failed.group(1)) if failed else 0) + (sum(map(int, codes.groups()[1:])) if codes else 0),
    }


def scenarios(ports, duration, smoke):
    h = f"http://127.0.0.1:{ports['http']}"
    t = f"http://127.0.0.1:{ports['tcp']}"
    m = f"http://127.0.0.1:{ports['mtls_client']}"
    m2 = f"http://127.0.0.1:{ports['mtls_h2_client']}"
    up = f"http://127.0.0.1:{ports['upstream']}"
    close = ("Connection: close",)
    out = [
        # (name, what is compared, load for the proxied run, the same load direct to nginx)
        ("http1_small", "rps", lambda d: wrk(f"{h}/small", d), lambda d: wrk(f"{up}/small", d)),
        ("http1_64k", "rps", lambda d: wrk(f"{h}/64k", d), lambda d: wrk(f"{up}/64k", d)),
        ("h2c_multiplexed", "rps", lambda d: h2load(f"{h}/small", d), None),
        ("mtls_inbound_http1", "rps", lambda d: wrk(f"{m}/small", d), None),
        ("mtls_inbound_h2", "rps", lambda d: h2load(f"{m2}/small", d), None),
        ("new_connections", "rps", lambda d: wrk(f"{h}/small", d, headers=close), lambda d: wrk(f"{up}/small", d, headers=close)),
        ("tcp_proxy_bulk", "mib_s", lambda d: wrk(f"{t}/bulk", d, conns=4), lambda d: wrk(f"{up}/bulk", d, conns=4)),
    ]
    if smoke:
        out = [s for s in out if s[0] in ("http1_small", "tcp_proxy_bulk")]
    return out


def load_config(kind, config, admin, d, runs):
    """Time from start to /ready and RSS once ready, `runs` times."""
    res = []
    for _ in range(runs):
        p = Proxy(kind, config, admin, 1, d)
        time.sleep(1)
        res.append({"load_s": p.ready_after, "rss_kib": p.rss(), "anon_kib": rss_kib(p.p.pid, "RssAnon")})
        p.stop()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="one short run of a few scenarios: checks the harness")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--only", default="", help="comma-separated scenario names")
    ap.add_argument("--profile", default="", metavar="NAME,...",
                    help="record each proxy with perf in an extra, uncounted run of these scenarios: the top "
                         "functions and (with inferno-flamegraph on PATH) flame graphs, in the results directory")
    ap.add_argument("--seed", default=os.path.join(ROOT, "..", "shared", "corpus", "istio-1.14-sidecar-fortio-server.config_dump.yaml"))
    a = ap.parse_args()
    if a.smoke:
        a.runs, a.duration = 1, 1
    only = set(filter(None, a.only.split(",")))
    profile = set(filter(None, a.profile.split(",")))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%MZ")
    out = os.path.join(a.out, stamp + ("-smoke" if a.smoke else ""))
    os.makedirs(out, exist_ok=True)
    d = tempfile.mkdtemp(prefix="pilotfish-bench-")
    # nginx's worker (user nobody when run as root) reads the files it serves here.
    os.chmod(d, 0o755)
    ports = {k: free_port() for k in ("upstream", "http", "mtls", "mtls_client", "mtls_h2_client", "tcp", "admin")}
    make_certs(d)
    config = os.path.join(d, "bootstrap.yaml")
    with open(config, "w") as f:
        f.write(bootstrap(d, ports))
    nginx = start_nginx(d, ports)
    results = {"scenarios": {}, "load": {}}
    try:
        for workers in ([1] if a.smoke else [1, 2]):
            cpus = PROXY_CPU if workers == 1 else "0,1"
            for name, metric, load, direct in scenarios(ports, a.duration, a.smoke):
                if only and name not in only:
                    continue
                # Scaling is reported for the basic scenario only.
                if workers == 2 and name != "http1_small":
                    continue
                key = name if workers == 1 else f"{name}_2_workers"
                r = {"metric": metric, "pilotfish": [], "envoy": [], "direct": []}
                # A profiled run (perf costs the proxy some CPU) comes first and is not counted.
                for run in ([-1] if key in profile else []) + list(range(a.runs)):
                    order = ["pilotfish", "envoy"] if run % 2 == 0 else ["envoy", "pilotfish"]
                    for kind in order:
                        p = Proxy(kind, config, ports["admin"], workers, d, cpus)
                        try:
                            load(1)  # warm-up: connections, pools, caches
                            cpu = cpu_s(p.p.pid)
                            rec = perf_record(p.p.pid, out, f"{key}-{kind}", a.duration) if run == -1 else None
                            got = load(a.duration)
                            if rec:
                                perf_report(rec, out, f"{key}-{kind}")
                            # The proxy's CPU per request (or per MiB): where the load side is
                            # the bottleneck, this still compares the proxies' work.
                            got["cpu_us"] = (cpu_s(p.p.pid) - cpu) * 1e6 / (got[metric] * a.duration)
                            got["rss_kib"] = p.rss()
                            if got["errors"]:
                                raise SystemExit(f"{key}: {kind} answered {got['errors']} requests with errors")
                        finally:
                            p.stop()
                        if run == -1:
                            print(f"{key:28} profiled  {kind:9} {metric} {got[metric]:.1f}", flush=True)
                            continue
                        r[kind].append(got)
                        print(f"{key:28} run {run + 1} {kind:9} {metric} {got[metric]:.1f}", flush=True)
                    if run == -1:
                        continue
                    if direct and workers == 1:
                        got = direct(a.duration)
                        if got["errors"]:
                            raise SystemExit(f"{key}: nginx answered {got['errors']} requests with errors")
                        r["direct"].append(got)
                results["scenarios"][key] = r
        # Configuration load: the seed dump, and a generated 10,000-service configuration.
        loads = []
        if os.path.exists(a.seed) and (not only or "seed" in only):
            boot = os.path.join(d, "seed-bootstrap.yaml")
            with open(boot, "w") as f:
                f.write(subprocess.run([PILOTFISH, "bootstrap", a.seed], capture_output=True, text=True, check=True).stdout)
            if os.geteuid() == 0:
                loads.append(("seed", {"pilotfish": a.seed, "envoy": boot}))
            else:
                print("seed: skipped (its listeners bind 0.0.0.0:15001 and the like; run as root to measure it in a namespace)")
        n = 1000 if a.smoke else 10000
        if not only or "clusters" in only:
            gen = os.path.join(d, "clusters.yaml")
            with open(gen, "w") as f:
                f.write(many_clusters(n, ports["admin"], ports["http"]))
            loads.append((f"{n}_clusters", {"pilotfish": gen, "envoy": gen}))
        for name, files in loads:
            r = {"pilotfish": [], "envoy": []}
            for run in range(a.runs if not a.smoke else 1):
                for kind in (["pilotfish", "envoy"] if run % 2 == 0 else ["envoy", "pilotfish"]):
                    admin = ports["admin"] if name != "seed" else 15000
                    if name == "seed":
                        got = in_namespace(kind, files[kind], d)
                    else:
                        got = load_config(kind, files[kind], admin, d, 1)[0]
                    r[kind].append(got)
                    if got["load_s"] is None:
                        raise SystemExit(f"{name}: {kind} did not become ready")
                    print(f"{name:28} run {run + 1} {kind:9} ready {got['load_s']:.2f} s, RSS {got['rss_kib']} KiB ({got['anon_kib']} KiB anonymous)", flush=True)
            results["load"][name] = r
    finally:
        # SIGTERM: nginx's master stops its worker too (SIGKILL would leave it running).
        nginx.terminate()
        nginx.wait()
    write(results, a, d, stamp, out)


def in_namespace(kind, config, d):
    """The seed binds Istio's ports on 0.0.0.0: it runs in a network namespace of its own."""
    ns = f"pf-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        bin_ = PILOTFISH if kind == "pilotfish" else envoy_binary()
        cmd = ["ip", "netns", "exec", ns, "taskset", "-c", PROXY_CPU, bin_, "-c", config, "--concurrency", "1", "-l", "error"]
        if kind == "envoy":
            cmd.append("--disable-hot-restart")
        start = time.monotonic()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ready = None
        while time.monotonic() - start < 120:
            r = subprocess.run(["ip", "netns", "exec", ns, "curl", "-sf", "-o", "/dev/null", "http://127.0.0.1:15000/ready"])
            if r.returncode == 0:
                ready = time.monotonic() - start
                break
            time.sleep(0.02)
        time.sleep(1)
        # `ip netns exec` execs: the process is the proxy.
        rss, anon = rss_kib(p.pid), rss_kib(p.pid, "RssAnon")
        p.kill()
        p.wait()
        return {"load_s": ready, "rss_kib": rss, "anon_kib": anon}
    finally:
        subprocess.run(["ip", "netns", "del", ns])


# ---------------------------------------------------------------------------------------------
# Reports.

GOALS = {
    # scenario: (what, the goal for pilotfish/Envoy, higher is better)
    "http1_small": ("requests/s", 3.0, True),
    "http1_small:p99": ("p99 latency", 0.5, False),
    "mtls_inbound_http1": ("requests/s", 1.5, True),
    "mtls_inbound_h2": ("requests/s", 1.5, True),
    "new_connections": ("connections/s", 1.0, True),
    "tcp_proxy_bulk": ("MiB/s", 1.0, True),
    "seed:rss": ("RSS", 0.2, False),
    "10000_clusters:rss": ("RSS", 0.2, False),
    "10000_clusters:load": ("load time", 0.1, False),
}


def summary(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def write(results, a, d, stamp, out):
    os.makedirs(out, exist_ok=True)
    envoy_version = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True).stdout.strip().split("version:")[-1].strip()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    results["machine"] = {"cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(), "date": stamp,
                          "envoy": envoy_version, "pilotfish": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
                          "runs": a.runs, "duration_s": a.duration}
    rows, ratios = [], []
    for name, r in results["scenarios"].items():
        metric = r["metric"]
        pf = summary([x[metric] for x in r["pilotfish"]])
        ev = summary([x[metric] for x in r["envoy"]])
        direct = summary([x[metric] for x in r["direct"]])
        ratio = summary([p[metric] / e[metric] for p, e in zip(r["pilotfish"], r["envoy"]) if e[metric]])
        rows.append((name, metric, pf, ev, ratio, direct))
        ratios.append((name, ratio, GOALS.get(name)))
        if "p99_ms" in r["pilotfish"][0] and r["pilotfish"][0]["p99_ms"] is not None:
            lat = summary([p["p99_ms"] / e["p99_ms"] for p, e in zip(r["pilotfish"], r["envoy"]) if e["p99_ms"]])
            rows.append((name, "p99_ms", summary([x["p99_ms"] for x in r["pilotfish"]]), summary([x["p99_ms"] for x in r["envoy"]]), lat, summary([x["p99_ms"] for x in r["direct"] if x.get("p99_ms")])))
            ratios.append((f"{name}:p99", lat, GOALS.get(f"{name}:p99")))
        if r["pilotfish"] and "cpu_us" in r["pilotfish"][0]:
            cpu = summary([p["cpu_us"] / e["cpu_us"] for p, e in zip(r["pilotfish"], r["envoy"]) if e["cpu_us"]])
            rows.append((name, "cpu_us" + ("_per_mib" if metric == "mib_s" else "_per_req"), summary([x["cpu_us"] for x in r["pilotfish"]]), summary([x["cpu_us"] for x in r["envoy"]]), cpu, None))
            ratios.append((f"{name}:cpu", cpu, None))
    for name, r in results["load"].items():
        for what, key in (("rss", "rss_kib"), ("anon", "anon_kib"), ("load", "load_s")):
            pf = summary([x[key] for x in r["pilotfish"]])
            ev = summary([x[key] for x in r["envoy"]])
            ratio = summary([p[key] / e[key] for p, e in zip(r["pilotfish"], r["envoy"]) if e[key]])
            rows.append((name, key, pf, ev, ratio, None))
            ratios.append((f"{name}:{what}", ratio, GOALS.get(f"{name}:{what}")))
    results["ratios"] = {n: r for n, r, _ in ratios}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)

    def fmt(s, digits=1):
        if not s:
            return "-"
        return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"

    m = results["machine"]
    md = [f"Benchmark {m['date']}: {m['cpu']}, {m['cpus']} CPUs, Linux {m['kernel']}; Envoy {m['envoy']}; "
          f"pilotfish {m['pilotfish']}; {m['runs']} alternating runs of {m['duration_s']} s; proxy pinned to CPU 0 "
          f"(CPUs 0-1 for 2 workers), wrk/h2load and nginx on CPU 1. Median (min–max).", "",
          "| scenario | measure | pilotfish | Envoy | pilotfish/Envoy | direct (no proxy) |",
          "|---|---|---|---|---|---|"]
    for name, metric, pf, ev, ratio, direct in rows:
        digits = 0 if metric in ("rps", "rss_kib", "anon_kib") else 2
        md.append(f"| {name} | {metric} | {fmt(pf, digits)} | {fmt(ev, digits)} | {fmt(ratio, 2)} | {fmt(direct, digits)} |")
    md += ["", "| goal | target (pilotfish/Envoy) | measured (median) | met |", "|---|---|---|---|"]
    for name, ratio, goal in ratios:
        if not goal:
            continue
        what, target, higher = goal
        if not ratio:
            md.append(f"| {name} ({what}) | {'≥' if higher else '≤'} {target} | - | not measured |")
            continue
        met = ratio["median"] >= target if higher else ratio["median"] <= target
        md.append(f"| {name} ({what}) | {'≥' if higher else '≤'} {target} | {ratio['median']:.2f} | {'yes' if met else 'no'} |")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(out, "ratios.svg"), "w") as f:
        f.write(chart(ratios))
    print("\n".join(md))
    print(f"\nwritten: {out}/results.json, results.md, ratios.svg")
    shutil.rmtree(d, ignore_errors=True)


def chart(ratios):
    """Bars of pilotfish/Envoy (log scale, 1 = parity), the min–max of the runs as a whisker, and
    each goal as a tick."""
    import math

    items = [(n, r, g) for n, r, g in ratios if r]
    w, row, left = 760, 26, 230
    h = 40 + row * len(items) + 30
    lo, hi = math.log10(0.05), math.log10(20)

    def x(v):
        return left + (math.log10(max(min(v, 20), 0.05)) - lo) / (hi - lo) * (w - left - 20)

    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
         f'<text x="10" y="20" font-size="14">pilotfish / Envoy (median of runs; log scale; tick = goal)</text>']
    for v in (0.1, 0.2, 0.5, 1, 2, 3, 5, 10):
        s.append(f'<line x1="{x(v):.1f}" y1="30" x2="{x(v):.1f}" y2="{h - 25}" stroke="{"#444" if v == 1 else "#ddd"}"/>')
        s.append(f'<text x="{x(v):.1f}" y="{h - 10}" text-anchor="middle">{v}</text>')
    for i, (name, r, goal) in enumerate(items):
        y = 40 + i * row
        good = None
        if goal:
            good = r["median"] >= goal[1] if goal[2] else r["median"] <= goal[1]
        color = {True: "#3a7", False: "#d55", None: "#68a"}[good]
        s.append(f'<text x="{left - 8}" y="{y + 14}" text-anchor="end">{name}</text>')
        x0, x1 = x(1), x(r["median"])
        s.append(f'<rect x="{min(x0, x1):.1f}" y="{y + 3}" width="{abs(x1 - x0):.1f}" height="14" fill="{color}"/>')
        s.append(f'<line x1="{x(r["min"]):.1f}" y1="{y + 10}" x2="{x(r["max"]):.1f}" y2="{y + 10}" stroke="#000"/>')
        s.append(f'<text x="{max(x0, x1) + 4:.1f}" y="{y + 14}">{r["median"]:.2f}</text>')
        if goal:
            s.append(f'<line x1="{x(goal[1]):.1f}" y1="{y}" x2="{x(goal[1]):.1f}" y2="{y + 20}" stroke="#000" stroke-width="2"/>')
    s.append("</svg>")
    return "\n".join(s)


if __name__ == "__main__":
    sys.exit(main())
