//! The CLI ↔ daemon control protocol: one JSON request per connection on the daemon's
//! UNIX control socket (one line, at most [`MAX_REQUEST`] bytes), one JSON response back.
//! `monitor` alone keeps the connection: after its response come [`MonitorEvent`]
//! lines until the client closes it ([`stream`]).

use crate::spec::{GuestKind, Violin};
use crate::stats::{AfXdpStats, PortCounters, SlotStats, ViolinStats, WorkerStats};
use anyhow::{anyhow, bail, Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    AddViolin {
        violin: Violin,
    },
    /// Add the Violin, or bring it to this spec.
    ApplyViolin {
        violin: Violin,
    },
    /// Bring the Violin to this spec, with the named VMs started here waiting for a
    /// live migration (`-incoming`) rather than booting.
    PrepareIncoming {
        violin: Violin,
        guests: Vec<String>,
        /// Wait on TCP at this address (a port of [`crate::host::vm::MIGRATION_PORTS`])
        /// rather than on a UNIX socket beside the VM.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        listen: Option<std::net::Ipv4Addr>,
    },
    /// The named guests (which moved here) send a gratuitous ARP once attached.
    Announce {
        name: String,
        guests: Vec<String>,
    },
    RemoveViolin {
        name: String,
    },
    Stats {
        name: String,
    },
    /// Stream the Violin's dropped frames on this host, at most `rate` a second.
    Monitor {
        name: String,
        #[serde(default = "default_monitor_rate")]
        rate: u32,
    },
}

/// Drop events a second a monitor gets from one host unless it asks otherwise.
pub const DEFAULT_MONITOR_RATE: u32 = 100;
/// The most a monitor may ask for.
pub const MAX_MONITOR_RATE: u32 = 10_000;

fn default_monitor_rate() -> u32 {
    DEFAULT_MONITOR_RATE
}

/// One dropped frame, as a host's daemon reports it to `violin monitor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitorEvent {
    /// When it was dropped: ns since the Unix epoch.
    pub unix_ns: u64,
    pub host: String,
    pub violin: String,
    /// The verdict's name (`no_link`, `spoofed_ip`, …).
    pub reason: String,
    /// Where it came from: a guest's name, or `underlay ADDRESS`.
    pub from: String,
    pub src_mac: String,
    pub dst_mac: String,
    pub src_ip: Option<Ipv4Addr>,
    pub dst_ip: Option<Ipv4Addr>,
    pub len: u32,
    /// Drops not described since the previous event (the rate limit).
    pub missed: u32,
}

/// The largest request line the daemon reads; a longer one is refused.
pub const MAX_REQUEST: usize = 16 << 20;

impl Request {
    /// Whether the request only reads (answered without waiting for changes in flight).
    pub fn is_read_only(&self) -> bool {
        matches!(self, Request::Status | Request::Stats { .. })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn from_result(r: Result<serde_json::Value>) -> Response {
        match r {
            Ok(data) => Response {
                ok: true,
                error: None,
                data,
            },
            Err(e) => Response::error(format!("{e:#}")),
        }
    }
    pub fn error(msg: String) -> Response {
        Response {
            ok: false,
            error: Some(msg),
            data: serde_json::Value::Null,
        }
    }
}

/// What an `ApplyViolin` changed on one host (guest names).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Applied {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub kept: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostStatus {
    pub host: String,
    pub underlay: Ipv4Addr,
    pub dataplane: String,
    pub pid: u32,
    pub violins: Vec<ViolinStatus>,
    pub host_drops: BTreeMap<String, u64>,
    /// The host's lease in etcd expired: what it reported last (its guests are lost
    /// until it returns).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub down: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ViolinStatus {
    pub name: String,
    pub vni: u32,
    /// The spec as this host applied it (left out of what hosts publish in etcd, where
    /// the spec itself is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Violin>,
    /// This host's guests of the Violin.
    pub guests: Vec<GuestStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestStatus {
    pub name: String,
    pub kind: GuestKind,
    pub socket: String,
    pub netns: Option<String>,
    pub connected: bool,
    pub ip: String,
    pub mac: String,
    pub counters: PortCounters,
    /// Processes the OOM killer ended inside the guest's cgroup (guests with limits).
    #[serde(default)]
    pub oom_kills: Option<u64>,
    /// A VM's serial console and `violin exec` agent sockets, and its accelerator.
    #[serde(default)]
    pub console: Option<String>,
    #[serde(default)]
    pub agent: Option<String>,
    #[serde(default)]
    pub accel: Option<String>,
    /// A VM's QMP socket, and where it waits for an incoming migration, if it does
    /// (QEMU's `-incoming` URI: `unix:PATH` or `tcp:ADDR:PORT`).
    #[serde(default)]
    pub qmp: Option<String>,
    #[serde(default)]
    pub incoming: Option<String>,
}

/// A Violin's counters on one host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostViolinStats {
    pub host: String,
    #[serde(flatten)]
    pub stats: ViolinStats,
    pub ports: Vec<GuestStatus>,
    /// Drops on this host that belong to no Violin (bad outer headers, unknown VNI).
    pub host_drops: BTreeMap<String, u64>,
    /// `udp` or `xdp`.
    pub dataplane: String,
    /// VXLAN frames this host received through the kernel's UDP socket.
    pub udp_rx_frames: u64,
    /// The xdp data plane's counters, when it runs.
    pub xdp: Option<XdpHostStats>,
    /// The packet worker this Violin lives on here (an index into `workers`).
    #[serde(default)]
    pub worker: Option<usize>,
    /// Each packet worker's own figures (the host's, not only this Violin's).
    #[serde(default)]
    pub workers: Vec<WorkerStats>,
}

/// Classifier verdicts and AF_XDP ring counters of one host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct XdpHostStats {
    /// XDP classifier verdicts on the underlay interface (all Violins).
    pub verdicts: BTreeMap<String, u64>,
    /// The shared UMEM's rings and pool.
    pub rings: AfXdpStats,
    /// The kernel's counters of this Violin's socket.
    pub socket: Option<SlotStats>,
}

/// Sends a streaming request (`monitor`): checks its response, then hands each line
/// after it to `each` until the daemon closes the connection or `each` returns false.
pub fn stream<T: DeserializeOwned>(
    socket: &Path,
    req: &Request,
    each: impl FnMut(T) -> bool,
) -> Result<()> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the daemon at {} (is it running?)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    read_stream(BufReader::new(&s), each)
}

/// `GET URL` of a streaming resource of a host's metrics server
/// (`/violins/NAME/drops?rate=N`): the same lines as [`stream`], after the HTTP head.
pub fn http_stream<T: DeserializeOwned>(url: &str, each: impl FnMut(T) -> bool) -> Result<()> {
    let (mut c, authority, path) = http_connect(url)?;
    write!(
        c,
        "GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )?;
    let mut r = BufReader::new(c);
    let mut status = String::new();
    r.read_line(&mut status)
        .with_context(|| format!("{url}: reading the response"))?;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
    }
    let code = status.split_whitespace().nth(1).unwrap_or("");
    if code != "200" {
        let mut body = String::new();
        let _ = r.read_to_string(&mut body);
        bail!("{url}: {code} {}", body.trim());
    }
    read_stream(r, each)
}

/// A streamed answer: the response line, then one item per line until the end or
/// until `each` returns false.
fn read_stream<T: DeserializeOwned>(
    r: impl BufRead,
    mut each: impl FnMut(T) -> bool,
) -> Result<()> {
    let mut lines = r.lines();
    let first = lines
        .next()
        .context("the daemon closed the connection without answering")?
        .context("reading the daemon's response")?;
    let r: Response = serde_json::from_str(&first).context("decoding the daemon's response")?;
    if !r.ok {
        return Err(anyhow!(r.error.unwrap_or_else(|| "unknown error".into())));
    }
    for l in lines {
        let l = l.context("reading from the daemon")?;
        let item: T = serde_json::from_str(&l).context("decoding an event")?;
        if !each(item) {
            break;
        }
    }
    Ok(())
}

/// Sends one request and decodes the response's data.
pub fn call<T: DeserializeOwned>(socket: &Path, req: &Request) -> Result<T> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the daemon at {} (is it running?)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut resp = String::new();
    BufReader::new(&s)
        .read_line(&mut resp)
        .context("reading the daemon's response")?;
    if resp.is_empty() {
        bail!(
            "the daemon at {} closed the connection without answering",
            socket.display()
        );
    }
    let r: Response = serde_json::from_str(&resp).context("decoding the daemon's response")?;
    if !r.ok {
        return Err(anyhow!(r.error.unwrap_or_else(|| "unknown error".into())));
    }
    serde_json::from_value(r.data).context("decoding the daemon's response data")
}

/// `GET URL` (plain `http://HOST:PORT/PATH`): the body of a 200 answer; any other
/// status is an error carrying the body.
pub fn http_get(url: &str) -> Result<String> {
    let (mut c, authority, path) = http_connect(url)?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        c,
        "GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    c.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("{url}: no HTTP response"))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!("{url}: {} {}", status, body.trim());
    }
    Ok(body.to_string())
}

/// Connects to the server of an `http://` URL; returns the connection, the authority
/// and the path.
fn http_connect(url: &str) -> Result<(std::net::TcpStream, &str, &str)> {
    use std::net::ToSocketAddrs;
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("{url}: only http:// URLs"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = authority
        .to_socket_addrs()
        .with_context(|| format!("{url}: bad address"))?
        .next()
        .ok_or_else(|| anyhow!("{url}: no address"))?;
    let c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connecting to {authority}"))?;
    Ok((c, authority, path))
}

/// `GET URL` of a host's metrics server, its JSON body decoded.
pub fn http_get_json<T: DeserializeOwned>(url: &str) -> Result<T> {
    serde_json::from_str(&http_get(url)?).with_context(|| format!("{url}: not the expected JSON"))
}
