//! PackInfer: attention for batches of LLM requests whose lengths differ wildly.
//!
//! Data flows one way: an engine calls the C ABI (the `packinfer-capi` crate), which checks and
//! converts; the planner (`plan`) turns the step's batch into a work list on the host; a backend
//! (`backend`) executes it on the CPU or on a CUDA device; the KV pool (`kv`) is the managed level,
//! where the library owns the cache. See docs/design.md for the why.

pub mod error;
pub mod types;
pub mod plan;
pub mod backend;
pub mod kv;

pub use error::{Error, Result};
