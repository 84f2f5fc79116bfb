//! The kernel-bypass data plane's control side: loading and attaching the XDP
//! classifier and programming its maps ([`classifier`]). The per-packet AF_XDP work is
//! in [`crate::datapath::transport::afxdp`]. The classifier's drop reports for
//! `violin monitor` are read in [`events`]. The underlay socket group's steering by
//! Violin (an `sk_reuseport` program, on both planes) is loaded in [`steer`].

pub mod classifier;
pub mod events;
pub mod steer;
