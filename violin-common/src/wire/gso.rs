//! Super-frames: one Ethernet frame standing for many wire segments of a TCP or UDP
//! flow (what a tap with offloads hands over, and takes back).
//!
//! - [`Gso`] describes a super-frame (checked against its own headers, never trusted
//!   from the virtio header alone) and splits it: [`Gso::segment_header`] writes the
//!   headers of segment *i* — IPv4 length, ID and checksum or IPv6 payload length, TCP
//!   sequence number and flags or UDP length, and a complete L4 checksum — and says
//!   where its payload lies in the super-frame, so a transport can send headers and
//!   payload from where they are (software TSO/USO, as Linux's `skb_segment` does).
//! - [`Coalescer`] builds a super-frame back from in-order TCP/IPv4 segments of one
//!   flow, by Linux GRO's rules: same addresses, ports, ACK, window, options, TTL and
//!   TOS; contiguous sequence numbers; no flag but ACK and PSH; every segment as long as
//!   the first but the last. Where the receiver takes USO, UDP/IPv4 datagrams of one
//!   flow coalesce the same way (Linux's UDP GRO, wireguard-go's TUN path): same
//!   addresses, ports, TTL and TOS, every datagram as long as the first but the last,
//!   at most [`UDP_MAX_SEGS`]. The result carries a partial checksum for the receiver.
//! - [`complete_checksum`] finishes a plain frame's partial checksum.
//! - Between Violin daemons a segment may travel with its L4 checksum partial (remote
//!   checksum offload, [`Gso::segment_header_partial`]); the receiver describes it as a
//!   one-segment [`Gso::from_rco`], which a tap takes as it is and any other consumer
//!   completes on segmenting, and the coalescer takes it unverified
//!   ([`Coalescer::push_partial`]).

use super::checksum;
use super::ethernet::EtherType;
use super::ipv4::Ipv4Packet;
use super::tcp::{self, TcpPacket};
use super::virtio::{GsoType, VirtioNetRepr, F_DATA_VALID, F_NEEDS_CSUM};
use super::vxlan::Rco;
use super::{get_u16, get_u32, set_u16, Error, Result};
use core::ops::Range;

const ETH: usize = 14;
const IPV4_MIN: usize = 20;
const IPV6_LEN: usize = 40;
const UDP_LEN: usize = 8;
/// The largest IPv4 total length (and IPv6 payload length without jumbograms).
const IP_MAX: usize = 65535;
/// The smallest TCP segment size Linux sends (`TCP_MIN_MSS`).
pub const TCP_MIN_SEG: u16 = 88;
/// The most segments a UDP super-frame may carry (Linux's `UDP_MAX_SEGMENTS`).
pub const UDP_MAX_SEGS: usize = 128;

/// The transport a super-frame segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp4,
    Tcp6,
    Udp4,
    Udp6,
}

impl Kind {
    pub fn v6(self) -> bool {
        matches!(self, Kind::Tcp6 | Kind::Udp6)
    }
    pub fn tcp(self) -> bool {
        matches!(self, Kind::Tcp4 | Kind::Tcp6)
    }
    /// Where the checksum field lies in the L4 header.
    pub fn csum_offset(self) -> u16 {
        if self.tcp() {
            16
        } else {
            6
        }
    }
}

/// A checked super-frame layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gso {
    pub kind: Kind,
    /// Offset of the L4 header.
    pub l4: u16,
    /// Every byte before the payload: Ethernet, IP and L4 headers.
    pub hdr_len: u16,
    /// Payload bytes per segment (the last may be shorter).
    pub seg_size: u16,
}

impl Gso {
    /// Reads the layout of `frame` as the virtio header `v` describes it. `Ok(None)` for a
    /// plain frame. The headers are checked: an untagged IPv4 or IPv6 (no extension
    /// headers) packet of the transport the GSO type names, a checksum position that is
    /// that transport's, a non-zero segment size, and a payload.
    pub fn from_virtio(v: &VirtioNetRepr, frame: &[u8]) -> Result<Option<Gso>> {
        if v.gso_type == GsoType::None {
            return Ok(None);
        }
        let g = Gso::check(v, frame)?;
        // A super-frame may not stand for more segments than its sender's kernel would
        // make: a guest cannot turn one frame into thousands of sends.
        let too_many = if g.kind.tcp() {
            v.gso_size < TCP_MIN_SEG
        } else {
            g.segments(frame.len()) > UDP_MAX_SEGS
        };
        if too_many {
            return Err(Error::Malformed);
        }
        Ok(Some(g))
    }

    /// The layout `v` describes, checked against `frame`'s own headers.
    fn check(v: &VirtioNetRepr, frame: &[u8]) -> Result<Gso> {
        if v.gso_size == 0 {
            return Err(Error::Malformed);
        }
        if frame.len() < ETH + IPV4_MIN {
            return Err(Error::Truncated);
        }
        let ethertype = EtherType(get_u16(frame, 12));
        let (v6, proto, l4) = match ethertype {
            EtherType::IPV4 => {
                let ihl = usize::from(frame[ETH] & 0x0f) * 4;
                if frame[ETH] >> 4 != 4 || ihl < IPV4_MIN {
                    return Err(Error::Malformed);
                }
                (false, frame[ETH + 9], ETH + ihl)
            }
            EtherType::IPV6 => {
                if frame.len() < ETH + IPV6_LEN {
                    return Err(Error::Truncated);
                }
                if frame[ETH] >> 4 != 6 {
                    return Err(Error::Malformed);
                }
                (true, frame[ETH + 6], ETH + IPV6_LEN)
            }
            _ => return Err(Error::Malformed),
        };
        let kind = match (v.gso_type, v6, proto) {
            (GsoType::TcpV4, false, 6) => Kind::Tcp4,
            (GsoType::TcpV6, true, 6) => Kind::Tcp6,
            (GsoType::UdpL4, false, 17) => Kind::Udp4,
            (GsoType::UdpL4, true, 17) => Kind::Udp6,
            _ => return Err(Error::Malformed),
        };
        let l4_len = if kind.tcp() {
            TcpPacket::new_checked(frame.get(l4..).ok_or(Error::Truncated)?)?.header_len()
        } else {
            UDP_LEN
        };
        let hdr_len = l4 + l4_len;
        if frame.len() <= hdr_len {
            return Err(Error::Truncated);
        }
        let csum_offset = if kind.tcp() { 16 } else { 6 };
        if v.needs_csum() && (usize::from(v.csum_start) != l4 || v.csum_offset != csum_offset) {
            return Err(Error::Malformed);
        }
        let g = Gso {
            kind,
            l4: l4 as u16,
            hdr_len: hdr_len as u16,
            seg_size: v.gso_size,
        };
        // Every segment must be a valid IP packet.
        if hdr_len - ETH + usize::from(v.gso_size) > IP_MAX {
            return Err(Error::Malformed);
        }
        Ok(g)
    }

    /// The layout of `frame`, one segment whose L4 checksum is partial at `r` (remote
    /// checksum offload): the same checks as [`Gso::from_virtio`] for a frame that stays
    /// one segment, so a transport can complete the checksum on segmenting, and a tap
    /// can take the frame with `NEEDS_CSUM`.
    pub fn from_rco(r: Rco, frame: &[u8]) -> Result<Gso> {
        // The GSO type names the IP version; `check` holds it against the frame.
        let gso_type = match (r.udp, frame.get(12..14)) {
            (true, _) => GsoType::UdpL4,
            (false, Some([0x86, 0xdd])) => GsoType::TcpV6,
            _ => GsoType::TcpV4,
        };
        let v = VirtioNetRepr {
            flags: F_NEEDS_CSUM,
            gso_type,
            gso_size: 1,
            csum_start: r.start,
            csum_offset: r.offset(),
            ..VirtioNetRepr::PLAIN
        };
        let mut one = Gso::check(&v, frame)?;
        // One segment: all of the payload (`check` saw there is some).
        one.seg_size =
            u16::try_from(frame.len() - usize::from(one.hdr_len)).map_err(|_| Error::Malformed)?;
        Ok(one)
    }

    /// Whether `len` bytes of this layout stand for one segment with a partial checksum
    /// (what [`Gso::from_rco`] gives) rather than a super-frame.
    pub fn is_one(&self, len: usize) -> bool {
        self.segments(len) == 1
    }

    /// How many segments a `len`-byte super-frame becomes.
    pub fn segments(&self, len: usize) -> usize {
        let payload = len.saturating_sub(usize::from(self.hdr_len));
        payload.div_ceil(usize::from(self.seg_size)).max(1)
    }

    /// Bytes on the wire (Ethernet frames, no tunnel) of all its segments.
    pub fn wire_len(&self, len: usize) -> usize {
        len + (self.segments(len) - 1) * usize::from(self.hdr_len)
    }

    /// The longest segment's length.
    pub fn largest(&self, len: usize) -> usize {
        let payload = len.saturating_sub(usize::from(self.hdr_len));
        usize::from(self.hdr_len) + payload.min(usize::from(self.seg_size))
    }

    /// The virtio header of a one-segment frame with its checksum partial: a plain
    /// frame with `NEEDS_CSUM`.
    pub fn to_virtio_one(&self) -> VirtioNetRepr {
        VirtioNetRepr {
            flags: F_NEEDS_CSUM,
            csum_start: self.l4,
            csum_offset: self.kind.csum_offset(),
            ..VirtioNetRepr::PLAIN
        }
    }

    /// The virtio header that hands the super-frame on unsegmented.
    pub fn to_virtio(&self) -> VirtioNetRepr {
        VirtioNetRepr {
            flags: F_NEEDS_CSUM,
            gso_type: match self.kind {
                Kind::Tcp4 => GsoType::TcpV4,
                Kind::Tcp6 => GsoType::TcpV6,
                Kind::Udp4 | Kind::Udp6 => GsoType::UdpL4,
            },
            ecn: false,
            hdr_len: self.hdr_len,
            gso_size: self.seg_size,
            csum_start: self.l4,
            csum_offset: self.kind.csum_offset(),
        }
    }

    /// Writes the headers of segment `i` of `frame` into `out[..hdr_len]` and returns
    /// where the segment's payload lies in `frame`. The L4 checksum is complete (it
    /// covers that payload). `i` must be below [`Gso::segments`].
    pub fn segment_header(&self, frame: &[u8], i: usize, out: &mut [u8]) -> Range<usize> {
        self.headers(frame, i, out, false)
    }

    /// [`Gso::segment_header`] with the L4 checksum left partial: the pseudo-header's
    /// sum, as a `NEEDS_CSUM` frame carries it, for a receiver that completes it where
    /// needed (remote checksum offload). The payload is not read.
    pub fn segment_header_partial(&self, frame: &[u8], i: usize, out: &mut [u8]) -> Range<usize> {
        self.headers(frame, i, out, true)
    }

    fn headers(&self, frame: &[u8], i: usize, out: &mut [u8], partial: bool) -> Range<usize> {
        let hl = usize::from(self.hdr_len);
        let l4 = usize::from(self.l4);
        let seg = usize::from(self.seg_size);
        let n = self.segments(frame.len());
        let start = hl + i * seg;
        let end = (start + seg).min(frame.len());
        let plen = end - start;
        let out = &mut out[..hl];
        out.copy_from_slice(&frame[..hl]);
        let l4_len = hl - l4 + plen;
        let pseudo = if self.kind.v6() {
            set_u16(out, ETH + 4, (l4_len + l4 - ETH - IPV6_LEN) as u16);
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&out[ETH + 8..ETH + 24]);
            dst.copy_from_slice(&out[ETH + 24..ETH + 40]);
            let proto = if self.kind.tcp() { 6 } else { 17 };
            checksum::pseudo_header_v6(&src, &dst, proto, l4_len as u32)
        } else {
            let mut ip = Ipv4Packet::new_unchecked(&mut out[ETH..]);
            ip.set_total_len((l4 - ETH + l4_len) as u16);
            ip.set_ident(ip.ident().wrapping_add(i as u16));
            ip.fill_checksum();
            pseudo4(&out[ETH..], out[ETH + 9], l4_len)
        };
        let csum_at = if self.kind.tcp() {
            let mut t = TcpPacket::new_unchecked(&mut out[l4..]);
            let seq = get_u32(frame, l4 + tcp::field::SEQ).wrapping_add((i * seg) as u32);
            t.set_seq(seq);
            let mut f = frame[l4 + tcp::field::FLAGS];
            if i + 1 < n {
                f &= !(tcp::flags::FIN | tcp::flags::PSH);
            }
            if i > 0 {
                f &= !tcp::flags::CWR;
            }
            t.set_flags(f);
            l4 + tcp::field::CHECKSUM
        } else {
            set_u16(out, l4 + 4, (UDP_LEN + plen) as u16);
            l4 + 6
        };
        if partial {
            set_u16(out, csum_at, pseudo);
            return start..end;
        }
        set_u16(out, csum_at, 0);
        let mut c = !checksum::combine(&[
            pseudo,
            checksum::sum(&out[l4..]),
            checksum::sum(&frame[start..end]),
        ]);
        if c == 0 && !self.kind.tcp() {
            c = 0xffff; // UDP: zero means "no checksum"
        }
        set_u16(out, csum_at, c);
        start..end
    }

    /// Writes segment `i` whole into `out`; returns its length.
    pub fn write_segment(&self, frame: &[u8], i: usize, out: &mut [u8]) -> usize {
        let hl = usize::from(self.hdr_len);
        let p = self.segment_header(frame, i, out);
        let len = hl + p.len();
        out[hl..len].copy_from_slice(&frame[p]);
        len
    }
}

/// The pseudo-header sum for an IPv4 header at the start of `ip` and an L4 length.
fn pseudo4(ip: &[u8], proto: u8, l4_len: usize) -> u16 {
    let p = Ipv4Packet::new_unchecked(ip);
    // The checksum's length field is 16 bits; an IPv4 L4 length fits.
    checksum::pseudo_header(p.src_addr(), p.dst_addr(), proto, l4_len as u16)
}

/// Completes the partial checksum of a plain frame (virtio `NEEDS_CSUM`): the field at
/// `start + offset` holds the pseudo-header's sum; the checksum runs from `start` to the
/// end of the frame.
pub fn complete_checksum(frame: &mut [u8], start: usize, offset: usize) -> Result<()> {
    let at = start + offset;
    if at + 2 > frame.len() {
        return Err(Error::Truncated);
    }
    let mut c = !checksum::sum(&frame[start..]);
    if c == 0 && offset == 6 {
        c = 0xffff; // UDP
    }
    set_u16(frame, at, c);
    Ok(())
}

/// What the coalescer did with a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// It is part of the pending super-frame now.
    Added,
    /// It does not continue the pending super-frame: finish that one, then push again.
    Flush,
    /// It is not coalescable at all (not TCP/IPv4, flags, no payload, bad checksum):
    /// finish the pending super-frame, then send this one as it is.
    Alone,
}

/// A TCP/IPv4 (or, when enabled, UDP/IPv4) super-frame being built in a caller's
/// buffer from segments of one flow.
#[derive(Debug, Clone, Default)]
pub struct Coalescer {
    /// UDP datagrams coalesce too (the receiver takes USO super-frames).
    udp: bool,
    /// The pending super-frame's transport (meaningful while `segs > 0`).
    kind: Option<Kind>,
    len: usize,
    hdr_len: usize,
    seg_size: usize,
    segs: usize,
    next_seq: u32,
    /// A short or PSH segment ended it: nothing more may follow.
    closed: bool,
    /// The first segment's L4 checksum is partial (it came with remote checksum
    /// offload): alone, it leaves with `NEEDS_CSUM`.
    partial: bool,
}

/// A segment the coalescer may take: offsets into it.
struct Seg {
    kind: Kind,
    hdr_len: usize,
    end: usize,
    /// TCP: sequence number and flags (0 for UDP).
    seq: u32,
    flags: u8,
}

/// Checks `f` is a plain, checksummed TCP/IPv4 data segment, or (with `udp`) UDP/IPv4
/// datagram, without IP options. With `partial`, its L4 checksum is partial and is not
/// verified (the outer UDP checksum covered it on the way).
fn coalescable(f: &[u8], udp: bool, partial: bool) -> Option<Seg> {
    if f.len() < ETH + IPV4_MIN + UDP_LEN || EtherType(get_u16(f, 12)) != EtherType::IPV4 {
        return None;
    }
    let ip = &f[ETH..];
    let total = usize::from(get_u16(ip, 2));
    // Version 4, no options, TCP (or UDP), not a fragment, whole.
    let proto_ok = ip[9] == 6 || (udp && ip[9] == 17);
    if ip[0] != 0x45 || !proto_ok || get_u16(ip, 6) & 0x3fff != 0 || total > ip.len() {
        return None;
    }
    if !Ipv4Packet::new_unchecked(ip).verify_checksum() {
        return None;
    }
    if ip[9] == 17 {
        let u = &ip[IPV4_MIN..total.max(IPV4_MIN)];
        if u.len() <= UDP_LEN || usize::from(get_u16(u, 4)) != u.len() {
            return None;
        }
        // A zero checksum is "none" (IPv4): nothing to verify, and a partial one for
        // the whole is as good.
        let c = get_u16(u, 6);
        if !partial
            && c != 0
            && checksum::combine(&[pseudo4(ip, 17, u.len()), checksum::sum(u)]) != 0xffff
        {
            return None;
        }
        return Some(Seg {
            kind: Kind::Udp4,
            hdr_len: ETH + IPV4_MIN + UDP_LEN,
            end: ETH + total,
            seq: 0,
            flags: 0,
        });
    }
    if total < IPV4_MIN + tcp::HEADER_LEN {
        return None;
    }
    let t = TcpPacket::new_checked(&ip[IPV4_MIN..total]).ok()?;
    let flags = t.flags();
    if flags & !(tcp::flags::ACK | tcp::flags::PSH) != 0 || flags & tcp::flags::ACK == 0 {
        return None;
    }
    if t.payload().is_empty() {
        return None;
    }
    if !partial && !t.verify_checksum(pseudo4(ip, 6, total - IPV4_MIN)) {
        return None;
    }
    Some(Seg {
        kind: Kind::Tcp4,
        hdr_len: ETH + IPV4_MIN + t.header_len(),
        end: ETH + total,
        seq: t.seq(),
        flags,
    })
}

impl Coalescer {
    /// A coalescer of TCP segments and, with `udp`, of UDP datagrams (for a receiver
    /// that takes USO super-frames: a tap with `TUN_F_USO4`).
    pub fn new(udp: bool) -> Coalescer {
        Coalescer {
            udp,
            ..Coalescer::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.segs == 0
    }

    /// Segments in the pending super-frame.
    pub fn segments(&self) -> usize {
        self.segs
    }

    /// Offers frame `f`; `buf` holds the pending super-frame (the same buffer every
    /// call, at least 14 + 65535 bytes).
    pub fn push(&mut self, buf: &mut [u8], f: &[u8]) -> Push {
        self.offer(buf, f, false)
    }

    /// Offers frame `f`, whose L4 checksum is partial (remote checksum offload: it is
    /// taken as verified). `Push::Alone` means it goes on with `NEEDS_CSUM`.
    pub fn push_partial(&mut self, buf: &mut [u8], f: &[u8]) -> Push {
        self.offer(buf, f, true)
    }

    fn offer(&mut self, buf: &mut [u8], f: &[u8], partial: bool) -> Push {
        let Some(s) = coalescable(f, self.udp, partial) else {
            return Push::Alone;
        };
        let plen = s.end - s.hdr_len;
        if self.segs == 0 {
            if s.end > buf.len() {
                return Push::Alone;
            }
            buf[..s.end].copy_from_slice(&f[..s.end]);
            *self = Coalescer {
                udp: self.udp,
                kind: Some(s.kind),
                len: s.end,
                hdr_len: s.hdr_len,
                seg_size: plen,
                segs: 1,
                next_seq: s.seq.wrapping_add(plen as u32),
                closed: s.flags & tcp::flags::PSH != 0,
                partial,
            };
            return Push::Added;
        }
        let h = self.hdr_len;
        let ip = ETH;
        let t = ETH + IPV4_MIN;
        let same = !self.closed
            && self.kind == Some(s.kind)
            && s.hdr_len == h
            && plen <= self.seg_size
            && self.len + plen - ETH <= IP_MAX
            && self.len + plen <= buf.len()
            // Ethernet addresses and type; IPv4 version, TOS; DF; TTL, protocol; addresses.
            && buf[..ETH + 2] == f[..ETH + 2]
            && buf[ip + 6] & 0x40 == f[ip + 6] & 0x40
            && buf[ip + 8..ip + 10] == f[ip + 8..ip + 10]
            && buf[ip + 12..ip + 20] == f[ip + 12..ip + 20]
            // Ports.
            && buf[t..t + 4] == f[t..t + 4];
        let same = same
            && match s.kind {
                // Contiguous; ACK, data offset, window, options; flags but PSH.
                Kind::Tcp4 => {
                    s.seq == self.next_seq
                        && buf[t + 8..t + 13] == f[t + 8..t + 13]
                        && buf[t + 14..t + 16] == f[t + 14..t + 16]
                        && buf[t + tcp::HEADER_LEN..h] == f[t + tcp::HEADER_LEN..h]
                        && (buf[t + 13] ^ s.flags) & !tcp::flags::PSH == 0
                }
                // No more datagrams than the receiver's kernel takes in one.
                _ => self.segs < UDP_MAX_SEGS,
            };
        if !same {
            return Push::Flush;
        }
        buf[self.len..self.len + plen].copy_from_slice(&f[s.hdr_len..s.end]);
        self.len += plen;
        self.segs += 1;
        self.next_seq = self.next_seq.wrapping_add(plen as u32);
        if s.flags & tcp::flags::PSH != 0 {
            buf[t + 13] |= tcp::flags::PSH;
            self.closed = true;
        }
        if plen < self.seg_size {
            self.closed = true;
        }
        Push::Added
    }

    /// Finishes the pending super-frame in `buf`: its virtio header and length, or
    /// `None` when nothing is pending. One segment comes back as it arrived (checksum
    /// verified, or partial with `NEEDS_CSUM` if it came so); more carry IPv4 length and
    /// checksum for the whole (UDP: and its length), and an L4 checksum left partial
    /// (pseudo-header sum), for the receiver to take as verified.
    pub fn finish(&mut self, buf: &mut [u8]) -> Option<(VirtioNetRepr, usize)> {
        if self.segs == 0 {
            return None;
        }
        let udp = self.udp;
        let c = core::mem::replace(self, Coalescer::new(udp));
        let t = ETH + IPV4_MIN;
        let g = Gso {
            kind: c.kind.unwrap_or(Kind::Tcp4),
            l4: t as u16,
            hdr_len: c.hdr_len as u16,
            seg_size: c.seg_size as u16,
        };
        if c.segs == 1 && c.partial {
            return Some((g.to_virtio_one(), c.len));
        }
        if c.segs == 1 {
            let v = VirtioNetRepr {
                flags: F_DATA_VALID,
                ..VirtioNetRepr::PLAIN
            };
            return Some((v, c.len));
        }
        let mut ip = Ipv4Packet::new_unchecked(&mut buf[ETH..]);
        ip.set_total_len((c.len - ETH) as u16);
        ip.fill_checksum();
        let (proto, csum_at) = match g.kind {
            Kind::Udp4 => {
                set_u16(buf, t + 4, (c.len - t) as u16);
                (17, t + 6)
            }
            _ => (6, t + tcp::field::CHECKSUM),
        };
        let pseudo = pseudo4(&buf[ETH..], proto, c.len - t);
        set_u16(buf, csum_at, pseudo);
        Some((g.to_virtio(), c.len))
    }
}

#[cfg(test)]
mod tests;
