//! Harness for tests on a simulated cluster: unique names, cleanup on drop (also when a
//! test fails), guest-namespace helpers. Tests that need root skip with a printed reason
//! outside CI and fail in CI.
#![allow(dead_code)]

pub mod packets;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use violin_dp::cli::ClusterStats;
use violin_dp::cluster::ClusterState;
use violin_dp::host::netns;

/// a on h1; b, c on h2; links a–b and b–c only.
pub const PAIRS: &str = r#"
name = "blue"
vni = 101
[[guest]]
name = "a"
host = "h1"
ip = "10.0.0.1/24"
[[guest]]
name = "b"
host = "h2"
ip = "10.0.0.2/24"
[[guest]]
name = "c"
host = "h2"
ip = "10.0.0.3/24"
[[link]]
between = ["a", "b"]
[[link]]
between = ["b", "c"]
"#;

/// Cluster tests run one at a time: they share two cores and measure rates.
static SERIAL: Mutex<()> = Mutex::new(());

/// Holds the lock that serialises cluster tests.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Returns false (after printing why) when the test cannot run here; panics in CI.
pub fn can_run() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs root (network namespaces) and CI runs as root");
    }
    eprintln!("SKIPPED: needs root to create network namespaces");
    false
}

pub struct Cluster {
    pub name: String,
    pub run_dir: PathBuf,
    tmp: PathBuf,
    /// The owner holds the lock that serialises cluster tests and takes the cluster
    /// down when dropped; an attached handle ([`Cluster::attach`]) does neither.
    _serial: Option<MutexGuard<'static, ()>>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Cluster {
    /// Brings up a cluster of `hosts` hosts running data plane `dp`, with a name unique
    /// to this process and test; without etcd (the CLI drives each daemon's socket)
    /// unless `extra` says `--etcd-members`: the data path's tests.
    pub fn up(hosts: usize, dp: &str, extra: &[&str]) -> Cluster {
        Cluster::up_with_env(hosts, dp, extra, &[])
    }

    /// `up` with the cluster's state in etcd (one member unless `extra` says more), as
    /// `violin cluster up` does by default: the control path's tests.
    pub fn up_etcd(hosts: usize, dp: &str, extra: &[&str]) -> Cluster {
        let mut args = extra.to_vec();
        if !args.contains(&"--etcd-members") {
            args.extend(["--etcd-members", "1"]);
        }
        Cluster::up_with_env(hosts, dp, &args, &[])
    }

    /// `up`, with extra environment for the CLI and the daemons it starts.
    pub fn up_with_env(hosts: usize, dp: &str, extra: &[&str], env: &[(&str, &str)]) -> Cluster {
        let serial = serial();
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let name = format!("t{}x{n}", std::process::id() % 100_000);
        let tmp = std::env::temp_dir().join(format!("violin-test-{name}"));
        std::fs::create_dir_all(&tmp).unwrap();
        let c = Cluster {
            run_dir: tmp.join("run"),
            name,
            tmp,
            _serial: Some(serial),
        };
        let hosts = hosts.to_string();
        let mut args = vec!["cluster", "up", "--hosts", &hosts, "--dataplane", dp];
        args.extend_from_slice(extra);
        if !extra.contains(&"--etcd-members") {
            args.extend(["--etcd-members", "0"]);
        }
        let o = c
            .command(&args)
            .envs(env.iter().copied())
            .output()
            .expect("running violin");
        assert!(
            o.status.success(),
            "cluster up failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        c
    }

    /// Another handle on a running cluster (for a thread of the same test): runs
    /// commands, owns nothing.
    pub fn attach(name: &str, run_dir: &std::path::Path) -> Cluster {
        Cluster {
            name: name.into(),
            run_dir: run_dir.into(),
            tmp: run_dir.parent().expect("the test's directory").into(),
            _serial: None,
        }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_violin"));
        cmd.arg("--cluster")
            .arg(&self.name)
            .env("VIOLIN_RUN_DIR", &self.run_dir)
            .args(args);
        cmd
    }

    pub fn host_log(&self, host: &str) -> String {
        std::fs::read_to_string(self.run_dir.join(&self.name).join(format!("{host}.log")))
            .unwrap_or_default()
    }

    pub fn cmd(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running violin")
    }

    /// Runs `violin ARGS` and panics with its output unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.cmd(args);
        assert!(
            o.status.success(),
            "violin {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn write_spec(&self, file: &str, text: &str) -> String {
        let p = self.tmp.join(file);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    pub fn up_spec(&self, file: &str, text: &str) {
        let p = self.write_spec(file, text);
        self.ok(&["up", &p]);
    }

    pub fn info(&self) -> ClusterState {
        serde_json::from_str(&self.ok(&["cluster", "info", "--json"])).unwrap()
    }

    /// (rx, tx) queues of each simulated host's underlay NIC, as its namespace sees
    /// them (sysfs, through `ip netns exec`, which mounts the namespace's own).
    pub fn nic_queues(&self) -> Vec<(usize, usize)> {
        self.info()
            .hosts
            .iter()
            .map(|h| {
                let o = Command::new("ip")
                    .args(["netns", "exec", &h.netns, "ls"])
                    .arg(format!("/sys/class/net/{}/queues", h.interface))
                    .output()
                    .unwrap();
                assert!(o.status.success(), "{o:?}");
                let names = String::from_utf8_lossy(&o.stdout);
                let count = |p: &str| {
                    names
                        .split_whitespace()
                        .filter(|q| q.starts_with(p))
                        .count()
                };
                (count("rx-"), count("tx-"))
            })
            .collect()
    }

    pub fn stats(&self, violin: &str) -> ClusterStats {
        serde_json::from_str(&self.ok(&["stats", violin, "--json"])).unwrap()
    }

    /// Waits (up to 5 s) until host `host`'s AF_XDP TX pool is whole again (every frame
    /// free, no completion pending) and returns the stats that showed it; panics,
    /// naming the pool's figures, if it does not come back.
    pub fn tx_pool_back(&self, violin: &str, host: &str) -> ClusterStats {
        let t0 = std::time::Instant::now();
        loop {
            let s = self.stats(violin);
            let h = s.hosts.iter().find(|h| h.host == host).unwrap();
            let r = h.xdp.as_ref().expect("xdp counters").rings;
            if r.free_frames == r.pool_frames && r.completion_backlog == 0 {
                return s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "{host}'s TX frames did not come back: {r:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The guest's network namespace name.
    pub fn guest_ns(&self, violin: &str, guest: &str) -> String {
        format!("{}-{violin}-{guest}", self.name)
    }

    /// `ping -c COUNT` from a guest; true when every reply came back.
    pub fn ping(&self, violin: &str, guest: &str, ip: &str, count: u32) -> bool {
        let c = count.to_string();
        let o = self.cmd(&[
            "exec", violin, guest, "--", "ping", "-q", "-c", &c, "-i", "0.2", "-W", "1", ip,
        ]);
        o.status.success()
            && String::from_utf8_lossy(&o.stdout).contains(&format!("{count} received"))
    }

    /// Pings until one reply arrives or `timeout` passes (ARP, relay restarts).
    pub fn ping_until(&self, violin: &str, guest: &str, ip: &str, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.ping(violin, guest, ip, 1) {
                return true;
            }
        }
        false
    }

    /// Checks that the Violin's tunnelled frames crossed the data plane `dp`: for xdp,
    /// the classifier redirected them and the AF_XDP sockets received them while the
    /// kernel's UDP socket got none; for udp, the UDP socket received them.
    pub fn assert_dataplane(&self, violin: &str, dp: &str) {
        let s = self.stats(violin);
        for h in &s.hosts {
            assert_eq!(h.dataplane, dp, "host {}", h.host);
            match dp {
                "xdp" => {
                    let x = h.xdp.as_ref().expect("xdp counters");
                    assert_eq!(
                        h.udp_rx_frames, 0,
                        "host {}: frames came through the kernel socket",
                        h.host
                    );
                    assert!(
                        x.rings.counters.rx_frames > 0,
                        "host {}: nothing crossed AF_XDP",
                        h.host
                    );
                    assert!(
                        x.verdicts.get("forward").copied().unwrap_or(0) > 0,
                        "host {}: {:?}",
                        h.host,
                        x.verdicts
                    );
                }
                _ => assert!(
                    h.udp_rx_frames > 0,
                    "host {}: nothing crossed the UDP socket",
                    h.host
                ),
            }
        }
    }

    pub fn edge(&self, s: &ClusterStats, from: &str, to: &str) -> (u64, u64) {
        s.edges
            .iter()
            .find(|e| e.from == from && e.to == to)
            .map(|e| (e.packets, e.bytes))
            .unwrap_or((0, 0))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self._serial.is_none() {
            return;
        }
        let o = self.cmd(&["cluster", "down"]);
        if !o.status.success() {
            eprintln!(
                "cleanup of {} failed: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let _ = std::fs::remove_dir_all(&self.tmp);
        // Nothing of the cluster may remain, also after a failed test.
        let left = netns::list(&format!("{}-", self.name));
        if !left.is_empty() && !std::thread::panicking() {
            panic!("namespaces left behind: {left:?}");
        }
    }
}

/// Captures every frame seen on `eth0` inside namespace `ns` until `stop` is called.
pub struct Capture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<Vec<u8>>>>,
}

impl Capture {
    pub fn start(ns: &str) -> Capture {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let ns = ns.to_string();
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            netns::enter(&ns).unwrap();
            // SAFETY: plain socket(2) call; the fd is owned right after.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    (libc::ETH_P_ALL as u16).to_be() as i32,
                )
            };
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: fd was just returned by socket(2) and is owned by nothing else.
            let sock = unsafe { OwnedFd::from_raw_fd(fd) };
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            // SAFETY: SO_RCVTIMEO reads a timeval of the given size.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            tx.send(()).unwrap();
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::SeqCst) {
                // SAFETY: recv writes at most buf.len() bytes into buf.
                let n = unsafe {
                    libc::recv(
                        sock.as_raw_fd(),
                        buf.as_mut_ptr() as *mut libc::c_void,
                        buf.len(),
                        0,
                    )
                };
                if n > 0 {
                    frames.push(buf[..n as usize].to_vec());
                }
            }
            frames
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("capture did not start");
        Capture {
            stop,
            handle: Some(handle),
        }
    }

    pub fn stop(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().unwrap().join().unwrap()
    }
}

/// Source MAC of a captured frame.
pub fn src_mac(f: &[u8]) -> [u8; 6] {
    f[6..12].try_into().unwrap()
}

pub fn dst_mac(f: &[u8]) -> [u8; 6] {
    f[0..6].try_into().unwrap()
}

/// Sends UDP datagrams of `size` bytes from inside `ns` to `dst` as fast as the stack
/// takes them, until `until`. Returns the datagrams sent.
pub fn udp_flood(
    ns: &str,
    dst: &str,
    size: usize,
    until: Instant,
    broadcast: bool,
) -> std::thread::JoinHandle<u64> {
    let ns = ns.to_string();
    let dst = dst.to_string();
    std::thread::spawn(move || {
        netns::enter(&ns).unwrap();
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_broadcast(broadcast).unwrap();
        let buf = vec![0x5au8; size];
        let mut sent = 0;
        while Instant::now() < until {
            if s.send_to(&buf, &dst).is_ok() {
                sent += 1;
            }
        }
        sent
    })
}

pub fn mac_bytes(s: &str) -> [u8; 6] {
    violin_common::wire::EthernetAddress::parse(s).unwrap().0
}

/// Sends `count` UDP datagrams of `size` bytes from inside `ns` to `dst`.
pub fn udp_send(ns: &str, dst: &str, size: usize, count: usize, broadcast: bool) {
    let (ns, dst) = (ns.to_string(), dst.to_string());
    std::thread::spawn(move || {
        netns::enter(&ns).unwrap();
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_broadcast(broadcast).unwrap();
        for _ in 0..count {
            s.send_to(&vec![0x5au8; size], &dst).unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
    })
    .join()
    .unwrap();
}

/// Attaches a new namespace `CLUSTER-SUFFIX` to the cluster's underlay bridge with
/// `ip/prefix` on its `eth0` (removed with the cluster: it carries the cluster prefix).
pub fn attach_to_underlay(c: &Cluster, suffix: &str, ip: std::net::Ipv4Addr, prefix: u8) -> String {
    use violin_dp::host::netlink;
    let ns = format!("{}-{suffix}", c.name);
    netns::create(&ns).unwrap();
    let bridge = c.info().bridge;
    let (outer, inner) = (
        format!("v{}{}", c.name, &suffix[..1]),
        format!("w{}{}", c.name, &suffix[..1]),
    );
    let f = netns::open(&ns).unwrap();
    let (o, i) = (outer.clone(), inner.clone());
    netlink::with_handle(|h| async move {
        netlink::add_veth(&h, &o, &i).await?;
        netlink::set_master(&h, &o, &bridge).await?;
        netlink::set_up(&h, &o).await?;
        netlink::move_to_netns(&h, &i, &f).await
    })
    .unwrap();
    netns::run_in(&ns, || {
        netlink::with_handle(|h| async move {
            netlink::rename(&h, &inner, "eth0").await?;
            netlink::add_addr(&h, "eth0", ip, prefix).await?;
            netlink::set_up(&h, "eth0").await?;
            netlink::set_up(&h, "lo").await
        })
    })
    .unwrap();
    ns
}

/// Runs an iperf3 client in `ns` against a one-shot server in `server_ns`; returns the
/// receiver's bits per second.
pub fn iperf(server_ns: &str, client_ns: &str, to: &str, secs: u32, reverse: bool) -> f64 {
    let run = |ns: &str, args: &[&str]| {
        std::process::Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()
            .expect("running iperf3")
    };
    let o = run(server_ns, &["iperf3", "-s", "-1", "-D"]);
    assert!(o.status.success(), "iperf3 server: {o:?}");
    std::thread::sleep(Duration::from_millis(300));
    let t = secs.to_string();
    let mut args = vec!["iperf3", "-c", to, "-t", &t, "-J"];
    if reverse {
        args.push("-R");
    }
    let o = run(client_ns, &args);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("iperf3 {client_ns} → {to}: {e}: {o:?}"));
    j["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3 {client_ns} → {to}: {j}"))
}

/// Runs each named test function (taking the data plane's name) once per data plane,
/// as `udp::NAME` and `xdp::NAME`.
#[macro_export]
macro_rules! on_both_dataplanes {
    ($($name:ident),* $(,)?) => {
        mod udp {
            $(#[test] fn $name() { super::$name("udp") })*
        }
        mod xdp {
            $(#[test] fn $name() { super::$name("xdp") })*
        }
    };
}
