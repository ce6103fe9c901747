//! The one error type of busdma.
//!
//! # Theory
//!
//! Errors are small (`Copy`, at most a few words), carry the values that caused them, and
//! convert to a Linux errno ([`Error::errno`]) for kernels that speak errno. The enum is
//! `#[non_exhaustive]`: new capabilities add variants without breaking callers. Nothing in a
//! map path panics; exhaustion and misuse come back as one of these.
#![forbid(unsafe_code)]

use core::fmt;

/// Linux errno values, as returned by [`Error::errno`].
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: i32 = 1;
    /// Input/output error (hardware that failed a command).
    pub const EIO: i32 = 5;
    /// No such entry.
    pub const ENOENT: i32 = 2;
    /// Try again.
    pub const EAGAIN: i32 = 11;
    /// Out of memory.
    pub const ENOMEM: i32 = 12;
    /// Bad address.
    pub const EFAULT: i32 = 14;
    /// Device or resource busy.
    pub const EBUSY: i32 = 16;
    /// Entry exists.
    pub const EEXIST: i32 = 17;
    /// Invalid argument.
    pub const EINVAL: i32 = 22;
    /// File too large (bus_dma's answer to a load that exceeds the tag).
    pub const EFBIG: i32 = 27;
    /// No space left (address space exhausted).
    pub const ENOSPC: i32 = 28;
    /// Result out of range.
    pub const ERANGE: i32 = 34;
    /// Operation not supported.
    pub const EOPNOTSUPP: i32 = 95;
    /// Operation now in progress (a deferred load).
    pub const EINPROGRESS: i32 = 115;
    /// Operation cancelled (a deferred load whose map was destroyed or that was cancelled).
    pub const ECANCELED: i32 = 125;
}

/// Shorthand for `core::result::Result<T, Error>`.
pub type Result<T> = core::result::Result<T, Error>;

/// Everything that can go wrong in busdma, with the values that made it go wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A range that is empty, reversed, or otherwise meaningless: `[start, end)`.
    InvalidRange {
        /// Start of the rejected range.
        start: u64,
        /// End of the rejected range.
        end: u64,
    },
    /// `base + len` does not fit in 64 bits.
    Overflow {
        /// Base of the computation.
        base: u64,
        /// Length added to it.
        len: u64,
    },
    /// An address or size is not a multiple of the required alignment.
    Misaligned {
        /// The offending value.
        value: u64,
        /// The required alignment.
        align: u64,
    },
    /// An alignment that is not a power of two.
    BadAlignment {
        /// The rejected alignment.
        align: u64,
    },
    /// An address outside what the callee covers (RAM, a table's input width, a range).
    OutOfRange {
        /// The offending address (or offset).
        addr: u64,
        /// The first address (or offset) not covered.
        limit: u64,
    },
    /// A physical address that has no kernel virtual address in the direct map.
    NotDirectMapped {
        /// The physical address.
        pa: u64,
    },
    /// A physical range that is not entirely RAM ([`crate::Platform::is_ram`]) given where
    /// only RAM is allowed: a quick map, a physical copy or fill, cache maintenance by
    /// physical address.
    NotRam {
        /// Start of the range.
        pa: u64,
        /// Its length in bytes.
        len: u64,
    },
    /// A size of zero where a size is required.
    ZeroSize,
    /// A size that is not acceptable (not a page multiple, larger than allowed, ...).
    BadSize {
        /// The rejected size.
        size: u64,
        /// The largest (or required) size.
        limit: u64,
    },
    /// Memory (frames, table pages, descriptors) ran out.
    NoMemory {
        /// Bytes requested by the failing allocation.
        requested: u64,
    },
    /// No free address window satisfies the request (IOVA space, bounce zone).
    Exhausted {
        /// Size requested, in bytes.
        size: u64,
        /// Highest address that would have been acceptable (exclusive).
        limit: u64,
    },
    /// Something is already there: an overlapping mapping or registration.
    AlreadyMapped {
        /// The first conflicting address.
        addr: u64,
    },
    /// Nothing is there: unmapping or looking up what is not mapped or registered.
    NotMapped {
        /// The address looked up.
        addr: u64,
    },
    /// A free of something already free, or never allocated.
    DoubleFree {
        /// Start of the freed range.
        addr: u64,
        /// Its size.
        size: u64,
    },
    /// A free whose size differs from the allocation's.
    WrongSize {
        /// Start of the range.
        addr: u64,
        /// The size given by the caller.
        given: u64,
        /// The size that was allocated.
        actual: u64,
    },
    /// More segments than the tag allows.
    TooManySegments {
        /// Segments the load needs.
        needed: u64,
        /// Segments the tag allows.
        max: u64,
    },
    /// A resource is in use: `what` names it, `count` says how many users remain.
    Busy {
        /// The resource.
        what: &'static str,
        /// Remaining users (or mappings).
        count: u64,
    },
    /// A limit (memlock, zone bound) would be exceeded.
    LimitExceeded {
        /// The limit's name.
        what: &'static str,
        /// Amount that would be in use.
        requested: u64,
        /// The limit.
        limit: u64,
    },
    /// The operation is not valid in the object's current state (`what` says which).
    BadState {
        /// What was wrong.
        what: &'static str,
    },
    /// An argument is invalid for a reason no other variant names.
    InvalidArgument {
        /// Which argument and why.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// A bus-address window whose bounds make no sense together (an exclusion window whose
    /// `low` is not below its `high`).
    BadWindow {
        /// Which window and why.
        what: &'static str,
        /// Its low bound.
        low: u64,
        /// Its high bound.
        high: u64,
    },
    /// The request cannot be served by this platform or configuration.
    Unsupported {
        /// What is unsupported.
        what: &'static str,
    },
    /// Permission denied (e.g. reading physical frame numbers without privilege).
    PermissionDenied {
        /// What was refused.
        what: &'static str,
    },
    /// The operation was queued and will complete later (a deferred bounce load).
    InProgress,
    /// An IOMMU did not complete an invalidation: it reported an error (VT-d: an
    /// invalidation queue error, FSTS.IQE/ICE/ITE; a refused register command) or did not
    /// answer in time. What the invalidation would have made reusable (IOVA, table pages) is
    /// held back until a later invalidation of the domain succeeds (`busdma::iommu::Domain`).
    InvalidationFailed {
        /// What failed, and how.
        what: &'static str,
        /// The domain whose caches were being invalidated.
        domain: u64,
        /// The hardware's status when it failed (VT-d: FSTS; 0 for a time-out).
        status: u64,
    },
    /// A deferred load was cancelled before it completed (`PendingLoad::cancel`, or its map
    /// destroyed): what its callback receives.
    Cancelled,
    /// An IOMMU driven by requests (virtio-iommu) answered a request with an error status, or
    /// never answered it (status 0xff from the driver: a time-out).
    RequestFailed {
        /// The request (`"ATTACH"`, `"MAP"`, ...).
        request: &'static str,
        /// The device's status code (virtio-iommu: 1 IOERR, 2 UNSUPP, 3 DEVERR, 4 INVAL,
        /// 5 RANGE, 6 NOENT, 7 FAULT, 8 NOMEM; 0xff: no answer in time).
        status: u8,
        /// The domain the request named.
        domain: u64,
        /// The first address (or endpoint, for ATTACH/DETACH/PROBE) the request named.
        addr: u64,
    },
}

impl Error {
    /// The Linux errno this error corresponds to (positive).
    pub const fn errno(self) -> i32 {
        use errno::*;
        match self {
            Error::InvalidRange { .. }
            | Error::Overflow { .. }
            | Error::Misaligned { .. }
            | Error::BadAlignment { .. }
            | Error::ZeroSize
            | Error::BadSize { .. }
            | Error::DoubleFree { .. }
            | Error::WrongSize { .. }
            | Error::BadState { .. }
            | Error::InvalidArgument { .. }
            | Error::BadWindow { .. } => EINVAL,
            Error::OutOfRange { .. } => ERANGE,
            Error::NotDirectMapped { .. } | Error::NotRam { .. } => EFAULT,
            Error::NoMemory { .. } | Error::LimitExceeded { .. } => ENOMEM,
            Error::Exhausted { .. } => ENOSPC,
            Error::AlreadyMapped { .. } => EEXIST,
            Error::NotMapped { .. } => ENOENT,
            Error::TooManySegments { .. } => EFBIG,
            Error::Busy { .. } => EBUSY,
            Error::Unsupported { .. } => EOPNOTSUPP,
            Error::PermissionDenied { .. } => EPERM,
            Error::InProgress => EINPROGRESS,
            Error::InvalidationFailed { .. } => EIO,
            Error::Cancelled => ECANCELED,
            Error::RequestFailed { .. } => EIO,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::InvalidRange { start, end } => {
                write!(f, "invalid range [{start:#x}, {end:#x}): empty or reversed")
            }
            Error::Overflow { base, len } => {
                write!(f, "{base:#x} + {len:#x} overflows the 64-bit address space")
            }
            Error::Misaligned { value, align } => {
                write!(f, "{value:#x} is not aligned to {align:#x}")
            }
            Error::BadAlignment { align } => {
                write!(f, "alignment {align:#x} is not a power of two")
            }
            Error::OutOfRange { addr, limit } => {
                write!(f, "address {addr:#x} is outside the covered range (limit {limit:#x})")
            }
            Error::NotDirectMapped { pa } => {
                write!(f, "physical address {pa:#x} is not in the direct map")
            }
            Error::NotRam { pa, len } => {
                write!(f, "physical range [{pa:#x}, +{len:#x}) is not RAM")
            }
            Error::ZeroSize => write!(f, "size is zero"),
            Error::BadSize { size, limit } => write!(f, "size {size:#x} not acceptable (limit {limit:#x})"),
            Error::NoMemory { requested } => write!(f, "out of memory allocating {requested} bytes"),
            Error::Exhausted { size, limit } => {
                write!(f, "no free window of {size:#x} bytes below {limit:#x}")
            }
            Error::AlreadyMapped { addr } => write!(f, "{addr:#x} is already mapped"),
            Error::NotMapped { addr } => write!(f, "{addr:#x} is not mapped"),
            Error::DoubleFree { addr, size } => {
                write!(f, "free of [{addr:#x}, +{size:#x}) which is not allocated (double free?)")
            }
            Error::WrongSize { addr, given, actual } => {
                write!(f, "free of {addr:#x} with size {given:#x}, but {actual:#x} was allocated")
            }
            Error::TooManySegments { needed, max } => {
                write!(f, "load needs {needed} segments, the tag allows {max}")
            }
            Error::Busy { what, count } => write!(f, "{what} is busy ({count} users remain)"),
            Error::LimitExceeded { what, requested, limit } => {
                write!(f, "{what} limit exceeded: {requested} > {limit}")
            }
            Error::BadState { what } => write!(f, "invalid state: {what}"),
            Error::InvalidArgument { what, value } => write!(f, "invalid {what}: {value:#x}"),
            Error::BadWindow { what, low, high } => write!(f, "invalid {what}: ({low:#x}, {high:#x}]"),
            Error::Unsupported { what } => write!(f, "unsupported: {what}"),
            Error::PermissionDenied { what } => write!(f, "permission denied: {what}"),
            Error::InProgress => write!(f, "operation deferred; it completes by callback"),
            Error::RequestFailed { request, status, domain, addr } => write!(
                f,
                "IOMMU request {request} (domain {domain}, address/endpoint {addr:#x}) failed with \
                 status {status}"
            ),
            Error::InvalidationFailed { what, domain, status } => write!(
                f,
                "IOMMU invalidation of domain {domain} failed: {what} (status {status:#x}); \
                 what it would release is held back"
            ),
            Error::Cancelled => write!(f, "deferred load cancelled before it completed"),
        }
    }
}

impl core::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_is_small_and_copy() {
        fn is_copy<T: Copy>() {}
        is_copy::<Error>();
        // Five words at most: a name and two values, plus the tag.
        assert!(core::mem::size_of::<Error>() <= 40, "{}", core::mem::size_of::<Error>());
    }

    #[test]
    fn errno_matches_linux_for_the_common_cases() {
        assert_eq!(Error::NoMemory { requested: 1 }.errno(), 12);
        assert_eq!(Error::Busy { what: "region", count: 1 }.errno(), 16);
        assert_eq!(Error::ZeroSize.errno(), 22);
        assert_eq!(Error::TooManySegments { needed: 3, max: 2 }.errno(), 27);
        assert_eq!(Error::InProgress.errno(), 115);
        assert_eq!(Error::InvalidationFailed { what: "time-out", domain: 1, status: 0 }.errno(), 5);
    }
}
