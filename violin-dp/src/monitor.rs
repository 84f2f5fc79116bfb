//! `violin monitor`: a Violin's dropped frames as its hosts report them (time, host,
//! reason, where the frame came from, MACs, IPs, length), merged into one stream of
//! text or JSON lines, with a once-a-second summary of what each host sent and dropped
//! unless `--drops` asks for the drops alone. Each host describes at most `--rate`
//! drops a second and says how many it left out. A cluster with etcd streams them from
//! each host's metrics server (`GET /violins/NAME/drops`), at the endpoint the host
//! registered; one without, over each host's control socket.

use crate::cli::{endpoint_of, gather_stats, metrics_endpoints, ClusterStats};
use crate::cluster::ClusterState;
use crate::control::protocol::{self, MonitorEvent, Request, MAX_MONITOR_RATE};
use crate::lifecycle::statuses;
use anyhow::{bail, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct Options {
    pub drops_only: bool,
    pub json: bool,
    pub rate: u32,
    /// Stop after this long (default: until interrupted).
    pub seconds: Option<f64>,
}

/// Where a host's drop events come from.
#[derive(Clone)]
enum Source {
    Control(std::path::PathBuf),
    Http(String),
}

enum Item {
    Event(MonitorEvent),
    Failed(String, String),
}

/// One host's traffic over the last summary interval.
#[derive(Debug, Serialize)]
struct Summary {
    host: String,
    seconds: f64,
    sent_packets: u64,
    dropped: BTreeMap<String, u64>,
}

pub fn run(st: &ClusterState, violin: &str, o: &Options) -> Result<()> {
    if o.rate == 0 || o.rate > MAX_MONITOR_RATE {
        bail!(
            "--rate must be 1 to {MAX_MONITOR_RATE} events a second, not {}",
            o.rate
        );
    }
    let endpoints = metrics_endpoints(st)?;
    let mut hosts = Vec::new();
    for (h, s) in st.hosts.iter().zip(statuses(st)?) {
        if !s.violins.iter().any(|x| x.name == violin) {
            continue;
        }
        if s.down {
            eprintln!("warning: host {} is down: its drops are left out", h.name);
            continue;
        }
        let from = match &endpoints {
            None => Source::Control(h.control.clone()),
            Some(eps) => {
                let ep = endpoint_of(eps, &h.name)?;
                Source::Http(format!("{ep}/violins/{violin}/drops?rate={}", o.rate))
            }
        };
        hosts.push((h.name.clone(), from));
    }
    if hosts.is_empty() {
        bail!("no Violin named {violin:?} on cluster {}", st.name);
    }
    let (tx, rx) = mpsc::channel();
    for (name, from) in &hosts {
        let (tx, name, from) = (tx.clone(), name.clone(), from.clone());
        let req = Request::Monitor {
            name: violin.to_string(),
            rate: o.rate,
        };
        std::thread::spawn(move || {
            let each = |e: MonitorEvent| tx.send(Item::Event(e)).is_ok();
            let r = match &from {
                Source::Control(path) => protocol::stream(path, &req, each),
                Source::Http(url) => protocol::http_stream(url, each),
            };
            let why = match r {
                Ok(()) => "the daemon closed the stream".to_string(),
                Err(e) => format!("{e:#}"),
            };
            let _ = tx.send(Item::Failed(name, why));
        });
    }
    drop(tx);
    if !o.json {
        eprintln!(
            "monitoring {violin} on {} (at most {} drops a second per host; Ctrl-C stops)",
            hosts
                .iter()
                .map(|(h, _)| h.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            o.rate
        );
    }
    let t0 = Instant::now();
    let deadline = o.seconds.map(|s| t0 + Duration::from_secs_f64(s.max(0.0)));
    let mut last = (Instant::now(), gather_stats(st, violin).ok());
    let mut live = hosts.len();
    loop {
        let wait = deadline.map_or(Duration::from_millis(200), |d| {
            d.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200))
        });
        match rx.recv_timeout(wait) {
            Ok(Item::Event(e)) => {
                if print_event(&e, o.json).is_err() {
                    return Ok(()); // whoever reads stdout went away
                }
            }
            Ok(Item::Failed(host, why)) => {
                eprintln!("{host}: monitor ended: {why}");
                live -= 1;
                if live == 0 {
                    bail!("no host is monitoring {violin} any more");
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if !o.drops_only && last.0.elapsed() >= Duration::from_secs(1) {
            if let Ok(now) = gather_stats(st, violin) {
                if let Some(before) = &last.1 {
                    for s in summaries(before, &now, last.0.elapsed().as_secs_f64()) {
                        if print_summary(&s, o.json).is_err() {
                            return Ok(());
                        }
                    }
                }
                last = (Instant::now(), Some(now));
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    Ok(())
}

fn summaries(before: &ClusterStats, now: &ClusterStats, seconds: f64) -> Vec<Summary> {
    now.hosts
        .iter()
        .map(|h| {
            let old = before.hosts.iter().find(|b| b.host == h.host);
            let sent = |s: &crate::control::HostViolinStats| -> u64 {
                s.stats.edges.iter().map(|e| e.packets).sum()
            };
            let dropped = h
                .stats
                .drops
                .iter()
                .map(|(k, v)| {
                    let was = old.and_then(|o| o.stats.drops.get(k)).copied().unwrap_or(0);
                    (k.clone(), v.saturating_sub(was))
                })
                .filter(|(_, d)| *d > 0)
                .collect();
            Summary {
                host: h.host.clone(),
                seconds,
                sent_packets: sent(h).saturating_sub(old.map_or(0, sent)),
                dropped,
            }
        })
        .collect()
}

/// `HH:MM:SS.micros` (UTC) of a time in ns since the epoch.
fn clock(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let day = secs % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        day / 3600,
        day / 60 % 60,
        day % 60,
        unix_ns % 1_000_000_000 / 1000
    )
}

fn print_event(e: &MonitorEvent, json: bool) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        if let Ok(line) = serde_json::to_string(e) {
            writeln!(out, "{line}")?;
        }
        return Ok(());
    }
    let ips = match (e.src_ip, e.dst_ip) {
        (Some(s), Some(d)) => format!("{s} → {d}"),
        _ => "-".into(),
    };
    let missed = if e.missed > 0 {
        format!("  (+{} not shown)", e.missed)
    } else {
        String::new()
    };
    writeln!(
        out,
        "{} {:<4} DROP {:<14} from {:<12} {} → {}  {:<31} {} B{}",
        clock(e.unix_ns),
        e.host,
        e.reason,
        e.from,
        e.src_mac,
        e.dst_mac,
        ips,
        e.len,
        missed
    )
}

fn print_summary(s: &Summary, json: bool) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        if let Ok(line) = serde_json::to_string(&serde_json::json!({ "summary": s })) {
            writeln!(out, "{line}")?;
        }
        return Ok(());
    }
    let dropped: Vec<String> = s.dropped.iter().map(|(k, v)| format!("{k} {v}")).collect();
    writeln!(
        out,
        "{:>15} {:<4} sent {} packets in {:.1} s, dropped {}",
        "-- summary",
        s.host,
        s.sent_packets,
        s.seconds,
        if dropped.is_empty() {
            "nothing".to_string()
        } else {
            dropped.join(", ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_reads_utc_time_of_day() {
        // 2026-12-01 14:05:09.123456789 UTC
        assert_eq!(clock(1_796_133_909_123_456_789), "14:05:09.123456");
    }
}
