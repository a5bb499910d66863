//! PackInfer: attention for batches of LLM requests whose lengths differ wildly.
//!
//! Data flows one way: an engine calls the C ABI (the `packinfer-capi` crate), which checks and
//! converts; the planner ([`plan`]) turns the step's batch into a work list on the host; a
//! backend ([`backend`]) executes it on the CPU or on a CUDA device; the KV pool ([`kv`]) is the
//! managed level, where the library owns the cache. See docs/design.md for the why.
//!
//! The Rust API, in one step: describe the batch ([`types::Batch`], [`types::Shape`]), build a
//! [`plan::Plan`] with the device's [`plan::DeviceProfile`], bind it to a backend
//! ([`backend::open`], [`backend::Backend::bind`]) and run it once per layer
//! ([`backend::BoundPlan::run`], `unsafe`: it reads and writes the caller's tensors through
//! addresses). At the managed level a [`kv::KvPool`] supplies the page tables and the plan.

#![warn(missing_docs)]

pub mod backend;
pub mod error;
pub mod fp8;
pub mod kv;
pub mod plan;
#[doc(hidden)]
pub mod testing;
pub mod types;

pub use error::{Error, Result};
