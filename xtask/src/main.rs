//! Project tasks that cargo alone does not do: `cargo xtask build-ebpf` builds the XDP
//! object with the nightly toolchain and bpf-linker.

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
    let mut cmd = Command::new("cargo");
    // The xtask itself was built by the stable toolchain: clear what would pin nested
    // cargo to it.
    for var in [
        "RUSTC",
        "RUSTUP_TOOLCHAIN",
        "RUSTC_WRAPPER",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
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
    }
}
