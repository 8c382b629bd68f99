//! The founding article's scene on one machine: pod `netshoot` (172.21.206.228) calls pod
//! `fortio-server` (172.21.206.230) through the service address 10.96.215.136:8080, each pod with
//! a sidecar. Pods are network namespaces joined by a veth pair, each with istio-init's iptables
//! rules; a test CA issues the pods' SPIFFE identity; each sidecar (pilotfish or real Envoy) runs
//! as uid 1337 with the pod's configuration from `examples/scene/`; fortio-server's app answers
//! on port 8080 with what it saw. `pilotfish demo` and the scene tests build it; dropping the
//! `Scene` stops the sidecars and removes the namespaces and files, also when a test panics.
//!
//! Needs root, `ip`, `iptables-restore` and `setpriv` (`Scene::can_run` says what is missing).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const NETSHOOT_IP: &str = "172.21.206.228";
pub const FORTIO_IP: &str = "172.21.206.230";
/// fortio-server's ClusterIP in the article (`k get svc fortio-server`).
pub const SERVICE: &str = "10.96.215.136:8080";
/// Both pods run as the `default` service account of namespace `mark`.
pub const IDENTITY: &str = "spiffe://cluster.local/ns/mark/sa/default";
/// The SNI Istio's outbound cluster sends for fortio-server's port 8080.
pub const SNI: &str = "outbound_.8080_._.fortio-server.mark.svc.cluster.local";
/// The uid (and gid) istio-proxy runs as; istio-init's rules let its traffic out unredirected.
pub const PROXY_UID: u32 = 1337;

/// The loopback variant (no root): each pod is a loopback address of this machine.
pub const NETSHOOT_LOOPBACK: &str = "127.0.1.228";
pub const FORTIO_LOOPBACK: &str = "127.0.1.230";
/// fortio-server's app in the loopback variant (its pod address's 8080 is the sidecar's).
pub const APP_LOOPBACK: &str = "127.0.1.230:18080";

/// What the loopback variant changes, as the demo says it.
pub const LOOPBACK_DIFFERENCES: &[&str] = &[
    "no network namespaces and no iptables: the pods are the loopback addresses 127.0.1.228 (netshoot) and 127.0.1.230 (fortio-server), and each sidecar's listeners and admin bind its pod's address instead of 0.0.0.0 and 127.0.0.1",
    "nothing redirects the app's connection to 15001: netshoot's outbound listener 0.0.0.0_8080 (bind_to_port false in the dump) is bound at 127.0.1.228:8080 and the app connects there instead of to the service address 10.96.215.136:8080",
    "nothing redirects the client sidecar's connection to 15006: fortio-server's virtualInbound listens on the pod's port 8080 (127.0.1.230:8080), and with no original destination to restore its listener filters see that address",
    "inbound|8080|| is a STATIC cluster to the app at 127.0.1.230:18080 instead of ORIGINAL_DST (the original destination would be the sidecar itself); it still connects from 127.0.0.6",
    "fortio-server's outbound listener 0.0.0.0_8080 is left out (its address is the pod's own port 8080 now), and the zipkin cluster is STATIC at 127.0.0.1:9411 (no cluster DNS)",
    "the sidecars run as the current user, not uid 1337",
];

pub const FORTIO_CONFIG: &str =
    include_str!("../../../examples/scene/fortio-server.config_dump.yaml");
pub const NETSHOOT_CONFIG: &str = include_str!("../../../examples/scene/netshoot.config_dump.yaml");

/// The nat table istio-init (Istio 1.14, REDIRECT mode, no excluded ports) writes into a pod:
/// inbound TCP to 15006 except Istio's own ports; outbound TCP to 15001 except traffic of uid or
/// gid 1337, traffic to 127.0.0.1, and the sidecar's own inbound connections from 127.0.0.6;
/// what uid 1337 sends to the pod's own non-loopback address over `lo` goes back through 15006.
pub const ISTIO_INIT_RULES: &str = "\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";

/// Which proxy runs as a pod's sidecar.
#[derive(Clone, Debug)]
pub enum Sidecar {
    /// This pilotfish binary.
    Pilotfish(PathBuf),
    /// Real Envoy, given the configuration `pilotfish bootstrap` writes (Istio-only filters left
    /// out, as stock Envoy does not have them).
    Envoy(PathBuf),
}

impl Sidecar {
    pub fn name(&self) -> &'static str {
        match self {
            Sidecar::Pilotfish(_) => "pilotfish",
            Sidecar::Envoy(_) => "envoy",
        }
    }
}

/// The mesh's certificate authority: Istio's self-signed root (O=cluster.local), issuing
/// workload certificates with an empty subject and one URI SAN, as istiod does.
pub struct Pki {
    pub root_pem: String,
    root: rcgen::Certificate,
    root_key: rcgen::KeyPair,
}

/// A workload certificate and its key, PEM.
pub struct Workload {
    pub cert: String,
    pub key: String,
}

impl Pki {
    pub fn new() -> Result<Pki, String> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let err = |e: rcgen::Error| format!("test CA: {e}");
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::OrganizationName, "cluster.local");
        let root_key = KeyPair::generate().map_err(err)?;
        let root = p.self_signed(&root_key).map_err(err)?;
        Ok(Pki {
            root_pem: root.pem(),
            root,
            root_key,
        })
    }

    /// A workload certificate for a SPIFFE id (any URI: tests also issue wrong ones).
    pub fn issue(&self, spiffe: &str) -> Result<Workload, String> {
        use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
        let err = |e: rcgen::Error| format!("workload certificate {spiffe}: {e}");
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names
            .push(SanType::URI(spiffe.try_into().map_err(err)?));
        let key = KeyPair::generate().map_err(err)?;
        let cert = p.signed_by(&key, &self.root, &self.root_key).map_err(err)?;
        Ok(Workload {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

/// One pod: its network namespace, its files, and its sidecar while one runs.
pub struct Pod {
    /// The pod's name in the article.
    pub name: &'static str,
    pub ip: &'static str,
    /// Its network namespace; empty in the loopback variant.
    pub netns: String,
    /// Its sidecar's admin address.
    pub admin: String,
    /// The pod's files: its configuration (as the sidecar reads it), certificates, sidecar log.
    pub dir: PathBuf,
    config: String,
    sidecar: Option<(Sidecar, Child)>,
}

impl Pod {
    /// The configuration its sidecar runs (pilotfish's copy; Envoy's is `envoy.yaml` beside it).
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config_dump.yaml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("sidecar.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The configuration its sidecar runs, before the certificate paths are filled in.
    pub fn config_text(&self) -> &str {
        &self.config
    }

    pub fn sidecar(&self) -> Option<&Sidecar> {
        self.sidecar.as_ref().map(|(s, _)| s)
    }

    /// Runs `f` on a thread inside the pod's network namespace, as root (`uid` None: traffic
    /// the iptables rules intercept, like the app's) or with the effective uid given (1337:
    /// traffic they let through, like the sidecar's).
    pub fn run<T: Send + 'static>(
        &self,
        uid: Option<u32>,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        if self.netns.is_empty() {
            return std::thread::spawn(f)
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e));
        }
        in_netns(&self.netns, uid, f)
    }

    /// An admin request to the pod's sidecar: status and body.
    pub fn admin(&self, method: &str, path: &str) -> std::io::Result<(u16, String)> {
        let req = format!("{method} {path} HTTP/1.1\r\nhost: localhost:15000\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
        let admin = self.admin.clone();
        self.run(None, move || {
            let mut c = TcpStream::connect(admin)?;
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            c.write_all(req.as_bytes())?;
            let r = read_response(&mut BufReader::new(c))?;
            Ok((r.status, r.body))
        })
    }

    /// `ss -tn` in the pod: its TCP connections (in the loopback variant, where the pods share
    /// one network, the established connections of either pod's address).
    pub fn sockets(&self) -> String {
        if self.netns.is_empty() {
            return match Command::new("ss")
                .args(["-tn", "state", "established"])
                .output()
            {
                Ok(o) => String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .enumerate()
                    .filter(|(i, l)| {
                        *i == 0 || l.contains(NETSHOOT_LOOPBACK) || l.contains(FORTIO_LOOPBACK)
                    })
                    .map(|(_, l)| format!("{l}\n"))
                    .collect(),
                Err(e) => format!("ss: {e}\n"),
            };
        }
        let out = {
            Command::new("ip")
                .args(["netns", "exec", &self.netns, "ss", "-tn"])
                .output()
        };
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("ss: {e}\n"))
    }

    fn stop_sidecar(&mut self) {
        if let Some((_, mut child)) = self.sidecar.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An HTTP/1.1 response as a client read it.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The whole scene. Drop tears it down.
pub struct Scene {
    pub dir: PathBuf,
    pub netshoot: Pod,
    pub server: Pod,
    pub pki: Pki,
    /// The loopback variant (see `LOOPBACK_DIFFERENCES`).
    pub loopback: bool,
    /// Where netshoot's app connects for `http://fortio-server:8080/`.
    pub service: String,
    /// The veth pair's first end (removed with the scene, wherever a failure left it).
    veth: Option<String>,
    /// Tells fortio-server's app to stop accepting.
    app_stop: Arc<AtomicBool>,
}

impl Scene {
    /// Whether this machine can build the scene; if not, what it lacks.
    pub fn can_run() -> Result<(), String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(
                "the scene makes network namespaces and iptables rules: it needs root".into(),
            );
        }
        let missing: Vec<&str> = ["ip", "ss", "iptables-restore", "setpriv"]
            .into_iter()
            .filter(|t| {
                !Command::new("sh")
                    .args(["-c", &format!("command -v {t}")])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the scene needs {} (apt-get install iproute2 iptables util-linux)",
                missing.join(", ")
            ))
        }
    }

    /// The pods, their network, istio-init's rules, certificates and fortio-server's app; no
    /// sidecar yet (`start_sidecars`).
    pub fn up() -> Result<Scene, String> {
        Self::can_run()?;
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10;
        // Interface names stay under 16 characters; ids differ between processes and scenes.
        let id = (std::process::id() % 100_000) * 10 + n;
        let dir = private_dir("pilotfish-scene")?;
        let pod = |name: &'static str, ip: &'static str, config: &'static str| Pod {
            name,
            ip,
            netns: format!("pf-{name}-{id}"),
            admin: "127.0.0.1:15000".into(),
            dir: dir.join(name),
            config: config.to_string(),
            sidecar: None,
        };
        let scene = Scene {
            netshoot: pod("netshoot", NETSHOOT_IP, NETSHOOT_CONFIG),
            server: pod("fortio-server", FORTIO_IP, FORTIO_CONFIG),
            pki: Pki::new()?,
            dir,
            loopback: false,
            service: SERVICE.into(),
            veth: Some(format!("pfa{id}")),
            app_stop: Default::default(),
        };
        // From here on, Drop removes whatever was made.
        scene.build(id)?;
        Ok(scene)
    }

    /// The loopback variant, for a machine where the scene cannot make namespaces (no root):
    /// the same sidecars, configurations and certificates, with the changes
    /// `LOOPBACK_DIFFERENCES` lists.
    pub fn up_loopback() -> Result<Scene, String> {
        let dir = private_dir("pilotfish-scene-lo")?;
        let pod = |name: &'static str, ip: &'static str, config: &str| -> Result<Pod, String> {
            Ok(Pod {
                name,
                ip,
                netns: String::new(),
                admin: format!("{ip}:15000"),
                dir: dir.join(name),
                config: loopback_config(config, name, ip)?,
                sidecar: None,
            })
        };
        let scene = Scene {
            netshoot: pod("netshoot", NETSHOOT_LOOPBACK, NETSHOOT_CONFIG)?,
            server: pod("fortio-server", FORTIO_LOOPBACK, FORTIO_CONFIG)?,
            pki: Pki::new()?,
            dir,
            loopback: true,
            service: format!("{NETSHOOT_LOOPBACK}:8080"),
            veth: None,
            app_stop: Default::default(),
        };
        scene.write_pod_files()?;
        let app = TcpListener::bind(APP_LOOPBACK).map_err(|e| {
            format!(
                "fortio-server's app on {APP_LOOPBACK}: {e} (is another loopback demo running?)"
            )
        })?;
        serve_app(app, "fortio-server", scene.app_stop.clone());
        Ok(scene)
    }

    /// Each pod's certificates (one workload identity from the test CA) and its configuration,
    /// pointed at them.
    fn write_pod_files(&self) -> Result<(), String> {
        let workload = self.pki.issue(IDENTITY)?;
        for p in [&self.netshoot, &self.server] {
            let certs = p.dir.join("certs");
            std::fs::create_dir_all(&certs).map_err(|e| format!("{}: {e}", certs.display()))?;
            for (file, text) in [
                ("cert-chain.pem", &workload.cert),
                ("key.pem", &workload.key),
                ("root-cert.pem", &self.pki.root_pem),
            ] {
                std::fs::write(certs.join(file), text).map_err(|e| format!("{e}"))?;
            }
            let config = p
                .config
                .replace("/etc/certs/", &format!("{}/", certs.display()));
            std::fs::write(p.config_path(), config).map_err(|e| format!("{e}"))?;
        }
        Ok(())
    }

    fn build(&self, id: u32) -> Result<(), String> {
        let (a, b) = (format!("pfa{id}"), format!("pfb{id}"));
        let (ns_a, ns_b) = (&self.netshoot.netns, &self.server.netns);
        sh(&["ip", "netns", "add", ns_a])?;
        sh(&["ip", "netns", "add", ns_b])?;
        // The pods have no cluster DNS: a resolver on the pod's own loopback, which `ip netns
        // exec` gives the sidecars, refuses at once, so the bootstrap's zipkin cluster fails its
        // lookup in a moment instead of after the host resolver's timeout.
        for ns in [ns_a, ns_b] {
            let etc = Path::new("/etc/netns").join(ns);
            std::fs::create_dir_all(&etc).map_err(|e| format!("{}: {e}", etc.display()))?;
            std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n")
                .map_err(|e| format!("{}: {e}", etc.display()))?;
        }
        sh(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b])?;
        sh(&["ip", "link", "set", &a, "netns", ns_a])?;
        sh(&["ip", "link", "set", &b, "netns", ns_b])?;
        for (ns, dev, ip, via) in [
            (ns_a, &a, NETSHOOT_IP, FORTIO_IP),
            (ns_b, &b, FORTIO_IP, NETSHOOT_IP),
        ] {
            let ex = |cmd: &[&str]| {
                let mut full = vec!["ip", "netns", "exec", ns.as_str()];
                full.extend_from_slice(cmd);
                sh(&full)
            };
            ex(&["ip", "link", "set", "lo", "up"])?;
            ex(&["ip", "addr", "add", &format!("{ip}/24"), "dev", dev])?;
            ex(&["ip", "link", "set", dev, "up"])?;
            // The service range (and anything else) goes to the other pod, so the service
            // address has a route; istio-init's REDIRECT takes it before it leaves.
            ex(&["ip", "route", "add", "default", "via", via])?;
            let mut restore = Command::new("ip")
                .args(["netns", "exec", ns, "iptables-restore"])
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("iptables-restore: {e}"))?;
            restore
                .stdin
                .take()
                .expect("piped")
                .write_all(ISTIO_INIT_RULES.as_bytes())
                .map_err(|e| format!("iptables-restore: {e}"))?;
            let out = restore
                .wait_with_output()
                .map_err(|e| format!("iptables-restore: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "iptables-restore in {ns}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        self.write_pod_files()?;
        // istio-proxy owns its files, as in the pod.
        for p in [&self.netshoot, &self.server] {
            sh(&["chown", "-R", "1337:1337", &p.dir.to_string_lossy()])?;
        }
        let app = self
            .server
            .run(None, || TcpListener::bind("0.0.0.0:8080"))
            .map_err(|e| format!("fortio-server's app on 8080: {e}"))?;
        serve_app(app, "fortio-server", self.app_stop.clone());
        Ok(())
    }

    /// Starts a sidecar in each pod and waits until both are ready. `server_log_level` is the
    /// fortio-server sidecar's (the article raises it to debug); netshoot's logs at info.
    pub fn start_sidecars(
        &mut self,
        client: &Sidecar,
        server: &Sidecar,
        server_log_level: &str,
    ) -> Result<(), String> {
        self.stop_sidecars();
        for (pod, sidecar, level) in [
            (&mut self.netshoot, client, "info"),
            (&mut self.server, server, server_log_level),
        ] {
            start_sidecar(pod, sidecar, level)?;
        }
        for pod in [&mut self.netshoot, &mut self.server] {
            wait_ready(pod)?;
        }
        Ok(())
    }

    pub fn stop_sidecars(&mut self) {
        self.netshoot.stop_sidecar();
        self.server.stop_sidecar();
    }

    /// The article's request, `curl http://fortio-server:8080/` from netshoot (the service
    /// address, as the cluster's DNS gives it, with curl's headers).
    pub fn curl(&self) -> std::io::Result<(Response, SocketAddr)> {
        self.request(&self.service, "fortio-server:8080", "/", &[], None)
    }

    /// One HTTP/1.1 GET from netshoot, as root (intercepted) or as `uid`; the response and the
    /// client's local address.
    pub fn request(
        &self,
        to: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        uid: Option<u32>,
    ) -> std::io::Result<(Response, SocketAddr)> {
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: curl/7.83.1\r\nAccept: */*\r\n"
        );
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let to: SocketAddr = to
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        // In the loopback variant the app's connection comes from its pod's address.
        let from: Option<SocketAddr> = self
            .loopback
            .then(|| format!("{}:0", self.netshoot.ip).parse().ok())
            .flatten();
        self.netshoot.run(uid, move || {
            let mut c = match from {
                Some(from) => {
                    let s =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                    s.bind(&from.into())?;
                    s.connect_timeout(&to.into(), Duration::from_secs(5))?;
                    TcpStream::from(s)
                }
                None => TcpStream::connect_timeout(&to, Duration::from_secs(5))?,
            };
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            let local = c.local_addr()?;
            c.write_all(req.as_bytes())?;
            Ok((read_response(&mut BufReader::new(c))?, local))
        })
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        self.stop_sidecars();
        self.app_stop.store(true, Ordering::Relaxed);
        if let Some(veth) = &self.veth {
            // Still here only when moving it into its namespace failed.
            let _ = Command::new("ip")
                .args(["link", "del", veth])
                .stderr(Stdio::null())
                .status();
        }
        for ns in [&self.netshoot.netns, &self.server.netns] {
            if ns.is_empty() {
                continue;
            }
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(ns));
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_sidecar(pod: &mut Pod, sidecar: &Sidecar, level: &str) -> Result<(), String> {
    let log = pod.log_path();
    let _ = std::fs::remove_file(&log);
    let (bin, config, extra): (PathBuf, PathBuf, &[&str]) = match sidecar {
        Sidecar::Pilotfish(bin) => (bin.clone(), pod.config_path(), &[]),
        Sidecar::Envoy(bin) => {
            let cfg = pilotfish_config::load_file(&pod.config_path()).map_err(|e| {
                format!(
                    "{}: {}",
                    pod.config_path().display(),
                    e.0.iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            })?;
            let boot = pod.dir.join("envoy.yaml");
            std::fs::write(
                &boot,
                pilotfish_config::output::standalone_bootstrap_yaml(&cfg.resources),
            )
            .map_err(|e| format!("{e}"))?;
            // uid 1337 cannot reach an Envoy under /root: the pod gets its own link to it.
            let local = pod.dir.join("envoy");
            if !local.exists() && std::fs::hard_link(bin, &local).is_err() {
                std::fs::copy(bin, &local).map_err(|e| format!("copying Envoy: {e}"))?;
            }
            (local, boot, &["--disable-hot-restart"])
        }
    };
    // Both write their log to standard error, into the pod's log file: Envoy buffers a
    // `--log-path` file, and the demo reads the log as soon as the request is answered.
    let log_file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut command = if pod.netns.is_empty() {
        Command::new(&bin)
    } else {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &pod.netns, "setpriv"])
            .args(["--reuid", "1337", "--regid", "1337", "--clear-groups", "--"])
            .arg(&bin);
        c
    };
    let child = command
        .arg("-c")
        .arg(&config)
        .args(["-l", level, "--concurrency", "2"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    pod.sidecar = Some((sidecar.clone(), child));
    Ok(())
}

fn wait_ready(pod: &mut Pod) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, _)) = pod.admin("GET", "/ready") {
            return Ok(());
        }
        if let Some((s, child)) = pod.sidecar.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "{}'s sidecar ({}) exited ({status}):\n{}",
                    pod.name,
                    s.name(),
                    pod.log()
                ));
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{}'s sidecar not ready after 30 s:\n{}",
                pod.name,
                pod.log()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `f` on a new thread inside a network namespace, optionally with another effective uid.
/// Both changes are made by raw system calls, which (unlike libc's wrappers) change only the
/// calling thread; the thread ends with `f`.
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    uid: Option<u32>,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let path = format!("/var/run/netns/{netns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on this thread only, with a namespace file we hold open.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}");
        if let Some(uid) = uid {
            // SAFETY: the raw setresuid changes this thread's credentials only; -1 keeps the
            // real and saved uid (root), so nothing else in the process is affected.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_setresuid,
                    -1i64 as libc::c_long,
                    uid as libc::c_long,
                    -1i64 as libc::c_long,
                )
            };
            assert_eq!(r, 0, "setresuid to {uid}");
        }
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// A directory of this process's own under the temporary directory: made new (never one that
/// was there, which another user could have planted), readable by the sidecars' uid.
fn private_dir(prefix: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// An app such as fortio-server's: an HTTP/1.1 server (keep-alive) answering every request 200
/// with `<name> saw <peer>` and the request's header lines, one a line; it stops accepting when
/// `stop` is set (its socket then closes, so the scene's namespace can go).
pub fn serve_app(listener: TcpListener, name: &'static str, stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        if listener.set_nonblocking(true).is_err() {
            return;
        }
        while !stop.load(Ordering::Relaxed) {
            let c = match listener.accept() {
                Ok((c, _)) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(_) => continue,
            };
            if c.set_nonblocking(false).is_err() {
                continue;
            }
            std::thread::spawn(move || {
                let Ok(peer) = c.peer_addr() else { return };
                let Ok(mut w) = c.try_clone() else { return };
                let mut r = BufReader::new(c);
                loop {
                    let mut head = vec![];
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push(line.trim_end().to_string());
                    }
                    let body = format!("{name} saw {peer}\n{}\n", head.join("\n"));
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if w.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// Reads one HTTP/1.1 response with a content-length body (or one that ends at close).
pub fn read_response(r: &mut impl BufRead) -> std::io::Result<Response> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before a response",
        ));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("status line {line:?}")))?;
    let mut headers = vec![];
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((n, v)) = h.trim_end().split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let mut body = vec![];
    match length {
        Some(n) => {
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        }
        None => {
            r.read_to_end(&mut body)?;
        }
    }
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A pod's configuration for the loopback variant (see `LOOPBACK_DIFFERENCES`).
fn loopback_config(text: &str, pod: &str, ip: &str) -> Result<String, String> {
    use serde_yaml_ng::Value;
    let mut doc: Value =
        serde_yaml_ng::from_str(text).map_err(|e| format!("{pod}'s configuration: {e}"))?;
    // Every address: 0.0.0.0 and the admin's 127.0.0.1:15000 become the pod's address, the
    // pods' own addresses their loopback ones.
    fn addresses(v: &mut Value, ip: &str) {
        match v {
            Value::Mapping(m) => {
                if let Some(Value::Mapping(sa)) = m.get_mut("socket_address") {
                    let port = sa.get("port_value").and_then(Value::as_u64);
                    let new = match sa.get("address").and_then(Value::as_str) {
                        Some("0.0.0.0") => Some(ip.to_string()),
                        Some("127.0.0.1") if port == Some(15000) => Some(ip.to_string()),
                        Some(FORTIO_IP) => Some(FORTIO_LOOPBACK.to_string()),
                        Some(NETSHOOT_IP) => Some(NETSHOOT_LOOPBACK.to_string()),
                        _ => None,
                    };
                    if let Some(a) = new {
                        sa.insert("address".into(), a.into());
                    }
                }
                for (_, v) in m.iter_mut() {
                    addresses(v, ip);
                }
            }
            Value::Sequence(s) => s.iter_mut().for_each(|v| addresses(v, ip)),
            _ => {}
        }
    }
    addresses(&mut doc, ip);
    let configs = doc
        .get_mut("configs")
        .and_then(Value::as_sequence_mut)
        .ok_or_else(|| format!("{pod}'s configuration: no configs"))?;
    let kind = |c: &Value| {
        c.get("@type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let static_cluster = |name: &str, address: &str, port: u64| -> Value {
        serde_yaml_ng::from_str(&format!(
            "{{ cluster_name: '{name}', endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {address}, port_value: {port} }} }} }} }}] }}] }}"
        ))
        .expect("a load assignment")
    };
    for c in configs.iter_mut() {
        match kind(c).as_str() {
            "ListenersConfigDump" => {
                let Some(Value::Sequence(ls)) = c.get_mut("dynamic_listeners") else {
                    continue;
                };
                ls.retain(|l| {
                    !(pod == "fortio-server"
                        && l.get("name").and_then(Value::as_str) == Some("0.0.0.0_8080"))
                });
                for l in ls.iter_mut() {
                    let name = l
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    let Some(Value::Mapping(listener)) = l
                        .get_mut("active_state")
                        .and_then(|a| a.get_mut("listener"))
                    else {
                        continue;
                    };
                    if pod == "netshoot" && name == "0.0.0.0_8080" {
                        listener.remove("bind_to_port");
                    }
                    if pod == "fortio-server" && name == "virtualInbound" {
                        if let Some(Value::Mapping(sa)) = listener
                            .get_mut("address")
                            .and_then(|a| a.get_mut("socket_address"))
                        {
                            sa.insert("port_value".into(), 8080.into());
                        }
                    }
                }
            }
            "ClustersConfigDump" => {
                for list in ["static_clusters", "dynamic_active_clusters"] {
                    let Some(Value::Sequence(cs)) = c.get_mut(list) else {
                        continue;
                    };
                    for entry in cs.iter_mut() {
                        let Some(Value::Mapping(cluster)) = entry.get_mut("cluster") else {
                            continue;
                        };
                        let name = cluster
                            .get("name")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string();
                        let target = match name.as_str() {
                            "inbound|8080||" => APP_LOOPBACK
                                .rsplit_once(':')
                                .map(|(a, p)| (a, p.parse().unwrap_or(18080))),
                            "zipkin" => Some(("127.0.0.1", 9411)),
                            _ => None,
                        };
                        let Some((address, port)) = target else {
                            continue;
                        };
                        for k in [
                            "lb_policy",
                            "original_dst_lb_config",
                            "cleanup_interval",
                            "dns_lookup_family",
                            "dns_refresh_rate",
                            "respect_dns_ttl",
                        ] {
                            cluster.remove(k);
                        }
                        cluster.insert("type".into(), "STATIC".into());
                        cluster.insert(
                            "load_assignment".into(),
                            static_cluster(&name, address, port),
                        );
                    }
                }
            }
            _ => {}
        }
    }
    let mut out =
        format!("# {pod}'s sidecar, loopback variant of examples/scene/{pod}.config_dump.yaml\n");
    out.push_str(&serde_yaml_ng::to_string(&doc).map_err(|e| format!("{pod}: {e}"))?);
    Ok(out)
}
