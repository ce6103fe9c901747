//! Mutants: the driver broken on purpose, one way each, so the QEMU suite can prove it
//! notices (`qemu/run --mutants`).
//!
//! A mutant is not a Cargo feature (features are additive and public: any dependent could
//! switch one on and ship a broken driver). Each is the compiler flag
//! `--cfg busdma_mutant="NAME"`, which only `qemu/run --mutants` passes (through
//! `build.rustflags`); the values are declared in the workspace's `unexpected_cfgs` list. In
//! every other build these switches are `false` and the compiler removes the branches. This
//! module is private: nothing here is API. The one visible effect is that, in the
//! `nonleaf-no-rw` build, `super::SecondLevel` names `NonLeafNoRw` instead of `VtdSl`.
#![forbid(unsafe_code)]

#[cfg(any(test, busdma_mutant = "nonleaf-no-rw"))]
use crate::{
    addr::PhysAddr,
    error::Result,
    pgtable::{Prot, PteFormat, VtdSl},
};

/// Skip the IOTLB invalidation that unmapping asks for (stale translations stay usable).
pub(crate) const SKIP_IOTLB_FLUSH: bool = cfg!(busdma_mutant = "skip-iotlb-flush");
/// Write each context entry at the wrong device/function (devfn XOR 1).
pub(crate) const WRONG_DEVFN: bool = cfg!(busdma_mutant = "wrong-devfn");
/// Never latch the root table pointer (no GCMD.SRTP).
pub(crate) const SKIP_SRTP: bool = cfg!(busdma_mutant = "skip-srtp");
/// In caching mode, skip the invalidation that must follow a map (the unit may keep serving
/// the not-present entries it cached before).
pub(crate) const SKIP_MAP_FLUSH: bool = cfg!(busdma_mutant = "skip-map-flush");
/// Build non-leaf second-level entries without their read/write bits.
#[cfg(test)]
const NONLEAF_NO_RW: bool = cfg!(busdma_mutant = "nonleaf-no-rw");

/// The second-level format with the [`NONLEAF_NO_RW`] breakage: table (non-leaf) entries carry
/// their address but neither R nor W, so a walk stops at the first level ("not present").
/// Everything else is [`VtdSl`]'s; presence is "non-zero" so the software walker still
/// descends through the broken entries it built.
///
/// `pub` only so that the `nonleaf-no-rw` build's `SecondLevel` alias may name it; it lives in
/// this private module, so no path outside the crate reaches it, and it exists only in that
/// build and in the crate's own tests.
#[cfg(any(test, busdma_mutant = "nonleaf-no-rw"))]
#[derive(Clone, Copy, Debug, Default)]
pub struct NonLeafNoRw;

#[cfg(any(test, busdma_mutant = "nonleaf-no-rw"))]
impl PteFormat for NonLeafNoRw {
    const NAME: &'static str = "vtd-sl-mutant-nonleaf-no-rw";
    const OUTPUT_BITS: u32 = VtdSl::OUTPUT_BITS;
    const MAX_LEAF_HEIGHT: u32 = VtdSl::MAX_LEAF_HEIGHT;

    fn effective_prot(prot: Prot) -> Result<Prot> {
        VtdSl::effective_prot(prot)
    }

    fn is_present(pte: u64) -> bool {
        pte != 0
    }

    fn is_leaf(pte: u64, height: u32) -> bool {
        VtdSl::is_leaf(pte, height)
    }

    fn make_table(table: PhysAddr) -> u64 {
        // R is bit 0, W bit 1 of a second-level entry.
        VtdSl::make_table(table) & !0b11
    }

    fn make_leaf(pa: PhysAddr, prot: Prot, height: u32) -> u64 {
        VtdSl::make_leaf(pa, prot, height)
    }

    fn output(pte: u64, height: u32) -> PhysAddr {
        VtdSl::output(pte, height)
    }

    fn prot(pte: u64) -> Prot {
        VtdSl::prot(pte)
    }

    fn split_block(pte: u64, height: u32) -> u64 {
        VtdSl::split_block(pte, height)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutant_switches_are_off_in_ordinary_builds() {
        // Only `qemu/run --mutants` passes `--cfg busdma_mutant`; if one leaked into a normal
        // build the driver would be broken for real.
        const { assert!(!SKIP_IOTLB_FLUSH && !WRONG_DEVFN && !SKIP_SRTP && !NONLEAF_NO_RW && !SKIP_MAP_FLUSH) };
    }

    #[test]
    fn no_cargo_feature_of_the_crate_is_a_mutant() {
        // Features are additive and any dependent may enable them: a mutant there would let a
        // product ship a broken driver. Every line of the manifest's [features] table is read.
        let manifest = include_str!("../../Cargo.toml");
        let mut in_features = false;
        let mut features = 0;
        for line in manifest.lines().map(str::trim) {
            if line.starts_with('[') {
                in_features = line == "[features]";
                continue;
            }
            if in_features && !line.is_empty() && !line.starts_with('#') {
                features += 1;
                let name = line.split('=').next().unwrap_or(line);
                assert!(!name.contains("mutant"), "busdma feature {name:?} names a mutant");
            }
        }
        assert!(features > 0, "the [features] table of busdma's manifest was not found");
    }

    #[test]
    fn the_nonleaf_mutant_differs_from_vtd_sl_only_in_table_rights() {
        let t = PhysAddr::new(0x1234_5000);
        assert_eq!(NonLeafNoRw::make_table(t), VtdSl::make_table(t) & !0b11);
        assert_eq!(NonLeafNoRw::make_table(t) & 0b11, 0);
        assert!(NonLeafNoRw::is_present(NonLeafNoRw::make_table(t)));
        assert_eq!(NonLeafNoRw::make_leaf(t, Prot::READ_WRITE, 0), VtdSl::make_leaf(t, Prot::READ_WRITE, 0));
    }
}
