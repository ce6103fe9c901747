//! [`DmaDevice`]: what a driver holds for its device, whatever IOMMU is behind it (module
//! theory 8).
#![forbid(unsafe_code)]

use core::fmt::Debug;

use crate::error::{Error, Result};
use crate::front::strategy::{Strategy, WindowSource};
use crate::front::{Tag, TagSpec};
use crate::platform::Platform;

use super::Policy;

/// An attached device as a driver uses it: tags for its constraints, its policy, its id, and
/// the detach. Implemented by [`super::Device`] (VT-d, SMMUv3, the model IOMMU: any
/// [`super::IommuHw`]) and by [`super::ViommuDevice`] (virtio-iommu), so a driver written as
/// `fn probe<'a, D: DmaDevice<'a>>(dev: D)` runs unchanged behind each.
///
/// `'a` is how long the device's tags may live: the borrow of the IOMMU the device was
/// attached on. Every tag holds the device's attachment (module theory 2): the domain stays
/// attached until the last handle, tag and map are gone, whatever order they drop in.
///
/// A safe trait: busdma trusts nothing it answers. The tags it returns are built by
/// [`Tag::new_root`] over strategies whose own contracts hold (`IommuOps` is the `unsafe
/// trait` underneath), so a wrong answer here can give a driver a tag of the wrong device,
/// never a device reach into memory Rust may reuse.
pub trait DmaDevice<'a>: Sized {
    /// The platform the device's memory lives on.
    type Platform: Platform + 'a;
    /// The strategy of the device's tags (one type for every policy of the device's IOMMU);
    /// it lends its domain to two-step windows where the policy has one.
    type Strategy: Strategy<Self::Platform> + WindowSource<Self::Platform> + 'a;
    /// How the IOMMU names the device (a PCI requester id, a stream id, an endpoint id).
    type DeviceId: Copy + Eq + Debug;

    /// The platform.
    fn platform(&self) -> &'a Self::Platform;

    /// The device's id on its IOMMU.
    fn id(&self) -> Self::DeviceId;

    /// The policy the device was attached with.
    fn policy(&self) -> Policy;

    /// A root tag for the device's constraints `spec`, served by its attachment. An untrusted
    /// device's tags are always untrusted.
    ///
    /// Errors: those of [`Tag::new_root`] (an invalid spec, a mask the domain cannot serve).
    fn tag(&self, spec: TagSpec) -> Result<Tag<'a, Self::Platform, Self::Strategy>>;

    /// Detaches the device now, reporting failure (otherwise the last handle's drop does it,
    /// and a failure there is counted, never reported).
    ///
    /// Errors: [`DetachError::Busy`] (tags or maps alive: the device handed back, still
    /// attached); [`DetachError::Failed`] (the IOMMU's error: what might still be reachable
    /// is leaked, never reused).
    fn detach(self) -> core::result::Result<(), DetachError<Self>>;
}

/// Why a [`DmaDevice::detach`] did not complete.
pub enum DetachError<D> {
    /// Tags or maps of the device are alive (`handles` of them): the device, still attached.
    Busy {
        /// The device, handed back.
        device: D,
        /// Live handles other than the device.
        handles: usize,
    },
    /// The IOMMU's detach, invalidation or UNMAP failed: the domain is leaked.
    Failed(Error),
}

impl<'a, D: DmaDevice<'a>> Debug for DetachError<D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DetachError::Busy { device, handles } => {
                f.debug_struct("Busy").field("device", &device.id()).field("handles", handles).finish()
            }
            DetachError::Failed(e) => f.debug_tuple("Failed").field(e).finish(),
        }
    }
}
