//! Violin's per-host data plane (`violin-dp`) and the `violin` CLI.
//!
//! - Fast path ([`fastpath`]): switch, policing, encapsulation — per packet.
//! - Transports ([`transport`]): guest UNIX sockets and the underlay UDP socket; they
//!   move bytes to and from the switch and nothing else.
//! - Control path: the spec ([`spec`]), the daemon's event loop and control socket
//!   ([`daemon`], [`control`]), namespaces and netlink ([`netns`], [`netlink`]),
//!   lightweight guests ([`guest`]) and their host uids ([`uids`]), the simulated cluster ([`cluster`]) and the CLI
//!   ([`cli`]).

pub mod cgroup;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod daemon;
pub mod fastpath;
pub mod guest;
pub mod lifecycle;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod probe;
pub mod profile;
pub mod spec;
pub mod transport;
pub mod uids;
pub mod vm;
pub mod xdp;
