//! Pre-mapped pools: a device's DMA buffers mapped once, a copy per I/O ([`Premapped`]), the
//! strategy that picks copy or map per load from measured costs ([`Hybrid`]), and slots owned
//! as buffers a stack writes in place and loads with no copy ([`PoolBuf`]).
//!
//! # Theory
//!
//! 1. **Why.** Under a virtual IOMMU (virtio-iommu, VT-d in caching mode) every map and every
//!    invalidation is a request to the hypervisor, a VM exit of microseconds; a packet that is
//!    mapped and unmapped pays two. A pool of pages mapped once for the device turns each I/O
//!    into a copy of its bytes: zero map requests, zero invalidations. Even on hardware IOMMUs
//!    copying a small buffer costs less than mapping it and waiting for the invalidation
//!    (Markuze et al., "True IOMMU protection from DMA attacks", ASPLOS 2016). It is bounce
//!    buffering whose bounce pages are mapped once ([`crate::bounce`], theory 1) instead of
//!    per load.
//! 2. **The pool** ([`PremappedPool`]) belongs to one device's domain: `slots_per_cpu` slots
//!    for each CPU, each slot `slot_pages` physically contiguous pages from
//!    [`Platform::alloc_pages`](crate::Platform::alloc_pages), all placed in one IOVA window
//!    from the domain, slot `i` at `window + i × slot bytes`, and mapped (read and write) at
//!    creation: one map request per slot, then never again. A slot is one segment in bus space
//!    whatever the load's scatter-gather shape. The pool holds no slot of a load: a load takes
//!    one from its CPU's free list ([`SpinLock`](crate::sync::SpinLock)ed, uncontended unless it steals) or, if that
//!    is empty, from another CPU's; unload gives it back to its home list (the CPU it was created for), with no pin.
//! 3. **Soundness.** The device reaches the pool's pages and nothing else through the pool:
//!    a load gives it the bus address of a slot, never of the client's memory, whose bytes
//!    the CPU copies. The pages are the pool's own, mapped for the pool's life; the pool
//!    unmaps them at drop, and frees them only once that unmap's invalidation has completed
//!    ([`IommuOps::ensure_flushed`](crate::front::strategy::IommuOps::ensure_flushed)); if the invalidation fails they are
//!    leaked (never reused while a device may reach them). Strategies borrow the pool, so it
//!    outlives every tag and map that uses it. A forgotten pool leaks its pages, still mapped:
//!    nobody else ever gets them.
//! 4. **Copies** are the bounce layer's ([`crate::bounce`], theory 6): PREWRITE copies client
//!    → slot, POSTREAD slot → client, one run at a time; buffer offset `o` is slot byte
//!    `at + o`, `at` the load's place in its slot (theory 8), so a partial sync copies just
//!    its range. When the slot and the run are both reachable
//!    without a quick map (the slot wholly in the direct map, checked page by page at
//!    creation; the run in the direct map, checked page by page, or a `Mapped` run's own
//!    mapping) the copy is one `memcpy` between the two kernel addresses; otherwise it goes
//!    through [`crate::quickmap`]'s copies, pinning the CPU for one run. Non-coherent
//!    tags: the slot's lines are cleaned after a PRE copy and invalidated before a POSTREAD
//!    copy ([`crate::quickmap::maintain_phys`]). Memory the CPU cannot copy (no page and no
//!    kernel mapping: MMIO, a peer BAR) is refused at load with [`Error::Unsupported`](crate::Error::Unsupported).
//! 5. **Untrusted devices** see the buffer's bytes and zeros, as with sub-page bouncing
//!    ([`crate::bounce`], theory 7): at load the slot around the buffer is zeroed and the client's
//!    bytes are copied in whatever the direction (PREREAD repeats the copy), so a device that
//!    writes less than the buffer leaves the client's own bytes; at unload the buffer's bytes
//!    are zeroed again, so an idle slot holds zeros. The device can still reach every slot at
//!    any time (that is the pool's bargain): what it finds there is its own in-flight I/O, its
//!    own writes, or zeros. Rights are per pool (read and write), not per direction: a device
//!    writing a transmit slot changes only the pool's copy, which is never copied back.
//! 6. **Exhaustion** returns [`Error::Exhausted`](crate::Error::Exhausted) (the slot size and the pool window's end)
//!    and takes nothing; the front end treats it as a resource, so on a tag that may wait
//!    `DmaMap::load_or_defer` queues the load and the unload that returns a slot completes it
//!    ([`crate::front::defer`]), as for bounce pages. No path panics.
//! 7. **Hybrid** ([`Hybrid`]): below a byte threshold a load is copied into the pool, at or
//!    above it (or when it does not fit a slot, cannot be copied, or the pool is exhausted) it
//!    is mapped by the wrapped strategy. The thresholds (one per run count: each further run
//!    is another map request on the map path) are where a measured copy becomes dearer than a
//!    measured map + unmap (with its invalidation, strict or deferred as the domain does it)
//!    on this device: [`Calibration`], measured at creation, kept and printable; or set by
//!    the driver. See `hybrid.rs`.
//! 8. **A load's place in its slot** (colouring). Slot `i` has a colour, fixed at creation
//!    from the configured load size `L` ([`PoolConfig::slot_size`]): position `i mod k` of the
//!    `k = ⌈slot bytes / L⌉` positions spread evenly from 0 to `slot bytes − L`, rounded down
//!    to 128 bytes (a cache line, or two); 0 when `L` fills the slot. A load of `len` bytes
//!    lies in its slot at byte `at` = the colour, lowered to `slot bytes − len` and to the
//!    tag's alignment (both in 128-byte steps), or at 0 if one of the tag's boundaries would
//!    fall inside it there. Why: slots start on page boundaries, so with `at` = 0 every packet
//!    of a ring used the same first lines of its page, the same third of a cache's sets (a
//!    1 500-byte packet: 24 of a page's 64 lines), where they evicted each other and the
//!    clients' buffers; spread, a ring's slots cover the page's lines (`examples/icount.rs`
//!    `tcp-nic-premapped-sized` under callgrind's cache simulation, BENCHMARKS.md). The place
//!    depends only on the slot, the length and the tag, so the same slot and length give the
//!    same bus address; it keeps the tag's alignment and boundary, never needs more segments
//!    than byte 0 would, and changes nothing the device can reach (the whole slot, theory 5). No
//!    division on the load path: the colour, and the slot's home list, are kept per slot.
//! 9. **Pool buffers** ([`PoolBuf`]): a stack that builds its packets in the pool needs no
//!    copy at load. [`PremappedPool::alloc_buf`] takes a free slot (the calling CPU's list
//!    first; [`Error::Exhausted`](crate::Error::Exhausted) when none is free) as an owned
//!    buffer, placed in its slot by theory 8's colour for its length (no tag known yet:
//!    128-byte steps); its owner writes and reads it by copy, never through a reference (the
//!    device may write any slot at any time, theory 5): one `memcpy` through the direct map,
//!    or the platform's physical copy. The front end's
//!    [`PoolMap`](crate::front::PoolMap) of a [`Premapped`] or [`Hybrid`] tag over the same
//!    pool ([`PoolStrategy`], sealed) takes it by value and loads it in place (the hybrid on its
//!    copy path, whatever its threshold): one segment at the slot's bus address, the slot's bytes as
//!    the map's runs (so the front end's syncs maintain exactly them on a non-coherent tag),
//!    zero bytes copied, zero map requests; the map state marks the slot as the buffer's, so
//!    the unload neither gives it back nor scrubs it and syncs copy nothing. A buffer of
//!    another pool is refused (its bus address is another window's, perhaps another
//!    domain's). Dropping the buffer gives the slot back to its home list; forgetting it (or
//!    the map holding it) leaks the slot, which stays the pool's and mapped only for the
//!    pool's device until the pool's drop (theory 3): nothing else ever gets its pages. The
//!    slot's bytes are the owner's: an idle slot holds zeros or bytes its device could
//!    already reach, and an untrusted device sees a pool buffer for as long as it exists
//!    (theory 5's bargain), so a stack writes there only what the device may see. Known
//!    limit: a buffer's drop completes no deferred load waiting for a slot (the next unload
//!    of the tag's tree does, [`crate::front::defer`]).
//!
//! # Counters
//!
//! [`PoolStats`]: slots, free slots, map requests (at creation only), loads served, bytes
//! copied, loads refused for exhaustion, steals from another CPU's list. Loads and bytes copied
//! at load are per-CPU counters (a load and a store by the CPU's guard holder, under the load's
//! one pin); bytes copied by syncs are an atomic add to the slot's home list's counter (syncs
//! and unloads take no pin); all summed when read. Pool buffers (theory 9) count in the steal
//! and exhaustion counters as loads do, and not in loads or bytes copied (their loads copy
//! nothing).

mod buf;
mod hybrid;
mod pool;

pub use buf::{PoolBuf, PoolStrategy};
pub use hybrid::{Calibration, Hybrid, HybridState, MAX_RUNS};
pub use pool::{PoolConfig, PoolStats, Premapped, PremappedPool, PremappedState};
