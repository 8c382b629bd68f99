//! A `pilotfish -c` process for the proxy tests: its bootstrap (with an admin address added)
//! in a directory of its own, its log file, and its admin API.
#![allow(dead_code)]

use super::{admin_request, free_port};
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Proxy {
    pub child: Child,
    pub admin: u16,
    pub log: PathBuf,
    pub dir: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pilotfish-proxy-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

impl Proxy {
    /// Starts `pilotfish -c` on `static_resources` (an admin address is added) in a directory of
    /// its own, and waits for /ready.
    pub fn start(name: &str, static_resources: &str, extra: &[&str]) -> Proxy {
        Proxy::start_in(temp_dir(name), static_resources, extra)
    }

    /// The same, in a directory the test already wrote files to (certificates).
    pub fn start_in(dir: PathBuf, static_resources: &str, extra: &[&str]) -> Proxy {
        let admin = free_port();
        let file = dir.join("bootstrap.yaml");
        std::fs::write(
            &file,
            format!("admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}\n{static_resources}"),
        )
        .unwrap();
        let log = dir.join("pilotfish.log");
        let mut args = vec![
            "-c",
            file.to_str().unwrap(),
            "--concurrency",
            "2",
            "--log-path",
            log.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let child = Command::new(env!("CARGO_BIN_EXE_pilotfish"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut p = Proxy {
            child,
            admin,
            log,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                let mut err = String::new();
                let _ = p.child.stderr.take().unwrap().read_to_string(&mut err);
                panic!(
                    "pilotfish exited ({status}): {err}\n{}",
                    std::fs::read_to_string(&p.log).unwrap_or_default()
                );
            }
            if p.get("/ready").0 == 200 {
                return p;
            }
            assert!(Instant::now() < deadline, "pilotfish not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn request(&self, method: &str, path: &str) -> (u16, String) {
        admin_request(self.admin, method, path)
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        self.request("GET", path)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
