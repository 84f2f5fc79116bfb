//! A fast guest port: the host end of a veth whose other end is the guest's `eth0`,
//! driven by AF_XDP. The `violin_port` XDP program hands every frame the guest sends to
//! this port's socket; frames for the guest are transmitted into the veth from the
//! port's own small UMEM. Same switch, policing and counters as a socket port, without
//! the relay process and the UNIX socket hops. A Violin whose frames outgrow one AF_XDP
//! frame (a jumbo MTU) gets a multi-buffer socket: its frames span several buffers.

use super::guest::PortCounters;
use super::xsk::{XskCore, FRAME_DATA};
use std::os::fd::{AsRawFd, RawFd};
use violin_common::Verdict;
use xsk_rs::RxQueue;

/// The port's UMEM (6 MiB): `FILL` frames for receiving, the rest for sending.
const FRAMES: u32 = 3072;
const FILL: usize = 2048;
/// The RX ring is what absorbs a guest's TCP bursts while the worker is elsewhere:
/// nothing pushes back from a full ring to the guest (its skb is freed when the
/// program redirects it), and what does not fit is dropped. At 512 a single TCP stream
/// lost about 1 % of its frames here (the host end's `rx_queue_0_drops`), all
/// retransmitted; at 2048, hardly any.
const RX_RING: u32 = 2048;
const TX_RING: u32 = 512;

pub struct XdpPort {
    core: XskCore,
    rx: RxQueue,
    iface: String,
    /// The interface the socket is bound to: one re-created under the same name is
    /// another interface, and this socket carries nothing of it.
    ifindex: u32,
    pub counters: PortCounters,
}

impl XdpPort {
    /// Binds the port's socket to `iface`. `largest`: the longest frame the guest's
    /// Violin carries; longer than one AF_XDP frame (a jumbo MTU), the socket is
    /// multi-buffer (`XDP_USE_SG`) and frames span several buffers both ways.
    pub fn open(iface: &str, largest: usize) -> anyhow::Result<XdpPort> {
        let ifindex = nix::net::if_::if_nametoindex(iface)?;
        let multi_buffer = largest > FRAME_DATA as usize;
        // XskCore::open names the interface already; a multi-buffer socket's failure
        // also says what the kernel needs and what to use without it.
        let (core, rx) = XskCore::open(iface, 0, FRAMES, FILL, RX_RING, TX_RING, multi_buffer)
            .map_err(|e| match multi_buffer {
                true => e.context(format!(
                    "a multi-buffer AF_XDP socket for frames of {largest} bytes (XDP_USE_SG, \
                     Linux 6.6 and later; where the kernel has none, use port = \"tap\" for \
                     jumbo frames, or a Violin mtu of at most {})",
                    FRAME_DATA - 18
                )),
                false => e,
            })?;
        Ok(XdpPort {
            core,
            rx,
            iface: iface.to_string(),
            ifindex,
            counters: PortCounters {
                connects: 1,
                ..Default::default()
            },
        })
    }

    pub fn fd(&self) -> RawFd {
        self.rx.fd().as_raw_fd()
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// True while the interface the socket is bound to exists. Its peer is the guest's
    /// `eth0`: a guest that deletes it deletes both ends. One system call: for status,
    /// not the packet path.
    pub fn alive(&self) -> bool {
        nix::net::if_::if_nametoindex(self.iface.as_str()).is_ok_and(|i| i == self.ifindex)
    }

    /// Reads frames the guest sent, within `budget`. True when the budget ran out.
    pub fn receive(&mut self, budget: &mut super::Budget, mut f: impl FnMut(&[u8])) -> bool {
        let c = &mut self.counters;
        self.core.rx(&mut self.rx, budget, |frame| {
            c.rx_frames += 1;
            c.rx_bytes += frame.len() as u64;
            f(frame)
        })
    }

    /// Queues a frame for the guest (sent at the next flush).
    pub fn send(&mut self, frame: &[u8]) -> Result<(), Verdict> {
        self.core.send(&[frame])?;
        self.counters.tx_frames += 1;
        self.counters.tx_bytes += frame.len() as u64;
        Ok(())
    }

    pub fn flush(&mut self) {
        self.core.flush()
    }
}
