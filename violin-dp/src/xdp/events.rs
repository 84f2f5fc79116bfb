//! The XDP classifier's drop reports (`DROP_EVENTS`, a BPF ring buffer): a thread that
//! waits on the ring and offers each report to the monitors of its Violin, as a packet
//! worker does with the drops it sees. The program reports only Violins a monitor
//! watches ([`Classifier::watch`](crate::xdp::classifier::Classifier::watch)).

use crate::control::manager::lock;
use crate::datapath::monitor::{DropEvent, From, Monitor};
use crate::datapath::timer::monotonic_ns;
use aya::maps::{MapData, RingBuf};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use violin_common::maps::XdpDropEvent;
use violin_common::Verdict;

/// The monitors of drops the classifier reports.
pub type XdpMonitor = Arc<Mutex<Monitor>>;

/// Decodes one report (`None`: not one of ours).
pub fn decode(bytes: &[u8], now: u64) -> Option<DropEvent> {
    if bytes.len() < std::mem::size_of::<XdpDropEvent>() {
        return None;
    }
    // SAFETY: the length was checked; `XdpDropEvent` is plain integers (any bit
    // pattern is valid) and `read_unaligned` needs no alignment.
    let r: XdpDropEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let head = &r.head[..(r.head_len as usize).min(r.head.len())];
    let mut e = DropEvent::describe(
        now,
        r.vni,
        Verdict::from_u32(r.reason)?,
        From::Tunnel(Ipv4Addr::from(r.src.to_ne_bytes())),
        head,
    );
    e.len = r.len;
    Some(e)
}

/// Reads the ring until the process ends.
pub fn run(mut ring: RingBuf<MapData>, monitor: XdpMonitor) {
    let fd = ring.as_raw_fd();
    loop {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut p, 1, 1000) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::warn!("XDP drop reports: poll failed: {e}");
                return;
            }
        }
        while let Some(item) = ring.next() {
            let now = monotonic_ns();
            if let Some(e) = decode(&item, now) {
                lock(&monitor).offer_with(e.vni, now, || e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_decodes_to_the_inner_frames_addresses_and_the_outer_length() {
        let mut head = [0u8; 64];
        head[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        head[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        head[12..14].copy_from_slice(&[0x08, 0x00]);
        // IPv4 header, 10.0.0.1 → 10.0.0.2 (the checksum is not looked at).
        head[14] = 0x45;
        head[16..18].copy_from_slice(&84u16.to_be_bytes());
        head[26..30].copy_from_slice(&[10, 0, 0, 1]);
        head[30..34].copy_from_slice(&[10, 0, 0, 2]);
        let r = XdpDropEvent {
            vni: 9,
            reason: Verdict::NotMember as u32,
            src: u32::from_ne_bytes([172, 31, 0, 9]),
            len: 148,
            head_len: 34,
            _pad: 0,
            head,
        };
        // SAFETY: a plain struct viewed as its bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&r as *const XdpDropEvent).cast::<u8>(),
                std::mem::size_of::<XdpDropEvent>(),
            )
        };
        let e = decode(bytes, 7).unwrap();
        assert_eq!(
            (e.vni, e.reason, e.len, e.at_ns),
            (9, Verdict::NotMember, 148, 7)
        );
        assert_eq!(e.from, From::Tunnel(Ipv4Addr::new(172, 31, 0, 9)));
        assert_eq!(e.src_mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(e.src_ip, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(e.dst_ip, Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert!(decode(&bytes[..10], 7).is_none());
    }
}
