//! Transports: they move bytes between the outside world and the switch, nothing more.
//!
//! - [`guest`]: a guest's UNIX socket (QEMU `-netdev stream` or `-netdev dgram` framing);
//! - [`udp`]: the underlay, VXLAN over a plain UDP socket;
//! - [`afxdp`]: the underlay through per-Violin AF_XDP sockets (kernel bypass);
//! - [`underlay`]: whichever of the two the daemon runs.

pub mod afxdp;
pub mod guest;
pub mod udp;
pub mod underlay;

/// Largest frame a guest socket reads; bigger stream records cannot be resynchronised
/// and close the connection.
pub const MAX_RECORD: usize = 65535;
