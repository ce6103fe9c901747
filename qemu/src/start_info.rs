//! The PVH `hvm_start_info` block: command line and memory map.

use alloc::string::String;

use crate::arch;

/// `hvm_start_info.magic`.
const MAGIC: u32 = 0x336e_c578;
/// memmap entry type for usable RAM (E820 type 1).
const RAM: u32 = 1;

/// What the kernel takes from the boot block.
pub struct BootInfo {
    /// The kernel command line (`-append`), possibly empty.
    pub cmdline: String,
}

impl BootInfo {
    /// The value of `key=value` on the command line.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.cmdline.split_ascii_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    }
}

fn read<T: Copy>(pa: u64) -> T {
    // SAFETY: the boot block and what it points at lie in identity-mapped low RAM that QEMU's
    // PVH loader filled; unaligned reads because the layout is packed C.
    unsafe { core::ptr::read_unaligned(pa as *const T) }
}

/// Reads the block at `pa`: records the RAM ranges with the platform, returns the command line.
pub fn parse(pa: u64) -> Result<BootInfo, &'static str> {
    if read::<u32>(pa) != MAGIC {
        return Err("hvm_start_info magic mismatch (not booted through PVH?)");
    }
    let version = read::<u32>(pa + 4);
    let cmdline_pa = read::<u64>(pa + 24);
    let mut cmdline = String::new();
    if cmdline_pa != 0 {
        // Why 4096: QEMU's command lines are short; a longer one is cut, not overrun.
        for i in 0..4096 {
            let b = read::<u8>(cmdline_pa + i);
            if b == 0 {
                break;
            }
            cmdline.push(char::from(b));
        }
    }
    // Version 1 adds the memory map (memmap_paddr at 40, memmap_entries at 48).
    let entries = if version >= 1 { read::<u32>(pa + 48) } else { 0 };
    if entries == 0 {
        return Err("hvm_start_info has no memory map (version < 1)");
    }
    let map = read::<u64>(pa + 40);
    for i in 0..u64::from(entries) {
        let e = map + i * 24;
        let (addr, size, kind) = (read::<u64>(e), read::<u64>(e + 8), read::<u32>(e + 16));
        if kind == RAM {
            arch::add_ram(addr, addr.saturating_add(size));
        }
    }
    Ok(BootInfo { cmdline })
}
