//! The guest supervisor: every process this host runs for a guest (a lightweight
//! guest's relay, a VM's QEMU), started with a pidfile ([`crate::host::procs`]),
//! restarted with back-off when it exits, taken over after a daemon restart, stopped
//! with its guest. Owned by the control thread; a packet worker never waits on it.

use crate::host::procs;
use anyhow::{Context, Result};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// A guest's process, supervised.
pub struct GuestProc {
    pub violin: String,
    pub guest: String,
    /// Run as this user and group (QEMU: unprivileged).
    pub uid: Option<(u32, u32)>,
    /// The process is on its guest's packet path (a relay): it starts on the control
    /// CPUs for its setup, then takes every CPU and the packet workers' priority
    /// itself. Otherwise (a VM) it boots on the control CPUs until [`GuestProc::release`].
    pub packet_path: bool,
    /// Since when a started VM has been held on the control CPUs (it boots there).
    held: Option<Instant>,
    pub cmd: Vec<String>,
    /// Arguments added while the VM waits for a live migration (`-incoming …`); a
    /// restart after the migration finished starts the VM normally.
    pub incoming: Option<[String; 2]>,
    pub log: PathBuf,
    /// Where the running process's pid and start time are recorded.
    pub pidfile: PathBuf,
    child: Option<Child>,
    /// A process a previous daemon started that this one took over (not our child).
    adopted: Option<i32>,
    restart_at: Option<Instant>,
    restarts: u32,
}

impl GuestProc {
    pub fn new(
        violin: &str,
        guest: &str,
        cmd: Vec<String>,
        log: PathBuf,
        pidfile: PathBuf,
    ) -> Self {
        GuestProc {
            violin: violin.into(),
            guest: guest.into(),
            uid: None,
            packet_path: false,
            held: None,
            cmd,
            incoming: None,
            log,
            pidfile,
            child: None,
            adopted: None,
            restart_at: None,
            restarts: 0,
        }
    }

    /// Takes over the process recorded in the pidfile, if it still runs: a previous
    /// daemon started it, whatever its command line was. Returns its pid.
    pub fn adopt_recorded(&mut self) -> Option<i32> {
        let pid = procs::live(&self.pidfile)?;
        self.adopted = Some(pid);
        Some(pid)
    }

    /// Kills a process a previous daemon left in the pidfile (it holds the guest's tap
    /// or sockets).
    pub fn kill_recorded(&self) {
        procs::kill_recorded(&self.pidfile);
    }

    pub fn pid(&self) -> Option<i32> {
        self.adopted.or(self.child.as_ref().map(|c| c.id() as i32))
    }

    pub fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = Command::new(&self.cmd[0]);
        if let Some((uid, gid)) = self.uid {
            cmd.uid(uid).gid(gid);
            // The user's sockets (a VM's dgram end) must be writable by the daemon, which
            // has no CAP_DAC_OVERRIDE; their directory (0770) keeps everyone else out.
            // SAFETY: umask(2) is async-signal-safe and touches no memory.
            unsafe {
                cmd.pre_exec(|| {
                    libc::umask(0);
                    Ok(())
                });
            }
        }
        let child = cmd
            .args(&self.cmd[1..])
            .args(self.incoming.iter().flatten())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting guest {}/{}", self.violin, self.guest))?;
        if let Err(e) = procs::record(&self.pidfile, child.id() as i32) {
            warn!(violin = %self.violin, guest = %self.guest, "recording the guest's pid in {}: {e}", self.pidfile.display());
        }
        self.child = Some(child);
        self.restart_at = None;
        self.held = (!self.packet_path).then(Instant::now);
        Ok(())
    }

    /// Since when the process has been held on the control CPUs while it boots.
    pub fn held_since(&self) -> Option<Instant> {
        self.held
    }

    /// Gives a booted VM every CPU.
    pub fn release(&mut self) {
        if let (Some(pid), Some(_)) = (self.pid(), self.held.take()) {
            crate::host::cpus::release(pid);
        }
    }

    /// Restarts the process if it exited (with back-off).
    fn supervise(&mut self, now: Instant) {
        if let Some(pid) = self.adopted {
            if !procs::alive(pid) {
                warn!(violin = %self.violin, guest = %self.guest, pid, "taken-over guest process exited; restarting");
                self.adopted = None;
                self.restart_at = Some(now);
            }
        }
        if let Some(c) = &mut self.child {
            if let Ok(Some(status)) = c.try_wait() {
                warn!(violin = %self.violin, guest = %self.guest, %status, "guest process exited; restarting");
                self.child = None;
                self.restart_at =
                    Some(now + Duration::from_millis(200 * u64::from(self.restarts.min(10) + 1)));
            }
        }
        if self.child.is_none()
            && self.adopted.is_none()
            && self.restart_at.is_some_and(|t| now >= t)
        {
            self.restarts += 1;
            if let Err(e) = self.spawn() {
                error!(violin = %self.violin, guest = %self.guest, "restarting guest: {e:#}");
                self.restart_at = Some(now + Duration::from_secs(2));
            }
        }
    }

    /// SIGTERM, then SIGKILL after 2 s; waits at most 3 s in all. The process ends on
    /// the control CPUs.
    pub fn stop(&mut self) {
        if let Some(pid) = self.pid() {
            crate::host::cpus::to_control(pid);
        }
        if let Some(pid) = self.adopted.take() {
            procs::terminate(pid);
        }
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            if !exits_within(&mut c, Duration::from_secs(2)) {
                if let Err(e) = c.kill() {
                    warn!(violin = %self.violin, guest = %self.guest, "killing the guest's process: {e}");
                }
                if !exits_within(&mut c, Duration::from_secs(1)) {
                    error!(violin = %self.violin, guest = %self.guest, pid = c.id(), "the guest's process survived SIGKILL; leaving it");
                }
            }
        }
        let _ = std::fs::remove_file(&self.pidfile);
    }
}

/// Waits up to `limit` for our child to exit (reaping it); true if it did.
fn exits_within(c: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Every supervised process of this host.
#[derive(Default)]
pub struct Supervisor {
    procs: Vec<GuestProc>,
}

impl Supervisor {
    pub fn add(&mut self, p: GuestProc) {
        info!(violin = %p.violin, guest = %p.guest, pid = ?p.pid(), "supervising");
        self.procs.push(p);
    }

    pub fn get(&self, violin: &str, guest: &str) -> Option<&GuestProc> {
        self.procs
            .iter()
            .find(|g| g.violin == violin && g.guest == guest)
    }

    pub fn get_mut(&mut self, violin: &str, guest: &str) -> Option<&mut GuestProc> {
        self.procs
            .iter_mut()
            .find(|g| g.violin == violin && g.guest == guest)
    }

    pub fn take(&mut self, violin: &str, guest: &str) -> Option<GuestProc> {
        let i = self
            .procs
            .iter()
            .position(|g| g.violin == violin && g.guest == guest)?;
        Some(self.procs.swap_remove(i))
    }

    pub fn tick(&mut self, now: Instant) {
        for g in &mut self.procs {
            g.supervise(now);
        }
    }
}
