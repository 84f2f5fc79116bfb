#!/usr/bin/env bash
# The project's test command: formatting, lints, the eBPF build, then every test.
# Tests that make network namespaces need root (CI runs as root); outside CI they skip
# with a printed reason.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# CI builds each target once from a clean clone: incremental caches there only take
# disk (about 0.7 GB), and CI's machine once ran out of it in the release build.
if [ -n "${CI:-}" ]; then
  export CARGO_INCREMENTAL=0
  df -h . | sed 's/^/disk: /'
fi

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
step "the violin CLI without the daemon's data path (no aya, no xsk-rs)"
cargo clippy -p violin-dp --no-default-features --bin violin --locked -- -D warnings
if cargo tree -p violin-dp --no-default-features -e normal --locked | grep -E '^.* (aya|xsk-rs) '; then
  echo "the CLI's dependencies include aya or xsk-rs" >&2
  exit 1
fi
step "cargo xtask build-ebpf"
cargo xtask build-ebpf
step "cargo test"
cargo test --locked
# violin-dp's targets (spec, control) are run by hand (`cargo xtask fuzz --crate
# violin-dp`): their sanitizer build now includes the etcd client's gRPC and TLS stack,
# about 8 minutes that do not fit CI's 40 beside everything else.
step "cargo xtask fuzz --seconds 10 --crate violin-common (smoke: the wire format targets from their seeds, 10 s each)"
cargo xtask fuzz --seconds 10 --crate violin-common
if [ "$(id -u)" -eq 0 ]; then
  if [ -n "${CI:-}" ]; then
    # The test build (about 3 GB) is not needed again; the bench builds in release.
    rm -rf target/debug
    df -h . | sed 's/^/disk: /'
  fi
  step "cargo xtask bench --quick (smoke test: the bench runs and its output is well formed)"
  cargo xtask bench --quick
  # The soak (`cargo xtask soak`, docs/soak.md) is run by hand: its 1-minute smoke no
  # longer fits CI's 40 minutes beside the etcd client's build.
else
  echo "SKIPPED: cargo xtask bench --quick and the soak smoke need root (network namespaces)"
  [ -z "${CI:-}" ] || { echo "CI runs as root: this should not happen" >&2; exit 1; }
fi
