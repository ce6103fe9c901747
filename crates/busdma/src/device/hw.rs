//! The hardware side of a device attachment: what an IOMMU driver must provide.
#![allow(unsafe_code)] // the trust boundary: an `unsafe trait` with an `unsafe fn`.

use core::fmt::Debug;

use crate::addr::PhysAddr;
use crate::error::Result;
use crate::iommu::{DomainId, IotlbInvalidator};
use crate::pgtable::PteFormat;
use crate::platform::Platform;

/// An IOMMU as [`super::Iommu`] drives it: its page-table format and input width, its
/// domain ids, and attaching and detaching a device's context. Its invalidation commands are
/// the supertrait's.
///
/// # Safety
///
/// busdma trusts every answer (module theory 6). An implementation guarantees:
/// - [`IommuHw::Format`] and [`IommuHw::input_bits`] are the format and input width the
///   hardware walks for a context attached by [`IommuHw::attach_tables`]; every IOVA at or
///   above `2^input_bits` is refused by the hardware.
/// - [`IommuHw::platform`] returns the platform whose memory the hardware reads, the same
///   value every time.
/// - [`IommuHw::alloc_domain_id`] returns an id no other live domain of this IOMMU uses (and
///   no cached translation is tagged with), until it is given back by
///   [`IommuHw::free_domain_id`].
/// - [`IommuHw::attach_tables`] makes the device reach memory only through the tables at
///   `root`, tagging what it caches with `domain`; [`IommuHw::attach_bypass`] makes it reach
///   physical memory untranslated.
/// - When [`IommuHw::detach`] returns `Ok`, the device's requests are blocked, and no cache
///   of the IOMMU holds the device's context or any translation (or paging-structure entry)
///   of `domain` cached before the call.
/// - The [`IotlbInvalidator`] commands are complete when they return `Ok`.
pub unsafe trait IommuHw: IotlbInvalidator + Sync {
    /// The platform the IOMMU's tables live on.
    type Platform: Platform;
    /// The page-table format the hardware walks.
    type Format: PteFormat;
    /// How the IOMMU names a device (a PCI requester id, a stream id, the model's number).
    type DeviceId: Copy + Eq + Debug + Send + Sync;

    /// The platform whose memory the IOMMU reads.
    fn platform(&self) -> &Self::Platform;

    /// Input (IOVA) width of the tables the hardware walks, in bits (39 or 48 on VT-d).
    fn input_bits(&self) -> u32;

    /// Whether the hardware's table walker snoops CPU caches (VT-d ECAP.C); when not, page
    /// tables clean each update to memory.
    fn coherent_walker(&self) -> bool;

    /// A domain id no live domain uses.
    ///
    /// Errors: [`crate::Error::Exhausted`] when every id is taken.
    fn alloc_domain_id(&self) -> Result<DomainId>;

    /// Gives `id` back: no context names it and no cache holds a translation tagged with it.
    fn free_domain_id(&self, id: DomainId);

    /// Points `dev` at the tables rooted at `root` (format [`IommuHw::Format`], width
    /// [`IommuHw::input_bits`]), tagged `domain`, and invalidates whatever the hardware may
    /// have cached for `dev` or `domain` before.
    ///
    /// Errors: the driver's: [`crate::Error::AlreadyMapped`] if `dev` is attached already,
    /// an invalid `root` or `domain`, a failed invalidation.
    ///
    /// # Safety
    ///
    /// The tables at `root` must stay allocated, and be written only by the owner of the
    /// domain's page table, until `dev` is detached and that detach (its invalidation
    /// included) has returned `Ok`.
    unsafe fn attach_tables(&self, dev: Self::DeviceId, domain: DomainId, root: PhysAddr) -> Result<()>;

    /// Lets `dev` reach physical memory untranslated (pass-through).
    ///
    /// Errors: [`crate::Error::Unsupported`] if the hardware cannot pass devices through;
    /// [`crate::Error::AlreadyMapped`] if `dev` is attached already.
    fn attach_bypass(&self, dev: Self::DeviceId) -> Result<()>;

    /// Removes `dev`'s context and invalidates what the IOMMU cached for it, and every
    /// translation of `domain` (if it had one); complete when it returns `Ok`.
    ///
    /// Errors: [`crate::Error::NotMapped`] (not attached), [`crate::Error::InvalidationFailed`]
    /// or the driver's own: the device may then still reach the domain's tables.
    fn detach(&self, dev: Self::DeviceId, domain: Option<DomainId>) -> Result<()>;
}
