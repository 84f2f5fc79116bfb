//! The packet worker's clock and its one timer: a `timerfd` on `CLOCK_MONOTONIC`, armed
//! for the earliest moment something is due (a capped link's next release, a held-back
//! guest's refill), and polled with the worker's sockets — no busy loop, no thread.
//!
//! Times are nanoseconds of `CLOCK_MONOTONIC`, the clock the fast path is given as
//! `now` and the timer is armed on.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Now on `CLOCK_MONOTONIC`, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes one timespec into `ts`, which lives for the call;
    // CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A non-blocking timerfd, armed at absolute times.
pub struct Timer {
    fd: OwnedFd,
    armed: Option<u64>,
}

impl Timer {
    pub fn new() -> io::Result<Timer> {
        // SAFETY: timerfd_create(2) takes two integers and returns a new fd or -1.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Timer { fd, armed: None })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Fires once at `at` (ns of `CLOCK_MONOTONIC`), or never with `None`. Re-arms only
    /// when the deadline changes.
    pub fn set(&mut self, at: Option<u64>) -> io::Result<()> {
        if at == self.armed {
            return Ok(());
        }
        // An all-zero it_value disarms; a deadline already past fires at once (1 ns).
        let ns = at.map_or(0, |t| t.max(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: timerfd_settime(2) reads `spec`, which lives for the call; the old value
        // is not asked for (null).
        let r = unsafe {
            libc::timerfd_settime(
                self.fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed = at;
        Ok(())
    }

    /// Consumes an expiry (after the fd polled readable); the timer is then unarmed.
    pub fn expired(&mut self) {
        let mut n = [0u8; 8];
        // SAFETY: read(2) writes at most 8 bytes into `n`; the fd is non-blocking.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), n.as_mut_ptr().cast(), n.len()) };
        self.armed = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_at_the_deadline_and_not_before() {
        let mut t = Timer::new().unwrap();
        let start = monotonic_ns();
        t.set(Some(start + 20_000_000)).unwrap();
        let mut pfd = libc::pollfd {
            fd: t.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd that lives for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 1000) };
        let waited = monotonic_ns() - start;
        assert_eq!(n, 1);
        assert!(waited >= 20_000_000, "fired after {waited} ns");
        t.expired();
        // Disarmed: nothing more.
        t.set(None).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 30) }, 0);
    }
}
