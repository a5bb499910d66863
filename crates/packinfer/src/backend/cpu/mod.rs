//! The CPU backend: the reference every other backend is checked against. It executes the
//! planner's work list exactly as a GPU kernel would (same items, same partial slots, same
//! merges), one work item at a time per thread, with fp32 online softmax. Simple on purpose.

mod kv_memory;
mod workers;

use kv_memory::HostKvMemory;
use workers::Workers;

use std::sync::Arc;

use half::{bf16, f16};
use parking_lot::Mutex;

use super::{check_update, Backend, BackendKind, BoundPlan, KvMemory, LaunchCapacity, Scratch};
use crate::error::{Error, Result};
use crate::invalid;
use crate::plan::{DeviceProfile, ItemCopy, MergeRow, Plan, FINAL_OUTPUT};
use crate::types::{DType, RunArgs, Shape};

/// The CPU backend: executes a plan's work list on host threads, with host tensors. Open it
/// with [`crate::backend::open`] or [`CpuBackend::new`].
pub struct CpuBackend {
    threads: u32,
    /// Started with the backend; every run of every launch runs on them.
    workers: Arc<Workers>,
}

impl CpuBackend {
    /// `threads = 0` uses every available core.
    pub fn new(threads: u32) -> Self {
        let threads = if threads == 0 { std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1) } else { threads };
        CpuBackend { threads, workers: Arc::new(Workers::new(threads)) }
    }
    /// Worker threads a run uses.
    pub fn threads(&self) -> u32 {
        self.threads
    }
}

impl Backend for CpuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }
    fn device_name(&self) -> String {
        "cpu".into()
    }
    fn profile(&self) -> DeviceProfile {
        DeviceProfile::cpu(self.threads)
    }
    fn bind(&self, plan: Arc<Plan>, stream: u64, scratch: Option<Scratch>) -> Result<Box<dyn BoundPlan>> {
        self.bind_with_capacity(plan, stream, scratch, &LaunchCapacity::default())
    }
    /// As on CUDA, a launch holds room for its own plan or `capacity`, whichever is larger in
    /// each count, and `update` takes any plan of the same shape within it: the same contract,
    /// so an engine's update path is tested without a GPU.
    fn bind_with_capacity(
        &self,
        plan: Arc<Plan>,
        _stream: u64,
        scratch: Option<Scratch>,
        capacity: &LaunchCapacity,
    ) -> Result<Box<dyn BoundPlan>> {
        check_plan(&plan)?;
        let capacity = capacity.max(&LaunchCapacity::of(&plan));
        let need = crate::plan::scratch_bytes(capacity.partial_slots, plan.shape.head_dim);
        let scratch = match scratch {
            Some(s) if s.bytes < need => {
                return Err(invalid!("scratch_bytes = {} is smaller than the {need} bytes this launch needs", s.bytes));
            }
            Some(s) if s.ptr == 0 && need > 0 => return Err(invalid!("scratch pointer is null but the launch needs {need} bytes")),
            Some(s) if need > 0 => ScratchMem::Caller(s.ptr as *mut f32),
            _ => {
                let mut v = Vec::new();
                v.try_reserve_exact(need / 4)
                    .map_err(|_| Error::OutOfMemory(format!("cannot allocate {need} bytes of scratch for this launch's split partials")))?;
                v.resize(need / 4, 0.0);
                ScratchMem::Owned(v)
            }
        };
        let bound = Bound::of(plan.clone());
        Ok(Box::new(CpuBound {
            shape: plan.shape,
            page_size: plan.batch.page_size,
            capacity,
            workers: self.workers.clone(),
            state: Mutex::new(CpuState { bound, scratch }),
        }))
    }
    fn alloc_kv(&self, bytes: usize) -> Result<Box<dyn KvMemory>> {
        Ok(Box::new(HostKvMemory::new(bytes)?))
    }
}

enum ScratchMem {
    Owned(Vec<f32>),
    /// The caller's host memory, at least `plan.scratch_bytes()` long.
    Caller(*mut f32),
}

// SAFETY: the caller's scratch pointer is only used under the bound plan's mutex.
unsafe impl Send for ScratchMem {}

/// Copies `[start, end)` of each execution group (copies are sorted by group).
fn group_ranges(copies: &[ItemCopy]) -> Vec<std::ops::Range<usize>> {
    let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, copy) in copies.iter().enumerate() {
        match ranges.last_mut() {
            Some(r) if copies[r.start].group == copy.group => r.end = i + 1,
            _ => ranges.push(i..i + 1),
        }
    }
    ranges
}

struct CpuBound {
    /// The shape and page size of the plan the launch was created with: the launch's (`update`
    /// keeps them). Not the plan itself, which the launch lets go once another replaces it.
    shape: Shape,
    page_size: u32,
    capacity: LaunchCapacity,
    workers: Arc<Workers>,
    /// The plan that runs and the scratch, under one lock: one run or update at a time per
    /// launch (concurrent runs would share the partial slots).
    state: Mutex<CpuState>,
}

struct CpuState {
    bound: Bound,
    scratch: ScratchMem,
}

/// A plan with what running it needs.
struct Bound {
    plan: Arc<Plan>,
    /// The plan's item copies (`Plan::item_copies`): the KV heads are derived once, at bind.
    copies: Vec<ItemCopy>,
    /// A thread takes a whole group at a time, as a persistent CTA does on the GPU, so the
    /// planner's load balance is what the threads see.
    groups: Vec<std::ops::Range<usize>>,
    /// Partial slots the plan writes (the scratch holds their outputs, then their LSEs).
    num_slots: usize,
}

impl Bound {
    fn of(plan: Arc<Plan>) -> Bound {
        let copies: Vec<ItemCopy> = plan.item_copies().collect();
        let groups = group_ranges(&copies);
        let num_slots = plan.num_partial_slots() as usize;
        Bound { plan, copies, groups, num_slots }
    }
}

impl BoundPlan for CpuBound {
    fn shape(&self) -> &Shape {
        &self.shape
    }
    unsafe fn run(&self, args: &RunArgs) -> Result<()> {
        let mut state = self.state.lock();
        let CpuState { bound, scratch } = &mut *state;
        // Held to the end: a relayout of the plan's pool on another thread waits for this run
        // instead of moving (and freeing) the pages it reads.
        let _layout = bound.plan.pin_layout()?;
        check_run_args(&bound.plan, args)?;
        let partial = match scratch {
            ScratchMem::Owned(v) => v.as_mut_ptr(),
            ScratchMem::Caller(p) => *p,
        };
        let plan = &*bound.plan;
        let shape = &plan.shape;
        let out = Outputs {
            args: *args,
            partial,
            num_slots: bound.num_slots,
            head_dim: shape.head_dim as usize,
            num_qo_heads: shape.num_qo_heads as usize,
            dtype: shape.dtype,
        };
        // Both phases on the backend's persistent workers; the second starts when every item
        // of the first has finished.
        self.workers.parallel_for(bound.groups.len(), |g| {
            for copy in &bound.copies[bound.groups[g].clone()] {
                // SAFETY: run's caller vouches for the tensors and the scratch; the plan passed
                // the consistency check at bind/update, so every index it holds is in range.
                unsafe { execute_item(plan, copy, args, &out) };
            }
        });
        // SAFETY: as above; the items that wrote the partial slots have all finished.
        self.workers.parallel_for(plan.merges.len(), |i| unsafe { merge_row(plan, &plan.merges[i], &out) });
        Ok(())
    }
    fn is_ready(&self) -> Result<bool> {
        Ok(true)
    }
    fn wait(&self) -> Result<()> {
        Ok(())
    }
    /// One kernel on the CPU: every plan that fits suits.
    fn suits(&self, plan: &Plan) -> bool {
        check_update(&self.shape, self.page_size, &self.capacity, plan).is_ok()
    }
    fn update(&self, plan: Arc<Plan>, _stream: u64) -> Result<()> {
        check_plan(&plan)?;
        check_update(&self.shape, self.page_size, &self.capacity, &plan)?;
        self.state.lock().bound = Bound::of(plan);
        Ok(())
    }
}

/// What running `plan` on host threads needs of it: every index in range (`check_consistent`)
/// and no two items or merge rows writing the same memory (threads run them concurrently).
fn check_plan(plan: &Plan) -> Result<()> {
    plan.check_consistent()?;
    plan.check_writes_once()
}

/// The run arguments' values, and null pointers (all the CPU can check about the caller's tensors).
pub(crate) fn check_run_args(plan: &Plan, args: &RunArgs) -> Result<()> {
    check_run_pointers(plan.shape.kv_dtype, plan.batch.total_q(), plan.batch.kv_page_indices.len(), args)
}

/// [`check_run_args`] for a plan with K/V of `kv_dtype`, of `total_q` query tokens reading
/// `pages` pages.
pub(crate) fn check_run_pointers(kv_dtype: DType, total_q: u32, pages: usize, args: &RunArgs) -> Result<()> {
    args.validate(kv_dtype)?;
    if total_q == 0 {
        return Ok(());
    }
    for (name, p) in [("q", args.q.ptr), ("o", args.o.ptr)] {
        if p == 0 {
            return Err(invalid!("{name} is a null pointer but the plan has {total_q} query tokens"));
        }
    }
    if pages > 0 && (args.kv.k == 0 || args.kv.v == 0) {
        return Err(invalid!("kv.k or kv.v is a null pointer but the plan reads {pages} pages"));
    }
    Ok(())
}

/// Where results go: the caller's O/LSE for final rows, the scratch for partial slots. Every
/// (token, head) row and every partial slot is written by exactly one work item (the planner's
/// contract, which the plan tests check), so threads never write the same memory.
struct Outputs {
    args: RunArgs,
    /// Scratch: `num_slots × head_dim` partial outputs, then `num_slots` partial LSEs.
    partial: *mut f32,
    num_slots: usize,
    head_dim: usize,
    num_qo_heads: usize,
    dtype: DType,
}

// SAFETY: see the type's comment: writes from different threads go to disjoint addresses.
unsafe impl Sync for Outputs {}

impl Outputs {
    /// Writes one finished row, `acc` already normalized, with its natural-log LSE.
    ///
    /// # Safety
    /// `run`'s contract holds for `self.args`; `token < total_q`, `head < num_qo_heads` and a
    /// partial `slot < num_slots` (a checked plan's rows and slots), written by no other thread.
    unsafe fn write(&self, slot: u32, token: u32, head: u32, acc: &[f32], lse: f32) {
        if slot == FINAL_OUTPUT {
            let o = self.args.o;
            let base = token as i64 * o.stride_token + head as i64 * o.stride_head;
            for (d, &x) in acc.iter().enumerate() {
                // SAFETY: (token, head, d) is inside the caller's O (this fn's contract).
                unsafe { store(o.ptr, base + d as i64, self.dtype, x) };
            }
            if self.args.lse != 0 {
                // SAFETY: a non-null LSE is f32 [total_q, num_qo_heads] (run's contract).
                unsafe { *(self.args.lse as *mut f32).add(token as usize * self.num_qo_heads + head as usize) = lse };
            }
        } else {
            let slot = slot as usize;
            // SAFETY: slot < num_slots and the scratch holds num_slots rows, then their LSEs.
            unsafe {
                std::ptr::copy_nonoverlapping(acc.as_ptr(), self.partial.add(slot * self.head_dim), self.head_dim);
                *self.partial.add(self.num_slots * self.head_dim + slot) = lse;
            }
        }
    }

    /// A partial slot's output row and LSE.
    ///
    /// # Safety
    /// `slot < num_slots`, written by a work item that has finished, written by no one now.
    unsafe fn partial(&self, slot: u32) -> (&[f32], f32) {
        let slot = slot as usize;
        // SAFETY: this fn's contract; the scratch holds num_slots rows, then their LSEs.
        unsafe {
            (
                std::slice::from_raw_parts(self.partial.add(slot * self.head_dim), self.head_dim),
                *self.partial.add(self.num_slots * self.head_dim + slot),
            )
        }
    }
}

/// Loads element `idx` of a tensor of `dtype` at `base` as f32.
///
/// # Safety
/// `base + idx` must be inside the caller's tensor.
#[inline]
unsafe fn load(base: u64, idx: i64, dtype: DType) -> f32 {
    // SAFETY: the element is inside the caller's tensor (this fn's contract).
    unsafe {
        match dtype {
            DType::F16 => (*(base as *const f16).offset(idx as isize)).to_f32(),
            DType::Bf16 => (*(base as *const bf16).offset(idx as isize)).to_f32(),
            DType::F32 => *(base as *const f32).offset(idx as isize),
            DType::Fp8E4m3 => crate::fp8::e4m3_to_f32(*(base as *const u8).offset(idx as isize)),
        }
    }
}

/// # Safety
/// `base + idx` must be inside the caller's tensor.
#[inline]
unsafe fn store(base: u64, idx: i64, dtype: DType, x: f32) {
    // SAFETY: the element is inside the caller's tensor (this fn's contract).
    unsafe {
        match dtype {
            DType::F16 => *(base as *mut f16).offset(idx as isize) = f16::from_f32(x),
            DType::Bf16 => *(base as *mut bf16).offset(idx as isize) = bf16::from_f32(x),
            DType::F32 => *(base as *mut f32).offset(idx as isize) = x,
            DType::Fp8E4m3 => *(base as *mut u8).offset(idx as isize) = crate::fp8::f32_to_e4m3(x),
        }
    }
}

/// One query row of a tile while it is being computed.
struct RowState {
    token: u32,
    head: u32,
    /// Keys `< key_start` (the sliding window) and `>= key_limit` (in the row's request) are
    /// masked.
    key_start: u32,
    /// See `key_start`.
    key_limit: u32,
    /// The row's request and query in it, for the custom mask.
    request: u32,
    /// See `request`.
    q: u32,
    qv: Vec<f32>,
    max: f32,
    sum: f32,
    acc: Vec<f32>,
}

/// Computes one KV head's copy of a work item: its tile of rows against its KV chunks, with
/// fp32 online softmax; writes each row to O/LSE or to its partial slot.
///
/// # Safety
/// `run`'s contract holds for `args` and `out`; `plan` passed `check_consistent` and `copy` is
/// one of its item copies, run by no other thread.
unsafe fn execute_item(plan: &Plan, copy: &ItemCopy, args: &RunArgs, out: &Outputs) {
    let item = &plan.items[copy.item as usize];
    let shape = &plan.shape;
    let d = shape.head_dim as usize;
    let group = shape.group_size();
    let mut rows: Vec<RowState> = Vec::with_capacity(item.num_rows as usize);
    for seg in &plan.row_segments[item.seg_begin as usize..(item.seg_begin + item.seg_count) as usize] {
        let req = plan.requests[seg.request as usize];
        for r in 0..seg.q_count * group {
            let q = seg.q_begin + r / group;
            let token = req.q_start + q;
            let head = copy.kv_head * group + r % group;
            let base = token as i64 * args.q.stride_token + head as i64 * args.q.stride_head;
            // SAFETY: token < total_q and head < num_qo_heads (a checked plan), inside the
            // caller's Q (run's contract).
            let qv = (0..d).map(|i| unsafe { load(args.q.ptr, base + i as i64, shape.dtype) }).collect();
            rows.push(RowState {
                token,
                head,
                key_start: req.key_start(q, plan.options.window_left),
                key_limit: req.key_limit(q, plan.batch.applies_causal(shape.causal)),
                request: seg.request,
                q,
                qv,
                max: f32::NEG_INFINITY,
                sum: 0.0,
                acc: vec![0.0; d],
            });
        }
    }
    let (mut k, mut v) = (vec![0.0f32; d], vec![0.0f32; d]);
    let kv = args.kv;
    let soft_cap = args.logits_soft_cap;
    // An fp8 cache's codes times the copy's KV head's scales (1 for a cache of Q's dtype).
    let head_scale = |per_head: u64| {
        if per_head == 0 {
            1.0
        } else {
            // SAFETY: a non-null per-head scale array holds num_kv_heads f32 (run's contract)
            // and kv_head < num_kv_heads (a checked plan).
            unsafe { *(per_head as *const f32).add(copy.kv_head as usize) }
        }
    };
    let scales = args.kv_scales;
    let k_scale = scales.k_scale * head_scale(scales.k_head_scales);
    let v_scale = scales.v_scale * head_scale(scales.v_head_scales);
    for chunk in &plan.kv_chunks[item.chunk_begin as usize..(item.chunk_begin + item.chunk_count) as usize] {
        let req = plan.requests[chunk.request as usize];
        for key in chunk.key_begin..chunk.key_end {
            let page = plan.batch.kv_page_indices[(req.page_start + key / plan.batch.page_size) as usize] as i64;
            let base = page * kv.stride_page + (key % plan.batch.page_size) as i64 * kv.stride_token + copy.kv_head as i64 * kv.stride_head;
            for i in 0..d {
                // SAFETY: page < num_pages (a checked plan) and the layout describes the caller's
                // cache of num_pages pages (run's contract).
                unsafe {
                    k[i] = load(kv.k, base + i as i64 * kv.stride_dim, shape.kv_dtype) * k_scale;
                    v[i] = load(kv.v, base + i as i64 * kv.stride_dim, shape.kv_dtype) * v_scale;
                }
            }
            for row in &mut rows[chunk.row_begin as usize..chunk.row_end as usize] {
                if key >= row.key_limit || key < row.key_start || !plan.batch.mask_allows(row.request as usize, row.q, key) {
                    continue;
                }
                let mut s = row.qv.iter().zip(&k).map(|(a, b)| a * b).sum::<f32>() * shape.sm_scale;
                if soft_cap > 0.0 {
                    s = soft_cap * (s / soft_cap).tanh();
                }
                let new_max = row.max.max(s);
                let rescale = (row.max - new_max).exp();
                let p = (s - new_max).exp();
                row.sum = row.sum * rescale + p;
                for (a, &vi) in row.acc.iter_mut().zip(&v) {
                    *a = *a * rescale + p * vi;
                }
                row.max = new_max;
            }
        }
    }
    for (r, row) in rows.iter_mut().enumerate() {
        let (lse, inv) = if row.sum > 0.0 { (row.max + row.sum.ln(), 1.0 / row.sum) } else { (f32::NEG_INFINITY, 0.0) };
        row.acc.iter_mut().for_each(|a| *a *= inv);
        let slot = if copy.partial_slot == FINAL_OUTPUT { FINAL_OUTPUT } else { copy.partial_slot + r as u32 };
        // SAFETY: the row and slot are the item's own (a checked plan: in range, and no other
        // item writes them); run's contract covers the memory.
        unsafe { out.write(slot, row.token, row.head, &row.acc, lse) };
    }
}

/// Combines the partial results of one token, for every query head, by log-sum-exp into O and
/// LSE. A piece that saw no visible key has LSE = -inf and weight 0.
///
/// # Safety
/// `run`'s contract holds for `out`; `plan` passed `check_consistent`, `m` is one of its merge
/// rows, and every work item has finished.
unsafe fn merge_row(plan: &Plan, m: &MergeRow, out: &Outputs) {
    let pieces = &plan.merge_slots[m.slot_begin as usize..(m.slot_begin + m.slot_count) as usize];
    let group = plan.shape.group_size();
    let mut acc = vec![0.0f32; out.head_dim];
    for head in 0..plan.shape.num_qo_heads {
        let (kv_head, j) = (head / group, head % group);
        let slot = |p: &crate::plan::MergeSlot| p.slot + kv_head * p.head_stride + j;
        acc.iter_mut().for_each(|a| *a = 0.0);
        // SAFETY: a checked plan's merge slots are below num_slots for every query head and its
        // merge rows name tokens of the batch, each merged by one row; the items that wrote the
        // slots have finished (this fn's contract). The blocks below rely on the same facts.
        let max = pieces.iter().map(|p| unsafe { out.partial(slot(p)) }.1).fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            // SAFETY: see above.
            unsafe { out.write(FINAL_OUTPUT, m.q_token, head, &acc, max) };
            continue;
        }
        let mut total = 0.0f32;
        for p in pieces {
            // SAFETY: see above.
            let (o, lse) = unsafe { out.partial(slot(p)) };
            let w = (lse - max).exp();
            total += w;
            acc.iter_mut().zip(o).for_each(|(a, &x)| *a += w * x);
        }
        acc.iter_mut().for_each(|a| *a /= total);
        // SAFETY: see above.
        unsafe { out.write(FINAL_OUTPUT, m.q_token, head, &acc, max + total.ln()) };
    }
}
