//! The replay's memory on the GPU: the step inputs (random Q and new K/V, uploaded once; a step
//! reads them at random offsets, as the host replay reads its input vector) and the output, each
//! one device allocation made before the first step at the largest step's size, plus two timing
//! events. The replay is a user of the library's Rust API, which keeps its driver wrappers to
//! itself, so this talks to the driver through cudarc, in the device's primary context (the one
//! the CUDA backend uses too).

use cudarc::driver::result as cu;
use cudarc::driver::sys;
use packinfer::{Error, Result};

fn device_err(what: &str, e: cu::DriverError) -> Error {
    if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Error::OutOfMemory(format!("{what}: out of device memory"))
    } else {
        Error::Device(format!("{what} failed: {:?}", e.0))
    }
}

/// Device `ordinal`'s primary context, retained while this lives.
struct Context {
    device: sys::CUdevice,
    ctx: sys::CUcontext,
}

impl Context {
    fn open(ordinal: u32) -> Result<Context> {
        // SAFETY: only tries to dlopen the driver library (cudarc panics without it).
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoDevice("the CUDA driver library (libcuda.so.1) could not be loaded".into()));
        }
        cu::init().map_err(|e| device_err("cuInit", e))?;
        let device = cu::device::get(ordinal as i32).map_err(|e| device_err("cuDeviceGet", e))?;
        // SAFETY: a valid device; released in Drop.
        let ctx = unsafe { cu::primary_ctx::retain(device) }.map_err(|e| device_err("cuDevicePrimaryCtxRetain", e))?;
        Ok(Context { device, ctx })
    }

    /// Makes the context current on this thread until the guard drops.
    fn enter(&self) -> Result<Current> {
        // SAFETY: the context is retained while self lives.
        let r = unsafe { sys::cuCtxPushCurrent_v2(self.ctx) };
        r.result().map_err(|e| device_err("cuCtxPushCurrent", e))?;
        Ok(Current(()))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: retained in open, released once.
        let _ = unsafe { cu::primary_ctx::release(self.device) };
    }
}

/// The context pushed by `Context::enter`; popped on drop.
struct Current(());

impl Drop for Current {
    fn drop(&mut self) {
        let mut old = std::ptr::null_mut();
        // SAFETY: pops what enter pushed.
        let _ = unsafe { sys::cuCtxPopCurrent_v2(&mut old) };
    }
}

/// The replay's device allocations and timing events. Made step by step in `new`: whatever was
/// made when a later step fails is freed by Drop (null and 0 are "not made").
pub struct DeviceIo {
    inputs: sys::CUdeviceptr,
    out: sys::CUdeviceptr,
    out_elems: usize,
    start: sys::CUevent,
    end: sys::CUevent,
    /// Last, so the context outlives what Drop frees in it.
    ctx: Context,
}

impl DeviceIo {
    /// Uploads `inputs` (16-bit elements) and allocates `out_elems` elements of output on device
    /// `ordinal`.
    pub fn new(ordinal: u32, inputs: &[u16], out_elems: usize) -> Result<DeviceIo> {
        let ctx = Context::open(ordinal)?;
        let mut io =
            DeviceIo { inputs: 0, out: 0, out_elems: out_elems.max(1), start: std::ptr::null_mut(), end: std::ptr::null_mut(), ctx };
        let _g = io.ctx.enter()?;
        // SAFETY: the context is current; the copy fills the allocation just made for
        // `inputs`, from the slice itself.
        unsafe {
            io.inputs =
                cu::malloc_sync(inputs.len().max(1) * 2).map_err(|e| device_err("allocating the replay's step inputs on the GPU", e))?;
            cu::memcpy_htod_sync(io.inputs, inputs).map_err(|e| device_err("uploading the replay's step inputs", e))?;
            io.out = cu::malloc_sync(io.out_elems * 2).map_err(|e| device_err("allocating the replay's attention output on the GPU", e))?;
        }
        let timing = || cu::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(|e| device_err("cuEventCreate", e));
        io.start = timing()?;
        io.end = timing()?;
        drop(_g);
        Ok(io)
    }

    /// Device address of input element `at`.
    pub fn input_ptr(&self, at: usize) -> u64 {
        self.inputs + at as u64 * 2
    }

    pub fn out_ptr(&self) -> u64 {
        self.out
    }

    /// Copies output rows 0, `stride`, 2·`stride`, ... of `row_elems` elements each into `out`
    /// (as many as it holds whole), with one strided copy (waits for the stream's work).
    pub fn read_out_rows(&self, out: &mut [u16], row_elems: usize, stride: usize) -> Result<()> {
        let rows = out.len() / row_elems.max(1);
        if rows == 0 {
            return Ok(());
        }
        if stride == 0 || ((rows - 1) * stride + 1) * row_elems > self.out_elems {
            return Err(Error::Internal(format!(
                "{rows} output rows of {row_elems} elements every {stride} rows asked for; the device holds {} elements",
                self.out_elems
            )));
        }
        let row_bytes = row_elems * 2;
        let copy = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            srcHost: std::ptr::null(),
            srcDevice: self.out,
            srcArray: std::ptr::null_mut(),
            srcPitch: stride * row_bytes,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_HOST,
            dstHost: out.as_mut_ptr().cast(),
            dstDevice: 0,
            dstArray: std::ptr::null_mut(),
            dstPitch: row_bytes,
            WidthInBytes: row_bytes,
            Height: rows,
        };
        let _g = self.ctx.enter()?;
        // SAFETY: the source rows lie in the output allocation (checked above), the destination
        // is `rows` rows of `out`, and the context is current; the copy is synchronous.
        unsafe { sys::cuMemcpy2D_v2(&copy) }.result().map_err(|e| device_err("reading the attention output back", e))
    }

    /// Seconds the GPU spent on what `enqueue` puts on `stream`: events recorded before and
    /// after it, then a wait for the second.
    pub fn time(&self, stream: u64, enqueue: impl FnOnce() -> Result<()>) -> Result<f64> {
        let s = stream as sys::CUstream;
        {
            let _g = self.ctx.enter()?;
            // SAFETY: an event of this context; the caller's stream of its device.
            unsafe { cu::event::record(self.start, s) }.map_err(|e| device_err("cuEventRecord", e))?;
        }
        enqueue()?;
        let _g = self.ctx.enter()?;
        // SAFETY: as above; both events were recorded on the stream.
        unsafe {
            cu::event::record(self.end, s).map_err(|e| device_err("cuEventRecord", e))?;
            cu::event::synchronize(self.end).map_err(|e| device_err("cuEventSynchronize (attention kernels failed?)", e))?;
            let ms = cu::event::elapsed(self.start, self.end).map_err(|e| device_err("cuEventElapsedTime", e))?;
            Ok(ms as f64 / 1e3)
        }
    }
}

impl Drop for DeviceIo {
    fn drop(&mut self) {
        if let Ok(_g) = self.ctx.enter() {
            // SAFETY: made in new on this context, each freed once; null and 0 were never made.
            unsafe {
                for e in [self.start, self.end] {
                    if !e.is_null() {
                        let _ = cu::event::destroy(e);
                    }
                }
                for p in [self.inputs, self.out] {
                    if p != 0 {
                        let _ = cu::free_sync(p);
                    }
                }
            }
        }
    }
}
