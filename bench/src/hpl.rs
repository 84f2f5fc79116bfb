//! Figure 6: HPL (Debian's `hpcc`, which contains it) with one MPI rank per simulated
//! host, once in the host namespaces (physical) and once in one guest per host of a
//! Violin, with the same problem size. MPI is launched without ssh: `mpirun` runs in
//! the first rank's namespace and starts the others through a launch agent that enters
//! the namespace of the address it is given (see ../shared/notes/toolchain.md;
//! `--bind-to none` matters: bound ranks all land on core 0). Stock hpcc runs its whole
//! suite around HPL; only HPL's own result line is used.

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
    /// The whole hpcc run (stock hpcc also runs its other tests).
    pub wall_seconds: f64,
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
    if which("mpirun").is_none() || which("hpcc").is_none() {
        bail!("HPL needs Debian's openmpi-bin and hpcc (scripts/setup.sh installs them)");
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
    let session = work.join("session");
    std::fs::create_dir_all(&session)?;
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
        .args(["-np", &ranks.len().to_string(), "hpcc"])
        .current_dir(work)
        .env("OMPI_MCA_mpi_yield_when_idle", "1")
        .output()
        .context("running mpirun")?;
    let wall = t0.elapsed().as_secs_f64();
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
    Ok(Hpl {
        ranks: ranks.len(),
        n,
        nb,
        gflops,
        hpl_seconds,
        wall_seconds: wall,
    })
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
        let i = input(3000, 128, 1, 2);
        assert!(i.contains("3000         Ns") && i.contains("1            Ps"));
    }
}
