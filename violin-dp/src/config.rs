//! The daemon's host configuration (`violin-dp --config HOST.toml`).

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Which data plane carries tunnelled frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneChoice {
    /// XDP + AF_XDP where possible, else UDP (and say why).
    #[default]
    Auto,
    /// Kernel-bypass: XDP classifier + AF_XDP poller.
    Xdp,
    /// A plain UDP socket.
    Udp,
}

/// How the xdp plane transmits the small frames of the guests' traffic (super-frames
/// always take the UDP socket's segmentation offload; a jumbo frame takes AF_XDP's TX
/// ring either way where the sockets are multi-buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpTx {
    /// Through the UDP socket, a worker round's frames in one `sendmmsg`, each run of
    /// datagrams to one host as one `UDP_SEGMENT` message: one trip through the stack
    /// for up to 64 frames. In AF_XDP's copy mode (the only mode a veth has) the TX ring
    /// costs the kernel an skb and a driver call per frame, and measured here twice the
    /// daemon's CPU per frame. A round's lone frame takes the TX ring (the shorter
    /// way for one frame: no batch to gain). Receiving stays on AF_XDP either way.
    #[default]
    Socket,
    /// Through AF_XDP's TX ring, past the kernel's stack and qdisc: for a NIC with
    /// zero-copy AF_XDP, where the ring is where kernel bypass pays.
    Ring,
}

impl XdpTx {
    /// Its name in the host config and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            XdpTx::Socket => "socket",
            XdpTx::Ring => "ring",
        }
    }
}

/// Which socket of the underlay's UDP group (`SO_REUSEPORT`) the kernel queues a
/// Violin's datagrams on, on either plane (on the xdp plane those the classifier passes
/// to the kernel: super-frames, and jumbo frames where the AF_XDP sockets are not
/// multi-buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UdpSteering {
    /// A socket of its own per Violin, picked by an `sk_reuseport` eBPF program and
    /// read by the Violin's worker as one of the Violin's sources: a flooding Violin
    /// overflows only its own queue, and the worker's fair service sees each Violin's
    /// backlog. Where the eBPF object does not load, the daemon says so and steers by
    /// worker.
    #[default]
    Violin,
    /// One socket per worker, steered by classic BPF: a worker's Violins share its
    /// socket's queue, first in, first out.
    Worker,
}

impl UdpSteering {
    /// Its name in the host config and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            UdpSteering::Violin => "violin",
            UdpSteering::Worker => "worker",
        }
    }
}

/// How the XDP classifier attaches to the underlay interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpAttach {
    /// `generic` on a veth, `native` on anything else.
    #[default]
    Auto,
    /// In the driver (`XDP_FLAGS_DRV_MODE`): the fast mode on a NIC. On a veth it strips
    /// segmentation offload from the peer, so every TCP stream into the host, Violin or
    /// not, arrives segmented (measured here: the host's own TCP at 0.25 ×).
    Native,
    /// On the socket buffer (`XDP_FLAGS_SKB_MODE`): super-frames arrive whole. A veth
    /// has no zero-copy AF_XDP either way.
    Generic,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// This host's name, as specs refer to it (`host = "h1"`).
    pub name: String,
    /// Underlay address this daemon sends from and receives VXLAN on.
    pub underlay: Ipv4Addr,
    /// Underlay interface (where the XDP program attaches).
    #[serde(default = "default_interface")]
    pub interface: String,
    #[serde(default = "default_port")]
    pub vxlan_port: u16,
    /// Control socket, guest sockets and state live here.
    pub run_dir: PathBuf,
    /// Prefix of the network namespaces of this host's lightweight guests.
    #[serde(default)]
    pub netns_prefix: String,
    #[serde(default)]
    pub dataplane: DataplaneChoice,
    /// xdp: one AF_XDP socket per Violin (shared UMEM), so a flooding Violin fills only
    /// its own ring. `false` (or a driver that refuses shared UMEM) means one socket per
    /// queue for every Violin.
    #[serde(default = "yes")]
    pub xdp_socket_per_violin: bool,
    /// xdp: how small frames leave ([`XdpTx`]; default `socket`).
    #[serde(default)]
    pub xdp_tx: XdpTx,
    /// xdp: how the classifier attaches (default: generic on a veth, native elsewhere).
    #[serde(default)]
    pub xdp_attach: XdpAttach,
    /// Which underlay socket a Violin's datagrams queue on ([`UdpSteering`]; default
    /// `violin`).
    #[serde(default)]
    pub udp_steering: UdpSteering,
    /// Serve Prometheus metrics over HTTP on this TCP port (all of the host's own
    /// addresses; nothing is reachable from guests, which live in other namespaces).
    #[serde(default)]
    pub metrics_port: Option<u16>,
    /// CPUs for control work: the control thread and its servers, and the kernel work
    /// they cause (namespaces, netlink, starting processes), which on a kernel without
    /// preemption would otherwise delay a packet worker's wake-up by milliseconds.
    /// Packet workers, relays and VMs keep every CPU. Default: CPU 0 on a machine with
    /// two CPUs or more; `[]` leaves control work unpinned.
    #[serde(default)]
    pub control_cpus: Option<Vec<usize>>,
    /// Packet workers: threads that each own some Violins (their switch tables, guest
    /// ports and AF_XDP sockets) and one socket of the underlay's UDP group; on the xdp
    /// plane worker N also sends through rx queue N's AF_XDP TX ring (what [`XdpTx`]
    /// puts there), where the interface has that queue (a worker beyond the Q queues
    /// sends through an AF_XDP socket of its own on queue N mod Q). Each new Violin
    /// goes to the worker with the fewest Violins, so a quiet Violin's frames wake a worker of their own, not one a
    /// neighbour keeps busy.
    /// Default: one per CPU; 1 to 32.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Microseconds a packet worker keeps polling without sleeping after a round with
    /// work, before it blocks in `epoll_wait` (spin, then sleep): a frame that arrives
    /// meanwhile costs no wake-up. 0 turns it off. Default [`DEFAULT_BUSY_POLL_US`].
    /// A worker that finds its CPU wanted by another thread mid-spin sleeps instead
    /// for a while (`datapath::worker::Spin`).
    #[serde(default)]
    pub busy_poll_us: Option<u64>,
    /// A Violin whose packet worker spends at least this percent of a core on it (over
    /// a second) is loud: its neighbours move to a worker without a loud Violin, where
    /// there is one (`control::balance`), and so does a second loud Violin on one
    /// worker. 0 leaves every Violin where it was placed. Default
    /// [`DEFAULT_LOUD_VIOLIN_PERCENT`]; 0 to 100.
    #[serde(default)]
    pub loud_violin_percent: Option<u32>,
    /// Most guests this host takes, over all its Violins; an `up`/`apply` that would
    /// pass it is refused whole. Default [`DEFAULT_MAX_GUESTS`].
    #[serde(default)]
    pub max_guests: Option<usize>,
    /// Super-frames to other Violin daemons leave with their segments' L4 checksums
    /// partial (VXLAN remote checksum offload: the outer UDP checksum covers them on
    /// the way, and the receiver completes them only for a consumer that needs it).
    /// Turn it off while daemons older than it are still in the cluster: they would
    /// hand such segments to guests unfinished. Never used towards external VTEPs.
    #[serde(default = "yes")]
    pub remote_checksum: bool,
    /// xdp: where the underlay's frames outgrow one AF_XDP frame (MTU 9000), bind the
    /// AF_XDP sockets multi-buffer (`XDP_USE_SG`), so that jumbo frames cross AF_XDP
    /// too (default). Off, or where the kernel refuses it, they take the kernel's UDP
    /// socket both ways.
    #[serde(default = "yes")]
    pub xdp_multi_buffer: bool,
    /// The cluster's etcd: this host registers there and takes its share of the Violin
    /// specs stored there. Without it the host is driven over its control socket alone.
    #[serde(default)]
    pub etcd: Option<EtcdConfig>,
}

/// Where a host finds the cluster's state (`[etcd]` in the host config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members (`http://10.0.0.254:2379`).
    pub endpoints: Vec<String>,
    /// The cluster's name: its keys live under `/violin/CLUSTER/`.
    pub cluster: String,
    /// Seconds the host's registration outlives its last keep-alive: a host silent
    /// this long is shown `down`.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: u64,
    /// TLS with a client certificate (its CN is this host's etcd user).
    #[serde(default)]
    pub tls: Option<EtcdTls>,
    /// Where the CLI reaches this host's metrics server (`http://ADDRESS:PORT`), for
    /// `violin stats` and `profile`; published with the host's registration. Default:
    /// the underlay address and `metrics_port`.
    #[serde(default)]
    pub advertise: Option<String>,
}

/// A client's TLS files for etcd: the CA that signed the members' certificates, and
/// the client's own certificate and key (PEM).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The lease of a host's registration unless its config says otherwise.
pub const DEFAULT_LEASE_TTL: u64 = 10;

fn default_lease_ttl() -> u64 {
    DEFAULT_LEASE_TTL
}

/// Guests per host unless `max_guests` says otherwise.
pub const DEFAULT_MAX_GUESTS: usize = 2048;
/// How long a packet worker spins after a round with work (see `busy_poll_us`).
pub const DEFAULT_BUSY_POLL_US: u64 = 200;

/// The share of a core (percent) that makes a Violin loud (see `loud_violin_percent`).
pub const DEFAULT_LOUD_VIOLIN_PERCENT: u32 = 20;

/// Most packet workers a host runs.
pub const MAX_WORKERS: usize = 32;

/// The metrics port `violin cluster up` gives each host.
pub const DEFAULT_METRICS_PORT: u16 = 9464;

fn yes() -> bool {
    true
}

fn default_interface() -> String {
    "eth0".into()
}
fn default_port() -> u16 {
    violin_common::VXLAN_PORT
}

impl HostConfig {
    /// The CPUs control work is kept to, or none (unpinned).
    pub fn control_cpus(&self) -> Vec<usize> {
        match &self.control_cpus {
            Some(c) => c.clone(),
            None if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 => vec![0],
            None => Vec::new(),
        }
    }

    /// How many packet workers to run, or why the configured number cannot be.
    pub fn workers(&self) -> Result<usize> {
        match self.workers {
            None => Ok(std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_WORKERS)),
            Some(0) => anyhow::bail!("workers = 0: a host needs at least one packet worker"),
            Some(n) if n > MAX_WORKERS => {
                anyhow::bail!("workers = {n}: at most {MAX_WORKERS} packet workers per host")
            }
            Some(n) => Ok(n),
        }
    }

    pub fn max_guests(&self) -> usize {
        self.max_guests.unwrap_or(DEFAULT_MAX_GUESTS)
    }

    pub fn busy_poll_us(&self) -> u64 {
        self.busy_poll_us.unwrap_or(DEFAULT_BUSY_POLL_US)
    }

    /// The share of a core that makes a Violin loud (0: Violins never move), or why
    /// the configured one cannot be.
    pub fn loud_share(&self) -> Result<f64> {
        match self
            .loud_violin_percent
            .unwrap_or(DEFAULT_LOUD_VIOLIN_PERCENT)
        {
            p if p > 100 => {
                anyhow::bail!("loud_violin_percent = {p}: a share of one core, 0 to 100")
            }
            p => Ok(f64::from(p) / 100.0),
        }
    }

    pub fn load(path: &Path) -> Result<HostConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
    pub fn control_socket(&self) -> PathBuf {
        self.run_dir.join("control.sock")
    }
    pub fn guest_socket(&self, violin: &str, guest: &str) -> PathBuf {
        self.run_dir
            .join("guests")
            .join(violin)
            .join(format!("{guest}.sock"))
    }
    /// A VM's own directory: console and agent sockets, logs.
    pub fn vm_dir(&self, violin: &str, guest: &str) -> PathBuf {
        self.run_dir.join("vms").join(violin).join(guest)
    }
    pub fn guest_netns(&self, violin: &str, guest: &str) -> String {
        format!("{}{violin}-{guest}", self.netns_prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's example host config parses, and says what the defaults are.
    #[test]
    fn the_readme_host_config_parses_and_remote_checksum_defaults_on() {
        let readme = include_str!("../../README.md");
        let from = readme
            .find("## Host configuration")
            .expect("README has a host configuration section");
        let block = readme[from..]
            .split("```toml\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a toml block");
        let cfg: HostConfig = toml::from_str(block).unwrap();
        // The README's block with one setting changed, parsed.
        let with = |from: &str, to: &str| toml::from_str::<HostConfig>(&block.replace(from, to));
        assert_eq!(cfg.name, "h1");
        assert!(cfg.remote_checksum);
        let off = block.replace("remote_checksum = true", "remote_checksum = false");
        assert!(!toml::from_str::<HostConfig>(&off).unwrap().remote_checksum);
        let bare = "name = \"h2\"\nunderlay = \"10.0.0.2\"\nrun_dir = \"/tmp/x\"\n";
        assert!(toml::from_str::<HostConfig>(bare).unwrap().remote_checksum);
        assert_eq!(
            toml::from_str::<HostConfig>(bare).unwrap().xdp_tx,
            XdpTx::Socket
        );
        let tx = "xdp_tx = \"socket\"";
        assert_eq!(with(tx, "xdp_tx = \"ring\"").unwrap().xdp_tx, XdpTx::Ring);
        let e = with(tx, "xdp_tx = \"tx_ring\"").unwrap_err().to_string();
        assert!(e.contains("xdp_tx") && e.contains("tx_ring"), "{e}");
        assert_eq!(
            toml::from_str::<HostConfig>(bare).unwrap().udp_steering,
            UdpSteering::Violin
        );
        let steering = "udp_steering = \"violin\"";
        assert_eq!(
            with(steering, "udp_steering = \"worker\"")
                .unwrap()
                .udp_steering,
            UdpSteering::Worker
        );
        let e = with(steering, "udp_steering = \"guest\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("udp_steering") && e.contains("guest"), "{e}");
    }
}
