//! `--iommu-cost PROFILE` / `--inval-latency-ns N`: the assumed hardware cost of the model
//! IOMMU's commands, shared by every command that builds one (profiles and their sources:
//! `busdma_model::CostProfile`).

use busdma_model::{CostProfile, IommuConfig, iommu::DEFAULT_PROFILE};
use serde::Serialize;

/// The cost options of one command.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CostArgs {
    /// The model IOMMU's cost profile: none, vtd-register, vtd-queued, smmuv3, viommu
    /// (default vtd-queued; sources in busdma-model's iommu/cost.rs).
    #[arg(long, value_name = "PROFILE")]
    pub iommu_cost: Option<String>,
    /// An explicit invalidation latency in ns instead of a profile (profile name `custom`, no
    /// map latency).
    #[arg(long, value_name = "N", conflicts_with = "iommu_cost")]
    pub inval_latency_ns: Option<u64>,
}

/// A resolved cost, as every row prints it.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Cost {
    /// The profile's name, or `custom`.
    pub iommu_cost: String,
    /// Per invalidation command, ns.
    pub inval_latency_ns: u64,
    /// Per map request, ns.
    pub map_latency_ns: u64,
}

impl Cost {
    /// The cost of profile `name`.
    pub fn profile(name: &str) -> Result<Self, String> {
        let p = CostProfile::named(name)
            .ok_or_else(|| format!("unknown IOMMU cost profile {name:?}; known: {}", CostProfile::names()))?;
        Ok(Self {
            iommu_cost: p.name.into(),
            inval_latency_ns: p.invalidation_latency_ns,
            map_latency_ns: p.map_latency_ns,
        })
    }

    /// An explicit invalidation latency, no map latency.
    pub fn custom(inval_latency_ns: u64) -> Self {
        Self { iommu_cost: "custom".into(), inval_latency_ns, map_latency_ns: 0 }
    }

    /// The model IOMMU's configuration: the defaults with this cost.
    pub fn config(&self) -> IommuConfig {
        IommuConfig {
            invalidation_latency_ns: self.inval_latency_ns,
            map_latency_ns: self.map_latency_ns,
            ..IommuConfig::default()
        }
    }
}

impl CostArgs {
    /// The cost these options name (the default profile if none).
    pub fn resolve(&self) -> Result<Cost, String> {
        match (self.inval_latency_ns, &self.iommu_cost) {
            (Some(ns), _) => Ok(Cost::custom(ns)),
            (None, Some(name)) => Cost::profile(name),
            (None, None) => Cost::profile(DEFAULT_PROFILE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_a_hardware_profile_and_an_explicit_latency_is_custom() {
        let d = CostArgs::default().resolve().unwrap();
        assert_eq!(d.iommu_cost, DEFAULT_PROFILE);
        assert!(d.inval_latency_ns > 0);
        let c = CostArgs { inval_latency_ns: Some(250), ..Default::default() }.resolve().unwrap();
        assert_eq!(c, Cost { iommu_cost: "custom".into(), inval_latency_ns: 250, map_latency_ns: 0 });
        let v = CostArgs { iommu_cost: Some("viommu".into()), ..Default::default() }.resolve().unwrap();
        assert!(v.map_latency_ns > 0 && v.config().map_latency_ns == v.map_latency_ns);
        assert!(CostArgs { iommu_cost: Some("fast".into()), ..Default::default() }.resolve().is_err());
    }
}
