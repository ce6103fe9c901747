//! What the model IOMMU's commands cost: named profiles of assumed hardware latency.
//!
//! # Theory
//!
//! 1. **Why.** The model executes an invalidation in a few hundred nanoseconds of software
//!    (an IOTLB probe or scan), while real remapping hardware makes the CPU wait for a command
//!    round trip: submission, the unit draining its queue, a completion the CPU polls. Without
//!    that wait strict invalidation always beats deferred, the opposite of every real IOMMU.
//!    Under a *virtual* IOMMU the map request itself traps to the hypervisor as well.
//! 2. **What is charged.** [`IommuConfig::invalidation_latency_ns`] per invalidation command
//!    (ranged or whole-domain), and [`IommuConfig::map_latency_ns`] per map request (the
//!    [`busdma::iommu::IotlbInvalidator::invalidate_mapped`] hook, which busdma calls after
//!    every map). Both are spent as real time on the calling CPU: a spin on the machine's
//!    calibrated clock ([`crate::HostPlatform::spend_ns`]), never a sleep, because a driver
//!    polling a wait descriptor keeps its CPU. On a frozen clock the wait also advances the
//!    model clock by its latency, so tests see exactly the time charged.
//! 3. **The figures are assumptions.** The lab measures no hardware; each profile names the
//!    public figure it rests on and rounds it to a plain number. Where a source gives a range
//!    the profile takes its low end, so a profile never exaggerates the case for deferred
//!    invalidation.

use super::IommuConfig;

/// A named cost profile of the model IOMMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CostProfile {
    /// The profile's name, as the lab's `--iommu-cost` takes it.
    pub name: &'static str,
    /// Completion time of one invalidation command, ns.
    pub invalidation_latency_ns: u64,
    /// Time of one map request, ns (0 unless the IOMMU is emulated by a hypervisor).
    pub map_latency_ns: u64,
    /// Where the figures come from, and what is assumed.
    pub source: &'static str,
}

/// Every profile, the free one first.
pub const PROFILES: [CostProfile; 5] = [
    CostProfile {
        name: "none",
        invalidation_latency_ns: 0,
        map_latency_ns: 0,
        source: "no hardware cost: busdma's own software cost and the model's bookkeeping only",
    },
    CostProfile {
        name: "vtd-register",
        invalidation_latency_ns: 2_000,
        map_latency_ns: 0,
        // VT-d spec (Intel VT-d Architecture Specification, 6.5.1, register-based
        // invalidation): software writes IOTLB_REG (and IVA_REG for a page-selective flush),
        // then polls the IVT bit with uncached MMIO reads until the hardware clears it; the
        // registers are one per unit, so Linux serialises it under the unit's register lock
        // (drivers/iommu/intel/iommu.c, __iommu_flush_iotlb). Assumed: twice the queued wait,
        // several uncached MMIO round trips of a few hundred ns each.
        source: "VT-d register-based invalidation (spec 6.5.1: write IOTLB_REG, poll IVT with \
                 uncached MMIO reads); assumed 2 us, twice the queued wait",
    },
    CostProfile {
        name: "vtd-queued",
        invalidation_latency_ns: 1_000,
        map_latency_ns: 0,
        // VT-d queued invalidation (spec 6.5.2): an IOTLB descriptor followed by an
        // invalidation wait descriptor whose status write the CPU polls (Linux
        // qi_submit_sync). The cost of strict-mode invalidations is what motivates deferred
        // invalidation in the literature (Malka, Amit, Ben-Yehuda, Tsafrir, "rIOMMU: Efficient
        // IOMMU for I/O Devices that Employ Ring Buffers", ASPLOS 2015, whose abstract names
        // "costly invalidations"); the figure of 1 us is this project's assumption (the order
        // of a device round trip), not a number quoted from a measurement.
        source: "VT-d queued invalidation (spec 6.5.2: IOTLB descriptor + wait descriptor, \
                 polled); 1 us assumed (the order of a device round trip; not a quoted \
                 measurement)",
    },
    CostProfile {
        name: "smmuv3",
        invalidation_latency_ns: 1_000,
        map_latency_ns: 0,
        // SMMUv3 (Arm IHI 0070, the command queue): CMD_TLBI_* commands then a CMD_SYNC whose
        // completion the CPU polls (Linux arm-smmu-v3 __arm_smmu_cmdq_issue_cmdlist with
        // sync); the order of a microsecond, as for VT-d. Assumed equal to vtd-queued.
        source: "SMMUv3 CMD_TLBI_* + CMD_SYNC, completion polled (Arm IHI 0070); assumed ~1 us, \
                 as VT-d's queued wait",
    },
    CostProfile {
        name: "viommu",
        invalidation_latency_ns: 5_000,
        map_latency_ns: 5_000,
        // virtio-iommu (virtio spec 1.2, 5.13): every MAP request is sent and waited for
        // (Linux viommu_map_pages -> viommu_send_req_sync), and UNMAPs are waited for at the
        // IOTLB sync; each wait is a virtqueue kick, i.e. a VM exit to the VMM's device model
        // and back. A VM exit handled in the VMM's user space costs several microseconds.
        // VT-d caching mode under QEMU traps the same two points. Assumed 5 us each.
        source: "virtio-iommu MAP and UNMAP+sync (virtio 1.2 5.13), each a VM exit to the VMM; \
                 assumed 5 us per request",
    },
];

/// The profile the lab uses when none is named: VT-d queued invalidation, the common x86
/// server configuration.
pub const DEFAULT_PROFILE: &str = "vtd-queued";

impl CostProfile {
    /// The profile called `name`.
    pub fn named(name: &str) -> Option<Self> {
        PROFILES.iter().find(|p| p.name == name).copied()
    }

    /// The names of every profile, comma-separated (for error messages).
    pub fn names() -> String {
        PROFILES.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
    }

    /// `config` with this profile's latencies.
    pub fn apply(&self, config: IommuConfig) -> IommuConfig {
        IommuConfig {
            invalidation_latency_ns: self.invalidation_latency_ns,
            map_latency_ns: self.map_latency_ns,
            ..config
        }
    }
}
