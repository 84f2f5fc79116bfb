//! The configurations under test, each on the same simulated 2-host topology:
//!
//! - `physical`: the endpoints are the host namespaces, talking over the underlay;
//! - `kernel`: what a user would build without Violin — per host a Linux bridge with a
//!   kernel vxlan device (VNI 4242, UDP port 4790) and a guest namespace on a veth;
//! - `violin-udp`, `violin-xdp`: a Violin's lightweight guests on the daemons' socket
//!   ports, over each data plane;
//! - `violin-xdp-fast`: guests on fast ports (veths driven by AF_XDP).
//!
//! One fresh cluster per data plane; everything is removed on drop.

use anyhow::{Context, Result};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use violin_dp::cluster::{self, ClusterState, UpOptions};
use violin_dp::config::DataplaneChoice;
use violin_dp::host::{netlink, netns};

/// One side of a measurement: a namespace and the address to reach it at.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub ns: String,
    pub ip: Ipv4Addr,
}

/// A sender/receiver pair of one configuration.
#[derive(Debug, Clone)]
pub struct Pair {
    pub config: &'static str,
    pub client: Endpoint,
    pub server: Endpoint,
    /// Daemon pids whose CPU time counts as data-plane cost (empty: kernel only).
    pub daemons: Vec<u32>,
    /// The Violin it is (`None`: the kernel's paths).
    pub violin: Option<String>,
}

pub struct Testbed {
    pub name: String,
    pub run_dir: PathBuf,
    pub state: ClusterState,
    pub dataplane: &'static str,
    /// The underlay's MTU; guests get 50 bytes less (VXLAN over IPv4).
    pub mtu: u32,
    /// Open vSwitch instances started here (stopped on drop).
    ovs_dirs: Vec<PathBuf>,
}

/// Packet workers per host on every cluster the bench makes (`--workers`); unset:
/// each host's default.
pub static WORKERS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// How the xdp clusters' small frames leave (`--xdp-tx`); unset: the hosts' default.
pub static XDP_TX: std::sync::OnceLock<violin_dp::config::XdpTx> = std::sync::OnceLock::new();

/// Which underlay socket each Violin's datagrams queue on, on every cluster
/// (`--udp-steering`); unset: the hosts' default.
pub static UDP_STEERING: std::sync::OnceLock<violin_dp::config::UdpSteering> =
    std::sync::OnceLock::new();

/// Every cluster's `loud_violin_percent` (`--loud-violin-percent`); unset: the hosts'
/// default.
pub static LOUD: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

pub fn violin_bin() -> PathBuf {
    std::env::current_exe().unwrap().with_file_name("violin")
}

/// What a test Violin caps.
#[derive(Debug, Clone, Copy)]
pub enum Cap<'a> {
    None,
    /// The a–b link, at this rate (tc's units).
    Link(&'a str),
    /// Guest a's sending.
    Guest(&'a str),
}

impl Testbed {
    pub fn up(name: &str, dataplane: &'static str) -> Result<Testbed> {
        Testbed::up_hosts(name, dataplane, 2)
    }

    pub fn up_hosts(name: &str, dataplane: &'static str, hosts: usize) -> Result<Testbed> {
        Testbed::up_with(name, dataplane, hosts, None)
    }

    /// Two hosts on an underlay of this MTU (1500 elsewhere).
    pub fn up_mtu(name: &str, dataplane: &'static str, mtu: u32) -> Result<Testbed> {
        Testbed::up_opts(
            name,
            dataplane,
            &UpOptions {
                mtu,
                ..Testbed::options(dataplane, 2, None)
            },
        )
    }

    /// A cluster of `hosts` hosts whose daemons take up to `max_guests` guests each.
    pub fn up_with(
        name: &str,
        dataplane: &'static str,
        hosts: usize,
        max_guests: Option<usize>,
    ) -> Result<Testbed> {
        Testbed::up_opts(
            name,
            dataplane,
            &Testbed::options(dataplane, hosts, max_guests),
        )
    }

    pub fn options(dataplane: &str, hosts: usize, max_guests: Option<usize>) -> UpOptions {
        let dp = match dataplane {
            "xdp" => DataplaneChoice::Xdp,
            _ => DataplaneChoice::Udp,
        };
        UpOptions {
            hosts,
            subnet: "172.31.0.0/24".into(),
            dataplane: dp,
            mtu: 1500,
            xdp_single_socket: false,
            no_remote_checksum: false,
            no_xdp_multi_buffer: false,
            queues: 1,
            workers: WORKERS.get().copied(),
            xdp_attach: Default::default(),
            xdp_tx: XDP_TX.get().copied().unwrap_or_default(),
            udp_steering: UDP_STEERING.get().copied().unwrap_or_default(),
            max_guests,
            busy_poll_us: None,
            loud_violin_percent: LOUD.get().copied(),
            // The data path's figures leave etcd out; `--etcd-scale` measures it.
            etcd_members: 0,
            lease_ttl: violin_dp::config::DEFAULT_LEASE_TTL,
        }
    }

    /// A cluster brought up with these options.
    pub fn up_opts(name: &str, dataplane: &'static str, opts: &UpOptions) -> Result<Testbed> {
        let run_dir = std::env::temp_dir().join(format!("violin-bench-{name}"));
        let _ = cluster::down(&run_dir, name, &|_| {});
        let state = cluster::up(&run_dir, name, opts, &|_| {})?;
        Ok(Testbed {
            name: name.into(),
            run_dir,
            state,
            dataplane,
            mtu: opts.mtu,
            ovs_dirs: Vec::new(),
        })
    }

    pub fn daemons(&self) -> Vec<u32> {
        self.state.hosts.iter().map(|h| h.pid).collect()
    }

    /// Runs the `violin` CLI on this cluster; its output, or an error with its stderr.
    pub fn violin(&self, args: &[&str]) -> Result<String> {
        let o = std::process::Command::new(violin_bin())
            .arg("--cluster")
            .arg(&self.name)
            .env("VIOLIN_RUN_DIR", &self.run_dir)
            .args(args)
            .output()
            .context("running violin")?;
        anyhow::ensure!(
            o.status.success(),
            "violin {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Creates a Violin from spec text.
    pub fn up_spec(&self, name: &str, text: &str) -> Result<()> {
        let p = self.run_dir.join(format!("{name}.toml"));
        std::fs::write(&p, text)?;
        self.violin(&["up", &p.display().to_string()]).map(|_| ())
    }

    pub fn down_violin(&self, name: &str) -> Result<()> {
        self.violin(&["down", name]).map(|_| ())
    }

    /// The packet worker `violin` lives on, host by host.
    pub fn workers_of(&self, violin: &str) -> Result<Vec<Option<usize>>> {
        Ok(self.stats(violin)?.hosts.iter().map(|h| h.worker).collect())
    }

    pub fn stats(&self, violin: &str) -> Result<violin_dp::cli::ClusterStats> {
        Ok(serde_json::from_str(
            &self.violin(&["stats", violin, "--json"])?,
        )?)
    }

    /// A Violin of `guests` lightweight guests spread over both hosts, every pair allowed.
    pub fn violin_many(&self, name: &str, vni: u32, guests: usize) -> Result<()> {
        let mut spec = format!("name = \"{name}\"\nvni = {vni}\n");
        for j in 0..guests {
            spec += &format!(
                "[[guest]]\nname = \"g{j}\"\nhost = \"h{}\"\nip = \"10.60.{}.{}/16\"\n",
                j % 2 + 1,
                j / 250,
                j % 250 + 1
            );
        }
        self.up_spec(name, &spec)
    }

    /// A Violin of `guests` socket guests (`kind = "socket"`: just the socket) on h1.
    pub fn violin_sockets(&self, name: &str, vni: u32, guests: usize) -> Result<()> {
        let mut spec = format!("name = \"{name}\"\nvni = {vni}\n");
        for j in 0..guests {
            spec += &format!(
                "[[guest]]\nname = \"g{j}\"\nhost = \"h1\"\nkind = \"socket\"\nip = \"10.{}.{}.1/8\"\n",
                j / 250,
                j % 250 + 1
            );
        }
        self.up_spec(name, &spec)
    }

    /// Pids of the guest relays (`violin-dp guest`) of this cluster.
    pub fn relay_pids(&self) -> Vec<u32> {
        let prefix = format!("{}-", self.name);
        violin_dp::host::netns::other_pids()
            .filter(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
                args.get(1) == Some(&&b"guest"[..])
                    && args
                        .windows(2)
                        .any(|w| w[0] == b"--netns" && w[1].starts_with(prefix.as_bytes()))
            })
            .map(|p| p as u32)
            .collect()
    }

    pub fn violin_names(&self) -> Result<Vec<String>> {
        let v: serde_json::Value = serde_json::from_str(&self.violin(&["ls", "--json"])?)?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x["name"].as_str().map(String::from))
            .collect())
    }

    pub fn guest_ns(&self, violin: &str, guest: &str) -> String {
        format!("{}-{violin}-{guest}", self.name)
    }

    /// The MTU of guests on this underlay.
    pub fn guest_mtu(&self) -> u32 {
        self.mtu - 50
    }

    /// The hosts themselves.
    pub fn physical(&self) -> Pair {
        let h = &self.state.hosts;
        Pair {
            config: "physical",
            client: Endpoint {
                ns: h[0].netns.clone(),
                ip: h[0].underlay,
            },
            server: Endpoint {
                ns: h[1].netns.clone(),
                ip: h[1].underlay,
            },
            daemons: vec![],
            violin: None,
        }
    }

    /// A two-guest Violin `name` (guests a on h1, b on h2) with an optional a–b rate and
    /// the given port kind.
    pub fn violin_pair(
        &self,
        name: &str,
        vni: u32,
        subnet: u8,
        port: &str,
        rate: Option<&str>,
    ) -> Result<Pair> {
        let cap = rate.map_or(Cap::None, Cap::Link);
        self.violin_pair_capped(name, vni, subnet, port, cap)
    }

    /// The same, with the a–b link or guest a capped.
    pub fn violin_pair_capped(
        &self,
        name: &str,
        vni: u32,
        subnet: u8,
        port: &str,
        cap: Cap<'_>,
    ) -> Result<Pair> {
        let (link, guest) = match cap {
            Cap::Link(r) => (
                format!("[[link]]\nbetween = [\"a\", \"b\"]\nrate = \"{r}\"\n"),
                String::new(),
            ),
            Cap::Guest(r) => (String::new(), format!("rate = \"{r}\"\n")),
            Cap::None => (String::new(), String::new()),
        };
        let mtu = if self.mtu == 1500 {
            String::new()
        } else {
            format!("mtu = {}\n", self.guest_mtu())
        };
        // `dgram`: a socket port with QEMU's `-netdev dgram` framing (the guest's relay
        // plays QEMU's part), where `socket` has `-netdev stream`'s.
        let port_spec = match port {
            "dgram" => "port = \"socket\"\nsocket = \"dgram\"".to_string(),
            p => format!("port = \"{p}\""),
        };
        let spec = format!(
            "name = \"{name}\"\nvni = {vni}\n{mtu}[[guest]]\nname = \"a\"\nhost = \"h1\"\nip = \"10.{subnet}.0.1/24\"\n{port_spec}\n{guest}\
             [[guest]]\nname = \"b\"\nhost = \"h2\"\nip = \"10.{subnet}.0.2/24\"\n{port_spec}\n{link}"
        );
        self.up_spec(name, &spec)?;
        let config = match (self.dataplane, port) {
            ("xdp", "xdp") => "violin-xdp-fast",
            ("xdp", "tap") => "violin-xdp-tap",
            (_, "tap") => "violin-udp-tap",
            ("xdp", "dgram") => "violin-xdp-dgram",
            (_, "dgram") => "violin-udp-dgram",
            ("xdp", _) => "violin-xdp",
            _ => "violin-udp",
        };
        Ok(Pair {
            config,
            client: Endpoint {
                ns: self.guest_ns(name, "a"),
                ip: Ipv4Addr::new(10, subnet, 0, 1),
            },
            server: Endpoint {
                ns: self.guest_ns(name, "b"),
                ip: Ipv4Addr::new(10, subnet, 0, 2),
            },
            daemons: self.daemons(),
            violin: Some(name.to_string()),
        })
    }

    /// Shapes every host's underlay link to `rate` (tc's units, e.g. "1gbit") with a
    /// token bucket filter, or removes the shaping (`None`). The paper's cluster network
    /// was the bottleneck: this is how the simulated underlay becomes one. The filter sits
    /// on the bridge side of each host's veth (traffic *to* the host): AF_XDP transmits
    /// straight to the driver, past any qdisc on the host's own `eth0`, so shaping there
    /// would leave the xdp data plane unshaped. (tc's TBF options have no rtnetlink
    /// builder, so this runs `tc`.)
    pub fn shape_underlay(&self, rate: Option<&str>) -> Result<()> {
        for i in 1..=self.state.hosts.len() {
            let dev = format!("v{}h{i}", self.name);
            let mut c = std::process::Command::new("tc");
            match rate {
                Some(r) => c.args([
                    "qdisc", "replace", "dev", &dev, "root", "tbf", "rate", r, "burst", "256kb",
                    "latency", "20ms",
                ]),
                None => c.args(["qdisc", "del", "dev", &dev, "root"]),
            };
            let o = c.output().context("running tc")?;
            anyhow::ensure!(
                o.status.success() || rate.is_none(),
                "tc on {dev}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(())
    }

    /// Open vSwitch with its userspace datapath (`datapath_type=netdev`) and a VXLAN
    /// tunnel port per host, a guest namespace on a veth port: the other peer a user
    /// might deploy. Per host an ovsdb-server and an ovs-vswitchd run inside the host's
    /// namespace, and the underlay address moves to OVS's `br-phy` (userspace tunnels
    /// route through it), so this testbed serves OVS alone. Driven with OVS's own tools.
    pub fn ovs_overlay(&mut self) -> Result<Pair> {
        let h = self.state.hosts.clone();
        let mut ends = Vec::new();
        let mut pids = Vec::new();
        for (i, host) in h.iter().enumerate() {
            let dir = self.run_dir.join(format!("ovs-{}", host.name));
            std::fs::create_dir_all(&dir)?;
            self.ovs_dirs.push(dir.clone());
            let d = |f: &str| dir.join(f).display().to_string();
            let db = format!("unix:{}", d("db.sock"));
            let sh = |args: &[&str]| -> Result<()> {
                let mut c = crate::load::ns_command(&host.netns, args[0])?;
                c.args(&args[1..])
                    .env("OVS_RUNDIR", &dir)
                    .env("OVS_DBDIR", &dir);
                let o = c.output().with_context(|| format!("running {}", args[0]))?;
                anyhow::ensure!(
                    o.status.success(),
                    "{:?}: {}",
                    args,
                    String::from_utf8_lossy(&o.stderr)
                );
                Ok(())
            };
            sh(&[
                "ovsdb-tool",
                "create",
                &d("conf.db"),
                "/usr/share/openvswitch/vswitch.ovsschema",
            ])
            .context("Open vSwitch is needed for the ovs peer (scripts/setup.sh installs it)")?;
            sh(&[
                "ovsdb-server",
                &d("conf.db"),
                &format!("--remote=p{db}"),
                &format!("--pidfile={}", d("ovsdb.pid")),
                "--detach",
                &format!("--log-file={}", d("ovsdb.log")),
                &format!("--unixctl={}", d("ovsdb.ctl")),
            ])?;
            sh(&["ovs-vsctl", &format!("--db={db}"), "--no-wait", "init"])?;
            sh(&[
                "ovs-vswitchd",
                &db,
                &format!("--pidfile={}", d("vswitchd.pid")),
                "--detach",
                &format!("--log-file={}", d("vswitchd.log")),
                &format!("--unixctl={}", d("vswitchd.ctl")),
            ])?;
            for f in ["ovsdb.pid", "vswitchd.pid"] {
                if let Some(p) = std::fs::read_to_string(dir.join(f))
                    .ok()
                    .and_then(|t| t.trim().parse::<u32>().ok())
                {
                    pids.push(p);
                }
            }
            let vs = |args: &[&str]| {
                let mut a = vec!["ovs-vsctl", "--timeout=10"];
                let dbarg = format!("--db={db}");
                a.push(&dbarg);
                a.extend_from_slice(args);
                sh(&a)
            };
            let (ip, other) = (host.underlay, h[1 - i].underlay);
            vs(&[
                "add-br",
                "br-phy",
                "--",
                "set",
                "bridge",
                "br-phy",
                "datapath_type=netdev",
            ])?;
            vs(&["add-port", "br-phy", "eth0"])?;
            netns::run_in(&host.netns, || {
                netlink::with_handle(|hd| async move {
                    netlink::flush_addrs(&hd, "eth0").await?;
                    netlink::add_addr(&hd, "br-phy", ip, 24).await?;
                    netlink::set_up(&hd, "br-phy").await
                })
            })?;
            vs(&[
                "add-br",
                "br-int",
                "--",
                "set",
                "bridge",
                "br-int",
                "datapath_type=netdev",
            ])?;
            vs(&[
                "add-port",
                "br-int",
                "vx0",
                "--",
                "set",
                "interface",
                "vx0",
                "type=vxlan",
                &format!("options:remote_ip={other}"),
                "options:key=4243",
                "options:dst_port=4791",
            ])?;
            let gns = format!("{}-og{}", self.name, i + 1);
            let gip = Ipv4Addr::new(10, 251, 0, i as u8 + 1);
            netns::create(&gns)?;
            let gfile = netns::open(&gns)?;
            netns::run_in(&host.netns, || {
                netlink::with_handle(|hd| async move {
                    netlink::add_veth(&hd, "ovh", "ovg").await?;
                    netlink::set_up(&hd, "ovh").await?;
                    netlink::move_to_netns(&hd, "ovg", &gfile).await
                })
            })?;
            vs(&["add-port", "br-int", "ovh"])?;
            // The userspace datapath takes no TSO/GSO super-frames or partial checksums
            // from its ports (userspace TSO is experimental): TCP stalls unless the
            // guest's veth computes checksums and segments itself, as OVS documents.
            for (ns, dev) in [(host.netns.as_str(), "ovh"), (gns.as_str(), "ovg")] {
                let o = crate::load::ns_command(ns, "ethtool")?
                    .args(["-K", dev, "tx", "off", "tso", "off", "gso", "off"])
                    .output()
                    .context("running ethtool")?;
                anyhow::ensure!(
                    o.status.success(),
                    "ethtool -K {dev}: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            guest_end(&gns, "ovg", gip, self.guest_mtu())?;
            ends.push(Endpoint { ns: gns, ip: gip });
        }
        Ok(Pair {
            config: "ovs",
            client: ends[0].clone(),
            server: ends[1].clone(),
            daemons: pids,
            violin: None,
        })
    }

    /// Every host namespace, at its underlay address.
    pub fn hosts(&self) -> Vec<Endpoint> {
        self.state
            .hosts
            .iter()
            .map(|h| Endpoint {
                ns: h.netns.clone(),
                ip: h.underlay,
            })
            .collect()
    }

    /// A Violin `name` with one guest per host (g1 on h1, …) at 10.SUBNET.0.i/24, every
    /// pair allowed, on `port` ports.
    pub fn violin_per_host(
        &self,
        name: &str,
        vni: u32,
        subnet: u8,
        port: &str,
    ) -> Result<Vec<Endpoint>> {
        let mut spec = format!("name = \"{name}\"\nvni = {vni}\n");
        let n = self.state.hosts.len();
        for i in 1..=n {
            spec += &format!(
                "[[guest]]\nname = \"g{i}\"\nhost = \"h{i}\"\nip = \"10.{subnet}.0.{i}/24\"\nport = \"{port}\"\n"
            );
        }
        self.up_spec(name, &spec)?;
        Ok((1..=n)
            .map(|i| Endpoint {
                ns: self.guest_ns(name, &format!("g{i}")),
                ip: Ipv4Addr::new(10, subnet, 0, i as u8),
            })
            .collect())
    }

    /// The kernel overlay: bridge + vxlan per host, a guest namespace on each bridge.
    pub fn kernel_overlay(&self) -> Result<Pair> {
        let h = &self.state.hosts;
        let mtu = self.guest_mtu();
        let mut ends = Vec::new();
        for (i, host) in h.iter().enumerate() {
            let other = h[1 - i].underlay;
            let local = host.underlay;
            let gns = format!("{}-kguest{}", self.name, i + 1);
            let gip = Ipv4Addr::new(10, 250, 0, i as u8 + 1);
            netns::create(&gns)?;
            let gfile = netns::open(&gns)?;
            netns::run_in(&host.netns, || {
                netlink::with_handle(|hd| async move {
                    netlink::add_bridge(&hd, "kbr0").await?;
                    let vx = rtnetlink::LinkVxlan::new("kvx0", 4242)
                        .port(4790)
                        .local(local)
                        .remote(other)
                        .learning(true)
                        .build();
                    hd.link().add(vx).execute().await?;
                    netlink::set_master(&hd, "kvx0", "kbr0").await?;
                    netlink::add_veth(&hd, "kvh", "kvg").await?;
                    netlink::set_master(&hd, "kvh", "kbr0").await?;
                    for l in ["kbr0", "kvx0", "kvh"] {
                        netlink::set_mtu(&hd, l, mtu).await?;
                        netlink::set_up(&hd, l).await?;
                    }
                    netlink::move_to_netns(&hd, "kvg", &gfile).await
                })
            })?;
            guest_end(&gns, "kvg", gip, mtu)?;
            ends.push(Endpoint { ns: gns, ip: gip });
        }
        Ok(Pair {
            config: "kernel",
            client: ends[0].clone(),
            server: ends[1].clone(),
            daemons: vec![],
            violin: None,
        })
    }
}

/// Inside a peer's guest namespace: its veth end becomes `eth0` at `ip`/24, MTU `mtu`.
fn guest_end(ns: &str, dev: &'static str, ip: Ipv4Addr, mtu: u32) -> Result<()> {
    netns::run_in(ns, || {
        netlink::with_handle(|hd| async move {
            netlink::rename(&hd, dev, "eth0").await?;
            netlink::set_mtu(&hd, "eth0", mtu).await?;
            netlink::add_addr(&hd, "eth0", ip, 24).await?;
            netlink::set_up(&hd, "eth0").await?;
            netlink::set_up(&hd, "lo").await
        })
    })
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for dir in &self.ovs_dirs {
            for f in ["vswitchd.pid", "ovsdb.pid"] {
                if let Some(p) = std::fs::read_to_string(dir.join(f))
                    .ok()
                    .and_then(|t| t.trim().parse::<i32>().ok())
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        if let Err(e) = cluster::down(&self.run_dir, &self.name, &|_| {}) {
            eprintln!("warning: removing bench cluster {}: {e:#}", self.name);
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}
