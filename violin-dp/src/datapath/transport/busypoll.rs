//! Preferred busy polling of the data path's sockets (AF_XDP, and the underlay's UDP
//! sockets): every one is opened with `SO_PREFER_BUSY_POLL`, `SO_BUSY_POLL` and
//! `SO_BUSY_POLL_BUDGET`, and a worker that spins between rounds
//! ([`crate::datapath::worker::Spin`]) runs the receiving NAPI instance of each of its
//! sockets itself, once per spin (a non-blocking, zero-length peek), instead of waiting
//! for the softirq and the wake-up that follows it.
//!
//! A socket learns its NAPI instance from the first frame it receives
//! (`SO_INCOMING_NAPI_ID`); a device that has none for it (generic XDP, a veth without
//! GRO: the simulated hosts' underlay) leaves it 0, and such a socket is not polled.
//! Sockets of one NAPI instance (a queue's Violins) are polled once. [`BusyPoll`] keeps the
//! list, looked up again at most every [`REFRESH_NS`] (time passed in).

use std::os::fd::RawFd;

/// How long a blocking call on the socket may busy-poll, µs (`SO_BUSY_POLL`; the
/// workers never block on these sockets: what counts is that it is not 0).
pub const SOCKET_BUSY_POLL_US: libc::c_int = 50;
/// Frames one busy poll may take from the NAPI instance (`SO_BUSY_POLL_BUDGET`): a
/// worker's batch.
pub const BUDGET: libc::c_int = 64;
/// How often a spinning worker looks its sockets' NAPI ids up again.
pub const REFRESH_NS: u64 = 100_000_000;

/// Turns preferred busy polling on for `fd` (the three options need `CAP_NET_ADMIN`,
/// which the daemon has). A kernel without them (before 5.11) says `ENOPROTOOPT`.
pub fn prefer_busy_poll(fd: RawFd) -> std::io::Result<()> {
    let set = |opt, v| super::udp::setsockopt_int(fd, libc::SOL_SOCKET, opt, v);
    set(libc::SO_PREFER_BUSY_POLL, 1)?;
    set(libc::SO_BUSY_POLL, SOCKET_BUSY_POLL_US)?;
    set(libc::SO_BUSY_POLL_BUDGET, BUDGET)
}

/// [`prefer_busy_poll`] for a new socket of the data path; a kernel that refuses it
/// is named once, and the socket works without.
pub fn enable(fd: RawFd) {
    static SAID: std::sync::Once = std::sync::Once::new();
    if let Err(e) = prefer_busy_poll(fd) {
        SAID.call_once(|| {
            tracing::warn!(
                "sockets without preferred busy polling (SO_PREFER_BUSY_POLL, Linux 5.11): {e}"
            )
        });
    }
}

/// Whether `fd` busy-polls (`SO_BUSY_POLL` is set and `SO_PREFER_BUSY_POLL` on).
pub fn is_on(fd: RawFd) -> bool {
    get(fd, libc::SO_BUSY_POLL).is_some_and(|v| v > 0)
        && get(fd, libc::SO_PREFER_BUSY_POLL).is_some_and(|v| v == 1)
}

fn get(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    super::udp::getsockopt_int(fd, libc::SOL_SOCKET, opt).ok()
}

/// The NAPI instance `fd` receives from (0: none known yet, or none to poll).
pub fn napi_id(fd: RawFd) -> u32 {
    get(fd, libc::SO_INCOMING_NAPI_ID).map_or(0, |v| v as u32)
}

/// One busy poll of `fd`'s NAPI instance: the kernel runs it in this thread (up to
/// [`BUDGET`] frames), and whatever it received is in the sockets' queues after.
/// A zero-length peek: an AF_XDP socket only polls on it, a UDP socket polls while its
/// queue is empty and leaves its datagrams where they are.
pub fn poll_once(fd: RawFd) {
    // SAFETY: a zero-length receive into no buffer and no address; MSG_DONTWAIT never
    // blocks and MSG_PEEK takes nothing off a queue.
    unsafe {
        libc::recvfrom(
            fd,
            std::ptr::null_mut(),
            0,
            libc::MSG_DONTWAIT | libc::MSG_PEEK,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
}

/// A worker's sockets to busy-poll: one per NAPI instance.
#[derive(Debug, Default)]
pub struct BusyPoll {
    /// (socket, NAPI id) of the sockets to poll, one per NAPI id.
    targets: Vec<(RawFd, u32)>,
    /// When the list was last looked up (ns), if ever.
    looked: Option<u64>,
    /// The NAPI ids polled, hashed (to tell when they change).
    digest: u64,
}

impl BusyPoll {
    /// The worker's sockets changed: look their NAPI ids up at the next spin.
    pub fn invalidate(&mut self) {
        self.looked = None;
    }

    /// Looks the NAPI ids of `fds` up again if the list is older than [`REFRESH_NS`]
    /// at `now` (or was invalidated); `napi` reads a socket's id. True when the set of
    /// NAPI ids it polls changed.
    pub fn refresh(
        &mut self,
        now: u64,
        fds: impl Iterator<Item = RawFd>,
        mut napi: impl FnMut(RawFd) -> u32,
    ) -> bool {
        if self
            .looked
            .is_some_and(|t| now.saturating_sub(t) < REFRESH_NS)
        {
            return false;
        }
        self.looked = Some(now);
        let before = self.digest;
        self.targets.clear();
        self.digest = 0;
        for fd in fds {
            let id = napi(fd);
            if id != 0 && !self.targets.iter().any(|&(_, n)| n == id) {
                self.targets.push((fd, id));
                self.digest = self.digest.wrapping_mul(0x100_0000_01b3) ^ u64::from(id);
            }
        }
        self.digest != before
    }

    /// Busy-polls each NAPI instance once through `poll`.
    pub fn poll(&self, mut poll: impl FnMut(RawFd)) {
        for &(fd, _) in &self.targets {
            poll(fd);
        }
    }

    /// The NAPI ids it polls.
    pub fn napi_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.targets.iter().map(|&(_, n)| n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_each_napi_instance_once_and_skips_sockets_without_one() {
        let mut b = BusyPoll::default();
        // Sockets 3 and 4 share NAPI 9 (one queue), 5 has none, 6 is on NAPI 11.
        let ids = |fd| match fd {
            3 | 4 => 9,
            6 => 11,
            _ => 0,
        };
        assert!(b.refresh(1_000, [3, 4, 5, 6].into_iter(), ids));
        let mut polled = Vec::new();
        b.poll(|fd| polled.push(fd));
        assert_eq!(polled, [3, 6]);
        assert_eq!(b.napi_ids().collect::<Vec<_>>(), [9, 11]);
    }

    #[test]
    fn looks_ids_up_again_only_when_stale_or_invalidated() {
        let mut b = BusyPoll::default();
        let mut lookups = 0;
        b.refresh(0, [3].into_iter(), |_| {
            lookups += 1;
            0
        });
        // A socket learns its NAPI id from its first frame: 0 until then.
        b.refresh(REFRESH_NS - 1, [3].into_iter(), |_| {
            lookups += 1;
            7
        });
        assert_eq!(lookups, 1, "fresh list looked up again");
        assert_eq!(b.napi_ids().count(), 0);
        assert!(b.refresh(REFRESH_NS, [3].into_iter(), |_| 7));
        assert_eq!(b.napi_ids().collect::<Vec<_>>(), [7]);
        b.invalidate();
        assert!(
            !b.refresh(REFRESH_NS + 1, [3].into_iter(), |_| 7),
            "same ids"
        );
        b.invalidate();
        b.refresh(REFRESH_NS + 1, [3, 8].into_iter(), |fd| {
            if fd == 8 {
                12
            } else {
                0
            }
        });
        assert_eq!(b.napi_ids().collect::<Vec<_>>(), [12]);
    }

    #[test]
    fn an_af_xdp_family_socket_takes_the_options() {
        // Any socket takes SOL_SOCKET options; a UDP socket stands in for an AF_XDP one
        // (which needs a bound UMEM), and shows the daemon's privilege suffices.
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsRawFd;
        let fd = s.as_raw_fd();
        assert!(!is_on(fd));
        match prefer_busy_poll(fd) {
            Ok(()) => assert!(is_on(fd)),
            // Raising the budget or the time above the sysctl needs CAP_NET_ADMIN.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                eprintln!("SKIPPED: busy-poll options need CAP_NET_ADMIN");
                assert!(std::env::var_os("CI").is_none(), "CI runs as root");
            }
            Err(e) => panic!("{e}"),
        }
        assert_eq!(napi_id(fd), 0, "loopback has no NAPI instance to poll");
        poll_once(fd); // no frame, no blocking
    }
}
