//! Transports: they move bytes between the outside world and the switch, nothing more.
//!
//! - [`guest`]: a guest's UNIX socket (QEMU `-netdev stream` or `-netdev dgram` framing);
//! - [`udp`]: the underlay, VXLAN over a plain UDP socket;
//! - [`afxdp`]: the underlay through per-Violin AF_XDP sockets (kernel bypass);
//! - [`underlay`]: whichever of the two the daemon runs;
//! - [`xdpport`]: a fast guest port, a veth driven by AF_XDP;
//! - [`xsk`]: the UMEM and ring mechanics both AF_XDP users share.

pub mod afxdp;
pub mod guest;
pub mod udp;
pub mod underlay;
pub mod xdpport;
pub mod xsk;

/// Largest frame a guest socket reads; bigger stream records cannot be resynchronised
/// and close the connection.
pub const MAX_RECORD: usize = 65535;

use guest::{GuestPort, PortCounters};
use std::os::fd::RawFd;
use violin_common::Verdict;
use xdpport::XdpPort;

/// A guest's port, whichever kind: the daemon moves frames through it the same way.
pub enum Port {
    Sock(Box<GuestPort>),
    Xdp(Box<XdpPort>),
}

impl Port {
    #[inline]
    pub fn send(&mut self, frame: &[u8]) -> Result<(), Verdict> {
        match self {
            Port::Sock(p) => p.send(frame),
            Port::Xdp(p) => p.send(frame),
        }
    }

    /// Writes what is queued (stream output, AF_XDP TX batch).
    pub fn flush(&mut self) {
        match self {
            Port::Sock(p) => {
                let _ = p.flush();
            }
            Port::Xdp(p) => p.flush(),
        }
    }

    pub fn connected(&self) -> bool {
        match self {
            Port::Sock(p) => p.connected(),
            Port::Xdp(_) => true,
        }
    }

    pub fn counters(&self) -> PortCounters {
        match self {
            Port::Sock(p) => p.counters,
            Port::Xdp(p) => p.counters,
        }
    }

    /// The fd polled for new connections or frames.
    pub fn socket_fd(&self) -> RawFd {
        match self {
            Port::Sock(p) => p.socket_fd(),
            Port::Xdp(p) => p.fd(),
        }
    }

    /// A stream port's current connection.
    pub fn conn_fd(&self) -> Option<RawFd> {
        match self {
            Port::Sock(p) => p.conn_fd(),
            Port::Xdp(_) => None,
        }
    }

    /// Where the guest attaches: a socket path, or `xdp:<host veth>`.
    pub fn describe(&self) -> String {
        match self {
            Port::Sock(p) => p.path().display().to_string(),
            Port::Xdp(p) => format!("xdp:{}", p.iface()),
        }
    }
}
