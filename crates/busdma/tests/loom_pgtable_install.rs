//! Loom model of the lock-free table install (`busdma::pgtable::install::table_or_install`),
//! the same function the walker runs, over loom atomics in a small table arena.
//!
//! Two mappers own disjoint entries below the same missing tables. Whatever the interleaving:
//! exactly one table is installed per level, the loser's page is discarded (never both
//! installed and discarded, never leaked), each mapper finds the installed table zeroed (the
//! arena's pages start full of junk, so a missing Acquire/Release pair would show as a
//! non-zero entry), and both leaves end up in the one installed leaf table.
#![cfg(loom)]

use busdma::PhysAddr;
use busdma::pgtable::install::{Next, TableSource, table_or_install};
use busdma::pgtable::{PteFormat, VtdSl};
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Entries per arena table: the install step does not depend on the table size; 2 keep the
/// state space small (one entry per mapper).
const ENTRIES: usize = 2;
/// Pages in the arena: two mappers × two levels.
const PAGES: usize = 4;
/// What a page holds before its allocator zeroes it: a present VT-d entry (R|W set), so a
/// mapper that saw it would report "already mapped".
const JUNK: u64 = 0xdead_b003;

struct Arena {
    tables: Vec<[AtomicU64; ENTRIES]>,
    allocated: Vec<AtomicBool>,
    discarded: Vec<AtomicBool>,
}

fn pa_of(page: usize) -> PhysAddr {
    PhysAddr::new(((page + 1) as u64) << 12)
}

fn page_of(pa: PhysAddr) -> usize {
    let p = (pa.raw() >> 12) as usize;
    assert!(
        (1..=PAGES).contains(&p),
        "followed {pa:?}, not an arena page: a table was seen before its zeroing"
    );
    p - 1
}

/// A mapper's allocator: it owns pages `mine[..]`, hands them out in order, zeroing each
/// (relaxed stores, as the pool's zeroing is) before returning it.
struct Source<'a> {
    arena: &'a Arena,
    mine: [usize; 2],
    next: usize,
}

impl TableSource for Source<'_> {
    type Page = usize;

    fn alloc_table(&mut self) -> busdma::Result<(PhysAddr, usize)> {
        let p = self.mine[self.next];
        self.next += 1;
        self.arena.allocated[p].store(true, Ordering::Relaxed);
        for e in &self.arena.tables[p] {
            e.store(0, Ordering::Relaxed);
        }
        Ok((pa_of(p), p))
    }

    fn published(&mut self, _page: usize) {}

    fn discard(&mut self, page: usize) {
        self.arena.discarded[page].store(true, Ordering::Relaxed);
    }
}

/// Installs (or finds) the level-2 and level-1 tables, then writes leaf `slot` in the latter.
fn mapper(arena: &Arena, root: &AtomicU64, slot: usize, mine: [usize; 2]) {
    let mut src = Source { arena, mine, next: 0 };
    let Ok(Next::Table(mid)) = table_or_install::<VtdSl, _, _>(root, 2, &mut src) else {
        panic!("root entry: expected a table");
    };
    let mid_entry = &arena.tables[page_of(mid)][0];
    let Ok(Next::Table(leaf)) = table_or_install::<VtdSl, _, _>(mid_entry, 1, &mut src) else {
        panic!("mid entry: expected a table");
    };
    let e = &arena.tables[page_of(leaf)][slot];
    // The mapper owns this entry; it must find it zeroed (the table's zeroing is visible).
    assert_eq!(e.load(Ordering::Relaxed), 0, "mapper {slot} found a non-zero entry in a fresh table");
    e.store(
        VtdSl::make_leaf(PhysAddr::new(0x10_0000 * (slot as u64 + 1)), busdma::pgtable::Prot::READ, 0),
        Ordering::Relaxed,
    );
}

#[test]
fn concurrent_installs_publish_one_zeroed_table_per_level_and_discard_the_losers() {
    loom::model(|| {
        let arena = Arc::new(Arena {
            tables: (0..PAGES).map(|_| [AtomicU64::new(JUNK), AtomicU64::new(JUNK)]).collect(),
            allocated: (0..PAGES).map(|_| AtomicBool::new(false)).collect(),
            discarded: (0..PAGES).map(|_| AtomicBool::new(false)).collect(),
        });
        let root = Arc::new(AtomicU64::new(0));
        let t = {
            let (arena, root) = (arena.clone(), root.clone());
            loom::thread::spawn(move || mapper(&arena, &root, 1, [2, 3]))
        };
        mapper(&arena, &root, 0, [0, 1]);
        t.join().unwrap();

        let mid = page_of(VtdSl::output(root.load(Ordering::Acquire), 2));
        let leaf = page_of(VtdSl::output(arena.tables[mid][0].load(Ordering::Acquire), 1));
        let installed = [mid, leaf];
        for p in 0..PAGES {
            let allocated = arena.allocated[p].load(Ordering::Relaxed);
            let discarded = arena.discarded[p].load(Ordering::Relaxed);
            // Every page a mapper allocated is installed or discarded: exactly one of them.
            assert_eq!(
                allocated,
                installed.contains(&p) != discarded,
                "page {p}: allocated {allocated}, discarded {discarded}"
            );
            assert!(!(installed.contains(&p) && discarded), "page {p} both installed and discarded");
        }
        for slot in 0..ENTRIES {
            let pte = arena.tables[leaf][slot].load(Ordering::Relaxed);
            assert_eq!(
                VtdSl::output(pte, 0),
                PhysAddr::new(0x10_0000 * (slot as u64 + 1)),
                "leaf {slot} lost"
            );
        }
    });
}
