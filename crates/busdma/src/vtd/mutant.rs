//! Mutants: the driver broken on purpose, one way each, so the QEMU suite can prove it
//! notices (`qemu/run --mutants`). Each is a Cargo feature that nothing but that check enables;
//! in every other build these are `false` and the compiler removes the branches.
#![forbid(unsafe_code)]

/// Skip the IOTLB invalidation that unmapping asks for (stale translations stay usable).
pub(crate) const SKIP_IOTLB_FLUSH: bool = cfg!(feature = "vtd-mutant-skip-iotlb-flush");
/// Write each context entry at the wrong device/function (devfn XOR 1).
pub(crate) const WRONG_DEVFN: bool = cfg!(feature = "vtd-mutant-wrong-devfn");
/// Never latch the root table pointer (no GCMD.SRTP).
pub(crate) const SKIP_SRTP: bool = cfg!(feature = "vtd-mutant-skip-srtp");
/// Build non-leaf second-level entries without their read/write bits.
pub const NONLEAF_NO_RW: bool = cfg!(feature = "vtd-mutant-nonleaf-no-rw");
