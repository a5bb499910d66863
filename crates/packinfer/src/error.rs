//! The library's error type. Inside Rust every fallible call returns [`Result`]; the ffi layer
//! turns an [`Error`] into a C status code plus a thread-local message.

/// What went wrong, with a message that names the offending argument and value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    InvalidHandle(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    OutOfMemory(String),
    #[error("{0}")]
    PoolExhausted(String),
    #[error("{0}")]
    NoDevice(String),
    #[error("{0}")]
    Device(String),
    #[error("{0}")]
    Compile(String),
    #[error("{0}")]
    Internal(String),
}

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
