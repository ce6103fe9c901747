//! The serial console (COM1, 16550 UART at port 0x3f8): everything the kernel says goes here,
//! and QEMU's `-nographic` puts it on the runner's stdout.

use core::fmt::{self, Write};

use crate::port::{inb, outb};

/// COM1's base port (the PC standard).
const COM1: u16 = 0x3f8;
/// Line status register offset; bit 5 = transmit holding register empty.
const LSR: u16 = 5;
const LSR_THRE: u8 = 1 << 5;

/// Programs COM1 for 115200 8N1, polled (QEMU ignores the rate, real UARTs do not).
pub fn init() {
    // SAFETY: COM1's registers belong to the console, which only this module drives.
    unsafe {
        outb(COM1 + 1, 0x00); // no interrupts
        outb(COM1 + 3, 0x80); // DLAB on
        outb(COM1, 0x01); // divisor 1 = 115200 baud (115200 / 1)
        outb(COM1 + 1, 0x00);
        outb(COM1 + 3, 0x03); // 8 bits, no parity, one stop bit; DLAB off
        outb(COM1 + 2, 0xc7); // FIFOs on and cleared
    }
}

fn put(byte: u8) {
    // SAFETY: as in `init`; polling LSR then writing THR is the UART's protocol.
    unsafe {
        while inb(COM1 + LSR) & LSR_THRE == 0 {
            core::hint::spin_loop();
        }
        outb(COM1, byte);
    }
}

/// The console as a `fmt::Write` sink (adds `\r` before `\n`).
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                put(b'\r');
            }
            put(b);
        }
        Ok(())
    }
}

/// `print!` to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::console::Console, format_args!($($arg)*));
    }};
}

/// `println!` to the serial console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{ $crate::print!($($arg)*); $crate::print!("\n"); }};
}
