//! What the C API tests share: the last error, status assertions, a CPU context, and a test
//! case's batch as the C ABI's description.
#![allow(dead_code)]

use std::ffi::{c_void, CStr};
use std::ptr::null_mut;

use packinfer::types::DType;
use packinfer_capi::*;
use packinfer_testkit::{Case, Tensor};

/// This thread's last error message.
pub fn last_error() -> String {
    // SAFETY: never NULL: this thread's message, valid until its next failing call.
    unsafe { CStr::from_ptr(packinfer_last_error()) }.to_string_lossy().into_owned()
}

/// Asserts `status` and that the last error mentions every needle.
#[track_caller]
pub fn expect(status: PackinferStatus, want: PackinferStatus, needles: &[&str]) {
    let msg = last_error();
    assert_eq!(status, want, "status (message: {msg})");
    for n in needles {
        assert!(msg.contains(n), "message {msg:?} should mention {n:?}");
    }
}

/// Asserts OK, with the message otherwise.
#[track_caller]
pub fn ok(status: PackinferStatus) {
    assert_eq!(status, PackinferStatus::Ok, "{}", last_error());
}

/// A CPU context with `threads` worker threads.
pub fn cpu_context(threads: u32) -> PackinferContext {
    // SAFETY: a C struct of integers and pointers, for which all zeros is a valid value.
    let mut o = unsafe { std::mem::zeroed::<PackinferContextOptions>() };
    // SAFETY: `o` is writable.
    ok(unsafe { packinfer_context_options_default(&mut o) });
    o.backend = PackinferBackend::Cpu as u32;
    o.num_threads = threads;
    let mut ctx = PackinferContext::default();
    // SAFETY: `o` is initialized and `ctx` writable.
    ok(unsafe { packinfer_context_create(&o, &mut ctx) });
    ctx
}

pub trait CDesc {
    /// The C ABI's description of this batch, borrowing the case's arrays (and `groups`').
    fn c_desc(&self, groups: &[PackinferPrefixGroup]) -> PackinferBatchDesc;
}

impl CDesc for Case {
    fn c_desc(&self, groups: &[PackinferPrefixGroup]) -> PackinferBatchDesc {
        let (b, s) = (&self.batch, &self.shape);
        PackinferBatchDesc {
            struct_size: std::mem::size_of::<PackinferBatchDesc>(),
            batch_size: b.len() as u32,
            qo_indptr: b.qo_indptr.as_ptr(),
            kv_indptr: b.kv_indptr.as_ptr(),
            kv_page_indices: b.kv_page_indices.as_ptr(),
            kv_last_page_len: b.kv_last_page_len.as_ptr(),
            page_size: b.page_size,
            num_pages: b.num_pages,
            num_qo_heads: s.num_qo_heads,
            num_kv_heads: s.num_kv_heads,
            head_dim: s.head_dim,
            dtype: c_dtype(s.dtype),
            causal: s.causal,
            sm_scale: s.sm_scale,
            num_prefix_groups: groups.len() as u32,
            prefix_groups: if groups.is_empty() { std::ptr::null() } else { groups.as_ptr() },
            custom_mask: if b.mask_indptr.is_empty() { std::ptr::null() } else { b.custom_mask.as_ptr() },
            mask_indptr: if b.mask_indptr.is_empty() { std::ptr::null() } else { b.mask_indptr.as_ptr() },
            kv_dtype: if s.kv_dtype == s.dtype { 0 } else { c_dtype(s.kv_dtype) },
        }
    }
}

/// The C ABI's value of a dtype.
pub fn c_dtype(d: DType) -> u32 {
    (match d {
        DType::F16 => PackinferDtype::F16,
        DType::Bf16 => PackinferDtype::Bf16,
        DType::F32 => PackinferDtype::F32,
        DType::Fp8E4m3 => PackinferDtype::Fp8E4m3,
    }) as u32
}

/// Run arguments over `case`'s host tensors (Q, its cache, its soft-cap), writing `o` and `lse`.
pub fn run_args(case: &Case, o: &Tensor, lse: &mut [f32]) -> PackinferRunArgs {
    let l = &case.layout;
    PackinferRunArgs {
        struct_size: std::mem::size_of::<PackinferRunArgs>(),
        q: case.q.ptr() as *const c_void,
        q_stride_token: 0,
        q_stride_head: 0,
        kv: PackinferKvLayout {
            k: l.k as *const c_void,
            v: l.v as *const c_void,
            stride_page: l.stride_page,
            stride_token: l.stride_token,
            stride_head: l.stride_head,
            stride_dim: l.stride_dim,
        },
        o: o.ptr() as *mut c_void,
        o_stride_token: 0,
        o_stride_head: 0,
        lse: lse.as_mut_ptr(),
        stream: null_mut(),
        logits_soft_cap: case.logits_soft_cap,
        k_head_scales: if case.k_head_scales.is_empty() { std::ptr::null() } else { case.k_head_scales.as_ptr() },
        v_head_scales: if case.v_head_scales.is_empty() { std::ptr::null() } else { case.v_head_scales.as_ptr() },
        k_scale: case.k_scale,
        v_scale: case.v_scale,
    }
}
