//! A lightweight guest's tap, driven by the daemon itself (`port = "tap"`): no relay
//! process and no socket hop, and super-frames both ways.
//!
//! The tap has `IFF_VNET_HDR` and the offloads a virtio NIC offers (`TUNSETOFFLOAD`:
//! checksum, TSO4/6, USO4/6 where the kernel has them), so the guest's TCP hands over
//! frames of up to 64 KiB with a virtio-net header, and takes them back: frames switched
//! to this port are coalesced (TCP/IPv4, [`Coalescer`]) until the end of the batch and
//! written as one super-frame. A frame whose checksum the guest left partial is
//! completed on reading, unless it stays a super-frame. Opening the tap in the guest's
//! namespace is control work ([`crate::host::guest::open_tap_port`]); this is the part
//! the packet worker drives.

use super::guest::{PortCounters, RxEvent};
use super::Budget;
use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use violin_common::wire::gso::{complete_checksum, Coalescer, Gso, Push};
use violin_common::wire::virtio::{self, VirtioNetRepr};
use violin_common::Verdict;

const VNET: usize = virtio::HEADER_LEN;
/// The largest frame a tap hands over: Ethernet header and a 64 KiB IP packet.
pub const MAX_SUPER: usize = 14 + 65535;

pub struct TapPort {
    file: File,
    netns: String,
    pub counters: PortCounters,
    coalescer: Coalescer,
    /// The super-frame being coalesced, after room for its virtio header.
    pending: Box<[u8]>,
}

impl TapPort {
    /// Wraps a tap opened with `IFF_VNET_HDR` (non-blocking) in namespace `netns`.
    pub fn new(file: File, netns: &str) -> TapPort {
        TapPort {
            file,
            netns: netns.to_string(),
            counters: PortCounters {
                connects: 1,
                ..Default::default()
            },
            coalescer: Coalescer::default(),
            pending: vec![0u8; VNET + MAX_SUPER].into_boxed_slice(),
        }
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Reads within `budget` into `buf` (at least `VNET + MAX_SUPER` bytes) and
    /// hands each frame on: plain frames with their checksum complete, super-frames whole.
    /// True when the budget ran out.
    pub fn receive(
        &mut self,
        buf: &mut [u8],
        budget: &mut Budget,
        mut f: impl FnMut(RxEvent<'_>),
    ) -> io::Result<bool> {
        while budget.left() {
            let n = match (&self.file).read(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            budget.spend(n.saturating_sub(VNET));
            let (hdr, frame) = buf[..n].split_at_mut(VNET.min(n));
            let ev = match VirtioNetRepr::parse(hdr) {
                Err(e) => RxEvent::Drop(e.into()),
                Ok(v) => match Gso::from_virtio(&v, frame) {
                    Err(e) => RxEvent::Drop(e.into()),
                    Ok(Some(g)) => RxEvent::Super(frame, g),
                    Ok(None) => {
                        let start = usize::from(v.csum_start);
                        let done = !v.needs_csum()
                            || complete_checksum(frame, start, usize::from(v.csum_offset)).is_ok();
                        if done {
                            RxEvent::Frame(frame)
                        } else {
                            RxEvent::Drop(Verdict::Truncated)
                        }
                    }
                },
            };
            if let RxEvent::Frame(fr) | RxEvent::Super(fr, _) = &ev {
                self.counters.rx_frames += 1;
                self.counters.rx_bytes += fr.len() as u64;
            }
            f(ev);
        }
        Ok(true)
    }

    /// Takes a plain frame for the guest: it joins the pending super-frame, or is
    /// written now.
    pub fn send(&mut self, frame: &[u8]) -> Result<(), Verdict> {
        loop {
            match self.coalescer.push(&mut self.pending[VNET..], frame) {
                Push::Added => return Ok(()),
                Push::Flush => self.flush_pending()?,
                Push::Alone => {
                    self.flush_pending()?;
                    return self.write(&VirtioNetRepr::PLAIN, frame);
                }
            }
        }
    }

    /// Takes a super-frame for the guest, written as it is (after what is pending).
    pub fn send_super(&mut self, g: &Gso, frame: &[u8]) -> Result<(), Verdict> {
        self.flush_pending()?;
        self.write(&g.to_virtio(), frame)
    }

    /// Writes the pending super-frame (the end of a batch).
    pub fn flush(&mut self) -> Result<(), Verdict> {
        self.flush_pending()
    }

    fn flush_pending(&mut self) -> Result<(), Verdict> {
        let Some((v, n)) = self.coalescer.finish(&mut self.pending[VNET..]) else {
            return Ok(());
        };
        v.emit(&mut self.pending[..VNET]);
        let (hdr, frame) = self.pending[..VNET + n].split_at(VNET);
        write_counted(&self.file, &mut self.counters, hdr, frame)
    }

    fn write(&mut self, v: &VirtioNetRepr, frame: &[u8]) -> Result<(), Verdict> {
        let mut hdr = [0u8; VNET];
        v.emit(&mut hdr);
        write_counted(&self.file, &mut self.counters, &hdr, frame)
    }
}

/// Writes a virtio header and its frame; a tap takes them whole or not at all. Counts
/// what was written.
fn write_counted(
    file: &File,
    c: &mut PortCounters,
    hdr: &[u8],
    frame: &[u8],
) -> Result<(), Verdict> {
    match (&*file).write_vectored(&[IoSlice::new(hdr), IoSlice::new(frame)]) {
        Ok(n) if n == hdr.len() + frame.len() => {
            c.tx_frames += 1;
            c.tx_bytes += frame.len() as u64;
            Ok(())
        }
        _ => Err(Verdict::QueueFull),
    }
}
