//! Network namespaces for the interception tests: a pod namespace at 172.21.206.230 joined by a
//! veth pair to a peer namespace at 172.21.206.228 (which also holds the metrics-server endpoint
//! 172.30.207.152), istio-init's iptables rules in the pod, and threads that make sockets inside a
//! namespace. Everything is removed when the `Namespaces` is dropped.
#![allow(dead_code)]

use std::io::Read;
use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command};

use super::in_ci;

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a thread inside the namespace: sockets it makes live there for good.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    pilotfish::scene::in_netns(ns, None, f)
}

/// A server that answers what it first reads with its name and the peer it saw.
pub fn serve(listener: TcpListener, name: &'static str) {
    std::thread::spawn(move || {
        for c in listener.incoming() {
            let Ok(mut c) = c else { continue };
            let peer = c.peer_addr().unwrap();
            std::thread::spawn(move || {
                let mut got = [0u8; 1024];
                let n = c.read(&mut got).unwrap_or(0);
                // One write, so the answer crosses the proxy in one piece.
                let answer = format!("{name} saw {peer}: {}", String::from_utf8_lossy(&got[..n]));
                let _ = c.write_all(answer.as_bytes());
            });
        }
    });
}

/// An HTTP/1.1 app on `listener` (the scene's): each request (keep-alive) is answered 200 with
/// `<name> saw <peer>` and the request's headers, one a line.
pub fn serve_http(listener: TcpListener, name: &'static str) {
    pilotfish::scene::serve_app(listener, name, Default::default());
}

pub struct Namespaces {
    pub pod: String,
    pub peer: String,
    pub proxy: Option<Child>,
    pub dir: std::path::PathBuf,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        if let Some(mut p) = self.proxy.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.pod])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.peer])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["ip", "iptables-restore", "setpriv"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if root && tools {
        return true;
    }
    assert!(
        !in_ci(),
        "the interception test needs root, ip, iptables-restore and setpriv under CI=true"
    );
    eprintln!(
        "SKIP intercept: needs root and ip, iptables-restore, setpriv (apt-get install iptables)"
    );
    false
}

/// The pod and peer namespaces, wired and with istio-init's rules in the pod; None (with a note)
/// where this machine cannot make them.
pub fn setup_pod(name: &str, shared: &Path) -> Namespaces {
    // Unique per test, also for tests of one process running side by side (interface names
    // stay under 16 characters).
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10;
    let id = (std::process::id() % 100_000) * 10 + n;
    let dir = std::env::temp_dir().join(format!("pilotfish-{name}-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    sh(&["chmod", "0777", dir.to_str().unwrap()]);
    let ns = Namespaces {
        pod: format!("pf-pod-{id}"),
        peer: format!("pf-peer-{id}"),
        proxy: None,
        dir: dir.clone(),
    };
    let (vp, vc) = (format!("pfp{id}"), format!("pfc{id}"));
    let (pod, peer) = (ns.pod.clone(), ns.peer.clone());
    sh(&["ip", "netns", "add", &pod]);
    sh(&["ip", "netns", "add", &peer]);
    sh(&[
        "ip", "link", "add", &vp, "type", "veth", "peer", "name", &vc,
    ]);
    sh(&["ip", "link", "set", &vp, "netns", &pod]);
    sh(&["ip", "link", "set", &vc, "netns", &peer]);
    for (n, cmd) in [
        (&pod, vec!["ip", "link", "set", "lo", "up"]),
        (
            &pod,
            vec!["ip", "addr", "add", "172.21.206.230/24", "dev", &vp],
        ),
        (&pod, vec!["ip", "link", "set", &vp, "up"]),
        (
            &pod,
            vec!["ip", "route", "add", "default", "via", "172.21.206.228"],
        ),
        (&peer, vec!["ip", "link", "set", "lo", "up"]),
        (
            &peer,
            vec!["ip", "addr", "add", "172.21.206.228/24", "dev", &vc],
        ),
        (
            &peer,
            vec!["ip", "addr", "add", "172.30.207.152/32", "dev", "lo"],
        ),
        (&peer, vec!["ip", "link", "set", &vc, "up"]),
    ] {
        let mut full = vec!["ip", "netns", "exec", n.as_str()];
        full.extend(cmd);
        sh(&full);
    }
    let rules = shared.join("envoy-reference/istio-init.iptables.rules");
    let status = Command::new("ip")
        .args(["netns", "exec", &pod, "iptables-restore"])
        .stdin(std::fs::File::open(&rules).unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "iptables-restore in the pod namespace");

    ns
}
