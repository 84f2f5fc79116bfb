//! The underlay's socket steering by Violin, on either plane: loads `violin_steer` (an
//! `sk_reuseport` program in the eBPF object) onto the underlay's `SO_REUSEPORT` group
//! and keeps its maps. Each Violin placed on this host gets a UDP socket of its own in
//! the group, which its worker reads as one of the Violin's sources: the kernel queues
//! each Violin's datagrams apart, so a flooding Violin fills (and overflows) only its
//! own socket, and the worker's fair service sees every Violin's backlog. Without it
//! (no eBPF here), the workers' sockets are steered by classic BPF and every Violin of
//! a worker shares its socket's queue, first in, first out.

use anyhow::{anyhow, Context, Result};
use aya::maps::{Array, HashMap, MapData, ReusePortSockArray};
use aya::programs::SkReuseport;
use aya::{Ebpf, EbpfLoader};
use std::collections::BTreeMap;
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, BorrowedFd};
use violin_common::maps;

/// Maps of the object this loader does not use, shrunk to one entry (a ring buffer to
/// one page) so that loading it for the steering program costs the kernel little.
const UNUSED: [(&str, u32); 8] = [
    (maps::VNI_MAP, 1),
    (maps::MEMBER_MAP, 1),
    (maps::XSK_MAP, 1),
    (maps::MONITORED_MAP, 1),
    (maps::PORT_SLOT_MAP, 1),
    (maps::PORT_XSK_MAP, 1),
    (maps::DROP_EVENT_RING, 4096),
    (maps::VERDICT_COUNTERS, 1),
];

pub struct VniSteering {
    /// Keeps the program (and its maps) loaded.
    _ebpf: Ebpf,
    sockets: ReusePortSockArray<MapData>,
    vnis: HashMap<MapData, u32, u32>,
    at: SocketAddrV4,
    workers: u32,
    /// Violins with a socket of their own: VNI → its index in `sockets`.
    own: BTreeMap<u32, u32>,
}

impl VniSteering {
    /// Loads the program from `object` and makes it the steering of the group whose
    /// sockets are `workers` (worker i's at index i), bound to `at`.
    pub fn attach(object: &[u8], at: SocketAddrV4, workers: &[BorrowedFd]) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        for (name, n) in UNUSED {
            loader.map_max_entries(name, n);
        }
        let mut ebpf = loader
            .load(object)
            .context("loading the eBPF object for the underlay's steering")?;
        let prog: &mut SkReuseport = ebpf
            .program_mut(maps::STEER_PROGRAM)
            .ok_or_else(|| anyhow!("no program {} in the object", maps::STEER_PROGRAM))?
            .try_into()?;
        prog.load()
            .context("loading the steering program (needs CAP_BPF / root)")?;
        let take = |e: &mut Ebpf, n: &str| {
            e.take_map(n)
                .ok_or_else(|| anyhow!("no map {n} in the object"))
        };
        let mut config: Array<_, u32> = Array::try_from(take(&mut ebpf, maps::STEER_CONFIG_MAP)?)?;
        config.set(0, workers.len() as u32, 0)?;
        let mut sockets = ReusePortSockArray::try_from(take(&mut ebpf, maps::STEER_SOCKET_MAP)?)?;
        for (i, fd) in workers.iter().enumerate() {
            sockets
                .set(i as u32, fd, 0)
                .with_context(|| format!("putting worker {i}'s underlay socket in the map"))?;
        }
        let vnis = HashMap::try_from(take(&mut ebpf, maps::STEER_VNI_MAP)?)?;
        let first = workers
            .first()
            .ok_or_else(|| anyhow!("no underlay socket to steer"))?;
        let prog: &mut SkReuseport = ebpf
            .program_mut(maps::STEER_PROGRAM)
            .ok_or_else(|| anyhow!("no program {}", maps::STEER_PROGRAM))?
            .try_into()?;
        prog.attach(first)
            .context("attaching the steering program to the underlay's sockets")?;
        Ok(VniSteering {
            _ebpf: ebpf,
            sockets,
            vnis,
            at,
            workers: workers.len() as u32,
            own: BTreeMap::new(),
        })
    }

    /// How many Violins may be steered.
    pub fn capacity(&self) -> usize {
        (maps::STEER_SOCKETS_MAX - self.workers).min(maps::STEER_VNIS_MAX) as usize
    }

    /// A socket of the group for the Violin `vni`, which the kernel steers its
    /// datagrams to from the moment this returns (`give` hands it to the Violin's
    /// worker before that).
    pub fn open(&mut self, vni: u32, give: impl FnOnce(UdpSocket) -> Result<()>) -> Result<()> {
        if self.own.contains_key(&vni) {
            return Ok(());
        }
        // The lowest free index beyond the workers' (control time: a sorted copy).
        let mut used: Vec<u32> = self.own.values().copied().collect();
        used.sort_unstable();
        let mut index = self.workers;
        for i in used {
            if i == index {
                index += 1;
            } else if i > index {
                break;
            }
        }
        if index >= maps::STEER_SOCKETS_MAX {
            return Err(anyhow!("every steering slot is taken"));
        }
        let sock = crate::datapath::transport::udp::UdpUnderlay::member(self.at)
            .with_context(|| format!("opening a socket of the underlay's group on {}", self.at))?;
        self.sockets
            .set(index, &sock, 0)
            .context("putting a Violin's socket in the steering map")?;
        let fd = sock.as_raw_fd();
        if let Err(e) = give(sock) {
            let _ = self.sockets.clear_index(&index);
            return Err(e);
        }
        if let Err(e) = self.vnis.insert(vni, index, 0) {
            // The worker reads a socket that gets nothing; it is closed with the Violin.
            let _ = self.sockets.clear_index(&index);
            return Err(anyhow!("steering VNI {vni} to its socket (fd {fd}): {e}"));
        }
        self.own.insert(vni, index);
        Ok(())
    }

    /// Stops steering `vni` anywhere in particular (its datagrams go to the worker
    /// socket `VNI mod n` again); the caller closes its socket, if it had one.
    pub fn forget(&mut self, vni: u32) {
        let _ = self.vnis.remove(&vni);
        if let Some(i) = self.own.remove(&vni) {
            let _ = self.sockets.clear_index(&i);
        }
    }

    /// Whether the Violin `vni` has a socket of its own.
    pub fn owns(&self, vni: u32) -> bool {
        self.own.contains_key(&vni)
    }

    /// Steers `vni` to worker `w`'s socket (where it has none of its own).
    pub fn to_worker(&mut self, vni: u32, w: usize) -> Result<()> {
        self.vnis
            .insert(vni, w as u32, 0)
            .with_context(|| format!("steering VNI {vni} to worker {w}"))
    }
}
