//! The simulated cluster's etcd: `members` etcd processes, each in a namespace of its
//! own on the underlay (`NAME-etcdI`, at the top of the subnet), serving the daemons on
//! its underlay address and this machine's CLI on a management link: a veth pair with
//! a /30 of 169.254.0.0/16 chosen so no address of this machine is in it.

use crate::config::EtcdTls;
use crate::host::{netlink, netns};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// etcd's client port (daemons and CLI) and peer port (members); its metrics are
/// served on the management link only, without TLS.
pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;
pub const METRICS_PORT: u16 = 2381;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub netns: String,
    pub underlay: Ipv4Addr,
    /// Its address on the management link (the CLI's way in).
    pub mgmt: Ipv4Addr,
    /// The management link's end in this machine's namespace.
    pub link: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub pid: u32,
}

impl Member {
    /// Where daemons reach it.
    pub fn underlay_url(&self) -> String {
        format!("https://{}:{CLIENT_PORT}", self.underlay)
    }
    /// Where the CLI reaches it.
    pub fn mgmt_url(&self) -> String {
        format!("https://{}:{CLIENT_PORT}", self.mgmt)
    }
    /// Its Prometheus metrics (from this machine).
    pub fn metrics_addr(&self) -> std::net::SocketAddrV4 {
        std::net::SocketAddrV4::new(self.mgmt, METRICS_PORT)
    }
}

/// Free /30 blocks of 169.254.0.0/16 (none of their addresses on this machine), as
/// many as asked, starting from a place derived from the cluster name; each is the
/// block's first address.
pub fn free_blocks(cluster: &str, n: usize) -> Result<Vec<u32>> {
    let used = netlink::with_handle(|h| async move { netlink::ipv4_addrs(&h).await })?;
    let base = u32::from(Ipv4Addr::new(169, 254, 0, 0));
    let used: Vec<u32> = used
        .into_iter()
        .map(u32::from)
        .filter(|a| a & 0xffff_0000 == base)
        .map(|a| (a - base) / 4)
        .collect();
    let start = cluster
        .bytes()
        .fold(2166136261u32, |h, b| (h ^ b as u32).wrapping_mul(16777619));
    // Blocks of 169.254.1.0 to 169.254.254.255: not the range's first or last /24.
    let blocks = (0..16382u32)
        .map(|i| 64 + (start.wrapping_add(i)) % 16256)
        .filter(|b| !used.contains(b))
        .take(n)
        .collect::<Vec<_>>();
    if blocks.len() < n {
        bail!("no free /30 in 169.254.0.0/16 for the etcd management links");
    }
    Ok(blocks.into_iter().map(|b| base + b * 4).collect())
}

/// Where member `i` (from 1) sits on the underlay: the top of the subnet.
pub fn underlay_addr(net: Ipv4Addr, prefix: u8, i: usize) -> Ipv4Addr {
    let size = 1u32 << (32 - prefix);
    Ipv4Addr::from(u32::from(net) + size - 1 - i as u32)
}

/// Creates the members' namespaces and links and starts etcd in each; returns when
/// the cluster answers. On failure the caller's `down` removes what was made (every
/// name here starts with the cluster's).
#[allow(clippy::too_many_arguments)]
pub fn start(
    cluster: &str,
    bridge: &str,
    net: Ipv4Addr,
    prefix: u8,
    mtu: u32,
    blocks: &[u32],
    dir: &Path,
    pki: &super::pki::Pki,
    admin: &EtcdTls,
    progress: &dyn Fn(&str),
    recorded: &mut dyn FnMut(&Member) -> Result<()>,
) -> Result<Vec<Member>> {
    let bin = which("etcd").context(
        "etcd is not installed (scripts/setup.sh installs Debian's etcd-server; \
         `--etcd-members 0` runs the cluster without it)",
    )?;
    let mut out = Vec::new();
    for i in 1..=blocks.len() {
        let ns = format!("{cluster}-etcd{i}");
        let block = blocks[i - 1];
        let ip = Ipv4Addr::from(block + 2);
        let link = format!("ve{cluster}{i}");
        let underlay = underlay_addr(net, prefix, i);
        progress(&format!(
            "creating etcd member etcd{i} ({ns}, {underlay}; this machine reaches it at {ip})"
        ));
        netns::create(&ns)?;
        super::plug_into_underlay(
            bridge,
            &ns,
            (&format!("v{cluster}e{i}"), &format!("u{cluster}e{i}")),
            (underlay, prefix),
            mtu,
            1,
        )?;
        mgmt_link(&link, &format!("m{cluster}e{i}"), &ns, block)?;
        out.push(Member {
            name: format!("etcd{i}"),
            netns: ns,
            underlay,
            mgmt: ip,
            link,
            data_dir: dir.join(format!("etcd{i}.data")),
            log: dir.join(format!("etcd{i}.log")),
            pid: 0,
        });
    }
    let initial: Vec<String> = out
        .iter()
        .map(|m| format!("{}=https://{}:{PEER_PORT}", m.name, m.underlay))
        .collect();
    for m in &mut out {
        let tls = pki.issue(&m.name, &[m.underlay, m.mgmt, Ipv4Addr::LOCALHOST], true)?;
        let mut cmd = Command::new(&bin);
        // Clients and peers alike show a certificate of the cluster's CA.
        for (flag, path) in [
            ("--cert-file", &tls.cert),
            ("--key-file", &tls.key),
            ("--trusted-ca-file", &tls.ca),
            ("--peer-cert-file", &tls.cert),
            ("--peer-key-file", &tls.key),
            ("--peer-trusted-ca-file", &tls.ca),
        ] {
            cmd.arg(flag).arg(path);
        }
        cmd.args(["--client-cert-auth", "--peer-client-cert-auth"]);
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args([
                "--listen-client-urls",
                &format!("{},{}", m.underlay_url(), m.mgmt_url()),
                "--advertise-client-urls",
                &m.underlay_url(),
                "--listen-peer-urls",
                &format!("https://{}:{PEER_PORT}", m.underlay),
                "--initial-advertise-peer-urls",
                &format!("https://{}:{PEER_PORT}", m.underlay),
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-token",
                &format!("violin-{cluster}"),
                "--initial-cluster-state",
                "new",
                "--listen-metrics-urls",
                &format!("http://{}:{METRICS_PORT}", m.mgmt),
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
                // Users authenticate by certificate: their passwords (random, never
                // used) need no costly hashing.
                "--bcrypt-cost",
                "4",
                // History is kept 5 minutes (hosts that were away longer list again).
                "--auto-compaction-mode",
                "periodic",
                "--auto-compaction-retention",
                "5m",
                "--log-level",
                "warn",
                "--logger",
                "zap",
            ])
            .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH);
        m.pid = super::spawn_in(cmd, &m.netns, &m.log)?;
        recorded(m)?;
    }
    progress("waiting for etcd");
    let endpoints: Vec<String> = out.iter().map(Member::mgmt_url).collect();
    wait_healthy(&endpoints, admin, cluster, &out, Duration::from_secs(30))?;
    Ok(out)
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

/// A management link into namespace `ns`: a veth pair, `root` here with the block's
/// first address, the other end in `ns` as `mgmt` with its second (returned).
pub fn mgmt_link(root: &str, inner: &str, ns: &str, block: u32) -> Result<Ipv4Addr> {
    let (root_ip, ip) = (Ipv4Addr::from(block + 1), Ipv4Addr::from(block + 2));
    let nsfile = netns::open(ns)?;
    let (r, i) = (root.to_string(), inner.to_string());
    netlink::with_handle(|h| async move {
        netlink::add_veth(&h, &r, &i).await?;
        netlink::add_addr(&h, &r, root_ip, 30).await?;
        netlink::set_up(&h, &r).await?;
        netlink::move_to_netns(&h, &i, &nsfile).await
    })?;
    let i = inner.to_string();
    netns::run_in(ns, || {
        netlink::with_handle(|h| async move {
            netlink::rename(&h, &i, "mgmt").await?;
            netlink::add_addr(&h, "mgmt", ip, 30).await?;
            netlink::set_up(&h, "mgmt").await
        })
    })?;
    Ok(ip)
}

/// Waits until the cluster answers a read (a quorum is up).
fn wait_healthy(
    endpoints: &[String],
    tls: &EtcdTls,
    cluster: &str,
    members: &[Member],
    t: Duration,
) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let r = crate::store::Store::connect(endpoints, Some(tls), cluster)
            .and_then(|mut s| s.revision());
        match r {
            Ok(_) => return Ok(()),
            Err(e) if t0.elapsed() > t => {
                let logs: Vec<String> = members
                    .iter()
                    .map(|m| {
                        let text = std::fs::read_to_string(&m.log).unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(5).collect();
                        format!("--- {} ---\n{}", m.log.display(), tail.join("\n"))
                    })
                    .collect();
                bail!("etcd did not come up: {e:#}\n{}", logs.join("\n"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
