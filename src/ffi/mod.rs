//! The C ABI: the only place with `extern "C"`. It converts and checks C arguments, looks up
//! handles, catches panics and turns errors into a status plus a thread-local message; the work
//! itself happens in `plan`, `kv` and `backend`.

mod api;
mod handles;
mod pool;
mod types;

pub use api::*;
pub use pool::*;
pub use types::*;

use std::cell::RefCell;
use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{Error, Result};
use crate::invalid;

/// Version of the C ABI; bumped when a function's signature or a struct's existing fields change.
pub const PACKINFER_ABI_VERSION: u32 = 1;

/// Result of every call. `packinfer_last_error()` says more about any status other than OK.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackinferStatus {
    Ok = 0,
    /// An argument is wrong; the message names it and its value.
    InvalidArgument = 1,
    /// A handle is null, destroyed, or of another library instance.
    InvalidHandle = 2,
    /// Valid, but not supported by this build or backend (a head_dim, a dtype).
    Unsupported = 3,
    OutOfMemory = 4,
    /// The KV pool has no room for the request; the pool is unchanged.
    PoolExhausted = 5,
    /// The CUDA backend was asked for where no CUDA driver, NVRTC or device is available.
    NoDevice = 6,
    /// A CUDA call failed.
    DeviceError = 7,
    /// NVRTC could not compile a kernel; the message carries its log.
    CompileError = 8,
    /// A bug in the library (a caught panic); the message says where.
    Internal = 9,
}

impl From<&Error> for PackinferStatus {
    fn from(e: &Error) -> Self {
        match e {
            Error::InvalidArgument(_) => PackinferStatus::InvalidArgument,
            Error::InvalidHandle(_) => PackinferStatus::InvalidHandle,
            Error::Unsupported(_) => PackinferStatus::Unsupported,
            Error::OutOfMemory(_) => PackinferStatus::OutOfMemory,
            Error::PoolExhausted(_) => PackinferStatus::PoolExhausted,
            Error::NoDevice(_) => PackinferStatus::NoDevice,
            Error::Device(_) => PackinferStatus::DeviceError,
            Error::Compile(_) => PackinferStatus::CompileError,
            Error::Internal(_) => PackinferStatus::Internal,
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: String) {
    let c = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Pointer to this thread's last error message (empty if none yet); valid until the next failing
/// call on this thread.
pub(crate) fn last_error_ptr() -> *const std::ffi::c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Runs the body of an export: errors become a status and `func: message` as the last error; a
/// panic becomes `Internal` with its message, and never unwinds into C.
pub(crate) fn guard(func: &str, body: impl FnOnce() -> Result<()>) -> PackinferStatus {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => PackinferStatus::Ok,
        Ok(Err(e)) => {
            set_last_error(format!("{func}: {e}"));
            PackinferStatus::from(&e)
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(format!("{func}: internal error, please report: {what}"));
            PackinferStatus::Internal
        }
    }
}

/// A caller's array as a slice; `name` is used in the message when it is null but `len > 0`.
///
/// # Safety
/// When non-null, `ptr` must point to `len` readable elements.
pub(crate) unsafe fn slice<'a, T>(name: &str, ptr: *const T, len: usize) -> Result<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(invalid!("{name} is a null pointer but {len} entries are expected"));
    }
    Ok(std::slice::from_raw_parts(ptr, len))
}

/// The caller's options struct, after checking its `struct_size` (the first field of every
/// options struct). A larger size is a newer header: the fields this library knows are read.
///
/// # Safety
/// When non-null, `ptr` must point to a struct that begins with a `size_t struct_size`.
pub(crate) unsafe fn options<'a, T>(name: &str, ptr: *const T) -> Result<&'a T> {
    if ptr.is_null() {
        return Err(invalid!("{name} is a null pointer"));
    }
    let size = *(ptr as *const usize);
    let want = std::mem::size_of::<T>();
    if size < want || size > want + 4096 {
        return Err(invalid!("{name}->struct_size = {size}, but this library expects sizeof = {want} (set struct_size = sizeof(the struct))"));
    }
    Ok(&*ptr)
}

/// Writes `value` to an out-parameter, or says which one was null.
///
/// # Safety
/// When non-null, `ptr` must be writable.
pub(crate) unsafe fn write_out<T>(name: &str, ptr: *mut T, value: T) -> Result<()> {
    if ptr.is_null() {
        return Err(invalid!("{name} is a null pointer"));
    }
    ptr.write(value);
    Ok(())
}

/// `guard` for the test suite, which checks that a panic becomes `Internal` (no export panics on
/// purpose, so this is the only way to reach that path from a test).
#[doc(hidden)]
pub fn guard_for_tests(func: &str, body: impl FnOnce() -> Result<()>) -> PackinferStatus {
    guard(func, body)
}
