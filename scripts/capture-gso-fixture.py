#!/usr/bin/env python3
"""Captures, once, what the Linux kernel makes of a TCP/IPv4 super-frame, for the
byte-fixture test of violin-common's software segmentation (wire/gso/tests.rs).

In a scratch network namespace: tap `vin` (IFF_VNET_HDR) and tap `vout` (no offloads)
on a bridge. A super-frame written into `vin` with a virtio-net header (TSO4, partial
checksum) is flooded by the bridge to `vout`, which cannot take super-frames: the
kernel segments it in software (skb_gso_segment) and completes the checksums. The
super-frame and the segments read from `vout` are written to
violin-common/src/wire/gso/fixtures/ as tso4_in.bin (virtio header + frame) and
tso4_out.bin (each segment as a 2-byte big-endian length, then the segment).

Run as root: scripts/capture-gso-fixture.py. The namespace is removed afterwards.
"""
import ctypes, fcntl, os, struct, subprocess, sys, time, select

NS = f"violin-gsofix-{os.getpid()}"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                   "violin-common", "src", "wire", "gso", "fixtures")
TUNSETIFF, TUNSETOFFLOAD = 0x400454CA, 0x400454D0
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def sh(*a):
    subprocess.run(["ip", "netns", "exec", NS, *a], check=True)


def tap(name, vnet):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet else 0)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    if vnet:
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0x01 | 0x02)  # CSUM | TSO4
    return fd


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b)//2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def super_frame(payload_len, mss):
    eth = bytes.fromhex("020000000002" "020000000001" "0800")
    opts = bytes([1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 3])  # NOP NOP timestamps
    thl = 20 + len(opts)
    total = 20 + thl + payload_len
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0x1234, 0x4000, 64, 6, 0,
                               bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])))
    ip[10:12] = struct.pack("!H", 0xFFFF ^ csum(bytes(ip)))
    tcp = bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, 0xFFFFF000, 0x01020304,
                                (thl // 4) << 4, 0x18, 502, 0, 0)) + opts
    pseudo = struct.pack("!4s4sBBH", bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 0, 6,
                         thl + payload_len)
    tcp[16:18] = struct.pack("!H", csum(pseudo))  # partial: the pseudo-header's sum
    payload = bytes((i * 7 + 3) & 0xFF for i in range(payload_len))
    frame = eth + bytes(ip) + bytes(tcp) + payload
    # virtio_net_hdr: NEEDS_CSUM, TCPV4, hdr_len, gso_size, csum_start, csum_offset (LE)
    vh = struct.pack("<BBHHHH", 1, 1, 14 + 20 + thl, mss, 34, 16)
    return vh, frame


def main():
    if os.geteuid() != 0:
        sys.exit("run as root")
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        fdns = os.open(f"/var/run/netns/{NS}", os.O_RDONLY)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fdns, 0x40000000) != 0:  # CLONE_NEWNET
            sys.exit(f"setns: {os.strerror(ctypes.get_errno())}")
        fin, fout = tap("vin", True), tap("vout", False)
        sh("ip", "link", "add", "br0", "type", "bridge")
        for d in ["vin", "vout", "br0"]:
            sh("ip", "link", "set", d, "up")
        sh("ip", "link", "set", "vin", "master", "br0")
        sh("ip", "link", "set", "vout", "master", "br0")
        sh("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        time.sleep(0.5)
        while True:  # drain anything the bridge sent before
            try:
                os.read(fout, 70000)
            except BlockingIOError:
                break
        vh, frame = super_frame(5000, 1388)
        os.write(fin, vh + frame)
        segs, deadline = [], time.time() + 2
        while time.time() < deadline:
            select.select([fout], [], [], 0.1)
            try:
                f = os.read(fout, 70000)
            except BlockingIOError:
                continue
            if f[12:14] == b"\x08\x00":
                segs.append(f)
            if sum(len(s) - 66 for s in segs) >= 5000:
                break
        if sum(len(s) - 66 for s in segs) != 5000:
            sys.exit(f"got {len(segs)} segments, not the whole payload")
        os.makedirs(OUT, exist_ok=True)
        with open(os.path.join(OUT, "tso4_in.bin"), "wb") as w:
            w.write(vh + frame)
        with open(os.path.join(OUT, "tso4_out.bin"), "wb") as w:
            for s in segs:
                w.write(struct.pack("!H", len(s)) + s)
        print(f"captured a {len(frame)}-byte super-frame as {len(segs)} segments in {OUT}")
    finally:
        subprocess.run(["ip", "netns", "del", NS])


main()
