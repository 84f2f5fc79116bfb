//! The control plane of one host: the protocol the CLI speaks ([`protocol`]), the
//! control socket's server ([`server`]: many clients at once, each with a deadline and
//! a size bound), the host manager that owns every Violin's record on this host and
//! turns requests into worker commands and host changes ([`manager`]), persistence
//! for restarts ([`persist`]), the neighbour watcher ([`neighbours`]) and the metrics
//! server ([`metrics`]), and the host's side of the cluster state in etcd ([`agent`]),
//! and which worker each Violin lives on once it has traffic ([`balance`]). None of it
//! runs on a packet worker's thread.

#[cfg(feature = "daemon")]
pub mod agent;
#[cfg(feature = "daemon")]
pub mod balance;
#[cfg(feature = "daemon")]
pub mod manager;
#[cfg(feature = "daemon")]
pub mod metrics;
#[cfg(feature = "daemon")]
pub mod neighbours;
#[cfg(feature = "daemon")]
pub mod persist;
pub mod protocol;
#[cfg(feature = "daemon")]
pub mod server;

pub use protocol::*;
