//! Test support shared by the workspace's tests (not published): random batches with their
//! tensors and a float64 reference attention (`case`), and the harness of the tests that need a
//! GPU or NVRTC (`harness`), which reports them as ignored where those are missing.

pub mod case;
pub mod harness;

pub use case::*;
