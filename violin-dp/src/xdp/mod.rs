//! The kernel-bypass data plane's control side: loading and attaching the XDP
//! classifier and programming its maps ([`classifier`]). The per-packet AF_XDP work is
//! in [`crate::datapath::transport::afxdp`]. The classifier's drop reports for
//! `violin monitor` are read in [`events`].

pub mod classifier;
pub mod events;
