//! Named network namespaces, compatible with `ip netns` (bind mounts under /run/netns).
//!
//! A namespace is created on a short-lived thread that unshares its own network
//! namespace and bind-mounts it: the calling thread and process never move. Work inside
//! a namespace runs on a scoped thread that `setns`es into it ([`run_in`]).

use anyhow::{bail, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

pub const NETNS_DIR: &str = "/run/netns";

pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Makes /run/netns a shared mount point, as iproute2 does, so namespaces created here
/// are visible to processes in other mount namespaces (e.g. under `ip netns exec`).
fn prepare_dir() -> Result<()> {
    fs::create_dir_all(NETNS_DIR).with_context(|| format!("creating {NETNS_DIR}"))?;
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    if mount(None::<&str>, NETNS_DIR, None::<&str>, shared, None::<&str>).is_err() {
        // Not yet a mount point: bind it onto itself first.
        mount(
            Some(NETNS_DIR),
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .with_context(|| format!("bind-mounting {NETNS_DIR} (are you root?)"))?;
        mount(None::<&str>, NETNS_DIR, None::<&str>, shared, None::<&str>)
            .with_context(|| format!("making {NETNS_DIR} shared"))?;
    }
    Ok(())
}

/// Creates the named namespace; an existing one of that name is an error.
pub fn create(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name.len() > 64 {
        bail!("bad network namespace name {name:?}");
    }
    prepare_dir()?;
    let p = path(name);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)
        .with_context(|| {
            format!(
                "creating {} (does the namespace exist already?)",
                p.display()
            )
        })?;
    let target = p.clone();
    let result = std::thread::spawn(move || -> Result<()> {
        unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET) (are you root?)")?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .context("bind-mounting the new namespace")?;
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?;
    if let Err(e) = result {
        let _ = fs::remove_file(&p);
        return Err(e.context(format!("creating network namespace {name}")));
    }
    Ok(())
}

/// Deletes the named namespace; a missing one is not an error. Processes still inside
/// keep it alive until they exit.
pub fn delete(name: &str) -> Result<()> {
    let p = path(name);
    if !p.exists() {
        return Ok(());
    }
    let _ = umount2(&p, MntFlags::MNT_DETACH);
    fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
    Ok(())
}

pub fn open(name: &str) -> Result<File> {
    File::open(path(name)).with_context(|| format!("network namespace {name} not found"))
}

/// Moves the calling thread into the named namespace.
pub fn enter(name: &str) -> Result<()> {
    let f = open(name)?;
    setns(&f, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {name}"))
}

/// Runs `f` on a thread inside the named namespace and returns its result.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let fd = open(name)?;
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(&fd, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering network namespace {name}"))?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in namespace {name} panicked"))?
    })
}

/// Names of the namespaces under /run/netns that start with `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    let Ok(rd) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

/// The pids of all processes but this one.
pub fn other_pids() -> impl Iterator<Item = i32> {
    let me = std::process::id() as i32;
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(move |pid| *pid != me)
}

/// Writes a sysctl of the calling thread's network namespace (`net/ipv6/conf/all/...`).
pub fn sysctl(key: &str, value: &str) -> Result<()> {
    let p = Path::new("/proc/sys").join(key.replace('.', "/"));
    fs::write(&p, value).with_context(|| format!("writing {}", p.display()))
}

/// Deletes a namespace on drop (for tests and partial setups).
pub struct NetnsGuard(pub String);

impl NetnsGuard {
    pub fn create(name: &str) -> Result<NetnsGuard> {
        create(name)?;
        Ok(NetnsGuard(name.to_string()))
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = delete(&self.0) {
            eprintln!("warning: deleting network namespace {}: {e:#}", self.0);
        }
    }
}
