//! The underlay's steering by Violin (`violin_steer`, an `sk_reuseport` program): in a
//! throwaway namespace, on its loopback only, VXLAN datagrams sent to a group of two
//! workers' sockets land on the socket their VNI is steered to. Needs root (BPF).

mod common;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};
use violin_dp::datapath::transport::udp::{Received, UdpUnderlay};
use violin_dp::xdp::classifier::read_object;
use violin_dp::xdp::steer::VniSteering;

#[test]
fn each_violin_datagram_lands_on_the_socket_its_vni_is_steered_to() {
    if !common::can_run() {
        return;
    }
    let ns = format!("tstr{}", std::process::id());
    let _guard = violin_dp::host::netns::NetnsGuard::create(&ns).unwrap();
    violin_dp::host::netns::run_in(&ns, || {
        use violin_dp::host::netlink;
        netlink::with_handle(|h| async move { netlink::set_up(&h, "lo").await })?;
        steer_in_namespace();
        Ok(())
    })
    .unwrap();
}

/// The VNIs of the datagrams waiting on `fd`, read through `udp`'s buffers.
fn vnis_on(udp: &UdpUnderlay, fd: i32) -> Vec<Option<u32>> {
    let mut got = Vec::new();
    let until = Instant::now() + Duration::from_millis(300);
    loop {
        let n = udp
            .recv_on(fd, |r| {
                got.push(match r {
                    Received::Frame(_, vx, _) => Some(vx.vni),
                    Received::Bad(_) => None,
                })
            })
            .unwrap();
        if n == 0 {
            if Instant::now() > until || !got.is_empty() {
                return got;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn steer_in_namespace() {
    let group = UdpUnderlay::bind_group(Ipv4Addr::LOCALHOST, 0, 2).unwrap();
    let at = group[0].local().unwrap();
    let fds: Vec<BorrowedFd> = group
        .iter()
        // SAFETY: the group outlives the steering (both live to the end of this function).
        .map(|u| unsafe { BorrowedFd::borrow_raw(u.fd()) })
        .collect();
    let obj = read_object().unwrap();
    let mut steering = VniSteering::attach(&obj, at, &fds).unwrap();
    let mut own = Vec::new();
    steering
        .open(7, |s| {
            own.push(s);
            Ok(())
        })
        .unwrap();
    steering
        .open(300, |s| {
            own.push(s);
            Ok(())
        })
        .unwrap();
    steering.to_worker(11, 0).unwrap();
    let (v7, v300) = (own[0].as_raw_fd(), own[1].as_raw_fd());
    let (w0, w1) = (group[0].fd(), group[1].fd());

    let client = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).unwrap();
    // From several source ports, so the group's hash alone would spread them.
    let clients: Vec<UdpSocket> = (0..4)
        .map(|_| UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).unwrap())
        .collect();
    let inner = [0u8; 60];
    let send = |vni: u32| {
        for c in &clients {
            c.send_to(&common::packets::vxlan(vni, &inner), at).unwrap();
        }
    };
    let reader = &group[0];
    let four = |v: u32| vec![Some(v); 4];

    send(7);
    assert_eq!(vnis_on(reader, v7), four(7), "VNI 7 on its own socket");
    send(300);
    assert_eq!(
        vnis_on(reader, v300),
        four(300),
        "VNI 300 on its own socket"
    );
    send(8);
    assert_eq!(
        vnis_on(reader, w0),
        four(8),
        "an unsteered VNI on worker 8 mod 2"
    );
    send(9);
    assert_eq!(
        vnis_on(reader, w1),
        four(9),
        "an unsteered VNI on worker 9 mod 2"
    );
    send(11);
    assert_eq!(vnis_on(reader, w0), four(11), "VNI 11 steered to worker 0");
    // Too short for a VXLAN header: socket 0, whose worker counts it as malformed.
    client.send_to(&[1, 2, 3], at).unwrap();
    assert_eq!(vnis_on(reader, w0), vec![None], "a runt on socket 0");
    // Nothing went astray.
    for fd in [v7, v300, w0, w1] {
        assert!(
            vnis_on(reader, fd).is_empty(),
            "socket {fd} holds nothing more"
        );
    }
    // A Violin that leaves: its datagrams go to worker 7 mod 2 again.
    steering.forget(7);
    drop(own.remove(0));
    send(7);
    assert_eq!(vnis_on(reader, w1), four(7), "VNI 7 back on worker 1");
    assert!(vnis_on(reader, v300).is_empty());
    // Its index is reused by the next Violin.
    steering
        .open(12, |s| {
            own.push(s);
            Ok(())
        })
        .unwrap();
    send(12);
    assert_eq!(vnis_on(reader, own[1].as_raw_fd()), four(12));
}
