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

/// A token bucket filter on a link's egress (`tc qdisc replace dev NAME root tbf`):
/// what the link sends leaves at `bytes_per_sec` (counted as the kernel counts a frame:
/// its L2 length, a GSO packet as the segments it becomes), in bursts of at most
/// `burst` bytes; up to `limit` bytes wait in its queue, and a local sender's socket
/// feels the queue (TCP Small Queues, a full send buffer) before anything is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tbf {
    pub bytes_per_sec: u64,
    pub burst: u32,
    pub limit: u32,
}

impl Tbf {
    /// The qdisc's options as the kernel reads them (`TCA_OPTIONS` of kind `tbf`):
    /// `TCA_TBF_PARMS` (`struct tc_tbf_qopt`), `TCA_TBF_BURST`, and `TCA_TBF_RATE64`
    /// when the rate does not fit the 32-bit field.
    pub fn options(&self) -> Vec<(u16, Vec<u8>)> {
        const TCA_TBF_PARMS: u16 = 1;
        const TCA_TBF_RATE64: u16 = 4;
        const TCA_TBF_BURST: u16 = 6;
        const TC_LINKLAYER_ETHERNET: u8 = 1;
        // The burst's transmission time in the scheduler's ticks (64 ns); the kernel
        // derives it again from TCA_TBF_BURST, so this only keeps the struct coherent.
        let buffer_ns =
            u128::from(self.burst) * 1_000_000_000 / u128::from(self.bytes_per_sec.max(1));
        let buffer_ticks = u32::try_from(buffer_ns >> 6).unwrap_or(u32::MAX);
        let rate32 = u32::try_from(self.bytes_per_sec).unwrap_or(u32::MAX);
        let mut parms = Vec::with_capacity(36);
        // struct tc_ratespec rate: cell_log, linklayer, overhead, cell_align, mpu, rate.
        parms.extend_from_slice(&[0, TC_LINKLAYER_ETHERNET]);
        parms.extend_from_slice(&0u16.to_ne_bytes());
        parms.extend_from_slice(&0i16.to_ne_bytes());
        parms.extend_from_slice(&0u16.to_ne_bytes());
        parms.extend_from_slice(&rate32.to_ne_bytes());
        // struct tc_ratespec peakrate: none.
        parms.extend_from_slice(&[0; 12]);
        // limit, buffer, mtu (the peak bucket's: none).
        parms.extend_from_slice(&self.limit.to_ne_bytes());
        parms.extend_from_slice(&buffer_ticks.to_ne_bytes());
        parms.extend_from_slice(&0u32.to_ne_bytes());
        let mut out = vec![
            (TCA_TBF_PARMS, parms),
            (TCA_TBF_BURST, self.burst.to_ne_bytes().to_vec()),
        ];
        if self.bytes_per_sec > u64::from(u32::MAX) {
            out.push((TCA_TBF_RATE64, self.bytes_per_sec.to_ne_bytes().to_vec()));
        }
        out
    }
}

/// Puts (or changes) a token bucket filter as the root qdisc of a link.
pub async fn set_tbf(h: &Handle, name: &str, tbf: &Tbf) -> Result<()> {
    use rtnetlink::packet_core::{
        DefaultNla, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE,
        NLM_F_REQUEST,
    };
    use rtnetlink::packet_route::tc::{TcAttribute, TcHandle, TcMessage, TcOption};
    use rtnetlink::packet_route::RouteNetlinkMessage;
    let index = require_index(h, name).await?;
    let mut msg = TcMessage::with_index(index as i32);
    msg.header.parent = TcHandle::ROOT;
    msg.attributes.push(TcAttribute::Kind("tbf".into()));
    msg.attributes.push(TcAttribute::Options(
        tbf.options()
            .into_iter()
            .map(|(kind, value)| TcOption::Other(DefaultNla::new(kind, value)))
            .collect(),
    ));
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewQueueDiscipline(msg));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    let mut replies = h
        .clone()
        .request(req)
        .with_context(|| format!("asking for a tbf qdisc on {name}"))?;
    while let Some(m) = futures::StreamExt::next(&mut replies).await {
        if let NetlinkPayload::Error(e) = m.payload {
            return Err(anyhow!(rtnetlink::Error::NetlinkError(e)))
                .with_context(|| format!("tc qdisc replace dev {name} root tbf"));
        }
    }
    Ok(())
}

/// Gives a link back its default root qdisc (`tc qdisc del dev NAME root`); nothing to
/// do when it has none of its own.
pub async fn del_root_qdisc(h: &Handle, name: &str) -> Result<()> {
    use rtnetlink::packet_route::tc::TcHandle;
    let index = require_index(h, name).await?;
    let mut req = h.qdisc().del(index as i32);
    req.message_mut().header.parent = TcHandle::ROOT;
    match req.execute().await {
        Ok(()) => Ok(()),
        // Nothing of its own to delete: the kernel refuses to delete the default root
        // (a veth's noqueue, handle 0) with one of these.
        Err(rtnetlink::Error::NetlinkError(e))
            if e.raw_code() == -libc::ENOENT || e.raw_code() == -libc::EINVAL =>
        {
            Ok(())
        }
        Err(e) => Err(anyhow!(e).context(format!("tc qdisc del dev {name} root"))),
    }
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

#[cfg(test)]
mod tests {
    use super::Tbf;

    /// `struct tc_tbf_qopt` as the kernel lays it out (x86-64, native order): the rate's
    /// `tc_ratespec` (cell_log, linklayer = ethernet, overhead, cell_align, mpu, rate),
    /// an empty peak rate, then limit, buffer (ticks of 64 ns), mtu.
    #[test]
    fn tbf_options_are_the_kernels_layout() {
        let t = Tbf {
            bytes_per_sec: 1_250_000,
            burst: 12_500,
            limit: 262_144,
        };
        let o = t.options();
        assert_eq!(o.len(), 2, "no 64-bit rate below 4 GB/s");
        let (kind, parms) = &o[0];
        assert_eq!(*kind, 1);
        #[rustfmt::skip]
        let want: [u8; 36] = [
            0, 1, 0, 0, 0, 0, 0, 0, 0xd0, 0x12, 0x13, 0x00, // rate: 1 250 000
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,              // no peak rate
            0x00, 0x00, 0x04, 0x00,                          // limit: 262 144
            0x5a, 0x62, 0x02, 0x00,                          // 10 ms = 156 250 ticks
            0, 0, 0, 0,                                      // mtu
        ];
        assert_eq!(parms.as_slice(), want.as_slice());
        assert_eq!(o[1], (6, 12_500u32.to_ne_bytes().to_vec()));

        let fast = Tbf {
            bytes_per_sec: 5_000_000_000,
            ..t
        };
        let o = fast.options();
        assert_eq!(o.len(), 3);
        assert_eq!(
            o[0].1[8..12],
            u32::MAX.to_ne_bytes(),
            "the 32-bit field saturates"
        );
        assert_eq!(o[2], (4, 5_000_000_000u64.to_ne_bytes().to_vec()));
    }
}
