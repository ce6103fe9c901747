//! The model IOMMU behind `busdma::device`: [`IommuHw`] for [`ModelIommu`], with domain ids
//! and pass-through.
//!
//! The model's page-table format is chosen per context; `busdma::device` builds VT-d
//! second-level tables (48-bit input) for it, the format the model's VT-d walker reads.

use busdma::device::IommuHw;
use busdma::iommu::{DomainId, IotlbInvalidator};
use busdma::pgtable::VtdSl;
use busdma::{Error, PhysAddr, Result};

use super::{Context, ModelIommu, TableFormat, lock};
use crate::HostPlatform;
use crate::dma::DeviceId;

/// Input width of the tables `busdma::device` builds for the model: 48 bits (4 levels), the
/// width VT-d units offer when they can.
pub const DEVICE_INPUT_BITS: u32 = 48;

/// Domain ids in use, one bit each (ids 1..=65535; 0 is never handed out, as on VT-d with
/// caching mode).
pub(super) struct DomainIds {
    used: Vec<u64>,
}

impl Default for DomainIds {
    fn default() -> Self {
        let mut used = vec![0u64; (1 << 16) / 64];
        used[0] = 1; // id 0
        Self { used }
    }
}

impl ModelIommu<'_> {
    /// Lets `device` reach physical memory untranslated (VT-d pass-through, SMMU bypass):
    /// what `busdma::device`'s bypass policy asks for.
    ///
    /// Errors: [`Error::AlreadyMapped`] if the device is attached or passed through already.
    pub fn attach_passthrough(&self, device: DeviceId) -> Result<()> {
        let c = self.contexts.write().unwrap_or_else(|e| e.into_inner());
        let mut pt = lock(&self.passthrough);
        if c.contains_key(&device) || !pt.insert(device) {
            return Err(Error::AlreadyMapped { addr: device.into() });
        }
        Ok(())
    }

    /// Ends the pass-through of `device`.
    ///
    /// Errors: [`Error::NotMapped`] if it is not passed through.
    pub fn detach_passthrough(&self, device: DeviceId) -> Result<()> {
        if lock(&self.passthrough).remove(&device) {
            Ok(())
        } else {
            Err(Error::NotMapped { addr: device.into() })
        }
    }

    /// Domain ids handed out and not given back.
    pub fn domain_ids_in_use(&self) -> u32 {
        lock(&self.domain_ids).used.iter().map(|w| w.count_ones()).sum::<u32>() - 1
    }
}

// SAFETY: the model walks VT-d second-level tables of `DEVICE_INPUT_BITS` for the contexts
// `attach_tables` installs and refuses IOVA beyond them (`translate_page`); its walker reads
// RAM directly (coherent); `platform` is the one it was built on; the id bitmap hands out an
// id once until it is freed; `detach` removes the context (translations stop at once, the
// context cache being updated under the lock) and then drops every IOTLB entry of the domain
// before returning; its invalidations complete before they return.
unsafe impl<'m> IommuHw for ModelIommu<'m> {
    type Platform = HostPlatform;
    type Format = VtdSl;
    type DeviceId = DeviceId;

    fn platform(&self) -> &HostPlatform {
        self.platform
    }

    fn input_bits(&self) -> u32 {
        DEVICE_INPUT_BITS
    }

    fn coherent_walker(&self) -> bool {
        true
    }

    fn alloc_domain_id(&self) -> Result<DomainId> {
        let mut ids = lock(&self.domain_ids);
        for (w, word) in ids.used.iter_mut().enumerate() {
            if *word != u64::MAX {
                let b = word.trailing_ones();
                *word |= 1 << b;
                return Ok((w * 64) as u16 + b as u16);
            }
        }
        Err(Error::Exhausted { size: 1, limit: 1 << 16 })
    }

    fn free_domain_id(&self, id: DomainId) {
        let mut ids = lock(&self.domain_ids);
        if id != 0 {
            ids.used[usize::from(id) / 64] &= !(1 << (id % 64));
        }
    }

    unsafe fn attach_tables(&self, dev: DeviceId, domain: DomainId, root: PhysAddr) -> Result<()> {
        let ctx = Context::new(domain, root, TableFormat::VtdSecondLevel, DEVICE_INPUT_BITS);
        // SAFETY: the caller's contract is `attach`'s.
        unsafe { self.attach(dev, ctx) }
    }

    fn attach_bypass(&self, dev: DeviceId) -> Result<()> {
        self.attach_passthrough(dev)
    }

    fn detach(&self, dev: DeviceId, domain: Option<DomainId>) -> Result<()> {
        match domain {
            None => self.detach_passthrough(dev),
            Some(d) => {
                let ctx = ModelIommu::detach(self, dev)?;
                if ctx.domain != d {
                    // Attached to another domain than the caller thinks: invalidate both.
                    self.invalidate_all(ctx.domain)?;
                }
                self.invalidate_all(d)
            }
        }
    }
}
