//! Shared test support: random batches in a paged cache, and a naive float64 attention written
//! independently of the library (no online softmax, no tiles), which every backend is checked
//! against. Used by the CPU, planner, pool and CUDA tests.

use half::{bf16, f16};
use packinfer::types::{Batch, DType, KvLayout, KvScales, PrefixGroup, RowsTensor, RunArgs, Shape};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Values stored in one of the library's dtypes, plus the exact f64 of each stored value.
pub struct Tensor {
    pub dtype: DType,
    pub bytes: Vec<u8>,
    pub exact: Vec<f64>,
}

impl Tensor {
    pub fn new(dtype: DType, values: impl IntoIterator<Item = f32>) -> Tensor {
        let mut bytes = Vec::new();
        let mut exact = Vec::new();
        for x in values {
            match dtype {
                DType::F16 => {
                    let h = f16::from_f32(x);
                    bytes.extend_from_slice(&h.to_bits().to_le_bytes());
                    exact.push(h.to_f64());
                }
                DType::Bf16 => {
                    let h = bf16::from_f32(x);
                    bytes.extend_from_slice(&h.to_bits().to_le_bytes());
                    exact.push(h.to_f64());
                }
                DType::F32 => {
                    bytes.extend_from_slice(&x.to_le_bytes());
                    exact.push(x as f64);
                }
                DType::Fp8E4m3 => {
                    let c = packinfer::fp8::f32_to_e4m3(x);
                    bytes.push(c);
                    exact.push(e4m3_value(c));
                }
            }
        }
        Tensor { dtype, bytes, exact }
    }
    /// A tensor of `n` elements, every one a NaN, so an unwritten output element is caught.
    pub fn poisoned(dtype: DType, n: usize) -> Tensor {
        Tensor::new(dtype, std::iter::repeat_n(f32::NAN, n))
    }
    pub fn ptr(&self) -> u64 {
        self.bytes.as_ptr() as u64
    }
    /// The address to write through (an output tensor).
    pub fn ptr_mut(&mut self) -> u64 {
        self.bytes.as_mut_ptr() as u64
    }
    pub fn get(&self, i: usize) -> f64 {
        let b = &self.bytes[i * self.dtype.size_bytes()..];
        match self.dtype {
            DType::F16 => f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64(),
            DType::Bf16 => bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64(),
            DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            DType::Fp8E4m3 => e4m3_value(b[0]),
        }
    }
}

/// The value of an fp8 e4m3 code from the format's definition (sign, 4 exponent bits of bias
/// 7, 3 mantissa bits, subnormals at exponent 0, NaN at S.1111.111), written independently of
/// the library's decoder.
pub fn e4m3_value(code: u8) -> f64 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = (((code >> 3) & 0xF) as i32, (code & 7) as f64);
    match (e, code & 7) {
        (15, 7) => f64::NAN,
        (0, _) => sign * m / 8.0 * 2f64.powi(-6),
        _ => sign * (1.0 + m / 8.0) * 2f64.powi(e - 7),
    }
}

/// How an fp8 case is scaled ([`Case::with_fp8_kv`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8Scales {
    /// One scale for K and one for V (vLLM's and FlashInfer's per-layer scales).
    PerTensor,
    /// An array of one scale per KV head, per-tensor scales 1.
    PerHead,
    /// Both: per-tensor scales times per-head arrays.
    Both,
}

/// Knobs for a random case.
#[derive(Clone, Debug)]
pub struct CaseSpec {
    pub batch_size: usize,
    pub max_kv: u32,
    pub page_size: u32,
    pub num_kv_heads: u32,
    pub group: u32,
    pub head_dim: u32,
    pub dtype: DType,
    pub causal: bool,
    /// Probability that a request is a decode (one query) rather than a prefill chunk.
    pub decode_fraction: f64,
    /// HND instead of NHD page layout.
    pub hnd: bool,
}

impl CaseSpec {
    pub fn random(rng: &mut SmallRng) -> CaseSpec {
        let dtype = [DType::F16, DType::Bf16, DType::F32][rng.random_range(0..3)];
        let head_dim = [64, 96, 128, 192, 256][rng.random_range(0..5)];
        CaseSpec {
            batch_size: rng.random_range(1..=6),
            max_kv: [8, 64, 300, 1200, 4096][rng.random_range(0..5)],
            page_size: [1, 16, 64][rng.random_range(0..3)],
            num_kv_heads: rng.random_range(1..=2),
            group: [1, 4, 8][rng.random_range(0..3)],
            head_dim,
            dtype,
            causal: rng.random_bool(0.7),
            decode_fraction: rng.random_range(0.0..1.0),
            hnd: rng.random_bool(0.5),
        }
    }
}

/// A batch in a paged cache with random contents, ready to plan and run.
pub struct Case {
    pub shape: Shape,
    pub batch: Batch,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub layout: KvLayout,
    pub hnd: bool,
    /// The sliding window the case is planned with (`PlanOptions::window_left`) and the
    /// reference applies; None for none.
    pub window_left: Option<u32>,
    /// The soft-cap the case's runs use (`RunArgs::logits_soft_cap`) and the reference applies;
    /// 0 for none.
    pub logits_soft_cap: f32,
    /// K's and V's per-tensor scales and per-head scale arrays (empty: none), which the runs
    /// pass (`RunArgs::kv_scales`) and the reference multiplies the stored values by.
    pub k_scale: f32,
    /// See `k_scale`.
    pub v_scale: f32,
    /// See `k_scale`.
    pub k_head_scales: Vec<f32>,
    /// See `k_scale`.
    pub v_head_scales: Vec<f32>,
}

/// Random per-request (q_len, kv_len) pairs following `spec`.
pub fn random_lengths(rng: &mut SmallRng, spec: &CaseSpec) -> Vec<(u32, u32)> {
    (0..spec.batch_size)
        .map(|_| {
            let kv = rng.random_range(1..=spec.max_kv);
            // Keep q_len × kv_len bounded so hundreds of cases stay quick under the f64 reference.
            let q = if rng.random_bool(spec.decode_fraction) { 1 } else { rng.random_range(1..=kv.min(65536 / kv).max(1)) };
            (q, kv)
        })
        .collect()
}

impl Case {
    pub fn random(rng: &mut SmallRng, spec: &CaseSpec) -> Case {
        let lens = random_lengths(rng, spec);
        Case::build(rng, spec, &lens, Vec::new())
    }

    /// A case with the given (q_len, kv_len) per request and prefix groups. Members of a prefix
    /// group get identical K/V for their first `prefix_len` keys (on different pages unless a
    /// page is entirely inside the prefix, in which case the member reuses the first member's).
    pub fn build(rng: &mut SmallRng, spec: &CaseSpec, lens: &[(u32, u32)], prefix_groups: Vec<PrefixGroup>) -> Case {
        Case::build_with(rng, spec, lens, prefix_groups, true)
    }

    /// `build`, with the pages drawn in order (each request's pages follow each other, as in a
    /// ragged batch) unless `scatter`.
    pub fn build_with(rng: &mut SmallRng, spec: &CaseSpec, lens: &[(u32, u32)], prefix_groups: Vec<PrefixGroup>, scatter: bool) -> Case {
        let ps = spec.page_size;
        let (h, d) = (spec.num_kv_heads as usize, spec.head_dim as usize);
        let shape = Shape {
            num_qo_heads: spec.num_kv_heads * spec.group,
            num_kv_heads: spec.num_kv_heads,
            head_dim: spec.head_dim,
            dtype: spec.dtype,
            kv_dtype: spec.dtype,
            causal: spec.causal,
            sm_scale: 1.0 / (spec.head_dim as f32).sqrt(),
        };
        let pages_of = |kv: u32| kv.div_ceil(ps);
        let total_pages: u32 = lens.iter().map(|&(_, kv)| pages_of(kv)).sum::<u32>() + 3;
        let mut free: Vec<i32> = (0..total_pages as i32).rev().collect();
        if scatter {
            free.shuffle(rng);
        }
        let (mut qo_indptr, mut kv_indptr, mut pages, mut last) = (vec![0], vec![0], Vec::new(), Vec::new());
        let mut shared_from: Vec<Option<(usize, u32)>> = vec![None; lens.len()];
        for pg in &prefix_groups {
            for &m in &pg.members[1..] {
                shared_from[m as usize] = Some((pg.members[0] as usize, pg.prefix_len));
            }
        }
        for (r, &(q, kv)) in lens.iter().enumerate() {
            qo_indptr.push(qo_indptr[r] + q as i32);
            for p in 0..pages_of(kv) {
                let reuse = match shared_from[r] {
                    Some((first, plen)) if (p + 1) * ps <= plen => Some(pages[kv_indptr[first] as usize + p as usize]),
                    _ => None,
                };
                pages.push(reuse.unwrap_or_else(|| free.pop().unwrap()));
            }
            kv_indptr.push(pages.len() as i32);
            last.push(if kv == 0 { 0 } else { (kv - 1) % ps + 1 } as i32);
        }
        let cache = total_pages as usize * ps as usize * h * d;
        let mut kvals: Vec<f32> = (0..cache).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut vvals: Vec<f32> = (0..cache).map(|_| rng.random_range(-1.0..1.0)).collect();
        let layout_strides = |hnd: bool| {
            let (p, hh, dd) = (ps as i64, h as i64, d as i64);
            if hnd {
                (p * hh * dd, dd, p * dd)
            } else {
                (p * hh * dd, hh * dd, dd)
            }
        };
        let (sp, st, sh) = layout_strides(spec.hnd);
        let at = |page: i32, t: u32, head: usize, dim: usize| (page as i64 * sp + t as i64 * st + head as i64 * sh + dim as i64) as usize;
        // Copy each shared prefix's K/V into the members' own (partial) pages.
        for pg in &prefix_groups {
            let first = pg.members[0] as usize;
            for &m in &pg.members[1..] {
                for key in 0..pg.prefix_len {
                    let src = pages[kv_indptr[first] as usize + (key / ps) as usize];
                    let dst = pages[kv_indptr[m as usize] as usize + (key / ps) as usize];
                    for head in 0..h {
                        for dim in 0..d {
                            kvals[at(dst, key % ps, head, dim)] = kvals[at(src, key % ps, head, dim)];
                            vvals[at(dst, key % ps, head, dim)] = vvals[at(src, key % ps, head, dim)];
                        }
                    }
                }
            }
        }
        let total_q = *qo_indptr.last().unwrap() as usize;
        let q = Tensor::new(spec.dtype, (0..total_q * shape.num_qo_heads as usize * d).map(|_| rng.random_range(-1.0..1.0f32) * 2.0));
        let k = Tensor::new(spec.dtype, kvals);
        let v = Tensor::new(spec.dtype, vvals);
        let layout = KvLayout { k: k.ptr(), v: v.ptr(), stride_page: sp, stride_token: st, stride_head: sh, stride_dim: 1 };
        let batch = Batch {
            qo_indptr,
            kv_indptr,
            kv_page_indices: pages,
            kv_last_page_len: last,
            page_size: ps,
            num_pages: total_pages,
            prefix_groups,
            custom_mask: Vec::new(),
            mask_indptr: Vec::new(),
        };
        Case {
            shape,
            batch,
            q,
            k,
            v,
            layout,
            hnd: spec.hnd,
            window_left: None,
            logits_soft_cap: 0.0,
            k_scale: 1.0,
            v_scale: 1.0,
            k_head_scales: Vec::new(),
            v_head_scales: Vec::new(),
        }
    }

    pub fn total_q(&self) -> usize {
        self.batch.total_q() as usize
    }
    pub fn out_len(&self) -> usize {
        self.total_q() * (self.shape.num_qo_heads * self.shape.head_dim) as usize
    }

    /// Run arguments writing into `o` and `lse` (contiguous Q and O).
    pub fn run_args(&self, o: &mut Tensor, lse: &mut [f32]) -> RunArgs {
        let (hq, d) = (self.shape.num_qo_heads as i64, self.shape.head_dim as i64);
        RunArgs {
            q: RowsTensor { ptr: self.q.ptr(), stride_token: hq * d, stride_head: d },
            kv: self.layout,
            o: RowsTensor { ptr: o.ptr_mut(), stride_token: hq * d, stride_head: d },
            lse: lse.as_mut_ptr() as u64,
            stream: 0,
            logits_soft_cap: self.logits_soft_cap,
            kv_scales: self.kv_scales(),
        }
    }

    /// The case's scales as run arguments (the per-head arrays by address).
    pub fn kv_scales(&self) -> KvScales {
        let addr = |v: &Vec<f32>| if v.is_empty() { 0 } else { v.as_ptr() as u64 };
        KvScales {
            k_scale: self.k_scale,
            v_scale: self.v_scale,
            k_head_scales: addr(&self.k_head_scales),
            v_head_scales: addr(&self.v_head_scales),
        }
    }

    /// The scale of KV head `h` of K (`v = false`) or V: per-tensor times per-head.
    pub fn head_scale(&self, v: bool, h: usize) -> f64 {
        let (t, heads) = if v { (self.v_scale, &self.v_head_scales) } else { (self.k_scale, &self.k_head_scales) };
        t as f64 * heads.get(h).map_or(1.0, |&x| x as f64)
    }

    /// The case with its K and V cache quantized to fp8 e4m3 (`shape.kv_dtype`) under random
    /// scales of kind `scales`: each value x of KV head h is stored as the code nearest to
    /// x / scale(h), so the dequantized cache, code · scale(h), is close to the original. The
    /// reference then computes with the dequantized values (exactly those the codes hold).
    /// Per-head scales differ by up to 8× between heads, so a backend that applied the wrong
    /// head's scale would fail.
    pub fn with_fp8_kv(mut self, rng: &mut SmallRng, scales: Fp8Scales) -> Case {
        let h = self.shape.num_kv_heads as usize;
        let tensor = |rng: &mut SmallRng| if scales == Fp8Scales::PerHead { 1.0 } else { rng.random_range(0.25..2.0f32) };
        let heads = |rng: &mut SmallRng| {
            if scales == Fp8Scales::PerTensor {
                Vec::new()
            } else {
                (0..h).map(|_| rng.random_range(0.01..0.08f32)).collect()
            }
        };
        self.k_scale = tensor(rng);
        self.v_scale = tensor(rng);
        self.k_head_scales = heads(rng);
        self.v_head_scales = heads(rng);
        if scales == Fp8Scales::PerTensor {
            // Values of about ±1 over the scale use e4m3's range, as a calibrated scale would.
            self.k_scale *= 0.02;
            self.v_scale *= 0.02;
        }
        let (l, d, ps) = (self.layout, self.shape.head_dim as i64, self.batch.page_size as i64);
        // The KV head of flat element i of the case's NHD or HND cache.
        let head_of = |i: usize| if self.hnd { ((i as i64 % l.stride_page) / (ps * d)) as usize } else { (i / d as usize) % h };
        let quantize = |t: &Tensor, v: bool| {
            Tensor::new(DType::Fp8E4m3, t.exact.iter().enumerate().map(|(i, &x)| (x / self.head_scale(v, head_of(i))) as f32))
        };
        let (k, v) = (quantize(&self.k, false), quantize(&self.v, true));
        self.k = k;
        self.v = v;
        self.layout.k = self.k.ptr();
        self.layout.v = self.v.ptr();
        self.shape.kv_dtype = DType::Fp8E4m3;
        self
    }

    /// The case with a sliding window and a soft-cap (builder style, for tests).
    pub fn with_features(mut self, window_left: Option<u32>, logits_soft_cap: f32) -> Case {
        self.window_left = window_left;
        self.logits_soft_cap = logits_soft_cap;
        self
    }

    /// Plan options for this case: `base` with the case's window.
    pub fn plan_options(&self, base: packinfer::plan::PlanOptions) -> packinfer::plan::PlanOptions {
        packinfer::plan::PlanOptions { window_left: self.window_left, ..base }
    }

    /// Keys `[first, end)` that query `qi` of request `r` sees, from the definitions (causal
    /// bottom-right alignment, the window counted back from the query's position), written
    /// without the library's helpers.
    pub fn visible_keys(&self, r: usize, qi: u32) -> (u32, u32) {
        let (ql, kvl) = (self.batch.q_len(r) as i64, self.batch.kv_len(r) as i64);
        let pos = kvl - ql + qi as i64;
        // A custom mask replaces the causal mask (FlashInfer's rule).
        let end = if self.shape.causal && self.batch.mask_indptr.is_empty() { pos + 1 } else { kvl };
        let first = match self.window_left {
            Some(w) => (pos - w as i64).max(0),
            None => 0,
        };
        (first.min(end) as u32, end as u32)
    }

    /// Whether the batch's custom mask lets query `qi` of request `r` see `key` (true without
    /// a mask), read from the bits by the layout's definition.
    pub fn mask_bit(&self, r: usize, qi: u32, key: u32) -> bool {
        if self.batch.mask_indptr.is_empty() {
            return true;
        }
        let bit = qi as usize * self.batch.kv_len(r) as usize + key as usize;
        self.batch.custom_mask[self.batch.mask_indptr[r] as usize + bit / 8] & (1 << (bit % 8)) != 0
    }

    /// The case with a random custom mask: each (query, key) bit set with probability
    /// `density`, and every query of a request whose index is a multiple of 5 fully masked
    /// when `masked_rows` (so rows with no visible key are covered).
    pub fn with_random_mask(mut self, rng: &mut SmallRng, density: f64, masked_rows: bool) -> Case {
        let (mut mask, mut indptr) = (Vec::new(), vec![0i32]);
        for r in 0..self.batch.len() {
            let (ql, kvl) = (self.batch.q_len(r) as usize, self.batch.kv_len(r) as usize);
            let mut bytes = vec![0u8; (ql * kvl).div_ceil(8)];
            for qi in 0..ql {
                if masked_rows && qi % 5 == 0 && r % 2 == 0 {
                    continue;
                }
                for key in 0..kvl {
                    if rng.random_bool(density) {
                        let bit = qi * kvl + key;
                        bytes[bit / 8] |= 1 << (bit % 8);
                    }
                }
            }
            mask.extend_from_slice(&bytes);
            indptr.push(mask.len() as i32);
        }
        self.batch.custom_mask = mask;
        self.batch.mask_indptr = indptr;
        self
    }

    /// Naive float64 attention on the stored values: per (token, head), the full softmax over
    /// the visible keys. Returns (O, LSE) as flat `[token, head, dim]` and `[token, head]`.
    pub fn reference(&self) -> (Vec<f64>, Vec<f64>) {
        let s = &self.shape;
        let (hq, d, g) = (s.num_qo_heads as usize, s.head_dim as usize, s.group_size() as usize);
        let ps = self.batch.page_size;
        let l = &self.layout;
        let elem = |t: &Tensor, page: i32, tok: u32, head: usize, dim: usize| {
            t.exact[(page as i64 * l.stride_page + tok as i64 * l.stride_token + head as i64 * l.stride_head + dim as i64 * l.stride_dim)
                as usize]
        };
        let mut out = vec![0.0; self.out_len()];
        let mut lse = vec![0.0; self.total_q() * hq];
        for r in 0..self.batch.len() {
            let (q0, ql) = (self.batch.q_start(r) as usize, self.batch.q_len(r));
            for qi in 0..ql {
                let tok = q0 + qi as usize;
                let (first, end) = self.visible_keys(r, qi);
                let cap = self.logits_soft_cap as f64;
                for head in 0..hq {
                    let kvh = head / g;
                    let (k_scale, v_scale) = (self.head_scale(false, kvh), self.head_scale(true, kvh));
                    let qv = &self.q.exact[(tok * hq + head) * d..][..d];
                    let keys: Vec<u32> = (first..end).filter(|&key| self.mask_bit(r, qi, key)).collect();
                    let scores: Vec<f64> = keys
                        .iter()
                        .map(|&key| {
                            let page = self.batch.kv_page_indices[self.batch.kv_indptr[r] as usize + (key / ps) as usize];
                            let x =
                                (0..d).map(|i| qv[i] * elem(&self.k, page, key % ps, kvh, i) * k_scale).sum::<f64>() * s.sm_scale as f64;
                            if cap > 0.0 {
                                cap * (x / cap).tanh()
                            } else {
                                x
                            }
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|x| (x - m).exp()).sum();
                    lse[tok * hq + head] = if scores.is_empty() { f64::NEG_INFINITY } else { m + z.ln() };
                    for (&key, sc) in keys.iter().zip(&scores) {
                        let page = self.batch.kv_page_indices[self.batch.kv_indptr[r] as usize + (key / ps) as usize];
                        let p = (sc - m).exp() / z;
                        for i in 0..d {
                            out[(tok * hq + head) * d + i] += p * elem(&self.v, page, key % ps, kvh, i) * v_scale;
                        }
                    }
                }
            }
        }
        (out, lse)
    }
}

/// Checks an output against the reference: every element written (no NaN), per-element error
/// within the dtype's rounding, LSE within fp32 accumulation error. Panics with the first bad
/// element's position.
pub fn assert_close(case: &Case, o: &Tensor, lse: &[f32], ctx: &str) {
    assert_close_to(case, &case.reference(), o, lse, ctx)
}

/// [`assert_close`] against a reference computed once by the caller (`case.reference()`).
pub fn assert_close_to(case: &Case, reference: &(Vec<f64>, Vec<f64>), o: &Tensor, lse: &[f32], ctx: &str) {
    let (ref_o, ref_lse) = reference;
    let (atol, rtol) = match case.shape.dtype {
        DType::Bf16 => (1.5e-2, 1.5e-2),
        DType::F16 => (2e-3, 2e-3),
        DType::F32 => (2e-5, 1e-4),
        DType::Fp8E4m3 => unreachable!("O is never fp8"),
    };
    let (hq, d) = (case.shape.num_qo_heads as usize, case.shape.head_dim as usize);
    for (i, &want) in ref_o.iter().enumerate() {
        let got = o.get(i);
        assert!(
            (got - want).abs() <= atol + rtol * want.abs(),
            "{ctx}: O[token {}, head {}, dim {}] = {got}, reference {want}",
            i / (hq * d),
            (i / d) % hq,
            i % d
        );
    }
    for (i, &want) in ref_lse.iter().enumerate() {
        let got = lse[i] as f64;
        let ok = if want == f64::NEG_INFINITY { got == f64::NEG_INFINITY } else { (got - want).abs() <= 1e-4 * want.abs().max(1.0) };
        assert!(ok, "{ctx}: LSE[token {}, head {}] = {got}, reference {want}", i / hq, i % hq);
    }
}

pub fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}

/// ‖got − want‖ / ‖want‖ over the finite reference values (1 when a got value is NaN).
pub fn rel_frobenius(got: impl Iterator<Item = f64>, want: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (g, &w) in got.zip(want) {
        if !w.is_finite() {
            continue;
        }
        if g.is_nan() {
            return 1.0;
        }
        num += (g - w) * (g - w);
        den += w * w;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// A batch description without tensors: `(q_len, kv_len)` requests on pages of 16 keys, in order
/// or `scattered` over 100 000 pages, with consecutive groups of `prefix` requests sharing half
/// the shortest one's keys (no groups for `prefix` 0). For planner and launch-image tests.
pub fn paged_batch(lens: &[(u32, u32)], prefix: usize, scattered: bool, rng: &mut SmallRng) -> Batch {
    let (mut qo, mut kv, mut pages, mut last) = (vec![0i32], vec![0i32], Vec::new(), Vec::new());
    for &(q, k) in lens {
        qo.push(qo.last().unwrap() + q as i32);
        for _ in 0..k.div_ceil(16) {
            let next = if scattered { rng.random_range(0..100_000) } else { pages.len() as i32 };
            pages.push(next);
        }
        kv.push(pages.len() as i32);
        last.push(if k == 0 { 0 } else { ((k - 1) % 16 + 1) as i32 });
    }
    let groups = lens.len().checked_div(prefix).unwrap_or(0);
    let prefix_groups = (0..groups)
        .map(|g| {
            let members: Vec<u32> = (g * prefix..(g + 1) * prefix).map(|m| m as u32).collect();
            let shortest = members.iter().map(|&m| lens[m as usize].1).min().unwrap();
            PrefixGroup { prefix_len: (shortest / 2).max(1), members }
        })
        .collect();
    Batch {
        qo_indptr: qo,
        kv_indptr: kv,
        num_pages: if scattered { 100_000 } else { (pages.len() as u32).max(100_000) },
        kv_page_indices: pages,
        kv_last_page_len: last,
        page_size: 16,
        prefix_groups,
        custom_mask: Vec::new(),
        mask_indptr: Vec::new(),
    }
}
