//! Prometheus text exposition (format 0.0.4) of one host's counters: per Violin, per
//! edge, drops by reason, guest ports and AF_XDP rings. The daemon serves it over HTTP
//! (hyper, HTTP/1.1 with keep-alive) on its metrics port, inside the host's own
//! namespace, from a thread of its own: idle or slow clients cost only their own
//! connection, and a scrape reads a worker snapshot and the manager's published view.

use crate::control::HostViolinStats;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Host-wide counters that belong to no Violin.
pub struct HostCounters<'a> {
    pub host: &'a str,
    pub dataplane: &'a str,
    pub host_drops: &'a BTreeMap<String, u64>,
    pub udp_rx_frames: u64,
    pub workers: &'a [crate::stats::WorkerStats],
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: impl std::fmt::Display) {
        let l: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        let _ = writeln!(self.out, "{name}{{{}}} {v}", l.join(","));
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders every metric of this host; `violins` holds each Violin's stats here.
pub fn render(h: &HostCounters<'_>, violins: &[HostViolinStats]) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    let host = h.host;
    f.head(
        "violin_host_info",
        "gauge",
        "This host's daemon (always 1).",
    );
    f.sample(
        "violin_host_info",
        &[("host", host), ("dataplane", h.dataplane)],
        1,
    );

    f.head("violin_guests", "gauge", "Guests of a Violin on this host.");
    for v in violins {
        f.sample(
            "violin_guests",
            &[("host", host), ("violin", &v.stats.name)],
            v.ports.len(),
        );
    }
    f.head(
        "violin_guests_attached",
        "gauge",
        "Guests whose port is connected.",
    );
    for v in violins {
        let n = v.ports.iter().filter(|p| p.connected).count();
        f.sample(
            "violin_guests_attached",
            &[("host", host), ("violin", &v.stats.name)],
            n,
        );
    }

    for (name, help, get) in [
        (
            "violin_edge_packets_total",
            "Frames sent from one member to another, counted where the sender is policed.",
            (|e: &crate::datapath::fastpath::switch::EdgeStats| e.packets) as fn(&_) -> u64,
        ),
        (
            "violin_edge_bytes_total",
            "Bytes (Ethernet frames) sent from one member to another.",
            |e| e.bytes,
        ),
    ] {
        f.head(name, "counter", help);
        for v in violins {
            for e in &v.stats.edges {
                f.sample(
                    name,
                    &[
                        ("host", host),
                        ("violin", &v.stats.name),
                        ("from", &e.from),
                        ("to", &e.to),
                    ],
                    get(e),
                );
            }
        }
    }

    f.head(
        "violin_drops_total",
        "counter",
        "Frames of a Violin dropped, by reason.",
    );
    for v in violins {
        for (reason, n) in &v.stats.drops {
            f.sample(
                "violin_drops_total",
                &[
                    ("host", host),
                    ("violin", &v.stats.name),
                    ("reason", reason),
                ],
                n,
            );
        }
    }
    for (name, kind, help, get) in [
        (
            "violin_ecn_marked_total",
            "counter",
            "Frames of a Violin's capped links marked CE (ECN) instead of dropped.",
            (|s: &crate::stats::ViolinStats| s.ecn_marked) as fn(&_) -> u64,
        ),
        (
            "violin_shaped_queue_bytes",
            "gauge",
            "Bytes waiting in a Violin's capped links' queues.",
            |s| s.queued_bytes,
        ),
    ] {
        f.head(name, kind, help);
        for v in violins {
            let l = [("host", host), ("violin", v.stats.name.as_str())];
            f.sample(name, &l, get(&v.stats));
        }
    }
    f.head(
        "violin_worker_busy_seconds_total",
        "counter",
        "Time a Violin's packet worker spent reading and switching its frames.",
    );
    for v in violins {
        let l = [("host", host), ("violin", v.stats.name.as_str())];
        let secs = v.stats.busy_ns as f64 / 1e9;
        f.sample("violin_worker_busy_seconds_total", &l, secs);
    }
    f.head(
        "violin_host_drops_total",
        "counter",
        "Frames dropped before any Violin was known (bad outer headers, unknown VNI), by reason.",
    );
    for (reason, n) in h.host_drops {
        f.sample(
            "violin_host_drops_total",
            &[("host", host), ("reason", reason)],
            n,
        );
    }

    type PortGet = fn(&crate::datapath::transport::guest::PortCounters) -> u64;
    let port: [(&str, &str, PortGet); 5] = [
        (
            "violin_port_rx_frames_total",
            "Frames received from a guest's port.",
            |c| c.rx_frames,
        ),
        (
            "violin_port_rx_bytes_total",
            "Bytes received from a guest's port.",
            |c| c.rx_bytes,
        ),
        (
            "violin_port_tx_frames_total",
            "Frames delivered to a guest's port.",
            |c| c.tx_frames,
        ),
        (
            "violin_port_tx_bytes_total",
            "Bytes delivered to a guest's port.",
            |c| c.tx_bytes,
        ),
        (
            "violin_port_connects_total",
            "Connections accepted on a guest's port.",
            |c| c.connects,
        ),
    ];
    for (name, help, get) in port {
        f.head(name, "counter", help);
        for v in violins {
            for p in &v.ports {
                f.sample(
                    name,
                    &[
                        ("host", host),
                        ("violin", &v.stats.name),
                        ("guest", &p.name),
                    ],
                    get(&p.counters),
                );
            }
        }
    }
    f.head(
        "violin_guest_oom_kills_total",
        "counter",
        "Processes the OOM killer ended inside a guest's cgroup.",
    );
    for v in violins {
        for p in &v.ports {
            if let Some(n) = p.oom_kills {
                f.sample(
                    "violin_guest_oom_kills_total",
                    &[
                        ("host", host),
                        ("violin", &v.stats.name),
                        ("guest", &p.name),
                    ],
                    n,
                );
            }
        }
    }

    f.head(
        "violin_udp_rx_frames_total",
        "counter",
        "VXLAN frames received through the kernel's UDP socket.",
    );
    f.sample(
        "violin_udp_rx_frames_total",
        &[("host", host)],
        h.udp_rx_frames,
    );

    for (name, help, get) in [
        (
            "violin_worker_udp_rx_frames_total",
            "VXLAN frames a packet worker received through its UDP socket.",
            (|w| w.udp_rx_frames) as fn(&crate::stats::WorkerStats) -> u64,
        ),
        (
            "violin_worker_udp_rx_own_frames_total",
            "Of those, frames read from its Violins' own sockets of the underlay's group.",
            |w| w.udp_rx_own_frames,
        ),
        (
            "violin_worker_xsk_rx_frames_total",
            "Frames a packet worker received through the AF_XDP sockets of its rx queue.",
            |w| w.xsk_rx_frames,
        ),
        (
            "violin_worker_udp_tx_frames_total",
            "VXLAN datagrams a packet worker sent through its UDP socket.",
            |w| w.udp_tx_frames,
        ),
        (
            "violin_worker_xsk_tx_frames_total",
            "Frames a packet worker sent through its AF_XDP TX ring.",
            |w| w.xsk_tx_frames,
        ),
        (
            "violin_worker_handed_off_total",
            "Frames a packet worker received for a Violin owned by another worker, and passed on.",
            |w| w.handed_off,
        ),
        (
            "violin_worker_taken_over_total",
            "Frames a packet worker switched for its Violins after another worker received them.",
            |w| w.taken_over,
        ),
    ] {
        if h.workers.is_empty() {
            break;
        }
        f.head(name, "counter", help);
        for w in h.workers {
            f.sample(
                name,
                &[("host", host), ("worker", &w.index.to_string())],
                get(w),
            );
        }
    }

    // The xdp data plane: classifier verdicts and rings are per host; sockets per Violin.
    if let Some(x) = violins.iter().find_map(|v| v.xdp.as_ref()) {
        f.head(
            "violin_xdp_verdicts_total",
            "counter",
            "Verdicts of the XDP classifier on the underlay interface.",
        );
        for (verdict, n) in &x.verdicts {
            f.sample(
                "violin_xdp_verdicts_total",
                &[("host", host), ("verdict", verdict)],
                n,
            );
        }
        let r = &x.rings;
        for (name, help, v) in [
            (
                "violin_xdp_rx_frames_total",
                "Frames received through AF_XDP.",
                r.counters.rx_frames,
            ),
            (
                "violin_xdp_tx_frames_total",
                "Frames sent through AF_XDP.",
                r.counters.tx_frames,
            ),
            (
                "violin_xdp_tx_ring_full_total",
                "Frames dropped: the TX ring had no room.",
                r.counters.tx_ring_full,
            ),
            (
                "violin_xdp_pool_empty_total",
                "Frames dropped: no free frame in the TX pool.",
                r.counters.pool_empty,
            ),
            (
                "violin_xdp_fill_retry_total",
                "Fill-ring refills refused and retried.",
                r.counters.fill_retry,
            ),
            (
                "violin_xdp_rx_multi_buffer_total",
                "Frames received through AF_XDP in several buffers (jumbo frames).",
                r.counters.rx_multi_buffer,
            ),
            (
                "violin_xdp_rx_multi_buffer_dropped_total",
                "Multi-buffer frames dropped: longer than any IPv4 packet.",
                r.counters.rx_multi_buffer_dropped,
            ),
            (
                "violin_xdp_tx_multi_buffer_total",
                "Frames sent through AF_XDP in several buffers (jumbo frames).",
                r.counters.tx_multi_buffer,
            ),
            (
                "violin_xdp_rx_bad_total",
                "Frames on AF_XDP that were not valid VXLAN.",
                r.rx_bad,
            ),
            (
                "violin_xdp_neighbour_miss_total",
                "Frames sent through the kernel for want of a neighbour entry.",
                r.neighbour_miss,
            ),
        ] {
            f.head(name, "counter", help);
            f.sample(name, &[("host", host)], v);
        }
        f.head(
            "violin_xdp_pool_free_frames",
            "gauge",
            "Free frames in the shared UMEM's TX pool.",
        );
        f.sample(
            "violin_xdp_pool_free_frames",
            &[("host", host)],
            r.free_frames,
        );
        f.head(
            "violin_xdp_socket_rx_ring_full_total",
            "counter",
            "Frames the kernel dropped: the Violin's RX ring was full.",
        );
        for v in violins {
            if let Some(s) = v.xdp.as_ref().and_then(|x| x.socket.as_ref()) {
                f.sample(
                    "violin_xdp_socket_rx_ring_full_total",
                    &[("host", host), ("violin", &v.stats.name)],
                    s.rx_ring_full,
                );
            }
        }
    }
    out
}

/// Whether `METHOD PATH` asks for the metrics (anything else gets a 404).
pub fn wants_metrics(method: &str, path: &str) -> bool {
    method == "GET" && matches!(path, "/metrics" | "/")
}

/// The Violin whose counters `METHOD PATH` asks for (`GET /violins/NAME/stats`): what
/// `violin stats` and `violin profile` read from hosts found through etcd.
pub fn wants_stats<'a>(method: &str, path: &'a str) -> Option<&'a str> {
    let name = path.strip_prefix("/violins/")?.strip_suffix("/stats")?;
    (method == "GET" && !name.is_empty() && !name.contains('/')).then_some(name)
}

/// The Violin and rate `METHOD PATH?QUERY` asks drop events of
/// (`GET /violins/NAME/drops?rate=N`): what `violin monitor` streams from hosts found
/// through etcd.
pub fn wants_drops<'a>(method: &str, path: &'a str, query: Option<&str>) -> Option<(&'a str, u32)> {
    let name = path.strip_prefix("/violins/")?.strip_suffix("/drops")?;
    if method != "GET" || name.is_empty() || name.contains('/') {
        return None;
    }
    let rate = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("rate="))
        .map_or(Some(crate::control::protocol::DEFAULT_MONITOR_RATE), |r| {
            r.parse().ok()
        })?;
    Some((name, rate))
}

const JSON: &str = "application/json";
const JSON_LINES: &str = "application/jsonl";
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";
const PLAIN: &str = "text/plain; charset=utf-8";

/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 1024;
/// A client must send its request headers within this long.
const HEADER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `/metrics` on `listener` until the process ends.
pub async fn serve(
    listener: std::net::TcpListener,
    ctx: crate::control::server::Ctx,
) -> anyhow::Result<()> {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use std::sync::Arc;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("metrics accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // over the limit: closed
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |req: hyper::Request<hyper::body::Incoming>| {
                    let ctx = ctx.clone();
                    async move {
                        let (method, path) = (req.method().as_str(), req.uri().path());
                        if let Some((name, rate)) = wants_drops(method, path, req.uri().query()) {
                            return hyper::Response::builder()
                                .status(200)
                                .header(hyper::header::CONTENT_TYPE, JSON_LINES)
                                .body(drops(&ctx, name, rate));
                        }
                        let (status, ctype, body) = if wants_metrics(method, path) {
                            match scrape(&ctx).await {
                                Some(text) => (200, EXPOSITION, text),
                                None => (503, PLAIN, "the packet worker did not answer\n".into()),
                            }
                        } else if let Some(name) = wants_stats(method, path) {
                            let r = crate::control::server::answer(
                                crate::control::Request::Stats { name: name.into() },
                                &ctx,
                            )
                            .await;
                            match r.ok {
                                true => (200, JSON, r.data.to_string()),
                                false => (404, PLAIN, r.error.unwrap_or_default() + "\n"),
                            }
                        } else {
                            (
                                404,
                                PLAIN,
                                "try GET /metrics, /violins/NAME/stats or /violins/NAME/drops?rate=N\n"
                                    .to_string(),
                            )
                        };
                        hyper::Response::builder()
                            .status(status)
                            .header(hyper::header::CONTENT_TYPE, ctype)
                            .body(
                                Full::new(Bytes::from(body))
                                    .map_err(|never| match never {})
                                    .boxed(),
                            )
                    }
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_DEADLINE)
                .title_case_headers(true)
                .serve_connection(TokioIo::new(stream), service);
            let _ = conn.await;
            drop(permit);
        });
    }
}

type Body = http_body_util::combinators::BoxBody<hyper::body::Bytes, std::io::Error>;

/// Violin `name`'s drop events as JSON lines (the control socket's `monitor` stream:
/// its response line, then one line per event), until the client goes away: the
/// monitor writes into one end of a pipe whose other end is the response body, and
/// ends when the body, and with it the pipe's write end, is dropped.
fn drops(ctx: &crate::control::server::Ctx, name: &str, rate: u32) -> Body {
    use http_body_util::{BodyExt, StreamBody};
    use tokio::io::AsyncReadExt;
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (trd, twr) = tokio::io::split(theirs);
    let (ctx, name) = (ctx.clone(), name.to_string());
    tokio::spawn(async move {
        if let Err(e) = crate::control::server::monitor(trd, twr, &ctx, &name, rate).await {
            tracing::debug!("drop monitor over HTTP ended: {e:#}");
        }
    });
    let (rd, wr) = tokio::io::split(ours);
    let chunks = futures::stream::unfold((rd, wr), |(mut rd, wr)| async move {
        let mut buf = vec![0u8; 16 * 1024];
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                buf.truncate(n);
                let frame = hyper::body::Frame::data(hyper::body::Bytes::from(buf));
                Some((Ok(frame), (rd, wr)))
            }
        }
    });
    StreamBody::new(chunks).boxed()
}

/// The exposition text of this host now, or `None` if the worker did not answer.
async fn scrape(ctx: &crate::control::server::Ctx) -> Option<String> {
    let now = ctx.now().await.ok()?;
    let all = now.view.all_stats(&now.counters, now.verdicts.as_ref());
    Some(render(
        &HostCounters {
            host: &now.view.host,
            dataplane: &now.view.dataplane,
            host_drops: &now.counters.host_drops,
            udp_rx_frames: now.counters.udp_rx_frames,
            workers: &now.counters.workers,
        },
        &all,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::fastpath::switch::{EdgeStats, ViolinStats};

    #[test]
    fn exposition_format() {
        let drops: BTreeMap<String, u64> = [("unknown_vni".to_string(), 3)].into();
        let v = HostViolinStats {
            host: "h1".into(),
            stats: ViolinStats {
                name: "blue".into(),
                vni: 101,
                edges: vec![EdgeStats {
                    from: "a".into(),
                    to: "b".into(),
                    packets: 2,
                    bytes: 200,
                }],
                drops: [("no_link".to_string(), 5)].into(),
                learned_macs: 0,
                ecn_marked: 3,
                busy_ns: 1_500_000_000,
                ..Default::default()
            },
            ports: vec![],
            host_drops: drops.clone(),
            dataplane: "udp".into(),
            udp_rx_frames: 7,
            xdp: None,
            worker: Some(0),
            workers: vec![],
        };
        let workers = [crate::stats::WorkerStats {
            index: 1,
            handed_off: 4,
            ..Default::default()
        }];
        let text = render(
            &HostCounters {
                host: "h1",
                dataplane: "udp",
                host_drops: &drops,
                udp_rx_frames: 7,
                workers: &workers,
            },
            &[v],
        );
        for want in [
            "# TYPE violin_edge_bytes_total counter",
            "violin_edge_bytes_total{host=\"h1\",violin=\"blue\",from=\"a\",to=\"b\"} 200",
            "violin_drops_total{host=\"h1\",violin=\"blue\",reason=\"no_link\"} 5",
            "violin_ecn_marked_total{host=\"h1\",violin=\"blue\"} 3",
            "violin_worker_busy_seconds_total{host=\"h1\",violin=\"blue\"} 1.5",
            "violin_host_drops_total{host=\"h1\",reason=\"unknown_vni\"} 3",
            "violin_udp_rx_frames_total{host=\"h1\"} 7",
            "violin_worker_handed_off_total{host=\"h1\",worker=\"1\"} 4",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        // Every sample line belongs to a family declared before it.
        let mut declared = std::collections::HashSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_string());
            } else if !l.starts_with('#') {
                let name = l.split('{').next().unwrap();
                assert!(declared.contains(name), "{name} has no TYPE line");
            }
        }
        assert_eq!(escape("a\"b\\c"), "a\\\"b\\\\c");
    }

    #[test]
    fn routes() {
        assert!(wants_metrics("GET", "/metrics"));
        assert!(wants_metrics("GET", "/"));
        assert!(!wants_metrics("GET", "/nope"));
        assert!(!wants_metrics("POST", "/metrics"));
        assert_eq!(wants_stats("GET", "/violins/blue/stats"), Some("blue"));
        assert_eq!(wants_stats("GET", "/violins//stats"), None);
        assert_eq!(wants_stats("GET", "/violins/a/b/stats"), None);
        assert_eq!(wants_stats("POST", "/violins/blue/stats"), None);
        assert_eq!(
            wants_drops("GET", "/violins/blue/drops", None),
            Some(("blue", 100))
        );
        assert_eq!(
            wants_drops("GET", "/violins/blue/drops", Some("x=1&rate=7")),
            Some(("blue", 7))
        );
        assert_eq!(
            wants_drops("GET", "/violins/blue/drops", Some("rate=many")),
            None
        );
        assert_eq!(wants_drops("GET", "/violins/a/b/drops", None), None);
        assert_eq!(wants_drops("POST", "/violins/blue/drops", None), None);
    }
}
