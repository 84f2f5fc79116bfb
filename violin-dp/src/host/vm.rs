//! QEMU guests: images, the accelerator, the QEMU command line, and the two host-side
//! endpoints of a VM — its serial console and the agent behind `violin exec`.
//!
//! A VM attaches to its host's daemon exactly like any socket guest (`-netdev stream`
//! or `-netdev dgram` on the guest's UNIX socket): no tap, and QEMU runs as an
//! unprivileged user. Its own files (console and agent sockets, logs) live in a
//! directory that user owns.

use crate::spec::{Framing, Limits, VmSpec, QEMU_DEFAULT_MEMORY};
use anyhow::{anyhow, bail, Context, Result};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use violin_common::wire::EthernetAddress;

/// The script that builds guest images (also in `scripts/`).
const BUILD_SCRIPT: &str = include_str!("../../../scripts/build-guest-image.sh");

/// Where guest images are kept (`VIOLIN_IMAGES_DIR`, default /var/cache/violin/images).
pub fn images_dir() -> PathBuf {
    std::env::var_os("VIOLIN_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/violin/images"))
}

/// The default image's directory for a set of extra packages.
pub fn image_dir(packages: &[String]) -> PathBuf {
    if packages.is_empty() {
        return images_dir().join("default");
    }
    let mut p: Vec<&str> = packages.iter().map(String::as_str).collect();
    p.sort_unstable();
    p.dedup();
    // FNV-1a of the sorted list: a stable name per package set.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in p.join(" ").bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    images_dir().join(format!("pkgs-{h:016x}"))
}

/// The kernel and initramfs a VM boots.
pub fn boot_files(vm: &VmSpec) -> (PathBuf, Option<PathBuf>) {
    match &vm.kernel {
        Some(k) => (PathBuf::from(k), vm.initrd.as_ref().map(PathBuf::from)),
        None => {
            let d = image_dir(&vm.packages);
            (d.join("vmlinux"), Some(d.join("initramfs.cpio.gz")))
        }
    }
}

/// Whether `dir` holds a complete image built by this version of the script.
pub fn image_ready(dir: &Path) -> bool {
    let version = BUILD_SCRIPT
        .lines()
        .find_map(|l| l.strip_prefix("IMAGE_VERSION="))
        .unwrap_or("?");
    std::fs::read_to_string(dir.join("manifest"))
        .is_ok_and(|m| m.lines().any(|l| l == format!("version={version}")))
        && dir.join("vmlinux").exists()
}

/// Builds the default image for `packages` unless it exists (a minute the first time:
/// it downloads a Debian kernel); the script's progress goes to stderr.
pub fn ensure_image(packages: &[String]) -> Result<PathBuf> {
    let dir = image_dir(packages);
    if image_ready(&dir) {
        return Ok(dir);
    }
    let mut child = std::process::Command::new("bash")
        .arg("-s")
        .arg("--")
        .arg(&dir)
        .args(packages)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running bash to build the guest image")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(BUILD_SCRIPT.as_bytes())?;
    let st = child.wait()?;
    if !st.success() {
        bail!("building the guest image {} failed ({st})", dir.display());
    }
    Ok(dir)
}

/// Which accelerator VMs use here, and why.
pub fn accelerator() -> (&'static str, String) {
    match std::env::var("VIOLIN_QEMU_ACCEL").as_deref() {
        Ok("kvm") => return ("kvm", "VIOLIN_QEMU_ACCEL=kvm".into()),
        Ok("tcg") => return ("tcg", "VIOLIN_QEMU_ACCEL=tcg".into()),
        _ => {}
    }
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let hw = ["kvm_intel", "kvm_amd"]
        .iter()
        .any(|m| Path::new("/sys/module").join(m).exists());
    if kvm && hw {
        ("kvm", "/dev/kvm with hardware virtualisation".into())
    } else if kvm && Path::new("/sys/module/kvm_pvm").exists() {
        (
            "tcg",
            "/dev/kvm is the PVM variant (kvm_pvm), which stock guests cannot use".into(),
        )
    } else if kvm {
        ("tcg", "/dev/kvm has no kvm_intel/kvm_amd behind it".into())
    } else {
        ("tcg", "no usable /dev/kvm".into())
    }
}

/// The host's TSC frequency in kHz: microvm has no HPET or PM timer to calibrate
/// against, and without it a share of boots hang under load. `VIOLIN_TSC_KHZ` sets it
/// where /proc/cpuinfo's "cpu MHz" is not the TSC's rate (frequency scaling).
fn tsc_khz() -> Option<u64> {
    if let Some(k) = std::env::var("VIOLIN_TSC_KHZ")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        return Some(k);
    }
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info.lines().find_map(|l| {
        l.strip_prefix("cpu MHz")?
            .split(':')
            .nth(1)?
            .trim()
            .parse()
            .ok()
    })?;
    Some((mhz * 1000.0) as u64)
}

/// Everything the QEMU command line is made from.
pub struct VmConfig<'a> {
    pub violin: &'a str,
    pub guest: &'a str,
    pub vm: &'a VmSpec,
    pub limits: &'a Limits,
    pub mac: EthernetAddress,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub mtu: u16,
    pub framing: Framing,
    /// The guest's port socket on the daemon.
    pub socket: &'a Path,
    /// The VM's own directory (console, agent, logs), owned by the QEMU user.
    pub dir: &'a Path,
    pub accel: &'a str,
}

pub fn console_socket(dir: &Path) -> PathBuf {
    dir.join("console.sock")
}
pub fn agent_socket(dir: &Path) -> PathBuf {
    dir.join("agent.sock")
}
pub fn qmp_socket(dir: &Path) -> PathBuf {
    dir.join("qmp.sock")
}
/// Where a VM started for an incoming live migration listens for its state.
pub fn migration_socket(dir: &Path) -> PathBuf {
    dir.join("migrate.sock")
}

/// TCP ports a VM waiting for a live migration from another machine listens on (the
/// first one free on the host's underlay address): open them between hosts.
pub const MIGRATION_PORTS: std::ops::RangeInclusive<u16> = 7700..=7799;

/// Extra arguments of a VM that waits for a live migration: on a UNIX socket beside
/// it, or on `tcp` and the first free port of [`MIGRATION_PORTS`].
pub fn incoming_args(dir: &Path, tcp: Option<std::net::Ipv4Addr>) -> Result<[String; 2]> {
    let uri = match tcp {
        None => format!("unix:{}", migration_socket(dir).display()),
        Some(a) => {
            let port = MIGRATION_PORTS
                .clone()
                .find(|p| std::net::TcpListener::bind((a, *p)).is_ok())
                .ok_or_else(|| {
                    anyhow!(
                        "no free TCP port on {a} in {}-{} for a live migration",
                        MIGRATION_PORTS.start(),
                        MIGRATION_PORTS.end()
                    )
                })?;
            format!("tcp:{a}:{port}")
        }
    };
    Ok(["-incoming".into(), uri])
}

/// Whether something in this network namespace listens on TCP `addr:port` (read from
/// `/proc/net/tcp`: connecting to find out would be taken as the migration stream).
pub fn tcp_listening(addr: Ipv4Addr, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/self/net/tcp") else {
        return false;
    };
    // "0300A8C0:1E14": the address as the kernel's u32 in host order, then the port.
    let want = format!("{:08X}:{port:04X}", u32::from_ne_bytes(addr.octets()));
    let any = format!("00000000:{port:04X}");
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && (f[1] == want || f[1] == any) && f[3] == "0A"
    })
}

/// The address and port of a `tcp:ADDR:PORT` URI.
pub fn tcp_uri(uri: &str) -> Option<(Ipv4Addr, u16)> {
    let (a, p) = uri.strip_prefix("tcp:")?.rsplit_once(':')?;
    Some((a.parse().ok()?, p.parse().ok()?))
}

/// The QEMU command line (program first).
pub fn command(c: &VmConfig<'_>) -> Vec<String> {
    let (kernel, initrd) = boot_files(c.vm);
    let smp = c.limits.millicpus.map_or(1, |m| (m / 1000).max(1));
    let mem_mib = c.limits.memory.unwrap_or(QEMU_DEFAULT_MEMORY) >> 20;
    let mut append = vec![
        "console=ttyS0".to_string(),
        "quiet".into(),
        "panic=-1".into(),
        "rdinit=/init".into(),
        format!("violin.ip={}/{}", c.ip, c.prefix_len),
        format!("violin.mtu={}", c.mtu),
        format!("violin.hostname={}", c.guest),
    ];
    if let Some(k) = tsc_khz() {
        append.push(format!("tsc_early_khz={k}"));
    }
    if c.vm.image.is_some() {
        append.push("violin.disk=/dev/vda".into());
    }
    if let Some(a) = &c.vm.append {
        append.push(a.clone());
    }
    let path = |p: &Path| p.display().to_string();
    let mut a: Vec<String> = vec![
        "qemu-system-x86_64".into(),
        "-name".into(),
        format!("{}/{},process=violin-vm", c.violin, c.guest),
        "-machine".into(),
        "microvm,rtc=on".into(),
        "-accel".into(),
        c.accel.into(),
        "-cpu".into(),
        "max".into(),
        "-smp".into(),
        smp.to_string(),
        "-m".into(),
        mem_mib.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        path(&kernel),
        "-append".into(),
        append.join(" "),
        "-chardev".into(),
        format!(
            "socket,id=con,path={},server=on,wait=off,logfile={},logappend=on",
            path(&console_socket(c.dir)),
            path(&c.dir.join("console.log"))
        ),
        "-serial".into(),
        "chardev:con".into(),
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        format!(
            "socket,id=agent,path={},server=on,wait=off",
            path(&agent_socket(c.dir))
        ),
        "-device".into(),
        "virtserialport,chardev=agent,name=violin.exec".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", path(&qmp_socket(c.dir))),
        "-netdev".into(),
        match c.framing {
            Framing::Stream => format!(
                "stream,id=n0,server=off,addr.type=unix,addr.path={}",
                path(c.socket)
            ),
            Framing::Dgram => format!(
                "dgram,id=n0,local.type=unix,local.path={},remote.type=unix,remote.path={}",
                path(&net_socket(c.dir)),
                path(c.socket)
            ),
        },
        "-device".into(),
        format!("virtio-net-device,netdev=n0,mac={}", c.mac),
    ];
    if let Some(i) = initrd {
        a.extend(["-initrd".into(), path(&i)]);
    }
    if let Some(img) = &c.vm.image {
        a.extend([
            "-drive".into(),
            format!("id=disk0,file={img},if=none,snapshot=on"),
            "-device".into(),
            "virtio-blk-device,drive=disk0".into(),
        ]);
    }
    a
}

/// A `dgram` VM's own end of its network socket (the daemon sends there).
pub fn net_socket(dir: &Path) -> PathBuf {
    dir.join("net.sock")
}

/// Creates the VM's directory, emptied of stale sockets, mode 0770 (group root, so the
/// daemon, which has no CAP_DAC_OVERRIDE, can clean it up once QEMU's uid owns it).
pub fn prepare_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Mode first: once the directory is not ours, changing it needs CAP_FOWNER.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o770))
        .with_context(|| format!("chmod {}", dir.display()))
}

/// Hands the VM's directory (group root) and its port socket to the uid QEMU runs as:
/// the first of the guest's own range ([`crate::host::uids`]), shared with no other guest.
pub fn hand_over(dir: &Path, socket: &Path, uid: u32) -> Result<()> {
    use nix::unistd::{chown, Gid, Uid};
    for (p, gid) in [(dir, 0), (socket, uid)] {
        chown(p, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
            .with_context(|| format!("handing {} to uid {uid}", p.display()))?;
    }
    Ok(())
}

/// The key of a VM's uid range, beside the netns guests' (which are their namespaces):
/// per host, as a VM being live-migrated runs on two at once.
pub fn uid_key(netns_name: &str, host: &str) -> String {
    format!("{netns_name}@{host}.vm")
}

/// Where the daemon records the pid (and start time) of the VM's QEMU when it starts it
/// ([`crate::host::procs`]): a later daemon takes the VM over through this file.
pub fn pid_file(dir: &Path) -> PathBuf {
    dir.join("qemu.pid")
}

/// A QMP (QEMU Machine Protocol) connection: one JSON object per line.
pub struct Qmp {
    reader: std::io::BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> Result<Qmp> {
        let s = UnixStream::connect(path)
            .with_context(|| format!("connecting to QMP at {}", path.display()))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        let mut q = Qmp {
            reader: std::io::BufReader::new(s.try_clone()?),
            writer: s,
        };
        q.read()?; // the greeting
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read(&mut self) -> Result<serde_json::Value> {
        use std::io::BufRead;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("QMP closed the connection");
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs a command; events that arrive meanwhile are skipped.
    pub fn execute(
        &mut self,
        cmd: &str,
        args: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let mut req = serde_json::json!({ "execute": cmd });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        self.writer.write_all(format!("{req}\n").as_bytes())?;
        loop {
            let r = self.read()?;
            if let Some(ret) = r.get("return") {
                return Ok(ret.clone());
            }
            if let Some(e) = r.get("error") {
                bail!("QMP {cmd}: {}", e["desc"].as_str().unwrap_or("error"));
            }
        }
    }
}

/// What QEMU reports of a finished live migration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LiveMigration {
    /// The time the VM was paused (QEMU's own measure), in ms.
    pub downtime_ms: Option<u64>,
    pub total_ms: Option<u64>,
    pub ram_transferred: Option<u64>,
}

/// Live-migrates the VM behind `source_qmp` into the VM waiting at `target` (the URI
/// its `-incoming` listens on), and waits until it completes.
pub fn live_migrate(
    source_qmp: &Path,
    target: &str,
    timeout: std::time::Duration,
) -> Result<LiveMigration> {
    let mut q = Qmp::connect(source_qmp)?;
    q.execute("migrate", Some(serde_json::json!({ "uri": target })))?;
    let t0 = std::time::Instant::now();
    loop {
        let r = q.execute("query-migrate", None)?;
        match r["status"].as_str().unwrap_or("") {
            "completed" => {
                return Ok(LiveMigration {
                    downtime_ms: r["downtime"].as_u64(),
                    total_ms: r["total-time"].as_u64(),
                    ram_transferred: r["ram"]["transferred"].as_u64(),
                })
            }
            s @ ("failed" | "cancelled") => {
                bail!(
                    "live migration {s}: {}",
                    r["error-desc"].as_str().unwrap_or("no reason given")
                )
            }
            _ if t0.elapsed() > timeout => {
                let _ = q.execute("migrate_cancel", None);
                bail!(
                    "live migration did not complete within {} s; cancelled",
                    timeout.as_secs()
                );
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

/// Quotes an argument for `sh -c`.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The line of a VM's console log that says its boot failed, with advice where there is
/// some; None while nothing says so. (A kernel that merely could not unpack part of an
/// initramfs may still boot: only running out of room counts.)
pub fn boot_failure(console_log: &str) -> Option<String> {
    let line = console_log
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .find(|l| {
            l.contains("Kernel panic - not syncing")
                || l.contains("Initramfs unpacking failed: write error")
        })?;
    // Drop the kernel's "[    1.234567] " timestamp.
    let text = match line.split_once("] ") {
        Some((stamp, rest)) if stamp.trim_start().starts_with('[') => rest,
        _ => line,
    };
    Some(if text.contains("write error") {
        format!("{text:?}: the initramfs does not fit in the VM's memory; raise `memory`")
    } else {
        format!("{text:?}")
    })
}

/// How long the agent of a running VM may take to acknowledge a command.
const AGENT_ANSWER: std::time::Duration = std::time::Duration::from_secs(20);

/// Runs `cmd` in the VM through its agent, streaming its output (stdout and stderr,
/// merged) to `out`. Returns the command's exit status.
pub fn exec(agent: &Path, cmd: &[String], out: &mut impl Write) -> Result<i32> {
    exec_within(agent, cmd, out, AGENT_ANSWER)
}

/// [`exec`], waiting at most `answer` for the agent to acknowledge.
fn exec_within(
    agent: &Path,
    cmd: &[String],
    out: &mut impl Write,
    answer: std::time::Duration,
) -> Result<i32> {
    use base64::Engine;
    // One command at a time per VM: the agent serves one port.
    let lock = std::fs::File::create(agent.with_extension("lock"))
        .with_context(|| format!("locking {}", agent.display()))?;
    // Held until this function returns (unlocked on drop).
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow!("locking the agent: {e}"))?;
    let mut s = UnixStream::connect(agent).with_context(|| {
        format!(
            "connecting to the VM's agent at {} (is the VM running?)",
            agent.display()
        )
    })?;
    let line: Vec<String> = cmd.iter().map(|a| shell_quote(a)).collect();
    let nonce = format!(
        "v{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(line.join(" "));
    s.write_all(format!("{nonce} {b64}\n").as_bytes())?;
    // The agent acknowledges at once; a VM whose agent never came up must not leave
    // `violin exec` hanging.
    let ack = format!("{nonce} start\n");
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    s.set_read_timeout(Some(answer))?;
    let at = loop {
        if let Some(at) = find(&pending, ack.as_bytes()) {
            break at;
        }
        let n = match s.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!(
                    "the VM's agent did not answer within {:.1} s: the VM may not have booted \
                     (see {})",
                    answer.as_secs_f64(),
                    agent.with_file_name("console.log").display()
                )
            }
            Err(e) => return Err(e).context("reading from the VM's agent"),
        };
        if n == 0 {
            bail!("the VM's agent closed the connection before starting the command");
        }
        pending.extend_from_slice(&buf[..n]);
    };
    // Whatever came before the acknowledgement belongs to an earlier, abandoned command.
    pending.drain(..at + ack.len());
    s.set_read_timeout(None)?;
    let marker = format!("\n{nonce} exit ");
    loop {
        // What arrived with the acknowledgement may already hold the whole reply.
        if let Some(at) = find(&pending, marker.as_bytes()) {
            let rest = &pending[at + marker.len()..];
            if let Some(nl) = rest.iter().position(|b| *b == b'\n') {
                out.write_all(&pending[..at])?;
                out.flush()?;
                let status = std::str::from_utf8(&rest[..nl])
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
                    .ok_or_else(|| anyhow!("the agent sent a malformed exit status"))?;
                return Ok(status);
            }
        } else {
            // Keep back what could be the start of the marker.
            let keep = marker.len().min(pending.len());
            let flush = pending.len() - keep;
            out.write_all(&pending[..flush])?;
            out.flush()?;
            pending.drain(..flush);
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("the VM's agent closed the connection before the command finished");
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Attaches the terminal to the VM's serial console until Ctrl-] is typed.
pub fn console(sock: &Path) -> Result<()> {
    use nix::sys::termios;
    let s = UnixStream::connect(sock).with_context(|| {
        format!(
            "connecting to the console at {} (is the VM running?)",
            sock.display()
        )
    })?;
    let stdin = std::io::stdin();
    let saved = termios::tcgetattr(&stdin).ok();
    if let Some(t) = &saved {
        let mut raw = t.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &raw)?;
    }
    struct Restore(Option<termios::Termios>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(t) = &self.0 {
                let _ = termios::tcsetattr(std::io::stdin(), termios::SetArg::TCSANOW, t);
            }
        }
    }
    let _restore = Restore(saved);
    eprint!("Connected to {} (Ctrl-] leaves)\r\n", sock.display());
    let mut from_vm = s.try_clone()?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut out = std::io::stdout();
        while let Ok(n) = from_vm.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                break;
            }
        }
    });
    let mut to_vm = s;
    let mut buf = [0u8; 1024];
    let mut input = std::io::stdin();
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if let Some(i) = buf[..n].iter().position(|b| *b == 0x1d) {
            to_vm.write_all(&buf[..i])?;
            break;
        }
        to_vm.write_all(&buf[..n])?;
    }
    eprint!("\r\nLeft the console.\r\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_tcp_port_is_found_without_connecting() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(tcp_listening(Ipv4Addr::LOCALHOST, port));
        drop(l);
        assert!(!tcp_listening(Ipv4Addr::LOCALHOST, port));
        assert_eq!(
            tcp_uri("tcp:172.31.0.3:7700"),
            Some((Ipv4Addr::new(172, 31, 0, 3), 7700))
        );
        assert_eq!(tcp_uri("unix:/x"), None);
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("ping"), "ping");
        assert_eq!(shell_quote("10.0.0.1"), "10.0.0.1");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn image_dirs_depend_on_the_package_set_only() {
        let a = image_dir(&["iperf3".into(), "curl".into()]);
        let b = image_dir(&["curl".into(), "iperf3".into(), "curl".into()]);
        assert_eq!(a, b);
        assert_ne!(a, image_dir(&["curl".into()]));
        assert!(image_dir(&[]).ends_with("default"));
    }

    #[test]
    fn command_line() {
        let vm = VmSpec::default();
        let limits = Limits {
            millicpus: Some(2000),
            memory: Some(256 << 20),
        };
        let c = VmConfig {
            violin: "blue",
            guest: "q",
            vm: &vm,
            limits: &limits,
            mac: EthernetAddress([2, 0, 0, 0, 0, 9]),
            ip: Ipv4Addr::new(10, 0, 0, 9),
            prefix_len: 24,
            mtu: 1450,
            framing: Framing::Stream,
            socket: Path::new("/run/x/q.sock"),
            dir: Path::new("/run/x/vm"),
            accel: "tcg",
        };
        let a = command(&c);
        let s = a.join(" ");
        for want in [
            "-smp 2",
            "-m 256",
            "-accel tcg",
            "violin.ip=10.0.0.9/24",
            "violin.mtu=1450",
            "stream,id=n0,server=off,addr.type=unix,addr.path=/run/x/q.sock",
            "virtio-net-device,netdev=n0,mac=02:00:00:00:00:09",
            "path=/run/x/vm/agent.sock",
        ] {
            assert!(s.contains(want), "{want:?} not in {s}");
        }
        assert!(!s.contains("tap"), "no tap device");
    }

    /// A fake agent on a socket in a fresh directory: `reply` gets the request line and
    /// answers with the bytes it returns (None: answer nothing, keep the line open).
    fn fake_agent(
        tag: &str,
        reply: impl FnOnce(&str) -> Option<Vec<u8>> + Send + 'static,
    ) -> (PathBuf, std::thread::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!("violin-agent-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut c), &mut line).unwrap();
            match reply(&line) {
                Some(bytes) => c.write_all(&bytes).unwrap(),
                None => std::thread::sleep(std::time::Duration::from_millis(500)),
            }
        });
        (path, t)
    }

    #[test]
    fn exec_streams_output_and_passes_the_exit_status_back() {
        let (path, t) = fake_agent("ok", |line| {
            let (nonce, b64) = line.trim_end().split_once(' ').unwrap();
            use base64::Engine;
            let cmd = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap();
            assert_eq!(cmd, b"echo 'a b'");
            // Output an earlier, abandoned command left behind comes first.
            Some(
                format!("old output\nvX exit 0\n{nonce} start\na b\n\n{nonce} exit 3\n")
                    .into_bytes(),
            )
        });
        let mut out = Vec::new();
        let cmd = ["echo".to_string(), "a b".to_string()];
        let status = exec_within(&path, &cmd, &mut out, std::time::Duration::from_secs(5));
        t.join().unwrap();
        assert_eq!(status.unwrap(), 3);
        assert_eq!(String::from_utf8(out).unwrap(), "a b\n");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn boot_failures_are_found_in_the_console_log() {
        let ok = "[    0.650347] PCI: Fatal: No config space access function found\n\
                  [    1.000000] Initramfs unpacking failed: Decoding failed\n\
                  violin: vm up (10.0.0.1/24)\n";
        assert_eq!(boot_failure(ok), None);
        let full = "[    3.781437] Initramfs unpacking failed: write error\r\n\
                    sh: write error: No space left on device\n";
        let why = boot_failure(full).unwrap();
        assert!(
            why.starts_with("\"Initramfs unpacking failed: write error\""),
            "{why}"
        );
        assert!(why.contains("raise `memory`"), "{why}");
        let panic = "[    2.1] Kernel panic - not syncing: VFS: Unable to mount root fs on \
                     unknown-block(0,0)\n";
        assert_eq!(
            boot_failure(panic).unwrap(),
            "\"Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\""
        );
    }

    #[test]
    fn exec_gives_up_on_an_agent_that_never_answers() {
        let (path, t) = fake_agent("silent", |_| None);
        let t0 = std::time::Instant::now();
        let cmd = ["true".to_string()];
        let wait = std::time::Duration::from_millis(200);
        let e = exec_within(&path, &cmd, &mut Vec::new(), wait).unwrap_err();
        assert!(t0.elapsed() < std::time::Duration::from_secs(2));
        let msg = format!("{e:#}");
        assert!(msg.contains("did not answer within 0.2 s"), "{msg}");
        assert!(msg.contains("console.log"), "{msg}");
        t.join().unwrap();
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
