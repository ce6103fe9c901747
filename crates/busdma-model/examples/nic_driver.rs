//! A NIC driver on busdma, written as a driver author would: one state struct (`Nic`) owns the
//! device, its tag, its TX and RX descriptor rings in coherent memory and a map per ring slot;
//! each packet is three fragments (a 66-byte header and two 717-byte payloads, tcpbench's
//! shape) mapped per packet; there is no `unsafe` in the driver.
//!
//! Run it with `cargo run --release -p busdma-model --example nic_driver`. The kernel part
//! (the machine, the IOMMU) is the model's; the "NIC" is a loopback device model that fetches
//! TX descriptors and packets and writes RX buffers and descriptors by DMA through the model
//! IOMMU, so every byte the driver checks crossed the IOMMU twice.
#![allow(missing_docs)]

use busdma::Iova;
use busdma::dma::{
    Device, DeviceCoherent, DeviceOwnedMap, DeviceTag, Direction, DmaMemory, Iommu, Part, Policy, SyncOp,
    TagSpec,
};
use busdma::dma::{Error, MemAttr, Result};
use busdma::quickmap::QuickMaps;
use busdma_model::{DmaPort, HostPlatform, IommuConfig, MachineConfig, ModelIommu};

// ---- the driver ---------------------------------------------------------------------------

type Hw<'m> = ModelIommu<'m>;
/// The three fragments of a packet, owned by their slot's map.
type Packet<'i> = [Part<'i, HostPlatform>; 3];

/// Ring slots (TX and RX).
const SLOTS: usize = 16;
/// A descriptor: bus address (8 bytes), length (4), flags (4).
const DESC: u64 = 16;
/// The device owns the descriptor.
const OWN: u32 = 1;
/// The last descriptor of a packet.
const EOP: u32 = 2;
/// Fragment lengths and the header's offset in its buffer.
const FRAGS: [u64; 3] = [66, 717, 717];
const HEADER_AT: u64 = 0x80;
/// RX buffer size.
const RX_BUF: u64 = 2048;

/// One TX slot: its map owns the packet's three fragment buffers; the slot holds a packet
/// from `send` until the NIC says it is done (`reclaim`).
struct TxSlot<'i, 'm> {
    map: DeviceOwnedMap<'i, 'm, Hw<'m>, Packet<'i>>,
    busy: bool,
}

/// The driver's state: everything it owns, in teardown order (maps, then rings, then the tag,
/// then the device: dropping it detaches and frees the domain once the IOTLB forgot it).
struct Nic<'i, 'm> {
    tx: Vec<TxSlot<'i, 'm>>,
    rx: Vec<DeviceOwnedMap<'i, 'm, Hw<'m>, DmaMemory<'i, HostPlatform>>>,
    tx_ring: DeviceCoherent<'i, 'm, Hw<'m>>,
    rx_ring: DeviceCoherent<'i, 'm, Hw<'m>>,
    tag: DeviceTag<'i, 'm, Hw<'m>>,
    dev: Device<'i, 'm, Hw<'m>>,
    tx_next: usize,
    rx_next: usize,
}

impl<'i, 'm> Nic<'i, 'm> {
    /// Attach: the device, a tag for a 32-bit NIC, both rings, a map and fragment buffers per
    /// TX slot, a posted RX buffer per RX slot.
    fn attach(iommu: &'i Iommu<'m, Hw<'m>>, platform: &'i HostPlatform, id: u32) -> Result<Self> {
        let dev = iommu.attach(id, Policy::Strict)?;
        let spec = TagSpec { dma_mask: TagSpec::mask_of_bits(32), ..TagSpec::new(64 << 10, 8) };
        let tag = dev.tag(spec)?;
        let tx_ring = tag.alloc_coherent(SLOTS as u64 * 3 * DESC, false)?;
        let rx_ring = tag.alloc_coherent(SLOTS as u64 * DESC, false)?;
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
            tx.push(TxSlot { map, busy: false });
        }
        let mut rx = Vec::new();
        for slot in 0..SLOTS {
            let mut map = tag.create_owned_map()?;
            let buf = DmaMemory::alloc(platform, tag.spec(), RX_BUF, MemAttr::WriteBack)?;
            let bus = map.load(buf, Direction::FromDevice).map_err(|(e, _)| e)?[0].addr;
            map.sync(SyncOp::PREREAD)?;
            write_desc(&rx_ring, slot as u64, bus, RX_BUF as u32, OWN)?;
            rx.push(map);
        }
        Ok(Nic { tx, rx, tx_ring, rx_ring, tag, dev, tx_next: 0, rx_next: 0 })
    }

    /// Bus addresses of the rings, for the NIC's registers.
    fn ring_bases(&self) -> (Iova, Iova) {
        (self.tx_ring.segments()[0].addr, self.rx_ring.segments()[0].addr)
    }

    /// Sends one packet: copies it into the slot's fragments, maps them, writes one
    /// descriptor per segment. `Busy` when the ring is full.
    fn send(&mut self, packet: &[u8]) -> Result<()> {
        let n = self.tx_next;
        let slot = &mut self.tx[n];
        if slot.busy {
            return Err(Error::Busy { what: "TX ring full", count: SLOTS as u64 });
        }
        let frags = slot.map.buffer().ok_or(Error::BadState { what: "TX slot without buffers" })?;
        let mut at = 0usize;
        for f in frags {
            let len = f.len() as usize;
            f.memory().write(f.offset(), &packet[at..at + len])?;
            at += len;
        }
        let segs = slot.map.reload(Direction::ToDevice)?.to_vec();
        slot.map.sync(SyncOp::PREWRITE)?;
        for (i, s) in segs.iter().enumerate() {
            let flags = OWN | if i + 1 == segs.len() { EOP } else { 0 };
            write_desc(&self.tx_ring, (n * 3 + i) as u64, s.addr, s.len as u32, flags)?;
        }
        slot.busy = true;
        self.tx_next = (n + 1) % SLOTS;
        Ok(())
    }

    /// Takes back the TX slots whose descriptors the NIC gave back: POSTWRITE, unload.
    fn reclaim(&mut self) -> Result<usize> {
        let mut done = 0;
        for (n, slot) in self.tx.iter_mut().enumerate().filter(|(_, s)| s.busy) {
            let (_, _, flags) = read_desc(&self.tx_ring, (n * 3) as u64)?;
            if flags & OWN == 0 {
                slot.map.sync(SyncOp::POSTWRITE)?;
                slot.map.unload()?;
                slot.busy = false;
                done += 1;
            }
        }
        Ok(done)
    }

    /// Receives the packets the NIC wrote: POSTREAD, copy out, PREREAD, give the slot back.
    fn receive(&mut self, out: &mut Vec<Vec<u8>>) -> Result<()> {
        loop {
            let n = self.rx_next;
            let (bus, len, flags) = read_desc(&self.rx_ring, n as u64)?;
            if flags & OWN != 0 {
                return Ok(());
            }
            let map = &mut self.rx[n];
            map.sync(SyncOp::POSTREAD)?;
            let mut packet = vec![0u8; len as usize];
            map.buffer().ok_or(Error::BadState { what: "RX slot without buffer" })?.read(0, &mut packet)?;
            out.push(packet);
            map.sync(SyncOp::PREREAD)?;
            write_desc(&self.rx_ring, n as u64, bus, RX_BUF as u32, OWN)?;
            self.rx_next = (n + 1) % SLOTS;
        }
    }
}

fn write_desc(ring: &DeviceCoherent<'_, '_, Hw<'_>>, i: u64, bus: Iova, len: u32, flags: u32) -> Result<()> {
    let mut d = [0u8; DESC as usize];
    d[..8].copy_from_slice(&bus.raw().to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..].copy_from_slice(&flags.to_le_bytes());
    ring.memory().write(i * DESC, &d)
}

fn read_desc(ring: &DeviceCoherent<'_, '_, Hw<'_>>, i: u64) -> Result<(Iova, u32, u32)> {
    let mut d = [0u8; DESC as usize];
    ring.memory().read(i * DESC, &mut d)?;
    let word = |r: core::ops::Range<usize>| u32::from_le_bytes(d[r].try_into().unwrap_or_default());
    Ok((Iova::new(u64::from_le_bytes(d[..8].try_into().unwrap_or_default())), word(8..12), word(12..16)))
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
    fn desc(&self, ring: Iova, i: u64) -> (u64, u32, u32) {
        let mut d = [0u8; DESC as usize];
        self.port.dma_read(Iova::new(ring.raw() + i * DESC), &mut d).expect("descriptor fetch faulted");
        let w = |r: core::ops::Range<usize>| u32::from_le_bytes(d[r].try_into().unwrap());
        (u64::from_le_bytes(d[..8].try_into().unwrap()), w(8..12), w(12..16))
    }

    fn put_desc(&self, ring: Iova, i: u64, addr: u64, len: u32, flags: u32) {
        let mut d = [0u8; DESC as usize];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..].copy_from_slice(&flags.to_le_bytes());
        self.port.dma_write(Iova::new(ring.raw() + i * DESC), &d).expect("descriptor write-back faulted");
    }

    /// Transmits every packet the driver handed over, looping each back into the next RX
    /// buffer.
    fn run(&mut self) -> usize {
        let mut sent = 0;
        loop {
            let slot = self.tx_head % SLOTS as u64;
            let (_, _, flags) = self.desc(self.tx_ring, slot * 3);
            if flags & OWN == 0 {
                return sent;
            }
            let mut packet = Vec::new();
            for i in 0..3 {
                let (addr, len, flags) = self.desc(self.tx_ring, slot * 3 + i);
                let mut b = vec![0u8; len as usize];
                self.port.dma_read(Iova::new(addr), &mut b).expect("packet fetch faulted");
                packet.extend(b);
                self.put_desc(self.tx_ring, slot * 3 + i, addr, len, flags & !OWN);
                if flags & EOP != 0 {
                    break;
                }
            }
            let rx = self.rx_head % SLOTS as u64;
            let (buf, _, flags) = self.desc(self.rx_ring, rx);
            assert!(flags & OWN != 0, "RX ring overrun");
            self.port.dma_write(Iova::new(buf), &packet).expect("RX write faulted");
            self.put_desc(self.rx_ring, rx, buf, packet.len() as u32, 0);
            self.tx_head += 1;
            self.rx_head += 1;
            sent += 1;
        }
    }
}

// ---- the kernel -----------------------------------------------------------------------------

const NIC_ID: u32 = 0x18;
const PACKETS: usize = 1000;

fn main() -> Result<()> {
    let machine = HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) })?;
    let quick_maps = QuickMaps::for_platform(&machine);
    let iommu = Iommu::new(&machine, &quick_maps, ModelIommu::new(&machine, IommuConfig::default())?)?;

    let mut nic = Nic::attach(&iommu, &machine, NIC_ID)?;
    let (tx_ring, rx_ring) = nic.ring_bases();
    let mut hw = LoopbackNic { port: iommu.hw().port(NIC_ID), tx_ring, rx_ring, tx_head: 0, rx_head: 0 };

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
    let st = iommu.hw().stats();
    println!(
        "nic_driver: {PACKETS} packets of 3 fragments ({} bytes each) sent and received through the IOMMU, every byte checked",
        FRAGS.iter().sum::<u64>()
    );
    println!(
        "  tag #{} (32-bit NIC), TX ring at bus {:#x}, RX ring at bus {:#x}; {} DMA translations, {} faults, {} ranged invalidations",
        nic.tag.id(),
        tx_ring.raw(),
        rx_ring.raw(),
        st.translations,
        st.faults,
        st.inv_range
    );
    assert_eq!(st.faults, 0);
    assert!(nic.dev.domain().is_some(), "strict policy: the device has a domain");
    drop(nic); // maps, rings, tag, then the device: detached, its domain freed
    let leaked = iommu.stats().leaked_domains;
    assert_eq!(leaked, 0);
    println!("  detached cleanly: no domain leaked");
    Ok(())
}

/// The driver's state can move to another CPU's thread (an interrupt thread, a worker).
#[allow(dead_code)]
fn state_is_send<'a>(nic: Nic<'a, 'a>) -> impl Send + 'a {
    nic
}
