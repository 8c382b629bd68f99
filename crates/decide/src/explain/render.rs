//! The renderings of an explain [`Graph`]: the layout (columns in data path order, nodes ordered
//! so edges cross little and placed beside what feeds them) and its five outputs. SVG and draw.io
//! share the layout so the two pictures look alike; DOT and Mermaid hand theirs to the viewer.

use super::{Column, Graph};
use std::collections::HashMap;
use std::fmt::Write;

/// Longest detail line drawn before it is cut with an ellipsis.
const MAX_CHARS: usize = 64;
const CHAR_W: f64 = 7.0;
const LINE_H: f64 = 15.0;
const PAD: f64 = 8.0;
const COLUMN_GAP: f64 = 90.0;
const NODE_GAP: f64 = 12.0;
const TOP: f64 = 70.0;
const LEFT: f64 = 20.0;

/// Where a node is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

impl Rect {
    fn center_y(&self) -> f64 {
        self.y + self.h / 2.0
    }
}

#[derive(Debug, Clone)]
pub struct Layout {
    /// Indexed like `Graph::nodes`.
    pub rects: Vec<Rect>,
    /// The columns drawn (empty ones left out), with their x and width.
    pub columns: Vec<(Column, f64, f64)>,
    pub width: f64,
    pub height: f64,
}

fn clip(s: &str) -> String {
    if s.chars().count() <= MAX_CHARS {
        s.to_string()
    } else {
        let mut c: String = s.chars().take(MAX_CHARS - 1).collect();
        c.push('…');
        c
    }
}

/// Layered layout: one column per stage, nodes sorted by the mean position of their neighbours
/// (a few sweeps each way), then placed beside the nodes that feed them without overlapping.
pub fn layout(g: &Graph) -> Layout {
    let index: HashMap<&str, usize> = g
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.as_str(), i))
        .collect();
    let mut preds: Vec<Vec<usize>> = vec![vec![]; g.nodes.len()];
    let mut succs: Vec<Vec<usize>> = vec![vec![]; g.nodes.len()];
    for e in &g.edges {
        if let (Some(&a), Some(&b)) = (index.get(e.from.as_str()), index.get(e.to.as_str())) {
            succs[a].push(b);
            preds[b].push(a);
        }
    }
    let used: Vec<Column> = Column::ALL
        .iter()
        .copied()
        .filter(|c| g.nodes.iter().any(|n| n.column == *c))
        .collect();
    let mut columns: Vec<Vec<usize>> = used
        .iter()
        .map(|c| {
            (0..g.nodes.len())
                .filter(|&i| g.nodes[i].column == *c)
                .collect()
        })
        .collect();

    let heights: Vec<f64> = g
        .nodes
        .iter()
        .map(|n| PAD * 2.0 + LINE_H * n.lines.len() as f64)
        .collect();
    let widths: Vec<f64> = used
        .iter()
        .map(|c| {
            let chars = g
                .nodes
                .iter()
                .filter(|n| n.column == *c)
                .flat_map(|n| n.lines.iter())
                .map(|l| clip(l).chars().count())
                .max()
                .unwrap_or(10);
            (chars as f64 * CHAR_W + PAD * 2.0).max(120.0)
        })
        .collect();
    let mut xs = vec![];
    let mut x = LEFT;
    for w in &widths {
        xs.push(x);
        x += w + COLUMN_GAP;
    }

    // Position of each node within its column, as a fraction, for the ordering sweeps.
    let mut pos = vec![0.0f64; g.nodes.len()];
    let set_pos = |columns: &Vec<Vec<usize>>, pos: &mut Vec<f64>| {
        for col in columns {
            for (k, &i) in col.iter().enumerate() {
                pos[i] = k as f64 / col.len().max(1) as f64;
            }
        }
    };
    set_pos(&columns, &mut pos);
    for _ in 0..4 {
        for (ci, col) in columns.iter_mut().enumerate() {
            if ci == 0 {
                continue;
            }
            sort_by_neighbours(col, &preds, &pos);
            for (k, &i) in col.iter().enumerate() {
                pos[i] = k as f64 / col.len().max(1) as f64;
            }
        }
        for col in columns.iter_mut().rev().skip(1) {
            sort_by_neighbours(col, &succs, &pos);
            for (k, &i) in col.iter().enumerate() {
                pos[i] = k as f64 / col.len().max(1) as f64;
            }
        }
    }

    // The tallest column is packed tight; the columns right of it are placed beside what feeds
    // them, the columns left of it beside what they feed. Each node goes as near that centre as
    // the nodes above it allow, so nothing overlaps and the columns do not drift apart.
    let mut rects: Vec<Rect> = (0..g.nodes.len())
        .map(|i| Rect {
            x: 0.0,
            y: TOP,
            w: 0.0,
            h: heights[i],
        })
        .collect();
    for (ci, col) in columns.iter().enumerate() {
        for &i in col {
            rects[i].x = xs[ci];
            rects[i].w = widths[ci];
        }
    }
    let total = |col: &Vec<usize>| col.iter().map(|&i| heights[i] + NODE_GAP).sum::<f64>();
    let tallest = (0..columns.len())
        .max_by(|&a, &b| total(&columns[a]).total_cmp(&total(&columns[b])))
        .unwrap_or(0);
    let place = |col: &[usize], toward: &[Vec<usize>], rects: &mut Vec<Rect>| {
        let mut cursor = TOP;
        for &i in col {
            let near: Vec<f64> = toward[i].iter().map(|&j| rects[j].center_y()).collect();
            let want = if near.is_empty() {
                cursor
            } else {
                near.iter().sum::<f64>() / near.len() as f64 - heights[i] / 2.0
            };
            rects[i].y = want.max(cursor);
            cursor = rects[i].y + heights[i] + NODE_GAP;
        }
    };
    place(&columns[tallest], &vec![vec![]; g.nodes.len()], &mut rects);
    for col in &columns[tallest + 1..] {
        place(col, &preds, &mut rects);
    }
    for col in columns[..tallest].iter().rev() {
        place(col, &succs, &mut rects);
    }
    let height = rects.iter().map(|r| r.y + r.h).fold(TOP, f64::max);
    Layout {
        rects,
        columns: used
            .iter()
            .enumerate()
            .map(|(i, c)| (*c, xs[i], widths[i]))
            .collect(),
        width: x - COLUMN_GAP + LEFT,
        height: height + 20.0,
    }
}

fn sort_by_neighbours(col: &mut [usize], neighbours: &[Vec<usize>], pos: &[f64]) {
    let key = |i: usize| -> f64 {
        let n = &neighbours[i];
        if n.is_empty() {
            pos[i]
        } else {
            n.iter().map(|&j| pos[j]).sum::<f64>() / n.len() as f64
        }
    };
    // Stable, so nodes with equal keys keep the configuration's order.
    col.sort_by(|&a, &b| key(a).total_cmp(&key(b)));
}

fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Fill and stroke of a column, light to dark along the path, as in the article's drawing.
fn colors(c: Column) -> (&'static str, &'static str) {
    match c {
        Column::Listener => ("#dae8fc", "#6c8ebf"),
        Column::FilterChain => ("#d5e8d4", "#82b366"),
        Column::NetworkFilter => ("#e1d5e7", "#9673a6"),
        Column::RouteConfig => ("#fff2cc", "#d6b656"),
        Column::VirtualHost => ("#ffe6cc", "#d79b00"),
        Column::Route => ("#f8cecc", "#b85450"),
        Column::Cluster => ("#f5f5f5", "#666666"),
        Column::Endpoints => ("#ffffff", "#999999"),
    }
}

const HIGHLIGHT: &str = "#e8590c";

/// A picture for a browser: columns titled along the top, nodes as boxes, edges as curves; a
/// highlighted path drawn thick and everything else faded.
pub fn svg(g: &Graph, title: &str) -> String {
    let l = layout(g);
    let any_hl = g.nodes.iter().any(|n| n.highlighted);
    let index: HashMap<&str, usize> = g
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.as_str(), i))
        .collect();
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}" font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="12">"#,
        w = l.width,
        h = l.height
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="24" font-size="16" font-weight="bold">{}</text>"#,
        xml(title)
    );
    for (c, x, w) in &l.columns {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="52" font-size="13" font-weight="bold" fill="#444">{}</text>"##,
            x + 2.0,
            xml(c.title())
        );
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="58" x2="{:.1}" y2="58" stroke="#bbb"/>"##,
            x + w
        );
    }
    // Edges first, so boxes sit on top; highlighted ones last, so they are not covered.
    let mut edges: Vec<&super::Edge> = g.edges.iter().collect();
    edges.sort_by_key(|e| e.highlighted);
    for e in edges {
        let (Some(&a), Some(&b)) = (index.get(e.from.as_str()), index.get(e.to.as_str())) else {
            continue;
        };
        let (ra, rb) = (l.rects[a], l.rects[b]);
        let (x1, y1, x2, y2) = (ra.x + ra.w, ra.center_y(), rb.x, rb.center_y());
        let mid = (x1 + x2) / 2.0;
        // Within a column (a listener handing a connection to another), an arc on the left.
        let d = if ra.x == rb.x {
            let bulge = ra.x - 16.0;
            format!(
                "M{:.1},{y1:.1} C{bulge:.1},{y1:.1} {bulge:.1},{y2:.1} {:.1},{y2:.1}",
                ra.x, rb.x
            )
        } else {
            format!("M{x1:.1},{y1:.1} C{mid:.1},{y1:.1} {mid:.1},{y2:.1} {x2:.1},{y2:.1}")
        };
        let (stroke, width, opacity) = if e.highlighted {
            (HIGHLIGHT, 3.0, 1.0)
        } else if any_hl {
            ("#999", 1.0, 0.35)
        } else {
            ("#888", 1.0, 0.8)
        };
        let _ = writeln!(
            s,
            r#"<path d="{d}" fill="none" stroke="{stroke}" stroke-width="{width}" opacity="{opacity}"/>"#
        );
        if !e.label.is_empty() {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#666" opacity="{opacity}">{}</text>"##,
                x2 - 4.0 - e.label.len() as f64 * 6.0,
                y2 - 3.0,
                xml(&e.label)
            );
        }
    }
    for (i, n) in g.nodes.iter().enumerate() {
        let r = l.rects[i];
        let (fill, stroke) = colors(n.column);
        let (stroke, width, opacity) = if n.highlighted {
            (HIGHLIGHT, 3.0, 1.0)
        } else if any_hl {
            (stroke, 1.0, 0.45)
        } else {
            (stroke, 1.0, 1.0)
        };
        let _ = writeln!(
            s,
            r#"<g opacity="{opacity}"><title>{}</title>"#,
            xml(&n.lines.join("\n"))
        );
        let _ = writeln!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" rx="6" fill="{fill}" stroke="{stroke}" stroke-width="{width}"/>"#,
            r.x, r.y, r.w, r.h
        );
        for (k, line) in n.lines.iter().enumerate() {
            let weight = if k == 0 { r#" font-weight="bold""# } else { "" };
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}"{weight}>{}</text>"#,
                r.x + PAD,
                r.y + PAD + LINE_H * (k as f64 + 1.0) - 4.0,
                xml(&clip(line))
            );
        }
        let _ = writeln!(s, "</g>");
    }
    s.push_str("</svg>\n");
    s
}

fn dot_str(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Graphviz: one rank per column, so `dot -Tsvg` draws the same left-to-right stages.
pub fn dot(g: &Graph, title: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "digraph pilotfish {{");
    let _ = writeln!(
        s,
        "  label=\"{}\"; labelloc=t; rankdir=LR; newrank=true; ranksep=1.2;",
        dot_str(title)
    );
    let _ = writeln!(
        s,
        "  node [shape=box, style=\"rounded,filled\", fontname=\"monospace\", fontsize=10];"
    );
    for c in Column::ALL {
        let ids: Vec<&super::Node> = g.nodes.iter().filter(|n| n.column == c).collect();
        if ids.is_empty() {
            continue;
        }
        let _ = writeln!(s, "  // {}", c.title());
        let (fill, stroke) = colors(c);
        for n in &ids {
            let label: String = n
                .lines
                .iter()
                .map(|l| format!("{}\\l", dot_str(l)))
                .collect();
            let (stroke, pen) = if n.highlighted {
                (HIGHLIGHT, 3)
            } else {
                (stroke, 1)
            };
            let _ = writeln!(s, "  \"{}\" [label=\"{label}\", fillcolor=\"{fill}\", color=\"{stroke}\", penwidth={pen}];", dot_str(&n.id));
        }
        let _ = writeln!(
            s,
            "  {{ rank=same; {} }}",
            ids.iter()
                .map(|n| format!("\"{}\";", dot_str(&n.id)))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    for e in &g.edges {
        let mut attrs = vec![];
        if !e.label.is_empty() {
            attrs.push(format!("label=\"{}\"", dot_str(&e.label)));
        }
        if e.highlighted {
            attrs.push(format!("color=\"{HIGHLIGHT}\", penwidth=3"));
        }
        let attrs = if attrs.is_empty() {
            String::new()
        } else {
            format!(" [{}]", attrs.join(", "))
        };
        let _ = writeln!(
            s,
            "  \"{}\" -> \"{}\"{attrs};",
            dot_str(&e.from),
            dot_str(&e.to)
        );
    }
    s.push_str("}\n");
    s
}

fn mermaid_str(s: &str) -> String {
    s.replace('&', "#amp;")
        .replace('"', "#quot;")
        .replace('<', "#lt;")
        .replace('>', "#gt;")
        .replace('|', "#124;")
}

/// Mermaid flowchart, left to right, for Markdown viewers (GitHub, GitLab, Notion).
pub fn mermaid(g: &Graph, title: &str) -> String {
    let ids: HashMap<&str, String> = g
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.as_str(), format!("n{i}")))
        .collect();
    let mut s = String::new();
    let _ = writeln!(s, "---\ntitle: \"{}\"\n---", mermaid_str(title));
    let _ = writeln!(s, "flowchart LR");
    for (k, c) in Column::ALL.iter().enumerate() {
        let (fill, stroke) = colors(*c);
        let _ = writeln!(
            s,
            "  classDef c{k} fill:{fill},stroke:{stroke},text-align:left"
        );
    }
    let _ = writeln!(s, "  classDef hl stroke:{HIGHLIGHT},stroke-width:3px");
    for n in &g.nodes {
        let label = n
            .lines
            .iter()
            .enumerate()
            .map(|(k, l)| {
                if k == 0 {
                    format!("<b>{}</b>", mermaid_str(l))
                } else {
                    mermaid_str(l)
                }
            })
            .collect::<Vec<_>>()
            .join("<br/>");
        let k = Column::ALL.iter().position(|c| *c == n.column).unwrap_or(0);
        let _ = writeln!(s, "  {}[\"{label}\"]:::c{k}", ids[n.id.as_str()]);
    }
    let mut hl_edges = vec![];
    let mut drawn = 0;
    for e in &g.edges {
        let (Some(a), Some(b)) = (ids.get(e.from.as_str()), ids.get(e.to.as_str())) else {
            continue;
        };
        if e.label.is_empty() {
            let _ = writeln!(s, "  {a} --> {b}");
        } else {
            let _ = writeln!(s, "  {a} -->|{}| {b}", mermaid_str(&e.label));
        }
        if e.highlighted {
            hl_edges.push(drawn.to_string());
        }
        drawn += 1;
    }
    let hl: Vec<&str> = g
        .nodes
        .iter()
        .filter(|n| n.highlighted)
        .map(|n| ids[n.id.as_str()].as_str())
        .collect();
    if !hl.is_empty() {
        let _ = writeln!(s, "  class {} hl", hl.join(","));
    }
    if !hl_edges.is_empty() {
        let _ = writeln!(
            s,
            "  linkStyle {} stroke:{HIGHLIGHT},stroke-width:3px",
            hl_edges.join(",")
        );
    }
    s
}

/// A draw.io (diagrams.net) file, uncompressed, with the SVG's layout: every box and edge can be
/// moved and restyled there, as the article's author did by hand.
pub fn drawio(g: &Graph, title: &str) -> String {
    let l = layout(g);
    let mut s = String::new();
    let _ = writeln!(s, r#"<mxfile host="pilotfish" type="device">"#);
    let _ = writeln!(
        s,
        r#"  <diagram id="pilotfish-explain" name="{}">"#,
        xml(title)
    );
    let _ = writeln!(
        s,
        r#"    <mxGraphModel dx="{w:.0}" dy="{h:.0}" grid="1" gridSize="10" guides="1" tooltips="1" connect="1" arrows="1" fold="1" page="0" pageScale="1" pageWidth="{w:.0}" pageHeight="{h:.0}" math="0" shadow="0">"#,
        w = l.width,
        h = l.height
    );
    let _ = writeln!(s, r#"      <root>"#);
    let _ = writeln!(s, r#"        <mxCell id="0"/>"#);
    let _ = writeln!(s, r#"        <mxCell id="1" parent="0"/>"#);
    for (k, (c, x, w)) in l.columns.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"        <mxCell id="col{k}" value="{}" style="text;html=1;fontStyle=1;align=left;verticalAlign=middle;" vertex="1" parent="1"><mxGeometry x="{x:.0}" y="30" width="{w:.0}" height="24" as="geometry"/></mxCell>"#,
            xml(c.title())
        );
    }
    let ids: HashMap<&str, String> = g
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.as_str(), format!("n{i}")))
        .collect();
    for (i, n) in g.nodes.iter().enumerate() {
        let r = l.rects[i];
        let (fill, stroke) = colors(n.column);
        let (stroke, width) = if n.highlighted {
            (HIGHLIGHT, 3)
        } else {
            (stroke, 1)
        };
        // html=1 labels: the markup is itself escaped once more as an attribute value.
        let html = n
            .lines
            .iter()
            .enumerate()
            .map(|(k, l)| {
                if k == 0 {
                    format!("<b>{}</b>", xml(l))
                } else {
                    xml(l)
                }
            })
            .collect::<Vec<_>>()
            .join("<br>");
        let _ = writeln!(
            s,
            r#"        <mxCell id="{}" value="{}" style="rounded=1;whiteSpace=wrap;html=1;align=left;verticalAlign=top;spacingLeft=6;fontFamily=Courier New;fontSize=11;fillColor={fill};strokeColor={stroke};strokeWidth={width};" vertex="1" parent="1"><mxGeometry x="{:.0}" y="{:.0}" width="{:.0}" height="{:.0}" as="geometry"/></mxCell>"#,
            ids[n.id.as_str()],
            xml(&html),
            r.x,
            r.y,
            r.w,
            r.h
        );
    }
    for (k, e) in g.edges.iter().enumerate() {
        let (Some(a), Some(b)) = (ids.get(e.from.as_str()), ids.get(e.to.as_str())) else {
            continue;
        };
        let (stroke, width) = if e.highlighted {
            (HIGHLIGHT, 3)
        } else {
            ("#888888", 1)
        };
        let _ = writeln!(
            s,
            r#"        <mxCell id="e{k}" value="{}" style="edgeStyle=entityRelationEdgeStyle;curved=1;html=1;endArrow=block;endSize=4;strokeColor={stroke};strokeWidth={width};fontSize=9;" edge="1" parent="1" source="{a}" target="{b}"><mxGeometry relative="1" as="geometry"/></mxCell>"#,
            xml(&e.label)
        );
    }
    let _ = writeln!(
        s,
        "      </root>\n    </mxGraphModel>\n  </diagram>\n</mxfile>"
    );
    s
}

/// An indented tree for a terminal: each listener, and below it everything its connections can
/// reach. A node reached again (a cluster shared by many routes) is named, not expanded twice.
pub fn text(g: &Graph) -> String {
    let index: HashMap<&str, usize> = g
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.as_str(), i))
        .collect();
    let mut succs: Vec<Vec<(usize, &str)>> = vec![vec![]; g.nodes.len()];
    let mut has_pred = vec![false; g.nodes.len()];
    for e in &g.edges {
        if let (Some(&a), Some(&b)) = (index.get(e.from.as_str()), index.get(e.to.as_str())) {
            succs[a].push((b, e.label.as_str()));
            has_pred[b] = true;
        }
    }
    let mut out = String::new();
    let mut expanded = vec![false; g.nodes.len()];
    fn walk(
        g: &Graph,
        i: usize,
        label: &str,
        depth: usize,
        succs: &[Vec<(usize, &str)>],
        expanded: &mut [bool],
        out: &mut String,
    ) {
        let n = &g.nodes[i];
        let mark = if n.highlighted { "=> " } else { "" };
        let kind = match n.column {
            Column::Listener => "listener",
            Column::FilterChain => "filter chain",
            Column::NetworkFilter => "network filters",
            Column::RouteConfig => "route config",
            Column::VirtualHost => "virtual host",
            Column::Route => "route",
            Column::Cluster => "cluster",
            Column::Endpoints => "endpoints",
        };
        let via = if label.is_empty() {
            String::new()
        } else {
            format!("({label}) ")
        };
        let details = n.lines[1..]
            .iter()
            .filter(|l| !l.is_empty())
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        let indent = "  ".repeat(depth);
        if expanded[i] && !succs[i].is_empty() {
            let _ = writeln!(
                out,
                "{indent}{mark}{via}{kind} {} (shown above)",
                n.lines[0]
            );
            return;
        }
        let _ = writeln!(
            out,
            "{indent}{mark}{via}{kind} {}{}{}",
            n.lines[0],
            if details.is_empty() { "" } else { ": " },
            details
        );
        expanded[i] = true;
        for &(j, l) in &succs[i] {
            walk(g, j, l, depth + 1, succs, expanded, out);
        }
    }
    for (i, _) in has_pred.iter().enumerate().filter(|(_, p)| !**p) {
        walk(g, i, "", 0, &succs, &mut expanded, &mut out);
    }
    out
}
