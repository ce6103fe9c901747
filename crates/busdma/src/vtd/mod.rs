//! Intel VT-d (placeholder while the driver is written).
