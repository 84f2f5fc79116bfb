//! The one numbered list of what can happen to a frame, shared by the XDP classifier
//! and the user-space switch (like Cilium's drop reasons). Counters everywhere are
//! arrays indexed by `Verdict as usize`; the numbers are part of the eBPF map ABI, so
//! new reasons go at the end.

/// What happened to a frame. `Forward` and `Pass` are not drops; everything else is.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Switched (or, in XDP, redirected to a Violin's AF_XDP socket).
    Forward = 0,
    /// Not Violin traffic: handed to the host's kernel untouched (XDP_PASS).
    Pass = 1,
    /// Shorter than the headers it claims to carry.
    Truncated = 2,
    /// A header field the format does not allow (bad IHL/version/checksum, VXLAN I flag clear).
    Malformed = 3,
    /// VXLAN with a VNI no Violin on this host uses.
    UnknownVni = 4,
    /// VXLAN from an outer source address that is not a member host of that VNI.
    NotMember = 5,
    /// A zero-length frame from a guest.
    ZeroLength = 6,
    /// A frame longer than the Violin's largest frame.
    Oversize = 7,
    /// A source MAC that does not belong to the sender (guest spoofing, or a tunnel peer
    /// sending for a guest that lives elsewhere), or a multicast source MAC.
    Spoofed = 8,
    /// The topology has no link between source and destination.
    NoLink = 9,
    /// The link's token bucket was empty.
    PolicedLink = 10,
    /// The sending guest's token bucket was empty.
    PolicedGuest = 11,
    /// Unicast to a MAC that no member has, or a flood with no allowed recipient.
    NoDestination = 12,
    /// The destination guest is not connected to its socket.
    PortDown = 13,
    /// The destination guest is not reading: its bounded queue was full.
    QueueFull = 14,
    /// The underlay refused the encapsulated frame (send error).
    TunnelTxError = 15,
    /// Destination is the sender itself.
    Hairpin = 16,
    /// Violin traffic that arrived on an rx queue without AF_XDP sockets: handed to the
    /// kernel (XDP_PASS), whose UDP socket the daemon reads as well (the slow path).
    OtherQueue = 17,
    /// A tunnelled frame larger than the linear buffer XDP sees (a GSO super-frame from
    /// a veth peer, or a jumbo frame): handed to the kernel (XDP_PASS), whose UDP socket
    /// takes it whole with GRO.
    Jumbo = 18,
    /// The packet worker that owns the frame's Violin was not keeping up: the queue of
    /// frames handed to it by the worker of another rx queue was full.
    HandoffFull = 19,
    /// IPv4 from a guest with a source address that is not its own (nor in its
    /// `allowed_ips`).
    SpoofedIp = 20,
    /// ARP from a guest claiming an address that is not its own, or a hardware address
    /// other than the frame's source.
    SpoofedArp = 21,
}

impl Verdict {
    /// Number of verdicts: the length of every counter array.
    pub const COUNT: usize = 22;

    pub const ALL: [Verdict; Verdict::COUNT] = [
        Verdict::Forward,
        Verdict::Pass,
        Verdict::Truncated,
        Verdict::Malformed,
        Verdict::UnknownVni,
        Verdict::NotMember,
        Verdict::ZeroLength,
        Verdict::Oversize,
        Verdict::Spoofed,
        Verdict::NoLink,
        Verdict::PolicedLink,
        Verdict::PolicedGuest,
        Verdict::NoDestination,
        Verdict::PortDown,
        Verdict::QueueFull,
        Verdict::TunnelTxError,
        Verdict::Hairpin,
        Verdict::OtherQueue,
        Verdict::Jumbo,
        Verdict::HandoffFull,
        Verdict::SpoofedIp,
        Verdict::SpoofedArp,
    ];

    pub const fn is_drop(self) -> bool {
        !matches!(
            self,
            Verdict::Forward | Verdict::Pass | Verdict::OtherQueue | Verdict::Jumbo
        )
    }

    /// A stable snake_case name for logs, JSON and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Forward => "forward",
            Verdict::Pass => "pass",
            Verdict::Truncated => "truncated",
            Verdict::Malformed => "malformed",
            Verdict::UnknownVni => "unknown_vni",
            Verdict::NotMember => "not_member",
            Verdict::ZeroLength => "zero_length",
            Verdict::Oversize => "oversize",
            Verdict::Spoofed => "spoofed",
            Verdict::NoLink => "no_link",
            Verdict::PolicedLink => "policed_link",
            Verdict::PolicedGuest => "policed_guest",
            Verdict::NoDestination => "no_destination",
            Verdict::PortDown => "port_down",
            Verdict::QueueFull => "queue_full",
            Verdict::TunnelTxError => "tunnel_tx_error",
            Verdict::Hairpin => "hairpin",
            Verdict::OtherQueue => "other_queue",
            Verdict::Jumbo => "jumbo",
            Verdict::HandoffFull => "handoff_full",
            Verdict::SpoofedIp => "spoofed_ip",
            Verdict::SpoofedArp => "spoofed_arp",
        }
    }

    pub fn from_u32(v: u32) -> Option<Verdict> {
        Verdict::ALL.get(v as usize).copied()
    }
}

impl From<crate::wire::Error> for Verdict {
    fn from(e: crate::wire::Error) -> Verdict {
        match e {
            crate::wire::Error::Truncated => Verdict::Truncated,
            crate::wire::Error::Malformed => Verdict::Malformed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_is_dense_and_stable() {
        for (i, v) in Verdict::ALL.iter().enumerate() {
            assert_eq!(*v as usize, i, "{v:?}");
            assert_eq!(Verdict::from_u32(i as u32), Some(*v));
        }
        assert_eq!(Verdict::from_u32(Verdict::COUNT as u32), None);
        assert!(!Verdict::Forward.is_drop() && !Verdict::Pass.is_drop());
        assert!(!Verdict::OtherQueue.is_drop() && !Verdict::Jumbo.is_drop());
        assert!(Verdict::NoLink.is_drop());
    }

    #[test]
    fn names_are_unique() {
        for a in Verdict::ALL {
            for b in Verdict::ALL {
                assert!(a == b || a.name() != b.name());
            }
        }
    }
}
