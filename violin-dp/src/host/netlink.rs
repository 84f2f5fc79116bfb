//! Link and address configuration through rtnetlink, for whichever network namespace the
//! calling thread is in (combine with [`crate::host::netns::run_in`]).
//!
//! Each call opens its own netlink connection on a current-thread runtime: this is
//! control-path work, done a handful of times per guest or host.

use anyhow::{anyhow, Context, Result};
use futures::TryStreamExt;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

/// Runs an async netlink job on a fresh connection in the current thread's namespace.
pub fn with_handle<T, F, Fut>(f: F) -> Result<T>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a netlink runtime")?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
        let task = tokio::spawn(conn);
        let r = f(handle).await;
        task.abort();
        r
    })
}

/// Index of the named link, or `None` when there is none.
pub async fn index(h: &Handle, name: &str) -> Result<Option<u32>> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(Some(l.header.index)),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(anyhow!(e).context(format!("looking up link {name}"))),
    }
}

pub async fn require_index(h: &Handle, name: &str) -> Result<u32> {
    index(h, name)
        .await?
        .ok_or_else(|| anyhow!("no link named {name}"))
}

pub async fn add_bridge(h: &Handle, name: &str) -> Result<()> {
    h.link()
        .add(LinkBridge::new(name).build())
        .execute()
        .await
        .with_context(|| format!("creating bridge {name}"))
}

pub async fn add_veth(h: &Handle, name: &str, peer: &str) -> Result<()> {
    h.link()
        .add(LinkVeth::new(name, peer).build())
        .execute()
        .await
        .with_context(|| format!("creating veth {name}/{peer}"))
}

/// Creates a veth pair whose ends have `queues` rx and tx queues each (a multi-queue
/// NIC, as far as XDP's rx queue index goes). The peer's counts go in its own nested
/// message (`VETH_INFO_PEER`): without them the kernel gives the peer one queue per
/// possible CPU, whatever `name` has.
pub async fn add_veth_queues(h: &Handle, name: &str, peer: &str, queues: u32) -> Result<()> {
    use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute};
    let peer_msg = LinkUnspec::new_with_name(peer)
        .append_extra_attribute(LinkAttribute::NumRxQueues(queues))
        .append_extra_attribute(LinkAttribute::NumTxQueues(queues))
        .build();
    h.link()
        .add(
            LinkVeth::new(name, peer)
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
                .append_extra_attribute(LinkAttribute::NumRxQueues(queues))
                .append_extra_attribute(LinkAttribute::NumTxQueues(queues))
                .build(),
        )
        .execute()
        .await
        .with_context(|| format!("creating veth {name}/{peer} with {queues} queues"))
}

/// Moves a link into the namespace `ns` (an open /run/netns file).
pub async fn move_to_netns(h: &Handle, name: &str, ns: &impl AsRawFd) -> Result<()> {
    let idx = require_index(h, name).await?;
    h.link()
        .set(
            LinkUnspec::new_with_index(idx)
                .setns_by_fd(ns.as_raw_fd())
                .build(),
        )
        .execute()
        .await
        .with_context(|| format!("moving {name} to another namespace"))
}

pub async fn rename(h: &Handle, name: &str, to: &str) -> Result<()> {
    let idx = require_index(h, name).await?;
    h.link()
        .set(LinkUnspec::new_with_index(idx).name(to.to_string()).build())
        .execute()
        .await
        .with_context(|| format!("renaming {name} to {to}"))
}

pub async fn set_master(h: &Handle, name: &str, bridge: &str) -> Result<()> {
    let idx = require_index(h, name).await?;
    let br = require_index(h, bridge).await?;
    h.link()
        .set(LinkUnspec::new_with_index(idx).controller(br).build())
        .execute()
        .await
        .with_context(|| format!("attaching {name} to {bridge}"))
}

pub async fn set_up(h: &Handle, name: &str) -> Result<()> {
    let idx = require_index(h, name).await?;
    h.link()
        .set(LinkUnspec::new_with_index(idx).up().build())
        .execute()
        .await
        .with_context(|| format!("setting {name} up"))
}

pub async fn set_down(h: &Handle, name: &str) -> Result<()> {
    let idx = require_index(h, name).await?;
    h.link()
        .set(LinkUnspec::new_with_index(idx).down().build())
        .execute()
        .await
        .with_context(|| format!("setting {name} down"))
}

pub async fn set_mtu(h: &Handle, name: &str, mtu: u32) -> Result<()> {
    let idx = require_index(h, name).await?;
    h.link()
        .set(LinkUnspec::new_with_index(idx).mtu(mtu).build())
        .execute()
        .await
        .with_context(|| format!("setting the MTU of {name} to {mtu}"))
}

pub async fn set_mac(h: &Handle, name: &str, mac: [u8; 6]) -> Result<()> {
    let idx = require_index(h, name).await?;
    h.link()
        .set(
            LinkUnspec::new_with_index(idx)
                .address(mac.to_vec())
                .build(),
        )
        .execute()
        .await
        .with_context(|| format!("setting the MAC of {name}"))
}

pub async fn add_addr(h: &Handle, name: &str, ip: Ipv4Addr, prefix_len: u8) -> Result<()> {
    let idx = require_index(h, name).await?;
    h.address()
        .add(idx, IpAddr::V4(ip), prefix_len)
        .replace()
        .execute()
        .await
        .with_context(|| format!("adding {ip}/{prefix_len} to {name}"))
}

/// Removes every address of a link.
pub async fn flush_addrs(h: &Handle, name: &str) -> Result<()> {
    let idx = require_index(h, name).await?;
    let mut addrs = h.address().get().set_link_index_filter(idx).execute();
    let mut all = Vec::new();
    while let Some(a) = addrs
        .try_next()
        .await
        .with_context(|| format!("listing the addresses of {name}"))?
    {
        all.push(a);
    }
    for a in all {
        h.address()
            .del(a)
            .execute()
            .await
            .with_context(|| format!("removing an address of {name}"))?;
    }
    Ok(())
}

/// Deletes a link if it exists.
pub async fn del_link(h: &Handle, name: &str) -> Result<()> {
    if let Some(idx) = index(h, name).await? {
        h.link()
            .del(idx)
            .execute()
            .await
            .with_context(|| format!("deleting link {name}"))?;
    }
    Ok(())
}

/// The MAC address of a link.
pub async fn mac_of(h: &Handle, name: &str) -> Result<[u8; 6]> {
    use rtnetlink::packet_route::link::LinkAttribute;
    let mut links = h.link().get().match_name(name.to_string()).execute();
    let link = links
        .try_next()
        .await?
        .ok_or_else(|| anyhow!("no link named {name}"))?;
    for a in link.attributes {
        if let LinkAttribute::Address(m) = a {
            if m.len() == 6 {
                return Ok(m.try_into().unwrap());
            }
        }
    }
    Err(anyhow!("link {name} has no MAC address"))
}

/// A link's MTU and its kind (`veth`, `bridge`…; `None` for a physical NIC).
pub async fn mtu_and_kind(h: &Handle, name: &str) -> Result<(u32, Option<String>)> {
    let f = link_facts(h, name).await?;
    Ok((f.mtu, f.kind))
}

/// What the daemon needs to know of its underlay interface.
#[derive(Debug, Clone, Default)]
pub struct LinkFacts {
    pub mtu: u32,
    /// `veth`, `vxlan`…; `None` for a physical NIC.
    pub kind: Option<String>,
    /// Receive queues (1 when the kernel does not say).
    pub rx_queues: u32,
}

pub async fn link_facts(h: &Handle, name: &str) -> Result<LinkFacts> {
    use rtnetlink::packet_route::link::{LinkAttribute, LinkInfo};
    let mut links = h.link().get().match_name(name.to_string()).execute();
    let link = links
        .try_next()
        .await?
        .ok_or_else(|| anyhow!("no link named {name}"))?;
    let mut f = LinkFacts {
        rx_queues: 1,
        ..LinkFacts::default()
    };
    for a in link.attributes {
        match a {
            LinkAttribute::Mtu(m) => f.mtu = m,
            LinkAttribute::NumRxQueues(q) => f.rx_queues = q.max(1),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        f.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    Ok(f)
}

/// Resolved IPv4 neighbours on a link: (address, MAC).
pub async fn neighbours(h: &Handle, name: &str) -> Result<Vec<(Ipv4Addr, [u8; 6])>> {
    use rtnetlink::packet_route::neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourState,
    };
    let idx = require_index(h, name).await?;
    let mut out = Vec::new();
    let mut dump = h.neighbours().get().execute();
    while let Some(n) = dump.try_next().await? {
        if n.header.ifindex != idx
            || matches!(
                n.header.state,
                NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None
            )
        {
            continue;
        }
        let (mut ip, mut mac) = (None, None);
        for a in n.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => ip = Some(v),
                NeighbourAttribute::LinkLayerAddress(m) if m.len() == 6 => mac = m.try_into().ok(),
                _ => {}
            }
        }
        if let (Some(ip), Some(mac)) = (ip, mac) {
            out.push((ip, mac));
        }
    }
    Ok(out)
}

/// Turns TX checksum offload off on a link (`ethtool -K NAME tx off`), in the calling
/// thread's namespace. Needed where frames leave a veth towards AF_XDP: with offload the
/// kernel hands over packets whose checksums were never filled in.
pub fn disable_tx_checksum(name: &str) -> Result<()> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    const ETHTOOL_STXCSUM: u32 = 0x17;
    let mut val = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: 0,
    };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut val,
        _pad: [0; 16],
    };
    anyhow::ensure!(
        name.len() < libc::IFNAMSIZ,
        "interface name {name} too long"
    );
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").context("a socket for ethtool")?;
    // SAFETY: SIOCETHTOOL reads an ifreq whose data points at a live ethtool_value.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req as *mut IfReq) };
    if r < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("ethtool -K {name} tx off"));
    }
    Ok(())
}

/// Every IPv4 address of every link in the current namespace.
pub async fn ipv4_addrs(h: &Handle) -> Result<Vec<Ipv4Addr>> {
    use rtnetlink::packet_route::address::AddressAttribute;
    let mut addrs = h.address().get().execute();
    let mut out = Vec::new();
    while let Some(a) = addrs.try_next().await.context("listing addresses")? {
        for attr in &a.attributes {
            if let AddressAttribute::Address(std::net::IpAddr::V4(ip)) = attr {
                out.push(*ip);
            }
        }
    }
    Ok(out)
}
