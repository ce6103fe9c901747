//! Command-queue entries (Arm IHI 0070, 4.1-4.7): 16 bytes, opcode in bits 7:0. Pure encoders.
//!
//! | command | opcode | fields |
//! |---|---|---|
//! | CFGI_STE | 0x03 | SID 63:32; word 1 Leaf (bit 0) |
//! | CFGI_CD | 0x05 | SSID 31:12, SID 63:32; word 1 Leaf |
//! | TLBI_NH_ASID | 0x11 | ASID 63:48 |
//! | TLBI_NH_VA | 0x12 | NUM 16:12, SCALE 24:20, ASID 63:48; word 1 Leaf (0), TTL 9:8, TG 11:10, Address 63:12 |
//! | TLBI_NSNH_ALL | 0x30 | - |
//! | CMD_SYNC | 0x46 | CS 13:12 = 0 (no signal: completion is CMDQ_CONS passing it) |
#![forbid(unsafe_code)]

use crate::addr::{PAGE_SHIFT, PAGE_SIZE};

/// One command: two 64-bit words.
pub type Command = [u64; 2];

/// Opcodes.
pub mod op {
    /// Invalidate one STE.
    pub const CFGI_STE: u64 = 0x03;
    /// Invalidate one CD.
    pub const CFGI_CD: u64 = 0x05;
    /// Invalidate every stage-1 TLB entry of an ASID.
    pub const TLBI_NH_ASID: u64 = 0x11;
    /// Invalidate stage-1 TLB entries of an ASID by address.
    pub const TLBI_NH_VA: u64 = 0x12;
    /// Invalidate every stage-1 and stage-2 TLB entry of a VMID.
    pub const TLBI_S12_VMALL: u64 = 0x28;
    /// Invalidate stage-2 TLB entries of a VMID by IPA.
    pub const TLBI_S2_IPA: u64 = 0x2a;
    /// Invalidate every non-secure non-hyp TLB entry.
    pub const TLBI_NSNH_ALL: u64 = 0x30;
    /// Completion barrier.
    pub const SYNC: u64 = 0x46;
}

/// CFGI_STE for `sid` (Leaf = 1: only the STE, not an L1 descriptor).
pub fn cfgi_ste(sid: u32) -> Command {
    [op::CFGI_STE | (u64::from(sid) << 32), 1]
}

/// CFGI_CD for substream 0 of `sid`.
pub fn cfgi_cd(sid: u32) -> Command {
    [op::CFGI_CD | (u64::from(sid) << 32), 1]
}

/// TLBI_NH_ASID.
pub fn tlbi_nh_asid(asid: u16) -> Command {
    [op::TLBI_NH_ASID | (u64::from(asid) << 48), 0]
}

/// TLBI_S12_VMALL: every entry tagged with `vmid`.
pub fn tlbi_s12_vmall(vmid: u16) -> Command {
    [op::TLBI_S12_VMALL | (u64::from(vmid) << 32), 0]
}

/// TLBI_S2_IPA of one 4 KiB page at IPA `addr` (TG = 0), walk caches included (Leaf = 0).
pub fn tlbi_s2_ipa(vmid: u16, addr: u64) -> Command {
    [op::TLBI_S2_IPA | (u64::from(vmid) << 32), addr & ((1 << 52) - 1) & !(PAGE_SIZE - 1)]
}

/// The range form of TLBI_S2_IPA (IDR3.RIL): `(num + 1) << scale` 4 KiB pages from `addr`.
pub fn tlbi_s2_ipa_range(vmid: u16, addr: u64, num: u32, scale: u32) -> Command {
    let w0 = op::TLBI_S2_IPA
        | (u64::from(num & 0x1f) << 12)
        | (u64::from(scale & 0x1f) << 20)
        | (u64::from(vmid) << 32);
    [w0, (addr & ((1 << 52) - 1) & !(PAGE_SIZE - 1)) | (1 << 10)]
}

/// TLBI_NSNH_ALL.
pub fn tlbi_nsnh_all() -> Command {
    [op::TLBI_NSNH_ALL, 0]
}

/// CMD_SYNC, completion by polling CMDQ_CONS.
pub fn sync() -> Command {
    [op::SYNC, 0]
}

/// TLBI_NH_VA of one 4 KiB page at `addr` (no range fields: TG = 0), walk caches included
/// (Leaf = 0: table pages may be freed after it).
pub fn tlbi_nh_va(asid: u16, addr: u64) -> Command {
    [op::TLBI_NH_VA | (u64::from(asid) << 48), addr & !(PAGE_SIZE - 1)]
}

/// TLBI_NH_VA of the range form (IDR3.RIL): `(num + 1) << scale` 4 KiB pages from `addr`
/// (TG = 1, 4 KiB; num < 32, scale < 32).
pub fn tlbi_nh_va_range(asid: u16, addr: u64, num: u32, scale: u32) -> Command {
    let w0 = op::TLBI_NH_VA
        | (u64::from(num & 0x1f) << 12)
        | (u64::from(scale & 0x1f) << 20)
        | (u64::from(asid) << 48);
    [w0, (addr & !(PAGE_SIZE - 1)) | (1 << 10)]
}

/// The range-form commands covering `pages` pages from `addr`: each the largest
/// `(num + 1) << scale` block that fits in what is left. Calls `emit` per command; at most
/// a few dozen for any range (each takes at least half of what is left, 32 blocks at a time).
pub fn range_commands(asid: u16, addr: u64, pages: u64, emit: impl FnMut(Command)) {
    range_blocks(addr, pages, |a, num, scale| tlbi_nh_va_range(asid, a, num, scale), emit)
}

/// [`range_commands`] for TLBI_S2_IPA.
pub fn s2_range_commands(vmid: u16, addr: u64, pages: u64, emit: impl FnMut(Command)) {
    range_blocks(addr, pages, |a, num, scale| tlbi_s2_ipa_range(vmid, a, num, scale), emit)
}

fn range_blocks(
    mut addr: u64,
    mut pages: u64,
    make: impl Fn(u64, u32, u32) -> Command,
    mut emit: impl FnMut(Command),
) {
    while pages > 0 {
        let scale = (63 - pages.leading_zeros()).saturating_sub(4).min(31);
        let num = (pages >> scale).min(32) as u32;
        emit(make(addr, num - 1, scale));
        let done = u64::from(num) << scale;
        pages -= done;
        addr += done << PAGE_SHIFT;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn commands_have_the_spec_bit_layout() {
        assert_eq!(cfgi_ste(0x0108), [0x0000_0108_0000_0003, 1]);
        assert_eq!(cfgi_cd(0x10), [0x0000_0010_0000_0005, 1]);
        assert_eq!(tlbi_nh_asid(7), [0x0007_0000_0000_0011, 0]);
        assert_eq!(tlbi_nsnh_all(), [0x30, 0]);
        assert_eq!(sync(), [0x46, 0]);
        assert_eq!(tlbi_nh_va(3, 0x1234_5678), [0x0003_0000_0000_0012, 0x1234_5000]);
        assert_eq!(tlbi_nh_va_range(3, 0x20_0000, 31, 2), [0x0003_0000_0021_f012, 0x20_0400]);
        assert_eq!(tlbi_s12_vmall(5), [0x0000_0005_0000_0028, 0]);
        assert_eq!(tlbi_s2_ipa(5, 0x1234_5678), [0x0000_0005_0000_002a, 0x1234_5000]);
        assert_eq!(tlbi_s2_ipa_range(5, 0x20_0000, 1, 3), [0x0000_0005_0030_102a, 0x20_0400]);
        let mut n = 0;
        s2_range_commands(5, 0, 33, |c| {
            assert_eq!(c[0] & 0xff, 0x2a);
            n += 1;
        });
        assert_eq!(n, 2);
    }

    #[test]
    fn range_commands_cover_exactly_the_pages() {
        for pages in [1u64, 2, 31, 32, 33, 100, 512, 4097, (1 << 27) + 5] {
            let mut covered = 0;
            let mut next = 0x4000_0000u64;
            let mut n = 0;
            range_commands(9, 0x4000_0000, pages, |c| {
                let num = (c[0] >> 12) & 0x1f;
                let scale = (c[0] >> 20) & 0x1f;
                assert_eq!(c[1] & !0xfff, next, "contiguous");
                let len = (num + 1) << scale;
                covered += len;
                next += len << 12;
                n += 1;
            });
            assert_eq!(covered, pages);
            assert!(n <= 64, "{pages} pages took {n} commands");
        }
        let mut v = Vec::new();
        range_commands(1, 0, 1, |c| v.push(c));
        assert_eq!(v, [tlbi_nh_va_range(1, 0, 0, 0)]);
    }
}
