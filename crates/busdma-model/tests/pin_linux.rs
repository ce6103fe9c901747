//! The registry over real Linux memory (mlock + /proc/self/pagemap). CI runs as root, where
//! pagemap shows real frame numbers; without privilege the backend must refuse, not report
//! zeros (checked here both ways: directly when unprivileged, and in a child process that
//! drops root).

use std::fs::File;
use std::os::unix::fs::FileExt;

use busdma::pin::Registry;
use busdma::{Error, PAGE_SIZE, PhysAddr, UserVa};
use busdma_model::linux_pin::{LinuxPin, decode_pagemap_entry};

/// Anonymous private memory of this process, unmapped on drop.
struct Anon {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Anon {
    fn new(pages: u64) -> Anon {
        let len = (pages * PAGE_SIZE) as usize;
        // SAFETY: a fresh anonymous mapping; we own it until drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Anon { ptr, len }
    }
    fn ua(&self, page: u64) -> UserVa {
        UserVa::new(self.ptr as u64 + page * PAGE_SIZE)
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// A second, independent reading of pagemap (a fresh file, not the backend's).
fn pagemap_frame(ua: UserVa) -> busdma::Result<PhysAddr> {
    let f = File::open("/proc/self/pagemap").unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, (ua.raw() / PAGE_SIZE) * 8).unwrap();
    decode_pagemap_entry(u64::from_le_bytes(b), ua)
}

/// VmLck is per process and the tests of this file run in parallel threads: the tests that
/// lock memory take this first.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Locked memory of this process, from /proc/self/status, in KiB.
fn vm_locked_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmLck:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn real_frames_match_a_second_reading_of_pagemap_and_stay_put_while_registered() {
    let _serial = serial();
    if !is_root() {
        // Unprivileged: the refusal is the property (section 2 of linux_pin.rs).
        let mem = Anon::new(4);
        let reg = Registry::new(LinuxPin::new().unwrap(), u64::MAX).unwrap();
        assert!(matches!(reg.register(mem.ua(0), 4 * PAGE_SIZE), Err(Error::PermissionDenied { .. })));
        assert_eq!(reg.backend().locked_pages(), 0);
        return;
    }
    let pages = 64;
    let mem = Anon::new(pages);
    let reg = Registry::new(LinuxPin::new().unwrap(), u64::MAX).unwrap();
    let locked_before = vm_locked_kib();
    reg.register(mem.ua(0), pages * PAGE_SIZE).unwrap();
    assert_eq!(vm_locked_kib() - locked_before, pages * PAGE_SIZE / 1024, "every page mlocked");
    let first: Vec<PhysAddr> = (0..pages).map(|p| reg.ua_to_pa(mem.ua(p), 12).unwrap()).collect();
    for (p, pa) in first.iter().enumerate() {
        assert_ne!(pa.raw(), 0);
        assert_eq!(pagemap_frame(mem.ua(p as u64)), Ok(*pa), "page {p}");
    }
    let off = UserVa::new(mem.ua(5).raw() + 0x123);
    assert_eq!(reg.ua_to_pa(off, 12), Ok(PhysAddr::new(first[5].raw() + 0x123)));

    // Memory pressure of our own: fault in and free 64 MiB, write to every pinned page.
    let churn = Anon::new(16_384);
    for p in 0..16_384 {
        // SAFETY: inside our mapping.
        unsafe { *(churn.ptr as *mut u8).add((p * PAGE_SIZE) as usize) = 1 };
    }
    drop(churn);
    for p in 0..pages {
        // SAFETY: inside our mapping.
        unsafe { *(mem.ptr as *mut u8).add((p * PAGE_SIZE) as usize) = p as u8 };
    }
    for (p, pa) in first.iter().enumerate() {
        assert_eq!(pagemap_frame(mem.ua(p as u64)), Ok(*pa), "page {p} moved while registered");
    }

    // A DMA load translates from the array: the runs are the pagemap frames.
    let buf = reg.load(mem.ua(0), pages * PAGE_SIZE).unwrap();
    let mut off = 0;
    for (pa, len) in buf.segments() {
        assert_eq!(pa, first[(off / PAGE_SIZE) as usize]);
        off += len;
    }
    assert_eq!(off, pages * PAGE_SIZE);
    drop(buf);

    reg.unregister(mem.ua(0), pages * PAGE_SIZE).unwrap();
    reg.synchronize().unwrap();
    assert_eq!(reg.backend().locked_pages(), 0);
    assert_eq!(vm_locked_kib(), locked_before, "every page munlocked");
}

#[test]
fn nested_registrations_keep_pages_locked_until_the_last_release() {
    let _serial = serial();
    if !is_root() {
        return; // covered by the unprivileged branch above; pins need frame numbers
    }
    let mem = Anon::new(8);
    let backend = LinuxPin::new().unwrap();
    let a = Registry::new(&backend, u64::MAX).unwrap();
    let b = Registry::new(&backend, u64::MAX).unwrap();
    a.register(mem.ua(0), 8 * PAGE_SIZE).unwrap();
    b.register(mem.ua(4), 4 * PAGE_SIZE).unwrap();
    drop(a);
    assert_eq!(backend.locked_pages(), 4, "b's pages stay locked");
    drop(b);
    assert_eq!(backend.locked_pages(), 0);
    let c = backend.counters();
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!((c.pins.load(Relaxed), c.unpins.load(Relaxed)), (12, 12));
}

#[test]
fn memory_not_mapped_in_this_process_is_refused_and_nothing_stays_locked() {
    let _serial = serial();
    let mem = Anon::new(4);
    // Punch a hole: pages 2 and 3 are gone.
    // SAFETY: part of our own mapping; `Anon::drop` unmapping a hole is harmless.
    unsafe { libc::munmap(mem.ua(2).raw() as *mut libc::c_void, 2 * PAGE_SIZE as usize) };
    let locked = vm_locked_kib();
    let reg = Registry::new(LinuxPin::new().unwrap(), u64::MAX).unwrap();
    assert!(matches!(reg.register(mem.ua(0), 4 * PAGE_SIZE), Err(Error::NotMapped { .. })));
    assert_eq!(reg.backend().locked_pages(), 0);
    assert_eq!(vm_locked_kib(), locked, "the mapped part was unlocked again");
    assert_eq!(reg.stats().charged, 0);
}

const CHILD: &str = "BUSDMA_PIN_UNPRIVILEGED_CHILD";

#[test]
#[ignore = "run by unprivileged_pagemap_is_permission_denied_not_zeros in a child that dropped root"]
fn unprivileged_child() {
    assert_eq!(std::env::var(CHILD).as_deref(), Ok("1"), "run only as the child");
    assert!(!is_root());
    let mem = Anon::new(4);
    let reg = Registry::new(LinuxPin::new().unwrap(), u64::MAX).unwrap();
    let err = reg.register(mem.ua(0), 4 * PAGE_SIZE).unwrap_err();
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
    assert_eq!(reg.backend().locked_pages(), 0);
    assert_eq!(vm_locked_kib(), 0);
}

#[test]
fn unprivileged_pagemap_is_permission_denied_not_zeros() {
    if !is_root() {
        return; // the first test checks this branch directly when unprivileged
    }
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--exact", "unprivileged_child", "--ignored", "--test-threads=1"]).env(CHILD, "1");
    // SAFETY: between fork and exec we only call async-signal-safe setgid/setuid.
    unsafe {
        cmd.pre_exec(|| {
            // 65534: "nobody" on Debian; any unprivileged id would do.
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "child failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
