//! Loads the XDP classifier (`violin-ebpf`), attaches it to the underlay interface and
//! keeps its maps in step with the Violins on this host: VNI → socket slot, (VNI, outer
//! source) membership, and the AF_XDP sockets themselves.

use crate::config::XdpAttach;
use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf, XskMap};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{Xdp, XdpMode};
use aya::Ebpf;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use violin_common::maps::{self, MemberKey, VniEntry};
use violin_common::Verdict;

/// Where the eBPF object is: `VIOLIN_EBPF`, beside the executable (`violin-ebpf.o`), or
/// the workspace's build output (`cargo xtask build-ebpf`).
pub fn object_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("VIOLIN_EBPF") {
        return Ok(PathBuf::from(p));
    }
    let mut tried = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        let p = exe.with_file_name("violin-ebpf.o");
        if p.exists() {
            return Ok(p);
        }
        tried.push(p);
    }
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/bpfel-unknown-none/release/violin-ebpf"
    ));
    if p.exists() {
        return Ok(p);
    }
    tried.push(p);
    bail!(
        "the XDP classifier object was not found (tried {}); build it with `cargo xtask build-ebpf` or set VIOLIN_EBPF",
        tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}

/// The eBPF object's bytes ([`object_path`]): the classifier's and the steering's.
pub fn read_object() -> Result<Vec<u8>> {
    let path = object_path()?;
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
}

pub struct Classifier {
    ebpf: Ebpf,
    port_slots: HashMap<MapData, u32, u32>,
    port_xsks: XskMap<MapData>,
    vnis: HashMap<MapData, u32, VniEntry>,
    members: HashMap<MapData, MemberKey, u32>,
    xsks: XskMap<MapData>,
    verdicts: PerCpuArray<MapData, u64>,
    /// VNIs whose drops the program reports, and how many monitors watch each.
    monitored: HashMap<MapData, u32, u32>,
    watchers: std::collections::HashMap<u32, usize>,
    /// The ring the program reports them in, until [`Classifier::take_drop_events`].
    drop_events: Option<RingBuf<MapData>>,
}

fn member_key(vni: u32, addr: Ipv4Addr) -> MemberKey {
    MemberKey {
        vni,
        addr: u32::from_ne_bytes(addr.octets()),
    }
}

impl Classifier {
    /// Loads the program (the verifier runs here) and its maps; attaches nothing.
    pub fn load(object: &[u8], vxlan_port: u16, queues: u32) -> Result<Classifier> {
        let mut ebpf = Ebpf::load(object).context("loading the XDP classifier object")?;
        let prog: &mut Xdp = ebpf
            .program_mut(maps::PROGRAM)
            .ok_or_else(|| anyhow!("no program {} in the object", maps::PROGRAM))?
            .try_into()?;
        prog.load()
            .context("loading the XDP classifier into the kernel (needs CAP_BPF / root)")?;
        let port: &mut Xdp = ebpf
            .program_mut(maps::PORT_PROGRAM)
            .ok_or_else(|| anyhow!("no program {} in the object", maps::PORT_PROGRAM))?
            .try_into()?;
        port.load().context("loading the guest-port XDP program")?;
        let mut config: Array<_, u32> =
            Array::try_from(ebpf.map_mut(maps::CONFIG_MAP).context("CONFIG map")?)?;
        config.set(maps::CONFIG_PORT, u32::from(vxlan_port), 0)?;
        config.set(maps::CONFIG_QUEUES, queues.max(1), 0)?;
        let take = |e: &mut Ebpf, n: &str| {
            e.take_map(n)
                .ok_or_else(|| anyhow!("no map {n} in the object"))
        };
        let vnis = HashMap::try_from(take(&mut ebpf, maps::VNI_MAP)?)?;
        let members = HashMap::try_from(take(&mut ebpf, maps::MEMBER_MAP)?)?;
        let xsks = XskMap::try_from(take(&mut ebpf, maps::XSK_MAP)?)?;
        let verdicts = PerCpuArray::try_from(take(&mut ebpf, maps::VERDICT_COUNTERS)?)?;
        let port_slots = HashMap::try_from(take(&mut ebpf, maps::PORT_SLOT_MAP)?)?;
        let port_xsks = XskMap::try_from(take(&mut ebpf, maps::PORT_XSK_MAP)?)?;
        let monitored = HashMap::try_from(take(&mut ebpf, maps::MONITORED_MAP)?)?;
        let drop_events = Some(RingBuf::try_from(take(&mut ebpf, maps::DROP_EVENT_RING)?)?);
        Ok(Classifier {
            ebpf,
            port_slots,
            port_xsks,
            vnis,
            members,
            xsks,
            verdicts,
            monitored,
            watchers: Default::default(),
            drop_events,
        })
    }

    /// The ring of drop reports, for the thread that reads it (once).
    pub fn take_drop_events(&mut self) -> Option<RingBuf<MapData>> {
        self.drop_events.take()
    }

    /// One more monitor watches Violin `vni`: the program reports its drops.
    pub fn watch(&mut self, vni: u32) -> Result<()> {
        let n = self.watchers.entry(vni).or_insert(0);
        if *n == 0 {
            self.monitored
                .insert(vni, 1, 0)
                .context("adding a VNI to the MONITORED map")?;
        }
        *n += 1;
        Ok(())
    }

    /// One monitor fewer; the last one turns the reports off.
    pub fn unwatch(&mut self, vni: u32) {
        if let Some(n) = self.watchers.get_mut(&vni) {
            *n -= 1;
            if *n == 0 {
                self.watchers.remove(&vni);
                let _ = self.monitored.remove(&vni);
            }
        }
    }

    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(maps::PROGRAM)
            .unwrap()
            .try_into()
            .unwrap()
    }

    /// Attaches to `iface` (generic or in the driver, as `how` and the interface's
    /// kind say), replacing a stale XDP program left there (a crashed daemon's legacy
    /// attachment) instead of failing. Returns the mode it attached in.
    pub fn attach(&mut self, iface: &str, how: XdpAttach) -> Result<&'static str> {
        let name = iface.to_string();
        let (mtu, kind) = crate::host::netlink::with_handle(|h| async move {
            crate::host::netlink::mtu_and_kind(&h, &name).await
        })?;
        let generic = match how {
            XdpAttach::Generic => true,
            XdpAttach::Native => false,
            XdpAttach::Auto => kind.as_deref() == Some("veth"),
        };
        let mode = if generic {
            XdpMode::Skb
        } else {
            XdpMode::Driver
        };
        self.set_underlay_mtu(mtu)?;
        match self.program().attach(iface, mode) {
            Ok(_) => {}
            Err(first) => {
                tracing::warn!("attaching to {iface} failed ({first}); removing a stale XDP program and retrying");
                detach_any(iface)?;
                self.program()
                    .attach(iface, mode)
                    .with_context(|| format!("attaching the XDP classifier to {iface}"))?;
            }
        }
        Ok(if generic { "generic" } else { "native" })
    }

    /// The underlay's MTU: a tunnelled frame longer than it plus 14 is a GSO run the
    /// kernel must segment ([`maps::CONFIG_MAX_FRAME`]).
    pub fn set_underlay_mtu(&mut self, mtu: u32) -> Result<()> {
        self.set_config(maps::CONFIG_MAX_FRAME, mtu + 14)
    }

    /// Whether the AF_XDP sockets are multi-buffer (`XDP_USE_SG`): then frames longer
    /// than one AF_XDP frame go to them too ([`maps::CONFIG_MULTI_BUFFER`]).
    pub fn set_multi_buffer(&mut self, on: bool) -> Result<()> {
        self.set_config(maps::CONFIG_MULTI_BUFFER, on as u32)
    }

    fn set_config(&mut self, key: u32, value: u32) -> Result<()> {
        let mut config: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut(maps::CONFIG_MAP).context("CONFIG map")?)?;
        config.set(key, value, 0)?;
        Ok(())
    }

    fn port_program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(maps::PORT_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap()
    }

    /// Makes `iface` (the host end of a fast guest port) hand every frame to the AF_XDP
    /// socket `fd`, in slot `slot`.
    pub fn attach_port(&mut self, iface: &str, slot: u32, fd: &impl AsRawFd) -> Result<XdpLinkId> {
        let ifindex = if_index(iface)?;
        self.port_xsks
            .set(slot, fd.as_raw_fd(), 0)
            .context("adding a port socket to the XskMap")?;
        self.port_slots.insert(ifindex, slot, 0)?;
        self.port_program()
            .attach(iface, XdpMode::Driver)
            .with_context(|| format!("attaching the guest-port program to {iface}"))
    }

    pub fn detach_port(&mut self, link: XdpLinkId, iface: &str, slot: u32) {
        let _ = self.port_program().detach(link);
        if let Ok(i) = if_index(iface) {
            let _ = self.port_slots.remove(&i);
        }
        let _ = self.port_xsks.unset(slot);
    }

    /// Routes `vni` to socket slot `slot`, accepting frames from `members` only, whose
    /// inner frames are at most `max_frame` bytes (the Violin's MTU + 18).
    pub fn add_vni(
        &mut self,
        vni: u32,
        slot: u32,
        members: &[Ipv4Addr],
        max_frame: usize,
    ) -> Result<()> {
        for m in members {
            self.members.insert(member_key(vni, *m), 1, 0)?;
        }
        self.vnis.insert(
            vni,
            VniEntry {
                slot,
                members: members.len() as u32,
                max_frame: max_frame as u32,
            },
            0,
        )?;
        Ok(())
    }

    pub fn remove_vni(&mut self, vni: u32, members: &[Ipv4Addr]) {
        let _ = self.vnis.remove(&vni);
        for m in members {
            let _ = self.members.remove(&member_key(vni, *m));
        }
    }

    /// Puts an AF_XDP socket in XskMap slot `key` (slot × queues + queue).
    pub fn set_socket(&mut self, key: u32, fd: &impl AsRawFd) -> Result<()> {
        self.xsks
            .set(key, fd.as_raw_fd(), 0)
            .context("adding an AF_XDP socket to the XskMap")
    }

    pub fn clear_socket(&mut self, key: u32) {
        let _ = self.xsks.unset(key);
    }

    /// Verdict counters summed over CPUs.
    pub fn verdicts(&self) -> [u64; Verdict::COUNT] {
        let mut out = [0u64; Verdict::COUNT];
        for (i, o) in out.iter_mut().enumerate() {
            if let Ok(v) = self.verdicts.get(&(i as u32), 0) {
                *o = v.iter().sum();
            }
        }
        out
    }
}

fn if_index(iface: &str) -> Result<u32> {
    let c = std::ffi::CString::new(iface)?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {iface}");
    }
    Ok(i)
}

/// Removes any XDP program attached to `iface` through netlink (`ip link set IFACE xdp off`).
pub fn detach_any(iface: &str) -> Result<()> {
    use rtnetlink::packet_route::link::{LinkAttribute, LinkXdp};
    let iface = iface.to_string();
    crate::host::netlink::with_handle(|h| async move {
        let idx = crate::host::netlink::require_index(&h, &iface).await?;
        for flags in [0u32, 2, 4] {
            let msg = rtnetlink::LinkUnspec::new_with_index(idx)
                .append_extra_attribute(LinkAttribute::Xdp(vec![
                    LinkXdp::Fd(-1),
                    LinkXdp::Flags(flags),
                ]))
                .build();
            let _ = h.link().set(msg).execute().await;
        }
        Ok(())
    })
}
