//! `violin-dp`: the per-host Violin data plane daemon.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use violin_dp::config::{DataplaneChoice, HostConfig};
use violin_dp::daemon::Daemon;
use violin_dp::host::guest::{self, GuestArgs};

#[derive(Parser)]
#[command(
    name = "violin-dp",
    version,
    about = "Violin per-host data plane daemon"
)]
struct Cli {
    /// Host configuration (TOML): name, underlay address, runtime directory.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override the configuration's data plane.
    #[arg(long, value_enum)]
    dataplane: Option<DataplaneChoice>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a lightweight guest's relay (started by the daemon, like a QEMU process).
    #[command(hide = true)]
    Guest(GuestArgs),
    /// Run the daemon (the arguments after `--`) and start a new one when it dies, as
    /// systemd's `Restart=on-failure` does on a real host (the simulated cluster's).
    #[command(hide = true)]
    Keep {
        /// Where the running daemon's pid is recorded.
        #[arg(long)]
        pidfile: PathBuf,
        #[arg(last = true, required = true)]
        daemon: Vec<std::ffi::OsString>,
    },
}

fn main() {
    if let Err(e) = run() {
        // One line with the whole chain of causes: the CLI shows the log's tail.
        tracing::error!("{e:#}");
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Guest(args)) => guest::run(args),
        Some(Cmd::Keep { pidfile, daemon }) => {
            let me = std::env::current_exe()?;
            violin_dp::host::keeper::run(&pidfile, &me, &daemon)
        }
        None => {
            let Some(path) = cli.config else {
                anyhow::bail!("--config HOST.toml is required (see README: Host configuration)");
            };
            let mut cfg = HostConfig::load(&path)?;
            if let Some(d) = cli.dataplane {
                cfg.dataplane = d;
            }
            let daemon = Daemon::new(cfg)?;
            if let Err(e) = violin_dp::host::cgroup::prepare() {
                tracing::warn!("guest limits unavailable: {e:#}");
            }
            // Before any thread starts: capabilities are per thread.
            if let Err(e) = daemon.drop_capabilities() {
                tracing::warn!("keeping all capabilities: {e:#}");
            }
            let stop = daemon.stopper();
            ctrlc::set_handler(stop)?;
            daemon.run()
        }
    }
}
