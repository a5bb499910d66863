//! What the C API tests share: a test case's batch as the C ABI's description.
#![allow(dead_code)]

use packinfer::types::DType;
use packinfer_capi::{PackinferBatchDesc, PackinferDtype, PackinferPrefixGroup};
use packinfer_testkit::Case;

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
            dtype: match s.dtype {
                DType::F16 => PackinferDtype::F16,
                DType::Bf16 => PackinferDtype::Bf16,
                DType::F32 => PackinferDtype::F32,
            } as u32,
            causal: s.causal,
            sm_scale: s.sm_scale,
            num_prefix_groups: groups.len() as u32,
            prefix_groups: if groups.is_empty() { std::ptr::null() } else { groups.as_ptr() },
        }
    }
}
