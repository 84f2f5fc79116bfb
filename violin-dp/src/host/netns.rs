//! Named network namespaces, compatible with `ip netns` (bind mounts under /run/netns).
//!
//! A namespace is created on a short-lived thread that unshares its own network
//! namespace and bind-mounts it: the calling thread and process never move. Work inside
//! a namespace runs on a scoped thread that `setns`es into it ([`run_in`]).
//!
//! A guest's namespace is owned by a user namespace of its own ([`create_guest`]): root
//! inside maps to an unprivileged uid range outside, distinct per guest, so what runs in
//! a guest ([`enter_guest`]) administers its own network and is nobody on the host.

use anyhow::{bail, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use std::fs::{self, File};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
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
    let p = new_mount_point(name)?;
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

/// Checks the name and creates the empty file a namespace is bind-mounted on.
fn new_mount_point(name: &str) -> Result<PathBuf> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') || name.len() > 64 {
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
    Ok(p)
}

/// Creates a guest's network namespace, owned by a new user namespace that maps uids and
/// gids 0–65535 inside to a range outside that no other guest uses ([`crate::host::uids`]).
/// Returns the first outer uid. Needs root (CAP_SYS_ADMIN, CAP_SETUID, CAP_SETGID).
pub fn create_guest(name: &str) -> Result<u32> {
    crate::host::uids::locked(|| {
        let p = new_mount_point(name)?;
        let made = crate::host::uids::allocate(name, &p).and_then(|first| {
            unshare_owned(&p, first)?;
            Ok(first)
        });
        if made.is_err() {
            let _ = fs::remove_file(&p);
            crate::host::uids::release(name);
        }
        made.with_context(|| format!("creating guest namespace {name}"))
    })
}

/// The first outer uid of a guest namespace's range, if it has one.
pub fn guest_uid(name: &str) -> Option<u32> {
    crate::host::uids::lookup(name)
}

/// Forks a child that unshares a user and a network namespace (the user namespace comes
/// first and owns the other), maps its ids to `base..base+65536` from here, bind-mounts
/// its network namespace on `target` and lets it exit. The bind mount keeps the network
/// namespace alive, and the network namespace its user namespace.
fn unshare_owned(target: &Path, base: u32) -> Result<()> {
    use nix::unistd::{fork, pipe2, ForkResult};
    let (ready_r, ready_w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (go_r, go_w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: the child of a possibly multithreaded parent only makes async-signal-safe
    // system calls (unshare, write, read, _exit) on descriptors it already holds, and
    // never returns into Rust code or runs destructors.
    match unsafe { fork() }.context("fork")? {
        // SAFETY: raw system calls on descriptors this process holds, on buffers that
        // live on this stack; _exit ends the child without unwinding.
        ForkResult::Child => unsafe {
            // Our copy of the write end would keep the read below from seeing EOF.
            libc::close(go_w.as_raw_fd());
            let flags = libc::CLONE_NEWUSER | libc::CLONE_NEWNET;
            let errno: i32 = if libc::unshare(flags) == 0 {
                0
            } else {
                *libc::__errno_location()
            };
            let b = errno.to_ne_bytes();
            libc::write(ready_w.as_raw_fd(), b.as_ptr().cast(), b.len());
            // Wait until the parent has mapped the ids and bind-mounted the namespace
            // (it closes its end: read returns 0).
            let mut x = [0u8; 1];
            libc::read(go_r.as_raw_fd(), x.as_mut_ptr().cast(), 1);
            libc::_exit(0)
        },
        ForkResult::Parent { child } => {
            drop((ready_w, go_r));
            let reaper = Reaper(Some(go_w), child);
            let mut b = [0u8; 4];
            nix::unistd::read(&ready_r, &mut b).context("waiting for the namespace child")?;
            let errno = i32::from_ne_bytes(b);
            if errno != 0 {
                return Err(std::io::Error::from_raw_os_error(errno))
                    .context("unshare(CLONE_NEWUSER | CLONE_NEWNET)");
            }
            let map = format!("0 {base} {}\n", crate::host::uids::RANGE);
            for f in ["uid_map", "gid_map"] {
                fs::write(format!("/proc/{child}/{f}"), &map)
                    .with_context(|| format!("writing /proc/{child}/{f} (needs CAP_SETUID)"))?;
            }
            mount(
                Some(format!("/proc/{child}/ns/net").as_str()),
                target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .context("bind-mounting the new namespace")?;
            drop(reaper);
            Ok(())
        }
    }
}

/// Lets the namespace child exit (closes its pipe) and reaps it.
struct Reaper(Option<OwnedFd>, nix::unistd::Pid);

impl Drop for Reaper {
    fn drop(&mut self) {
        drop(self.0.take());
        let _ = nix::sys::wait::waitpid(self.1, None);
    }
}

/// `ioctl(NS_GET_USERNS)`: the user namespace owning a namespace (linux/nsfs.h).
const NS_GET_USERNS: libc::c_ulong = 0xb701;

/// Moves the calling process into a guest: into the user namespace owning its network
/// namespace (when that is not ours) as root there, then into the network namespace.
/// Afterwards the process is root in the guest and the guest's unprivileged uid on the
/// host. It also gets a mount namespace whose `/sys` is the guest's ([`own_sysfs`]).
/// The process must be single-threaded (a kernel rule for joining a user namespace).
pub fn enter_guest(name: &str) -> Result<()> {
    let net = open(name)?;
    // SAFETY: NS_GET_USERNS takes no argument and returns a new descriptor or -1.
    let fd = unsafe { libc::ioctl(net.as_raw_fd(), NS_GET_USERNS as _) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("finding the user namespace of {name}"));
    }
    // SAFETY: the ioctl returned a fresh descriptor that nothing else owns.
    let user = unsafe { OwnedFd::from_raw_fd(fd) };
    let ours = fs::metadata("/proc/self/ns/user")?.ino();
    let owned = File::from(user.try_clone()?).metadata()?.ino() != ours;
    if owned {
        setns(user.as_fd(), CloneFlags::CLONE_NEWUSER)
            .with_context(|| format!("entering the user namespace of {name}"))?;
    }
    setns(&net, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {name}"))?;
    if owned {
        use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
        setgroups(&[]).context("dropping supplementary groups")?;
        setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
            .context("becoming the guest's root group")?;
        setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
            .context("becoming the guest's root")?;
        // A working directory the guest cannot enter would only confuse its commands.
        if nix::unistd::access(".", nix::unistd::AccessFlags::X_OK).is_err() {
            nix::unistd::chdir("/")?;
        }
    }
    own_sysfs(name)
}

/// Gives the calling process a mount namespace of its own with a sysfs of the network
/// namespace it is in, as `ip netns exec` does: `/sys/class/net` then lists the guest's
/// interfaces, not the host's. Nothing mounted here propagates back to the host. Inside a
/// guest's user namespace the host's `/sys` is locked under the new one (it cannot be
/// unmounted there), so the new sysfs goes on top of it.
fn own_sysfs(name: &str) -> Result<()> {
    unshare(CloneFlags::CLONE_NEWNS).with_context(|| format!("a mount namespace for {name}"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .context("making / a slave mount")?;
    let _ = umount2("/sys", MntFlags::MNT_DETACH);
    mount(
        Some("sysfs"),
        "/sys",
        Some("sysfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .with_context(|| format!("mounting the sysfs of {name} on /sys"))
}

/// Deletes the named namespace; a missing one is not an error. A guest namespace's
/// uid range is freed only once no process runs as one of its uids: whatever still
/// does (a process started in the guest and left behind) is killed first, so a guest
/// created later with the same range cannot signal it.
pub fn delete(name: &str) -> Result<()> {
    let p = path(name);
    if !p.exists() {
        return Ok(());
    }
    let _ = umount2(&p, MntFlags::MNT_DETACH);
    // The name goes last: once it is free, a guest of that name may be created (by
    // another simulated host of this machine) with a uid range of its own.
    if let Some(first) = guest_uid(name) {
        let left = crate::host::procs::kill_uids(first..first + crate::host::uids::RANGE);
        if left > 0 {
            tracing::info!(
                guest = name,
                processes = left,
                "ended what the guest left running"
            );
        }
    }
    crate::host::uids::release(name);
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

/// The pids of the processes (but this one) in the named network namespace; none if
/// it does not exist.
pub fn pids_in(name: &str) -> Vec<i32> {
    let Ok(target) = fs::metadata(path(name)) else {
        return Vec::new();
    };
    other_pids()
        .filter(|pid| {
            fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.ino() == target.ino() && m.dev() == target.dev())
        })
        .collect()
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
