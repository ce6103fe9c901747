//! The slow path: a treap of occupied ranges, each node knowing the free gap below it and the
//! largest gap of its subtree, searched top-down, with a placement hint and one deferred
//! removal for the common "free, then allocate the same again" pair.
//!
//! # Theory
//!
//! 1. **What is stored.** One node per occupied range of the space: live allocations
//!    ([`Kind::Allocated`]), ranges owned by the per-CPU caches ([`Kind::Class`], live or
//!    cached: the tree cannot tell and does not need to), reserved holes ([`Kind::Reserved`])
//!    and windows ([`Kind::Window`]). Two zero-length sentinels sit at the space's two ends, so
//!    every free byte lies in a *gap* between two in-order neighbours, and every gap is the
//!    gap *below* exactly one node (its upper neighbour).
//! 2. **Augmentation.** Each node keeps `gap`, the free bytes between its in-order
//!    predecessor's end and its start (0 for the lowest sentinel), and `max_gap`, the largest
//!    `gap` of its subtree. `max_gap` depends on the subtree alone, so `pull` is O(1) and
//!    branch-free (a missing child is a dummy node whose `max_gap` is 0). An insertion changes
//!    two nodes' `gap` (the new node's and its successor's), a removal one (the successor
//!    absorbs the removed range and its gap), a rotation none; after each, the maxima are
//!    repaired upwards and the repair stops at the first node whose `max_gap` did not change
//!    (a node's maximum depends only on its own gap and its children's maxima, so nothing
//!    above it changes either). Nodes rotated in between are pulled whatever the result.
//! 3. **Balance.** A treap: a node's priority is a hash of its start (deterministic, no random
//!    source needed in `no_std`), heap-ordered; the expected depth is `~1.39 log2 n`. Nodes
//!    carry parent links, so nothing recurses: an allocation links its node as a leaf at the
//!    place its search found (no second descent) and rotates it up; a removal rotates the node
//!    down below its higher-priority child and splices it out. Both take O(1) rotations
//!    expected and O(depth) at worst; a lookup is one descent.
//! 4. **Search** (top-down placement, as Linux and FreeBSD do, so low addresses stay free for
//!    devices with narrow masks): visit the gaps from the highest address down (right subtree,
//!    the node's own gap, left subtree), pruning every subtree whose `max_gap` is smaller than
//!    the request and every right subtree whose lowest possible gap (it starts at the node's
//!    end) already passes the limit. In each gap the highest start honouring alignment,
//!    boundary and limit is tried; the first hit is the highest fit. A failed subtree hands
//!    the failure to its parent through the parent link. With page alignment, no boundary and
//!    no limit below the top of the large gaps, every unpruned subtree holds a fit, so the
//!    search is one descent: O(log n) expected however fragmented the space. A limit, an
//!    alignment or a boundary that the large enough gaps of a subtree do not admit makes it
//!    backtrack, as the recursive search did.
//! 5. **Placement hint.** The tree keeps a node `hint` and `above`, a bound on every gap
//!    above the hint. If `above < total` and the hint's own gap holds a fit, that fit is the
//!    highest of the tree (no gap above can hold `total` bytes), found without a search. The
//!    bound is kept true: an allocation makes its new node the hint, with `above` the largest
//!    of the old bound (or, after a search, of every gap and subtree maximum the search
//!    passed over, all above the fit) and what is left of its successor's gap; a removal whose
//!    successor lies above the hint makes that successor the hint (the gaps above it are a
//!    subset); everything else only splits or shrinks gaps. The hint is always a linked node
//!    (a removal of the hint moves it to the successor).
//! 6. **Deferred removal.** A free checks and counts as usual but leaves its node linked as
//!    the *vacancy*; every other operation unlinks it first (`settle`), so it sees the tree as
//!    if the free had unlinked it. The next allocation takes the vacancy back without moving
//!    anything when every gap above it is smaller than `total` (`above` if it is the hint,
//!    else one climb that computes the largest, cut short at the first node after the hint
//!    when `above` already bounds the rest below `total`), its length is `total`, and the highest fit in
//!    the gap it would merge into (its predecessor's end to its successor's start) is its own
//!    start: that is exactly where unlinking and searching would have put the range, and a
//!    treap's shape is fixed by its keys and priorities, so the tree is the one unlinking and
//!    relinking would give. This is the synchronous map/unmap pair, and a ring whose oldest
//!    range, freed, is the highest hole (a NIC ring on a top-down allocator).
//! 7. **Remembered failures.** A failed search is recorded as (limit, size, align, boundary);
//!    a later request with the same limit that is at least as large, at least as aligned and no
//!    less constrained by its boundary cannot fit either, and fails without a search. Any free
//!    into the tree forgets every record (space came back).
//! 8. **Misuse.** A free looks its start up (the last two allocated nodes first, then a finger
//!    search: a climb from the hint to its lowest ancestor whose subtree must hold the start,
//!    and one descent from there; a ring's oldest range is a few levels from the hint, not a
//!    whole depth) after settling the vacancy: no node there (or the vacancy itself freed again) is a
//!    double free, another length is a wrong size, another kind a bad state; nothing changes.
//! 9. **Storage.** Nodes live in an arena (`Vec`) linked by `u32` indices, slot 0 the dummy,
//!    recycled through a free list whose capacity is reserved when a slot is made, so removal
//!    never allocates; growth uses `try_reserve`, so exhaustion of kernel memory is an error,
//!    not a panic. Node access skips bounds checks under the invariant of [`Tree`].
//! 10. **Locking.** None here: the tree is plain data behind the allocator's tree lock, and
//!     every operation takes `&mut self`.

use alloc::vec::Vec;

use crate::error::{Error, Result};

/// "No node": slot 0 holds a dummy node that is never linked and whose `max_gap` stays 0, so
/// that `pull` reads a missing child's maximum without a branch.
const NIL: u32 = 0;

/// Number of remembered failures: one per distinct DMA limit a domain commonly sees (32-bit,
/// the IOMMU's input width, and two more for odd masks such as 40 or 44 bits); a fifth limit
/// evicts the oldest record, which costs at most one extra search.
const FAIL_SLOTS: usize = 4;

/// What a node's range is.
/// The discriminant indexes [`Tree::counts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    /// A live allocation of the exact size asked for, freed through the tree.
    Allocated = 0,
    /// A size-class range owned by the per-CPU caches: live with a caller or cached.
    Class = 1,
    /// A reserved hole ([`super::IovaAllocator::reserve`]); never freed.
    Reserved = 2,
    /// A reserved window ([`super::IovaAllocator::reserve_window`]).
    Window = 3,
    /// A space sentinel (zero length).
    Sentinel = 4,
}

#[derive(Clone, Copy, Debug)]
struct Node {
    start: u64,
    /// End of the occupied range, guard page included.
    end: u64,
    /// The free gap just below `start`: from the in-order predecessor's `end` (0 for the
    /// lowest sentinel).
    gap: u64,
    /// The largest `gap` of the subtree.
    max_gap: u64,
    left: u32,
    right: u32,
    parent: u32,
    prio: u32,
    kind: Kind,
}

/// A placement request, already validated and with the guard page folded into `total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fit {
    /// Bytes the caller gets (alignment and boundary apply to these).
    pub size: u64,
    /// Bytes occupied in the tree (`size` plus an optional guard page).
    pub total: u64,
    /// Power of two, at least a page.
    pub align: u64,
    /// 0 or a power of two `>= size`.
    pub boundary: u64,
    /// Exclusive upper bound of the occupied range.
    pub limit: u64,
}

/// Where a fit was found: its start `s`, the node `succ` whose gap holds it (the new node's
/// successor), where the new leaf links (under `at`, on its left if `left`), and a bound on
/// every gap above `succ`.
#[derive(Clone, Copy, Debug)]
struct Found {
    s: u64,
    succ: u32,
    at: u32,
    left: bool,
    above: u64,
}

/// Counters of the slow path.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TreeStats {
    /// Allocations by kind (indexed by its discriminant, as [`Tree::counts`]): one counter
    /// bumped per allocation, whatever its kind.
    pub allocs: [u64; 5],
    /// Frees by kind, as `allocs`.
    pub frees: [u64; 5],
    pub visited: u64,
    pub fast_failures: u64,
    /// Placements found at the hint, without a search (among `allocs`).
    pub hint_hits: u64,
    /// Allocations that took the vacancy back (among `allocs`).
    pub retakes: u64,
}

/// The augmented treap over one space.
///
/// # Invariants
///
/// `root`, each of `recent`, `hint` and every `left`, `right` and `parent` of a node are the index of a
/// slot below `nodes.len()`: `NIL` is slot 0, the dummy node pushed first; other indices come
/// only from [`Tree::new_node`], and `nodes` never shrinks below an index handed out (a freed
/// slot goes to `free_slots`, to be reused; the one `pop` undoes a push whose index was never
/// linked). `free_slots` has room for every slot. The dummy's `max_gap` is 0 (it is never
/// pulled). Each of `recent` is `NIL` or a linked node (a removal clears it), so a free's
/// lookup never takes a recycled slot's stale range for a live one.
#[derive(Debug)]
pub(crate) struct Tree {
    nodes: Vec<Node>,
    free_slots: Vec<u32>,
    root: u32,
    /// The nodes allocated last and the one before, each until it is freed (`NIL` otherwise):
    /// a free's lookup tries them first (the synchronous pair frees the last, a two-deep ring
    /// or an "allocate the next, then free the previous" step the one before).
    recent: [u32; 2],
    /// The placement hint: a node, and `above`, a bound on every gap above it (theory 5).
    hint: u32,
    above: u64,
    /// The node freed last, if its unlinking is deferred (theory 6): still linked, counted
    /// free. `NIL` if none.
    vacant: u32,
    fails: [Option<Fit>; FAIL_SLOTS],
    next_fail: usize,
    /// Some record of `fails` is set.
    failed: bool,
    /// Nodes by kind (indexed by its discriminant): allocated, class, reserved, window,
    /// sentinel.
    pub counts: [u64; 5],
    pub stats: TreeStats,
}

/// splitmix64's finaliser: a well-mixed priority from a start address.
fn prio_of(start: u64) -> u32 {
    let mut z = start.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as u32
}

impl Fit {
    /// True if a failure of `self` proves that `other` fails too.
    fn implies_failure_of(&self, other: &Fit) -> bool {
        self.limit == other.limit
            && other.total >= self.total
            && other.size >= self.size
            && other.align >= self.align
            && (self.boundary == 0 || (other.boundary != 0 && other.boundary <= self.boundary))
    }

    /// The highest start in the gap `[lo, hi)` that honours the request, if any.
    #[inline]
    fn place(&self, lo: u64, hi: u64) -> Option<u64> {
        let hi = hi.min(self.limit);
        if hi < lo || hi - lo < self.total {
            return None;
        }
        let mut s = (hi - self.total) & !(self.align - 1);
        if self.boundary != 0 && (s ^ (s + self.size - 1)) & !(self.boundary - 1) != 0 {
            // Crosses: end the range exactly at the boundary it crossed, then realign (which
            // cannot cross the previous boundary, see `place_honours_boundary`).
            let m = (s + self.size - 1) & !(self.boundary - 1);
            s = m.checked_sub(self.size)? & !(self.align - 1);
        }
        (s >= lo).then_some(s)
    }
}

impl Tree {
    /// A tree over `[base, end)` with nothing occupied.
    pub fn new(base: u64, end: u64) -> Result<Self> {
        let mut nodes = Vec::new();
        nodes
            .try_reserve(3)
            .map_err(|_| Error::NoMemory { requested: 3 * core::mem::size_of::<Node>() as u64 })?;
        nodes.push(Node {
            start: 0,
            end: 0,
            gap: 0,
            max_gap: 0,
            left: NIL,
            right: NIL,
            parent: NIL,
            prio: 0,
            kind: Kind::Sentinel,
        });
        let mut t = Tree {
            nodes,
            free_slots: Vec::new(),
            root: NIL,
            recent: [NIL; 2],
            hint: NIL,
            above: 0,
            vacant: NIL,
            fails: [None; FAIL_SLOTS],
            next_fail: 0,
            failed: false,
            counts: [0; 5],
            stats: TreeStats::default(),
        };
        t.insert_keyed(base, base, Kind::Sentinel)?;
        t.insert_keyed(end, end, Kind::Sentinel)?;
        // Nothing lies above the top sentinel.
        t.hint = t.root_max();
        Ok(t)
    }

    /// Node `i`: `root`, one of `recent`, `hint` or a link read from the tree (`NIL` reads the dummy).
    #[inline]
    fn n(&self, i: u32) -> &Node {
        debug_assert!((i as usize) < self.nodes.len(), "node {i} of {}", self.nodes.len());
        // SAFETY: every index passed here is `root`, one of `recent`, `hint` or a link of a node, and
        // by the invariant of `Tree` each is below `nodes.len()`.
        unsafe { self.nodes.get_unchecked(i as usize) }
    }

    /// Node `i` for writing; as [`Tree::n`].
    #[inline]
    fn n_mut(&mut self, i: u32) -> &mut Node {
        debug_assert!((i as usize) < self.nodes.len(), "node {i} of {}", self.nodes.len());
        // SAFETY: as in `n`.
        unsafe { self.nodes.get_unchecked_mut(i as usize) }
    }

    /// The highest node (the top sentinel).
    fn root_max(&self) -> u32 {
        let mut i = self.root;
        while self.n(i).right != NIL {
            i = self.n(i).right;
        }
        i
    }

    /// Recomputes `max_gap` of `i` from its own gap and its children's; true if it changed.
    #[inline]
    fn pull(&mut self, i: u32) -> bool {
        let n = self.n(i);
        let (l, r, old) = (n.left, n.right, n.max_gap);
        // A missing child is the dummy node, whose `max_gap` is 0.
        let g = n.gap.max(self.n(l).max_gap).max(self.n(r).max_gap);
        self.n_mut(i).max_gap = g;
        g != old
    }

    /// Pulls `i` and its ancestors, stopping at the first whose `max_gap` did not change
    /// (an ancestor's depends only on its own gap and its children's, so nothing above it
    /// changes either).
    #[inline]
    fn fix_up(&mut self, mut i: u32) {
        while i != NIL && self.pull(i) {
            i = self.n(i).parent;
        }
    }

    /// Pulls every node from `i` up to and including `last` (an ancestor of `i`, or `i`)
    /// whatever the result, then goes on as [`Tree::fix_up`] above it.
    #[inline]
    fn fix_up_through(&mut self, mut i: u32, last: u32) {
        loop {
            self.pull(i);
            if i == last {
                break;
            }
            i = self.n(i).parent;
        }
        self.fix_up(self.n(last).parent);
    }

    /// Makes `parent` point to `new` instead of `old` (the root if `parent` is NIL).
    #[inline]
    fn replace_child(&mut self, parent: u32, old: u32, new: u32) {
        if parent == NIL {
            self.root = new;
        } else if self.n(parent).left == old {
            self.n_mut(parent).left = new;
        } else {
            self.n_mut(parent).right = new;
        }
        if new != NIL {
            self.n_mut(new).parent = parent;
        }
    }

    /// Rotates `x` above its parent `p` (which must exist). Neither is pulled: `p`'s subtree
    /// changed (its caller pulls it), `x`'s holds the gaps `p`'s did.
    #[inline]
    fn rotate_up(&mut self, x: u32) {
        self.stats.visited += 1;
        let p = self.n(x).parent;
        let g = self.n(p).parent;
        if self.n(p).left == x {
            let b = self.n(x).right;
            self.n_mut(p).left = b;
            if b != NIL {
                self.n_mut(b).parent = p;
            }
            self.n_mut(x).right = p;
        } else {
            let b = self.n(x).left;
            self.n_mut(p).right = b;
            if b != NIL {
                self.n_mut(b).parent = p;
            }
            self.n_mut(x).left = p;
        }
        self.n_mut(p).parent = x;
        self.replace_child(g, p, x);
    }

    /// Hangs the fresh leaf `x` under `at` (on its left if `left`; the root if `at` is NIL),
    /// which must be its in-order place, with `succ` its in-order successor (NIL for none),
    /// whose gap shrinks to `succ_gap`; then restores the augmentation and heap order.
    fn link(&mut self, x: u32, at: u32, left: bool, succ: u32, succ_gap: u64) {
        self.n_mut(x).parent = at;
        if at == NIL {
            self.root = x;
            return;
        }
        if left {
            self.n_mut(at).left = x;
        } else {
            self.n_mut(at).right = x;
        }
        // `succ` is `at` or an ancestor of it (a leaf's successor is its first ancestor
        // entered from the left): pull everything up to it, its gap changed.
        if succ == NIL {
            self.fix_up(at);
        } else {
            self.n_mut(succ).gap = succ_gap;
            self.fix_up_through(at, succ);
        }
        // Rotations keep the in-order sequence, hence every gap and the subtree maxima of
        // everything above the pair rotated.
        let prio = self.n(x).prio;
        let mut rotated = false;
        loop {
            let p = self.n(x).parent;
            if p == NIL || self.n(p).prio >= prio {
                break;
            }
            self.rotate_up(x);
            self.pull(p);
            rotated = true;
        }
        if rotated {
            self.pull(x);
        }
    }

    /// Takes node `x` out of the tree: its successor's gap absorbs `x`'s range and gap; `x`
    /// rotates down below its higher-priority child until it has at most one child and is
    /// spliced out; the augmentation is repaired upwards.
    fn unlink(&mut self, x: u32) -> u32 {
        let succ = self.successor(x);
        let n = *self.n(x);
        // The first child rotated into `x`'s place: from the splice point up to it, every
        // node was rotated and lost `x` from its subtree.
        let mut top = NIL;
        loop {
            let (l, r) = (self.n(x).left, self.n(x).right);
            let c = match (l, r) {
                (NIL, c) | (c, NIL) => {
                    let p = self.n(x).parent;
                    self.replace_child(p, x, c);
                    if top != NIL {
                        self.fix_up_through(p, top);
                    } else {
                        self.fix_up(p);
                    }
                    break;
                }
                (l, r) => {
                    if self.n(l).prio > self.n(r).prio {
                        l
                    } else {
                        r
                    }
                }
            };
            self.rotate_up(c);
            if top == NIL {
                top = c;
            }
        }
        if succ != NIL {
            let s = self.n_mut(succ);
            s.gap += n.gap + (n.end - n.start);
            self.fix_up_through(succ, succ);
        }
        succ
    }

    /// The in-order successor of `x`, NIL if none.
    fn successor(&self, x: u32) -> u32 {
        let mut i = self.n(x).right;
        if i != NIL {
            while self.n(i).left != NIL {
                i = self.n(i).left;
            }
            return i;
        }
        let mut i = x;
        loop {
            let p = self.n(i).parent;
            if p == NIL || self.n(p).left == i {
                return p;
            }
            i = p;
        }
    }

    /// A slot for a fresh leaf node `[start, end)` of `kind` whose gap below is `gap`, not
    /// yet linked.
    fn new_node(&mut self, start: u64, end: u64, gap: u64, kind: Kind) -> Result<u32> {
        let node = Node {
            start,
            end,
            gap,
            max_gap: gap,
            left: NIL,
            right: NIL,
            parent: NIL,
            prio: prio_of(start),
            kind,
        };
        let x = match self.free_slots.pop() {
            Some(x) => {
                self.nodes[x as usize] = node;
                x
            }
            None => {
                if self.nodes.len() >= u32::MAX as usize {
                    return Err(Error::NoMemory { requested: core::mem::size_of::<Node>() as u64 });
                }
                self.nodes
                    .try_reserve(1)
                    .map_err(|_| Error::NoMemory { requested: core::mem::size_of::<Node>() as u64 })?;
                self.nodes.push(node);
                // Reserve the free-list slot now so that a later removal never needs to
                // allocate.
                if self.free_slots.try_reserve(self.nodes.len() - self.free_slots.len()).is_err() {
                    self.nodes.pop();
                    return Err(Error::NoMemory { requested: 4 });
                }
                (self.nodes.len() - 1) as u32
            }
        };
        self.counts[kind as usize] += 1;
        Ok(x)
    }

    /// Inserts `[start, end)` by a descent from the root (reservations and sentinels; an
    /// allocation is linked where its search found the gap instead). The caller has checked
    /// that it overlaps nothing.
    fn insert_keyed(&mut self, start: u64, end: u64, kind: Kind) -> Result<()> {
        let (mut t, mut at, mut left) = (self.root, NIL, false);
        // The last nodes the descent passed on their left (successor) and right (predecessor).
        let (mut succ, mut pred_end) = (NIL, start);
        while t != NIL {
            self.stats.visited += 1;
            at = t;
            left = (start, end) < self.key(t);
            if left {
                succ = t;
                t = self.n(t).left;
            } else {
                pred_end = self.n(t).end;
                t = self.n(t).right;
            }
        }
        let x = self.new_node(start, end, start - pred_end, kind)?;
        let succ_gap = if succ == NIL { 0 } else { self.n(succ).start - end };
        self.link(x, at, left, succ, succ_gap);
        Ok(())
    }

    #[inline]
    fn key(&self, i: u32) -> (u64, u64) {
        let n = self.n(i);
        (n.start, n.end)
    }

    /// The non-sentinel node starting exactly at `start`.
    fn lookup(&mut self, start: u64) -> Option<u32> {
        // The last two nodes allocated (`NIL` reads the dummy, a sentinel: no match).
        for r in self.recent {
            let n = self.n(r);
            if n.start == start && n.kind != Kind::Sentinel {
                return Some(r);
            }
        }
        let mut t = self.finger(start);
        while t != NIL {
            self.stats.visited += 1;
            let n = self.n(t);
            if start == n.start && n.kind != Kind::Sentinel {
                return Some(t);
            }
            t = if start < n.start { n.left } else { n.right };
        }
        None
    }

    /// A node whose subtree holds the range starting at `start` if the tree holds one: the
    /// hint, or its lowest ancestor that is. A free of a range placed near the last one (a
    /// ring) then descends from a few levels up instead of from the root. A subtree holds
    /// every node strictly between its nearest ancestors on either side; climbing from the
    /// hint towards `start`, the side beyond the hint stays beyond `start`, so the climb stops
    /// at the first node entered from `start`'s side whose parent is strictly past `start`
    /// on that side (a range starting at `start` is past a node that starts below it).
    #[inline(never)]
    fn finger(&mut self, start: u64) -> u32 {
        let mut i = self.hint;
        if i == NIL {
            return self.root;
        }
        let below = match start.cmp(&self.n(i).start) {
            core::cmp::Ordering::Less => true,
            core::cmp::Ordering::Greater => false,
            // The hint itself, or (after a sentinel of that start) its neighbour.
            core::cmp::Ordering::Equal => return self.root,
        };
        loop {
            let p = self.n(i).parent;
            if p == NIL {
                return i;
            }
            self.stats.visited += 1;
            let pn = self.n(p);
            if below && pn.right == i && pn.start < start {
                return i;
            }
            if !below && pn.left == i && pn.start > start {
                return i;
            }
            i = p;
        }
    }

    /// An occupied non-sentinel range overlapping `[s, e)`, if any.
    pub fn overlapping(&mut self, s: u64, e: u64) -> Option<(u64, u64)> {
        self.settle();
        let mut t = self.root;
        while t != NIL {
            self.stats.visited += 1;
            let n = *self.n(t);
            if n.end <= s {
                t = n.right;
            } else if n.start >= e {
                t = n.left;
            } else if n.kind == Kind::Sentinel {
                // A zero-length sentinel inside [s, e) occupies nothing.
                t = if n.start <= s { n.right } else { n.left };
            } else {
                return Some((n.start, n.end));
            }
        }
        None
    }

    /// Removes node `x` (not a sentinel) and recycles its slot. Out of line: the paths that
    /// may call it (through `settle`) stay small when there is nothing to remove.
    #[inline(never)]
    fn remove_node(&mut self, x: u32) {
        let succ = self.unlink(x);
        // The successor's gap grew. Above the hint (always, if `x` was the hint): it becomes
        // the hint, and `above` still bounds every gap above it (a subset of those above the
        // old hint). At or below the hint: no gap above the hint changed.
        if succ == NIL {
            // Cannot happen (the top sentinel follows every range): give up the hint.
            self.hint = self.root_max();
            self.above = u64::MAX;
        } else if self.key(succ) > self.key(self.hint) {
            self.hint = succ;
        }
        for r in &mut self.recent {
            if *r == x {
                *r = NIL;
            }
        }
        // Capacity was reserved at insertion: this push never allocates.
        self.free_slots.push(x);
    }

    /// Unlinks the vacancy, if any: every operation but the two that keep it calls this first,
    /// so that it sees the tree as if the vacancy had been unlinked at its free.
    #[inline]
    fn settle(&mut self) {
        let x = self.vacant;
        if x != NIL {
            self.vacant = NIL;
            self.remove_node(x);
        }
    }

    /// Takes the vacancy back for `f` if its range is exactly the highest fit of `f` (theory
    /// 6): every gap above it is below `above` (the hint's bound, or computed), so above its
    /// successor's gap nothing fits if `above < total`, and inside the gap it would merge into
    /// (from its predecessor's end to its successor's start) the highest fit must be its own
    /// start with its own length. Then unlinking it and linking the new range would give the
    /// same tree (a treap's shape is fixed by its keys and priorities, and the gaps return to
    /// what they are), so nothing moves.
    #[inline]
    fn retake(&mut self, f: &Fit, kind: Kind) -> Option<u64> {
        let x = self.vacant;
        let n = *self.n(x);
        if n.end - n.start != f.total {
            return None;
        }
        let succ = self.successor(x);
        if succ == NIL || f.place(n.start - n.gap, self.n(succ).start)? != n.start {
            return None;
        }
        // Last, as it may climb the tree.
        let above = if x == self.hint { self.above } else { self.max_gap_above(x, f.total) };
        if above >= f.total {
            return None;
        }
        self.vacant = NIL;
        self.n_mut(x).kind = kind;
        self.counts[kind as usize] += 1;
        self.recent = [x, self.recent[0]];
        // As after any allocation, the node is the hint; its gaps are those it had.
        self.hint = x;
        self.above = above;
        Some(n.start)
    }

    /// A bound on every gap above node `x` (of every node after it in order) that is below
    /// `enough` when the largest such gap is, or else some value of at least `enough`: the
    /// right subtree's maximum, then for each ancestor entered from its left, its own gap and
    /// its right subtree's maximum. One climb, O(depth), cut short at the first such ancestor
    /// after the hint when `above` is below `enough`: that ancestor and every node after it
    /// lie above the hint, so `above` bounds their gaps (theory 5).
    fn max_gap_above(&self, x: u32, enough: u64) -> u64 {
        let mut u = self.n(self.n(x).right).max_gap;
        let mut i = x;
        let hint_bounds = self.above < enough;
        let hint_key = self.key(self.hint);
        while u < enough {
            let p = self.n(i).parent;
            if p == NIL {
                break;
            }
            let pn = self.n(p);
            if pn.left == i {
                if hint_bounds && self.key(p) > hint_key {
                    return u.max(self.above);
                }
                u = u.max(pn.gap).max(self.n(pn.right).max_gap);
            }
            i = p;
        }
        u
    }

    /// The highest fit of `f`: its start, the node whose gap holds it (the new node's
    /// successor), and where a leaf holding it links (under which node, on which side).
    ///
    /// The order of theory 4, without recursion: descend into right subtrees while they may
    /// hold a fit; at a node whose right subtree is pruned or failed, try the node's own gap,
    /// then its left subtree; a node that fails hands the failure to its parent (through the
    /// parent link), which goes on below its right subtree if it came from there and fails
    /// too if it came from its left one.
    fn search(&mut self, f: &Fit) -> Option<Found> {
        let mut t = self.root;
        // A fit ends at or below the limit: it starts at or below `top`.
        let top = f.limit.checked_sub(f.total)?;
        if self.n(t).max_gap < f.total {
            return None;
        }
        // The largest gap passed over so far (every one lies above the fit, if one is found).
        let mut above = 0;
        let mut descend = true;
        loop {
            self.stats.visited += 1;
            let n = self.n(t);
            let (left, right, start, end, gap) = (n.left, n.right, n.start, n.end, n.gap);
            if descend && right != NIL {
                // Every gap of the right subtree lies at or above `end`: none fits if
                // `end + total` passes the limit.
                let r = self.n(right).max_gap;
                if end <= top && r >= f.total {
                    t = right;
                    continue;
                }
                above = above.max(r);
            }
            if gap >= f.total {
                if let Some(s) = f.place(start - gap, start) {
                    return Some(self.found(s, t, above));
                }
            }
            above = above.max(gap);
            if left != NIL {
                let l = self.n(left).max_gap;
                if l >= f.total {
                    t = left;
                    descend = true;
                    continue;
                }
                above = above.max(l);
            }
            // No fit at or below `t`: climb to the first ancestor entered from its right.
            loop {
                let p = self.n(t).parent;
                if p == NIL {
                    return None;
                }
                let from_right = self.n(p).right == t;
                t = p;
                if from_right {
                    break;
                }
            }
            descend = false;
        }
    }

    /// A fit at `s` in the gap below node `succ`, with `above` bounding every gap above
    /// `succ`: where its leaf links (the rightmost spot of `succ`'s left subtree).
    #[inline]
    fn found(&self, s: u64, succ: u32, above: u64) -> Found {
        let left = self.n(succ).left;
        if left == NIL {
            return Found { s, succ, at: succ, left: true, above };
        }
        let mut at = left;
        while self.n(at).right != NIL {
            at = self.n(at).right;
        }
        Found { s, succ, at, left: false, above }
    }

    /// The fit in the hint's gap, if every gap above the hint is too small for `f` (then
    /// it is the highest fit of the tree).
    #[inline]
    fn at_hint(&self, f: &Fit) -> Option<Found> {
        if self.above >= f.total {
            return None;
        }
        let n = self.n(self.hint);
        if n.gap < f.total {
            return None;
        }
        let s = f.place(n.start - n.gap, n.start)?;
        Some(self.found(s, self.hint, self.above))
    }

    /// Places `f` at the highest fitting address and records it as `kind`. Returns the start.
    #[inline]
    pub fn alloc(&mut self, f: &Fit, kind: Kind) -> Result<u64> {
        // The retake (theory 6) inline, everything else out of line, so that the common pair
        // pays for neither the search's registers nor its error paths. (A vacancy implies no
        // remembered failure: the free that made it forgot them all.)
        if self.vacant != NIL && !self.failed {
            if let Some(s) = self.retake(f, kind) {
                self.stats.retakes += 1;
                self.stats.allocs[kind as usize] += 1;
                return Ok(s);
            }
        }
        self.alloc_placed(f, kind)
    }

    /// [`Tree::alloc`] when the vacancy was not taken back: remembered failures, then the
    /// hint or a search.
    #[inline(never)]
    fn alloc_placed(&mut self, f: &Fit, kind: Kind) -> Result<u64> {
        if self.failed && self.fails.iter().flatten().any(|r| r.implies_failure_of(f)) {
            self.stats.fast_failures += 1;
            return Err(Error::Exhausted { size: f.size, limit: f.limit });
        }
        self.settle();
        let found = match self.at_hint(f) {
            Some(hit) => {
                self.stats.hint_hits += 1;
                Some(hit)
            }
            None => self.search(f),
        };
        let Some(found) = found else {
            self.fails[self.next_fail] = Some(*f);
            self.next_fail = (self.next_fail + 1) % FAIL_SLOTS;
            self.failed = true;
            return Err(Error::Exhausted { size: f.size, limit: f.limit });
        };
        self.insert_found(found, f, kind)
    }

    /// The highest fit of `f` if it starts at or above `floor`: `Ok(Ok(start))`, placed and
    /// recorded as `kind`; `Ok(Err(Some(s)))` if the highest fit starts at `s` below `floor`
    /// (nothing placed: every fit lies below `floor`); `Ok(Err(None))` if nothing fits. A
    /// miss records no failure (a fit may exist below the floor). The IOVA allocator's home
    /// regions (`iova` theory 9) search with it.
    pub fn alloc_above(
        &mut self,
        f: &Fit,
        floor: u64,
        kind: Kind,
    ) -> Result<core::result::Result<u64, Option<u64>>> {
        if self.failed && self.fails.iter().flatten().any(|r| r.implies_failure_of(f)) {
            self.stats.fast_failures += 1;
            return Ok(Err(None));
        }
        self.settle();
        let found = match self.at_hint(f) {
            Some(hit) => Some(hit),
            None => self.search(f),
        };
        match found {
            Some(found) if found.s >= floor => self.insert_found(found, f, kind).map(Ok),
            Some(found) => Ok(Err(Some(found.s))),
            None => Ok(Err(None)),
        }
    }

    /// Places `f` where `found` says and records it as `kind`. Returns the start.
    #[inline]
    fn insert_found(&mut self, found: Found, f: &Fit, kind: Kind) -> Result<u64> {
        let Found { s, succ, at, left, above } = found;
        let sn = *self.n(succ);
        let pred_end = sn.start - sn.gap;
        let x = self.new_node(s, s + f.total, s - pred_end, kind)?;
        let succ_gap = sn.start - (s + f.total);
        self.link(x, at, left, succ, succ_gap);
        self.recent = [x, self.recent[0]];
        // The gaps above the new node: the rest of its successor's and those above that.
        self.hint = x;
        self.above = above.max(succ_gap);
        self.stats.allocs[kind as usize] += 1;
        Ok(s)
    }

    /// Occupies exactly `[s, e)` as `kind`; fails with [`Error::AlreadyMapped`] on overlap.
    pub fn occupy(&mut self, s: u64, e: u64, kind: Kind) -> Result<()> {
        self.settle();
        if let Some((o, _)) = self.overlapping(s, e) {
            return Err(Error::AlreadyMapped { addr: o.max(s) });
        }
        self.insert_keyed(s, e, kind)
    }

    /// Frees the node at `start`, which must be of `kind` and occupy `total` bytes; `size` is
    /// what the caller believes it holds (used in error reports).
    ///
    /// Errors: [`Error::DoubleFree`] if nothing of that kind starts there,
    /// [`Error::WrongSize`] if it occupies a different length.
    ///
    /// `class_total`, when the caller's size has a size class, is what a class range of that
    /// class occupies: a [`Kind::Class`] node of that length found here means the range was
    /// freed into a cache already (a double free).
    pub fn free(
        &mut self,
        start: u64,
        size: u64,
        total: u64,
        kind: Kind,
        class_total: Option<u64>,
    ) -> Result<()> {
        self.settle();
        let Some(i) = self.lookup(start) else {
            return Err(Error::DoubleFree { addr: start, size });
        };
        let n = *self.n(i);
        if n.kind != kind {
            return Err(Self::kind_mismatch(start, size, total, &n, kind, class_total));
        }
        if n.end - n.start != total {
            let guard = total - size;
            return Err(Error::WrongSize { addr: start, given: size, actual: n.end - n.start - guard });
        }
        // Unlinked at the next operation, unless the next allocation takes it back.
        self.vacant = i;
        self.counts[kind as usize] -= 1;
        self.stats.frees[kind as usize] += 1;
        if self.failed {
            self.fails = [None; FAIL_SLOTS];
            self.failed = false;
        }
        Ok(())
    }

    #[cold]
    #[inline(never)]
    fn kind_mismatch(
        start: u64,
        size: u64,
        total: u64,
        n: &Node,
        want: Kind,
        class_total: Option<u64>,
    ) -> Error {
        match (n.kind, want) {
            (Kind::Reserved, _) => Error::BadState { what: "free of a reserved IOVA range" },
            (Kind::Window, _) => Error::BadState { what: "free of an IOVA window (use release_window)" },
            (_, Kind::Window) => Error::BadState { what: "release_window of a range that is not a window" },
            // A class range reached the tree path: its live mark was clear, so it sits in a
            // cache already (a double free) unless the caller's size names another class.
            (Kind::Class, _) if Some(n.end - n.start) == class_total => {
                Error::DoubleFree { addr: start, size }
            }
            (Kind::Class, _) => {
                let guard = total.saturating_sub(size);
                Error::WrongSize { addr: start, given: size, actual: (n.end - n.start).saturating_sub(guard) }
            }
            _ => Error::DoubleFree { addr: start, size },
        }
    }

    /// Length occupied by the node at `start`, if one (not a sentinel) starts there.
    pub fn occupied_len(&mut self, start: u64) -> Option<(u64, Kind)> {
        self.settle();
        let i = self.lookup(start)?;
        let n = self.n(i);
        Some((n.end - n.start, n.kind))
    }

    /// Checks every invariant of the tree (order, disjointness, augmentation, heap order);
    /// O(n), for tests and debugging.
    pub fn check(&self) -> core::result::Result<(), &'static str> {
        if self.root == NIL || self.n(self.root).parent != NIL {
            return Err("parent link");
        }
        if self.n(NIL).max_gap != 0 {
            return Err("dummy node");
        }
        let mut prev_end = None;
        self.check_at(self.root, &mut prev_end)?;
        Ok(())
    }

    fn check_at(&self, t: u32, prev_end: &mut Option<u64>) -> core::result::Result<(), &'static str> {
        if t == NIL {
            return Ok(());
        }
        let n = *self.n(t);
        for c in [n.left, n.right] {
            if c != NIL && self.n(c).prio > n.prio {
                return Err("heap order");
            }
            if c != NIL && self.n(c).parent != t {
                return Err("parent link");
            }
        }
        self.check_at(n.left, prev_end)?;
        if let Some(p) = *prev_end {
            if n.start < p {
                return Err("overlap or order");
            }
        }
        if n.gap != prev_end.map_or(0, |p| n.start - p) {
            return Err("gap below a node");
        }
        *prev_end = Some(n.end);
        self.check_at(n.right, prev_end)?;
        let mut max_gap = n.gap;
        for c in [n.left, n.right] {
            if c != NIL {
                max_gap = max_gap.max(self.n(c).max_gap);
            }
        }
        if max_gap != n.max_gap {
            return Err("augmentation");
        }
        Ok(())
    }

    /// Total free bytes (for tests): the sum of all gaps.
    pub fn free_bytes(&self) -> u64 {
        let mut v = Vec::new();
        self.collect(self.root, &mut v);
        // The vacancy is still linked but free.
        let vacant = if self.vacant == NIL { 0 } else { self.n(self.vacant).end - self.n(self.vacant).start };
        v.windows(2).map(|w| w[1].0 - w[0].1).sum::<u64>() + vacant
    }

    fn collect(&self, t: u32, out: &mut Vec<(u64, u64)>) {
        if t == NIL {
            return;
        }
        let n = self.n(t);
        self.collect(n.left, out);
        out.push((n.start, n.end));
        self.collect(n.right, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PAGE_SIZE;

    fn fit(pages: u64, align: u64, boundary: u64, limit: u64) -> Fit {
        Fit { size: pages * PAGE_SIZE, total: pages * PAGE_SIZE, align, boundary, limit }
    }

    #[test]
    fn placement_is_top_down() {
        let mut t = Tree::new(0x10_0000, 0x20_0000).unwrap();
        let a = t.alloc(&fit(1, PAGE_SIZE, 0, u64::MAX), Kind::Allocated).unwrap();
        assert_eq!(a, 0x20_0000 - PAGE_SIZE);
        let b = t.alloc(&fit(2, PAGE_SIZE, 0, 0x18_0000), Kind::Allocated).unwrap();
        assert_eq!(b, 0x18_0000 - 2 * PAGE_SIZE);
        t.check().unwrap();
    }

    #[test]
    fn alloc_above_places_only_at_or_above_its_floor_and_remembers_no_failure() {
        let mut t = Tree::new(0x10_0000, 0x20_0000).unwrap();
        // Occupy [0x18_0000, 0x20_0000): the highest fit below the top is then under 0x18_0000.
        t.occupy(0x18_0000, 0x20_0000, Kind::Allocated).unwrap();
        let f = fit(1, PAGE_SIZE, 0, 0x20_0000);
        assert_eq!(t.alloc_above(&f, 0x18_0000, Kind::Class).unwrap(), Err(Some(0x18_0000 - PAGE_SIZE)));
        assert_eq!(t.occupied_len(0x18_0000 - PAGE_SIZE), None, "a miss places nothing");
        assert_eq!(t.alloc_above(&f, 0x17_0000, Kind::Class).unwrap(), Ok(0x18_0000 - PAGE_SIZE));
        // Nothing fits below a limit at the space's start; a miss is not remembered, so the
        // same fit with a higher limit is still searched.
        assert_eq!(t.alloc_above(&fit(1, PAGE_SIZE, 0, 0x10_0000), 0, Kind::Class).unwrap(), Err(None));
        assert!(t.alloc(&fit(1, PAGE_SIZE, 0, 0x18_0000), Kind::Class).is_ok());
        t.check().unwrap();
    }

    #[test]
    fn place_honours_boundary() {
        let f = fit(3, 2 * PAGE_SIZE, 4 * PAGE_SIZE, u64::MAX);
        for hi in (8..64).map(|p| p * PAGE_SIZE) {
            if let Some(s) = f.place(0, hi) {
                assert_eq!(s % f.align, 0);
                assert_eq!(s / f.boundary, (s + f.size - 1) / f.boundary, "crosses at {s:#x}");
                assert!(s + f.total <= hi);
            }
        }
    }

    /// A free's lookup starts from the hint's subtree (`finger`): every range is found from
    /// there, on either side of the hint and however far, and a start that holds no range
    /// (or only a sentinel) is a double free.
    #[test]
    fn a_free_finds_its_range_on_either_side_of_the_hint() {
        let (base, end) = (0x10_0000, 0x10_0000 + 512 * PAGE_SIZE);
        let mut t = Tree::new(base, end).unwrap();
        let one = fit(1, PAGE_SIZE, 0, u64::MAX);
        let mut live: Vec<u64> = (0..300).map(|_| t.alloc(&one, Kind::Allocated).unwrap()).collect();
        // Frees alternately far below and far above wherever the hint now is, then near it.
        let mut k = 0u64;
        while !live.is_empty() {
            k = (k * 7 + 13) % 1009;
            let i = if k % 3 == 0 {
                live.len() / 2
            } else if k % 2 == 0 {
                0
            } else {
                live.len() - 1
            };
            let s = live.swap_remove(i.min(live.len() - 1));
            t.free(s, PAGE_SIZE, PAGE_SIZE, Kind::Allocated, None).unwrap();
            assert_eq!(
                t.free(s, PAGE_SIZE, PAGE_SIZE, Kind::Allocated, None),
                Err(Error::DoubleFree { addr: s, size: PAGE_SIZE })
            );
            if k % 5 == 0 {
                // A fresh allocation moves the hint.
                live.push(t.alloc(&one, Kind::Allocated).unwrap());
            }
            t.check().unwrap();
        }
        for s in [base, end] {
            assert_eq!(
                t.free(s, PAGE_SIZE, PAGE_SIZE, Kind::Allocated, None),
                Err(Error::DoubleFree { addr: s, size: PAGE_SIZE })
            );
        }
        assert_eq!(t.free_bytes(), end - base);
    }

    /// The two most recent allocations are tried first by a free's lookup, and a removal
    /// forgets them: a range freed, unlinked and freed again is a double free, however
    /// recently it was allocated.
    #[test]
    fn a_removed_recent_allocation_is_not_found_again() {
        let mut t = Tree::new(0x10_0000, 0x20_0000).unwrap();
        let one = fit(1, PAGE_SIZE, 0, u64::MAX);
        let a = t.alloc(&one, Kind::Allocated).unwrap();
        let b = t.alloc(&one, Kind::Allocated).unwrap();
        // `a` is the one before the last: found without a descent.
        t.free(a, PAGE_SIZE, PAGE_SIZE, Kind::Allocated, None).unwrap();
        // Another size settles the vacancy: `a` is unlinked and its slot recycled.
        let c = t.alloc(&fit(2, PAGE_SIZE, 0, u64::MAX), Kind::Allocated).unwrap();
        assert_eq!(
            t.free(a, PAGE_SIZE, PAGE_SIZE, Kind::Allocated, None),
            Err(Error::DoubleFree { addr: a, size: PAGE_SIZE })
        );
        t.free(b, PAGE_SIZE, PAGE_SIZE, Kind::Allocated, None).unwrap();
        t.free(c, 2 * PAGE_SIZE, 2 * PAGE_SIZE, Kind::Allocated, None).unwrap();
        assert_eq!(
            t.free(b, PAGE_SIZE, PAGE_SIZE, Kind::Allocated, None),
            Err(Error::DoubleFree { addr: b, size: PAGE_SIZE })
        );
        t.check().unwrap();
        assert_eq!(t.free_bytes(), 0x10_0000);
    }

    /// A free of the last allocation defers its unlinking; the next allocation takes the node
    /// back only where a search would have placed it, and anything else unlinks it first.
    #[test]
    fn the_last_freed_range_is_taken_back_only_where_the_search_would_place_it() {
        let mut t = Tree::new(0x10_0000, 0x20_0000).unwrap();
        let one = fit(1, PAGE_SIZE, 0, u64::MAX);
        let a = t.alloc(&one, Kind::Allocated).unwrap();
        let b = t.alloc(&one, Kind::Allocated).unwrap();
        t.free(b, PAGE_SIZE, PAGE_SIZE, Kind::Allocated, None).unwrap();
        assert_eq!(t.free_bytes(), 0x10_0000 - PAGE_SIZE);
        assert_eq!(t.alloc(&one, Kind::Allocated).unwrap(), b);
        assert_eq!(t.stats.retakes, 1);
        t.check().unwrap();
        // Another size: the vacancy is unlinked and the search places the range top-down.
        t.free(b, PAGE_SIZE, PAGE_SIZE, Kind::Allocated, None).unwrap();
        let two = t.alloc(&fit(2, PAGE_SIZE, 0, u64::MAX), Kind::Allocated).unwrap();
        assert_eq!(two, a - 2 * PAGE_SIZE, "the vacancy and the gap below it merged: {two:#x}");
        assert_eq!(t.stats.retakes, 1);
        t.check().unwrap();
        // A higher gap appears (the top range is freed): the vacancy below is not the fit.
        let c = t.alloc(&one, Kind::Allocated).unwrap();
        t.free(a, PAGE_SIZE, PAGE_SIZE, Kind::Allocated, None).unwrap();
        t.free(c, PAGE_SIZE, PAGE_SIZE, Kind::Allocated, None).unwrap();
        assert_eq!(t.alloc(&one, Kind::Allocated).unwrap(), a);
        // A double free of the vacancy is still a double free.
        t.free(a, PAGE_SIZE, PAGE_SIZE, Kind::Allocated, None).unwrap();
        assert_eq!(
            t.free(a, PAGE_SIZE, PAGE_SIZE, Kind::Allocated, None),
            Err(Error::DoubleFree { addr: a, size: PAGE_SIZE })
        );
        t.check().unwrap();
        assert_eq!(t.free_bytes(), 0x10_0000 - 2 * PAGE_SIZE);
        // Placed low by its limit, freed, then asked for without one: a higher gap fits.
        let low = t.alloc(&fit(1, PAGE_SIZE, 0, 0x18_0000), Kind::Allocated).unwrap();
        assert_eq!(low, 0x18_0000 - PAGE_SIZE);
        t.free(low, PAGE_SIZE, PAGE_SIZE, Kind::Allocated, None).unwrap();
        assert_eq!(t.alloc(&one, Kind::Allocated).unwrap(), a);
        // And by its alignment.
        let aligned = t.alloc(&fit(1, 0x4_0000, 0, u64::MAX), Kind::Allocated).unwrap();
        assert_eq!(aligned, 0x1C_0000);
        t.free(aligned, PAGE_SIZE, PAGE_SIZE, Kind::Allocated, None).unwrap();
        assert_eq!(t.alloc(&one, Kind::Allocated).unwrap(), c);
        t.check().unwrap();
    }

    /// The vacancy ends where its successor starts, so its merged gap places exactly on it;
    /// but a higher gap, which its own request's limit excluded, fits the next request.
    #[test]
    fn the_last_freed_range_is_not_taken_back_below_a_higher_fit() {
        let mut t = Tree::new(0x10_0000, 0x20_0000).unwrap();
        let one = fit(1, PAGE_SIZE, 0, u64::MAX);
        let free = |t: &mut Tree, s| t.free(s, PAGE_SIZE, PAGE_SIZE, Kind::Allocated, None).unwrap();
        let _z = t.alloc(&one, Kind::Allocated).unwrap();
        let g = t.alloc(&one, Kind::Allocated).unwrap();
        let y = t.alloc(&one, Kind::Allocated).unwrap();
        free(&mut t, g);
        let x = t.alloc(&fit(1, PAGE_SIZE, 0, y), Kind::Allocated).unwrap();
        assert_eq!(x, y - PAGE_SIZE);
        free(&mut t, x);
        assert_eq!(t.alloc(&one, Kind::Allocated).unwrap(), g);
        assert_eq!(t.stats.retakes, 0);
        t.check().unwrap();
    }

    /// A ring: the oldest range, freed, is the highest hole, and is taken back although it is
    /// not the last allocated; a middle one below a higher hole is not.
    #[test]
    fn a_ring_takes_its_oldest_range_back_when_it_is_the_highest_fit() {
        let mut t = Tree::new(0x10_0000, 0x20_0000).unwrap();
        let one = fit(1, PAGE_SIZE, 0, u64::MAX);
        let free = |t: &mut Tree, s| t.free(s, PAGE_SIZE, PAGE_SIZE, Kind::Allocated, None).unwrap();
        let r: Vec<u64> = (0..3).map(|_| t.alloc(&one, Kind::Allocated).unwrap()).collect();
        free(&mut t, r[0]);
        assert_eq!(t.alloc(&one, Kind::Allocated).unwrap(), r[0]);
        assert_eq!(t.stats.retakes, 1);
        // r[0] free above r[1]: freeing r[1] leaves a vacancy below a higher fit.
        free(&mut t, r[0]);
        let _ = t.occupied_len(r[0]); // settles r[0]
        free(&mut t, r[1]);
        assert_eq!(t.alloc(&one, Kind::Allocated).unwrap(), r[0]);
        assert_eq!(t.stats.retakes, 1);
        assert_eq!(t.alloc(&one, Kind::Allocated).unwrap(), r[1]);
        t.check().unwrap();
        assert_eq!(t.free_bytes(), 0x10_0000 - 3 * PAGE_SIZE);
        // A hole higher up, apart from the vacancy (a live range between): not taken back,
        // wherever the hole sits in the tree relative to the vacancy's node.
        for live in [8, 64, 250] {
            let mut t = Tree::new(0x10_0000, 0x20_0000).unwrap();
            let r: Vec<u64> = (0..live).map(|_| t.alloc(&one, Kind::Allocated).unwrap()).collect();
            for hole in 0..live - 2 {
                for below in hole + 2..live {
                    free(&mut t, r[hole]);
                    let _ = t.occupied_len(r[hole]);
                    free(&mut t, r[below]);
                    assert_eq!(t.alloc(&one, Kind::Allocated).unwrap(), r[hole], "{live} {hole} {below}");
                    assert_eq!(t.alloc(&one, Kind::Allocated).unwrap(), r[below]);
                    if below > hole + 40 {
                        break;
                    }
                }
            }
            t.check().unwrap();
        }
    }

    #[test]
    fn remembered_failure_short_circuits_and_is_forgotten_on_free() {
        let mut t = Tree::new(0, 16 * PAGE_SIZE).unwrap();
        let a = t.alloc(&fit(16, PAGE_SIZE, 0, u64::MAX), Kind::Allocated).unwrap();
        assert!(t.alloc(&fit(1, PAGE_SIZE, 0, 1 << 32), Kind::Allocated).is_err());
        let before = t.stats.fast_failures;
        assert!(t.alloc(&fit(2, PAGE_SIZE, 0, 1 << 32), Kind::Allocated).is_err());
        assert_eq!(t.stats.fast_failures, before + 1);
        t.free(a, 16 * PAGE_SIZE, 16 * PAGE_SIZE, Kind::Allocated, None).unwrap();
        assert!(t.alloc(&fit(2, PAGE_SIZE, 0, 1 << 32), Kind::Allocated).is_ok());
    }
}
