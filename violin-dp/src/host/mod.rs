//! Host supervision: what a Violin's guests are made of on this host, apart from their
//! packets — network namespaces and netlink, lightweight guests' relays, QEMU VMs,
//! cgroups, host uid ranges, the keeper that restarts a dead daemon, and the supervisor that starts, tracks (by pidfile from
//! spawn, never by command line) and stops their processes.

pub mod cgroup;
pub mod cpus;
#[cfg(feature = "daemon")]
pub mod guest;
pub mod keeper;
pub mod netlink;
pub mod netns;
pub mod procs;
#[cfg(feature = "daemon")]
pub mod supervisor;
pub mod uids;
pub mod vm;
