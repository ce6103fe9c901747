//! Untrusted devices behind the IOMMU with bounce buffering (`Bounced::over_iommu`): what the
//! IO page table lets the device reach around a 100-byte buffer is the buffer and zeros.

mod common;

use busdma::bounce::{BounceZones, Bounced, ZoneConfig};
use busdma::front::{Direction, IommuPerMap, MemKind, SgEntry, SgList, SyncOp, Tag, TagSpec};
use busdma::pgtable::TablePool;
use busdma::quickmap::QuickMaps;
use busdma::{PAGE_SIZE, PhysAddr, Platform};
use busdma_model::FrameRequest;
use common::ptdomain::PtDomain;

#[test]
fn an_untrusted_device_reading_the_whole_iommu_page_around_a_100_byte_buffer_sees_only_its_bytes_and_zeros() {
    let m = common::machine();
    let qm = QuickMaps::for_platform(&m);
    let zones = BounceZones::new(&m, ZoneConfig::default());
    let pool = TablePool::new(&m);
    let d = PtDomain::new(&m, &pool);
    let mut spec = TagSpec::new(1 << 16, 8);
    spec.flags.untrusted = true;
    let tag = Tag::new_root(&m, Bounced::over_iommu(IommuPerMap(&d), &zones, &qm), spec).unwrap();
    let mut map = tag.create_map().unwrap();
    let page = m.frames().alloc(FrameRequest::pages(1)).unwrap();
    m.fill_phys(page, PAGE_SIZE, 0x5e).unwrap(); // secrets sharing the buffer's page
    let buf = PhysAddr::new(page.raw() + 1000);
    let data: Vec<u8> = (0..100u8).map(|i| i.wrapping_mul(7) | 1).collect();
    m.write_phys(buf, &data).unwrap();
    let sg = [SgEntry { pa: buf, len: 100, kind: MemKind::Page }];
    for round in 0..2 {
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        map.load(&unsafe { SgList::new(&sg) }, Direction::Bidirectional).unwrap();
        map.sync(SyncOp::PREWRITE.union(SyncOp::PREREAD)).unwrap();
        let seg = map.segments()[0];
        assert_eq!(seg.len, 100);
        // Everything the IO page table maps in the segment's IOMMU page.
        let iopage = seg.addr.raw() & !(PAGE_SIZE - 1);
        let pa = d.translate(iopage).expect("the segment's page is mapped");
        assert_ne!(pa.page_base(), page, "the device was given the client's own page");
        let mut whole = vec![0u8; PAGE_SIZE as usize];
        m.read_phys(pa, &mut whole).unwrap();
        let off = (seg.addr.raw() & (PAGE_SIZE - 1)) as usize;
        assert_eq!(&whole[off..off + 100], &data[..], "round {round}");
        assert!(
            whole[..off].iter().chain(&whole[off + 100..]).all(|&b| b == 0),
            "round {round}: the device saw more than the buffer"
        );
        // The device writes 10 bytes and stops short: the client keeps its other 90.
        m.write_phys(PhysAddr::new(pa.raw() + off as u64), b"0123456789").unwrap();
        // Leave junk in the rest of the bounce page for the next round to find (it must not).
        m.fill_phys(PhysAddr::new(pa.raw() + off as u64 + 100), 500, 0xaa).unwrap();
        map.sync(SyncOp::POSTREAD.union(SyncOp::POSTWRITE)).unwrap();
        let mut got = vec![0u8; 100];
        m.read_phys(buf, &mut got).unwrap();
        assert_eq!(&got[..10], b"0123456789");
        assert_eq!(&got[10..], &data[10..]);
        m.write_phys(buf, &data).unwrap();
        map.unload().unwrap();
        assert!(d.translate(iopage).is_none(), "still reachable after unload");
    }
    let z = zones.stats()[0].1;
    assert_eq!((z.free_pages, z.total_bounced), (z.total_pages, 2));
}
