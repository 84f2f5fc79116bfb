//! The cluster's state in etcd: a mirror that survives compaction (etcd on loopback),
//! and simulated clusters whose hosts join, drop out and catch up through etcd.

mod common;

use common::{can_run, Cluster, PAIRS};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use violin_dp::store::{Keys, Mirror, Step, Store};

/// One etcd member on loopback, in a directory of its own; killed and removed on drop.
struct LoopbackEtcd {
    child: Child,
    dir: PathBuf,
    url: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl LoopbackEtcd {
    /// None (after printing why) where etcd is not installed; CI installs it.
    fn start() -> Option<LoopbackEtcd> {
        if Command::new("etcd").arg("--version").output().is_err() {
            assert!(
                std::env::var_os("CI").is_none(),
                "etcd is not installed: scripts/setup.sh installs it"
            );
            eprintln!("SKIPPED: etcd is not installed (scripts/setup.sh installs it)");
            return None;
        }
        let (client, peer) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("violin-etcd-{}-{client}", std::process::id()));
        let url = format!("http://127.0.0.1:{client}");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(&dir)
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer}"),
                "--log-level",
                "error",
                "--logger",
                "zap",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting etcd");
        let e = LoopbackEtcd { child, dir, url };
        let t0 = Instant::now();
        while Store::connect(std::slice::from_ref(&e.url), None, "x")
            .and_then(|mut s| s.revision())
            .is_err()
        {
            assert!(t0.elapsed() < Duration::from_secs(20), "etcd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(e)
    }
}

impl Drop for LoopbackEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A mirror whose next revision was compacted away is told to list again, and the
/// list brings it to the store's state (keys changed, added and removed meanwhile).
#[test]
fn a_mirror_lists_again_after_a_compaction() {
    let Some(e) = LoopbackEtcd::start() else {
        return;
    };
    let mut s = Store::connect(std::slice::from_ref(&e.url), None, "mir").unwrap();
    let keys = Keys::new("mir");
    s.put_spec("a", "1").unwrap();
    s.put_spec("gone", "x").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut c = rt
        .block_on(violin_dp::store::connect(
            std::slice::from_ref(&e.url),
            None,
        ))
        .unwrap();
    let mut m = Mirror::new(&keys.config());
    let first = rt.block_on(m.list(&mut c)).unwrap();
    assert_eq!(first, vec!["specs/a", "specs/gone"]);
    // While the mirror is not watching: changes, then a compaction past them all.
    s.put_spec("a", "2").unwrap();
    s.delete_spec("gone").unwrap();
    let last = s.put_spec("b", "1").unwrap();
    s.compact(last).unwrap();
    let step = rt.block_on(async {
        let mut w = m.watch(&mut c).await.unwrap();
        next_step(&mut m, &mut w).await
    });
    assert!(
        matches!(&step, Step::Relist(why) if why.contains("compacted")),
        "{step:?}"
    );
    let changed = rt.block_on(m.list(&mut c)).unwrap();
    assert_eq!(changed, vec!["specs/a", "specs/b", "specs/gone"]);
    let now: Vec<(&str, &[u8])> = m.under("specs/").map(|(k, v, _)| (k, v)).collect();
    assert_eq!(now, vec![("a", &b"2"[..]), ("b", &b"1"[..])]);
    assert_eq!(m.revision, last);
    assert_eq!(m.lists, 2);
    // And a watch from there sees what comes next.
    s.put_spec("c", "1").unwrap();
    let step = rt.block_on(async {
        let mut w = m.watch(&mut c).await.unwrap();
        next_step(&mut m, &mut w).await
    });
    assert_eq!(step, Step::Changed(vec!["specs/c".into()]));
}

/// The first watch response that changes something or ends the watch.
async fn next_step(m: &mut Mirror, w: &mut etcd_client::WatchStream) -> Step {
    loop {
        let r = tokio::time::timeout(Duration::from_secs(5), w.message())
            .await
            .expect("the watch answered")
            .unwrap()
            .expect("a response");
        match m.apply(&r) {
            Step::Changed(k) if k.is_empty() => continue,
            other => return other,
        }
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// Continues a stopped process when dropped (a failing test must not leave a daemon
/// stopped: `cluster down` would wait for it).
struct Resume(u32);
impl Drop for Resume {
    fn drop(&mut self) {
        signal(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

fn ls(c: &Cluster) -> serde_json::Value {
    serde_json::from_str(&c.ok(&["ls", "--json"])).unwrap()
}

/// Polls `f` every 100 ms until it holds; returns how long that took.
fn within(t: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < t, "{what}: not within {} s", t.as_secs());
        std::thread::sleep(Duration::from_millis(100));
    }
    t0.elapsed()
}

/// Three members, one killed: creating, reaching and removing a Violin work as before.
/// A guest reaches neither etcd nor a daemon's endpoints.
#[test]
fn losing_one_of_three_etcd_members_changes_nothing_visible() {
    if !can_run() {
        return;
    }
    let c = Cluster::up_etcd(2, "udp", &["--etcd-members", "3"]);
    let info = c.info();
    assert_eq!(info.etcd.len(), 3);
    // Guests are on the Violin's network only.
    c.up_spec("blue.toml", PAIRS);
    for (addr, port) in [
        (info.etcd[0].underlay, 2379),
        (info.etcd[0].mgmt, 2379),
        (info.hosts[0].underlay, 9464),
        (info.hosts[1].underlay, 4789),
    ] {
        let o = c.cmd(&[
            "exec",
            "blue",
            "a",
            "--",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{addr}/{port}"),
        ]);
        assert!(
            !o.status.success(),
            "guest a reached {addr}:{port} on the underlay"
        );
    }
    c.ok(&["down", "blue"]);
    signal(info.etcd[0].pid, nix::sys::signal::Signal::SIGKILL);
    c.up_spec("blue.toml", PAIRS);
    assert!(c.ping_until("blue", "a", "10.0.0.2", Duration::from_secs(10)));
    let l = ls(&c);
    assert_eq!(l[0]["attached"], 3, "{l}");
    c.ok(&[
        "scale",
        "blue",
        "--add",
        "name=d,host=h1,ip=10.0.0.4/24",
        "--link",
        "a",
    ]);
    assert!(c.ping_until("blue", "d", "10.0.0.1", Duration::from_secs(10)));
    c.ok(&["down", "blue"]);
    assert_eq!(ls(&c), serde_json::json!([]));
}

/// Sets a host's underlay link up or down (a network partition), from inside its
/// namespace.
fn underlay(ns: &str, up: bool) {
    use violin_dp::host::{netlink, netns};
    netns::run_in(ns, || {
        netlink::with_handle(|h| async move {
            if up {
                netlink::set_up(&h, "eth0").await
            } else {
                netlink::set_down(&h, "eth0").await
            }
        })
    })
    .unwrap();
}

/// Heals a partition when dropped (also when the test fails).
struct Heal(String);
impl Drop for Heal {
    fn drop(&mut self) {
        underlay(&self.0, true);
    }
}

/// A daemon stopped for longer than its lease is shown down with its guests lost, and
/// comes back by itself.
#[test]
fn a_host_stopped_past_its_lease_is_shown_down_then_comes_back() {
    if !can_run() {
        return;
    }
    let c = Cluster::up_etcd(2, "udp", &["--lease-ttl", "3"]);
    c.up_spec("blue.toml", PAIRS);
    let info = c.info();
    let h2 = info.hosts[1].pid;
    signal(h2, nix::sys::signal::Signal::SIGSTOP);
    let resume = Resume(h2);
    let took = within(Duration::from_secs(8), "h2 shown down", || {
        let l = ls(&c);
        l[0]["lost"] == 2 && l[0]["hosts"][1] == "h2(down)"
    });
    eprintln!(
        "h2 shown down {:.1} s after it stopped (lease 3 s)",
        took.as_secs_f64()
    );
    drop(resume);
    within(Duration::from_secs(10), "h2 back", || {
        let l = ls(&c);
        l[0]["attached"] == 3 && l[0]["lost"] == 0
    });
    assert!(c.host_log("h2").contains("the lease expired"));
    assert!(c.ping_until("blue", "a", "10.0.0.2", Duration::from_secs(10)));
}

/// A host cut off from etcd past its lease is shown down; a change meanwhile times out
/// naming it, and etcd's history is compacted past it. When the partition heals the
/// host re-registers, finds its watch's revision compacted, lists again and carries the
/// change out.
#[test]
fn a_partitioned_host_lists_again_after_a_compaction_and_catches_up() {
    if !can_run() {
        return;
    }
    let c = Cluster::up_etcd(2, "udp", &["--lease-ttl", "3"]);
    c.up_spec("blue.toml", PAIRS);
    let info = c.info();
    underlay(&info.hosts[1].netns, false);
    let heal = Heal(info.hosts[1].netns.clone());
    within(Duration::from_secs(8), "h2 shown down", || {
        ls(&c)[0]["hosts"][1] == "h2(down)"
    });
    let o = c.cmd(&[
        "scale",
        "blue",
        "--add",
        "name=d,host=h2,ip=10.0.0.4/24",
        "--link",
        "a",
        "--timeout",
        "2",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("h2 (down"), "{err}");
    let mut s = Store::connect(&info.etcd_endpoints(), info.etcd_admin.as_ref(), &c.name).unwrap();
    let rev = s.revision().unwrap();
    s.compact(rev).unwrap();
    drop(heal);
    let took = within(Duration::from_secs(20), "h2 back with guest d", || {
        let l = ls(&c);
        l[0]["guests"] == 4 && l[0]["attached"] == 4 && l[0]["lost"] == 0
    });
    eprintln!(
        "h2 caught up {:.1} s after the partition healed",
        took.as_secs_f64()
    );
    assert!(c.ping_until("blue", "a", "10.0.0.4", Duration::from_secs(10)));
    let log = c.host_log("h2");
    assert!(
        log.contains("compacted") && log.contains("listing again"),
        "{log}"
    );
}

/// A daemon that comes back after its Violin was removed meanwhile removes it too:
/// its local state is a cache of etcd.
#[test]
fn a_restarted_daemon_rebuilds_from_etcd() {
    if !can_run() {
        return;
    }
    let c = Cluster::up_etcd(2, "udp", &["--lease-ttl", "3"]);
    c.up_spec("blue.toml", PAIRS);
    let info = c.info();
    for pid in [info.hosts[1].keeper, info.hosts[1].pid] {
        signal(pid, nix::sys::signal::Signal::SIGKILL);
    }
    let o = c.cmd(&["down", "blue", "--timeout", "2"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("h2"));
    assert!(
        netns_exists(&c.guest_ns("blue", "b")),
        "h2's guests stay while it is away"
    );
    c.ok(&["cluster", "restart", "h2"]);
    within(Duration::from_secs(10), "h2 removed blue", || {
        !netns_exists(&c.guest_ns("blue", "b")) && ls(&c) == serde_json::json!([])
    });
}

fn netns_exists(name: &str) -> bool {
    violin_dp::host::netns::exists(name)
}

/// The CLI in a mount namespace where the run directory is empty needs only `--etcd`.
#[test]
fn the_cli_needs_only_etcd() {
    if !can_run() {
        return;
    }
    let c = Cluster::up_etcd(2, "udp", &[]);
    let info = c.info();
    let url = info.etcd_endpoints().join(",");
    // The CLI's certificate, where an operator would keep it (not in the run directory).
    let tls = info.etcd_tls.as_ref().expect("the CLI has a certificate");
    let certs = c.run_dir.parent().unwrap().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let mut flags = String::new();
    for (flag, from) in [("ca", &tls.ca), ("cert", &tls.cert), ("key", &tls.key)] {
        let to = certs.join(from.file_name().unwrap());
        std::fs::copy(from, &to).unwrap();
        flags += &format!(" --etcd-{flag} {}", to.display());
    }
    let spec = c.write_spec("blue.toml", PAIRS);
    let run = c.run_dir.display().to_string();
    let violin = env!("CARGO_BIN_EXE_violin");
    // Runs `violin` commands in a mount namespace whose run directory is empty.
    let without_state = |cmds: &str| {
        let script = format!(
            "set -e; mount -t tmpfs none {run}; test -z \"$(ls -A {run})\"; \
             V='{violin} --cluster {name} --etcd {url}{flags}'; {cmds}",
            name = c.name
        );
        let o = Command::new("unshare")
            .args(["-m", "sh", "-c", &script])
            .env("VIOLIN_RUN_DIR", &c.run_dir)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "{cmds}: {out}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    };
    let out = without_state(&format!(
        "if {violin} --cluster {} ls 2>/dev/null; then echo 'ls without etcd worked'; exit 1; fi; \
         $V up {spec}; $V ls --json",
        c.name
    ));
    assert!(out.contains("\"attached\": 3"), "{out}");
    assert!(c.ping("blue", "a", "10.0.0.2", 3));
    // Counters come from each host's metrics server, found through etcd.
    let out = without_state("$V stats blue --json");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ab = stats["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["from"] == "a" && e["to"] == "b")
        .unwrap_or_else(|| panic!("no a→b edge: {out}"));
    assert!(ab["packets"].as_u64().unwrap() >= 3, "{out}");
    // A move is carried out by the two hosts, through etcd.
    let a_host = |c: &Cluster| {
        let s = c.stats("blue");
        let h: Vec<String> = s
            .hosts
            .iter()
            .filter(|h| h.ports.iter().any(|p| p.name == "a"))
            .map(|h| h.host.clone())
            .collect();
        h
    };
    let from = a_host(&c).pop().expect("a runs somewhere");
    let to = if from == "h1" { "h2" } else { "h1" };
    let out = without_state(&format!("$V migrate blue a --to {to} --json"));
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (m["from"].as_str(), m["to"].as_str()),
        (Some(from.as_str()), Some(to)),
        "{m}"
    );
    assert_eq!(a_host(&c), vec![to.to_string()]);
    assert!(c.ping("blue", "b", "10.0.0.1", 3), "b reaches a on {to}");
    // Drops stream from each host's metrics server: a has no link to c (a is told c's
    // MAC, so it sends to c rather than asking for it).
    let mac_c = violin_dp::spec::derive_mac(101, "c").to_string();
    c.ok(&[
        "exec", "blue", "a", "--", "ip", "neigh", "replace", "10.0.0.3", "lladdr", &mac_c, "dev",
        "eth0",
    ]);
    let pinger = c
        .command(&[
            "exec",
            "blue",
            "a",
            "--",
            "sh",
            "-c",
            "sleep 1; ping -q -c 150 -i 0.01 -W 1 10.0.0.3",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = without_state("$V monitor blue --json --drops --rate 50 --seconds 3");
    let _ = { pinger }.wait();
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["reason"] == "no_link" && e["host"] == to && e["from"] == "a"),
        "no no_link drop of a on {to}: {out}"
    );
    assert!(
        events.len() <= 5 * 50,
        "{} events at 50 a second",
        events.len()
    );
    without_state("$V down blue");
    assert_eq!(ls(&c), serde_json::json!([]));
}

/// Only the right parties write: a host its own keys, the CLI specs; a client without
/// a certificate of the cluster's CA gets nothing.
#[test]
fn each_party_writes_only_its_own_keys() {
    if !can_run() {
        return;
    }
    let c = Cluster::up_etcd(2, "udp", &[]);
    let info = c.info();
    let eps = info.etcd_endpoints();
    let pki = c.run_dir.join(&c.name).join("pki");
    let id = |who: &str| violin_dp::config::EtcdTls {
        ca: pki.join("ca.pem"),
        cert: pki.join(format!("{who}.pem")),
        key: pki.join(format!("{who}.key")),
    };
    let keys = Keys::new(&c.name);
    let cases = [
        ("h1", keys.status("h1"), true),
        ("h1", keys.status("h2"), false),
        ("h1", keys.host("h2"), false),
        ("h1", keys.spec("evil"), false),
        ("h1", keys.migration("blue"), false),
        ("violin", keys.spec("fine"), true),
        ("violin", keys.migration("fine"), true),
        ("violin", keys.status("h1"), false),
        ("violin", keys.host("h1"), false),
    ];
    // h1's own status is its daemon's: the test writes the same back.
    let own = Store::connect(&eps, Some(&id("violin")), &c.name)
        .unwrap()
        .hosts()
        .unwrap()
        .into_iter()
        .find(|h| h.record.name == "h1")
        .and_then(|h| h.report)
        .expect("h1 reported");
    for (who, key, allowed) in cases {
        let mut s = Store::connect(&eps, Some(&id(who)), &c.name).unwrap();
        let value = if key == keys.status("h1") {
            serde_json::to_vec(&own).unwrap()
        } else {
            b"x".to_vec()
        };
        let r = s.put_raw(&key, &value, None);
        assert_eq!(r.is_ok(), allowed, "{who} writing {key}: {r:?}");
        if let Err(e) = r {
            assert!(format!("{e:#}").contains("permission denied"), "{e:#}");
        }
    }
    let mut s = Store::connect(&eps, Some(&id("violin")), &c.name).unwrap();
    s.delete_spec("fine").unwrap();
    s.delete_migration("fine").unwrap();
    // No certificate, or plain HTTP: no answer at all.
    let plain: Vec<String> = eps.iter().map(|e| e.replace("https", "http")).collect();
    assert!(Store::connect(&plain, None, &c.name).is_err());
    let ca_only = violin_dp::config::EtcdTls {
        cert: pki.join("ca.pem"),
        key: pki.join("ca.key"),
        ..id("violin")
    };
    let r = Store::connect(&eps, Some(&ca_only), &c.name).and_then(|mut s| s.put_spec("x", "y"));
    assert!(
        r.is_err(),
        "the CA's own certificate (no user) wrote a spec"
    );
}

/// The README's recipe for joining a host on a real cluster works as written: a
/// certificate made with openssl from the cluster's CA, a role and user made with
/// etcdctl; the new host may write its own keys and no other.
#[test]
fn the_readme_recipe_for_joining_a_host_works() {
    if !can_run() {
        return;
    }
    let c = Cluster::up_etcd(1, "udp", &[]);
    let info = c.info();
    let pki = c.run_dir.join(&c.name).join("pki");
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    // The sh block after "Joining host `h7`".
    let recipe = readme
        .split("Joining host `h7`")
        .nth(1)
        .and_then(|r| r.split("```sh\n").nth(1))
        .and_then(|r| r.split("```").next())
        .expect("the recipe in the README");
    let script = recipe
        .replace("https://10.0.0.11:2379", &info.etcd_endpoints()[0])
        .replace("/violin/prod/", &format!("/violin/{}/", c.name));
    let o = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(&pki)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{script}\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let h7 = violin_dp::config::EtcdTls {
        ca: pki.join("ca.pem"),
        cert: pki.join("h7.pem"),
        key: pki.join("h7.key"),
    };
    let keys = Keys::new(&c.name);
    let mut s = Store::connect(&info.etcd_endpoints(), Some(&h7), &c.name).unwrap();
    for k in [keys.host("h7"), keys.alive("h7"), keys.status("h7")] {
        s.put_raw(&k, b"{}", None)
            .unwrap_or_else(|e| panic!("h7 writing {k}: {e:#}"));
    }
    for k in [keys.host("h1"), keys.status("h1"), keys.spec("x")] {
        assert!(s.put_raw(&k, b"x", None).is_err(), "h7 wrote {k}");
    }
}
