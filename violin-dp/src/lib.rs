//! Violin's per-host data plane (`violin-dp`) and the `violin` CLI.
//!
//! The daemon is split by job, each in its own folder and thread:
//! - [`datapath`]: packet workers — switch, policing, encapsulation and the transports;
//!   per packet, no allocation, locks or logging, time passed in.
//! - [`host`]: host supervision — namespaces and netlink, guests' relays and VMs,
//!   cgroups, uid ranges, processes tracked from spawn.
//! - [`control`]: the control plane — the CLI protocol and its server, the host manager
//!   (each Violin's record on this host), persistence, neighbours and metrics.
//! - [`daemon`] starts and joins those threads.
//!
//! The rest is shared by the daemon and the CLI: the spec ([`spec`]), the counters
//! workers publish ([`stats`]), the host config
//! ([`config`]), the cluster's state in etcd ([`store`]), the XDP classifier's loader ([`xdp`]), the simulated cluster
//! ([`cluster`]), the CLI itself ([`cli`], [`lifecycle`], [`profile`], [`probe`],
//! [`monitor`]).
//!
//! The daemon's parts need the `daemon` feature (on by default), which brings aya and
//! xsk-rs; the CLI, the control protocol and the counters build without it.

pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
#[cfg(feature = "daemon")]
pub mod daemon;
#[cfg(feature = "daemon")]
pub mod datapath;
pub mod host;
pub mod lifecycle;
pub mod monitor;
pub mod probe;
pub mod profile;
pub mod spec;
pub mod stats;
pub mod store;
#[cfg(feature = "daemon")]
pub mod xdp;
