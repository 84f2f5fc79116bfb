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

/// The nice value of packet work (workers, and the relays of lightweight guests, which
/// are on their guests' packet path): ahead of control work and tenants' compute on
/// the same cores. Needs CAP_SYS_NICE; without it the work runs at the default
/// priority. (Control work is also kept to its own CPUs: [`crate::config::HostConfig::control_cpus`].)
pub const PACKET_NICE: i32 = -10;

/// Runs the calling thread (or, before `exec`, the process) at [`PACKET_NICE`].
/// Async-signal-safe: it is one system call.
pub fn prioritise_packet_work() -> std::io::Result<()> {
    // SAFETY: setpriority(2) reads only its arguments; `who` 0 is the calling thread.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, PACKET_NICE) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
