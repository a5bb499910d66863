//! The C ABI of PackInfer: the only place with `extern "C"`. It converts and checks C arguments,
//! looks up handles, catches panics and turns errors into a status plus a thread-local message;
//! the work itself happens in the `packinfer` crate (plan, kv, backend). `libpackinfer` links
//! this crate into the C library; cbindgen makes `include/packinfer.h` from it alone (build.rs).

#![warn(missing_docs)]

mod api;
mod handles;
mod pool;
mod scheduler;
mod types;

pub use api::*;
pub use pool::*;
pub use scheduler::*;
pub use types::*;

use std::cell::RefCell;
use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};

use packinfer::error::{Error, Result};
use packinfer::invalid;

/// Version of the C ABI; bumped when a function's signature or a struct's existing fields change
/// (the shared library's SONAME carries it).
///
/// Within a version, structs grow only at their end. Every struct a caller passes in or out
/// begins with `struct_size = sizeof(the struct)` as the caller's header declares it: a smaller
/// size from an older header is accepted (fields it lacks take the values its `_default()`
/// function fills in; out-structs are written only as far as they reach), a larger one from a
/// newer header too (fields this library does not know are ignored); a size that ends inside a
/// field, or is older than the struct's first version, is INVALID_ARGUMENT. Structs without
/// `struct_size` (`PackinferKvLayout`, `PackinferPrefixGroup`, the handles) are frozen. Flag bits
/// this library does not know are INVALID_ARGUMENT.
///
/// Statuses follow one rule: INVALID_ARGUMENT for a value outside the API (a dtype that is no
/// `PackinferDtype`, a zero size, an index out of range, a size beyond a documented limit),
/// UNSUPPORTED for a valid value the context's backend cannot run (head_dim 80 on CUDA, F32 on
/// CUDA). Limits: 65536 query heads, 2^31 - 1 keys per request and query rows (tokens × query
/// heads) per step, 2^22 work items per plan.
pub const PACKINFER_ABI_VERSION: u32 = 1;

/// Result of every call. `packinfer_last_error()` says more about any status other than OK.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackinferStatus {
    /// Success.
    Ok = 0,
    /// An argument is wrong; the message names it and its value.
    InvalidArgument = 1,
    /// A handle is null, destroyed, or of another library instance.
    InvalidHandle = 2,
    /// Valid, but not supported by this build or backend (a head_dim, a dtype).
    Unsupported = 3,
    /// Host or device memory ran out.
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

/// What `packinfer_last_error` says on a thread whose storage is already destroyed (a call from
/// another thread-local's destructor at thread exit).
const NO_MESSAGE_AT_EXIT: &std::ffi::CStr = c"(no message: the calling thread is exiting and its error text is gone)";

fn set_last_error(message: String) {
    let c = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    // At thread exit the storage may be gone; the status still tells the caller what happened.
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

/// Pointer to this thread's last error message (empty if none yet); valid until the next failing
/// call on this thread.
pub(crate) fn last_error_ptr() -> *const std::ffi::c_char {
    LAST_ERROR.try_with(|e| e.borrow().as_ptr()).unwrap_or(NO_MESSAGE_AT_EXIT.as_ptr())
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

/// Refuses flag bits outside `known` (the OR of a flags enum's values): a caller built against a
/// newer header asks for behaviour this library lacks, which must not pass silently.
pub(crate) fn check_known_flags(name: &str, flags: u32, known: u32) -> Result<()> {
    if flags & !known != 0 {
        return Err(invalid!(
            "{name} = 0x{flags:x} has bits this library does not know (0x{:x}); known flags are 0x{known:x}",
            flags & !known
        ));
    }
    Ok(())
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
    // SAFETY: non-null, so `len` readable elements (this function's contract).
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// A struct of the ABI that begins with `size_t struct_size` and grows only at its end, so a
/// caller built against an older header passes a prefix of today's struct, and one built
/// against a newer header a longer struct whose extra fields this library does not know.
pub(crate) trait Versioned: Copy {
    /// The values fields take when the caller's struct is too old to have them: what the
    /// struct's `_default()` function fills in, which is also how the library behaved before the
    /// field existed.
    fn default_value() -> Self;
    /// (offset, size) of each field after `struct_size`, in order.
    fn fields() -> Vec<(usize, usize)>;
    /// How many of `fields` the struct had in ABI version 1's first release: the oldest struct a
    /// caller can pass.
    fn first_version_fields() -> usize;
}

/// Implements `Versioned` for an ABI struct: its default value, the fields of its first version
/// after `struct_size`, then the fields added since (a second list, if any).
macro_rules! versioned {
    ($t:ty, $default:expr, [$($field:ident),* $(,)?] $([$($added:ident),* $(,)?])?) => {
        impl $crate::Versioned for $t {
            fn default_value() -> Self {
                $default
            }
            fn fields() -> Vec<(usize, usize)> {
                let d = <$t as $crate::Versioned>::default_value();
                vec![$((std::mem::offset_of!($t, $field), std::mem::size_of_val(&d.$field)),)* $($((std::mem::offset_of!($t, $added), std::mem::size_of_val(&d.$added)),)*)?]
            }
            fn first_version_fields() -> usize {
                [$(stringify!($field)),*].len()
            }
        }
    };
}
pub(crate) use versioned;

/// Checks a caller's `struct_size`: at least the first version's struct, at most a newer
/// header's (this one plus 4 KiB, beyond which it is surely not a size), and never ending inside
/// a field.
fn check_struct_size<T: Versioned>(name: &str, size: usize) -> Result<()> {
    let want = std::mem::size_of::<T>();
    if size == want {
        // This header's struct: nothing to work out (packinfer_run reads one per layer).
        return Ok(());
    }
    let fields = T::fields();
    let word = std::mem::size_of::<usize>();
    // C rounds a struct's size up to its alignment, a size_t's for every struct that starts with one.
    let oldest = fields[..T::first_version_fields()].last().map_or(word, |&(at, len)| at + len).next_multiple_of(word);
    let cuts_a_field = size < want && fields.iter().any(|&(at, len)| size > at && size < at + len);
    if size < oldest || size > want + 4096 || cuts_a_field {
        return Err(invalid!(
            "{name}->struct_size = {size} is not the size of any version of this struct (this library's is {want}, the oldest {oldest}; set struct_size = sizeof(the struct))"
        ));
    }
    Ok(())
}

/// Reads the caller's struct: its first `struct_size` bytes over the default value, so the fields
/// an older header lacks take their defaults and those a newer header adds are ignored.
///
/// # Safety
/// When non-null, `ptr` must point to `struct_size` readable bytes that begin with a `size_t
/// struct_size`.
pub(crate) unsafe fn options<T: Versioned>(name: &str, ptr: *const T) -> Result<T> {
    if ptr.is_null() {
        return Err(invalid!("{name} is a null pointer"));
    }
    // SAFETY: non-null, so it begins with a readable `size_t struct_size` (this function's contract).
    let size = unsafe { (ptr as *const usize).read_unaligned() };
    check_struct_size::<T>(name, size)?;
    let mut value = T::default_value();
    let n = size.min(std::mem::size_of::<T>());
    // SAFETY: the caller's `size >= n` bytes are readable; `value` holds size_of::<T>() >= n.
    unsafe { std::ptr::copy_nonoverlapping(ptr as *const u8, &mut value as *mut T as *mut u8, n) };
    Ok(value)
}

/// Checks an out-struct's `struct_size` before any work is done for it.
///
/// # Safety
/// When non-null, `ptr` must point to a struct that begins with a `size_t struct_size`.
pub(crate) unsafe fn check_out<T: Versioned>(name: &str, ptr: *mut T) -> Result<()> {
    if ptr.is_null() {
        return Err(invalid!("{name} is a null pointer"));
    }
    // SAFETY: non-null, so it begins with a readable `size_t struct_size` (this function's contract).
    check_struct_size::<T>(name, unsafe { (ptr as *const usize).read_unaligned() })
}

/// Writes `value` into the caller's out-struct, as many bytes as its `struct_size` says (an older
/// header's struct is shorter), leaving `struct_size` as the caller set it.
///
/// # Safety
/// When non-null, `ptr` must point to `struct_size` writable bytes that begin with a `size_t
/// struct_size`.
pub(crate) unsafe fn write_versioned<T: Versioned>(name: &str, ptr: *mut T, value: T) -> Result<()> {
    // SAFETY: NULL or a struct beginning with `size_t struct_size` (this function's contract).
    unsafe { check_out(name, ptr)? };
    // SAFETY: non-null (check_out), so its first word is readable.
    let size = unsafe { (ptr as *const usize).read_unaligned() };
    let word = std::mem::size_of::<usize>();
    let n = size.min(std::mem::size_of::<T>());
    // SAFETY: bytes word..n of the caller's struct are writable (`size >= n` bytes, checked to
    // end on a field boundary past the first word) and of `value` readable.
    unsafe { std::ptr::copy_nonoverlapping((&value as *const T as *const u8).add(word), (ptr as *mut u8).add(word), n - word) };
    Ok(())
}

/// Writes `value` to an out-parameter, or says which one was null.
///
/// # Safety
/// When non-null, `ptr` must be writable.
pub(crate) unsafe fn write_out<T>(name: &str, ptr: *mut T, value: T) -> Result<()> {
    if ptr.is_null() {
        return Err(invalid!("{name} is a null pointer"));
    }
    // SAFETY: non-null, so writable (this function's contract).
    unsafe { ptr.write(value) };
    Ok(())
}

/// `guard` for the test suite, which checks that a panic becomes `Internal` (no export panics on
/// purpose, so this is the only way to reach that path from a test).
#[doc(hidden)]
pub fn guard_for_tests(func: &str, body: impl FnOnce() -> Result<()>) -> PackinferStatus {
    guard(func, body)
}
