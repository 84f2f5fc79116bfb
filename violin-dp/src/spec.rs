//! The Violin spec: the TOML a user writes, its validation, and the resolved form the
//! CLI sends to each host's daemon.
//!
//! Validation is all-or-nothing: every problem is collected with the path of the field
//! it concerns (`guest[2].ip`, `link[0].rate`), and a spec with any problem is rejected
//! whole.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;
use violin_common::wire::EthernetAddress;
use violin_common::VNI_MAX;

/// Default guest MTU: a 1500-byte underlay minus the VXLAN overhead (50 bytes).
pub const DEFAULT_MTU: u16 = 1450;

// ---------------------------------------------------------------------------------------
// What the user writes.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: String,
    vni: i64,
    #[serde(default)]
    mtu: Option<i64>,
    #[serde(default)]
    guest: Vec<RawGuest>,
    #[serde(default)]
    link: Option<Vec<RawLink>>,
    #[serde(default)]
    external: Vec<RawExternal>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuest {
    name: String,
    host: String,
    ip: String,
    #[serde(default)]
    mac: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    socket: Option<String>,
    #[serde(default)]
    port: Option<String>,
    #[serde(default)]
    rate: Option<String>,
    #[serde(default)]
    burst: Option<String>,
    #[serde(default)]
    pps: Option<i64>,
    #[serde(default)]
    cpus: Option<f64>,
    #[serde(default)]
    memory: Option<String>,
    #[serde(default)]
    kernel: Option<String>,
    #[serde(default)]
    initrd: Option<String>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    packages: Option<Vec<String>>,
    #[serde(default)]
    append: Option<String>,
    #[serde(default)]
    allowed_ips: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    between: Vec<String>,
    #[serde(default)]
    rate: Option<String>,
    #[serde(default)]
    burst: Option<String>,
    #[serde(default)]
    pps: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExternal {
    name: String,
    underlay: String,
    mac: String,
}

// ---------------------------------------------------------------------------------------
// The validated, resolved form.

/// How a guest's frames cross its UNIX socket (both as QEMU speaks them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Framing {
    /// `-netdev stream`: a 4-byte big-endian length, then the frame.
    Stream,
    /// `-netdev dgram`: one frame per datagram.
    Dgram,
}

/// What sits behind a guest's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestKind {
    /// A lightweight guest: a network namespace the daemon creates, whose `eth0` is a
    /// tap the daemon drives (or, with `port = "socket"`, a tap a relay connects to the
    /// socket, as QEMU would; or a veth driven by AF_XDP).
    Netns,
    /// Only the socket: whoever the user starts (a QEMU VM, a test) attaches to it.
    Socket,
    /// A QEMU virtual machine the daemon starts, attached with `-netdev stream|dgram`.
    Qemu,
}

/// Resource limits of a guest: a cgroup for netns guests, `-smp`/`-m` for QEMU guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Limits {
    /// CPU, in thousandths of a core (netns: a CFS quota; qemu: whole vCPUs).
    pub millicpus: Option<u32>,
    /// Memory in bytes (netns: the cgroup's limit, OOM inside it; qemu: guest RAM).
    pub memory: Option<u64>,
}

/// What a QEMU guest boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VmSpec {
    /// Kernel and initramfs; default: the image `scripts/build-guest-image.sh` builds.
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    /// A disk image attached as the guest's virtio disk (opened read-only, writes go to
    /// a throw-away overlay).
    pub image: Option<String>,
    /// Extra Debian packages in the guest's initramfs (built once per package set).
    pub packages: Vec<String>,
    /// Extra kernel command line.
    pub append: Option<String>,
}

/// Least memory a QEMU guest boots with here (notes: `-m 96`), and its default.
pub const QEMU_MIN_MEMORY: u64 = 96 << 20;
pub const QEMU_DEFAULT_MEMORY: u64 = 128 << 20;

/// How a lightweight guest's NIC reaches the switch. A spec's netns guest gets `Tap`
/// unless it asks for a socket; `Socket` is the default only of stored specs older than
/// that (every guest had a socket then).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PortKind {
    /// The guest's UNIX socket (through a relay for netns guests, as QEMU would).
    #[default]
    Socket,
    /// A veth whose host end the daemon drives with AF_XDP (netns guests only; needs the
    /// xdp data plane).
    Xdp,
    /// A tap the daemon drives itself, with offloads: super-frames both ways, no relay
    /// (netns guests only; either data plane).
    Tap,
}

/// A token-bucket rate: `bytes_per_sec` refilled continuously, `burst_bytes` deep, and
/// optionally a packet rate (bucket depth: `burst_packets`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    pub bytes_per_sec: u64,
    pub burst_bytes: u64,
    pub pps: Option<u64>,
}

impl Rate {
    /// Default bucket depth: 10 ms at the rate, but never less than 4 full frames.
    /// Caps shape (a guest is held back, a link queues), so the bucket need not absorb
    /// TCP's bursts; a shallow one keeps low rates exact (at 1 Mbit/s 6 KB is 0.5 % of
    /// 10 s).
    pub fn default_burst(bytes_per_sec: u64) -> u64 {
        (bytes_per_sec / 100).max(4 * 1518)
    }
    pub fn burst_packets(&self) -> u64 {
        self.pps.map(|p| (p / 100).max(16)).unwrap_or(0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberKind {
    Guest {
        host: String,
        ip: Ipv4Addr,
        prefix_len: u8,
        kind: GuestKind,
        framing: Framing,
        #[serde(default)]
        port: PortKind,
        #[serde(default)]
        limits: Limits,
        #[serde(default)]
        vm: Option<VmSpec>,
        /// Further source addresses the guest may send IPv4 from and claim in ARP,
        /// besides `ip` (a router's opt-out of the source guard).
        #[serde(default)]
        allowed_ips: Vec<IpNet>,
    },
    External {
        underlay: Ipv4Addr,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub mac: EthernetAddressSerde,
    pub kind: MemberKind,
    /// Cap on everything this member sends.
    pub rate: Option<Rate>,
}

impl Member {
    pub fn host(&self) -> Option<&str> {
        match &self.kind {
            MemberKind::Guest { host, .. } => Some(host),
            MemberKind::External { .. } => None,
        }
    }
}

/// An IPv4 network, `addr/prefix` (`/32`: one address; `0.0.0.0/0`: any).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpNet {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl IpNet {
    /// The network's mask, as a host-order u32.
    pub fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (u32::from(ip) ^ u32::from(self.addr)) & self.mask() == 0
    }
    /// `10.1.0.0/16`, or a bare address for `/32`.
    pub fn parse(s: &str) -> Result<IpNet, String> {
        let (addr, prefix) = addr_and_prefix(s.split_once('/').unwrap_or((s, "32")), 0)?;
        let net = IpNet { addr, prefix };
        if u32::from(addr) & !net.mask() != 0 {
            return Err(format!(
                "{s:?} has host bits set (the network is {}/{prefix})",
                Ipv4Addr::from(u32::from(addr) & net.mask())
            ));
        }
        Ok(net)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// An allowed pair of members (indices into `Violin::members`); the rate applies to each
/// direction separately, like a full-duplex wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub a: usize,
    pub b: usize,
    pub rate: Option<Rate>,
}

/// A validated Violin, with every host it uses resolved to an underlay address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violin {
    pub name: String,
    pub vni: u32,
    pub mtu: u16,
    pub members: Vec<Member>,
    /// `None`: every pair may talk. `Some`: only these pairs.
    pub links: Option<Vec<Link>>,
    /// Underlay address of each host that has a guest of this Violin.
    pub hosts: BTreeMap<String, Ipv4Addr>,
}

impl Violin {
    /// Largest frame a guest may send: MTU + Ethernet header + one VLAN tag.
    pub fn max_frame(&self) -> usize {
        self.mtu as usize + 14 + 4
    }
    pub fn member(&self, name: &str) -> Option<usize> {
        self.members.iter().position(|m| m.name == name)
    }
}

/// `EthernetAddress` as a `"02:aa:…"` string in JSON/TOML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EthernetAddressSerde(pub EthernetAddress);

impl Serialize for EthernetAddressSerde {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for EthernetAddressSerde {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        EthernetAddress::parse(&s)
            .map(EthernetAddressSerde)
            .ok_or_else(|| serde::de::Error::custom(format!("bad MAC address {s:?}")))
    }
}

// ---------------------------------------------------------------------------------------
// Errors.

/// One problem with a spec: the field it concerns and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// A rejected spec: every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    pub errors: Vec<FieldError>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid Violin spec ({} problem{})",
            self.errors.len(),
            plural(self.errors.len())
        )?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

impl SpecError {
    fn one(field: &str, message: impl Into<String>) -> SpecError {
        SpecError {
            errors: vec![FieldError {
                field: field.into(),
                message: message.into(),
            }],
        }
    }
    /// True when some error concerns `field` (exactly, or a sub-field of it).
    pub fn mentions(&self, field: &str) -> bool {
        self.errors
            .iter()
            .any(|e| e.field == field || e.field.starts_with(&format!("{field}.")))
    }
}

// ---------------------------------------------------------------------------------------
// Parsing helpers.

/// Parses a rate like tc does: `50mbit`, `1.5gbit`, `800kbit`, `100bit` (bits/s, SI
/// multipliers) or `10mbps`, `1kbps`, `500bps` (bytes/s). Returns bytes per second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a rate (try \"50mbit\")"))?;
    let (mult, bits) = match unit.trim() {
        "bit" => (1.0, true),
        "kbit" => (1e3, true),
        "mbit" => (1e6, true),
        "gbit" => (1e9, true),
        "tbit" => (1e12, true),
        "bps" => (1.0, false),
        "kbps" => (1e3, false),
        "mbps" => (1e6, false),
        "gbps" => (1e9, false),
        "" => return Err(format!("{s:?} has no unit (try \"50mbit\")")),
        u => {
            return Err(format!(
                "unknown rate unit {u:?} in {s:?} (bit, kbit, mbit, gbit, bps, kbps, mbps, gbps)"
            ))
        }
    };
    let bytes = if bits { n * mult / 8.0 } else { n * mult };
    if !(1.0..=1e13).contains(&bytes) {
        return Err(format!("{s:?} is out of range (1 byte/s to 80 Tbit/s)"));
    }
    Ok(bytes.round() as u64)
}

/// Parses a size: `64kb`, `1mb`, `1500b`, `2000` (bytes; k/m/g are binary multiples, as in tc).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try \"64kb\")"))?;
    let mult = match unit.trim() {
        "" | "b" => 1,
        "k" | "kb" => 1 << 10,
        "m" | "mb" => 1 << 20,
        "g" | "gb" => 1 << 30,
        u => return Err(format!("unknown size unit {u:?} in {s:?} (b, kb, mb, gb)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Derives a stable, locally administered unicast MAC from (VNI, guest name).
pub fn derive_mac(vni: u32, name: &str) -> EthernetAddress {
    // FNV-1a, 64 bit: tiny, stable across releases and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in vni.to_be_bytes().iter().chain(name.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finaliser: FNV's high bytes barely change between short names.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    let b = h.to_be_bytes();
    EthernetAddress([0x02, b[0], b[1], b[2], b[3], b[4]])
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
}

const NAME_RULE: &str =
    "must be 1-32 characters of a-z, A-Z, 0-9, '-' or '_', starting with a letter or digit";

struct Collector(Vec<FieldError>);

impl Collector {
    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    /// One of a field's allowed words (the first is the default when it is absent).
    fn choice<T: Copy>(
        &mut self,
        at: &str,
        field: &str,
        value: &Option<String>,
        options: &[(&str, T)],
    ) -> T {
        let Some(v) = value else { return options[0].1 };
        match options.iter().find(|(name, _)| name == v) {
            Some((_, t)) => *t,
            None => {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                self.err(
                    format!("{at}.{field}"),
                    format!("unknown {field} {v:?} ({})", names.join(" or ")),
                );
                options[0].1
            }
        }
    }
}

fn rate_of(
    c: &mut Collector,
    field: &str,
    rate: &Option<String>,
    burst: &Option<String>,
    pps: Option<i64>,
    max_frame: usize,
) -> Option<Rate> {
    let bytes_per_sec = match rate {
        Some(r) => match parse_rate(r) {
            Ok(v) => Some(v),
            Err(e) => {
                c.err(format!("{field}.rate"), e);
                None
            }
        },
        None => None,
    };
    if rate.is_none() && (burst.is_some() || pps.is_some()) {
        if burst.is_some() {
            c.err(format!("{field}.burst"), "burst needs a rate");
        }
        if pps.is_some() {
            c.err(format!("{field}.pps"), "pps needs a rate");
        }
        return None;
    }
    let bytes_per_sec = bytes_per_sec?;
    let burst_bytes = match burst {
        Some(b) => match parse_size(b) {
            Ok(v) if v < max_frame as u64 => {
                c.err(
                    format!("{field}.burst"),
                    format!("{v} bytes is less than one full frame ({max_frame} bytes): nothing large could ever pass"),
                );
                return None;
            }
            Ok(v) => v,
            Err(e) => {
                c.err(format!("{field}.burst"), e);
                return None;
            }
        },
        None => Rate::default_burst(bytes_per_sec),
    };
    let pps = match pps {
        Some(p) if p <= 0 => {
            c.err(format!("{field}.pps"), format!("must be positive, not {p}"));
            return None;
        }
        Some(p) => Some(p as u64),
        None => None,
    };
    Some(Rate {
        bytes_per_sec,
        burst_bytes,
        pps,
    })
}

fn limits_of(c: &mut Collector, f: &str, g: &RawGuest, kind: GuestKind) -> Limits {
    let millicpus = match g.cpus {
        None => None,
        Some(x) if kind == GuestKind::Socket => {
            c.err(
                format!("{f}.cpus"),
                format!("{x}: a socket guest runs outside Violin; limit it where it runs"),
            );
            None
        }
        Some(x) if !(x > 0.0 && x <= 64.0) => {
            c.err(
                format!("{f}.cpus"),
                format!("{x} is out of range (more than 0, at most 64)"),
            );
            None
        }
        Some(x) if kind == GuestKind::Qemu && x.fract() != 0.0 => {
            c.err(format!("{f}.cpus"), format!("{x}: a VM has whole vCPUs"));
            None
        }
        Some(x) if x < 0.01 => {
            c.err(
                format!("{f}.cpus"),
                format!("{x} is less than 0.01 of a core"),
            );
            None
        }
        Some(x) => Some((x * 1000.0).round() as u32),
    };
    let memory = match &g.memory {
        None => None,
        Some(m) if kind == GuestKind::Socket => {
            c.err(
                format!("{f}.memory"),
                format!("{m}: a socket guest runs outside Violin; limit it where it runs"),
            );
            None
        }
        Some(m) => match parse_size(m) {
            Ok(b) if kind == GuestKind::Qemu && b < QEMU_MIN_MEMORY => {
                c.err(
                    format!("{f}.memory"),
                    format!("{m} is less than a VM boots with here (96mb)"),
                );
                None
            }
            Ok(b) if b < 4 << 20 => {
                c.err(
                    format!("{f}.memory"),
                    format!("{m} is less than 4mb: the guest's own tools would not start"),
                );
                None
            }
            Ok(b) => Some(b),
            Err(e) => {
                c.err(format!("{f}.memory"), e);
                None
            }
        },
    };
    Limits { millicpus, memory }
}

fn vm_of(c: &mut Collector, f: &str, g: &RawGuest, kind: GuestKind) -> Option<VmSpec> {
    let given = [
        ("kernel", g.kernel.is_some()),
        ("initrd", g.initrd.is_some()),
        ("image", g.image.is_some()),
        ("packages", g.packages.is_some()),
        ("append", g.append.is_some()),
    ];
    if kind != GuestKind::Qemu {
        for (field, _) in given.iter().filter(|(_, set)| *set) {
            c.err(
                format!("{f}.{field}"),
                "only for QEMU guests (kind = \"qemu\")",
            );
        }
        return None;
    }
    for (field, path) in [
        ("kernel", &g.kernel),
        ("initrd", &g.initrd),
        ("image", &g.image),
    ] {
        if let Some(p) = path {
            if !std::path::Path::new(p).is_absolute() {
                c.err(
                    format!("{f}.{field}"),
                    format!("{p:?} must be an absolute path (the daemon opens it)"),
                );
            }
        }
    }
    if g.initrd.is_some() && g.kernel.is_none() {
        c.err(format!("{f}.initrd"), "an initrd needs a kernel");
    }
    let packages = g.packages.clone().unwrap_or_default();
    for (i, p) in packages.iter().enumerate() {
        let ok = !p.is_empty()
            && p.chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "+-.".contains(ch));
        if !ok {
            c.err(
                format!("{f}.packages[{i}]"),
                format!("{p:?} is not a Debian package name"),
            );
        }
    }
    if !packages.is_empty() && g.kernel.is_some() {
        c.err(
            format!("{f}.packages"),
            "packages go into the default image; with your own kernel/initrd, put them there",
        );
    }
    Some(VmSpec {
        kernel: g.kernel.clone(),
        initrd: g.initrd.clone(),
        image: g.image.clone(),
        packages,
        append: g.append.clone(),
    })
}

/// Parses and validates a spec. `hosts` maps each host of the cluster to its underlay
/// address; a guest on any other host is an error.
pub fn parse(text: &str, hosts: &BTreeMap<String, Ipv4Addr>) -> Result<Violin, SpecError> {
    let raw: RawSpec = toml::from_str(text).map_err(|e| {
        let field = e
            .span()
            .map(|s| format!("line {}", text[..s.start].matches('\n').count() + 1))
            .unwrap_or_else(|| "spec".into());
        SpecError::one(&field, e.message().to_string())
    })?;
    validate(raw, hosts)
}

fn validate(raw: RawSpec, hosts: &BTreeMap<String, Ipv4Addr>) -> Result<Violin, SpecError> {
    let mut c = Collector(Vec::new());
    if !valid_name(&raw.name) {
        c.err("name", format!("{:?} {NAME_RULE}", raw.name));
    }
    if raw.vni < 1 || raw.vni > i64::from(VNI_MAX) {
        c.err(
            "vni",
            format!(
                "{} is out of range (1 to {VNI_MAX}: VXLAN VNIs are 24 bits)",
                raw.vni
            ),
        );
    }
    let mtu = match raw.mtu {
        None => DEFAULT_MTU,
        Some(m) if (68..=9000).contains(&m) => m as u16,
        Some(m) => {
            c.err("mtu", format!("{m} is out of range (68 to 9000)"));
            DEFAULT_MTU
        }
    };
    let max_frame = mtu as usize + 18;
    let vni = raw.vni.clamp(0, i64::from(VNI_MAX)) as u32;

    let mut members = Vec::new();
    let mut names: HashMap<String, String> = HashMap::new();
    let mut macs: HashMap<EthernetAddress, String> = HashMap::new();
    let mut ips: HashMap<Ipv4Addr, String> = HashMap::new();
    let mut used_hosts = BTreeMap::new();

    let mut check_name = |c: &mut Collector, field: String, name: &str| {
        if !valid_name(name) {
            c.err(format!("{field}.name"), format!("{name:?} {NAME_RULE}"));
        } else if let Some(prev) = names.get(name) {
            c.err(
                format!("{field}.name"),
                format!("duplicate name {name:?} (also {prev})"),
            );
        } else {
            names.insert(name.to_string(), field);
        }
    };
    let mut check_mac = |c: &mut Collector, field: String, mac: EthernetAddress| {
        if mac.is_multicast() || mac.is_zero() {
            c.err(field, format!("{mac} is not a unicast address"));
        } else if let Some(prev) = macs.get(&mac) {
            c.err(field, format!("duplicate MAC {mac} (also {prev})"));
        } else {
            macs.insert(mac, field);
        }
    };

    for (i, g) in raw.guest.iter().enumerate() {
        let f = format!("guest[{i}]");
        check_name(&mut c, f.clone(), &g.name);
        match hosts.get(&g.host) {
            Some(addr) => {
                used_hosts.insert(g.host.clone(), *addr);
            }
            None => {
                let known: Vec<&str> = hosts.keys().map(String::as_str).collect();
                c.err(
                    format!("{f}.host"),
                    format!(
                        "unknown host {:?} (the cluster has: {})",
                        g.host,
                        known.join(", ")
                    ),
                );
            }
        }
        let (ip, prefix_len) = match parse_cidr(&g.ip) {
            Ok(v) => v,
            Err(e) => {
                c.err(format!("{f}.ip"), e);
                (Ipv4Addr::UNSPECIFIED, 0)
            }
        };
        if !ip.is_unspecified() {
            if let Some(prev) = ips.get(&ip) {
                c.err(
                    format!("{f}.ip"),
                    format!("duplicate IP {ip} (also {prev})"),
                );
            } else {
                ips.insert(ip, format!("{f}.ip"));
            }
        }
        let mac = match &g.mac {
            Some(m) => match EthernetAddress::parse(m) {
                Some(a) => a,
                None => {
                    c.err(
                        format!("{f}.mac"),
                        format!("{m:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"),
                    );
                    derive_mac(vni, &g.name)
                }
            },
            None => derive_mac(vni, &g.name),
        };
        check_mac(&mut c, format!("{f}.mac"), mac);
        let kind = c.choice(
            &f,
            "kind",
            &g.kind,
            &[
                ("netns", GuestKind::Netns),
                ("socket", GuestKind::Socket),
                ("qemu", GuestKind::Qemu),
            ],
        );
        let framing = c.choice(
            &f,
            "socket",
            &g.socket,
            &[("stream", Framing::Stream), ("dgram", Framing::Dgram)],
        );
        // A netns guest's NIC is the daemon's own tap unless the spec asks for a socket
        // (`port = "socket"`, or a `socket` framing, which only a socket port has):
        // no relay process on its path. Every other kind attaches to a socket.
        let default_port = if kind == GuestKind::Netns && g.socket.is_none() {
            "tap"
        } else {
            "socket"
        };
        let port = match c.choice(
            &f,
            "port",
            &g.port.clone().or_else(|| Some(default_port.into())),
            &[
                ("socket", PortKind::Socket),
                ("xdp", PortKind::Xdp),
                ("tap", PortKind::Tap),
            ],
        ) {
            p @ (PortKind::Xdp | PortKind::Tap) if kind != GuestKind::Netns => {
                let name = if p == PortKind::Xdp { "xdp" } else { "tap" };
                c.err(
                    format!("{f}.port"),
                    format!("port = \"{name}\" needs a netns guest (kind = \"netns\")"),
                );
                PortKind::Socket
            }
            p => p,
        };
        let rate = rate_of(&mut c, &f, &g.rate, &g.burst, g.pps, max_frame);
        let limits = limits_of(&mut c, &f, g, kind);
        let vm = vm_of(&mut c, &f, g, kind);
        let mut allowed_ips = Vec::new();
        for (j, a) in g.allowed_ips.iter().flatten().enumerate() {
            match IpNet::parse(a) {
                Ok(n) => allowed_ips.push(n),
                Err(e) => c.err(format!("{f}.allowed_ips[{j}]"), e),
            }
        }
        members.push(Member {
            name: g.name.clone(),
            mac: EthernetAddressSerde(mac),
            kind: MemberKind::Guest {
                host: g.host.clone(),
                ip,
                prefix_len,
                kind,
                framing,
                port,
                limits,
                vm,
                allowed_ips,
            },
            rate,
        });
    }
    for (i, x) in raw.external.iter().enumerate() {
        let f = format!("external[{i}]");
        check_name(&mut c, f.clone(), &x.name);
        let underlay = match x.underlay.parse::<Ipv4Addr>() {
            Ok(a) if a.is_unspecified() || a.is_multicast() || a.is_broadcast() => {
                c.err(
                    format!("{f}.underlay"),
                    format!("{a} is not a unicast address"),
                );
                a
            }
            Ok(a) => {
                if let Some((h, _)) = used_hosts.iter().find(|(_, v)| **v == a) {
                    c.err(
                        format!("{f}.underlay"),
                        format!("{a} is the underlay address of host {h}"),
                    );
                }
                a
            }
            Err(_) => {
                c.err(
                    format!("{f}.underlay"),
                    format!("{:?} is not an IPv4 address", x.underlay),
                );
                Ipv4Addr::UNSPECIFIED
            }
        };
        let mac = match EthernetAddress::parse(&x.mac) {
            Some(a) => a,
            None => {
                c.err(
                    format!("{f}.mac"),
                    format!("{:?} is not a MAC address (aa:bb:cc:dd:ee:ff)", x.mac),
                );
                EthernetAddress::default()
            }
        };
        if !mac.is_zero() || EthernetAddress::parse(&x.mac).is_some() {
            check_mac(&mut c, format!("{f}.mac"), mac);
        }
        members.push(Member {
            name: x.name.clone(),
            mac: EthernetAddressSerde(mac),
            kind: MemberKind::External { underlay },
            rate: None,
        });
    }
    if members.is_empty() {
        c.err("guest", "a Violin needs at least one guest");
    }

    let links = raw.link.as_ref().map(|links| {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for (i, l) in links.iter().enumerate() {
            let f = format!("link[{i}]");
            if l.between.len() != 2 {
                c.err(
                    format!("{f}.between"),
                    format!("needs exactly two names, has {}", l.between.len()),
                );
                continue;
            }
            let mut ends = [0usize; 2];
            let mut ok = true;
            for (k, n) in l.between.iter().enumerate() {
                match members.iter().position(|m| &m.name == n) {
                    Some(p) => ends[k] = p,
                    None => {
                        c.err(format!("{f}.between"), format!("unknown guest {n:?}"));
                        ok = false;
                    }
                }
            }
            let rate = rate_of(&mut c, &f, &l.rate, &l.burst, l.pps, max_frame);
            if !ok {
                continue;
            }
            if ends[0] == ends[1] {
                c.err(
                    format!("{f}.between"),
                    format!(
                        "a link joins two different guests, not {:?} to itself",
                        l.between[0]
                    ),
                );
                continue;
            }
            let key = (ends[0].min(ends[1]), ends[0].max(ends[1]));
            if !seen.insert(key) {
                c.err(
                    format!("{f}.between"),
                    format!("duplicate link {:?}–{:?}", l.between[0], l.between[1]),
                );
                continue;
            }
            out.push(Link {
                a: ends[0],
                b: ends[1],
                rate,
            });
        }
        out
    });

    if !c.0.is_empty() {
        return Err(SpecError { errors: c.0 });
    }
    let v = Violin {
        name: raw.name,
        vni,
        mtu,
        members,
        links,
        hosts: used_hosts,
    };
    check(&v)?;
    Ok(v)
}

/// Most members one Violin may have.
pub const MAX_MEMBERS: usize = 4096;

/// Checks a resolved spec, as a daemon receives it over the control socket (or, later,
/// from the cluster's store): every rule of [`parse`] that the resolved form can still
/// break — names (they become paths), VNI, MTU, unique unicast MACs and addresses,
/// guests on hosts the spec resolves, port kinds their guests allow, links between
/// existing members, rates and limits in range. [`parse`] ends with it too, so the CLI
/// and the daemon apply the same rules. Fields are named `member[i]` / `link[i]`.
pub fn check(v: &Violin) -> Result<(), SpecError> {
    let mut c = Collector(Vec::new());
    if !valid_name(&v.name) {
        c.err("name", format!("{:?} {NAME_RULE}", v.name));
    }
    if !(1..=VNI_MAX).contains(&v.vni) {
        c.err("vni", format!("{} is out of range (1 to {VNI_MAX})", v.vni));
    }
    if !(68..=9000).contains(&v.mtu) {
        c.err("mtu", format!("{} is out of range (68 to 9000)", v.mtu));
    }
    if v.members.is_empty() || v.members.len() > MAX_MEMBERS {
        c.err(
            "members",
            format!("{} members (1 to {MAX_MEMBERS})", v.members.len()),
        );
    }
    let bad_unicast = |a: Ipv4Addr| a.is_unspecified() || a.is_multicast() || a.is_broadcast();
    for (h, a) in &v.hosts {
        if !valid_name(h) || bad_unicast(*a) {
            c.err(format!("hosts.{h}"), format!("{h:?} = {a} is not a host"));
        }
    }
    let check_rate = |c: &mut Collector, f: &str, r: &Option<Rate>| {
        if let Some(r) = r {
            if r.bytes_per_sec == 0 || r.burst_bytes == 0 || r.pps == Some(0) {
                c.err(
                    format!("{f}.rate"),
                    "a rate, its burst and pps must be above 0",
                );
            }
        }
    };
    let (mut names, mut macs, mut ips) = (HashSet::new(), HashSet::new(), HashSet::new());
    for (i, m) in v.members.iter().enumerate() {
        let f = format!("member[{i}]");
        if !valid_name(&m.name) {
            c.err(format!("{f}.name"), format!("{:?} {NAME_RULE}", m.name));
        } else if !names.insert(m.name.as_str()) {
            c.err(format!("{f}.name"), format!("duplicate name {:?}", m.name));
        }
        let mac = m.mac.0;
        if mac.is_multicast() || mac.is_zero() || !macs.insert(mac) {
            c.err(
                format!("{f}.mac"),
                format!("{mac} is not a unique unicast MAC"),
            );
        }
        check_rate(&mut c, &f, &m.rate);
        match &m.kind {
            MemberKind::Guest {
                host,
                ip,
                prefix_len,
                kind,
                port,
                limits,
                vm,
                allowed_ips,
                ..
            } => {
                if !v.hosts.contains_key(host) {
                    c.err(
                        format!("{f}.host"),
                        format!("host {host:?} is not in the spec's hosts"),
                    );
                }
                if bad_unicast(*ip) || ip.is_loopback() || !(1..=32).contains(prefix_len) {
                    c.err(
                        format!("{f}.ip"),
                        format!("{ip}/{prefix_len} cannot be a guest address"),
                    );
                } else if !ips.insert(*ip) {
                    c.err(format!("{f}.ip"), format!("duplicate IP {ip}"));
                }
                if *port != PortKind::Socket && *kind != GuestKind::Netns {
                    c.err(
                        format!("{f}.port"),
                        format!("{port:?} ports are for netns guests"),
                    );
                }
                if vm.is_some() != (*kind == GuestKind::Qemu) {
                    c.err(
                        format!("{f}.vm"),
                        "a VM spec goes with kind = \"qemu\" only",
                    );
                }
                if limits.millicpus == Some(0) || limits.memory == Some(0) {
                    c.err(format!("{f}.limits"), "limits must be above 0");
                }
                for (j, n) in allowed_ips.iter().enumerate() {
                    if n.prefix > 32 || u32::from(n.addr) & !n.mask() != 0 {
                        c.err(
                            format!("{f}.allowed_ips[{j}]"),
                            format!("{n} is not a network"),
                        );
                    }
                }
            }
            MemberKind::External { underlay } => {
                if bad_unicast(*underlay) {
                    c.err(
                        format!("{f}.underlay"),
                        format!("{underlay} cannot be a VTEP"),
                    );
                }
            }
        }
    }
    for (i, l) in v.links.iter().flatten().enumerate() {
        let n = v.members.len();
        if l.a >= n || l.b >= n || l.a == l.b {
            c.err(
                format!("link[{i}]"),
                format!("between members {} and {} of {n}", l.a, l.b),
            );
        }
        check_rate(&mut c, &format!("link[{i}]"), &l.rate);
    }
    if c.0.is_empty() {
        Ok(())
    } else {
        Err(SpecError { errors: c.0 })
    }
}

/// An address and a prefix length of `least` to 32, from the two sides of a `/`.
fn addr_and_prefix((a, p): (&str, &str), least: u8) -> Result<(Ipv4Addr, u8), String> {
    let ip: Ipv4Addr = a
        .parse()
        .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
    let prefix: u8 = p
        .parse()
        .ok()
        .filter(|p| (least..=32).contains(p))
        .ok_or_else(|| format!("prefix length {p:?} is not {least} to 32"))?;
    Ok((ip, prefix))
}

/// Parses `10.0.0.1/24` (a bare address means /24... no: a prefix is required).
fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let parts = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} needs a prefix length, e.g. \"10.0.0.1/24\""))?;
    let (ip, prefix) = addr_and_prefix(parts, 1)?;
    if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() || ip.is_loopback() {
        return Err(format!("{ip} cannot be a guest address"));
    }
    Ok((ip, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const ISSUE_SPEC: &str = r#"
name = "blue"
vni = 101                      # 24-bit VXLAN network identifier
[[guest]]
name = "a"
host = "h1"
ip = "10.0.0.1/24"             # MAC derived from (vni, name) unless `mac` is given
[[guest]]
name = "b"
host = "h2"
ip = "10.0.0.2/24"
[[guest]]
name = "c"
host = "h2"
ip = "10.0.0.3/24"
[[link]]
between = ["a", "b"]
rate = "50mbit"                # token bucket; optional `burst`, optional `pps`
[[link]]
between = ["b", "c"]
[[external]]                   # a foreign VTEP joining this Violin, e.g. a Linux vxlan device
name = "x"
underlay = "172.31.0.50"
mac = "02:aa:00:00:00:50"
"#;

    fn hosts() -> BTreeMap<String, Ipv4Addr> {
        [("h1", [172, 31, 0, 1]), ("h2", [172, 31, 0, 2])]
            .into_iter()
            .map(|(n, a)| (n.to_string(), Ipv4Addr::from(a)))
            .collect()
    }

    fn errors_of(text: &str) -> SpecError {
        parse(text, &hosts()).expect_err("spec should be rejected")
    }

    #[test]
    fn the_issue_spec_parses_as_written() {
        let v = parse(ISSUE_SPEC, &hosts()).unwrap();
        assert_eq!(v.name, "blue");
        assert_eq!(v.vni, 101);
        assert_eq!(v.mtu, DEFAULT_MTU);
        assert_eq!(v.members.len(), 4);
        assert_eq!(v.members[0].mac.0, derive_mac(101, "a"));
        let links = v.links.as_ref().unwrap();
        assert_eq!(links.len(), 2);
        assert_eq!((links[0].a, links[0].b), (0, 1));
        let r = links[0].rate.unwrap();
        assert_eq!(r.bytes_per_sec, 50_000_000 / 8);
        assert_eq!(r.burst_bytes, Rate::default_burst(r.bytes_per_sec));
        assert!(links[1].rate.is_none());
        assert_eq!(
            v.members[3].kind,
            MemberKind::External {
                underlay: Ipv4Addr::new(172, 31, 0, 50)
            }
        );
        assert_eq!(v.hosts.len(), 2);
        match &v.members[1].kind {
            MemberKind::Guest {
                host,
                ip,
                prefix_len,
                kind,
                framing,
                ..
            } => {
                assert_eq!(host, "h2");
                assert_eq!(*ip, Ipv4Addr::new(10, 0, 0, 2));
                assert_eq!(*prefix_len, 24);
                assert_eq!(*kind, GuestKind::Netns);
                assert_eq!(*framing, Framing::Stream);
            }
            k => panic!("{k:?}"),
        }
    }

    #[test]
    fn derived_macs_are_stable_unicast_and_distinct_per_vni() {
        let a = derive_mac(101, "a");
        assert_eq!(a, derive_mac(101, "a"));
        assert!(a.is_unicast() && a.is_locally_administered());
        assert_ne!(
            a,
            derive_mac(102, "a"),
            "same name in another Violin gets another MAC"
        );
        assert_ne!(a, derive_mac(101, "b"));
    }

    #[test]
    fn unknown_host_names_the_field_and_the_known_hosts() {
        let e = errors_of(&ISSUE_SPEC.replace(
            "host = \"h2\"\nip = \"10.0.0.3/24\"",
            "host = \"h9\"\nip = \"10.0.0.3/24\"",
        ));
        assert_eq!(e.errors.len(), 1, "{e}");
        assert_eq!(e.errors[0].field, "guest[2].host");
        assert!(e.errors[0].message.contains("h9") && e.errors[0].message.contains("h1, h2"));
    }

    #[test]
    fn duplicates_are_rejected() {
        let e = errors_of(&ISSUE_SPEC.replace("name = \"c\"", "name = \"b\""));
        assert!(e.mentions("guest[2].name"), "{e}");
        let e = errors_of(&ISSUE_SPEC.replace("10.0.0.3/24", "10.0.0.2/24"));
        assert!(e.mentions("guest[2].ip"), "{e}");
        let spec = ISSUE_SPEC.replace(
            "ip = \"10.0.0.3/24\"",
            "ip = \"10.0.0.3/24\"\nmac = \"02:aa:00:00:00:50\"",
        );
        let e = errors_of(&spec);
        assert!(e.mentions("external[0].mac"), "{e}");
    }

    #[test]
    fn vni_out_of_range() {
        for bad in ["0", "16777216", "-1"] {
            let e = errors_of(&ISSUE_SPEC.replace("vni = 101", &format!("vni = {bad}")));
            assert!(e.mentions("vni"), "{bad}: {e}");
        }
        let top = ISSUE_SPEC.replace("vni = 101", "vni = 16777215");
        assert_ne!(top, ISSUE_SPEC, "the fixture has `vni = 101`");
        assert_eq!(parse(&top, &hosts()).unwrap().vni, 16_777_215);
    }

    #[test]
    fn link_to_unknown_guest() {
        let e =
            errors_of(&ISSUE_SPEC.replace("between = [\"b\", \"c\"]", "between = [\"b\", \"zz\"]"));
        assert_eq!(e.errors.len(), 1);
        assert_eq!(e.errors[0].field, "link[1].between");
        assert!(e.errors[0].message.contains("zz"));
        let e = errors_of(&ISSUE_SPEC.replace("between = [\"b\", \"c\"]", "between = [\"b\"]"));
        assert!(e.mentions("link[1].between"));
        let e =
            errors_of(&ISSUE_SPEC.replace("between = [\"b\", \"c\"]", "between = [\"b\", \"b\"]"));
        assert!(e.mentions("link[1].between"));
        let e =
            errors_of(&ISSUE_SPEC.replace("between = [\"b\", \"c\"]", "between = [\"b\", \"a\"]"));
        assert!(e.errors[0].message.contains("duplicate link"), "{e}");
    }

    #[test]
    fn bad_rates() {
        for bad in ["50", "fast", "50 parsecs", "-3mbit", "0mbit"] {
            let e = errors_of(&ISSUE_SPEC.replace("\"50mbit\"", &format!("{bad:?}")));
            assert!(e.mentions("link[0].rate"), "{bad}: {e}");
        }
        let e = errors_of(
            &ISSUE_SPEC.replace("rate = \"50mbit\"", "rate = \"50mbit\"\nburst = \"100b\""),
        );
        assert!(e.mentions("link[0].burst"), "{e}");
        let e = errors_of(&ISSUE_SPEC.replace("rate = \"50mbit\"", "rate = \"50mbit\"\npps = 0"));
        assert!(e.mentions("link[0].pps"), "{e}");
        let e = errors_of(&ISSUE_SPEC.replace("rate = \"50mbit\"", "burst = \"64kb\""));
        assert!(e.mentions("link[0].burst"), "{e}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let spec = ISSUE_SPEC
            .replace("vni = 101", "vni = 0")
            .replace("host = \"h1\"", "host = \"nowhere\"")
            .replace("\"50mbit\"", "\"lots\"");
        let e = errors_of(&spec);
        assert!(
            e.mentions("vni") && e.mentions("guest[0].host") && e.mentions("link[0].rate"),
            "{e}"
        );
        assert_eq!(e.errors.len(), 3);
    }

    #[test]
    fn unknown_fields_and_bad_toml_are_rejected_with_a_location() {
        let e = errors_of(&ISSUE_SPEC.replace("name = \"a\"", "name = \"a\"\ncolour = \"red\""));
        assert!(e.errors[0].message.contains("colour"), "{e}");
        assert!(e.errors[0].field.starts_with("line "), "{e}");
        let e = errors_of("name = ");
        assert!(e.errors[0].field.starts_with("line "), "{e}");
    }

    #[test]
    fn guest_fields() {
        let e = errors_of(&ISSUE_SPEC.replace("10.0.0.1/24", "10.0.0.1"));
        assert!(e.mentions("guest[0].ip"), "{e}");
        let e = errors_of(&ISSUE_SPEC.replace("10.0.0.1/24", "10.0.0.300/24"));
        assert!(e.mentions("guest[0].ip"), "{e}");
        let e = errors_of(&ISSUE_SPEC.replace(
            "ip = \"10.0.0.1/24\"",
            "ip = \"10.0.0.1/24\"\nmac = \"01:00:5e:00:00:01\"",
        ));
        assert!(e.mentions("guest[0].mac"), "{e}");
        let e = errors_of(&ISSUE_SPEC.replace(
            "ip = \"10.0.0.1/24\"",
            "ip = \"10.0.0.1/24\"\nsocket = \"carrier-pigeon\"",
        ));
        assert!(e.mentions("guest[0].socket"), "{e}");
        let v = parse(
            &ISSUE_SPEC.replace("ip = \"10.0.0.1/24\"", "ip = \"10.0.0.1/24\"\nsocket = \"dgram\"\nkind = \"socket\"\nrate = \"1gbit\"\npps = 1000"),
            &hosts(),
        )
        .unwrap();
        let r = v.members[0].rate.unwrap();
        assert_eq!((r.bytes_per_sec, r.pps), (125_000_000, Some(1000)));
        assert!(matches!(
            v.members[0].kind,
            MemberKind::Guest {
                framing: Framing::Dgram,
                kind: GuestKind::Socket,
                ..
            }
        ));
    }

    #[test]
    fn allowed_ips_are_networks() {
        let v = parse(
            &ISSUE_SPEC.replace(
                "ip = \"10.0.0.1/24\"",
                "ip = \"10.0.0.1/24\"\nallowed_ips = [\"0.0.0.0/0\", \"192.168.7.0/24\", \"10.9.9.9\"]",
            ),
            &hosts(),
        )
        .unwrap();
        let MemberKind::Guest { allowed_ips, .. } = &v.members[0].kind else {
            panic!()
        };
        let shown: Vec<String> = allowed_ips.iter().map(|n| n.to_string()).collect();
        assert_eq!(shown, ["0.0.0.0/0", "192.168.7.0/24", "10.9.9.9/32"]);
        assert!(allowed_ips[0].contains(Ipv4Addr::new(1, 2, 3, 4)));
        assert!(allowed_ips[1].contains(Ipv4Addr::new(192, 168, 7, 200)));
        assert!(!allowed_ips[1].contains(Ipv4Addr::new(192, 168, 8, 1)));
        assert!(!allowed_ips[2].contains(Ipv4Addr::new(10, 9, 9, 8)));
        for (bad, why) in [
            ("[\"10.0.0.1/33\"]", "prefix length"),
            ("[\"10.0.0.1/24\"]", "host bits"),
            ("[\"ten\"]", "not an IPv4 address"),
        ] {
            let e = errors_of(&ISSUE_SPEC.replace(
                "ip = \"10.0.0.1/24\"",
                &format!(
                    "ip = \"10.0.0.1/24\"\nallowed_ips = [\"10.1.0.0/16\", {}",
                    &bad[1..]
                ),
            ));
            assert!(
                e.mentions("guest[0].allowed_ips[1]") && e.to_string().contains(why),
                "{e}"
            );
        }
    }

    #[test]
    fn limits_and_vms() {
        let v = parse(
            &ISSUE_SPEC
                .replace(
                    "ip = \"10.0.0.1/24\"",
                    "ip = \"10.0.0.1/24\"\ncpus = 0.5\nmemory = \"64mb\"",
                )
                .replace(
                    "ip = \"10.0.0.2/24\"",
                    "ip = \"10.0.0.2/24\"\nkind = \"qemu\"\ncpus = 2\npackages = [\"iperf3\"]",
                ),
            &hosts(),
        )
        .unwrap();
        let MemberKind::Guest { limits, vm, .. } = &v.members[0].kind else {
            panic!()
        };
        assert_eq!(
            *limits,
            Limits {
                millicpus: Some(500),
                memory: Some(64 << 20)
            }
        );
        assert!(vm.is_none());
        let MemberKind::Guest {
            limits, vm, kind, ..
        } = &v.members[1].kind
        else {
            panic!()
        };
        assert_eq!(
            (*kind, limits.millicpus, limits.memory),
            (GuestKind::Qemu, Some(2000), None)
        );
        assert_eq!(vm.as_ref().unwrap().packages, vec!["iperf3".to_string()]);

        let e = errors_of(&ISSUE_SPEC.replace(
            "ip = \"10.0.0.1/24\"",
            "ip = \"10.0.0.1/24\"\ncpus = 0\nmemory = \"1kb\"\npackages = [\"x\"]",
        ).replace(
            "ip = \"10.0.0.2/24\"",
            "ip = \"10.0.0.2/24\"\nkind = \"qemu\"\ncpus = 1.5\nmemory = \"64mb\"\nkernel = \"vmlinux\"\npackages = [\"Bad Name\"]",
        ));
        for f in [
            "guest[0].cpus",
            "guest[0].memory",
            "guest[0].packages",
            "guest[1].cpus",
            "guest[1].memory",
            "guest[1].kernel",
            "guest[1].packages[0]",
        ] {
            assert!(e.mentions(f), "{f} not named in {e}");
        }
    }

    #[test]
    fn fast_ports() {
        let v = parse(
            &ISSUE_SPEC.replace(
                "ip = \"10.0.0.1/24\"",
                "ip = \"10.0.0.1/24\"\nport = \"xdp\"",
            ),
            &hosts(),
        )
        .unwrap();
        assert!(matches!(
            v.members[0].kind,
            MemberKind::Guest {
                port: PortKind::Xdp,
                ..
            }
        ));
        let e = errors_of(&ISSUE_SPEC.replace(
            "ip = \"10.0.0.1/24\"",
            "ip = \"10.0.0.1/24\"\nport = \"xdp\"\nkind = \"socket\"",
        ));
        assert!(e.mentions("guest[0].port"), "{e}");
        // A fast port takes any MTU: frames longer than one AF_XDP frame (1792 bytes)
        // span several buffers of a multi-buffer socket.
        let fast = |mtu: u16| {
            ISSUE_SPEC
                .replace("vni = 101", &format!("vni = 101\nmtu = {mtu}"))
                .replace(
                    "ip = \"10.0.0.1/24\"",
                    "ip = \"10.0.0.1/24\"\nport = \"xdp\"",
                )
        };
        for mtu in [1774, 1775, 9000] {
            let v = parse(&fast(mtu), &hosts()).unwrap_or_else(|e| panic!("{mtu}: {e}"));
            assert_eq!(v.mtu, mtu);
            assert!(matches!(
                v.members[0].kind,
                MemberKind::Guest {
                    port: PortKind::Xdp,
                    ..
                }
            ));
        }
        let v = parse(
            &ISSUE_SPEC.replace(
                "ip = \"10.0.0.1/24\"",
                "ip = \"10.0.0.1/24\"\nport = \"tap\"",
            ),
            &hosts(),
        )
        .unwrap();
        assert!(matches!(
            v.members[0].kind,
            MemberKind::Guest {
                port: PortKind::Tap,
                ..
            }
        ));
        for bad in ["port = \"tap\"\nkind = \"socket\"", "port = \"vhost\""] {
            let e = errors_of(&ISSUE_SPEC.replace(
                "ip = \"10.0.0.1/24\"",
                &format!("ip = \"10.0.0.1/24\"\n{bad}"),
            ));
            assert!(e.mentions("guest[0].port"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_netns_guest_has_a_tap_unless_it_asks_for_a_socket() {
        let port_of = |extra: &str| {
            let v = parse(
                &ISSUE_SPEC.replace(
                    "ip = \"10.0.0.1/24\"",
                    &format!("ip = \"10.0.0.1/24\"\n{extra}"),
                ),
                &hosts(),
            )
            .unwrap();
            match v.members[0].kind {
                MemberKind::Guest { port, .. } => port,
                MemberKind::External { .. } => unreachable!(),
            }
        };
        assert_eq!(port_of(""), PortKind::Tap);
        assert_eq!(port_of("kind = \"netns\""), PortKind::Tap);
        assert_eq!(port_of("port = \"socket\""), PortKind::Socket);
        // A framing is a socket's: asking for one asks for a socket.
        assert_eq!(port_of("socket = \"dgram\""), PortKind::Socket);
        assert_eq!(port_of("socket = \"stream\""), PortKind::Socket);
        assert_eq!(port_of("kind = \"socket\""), PortKind::Socket);
        assert_eq!(
            port_of("kind = \"socket\"\nsocket = \"dgram\""),
            PortKind::Socket
        );
        // A stored spec from before tap ports were the default keeps its sockets.
        let stored = serde_json::json!({"Guest": {
            "host": "h1", "ip": "10.0.0.1", "prefix_len": 24,
            "kind": "netns", "framing": "stream"
        }});
        let old: MemberKind = serde_json::from_value(stored).unwrap();
        assert!(matches!(
            old,
            MemberKind::Guest {
                port: PortKind::Socket,
                ..
            }
        ));
    }

    #[test]
    fn no_link_table_means_all_pairs() {
        let spec: String = ISSUE_SPEC.split("[[link]]").next().unwrap().to_string();
        let v = parse(&spec, &hosts()).unwrap();
        assert!(v.links.is_none());
    }

    #[test]
    fn rate_and_size_units() {
        assert_eq!(parse_rate("50mbit").unwrap(), 6_250_000);
        assert_eq!(parse_rate("1.5gbit").unwrap(), 187_500_000);
        assert_eq!(parse_rate("8kbit").unwrap(), 1000);
        assert_eq!(parse_rate("10MBps").unwrap(), 10_000_000);
        assert_eq!(parse_size("64kb").unwrap(), 65536);
        assert_eq!(parse_size("1500").unwrap(), 1500);
        assert!(parse_size("1.5kb").is_err());
    }
}
