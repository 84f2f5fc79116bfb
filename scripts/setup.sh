#!/usr/bin/env bash
# Sets up a fresh Debian machine to build, test and demo Violin. Idempotent: every step
# checks whether its result is already present and skips it if so.
#
#   scripts/setup.sh            # as root (CI runs it as root)
#
# Steps: Debian packages, the nightly toolchain's rust-src (for the eBPF build),
# bpf-linker built against the nightly rustc's own libLLVM (no prebuilt binary can be
# downloaded here; see ../shared/notes/toolchain.md), cargo-fuzz (the fuzz targets), the
# bench's xhpl (scripts/build-hpl.sh), and the default image of QEMU guests (a Debian
# kernel + busybox initramfs, scripts/build-guest-image.sh).
set -euo pipefail

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# --- 1. Debian packages -----------------------------------------------------------------
PKGS=(build-essential pkg-config m4 clang libelf-dev zlib1g-dev
      curl iproute2 ethtool iputils-ping tcpdump iperf3 procps fonts-dejavu-core libfontconfig1-dev
      qemu-system-x86 busybox-static cpio xz-utils e2fsprogs openmpi-bin libopenmpi-dev libblas3 openvswitch-switch
      etcd-server etcd-client protobuf-compiler util-linux openssl
      libprotobuf-dev)  # google/protobuf/*.proto for etcd-client's build (only Recommended by protoc)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  say "Debian packages present"
fi

# --- 2. Rust toolchains -------------------------------------------------------------------
command -v rustup >/dev/null || { echo "rustup not found: this machine kind ships it" >&2; exit 1; }
if ! rustup toolchain list | grep -q '^nightly'; then
  say "installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  say "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly
else
  say "nightly rust-src present"
fi

# --- 3. bpf-linker against the nightly's libLLVM -----------------------------------------
BPF_LINKER_VERSION=0.13.0
llvm_major=$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[ -n "$llvm_major" ] || { echo "cannot read the nightly rustc's LLVM version" >&2; exit 1; }
want_feature="llvm-${llvm_major}"
stamp="$HOME/.cargo/bpf-linker.llvm"
if command -v bpf-linker >/dev/null && bpf-linker --version >/dev/null 2>&1 \
   && [ "$(cat "$stamp" 2>/dev/null)" = "$want_feature" ]; then
  say "bpf-linker present ($(bpf-linker --version), $want_feature)"
else
  say "building bpf-linker $BPF_LINKER_VERSION with $want_feature (about a minute)"
  NL=$(rustc +nightly --print sysroot)/lib
  SO=$(basename "$(ls "$NL"/libLLVM.so.* | head -n 1)")
  P=/opt/rust-nightly-llvm
  $SUDO mkdir -p "$P/lib"
  $SUDO ln -sf "$NL/$SO" "$P/lib/libLLVM.so"
  $SUDO ln -sf "$NL/$SO" "$P/lib/$SO"     # the soname link matters at run time
  LLVM_PREFIX=$P cargo +stable install --locked --force "bpf-linker@$BPF_LINKER_VERSION" \
    --no-default-features --features "$want_feature"
  bpf-linker --version
  echo "$want_feature" > "$stamp"
fi

# --- 3b. cargo-fuzz (libFuzzer through nightly: `cargo xtask fuzz`) ----------------------
CARGO_FUZZ_VERSION=0.13.2
if cargo +nightly fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  say "cargo-fuzz present ($CARGO_FUZZ_VERSION)"
else
  say "building cargo-fuzz $CARGO_FUZZ_VERSION (about two minutes)"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

# --- 3c. the bench's HPL (HPL alone from Debian's hpcc source, with MPI ping-pong) -------
bash "$(dirname "$0")/build-hpl.sh"

# --- 4. the default image of QEMU guests ------------------------------------------------------
IMAGES=${VIOLIN_IMAGES_DIR:-/var/cache/violin/images}
bash "$(dirname "$0")/build-guest-image.sh" "$IMAGES/default"

say "done"
