//! Running real Envoy and pilotfish on the same configuration, one after the other, for the
//! conformance tests: admin on a free port, the listener port and the access log path filled in,
//! debug logs kept beside the configuration.

use super::{admin_request, free_port};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Running {
    pub child: Child,
    pub access_log: PathBuf,
    pub admin: u16,
    pub listen: u16,
    /// The configuration as run.
    pub text: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `bin` (Envoy when `is_envoy`) on `resources` with `{L}` (the listener port) and
/// `{ACCESS_LOG}` filled in; returns once `/ready` answers LIVE (listeners up). The ports are
/// picked free, but another process may take one before the proxy binds it: then it starts
/// again on new ones.
pub fn start(bin: &Path, is_envoy: bool, resources: &str, dir: &Path, tag: &str) -> Running {
    start_with(bin, is_envoy, resources, dir, tag, &[])
}

/// The same with more command-line arguments (both proxies take Envoy's).
pub fn start_with(
    bin: &Path,
    is_envoy: bool,
    resources: &str,
    dir: &Path,
    tag: &str,
    args: &[&str],
) -> Running {
    start_until(bin, is_envoy, resources, dir, tag, args, true)
}

/// Starts `bin` and returns as soon as its admin API answers, LIVE or not (a proxy still
/// waiting for its management server).
pub fn start_initializing(
    bin: &Path,
    is_envoy: bool,
    resources: &str,
    dir: &Path,
    tag: &str,
) -> Running {
    start_until(bin, is_envoy, resources, dir, tag, &[], false)
}

fn start_until(
    bin: &Path,
    is_envoy: bool,
    resources: &str,
    dir: &Path,
    tag: &str,
    args: &[&str],
    live: bool,
) -> Running {
    let mut tries = 0;
    loop {
        match try_start(bin, is_envoy, resources, dir, tag, args, live) {
            Ok(r) => return r,
            Err(log) if log.contains("already in use") && tries < 3 => tries += 1,
            Err(log) => panic!("{tag} exited: {log}"),
        }
    }
}

fn try_start(
    bin: &Path,
    is_envoy: bool,
    resources: &str,
    dir: &Path,
    tag: &str,
    args: &[&str],
    live: bool,
) -> Result<Running, String> {
    let (admin, listen) = (free_port(), free_port());
    let access_log = dir.join(format!("{tag}.access.log"));
    let text = resources
        .replace("{L}", &listen.to_string())
        .replace("{ACCESS_LOG}", &access_log.display().to_string());
    let file = dir.join(format!("{tag}.yaml"));
    std::fs::write(&file, format!("admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}\n{text}")).unwrap();
    let log = std::fs::File::create(dir.join(format!("{tag}.log"))).unwrap();
    let mut cmd = Command::new(bin);
    cmd.args([
        "-c",
        file.to_str().unwrap(),
        "--concurrency",
        "1",
        "-l",
        "debug",
        "--file-flush-interval-msec",
        "50",
    ]);
    cmd.args(args);
    if is_envoy {
        cmd.arg("--disable-hot-restart");
    }
    let child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
    let mut r = Running {
        child,
        access_log,
        admin,
        listen,
        text,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(s)) = r.child.try_wait() {
            return Err(format!(
                "({s}) {}",
                std::fs::read_to_string(dir.join(format!("{tag}.log"))).unwrap_or_default()
            ));
        }
        // Both answer LIVE only once their listeners are up.
        if TcpStream::connect(("127.0.0.1", admin)).is_ok()
            && (!live || admin_request(admin, "GET", "/ready").1 == "LIVE\n")
        {
            break;
        }
        assert!(Instant::now() < deadline, "{tag} not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(r)
}

/// The named stats' values (`(absent)` when a proxy does not have one).
pub fn stat_values(
    admin: u16,
    names: &[&str],
    rename: impl Fn(&str) -> String,
) -> std::collections::BTreeMap<String, String> {
    let text = admin_request(admin, "GET", "/stats").1;
    names
        .iter()
        .map(|n| {
            let full = rename(n);
            let v = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{full}: ")))
                .unwrap_or("(absent)")
                .to_string();
            (n.to_string(), v)
        })
        .collect()
}

/// A STATIC cluster on 127.0.0.1 at these ports (placeholders such as `{U0}` welcome), with
/// `extra` cluster fields, as a `clusters:` list item.
pub fn static_cluster(name: &str, ports: &[&str], extra: &str) -> String {
    let eps: Vec<String> = ports
        .iter()
        .map(|p| format!("{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p} }} }} }} }}"))
        .collect();
    format!("  - {{ name: {name}, type: STATIC, connect_timeout: 1s{extra}, load_assignment: {{ cluster_name: {name}, endpoints: [{{ lb_endpoints: [{}] }}] }} }}\n", eps.join(", "))
}
