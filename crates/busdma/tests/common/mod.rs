//! Shared pieces of busdma's integration tests.
#![allow(dead_code)]

#[cfg(loom)]
pub mod loom_bare;
