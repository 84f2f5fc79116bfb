//! Lightweight guests: a network namespace whose `eth0` is a tap, relayed to the guest's
//! UNIX socket exactly as QEMU's `-netdev stream`/`-netdev dgram` would relay a VM's
//! NIC. The relay runs as its own process (`violin-dp guest …`), started and supervised
//! by the host's daemon; it reconnects whenever the socket goes away.

use crate::host::netlink;
use crate::host::netns;
use crate::spec::Framing;
use anyhow::{bail, Context, Result};
use nix::sys::socket::{recv, MsgFlags};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::PathBuf;
use std::time::Duration;
use tracing::{info, warn};
use violin_common::wire::EthernetAddress;

/// Everything a lightweight guest needs to come up.
#[derive(Debug, Clone, clap::Args)]
pub struct GuestArgs {
    /// The guest's network namespace (created if missing).
    #[arg(long)]
    pub netns: String,
    /// The daemon's socket for this guest.
    #[arg(long)]
    pub socket: PathBuf,
    #[arg(long, value_enum, default_value = "stream")]
    pub framing: FramingArg,
    #[arg(long)]
    pub mac: String,
    /// Address and prefix, e.g. 10.0.0.1/24.
    #[arg(long)]
    pub ip: String,
    #[arg(long, default_value_t = 1450)]
    pub mtu: u16,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum FramingArg {
    Stream,
    Dgram,
}

impl From<FramingArg> for Framing {
    fn from(f: FramingArg) -> Framing {
        match f {
            FramingArg::Stream => Framing::Stream,
            FramingArg::Dgram => Framing::Dgram,
        }
    }
}

impl From<Framing> for FramingArg {
    fn from(f: Framing) -> FramingArg {
        match f {
            Framing::Stream => FramingArg::Stream,
            Framing::Dgram => FramingArg::Dgram,
        }
    }
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens (creating) the tap `name` in the calling thread's namespace, non-blocking.
pub fn open_tap(name: &str) -> Result<File> {
    tun_open(name, libc::IFF_TAP | libc::IFF_NO_PI)
}

/// Opens /dev/net/tun (non-blocking) and attaches it to device `name` with `flags`,
/// creating the device if it does not exist.
fn tun_open(name: &str, flags: libc::c_int) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .context("opening /dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: flags as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads an ifreq (name + flags) from a live, correctly sized struct.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if r < 0 {
        return Err(io::Error::last_os_error()).context(format!("opening tap {name}"));
    }
    Ok(f)
}

/// Sets up the namespace and tap, then relays until killed.
pub fn run(args: GuestArgs) -> Result<()> {
    let (ip, prefix) = args
        .ip
        .split_once('/')
        .context("--ip needs a prefix length")?;
    let ip: Ipv4Addr = ip.parse().context("--ip")?;
    let prefix: u8 = prefix.parse().context("--ip prefix")?;
    let mac = EthernetAddress::parse(&args.mac).context("--mac is not a MAC address")?;
    if !netns::exists(&args.netns) {
        netns::create_guest(&args.netns)?;
    }
    // Single-threaded here: the whole process moves into the guest's namespace.
    netns::enter(&args.netns)?;
    // A lightweight guest speaks IPv4 only: no IPv6 autoconfiguration chatter.
    for k in [
        "net/ipv6/conf/all/disable_ipv6",
        "net/ipv6/conf/default/disable_ipv6",
    ] {
        let _ = netns::sysctl(k, "1");
    }
    let tap = open_tap("eth0")?;
    netlink::with_handle(|h| async move {
        netlink::set_up(&h, "lo").await?;
        netlink::set_mac(&h, "eth0", mac.0).await?;
        netlink::set_mtu(&h, "eth0", u32::from(args.mtu)).await?;
        netlink::add_addr(&h, "eth0", ip, prefix).await?;
        netlink::set_up(&h, "eth0").await
    })?;
    info!(netns = %args.netns, %ip, %mac, "guest up");
    // Setup was control work, on the daemon's control CPUs; relaying is packet work.
    if let Err(e) = crate::host::cpus::unpin_all() {
        warn!("the relay keeps the control CPUs: {e}");
    }
    if let Err(e) = crate::datapath::prioritise_packet_work() {
        warn!("the relay runs at the default priority: {e}");
    }
    let framing = Framing::from(args.framing);
    let mut backoff = Duration::from_millis(20);
    loop {
        match Conn::connect(&args.socket, framing) {
            Ok(conn) => {
                backoff = Duration::from_millis(20);
                info!(socket = %args.socket.display(), "connected");
                match relay(&tap, &conn) {
                    Ended::Conn(e) => warn!("connection lost: {e}; reconnecting"),
                    // The guest deleted its interface: exit, so the daemon sees the port
                    // go and its supervisor starts a relay that makes a new one.
                    Ended::Tap(e) => bail!("the guest's eth0 is gone: {e}"),
                }
            }
            Err(_) => {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
}

enum Conn {
    Stream(UnixStream),
    Dgram(UnixDatagram),
}

impl Conn {
    fn connect(path: &std::path::Path, framing: Framing) -> io::Result<Conn> {
        Ok(match framing {
            Framing::Stream => Conn::Stream(UnixStream::connect(path)?),
            Framing::Dgram => {
                let local = crate::datapath::transport::guest::peer_path(path);
                let _ = std::fs::remove_file(&local);
                let s = UnixDatagram::bind(&local)?;
                s.connect(path)?;
                Conn::Dgram(s)
            }
        })
    }
    fn fd(&self) -> RawFd {
        match self {
            Conn::Stream(s) => s.as_raw_fd(),
            Conn::Dgram(s) => s.as_raw_fd(),
        }
    }
    fn send(&self, out: &mut Vec<u8>, frame: &[u8]) -> io::Result<()> {
        match self {
            Conn::Stream(s) => {
                out.clear();
                out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
                out.extend_from_slice(frame);
                (&mut &*s).write_all(out)
            }
            Conn::Dgram(s) => match s.send(frame) {
                // The daemon's queue is full: drop, as a NIC would.
                Err(e)
                    if e.raw_os_error() == Some(libc::EAGAIN)
                        || e.raw_os_error() == Some(libc::ENOBUFS) =>
                {
                    Ok(())
                }
                r => r.map(|_| ()),
            },
        }
    }
}

/// Why [`relay`] stopped.
enum Ended {
    /// The connection to the daemon failed: connect again.
    Conn(io::Error),
    /// The tap failed (its interface was deleted in the guest).
    Tap(io::Error),
}

/// Copies frames both ways until the connection or the tap fails; returns why.
fn relay(tap: &File, conn: &Conn) -> Ended {
    let mut frame = vec![0u8; 65536];
    let mut out = Vec::with_capacity(65540);
    let mut rx = vec![0u8; 4 + 65536 * 2];
    let (mut start, mut end) = (0usize, 0usize);
    let mut tapw = tap;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: tap.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: conn.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds for the duration of the call.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Ended::Conn(e);
        }
        // A tap whose interface was deleted polls as an error, never as readable.
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return Ended::Tap(io::Error::from_raw_os_error(libc::EBADFD));
        }
        if fds[0].revents & libc::POLLIN != 0 {
            loop {
                match (&mut &*tap).read(&mut frame) {
                    Ok(n) => {
                        if let Err(e) = conn.send(&mut out, &frame[..n]) {
                            return Ended::Conn(e);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Ended::Tap(e),
                }
            }
        }
        if fds[1].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            loop {
                let buf: &mut [u8] = match conn {
                    Conn::Stream(_) => &mut rx[end..],
                    Conn::Dgram(_) => &mut frame[..],
                };
                match recv(conn.fd(), buf, MsgFlags::MSG_DONTWAIT) {
                    Ok(0) if matches!(conn, Conn::Stream(_)) => {
                        return Ended::Conn(io::ErrorKind::UnexpectedEof.into())
                    }
                    Ok(n) => match conn {
                        Conn::Dgram(_) => {
                            let _ = tapw.write(&frame[..n]);
                        }
                        Conn::Stream(_) => {
                            end += n;
                            while end - start >= 4 {
                                let len = u32::from_be_bytes([
                                    rx[start],
                                    rx[start + 1],
                                    rx[start + 2],
                                    rx[start + 3],
                                ]) as usize;
                                if len > 65536 {
                                    return Ended::Conn(io::Error::new(
                                        io::ErrorKind::InvalidData,
                                        "bad record length from the daemon",
                                    ));
                                }
                                if end - start < 4 + len {
                                    break;
                                }
                                let _ = tapw.write(&rx[start + 4..start + 4 + len]);
                                start += 4 + len;
                            }
                            rx.copy_within(start..end, 0);
                            end -= start;
                            start = 0;
                        }
                    },
                    Err(nix::errno::Errno::EAGAIN) => break,
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Ended::Conn(e.into()),
                }
            }
        }
    }
}

const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_TSO6: libc::c_ulong = 0x04;
const TUN_F_USO4: libc::c_ulong = 0x20;
const TUN_F_USO6: libc::c_ulong = 0x40;

/// Opens (creating, or attaching to the one a previous daemon left) the tap `name` in
/// the calling thread's namespace with a virtio-net header and a virtio NIC's
/// offloads: checksum, TSO4/6, and USO4/6 where the kernel has them (6.2+). The tap
/// persists, so the guest's `eth0` and its addresses outlive a daemon restart.
/// Also says whether the tap took USO (so it takes UDP super-frames).
pub fn open_offload_tap(name: &str) -> Result<(File, bool)> {
    let f = tun_open(name, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR)?;
    let fd = f.as_raw_fd();
    let base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
    let uso;
    // SAFETY: TUNSETOFFLOAD and TUNSETPERSIST take an integer argument, no pointer.
    unsafe {
        uso = libc::ioctl(fd, TUNSETOFFLOAD, base | TUN_F_USO4 | TUN_F_USO6) == 0;
        if !uso && libc::ioctl(fd, TUNSETOFFLOAD, base) < 0 {
            return Err(io::Error::last_os_error()).context(format!("offloads on tap {name}"));
        }
        if libc::ioctl(fd, TUNSETPERSIST, 1 as libc::c_ulong) < 0 {
            return Err(io::Error::last_os_error()).context(format!("making tap {name} persist"));
        }
    }
    Ok((f, uso))
}

/// Sets up a tap-port guest: namespace `ns` (created if missing) whose `eth0` is a tap
/// with offloads that the daemon itself reads and writes (no relay process). Returns
/// the tap, non-blocking, and whether it takes UDP super-frames (USO).
pub fn setup_tap_guest(
    ns: &str,
    mac: EthernetAddress,
    ip: Ipv4Addr,
    prefix: u8,
    mtu: u16,
) -> Result<(File, bool)> {
    if !netns::exists(ns) {
        netns::create_guest(ns)?;
    }
    netns::run_in(ns, || {
        for k in [
            "net/ipv6/conf/all/disable_ipv6",
            "net/ipv6/conf/default/disable_ipv6",
        ] {
            let _ = netns::sysctl(k, "1");
        }
        let tap = match open_offload_tap("eth0") {
            Ok(t) => t,
            // Another kind of eth0 (the guest's port kind changed): replace it.
            Err(_) => {
                netlink::with_handle(|h| async move { netlink::del_link(&h, "eth0").await })?;
                open_offload_tap("eth0")?
            }
        };
        netlink::with_handle(|h| async move {
            netlink::set_up(&h, "lo").await?;
            netlink::set_mac(&h, "eth0", mac.0).await?;
            netlink::set_mtu(&h, "eth0", u32::from(mtu)).await?;
            netlink::add_addr(&h, "eth0", ip, prefix).await?;
            netlink::set_up(&h, "eth0").await
        })?;
        Ok(tap)
    })
}

/// Sets up a fast-port guest: namespace `ns` (created if missing) whose `eth0` is one
/// end of a veth; the other end, `host_if`, stays in the caller's namespace for the
/// daemon to drive with AF_XDP. No relay process: the daemon is the guest's NIC.
pub fn setup_veth_guest(
    ns: &str,
    host_if: &str,
    mac: EthernetAddress,
    ip: Ipv4Addr,
    prefix: u8,
    mtu: u16,
) -> Result<()> {
    if !netns::exists(ns) {
        netns::create_guest(ns)?;
    }
    let tmp = format!("{host_if}g");
    let nsf = netns::open(ns)?;
    let (h, t) = (host_if.to_string(), tmp.clone());
    netlink::with_handle(|hd| async move {
        netlink::del_link(&hd, &h).await?;
        netlink::add_veth(&hd, &h, &t).await
    })?;
    seal_host_end(host_if)?;
    let (h, t) = (host_if.to_string(), tmp.clone());
    netlink::with_handle(|hd| async move {
        netlink::set_mtu(&hd, &h, u32::from(mtu) + 18).await?;
        netlink::set_up(&hd, &h).await?;
        netlink::move_to_netns(&hd, &t, &nsf).await
    })?;
    netns::run_in(ns, || {
        for k in [
            "net/ipv6/conf/all/disable_ipv6",
            "net/ipv6/conf/default/disable_ipv6",
        ] {
            let _ = netns::sysctl(k, "1");
        }
        netlink::with_handle(|hd| async move {
            netlink::del_link(&hd, "eth0").await?;
            netlink::rename(&hd, &tmp, "eth0").await?;
            netlink::set_mac(&hd, "eth0", mac.0).await?;
            netlink::set_mtu(&hd, "eth0", u32::from(mtu)).await?;
            netlink::add_addr(&hd, "eth0", ip, prefix).await?;
            netlink::set_up(&hd, "eth0").await?;
            netlink::set_up(&hd, "lo").await
        })?;
        // Frames leave eth0 towards AF_XDP: their checksums must be complete.
        netlink::disable_tx_checksum("eth0")
    })
}

/// Paces a fast-port guest at its cap in its own `eth0` queue: a token bucket filter
/// at the cap's rate and depth, so the guest's TCP and UDP sockets are held back by
/// their own kernel (TCP Small Queues, a full send buffer). Without it the queue is the
/// port's AF_XDP ring (2048 frames, two seconds at 10 Mbit/s; what overflows it is
/// dropped), which the guest's TCP cannot feel: the `violin_port` program frees each
/// skb as it hands the frame over, and TCP followed the worker's bursty releases (0.58
/// to 0.96 × the cap). The data plane's bucket still enforces the cap (the guest's
/// processes cannot change their netns's qdiscs); this only moves the queue to where
/// the sender feels it. `None` takes the filter away.
pub fn pace_veth_guest(ns: &str, rate: Option<&crate::spec::Rate>, mtu: u16) -> Result<()> {
    let tbf = rate.map(|r| veth_guest_tbf(r, mtu));
    netns::run_in(ns, || {
        netlink::with_handle(|h| async move {
            match tbf {
                Some(t) => netlink::set_tbf(&h, "eth0", &t).await,
                None => netlink::del_root_qdisc(&h, "eth0").await,
            }
        })
    })
}

/// The filter for a cap: its rate and bucket depth (at least one full frame, which the
/// filter would otherwise drop), and a queue of 100 ms at the rate, at least 256 KiB (a
/// default socket send buffer, so a single UDP sender blocks before the queue drops)
/// and at most 4 MiB.
fn veth_guest_tbf(r: &crate::spec::Rate, mtu: u16) -> netlink::Tbf {
    let frame = u64::from(mtu) + 18;
    let burst = r.burst_bytes.max(frame);
    let limit = (r.bytes_per_sec / 10)
        .clamp(256 << 10, 4 << 20)
        .max(2 * burst);
    netlink::Tbf {
        bytes_per_sec: r.bytes_per_sec,
        burst: u32::try_from(burst).unwrap_or(u32::MAX),
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
    }
}

/// Makes the host end of a fast port carry nothing into the host's own stack, before
/// it comes up: while the daemon's XDP program is attached every frame goes to the
/// port's AF_XDP socket anyway, but when the daemon is dead (a crash, a restart) the
/// host end would be an ordinary interface of the host. Then IPv4 from it fails the
/// strict reverse-path check (nothing routes back through it, so a datagram with any
/// source address — a forged VXLAN "from another host" included — is dropped before
/// delivery or forwarding), ARP gets no answer, IPv6 is off. These are the kernel's
/// settings: they hold with no process running.
pub fn seal_host_end(host_if: &str) -> Result<()> {
    for (key, value) in [
        ("ipv4/conf/{}/rp_filter", "1"),
        ("ipv4/conf/{}/arp_ignore", "8"),
        ("ipv4/conf/{}/forwarding", "0"),
        ("ipv6/conf/{}/disable_ipv6", "1"),
    ] {
        netns::sysctl(&format!("net/{}", key.replace("{}", host_if)), value)
            .with_context(|| format!("sealing fast-port host end {host_if}"))?;
    }
    Ok(())
}

/// The host end's interface name for a fast port: short (IFNAMSIZ) and stable.
pub fn veth_name(ns: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in ns.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    format!("vp{h:08x}")
}
