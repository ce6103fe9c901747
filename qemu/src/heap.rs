//! The kernel heap (so busdma's `alloc` feature works): power-of-two size classes carved from
//! a fixed region, large blocks straight from the frame allocator.
//!
//! # Theory
//!
//! 1. **Small blocks** (≤ [`MAX_SMALL`] bytes) come from one free list per power-of-two class,
//!    16 B to 2 KiB. A class is refilled by cutting a 4 KiB page of the heap region into blocks
//!    of its size; blocks are aligned to their size, which satisfies any alignment up to it.
//!    Freed blocks go back on their class's list (never returned to the region: the kernel
//!    lives for one test run).
//! 2. **Large blocks** are whole frames from [`crate::frames`], freed back to it.
//! 3. **Locking.** One spin lock over the lists (single CPU, interrupts off: uncontended).

use core::alloc::{GlobalAlloc, Layout};
use core::ptr;

use busdma::sync::SpinLock;
use busdma::{PAGE_SIZE, PhysAddr};

use crate::frames::{self, ARENA_BASE, HEAP_BYTES};

/// Smallest class: 16 bytes, enough for the free-list link and the usual 16-byte alignment.
const MIN_SHIFT: u32 = 4;
/// Largest class: 2 KiB; above that a block wastes less as whole pages.
const MAX_SHIFT: u32 = 11;
/// Largest size served from the classes.
const MAX_SMALL: usize = 1 << MAX_SHIFT;
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;

struct Heap {
    /// Head of each class's free list (0 = empty); each free block's first word links on.
    free: [usize; CLASSES],
    /// Next unused page of the heap region.
    next_page: u64,
}

static HEAP: SpinLock<Heap> = SpinLock::new(Heap { free: [0; CLASSES], next_page: ARENA_BASE });

/// busdma's allocations (and the checks') land here.
pub struct KernelHeap;

fn class_of(layout: Layout) -> Option<usize> {
    let size = layout.size().max(layout.align()).max(1 << MIN_SHIFT);
    if size > MAX_SMALL {
        return None;
    }
    Some((size.next_power_of_two().trailing_zeros() - MIN_SHIFT) as usize)
}

// SAFETY: blocks handed out are disjoint (each is on no list while allocated), aligned to
// their class size ≥ the layout's alignment (or page-aligned frames for large ones) and as
// large as requested.
unsafe impl GlobalAlloc for KernelHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(class) = class_of(layout) else {
            let pages = (layout.size() as u64).div_ceil(PAGE_SIZE);
            let align = (layout.align() as u64).max(PAGE_SIZE);
            return match frames::alloc(pages, align, None) {
                Ok(pa) => pa.raw() as *mut u8,
                Err(_) => ptr::null_mut(),
            };
        };
        let size = 1usize << (class as u32 + MIN_SHIFT);
        let mut heap = HEAP.lock();
        if heap.free[class] == 0 {
            if heap.next_page >= ARENA_BASE + HEAP_BYTES {
                return ptr::null_mut();
            }
            let page = heap.next_page as usize;
            heap.next_page += PAGE_SIZE;
            // Link the page's blocks into the class list, last to first.
            for block in (page..page + PAGE_SIZE as usize).step_by(size).rev() {
                // SAFETY: the block lies in a heap page no one else has seen; identity-mapped
                // RAM; 8-aligned (size ≥ 16).
                unsafe { ptr::write(block as *mut usize, heap.free[class]) };
                heap.free[class] = block;
            }
        }
        let block = heap.free[class];
        // SAFETY: `block` is a free block on the list; its first word holds the next link.
        heap.free[class] = unsafe { ptr::read(block as *const usize) };
        block as *mut u8
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        let Some(class) = class_of(layout) else {
            let pages = (layout.size() as u64).div_ceil(PAGE_SIZE);
            if let Err(e) = frames::free(PhysAddr::new(p as u64), pages) {
                panic!("heap: freeing a large block failed: {e}");
            }
            return;
        };
        let mut heap = HEAP.lock();
        // SAFETY: the caller gives back a block of this class it owned; it becomes the list head.
        unsafe { ptr::write(p as *mut usize, heap.free[class]) };
        heap.free[class] = p as usize;
    }
}
