//! Reachability probing from inside a guest: ICMP echoes at a fixed interval from a
//! raw socket in the guest's namespace, to measure how long a migration cut a guest off.

use anyhow::{Context, Result};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockProtocol, SockType};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use violin_common::wire::checksum;

/// What a probe saw: replies by arrival time.
#[derive(Debug, Clone)]
pub struct Outage {
    /// Longest time between two consecutive replies (the outage, to within one interval).
    pub gap: Duration,
    pub sent: u64,
    pub received: u64,
    /// Whether replies came back after the longest gap.
    pub resumed: bool,
}

impl fmt::Display for Outage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.0} ms without replies ({} of {} probes lost){}",
            self.gap.as_secs_f64() * 1e3,
            self.sent - self.received.min(self.sent),
            self.sent,
            if self.resumed {
                ""
            } else {
                "; replies did NOT resume"
            }
        )
    }
}

#[derive(Default)]
struct Seen {
    sent: u64,
    replies: Vec<Instant>,
}

/// Pings `target` every `interval` from a thread inside a network namespace.
pub struct Prober {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Prober {
    pub fn start(netns: &str, target: Ipv4Addr, interval: Duration) -> Result<Prober> {
        let ns = crate::host::netns::open(netns)?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (s2, seen2) = (stop.clone(), seen.clone());
        let name = netns.to_string();
        let thread = std::thread::spawn(move || -> Result<()> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering {name}"))?;
            let sock = socket(
                AddressFamily::Inet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::Icmp,
            )
            .context("opening a raw ICMP socket")?;
            run(&sock, target, interval, &s2, &seen2)
        });
        Ok(Prober {
            stop,
            seen,
            thread: Some(thread),
        })
    }

    /// Waits up to `timeout` for a first reply (the path works before the change).
    pub fn wait_first_reply(&self, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if !self.seen.lock().unwrap().replies.is_empty() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// Waits (up to `max_wait`) for replies to resume, keeps probing for `settle`, stops
    /// and reports the longest gap.
    pub fn finish(mut self, settle: Duration, max_wait: Duration) -> Outage {
        let t0 = Instant::now();
        while t0.elapsed() < max_wait {
            if self
                .seen
                .lock()
                .unwrap()
                .replies
                .last()
                .is_some_and(|r| *r > t0)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(settle);
        self.stop.store(true, Ordering::SeqCst);
        let end = Instant::now();
        if let Some(t) = self.thread.take() {
            if let Ok(Err(e)) = t.join() {
                eprintln!("warning: probe: {e:#}");
            }
        }
        let s = self.seen.lock().unwrap();
        let mut gap = Duration::ZERO;
        let mut last = None::<Instant>;
        for r in &s.replies {
            if let Some(l) = last {
                gap = gap.max(*r - l);
            }
            last = Some(*r);
        }
        // Silence at the end counts too: the guest may never have come back.
        let tail = last.map_or(end - t0, |l| end.saturating_duration_since(l));
        let resumed = tail < settle.max(Duration::from_millis(50));
        Outage {
            gap: gap.max(if resumed { Duration::ZERO } else { tail }),
            sent: s.sent,
            received: s.replies.len() as u64,
            resumed,
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    sock: &OwnedFd,
    target: Ipv4Addr,
    interval: Duration,
    stop: &AtomicBool,
    seen: &Mutex<Seen>,
) -> Result<()> {
    let id = (std::process::id() & 0xffff) as u16;
    let dst = nix::sys::socket::SockaddrIn::from(SocketAddrV4::new(target, 0));
    let mut next = Instant::now();
    let mut seq: u16 = 0;
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= next {
            seq = seq.wrapping_add(1);
            let req = echo_request(id, seq);
            // A send error (no route yet) is a lost probe, not a failure.
            let _ = nix::sys::socket::sendto(
                sock.as_raw_fd(),
                &req,
                &dst,
                nix::sys::socket::MsgFlags::empty(),
            );
            seen.lock().unwrap().sent += 1;
            next += interval;
            continue;
        }
        let wait = (next - now).as_millis().clamp(1, 100) as u16;
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(sock),
            nix::poll::PollFlags::POLLIN,
        )];
        if nix::poll::poll(&mut fds, wait).unwrap_or(0) == 0 {
            continue;
        }
        let Ok(n) = nix::sys::socket::recv(
            sock.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) else {
            continue;
        };
        if is_reply(&buf[..n], target, id) {
            seen.lock().unwrap().replies.push(Instant::now());
        }
    }
    Ok(())
}

/// An ICMP echo request with an 8-byte payload.
fn echo_request(id: u16, seq: u16) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0] = 8; // echo request
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(b"violin\0\0");
    let c = !checksum::sum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

/// An IPv4 packet carrying an echo reply from `from` with our identifier.
fn is_reply(pkt: &[u8], from: Ipv4Addr, id: u16) -> bool {
    let Some(&vihl) = pkt.first() else {
        return false;
    };
    let ihl = usize::from(vihl & 0x0f) * 4;
    pkt.len() >= ihl + 8
        && pkt[12..16] == from.octets()
        && pkt[ihl] == 0
        && pkt[ihl + 4..ihl + 6] == id.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_request_checksums_to_zero() {
        let p = echo_request(0x1234, 7);
        assert_eq!(checksum::sum(&p), 0xffff);
        assert_eq!(&p[4..8], &[0x12, 0x34, 0, 7]);
    }

    #[test]
    fn reply_matching() {
        let mut pkt = [0u8; 28];
        pkt[0] = 0x45;
        pkt[12..16].copy_from_slice(&[10, 0, 0, 2]);
        pkt[24..26].copy_from_slice(&0x1234u16.to_be_bytes());
        assert!(is_reply(&pkt, Ipv4Addr::new(10, 0, 0, 2), 0x1234));
        assert!(!is_reply(&pkt, Ipv4Addr::new(10, 0, 0, 3), 0x1234));
        assert!(!is_reply(&pkt, Ipv4Addr::new(10, 0, 0, 2), 0x1235));
        pkt[20] = 8; // a request, not a reply
        assert!(!is_reply(&pkt, Ipv4Addr::new(10, 0, 0, 2), 0x1234));
        assert!(!is_reply(&pkt[..27], Ipv4Addr::new(10, 0, 0, 2), 0x1234));
    }
}
