//! The data path: everything a packet worker owns and runs per packet.
//!
//! - [`fastpath`]: the switch, policing and encapsulation (rx → switch → police → encap → tx);
//! - [`transport`]: the guest ports and the underlay, which only move bytes;
//! - [`worker`]: the packet worker's loop, which owns one switch, its ports and its
//!   underlay, and applies control changes ([`worker::Command`]) between batches.
//!
//! Nothing in here blocks on anything but the worker's own poll: control work (specs,
//! netlink, processes, persistence) lives in [`crate::control`] and [`crate::host`].

pub mod fastpath;
pub mod transport;
pub mod worker;
