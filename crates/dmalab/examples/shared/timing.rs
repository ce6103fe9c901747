//! Wall and thread-CPU time of an example's hot loop, printed as one JSON line (for
//! `lab/linux-iova/run`, which times Linux's allocator on the same loops). Shared by the
//! `icount` and `icount_iova` examples (included by path).
#![allow(dead_code)]

/// A started timing: wall clock and the thread's CPU time.
pub struct Timer(std::time::Instant, u64);

impl Timer {
    pub fn start() -> Self {
        Self(std::time::Instant::now(), thread_cpu_ns())
    }

    /// Prints the JSON line for `pairs` operations of `mode` (`pages` each, `live` ranges).
    pub fn report(&self, mode: &str, pages: u64, live: u64, pairs: usize) {
        let (wall, cpu) = (self.0.elapsed().as_nanos() as f64, (thread_cpu_ns() - self.1) as f64);
        let n = pairs.max(1) as f64;
        println!(
            "{{\"impl\":\"busdma\",\"mode\":\"{mode}\",\"pages\":{pages},\"live\":{live},\"threads\":1,\
             \"pairs\":{pairs},\"ns_per_op\":{:.2},\"cpu_ns_per_op\":{:.2}}}",
            wall / n,
            cpu / n
        );
    }
}

/// CPU time consumed by the calling thread, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
