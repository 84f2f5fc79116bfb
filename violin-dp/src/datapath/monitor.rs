//! Drop events for `violin monitor`. Off until a client subscribes to a Violin: a
//! dropped frame then costs one test of an empty list. A subscribed Violin's dropped
//! frames are described in a fixed-size [`DropEvent`] (addresses read from the frame's
//! headers) and offered to the subscriber's bounded channel, at most `rate` a second
//! (a token bucket, time passed in). What the bucket or a full channel refuses is
//! counted in the next event's `missed`. No allocation, no lock, no logging. A
//! subscriber whose client went away is dropped at its next event, or when the control
//! thread says so.

use super::fastpath::police::TokenBucket;
use std::net::Ipv4Addr;
use std::sync::mpsc::{SyncSender, TrySendError};
use violin_common::wire::{ArpPacket, EtherType, EthernetFrame, Ipv4Packet};
use violin_common::Verdict;

/// Where a dropped frame came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// A local guest's port (its id among all the host's ports).
    Port(u32),
    /// The underlay: this outer source address.
    Tunnel(Ipv4Addr),
}

/// One dropped frame, as `violin monitor` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropEvent {
    /// The worker's clock (`CLOCK_MONOTONIC`, ns).
    pub at_ns: u64,
    pub vni: u32,
    pub reason: Verdict,
    pub from: From,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// IPv4 source and destination (ARP: sender and target protocol addresses).
    pub src_ip: Option<Ipv4Addr>,
    pub dst_ip: Option<Ipv4Addr>,
    /// The frame's length (a super-frame's whole length; a tunnelled frame's without
    /// the outer headers).
    pub len: u32,
    /// Drops of this Violin not described since the previous event (rate limit or a
    /// full channel).
    pub missed: u32,
}

impl DropEvent {
    /// Describes `frame` (the addresses it has: a runt has none).
    pub fn describe(at_ns: u64, vni: u32, reason: Verdict, from: From, frame: &[u8]) -> Self {
        let mut e = DropEvent {
            at_ns,
            vni,
            reason,
            from,
            src_mac: [0; 6],
            dst_mac: [0; 6],
            src_ip: None,
            dst_ip: None,
            len: frame.len() as u32,
            missed: 0,
        };
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return e;
        };
        e.src_mac = eth.src_addr().0;
        e.dst_mac = eth.dst_addr().0;
        let payload = eth.payload();
        match eth.ethertype() {
            // The addresses only: a frame's head (the classifier reports 64 bytes) is
            // enough, whatever its IPv4 total length says.
            EtherType::IPV4 if payload.len() >= 20 => {
                let ip = Ipv4Packet::new_unchecked(payload);
                e.src_ip = Some(ip.src_addr());
                e.dst_ip = Some(ip.dst_addr());
            }
            EtherType::ARP => {
                if let Ok(arp) = ArpPacket::new_checked(payload) {
                    e.src_ip = Some(arp.source_protocol_addr());
                    e.dst_ip = Some(arp.target_protocol_addr());
                }
            }
            _ => {}
        }
        e
    }
}

/// Subscribers at once per worker (a full list refuses more).
pub const MAX_SUBSCRIBERS: usize = 16;

/// One `violin monitor` client of one Violin.
pub struct Subscriber {
    id: u64,
    vni: u32,
    tx: SyncSender<DropEvent>,
    bucket: TokenBucket,
    missed: u32,
}

/// A worker's subscribers.
pub struct Monitor {
    subs: Vec<Subscriber>,
    /// The worker's place among the host's `workers`: its port `p` is the host's
    /// `p * workers + worker`.
    worker: u32,
    workers: u32,
}

impl Default for Monitor {
    fn default() -> Self {
        Monitor::of_worker(0, 1)
    }
}

impl Monitor {
    /// The monitor of worker `worker` of `workers`, which number their ports apart.
    pub fn of_worker(worker: usize, workers: usize) -> Monitor {
        Monitor {
            subs: Vec::with_capacity(MAX_SUBSCRIBERS),
            worker: worker as u32,
            workers: workers.max(1) as u32,
        }
    }

    /// True when any Violin is monitored.
    #[inline]
    pub fn is_on(&self) -> bool {
        !self.subs.is_empty()
    }

    /// Subscribes `tx` to Violin `vni`'s drops, at most `rate` events a second (bursts
    /// of up to `rate`). False when the list is full.
    pub fn subscribe(
        &mut self,
        id: u64,
        vni: u32,
        rate: u32,
        tx: SyncSender<DropEvent>,
        now: u64,
    ) -> bool {
        if self.subs.len() >= MAX_SUBSCRIBERS {
            return false;
        }
        let rate = u64::from(rate.max(1));
        let Some(bucket) = TokenBucket::new(rate, rate, now) else {
            return false;
        };
        self.subs.push(Subscriber {
            id,
            vni,
            tx,
            bucket,
            missed: 0,
        });
        true
    }

    /// Offers a drop of Violin `vni` to its subscribers; the event is built only if one
    /// of them takes it.
    /// `from` names a port by the worker's own number.
    pub fn offer(&mut self, vni: u32, reason: Verdict, from: From, frame: &[u8], now: u64) {
        let from = match from {
            From::Port(p) => From::Port(p * self.workers + self.worker),
            t => t,
        };
        self.offer_with(vni, now, || {
            DropEvent::describe(now, vni, reason, from, frame)
        })
    }

    /// The same, with the event built by `make` (at most once per subscriber taking it).
    pub fn offer_with(&mut self, vni: u32, now: u64, make: impl Fn() -> DropEvent) {
        let mut i = 0;
        while i < self.subs.len() {
            let s = &mut self.subs[i];
            if s.vni != vni {
                i += 1;
                continue;
            }
            if !s.bucket.take(1, now) {
                s.missed = s.missed.saturating_add(1);
                i += 1;
                continue;
            }
            let mut e = make();
            e.missed = s.missed;
            match s.tx.try_send(e) {
                Ok(()) => {
                    s.missed = 0;
                    i += 1;
                }
                Err(TrySendError::Full(_)) => {
                    s.missed = s.missed.saturating_add(1);
                    i += 1;
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.subs.swap_remove(i);
                }
            }
        }
    }

    /// Ends subscription `id` (its client went away); false if it had already ended.
    pub fn unsubscribe(&mut self, id: u64) -> bool {
        let before = self.subs.len();
        self.subs.retain(|s| s.id != id);
        self.subs.len() != before
    }

    /// Hands over every subscriber of Violin `vni` (it moves to another worker).
    pub fn take(&mut self, vni: u32) -> Vec<Subscriber> {
        let (theirs, ours) = std::mem::take(&mut self.subs)
            .into_iter()
            .partition(|s| s.vni == vni);
        self.subs = ours;
        theirs
    }

    /// Takes over subscribers another worker handed over ([`Monitor::take`]); those
    /// beyond the list's room end (their clients see the stream close).
    pub fn adopt(&mut self, subs: Vec<Subscriber>) {
        let room = MAX_SUBSCRIBERS.saturating_sub(self.subs.len());
        self.subs.extend(subs.into_iter().take(room));
    }

    /// Forgets every subscriber of Violin `vni` (it was removed).
    pub fn forget(&mut self, vni: u32) {
        self.subs.retain(|s| s.vni != vni);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::sync_channel;
    use violin_common::wire::{EthernetAddress, EthernetRepr, IpProtocol, Ipv4Repr};

    const S: u64 = 1_000_000_000;

    fn udp_frame() -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 8];
        EthernetRepr {
            src_addr: EthernetAddress([2, 0, 0, 0, 0, 1]),
            dst_addr: EthernetAddress([2, 0, 0, 0, 0, 2]),
            ethertype: EtherType::IPV4,
        }
        .emit(&mut EthernetFrame::new_unchecked(&mut f[..]));
        Ipv4Repr {
            src_addr: Ipv4Addr::new(10, 0, 0, 1),
            dst_addr: Ipv4Addr::new(10, 0, 0, 2),
            protocol: IpProtocol::UDP,
            payload_len: 8,
            hop_limit: 64,
        }
        .emit(&mut Ipv4Packet::new_unchecked(&mut f[14..]));
        f
    }

    #[test]
    fn an_event_names_the_frames_addresses() {
        let e = DropEvent::describe(5, 7, Verdict::NoLink, From::Port(3), &udp_frame());
        assert_eq!(e.src_mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(e.dst_mac, [2, 0, 0, 0, 0, 2]);
        assert_eq!(e.src_ip, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(e.dst_ip, Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!((e.len, e.vni, e.reason), (42, 7, Verdict::NoLink));
        let runt = DropEvent::describe(5, 7, Verdict::Truncated, From::Port(3), &[1, 2, 3]);
        assert_eq!((runt.src_ip, runt.len, runt.src_mac), (None, 3, [0; 6]));
    }

    #[test]
    fn a_port_is_named_by_its_number_among_the_hosts_ports() {
        let (tx, rx) = sync_channel(10);
        // Worker 1 of 3: its port 2 is the host's port 7.
        let mut m = Monitor::of_worker(1, 3);
        assert!(m.subscribe(1, 7, 10, tx, 0));
        m.offer(7, Verdict::NoLink, From::Port(2), &udp_frame(), 0);
        let src = Ipv4Addr::new(192, 0, 2, 1);
        m.offer(7, Verdict::NoLink, From::Tunnel(src), &udp_frame(), 0);
        assert_eq!(rx.try_recv().unwrap().from, From::Port(7));
        assert_eq!(rx.try_recv().unwrap().from, From::Tunnel(src));
    }

    #[test]
    fn events_are_rate_limited_and_what_is_missed_is_counted() {
        let (tx, rx) = sync_channel(100);
        let mut m = Monitor::default();
        assert!(!m.is_on());
        assert!(m.subscribe(1, 7, 10, tx, 0));
        let f = udp_frame();
        // 25 drops at once: the burst of 10 is described, 15 are missed.
        for _ in 0..25 {
            m.offer(7, Verdict::NoLink, From::Port(1), &f, 0);
        }
        // Another Violin's drops are not this subscriber's business.
        m.offer(8, Verdict::NoLink, From::Port(1), &f, 0);
        let got: Vec<DropEvent> = rx.try_iter().collect();
        assert_eq!(got.len(), 10);
        assert!(got.iter().all(|e| e.missed == 0 && e.vni == 7));
        // 0.1 s later one token is back: the next event carries the 15.
        m.offer(7, Verdict::NoLink, From::Port(1), &f, S / 10);
        let next: Vec<DropEvent> = rx.try_iter().collect();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].missed, 15);
    }

    #[test]
    fn a_full_channel_counts_missed_and_a_gone_client_is_dropped() {
        let (tx, rx) = sync_channel(2);
        let mut m = Monitor::default();
        m.subscribe(1, 7, 1000, tx, 0);
        let f = udp_frame();
        for _ in 0..5 {
            m.offer(
                7,
                Verdict::QueueFull,
                From::Tunnel(Ipv4Addr::LOCALHOST),
                &f,
                0,
            );
        }
        assert_eq!(rx.try_iter().count(), 2);
        m.offer(
            7,
            Verdict::QueueFull,
            From::Tunnel(Ipv4Addr::LOCALHOST),
            &f,
            0,
        );
        assert_eq!(rx.try_recv().unwrap().missed, 3);
        drop(rx);
        m.offer(
            7,
            Verdict::QueueFull,
            From::Tunnel(Ipv4Addr::LOCALHOST),
            &f,
            0,
        );
        assert!(!m.is_on(), "the subscriber of a closed channel stays");
    }

    #[test]
    fn the_list_of_subscribers_is_bounded() {
        let mut m = Monitor::default();
        let mut keep = Vec::new();
        for i in 0..MAX_SUBSCRIBERS {
            let (tx, rx) = sync_channel(1);
            keep.push(rx);
            assert!(m.subscribe(i as u64, i as u32, 1, tx, 0));
        }
        assert!(!m.subscribe(99, 99, 1, sync_channel(1).0, 0));
        m.unsubscribe(3);
        assert!(m.subscribe(99, 99, 1, sync_channel(1).0, 0));
        m.forget(99);
        m.forget(4);
        assert_eq!(m.subs.len(), MAX_SUBSCRIBERS - 2);
    }
}
