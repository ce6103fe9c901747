//! A storage driver on busdma: each request is a scatter-gather list that mixes RAM (a command
//! block, a data buffer, a status block) with memory that has no page and no kernel mapping: a
//! peer device's BAR (say, a GPU's memory that a write takes its data from). The request is one
//! owned map through the IOMMU; there is no `unsafe` in the driver. The bus code describes the
//! peer's BAR once (its one `unsafe`, a trust boundary: "this range is that device's memory").
//!
//! Run it with `cargo run --release -p busdma-model --example storage_driver`. The "disk" is a
//! device model that fetches the command and the RAM data by DMA through the model IOMMU,
//! checks that the peer segment translates to the peer's BAR (the model has no peer device to
//! read from), and writes the status block back by DMA.
#![allow(missing_docs)]

use std::sync::Arc;

use busdma::device::{Device, DeviceStrategy, Iommu, Policy};
use busdma::front::{
    DeviceRegion, Direction, DmaMemory, OwnedMap, Part, RegionKind, RegionSlice, SyncOp, TagSpec,
};
use busdma::quickmap::QuickMaps;
use busdma::{AddrRange, Error, Iova, MemAttr, PAGE_SIZE, PhysAddr, Result};
use busdma_model::{DmaPort, HostPlatform, IommuConfig, MachineConfig, MemoryType, ModelIommu};

// ---- the driver ---------------------------------------------------------------------------

type Hw<'m> = ModelIommu<'m>;
type Strat<'i, 'm> = DeviceStrategy<'i, 'm, Hw<'m>>;
/// A request's scatter-gather list: command (RAM), data from the peer (BAR), data from RAM,
/// status (RAM).
type Request<'i> = (Part<'i, HostPlatform>, RegionSlice, (Part<'i, HostPlatform>, Part<'i, HostPlatform>));

const CMD_LEN: u64 = 64;
const STATUS_LEN: u64 = 16;
const STATUS_OK: u32 = 0x600d;

struct Disk<'i, 'm> {
    maps: Vec<OwnedMap<'i, HostPlatform, Strat<'i, 'm>, Request<'i>>>,
    peer: Arc<DeviceRegion>,
    dev: Device<'i, 'm, Hw<'m>>,
    platform: &'i HostPlatform,
}

impl<'i, 'm> Disk<'i, 'm> {
    fn attach(
        iommu: &'i Iommu<'m, Hw<'m>>,
        platform: &'i HostPlatform,
        id: u32,
        peer: Arc<DeviceRegion>,
    ) -> Result<Self> {
        let dev = iommu.attach(id, Policy::Strict)?;
        let tag = dev.tag(TagSpec { max_segment_size: 64 << 10, ..TagSpec::new(1 << 20, 16) })?;
        let maps = (0..4).map(|_| tag.create_owned_map()).collect::<Result<Vec<_>>>()?;
        Ok(Disk { maps, peer, dev, platform })
    }

    /// Builds and maps a write request: `block` is the disk block, the data comes from
    /// `peer_off..peer_off + peer_len` of the peer's BAR followed by `ram_data`. Returns the
    /// bus address of the command block (the disk's doorbell argument).
    fn submit(
        &mut self,
        slot: usize,
        block: u64,
        peer_off: u64,
        peer_len: u64,
        ram_data: &[u8],
    ) -> Result<Iova> {
        let spec = self.maps[slot].map().tag().spec();
        let alloc = |len: u64| DmaMemory::alloc(self.platform, spec, len, MemAttr::WriteBack);
        let data = alloc(ram_data.len() as u64)?;
        data.write(0, ram_data)?;
        let cmd = alloc(PAGE_SIZE)?;
        let status = alloc(PAGE_SIZE)?;
        let mut c = [0u8; CMD_LEN as usize];
        c[..8].copy_from_slice(&block.to_le_bytes());
        c[8..16].copy_from_slice(&(peer_len + ram_data.len() as u64).to_le_bytes());
        cmd.write(0, &c)?;
        let part = |m: DmaMemory<'i, HostPlatform>, len: u64| Part::new(m, 0, len).map_err(|(e, _)| e);
        let request = (
            part(cmd, CMD_LEN)?,
            self.peer.slice(peer_off, peer_len)?,
            (part(data, ram_data.len() as u64)?, part(status, STATUS_LEN)?),
        );
        let map = &mut self.maps[slot];
        let segs = map.load(request, Direction::Bidirectional).map_err(|(e, _)| e)?.to_vec();
        map.sync(SyncOp::PREWRITE.union(SyncOp::PREREAD))?;
        // The command's own bus addresses of the rest of the list (the "PRP list").
        let cmd_mem = map.buffer().ok_or(Error::BadState { what: "request vanished" })?.0.memory();
        for (i, s) in segs.iter().skip(1).enumerate() {
            let at = 16 + i as u64 * 16;
            cmd_mem.write(at, &s.addr.raw().to_le_bytes())?;
            cmd_mem.write(at + 8, &s.len.to_le_bytes())?;
        }
        map.sync(SyncOp::PREWRITE)?;
        Ok(segs[0].addr)
    }

    /// Completes a request: POSTREAD, read the status, unload and give the RAM back.
    fn complete(&mut self, slot: usize) -> Result<u32> {
        let map = &mut self.maps[slot];
        map.sync(SyncOp::POSTREAD.union(SyncOp::POSTWRITE))?;
        let request = map.take()?;
        let mut st = [0u8; 4];
        request.2.1.memory().read(0, &mut st)?;
        Ok(u32::from_le_bytes(st))
    }
}

// ---- the disk (a device model) ----------------------------------------------------------

struct Target<'a, 'm> {
    iommu: &'a ModelIommu<'m>,
    id: u32,
}

impl Target<'_, '_> {
    /// Executes the command at `cmd`: fetches its list, reads RAM data by DMA, checks that the
    /// peer segment reaches the peer's BAR, writes the status. Returns the RAM bytes read and
    /// the physical address the peer segment translated to.
    fn execute(&self, cmd: Iova, peer_bar: PhysAddr) -> (Vec<u8>, PhysAddr) {
        let port = self.iommu.port(self.id);
        let mut c = [0u8; CMD_LEN as usize];
        port.dma_read(cmd, &mut c).expect("command fetch faulted");
        let entry = |i: usize| {
            let at = 16 + i * 16;
            let a = u64::from_le_bytes(c[at..at + 8].try_into().unwrap());
            let l = u64::from_le_bytes(c[at + 8..at + 16].try_into().unwrap());
            (Iova::new(a), l)
        };
        let (peer_seg, _) = entry(0);
        let peer_pa = self.iommu.translate(self.id, peer_seg, false).expect("peer segment unmapped");
        assert_eq!(peer_pa.raw() & !(PAGE_SIZE - 1), peer_bar.raw() & !(PAGE_SIZE - 1));
        let leaf = self.iommu.inspect(self.id, peer_seg).expect("peer segment unmapped");
        assert_eq!(leaf.attrs.memory, MemoryType::Device, "the peer BAR is mapped as device memory");
        let bar = PEER_BAR..PEER_BAR + PEER_BAR_LEN;
        assert!(!bar.contains(&peer_seg.raw()), "no IOVA inside the peer's registered BAR");
        let (data, len) = entry(1);
        let mut bytes = vec![0u8; len as usize];
        port.dma_read(data, &mut bytes).expect("data fetch faulted");
        let (status, _) = entry(2);
        port.dma_write(status, &STATUS_OK.to_le_bytes()).expect("status write faulted");
        (bytes, peer_pa)
    }
}

// ---- the kernel and the bus ---------------------------------------------------------------

const DISK_ID: u32 = 0x28;
/// Where the peer's BAR sits: above the model's RAM.
const PEER_BAR: u64 = 0x80_0000_0000;
const PEER_BAR_LEN: u64 = 16 << 20;

fn main() -> Result<()> {
    let machine = HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) })?;
    let quick_maps = QuickMaps::for_platform(&machine);
    let iommu = Iommu::new(&machine, &quick_maps, ModelIommu::new(&machine, IommuConfig::default())?)?;
    // The bus enumerates the peer and describes its BAR once.
    // SAFETY: the range is the peer device's BAR in this machine (outside RAM, no one
    // allocates it); devices may be given it; busdma never touches it with the CPU.
    let peer = unsafe {
        DeviceRegion::new(PhysAddr::new(PEER_BAR), PEER_BAR_LEN, RegionKind::PeerBar { bus: None })
    }?;
    // ... and registers it with the IOMMU once: every domain keeps its bus range out of the
    // IOVA it hands out (the driver reserves nothing by hand).
    let _peer = iommu.register_peer(AddrRange::from_start_len(Iova::new(PEER_BAR), PEER_BAR_LEN)?)?;

    let mut disk = Disk::attach(&iommu, &machine, DISK_ID, peer.clone())?;
    let target = Target { iommu: iommu.hw(), id: DISK_ID };
    let mut checked = 0;
    for round in 0..50u64 {
        let slot = (round % 4) as usize;
        let ram: Vec<u8> = (0..3000u64).map(|i| (i * 3 + round) as u8).collect();
        let cmd = disk.submit(slot, round * 8, (round % 7) * PAGE_SIZE + 0x200, 8192, &ram)?;
        let (read, peer_pa) = target.execute(cmd, PhysAddr::new(PEER_BAR + (round % 7) * PAGE_SIZE + 0x200));
        assert_eq!(read, ram, "the disk read exactly the RAM data");
        assert!(peer_pa.raw() >= PEER_BAR, "the peer segment reached the BAR");
        assert_eq!(disk.complete(slot)?, STATUS_OK);
        checked += 1;
    }
    let st = iommu.hw().stats();
    assert_eq!(st.faults, 0);
    println!(
        "storage_driver: {checked} requests (command + peer BAR + RAM data + status) through the IOMMU; \
         RAM bytes checked, peer segments reach the BAR, {} translations, 0 faults",
        st.translations
    );
    assert!(disk.dev.domain().is_some());
    drop(disk);
    assert_eq!(iommu.stats().leaked_domains, 0);
    println!(
        "  detached cleanly: no domain leaked; the peer region is still the bus's ({} refs)",
        Arc::strong_count(&peer)
    );
    Ok(())
}
