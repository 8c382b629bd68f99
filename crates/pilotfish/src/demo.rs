//! `pilotfish demo`: the founding article's walk-through, run for real. Builds the scene (see
//! `pilotfish::scene`), sends the article's request from netshoot, and shows what the article
//! shows: the connections before and after, the path through both sidecars and why, the inbound
//! sidecar's debug log for the request, and the picture of the path. Cleans up when done.

use pilotfish::scene::{Scene, Sidecar, LOOPBACK_DIFFERENCES, SERVICE, SNI};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

pub struct Options {
    pub client: Sidecar,
    pub server: Sidecar,
    /// Where the configurations and pictures are kept after the scene is gone.
    pub out: PathBuf,
    /// The loopback variant even where the namespaces could be made.
    pub loopback: bool,
}

fn heading(n: u32, text: &str) {
    println!("\n== {n}. {text}");
}

fn indent(text: &str) {
    for l in text.lines() {
        println!("   {l}");
    }
}

/// Runs one of this binary's own commands, showing it as a user would type it.
fn run_self(args: &[String]) -> String {
    println!("   $ pilotfish {}", args.join(" "));
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("pilotfish"));
    match Command::new(exe).args(args).output() {
        Ok(o) => {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s
        }
        Err(e) => format!("could not run pilotfish: {e}\n"),
    }
}

/// The directory the configurations and pictures are kept in: made if missing; an existing one
/// must be this user's own, a real directory, and not writable by others (the demo may run as
/// root, and writes fixed file names there).
fn out_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::symlink_metadata(dir) {
        Err(_) => std::fs::DirBuilder::new()
            .mode(0o755)
            .recursive(true)
            .create(dir)
            .map_err(|e| format!("{}: {e}", dir.display())),
        Ok(m) => {
            // SAFETY: geteuid has no preconditions.
            let me = unsafe { libc::geteuid() };
            if !m.is_dir() || m.uid() != me || m.mode() & 0o022 != 0 {
                return Err(format!(
                    "{}: not a directory of this user's that only it can write; give another with --out",
                    dir.display()
                ));
            }
            Ok(())
        }
    }
}

/// Keeps Ctrl-C from ending the demo half way (its scene is gone within a second or two, and
/// tearing it down is what must not be skipped); the previous handling comes back when dropped.
struct NoInterrupt(libc::sighandler_t);

impl NoInterrupt {
    fn new() -> NoInterrupt {
        // SAFETY: SIG_IGN is a valid disposition for SIGINT; the old one is restored on drop.
        NoInterrupt(unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) })
    }
}

impl Drop for NoInterrupt {
    fn drop(&mut self) {
        // SAFETY: restores the disposition `new` replaced.
        unsafe {
            libc::signal(libc::SIGINT, self.0);
        }
    }
}

pub fn run(o: Options) -> ExitCode {
    let _no_interrupt = NoInterrupt::new();
    let scene = match (o.loopback, Scene::can_run()) {
        (false, Ok(())) => Scene::up(),
        (true, _) => {
            println!("The loopback variant (--loopback), which differs from the article's scene:");
            Scene::up_loopback()
        }
        (false, Err(why)) => {
            println!("The article's scene puts each pod in a network namespace of its own with istio-init's iptables rules, which cannot be built here: {why}. This is the loopback variant, which differs from it:");
            Scene::up_loopback()
        }
    };
    let scene = match scene {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pilotfish demo: {e}");
            return ExitCode::from(1);
        }
    };
    if scene.loopback {
        for d in LOOPBACK_DIFFERENCES {
            println!("   - {d}");
        }
    }
    match demo(scene, &o) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pilotfish demo: {e}");
            ExitCode::from(1)
        }
    }
}

fn demo(mut s: Scene, o: &Options) -> Result<(), String> {
    println!("\npilotfish demo: the founding article's request, `curl http://fortio-server:8080/` from pod netshoot, on this machine.");
    let (netshoot_ip, fortio_ip) = (s.netshoot.ip, s.server.ip);
    if s.loopback {
        println!(
            "\nThe scene (removed when the demo ends), loopback variant:
   pod netshoot       {netshoot_ip}  sidecar: {}
   pod fortio-server  {fortio_ip}  sidecar: {}, app on {}
   each sidecar runs with its pod's configuration (examples/scene/, derived from the article's
   config dump, changed as listed above); identity spiffe://cluster.local/ns/mark/sa/default from
   a test CA, delivered as the secrets `default` and `ROOTCA` the configuration names.",
            o.client.name(),
            o.server.name(),
            pilotfish::scene::APP_LOOPBACK
        );
    } else {
        println!(
            "\nThe scene (removed when the demo ends):
   pod netshoot       {netshoot_ip}  network namespace {}, istio-init's iptables rules, sidecar: {}
   pod fortio-server  {fortio_ip}  network namespace {}, istio-init's iptables rules, sidecar: {}, app on :8080
   service fortio-server  {SERVICE}
   each sidecar runs as uid 1337 with its pod's configuration (examples/scene/, derived from the
   article's config dump); identity spiffe://cluster.local/ns/mark/sa/default from a test CA,
   delivered as the secrets `default` and `ROOTCA` the configuration names.",
            s.netshoot.netns,
            o.client.name(),
            s.server.netns,
            o.server.name()
        );
    }
    s.start_sidecars(&o.client, &o.server, "info")?;

    heading(
        1,
        "netshoot's TCP connections before the request (the article's `ss -tr`)",
    );
    indent(&s.netshoot.sockets());

    heading(
        2,
        "fortio-server's sidecar logs at debug from now on (the article's `curl -XPOST 'localhost:15000/logging?level=debug'`)",
    );
    let (code, _) = s
        .server
        .admin("POST", "/logging?level=debug")
        .map_err(|e| format!("fortio-server's admin: {e}"))?;
    println!("   POST /logging?level=debug -> {code}");
    let log_start = s.server.log().len();

    heading(3, "netshoot: curl -v http://fortio-server:8080/");
    let (r, client) = s
        .curl()
        .map_err(|e| format!("the request failed: {e}\n{}", s.server.log()))?;
    if s.loopback {
        println!(
            "   (the app's connection {client} -> {}, netshoot's sidecar's outbound listener)",
            s.service
        );
    } else {
        println!("   (the app's connection {client} -> {SERVICE}, redirected to netshoot's sidecar on 15001)");
    }
    println!("   < HTTP/1.1 {}", r.status);
    for (n, v) in &r.headers {
        println!("   < {n}: {v}");
    }
    println!("   what fortio-server's app received:");
    for l in r.body.lines() {
        println!("   | {l}");
    }

    heading(
        4,
        "netshoot's TCP connections after: the client sidecar's new pooled mTLS connection",
    );
    let after = s.netshoot.sockets();
    indent(&after);

    let log = s.server.log();
    let story = log.get(log_start..).unwrap_or_default();
    // Where netshoot's sidecar connected from, as the inbound sidecar saw it.
    let marker = "new connection from ";
    let source = story
        .find(marker)
        .map(|i| &story[i + marker.len()..])
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string);
    if source.is_none() {
        println!("   (the inbound sidecar's log names no new connection: the trace below assumes {netshoot_ip}:40000)");
    }
    let source = source.unwrap_or_else(|| format!("{netshoot_ip}:40000"));

    out_dir(&o.out)?;
    let client_cfg = o.out.join("netshoot.config_dump.yaml");
    let server_cfg = o.out.join("fortio-server.config_dump.yaml");
    for (path, text) in [
        (&client_cfg, s.netshoot.config_text()),
        (&server_cfg, s.server.config_text()),
    ] {
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    // Without interception the connections arrive where they are addressed.
    let (out_entry, in_entry) = if s.loopback {
        (vec![], vec![])
    } else {
        (
            vec!["--outbound".to_string()],
            vec!["--inbound".to_string()],
        )
    };
    let mut outbound = out_entry;
    outbound.extend(
        [
            "--destination",
            &s.service,
            "--source",
            &client.to_string(),
            "--authority",
            "fortio-server:8080",
        ]
        .map(String::from),
    );
    let mut inbound = in_entry;
    inbound.extend(
        [
            "--destination",
            &format!("{fortio_ip}:8080"),
            "--source",
            &source,
            "--tls",
            "--sni",
            SNI,
            "--alpn",
            "istio-http/1.1,istio,http/1.1",
            "--authority",
            "fortio-server:8080",
        ]
        .map(String::from),
    );
    let with = |cmd: &str, cfg: &Path, conn: &[String], extra: &[&str]| -> Vec<String> {
        let mut v = vec![cmd.to_string(), cfg.display().to_string()];
        v.extend(conn.iter().cloned());
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };

    heading(5, "the path through netshoot's sidecar, and why (outbound)");
    indent(&run_self(&with("trace", &client_cfg, &outbound, &[])));
    heading(
        6,
        "the path through fortio-server's sidecar, and why (inbound)",
    );
    indent(&run_self(&with("trace", &server_cfg, &inbound, &[])));

    heading(
        7,
        "fortio-server's sidecar debug log for this request (the article's walk-through)",
    );
    indent(story);

    heading(8, "the pictures, with this request's path highlighted");
    let inbound_svg = o.out.join("fortio-server-inbound.svg");
    let outbound_svg = o.out.join("netshoot-outbound.svg");
    for (cfg, conn, svg) in [
        (&server_cfg, &inbound, &inbound_svg),
        (&client_cfg, &outbound, &outbound_svg),
    ] {
        let out = svg.display().to_string();
        let said = run_self(&with("explain", cfg, conn, &["-f", "svg", "-o", &out]));
        indent(&said);
        println!("   -> {out}");
    }
    heading(
        9,
        "Istio's metrics for it, as Prometheus scrapes each sidecar (istio.stats)",
    );
    for (pod, reporter) in [(&s.server, "destination"), (&s.netshoot, "source")] {
        println!("   {}'s sidecar (reporter={reporter}):", pod.name);
        let (_, metrics) = pod
            .admin("GET", "/stats/prometheus")
            .map_err(|e| format!("{}'s admin: {e}", pod.name))?;
        let lines: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .collect();
        if lines.is_empty() {
            println!(
                "   (none: {} runs no istio.stats)",
                pod.sidecar().map_or("it", |s| s.name())
            );
        }
        for l in lines {
            println!("   {l}");
        }
    }
    s.stop_sidecars();
    drop(s);
    println!(
        "\nDone: the namespaces, sidecars and certificates are gone; the configurations and pictures stay in {}.",
        o.out.display()
    );
    Ok(())
}
