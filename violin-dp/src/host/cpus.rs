//! Where the daemon's work runs. Control work is kept to the host's control CPUs
//! ([`crate::config::HostConfig::control_cpus`]), and so is the control part of what
//! it starts for guests: a relay's setup (it takes every CPU itself once its guest is
//! up), a VM's boot (it gets every CPU once its NIC has spoken), a process's exit.
//! Packet workers, started before the pinning, keep every CPU the daemon was given.

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use std::sync::OnceLock;

/// Every CPU the daemon was started with.
static ALL: OnceLock<CpuSet> = OnceLock::new();
/// The control CPUs, when control work is pinned.
static CONTROL: OnceLock<CpuSet> = OnceLock::new();

/// Keeps the calling thread (and the threads and processes it starts later) to
/// `cpus`, after noting every CPU it had; `[]` changes nothing.
pub fn pin_control(cpus: &[usize]) -> anyhow::Result<()> {
    let all = sched_getaffinity(Pid::from_raw(0))?;
    let _ = ALL.set(all);
    if cpus.is_empty() {
        return Ok(());
    }
    let mut set = CpuSet::new();
    for &c in cpus {
        anyhow::ensure!(
            all.is_set(c).unwrap_or(false),
            "control_cpus: CPU {c} is not one this daemon may use"
        );
        set.set(c)?;
    }
    sched_setaffinity(Pid::from_raw(0), &set)?;
    let _ = CONTROL.set(set);
    Ok(())
}

/// Sets every thread of process `pid` to `set`.
fn set_process(pid: i32, set: &CpuSet) {
    let _ = sched_setaffinity(Pid::from_raw(pid), set);
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) {
                let _ = sched_setaffinity(Pid::from_raw(tid), set);
            }
        }
    }
}

/// Gives every thread of process `pid` every CPU the daemon was started with (a VM
/// that has booted).
pub fn release(pid: i32) {
    if let Some(set) = ALL.get() {
        set_process(pid, set);
    }
}

/// Moves process `pid` (its main thread) onto the control CPUs: before it is stopped,
/// as its exit — freeing a VM's memory, a relay's mappings — is kernel work too.
pub fn to_control(pid: i32) {
    if let Some(set) = CONTROL.get() {
        set_process(pid, set);
    }
}

/// Gives the calling thread every CPU it may use (those its cgroup allows): for a
/// process the daemon started on the control CPUs, once its setup is done.
pub fn unpin_all() -> nix::Result<()> {
    let mut set = CpuSet::new();
    for c in 0..CpuSet::count() {
        set.set(c)?;
    }
    sched_setaffinity(Pid::from_raw(0), &set)
}
