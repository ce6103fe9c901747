//! Typed coherent memory (`busdma::front::view`): through the model IOMMU the device sees
//! exactly the bytes written through a view and the CPU reads exactly what the device wrote;
//! status words are atomic; bad offsets are refused with their values and change nothing.

mod common;

use busdma::dma::{DeviceTag, Iommu, Policy, TagSpec};
use busdma::quickmap::QuickMaps;
use busdma::{Error, Iova, MemAttr, PAGE_SIZE};
use busdma_model::{DmaPort, HostPlatform, IommuConfig, ModelIommu};
use bytemuck::{Pod, Zeroable};

const DEV: u32 = 0x18;

/// A NIC-style descriptor: plain data, no padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
struct Desc {
    addr: u64,
    len: u32,
    status: u32,
}

/// Runs `f` with a tag of a device attached (strict) to the model IOMMU, and the device's
/// port; `coherent` is the tag's coherence (write-back coherent memory, else uncached).
fn with_device(
    coherent: bool,
    f: impl FnOnce(&HostPlatform, &DeviceTag<'_, '_, ModelIommu<'_>>, &dyn DmaPort),
) {
    let m = common::machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, ModelIommu::new(&m, IommuConfig::default()).unwrap()).unwrap();
    let dev = iommu.attach(DEV, Policy::Strict).unwrap();
    let mut spec = TagSpec::new(16 * PAGE_SIZE, 4);
    spec.flags.coherent = coherent;
    let tag = dev.tag(spec).unwrap();
    let port = iommu.hw().port(DEV);
    f(&m, &tag, &port);
}

fn device_bytes(port: &dyn DmaPort, bus: Iova, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    port.dma_read(bus, &mut b).unwrap();
    b
}

#[test]
fn the_device_sees_exactly_the_bytes_written_through_the_typed_view() {
    with_device(true, |_, tag, port| {
        let ring = tag.alloc_coherent(PAGE_SIZE, false).unwrap();
        let bus = ring.segments()[0].addr;
        let v = ring.view();
        let d = Desc { addr: 0x1122_3344_5566_7788, len: 1500, status: 0x8000_0001 };
        v.write(3 * 16, &d).unwrap();
        let words = [0xdead_beef_u32, 7, 0x0102_0304];
        v.write_slice(0x200, &words).unwrap();

        let mut want = vec![0u8; PAGE_SIZE as usize];
        want[48..64].copy_from_slice(bytemuck::bytes_of(&d));
        want[0x200..0x20c].copy_from_slice(bytemuck::cast_slice(&words));
        // The whole page: the written bytes exactly, and nothing else touched.
        assert_eq!(device_bytes(port, bus, PAGE_SIZE as usize), want);
        // Little-endian layout of the `#[repr(C)]` struct, as the device decodes it.
        assert_eq!(&want[48..56], &0x1122_3344_5566_7788u64.to_le_bytes());
    });
}

#[test]
fn the_cpu_reads_exactly_what_the_device_wrote() {
    with_device(true, |_, tag, port| {
        let ring = tag.alloc_coherent(2 * PAGE_SIZE, false).unwrap();
        let bus = ring.segments()[0].addr;
        let d = Desc { addr: 0xfeed_0000_1000, len: 64, status: 2 };
        // Across the page boundary: descriptor 255 and 256 of a 16-byte ring.
        let at = PAGE_SIZE - 16;
        port.dma_write(Iova::new(bus.raw() + at), bytemuck::bytes_of(&d)).unwrap();
        let d2 = Desc { addr: 9, len: 10, status: 11 };
        port.dma_write(Iova::new(bus.raw() + at + 16), bytemuck::bytes_of(&d2)).unwrap();
        let v = ring.view();
        assert_eq!(v.read::<Desc>(at).unwrap(), d);
        let mut two = [Desc::zeroed(); 2];
        v.read_slice(at, &mut two).unwrap();
        assert_eq!(two, [d, d2]);
        // A sub-view of one descriptor reads the same bytes at offset 0.
        assert_eq!(v.sub(at + 16, 16).unwrap().read::<Desc>(0).unwrap(), d2);
        assert_eq!(v.read::<u32>(at + 12).unwrap(), 2);
    });
}

#[test]
fn a_status_word_compare_exchange_hands_a_descriptor_back_and_forth_with_the_device() {
    const OWN: u32 = 1;
    const DONE: u32 = 2;
    with_device(true, |_, tag, port| {
        let ring = tag.alloc_coherent(PAGE_SIZE, false).unwrap();
        let bus = ring.segments()[0].addr;
        let v = ring.view();
        assert_eq!(v.attr(), MemAttr::WriteBack);
        let status = v.atomic_u32(16 + 12).unwrap();
        let status_bus = Iova::new(bus.raw() + 16 + 12);
        assert!(status.rmw_allowed());

        status.store(OWN);
        assert_eq!(device_bytes(port, status_bus, 4), OWN.to_le_bytes());
        // The device completes the descriptor.
        port.dma_write(status_bus, &DONE.to_le_bytes()).unwrap();
        assert_eq!(status.load(), DONE);
        // A CAS expecting OWN fails and reports what the device left; one expecting DONE wins.
        assert_eq!(status.compare_exchange(OWN, 0).unwrap(), Err(DONE));
        assert_eq!(status.compare_exchange(DONE, 0).unwrap(), Ok(DONE));
        assert_eq!(device_bytes(port, status_bus, 4), [0; 4]);
        assert_eq!(status.fetch_or(OWN | 0x100).unwrap(), 0);
        assert_eq!(status.fetch_and(!0x100).unwrap(), OWN | 0x100);
        assert_eq!(device_bytes(port, status_bus, 4), OWN.to_le_bytes());
        // The neighbours of the word are untouched.
        assert_eq!(device_bytes(port, Iova::new(bus.raw() + 16), 12), [0; 12]);
        assert_eq!(device_bytes(port, Iova::new(bus.raw() + 32), 4), [0; 4]);

        // A 64-bit word, as the device sees it.
        let w = v.atomic_u64(0x100).unwrap();
        w.store(0x0123_4567_89ab_cdef);
        assert_eq!(
            device_bytes(port, Iova::new(bus.raw() + 0x100), 8),
            0x0123_4567_89ab_cdefu64.to_le_bytes()
        );
        port.dma_write(Iova::new(bus.raw() + 0x104), &[0xff; 4]).unwrap();
        assert_eq!(w.compare_exchange(0xffff_ffff_89ab_cdef, 5).unwrap(), Ok(0xffff_ffff_89ab_cdef));
        assert_eq!(v.read::<u64>(0x100).unwrap(), 5);
    });
}

#[test]
fn rmw_atomics_on_uncached_memory_are_unsupported_while_loads_and_stores_work() {
    // A non-coherent tag's coherent memory is uncached (coherent theory 2); so is memory a
    // coherent tag asks uncached.
    with_device(false, |m, tag, port| {
        let ring = tag.alloc_coherent(PAGE_SIZE, false).unwrap();
        assert_eq!(m.mem_attr(ring.memory().pa()), MemAttr::Uncached);
        let bus = ring.segments()[0].addr;
        let v = ring.view();
        assert_eq!(v.attr(), MemAttr::Uncached);
        let s = v.atomic_u32(12).unwrap();
        assert!(!s.rmw_allowed());
        assert!(matches!(s.compare_exchange(0, 1), Err(Error::Unsupported { .. })));
        assert!(matches!(s.fetch_or(1), Err(Error::Unsupported { .. })));
        assert!(matches!(v.atomic_u64(8).unwrap().fetch_and(0), Err(Error::Unsupported { .. })));
        // The refused operations changed nothing.
        assert_eq!(device_bytes(port, Iova::new(bus.raw() + 8), 8), [0; 8]);
        s.store(3);
        assert_eq!(device_bytes(port, Iova::new(bus.raw() + 12), 4), 3u32.to_le_bytes());
        port.dma_write(Iova::new(bus.raw() + 12), &9u32.to_le_bytes()).unwrap();
        assert_eq!(s.load(), 9);
    });
    with_device(true, |_, tag, _| {
        let ring = tag.alloc_coherent(PAGE_SIZE, true).unwrap();
        let v = ring.view();
        assert!(matches!(v.atomic_u32(0).unwrap().compare_exchange(0, 1), Err(Error::Unsupported { .. })));
    });
}

#[test]
fn typed_accesses_out_of_range_or_misaligned_are_refused_with_their_values_and_change_nothing() {
    with_device(true, |_, tag, port| {
        let len = 100;
        let ring = tag.alloc_coherent(len, false).unwrap();
        let bus = ring.segments()[0].addr;
        let v = ring.view();
        assert_eq!(v.len(), len);
        let d = Desc { addr: u64::MAX, len: u32::MAX, status: u32::MAX };
        // Out of range: the end of the access, and the view's length.
        assert_eq!(v.write(len - 8, &d), Err(Error::OutOfRange { addr: len + 8, limit: len }));
        assert_eq!(v.read::<Desc>(len - 15).unwrap_err(), Error::OutOfRange { addr: len + 1, limit: len });
        assert_eq!(v.write_slice(96, &[1u32, 2]), Err(Error::OutOfRange { addr: 104, limit: len }));
        assert_eq!(v.fill(0, len + 1, 0xff), Err(Error::OutOfRange { addr: len + 1, limit: len }));
        assert_eq!(v.write(u64::MAX - 3, &0u64), Err(Error::Overflow { base: u64::MAX - 3, len: 8 }));
        assert_eq!(v.atomic_u32(100).unwrap_err(), Error::OutOfRange { addr: 104, limit: len });
        assert_eq!(v.sub(90, 11).unwrap_err(), Error::OutOfRange { addr: 101, limit: len });
        // A sub-view is bounded by itself, not by its parent.
        assert_eq!(
            v.sub(16, 16).unwrap().read::<u64>(12).unwrap_err(),
            Error::OutOfRange { addr: 20, limit: 16 }
        );
        // Misaligned atomic words: the offset and the word size.
        assert_eq!(v.atomic_u32(2).unwrap_err(), Error::Misaligned { value: 2, align: 4 });
        assert_eq!(v.atomic_u64(4).unwrap_err(), Error::Misaligned { value: 4, align: 8 });
        assert_eq!(
            v.sub(4, 16).unwrap().atomic_u64(0).unwrap_err(),
            Error::Misaligned { value: 0, align: 8 }
        );
        // Nothing was written by the refused accesses.
        assert_eq!(device_bytes(port, bus, len as usize), vec![0; len as usize]);
        // The last whole word is fine.
        v.atomic_u32(96).unwrap().store(1);
        v.write(88, &u64::MAX).unwrap();
        assert_eq!(v.read::<[u32; 3]>(88).unwrap(), [u32::MAX, u32::MAX, 1]);
    });
}

#[test]
fn a_streaming_buffer_is_written_as_typed_plain_data_while_the_cpu_owns_it() {
    use busdma::dma::ToDevice;
    with_device(false, |_, tag, port| {
        let buf = tag.alloc_buffer::<ToDevice>(256).unwrap();
        let d = Desc { addr: 0xfeed_f00d, len: 64, status: 3 };
        buf.view().write(32, &d).unwrap();
        assert_eq!(buf.view().read::<Desc>(32).unwrap(), d);
        assert!(matches!(buf.view().write(250, &d), Err(Error::OutOfRange { .. })));
        let dev = buf.to_device().ok().unwrap();
        let bus = dev.segments()[0].addr;
        assert_eq!(device_bytes(port, Iova::new(bus.raw() + 32), 16), bytemuck::bytes_of(&d));
    });
}
