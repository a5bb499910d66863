//! Fits the planner's cost model to this device: times the attention kernel on a few work shapes
//! (tile rows × keys per item), fits `a·rows·keys + b·keys + c` per item by least squares, and
//! stores the profile next to the kernel cache so later contexts on this device load it.

use std::path::PathBuf;
use std::sync::Arc;

use super::driver::{DeviceBuffer, Event};
use super::CudaBackend;
use crate::backend::BoundPlan;
use crate::error::{Error, Result};
use crate::plan::{DeviceProfile, KvChunk, Plan, PlanOptions, PlanStats, RequestInfo, RowSegment, WorkItem, WorkUnit, FINAL_OUTPUT};
use crate::types::{Batch, DType, KvLayout, RowsTensor, RunArgs, Shape};

/// One timed shape: per-item time in microseconds for tiles of `rows` rows against `keys` keys.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Rows of each tile.
    pub rows: u32,
    /// Keys each tile reads.
    pub keys: u32,
    /// Median time per work item, in microseconds.
    pub item_us: f64,
}

const SHAPES: [(u32, u32); 6] = [(64, 256), (64, 2048), (4, 256), (4, 2048), (4, 16), (32, 1024)];
const PAGE: u32 = 16;
const KV_POOL_BYTES: usize = 256 << 20;

/// Cheap deterministic values in [-1, 1) (no RNG crate in the library).
fn fill_bf16(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n * 2);
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let f = (x >> 40) as f32 / (1u64 << 23) as f32 * 2.0 - 1.0;
        out.extend_from_slice(&half::bf16::from_f32(f).to_bits().to_le_bytes());
    }
    out
}

/// A plan of `num` requests, each one tile of `rows` rows (GQA group 4) against `keys` keys,
/// one item per group; requests' pages cycle through a pool of `pool_pages`.
fn synthetic_plan(shape: Shape, rows: u32, keys: u32, num: u32, pool_pages: u32, block_m: u32) -> Plan {
    let group = shape.group_size();
    let q_len = rows / group;
    let pages_per = keys.div_ceil(PAGE);
    let mut batch = Batch {
        qo_indptr: vec![0],
        kv_indptr: vec![0],
        kv_page_indices: vec![],
        kv_last_page_len: vec![],
        page_size: PAGE,
        num_pages: pool_pages,
        prefix_groups: vec![],
        custom_mask: Vec::new(),
        mask_indptr: Vec::new(),
    };
    let mut plan_items = vec![];
    let mut units = vec![];
    let mut segs = vec![];
    let mut chunks = vec![];
    let mut requests = vec![];
    for r in 0..num {
        let start = (r * pages_per * 7) % (pool_pages - pages_per);
        batch.kv_page_indices.extend((0..pages_per).map(|p| (start + p) as i32));
        batch.qo_indptr.push(batch.qo_indptr[r as usize] + q_len as i32);
        batch.kv_indptr.push(batch.kv_page_indices.len() as i32);
        batch.kv_last_page_len.push((keys - (pages_per - 1) * PAGE) as i32);
        requests.push(RequestInfo { q_start: r * q_len, q_len, kv_len: keys, page_start: r * pages_per });
        units.push(WorkUnit { item_begin: r, item_count: 1, group_stride: 1, slot_stride: 0 });
        plan_items.push(WorkItem {
            seg_begin: r,
            seg_count: 1,
            chunk_begin: r,
            chunk_count: 1,
            num_rows: rows,
            partial_slot: FINAL_OUTPUT,
            group: r,
        });
        segs.push(RowSegment { request: r, q_begin: 0, q_count: q_len, row_begin: 0 });
        chunks.push(KvChunk { request: r, key_begin: 0, key_end: keys, row_begin: 0, row_end: rows });
    }
    Plan {
        shape,
        batch,
        options: PlanOptions::default(),
        block_m,
        requests,
        items: plan_items,
        units,
        row_segments: segs,
        kv_chunks: chunks,
        merges: vec![],
        merge_slots: vec![],
        stats: PlanStats::default(),
        worker_load: Default::default(),
        pool_layout: None,
        scratch: Default::default(),
        group_costs: vec![],
    }
}

/// Least squares for `t = a·x0 + b·x1 + c` (3×3 normal equations, Cramer's rule).
fn fit(samples: &[Sample]) -> (f64, f64, f64) {
    let rows: Vec<[f64; 3]> = samples.iter().map(|s| [s.rows as f64 * s.keys as f64, s.keys as f64, 1.0]).collect();
    let mut m = [[0.0f64; 3]; 3];
    let mut v = [0.0f64; 3];
    for (x, s) in rows.iter().zip(samples) {
        for i in 0..3 {
            v[i] += x[i] * s.item_us;
            for j in 0..3 {
                m[i][j] += x[i] * x[j];
            }
        }
    }
    let det = |m: &[[f64; 3]; 3]| {
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    };
    let d = det(&m);
    let solve = |k: usize| {
        let mut mk = m;
        for i in 0..3 {
            mk[i][k] = v[i];
        }
        det(&mk) / d
    };
    (solve(0), solve(1), solve(2))
}

impl CudaBackend {
    /// Where this device's calibrated profile is stored (beside the compiled kernels).
    pub fn profile_path(&self) -> Option<PathBuf> {
        let dev = self.device();
        let name: String = dev.name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        self.shared.cache.dir().map(|d| d.join(format!("profile-{}-{name}.txt", self.shared.cache.arch())))
    }

    /// Times the shapes, fits the cost model, stores and returns the profile (costs in µs).
    pub(crate) fn calibrate(&self) -> Result<(DeviceProfile, Vec<Sample>)> {
        let dev = self.device();
        let shape = Shape {
            num_qo_heads: 4,
            num_kv_heads: 1,
            head_dim: 128,
            dtype: DType::Bf16,
            kv_dtype: DType::Bf16,
            causal: false,
            sm_scale: 1.0 / 128f32.sqrt(),
        };
        let kernels = self.shared.attention(128, DType::Bf16)?;
        let grid = dev.sm_count * kernels.ctas_per_sm;
        let per_cta = 4;
        let num = grid * per_cta;
        let page_bytes = (PAGE * 128 * 2) as usize;
        let pool_pages = (KV_POOL_BYTES / page_bytes) as u32;
        let k = DeviceBuffer::new(dev, KV_POOL_BYTES, "calibration K")?;
        let v = DeviceBuffer::new(dev, KV_POOL_BYTES, "calibration V")?;
        k.write(dev, &fill_bf16(KV_POOL_BYTES / 2, 1))?;
        v.write(dev, &fill_bf16(KV_POOL_BYTES / 2, 2))?;
        let max_q = (num * 16 * 4 * 128) as usize;
        let q = DeviceBuffer::new(dev, max_q * 2, "calibration Q")?;
        q.write(dev, &fill_bf16(max_q, 3))?;
        let o = DeviceBuffer::new(dev, max_q * 2, "calibration O")?;
        let mut samples = vec![];
        // Stream 0 is the current context's default stream: this device's, for the whole loop.
        let _g = dev.enter()?;
        // Destroyed on every return, early ones included.
        let (start, stop) = (Event::timing(dev)?, Event::timing(dev)?);
        for (rows, keys) in SHAPES {
            let plan = Arc::new(synthetic_plan(shape, rows, keys, num, pool_pages, kernels.block_m));
            let bound = self.bind_cuda(plan, 0, None, None)?;
            bound.wait()?;
            let args = RunArgs {
                q: RowsTensor { ptr: q.ptr, stride_token: 4 * 128, stride_head: 128 },
                kv: KvLayout { k: k.ptr, v: v.ptr, stride_page: (PAGE * 128) as i64, stride_token: 128, stride_head: 0, stride_dim: 1 },
                o: RowsTensor { ptr: o.ptr, stride_token: 4 * 128, stride_head: 128 },
                lse: 0,
                stream: 0,
                logits_soft_cap: 0.0,
                kv_scales: crate::types::KvScales::NONE,
            };
            let mut times = vec![];
            for rep in 0..9 {
                start.record(0)?;
                // SAFETY: Q and O hold num × 16 tokens of 4 heads × 128 (the plan has num × rows / 4
                // tokens), K and V pool_pages pages of PAGE × 128 (its one KV head), all bf16 on
                // this device; the stream is synchronized below before they are freed.
                unsafe { bound.run(&args)? };
                stop.record(0)?;
                stop.wait()?;
                if rep >= 2 {
                    times.push(stop.elapsed_ms(&start)? as f64);
                }
            }
            times.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let ms = times[times.len() / 2];
            samples.push(Sample { rows, keys, item_us: ms * 1e3 / per_cta as f64 });
        }
        let (a, b, c) = fit(&samples);
        let profile = DeviceProfile {
            num_workers: grid,
            block_m: kernels.block_m,
            block_n: 64,
            cost_row_key: a.max(1e-9),
            cost_key: b.max(1e-9),
            cost_item: c.max(1e-6),
        };
        if let Some(path) = self.profile_path() {
            let text = format!(
                "# PackInfer cost model for {} ({}), per work item in microseconds: a*rows*keys + b*keys + c\nnum_workers {}\nblock_m {}\nblock_n {}\ncost_row_key {:e}\ncost_key {:e}\ncost_item {:e}\n",
                dev.name, self.shared.cache.arch(), profile.num_workers, profile.block_m, profile.block_n, profile.cost_row_key, profile.cost_key, profile.cost_item
            );
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            std::fs::write(&path, text).map_err(|e| Error::Internal(format!("writing the profile to {}: {e}", path.display())))?;
        }
        Ok((profile, samples))
    }

    /// The stored profile of this device, if a calibration wrote one.
    pub(crate) fn stored_profile(&self) -> Option<DeviceProfile> {
        let text = std::fs::read_to_string(self.profile_path()?).ok()?;
        let get = |key: &str| text.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse::<f64>().ok()));
        Some(DeviceProfile {
            num_workers: get("num_workers ")? as u32,
            block_m: get("block_m ")? as u32,
            block_n: get("block_n ")? as u32,
            cost_row_key: get("cost_row_key ")?,
            cost_key: get("cost_key ")?,
            cost_item: get("cost_item ")?,
        })
        .filter(|p| p.block_m == 16 * self.shared.tile_warps && p.num_workers > 0)
    }
}
