//! A register- and request-level model of a virtio-iommu behind a modern virtio-pci transport
//! (virtio 1.2, sections 4.1 and 5.13), enough for `busdma::virtio_iommu::VirtioIommu` to
//! initialise on the model machine and for a device behind it to DMA through what the driver
//! mapped: feature negotiation (VERSION_1, MAP_UNMAP, INPUT_RANGE, DOMAIN_RANGE offered; no
//! PROBE, no bypass), two split queues, and ATTACH, DETACH, MAP, UNMAP executed at the
//! notification (as QEMU does under TCG). The event queue's buffers are taken and never used
//! (the model reports no faults: a blocked access is the `dma_read` error).
//!
//! Endpoints behind it reach memory through [`ModelViommu::port`] (a [`DmaPort`], as the
//! table-walking model's `ModelIommu::port`), so a device model written once runs behind
//! either; [`ModelViommu::install`] places the function's registers on the machine.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

use busdma::{AddrRange, Iova, PhysAddr, Platform};

use crate::dma::{DeviceId, DmaFault, DmaPort, FaultReason};
use crate::{HostPlatform, MmioHandler};

/// Layout of BAR 0: the common structure, the notify structure (multiplier 0: every queue
/// notifies at its start) and the device structure.
pub const COMMON: u64 = 0;
/// Offset of the notify structure in BAR 0.
pub const NOTIFY: u64 = 0x1000;
/// Offset of the device-specific structure (`virtio_iommu_config`) in BAR 0.
pub const DEVICE: u64 = 0x2000;
/// Length of BAR 0.
pub const BAR_LEN: u64 = 0x3000;
const QUEUES: usize = 2;
const QUEUE_MAX: u16 = 64;
/// Input range and domain range the device offers.
pub const INPUT_LAST: u64 = (1 << 48) - 1;
const DOMAIN_LAST: u32 = 1023;
const FEATURES: u64 = (1 << 32) | (1 << 2) | (1 << 0) | (1 << 1);
/// Status codes (virtio 1.2, 5.13.6.1).
const S_OK: u8 = 0;
const S_INVAL: u8 = 4;
const S_RANGE: u8 = 5;
const S_NOENT: u8 = 6;
/// MAP flags (5.13.6.4).
const MAP_READ: u32 = 1;
const MAP_WRITE: u32 = 2;

#[derive(Clone, Copy, Default)]
struct Queue {
    size: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
    last_avail: u16,
}

#[derive(Default)]
struct State {
    status: u8,
    dev_feature_sel: u32,
    drv_feature_sel: u32,
    driver_features: u64,
    queue_sel: u16,
    queues: [Queue; QUEUES],
    bypass: u8,
    /// Endpoint -> domain.
    attached: BTreeMap<u32, u32>,
    /// Domain -> (first IOVA -> (last IOVA, physical start, flags)).
    domains: BTreeMap<u32, BTreeMap<u64, (u64, u64, u32)>>,
    /// Requests executed, by type (index = the wire's type number).
    requests: [u64; 6],
    /// Refuse every UNMAP (status INVAL, nothing unmapped): a hypervisor that failed one.
    fail_unmaps: bool,
}

/// The device: its registers and the translation it applies.
pub struct ModelViommu {
    m: Weak<HostPlatform>,
    st: Mutex<State>,
}

impl ModelViommu {
    /// A reset device on machine `m` (its registers placed by the caller, or by
    /// [`ModelViommu::install`]).
    pub fn new(m: Weak<HostPlatform>) -> Self {
        Self { m, st: Mutex::new(State::default()) }
    }

    /// A reset device with its BAR 0 at `bar` on `m` (outside RAM and other windows): the
    /// driver finds it through [`ModelConfig`] `{ bar }`.
    ///
    /// Errors: those of [`HostPlatform::add_mmio`] (the window overlaps RAM or another one).
    pub fn install(m: &Arc<HostPlatform>, bar: u64) -> busdma::Result<Arc<Self>> {
        let dev = Arc::new(Self::new(Arc::downgrade(m)));
        m.add_mmio(AddrRange::from_start_len(PhysAddr::new(bar), BAR_LEN)?, Box::new(dev.clone()))?;
        Ok(dev)
    }

    /// Endpoint `ep`'s view of memory: its reads and writes translated by the domain it is
    /// attached to when they happen.
    pub fn port(self: &Arc<Self>, ep: u32) -> ViommuPort {
        ViommuPort { unit: self.clone(), ep }
    }

    /// The physical pieces of `[iova, iova + len)` for endpoint `ep` (`write`: device to
    /// memory), or the fault of the first byte that is not mapped with that permission in
    /// the domain `ep` is attached to (unattached endpoints reach nothing).
    fn translate(
        &self,
        ep: u32,
        iova: Iova,
        len: u64,
        write: bool,
    ) -> Result<Vec<(PhysAddr, u64)>, DmaFault> {
        let st = self.st.lock().unwrap();
        let fault = |at: u64, reason| DmaFault { device: ep as DeviceId, iova: Iova::new(at), write, reason };
        let maps = st
            .attached
            .get(&ep)
            .and_then(|d| st.domains.get(d))
            .ok_or_else(|| fault(iova.raw(), FaultReason::NotAttached))?;
        let need = if write { MAP_WRITE } else { MAP_READ };
        let mut out = Vec::new();
        let mut at = 0u64;
        while at < len {
            let a = iova.raw().checked_add(at).ok_or_else(|| fault(u64::MAX, FaultReason::Unmapped))?;
            match maps.range(..=a).next_back() {
                Some((&first, &(last, pa, flags))) if a <= last => {
                    if flags & need == 0 {
                        return Err(fault(a, FaultReason::Permission));
                    }
                    let n = (last - a + 1).min(len - at);
                    out.push((PhysAddr::new(pa + (a - first)), n));
                    at += n;
                }
                _ => return Err(fault(a, FaultReason::Unmapped)),
            }
        }
        Ok(out)
    }

    /// What endpoint `ep` reading `len` bytes at `iova` gets: `None` if any byte is not
    /// mapped readable in the domain `ep` is attached to (unattached endpoints reach nothing).
    pub fn dma_read(&self, ep: u32, iova: Iova, len: u64) -> Option<Vec<u8>> {
        let mut out = vec![0u8; len as usize];
        self.read_into(ep, iova, &mut out).ok()?;
        Some(out)
    }

    /// Translates `len` bytes at `iova` for `ep` and runs `each(machine, pa, offset, n)` on
    /// every physically contiguous piece; a piece the machine refuses (or a machine gone) is
    /// a `NoMemory` fault at its IOVA.
    fn pieces(
        &self,
        ep: u32,
        iova: Iova,
        len: usize,
        write: bool,
        mut each: impl FnMut(&HostPlatform, PhysAddr, usize, usize) -> bool,
    ) -> Result<(), DmaFault> {
        let pieces = self.translate(ep, iova, len as u64, write)?;
        let m = self.m.upgrade();
        let mut at = 0usize;
        for (pa, n) in pieces {
            if !m.as_ref().is_some_and(|m| each(m, pa, at, n as usize)) {
                let reason = FaultReason::NoMemory { pa: pa.raw() };
                let iova = Iova::new(iova.raw() + at as u64);
                return Err(DmaFault { device: ep as DeviceId, iova, write, reason });
            }
            at += n as usize;
        }
        Ok(())
    }

    fn read_into(&self, ep: u32, iova: Iova, buf: &mut [u8]) -> Result<(), DmaFault> {
        self.pieces(ep, iova, buf.len(), false, |m, pa, at, n| m.read_phys(pa, &mut buf[at..at + n]).is_ok())
    }

    fn write_from(&self, ep: u32, iova: Iova, data: &[u8]) -> Result<(), DmaFault> {
        self.pieces(ep, iova, data.len(), true, |m, pa, at, n| m.write_phys(pa, &data[at..at + n]).is_ok())
    }

    /// From now on, every UNMAP fails (`true`: status INVAL, the range stays mapped) or
    /// executes (`false`).
    pub fn fail_unmaps(&self, on: bool) {
        self.st.lock().unwrap().fail_unmaps = on;
    }

    /// Requests executed so far of wire type `t` (1 ATTACH, 2 DETACH, 3 MAP, 4 UNMAP).
    pub fn requests(&self, t: usize) -> u64 {
        self.st.lock().unwrap().requests[t]
    }

    fn common_read(st: &State, off: u64) -> u32 {
        let q = st.queues.get(st.queue_sel as usize).copied().unwrap_or_default();
        match off {
            0x00 => st.dev_feature_sel,
            0x04 => (FEATURES >> (32 * st.dev_feature_sel.min(1))) as u32 * u32::from(st.dev_feature_sel < 2),
            0x08 => st.drv_feature_sel,
            0x0c => (st.driver_features >> (32 * st.drv_feature_sel.min(1))) as u32,
            0x10 => (QUEUES as u32) << 16,
            0x14 => u32::from(st.status) | (u32::from(st.queue_sel) << 16),
            0x18 => {
                let max = if (st.queue_sel as usize) < QUEUES { QUEUE_MAX } else { 0 };
                u32::from(if q.size == 0 { max } else { q.size })
            }
            // queue_enable; queue_notify_off 0 (every queue notifies at the structure's start).
            0x1c => u32::from(q.enabled),
            0x20 => q.desc as u32,
            0x24 => (q.desc >> 32) as u32,
            0x28 => q.driver as u32,
            0x2c => (q.driver >> 32) as u32,
            0x30 => q.device as u32,
            0x34 => (q.device >> 32) as u32,
            _ => 0,
        }
    }

    fn common_write(st: &mut State, off: u64, v: u32) {
        let sel = st.queue_sel as usize;
        let set_half = |x: &mut u64, high: bool| {
            *x = if high {
                (*x & 0xffff_ffff) | (u64::from(v) << 32)
            } else {
                (*x & !0xffff_ffff) | u64::from(v)
            }
        };
        match off {
            0x00 => st.dev_feature_sel = v,
            0x08 => st.drv_feature_sel = v,
            0x0c => {
                let mut f = st.driver_features;
                set_half(&mut f, st.drv_feature_sel == 1);
                st.driver_features = f;
            }
            0x14 => {
                let status = v as u8;
                if status == 0 {
                    // Reset: queues, features and status forgotten; the translation state
                    // (attached endpoints, mappings) kept, as the model's simplest reading.
                    let (attached, domains, requests) =
                        (std::mem::take(&mut st.attached), std::mem::take(&mut st.domains), st.requests);
                    *st = State { attached, domains, requests, ..State::default() };
                } else if status & 8 != 0 && st.driver_features & !FEATURES != 0 {
                    st.status = status & !8;
                } else {
                    st.status = status;
                }
                st.queue_sel = (v >> 16) as u16;
            }
            _ => {}
        }
        let Some(q) = st.queues.get_mut(sel) else { return };
        match off {
            0x18 => q.size = v as u16,
            0x1c => q.enabled = v & 0xffff != 0,
            0x20 | 0x24 => set_half(&mut q.desc, off == 0x24),
            0x28 | 0x2c => set_half(&mut q.driver, off == 0x2c),
            0x30 | 0x34 => set_half(&mut q.device, off == 0x34),
            _ => {}
        }
    }

    fn device_read(st: &State, off: u64) -> u32 {
        let page_sizes: u64 = !0xfff;
        match off {
            0 => page_sizes as u32,
            4 => (page_sizes >> 32) as u32,
            8 | 12 => 0,
            16 => INPUT_LAST as u32,
            20 => (INPUT_LAST >> 32) as u32,
            24 => 1,
            28 => DOMAIN_LAST,
            32 => 0,
            36 => u32::from(st.bypass),
            _ => 0,
        }
    }

    /// Executes every request the driver made available on the request queue.
    fn notify(&self, st: &mut State, queue: u16) {
        let Some(m) = self.m.upgrade() else { return };
        if queue != 0 {
            return;
        }
        let q = st.queues[0];
        if !q.enabled || q.size == 0 {
            return;
        }
        let r16 = |pa: u64| {
            let mut b = [0u8; 2];
            m.read_phys(PhysAddr::new(pa), &mut b).unwrap();
            u16::from_le_bytes(b)
        };
        let avail = r16(q.driver + 2);
        let mut last = q.last_avail;
        while last != avail {
            let head = r16(q.driver + 4 + 2 * u64::from(last % q.size));
            let desc = |i: u16| {
                let mut d = [0u8; 16];
                m.read_phys(PhysAddr::new(q.desc + 16 * u64::from(i)), &mut d).unwrap();
                let addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
                let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
                let next = u16::from_le_bytes(d[14..16].try_into().unwrap());
                (addr, len, next)
            };
            let (out_at, out_len, next) = desc(head);
            let (tail_at, tail_len, _) = desc(next);
            let mut req = vec![0u8; out_len as usize];
            m.read_phys(PhysAddr::new(out_at), &mut req).unwrap();
            let status = Self::execute(st, &req);
            m.write_phys(PhysAddr::new(tail_at + u64::from(tail_len) - 4), &[status, 0, 0, 0]).unwrap();
            // Used ring: the element, then the index.
            let used_idx = r16(q.device + 2);
            let slot = q.device + 4 + 8 * u64::from(used_idx % q.size);
            let mut e = [0u8; 8];
            e[0..4].copy_from_slice(&u32::from(head).to_le_bytes());
            e[4..8].copy_from_slice(&tail_len.to_le_bytes());
            m.write_phys(PhysAddr::new(slot), &e).unwrap();
            m.write_phys(PhysAddr::new(q.device + 2), &used_idx.wrapping_add(1).to_le_bytes()).unwrap();
            last = last.wrapping_add(1);
        }
        st.queues[0].last_avail = last;
    }

    fn execute(st: &mut State, req: &[u8]) -> u8 {
        let u32_at = |o: usize| req.get(o..o + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
        let u64_at = |o: usize| req.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
        let t = req.first().copied().unwrap_or(0);
        if let Some(n) = st.requests.get_mut(t as usize) {
            *n += 1;
        }
        let Some(domain) = u32_at(4) else { return S_INVAL };
        match t {
            1 | 2 => {
                let Some(ep) = u32_at(8) else { return S_INVAL };
                if t == 1 {
                    if domain == 0 || domain > DOMAIN_LAST {
                        return S_RANGE;
                    }
                    st.domains.entry(domain).or_default();
                    st.attached.insert(ep, domain);
                } else if st.attached.get(&ep) == Some(&domain) {
                    st.attached.remove(&ep);
                    if !st.attached.values().any(|&d| d == domain) {
                        st.domains.remove(&domain);
                    }
                } else {
                    return S_INVAL;
                }
                S_OK
            }
            3 => {
                let (Some(first), Some(last), Some(pa), Some(flags)) =
                    (u64_at(8), u64_at(16), u64_at(24), u32_at(32))
                else {
                    return S_INVAL;
                };
                let Some(maps) = st.domains.get_mut(&domain) else { return S_NOENT };
                if last < first || last > INPUT_LAST {
                    return S_RANGE;
                }
                if maps.range(..=last).next_back().is_some_and(|(_, &(l, _, _))| l >= first) {
                    return S_INVAL;
                }
                maps.insert(first, (last, pa, flags));
                S_OK
            }
            4 if st.fail_unmaps => S_INVAL,
            4 => {
                let (Some(first), Some(last)) = (u64_at(8), u64_at(16)) else { return S_INVAL };
                let Some(maps) = st.domains.get_mut(&domain) else { return S_NOENT };
                // A mapping only partly inside the range cannot be split (5.13.6.5).
                let hit: Vec<(u64, u64)> = maps
                    .iter()
                    .filter(|&(&f, &(l, _, _))| f <= last && l >= first)
                    .map(|(&f, &(l, _, _))| (f, l))
                    .collect();
                if hit.iter().any(|&(f, l)| f < first || l > last) {
                    return S_RANGE;
                }
                for (f, _) in hit {
                    maps.remove(&f);
                }
                S_OK
            }
            _ => S_INVAL,
        }
    }
}

/// An endpoint's DMA behind a [`ModelViommu`] ([`ModelViommu::port`]): each access translated
/// when it happens, refused whole if any byte is not mapped for it (nothing is written then).
#[derive(Clone)]
pub struct ViommuPort {
    unit: Arc<ModelViommu>,
    ep: u32,
}

impl DmaPort for ViommuPort {
    fn dma_read(&self, bus: Iova, buf: &mut [u8]) -> Result<(), DmaFault> {
        self.unit.read_into(self.ep, bus, buf)
    }

    fn dma_write(&self, bus: Iova, data: &[u8]) -> Result<(), DmaFault> {
        self.unit.write_from(self.ep, bus, data)
    }
}

/// The registers, shared with whoever keeps the device (its tests, its ports).
impl MmioHandler for Arc<ModelViommu> {
    fn read(&self, offset: u64, size: u8) -> u64 {
        (**self).read(offset, size)
    }

    fn write(&self, offset: u64, size: u8, value: u64) {
        (**self).write(offset, size, value)
    }
}

impl MmioHandler for ModelViommu {
    fn read(&self, offset: u64, size: u8) -> u64 {
        let st = self.st.lock().unwrap();
        let word = |o: u64| match o {
            o if o < NOTIFY => u64::from(Self::common_read(&st, o - COMMON)),
            o if (DEVICE..BAR_LEN).contains(&o) => u64::from(Self::device_read(&st, o - DEVICE)),
            _ => 0,
        };
        if size == 8 { word(offset) | (word(offset + 4) << 32) } else { word(offset) }
    }

    fn write(&self, offset: u64, _size: u8, value: u64) {
        let mut st = self.st.lock().unwrap();
        match offset {
            o if o < NOTIFY => Self::common_write(&mut st, o - COMMON, value as u32),
            o if o < DEVICE => self.notify(&mut st, value as u16),
            o if o == DEVICE + 36 => st.bypass = value as u8,
            _ => {}
        }
    }
}

/// The function's configuration space: the capability list naming the three structures in
/// BAR 0 (a 32-bit memory BAR at `bar`).
pub struct ModelConfig {
    /// Where BAR 0 sits (a 32-bit memory BAR).
    pub bar: u32,
}

impl busdma::virtio_iommu::ConfigSpace for ModelConfig {
    fn read32(&self, offset: u8) -> u32 {
        // vendor cap: id 9, next, length, cfg_type | bar | offset | length | (notify) multiplier
        let cap = |next: u32, len: u32, cfg: u32| 0x09 | (next << 8) | (len << 16) | (cfg << 24);
        match offset {
            0x04 => 1 << 20,
            0x10 => self.bar,
            0x34 => 0x40,
            0x40 => cap(0x54, 16, 1),
            0x44 | 0x58 | 0x6c => 0,
            0x48 => COMMON as u32,
            0x4c => 0x38,
            0x54 => cap(0x68, 20, 2),
            0x5c => NOTIFY as u32,
            0x60 => 4,
            0x64 => 0,
            0x68 => cap(0, 16, 4),
            0x70 => DEVICE as u32,
            0x74 => 0x100,
            _ => 0,
        }
    }
}

/// Where [`on_machine`] puts the model's BAR 0 (above the 64 MiB of RAM at 16 MiB).
pub const BAR: u64 = 0xf000_0000;

/// A model virtio-iommu on `m`'s MMIO at [`BAR`], initialised by busdma's driver with the
/// machine's quick maps `qm` (tests' set-up: panics on failure).
pub fn on_machine<'m>(
    m: &'m Arc<HostPlatform>,
    qm: &'m busdma::quickmap::QuickMaps,
) -> (Arc<ModelViommu>, busdma::virtio_iommu::VirtioIommu<'m, HostPlatform>) {
    let dev = ModelViommu::install(m, BAR).unwrap();
    // SAFETY: the model function was just placed at BAR on this machine and stays there;
    // nothing else drives it.
    let unit = unsafe { busdma::virtio_iommu::VirtioIommu::new(&**m, qm, &ModelConfig { bar: BAR as u32 }) }
        .unwrap();
    (dev, unit)
}
