#!/usr/bin/env bash
# Builds the default image of Violin's QEMU guests from Debian packages: an uncompressed
# kernel (vmlinux, booted by -machine microvm through PVH) and a busybox initramfs with
# the virtio modules, an init that configures the guest from the kernel command line
# (violin.ip=, violin.gw=, violin.route=, violin.mtu=, violin.hostname=) and the agent
# behind `violin exec`. Extra Debian packages (with their dependencies) go into the
# initramfs as well.
#
# usage: scripts/build-guest-image.sh OUT_DIR [PACKAGE...]
#
# Writes OUT_DIR/vmlinux, OUT_DIR/initramfs.cpio.gz and OUT_DIR/manifest, atomically
# (a half-built image is never seen). Idempotent: an existing complete image is kept.
set -euo pipefail

# Bump when what goes into an image changes: older images are then rebuilt.
IMAGE_VERSION=4

say() { printf '\033[1m[guest-image]\033[0m %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

[ $# -ge 1 ] || die "usage: $0 OUT_DIR [PACKAGE...]"
OUT=$1; shift
PACKAGES=("$@")
if grep -qx "version=$IMAGE_VERSION" "$OUT/manifest" 2>/dev/null && [ -f "$OUT/vmlinux" ] && [ -f "$OUT/initramfs.cpio.gz" ]; then
  say "image present: $OUT"
  exit 0
fi
for tool in apt-get dpkg-deb cpio gzip xz; do
  command -v "$tool" >/dev/null || die "$tool is missing (scripts/setup.sh installs it)"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/violin-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
chmod 755 "$WORK"
cd "$WORK"

# --- 1. packages ----------------------------------------------------------------------
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$KPKG" ] || die "no linux-image-amd64 in the apt cache (apt-get update?)"
KVER=${KPKG#linux-image-}
say "kernel $KPKG, busybox-static${PACKAGES:+, extra: ${PACKAGES[*]}}"
EXTRA=()
if [ ${#PACKAGES[@]} -gt 0 ]; then
  # The packages and the shared libraries they need, transitively: Depends on lib*
  # packages only (maintainer-script tooling such as debconf, adduser or perl has no
  # use in a guest without dpkg).
  declare -A seen=()
  queue=("${PACKAGES[@]}")
  while [ ${#queue[@]} -gt 0 ]; do
    p=${queue[0]}; queue=("${queue[@]:1}")
    [ -n "${seen[$p]:-}" ] && continue
    seen[$p]=1
    apt-cache show "$p" >/dev/null 2>&1 || die "no Debian package named $p"
    while read -r dep; do
      case $dep in
        lib*-perl|libperl*|libpam*|libaudit*|libsemanage*|libselinux*|libdebian-installer*) ;;
        lib*) [ -n "${seen[$dep]:-}" ] || queue+=("$dep") ;;
      esac
    done < <(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
               --no-replaces --no-enhances --no-pre-depends "$p" 2>/dev/null \
             | awk '$1 == "Depends:" && $2 !~ /^</ {print $2}')
  done
  mapfile -t EXTRA < <(printf '%s\n' "${!seen[@]}" | sort)
  say "with dependencies: ${EXTRA[*]}"
fi
mkdir debs && cd debs
# _apt cannot write into a private directory: download as root, quietly.
apt-get download -o APT::Sandbox::User=root -qq "$KPKG" busybox-static "${EXTRA[@]}" >/dev/null \
  || die "apt-get download failed"
cd ..

# --- 2. kernel ------------------------------------------------------------------------
mkdir kernel
dpkg-deb -x debs/"$KPKG"_*.deb kernel
VMLINUZ=kernel/boot/vmlinuz-$KVER
# vmlinuz is a bzImage around an xz stream: find it and unpack it (extract-vmlinux).
OFF=$(grep -abo $'\xfd7zXZ' "$VMLINUZ" | head -1 | cut -d: -f1 || true)
[ -n "$OFF" ] || die "no xz stream in $VMLINUZ"
tail -c +$((OFF + 1)) "$VMLINUZ" | xz -dc 2>/dev/null > vmlinux || true
[ "$(head -c 4 vmlinux | od -An -c | tr -d ' ')" = "177ELF" ] || die "could not unpack vmlinux"

# --- 3. root filesystem ---------------------------------------------------------------
R=root
mkdir -p $R/{bin,sbin,usr/bin,usr/sbin,etc/violin,proc,sys,dev,tmp,run,root,lib/modules,mnt}
for d in debs/*.deb; do
  case $d in debs/linux-image-*) continue ;; esac
  dpkg-deb -x "$d" $R
done
# Merged /usr, as Debian 12 has it: /bin, /lib... are links into /usr (copies would
# double the initramfs, and it must fit in a small VM's memory).
for d in bin sbin lib lib64; do
  if [ -d $R/$d ] && [ ! -L $R/$d ]; then
    mkdir -p $R/usr/$d && cp -a $R/$d/. $R/usr/$d/ && rm -rf "${R:?}/$d"
  fi
  if [ -d $R/usr/$d ]; then ln -s usr/$d $R/$d; fi
done
# What a guest without dpkg, locales or iconv has no use for.
rm -rf $R/usr/share/{doc,man,info,locale,lintian,bug} $R/usr/lib/x86_64-linux-gnu/gconv
cp $R/bin/busybox $R/bin/busybox.static 2>/dev/null || true
for applet in $($R/bin/busybox --list); do
  [ -e $R/bin/$applet ] || [ -e $R/sbin/$applet ] || [ -e $R/usr/bin/$applet ] || ln -s busybox $R/bin/$applet
done
MODS="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_mmio failover net_failover virtio_net virtio_console virtio_blk crc16 mbcache jbd2 crc32c_generic libcrc32c ext4"
: > $R/etc/violin/modules
for m in $MODS; do
  f=$(find kernel/lib/modules/"$KVER" -name "$m.ko" | head -1)
  [ -n "$f" ] || continue   # built in, or absent: fine
  cp "$f" $R/lib/modules/
  echo "$m" >> $R/etc/violin/modules
done
echo "root:x:0:0:root:/root:/bin/sh" > $R/etc/passwd
echo "root:x:0:" > $R/etc/group
printf '127.0.0.1 localhost\n' > $R/etc/hosts

cat > $R/init <<'INIT'
#!/bin/sh
# The init of Violin's default guest image.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
for m in $(cat /etc/violin/modules); do insmod /lib/modules/$m.ko 2>/dev/null; done
IP= GW= MTU= HN=guest ROUTES= ROOT= NEWROOT=
for a in $(cat /proc/cmdline); do
  case $a in
    violin.ip=*) IP=${a#violin.ip=} ;;
    violin.gw=*) GW=${a#violin.gw=} ;;
    violin.mtu=*) MTU=${a#violin.mtu=} ;;
    violin.hostname=*) HN=${a#violin.hostname=} ;;
    violin.route=*) ROUTES="$ROUTES ${a#violin.route=}" ;;
    violin.disk=*) ROOT=${a#violin.disk=} ;;
    violin.root=*) NEWROOT=${a#violin.root=} ;;
  esac
done
hostname "$HN"; echo "$HN" > /etc/hostname
ip link set lo up
n=0; while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
[ -n "$MTU" ] && ip link set eth0 mtu "$MTU"
[ -n "$IP" ] && ip addr add "$IP" dev eth0
ip link set eth0 up
[ -n "$GW" ] && ip route add default via "$GW"
for r in $ROUTES; do ip route add "${r%%,*}" via "${r#*,}"; done
# A gratuitous ARP: the daemon sees the guest's first frame, peers learn its MAC.
[ -n "$IP" ] && arping -q -U -c 1 -I eth0 "${IP%/*}" 2>/dev/null
if [ -n "$NEWROOT" ]; then
  # Boot the disk image's own userland: the network stays as configured above.
  mkdir -p /newroot
  if mount "$NEWROOT" /newroot 2>/dev/null && [ -x /newroot/sbin/init ]; then
    echo "violin: $HN up (${IP:-no address}), switching to $NEWROOT" > /dev/console
    umount /dev/pts /tmp /run /sys /proc 2>/dev/null
    umount /dev 2>/dev/null
    exec switch_root /newroot /sbin/init
  fi
  echo "violin: $NEWROOT has no /sbin/init; staying in the initramfs" > /dev/console
elif [ -n "$ROOT" ]; then
  mkdir -p /mnt/disk && mount -o ro "$ROOT" /mnt/disk 2>/dev/null
fi
echo "violin: $HN up (${IP:-no address})" > /dev/console
( while :; do /bin/violin-agent; sleep 0.2; done ) &
while :; do setsid cttyhack sh -l; sleep 0.2; done
INIT
chmod 755 $R/init

cat > $R/bin/violin-agent <<'AGENT'
#!/bin/sh
# Runs commands for `violin exec` on the virtio port named violin.exec: each request is
# one line "NONCE BASE64-COMMAND"; the reply is "NONCE start\n" at once, then the
# command's output (stdout and stderr) followed by "\nNONCE exit STATUS\n".
port=
for p in /sys/class/virtio-ports/*; do
  [ "$(cat "$p/name" 2>/dev/null)" = violin.exec ] && port=/dev/${p##*/}
done
[ -n "$port" ] || { sleep 1; exit 1; }
# The port stays open for good: when `violin exec` hangs up, a read returns end of file,
# and closing the port then would discard what the next `violin exec` may already have
# sent (the kernel drops a port's unread data on close), leaving it without an answer.
exec 3<>"$port"
while :; do
  while read -r nonce b64 <&3; do
    [ -n "$nonce" ] || continue
    cmd=$(echo "$b64" | base64 -d)
    printf '%s start\n' "$nonce" >&3
    (cd /root && sh -c "$cmd") </dev/null >&3 2>&3
    printf '\n%s exit %d\n' "$nonce" $? >&3
  done
  sleep 0.1
done
AGENT
chmod 755 $R/bin/violin-agent

# --- 4. pack --------------------------------------------------------------------------
(cd $R && find . | LC_ALL=C sort | cpio -o -H newc --quiet) | gzip -1 > initramfs.cpio.gz
mkdir -p "$(dirname "$OUT")"
STAGE=$(mktemp -d "$(dirname "$OUT")/.building.XXXXXX")
mv vmlinux initramfs.cpio.gz "$STAGE"/
{
  echo "version=$IMAGE_VERSION"
  echo "kernel=$KPKG"
  echo "packages=${PACKAGES[*]}"
  echo "built=$(date -u +%FT%TZ)"
} > "$STAGE/manifest"
chmod 755 "$STAGE"; chmod 644 "$STAGE"/*
rm -rf "$OUT"
mv "$STAGE" "$OUT"
say "built $OUT ($(du -sh "$OUT" | cut -f1)): vmlinux $(du -h "$OUT/vmlinux" | cut -f1), initramfs $(du -h "$OUT/initramfs.cpio.gz" | cut -f1)"
