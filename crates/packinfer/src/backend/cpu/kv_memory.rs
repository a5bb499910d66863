//! Host memory for a KV pool on the CPU backend: one zeroed allocation, written with plain copies.

use std::cell::UnsafeCell;

use half::{bf16, f16};

use crate::backend::{KvMemory, RowConversion};
use crate::error::{Error, Result};
use crate::invalid;
use crate::types::DType;

pub struct HostKvMemory {
    /// `u64` words so the base is 8-byte aligned for every dtype. Interior mutability: the pool
    /// writes through `&self` (its own mutex serializes writers), and kernels read through the
    /// raw base pointer, exactly as they would read device memory.
    words: Box<[UnsafeCell<u64>]>,
    bytes: usize,
}

// SAFETY: the words are plain integers owned by this value; moving it to another thread moves
// nothing thread-bound.
unsafe impl Send for HostKvMemory {}
// SAFETY: writes through `&self` are serialized by the owning pool's mutex; readers (run) go
// through raw pointers and the engine orders them against writes, as on a GPU stream.
unsafe impl Sync for HostKvMemory {}

impl HostKvMemory {
    pub fn new(bytes: usize) -> Result<HostKvMemory> {
        if bytes == 0 {
            return Err(invalid!("a KV pool of 0 bytes cannot hold any page"));
        }
        let words = bytes.div_ceil(8);
        let mut v: Vec<UnsafeCell<u64>> = Vec::new();
        v.try_reserve_exact(words)
            .map_err(|_| Error::OutOfMemory(format!("could not allocate {bytes} bytes of host memory for the KV pool")))?;
        v.resize_with(words, || UnsafeCell::new(0));
        Ok(HostKvMemory { words: v.into_boxed_slice(), bytes })
    }

    fn ptr(&self) -> *mut u8 {
        self.words.as_ptr() as *mut u8
    }

    fn check(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.bytes as u64 => Ok(()),
            _ => Err(Error::Internal(format!(
                "KV pool {what} at byte offset {offset} + {len} is outside the {} byte allocation",
                self.bytes
            ))),
        }
    }
}

impl KvMemory for HostKvMemory {
    fn base(&self) -> u64 {
        self.ptr() as u64
    }
    fn len_bytes(&self) -> usize {
        self.bytes
    }
    unsafe fn write_rows(&self, src: u64, src_stride_bytes: u64, row_bytes: u64, dst_offsets: &[u64], _stream: u64) -> Result<()> {
        for &dst in dst_offsets {
            self.check("write", dst, row_bytes)?;
        }
        for (i, &dst) in dst_offsets.iter().enumerate() {
            let from = (src + i as u64 * src_stride_bytes) as *const u8;
            // SAFETY: the source row is the caller's (write_rows' contract), the destination is
            // inside the allocation (checked above); `copy` allows them to overlap.
            unsafe { std::ptr::copy(from, self.ptr().add(dst as usize), row_bytes as usize) };
        }
        Ok(())
    }
    unsafe fn write_rows_fp8(
        &self,
        src: u64,
        src_stride_bytes: u64,
        conv: &RowConversion,
        dst_offsets: &[u64],
        _stream: u64,
    ) -> Result<()> {
        let (h, d) = (conv.num_kv_heads as usize, conv.head_dim as usize);
        let row = (h * d) as u64;
        self.check("scales", conv.head_scales, h as u64 * 4)?;
        for &dst in dst_offsets {
            self.check("write", dst, row)?;
        }
        // SAFETY: `h` f32 inside the allocation (checked above), read unaligned (the pool's
        // pages before them may end at any byte).
        let scales: Vec<f32> =
            (0..h).map(|i| unsafe { (self.ptr().add(conv.head_scales as usize + 4 * i) as *const f32).read_unaligned() }).collect();
        let size = conv.src_dtype.size_bytes();
        for (i, &dst) in dst_offsets.iter().enumerate() {
            let from = src + i as u64 * src_stride_bytes;
            for (e, scale) in (0..h * d).map(|e| (e, scales[e / d])) {
                let at = (from + (e * size) as u64) as *const u8;
                // SAFETY: element e of the caller's source row i (write_rows_fp8's contract).
                let x = unsafe { load_unaligned(at, conv.src_dtype) };
                // SAFETY: byte e of the destination row, inside the allocation (checked above).
                unsafe { *self.ptr().add(dst as usize + e) = crate::fp8::f32_to_e4m3(x / scale) };
            }
        }
        Ok(())
    }
    fn write_from_host(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check("write", offset, data.len() as u64)?;
        // SAFETY: the range is inside the allocation (checked above).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr().add(offset as usize), data.len()) };
        Ok(())
    }
    fn copy_ranges(&self, pairs: &[(u64, u64)], bytes: u64, _stream: u64) -> Result<()> {
        for &(src, dst) in pairs {
            self.check("copy source", src, bytes)?;
            self.check("copy destination", dst, bytes)?;
        }
        for &(src, dst) in pairs {
            // SAFETY: both ranges are inside the allocation (checked above).
            unsafe { std::ptr::copy(self.ptr().add(src as usize), self.ptr().add(dst as usize), bytes as usize) };
        }
        Ok(())
    }
}

/// The element of `dtype` at `at` as f32 (any alignment).
///
/// # Safety
/// `at` must address `dtype.size_bytes()` readable bytes.
unsafe fn load_unaligned(at: *const u8, dtype: DType) -> f32 {
    // SAFETY: `dtype.size_bytes()` readable bytes at `at` (this fn's contract).
    unsafe {
        match dtype {
            DType::F16 => f16::from_bits((at as *const u16).read_unaligned()).to_f32(),
            DType::Bf16 => bf16::from_bits((at as *const u16).read_unaligned()).to_f32(),
            DType::F32 => (at as *const f32).read_unaligned(),
            DType::Fp8E4m3 => crate::fp8::e4m3_to_f32(*at),
        }
    }
}
