//! The keeper: runs a host's daemon and starts a new one when it dies, as systemd's
//! `Restart=on-failure` does on a real host. A crash (killed by a signal, or a non-zero
//! exit) is followed by a new daemon after a back-off; a daemon that stops on purpose
//! (exit 0 after SIGTERM or SIGINT) ends the keeper too. SIGTERM and SIGINT sent to the
//! keeper are passed on to the daemon. The new daemon restores the host's Violins from
//! its saved state, as after any restart.

use anyhow::{Context, Result};
use std::ffi::OsString;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, info};

/// Delays before restarting a daemon that keeps dying: doubling from `FIRST` up to
/// `MOST`, back to `FIRST` once a daemon has run for `STEADY`. Time is passed in.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_secs(1);
    pub const MOST: Duration = Duration::from_secs(30);
    pub const STEADY: Duration = Duration::from_secs(60);

    pub fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    /// How long to wait before the next start, given how long the daemon that just died
    /// had run.
    pub fn after(&mut self, ran: Duration) -> Duration {
        if ran >= Self::STEADY {
            self.next = Self::FIRST;
        }
        let d = self.next;
        self.next = (self.next * 2).min(Self::MOST);
        d
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `program args…` (the daemon) and keeps it running; records each daemon's pid
/// in `pidfile` (read it with [`crate::host::procs::live`]). Returns when the daemon stops on purpose or the keeper is told to stop.
pub fn run(pidfile: &Path, program: &Path, args: &[OsString]) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let child_pid = Arc::new(AtomicI32::new(0));
    {
        let (stop, child_pid) = (stop.clone(), child_pid.clone());
        ctrlc::set_handler(move || {
            stop.store(true, Ordering::SeqCst);
            let pid = child_pid.load(Ordering::SeqCst);
            if pid > 0 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        })
        .context("handling SIGTERM")?;
    }
    let mut backoff = Backoff::new();
    loop {
        let started = Instant::now();
        let mut child = Command::new(program)
            .args(args)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        child_pid.store(child.id() as i32, Ordering::SeqCst);
        crate::host::procs::record(pidfile, child.id() as i32)
            .with_context(|| format!("writing {}", pidfile.display()))?;
        // A stop that came between the spawn and the store above.
        if stop.load(Ordering::SeqCst) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let status = child.wait().context("waiting for the daemon")?;
        child_pid.store(0, Ordering::SeqCst);
        if stop.load(Ordering::SeqCst) || status.success() {
            info!(%status, "daemon stopped; the keeper ends");
            let _ = std::fs::remove_file(pidfile);
            return Ok(());
        }
        let wait = backoff.after(started.elapsed());
        error!(
            %status,
            "daemon died after {:.1} s; starting a new one in {} s",
            started.elapsed().as_secs_f64(),
            wait.as_secs()
        );
        let t0 = Instant::now();
        while t0.elapsed() < wait {
            if stop.load(Ordering::SeqCst) {
                let _ = std::fs::remove_file(pidfile);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_ceiling_and_resets_after_a_steady_run() {
        let mut b = Backoff::new();
        let quick = Duration::from_millis(200);
        let got: Vec<u64> = (0..7).map(|_| b.after(quick).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(b.after(Backoff::STEADY), Backoff::FIRST);
        assert_eq!(b.after(quick), Duration::from_secs(2));
    }
}
