//! Device DMA: the port a model device reads and writes memory through, and the port of a
//! device without an IOMMU.
//!
//! # Theory
//!
//! 1. **A device sees bus addresses.** A model device holds a [`DmaPort`] and issues reads and
//!    writes by bus address ([`Iova`]); what the address reaches is the port's business. A
//!    [`DirectPort`] is a device wired straight to memory (bus address = physical address), an
//!    `IommuPort` (from [`crate::ModelIommu::port`]) one behind the model IOMMU.
//! 2. **A refused access is a [`DmaFault`]**, never a panic: the device id, the bus address of
//!    the first byte refused, the direction and why. Bytes before that page have been
//!    transferred, as a real DMA engine aborts mid-transfer.
//! 3. **DMA masks.** A device with `dma_bits` address lines cannot emit an address at or above
//!    `2^dma_bits`: a 28-bit device (QEMU's edu) reaches only the first 256 MiB of the bus.
//!    That is the whole reason bounce buffers exist, so the direct port enforces it.
//! 4. Memory is reached through [`Platform::read_phys`] / [`Platform::write_phys`], copies of
//!    raw memory; never through references.
#![forbid(unsafe_code)]

use core::fmt;

use busdma::{Iova, PhysAddr, Platform};

use crate::HostPlatform;

/// A device's identity on the bus: a PCI requester id (bus:device.function) or an SMMU
/// stream id.
pub type DeviceId = u32;

/// Why an access was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultReason {
    /// The address needs more address lines than the device has (its DMA mask).
    BeyondDmaMask {
        /// The device's address width.
        dma_bits: u32,
    },
    /// The address reaches no RAM (a bus error / master abort).
    NoMemory {
        /// The physical address that reached nothing.
        pa: u64,
    },
    /// The IOMMU has no context for the device (it is attached to no domain).
    NotAttached,
    /// The IOVA is at or above the domain's input-address width.
    BeyondInputWidth {
        /// The domain's input width in bits.
        input_bits: u32,
    },
    /// A table entry on the walk is not present (translation fault).
    NotPresent {
        /// Table level of the entry: 0 is the root table.
        level: u32,
    },
    /// A table entry sets bits the format reserves, or uses an encoding invalid at its level
    /// (VT-d "non-zero reserved field"; Arm block descriptor at level 0 or 3).
    Reserved {
        /// Table level of the entry: 0 is the root table.
        level: u32,
        /// The entry.
        entry: u64,
    },
    /// A table entry holds an output address wider than the IOMMU's output width (Arm
    /// "address size fault").
    AddressSize {
        /// Table level of the entry.
        level: u32,
        /// The entry.
        entry: u64,
    },
    /// A table or leaf lies outside RAM: the walker's read failed.
    TableOutsideRam {
        /// The physical address of the entry it tried to read.
        pa: u64,
    },
    /// Arm leaf with the access flag clear (no hardware update of the flag).
    AccessFlag {
        /// Table level of the entry.
        level: u32,
    },
    /// The translation exists but does not allow this direction (or this privilege).
    Permission,
    /// No mapping covers the address (a request-level IOMMU, virtio-iommu: no table to walk).
    Unmapped,
}

impl fmt::Display for FaultReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FaultReason::BeyondDmaMask { dma_bits } => {
                write!(f, "beyond the device's {dma_bits}-bit DMA mask")
            }
            FaultReason::NoMemory { pa } => write!(f, "no memory at PA {pa:#x}"),
            FaultReason::NotAttached => write!(f, "device attached to no domain"),
            FaultReason::BeyondInputWidth { input_bits } => {
                write!(f, "beyond the domain's {input_bits}-bit input width")
            }
            FaultReason::NotPresent { level } => write!(f, "entry not present at level {level}"),
            FaultReason::Reserved { level, entry } => {
                write!(f, "reserved bits or encoding at level {level} (entry {entry:#x})")
            }
            FaultReason::AddressSize { level, entry } => {
                write!(f, "output address too wide at level {level} (entry {entry:#x})")
            }
            FaultReason::TableOutsideRam { pa } => write!(f, "table entry at PA {pa:#x} is outside RAM"),
            FaultReason::AccessFlag { level } => write!(f, "access flag clear at level {level}"),
            FaultReason::Permission => write!(f, "permission denied"),
            FaultReason::Unmapped => write!(f, "no mapping covers the address"),
        }
    }
}

/// A refused DMA access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DmaFault {
    /// The device that issued it.
    pub device: DeviceId,
    /// The bus address of the first byte refused.
    pub iova: Iova,
    /// True for a write to memory, false for a read.
    pub write: bool,
    /// Why.
    pub reason: FaultReason,
}

impl fmt::Display for DmaFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = if self.write { "write" } else { "read" };
        write!(f, "device {:#x} {dir} at bus address {:#x}: {}", self.device, self.iova.raw(), self.reason)
    }
}

impl std::error::Error for DmaFault {}

/// How a model device reaches memory: by bus address, through whatever sits between it and
/// RAM.
pub trait DmaPort: Send + Sync {
    /// Reads `buf.len()` bytes at bus address `bus` (memory to device).
    fn dma_read(&self, bus: Iova, buf: &mut [u8]) -> Result<(), DmaFault>;

    /// Writes `data` at bus address `bus` (device to memory).
    fn dma_write(&self, bus: Iova, data: &[u8]) -> Result<(), DmaFault>;
}

/// A device wired to memory without an IOMMU: bus address = physical address, limited to
/// `dma_bits` address lines.
#[derive(Clone, Copy)]
pub struct DirectPort<'m> {
    platform: &'m HostPlatform,
    device: DeviceId,
    dma_bits: u32,
}

impl<'m> DirectPort<'m> {
    /// A port for `device` with `dma_bits` address lines (64 or more: no limit).
    pub fn new(platform: &'m HostPlatform, device: DeviceId, dma_bits: u32) -> Self {
        Self { platform, device, dma_bits }
    }

    /// The device's address width.
    pub fn dma_bits(&self) -> u32 {
        self.dma_bits
    }

    /// Checks `[bus, bus + len)` against the mask and RAM; returns the physical address.
    fn check(&self, bus: Iova, len: usize, write: bool) -> Result<PhysAddr, DmaFault> {
        let fault =
            |iova: u64, reason| DmaFault { device: self.device, iova: Iova::new(iova), write, reason };
        let len = len as u64;
        // The first byte that needs more than `dma_bits` lines: 2^dma_bits.
        let limit = if self.dma_bits >= 64 { u64::MAX } else { 1u64 << self.dma_bits };
        if bus.raw() >= limit {
            return Err(fault(bus.raw(), FaultReason::BeyondDmaMask { dma_bits: self.dma_bits }));
        }
        if len > limit - bus.raw() {
            return Err(fault(limit, FaultReason::BeyondDmaMask { dma_bits: self.dma_bits }));
        }
        let ram = self.platform.ram();
        let pa = PhysAddr::new(bus.raw());
        if !ram.contains(pa) {
            return Err(fault(bus.raw(), FaultReason::NoMemory { pa: bus.raw() }));
        }
        if len > ram.end().raw() - pa.raw() {
            let end = ram.end().raw();
            return Err(fault(end, FaultReason::NoMemory { pa: end }));
        }
        Ok(pa)
    }
}

impl DmaPort for DirectPort<'_> {
    fn dma_read(&self, bus: Iova, buf: &mut [u8]) -> Result<(), DmaFault> {
        let pa = self.check(bus, buf.len(), false)?;
        // Checked above to lie inside RAM, so the copy cannot fail.
        self.platform.read_phys(pa, buf).map_err(|_| DmaFault {
            device: self.device,
            iova: bus,
            write: false,
            reason: FaultReason::NoMemory { pa: pa.raw() },
        })
    }

    fn dma_write(&self, bus: Iova, data: &[u8]) -> Result<(), DmaFault> {
        let pa = self.check(bus, data.len(), true)?;
        self.platform.write_phys(pa, data).map_err(|_| DmaFault {
            device: self.device,
            iova: bus,
            write: true,
            reason: FaultReason::NoMemory { pa: pa.raw() },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FrameRequest, MachineConfig};

    fn machine() -> HostPlatform {
        HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(512 << 20) }).unwrap()
    }

    #[test]
    fn a_direct_port_reaches_ram_at_its_physical_address() {
        let m = machine();
        let f = m.alloc_frames(FrameRequest::pages(2)).unwrap();
        let port = DirectPort::new(&m, 7, 64);
        port.dma_write(Iova::identity_of(f.pa()).checked_add(0xff8).unwrap(), b"0123456789abcdef").unwrap();
        let mut got = [0u8; 16];
        m.read_phys(f.pa().checked_add(0xff8).unwrap(), &mut got).unwrap();
        assert_eq!(&got, b"0123456789abcdef");
        let mut back = [0u8; 16];
        port.dma_read(Iova::identity_of(f.pa()).checked_add(0xff8).unwrap(), &mut back).unwrap();
        assert_eq!(back, got);
    }

    #[test]
    fn a_28_bit_device_cannot_reach_the_256_mib_line() {
        let m = machine();
        let port = DirectPort::new(&m, 1, 28);
        let mut b = [0u8; 8];
        // Below 2^28 (RAM starts at 16 MiB): fine.
        port.dma_read(Iova::new((1 << 28) - 8), &mut b).unwrap();
        let e = port.dma_read(Iova::new(1 << 28), &mut b).unwrap_err();
        assert_eq!(
            e,
            DmaFault {
                device: 1,
                iova: Iova::new(1 << 28),
                write: false,
                reason: FaultReason::BeyondDmaMask { dma_bits: 28 }
            }
        );
        // Straddling the line: refused at the line, nothing written past it.
        let e = port.dma_write(Iova::new((1 << 28) - 4), &b).unwrap_err();
        assert_eq!((e.iova.raw(), e.write), (1 << 28, true));
        // A 64-bit device reaches the same address.
        DirectPort::new(&m, 2, 64).dma_read(Iova::new(1 << 28), &mut b).unwrap();
    }

    #[test]
    fn bus_addresses_outside_ram_fault() {
        let m = machine();
        let port = DirectPort::new(&m, 3, 64);
        let mut b = [0u8; 8];
        assert!(matches!(
            port.dma_read(Iova::new(0x1000), &mut b).unwrap_err().reason,
            FaultReason::NoMemory { pa: 0x1000 }
        ));
        let end = m.ram().end().raw();
        let e = port.dma_read(Iova::new(end - 4), &mut b).unwrap_err();
        assert_eq!(e.reason, FaultReason::NoMemory { pa: end });
        assert!(e.to_string().contains("read"), "{e}");
    }
}
