//! Attention through the KV pool and the C ABI, as an engine drives it: sequences with forks,
//! content-hash prefix sharing and relayouts between steps; each step appends, writes K/V per
//! layer, plans from the pool (`packinfer_pool_plan_create`), launches and runs every layer. The
//! output must equal naive f64 attention on each sequence's K/V gathered from the test's own
//! record of what it wrote (not from the pool).

use packinfer_testkit as common;

use std::collections::BTreeMap;
use std::ptr::{null, null_mut};

use common::{assert_close, rng, Case, Tensor};
use packinfer::types::{Batch, DType, KvLayout, Shape};
use packinfer_capi::*;
use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;
use rand::Rng;

fn ok(status: PackinferStatus, what: &str) {
    if status != PackinferStatus::Ok {
        // SAFETY: never NULL: this thread's message, valid until its next failing call.
        let msg = unsafe { std::ffi::CStr::from_ptr(packinfer_last_error()) }.to_string_lossy().into_owned();
        panic!("{what}: {status:?}: {msg}");
    }
}

struct Setup {
    layers: u32,
    qo_heads: u32,
    kv_heads: u32,
    head_dim: u32,
    dtype: DType,
    page_size: u32,
    /// The pool stores K/V as fp8 e4m3 (with random per-layer, per-head scales).
    fp8: bool,
}

/// Per sequence, per layer, the K and V rows written so far (exact stored values).
#[derive(Clone, Default)]
struct Record {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

fn ffi_dtype(d: DType) -> u32 {
    (match d {
        DType::F16 => PackinferDtype::F16,
        DType::Bf16 => PackinferDtype::Bf16,
        DType::F32 => PackinferDtype::F32,
        DType::Fp8E4m3 => PackinferDtype::Fp8E4m3,
    }) as u32
}

struct Engine {
    s: Setup,
    context: PackinferContext,
    pool: PackinferPool,
    seqs: BTreeMap<u64, Record>,
    r: SmallRng,
    /// An fp8 pool's scales, `[layer][K, V][kv head]` (empty otherwise).
    scales: Vec<f32>,
}

impl Engine {
    fn new(seed: u64, s: Setup, headroom: u32) -> Engine {
        let mut r = rng(seed);
        let scales: Vec<f32> =
            if s.fp8 { (0..2 * s.layers * s.kv_heads).map(|_| r.random_range(0.002..0.02f32)).collect() } else { Vec::new() };
        // SAFETY: a C struct of integers and pointers, for which all zeros is a valid value.
        let mut o: PackinferContextOptions = unsafe { std::mem::zeroed() };
        // SAFETY: each pointer below is NULL where the call checks for it, or a live local of the type and length the call expects.
        unsafe {
            ok(packinfer_context_options_default(&mut o), "context options");
            o.backend = PackinferBackend::Cpu as u32;
            o.num_threads = 2;
            let mut context = PackinferContext::default();
            ok(packinfer_context_create(&o, &mut context), "context");
            let mut po: PackinferPoolOptions = std::mem::zeroed();
            ok(packinfer_pool_options_default(&mut po), "pool options");
            po.num_layers = s.layers;
            po.num_qo_heads = s.qo_heads;
            po.num_kv_heads = s.kv_heads;
            po.head_dim = s.head_dim;
            po.dtype = ffi_dtype(s.dtype);
            po.page_size = s.page_size;
            po.num_pages = 0;
            let kv_bytes = if s.fp8 { 1 } else { s.dtype.size_bytes() as u64 };
            po.capacity_bytes =
                4096 * s.page_size as u64 * (2 * s.layers * s.kv_heads * s.head_dim) as u64 * kv_bytes + 4 * scales.len() as u64;
            po.headroom_pages = headroom;
            if s.fp8 {
                po.kv_dtype = PackinferDtype::Fp8E4m3 as u32;
                po.kv_head_scales = scales.as_ptr();
            }
            let mut pool = PackinferPool::default();
            ok(packinfer_pool_create(context, &po, &mut pool), "pool");
            let mut st: PackinferPoolStats = std::mem::zeroed();
            st.struct_size = std::mem::size_of::<PackinferPoolStats>();
            ok(packinfer_pool_stats(pool, &mut st), "stats");
            assert_eq!(st.num_pages, 4096, "capacity_bytes counts {kv_bytes}-byte elements and the scales");
            Engine { s, context, pool, seqs: BTreeMap::new(), r, scales }
        }
    }

    fn row(&self) -> usize {
        (self.s.kv_heads * self.s.head_dim) as usize
    }

    /// The scales of `layer`'s K (`v = false`) or V, one per KV head (empty for a pool of Q's dtype).
    fn layer_scales(&self, layer: u32, v: bool) -> &[f32] {
        let h = self.s.kv_heads as usize;
        let at = (2 * layer as usize + v as usize) * h;
        self.scales.get(at..at + h).unwrap_or(&[])
    }

    /// What the pool holds for the row-major `[token][kv head][dim]` values `x` of `layer`'s K or
    /// V: the values themselves, or in an fp8 pool the (unscaled) e4m3 value of x / scale of the
    /// element's head, the conversion the pool documents.
    fn stored(&self, layer: u32, v: bool, x: &[f64]) -> Vec<f32> {
        let scales = self.layer_scales(layer, v);
        if scales.is_empty() {
            return x.iter().map(|&x| x as f32).collect();
        }
        let d = self.s.head_dim as usize;
        let h = self.s.kv_heads as usize;
        x.iter().enumerate().map(|(i, &x)| common::e4m3_value(packinfer::fp8::f32_to_e4m3(x as f32 / scales[(i / d) % h])) as f32).collect()
    }

    fn create(&mut self) -> u64 {
        let mut id = 0;
        // SAFETY: live locals of the types and lengths the call expects.
        ok(unsafe { packinfer_pool_sequence_create(self.pool, &mut id) }, "sequence_create");
        self.seqs.insert(id, Record { k: vec![Vec::new(); self.s.layers as usize], v: vec![Vec::new(); self.s.layers as usize], len: 0 });
        id
    }

    /// Appends `n` tokens to each `(seq, n)` and writes random K/V for them in every layer.
    fn append_and_write(&mut self, step: &[(u64, u32)]) {
        for &(id, n) in step {
            let mut slots = vec![-1i64; n as usize];
            // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
            ok(unsafe { packinfer_pool_append(self.pool, id, n, slots.as_mut_ptr(), null_mut()) }, "append");
            assert!(slots.iter().all(|&s| s >= 0));
        }
        let total: usize = step.iter().map(|&(_, n)| n as usize).sum();
        let ids: Vec<u64> = step.iter().map(|s| s.0).collect();
        let counts: Vec<u32> = step.iter().map(|s| s.1).collect();
        let row = self.row();
        for layer in 0..self.s.layers {
            let k = Tensor::new(self.s.dtype, (0..total * row).map(|_| self.r.random_range(-1.0..1.0f32)));
            let v = Tensor::new(self.s.dtype, (0..total * row).map(|_| self.r.random_range(-1.0..1.0f32)));
            let src = PackinferKvSource {
                struct_size: std::mem::size_of::<PackinferKvSource>(),
                k: k.ptr() as *const _,
                v: v.ptr() as *const _,
                num_rows: total as u32,
                num_kv_heads: self.s.kv_heads,
                head_dim: self.s.head_dim,
                dtype: ffi_dtype(self.s.dtype),
                stride_token: 0,
            };
            // SAFETY: src addresses the step's K/V rows on the host; ids and counts have ids.len() entries.
            let st =
                unsafe { packinfer_pool_write_kv(self.pool, layer, ids.as_ptr(), counts.as_ptr(), ids.len() as u32, &src, null_mut()) };
            ok(st, "write_kv");
            let (stored_k, stored_v) = (self.stored(layer, false, &k.exact), self.stored(layer, true, &v.exact));
            let mut at = 0;
            for &(id, n) in step {
                let rec = self.seqs.get_mut(&id).unwrap();
                let span = at * row..(at + n as usize) * row;
                rec.k[layer as usize].extend(stored_k[span.clone()].iter().copied());
                rec.v[layer as usize].extend(stored_v[span].iter().copied());
                at += n as usize;
            }
        }
        for &(id, n) in step {
            self.seqs.get_mut(&id).unwrap().len += n as usize;
        }
    }

    fn fork(&mut self, parent: u64, at: usize) -> u64 {
        let mut child = 0;
        // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
        ok(unsafe { packinfer_pool_fork(self.pool, parent, at as u32, null_mut(), &mut child) }, "fork");
        let row = self.row();
        let p = &self.seqs[&parent];
        let rec = Record {
            k: p.k.iter().map(|l| l[..at * row].to_vec()).collect(),
            v: p.v.iter().map(|l| l[..at * row].to_vec()).collect(),
            len: at,
        };
        self.seqs.insert(child, rec);
        child
    }

    fn plan(&self, step: &[(u64, u32)]) -> PackinferPlan {
        let ids: Vec<u64> = step.iter().map(|s| s.0).collect();
        let q: Vec<u32> = step.iter().map(|s| s.1).collect();
        let mut plan = PackinferPlan::default();
        // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
        ok(
            unsafe { packinfer_pool_plan_create(self.context, self.pool, ids.as_ptr(), q.as_ptr(), ids.len() as u32, null(), &mut plan) },
            "pool_plan_create",
        );
        plan
    }

    /// Plans, optionally relays out (re-planning when pages moved), launches and runs every
    /// layer, and checks each against the f64 reference. Returns the pages the relayout moved.
    fn run_step(&mut self, step: &[(u64, u32)], relayout: Option<bool>, ctx: &str) -> u64 {
        let mut plan = self.plan(step);
        let mut moved = 0;
        if let Some(regroup) = relayout {
            let ids: Vec<u64> = step.iter().map(|s| s.0).collect();
            // SAFETY: a C struct of integers and pointers, for which all zeros is a valid value.
            let mut rep: PackinferRelayoutReport = unsafe { std::mem::zeroed() };
            rep.struct_size = std::mem::size_of::<PackinferRelayoutReport>();
            // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
            ok(
                unsafe { packinfer_pool_relayout(self.pool, plan, ids.as_ptr(), ids.len() as u32, regroup, null_mut(), &mut rep) },
                "relayout",
            );
            moved = rep.pages_moved;
            if moved > 0 {
                ok(packinfer_plan_destroy(plan), "plan_destroy");
                plan = self.plan(step);
            }
        }
        let mut launch = PackinferLaunch::default();
        // SAFETY: live locals of the types and lengths the call expects; the NULLs are checked by the call.
        ok(unsafe { packinfer_launch_create(self.context, plan, null(), null_mut(), &mut launch) }, "launch_create");
        let s = &self.s;
        let shape = Shape {
            num_qo_heads: s.qo_heads,
            num_kv_heads: s.kv_heads,
            head_dim: s.head_dim,
            dtype: s.dtype,
            kv_dtype: if s.fp8 { DType::Fp8E4m3 } else { s.dtype },
            causal: true,
            sm_scale: 1.0 / (s.head_dim as f32).sqrt(),
        };
        let row = self.row();
        for layer in 0..s.layers {
            // The reference case: each request's K/V gathered contiguously, page size 1.
            let (mut kvals, mut vvals) = (Vec::new(), Vec::new());
            let (mut qo, mut kvp, mut last) = (vec![0i32], vec![0i32], Vec::new());
            for &(id, q) in step {
                let rec = &self.seqs[&id];
                kvals.extend_from_slice(&rec.k[layer as usize]);
                vvals.extend_from_slice(&rec.v[layer as usize]);
                qo.push(qo.last().unwrap() + q as i32);
                kvp.push(kvp.last().unwrap() + rec.len as i32);
                last.push(if rec.len == 0 { 0 } else { 1 });
            }
            let total_kv = *kvp.last().unwrap();
            let total_q = *qo.last().unwrap() as usize;
            // The recorded values are exactly the K/V dtype's (an fp8 pool's codes as values).
            let k = Tensor::new(shape.kv_dtype, kvals);
            let v = Tensor::new(shape.kv_dtype, vvals);
            let q = Tensor::new(s.dtype, (0..total_q * (s.qo_heads * s.head_dim) as usize).map(|_| self.r.random_range(-2.0..2.0f32)));
            let layout = KvLayout {
                k: k.ptr(),
                v: v.ptr(),
                stride_page: row as i64,
                stride_token: row as i64,
                stride_head: s.head_dim as i64,
                stride_dim: 1,
            };
            let batch = Batch {
                qo_indptr: qo,
                kv_indptr: kvp,
                kv_page_indices: (0..total_kv).collect(),
                kv_last_page_len: last,
                page_size: 1,
                num_pages: total_kv.max(1) as u32,
                prefix_groups: vec![],
                custom_mask: Vec::new(),
                mask_indptr: Vec::new(),
            };
            let case = Case {
                shape,
                batch,
                q,
                k,
                v,
                layout,
                hnd: false,
                window_left: None,
                logits_soft_cap: 0.0,
                k_scale: 1.0,
                v_scale: 1.0,
                k_head_scales: self.layer_scales(layer, false).to_vec(),
                v_head_scales: self.layer_scales(layer, true).to_vec(),
            };
            let o = Tensor::poisoned(s.dtype, case.out_len());
            let mut lse = vec![f32::NAN; total_q * s.qo_heads as usize];
            // SAFETY: a C struct of integers and pointers, for which all zeros is a valid value.
            let mut args: PackinferRunArgs = unsafe { std::mem::zeroed() };
            args.struct_size = std::mem::size_of::<PackinferRunArgs>();
            args.q = case.q.ptr() as *const _;
            args.o = o.ptr() as *mut _;
            args.lse = lse.as_mut_ptr();
            // SAFETY: live locals of the types and lengths the call expects.
            ok(unsafe { packinfer_pool_kv_layout(self.pool, layer, &mut args.kv) }, "pool_kv_layout");
            // SAFETY: as above.
            ok(unsafe { packinfer_pool_kv_scales(self.pool, layer, &mut args.k_head_scales, &mut args.v_head_scales) }, "pool_kv_scales");
            assert_eq!(args.k_head_scales.is_null(), !s.fp8, "per-head scales for an fp8 pool only");
            // SAFETY: args address the case's tensors, which outlive the call (a CPU run is synchronous).
            ok(unsafe { packinfer_run(launch, &args) }, "run");
            assert_close(&case, &o, &lse, &format!("{ctx} layer {layer}"));
        }
        ok(packinfer_launch_destroy(launch), "launch_destroy");
        ok(packinfer_plan_destroy(plan), "plan_destroy");
        moved
    }

    fn stats(&self) -> PackinferPoolStats {
        // SAFETY: a C struct of integers and pointers, for which all zeros is a valid value.
        let mut st: PackinferPoolStats = unsafe { std::mem::zeroed() };
        st.struct_size = std::mem::size_of::<PackinferPoolStats>();
        // SAFETY: live locals of the types and lengths the call expects.
        ok(unsafe { packinfer_pool_stats(self.pool, &mut st) }, "stats");
        st
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = packinfer_pool_destroy(self.pool);
        let _ = packinfer_context_destroy(self.context);
    }
}

#[test]
fn attention_through_the_pool_with_forks_sharing_and_relayouts() {
    let mut total_moved = 0;
    let mut shared_steps = 0;
    // Seeds 6..9: pools that store K/V as fp8, written from each Q dtype.
    for seed in 0..9u64 {
        let mut r = rng(seed);
        let dtype = [DType::F32, DType::Bf16, DType::F16][seed as usize % 3];
        let page_size = [16, 1, 4][(seed as usize / 3 + seed as usize) % 3];
        let setup = Setup { layers: 2, qo_heads: 4, kv_heads: 2, head_dim: 64, dtype, page_size, fp8: seed >= 6 };
        let mut e = Engine::new(seed, setup, r.random_range(0..=2));
        // Prompts: a few independent ones and a shared system prompt with forked members.
        let mut live: Vec<u64> = Vec::new();
        for _ in 0..3 {
            let id = e.create();
            let n = r.random_range(1..=120);
            e.append_and_write(&[(id, n)]);
            live.push(id);
        }
        let system = e.create();
        e.append_and_write(&[(system, r.random_range(30..=200))]);
        let sys_len = e.seqs[&system].len;
        for _ in 0..3 {
            let at = r.random_range(sys_len / 2..=sys_len);
            let child = e.fork(system, at);
            live.push(child);
        }
        // Content-hash sharing: a sequence registered by hash, matched by a new sequence.
        let full_pages = sys_len / page_size as usize;
        let hashes: Vec<u64> = (0..full_pages as u64).map(|i| 0xabc0 + i + 1000 * seed).collect();
        // SAFETY: live locals of the types and lengths the call expects.
        ok(unsafe { packinfer_pool_register_page_hashes(e.pool, system, hashes.as_ptr(), hashes.len() as u32) }, "register");
        let matched_seq = e.create();
        let mut matched = 0u32;
        // SAFETY: live locals of the types and lengths the call expects.
        ok(unsafe { packinfer_pool_match_prefix(e.pool, matched_seq, hashes.as_ptr(), hashes.len() as u32, &mut matched) }, "match");
        assert_eq!(matched as usize, full_pages * page_size as usize);
        let rec = e.seqs[&system].clone();
        let row = e.row();
        e.seqs.insert(
            matched_seq,
            Record {
                k: rec.k.iter().map(|l| l[..matched as usize * row].to_vec()).collect(),
                v: rec.v.iter().map(|l| l[..matched as usize * row].to_vec()).collect(),
                len: matched as usize,
            },
        );
        live.push(matched_seq);
        live.push(system);
        // Steps: the first prefills the forks' suffixes (chunks), then decode with occasional chunks.
        for step_no in 0..8 {
            let mut step: Vec<(u64, u32)> = Vec::new();
            for &id in &live {
                if step_no == 0 || r.random_bool(0.8) {
                    step.push((id, if step_no == 0 || r.random_bool(0.15) { r.random_range(1..=40) } else { 1 }));
                }
            }
            if step.is_empty() {
                continue;
            }
            e.append_and_write(&step);
            let relayout = match step_no % 3 {
                0 => Some(true),
                1 => Some(false),
                _ => None,
            };
            total_moved += e.run_step(&step, relayout, &format!("seed {seed} step {step_no} {dtype:?} page {page_size}"));
            let st = e.stats();
            if st.step_read_bytes_shared < st.step_read_bytes_unshared {
                shared_steps += 1;
            }
            // Now and then a sequence forks mid-decode, or one finishes.
            if r.random_bool(0.3) {
                let &p = live.choose(&mut r).unwrap();
                let at = r.random_range(1..=e.seqs[&p].len);
                live.push(e.fork(p, at));
            }
            if live.len() > 4 && r.random_bool(0.3) {
                let i = r.random_range(0..live.len());
                let id = live.swap_remove(i);
                ok(packinfer_pool_release(e.pool, id), "release");
                e.seqs.remove(&id);
            }
        }
        for id in live {
            ok(packinfer_pool_release(e.pool, id), "release");
        }
        let st = e.stats();
        assert_eq!(st.pages_free, st.num_pages, "seed {seed}: pages leaked");
    }
    assert!(total_moved > 0, "no relayout moved a page: the test does not exercise relayout");
    assert!(shared_steps > 0, "no step read a shared prefix once");
}
