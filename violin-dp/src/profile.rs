//! A Violin's traffic profile (the paper's Figure 4): who sends how much to whom, from
//! the data plane's per-edge counters, with rates over the last sampling interval.
//! Rendered as a table, a Graphviz digraph or a self-contained SVG.

use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::time::Duration;

/// One directed edge: totals since the Violin started, rate over the last interval.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Flow {
    pub from: String,
    pub to: String,
    /// Ethernet frames and their bytes (L2, as guests sent them), counted where the
    /// sender is policed.
    pub packets: u64,
    pub bytes: u64,
    pub bits_per_sec: f64,
    pub packets_per_sec: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub violin: String,
    pub interval_secs: f64,
    pub members: Vec<String>,
    pub flows: Vec<Flow>,
}

/// Edge totals at one instant: (from, to) → (packets, bytes).
pub type Sample = BTreeMap<(String, String), (u64, u64)>;

impl Profile {
    /// The profile between two samples taken `dt` apart.
    pub fn between(
        violin: &str,
        members: Vec<String>,
        before: &Sample,
        after: &Sample,
        dt: Duration,
    ) -> Profile {
        let secs = dt.as_secs_f64().max(1e-9);
        let flows = after
            .iter()
            .map(|((from, to), &(packets, bytes))| {
                let (p0, b0) = before
                    .get(&(from.clone(), to.clone()))
                    .copied()
                    .unwrap_or((0, 0));
                Flow {
                    from: from.clone(),
                    to: to.clone(),
                    packets,
                    bytes,
                    bits_per_sec: bytes.saturating_sub(b0) as f64 * 8.0 / secs,
                    packets_per_sec: packets.saturating_sub(p0) as f64 / secs,
                }
            })
            .collect();
        Profile {
            violin: violin.into(),
            interval_secs: dt.as_secs_f64(),
            members,
            flows,
        }
    }

    /// Members that appear in the matrix: the spec's, plus any edge endpoint.
    fn nodes(&self) -> Vec<String> {
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut out = Vec::new();
        let extra = self.flows.iter().flat_map(|f| [&f.from, &f.to]);
        for m in self.members.iter().chain(extra) {
            if seen.insert(m) {
                out.push(m.clone());
            }
        }
        out
    }

    /// The matrix of bytes sent (rows: senders, columns: receivers), then each edge with
    /// its rate.
    pub fn table(&self) -> String {
        let nodes = self.nodes();
        let cell = |f: &str, t: &str| self.flows.iter().find(|x| x.from == f && x.to == t);
        let w = nodes.iter().map(|n| n.len()).max().unwrap_or(4).max(10);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Violin {}: bytes sent, rows → columns (rates over the last {:.1} s below)",
            self.violin, self.interval_secs
        );
        let _ = write!(s, "{:<w$}", "FROM \\ TO");
        for n in &nodes {
            let _ = write!(s, " {n:>w$}");
        }
        s.push('\n');
        for f in &nodes {
            let _ = write!(s, "{f:<w$}");
            for t in &nodes {
                let v = match cell(f, t) {
                    Some(x) => human_bytes(x.bytes),
                    None if f == t => "·".into(),
                    None => "-".into(),
                };
                let _ = write!(s, " {v:>w$}");
            }
            s.push('\n');
        }
        let _ = writeln!(
            s,
            "\n{:<10} {:<10} {:>12} {:>14} {:>14} {:>12}",
            "FROM", "TO", "PACKETS", "BYTES", "RATE", "PKT/S"
        );
        for x in &self.flows {
            let _ = writeln!(
                s,
                "{:<10} {:<10} {:>12} {:>14} {:>14} {:>12.0}",
                x.from,
                x.to,
                x.packets,
                x.bytes,
                human_rate(x.bits_per_sec),
                x.packets_per_sec
            );
        }
        if self.flows.is_empty() {
            s.push_str("(no traffic yet)\n");
        }
        s
    }

    /// Edge widths: by rate when anything moved in the interval, else by total bytes.
    fn widths(&self) -> Vec<f64> {
        let by_rate = self.flows.iter().any(|f| f.bits_per_sec > 0.0);
        let v = |f: &Flow| {
            if by_rate {
                f.bits_per_sec
            } else {
                f.bytes as f64
            }
        };
        let max = self.flows.iter().map(v).fold(0.0, f64::max);
        self.flows
            .iter()
            .map(|f| {
                if max > 0.0 {
                    1.0 + 9.0 * v(f) / max
                } else {
                    1.0
                }
            })
            .collect()
    }

    /// A Graphviz digraph whose edge width (penwidth) is the rate.
    pub fn dot(&self) -> String {
        let mut s = format!(
            "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box, style=rounded];\n",
            self.violin
        );
        for n in self.nodes() {
            let _ = writeln!(s, "  \"{n}\";");
        }
        for (f, w) in self.flows.iter().zip(self.widths()) {
            let _ = writeln!(
                s,
                "  \"{}\" -> \"{}\" [penwidth={w:.2}, label=\"{}\\n{}\"];",
                f.from,
                f.to,
                human_rate(f.bits_per_sec),
                human_bytes(f.bytes)
            );
        }
        s.push_str("}\n");
        s
    }

    /// A self-contained SVG: members on a circle, one curved arrow per edge, its width
    /// the rate.
    pub fn svg(&self) -> String {
        let nodes = self.nodes();
        let (w, h, r) = (640.0, 480.0, 170.0);
        let (cx, cy) = (w / 2.0, h / 2.0 + 10.0);
        let n = nodes.len().max(1) as f64;
        let pos: BTreeMap<&str, (f64, f64)> = nodes
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let a = std::f64::consts::TAU * i as f64 / n - std::f64::consts::FRAC_PI_2;
                (m.as_str(), (cx + r * a.cos(), cy + r * a.sin()))
            })
            .collect();
        let mut s = String::new();
        let _ = writeln!(
            s,
            r##"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="DejaVu Sans, sans-serif">
<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="4" markerHeight="4" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#3465a4"/></marker></defs>
<rect width="100%" height="100%" fill="white"/>
<text x="{x}" y="24" text-anchor="middle" font-size="16">{title}</text>"##,
            x = w / 2.0,
            title = xml(&format!(
                "Violin {}: traffic over the last {:.1} s (edge width ∝ rate)",
                self.violin, self.interval_secs
            )),
        );
        for (f, width) in self.flows.iter().zip(self.widths()) {
            let (Some(&(x1, y1)), Some(&(x2, y2))) =
                (pos.get(f.from.as_str()), pos.get(f.to.as_str()))
            else {
                continue;
            };
            // Shorten to the node boxes, bend to the left so a→b and b→a stay apart.
            let (dx, dy) = (x2 - x1, y2 - y1);
            let len = (dx * dx + dy * dy).sqrt().max(1.0);
            let (ux, uy) = (dx / len, dy / len);
            let (sx, sy, ex, ey) = (
                x1 + ux * 28.0,
                y1 + uy * 28.0,
                x2 - ux * 28.0,
                y2 - uy * 28.0,
            );
            let (mx, my) = ((sx + ex) / 2.0 - uy * 30.0, (sy + ey) / 2.0 + ux * 30.0);
            let _ = writeln!(
                s,
                r##"<g class="edge" data-from="{from}" data-to="{to}" data-bytes="{bytes}" data-bps="{bps:.0}"><path d="M{sx:.1},{sy:.1} Q{mx:.1},{my:.1} {ex:.1},{ey:.1}" fill="none" stroke="#3465a4" stroke-opacity="0.8" stroke-width="{width:.2}" marker-end="url(#arrow)"/><text x="{mx:.1}" y="{my:.1}" font-size="11" text-anchor="middle" fill="#204a87">{label}</text></g>"##,
                from = xml(&f.from),
                to = xml(&f.to),
                bytes = f.bytes,
                bps = f.bits_per_sec,
                label = xml(&format!(
                    "{} · {}",
                    human_rate(f.bits_per_sec),
                    human_bytes(f.bytes)
                )),
            );
        }
        for m in &nodes {
            let (x, y) = pos[m.as_str()];
            let _ = writeln!(
                s,
                r##"<g class="node"><rect x="{rx:.1}" y="{ry:.1}" width="56" height="28" rx="6" fill="#eeeeec" stroke="#555753"/><text x="{x:.1}" y="{ty:.1}" text-anchor="middle" font-size="13">{name}</text></g>"##,
                rx = x - 28.0,
                ry = y - 14.0,
                ty = y + 4.5,
                name = xml(m),
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub fn human_rate(bps: f64) -> String {
    match bps {
        b if b >= 1e9 => format!("{:.2} Gbit/s", b / 1e9),
        b if b >= 1e6 => format!("{:.2} Mbit/s", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kbit/s", b / 1e3),
        b => format!("{b:.0} bit/s"),
    }
}

pub fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(edges: &[(&str, &str, u64, u64)]) -> Sample {
        edges
            .iter()
            .map(|(f, t, p, b)| ((f.to_string(), t.to_string()), (*p, *b)))
            .collect()
    }

    #[test]
    fn rates_are_deltas_over_the_interval() {
        let before = sample(&[("a", "b", 10, 1000)]);
        let after = sample(&[("a", "b", 110, 126_000), ("b", "a", 5, 300)]);
        let p = Profile::between(
            "blue",
            vec!["a".into(), "b".into(), "c".into()],
            &before,
            &after,
            Duration::from_millis(500),
        );
        assert_eq!(p.flows.len(), 2);
        let ab = &p.flows[0];
        assert_eq!((ab.packets, ab.bytes), (110, 126_000));
        assert_eq!(ab.bits_per_sec, 125_000.0 * 8.0 * 2.0);
        assert_eq!(ab.packets_per_sec, 200.0);
        assert_eq!(
            p.flows[1].bits_per_sec,
            300.0 * 8.0 * 2.0,
            "new edge: all of it"
        );
        let t = p.table();
        assert!(t.contains("123.0 KiB") && t.contains("2.00 Mbit/s"), "{t}");
        let d = p.dot();
        assert!(d.contains("\"a\" -> \"b\" [penwidth=10.00"), "{d}");
        assert!(
            d.contains("\"c\";"),
            "members without traffic are drawn too"
        );
        let svg = p.svg();
        assert_eq!(svg.matches("class=\"edge\"").count(), 2);
        assert_eq!(svg.matches("class=\"node\"").count(), 3);
    }
}
