//! KV-cache maintenance on the device, for the KV pool (`src/kv/`) to call: appending new
//! tokens into pages and copying whole pages. Plain signatures on the caller's stream and device
//! pointers; like `run`, they allocate nothing and wait for nothing.

use std::ffi::c_void;

use cudarc::driver::sys;

use super::{driver, CudaBackend};
use crate::error::Result;
use crate::invalid;
use crate::types::{DType, KvLayout};

fn check_dtype(dtype: DType) -> Result<()> {
    if dtype.size_bytes() != 2 {
        return Err(crate::unsupported!("dtype = {} is not supported by the CUDA KV kernels (f16, bf16)", dtype.name()));
    }
    Ok(())
}

fn grid_for(elements: u64, sm_count: u32) -> u32 {
    (elements.div_ceil(256)).clamp(1, sm_count as u64 * 8) as u32
}

impl CudaBackend {
    /// Writes `num_tokens` tokens' K and V (`k_new`, `v_new`: device `[num_tokens, kv_heads,
    /// head_dim]`, contiguous) into the cache slots `slots` (device `int64[num_tokens]`, slot =
    /// page * page_size + offset; negative = skip), through `layout`'s strides.
    ///
    /// # Safety
    /// All addresses are device memory of this backend's device, valid until `stream` has run
    /// the kernel: `slots` holds `num_tokens` int64, `k_new` and `v_new` `num_tokens ×
    /// num_kv_heads × head_dim` elements of `dtype` each, and every slot that is not negative
    /// addresses, through `layout`, a writable row of `num_kv_heads × head_dim` elements of K
    /// and of V. `stream` is a stream of the device, or 0.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn append_kv(
        &self,
        layout: &KvLayout,
        page_size: u32,
        slots: u64,
        k_new: u64,
        v_new: u64,
        num_tokens: u32,
        num_kv_heads: u32,
        head_dim: u32,
        dtype: DType,
        stream: u64,
    ) -> Result<()> {
        check_dtype(dtype)?;
        if num_tokens == 0 {
            return Ok(());
        }
        if page_size == 0 {
            return Err(invalid!("page_size = 0; pages hold at least one token"));
        }
        for (name, p) in [("layout.k", layout.k), ("layout.v", layout.v), ("slots", slots), ("k_new", k_new), ("v_new", v_new)] {
            if p == 0 {
                return Err(invalid!("{name} is a null pointer but {num_tokens} tokens are appended"));
            }
        }
        let kern = self.shared.kv()?;
        let _g = self.device().enter()?;
        let (mut k, mut v, mut sp, mut st, mut sh, mut sd) =
            (layout.k, layout.v, layout.stride_page, layout.stride_token, layout.stride_head, layout.stride_dim);
        let (mut sl, mut kn, mut vn, mut nt, mut nh, mut hd, mut ps) = (slots, k_new, v_new, num_tokens, num_kv_heads, head_dim, page_size);
        let mut args: [*mut c_void; 13] = [
            &mut k as *mut _ as _,
            &mut v as *mut _ as _,
            &mut sp as *mut _ as _,
            &mut st as *mut _ as _,
            &mut sh as *mut _ as _,
            &mut sd as *mut _ as _,
            &mut sl as *mut _ as _,
            &mut kn as *mut _ as _,
            &mut vn as *mut _ as _,
            &mut nt as *mut _ as _,
            &mut nh as *mut _ as _,
            &mut hd as *mut _ as _,
            &mut ps as *mut _ as _,
        ];
        let grid = grid_for(num_tokens as u64 * num_kv_heads as u64 * head_dim as u64, self.device().sm_count);
        // SAFETY: the argument list matches append_kv's signature; the pointers address what
        // this function's contract says.
        unsafe { driver::launch_args(kern.append, grid, 256, stream as sys::CUstream, &mut args, "launching append_kv") }
    }

    /// Copies whole pages: for each pair `(pairs[2i], pairs[2i+1])` (device `int32`, source then
    /// destination page) and each of `num_layers` layers (`layer_stride` elements apart), every
    /// token, head and dim of K and V. Used for the group-contiguous relayout and copy-on-write.
    ///
    /// # Safety
    /// All addresses are device memory of this backend's device, valid until `stream` has run
    /// the kernel: `pairs` holds `2 × num_pairs` int32, and for each layer every listed page,
    /// `page_size × num_kv_heads × head_dim` elements of `dtype` through `layout`'s strides, is
    /// readable (sources) or writable (destinations) in K and in V; no destination overlaps a
    /// source or another destination. `stream` is a stream of the device, or 0.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn copy_pages(
        &self,
        layout: &KvLayout,
        page_size: u32,
        pairs: u64,
        num_pairs: u32,
        num_kv_heads: u32,
        head_dim: u32,
        num_layers: u32,
        layer_stride: i64,
        dtype: DType,
        stream: u64,
    ) -> Result<()> {
        check_dtype(dtype)?;
        if num_pairs == 0 || num_layers == 0 {
            return Ok(());
        }
        for (name, p) in [("layout.k", layout.k), ("layout.v", layout.v), ("pairs", pairs)] {
            if p == 0 {
                return Err(invalid!("{name} is a null pointer but {num_pairs} pages are copied"));
            }
        }
        let kern = self.shared.kv()?;
        let _g = self.device().enter()?;
        let (mut k, mut v, mut sp, mut st, mut sh, mut sd) =
            (layout.k, layout.v, layout.stride_page, layout.stride_token, layout.stride_head, layout.stride_dim);
        let (mut pr, mut np, mut ps, mut nh, mut hd, mut nl, mut ls) =
            (pairs, num_pairs, page_size, num_kv_heads, head_dim, num_layers, layer_stride);
        let mut args: [*mut c_void; 13] = [
            &mut k as *mut _ as _,
            &mut v as *mut _ as _,
            &mut sp as *mut _ as _,
            &mut st as *mut _ as _,
            &mut sh as *mut _ as _,
            &mut sd as *mut _ as _,
            &mut pr as *mut _ as _,
            &mut np as *mut _ as _,
            &mut ps as *mut _ as _,
            &mut nh as *mut _ as _,
            &mut hd as *mut _ as _,
            &mut nl as *mut _ as _,
            &mut ls as *mut _ as _,
        ];
        let total = page_size as u64 * num_kv_heads as u64 * head_dim as u64 * num_pairs as u64 * num_layers as u64;
        let grid = grid_for(total, self.device().sm_count);
        // SAFETY: the argument list matches copy_pages' signature; the pointers address what
        // this function's contract says.
        unsafe { driver::launch_args(kern.copy_pages, grid, 256, stream as sys::CUstream, &mut args, "launching copy_pages") }
    }
}
