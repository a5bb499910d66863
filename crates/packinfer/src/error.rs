//! The library's error type. Inside Rust every fallible call returns [`Result`]; the ffi layer
//! turns an [`Error`] into a C status code plus a thread-local message.

/// What went wrong, with a message that names the offending argument and value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A value outside the API: an index out of range, a zero size, a size beyond a limit, an
    /// inconsistent plan.
    #[error("{0}")]
    InvalidArgument(String),
    /// A C handle that is null, destroyed, or of another kind (the C ABI's).
    #[error("{0}")]
    InvalidHandle(String),
    /// A valid value this backend cannot run (head_dim 80 or F32 on CUDA).
    #[error("{0}")]
    Unsupported(String),
    /// Host or device memory ran out.
    #[error("{0}")]
    OutOfMemory(String),
    /// The KV pool has no room for an append or a fork; the pool is unchanged.
    #[error("{0}")]
    PoolExhausted(String),
    /// CUDA was asked for where no driver, NVRTC or device is usable.
    #[error("{0}")]
    NoDevice(String),
    /// A CUDA call failed.
    #[error("{0}")]
    Device(String),
    /// NVRTC could not compile a kernel; the message carries its log.
    #[error("{0}")]
    Compile(String),
    /// A bug in the library.
    #[error("{0}")]
    Internal(String),
}

/// The library's result: `Err` is an [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `invalid!("kv_indptr[{i}] = {v} is smaller than kv_indptr[{}]", i - 1)` builds an
/// [`Error::InvalidArgument`] with a formatted message.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => { $crate::error::Error::InvalidArgument(format!($($arg)*)) };
}

/// Like [`invalid!`] for [`Error::Unsupported`].
#[macro_export]
macro_rules! unsupported {
    ($($arg:tt)*) => { $crate::error::Error::Unsupported(format!($($arg)*)) };
}
