//! The kernel-bypass data plane's control side: loading and attaching the XDP
//! classifier and programming its maps ([`classifier`]). The per-packet AF_XDP work is
//! in [`crate::datapath::transport::afxdp`].

pub mod classifier;
