//! Mutants of the virtio-iommu driver, as in `crate::vtd`'s mutant module: each is
//! `--cfg busdma_mutant="NAME"`, passed only by `qemu/run --mutants`; in every other build
//! these are `false` and the branches vanish. Private: nothing here is API.
#![forbid(unsafe_code)]

/// Never send UNMAP: an unmapped range stays reachable by the device.
pub(crate) const SKIP_UNMAP: bool = cfg!(busdma_mutant = "viommu-skip-unmap");
/// MAP the physical range one granule past the one asked for.
pub(crate) const WRONG_RANGE: bool = cfg!(busdma_mutant = "viommu-wrong-range");
/// Ignore the endpoint's reserved regions (PROBE): neither kept out of the IOVA space nor
/// refused to fixed mappings.
pub(crate) const IGNORE_RESERVED: bool = cfg!(busdma_mutant = "viommu-ignore-reserved");
/// No guard page after an untrusted domain's allocations: a device running off the end of one
/// load reaches the next.
pub(crate) const NO_GUARD: bool = cfg!(busdma_mutant = "viommu-no-guard");
