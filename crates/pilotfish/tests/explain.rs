//! `pilotfish explain` on the seed dump: the picture holds the whole configuration, nothing in it
//! overlaps, the article's request lights up exactly its path, the focus options narrow it, and
//! every format is one its viewer reads (XML for SVG and draw.io, Graphviz's own parser for DOT
//! and librsvg for the SVG where they are installed, as CI installs them).

mod common;
use common::*;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

const INBOUND: &[&str] = &[
    "--inbound",
    "--destination",
    "172.21.206.230:8080",
    "--tls",
    "--sni",
    "outbound_.8080_._.fortio-server.mark.svc.cluster.local",
    "--alpn",
    "istio-http/1.1",
];

fn seed(test: &str) -> Option<PathBuf> {
    shared_dir(test).map(|s| s.join("corpus/istio-1.14-sidecar-fortio-server.config_dump.yaml"))
}

fn explain(config: &Path, args: &[&str]) -> String {
    let mut full = vec!["explain", config.to_str().unwrap()];
    full.extend_from_slice(args);
    let out = pilotfish(&full);
    assert!(out.status.success(), "explain {args:?}: {}", stderr(&out));
    stdout(&out)
}

/// A node of the SVG: its box and the full text of its lines (from its <title>).
struct Box_ {
    x: f64,
    y: f64,
    w: f64,
    h: f64,
    lines: Vec<String>,
    highlighted: bool,
}

fn svg_boxes(svg: &str) -> Vec<Box_> {
    let doc = roxmltree::Document::parse(svg).expect("the SVG is well-formed XML");
    let f = |n: roxmltree::Node, a: &str| n.attribute(a).unwrap().parse::<f64>().unwrap();
    doc.descendants()
        .filter(|n| n.has_tag_name("g"))
        .map(|g| {
            let title = g.children().find(|c| c.has_tag_name("title")).unwrap();
            let rect = g.children().find(|c| c.has_tag_name("rect")).unwrap();
            Box_ {
                x: f(rect, "x"),
                y: f(rect, "y"),
                w: f(rect, "width"),
                h: f(rect, "height"),
                lines: title
                    .text()
                    .unwrap_or("")
                    .lines()
                    .map(str::to_string)
                    .collect(),
                highlighted: rect.attribute("stroke-width") == Some("3"),
            }
        })
        .collect()
}

fn summary(config: &Path) -> serde_json::Value {
    let out = pilotfish(&["validate", config.to_str().unwrap(), "--json"]);
    assert!(out.status.success());
    serde_json::from_str(&stdout(&out)).unwrap()
}

#[test]
fn the_seed_picture_holds_every_listener_and_no_box_overlaps() {
    let Some(seed) = seed("explain svg") else {
        return;
    };
    let svg = explain(&seed, &["--format", "svg"]);
    let boxes = svg_boxes(&svg);
    let firsts: BTreeSet<&str> = boxes.iter().map(|b| b.lines[0].as_str()).collect();
    let s = summary(&seed);
    for l in s["listeners"]["items"].as_array().unwrap() {
        let name = l["name"].as_str().unwrap();
        let shown = if name.is_empty() {
            format!("({})", l["address"].as_str().unwrap())
        } else {
            name.to_string()
        };
        assert!(
            firsts.contains(shown.as_str()),
            "listener {shown} not drawn"
        );
    }
    // Every cluster a listener, route or tcp_proxy can reach is drawn; the seed's routes and
    // tcp_proxies reach most of its 55.
    let dump = pilotfish(&["config-dump", seed.to_str().unwrap()]);
    let dump: serde_json::Value = serde_json::from_str(&stdout(&dump)).unwrap();
    let clusters_dump = dump["configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["@type"].as_str().unwrap().ends_with("ClustersConfigDump"))
        .unwrap();
    let mut names = vec![];
    for list in ["static_clusters", "dynamic_active_clusters"] {
        for c in clusters_dump[list].as_array().unwrap() {
            names.push(c["cluster"]["name"].as_str().unwrap());
        }
    }
    assert_eq!(names.len(), 55);
    let drawn = names.iter().filter(|c| firsts.contains(*c)).count();
    assert!(drawn >= 40, "only {drawn} of 55 clusters drawn");
    assert!(firsts.contains("inbound|8080||"));
    assert!(firsts.contains("outbound|8080||fortio-server-l2.mark.svc.cluster.local"));
    // No two boxes overlap, and every box is inside the picture.
    let doc = roxmltree::Document::parse(&svg).unwrap();
    let width: f64 = doc
        .root_element()
        .attribute("width")
        .unwrap()
        .parse()
        .unwrap();
    let height: f64 = doc
        .root_element()
        .attribute("height")
        .unwrap()
        .parse()
        .unwrap();
    for (i, a) in boxes.iter().enumerate() {
        assert!(a.x >= 0.0 && a.y >= 0.0 && a.x + a.w <= width && a.y + a.h <= height);
        for b in &boxes[i + 1..] {
            let apart =
                a.x + a.w <= b.x || b.x + b.w <= a.x || a.y + a.h <= b.y || b.y + b.h <= a.y;
            assert!(apart, "{:?} overlaps {:?}", a.lines[0], b.lines[0]);
        }
    }
    assert!(
        !boxes.iter().any(|b| b.highlighted),
        "nothing is highlighted without a trace"
    );
}

#[test]
fn the_articles_request_lights_up_its_path() {
    let Some(seed) = seed("explain highlight") else {
        return;
    };
    let mut args = vec!["--format", "svg"];
    args.extend_from_slice(INBOUND);
    let boxes = svg_boxes(&explain(&seed, &args));
    // Left to right, as the article draws it.
    let mut lit: Vec<&Box_> = boxes.iter().filter(|b| b.highlighted).collect();
    lit.sort_by(|a, b| a.x.total_cmp(&b.x));
    let firsts: Vec<&str> = lit.iter().map(|b| b.lines[0].as_str()).collect();
    assert_eq!(
        firsts,
        [
            "virtualInbound",
            "0.0.0.0_8080",
            "istio.metadata_exchange -> http_connection_manager",
            "inbound|8080||",
            "inbound|http|8080",
            "default",
            "inbound|8080||",
            "original destination",
        ]
    );
    // The chain lit is the TLS one, not its plaintext twin of the same name.
    assert!(
        lit[1].lines.iter().any(|l| l == "transport_protocol tls"),
        "{:?}",
        lit[1].lines
    );
    assert!(lit[7]
        .lines
        .iter()
        .any(|l| l.starts_with("this connection: 172.21.206.230:8080")));
}

#[test]
fn the_outbound_call_shows_the_hand_off_from_15001() {
    let Some(seed) = seed("explain outbound") else {
        return;
    };
    let text = explain(
        &seed,
        &[
            "--outbound",
            "--destination",
            "10.97.158.221:8080",
            "--authority",
            "fortio-server-l2:8080",
        ],
    );
    let lit: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("=> "))
        .collect();
    assert_eq!(lit.len(), 9, "{lit:#?}");
    assert!(lit[0].starts_with("listener virtualOutbound:"));
    assert!(lit[1].starts_with("(use_original_dst) listener 0.0.0.0_8080:"));
    assert!(lit[4].starts_with("(RDS) route config 8080:"));
    assert!(lit[5].starts_with("virtual host fortio-server-l2.mark.svc.cluster.local:8080:"));
    assert!(lit[7].starts_with("cluster outbound|8080||fortio-server-l2.mark.svc.cluster.local:"));
    assert!(lit[8].contains("this connection: 172.21.206.227:8080"));
}

#[test]
fn focus_options_narrow_the_picture() {
    let Some(seed) = seed("explain focus") else {
        return;
    };
    let roots = |args: &[&str]| -> Vec<String> {
        explain(&seed, args)
            .lines()
            .filter(|l| l.starts_with("listener "))
            .map(|l| l.to_string())
            .collect()
    };
    let all = roots(&[]);
    assert_eq!(all.len(), 37);
    let port = roots(&["--port", "8080"]);
    assert!(
        !port.is_empty() && port.iter().all(|l| l.contains(":8080 ")),
        "{port:#?}"
    );
    assert!(port.len() < all.len());
    let inbound = roots(&["--direction", "inbound"]);
    assert_eq!(inbound.len(), 1, "{inbound:#?}");
    assert!(inbound[0].starts_with("listener virtualInbound:"));
    let one = roots(&["--listener", "virtualOutbound"]);
    assert_eq!(one.len(), 1);
    // With a cluster in focus, every branch ends at it.
    let cluster = "outbound|8080||fortio-server-l2.mark.svc.cluster.local";
    let text = explain(&seed, &["--cluster", cluster]);
    let clusters: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("cluster "))
        .map(|l| l.split([':', ' ']).next().unwrap())
        .collect();
    assert_eq!(clusters, BTreeSet::from([cluster]));
    assert!(text.contains("listener 0.0.0.0_8080:"));
    assert!(!text.contains("listener virtualInbound"));
    let out = pilotfish(&["explain", seed.to_str().unwrap(), "--port", "1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("nothing to draw"));
}

#[test]
fn drawio_file_is_a_diagram_with_every_box_and_edge() {
    let Some(seed) = seed("explain drawio") else {
        return;
    };
    let mut args = vec!["--format", "drawio"];
    args.extend_from_slice(INBOUND);
    let xml = explain(&seed, &args);
    let doc = roxmltree::Document::parse(&xml).expect("well-formed XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "mxfile");
    let model = root
        .descendants()
        .find(|n| n.has_tag_name("mxGraphModel"))
        .unwrap();
    let cells: Vec<roxmltree::Node> = model
        .descendants()
        .filter(|n| n.has_tag_name("mxCell"))
        .collect();
    let vertices: HashMap<&str, &str> = cells
        .iter()
        .filter(|c| c.attribute("vertex") == Some("1"))
        .map(|c| (c.attribute("id").unwrap(), c.attribute("value").unwrap()))
        .collect();
    let edges: Vec<&roxmltree::Node> = cells
        .iter()
        .filter(|c| c.attribute("edge") == Some("1"))
        .collect();
    for e in &edges {
        for end in ["source", "target"] {
            let id = e.attribute(end).unwrap();
            assert!(vertices.contains_key(id), "edge ends at unknown cell {id}");
        }
        let geometry = e.children().find(|c| c.has_tag_name("mxGeometry")).unwrap();
        assert_eq!(geometry.attribute("relative"), Some("1"));
    }
    // Same boxes as the SVG (plus the column titles), each placed with a geometry.
    let svg = svg_boxes(&explain(&seed, &["--format", "svg"]));
    let boxes: Vec<&&str> = vertices
        .iter()
        .filter(|(id, _)| id.starts_with('n'))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(boxes.len(), svg.len());
    // Labels are HTML (html=1): the first line in bold, lines split by <br>.
    assert!(boxes
        .iter()
        .any(|v| v.starts_with("<b>virtualInbound</b><br>")));
    let lit = cells
        .iter()
        .filter(|c| {
            c.attribute("style")
                .is_some_and(|s| s.contains("strokeColor=#e8590c"))
        })
        .count();
    assert!(lit >= 8 + 7, "the traced path is highlighted ({lit} cells)");
}

#[test]
fn dot_and_mermaid_name_every_box_once() {
    let Some(seed) = seed("explain dot mermaid") else {
        return;
    };
    let svg = svg_boxes(&explain(&seed, &["--format", "svg"]));
    let dot = explain(&seed, &["--format", "dot"]);
    assert!(dot.starts_with("digraph pilotfish {"));
    let nodes = dot
        .lines()
        .filter(|l| l.contains(" [label=\"") && !l.contains("\" -> \""))
        .count();
    assert_eq!(nodes, svg.len());
    let edges = dot.lines().filter(|l| l.contains("\" -> \"")).count();
    assert!(edges >= nodes - 37, "{edges} edges for {nodes} nodes");
    assert!(dot.contains("{ rank=same;"));
    // Graphviz parses it, when it is installed (CI installs it).
    match Command::new("dot")
        .arg("-Tsvg")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(dot.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "dot rejects the output: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(_) => {
            assert!(!in_ci(), "graphviz (dot) is required under CI=true");
            eprintln!("SKIP: graphviz is not installed; the DOT output was checked for shape only");
        }
    }

    let out = pilotfish(&["explain", seed.to_str().unwrap(), "--format", "mermaid"]);
    // The whole seed stays inside Mermaid's default limits (500 edges, 50,000 characters), so
    // no warning; a bigger configuration is told to narrow the picture.
    assert!(
        out.status.success() && stderr(&out).is_empty(),
        "{}",
        stderr(&out)
    );
    let mermaid = stdout(&out);
    assert!(mermaid.len() < 50_000);
    assert!(mermaid.contains("\nflowchart LR\n"));
    let mut defined = BTreeSet::new();
    for l in mermaid.lines() {
        let l = l.trim();
        if let Some((id, rest)) = l.split_once("[\"") {
            assert!(defined.insert(id.to_string()), "{id} defined twice");
            let (label, class) = rest.rsplit_once("\"]:::").expect("label then class");
            assert!(!label.contains('"'), "unescaped quote in {l}");
            assert!(class.starts_with('c'));
        }
    }
    for l in mermaid.lines().filter(|l| l.contains(" --> ")) {
        let words: Vec<&str> = l.split_whitespace().collect();
        assert!(defined.contains(words[0]), "{l}");
        assert!(defined.contains(*words.last().unwrap()), "{l}");
    }
}

#[test]
fn the_seed_svg_renders_to_png() {
    let Some(seed) = seed("explain png") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("pilotfish-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("seed.svg");
    let png = dir.join("seed.png");
    let mut args = vec!["--format", "svg", "-o", svg.to_str().unwrap()];
    args.extend_from_slice(INBOUND);
    explain(&seed, &args);
    match Command::new("rsvg-convert")
        .arg(&svg)
        .arg("-o")
        .arg(&png)
        .output()
    {
        Ok(out) => {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let bytes = std::fs::read(&png).unwrap();
            assert_eq!(&bytes[1..4], b"PNG");
            // The picture's size, from the PNG header: as wide as eight columns of boxes.
            let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
            assert!(w > 2000, "width {w}");
        }
        Err(_) => {
            assert!(
                !in_ci(),
                "rsvg-convert (librsvg2-bin) is required under CI=true"
            );
            eprintln!("SKIP: rsvg-convert is not installed");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
