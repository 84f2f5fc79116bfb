//! Processes tracked from spawn: when the daemon starts a guest's process (a relay, a
//! QEMU), it writes a pidfile with the pid and the process's start time (field 22 of
//! `/proc/PID/stat`, clock ticks since boot). A later daemon — after a crash or a
//! `--hard` restart — finds the process again through that file, whatever its command
//! line, and never mistakes another process that reused the pid for it.

use std::io;
use std::path::Path;
use std::time::Duration;

/// A process's start time in clock ticks since boot, while it runs (not a zombie).
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

/// The start time from a `/proc/PID/stat` line, or `None` for a zombie. Fields after
/// the parenthesised command name (which may hold spaces and parentheses) start at
/// field 3 (state); start time is field 22.
fn parse_stat(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(22 - 4)?.parse().ok()
}

/// True while `pid` runs (a zombie has released its tap and sockets: not running).
pub fn alive(pid: i32) -> bool {
    start_time(pid).is_some()
}

/// Ends a process that is not our child (one taken over after a restart): SIGTERM,
/// then SIGKILL after 2 s, waiting at most 3 s in all.
pub fn terminate(pid: i32) {
    use nix::sys::signal::{kill, Signal};
    let p = nix::unistd::Pid::from_raw(pid);
    let _ = kill(p, Signal::SIGTERM);
    for i in 0..300 {
        if !alive(pid) {
            return;
        }
        if i == 200 {
            let _ = kill(p, Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Records `pid` (which must be running) in `path`, atomically.
pub fn record(path: &Path, pid: i32) -> io::Result<()> {
    let start =
        start_time(pid).ok_or_else(|| io::Error::other(format!("process {pid} is not running")))?;
    let tmp = path.with_extension("pid.tmp");
    std::fs::write(&tmp, format!("{pid} {start}\n"))?;
    std::fs::rename(&tmp, path)
}

/// The pid recorded in `path`, if that very process still runs.
pub fn live(path: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(path).ok()?;
    let (pid, start) = parse_record(&text)?;
    (start_time(pid) == Some(start)).then_some(pid)
}

fn parse_record(text: &str) -> Option<(i32, u64)> {
    let mut it = text.split_whitespace();
    let pid = it.next()?.parse().ok()?;
    let start = it.next()?.parse().ok()?;
    Some((pid, start))
}

/// Ends the process recorded in `path` (if it still runs) with SIGKILL, waits up to
/// 1 s until it is gone, and removes the file.
pub fn kill_recorded(path: &Path) {
    if let Some(pid) = live(path) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        for _ in 0..100 {
            if !alive(pid) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = std::fs::remove_file(path);
}

/// Kills (SIGKILL) every process whose effective uid is in `uids` — a guest's range,
/// which nothing but that guest's processes uses — and waits up to 1 s until they are
/// gone. Returns how many there were. One pass over `/proc` (a `stat` per process).
pub fn kill_uids(uids: std::ops::Range<u32>) -> usize {
    use std::os::unix::fs::MetadataExt;
    let pids: Vec<i32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let uid = e.metadata().ok()?.uid();
            uids.contains(&uid).then_some(pid)
        })
        .collect();
    for &pid in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for _ in 0..100 {
        if !pids.iter().any(|&p| alive(p)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    pids.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines() {
        // A command name with spaces and a parenthesis; start time 4242.
        let mut f: Vec<String> = (3..=52).map(|i| i.to_string()).collect();
        f[0] = "S".into();
        f[22 - 3] = "4242".into();
        let line = format!("77 (a (b) c) {}", f.join(" "));
        assert_eq!(parse_stat(&line), Some(4242));
        f[0] = "Z".into();
        assert_eq!(parse_stat(&format!("77 (x) {}", f.join(" "))), None);
        assert_eq!(parse_stat("77 (x) S 1 2"), None);
        assert_eq!(parse_record("12 345\n"), Some((12, 345)));
        assert_eq!(parse_record("12"), None);
    }

    #[test]
    fn a_recorded_process_is_found_and_a_reused_pid_is_not() {
        let dir = std::env::temp_dir().join(format!("violin-procs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("p.pid");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        record(&file, pid).unwrap();
        assert_eq!(live(&file), Some(pid));
        // The same pid with another start time is another process.
        let start = start_time(pid).unwrap();
        std::fs::write(&file, format!("{pid} {}\n", start + 1)).unwrap();
        assert_eq!(live(&file), None);
        record(&file, pid).unwrap();
        kill_recorded(&file);
        let _ = child.wait();
        assert!(!file.exists());
        assert_eq!(live(&file), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
