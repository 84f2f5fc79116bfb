//! Project tasks that cargo alone does not do: `cargo xtask build-ebpf` builds the XDP
//! object with the nightly toolchain and bpf-linker; `cargo xtask bench` runs the
//! benchmarks; `cargo xtask fuzz` runs every fuzz target (cargo-fuzz, nightly).

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Parser)]
#[command(about = "Violin project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build violin-ebpf for bpfel-unknown-none (nightly + bpf-linker; see scripts/setup.sh).
    BuildEbpf {
        /// Build without optimisations (the verifier usually rejects such objects).
        #[arg(long)]
        debug: bool,
    },
    /// Build everything in release mode and run the benchmarks (root).
    Bench {
        /// Brief runs of every figure: a smoke test, not results.
        #[arg(long)]
        quick: bool,
        /// Extra arguments for the bench binary.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The soak: 16 Violins × 32 guests on 4 simulated hosts under mixed traffic, guests
    /// joining and leaving, a daemon restart; memory, descriptors and frame pools each
    /// minute (root: it makes namespaces). Results in bench-results/soak-*.json and
    /// .md; fails if memory grew more than 5 % or anything leaked.
    Soak {
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
    },
    /// Run every fuzz target for a while (cargo-fuzz and nightly: scripts/setup.sh), each
    /// from its seed corpus; prints executions per target. A crash stops the run and is
    /// kept under CRATE/fuzz/artifacts/TARGET/ (add it to the seeds once fixed).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target (wire, gso, outer, spec, control).
        #[arg(long)]
        target: Option<String>,
        /// Only the targets of this crate (violin-common, violin-dp).
        #[arg(long = "crate", value_name = "CRATE")]
        krate: Option<String>,
    },
}

/// (crate directory, target) of every fuzz target.
const FUZZ_TARGETS: [(&str, &str); 5] = [
    ("violin-common", "wire"),
    ("violin-common", "gso"),
    ("violin-common", "outer"),
    ("violin-dp", "spec"),
    ("violin-dp", "control"),
];

fn fuzz(seconds: u64, only: Option<&str>, krate: Option<&str>) -> Result<()> {
    let root = workspace_root();
    if Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .map_or(true, |o| !o.status.success())
    {
        bail!("cargo-fuzz (nightly) is not installed: run scripts/setup.sh first");
    }
    let chosen: Vec<_> = FUZZ_TARGETS
        .iter()
        .filter(|(_, t)| only.is_none_or(|o| o == *t))
        .filter(|(c, _)| krate.is_none_or(|k| k == *c))
        .collect();
    if chosen.is_empty() {
        bail!(
            "no fuzz target named {:?} in crate {:?}",
            only.unwrap_or("any"),
            krate.unwrap_or("any")
        );
    }
    let mut rows = Vec::new();
    for (krate, target) in chosen {
        let dir = root.join(krate);
        let corpus = format!("fuzz/corpus/{target}");
        let seeds = format!("fuzz/seeds/{target}");
        std::fs::create_dir_all(dir.join(&corpus))?;
        eprintln!("fuzzing {krate}/{target} for {seconds} s");
        let out = nightly_cargo()
            .current_dir(&dir)
            .args(["+nightly", "fuzz", "run", target, &corpus, &seeds, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .args(["-max_len=70000", "-print_final_stats=1"])
            .output()
            .with_context(|| format!("running cargo fuzz for {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
            bail!("fuzz target {krate}/{target} failed ({}): see above; the input is under {krate}/fuzz/artifacts/{target}/", out.status);
        }
        // libFuzzer's final stats: "stat::number_of_executed_units: N".
        let runs: u64 = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .and_then(|v| v.trim().parse().ok())
            .context("libFuzzer printed no execution count")?;
        rows.push((format!("{krate}/{target}"), runs));
    }
    println!("{:<24} {:>14} {:>12}", "target", "executions", "per second");
    for (t, runs) in rows {
        println!("{t:<24} {runs:>14} {:>12}", runs / seconds.max(1));
    }
    Ok(())
}

/// A nested cargo for `+nightly`: the xtask itself was built by the stable toolchain, so
/// what would pin the nested cargo to it is cleared.
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    for var in [
        "RUSTC",
        "RUSTUP_TOOLCHAIN",
        "RUSTC_WRAPPER",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn build_ebpf(debug: bool) -> Result<()> {
    let root = workspace_root();
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!("bpf-linker is not on PATH: run scripts/setup.sh first");
    }
    let mut cmd = nightly_cargo();
    cmd.current_dir(&root).args([
        "+nightly",
        "build",
        "--package",
        "violin-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ]);
    if !debug {
        cmd.arg("--release");
    }
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        "-Cdebuginfo=2\x1f-Clink-arg=--btf",
    );
    let status = cmd.status().context("running cargo +nightly")?;
    if !status.success() {
        bail!("building violin-ebpf failed ({status})");
    }
    let obj = root
        .join("target/bpfel-unknown-none")
        .join(if debug { "debug" } else { "release" })
        .join("violin-ebpf");
    println!("eBPF object: {}", obj.display());
    Ok(())
}

fn bench(quick: bool, args: &[String]) -> Result<()> {
    build_ebpf(false)?;
    let root = workspace_root();
    let status = Command::new("cargo")
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "violin-dp",
            "-p",
            "bench",
        ])
        .status()
        .context("building the release binaries")?;
    if !status.success() {
        bail!("release build failed");
    }
    let mut cmd = Command::new(root.join("target/release/bench"));
    cmd.current_dir(&root).args(args);
    if quick {
        cmd.arg("--quick");
    }
    let status = cmd.status().context("running the benchmarks")?;
    if !status.success() {
        bail!("the benchmarks failed ({status})");
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::BuildEbpf { debug } => build_ebpf(debug),
        Cmd::Bench { quick, args } => bench(quick, &args),
        Cmd::Soak { minutes } => bench(false, &["--soak".into(), minutes.to_string()]),
        Cmd::Fuzz {
            seconds,
            target,
            krate,
        } => fuzz(seconds, target.as_deref(), krate.as_deref()),
    }
}
