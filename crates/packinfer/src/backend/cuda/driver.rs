//! Thin, checked wrappers over the CUDA driver API (through cudarc's dynamically loaded
//! bindings): the device's primary context pushed around every call, device memory, events and
//! modules, all released on drop.

use std::ffi::c_void;

use cudarc::driver::result as cu;
use cudarc::driver::sys;

use crate::error::{Error, Result};

/// Turns a driver error into the library's: out-of-memory is its own variant.
pub fn device_err(what: &str, e: cu::DriverError) -> Error {
    if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Error::OutOfMemory(format!("{what}: out of device memory"))
    } else {
        let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
        Error::Device(format!("{what} failed: {name}"))
    }
}

pub fn check(r: sys::CUresult, what: &str) -> Result<()> {
    r.result().map_err(|e| device_err(what, e))
}

/// The primary context of one device (the one the CUDA runtime and PyTorch use), retained for
/// the lifetime of this value.
pub struct Device {
    pub(crate) device: sys::CUdevice,
    /// Not public: `enter` and every drop push it.
    pub(crate) ctx: sys::CUcontext,
    pub(crate) name: String,
    pub(crate) sm_count: u32,
    pub(crate) cc: (i32, i32),
    pub(crate) max_smem_optin: u32,
}

// SAFETY: a CUcontext may be used from any thread (we push it around every use).
unsafe impl Send for Device {}
// SAFETY: as for Send; `&Device` only reads the handles.
unsafe impl Sync for Device {}

impl Device {
    /// Checks that the driver can be loaded before any cudarc call that would panic without it,
    /// then retains device `ordinal`'s primary context.
    pub fn open(ordinal: u32) -> Result<Device> {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoDevice("the CUDA driver library (libcuda.so.1) could not be loaded on this machine".into()));
        }
        cu::init().map_err(|e| Error::NoDevice(format!("cuInit failed: {e:?} (no usable GPU or driver)")))?;
        let count = cu::device::get_count().map_err(|e| Error::NoDevice(format!("cuDeviceGetCount failed: {e:?}")))?;
        if ordinal as i32 >= count {
            return Err(Error::NoDevice(format!("device_ordinal = {ordinal} but this machine has {count} CUDA device(s)")));
        }
        let device = cu::device::get(ordinal as i32).map_err(|e| device_err("cuDeviceGet", e))?;
        let attr = |a: sys::CUdevice_attribute| -> Result<i32> {
            // SAFETY: valid device and attribute.
            unsafe { cu::device::get_attribute(device, a) }.map_err(|e| device_err("cuDeviceGetAttribute", e))
        };
        use sys::CUdevice_attribute::*;
        let cc = (attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?, attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?);
        if cc.0 < 8 {
            return Err(Error::Unsupported(format!(
                "device {ordinal} has compute capability {}.{}; the kernels need 8.0 or newer",
                cc.0, cc.1
            )));
        }
        let sm_count = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let max_smem_optin = attr(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32;
        let name = cu::device::get_name(device).map_err(|e| device_err("cuDeviceGetName", e))?;
        // SAFETY: valid device; released in Drop.
        let ctx = unsafe { cu::primary_ctx::retain(device) }.map_err(|e| device_err("cuDevicePrimaryCtxRetain", e))?;
        Ok(Device { device, ctx, name, sm_count, cc, max_smem_optin })
    }

    /// The compute capability (major, minor).
    pub fn cc(&self) -> (i32, i32) {
        self.cc
    }

    /// Makes the context current on this thread until the guard drops (the caller may be on any
    /// thread, and a Go goroutine may hop threads between calls).
    pub fn enter(&self) -> Result<CtxGuard> {
        // SAFETY: the context is retained while self lives.
        check(unsafe { sys::cuCtxPushCurrent_v2(self.ctx) }, "cuCtxPushCurrent")?;
        Ok(CtxGuard { _pushed: () })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: retained in open.
        unsafe {
            let _ = cu::primary_ctx::release(self.device);
        }
    }
}

/// The device's context made current by `Device::enter`; dropping it pops the context. Made
/// only by `enter` (the private field), so every pop matches a push.
#[must_use = "the context is popped when the guard drops"]
pub struct CtxGuard {
    _pushed: (),
}

impl Drop for CtxGuard {
    fn drop(&mut self) {
        let mut old = std::ptr::null_mut();
        // SAFETY: pops what enter pushed.
        unsafe {
            let _ = sys::cuCtxPopCurrent_v2(&mut old);
        }
    }
}

/// Device memory, freed on drop (with the owning context current). The address and size are
/// not public fields: `write` and `read` trust them.
pub struct DeviceBuffer {
    pub(crate) ptr: sys::CUdeviceptr,
    pub(crate) bytes: usize,
    ctx: sys::CUcontext,
}

// SAFETY: a device address and its context, usable from any thread (every use pushes the context).
unsafe impl Send for DeviceBuffer {}
// SAFETY: `&DeviceBuffer` only reads the address; copies into it are synchronous driver calls.
unsafe impl Sync for DeviceBuffer {}

impl DeviceBuffer {
    /// Allocates `bytes` (at least 1) on the current context.
    pub fn new(dev: &Device, bytes: usize, what: &str) -> Result<DeviceBuffer> {
        let _g = dev.enter()?;
        // SAFETY: a context is current.
        let ptr = unsafe { cu::malloc_sync(bytes.max(16)) }.map_err(|e| device_err(what, e))?;
        Ok(DeviceBuffer { ptr, bytes, ctx: dev.ctx })
    }

    /// The buffer's device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The size asked for, in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in new on ctx; pushed so the free happens on the right context.
        unsafe {
            if sys::cuCtxPushCurrent_v2(self.ctx) == sys::CUresult::CUDA_SUCCESS {
                let _ = cu::free_sync(self.ptr);
                let mut old = std::ptr::null_mut();
                let _ = sys::cuCtxPopCurrent_v2(&mut old);
            }
        }
    }
}

/// Page-locked host memory (`cuMemHostAlloc`), freed on drop: a copy from it to the device is
/// truly asynchronous (the driver neither stages it nor waits for the stream first), so the
/// memory must not change until the copy has run.
pub struct PinnedBuffer {
    ptr: *mut u8,
    bytes: usize,
    ctx: sys::CUcontext,
}

// SAFETY: host memory and its context; `&PinnedBuffer` only reads it, writes need `&mut`.
unsafe impl Send for PinnedBuffer {}
// SAFETY: as for Send.
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    /// Allocates `bytes` (at least 1) of page-locked memory on `dev`'s context, zeroed.
    pub fn new(dev: &Device, bytes: usize, what: &str) -> Result<PinnedBuffer> {
        let _g = dev.enter()?;
        let bytes = bytes.max(1);
        // SAFETY: a context is current; no flags (portable to this context only).
        let ptr = unsafe { cu::malloc_host(bytes, 0) }.map_err(|e| device_err(what, e))? as *mut u8;
        // SAFETY: the allocation is `bytes` long and ours.
        unsafe { std::ptr::write_bytes(ptr, 0, bytes) };
        Ok(PinnedBuffer { ptr, bytes, ctx: dev.ctx })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `bytes` initialised bytes (zeroed in new), alive as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.bytes) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice; `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in new on ctx, freed once, with that context current.
        unsafe {
            if sys::cuCtxPushCurrent_v2(self.ctx) == sys::CUresult::CUDA_SUCCESS {
                let _ = cu::free_host(self.ptr as *mut c_void);
                let mut old = std::ptr::null_mut();
                let _ = sys::cuCtxPopCurrent_v2(&mut old);
            }
        }
    }
}

/// A completion event (timing disabled).
pub struct Event {
    pub(crate) event: sys::CUevent,
    ctx: sys::CUcontext,
}

// SAFETY: CUDA events may be recorded, waited on and destroyed from any thread.
unsafe impl Send for Event {}
// SAFETY: as for Send; the driver synchronizes concurrent calls on one event.
unsafe impl Sync for Event {}

impl Event {
    /// A completion event, without timing (cheaper to record and wait for).
    pub fn new(dev: &Device) -> Result<Event> {
        Event::create(dev, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
    }
    /// An event that records a timestamp, for `elapsed_ms`.
    pub fn timing(dev: &Device) -> Result<Event> {
        Event::create(dev, sys::CUevent_flags::CU_EVENT_DEFAULT)
    }
    fn create(dev: &Device, flags: sys::CUevent_flags) -> Result<Event> {
        let _g = dev.enter()?;
        let event = cu::event::create(flags).map_err(|e| device_err("cuEventCreate", e))?;
        Ok(Event { event, ctx: dev.ctx })
    }
    /// Milliseconds from `start`'s last record to this event's; both are timing events whose
    /// records have completed (`wait` on this one first).
    pub fn elapsed_ms(&self, start: &Event) -> Result<f32> {
        // SAFETY: valid events; the driver reports events without timestamps as an error.
        unsafe { cu::event::elapsed(start.event, self.event) }.map_err(|e| device_err("cuEventElapsedTime", e))
    }
    /// Records the event on the caller's stream (a CUstream as an integer; 0 = the default stream).
    pub fn record(&self, stream: u64) -> Result<()> {
        // SAFETY: valid event; the stream is the caller's.
        unsafe { cu::event::record(self.event, stream as sys::CUstream) }.map_err(|e| device_err("cuEventRecord", e))
    }
    /// Makes `stream` wait, on the device, for the work enqueued before the last `record`.
    pub fn wait_on(&self, stream: u64) -> Result<()> {
        // SAFETY: valid event; the stream is the caller's.
        check(unsafe { sys::cuStreamWaitEvent(stream as sys::CUstream, self.event, 0) }, "cuStreamWaitEvent")
    }
    pub fn is_done(&self) -> Result<bool> {
        // SAFETY: valid event.
        let r = unsafe { sys::cuEventQuery(self.event) };
        match r {
            sys::CUresult::CUDA_SUCCESS => Ok(true),
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            other => check(other, "cuEventQuery").map(|_| false),
        }
    }
    pub fn wait(&self) -> Result<()> {
        // SAFETY: valid event.
        unsafe { cu::event::synchronize(self.event) }.map_err(|e| device_err("cuEventSynchronize", e))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created in `create` on ctx, destroyed once; pushed so the right context is current.
        unsafe {
            if sys::cuCtxPushCurrent_v2(self.ctx) == sys::CUresult::CUDA_SUCCESS {
                let _ = cu::event::destroy(self.event);
                let mut old = std::ptr::null_mut();
                let _ = sys::cuCtxPopCurrent_v2(&mut old);
            }
        }
    }
}

/// A loaded module and the functions the backend uses from it.
pub struct Module {
    module: sys::CUmodule,
    ctx: sys::CUcontext,
}

// SAFETY: a module handle of a context that every use makes current; usable from any thread.
unsafe impl Send for Module {}
// SAFETY: `&Module` only looks functions up, which the driver allows concurrently.
unsafe impl Sync for Module {}

impl Module {
    /// Loads a cubin into the device's context (which must be current).
    pub fn load(dev: &Device, cubin: &[u8], what: &str) -> Result<Module> {
        // SAFETY: a cubin produced by NVRTC for this device's architecture.
        let module =
            unsafe { cu::module::load_data(cubin.as_ptr() as *const c_void) }.map_err(|e| device_err(&format!("loading {what}"), e))?;
        Ok(Module { module, ctx: dev.ctx })
    }
    pub fn function(&self, name: &str) -> Result<sys::CUfunction> {
        let c = std::ffi::CString::new(name).unwrap();
        // SAFETY: valid module.
        unsafe { cu::module::get_function(self.module, c) }.map_err(|e| device_err(&format!("cuModuleGetFunction({name})"), e))
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        // SAFETY: loaded in `load` on ctx, unloaded once; pushed so the right context is current.
        unsafe {
            if sys::cuCtxPushCurrent_v2(self.ctx) == sys::CUresult::CUDA_SUCCESS {
                let _ = cu::module::unload(self.module);
                let mut old = std::ptr::null_mut();
                let _ = sys::cuCtxPopCurrent_v2(&mut old);
            }
        }
    }
}

/// Launches `f` with one by-value parameter struct (`Pod`: the driver copies its bytes, all of
/// them initialized).
///
/// # Safety
/// `params` must be the kernel's exact parameter layout, and every address in it valid for
/// what the kernel does with it; the context must be current.
pub unsafe fn launch<P: bytemuck::Pod>(
    f: sys::CUfunction,
    grid: u32,
    block: u32,
    smem: u32,
    stream: sys::CUstream,
    params: &mut P,
    what: &str,
) -> Result<()> {
    let mut args = [params as *mut P as *mut c_void];
    // SAFETY: one parameter of the kernel's layout, valid addresses, a current context: this
    // function's contract.
    unsafe { cu::launch_kernel(f, (grid, 1, 1), (block, 1, 1), smem, stream, &mut args) }.map_err(|e| device_err(what, e))
}

/// Launches `f` with a list of parameter pointers.
///
/// # Safety
/// `args` must point to the kernel's parameters in order; the context must be current.
pub unsafe fn launch_args(
    f: sys::CUfunction,
    grid: u32,
    block: u32,
    stream: sys::CUstream,
    args: &mut [*mut c_void],
    what: &str,
) -> Result<()> {
    // SAFETY: the kernel's parameters in order, a current context: this function's contract.
    unsafe { cu::launch_kernel(f, (grid, 1, 1), (block, 1, 1), 0, stream, args) }.map_err(|e| device_err(what, e))
}

impl DeviceBuffer {
    /// Synchronous host → device copy into the start of the buffer (setup and tests, never `run`).
    pub fn write(&self, dev: &Device, data: &[u8]) -> Result<()> {
        if data.len() > self.bytes {
            return Err(Error::InvalidArgument(format!("{} bytes do not fit a device buffer of {}", data.len(), self.bytes)));
        }
        let _g = dev.enter()?;
        // SAFETY: the buffer holds at least data.len() bytes.
        unsafe { cu::memcpy_htod_sync(self.ptr, data) }.map_err(|e| device_err("cuMemcpyHtoD", e))
    }
    /// Synchronous device → host copy from the start of the buffer.
    pub fn read(&self, dev: &Device, out: &mut [u8]) -> Result<()> {
        if out.len() > self.bytes {
            return Err(Error::InvalidArgument(format!("{} bytes are more than a device buffer of {}", out.len(), self.bytes)));
        }
        let _g = dev.enter()?;
        // SAFETY: the buffer holds at least out.len() bytes.
        unsafe { cu::memcpy_dtoh_sync(out, self.ptr) }.map_err(|e| device_err("cuMemcpyDtoH", e))
    }
}

/// Whether `stream` is being captured into a CUDA graph (nothing it is given runs now).
pub fn is_capturing(stream: u64) -> Result<bool> {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    // SAFETY: the stream is the caller's; status is a valid out-pointer.
    check(unsafe { sys::cuStreamIsCapturing(stream as sys::CUstream, &mut status) }, "cuStreamIsCapturing")?;
    Ok(status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}

/// Waits for everything queued on `stream` (tests and calibration only).
pub fn sync_stream(dev: &Device, stream: u64) -> Result<()> {
    let _g = dev.enter()?;
    // SAFETY: the caller's stream of this device.
    unsafe { cu::stream::synchronize(stream as sys::CUstream) }.map_err(|e| device_err("cuStreamSynchronize", e))
}
