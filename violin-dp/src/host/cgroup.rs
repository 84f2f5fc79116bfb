//! Resource limits of lightweight guests: one cgroup per guest, named after its
//! namespace, holding its relay and everything `violin exec` starts in it.
//!
//! cgroup v2 where the unified hierarchy has the `memory` and `cpu` controllers; else
//! the v1 `memory` and `cpu` hierarchies (machines booted in hybrid mode, like these).

use crate::spec::Limits;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";
/// Parent of every guest's cgroup.
const PARENT: &str = "violin";
/// CFS period for CPU quotas, in microseconds.
const PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V2,
    V1,
}

/// Which cgroup layout this machine offers for memory and CPU limits.
pub fn version() -> Option<Version> {
    let has = |p: &str| {
        std::fs::read_to_string(p)
            .map(|c| {
                let c: Vec<&str> = c.split_whitespace().collect();
                c.contains(&"memory") && c.contains(&"cpu")
            })
            .unwrap_or(false)
    };
    if has(&format!("{ROOT}/cgroup.controllers")) {
        Some(Version::V2)
    } else if Path::new(&format!("{ROOT}/memory/cgroup.procs")).exists()
        && Path::new(&format!("{ROOT}/cpu/cgroup.procs")).exists()
    {
        Some(Version::V1)
    } else {
        None
    }
}

/// Creates the parent of the guests' cgroups. Call before dropping capabilities: the
/// hierarchy roots are read-only without CAP_DAC_OVERRIDE; the parent is then ours.
pub fn prepare() -> Result<()> {
    let Some(version) = version() else {
        bail!("no cgroup memory and cpu controllers: guests' cpus/memory cannot be limited");
    };
    let parents: Vec<PathBuf> = match version {
        Version::V2 => vec![Path::new(ROOT).join(PARENT)],
        Version::V1 => ["memory", "cpu"]
            .iter()
            .map(|c| Path::new(ROOT).join(c).join(PARENT))
            .collect(),
    };
    for p in &parents {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    if version == Version::V2 {
        write(Path::new(ROOT), "cgroup.subtree_control", "+memory +cpu")?;
        write(&parents[0], "cgroup.subtree_control", "+memory +cpu")?;
    }
    Ok(())
}

/// One guest's cgroup (one directory on v2, one per controller on v1).
#[derive(Debug)]
pub struct GuestCgroup {
    version: Version,
    dirs: Vec<PathBuf>,
}

fn dirs(version: Version, name: &str) -> Vec<PathBuf> {
    match version {
        Version::V2 => vec![Path::new(ROOT).join(PARENT).join(name)],
        Version::V1 => ["memory", "cpu"]
            .iter()
            .map(|c| Path::new(ROOT).join(c).join(PARENT).join(name))
            .collect(),
    }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<()> {
    let p = dir.join(file);
    std::fs::write(&p, value).with_context(|| format!("writing {value:?} to {}", p.display()))
}

impl GuestCgroup {
    /// Creates (or takes over) the cgroup `name` with these limits.
    pub fn create(name: &str, limits: &Limits) -> Result<GuestCgroup> {
        let Some(version) = version() else {
            bail!("this machine has no cgroup memory and cpu controllers to limit guests with");
        };
        let cg = GuestCgroup {
            version,
            dirs: dirs(version, name),
        };
        for d in &cg.dirs {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let quota = limits.millicpus.map(|m| u64::from(m) * PERIOD_US / 1000);
        match version {
            Version::V2 => {
                let d = &cg.dirs[0];
                let mem = limits.memory.map_or("max".into(), |m| m.to_string());
                write(d, "memory.max", &mem)?;
                if limits.memory.is_some() {
                    let _ = write(d, "memory.swap.max", "0");
                }
                let cpu = quota.map_or(format!("max {PERIOD_US}"), |q| format!("{q} {PERIOD_US}"));
                write(d, "cpu.max", &cpu)?;
            }
            Version::V1 => {
                let (m, c) = (&cg.dirs[0], &cg.dirs[1]);
                let mem = limits.memory.map_or("-1".into(), |m| m.to_string());
                write(m, "memory.limit_in_bytes", &mem)?;
                // With swap accounting, keep swap out of it too.
                if m.join("memory.memsw.limit_in_bytes").exists() {
                    let _ = write(m, "memory.memsw.limit_in_bytes", &mem);
                }
                write(c, "cpu.cfs_period_us", &PERIOD_US.to_string())?;
                let q = quota.map_or("-1".into(), |q| q.to_string());
                write(c, "cpu.cfs_quota_us", &q)?;
            }
        }
        Ok(cg)
    }

    /// The guest's cgroup if it exists (for `violin exec`).
    pub fn open(name: &str) -> Option<GuestCgroup> {
        let version = version()?;
        let dirs = dirs(version, name);
        dirs.iter()
            .all(|d| d.exists())
            .then_some(GuestCgroup { version, dirs })
    }

    /// Moves a process (and its future children) into the guest's cgroup.
    pub fn add(&self, pid: u32) -> Result<()> {
        for d in &self.dirs {
            write(d, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// How many processes the OOM killer has killed inside this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let (file, key) = match self.version {
            Version::V2 => ("memory.events", "oom_kill"),
            Version::V1 => ("memory.oom_control", "oom_kill"),
        };
        std::fs::read_to_string(self.dirs[0].join(file))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// The memory limit in bytes, as the kernel holds it (`None`: unlimited).
    pub fn memory_limit(&self) -> Option<u64> {
        let file = match self.version {
            Version::V2 => "memory.max",
            Version::V1 => "memory.limit_in_bytes",
        };
        let t = std::fs::read_to_string(self.dirs[0].join(file)).ok()?;
        t.trim().parse().ok().filter(|b| *b < (1 << 60))
    }

    /// The CPU quota as (quota, period) in microseconds (`None`: unlimited).
    pub fn cpu_quota(&self) -> Option<(u64, u64)> {
        match self.version {
            Version::V2 => {
                let t = std::fs::read_to_string(self.dirs[0].join("cpu.max")).ok()?;
                let mut it = t.split_whitespace();
                let q = it.next()?.parse().ok()?;
                Some((q, it.next()?.parse().ok()?))
            }
            Version::V1 => {
                let r = |f: &str| -> Option<i64> {
                    std::fs::read_to_string(self.dirs[1].join(f))
                        .ok()?
                        .trim()
                        .parse()
                        .ok()
                };
                let q = r("cpu.cfs_quota_us").filter(|q| *q > 0)?;
                Some((q as u64, r("cpu.cfs_period_us")? as u64))
            }
        }
    }

    /// How many CFS periods the guest was throttled in (it hit its CPU quota).
    pub fn cpu_throttled(&self) -> u64 {
        let d = self.dirs.last().expect("at least one directory");
        std::fs::read_to_string(d.join("cpu.stat"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("nr_throttled")?.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|t| t.lines().filter_map(|l| l.parse().ok()).collect::<Vec<_>>())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Kills whatever still runs in the cgroup and removes it.
    pub fn remove(self) {
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        for d in &self.dirs {
            if let Err(e) = std::fs::remove_dir(d) {
                tracing::warn!("removing cgroup {}: {e}", d.display());
            }
        }
    }
}
