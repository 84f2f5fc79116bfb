#!/usr/bin/env bash
# Builds the bench's xhpl: HPL alone (HPL 2.0 as shipped in Debian's hpcc source) with
# the driver in bench/hpl/xhpl.c, which adds MPI ping-pong between the same ranks.
#
#   scripts/build-hpl.sh [DEST]     # default /usr/local/libexec/violin/xhpl
#
# Needs mpicc (libopenmpi-dev) and Debian's BLAS (libblas3: the same reference BLAS
# Debian's hpcc uses). Idempotent: skips the build when DEST is newer than the driver.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-/usr/local/libexec/violin/xhpl}
DRIVER=$PWD/bench/hpl/xhpl.c
if [ -x "$DEST" ] && [ "$DEST" -nt "$DRIVER" ] && [ "$DEST" -nt "$0" ]; then
  echo "xhpl present ($DEST)"
  exit 0
fi
# hpcc's upstream tarball from Debian's archive (the source of the hpcc package).
URL=http://deb.debian.org/debian/pool/main/h/hpcc/hpcc_1.5.0.orig.tar.gz
SHA256=0a6fef7ab9f3347e549fed65ebb98234feea9ee18aea0c8f59baefbe3cf7ffb8
BLAS=$(ls /usr/lib/x86_64-linux-gnu/libblas.so.3 /usr/lib/*/libblas.so.3 2>/dev/null | head -n 1)
[ -n "$BLAS" ] || { echo "build-hpl: no libblas.so.3 (apt-get install libblas3)" >&2; exit 1; }
command -v mpicc >/dev/null || { echo "build-hpl: no mpicc (apt-get install libopenmpi-dev)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
curl -fsSL --retry 3 -o "$work/hpcc.tar.gz" "$URL"
echo "$SHA256  $work/hpcc.tar.gz" | sha256sum -c --quiet -
tar -C "$work" -xzf "$work/hpcc.tar.gz" hpcc-1.5.0/hpl
H=$work/hpcc-1.5.0/hpl
# HPL 2.0 predates MPI-3, which removed these two (Open MPI 4 no longer declares them).
grep -rl 'MPI_Address\|MPI_Type_struct' "$H/src" "$H/testing" | xargs sed -i \
  -e 's/MPI_Address/MPI_Get_address/g' -e 's/MPI_Type_struct/MPI_Type_create_struct/g'
# The parallel library and driver; the serial tests (HPL_d*) are not part of xhpl.
srcs=$(ls "$H"/src/*/*.c "$H"/testing/{ptest,ptimer,timer,matgen,pmatgen}/*.c \
  | grep -v -e /HPL_dtest.c -e /HPL_ddriver.c -e /HPL_dinfo.c)
echo "building xhpl ($(echo "$srcs" | wc -l) files of hpcc 1.5.0's hpl/, BLAS $BLAS)"
mpicc -O2 -w -DHPL_CALL_CBLAS -DHPL_STDC_HEADERS -I"$H/include" \
  -o "$work/xhpl" "$DRIVER" $srcs "$BLAS" -lm
mkdir -p "$(dirname "$DEST")"
install -m 0755 "$work/xhpl" "$DEST"
echo "xhpl built: $DEST"
