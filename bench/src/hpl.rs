//! Figure 6: HPL with one MPI rank per simulated host, once in the host namespaces
//! (physical) and once in one guest per host of a Violin, with the same problem size.
//! The binary is HPL alone (`xhpl`, built by scripts/build-hpl.sh from the HPL in
//! Debian's hpcc source, whose own driver would run the whole HPC Challenge suite around
//! it); before HPL it measures MPI ping-pong between rank 0 and every other rank, so
//! latency and bandwidth come from the same run. MPI is launched without ssh: `mpirun`
//! runs in the first rank's namespace and starts the others through a launch agent that
//! enters the namespace of the address it is given (see ../shared/notes/toolchain.md;
//! `--bind-to none` matters: bound ranks all land on core 0).

use crate::testbed::Endpoint;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub struct Hpl {
    pub ranks: usize,
    pub n: u32,
    pub nb: u32,
    /// HPL's own figure for the solve.
    pub gflops: f64,
    pub hpl_seconds: f64,
    /// The whole `mpirun`: start-up, ping-pong, HPL with its residual check.
    pub wall_seconds: f64,
    /// MPI ping-pong, 8-byte messages: half the round trip, µs, mean over rank 0's peers.
    #[serde(default)]
    pub latency_us: f64,
    /// MPI ping-pong, 2 MB messages: MB/s (both directions), mean over rank 0's peers.
    #[serde(default)]
    pub bandwidth_mbs: f64,
}

/// Where the bench finds `xhpl`: `$VIOLIN_XHPL`, or where scripts/build-hpl.sh puts it.
pub fn xhpl() -> std::path::PathBuf {
    std::env::var_os("VIOLIN_XHPL")
        .map(Into::into)
        .unwrap_or_else(|| "/usr/local/libexec/violin/xhpl".into())
}

/// The N for which HPL on these ranks takes about `seconds`, from a run that took
/// `took` seconds at `n` (HPL's work grows as N³), a multiple of `2 × nb`, never below
/// `n`.
pub fn size_for(n: u32, took: f64, seconds: f64, nb: u32) -> u32 {
    let scaled = n as f64 * (seconds / took.max(1e-3)).cbrt();
    let step = 2 * nb;
    ((scaled / step as f64).ceil() as u32 * step).max(n)
}

/// The HPL input: hpcc's example with our N, NB and process grid.
fn input(n: u32, nb: u32, p: usize, q: usize) -> String {
    let tpl = include_str!("hpccinf.txt");
    tpl.replace("@N@", &n.to_string())
        .replace("@NB@", &nb.to_string())
        .replace("@P@", &p.to_string())
        .replace("@Q@", &q.to_string())
}

/// The most square P × Q grid with P ≤ Q.
fn grid(ranks: usize) -> (usize, usize) {
    let mut p = (ranks as f64).sqrt() as usize;
    while p > 1 && !ranks.is_multiple_of(p) {
        p -= 1;
    }
    (p.max(1), ranks / p.max(1))
}

/// Runs HPL with one rank per endpoint; `subnet` (CIDR) is where MPI's TCP traffic goes.
pub fn run(ranks: &[Endpoint], subnet: &str, n: u32, nb: u32, work: &Path) -> Result<Hpl> {
    let xhpl = xhpl();
    if which("mpirun").is_none() || !xhpl.exists() {
        bail!(
            "HPL needs Debian's openmpi-bin and {} (scripts/setup.sh installs them; \
             scripts/build-hpl.sh builds xhpl)",
            xhpl.display()
        );
    }
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)?;
    let map: String = ranks
        .iter()
        .map(|e| format!("{} {}\n", e.ip, e.ns))
        .collect();
    std::fs::write(work.join("hosts.map"), map)?;
    let agent = work.join("agent.sh");
    std::fs::write(
        &agent,
        format!(
            "#!/bin/sh\n# mpirun's launch agent: AGENT [ssh options] HOST COMMAND...\n\
             while [ \"${{1#-}}\" != \"$1\" ]; do shift; done\n\
             host=$1; shift\n\
             ns=$(awk -v h=\"$host\" '$1 == h {{print $2}}' {map})\n\
             [ -n \"$ns\" ] || {{ echo \"agent: unknown host $host\" >&2; exit 1; }}\n\
             exec ip netns exec \"$ns\" sh -c \"$*\"\n",
            map = work.join("hosts.map").display()
        ),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755))?;
    let (p, q) = grid(ranks.len());
    std::fs::write(work.join("hpccinf.txt"), input(n, nb, p, q))?;
    let hosts: Vec<String> = ranks.iter().map(|e| format!("{}:1", e.ip)).collect();
    let mut attempt = 0;
    let (o, wall) = loop {
        attempt += 1;
        let session = work.join(format!("session-{attempt}"));
        std::fs::create_dir_all(&session)?;
        let _ = std::fs::remove_file(work.join("hpccoutf.txt"));
        let t0 = Instant::now();
        let o = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &ranks[0].ns,
                "mpirun",
                "--allow-run-as-root",
            ])
            .args(["--mca", "plm_rsh_agent"])
            .arg(&agent)
            // Every simulated host shares /tmp and the hostname: a session directory of
            // this run's own keeps a stale one (same job family) from failing orte_init.
            .args(["--mca", "orte_tmpdir_base"])
            .arg(&session)
            // Nor the hwloc topology in shared memory, which the daemons of the simulated
            // hosts map at one address and which crashed an orted (hwloc_shmem_topology_write).
            // Ranks are not bound (--bind-to none), so nothing needs it.
            .args(["--mca", "rtc", "^hwloc"])
            .args(["--mca", "btl", "tcp,self"])
            .args(["--mca", "btl_tcp_if_include", subnet])
            .args(["--mca", "oob_tcp_if_include", subnet])
            .args([
                "--bind-to",
                "none",
                "--oversubscribe",
                "--host",
                &hosts.join(","),
            ])
            // More ranks than cores (4 hosts on 2 cores): idle ranks must yield, or each
            // message waits for a spinning peer's time slice (the suite then takes minutes).
            .args(["-x", "OMPI_MCA_mpi_yield_when_idle"])
            .args(["-np", &ranks.len().to_string()])
            .arg(&xhpl)
            .current_dir(work)
            .env("OMPI_MCA_mpi_yield_when_idle", "1")
            .output()
            .context("running mpirun")?;
        // The simulated hosts share one hostname, so their Open MPI daemons make their
        // session directories at the same path, and two can race on one mkdir (`File
        // exists`): orte_init fails before any rank starts. That is start-up, not what
        // is measured: try again (in a fresh directory).
        let raced = String::from_utf8_lossy(&o.stderr).contains("orte_init failed");
        if !o.status.success() && raced && attempt < 3 {
            continue;
        }
        break (o, t0.elapsed().as_secs_f64());
    };
    let out = std::fs::read_to_string(work.join("hpccoutf.txt")).unwrap_or_default();
    if !o.status.success() {
        bail!(
            "mpirun failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stderr),
            out.lines().rev().take(10).collect::<Vec<_>>().join("\n")
        );
    }
    let (hpl_seconds, gflops) = parse(&out)
        .with_context(|| format!("no HPL result in {}", work.join("hpccoutf.txt").display()))?;
    let pp = ping_pongs(&String::from_utf8_lossy(&o.stdout));
    if pp.len() + 1 != ranks.len() {
        bail!(
            "ping-pong: {} of {} peers reported:\n{}",
            pp.len(),
            ranks.len() - 1,
            String::from_utf8_lossy(&o.stdout)
        );
    }
    let mean = |f: fn(&(f64, f64)) -> f64| pp.iter().map(f).sum::<f64>() / pp.len() as f64;
    Ok(Hpl {
        ranks: ranks.len(),
        n,
        nb,
        gflops,
        hpl_seconds,
        wall_seconds: wall,
        latency_us: mean(|p| p.0),
        bandwidth_mbs: mean(|p| p.1),
    })
}

/// The (latency µs, bandwidth MB/s) of each `pingpong PEER latency_us L bandwidth_MBps B`
/// line xhpl prints.
fn ping_pongs(out: &str) -> Vec<(f64, f64)> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f[..] {
                ["pingpong", _, "latency_us", lat, "bandwidth_MBps", bw] => {
                    Some((lat.parse().ok()?, bw.parse().ok()?))
                }
                _ => None,
            }
        })
        .collect()
}

/// The (time, Gflops) of HPL's result line: `WR11C2R4  N  NB  P  Q  Time  Gflops`.
fn parse(out: &str) -> Option<(f64, f64)> {
    out.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() == 7 && f[0].starts_with("WR") {
            Some((f[5].parse().ok()?, f[6].parse().ok()?))
        } else {
            None
        }
    })
}

fn which(cmd: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_grow_with_the_cube_root_of_time() {
        // 1.4 s at N = 2000: 8 × the time takes 2 × N (then up to a multiple of 256).
        assert_eq!(size_for(2000, 1.4, 11.2, 128), 4096);
        // Never smaller than the run it is scaled from.
        assert_eq!(size_for(2000, 60.0, 20.0, 128), 2000);
    }

    #[test]
    fn grids() {
        assert_eq!(grid(2), (1, 2));
        assert_eq!(grid(4), (2, 2));
        assert_eq!(grid(6), (2, 3));
    }

    #[test]
    fn parses_the_result_line() {
        let out = "T/V                N    NB     P     Q               Time                 Gflops\n\
                   --------------------------------------------------------------------------------\n\
                   WR11C2R4        2000   128     1     2               1.19              4.497e+00\n";
        assert_eq!(parse(out), Some((1.19, 4.497)));
        assert_eq!(parse("nothing"), None);
        let pp = "pingpong 1 latency_us 15.140 bandwidth_MBps 2189.718\n\
                  pingpong 2 latency_us 31.5 bandwidth_MBps 900\nnoise\n";
        assert_eq!(ping_pongs(pp), vec![(15.14, 2189.718), (31.5, 900.0)]);
        let i = input(3000, 128, 1, 2);
        assert!(i.contains("3000         Ns") && i.contains("1            Ps"));
    }
}
