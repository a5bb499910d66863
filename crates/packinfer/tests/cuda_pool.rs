//! The managed KV pool on the CUDA backend against the same flow on the CPU backend: two pools of
//! one configuration are driven identically — sequences, forks (a shared full page and a
//! copied partial one), appends (a copy-on-write of a shared partial page), K/V written from
//! device buffers on the GPU and host buffers on the CPU, plans made from the pool, relayouts
//! that move pages, launches and runs of every layer — on a non-default stream. After every step
//! the device pool's bytes must equal the host pool's exactly (writes and page copies move
//! bytes, nothing else), and the attention outputs must agree within bf16 rounding, with no
//! element left unwritten (outputs are poisoned with NaN first). The same flow runs with fp8
//! e4m3 pools (per-head scales): the device's write conversion must give the host encoder's
//! bytes exactly, and the fp8 kernel the CPU's outputs; the conversion kernel is also checked
//! on every 16-bit source value and on special f32 values.
//!
//! Without a usable CUDA device the CPU half still runs (so the flow itself is checked to copy
//! and move pages), and the tests are reported as ignored, with the reason; with
//! `PACKINFER_REQUIRE_GPU=1` (the GPU machine's suite) they fail instead.

use packinfer_testkit as common;
use packinfer_testkit::harness;

use std::sync::Arc;

use common::{rel_frobenius, rng, Tensor};
use cudarc::driver::{result as cu, sys};
use packinfer::backend::cpu::CpuBackend;
use packinfer::backend::cuda::CudaBackend;
use packinfer::backend::{Backend, BackendChoice, BackendKind};
use packinfer::kv::{groups_of_plan, KvPool, PoolConfig, SeqId};
use packinfer::plan::{DeviceProfile, PlanOptions};
use packinfer::testing::{self, sync_stream, DeviceBuffer};
use packinfer::types::{DType, RowsTensor, RunArgs, Shape};
use packinfer::Error;
use rand::rngs::SmallRng;
use rand::Rng;

const LAYERS: u32 = 2;
const QO_HEADS: u32 = 8;
const KV_HEADS: u32 = 2;
const DIM: u32 = 128;
const PAGE: u32 = 16;
const ROW: usize = (KV_HEADS * DIM) as usize;

fn config() -> PoolConfig {
    PoolConfig {
        num_layers: LAYERS,
        shape: Shape {
            num_qo_heads: QO_HEADS,
            num_kv_heads: KV_HEADS,
            head_dim: DIM,
            dtype: DType::Bf16,
            kv_dtype: DType::Bf16,
            causal: true,
            sm_scale: 0.0,
        },
        page_size: PAGE,
        num_pages: 48,
        headroom_pages: 1,
    }
}

/// Per-head scales of the fp8 pools ([layer][K, V][head]): values of about ±1 (random_rows)
/// over them use e4m3's range, and they differ between heads and layers.
fn fp8_scales() -> Vec<f32> {
    (0..LAYERS * 2 * KV_HEADS).map(|i| 0.004 + 0.003 * i as f32).collect()
}

fn main() {
    harness::main(harness::trials![
        pool_on_cuda_matches_pool_on_cpu,
        fp8_pool_on_cuda_matches_pool_on_cpu,
        fp8_row_conversion_matches_the_host_encoder_bit_for_bit,
        cuda_pool_error_paths,
        pool_plans_use_the_profile_for_their_batch
    ]);
}

/// The backend on device 0; without one the test is reported as skipped (`None`), or fails
/// under `PACKINFER_REQUIRE_GPU=1`.
fn cuda(test: &str) -> Option<Arc<CudaBackend>> {
    let choice = BackendChoice {
        kind: Some(BackendKind::Cuda),
        device_ordinal: 0,
        cpu_threads: 0,
        kernel_cache_dir: std::env::var_os("PACKINFER_TEST_CACHE_DIR").map(Into::into),
    };
    match CudaBackend::new(&choice) {
        Ok(b) => Some(Arc::new(b)),
        Err(e) => {
            assert!(!harness::required("PACKINFER_REQUIRE_GPU"), "{test}: PACKINFER_REQUIRE_GPU=1 but no usable CUDA device here ({e})");
            harness::skipped(format!("no usable CUDA device here ({e})"));
            None
        }
    }
}

/// One pool and how to feed it: host pointers on the CPU, device buffers on the GPU.
struct Side {
    pool: KvPool,
    backend: Arc<dyn Backend>,
    gpu: Option<Gpu>,
}

struct Gpu {
    cu: Arc<CudaBackend>,
    stream: u64,
}

/// Bytes the side's kernels read: host memory kept alive, or a device buffer.
enum Staged {
    Host(Vec<u8>),
    Device(DeviceBuffer),
}

impl Staged {
    fn ptr(&self) -> u64 {
        match self {
            Staged::Host(b) => b.as_ptr() as u64,
            Staged::Device(d) => d.ptr(),
        }
    }
}

impl Side {
    fn new(backend: Arc<dyn Backend>, gpu: Option<Gpu>) -> Side {
        Side { pool: KvPool::new(backend.clone(), config()).expect("pool"), backend, gpu }
    }
    /// A side whose pool stores fp8 e4m3 K/V with `fp8_scales`.
    fn fp8(backend: Arc<dyn Backend>, gpu: Option<Gpu>) -> Side {
        let mut c = config();
        c.shape.kv_dtype = DType::Fp8E4m3;
        Side { pool: KvPool::with_scales(backend.clone(), c, &fp8_scales()).expect("fp8 pool"), backend, gpu }
    }
    fn stream(&self) -> u64 {
        self.gpu.as_ref().map_or(0, |g| g.stream)
    }
    fn stage(&self, bytes: &[u8]) -> Staged {
        match &self.gpu {
            None => Staged::Host(bytes.to_vec()),
            Some(g) => {
                let d = DeviceBuffer::new(testing::device(&g.cu), bytes.len(), "test input").unwrap();
                d.write(testing::device(&g.cu), bytes).unwrap();
                Staged::Device(d)
            }
        }
    }
    fn read(&self, s: &Staged, n: usize) -> Vec<u8> {
        match (s, &self.gpu) {
            (Staged::Host(b), _) => b[..n].to_vec(),
            (Staged::Device(d), Some(g)) => {
                let mut out = vec![0u8; n];
                d.read(testing::device(&g.cu), &mut out).unwrap();
                out
            }
            _ => unreachable!(),
        }
    }
    fn sync(&self) {
        if let Some(g) = &self.gpu {
            sync_stream(testing::device(&g.cu), g.stream).expect("the stream's work failed");
        }
    }
    /// Every byte of the pool's memory.
    fn pool_bytes(&self) -> Vec<u8> {
        self.sync();
        let m = self.pool.memory();
        let mut out = vec![0u8; m.len_bytes()];
        match &self.gpu {
            // SAFETY: the CPU pool's host allocation of len_bytes bytes; no writer runs now.
            None => out.copy_from_slice(unsafe { std::slice::from_raw_parts(m.base() as *const u8, m.len_bytes()) }),
            Some(g) => {
                let _g = testing::device(&g.cu).enter().unwrap();
                // SAFETY: the host buffer is no larger than the pool's device allocation, whose writes are synced.
                unsafe { cu::memcpy_dtoh_sync(&mut out, m.base()) }.unwrap();
            }
        }
        out
    }
    /// Appends and writes the new tokens' K/V (`k[layer]`, `v[layer]`: token-major rows of the
    /// step's tokens in order).
    fn append_and_write(&self, ids: &[SeqId], step: &[(usize, u32)], k: &[Tensor], v: &[Tensor]) {
        let s = self.stream();
        for &(i, n) in step {
            self.pool.append(ids[i], n, s).unwrap();
        }
        let tokens: Vec<(SeqId, u32)> = step.iter().map(|&(i, n)| (ids[i], n)).collect();
        for layer in 0..LAYERS as usize {
            let (kd, vd) = (self.stage(&k[layer].bytes), self.stage(&v[layer].bytes));
            // SAFETY: kd and vd are device copies of the step's rows, synced before they drop.
            unsafe { self.pool.write_kv(layer as u32, &tokens, kd.ptr(), vd.ptr(), ROW as i64, s) }.unwrap();
            // The sources must outlive the copies that read them.
            self.sync();
        }
    }
    /// Plans the step, relays out (re-planning when pages moved), runs every layer with `q[layer]`
    /// and returns (pages moved, outputs per layer).
    fn run_step(&self, ids: &[SeqId], step: &[(usize, u32)], regroup: bool, profile: &DeviceProfile, q: &[Tensor]) -> (u64, Vec<Tensor>) {
        let s = self.stream();
        let reqs: Vec<(SeqId, u32)> = step.iter().map(|&(i, n)| (ids[i], n)).collect();
        let seqs: Vec<SeqId> = reqs.iter().map(|r| r.0).collect();
        let mut plan = self.pool.plan(&reqs, Some(profile), PlanOptions::default()).unwrap();
        let report = self.pool.relayout(&groups_of_plan(&plan, &seqs).unwrap(), regroup, s).unwrap();
        if report.pages_moved > 0 {
            plan = self.pool.plan(&reqs, Some(profile), PlanOptions::default()).unwrap();
        }
        let total_q = plan.batch.total_q() as usize;
        let bound = self.backend.bind(Arc::new(plan), s, None).unwrap();
        bound.wait().unwrap();
        let rows = RowsTensor { ptr: 0, stride_token: (QO_HEADS * DIM) as i64, stride_head: DIM as i64 };
        let n_out = total_q * (QO_HEADS * DIM) as usize;
        let mut outs = Vec::new();
        for layer in 0..LAYERS {
            let qd = self.stage(&q[layer as usize].bytes);
            let od = self.stage(&Tensor::poisoned(DType::Bf16, n_out).bytes);
            let args = RunArgs {
                q: RowsTensor { ptr: qd.ptr(), ..rows },
                kv: self.pool.kv_layout(layer).unwrap(),
                o: RowsTensor { ptr: od.ptr(), ..rows },
                lse: 0,
                stream: s,
                logits_soft_cap: 0.0,
                kv_scales: self.pool.kv_scales(layer).unwrap(),
            };
            // SAFETY: Q and O are staged device buffers of the step's rows, K/V the pool the plan
            // was made from; the stream is synced before they are dropped.
            unsafe { bound.run(&args) }.unwrap();
            self.sync();
            outs.push(Tensor { dtype: DType::Bf16, bytes: self.read(&od, n_out * 2), exact: Vec::new() });
        }
        (report.pages_moved, outs)
    }
}

fn random_rows(r: &mut SmallRng, tokens: usize, width: usize) -> Vec<Tensor> {
    (0..LAYERS).map(|_| Tensor::new(DType::Bf16, (0..tokens * width).map(|_| r.random_range(-1.0..1.0f32)))).collect()
}

/// The flow, on every side at once with the same data; after each step the sides are compared.
fn drive(sides: &[Side], profile: &DeviceProfile) {
    let mut r = rng(0x9001);
    // A: a 37-token prompt (pages 0-1 full, page 2 partial).
    let a: Vec<SeqId> = sides.iter().map(|s| s.pool.create_sequence()).collect();
    let (k, v) = (random_rows(&mut r, 37, ROW), random_rows(&mut r, 37, ROW));
    for (s, &id) in sides.iter().zip(&a) {
        s.append_and_write(&[id], &[(0, 37)], &k, &v);
    }
    // B forks at 20 (page 0 shared, page 1 copied), C at 32 (pages 0-1 shared).
    let ids: Vec<Vec<SeqId>> = sides
        .iter()
        .zip(&a)
        .map(|(s, &id)| {
            let b = s.pool.fork(id, 20, s.stream()).unwrap();
            let c = s.pool.fork(id, 32, s.stream()).unwrap();
            vec![id, b, c]
        })
        .collect();
    // Truncating C to 30 leaves page 1 partial and still shared with A, so C's next append
    // copies it (copy-on-write).
    for (s, ids) in sides.iter().zip(&ids) {
        s.pool.truncate(ids[2], 30).unwrap();
    }
    let steps: [(&[(usize, u32)], bool); 4] = [
        (&[(0, 5), (1, 7), (2, 3)], true),  // prefill chunks; C's append copies shared page 1
        (&[(0, 1), (1, 1), (2, 1)], false), // decodes
        (&[(1, 30), (0, 1), (2, 1)], true), // B grows past its headroom; regroup
        (&[(0, 1), (1, 1), (2, 1)], false),
    ];
    let mut moved_total = vec![0u64; sides.len()];
    for (n, &(step, regroup)) in steps.iter().enumerate() {
        let tokens: usize = step.iter().map(|s| s.1 as usize).sum();
        let (k, v) = (random_rows(&mut r, tokens, ROW), random_rows(&mut r, tokens, ROW));
        let q = random_rows(&mut r, tokens, (QO_HEADS * DIM) as usize);
        let mut results = Vec::new();
        for (i, s) in sides.iter().enumerate() {
            s.append_and_write(&ids[i], step, &k, &v);
            let (moved, outs) = s.run_step(&ids[i], step, regroup, profile, &q);
            moved_total[i] += moved;
            for (layer, o) in outs.iter().enumerate() {
                let bad = (0..o.bytes.len() / 2).filter(|&e| !o.get(e).is_finite()).count();
                assert_eq!(bad, 0, "step {n} layer {layer} side {i}: {bad} output elements unwritten or not finite");
            }
            results.push((moved, outs, s.pool_bytes(), s.pool.stats()));
        }
        let (m0, o0, b0, st0) = &results[0];
        println!("step {n}: {tokens} tokens, relayout moved {m0} pages, {} copy-on-write copies so far", st0.cow_page_copies);
        for (i, (m, o, b, st)) in results.iter().enumerate().skip(1) {
            assert_eq!(
                (m, st.cow_page_copies, st.pages_used),
                (m0, st0.cow_page_copies, st0.pages_used),
                "step {n}: side {i}'s pool did different work"
            );
            let diff = b.iter().zip(b0).filter(|(x, y)| x != y).count();
            assert_eq!(diff, 0, "step {n}: side {i}'s pool memory differs from the CPU pool's in {diff} of {} bytes", b.len());
            for layer in 0..LAYERS as usize {
                let got = &o[layer];
                let want: Vec<f64> = (0..got.bytes.len() / 2).map(|e| o0[layer].get(e)).collect();
                let fro = rel_frobenius((0..want.len()).map(|e| got.get(e)), &want);
                let worst = (0..want.len()).map(|e| (got.get(e) - want[e]).abs() - 2e-2 * want[e].abs()).fold(f64::MIN, f64::max);
                assert!(
                    fro <= 1e-2 && worst <= 2e-2,
                    "step {n} layer {layer}: side {i} differs from the CPU: relative Frobenius {fro:.2e}, worst excess {worst:.2e}"
                );
                println!("  layer {layer}: GPU vs CPU relative Frobenius {fro:.2e}");
            }
        }
    }
    let st = sides[0].pool.stats();
    assert!(
        st.cow_page_copies >= 2,
        "the flow should copy pages (fork of a partial page, copy-on-write); it copied {}",
        st.cow_page_copies
    );
    assert!(moved_total[0] > 0, "the flow should make a relayout move pages");
}

fn pool_on_cuda_matches_pool_on_cpu() {
    cuda_and_cpu_pools("pool_on_cuda_matches_pool_on_cpu", Side::new);
}

/// The flow with fp8 pools: writes convert on the device (scatter_rows_fp8) to exactly the
/// CPU's bytes, forks and relayouts copy them, and the fp8 kernel reads them with the pool's
/// per-head scales.
fn fp8_pool_on_cuda_matches_pool_on_cpu() {
    cuda_and_cpu_pools("fp8_pool_on_cuda_matches_pool_on_cpu", Side::fp8);
}

fn cuda_and_cpu_pools(test: &str, side: fn(Arc<dyn Backend>, Option<Gpu>) -> Side) {
    let cpu: Arc<dyn Backend> = Arc::new(CpuBackend::new(2));
    let Some(cu) = cuda(test) else {
        // The CPU half alone: the flow copies and moves pages, outputs are complete.
        drive(&[side(cpu.clone(), None)], &cpu.profile());
        return;
    };
    let stream = {
        let _g = testing::device(&cu).enter().unwrap();
        cu::stream::create(cu::stream::StreamKind::NonBlocking).unwrap() as u64
    };
    let gpu_side = side(cu.clone(), Some(Gpu { cu: cu.clone(), stream }));
    let profile = cu.profile();
    drive(&[side(cpu, None), gpu_side], &profile);
    let _g = testing::device(&cu).enter().unwrap();
    // SAFETY: a stream this test created, its work finished.
    unsafe { cu::stream::destroy(stream as sys::CUstream) }.unwrap();
}

/// The device's write conversion (`KvMemory::write_rows_fp8`) against `fp8::f32_to_e4m3(x /
/// scale)` bit for bit: every f16 and every bf16 bit pattern (zeros, subnormals, ties, values past
/// ±448, infinities, NaNs) and f32 values around every e4m3 midpoint, under a power-of-two
/// scale and two that are not (so the division rounds).
fn fp8_row_conversion_matches_the_host_encoder_bit_for_bit() {
    use packinfer::backend::RowConversion;
    let Some(cu) = cuda("fp8_row_conversion_matches_the_host_encoder_bit_for_bit") else { return };
    let mut c = config();
    c.shape.kv_dtype = DType::Fp8E4m3;
    let pool = KvPool::new(cu.clone(), c).unwrap();
    let m = pool.memory();
    let dev = testing::device(&cu);
    // f32 sources: each e4m3 value, and just below and above each midpoint between neighbours.
    let values: Vec<f32> = (0..=255u8).map(packinfer::fp8::e4m3_to_f32).filter(|x| x.is_finite()).collect();
    let mut f32s: Vec<f32> = vec![0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 448.0, 464.0, 465.0, 1e-30, f32::MIN_POSITIVE];
    for a in &values {
        for b in &values {
            if a < b && values.iter().all(|x| !(a < x && x < b)) {
                let mid = (a + b) / 2.0;
                f32s.extend([mid, f32::from_bits(mid.to_bits() - 1), f32::from_bits(mid.to_bits() + 1), *a]);
            }
        }
    }
    for scale in [1.0f32, 0.37, 3.1] {
        let sources: [(DType, Vec<u8>, Vec<f32>); 3] = [
            (DType::F16, (0..=u16::MAX).flat_map(|x| x.to_le_bytes()).collect(), (0..=u16::MAX).map(f16_value).collect()),
            (
                DType::Bf16,
                (0..=u16::MAX).flat_map(|x| x.to_le_bytes()).collect(),
                (0..=u16::MAX).map(|x| f32::from_bits((x as u32) << 16)).collect(),
            ),
            (DType::F32, f32s.iter().flat_map(|x| x.to_le_bytes()).collect(), f32s.clone()),
        ];
        for (dtype, bytes, xs) in sources {
            // Rows of KV_HEADS x DIM elements; both heads get `scale` (their scales at byte 0).
            let row = ROW;
            let rows = xs.len().div_ceil(row);
            let mut bytes = bytes;
            bytes.resize(rows * row * dtype.size_bytes(), 0);
            let mut xs = xs;
            xs.resize(rows * row, 0.0);
            let src = DeviceBuffer::new(dev, bytes.len(), "fp8 conversion source").unwrap();
            src.write(dev, &bytes).unwrap();
            let scales: Vec<u8> = [scale; KV_HEADS as usize].iter().flat_map(|x| x.to_ne_bytes()).collect();
            m.write_from_host(0, &scales).unwrap();
            let conv = RowConversion { src_dtype: dtype, num_kv_heads: KV_HEADS, head_dim: DIM, head_scales: 0 };
            let dst: Vec<u64> = (0..rows as u64).map(|i| 4096 + i * row as u64).collect();
            // SAFETY: `src` holds `rows` rows of ROW elements of `dtype` on the device.
            unsafe { m.write_rows_fp8(src.ptr(), (row * dtype.size_bytes()) as u64, &conv, &dst, 0) }.unwrap();
            sync_stream(dev, 0).unwrap();
            let mut back = vec![0u8; rows * row];
            {
                let _g = dev.enter().unwrap();
                // SAFETY: the range lies in the pool's device allocation, whose writes are synced.
                unsafe { cu::memcpy_dtoh_sync(&mut back, m.base() + 4096) }.unwrap();
            }
            let bad: Vec<(f32, u8, u8)> = xs
                .iter()
                .zip(&back)
                .map(|(&x, &got)| (x, got, packinfer::fp8::f32_to_e4m3(x / scale)))
                .filter(|&(x, got, want)| got != want && !(x.is_nan() && got & 0x7f == 0x7f))
                .collect();
            assert!(
                bad.is_empty(),
                "{dtype:?} / {scale}: {} of {} codes differ, e.g. (x, got, want) {:?}",
                bad.len(),
                xs.len(),
                &bad[..bad.len().min(8)]
            );
        }
    }
}

/// The value of f16 bits `h` (exact in f32).
fn f16_value(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let (e, m) = ((h >> 10) & 0x1f, (h & 0x3ff) as f32);
    sign * match e {
        0 => m * (2.0f32).powi(-24),
        0x1f if m == 0.0 => f32::INFINITY,
        0x1f => f32::NAN,
        _ => (1.0 + m / 1024.0) * (2.0f32).powi(e as i32 - 15),
    }
}

/// What a CUDA pool refuses: host-only reads, a zero-byte allocation; and offsets outside the
/// allocation are caught before any kernel runs.
fn cuda_pool_error_paths() {
    let Some(cu) = cuda("cuda_pool_error_paths") else { return };
    let pool = KvPool::new(cu.clone(), config()).unwrap();
    let seq = pool.create_sequence();
    pool.append(seq, 3, 0).unwrap();
    assert!(matches!(testing::read_token_host(&pool, seq, 0, 0), Err(Error::Unsupported(_))));
    assert!(matches!(cu.alloc_kv(0), Err(Error::InvalidArgument(_))));
    for (head_dim, dtype) in [(128, DType::F32), (80, DType::Bf16)] {
        let e = KvPool::new(cu.clone(), PoolConfig { shape: Shape { head_dim, dtype, kv_dtype: dtype, ..config().shape }, ..config() })
            .unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "head_dim {head_dim} {dtype:?}: {e}");
    }
    let m = pool.memory();
    let len = m.len_bytes() as u64;
    let src = DeviceBuffer::new(testing::device(&cu), 4096, "src").unwrap();
    // SAFETY: refused before any read (a null source, or a destination past the pool).
    let e = unsafe { m.write_rows(src.ptr(), 512, 512, &[0, len - 256], 0) }.unwrap_err();
    assert!(e.to_string().contains("outside"), "{e}");
    // SAFETY: refused before any read (a null source, or a destination past the pool).
    let e = unsafe { m.write_rows(0, 512, 512, &[0], 0) }.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    let e = m.copy_ranges(&[(0, len)], 16, 0).unwrap_err();
    assert!(e.to_string().contains("outside"), "{e}");
    // Unaligned offsets and sizes take the byte path and still move the right bytes.
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    src.write(testing::device(&cu), &data).unwrap();
    // SAFETY: `src` holds the rows read, on the device.
    unsafe { m.write_rows(src.ptr() + 1, 100, 37, &[5, 1000], 0) }.unwrap();
    m.copy_ranges(&[(5, 3001)], 37, 0).unwrap();
    sync_stream(testing::device(&cu), 0).unwrap();
    let mut back = vec![0u8; 4096];
    {
        let _g = testing::device(&cu).enter().unwrap();
        // SAFETY: the host buffer is no larger than the pool's device allocation, whose writes are synced.
        unsafe { cu::memcpy_dtoh_sync(&mut back, m.base()) }.unwrap();
    }
    assert_eq!(&back[5..42], &data[1..38]);
    assert_eq!(&back[1000..1037], &data[101..138]);
    assert_eq!(&back[3001..3038], &data[1..38]);
    assert!(back[..5].iter().all(|&b| b == 0) && back[42..1000].iter().all(|&b| b == 0), "bytes outside the rows were written");
}

/// Pool plans take the backend's profile for their batch, as `packinfer_plan_create` plans do: a
/// step of short prompts is planned on narrow tiles (on Hopper, for the short-prefill kernel).
fn pool_plans_use_the_profile_for_their_batch() {
    let Some(cu) = cuda("pool_plans_use_the_profile_for_their_batch") else { return };
    let pool = KvPool::new(cu.clone(), config()).unwrap();
    let reqs: Vec<(SeqId, u32)> = [20u32, 35, 9]
        .iter()
        .map(|&n| {
            let s = pool.create_sequence();
            pool.append(s, n, 0).unwrap();
            (s, n)
        })
        .collect();
    let plan = pool.plan(&reqs, None, PlanOptions::default()).unwrap();
    assert_eq!(plan.block_m, cu.profile_for(&plan.shape, &plan.batch).block_m);
    if cu.profile().block_m > 64 {
        assert_eq!(plan.block_m, 64, "a step of short prompts is planned on narrow tiles");
    }
}
