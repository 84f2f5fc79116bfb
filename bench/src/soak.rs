//! The soak (`cargo xtask soak [--minutes N]`): 16 Violins × 32 lightweight guests on 4
//! simulated hosts (xdp plane; socket, tap and fast ports mixed; every Violin on the
//! same 10.70.0.0/24), run for N minutes under mixed traffic — a ping in every Violin
//! throughout, a TCP transfer and a UDP flood each minute, a guest joining and leaving
//! each minute, one hard daemon restart halfway. Every minute it samples each daemon's
//! resident memory, open descriptors and AF_XDP frame pool, and the cluster's process
//! count; at the end, with traffic stopped, it checks what the issue asks: resident
//! memory grew at most 5 %, no frame is missing from the pools, no descriptor or
//! process was left behind by the guests that came and went.

use crate::load;
use crate::testbed::Testbed;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::net::Ipv4Addr;
use std::process::Child;
use std::time::{Duration, Instant};

const VIOLINS: usize = 16;
const GUESTS: usize = 32;
const HOSTS: usize = 4;

/// One minute's sample of one host.
#[derive(Debug, Clone, Serialize)]
pub struct HostSample {
    pub host: String,
    pub pid: u32,
    pub rss_kib: u64,
    pub fds: usize,
    /// AF_XDP frames free in the pool, and the pool's size (xdp plane).
    pub free_frames: usize,
    pub pool_frames: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub minute: f64,
    pub hosts: Vec<HostSample>,
    /// Processes in the cluster's namespaces (relays, daemons, keepers, guests' own).
    pub processes: usize,
    pub note: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Soak {
    pub minutes: f64,
    pub guests: usize,
    pub samples: Vec<Sample>,
    /// Per host: resident memory at the end against the first sample after its daemon
    /// (re)started, as a fraction (0.03 = 3 % more).
    pub rss_growth: Vec<(String, f64)>,
    pub pings_sent: u64,
    pub pings_received: u64,
    pub joins: usize,
    pub failures: Vec<String>,
}

fn spec(v: usize) -> String {
    let mut s = format!("name = \"s{v}\"\nvni = {}\n", 700 + v);
    for g in 0..GUESTS {
        // Guests round-robin over the hosts; one Violin in four uses taps (the default),
        // one in four fast ports, the rest relays on sockets.
        let port = match v % 4 {
            1 => "",
            2 => "port = \"xdp\"\n",
            _ => "port = \"socket\"\n",
        };
        s += &format!(
            "[[guest]]\nname = \"g{g}\"\nhost = \"h{}\"\nip = \"10.70.0.{}/24\"\n{port}",
            g % HOSTS + 1,
            g + 1
        );
    }
    s
}

fn count_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn sample(tb: &Testbed, minute: f64, note: &str) -> Result<Sample> {
    let state = violin_dp::cluster::load(&tb.run_dir, &tb.name)?;
    let mut hosts = Vec::new();
    for h in &state.hosts {
        let st: violin_dp::control::HostViolinStats = violin_dp::control::call(
            &h.control,
            &violin_dp::control::Request::Stats { name: "s0".into() },
        )?;
        let rings = st.xdp.as_ref().map(|x| x.rings);
        hosts.push(HostSample {
            host: h.name.clone(),
            pid: h.pid,
            rss_kib: load::rss_kib(&[h.pid]),
            fds: count_fds(h.pid),
            free_frames: rings.map_or(0, |r| r.free_frames),
            pool_frames: rings.map_or(0, |r| r.pool_frames),
        });
    }
    let prefix = format!("{}-", tb.name);
    let processes = violin_dp::host::netns::list(&prefix)
        .iter()
        .map(|ns| violin_dp::host::netns::pids_in(ns).len())
        .sum();
    Ok(Sample {
        minute,
        hosts,
        processes,
        note: note.into(),
    })
}

fn print(s: &Sample) {
    let hosts: Vec<String> = s
        .hosts
        .iter()
        .map(|h| {
            format!(
                "{} rss {} KiB fds {} frames {}/{}",
                h.host, h.rss_kib, h.fds, h.free_frames, h.pool_frames
            )
        })
        .collect();
    eprintln!(
        "  [{:5.1} min] processes {} | {} {}",
        s.minute,
        s.processes,
        hosts.join(" | "),
        s.note
    );
}

/// Parses `ping -q`'s summary: (transmitted, received).
fn ping_counts(out: &str) -> (u64, u64) {
    let line = out
        .lines()
        .find(|l| l.contains("transmitted"))
        .unwrap_or("");
    let num = |word: &str| {
        line.split(',')
            .find(|p| p.contains(word))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (num("transmitted"), num("received"))
}

pub fn run(minutes: f64) -> Result<Soak> {
    let id = std::process::id() % 10000;
    eprintln!(
        "soak: {VIOLINS} Violins × {GUESTS} guests on {HOSTS} hosts (xdp plane), {minutes} min"
    );
    let tb = Testbed::up_with(&format!("sk{id}"), "xdp", HOSTS, Some(2048))?;
    let t0 = Instant::now();
    for v in 0..VIOLINS {
        tb.up_spec(&format!("s{v}"), &spec(v))
            .with_context(|| format!("bringing up Violin s{v}"))?;
    }
    eprintln!(
        "  {} guests up in {:.1} s",
        VIOLINS * GUESTS,
        t0.elapsed().as_secs_f64()
    );
    let secs = (minutes * 60.0).ceil() as u64;
    // A ping in every Violin for the whole run, g0 (h1) → g1 (h2), 5 a second.
    let mut pings: Vec<Child> = Vec::new();
    for v in 0..VIOLINS {
        let mut c = load::ns_command(&tb.guest_ns(&format!("s{v}"), "g0"), "ping")?;
        c.args(["-q", "-i", "0.2", "-w", &secs.to_string(), "10.70.0.2"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        pings.push(c.spawn().context("starting ping")?);
    }
    let mut r = Soak {
        minutes,
        guests: VIOLINS * GUESTS,
        samples: Vec::new(),
        rss_growth: Vec::new(),
        pings_sent: 0,
        pings_received: 0,
        joins: 0,
        failures: Vec::new(),
    };
    let start = Instant::now();
    let mut restarted = false;
    let mut minute = 0usize;
    while start.elapsed() < Duration::from_secs(secs) {
        let m = start.elapsed().as_secs_f64() / 60.0;
        let mut note = String::new();
        // A guest joins one Violin and leaves again.
        let v = minute % VIOLINS;
        let name = format!("s{v}");
        let joined = spec(v)
            + &format!(
                "[[guest]]\nname = \"j{minute}\"\nhost = \"h{}\"\nip = \"10.70.0.200/24\"\n",
                minute % HOSTS + 1
            );
        let path = tb.run_dir.join(format!("{name}-join.toml"));
        std::fs::write(&path, &joined)?;
        match tb.violin(&["apply", &path.display().to_string()]) {
            Ok(_) => r.joins += 1,
            Err(e) => r.failures.push(format!("minute {minute}: join: {e:#}")),
        }
        // Traffic: TCP in one Violin, a UDP flood in another, while the guest is in.
        let (a, b) = (
            tb.guest_ns(&format!("s{}", (minute + 1) % VIOLINS), "g4"),
            tb.guest_ns(&format!("s{}", (minute + 1) % VIOLINS), "g5"),
        );
        if let Err(e) = load::tcp_throughput(&a, &b, Ipv4Addr::new(10, 70, 0, 6), 1, 5.0, &[]) {
            r.failures.push(format!("minute {minute}: tcp: {e:#}"));
        }
        let (c, d) = (
            tb.guest_ns(&format!("s{}", (minute + 2) % VIOLINS), "g6"),
            tb.guest_ns(&format!("s{}", (minute + 2) % VIOLINS), "g7"),
        );
        if let Err(e) = load::udp_flood(&c, &d, Ipv4Addr::new(10, 70, 0, 8), 64, 2.0, &[]) {
            r.failures.push(format!("minute {minute}: udp: {e:#}"));
        }
        let path = tb.run_dir.join(format!("{name}.toml"));
        std::fs::write(&path, spec(v))?;
        if let Err(e) = tb.violin(&["apply", &path.display().to_string()]) {
            r.failures.push(format!("minute {minute}: leave: {e:#}"));
        }
        // Halfway, or in the last minute of a short run.
        let last_minute = 60 * (minute as u64 + 1) >= secs;
        if !restarted && (start.elapsed().as_secs_f64() >= secs as f64 / 2.0 || last_minute) {
            tb.violin(&["cluster", "restart", "h2", "--hard"])?;
            restarted = true;
            note = "(h2 restarted --hard)".into();
        }
        let s = sample(&tb, m, &note)?;
        print(&s);
        r.samples.push(s);
        minute += 1;
        // The rest of the minute.
        let next = Duration::from_secs(60 * minute as u64);
        while start.elapsed() < next.min(Duration::from_secs(secs)) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    for p in pings {
        let o = p.wait_with_output()?;
        let (sent, got) = ping_counts(&String::from_utf8_lossy(&o.stdout));
        r.pings_sent += sent;
        r.pings_received += got;
    }
    // Traffic has stopped: let the rings drain, then the final sample.
    std::thread::sleep(Duration::from_secs(2));
    let last = sample(&tb, start.elapsed().as_secs_f64() / 60.0, "(idle, end)")?;
    print(&last);
    for h in &last.hosts {
        // The first sample of the daemon that runs now (h2 restarted halfway).
        let first = r
            .samples
            .iter()
            .flat_map(|s| s.hosts.iter())
            .find(|x| x.host == h.host && x.pid == h.pid)
            .unwrap_or(h);
        r.rss_growth.push((
            h.host.clone(),
            h.rss_kib as f64 / first.rss_kib.max(1) as f64 - 1.0,
        ));
        if h.free_frames != h.pool_frames {
            r.failures.push(format!(
                "{}: {} of {} frames free when idle",
                h.host, h.free_frames, h.pool_frames
            ));
        }
        // A control connection of the sample itself may still be open: 2 of slack.
        if h.fds.abs_diff(first.fds) > 2 {
            r.failures.push(format!(
                "{}: {} descriptors at the end, {} at the start",
                h.host, h.fds, first.fds
            ));
        }
    }
    if let Some(first) = r.samples.first() {
        // Pings have ended since; nothing else may be left.
        if last.processes + VIOLINS < first.processes {
            r.failures.push(format!(
                "fewer processes than guests: {} → {}",
                first.processes, last.processes
            ));
        }
        if last.processes + VIOLINS > first.processes {
            r.failures.push(format!(
                "processes left behind: {} (with {VIOLINS} pings) → {}",
                first.processes, last.processes
            ));
        }
    }
    for (h, g) in &r.rss_growth {
        if *g > 0.05 {
            r.failures
                .push(format!("{h}: resident memory grew {:.1} %", g * 100.0));
        }
    }
    r.samples.push(last);
    drop(tb);
    Ok(r)
}

/// The soak's results as markdown (what docs/soak.md shows).
pub fn report(r: &Soak) -> String {
    let mut o = format!(
        "Soak: {} guests, {:.0} min, {} joins and leaves, pings {} of {} answered\n\n",
        r.guests, r.minutes, r.joins, r.pings_received, r.pings_sent
    );
    o += "| minute | processes | host | daemon pid | RSS KiB | fds | free frames |\n|---|---|---|---|---|---|---|\n";
    for s in &r.samples {
        for h in &s.hosts {
            o += &format!(
                "| {:.1} {} | {} | {} | {} | {} | {} | {}/{} |\n",
                s.minute,
                s.note,
                s.processes,
                h.host,
                h.pid,
                h.rss_kib,
                h.fds,
                h.free_frames,
                h.pool_frames
            );
        }
    }
    o += "\nResident memory, end against start (the restarted daemon against its own start):";
    for (h, g) in &r.rss_growth {
        o += &format!(" {h} {:+.1} %", g * 100.0);
    }
    o += "\n";
    if r.failures.is_empty() {
        o += "\nNo failures.\n";
    } else {
        o += "\nFailures:\n";
        for f in &r.failures {
            o += &format!("- {f}\n");
        }
    }
    o
}

pub fn check(r: &Soak) -> Result<()> {
    if !r.failures.is_empty() {
        bail!("the soak failed:\n  {}", r.failures.join("\n  "));
    }
    Ok(())
}
