//! The underlay over a plain UDP socket: VXLAN (RFC 7348) with the kernel building the
//! outer IPv4/UDP headers. Used where XDP is unavailable, and as the reference the
//! kernel-bypass path must match.
//!
//! Receive: `recvfrom` into the caller's buffer → VXLAN header check → (VNI, inner
//! frame). Send: `sendmsg` of two iovecs, the 8-byte VXLAN header and the frame, so the
//! frame is never copied.

use crate::datapath::fastpath::encap;
use nix::sys::socket::{sendmsg, MsgFlags, SockaddrIn};
use std::io::{self, IoSlice};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use violin_common::Verdict;

pub struct UdpUnderlay {
    sock: UdpSocket,
    port: u16,
}

/// One received datagram, decapsulated.
pub enum Received<'a> {
    /// (outer source, VNI, inner frame).
    Frame(Ipv4Addr, u32, &'a [u8]),
    /// Not valid VXLAN: count it.
    Bad(Verdict),
}

impl UdpUnderlay {
    /// Binds `addr:port` (non-blocking) with large socket buffers.
    pub fn bind(addr: Ipv4Addr, port: u16) -> io::Result<UdpUnderlay> {
        let sock = UdpSocket::bind(SocketAddrV4::new(addr, port))?;
        sock.set_nonblocking(true)?;
        for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
            let v: libc::c_int = 4 << 20;
            // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live c_int.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    &v as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        let port = sock.local_addr()?.port();
        Ok(UdpUnderlay { sock, port })
    }

    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Receives one datagram into `buf`. `Ok(None)` when nothing is waiting.
    pub fn recv<'a>(&self, buf: &'a mut [u8]) -> io::Result<Option<Received<'a>>> {
        loop {
            match self.sock.recv_from(buf) {
                Ok((n, SocketAddr::V4(from))) => {
                    return Ok(Some(match encap::decap(&buf[..n]) {
                        Ok((vni, inner)) => Received::Frame(*from.ip(), vni, inner),
                        Err(v) => Received::Bad(v),
                    }))
                }
                Ok((_, SocketAddr::V6(_))) => return Ok(Some(Received::Bad(Verdict::NotMember))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Encapsulates `frame` with `vni` and sends it to `dst` on the VXLAN port.
    pub fn send(&self, dst: Ipv4Addr, vni: u32, frame: &[u8]) -> Result<(), Verdict> {
        let hdr = encap::header(vni);
        let iov = [IoSlice::new(&hdr), IoSlice::new(frame)];
        let addr = SockaddrIn::from(SocketAddrV4::new(dst, self.port));
        match sendmsg(
            self.sock.as_raw_fd(),
            &iov,
            &[],
            MsgFlags::MSG_DONTWAIT,
            Some(&addr),
        ) {
            Ok(_) => Ok(()),
            Err(_) => Err(Verdict::TunnelTxError),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encapsulates_and_decapsulates_over_loopback() {
        let a = UdpUnderlay::bind(Ipv4Addr::LOCALHOST, 0).unwrap();
        // Same port on another loopback address, as hosts use the same VXLAN port.
        let b = UdpUnderlay::bind(Ipv4Addr::new(127, 0, 0, 2), a.port()).unwrap();
        a.send(Ipv4Addr::new(127, 0, 0, 2), 101, b"inner frame")
            .unwrap();
        let mut buf = [0u8; 2048];
        let mut got = None;
        for _ in 0..200 {
            if let Some(r) = b.recv(&mut buf).unwrap() {
                got = Some(match r {
                    Received::Frame(src, vni, f) => Ok((src, vni, f.to_vec())),
                    Received::Bad(v) => Err(v),
                });
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            got,
            Some(Ok((Ipv4Addr::LOCALHOST, 101, b"inner frame".to_vec())))
        );
        // A datagram that is not VXLAN is reported, not passed on.
        let raw = UdpSocket::bind("127.0.0.1:0").unwrap();
        raw.send_to(&[0u8; 4], ("127.0.0.2", a.port())).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(matches!(
            b.recv(&mut buf).unwrap(),
            Some(Received::Bad(Verdict::Truncated))
        ));
    }
}
