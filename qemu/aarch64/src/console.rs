//! The PL011 UART of QEMU's `virt` at 0x0900_0000 (QEMU needs no baud setup): `print!`.

use core::fmt::{self, Write};

const UART: usize = 0x0900_0000;
/// Data register.
const DR: usize = 0x00;
/// Flag register; bit 5: transmit FIFO full.
const FR: usize = 0x18;
const FR_TXFF: u32 = 1 << 5;

struct Uart;

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            // SAFETY: the PL011's registers, identity-mapped as device memory (boot.rs); the
            // kernel is single-threaded, so writes are not interleaved.
            unsafe {
                while core::ptr::read_volatile((UART + FR) as *const u32) & FR_TXFF != 0 {}
                core::ptr::write_volatile((UART + DR) as *mut u32, u32::from(b));
            }
        }
        Ok(())
    }
}

/// Prints formatted text.
pub fn print(args: fmt::Arguments<'_>) {
    let _ = Uart.write_fmt(args);
}

/// `print!` to the PL011.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

/// `println!` to the PL011.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}
