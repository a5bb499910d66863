//! The replay's memory on the GPU: the step inputs (random Q and new K/V, uploaded once; a step
//! reads them at random offsets, as the host replay reads its input vector) and the output, each
//! one device allocation made before the first step at the largest step's size, plus two timing
//! events. The replay is a user of the library, so this goes through the library's thin driver
//! wrappers (the device's primary context, which the CUDA backend also uses) and cudarc.

use cudarc::driver::result as cu;
use cudarc::driver::sys;
use packinfer::backend::cuda::driver::{device_err, Device, DeviceBuffer};
use packinfer::Result;

/// An event that records a timestamp (the library's `Event` disables timing).
struct TimingEvent {
    event: sys::CUevent,
}

impl TimingEvent {
    fn new(dev: &Device) -> Result<TimingEvent> {
        let _g = dev.enter()?;
        let event = cu::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(|e| device_err("cuEventCreate", e))?;
        Ok(TimingEvent { event })
    }
}

pub struct DeviceIo {
    start: TimingEvent,
    end: TimingEvent,
    inputs: DeviceBuffer,
    out: DeviceBuffer,
    /// Last, so the context outlives the buffers and events above.
    dev: Device,
}

impl DeviceIo {
    /// Uploads `inputs` (16-bit elements) and allocates `out_elems` elements of output on device
    /// `ordinal`.
    pub fn new(ordinal: u32, inputs: &[u16], out_elems: usize) -> Result<DeviceIo> {
        let dev = Device::open(ordinal)?;
        let buf = DeviceBuffer::new(&dev, inputs.len() * 2, "allocating the replay's step inputs on the GPU")?;
        // SAFETY: a u16 slice viewed as its bytes.
        buf.write(&dev, unsafe { std::slice::from_raw_parts(inputs.as_ptr() as *const u8, inputs.len() * 2) })?;
        let out = DeviceBuffer::new(&dev, out_elems.max(1) * 2, "allocating the replay's attention output on the GPU")?;
        Ok(DeviceIo { start: TimingEvent::new(&dev)?, end: TimingEvent::new(&dev)?, inputs: buf, out, dev })
    }

    /// Device address of input element `at`.
    pub fn input_ptr(&self, at: usize) -> u64 {
        self.inputs.ptr() + at as u64 * 2
    }

    pub fn out_ptr(&self) -> u64 {
        self.out.ptr()
    }

    /// Copies the first `out.len()` output elements to the host (waits for the stream's work).
    pub fn read_out(&self, out: &mut [u16]) -> Result<()> {
        // SAFETY: a u16 slice viewed as its bytes.
        self.out.read(&self.dev, unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, out.len() * 2) })
    }

    /// Seconds the GPU spent on what `enqueue` puts on `stream`: events recorded before and
    /// after it, then a wait for the second.
    pub fn time(&self, stream: u64, enqueue: impl FnOnce() -> Result<()>) -> Result<f64> {
        let s = stream as sys::CUstream;
        {
            let _g = self.dev.enter()?;
            // SAFETY: events of this context; the caller's stream.
            unsafe { cu::event::record(self.start.event, s) }.map_err(|e| device_err("cuEventRecord", e))?;
        }
        enqueue()?;
        let _g = self.dev.enter()?;
        // SAFETY: as above.
        unsafe {
            cu::event::record(self.end.event, s).map_err(|e| device_err("cuEventRecord", e))?;
            cu::event::synchronize(self.end.event).map_err(|e| device_err("cuEventSynchronize (attention kernels failed?)", e))?;
            let ms = cu::event::elapsed(self.start.event, self.end.event).map_err(|e| device_err("cuEventElapsedTime", e))?;
            Ok(ms as f64 / 1e3)
        }
    }
}

impl Drop for DeviceIo {
    fn drop(&mut self) {
        if let Ok(_g) = self.dev.enter() {
            // SAFETY: created in new on this context, destroyed once.
            unsafe {
                let _ = cu::event::destroy(self.start.event);
                let _ = cu::event::destroy(self.end.event);
            }
        }
    }
}
