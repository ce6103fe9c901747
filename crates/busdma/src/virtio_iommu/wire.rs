//! The virtio-iommu wire format (virtio 1.2, section 5.13): feature bits, the configuration
//! layout, requests as the device reads them, status codes, PROBE properties and fault events.
//! Pure encoding and decoding: no hardware here, so every layout is tested on the host.
#![forbid(unsafe_code)]

use alloc::vec::Vec;

use crate::addr::{AddrRange, Iova, PhysAddr};
use crate::error::{Error, Result};

/// Feature bits (virtio-iommu's own in 0..24, the transport's above).
pub mod feature {
    /// `input_range` in the configuration is valid.
    pub const INPUT_RANGE: u64 = 1 << 0;
    /// `domain_range` in the configuration is valid.
    pub const DOMAIN_RANGE: u64 = 1 << 1;
    /// MAP and UNMAP requests are supported.
    pub const MAP_UNMAP: u64 = 1 << 2;
    /// Unattached endpoints bypass the IOMMU (legacy; this driver never accepts it).
    pub const BYPASS: u64 = 1 << 3;
    /// PROBE requests are supported.
    pub const PROBE: u64 = 1 << 4;
    /// MAP may map MMIO (flag `MMIO`).
    pub const MMIO: u64 = 1 << 5;
    /// The `bypass` configuration byte is writable (this driver writes 0: no bypass).
    pub const BYPASS_CONFIG: u64 = 1 << 6;
    /// A modern (virtio 1.x) device.
    pub const VERSION_1: u64 = 1 << 32;

    /// What the driver requires of the device.
    pub const REQUIRED: u64 = VERSION_1 | MAP_UNMAP;
    /// What the driver accepts when offered (never [`BYPASS`]).
    pub const WANTED: u64 = REQUIRED | INPUT_RANGE | DOMAIN_RANGE | PROBE | BYPASS_CONFIG;
}

/// Byte offsets in the device configuration.
pub mod config {
    /// `le64 page_size_mask`.
    pub const PAGE_SIZE_MASK: u64 = 0;
    /// `le64 input_range.start`, then `le64 input_range.end` (inclusive).
    pub const INPUT_START: u64 = 8;
    /// `le64 input_range.end`.
    pub const INPUT_END: u64 = 16;
    /// `le32 domain_range.start`, then `le32 domain_range.end` (inclusive).
    pub const DOMAIN_START: u64 = 24;
    /// `le32 domain_range.end`.
    pub const DOMAIN_END: u64 = 28;
    /// `le32 probe_size`.
    pub const PROBE_SIZE: u64 = 32;
    /// `u8 bypass`.
    pub const BYPASS: u64 = 36;
}

/// MAP flags.
pub mod map_flags {
    /// The device may read.
    pub const READ: u32 = 1;
    /// The device may write.
    pub const WRITE: u32 = 2;
}

/// Request types.
const T_ATTACH: u8 = 1;
const T_DETACH: u8 = 2;
const T_MAP: u8 = 3;
const T_UNMAP: u8 = 4;
const T_PROBE: u8 = 5;

/// Bytes of the device-writable tail of every request: `u8 status; u8 reserved[3]`.
pub const TAIL: usize = 4;
/// Bytes of the largest device-readable part (MAP: head 4, domain 4, start 8, end 8, phys 8,
/// flags 4).
pub const MAX_OUT: usize = 36;
/// Bytes of a PROBE's device-readable part: head 4, endpoint 4, reserved 64.
pub const PROBE_OUT: usize = 72;
/// Bytes of a fault event: reason 1, reserved 3, flags 4, endpoint 4, reserved 4, address 8.
pub const FAULT_EVENT: usize = 24;

/// One request, as the driver builds it. Ranges are half-open here; the wire's are inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Attach `endpoint` to `domain` (creating the domain), blocking everything unmapped.
    Attach {
        /// Domain number (inside `domain_range`).
        domain: u32,
        /// Endpoint (PCI requester id).
        endpoint: u32,
    },
    /// Detach `endpoint` from `domain`.
    Detach {
        /// Domain number.
        domain: u32,
        /// Endpoint.
        endpoint: u32,
    },
    /// Map `range` of `domain` to `pa`.
    Map {
        /// Domain number.
        domain: u32,
        /// IOVA range (non-empty).
        range: AddrRange<Iova>,
        /// Physical start.
        pa: PhysAddr,
        /// [`map_flags`].
        flags: u32,
    },
    /// Unmap every mapping inside `range` of `domain`.
    Unmap {
        /// Domain number.
        domain: u32,
        /// IOVA range (non-empty).
        range: AddrRange<Iova>,
    },
}

impl Request {
    /// The request's name, as errors carry it.
    pub const fn name(&self) -> &'static str {
        match self {
            Request::Attach { .. } => "ATTACH",
            Request::Detach { .. } => "DETACH",
            Request::Map { .. } => "MAP",
            Request::Unmap { .. } => "UNMAP",
        }
    }

    /// (domain, first address or endpoint): what an error about it names.
    pub fn subject(&self) -> (u64, u64) {
        match *self {
            Request::Attach { domain, endpoint } | Request::Detach { domain, endpoint } => {
                (u64::from(domain), u64::from(endpoint))
            }
            Request::Map { domain, range, .. } | Request::Unmap { domain, range } => {
                (u64::from(domain), range.start().raw())
            }
        }
    }

    /// Writes the device-readable part into `out` and returns its length.
    ///
    /// Errors: [`Error::ZeroSize`] for an empty range.
    pub fn encode(&self, out: &mut [u8; MAX_OUT]) -> Result<usize> {
        *out = [0; MAX_OUT];
        let inclusive_end = |r: &AddrRange<Iova>| -> Result<u64> {
            if r.is_empty() {
                return Err(Error::ZeroSize);
            }
            Ok(r.end().raw() - 1)
        };
        match *self {
            Request::Attach { domain, endpoint } | Request::Detach { domain, endpoint } => {
                out[0] = if matches!(self, Request::Attach { .. }) { T_ATTACH } else { T_DETACH };
                out[4..8].copy_from_slice(&domain.to_le_bytes());
                out[8..12].copy_from_slice(&endpoint.to_le_bytes());
                // ATTACH: le32 flags (0: no bypass), u8 reserved[4]; DETACH: u8 reserved[8].
                Ok(20)
            }
            Request::Map { domain, range, pa, flags } => {
                out[0] = T_MAP;
                out[4..8].copy_from_slice(&domain.to_le_bytes());
                out[8..16].copy_from_slice(&range.start().raw().to_le_bytes());
                out[16..24].copy_from_slice(&inclusive_end(&range)?.to_le_bytes());
                out[24..32].copy_from_slice(&pa.raw().to_le_bytes());
                out[32..36].copy_from_slice(&flags.to_le_bytes());
                Ok(36)
            }
            Request::Unmap { domain, range } => {
                out[0] = T_UNMAP;
                out[4..8].copy_from_slice(&domain.to_le_bytes());
                out[8..16].copy_from_slice(&range.start().raw().to_le_bytes());
                out[16..24].copy_from_slice(&inclusive_end(&range)?.to_le_bytes());
                // u8 reserved[4]
                Ok(28)
            }
        }
    }
}

/// A PROBE request's device-readable part for `endpoint`.
pub fn encode_probe(endpoint: u32) -> [u8; PROBE_OUT] {
    let mut out = [0u8; PROBE_OUT];
    out[0] = T_PROBE;
    out[4..8].copy_from_slice(&endpoint.to_le_bytes());
    out
}

/// A status code the device wrote into a request's tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// 0: done.
    Ok,
    /// Anything else: the raw code (1 IOERR, 2 UNSUPP, 3 DEVERR, 4 INVAL, 5 RANGE, 6 NOENT,
    /// 7 FAULT, 8 NOMEM).
    Failed(u8),
}

impl Status {
    /// Decodes a tail's status byte.
    pub const fn from_tail(code: u8) -> Self {
        if code == 0 { Status::Ok } else { Status::Failed(code) }
    }

    /// `Ok(())`, or the error naming `req` and the code.
    pub fn check(self, req: &Request) -> Result<()> {
        match self {
            Status::Ok => Ok(()),
            Status::Failed(status) => {
                let (domain, addr) = req.subject();
                Err(Error::RequestFailed { request: req.name(), status, domain, addr })
            }
        }
    }
}

/// The kind of a reserved region a PROBE reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReservedKind {
    /// Subtype 0: no mapping may be made there; accesses fault.
    Reserved,
    /// Subtype 1: the MSI doorbell window: accesses reach the interrupt controller
    /// untranslated; no mapping may be made there.
    Msi,
    /// Any other subtype (treated as reserved).
    Other(u8),
}

/// One reserved region of an endpoint (half-open; the wire's end is inclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReservedRegion {
    /// What it is.
    pub kind: ReservedKind,
    /// Where it is.
    pub range: AddrRange<Iova>,
}

/// PROBE property types (the low 12 bits of `type`).
const PROP_NONE: u16 = 0;
const PROP_RESV_MEM: u16 = 1;

/// Decodes a PROBE answer's properties (the `probe_size` bytes before the tail) into the
/// reserved regions it lists. Unknown properties are skipped; a NONE property ends the list.
///
/// Errors: [`Error::InvalidArgument`] for a property that runs past the buffer or a reserved
/// region whose end is below its start; [`Error::NoMemory`].
pub fn parse_probe(props: &[u8]) -> Result<Vec<ReservedRegion>> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + 4 <= props.len() {
        let ty = u16::from_le_bytes([props[at], props[at + 1]]) & 0xfff;
        let len = usize::from(u16::from_le_bytes([props[at + 2], props[at + 3]]));
        if ty == PROP_NONE {
            break;
        }
        let body = at + 4;
        let Some(end) = body.checked_add(len).filter(|&e| e <= props.len()) else {
            return Err(Error::InvalidArgument {
                what: "PROBE property runs past the buffer",
                value: at as u64,
            });
        };
        if ty == PROP_RESV_MEM {
            if len < 20 {
                return Err(Error::InvalidArgument {
                    what: "PROBE RESV_MEM property too short",
                    value: len as u64,
                });
            }
            let b = &props[body..end];
            let kind = match b[0] {
                0 => ReservedKind::Reserved,
                1 => ReservedKind::Msi,
                k => ReservedKind::Other(k),
            };
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[4..12]);
            let start = u64::from_le_bytes(w);
            w.copy_from_slice(&b[12..20]);
            let last = u64::from_le_bytes(w);
            if last < start {
                return Err(Error::InvalidArgument {
                    what: "PROBE reserved region ends below its start",
                    value: start,
                });
            }
            // A region reaching the top of the space is clipped by one byte so it stays
            // representable half-open; nothing can be mapped at the last byte anyway.
            let range = AddrRange::new(Iova::new(start), Iova::new(last.saturating_add(1)))?;
            out.try_reserve(1).map_err(|_| Error::NoMemory { requested: 32 })?;
            out.push(ReservedRegion { kind, range });
        }
        at = end;
    }
    Ok(out)
}

/// Why the device reported a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultReason {
    /// 0: unknown (QEMU: an endpoint attached to no domain).
    Unknown,
    /// 1: the endpoint's domain is invalid.
    Domain,
    /// 2: no mapping (or not the permission) for the address.
    Mapping,
    /// Any other code.
    Other(u8),
}

/// Fault flags.
pub mod fault_flags {
    /// The access was a read.
    pub const READ: u32 = 1;
    /// The access was a write.
    pub const WRITE: u32 = 2;
    /// The access was an instruction fetch.
    pub const EXEC: u32 = 4;
    /// The `address` field is valid.
    pub const ADDRESS: u32 = 0x100;
}

/// A fault record from the event queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    /// Why.
    pub reason: FaultReason,
    /// [`fault_flags`].
    pub flags: u32,
    /// The endpoint (PCI requester id) that faulted.
    pub endpoint: u32,
    /// The faulting IOVA, when `flags` has [`fault_flags::ADDRESS`].
    pub address: Option<Iova>,
}

impl FaultRecord {
    /// Decodes a fault event.
    pub fn decode(b: &[u8; FAULT_EVENT]) -> Self {
        let reason = match b[0] {
            0 => FaultReason::Unknown,
            1 => FaultReason::Domain,
            2 => FaultReason::Mapping,
            r => FaultReason::Other(r),
        };
        let flags = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let endpoint = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[16..24]);
        let address = (flags & fault_flags::ADDRESS != 0).then(|| Iova::new(u64::from_le_bytes(w)));
        Self { reason, flags, endpoint, address }
    }

    /// Whether the faulting access was a write.
    pub fn is_write(&self) -> bool {
        self.flags & fault_flags::WRITE != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(a: u64, b: u64) -> AddrRange<Iova> {
        AddrRange::new(Iova::new(a), Iova::new(b)).unwrap()
    }

    #[test]
    fn map_requests_carry_inclusive_ends_and_little_endian_fields() {
        let mut out = [0u8; MAX_OUT];
        let req =
            Request::Map { domain: 7, range: r(0x1000, 0x3000), pa: PhysAddr::new(0x1234_5000), flags: 3 };
        assert_eq!(req.encode(&mut out).unwrap(), 36);
        assert_eq!(out[0], T_MAP);
        assert_eq!(&out[4..8], &7u32.to_le_bytes());
        assert_eq!(&out[8..16], &0x1000u64.to_le_bytes());
        assert_eq!(&out[16..24], &0x2fffu64.to_le_bytes());
        assert_eq!(&out[24..32], &0x1234_5000u64.to_le_bytes());
        assert_eq!(&out[32..36], &3u32.to_le_bytes());
    }

    #[test]
    fn empty_ranges_are_never_sent() {
        let mut out = [0u8; MAX_OUT];
        let req = Request::Unmap { domain: 1, range: AddrRange::empty_at(Iova::new(0x1000)) };
        assert_eq!(req.encode(&mut out), Err(Error::ZeroSize));
    }

    #[test]
    fn error_statuses_become_errors_naming_the_request() {
        let req = Request::Unmap { domain: 3, range: r(0x5000, 0x6000) };
        assert_eq!(Status::from_tail(0).check(&req), Ok(()));
        assert_eq!(
            Status::from_tail(6).check(&req),
            Err(Error::RequestFailed { request: "UNMAP", status: 6, domain: 3, addr: 0x5000 })
        );
    }

    #[test]
    fn probe_answers_yield_their_reserved_regions_half_open() {
        let mut props = [0u8; 64];
        props[0..2].copy_from_slice(&1u16.to_le_bytes());
        props[2..4].copy_from_slice(&20u16.to_le_bytes());
        props[4] = 1; // MSI
        props[8..16].copy_from_slice(&0xfee0_0000u64.to_le_bytes());
        props[16..24].copy_from_slice(&0xfeef_ffffu64.to_le_bytes());
        let regions = parse_probe(&props).unwrap();
        assert_eq!(regions, [ReservedRegion { kind: ReservedKind::Msi, range: r(0xfee0_0000, 0xfef0_0000) }]);
    }

    #[test]
    fn probe_properties_running_past_the_buffer_are_refused() {
        let mut props = [0u8; 16];
        props[0..2].copy_from_slice(&1u16.to_le_bytes());
        props[2..4].copy_from_slice(&20u16.to_le_bytes());
        assert!(matches!(parse_probe(&props), Err(Error::InvalidArgument { .. })));
    }

    #[test]
    fn fault_events_decode_endpoint_address_and_direction() {
        let mut b = [0u8; FAULT_EVENT];
        b[0] = 2;
        b[4..8].copy_from_slice(&(fault_flags::WRITE | fault_flags::ADDRESS).to_le_bytes());
        b[8..12].copy_from_slice(&0x18u32.to_le_bytes());
        b[16..24].copy_from_slice(&0x10_2000u64.to_le_bytes());
        let f = FaultRecord::decode(&b);
        assert_eq!(f.reason, FaultReason::Mapping);
        assert_eq!(f.endpoint, 0x18);
        assert_eq!(f.address, Some(Iova::new(0x10_2000)));
        assert!(f.is_write());
    }
}
