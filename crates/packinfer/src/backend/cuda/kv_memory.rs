//! Device memory for a KV pool on the CUDA backend: one `cuMemAlloc` in the device's primary
//! context, written by the `scatter_rows` / `copy_ranges` kernels (`kernels/kv.cu`) on the
//! caller's stream.
//!
//! The trait hands over byte offsets as host slices. Each call uploads them with one async copy
//! into a device staging buffer this memory owns, then launches one kernel that reads them. The
//! staging buffer grows by doubling (to the largest call seen, so a serving loop stops growing
//! after its first large step) and is never allocated per call. Reuse across calls is ordered by
//! an event recorded after each kernel: the next upload makes its stream wait for it
//! (`cuStreamWaitEvent`, no host wait), so calls on different streams do not overwrite offsets
//! a previous kernel is still reading. Growing waits on the host for that event before freeing
//! the old buffer; that happens a handful of times per pool.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::result as cu;
use cudarc::driver::sys;
use parking_lot::Mutex;

use super::driver::{self, DeviceBuffer, Event};
use super::Shared;
use crate::backend::{KvMemory, RowConversion};
use crate::error::{Error, Result};
use crate::invalid;
use crate::types::DType;

/// The smallest staging buffer: 4096 offsets (a 4096-token step's K rows), 32 KiB.
const MIN_STAGING_BYTES: usize = 4096 * 8;

struct Staging {
    buf: Option<DeviceBuffer>,
    /// Recorded after the last kernel that read `buf`.
    last_use: Event,
    used: bool,
}

pub struct DeviceKvMemory {
    /// The kernels and the device (its primary context). Field order is drop order: the
    /// allocations are freed before `shared` may release the context.
    staging: Mutex<Staging>,
    memory: DeviceBuffer,
    shared: Arc<Shared>,
}

impl DeviceKvMemory {
    pub fn new(shared: Arc<Shared>, bytes: usize) -> Result<DeviceKvMemory> {
        if bytes == 0 {
            return Err(invalid!("a KV pool of 0 bytes cannot hold any page"));
        }
        // Load the kernels now, so a pool that cannot write fails at creation, not mid-step.
        shared.kv()?;
        let memory = DeviceBuffer::new(&shared.dev, bytes, &format!("allocating the KV pool ({bytes} bytes of device memory)"))?;
        {
            // Zeroed like the CPU backend's pool, so slots never written read as 0 rather than
            // whatever the allocation held before (once per pool).
            let _g = shared.dev.enter()?;
            // SAFETY: `bytes` bytes were just allocated on this context.
            unsafe { cu::memset_d8_sync(memory.ptr, 0, bytes) }.map_err(|e| driver::device_err("cuMemsetD8 (zeroing the KV pool)", e))?;
        }
        let last_use = Event::new(&shared.dev)?;
        Ok(DeviceKvMemory { staging: Mutex::new(Staging { buf: None, last_use, used: false }), memory, shared })
    }

    fn check(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.memory.bytes as u64 => Ok(()),
            _ => Err(Error::Internal(format!(
                "KV pool {what} at byte offset {offset} + {len} is outside the {} byte allocation",
                self.memory.bytes
            ))),
        }
    }

    /// Uploads `words` into the staging buffer on `stream` (after the previous kernel that read
    /// it), launches `kernel` with `args` built from the buffer's address, and records the event.
    /// The context must be current.
    fn with_staged(&self, words: &[u64], stream: u64, launch: impl FnOnce(u64) -> Result<()>) -> Result<()> {
        let mut st = self.staging.lock();
        let need = std::mem::size_of_val(words);
        if st.buf.as_ref().is_none_or(|b| b.bytes < need) {
            if st.used {
                // The old buffer may still be read by an enqueued kernel.
                st.last_use.wait()?;
            }
            let bytes = need.next_power_of_two().max(MIN_STAGING_BYTES);
            st.buf = None;
            st.buf = Some(DeviceBuffer::new(
                &self.shared.dev,
                bytes,
                &format!("allocating {bytes} bytes of device memory for the KV pool's offsets"),
            )?);
        }
        let s = stream as sys::CUstream;
        if st.used {
            // SAFETY: a valid event of this context; the caller's stream.
            unsafe { cu::stream::wait_event(s, st.last_use.event, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
                .map_err(|e| driver::device_err("cuStreamWaitEvent (KV pool offsets)", e))?;
        }
        let ptr = st.buf.as_ref().unwrap().ptr;
        // SAFETY: the buffer holds `need` bytes. From pageable host memory the driver stages
        // `words` before returning, so the slice may be freed right after.
        unsafe { cu::memcpy_htod_async(ptr, words, s) }.map_err(|e| driver::device_err("cuMemcpyHtoDAsync (KV pool offsets)", e))?;
        launch(ptr)?;
        st.last_use.record(stream)?;
        st.used = true;
        Ok(())
    }
}

fn grid_for(units: u64, sm_count: u32) -> u32 {
    units.div_ceil(256).clamp(1, sm_count as u64 * 8) as u32
}

impl KvMemory for DeviceKvMemory {
    fn base(&self) -> u64 {
        self.memory.ptr
    }
    fn len_bytes(&self) -> usize {
        self.memory.bytes
    }

    unsafe fn write_rows(&self, src: u64, src_stride_bytes: u64, row_bytes: u64, dst_offsets: &[u64], stream: u64) -> Result<()> {
        if dst_offsets.is_empty() || row_bytes == 0 {
            return Ok(());
        }
        if src == 0 {
            return Err(invalid!("the K/V source is a null device pointer but {} rows are to be written", dst_offsets.len()));
        }
        let num_rows = u32::try_from(dst_offsets.len())
            .map_err(|_| invalid!("{} rows in one write; at most {} fit one launch", dst_offsets.len(), u32::MAX))?;
        let mut aligned = (src | src_stride_bytes | row_bytes | self.memory.ptr).is_multiple_of(16);
        for &dst in dst_offsets {
            self.check("write", dst, row_bytes)?;
            aligned &= dst.is_multiple_of(16);
        }
        let kern = self.shared.kv()?;
        let dev = &self.shared.dev;
        let _g = dev.enter()?;
        self.with_staged(dst_offsets, stream, |offsets| {
            let (mut base, mut s, mut ss, mut rb, mut off, mut n, mut v) =
                (self.memory.ptr, src, src_stride_bytes, row_bytes, offsets, num_rows, aligned as u32);
            let mut args: [*mut c_void; 7] = [
                &mut base as *mut _ as _,
                &mut s as *mut _ as _,
                &mut ss as *mut _ as _,
                &mut rb as *mut _ as _,
                &mut off as *mut _ as _,
                &mut n as *mut _ as _,
                &mut v as *mut _ as _,
            ];
            let units = row_bytes / if aligned { 16 } else { 1 } * num_rows as u64;
            // SAFETY: the argument list matches scatter_rows' signature; every destination is
            // inside the allocation (checked), the source is the caller's promise.
            unsafe {
                driver::launch_args(
                    kern.scatter_rows,
                    grid_for(units, dev.sm_count),
                    256,
                    stream as sys::CUstream,
                    &mut args,
                    "launching scatter_rows (KV pool write)",
                )
            }
        })
    }

    unsafe fn write_rows_fp8(&self, src: u64, src_stride_bytes: u64, conv: &RowConversion, dst_offsets: &[u64], stream: u64) -> Result<()> {
        let row_elems = conv.num_kv_heads as u64 * conv.head_dim as u64;
        if dst_offsets.is_empty() || row_elems == 0 {
            return Ok(());
        }
        if src == 0 {
            return Err(invalid!("the K/V source is a null device pointer but {} rows are to be written", dst_offsets.len()));
        }
        let src_dtype: u32 = match conv.src_dtype {
            DType::F16 => 0,
            DType::Bf16 => 1,
            DType::F32 => 2,
            DType::Fp8E4m3 => return Err(invalid!("an fp8 pool converts rows of f16, bf16 or f32, not {}", conv.src_dtype.name())),
        };
        let size = conv.src_dtype.size_bytes() as u64;
        if !(src | src_stride_bytes).is_multiple_of(size) {
            return Err(invalid!(
                "the K/V source 0x{src:x} with a stride of {src_stride_bytes} bytes is not aligned to its {} elements",
                conv.src_dtype.name()
            ));
        }
        let num_rows = u32::try_from(dst_offsets.len())
            .map_err(|_| invalid!("{} rows in one write; at most {} fit one launch", dst_offsets.len(), u32::MAX))?;
        self.check("scales", conv.head_scales, conv.num_kv_heads as u64 * 4)?;
        for &dst in dst_offsets {
            self.check("write", dst, row_elems)?;
        }
        let kern = self.shared.kv()?;
        let dev = &self.shared.dev;
        let _g = dev.enter()?;
        self.with_staged(dst_offsets, stream, |offsets| {
            let (mut base, mut s, mut ss, mut off, mut n, mut heads, mut dim, mut scales, mut dt) =
                (self.memory.ptr, src, src_stride_bytes, offsets, num_rows, conv.num_kv_heads, conv.head_dim, conv.head_scales, src_dtype);
            let mut args: [*mut c_void; 9] = [
                &mut base as *mut _ as _,
                &mut s as *mut _ as _,
                &mut ss as *mut _ as _,
                &mut off as *mut _ as _,
                &mut n as *mut _ as _,
                &mut heads as *mut _ as _,
                &mut dim as *mut _ as _,
                &mut scales as *mut _ as _,
                &mut dt as *mut _ as _,
            ];
            // SAFETY: the argument list matches scatter_rows_fp8's signature; every destination
            // and the scales are inside the allocation (checked), the source is the caller's
            // promise.
            unsafe {
                driver::launch_args(
                    kern.scatter_rows_fp8,
                    grid_for(row_elems * num_rows as u64, dev.sm_count),
                    256,
                    stream as sys::CUstream,
                    &mut args,
                    "launching scatter_rows_fp8 (fp8 KV pool write)",
                )
            }
        })
    }

    fn write_from_host(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check("write", offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let _g = self.shared.dev.enter()?;
        // SAFETY: the range is inside the allocation (checked above); a synchronous copy, once
        // per pool.
        unsafe { cu::memcpy_htod_sync(self.memory.ptr + offset, data) }
            .map_err(|e| driver::device_err("cuMemcpyHtoD (an fp8 KV pool's scales)", e))
    }

    fn copy_ranges(&self, pairs: &[(u64, u64)], bytes: u64, stream: u64) -> Result<()> {
        if pairs.is_empty() || bytes == 0 {
            return Ok(());
        }
        let num_pairs =
            u32::try_from(pairs.len()).map_err(|_| invalid!("{} copies in one call; at most {} fit one launch", pairs.len(), u32::MAX))?;
        let mut aligned = (bytes | self.memory.ptr).is_multiple_of(16);
        let mut flat = Vec::with_capacity(pairs.len() * 2);
        for &(src, dst) in pairs {
            self.check("copy source", src, bytes)?;
            self.check("copy destination", dst, bytes)?;
            aligned &= (src | dst).is_multiple_of(16);
            flat.extend([src, dst]);
        }
        let kern = self.shared.kv()?;
        let dev = &self.shared.dev;
        let _g = dev.enter()?;
        self.with_staged(&flat, stream, |staged| {
            let (mut base, mut p, mut n, mut b, mut v) = (self.memory.ptr, staged, num_pairs, bytes, aligned as u32);
            let mut args: [*mut c_void; 5] =
                [&mut base as *mut _ as _, &mut p as *mut _ as _, &mut n as *mut _ as _, &mut b as *mut _ as _, &mut v as *mut _ as _];
            let units = bytes / if aligned { 16 } else { 1 } * num_pairs as u64;
            // SAFETY: the argument list matches copy_ranges' signature; every range is inside the
            // allocation (checked).
            unsafe {
                driver::launch_args(
                    kern.copy_ranges,
                    grid_for(units, dev.sm_count),
                    256,
                    stream as sys::CUstream,
                    &mut args,
                    "launching copy_ranges (KV pool page copy)",
                )
            }
        })
    }
}
