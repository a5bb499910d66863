//! The main job until the replay tool lands: plan and run one trace-shaped engine step on the
//! CPU backend (or the GPU when one is present), with PackInfer's scheduling and with the
//! one-request-per-tile baseline, and print what each did.
//!
//! `cargo run --release --example trace_step [-- TRACE.csv]` — with no file, a built-in synthetic
//! long-tailed length mix is used, so it runs on a fresh machine.

use std::sync::Arc;
use std::time::Instant;

use packinfer::backend::{self, BackendChoice};
use packinfer::plan::{Plan, PlanOptions};
use packinfer::types::{Batch, DType, KvLayout, RowsTensor, RunArgs, Shape};

/// (context tokens, generated tokens) per request.
fn load_trace(path: Option<&str>) -> Result<Vec<(u32, u32)>, String> {
    let Some(path) = path else {
        // Long-tailed like code-completion traffic: mostly short prompts, a few very long ones.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        return Ok((0..512)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let u = (x % 10_000) as f64 / 10_000.0;
                ((20.0 * (1.0 / (1.0 - u * 0.995)).powf(1.3)) as u32 + 2, (x >> 20) as u32 % 64 + 1)
            })
            .collect());
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let num = |j: usize, name: &str| -> Result<u32, String> {
            f.get(j).and_then(|s| s.trim().parse().ok()).ok_or_else(|| format!("{path}:{}: field {name} is not a number: {line:?}", i + 1))
        };
        rows.push((num(1, "ContextTokens")?, num(2, "GeneratedTokens")?));
    }
    if rows.is_empty() {
        return Err(format!("{path} has no requests"));
    }
    Ok(rows)
}

/// A batch with contiguous pages per request; (q_len, kv_len) per request.
fn paged_batch(lens: &[(u32, u32)], page_size: u32) -> Batch {
    let (mut qo, mut kv, mut pages, mut last) = (vec![0i32], vec![0i32], Vec::new(), Vec::new());
    for &(q, k) in lens {
        qo.push(qo.last().unwrap() + q as i32);
        let n = k.div_ceil(page_size);
        let first = pages.len() as i32;
        pages.extend(first..first + n as i32);
        kv.push(pages.len() as i32);
        last.push(((k - 1) % page_size + 1) as i32);
    }
    let num_pages = pages.len() as u32;
    Batch { qo_indptr: qo, kv_indptr: kv, kv_page_indices: pages, kv_last_page_len: last, page_size, num_pages, prefix_groups: vec![] }
}

fn main() {
    let path = std::env::args().nth(1);
    let trace = match load_trace(path.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let backend = backend::open(&BackendChoice { kind: None, device_ordinal: 0, cpu_threads: 0, kernel_cache_dir: None }).expect("a backend");
    // A scaled-down model shape on the CPU, so the step takes seconds: 8 query heads over 2 KV
    // heads (GQA 4), head_dim 64, bf16.
    let shape = Shape { num_qo_heads: 8, num_kv_heads: 2, head_dim: 64, dtype: DType::Bf16, causal: true, sm_scale: 0.125 };
    // A mixed step: the first trace prompts as prefill chunks (capped, 2048 tokens in all), then
    // 64 decodes over the next requests' contexts (capped at 4096 keys).
    let mut lens = Vec::new();
    let mut budget = 2048u32;
    for &(ctx, _) in &trace {
        let q = ctx.clamp(1, 1024).min(budget);
        if q == 0 {
            break;
        }
        lens.push((q, q));
        budget -= q;
    }
    let prefills = lens.len();
    lens.extend(trace.iter().cycle().skip(prefills).take(64).map(|&(ctx, gen)| (1, (ctx + gen / 2).clamp(1, 4096))));
    let batch = paged_batch(&lens, 16);
    let (total_q, total_kv): (u32, u32) = (batch.total_q(), (0..batch.len()).map(|r| batch.kv_len(r)).sum());
    println!("trace: {}  backend: {}", path.as_deref().unwrap_or("(built-in synthetic)"), backend.device_name());
    println!("step: {prefills} prefill chunks + 64 decodes = {} requests, {total_q} query tokens, {total_kv} keys", batch.len());
    println!("shape: {} query heads / {} KV heads, head_dim {}, {}", shape.num_qo_heads, shape.num_kv_heads, shape.head_dim, shape.dtype.name());

    // Random inputs, the same for both schedules.
    let elems = |n: usize| -> Vec<half::bf16> {
        let mut x: u32 = 12345;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(1664525).wrapping_add(1013904223);
                half::bf16::from_f32((x >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0)
            })
            .collect()
    };
    let (hq, hk, d) = (shape.num_qo_heads as usize, shape.num_kv_heads as usize, shape.head_dim as usize);
    let q = elems(total_q as usize * hq * d);
    let cache = batch.num_pages as usize * 16 * hk * d;
    let (k, v) = (elems(cache), elems(cache));
    let layout = KvLayout { k: k.as_ptr() as u64, v: v.as_ptr() as u64, stride_page: (16 * hk * d) as i64, stride_token: (hk * d) as i64, stride_head: d as i64, stride_dim: 1 };

    let baseline = PlanOptions { packing: false, balancing: false, prefix_sharing: false, split_kv: false, ..PlanOptions::default() };
    let mut outputs = Vec::new();
    println!("\n{:<26} {:>7} {:>7} {:>7} {:>10} {:>12} {:>10} {:>10}", "schedule", "groups", "items", "splits", "tile util", "max/mean", "plan µs", "run ms");
    for (name, options) in [("one request per tile", baseline), ("PackInfer", PlanOptions::default())] {
        let plan = Arc::new(Plan::build(shape, batch.clone(), &backend.profile(), options).expect("plan"));
        let bound = backend.bind(plan.clone(), 0, None).expect("bind");
        let mut o = vec![half::bf16::ZERO; q.len()];
        let mut lse = vec![0f32; total_q as usize * hq];
        let args = RunArgs {
            q: RowsTensor { ptr: q.as_ptr() as u64, stride_token: (hq * d) as i64, stride_head: d as i64 },
            kv: layout,
            o: RowsTensor { ptr: o.as_mut_ptr() as u64, stride_token: (hq * d) as i64, stride_head: d as i64 },
            lse: lse.as_mut_ptr() as u64,
            stream: 0,
        };
        let t = Instant::now();
        bound.run(&args).expect("run");
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let s = plan.stats;
        println!(
            "{name:<26} {:>7} {:>7} {:>7} {:>9.1}% {:>12.2} {:>10.1} {:>10.1}",
            s.num_groups,
            s.num_items,
            s.num_split_requests,
            100.0 * s.tile_utilization,
            s.max_group_cost / s.mean_group_cost.max(1e-9),
            s.planning_ns as f64 / 1e3,
            ms
        );
        outputs.push(o);
    }
    let max_diff = outputs[0].iter().zip(&outputs[1]).map(|(a, b)| (a.to_f32() - b.to_f32()).abs()).fold(0f32, f32::max);
    println!("\nboth schedules compute the same attention: max |difference| = {max_diff:.2e} (bf16 outputs)");
}
