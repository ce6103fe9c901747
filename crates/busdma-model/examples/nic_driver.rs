//! A NIC driver on busdma, written as a driver author would: one state struct (`Nic`) owns the
//! device, its tag, its TX and RX descriptor rings in coherent memory, a `DmaPool` of
//! per-packet fragment tables (indirect descriptors) and a map per ring slot; each packet is
//! three fragments (a 66-byte header and two 717-byte payloads, tcpbench's shape) mapped per
//! packet. Descriptors are `#[repr(C)]` plain-data structs written by copy through typed views;
//! the OWN bit moves between driver and NIC by atomic loads and stores of the status word.
//! Received frames are copied out (copybreak) with partial syncs of the frame's bytes only.
//! There is no `unsafe` in the driver.
//!
//! The driver is written once against `DmaDevice` (`busdma::device` theory 8) and runs
//! unchanged behind two kinds of IOMMU: the model's table-walking IOMMU (`Device`, the VT-d
//! shape: page tables in memory, IOTLB invalidations) and a virtio-iommu (`ViommuDevice`: MAP
//! and UNMAP requests to the request-level model `busdma_model::viommu`, as inside a VM).
//!
//! Run it with `cargo run --release -p busdma-model --example nic_driver`. The kernel part
//! (the machine, the IOMMUs) is the model's; the "NIC" is a loopback device model that fetches
//! TX descriptors and packets and writes RX buffers and descriptors by DMA through the IOMMU in
//! front of it, so every byte the driver checks crossed the IOMMU twice.
#![allow(missing_docs)]

use std::sync::Arc;

use busdma::Iova;
use busdma::device::ViommuDevice;
use busdma::dma::{
    Coherent, DeviceConfig, Direction, DmaBlock, DmaDevice, DmaMemory, DmaPool, Iommu, OwnedMap, Part,
    Policy, SyncOp, Tag, TagSpec,
};
use busdma::dma::{Error, MemAttr, Pod, Result, Zeroable};
use busdma::quickmap::QuickMaps;
use busdma::virtio_iommu::VirtioIommu;
use busdma_model::viommu::{ModelConfig, ModelViommu};
use busdma_model::{DmaPort, HostPlatform, IommuConfig, MachineConfig, ModelIommu};

// ---- the driver ---------------------------------------------------------------------------

/// The three fragments of a packet, owned by their slot's map.
type Packet<'i> = [Part<'i, HostPlatform>; 3];

/// Ring slots (TX and RX).
const SLOTS: usize = 16;
/// A descriptor, as the NIC reads it (little-endian, no padding).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
struct Desc {
    /// Bus address: of a buffer, or (a TX ring entry) of the packet's fragment table.
    addr: u64,
    /// Length in bytes, or (a TX ring entry) the number of fragments.
    len: u32,
    /// Status bits, the word the driver and the NIC hand the descriptor over with.
    status: u32,
}
const DESC: u64 = size_of::<Desc>() as u64;
/// Offset of the status word in a descriptor.
const STATUS: u64 = 12;
/// The device owns the descriptor.
const OWN: u32 = 1;
/// The last fragment of a packet.
const EOP: u32 = 2;
/// Fragment lengths and the header's offset in its buffer.
const FRAGS: [u64; 3] = [66, 717, 717];
const HEADER_AT: u64 = 0x80;
/// RX buffer size.
const RX_BUF: u64 = 2048;

/// One TX slot: its map owns the packet's three fragment buffers; while the NIC owns the slot
/// (from `send` to `reclaim`) it also holds the packet's fragment table, a block of the
/// driver's descriptor pool (indirect descriptors, as virtio's).
struct TxSlot<'i, S: busdma::front::strategy::Strategy<HostPlatform>> {
    map: OwnedMap<'i, HostPlatform, S, Packet<'i>>,
    table: Option<DmaBlock<'i, HostPlatform, S>>,
}

/// The driver's state: everything it owns, in teardown order (maps and fragment tables, the
/// pool, then rings, then the tag, then the device: dropping it detaches and frees the domain
/// once the IOTLB forgot it).
struct Nic<'i, D: DmaDevice<'i, Platform = HostPlatform>> {
    tx: Vec<TxSlot<'i, D::Strategy>>,
    rx: Vec<OwnedMap<'i, HostPlatform, D::Strategy, DmaMemory<'i, HostPlatform>>>,
    tables: DmaPool<'i, HostPlatform, D::Strategy>,
    tx_ring: Coherent<'i, HostPlatform, D::Strategy>,
    rx_ring: Coherent<'i, HostPlatform, D::Strategy>,
    tag: Tag<'i, HostPlatform, D::Strategy>,
    dev: D,
    tx_next: usize,
    rx_next: usize,
}

impl<'i, D: DmaDevice<'i, Platform = HostPlatform>> Nic<'i, D> {
    /// Probe: given the attached device, a tag for a 32-bit NIC, both rings, the pool of
    /// fragment tables, a map and fragment buffers per TX slot, a posted RX buffer per RX slot.
    fn probe(dev: D) -> Result<Self> {
        let platform = dev.platform();
        let spec = TagSpec { dma_mask: TagSpec::mask_of_bits(32), ..TagSpec::new(64 << 10, 8) };
        let tag = dev.tag(spec)?;
        let tx_ring = tag.alloc_coherent(SLOTS as u64 * DESC, false)?;
        let rx_ring = tag.alloc_coherent(SLOTS as u64 * DESC, false)?;
        // A fragment table: one descriptor per fragment, 64-byte aligned (the NIC fetches a
        // cache line), never across a 4 KiB boundary.
        let tables = tag.create_pool(FRAGS.len() as u64 * DESC, 64, 4096)?;
        let mut tx = Vec::new();
        for _ in 0..SLOTS {
            let frag = |len: u64, at: u64| -> Result<Part<'i, HostPlatform>> {
                let mem = DmaMemory::alloc(platform, tag.spec(), at + len, MemAttr::WriteBack)?;
                Part::new(mem, at, len).map_err(|(e, _)| e)
            };
            let packet = [frag(FRAGS[0], HEADER_AT)?, frag(FRAGS[1], 0)?, frag(FRAGS[2], 0)?];
            let mut map = tag.create_owned_map()?;
            map.load(packet, Direction::ToDevice).map_err(|(e, _)| e)?;
            map.unload()?; // mapped per packet, in `send`
            tx.push(TxSlot { map, table: None });
        }
        let mut rx = Vec::new();
        for slot in 0..SLOTS as u64 {
            let mut map = tag.create_owned_map()?;
            let buf = DmaMemory::alloc(platform, tag.spec(), RX_BUF, MemAttr::WriteBack)?;
            let bus = map.load(buf, Direction::FromDevice).map_err(|(e, _)| e)?[0].addr;
            map.sync(SyncOp::PREREAD)?;
            post(&rx_ring, slot, Desc { addr: bus.raw(), len: RX_BUF as u32, status: 0 })?;
            rx.push(map);
        }
        Ok(Nic { tx, rx, tables, tx_ring, rx_ring, tag, dev, tx_next: 0, rx_next: 0 })
    }

    /// Bus addresses of the rings, for the NIC's registers.
    fn ring_bases(&self) -> (Iova, Iova) {
        (self.tx_ring.segments()[0].addr, self.rx_ring.segments()[0].addr)
    }

    /// Sends one packet: copies it into the slot's fragments, maps them, writes one
    /// descriptor per segment into a fragment table from the pool, and hands the ring entry
    /// pointing at it to the NIC. `Busy` when the ring is full.
    fn send(&mut self, packet: &[u8]) -> Result<()> {
        let n = self.tx_next;
        let slot = &mut self.tx[n];
        if slot.table.is_some() {
            return Err(Error::Busy { what: "TX ring full", count: SLOTS as u64 });
        }
        let frags = slot.map.buffer().ok_or(Error::BadState { what: "TX slot without buffers" })?;
        let mut at = 0usize;
        for f in frags {
            let len = f.len() as usize;
            f.memory().write(f.offset(), &packet[at..at + len])?;
            at += len;
        }
        let segs = slot.map.reload(Direction::ToDevice)?;
        let mut descs = [Desc::default(); FRAGS.len()];
        for (i, s) in segs.iter().enumerate() {
            let status = if i + 1 == segs.len() { EOP } else { 0 };
            *descs.get_mut(i).ok_or(Error::BadState { what: "more segments than fragments" })? =
                Desc { addr: s.addr.raw(), len: s.len as u32, status };
        }
        let count = segs.len() as u32;
        slot.map.sync(SyncOp::PREWRITE)?;
        let table = self.tables.alloc()?; // zeroed
        table.view().write_slice(0, &descs)?;
        post(&self.tx_ring, n as u64, Desc { addr: table.bus_addr().raw(), len: count, status: 0 })?;
        slot.table = Some(table);
        self.tx_next = (n + 1) % SLOTS;
        Ok(())
    }

    /// Takes back the TX slots whose descriptors the NIC gave back: POSTWRITE, unload, and the
    /// fragment table back to the pool.
    fn reclaim(&mut self) -> Result<usize> {
        let mut done = 0;
        for (n, slot) in self.tx.iter_mut().enumerate().filter(|(_, s)| s.table.is_some()) {
            if status(&self.tx_ring, n as u64)? & OWN == 0 {
                slot.map.sync(SyncOp::POSTWRITE)?;
                slot.map.unload()?;
                slot.table = None; // back to the pool
                done += 1;
            }
        }
        Ok(done)
    }

    /// Receives the packets the NIC wrote, by copybreak: the frame is copied out and the
    /// buffer stays mapped in its slot, so only the frame's bytes need the CPU's attention: a
    /// partial POSTREAD of `[0, len)` (not the whole 2 KiB buffer), the copy, a partial
    /// PREREAD of the same range (the lines the copy may have pulled in), the slot given back.
    fn receive(&mut self, out: &mut Vec<Vec<u8>>) -> Result<()> {
        loop {
            let n = self.rx_next;
            if status(&self.rx_ring, n as u64)? & OWN != 0 {
                return Ok(());
            }
            // The status load ordered this read after it (an acquire and `dma_rmb`).
            let d: Desc = self.rx_ring.view().read(n as u64 * DESC)?;
            let map = &mut self.rx[n];
            let len = u64::from(d.len).min(RX_BUF);
            map.sync_range(SyncOp::POSTREAD, 0, len)?;
            let mut packet = vec![0u8; len as usize];
            map.buffer().ok_or(Error::BadState { what: "RX slot without buffer" })?.read(0, &mut packet)?;
            out.push(packet);
            map.sync_range(SyncOp::PREREAD, 0, len)?;
            post(&self.rx_ring, n as u64, Desc { len: RX_BUF as u32, status: 0, ..d })?;
            self.rx_next = (n + 1) % SLOTS;
        }
    }
}

/// Writes descriptor `i` of `ring` (its status word clear), then hands it to the NIC with an
/// atomic store of OWN (a release after `dma_wmb`: the NIC never sees OWN before the rest).
fn post<S: busdma::front::strategy::Strategy<HostPlatform>>(
    ring: &Coherent<'_, HostPlatform, S>,
    i: u64,
    d: Desc,
) -> Result<()> {
    let v = ring.view();
    v.write(i * DESC, &d)?;
    v.atomic_u32(i * DESC + STATUS)?.store(d.status | OWN);
    Ok(())
}

/// The status word of descriptor `i` of `ring` (an atomic load: an acquire, then `dma_rmb`).
fn status<S: busdma::front::strategy::Strategy<HostPlatform>>(
    ring: &Coherent<'_, HostPlatform, S>,
    i: u64,
) -> Result<u32> {
    Ok(ring.view().atomic_u32(i * DESC + STATUS)?.load())
}

// ---- the NIC (a device model: everything it touches goes by DMA through the IOMMU) -------

struct LoopbackNic<P: DmaPort> {
    port: P,
    tx_ring: Iova,
    rx_ring: Iova,
    tx_head: u64,
    rx_head: u64,
}

impl<P: DmaPort> LoopbackNic<P> {
    fn fetch(&self, at: u64) -> Desc {
        let mut d = Desc::default();
        self.port.dma_read(Iova::new(at), bytemuck::bytes_of_mut(&mut d)).expect("descriptor fetch faulted");
        d
    }

    fn write_back(&self, at: u64, d: Desc) {
        self.port.dma_write(Iova::new(at), bytemuck::bytes_of(&d)).expect("descriptor write-back faulted");
    }

    /// Transmits every packet the driver handed over, looping each back into the next RX
    /// buffer.
    fn run(&mut self) -> usize {
        let mut sent = 0;
        loop {
            let entry = self.tx_ring.raw() + (self.tx_head % SLOTS as u64) * DESC;
            let e = self.fetch(entry);
            if e.status & OWN == 0 {
                return sent;
            }
            let mut packet = Vec::new();
            for i in 0..e.len as u64 {
                let f = self.fetch(e.addr + i * DESC);
                let mut b = vec![0u8; f.len as usize];
                self.port.dma_read(Iova::new(f.addr), &mut b).expect("packet fetch faulted");
                packet.extend(b);
                if f.status & EOP != 0 {
                    break;
                }
            }
            self.write_back(entry, Desc { status: e.status & !OWN, ..e });
            let rx = self.rx_ring.raw() + (self.rx_head % SLOTS as u64) * DESC;
            let r = self.fetch(rx);
            assert!(r.status & OWN != 0, "RX ring overrun");
            self.port.dma_write(Iova::new(r.addr), &packet).expect("RX write faulted");
            self.write_back(rx, Desc { len: packet.len() as u32, status: 0, ..r });
            self.tx_head += 1;
            self.rx_head += 1;
            sent += 1;
        }
    }
}

// ---- the kernel -----------------------------------------------------------------------------

const NIC_ID: u32 = 0x18;
const PACKETS: usize = 1000;
/// Where the virtio-iommu's BAR 0 sits (above the 64 MiB of RAM).
const VIOMMU_BAR: u64 = 0xf000_0000;

/// What one run of the driver showed: the tag's id, the ring bases, the fragment-table pool.
struct Run {
    tag: u64,
    rings: (Iova, Iova),
    pool_pages: u64,
}

/// Probes the NIC on `dev`, loops `PACKETS` packets through `port` (the NIC's DMA behind the
/// same IOMMU) and checks every byte; then tears the driver down (maps, rings, tag, device).
fn drive<'i, D: DmaDevice<'i, Platform = HostPlatform>>(dev: D, port: impl DmaPort) -> Result<Run> {
    let mut nic = Nic::probe(dev)?;
    let (tx_ring, rx_ring) = nic.ring_bases();
    let mut hw = LoopbackNic { port, tx_ring, rx_ring, tx_head: 0, rx_head: 0 };
    let packet = |seq: usize| -> Vec<u8> {
        (0..FRAGS.iter().sum::<u64>() as usize)
            .map(|i| (i.wrapping_mul(31) ^ seq.wrapping_mul(7)) as u8)
            .collect()
    };
    let (mut sent, mut received) = (0usize, Vec::new());
    while received.len() < PACKETS {
        while sent < PACKETS && nic.send(&packet(sent)).is_ok() {
            sent += 1;
        }
        hw.run();
        nic.reclaim()?;
        nic.receive(&mut received)?;
    }
    for (seq, p) in received.iter().enumerate() {
        assert_eq!(p, &packet(seq), "packet {seq} arrived changed");
    }
    let pool = nic.tables.stats();
    assert!(pool.pages >= 1 && pool.out <= SLOTS as u64);
    assert_eq!(nic.dev.policy(), Policy::Strict);
    let run = Run { tag: nic.tag.id(), rings: (tx_ring, rx_ring), pool_pages: pool.pages };
    // Maps, fragment tables, pool, rings and tag go first; the device then detaches at once
    // (with them alive it would be handed back `Busy`).
    let Nic { tx, rx, tables, tx_ring, rx_ring, tag, dev, .. } = nic;
    drop((tx, rx, tables, tx_ring, rx_ring, tag));
    dev.detach().map_err(|e| Error::BadState {
        what: match e {
            busdma::dma::DetachError::Busy { .. } => "detach refused: handles alive",
            busdma::dma::DetachError::Failed(_) => "detach failed",
        },
    })?;
    Ok(run)
}

fn main() -> Result<()> {
    let machine =
        Arc::new(HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) })?);
    let quick_maps = QuickMaps::for_platform(&*machine);
    let bytes = FRAGS.iter().sum::<u64>();

    // Bare metal: a table-walking IOMMU (the VT-d shape).
    let iommu = Iommu::new(&*machine, &quick_maps, ModelIommu::new(&machine, IommuConfig::default())?)?;
    let run = drive(iommu.attach(NIC_ID, Policy::Strict)?, iommu.hw().port(NIC_ID))?;
    let st = iommu.hw().stats();
    println!(
        "nic_driver: {PACKETS} packets of 3 fragments ({bytes} bytes each) sent and received through each IOMMU, every byte checked"
    );
    println!(
        "  table IOMMU: tag #{} (32-bit NIC), TX ring at bus {:#x}, RX ring at bus {:#x}; {} DMA translations, {} faults, \
         {} ranged invalidations; fragment tables from a DmaPool of {} page(s)",
        run.tag,
        run.rings.0.raw(),
        run.rings.1.raw(),
        st.translations,
        st.faults,
        st.inv_range,
        run.pool_pages
    );
    assert_eq!(st.faults, 0);
    assert_eq!(iommu.stats().leaked_domains, 0);

    // In a VM: the same driver behind a virtio-iommu, every map and unmap a request.
    let model = ModelViommu::install(&machine, VIOMMU_BAR)?;
    // SAFETY: the model function's BAR was just placed at VIOMMU_BAR on this machine and
    // stays there; nothing else drives it.
    let unit = unsafe { VirtioIommu::new(&*machine, &quick_maps, &ModelConfig { bar: VIOMMU_BAR as u32 }) }?;
    let dev = ViommuDevice::attach(&unit, NIC_ID, Policy::Strict, DeviceConfig::default())?;
    let run = drive(dev, model.port(NIC_ID))?;
    let (maps, unmaps) = (model.requests(3), model.requests(4));
    println!(
        "  virtio-iommu: tag #{}, TX ring at bus {:#x}, RX ring at bus {:#x}; {maps} MAP requests ({:.2} per packet: \
         one per fragment) and {unmaps} UNMAP ({:.2}: one per packet covers its fragments), {} DETACH",
        run.tag,
        run.rings.0.raw(),
        run.rings.1.raw(),
        maps as f64 / PACKETS as f64,
        unmaps as f64 / PACKETS as f64,
        model.requests(2)
    );
    assert_eq!(model.requests(2), 1);
    let mut probe = [0u8; 16];
    assert!(
        model.port(NIC_ID).dma_read(run.rings.0, &mut probe).is_err(),
        "detached: the ring is out of reach"
    );
    println!("  detached cleanly from both: no domain leaked, every mapping undone");
    Ok(())
}

/// The driver's state can move to another CPU's thread (an interrupt thread, a worker).
#[allow(dead_code)]
fn state_is_send<'a>(nic: Nic<'a, busdma::dma::Device<'a, 'a, ModelIommu<'a>>>) -> impl Send + 'a {
    nic
}
