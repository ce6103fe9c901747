//! A minimal modern virtio-pci transport (virtio 1.2, section 4.1): the vendor capabilities
//! that locate the common, notify and device configuration structures in a BAR, feature
//! negotiation, device status, and queue setup. Every register access goes through the
//! platform's MMIO; PCI configuration space comes from the caller ([`ConfigSpace`]).
#![allow(unsafe_code)] // MMIO through the platform seam

use crate::addr::PhysAddr;
use crate::error::{Error, Result};
use crate::platform::Platform;

/// Read access to a PCI function's configuration space (the first 256 bytes).
pub trait ConfigSpace {
    /// The dword at `offset` (4-aligned).
    fn read32(&self, offset: u8) -> u32;
}

/// Device status bits.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The driver gave up.
    pub const FAILED: u8 = 128;
}

/// Common configuration offsets.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// Vendor-specific capability id, and the virtio structure types.
const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_DEVICE: u8 = 4;

/// Why 1 million polls for a reset: QEMU completes a reset synchronously (the first read
/// sees 0); a device that is still not reset after a million register reads is broken.
const RESET_POLLS: u32 = 1_000_000;

/// A virtio-pci function's register structures, located.
pub struct VirtioPci<'p, P: Platform> {
    platform: &'p P,
    common: PhysAddr,
    notify: PhysAddr,
    notify_multiplier: u32,
    device: PhysAddr,
}

/// A queue as the device was told about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLayout {
    /// Descriptor table.
    pub desc: PhysAddr,
    /// Driver (available) ring.
    pub driver: PhysAddr,
    /// Device (used) ring.
    pub device: PhysAddr,
    /// Entries (a power of two, at most what the device offered).
    pub size: u16,
}

impl<'p, P: Platform> VirtioPci<'p, P> {
    /// Locates the structures of the function whose configuration space `cfg` reads. Memory
    /// decoding and bus mastering must be enabled and its BARs assigned.
    ///
    /// Errors: [`Error::Unsupported`] when a structure is missing or sits in an I/O BAR.
    ///
    /// # Safety
    ///
    /// `cfg` reads the configuration space of a virtio-pci function the caller owns, whose
    /// BARs stay where they are (and are mapped for the platform's MMIO) for the transport's
    /// life; nothing else drives the function meanwhile.
    pub unsafe fn new(platform: &'p P, cfg: &impl ConfigSpace) -> Result<Self> {
        const STATUS_CAP_LIST: u32 = 1 << 20;
        if cfg.read32(0x04) & STATUS_CAP_LIST == 0 {
            return Err(Error::Unsupported { what: "virtio-pci function without capabilities" });
        }
        let (mut common, mut notify, mut device) = (None, None, None);
        let mut multiplier = 0;
        let mut at = (cfg.read32(0x34) & 0xfc) as u8;
        // Why 48: a type-0 header leaves 192 bytes for capabilities, at least 4 each.
        for _ in 0..48 {
            if at == 0 {
                break;
            }
            let w0 = cfg.read32(at);
            let next = ((w0 >> 8) & 0xfc) as u8;
            if w0 as u8 == CAP_VENDOR {
                let cfg_type = (w0 >> 24) as u8;
                let bar = cfg.read32(at + 4) as u8;
                let offset = u64::from(cfg.read32(at + 8));
                let base = || bar_base(cfg, bar).map(|b| b + offset);
                match cfg_type {
                    CFG_COMMON if common.is_none() => common = Some(base()?),
                    CFG_NOTIFY if notify.is_none() => {
                        notify = Some(base()?);
                        multiplier = cfg.read32(at + 16);
                    }
                    CFG_DEVICE if device.is_none() => device = Some(base()?),
                    _ => {}
                }
            }
            at = next;
        }
        match (common, notify, device) {
            (Some(c), Some(n), Some(d)) => Ok(Self {
                platform,
                common: PhysAddr::new(c),
                notify: PhysAddr::new(n),
                notify_multiplier: multiplier,
                device: PhysAddr::new(d),
            }),
            _ => Err(Error::Unsupported {
                what: "virtio-pci function lacks common, notify or device structures",
            }),
        }
    }

    fn reg(base: PhysAddr, off: u64) -> PhysAddr {
        PhysAddr::new(base.raw() + off)
    }

    fn r16(&self, off: u64) -> u16 {
        // SAFETY: a register of the common structure of the function we own (`new`'s contract).
        unsafe { self.platform.mmio_read16(Self::reg(self.common, off)) }
    }

    fn w16(&self, off: u64, v: u16) {
        // SAFETY: as in `r16`.
        unsafe { self.platform.mmio_write16(Self::reg(self.common, off), v) }
    }

    fn r32(&self, off: u64) -> u32 {
        // SAFETY: as in `r16`.
        unsafe { self.platform.mmio_read32(Self::reg(self.common, off)) }
    }

    fn w32(&self, off: u64, v: u32) {
        // SAFETY: as in `r16`.
        unsafe { self.platform.mmio_write32(Self::reg(self.common, off), v) }
    }

    fn w64(&self, off: u64, v: u64) {
        // Two dword writes, low first: the common structure's 64-bit fields need not accept
        // 64-bit accesses.
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }

    /// The device status.
    pub fn status(&self) -> u8 {
        // SAFETY: as in `r16`.
        unsafe { self.platform.mmio_read8(Self::reg(self.common, DEVICE_STATUS)) }
    }

    /// Sets the device status.
    pub fn set_status(&self, s: u8) {
        // SAFETY: as in `r16`.
        unsafe { self.platform.mmio_write8(Self::reg(self.common, DEVICE_STATUS), s) }
    }

    /// Resets the device and waits for the reset to complete: afterwards it uses no queue
    /// memory the driver gave it.
    ///
    /// Errors: [`Error::BadState`] if it never reads back 0.
    pub fn reset(&self) -> Result<()> {
        self.set_status(0);
        for _ in 0..RESET_POLLS {
            if self.status() == 0 {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(Error::BadState { what: "virtio device did not complete its reset" })
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&self) -> u64 {
        self.w32(DEVICE_FEATURE_SELECT, 0);
        let lo = self.r32(DEVICE_FEATURE);
        self.w32(DEVICE_FEATURE_SELECT, 1);
        let hi = self.r32(DEVICE_FEATURE);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// Writes the features the driver accepts.
    pub fn set_driver_features(&self, f: u64) {
        self.w32(DRIVER_FEATURE_SELECT, 0);
        self.w32(DRIVER_FEATURE, f as u32);
        self.w32(DRIVER_FEATURE_SELECT, 1);
        self.w32(DRIVER_FEATURE, (f >> 32) as u32);
    }

    /// How many queues the device has.
    pub fn num_queues(&self) -> u16 {
        self.r16(NUM_QUEUES)
    }

    /// The largest size the device offers for queue `q` (0: no such queue).
    pub fn max_queue_size(&self, q: u16) -> u16 {
        self.w16(QUEUE_SELECT, q);
        self.r16(QUEUE_SIZE)
    }

    /// Tells the device where queue `q` lives, enables it, and returns its notification
    /// address.
    ///
    /// # Safety
    ///
    /// The three areas of `layout` are memory the caller owns, laid out as a split queue of
    /// `layout.size` entries, that stay allocated until the device is reset.
    pub unsafe fn setup_queue(&self, q: u16, layout: &QueueLayout) -> PhysAddr {
        self.w16(QUEUE_SELECT, q);
        self.w16(QUEUE_SIZE, layout.size);
        self.w64(QUEUE_DESC, layout.desc.raw());
        self.w64(QUEUE_DRIVER, layout.driver.raw());
        self.w64(QUEUE_DEVICE, layout.device.raw());
        let off = u64::from(self.r16(QUEUE_NOTIFY_OFF));
        self.w16(QUEUE_ENABLE, 1);
        PhysAddr::new(self.notify.raw() + off * u64::from(self.notify_multiplier))
    }

    /// Notifies the device that queue `q` (whose notification address is `at`) has new
    /// buffers.
    pub fn notify(&self, at: PhysAddr, q: u16) {
        self.platform.mb();
        // SAFETY: `at` came from `setup_queue` of this function: its notify structure.
        unsafe { self.platform.mmio_write16(at, q) }
    }

    /// A 32-bit field of the device configuration.
    pub fn device_read32(&self, off: u64) -> u32 {
        // SAFETY: the device structure of the function we own.
        unsafe { self.platform.mmio_read32(Self::reg(self.device, off)) }
    }

    /// A 64-bit field of the device configuration (two dword reads, low first).
    pub fn device_read64(&self, off: u64) -> u64 {
        u64::from(self.device_read32(off)) | (u64::from(self.device_read32(off + 4)) << 32)
    }

    /// Writes an 8-bit field of the device configuration.
    pub fn device_write8(&self, off: u64, v: u8) {
        // SAFETY: the device structure of the function we own.
        unsafe { self.platform.mmio_write8(Self::reg(self.device, off), v) }
    }

    /// Reads an 8-bit field of the device configuration.
    pub fn device_read8(&self, off: u64) -> u8 {
        // SAFETY: the device structure of the function we own.
        unsafe { self.platform.mmio_read8(Self::reg(self.device, off)) }
    }
}

/// The memory address BAR `bar` decodes.
fn bar_base(cfg: &impl ConfigSpace, bar: u8) -> Result<u64> {
    if bar > 5 {
        return Err(Error::InvalidArgument {
            what: "virtio capability names BAR > 5",
            value: u64::from(bar),
        });
    }
    let off = 0x10 + 4 * bar;
    let lo = cfg.read32(off);
    if lo & 1 != 0 {
        return Err(Error::Unsupported { what: "virtio structure in an I/O BAR" });
    }
    let mut base = u64::from(lo & !0xf);
    if (lo >> 1) & 3 == 2 {
        if bar == 5 {
            return Err(Error::InvalidArgument { what: "64-bit BAR at index 5", value: 5 });
        }
        base |= u64::from(cfg.read32(off + 4)) << 32;
    }
    if base == 0 {
        return Err(Error::BadState { what: "virtio BAR unassigned" });
    }
    Ok(base)
}
