//! Load and measurement, each side running inside its namespace: a UDP generator and a
//! counting sink, a UDP ping-pong with an HDR histogram, iperf3 for TCP, and CPU
//! accounting from /proc. Loops are bounded in time; traffic stays in the testbed's
//! namespaces.

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use violin_dp::host::netns;

/// Pins the calling thread to one CPU.
pub fn pin(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// A command that runs inside namespace `ns`.
pub fn ns_command(ns: &str, program: &str) -> Result<Command> {
    let f = netns::open(ns)?;
    let fd = f.as_raw_fd();
    let mut c = Command::new(program);
    // SAFETY: setns is async-signal-safe; `f` is kept open by the closure until exec.
    unsafe {
        c.pre_exec(move || {
            let _keep = &f;
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(c)
}

fn run(mut c: Command) -> Result<Output> {
    let o = c.output().context("running a measurement tool")?;
    if !o.status.success() {
        bail!(
            "{:?} failed: {}",
            c.get_program(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(o)
}

/// Busy CPU time of the whole machine (all CPUs), in clock ticks.
pub fn machine_busy_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    f.iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| *v)
        .sum()
}

/// CPU time of processes (user + system), in clock ticks.
pub fn process_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// Result of a UDP flood.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Flood {
    pub sent_pps: f64,
    pub received_pps: f64,
    /// Machine CPU time per received packet (both cores), µs.
    pub cpu_us_per_packet: f64,
    /// Data-plane daemons' CPU seconds per million received packets.
    pub dp_cpu_s_per_mpkt: f64,
}

/// Floods `dst:port` from `client_ns` with `payload`-byte datagrams for `secs` and
/// counts what `server_ns` receives (after a 0.3 s warm-up). The generator is pinned to
/// CPU 0.
pub fn udp_flood(
    client_ns: &str,
    server_ns: &str,
    dst: Ipv4Addr,
    payload: usize,
    secs: f64,
    daemons: &[u32],
) -> Result<Flood> {
    let port = 5300;
    let stop = Arc::new(AtomicBool::new(false));
    let counting = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let sink = {
        let (ns, stop, counting, received) = (
            server_ns.to_string(),
            stop.clone(),
            counting.clone(),
            received.clone(),
        );
        std::thread::spawn(move || -> Result<()> {
            netns::enter(&ns)?;
            let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            ready_tx.send(()).ok();
            let mut sink = BatchSink::new();
            while !stop.load(Ordering::Relaxed) {
                let n = sink.recv(&s);
                if n > 0 && counting.load(Ordering::Relaxed) {
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            Ok(())
        })
    };
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("sink did not start")?;
    let sent = Arc::new(AtomicU64::new(0));
    let gen = {
        let (ns, stop, sent) = (client_ns.to_string(), stop.clone(), sent.clone());
        std::thread::spawn(move || -> Result<()> {
            netns::enter(&ns)?;
            pin(0);
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(SocketAddrV4::new(dst, port))?;
            let buf = vec![0x5au8; payload];
            while !stop.load(Ordering::Relaxed) {
                if s.send(&buf).is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let (busy0, dp0, sent0) = (
        machine_busy_ticks(),
        process_ticks(daemons),
        sent.load(Ordering::Relaxed),
    );
    counting.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    counting.store(false, Ordering::Relaxed);
    let dt = t0.elapsed().as_secs_f64();
    let (busy1, dp1, sent1) = (
        machine_busy_ticks(),
        process_ticks(daemons),
        sent.load(Ordering::Relaxed),
    );
    stop.store(true, Ordering::Relaxed);
    gen.join().unwrap()?;
    sink.join().unwrap()?;
    let rx = received.load(Ordering::Relaxed) as f64;
    let tps = ticks_per_second();
    Ok(Flood {
        sent_pps: (sent1 - sent0) as f64 / dt,
        received_pps: rx / dt,
        cpu_us_per_packet: if rx > 0.0 {
            (busy1 - busy0) as f64 / tps * 1e6 / rx
        } else {
            f64::NAN
        },
        dp_cpu_s_per_mpkt: if rx > 0.0 {
            (dp1 - dp0) as f64 / tps / rx * 1e6
        } else {
            f64::NAN
        },
    })
}

/// Datagrams a sink takes per `recvmmsg`.
const SINK_BATCH: usize = 64;

/// A counting sink that reads up to [`SINK_BATCH`] datagrams per system call, so that
/// the sink's own cost per datagram (one `recv` each, before) is not what a flood
/// measures: its socket overflowed while the data plane still had CPU to deliver.
struct BatchSink {
    // Never read here: the kernel writes into them through `hdrs`, which must not
    // outlive them.
    _bufs: Vec<[u8; 2048]>,
    _iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl BatchSink {
    fn new() -> BatchSink {
        let mut bufs = vec![[0u8; 2048]; SINK_BATCH];
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let hdrs = iovs
            .iter_mut()
            .map(|iov| {
                // SAFETY: an all-zero msghdr is a valid empty one (no name, no control).
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        BatchSink {
            _bufs: bufs,
            _iovs: iovs,
            hdrs,
        }
    }

    /// Datagrams received: waits for the first (up to the socket's read timeout), then
    /// takes what is queued, up to a batch. 0 on timeout or error.
    fn recv(&mut self, s: &UdpSocket) -> usize {
        // SAFETY: `hdrs` point at `iovs`, which point at `bufs`: all owned by `self`,
        // alive and not moved for the call; the kernel writes at most SINK_BATCH entries.
        let n = unsafe {
            libc::recvmmsg(
                s.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                SINK_BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        n.max(0) as usize
    }
}

/// Round-trip latency percentiles, µs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub samples: u64,
    pub lost: u64,
    /// (quantile, µs) points for a CDF.
    pub cdf: Vec<(f64, f64)>,
}

/// UDP ping-pong with 64-byte datagrams: an echo server in `server_ns`, `count` round
/// trips from `client_ns`, one at a time.
pub fn udp_ping_pong(
    client_ns: &str,
    server_ns: &str,
    dst: Ipv4Addr,
    count: u64,
) -> Result<Latency> {
    let port = 5301;
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let echo = {
        let (ns, stop) = (server_ns.to_string(), stop.clone());
        std::thread::spawn(move || -> Result<()> {
            netns::enter(&ns)?;
            let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            ready_tx.send(()).ok();
            let mut buf = [0u8; 128];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], from);
                }
            }
            Ok(())
        })
    };
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("echo server did not start")?;
    let ns = client_ns.to_string();
    let r = std::thread::spawn(move || -> Result<Latency> {
        netns::enter(&ns)?;
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(SocketAddrV4::new(dst, port))?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)?;
        let (mut buf, msg) = ([0u8; 128], [0x42u8; 64]);
        let mut lost = 0;
        // Warm-up: ARP and caches.
        for _ in 0..20 {
            let _ = s.send(&msg);
            let _ = s.recv(&mut buf);
        }
        for _ in 0..count {
            let t = Instant::now();
            s.send(&msg)?;
            match s.recv(&mut buf) {
                Ok(_) => h.record(t.elapsed().as_nanos() as u64)?,
                Err(_) => lost += 1,
            }
        }
        let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let cdf = (1..100)
            .map(|i| i as f64 / 100.0)
            .chain([0.995, 0.999])
            .map(|q| (q, us(q)))
            .collect();
        Ok(Latency {
            p50_us: us(0.5),
            p99_us: us(0.99),
            p999_us: us(0.999),
            samples: h.len(),
            lost,
            cdf,
        })
    })
    .join()
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    echo.join().unwrap()?;
    r
}

/// ICMP echo average RTT in µs (`ping -c N -i 0.01`).
pub fn icmp_avg_us(client_ns: &str, dst: Ipv4Addr, count: u32) -> Result<f64> {
    let mut c = ns_command(client_ns, "ping")?;
    c.args([
        "-q",
        "-c",
        &count.to_string(),
        "-i",
        "0.01",
        "-W",
        "1",
        &dst.to_string(),
    ]);
    let out = String::from_utf8_lossy(&run(c)?.stdout).into_owned();
    // rtt min/avg/max/mdev = 0.049/0.061/0.088/0.011 ms
    let stats = out
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .context("no ping summary")?;
    let nums = stats.split('=').nth(1).context("ping summary")?.trim();
    let avg: f64 = nums.split('/').nth(1).context("ping avg")?.parse()?;
    Ok(avg * 1000.0)
}

/// A TCP run: goodput and what it cost.
#[derive(Debug, Clone, Copy)]
pub struct Tcp {
    pub bits_per_second: f64,
    /// Busy CPU time of the whole machine (both cores: senders, receivers, daemons,
    /// softirq) per Gbit delivered, in seconds.
    pub cpu_s_per_gbit: f64,
    /// The data-plane daemons' share of it.
    pub dp_cpu_s_per_gbit: f64,
}

/// TCP goodput with `streams` parallel streams (iperf3) and its CPU cost, measured
/// over the client's run (`daemons`: pids whose CPU counts as the data plane's).
pub fn tcp_throughput(
    client_ns: &str,
    server_ns: &str,
    dst: Ipv4Addr,
    streams: u32,
    secs: f64,
    daemons: &[u32],
) -> Result<Tcp> {
    let mut server = ns_command(server_ns, "iperf3")?;
    server
        .args(["-s", "-1", "-p", "5302"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut srv = server
        .spawn()
        .context("starting iperf3 -s (is iperf3 installed? scripts/setup.sh)")?;
    std::thread::sleep(Duration::from_millis(300));
    let mut c = ns_command(client_ns, "iperf3")?;
    c.args([
        "-c",
        &dst.to_string(),
        "-p",
        "5302",
        "-J",
        "-P",
        &streams.to_string(),
        "-t",
        &format!("{secs}"),
    ]);
    let (busy0, dp0) = (machine_busy_ticks(), process_ticks(daemons));
    let r = run(c);
    let (busy1, dp1) = (machine_busy_ticks(), process_ticks(daemons));
    let _ = srv.kill();
    let _ = srv.wait();
    let j: serde_json::Value = serde_json::from_slice(&r?.stdout)?;
    let sum = &j["end"]["sum_received"];
    let bps = sum["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON without sum_received")?;
    // Bytes over the whole run (the CPU window), not the rate over iperf3's interval.
    let gbit = sum["bytes"].as_f64().unwrap_or(0.0) * 8.0 / 1e9;
    let tps = ticks_per_second();
    let per_gbit = |t: u64| {
        if gbit > 0.0 {
            t as f64 / tps / gbit
        } else {
            f64::NAN
        }
    };
    Ok(Tcp {
        bits_per_second: bps,
        cpu_s_per_gbit: per_gbit(busy1 - busy0),
        dp_cpu_s_per_gbit: per_gbit(dp1 - dp0),
    })
}

/// Resident memory of processes, KiB (`VmRSS`).
pub fn rss_kib(pids: &[u32]) -> u64 {
    status_kib(pids, "VmRSS:")
}

/// Peak resident memory (`VmHWM`) of these processes, summed, KiB.
pub fn peak_kib(pids: &[u32]) -> u64 {
    status_kib(pids, "VmHWM:")
}

fn status_kib(pids: &[u32], field: &str) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with(field))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .sum()
}
