//! `violin`: create and inspect Violins on a (simulated) cluster.

use clap::Parser;

fn main() {
    let cli = violin_dp::cli::Cli::parse();
    if let Err(e) = violin_dp::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
