//! The CPU backend against the naive float64 attention, on random batches and edge cases.

use packinfer_testkit as common;

use std::sync::Arc;

use common::{assert_close, rng, Case, CaseSpec, Tensor};
use packinfer::backend::cpu::CpuBackend;
use packinfer::backend::Backend;
use packinfer::plan::{Plan, PlanOptions};
use packinfer::types::DType;

/// Plans `case` with `options`, runs it on the CPU backend, and checks it against the reference.
pub fn run_and_check(case: &Case, options: PlanOptions, ctx: &str) -> Arc<Plan> {
    let cpu = CpuBackend::new(2);
    let plan = Arc::new(Plan::build(case.shape, case.batch.clone(), &cpu.profile(), options).expect("plan"));
    let bound = cpu.bind(plan.clone(), 0, None).expect("bind");
    let mut o = Tensor::poisoned(case.shape.dtype, case.out_len());
    let mut lse = vec![f32::NAN; case.total_q() * case.shape.num_qo_heads as usize];
    // SAFETY: the case's Q, K and V, O of out_len() and LSE of total_q × heads elements, on the host.
    unsafe { bound.run(&case.run_args(&mut o, &mut lse)) }.expect("run");
    assert_close(case, &o, &lse, ctx);
    plan
}

#[test]
fn random_batches_match_f64_reference() {
    let mut r = rng(0x5eed);
    for i in 0..200 {
        let spec = CaseSpec::random(&mut r);
        let case = Case::random(&mut r, &spec);
        run_and_check(&case, PlanOptions::default(), &format!("case {i} {spec:?}"));
    }
}

#[test]
fn long_requests_up_to_4096_keys() {
    let mut r = rng(7);
    for (i, dtype) in [DType::Bf16, DType::F16].into_iter().enumerate() {
        let spec = CaseSpec {
            batch_size: 3,
            max_kv: 4096,
            page_size: 16,
            num_kv_heads: 1,
            group: 4,
            head_dim: 128,
            dtype,
            causal: true,
            decode_fraction: 0.5,
            hnd: false,
        };
        let case = Case::build(&mut r, &spec, &[(1, 4096), (300, 4096), (1, 17)], vec![]);
        run_and_check(&case, PlanOptions::default(), &format!("long {i}"));
    }
}

fn spec(page_size: u32, causal: bool) -> CaseSpec {
    CaseSpec {
        batch_size: 1,
        max_kv: 1,
        page_size,
        num_kv_heads: 2,
        group: 4,
        head_dim: 64,
        dtype: DType::F32,
        causal,
        decode_fraction: 0.0,
        hnd: false,
    }
}

/// (name, page size, causal, (q_len, kv_len) per request).
type EdgeCase = (&'static str, u32, bool, &'static [(u32, u32)]);

#[test]
fn edge_cases() {
    let mut r = rng(11);
    let cases: &[EdgeCase] = &[
        ("request with 0 new queries", 16, true, &[(0, 40), (3, 9)]),
        ("q_len == kv_len", 16, true, &[(37, 37)]),
        ("single key", 16, true, &[(1, 1)]),
        ("single key non-causal", 16, false, &[(5, 1)]),
        ("page size 1", 1, true, &[(4, 9), (1, 1)]),
        ("last page exactly full", 16, true, &[(16, 32), (1, 16)]),
        ("no keys, no queries", 16, false, &[(0, 0), (2, 3)]),
        ("non-causal prefill", 64, false, &[(100, 70)]),
    ];
    for &(name, ps, causal, lens) in cases {
        let case = Case::build(&mut r, &spec(ps, causal), lens, vec![]);
        run_and_check(&case, PlanOptions::default(), name);
    }
}

#[test]
fn every_head_dim_and_dtype_with_gqa() {
    let mut r = rng(3);
    for dtype in [DType::F16, DType::Bf16, DType::F32] {
        for head_dim in [64, 96, 128, 192, 256, 40] {
            for group in [1, 4, 8] {
                let spec = CaseSpec {
                    batch_size: 3,
                    max_kv: 200,
                    page_size: 16,
                    num_kv_heads: 2,
                    group,
                    head_dim,
                    dtype,
                    causal: true,
                    decode_fraction: 0.3,
                    hnd: group == 4,
                };
                let case = Case::random(&mut r, &spec);
                run_and_check(&case, PlanOptions::default(), &format!("{dtype:?} d={head_dim} g={group}"));
            }
        }
    }
}

/// The CPU launch takes `update` as the CUDA one does: a launch sized for two batches runs the
/// first, then the second after `update` (split partials included, in the launch's scratch), and
/// refuses a plan over its capacity, of another shape or of another page size, naming the value,
/// while still running the plan it had.
#[test]
fn update_runs_the_new_plan_within_the_capacity() {
    use packinfer::backend::LaunchCapacity;
    let cpu = CpuBackend::new(2);
    let mut r = rng(0x0bd7);
    let spec = CaseSpec {
        batch_size: 5,
        max_kv: 900,
        page_size: 16,
        num_kv_heads: 2,
        group: 4,
        head_dim: 64,
        dtype: DType::Bf16,
        causal: true,
        decode_fraction: 0.5,
        hnd: false,
    };
    let a = Case::build(&mut r, &spec, &[(1, 800), (30, 300), (1, 90), (8, 600), (1, 7)], vec![]);
    let b = Case::build(&mut r, &spec, &[(20, 20), (1, 899), (1, 1), (16, 500), (3, 64), (1, 33)], vec![]);
    // 64-key splits: both plans have partials to merge.
    let options = PlanOptions { split_keys: 64, deterministic: true, ..PlanOptions::default() };
    let plan = |c: &Case| Arc::new(Plan::build(c.shape, c.batch.clone(), &cpu.profile(), options.clone()).unwrap());
    let (plan_a, plan_b) = (plan(&a), plan(&b));
    assert!(plan_a.num_partial_slots() > 0 && plan_b.num_partial_slots() > 0);
    let cap = LaunchCapacity::of(&plan_a).max(&LaunchCapacity::of(&plan_b));
    let run = |bound: &dyn packinfer::backend::BoundPlan, c: &Case, ctx: &str| {
        let mut o = Tensor::poisoned(c.shape.dtype, c.out_len());
        let mut lse = vec![f32::NAN; c.total_q() * c.shape.num_qo_heads as usize];
        // SAFETY: the case's Q, K and V, O of out_len() and LSE of total_q × heads elements, on the host.
        unsafe { bound.run(&c.run_args(&mut o, &mut lse)) }.expect("run");
        assert_close(c, &o, &lse, ctx);
    };
    let bound = cpu.bind_with_capacity(plan_a.clone(), 0, None, &cap).unwrap();
    run(&*bound, &a, "batch A");
    bound.update(plan_b.clone(), 0).unwrap();
    run(&*bound, &b, "batch B after update");
    bound.update(plan_a.clone(), 0).unwrap();
    run(&*bound, &a, "batch A again");
    // Over the capacity: a launch sized for A alone cannot take B (it has more requests).
    let small = cpu.bind(plan_a.clone(), 0, None).unwrap();
    let err = small.update(plan_b.clone(), 0).unwrap_err().to_string();
    assert!(err.contains("but the launch was created with capacity for"), "{err}");
    // Another shape, another page size.
    let other = Case::build(&mut r, &CaseSpec { head_dim: 128, ..spec }, &[(1, 100)], vec![]);
    let err = bound.update(plan(&other), 0).unwrap_err().to_string();
    assert!(err.contains("head_dim: 128") && err.contains("create a new launch"), "{err}");
    let paged = Case::build(&mut r, &CaseSpec { page_size: 1, ..spec }, &[(1, 100)], vec![]);
    let err = bound.update(plan(&paged), 0).unwrap_err().to_string();
    assert!(err.contains("page_size = 1 differs from the launch's 16"), "{err}");
    // The refused updates left the launch with A.
    run(&*bound, &a, "batch A after refused updates");
    run(&*small, &a, "the small launch after a refused update");
}

/// A plan's fields are public, so a caller can hand the backend a plan the planner never made:
/// the CPU backend refuses one whose indices leave its arrays, its requests, the batch's pages or
/// the partial slots, or that writes a row twice, at `bind` and at `update` (InvalidArgument,
/// naming the value), instead of reading or writing outside the caller's memory.
#[test]
fn inconsistent_handmade_plans_are_refused() {
    use packinfer::plan::FINAL_OUTPUT;
    use packinfer::Error;
    let cpu = CpuBackend::new(2);
    let mut r = rng(0xbad);
    let spec = CaseSpec {
        batch_size: 3,
        max_kv: 900,
        page_size: 16,
        num_kv_heads: 2,
        group: 2,
        head_dim: 64,
        dtype: DType::F16,
        causal: true,
        decode_fraction: 0.5,
        hnd: false,
    };
    let case = Case::build(&mut r, &spec, &[(1, 800), (12, 300), (1, 40)], vec![]);
    let options = PlanOptions { split_keys: 64, deterministic: true, ..PlanOptions::default() };
    let good = Plan::build(case.shape, case.batch.clone(), &cpu.profile(), options).unwrap();
    assert!(!good.merges.is_empty(), "the case needs split partials");
    let partial = good.items.iter().position(|i| i.partial_slot != FINAL_OUTPUT).unwrap();
    let n = good.requests.len() as u32;
    // (what the message says, how the plan is broken)
    type Corruption = (&'static str, Box<dyn Fn(&mut Plan)>);
    let bad: Vec<Corruption> = vec![
        ("of request 3 which does not exist", Box::new(move |p| p.row_segments[0].request = n)),
        ("past the plan's arrays", Box::new(|p| p.items[0].chunk_begin = p.kv_chunks.len() as u32)),
        ("outside the cache's", Box::new(|p| p.batch.kv_page_indices[0] = p.batch.num_pages as i32)),
        ("kv_len", Box::new(|p| p.kv_chunks[0].key_end = p.requests[p.kv_chunks[0].request as usize].kv_len + 1)),
        ("does not match the batch's request 0", Box::new(|p| p.requests[0].page_start += 1)),
        ("units hold every item once", Box::new(|p| p.units[0].item_begin += 1)),
        ("but its row segments hold", Box::new(|p| p.items[0].num_rows += 1)),
        ("reads partial slot", Box::new(|p| p.merge_slots[0].slot = p.num_partial_slots())),
        ("reads partial slot", Box::new(|p| p.merge_slots[0].head_stride = p.num_partial_slots())),
        ("outside the batch", Box::new(|p| p.merges[0].q_token = p.batch.total_q())),
        ("fewer groups", Box::new(|p| p.units.last_mut().unwrap().group_stride = u32::MAX)),
        ("out of group order", Box::new(|p| p.items.last_mut().unwrap().group = 0)),
        ("a unit's items share a group", Box::new(|p| p.units[0].group_stride = 0)),
        ("past the last slot number", Box::new(move |p| p.items[partial].partial_slot = u32::MAX - 1)),
        ("written twice", Box::new(|p| p.merges.push(p.merges[0]))),
        (
            "another item writes too",
            Box::new(move |p| {
                let dup = p.items[partial];
                p.items.insert(partial, dup);
                // The copy joins its item's unit; the units after it move by one.
                for u in p.units.iter_mut() {
                    if u.item_begin as usize > partial {
                        u.item_begin += 1;
                    } else if u.item_begin as usize + u.item_count as usize > partial {
                        u.item_count += 1;
                    }
                }
            }),
        ),
    ];
    let launch = cpu.bind(Arc::new(good.clone()), 0, None).unwrap();
    for (want, corrupt) in &bad {
        let mut plan = good.clone();
        corrupt(&mut plan);
        let plan = Arc::new(plan);
        for (what, got) in [("bind", cpu.bind(plan.clone(), 0, None).map(drop)), ("update", launch.update(plan.clone(), 0))] {
            match got {
                Err(Error::InvalidArgument(m)) => assert!(m.contains(want), "{what}: expected a message with {want:?}, got {m:?}"),
                other => panic!("{what} of a plan with {want:?}: expected InvalidArgument, got {other:?}"),
            }
        }
    }
    // The refused updates left the launch computing the plan it had.
    let mut o = Tensor::poisoned(case.shape.dtype, case.out_len());
    let mut lse = vec![f32::NAN; case.total_q() * case.shape.num_qo_heads as usize];
    // SAFETY: the case's Q, K and V, O of out_len() and LSE of total_q × heads elements, on the host.
    unsafe { launch.run(&case.run_args(&mut o, &mut lse)) }.expect("run");
    assert_close(&case, &o, &lse, "after refused updates");
}

/// Sliding window and soft-cap, alone and together, on random batches of every dtype, head
/// size, GQA ratio, causal or not, with and without splits (deterministic 64-key pieces), against
/// the f64 reference that applies them from their definitions.
#[test]
fn window_and_soft_cap_random_batches_match_f64_reference() {
    let mut r = rng(0x5111de);
    let mut windowed_rows = 0usize;
    for i in 0..160 {
        let spec = CaseSpec::random(&mut r);
        let window = [None, Some(0), Some(1), Some(16), Some(100), Some(1000)][i % 6];
        let cap = [0.0, 2.0, 30.0][(i / 6) % 3];
        let case = Case::random(&mut r, &spec).with_features(window, cap);
        let base =
            if i % 2 == 0 { PlanOptions::default() } else { PlanOptions { deterministic: true, split_keys: 64, ..PlanOptions::default() } };
        run_and_check(&case, case.plan_options(base), &format!("case {i} window {window:?} cap {cap} {spec:?}"));
        // Rows whose window hides keys: the window must matter in enough cases.
        windowed_rows += (0..case.batch.len())
            .flat_map(|b| (0..case.batch.q_len(b)).map(move |q| (b, q)))
            .filter(|&(b, q)| case.visible_keys(b, q).0 > 0)
            .count();
    }
    assert!(windowed_rows > 1000, "only {windowed_rows} query rows had keys outside their window");
}

/// Edge cases of the window: 0 (a causal query sees only its own key), wider than the context,
/// non-causal with more queries than keys (positions before the first key), page size 1.
#[test]
fn window_edge_cases() {
    let mut r = rng(0x3d9e);
    // (name, page size, causal, (q_len, kv_len) per request, window_left)
    let cases: &[(EdgeCase, u32)] = &[
        (("window 0, causal", 16, true, &[(5, 9), (1, 30)]), 0),
        (("window wider than the context", 16, true, &[(7, 20), (1, 3)]), 500),
        (("non-causal, q_len > kv_len", 16, false, &[(40, 9), (3, 50)]), 4),
        (("page size 1", 1, true, &[(4, 9), (1, 1), (1, 77)]), 3),
        (("no keys, no queries", 16, false, &[(0, 0), (2, 3)]), 1),
    ];
    for &((name, ps, causal, lens), w) in cases {
        let case = Case::build(&mut r, &spec(ps, causal), lens, vec![]).with_features(Some(w), 0.0);
        run_and_check(&case, case.plan_options(PlanOptions::default()), name);
    }
}

/// The soft-cap is a run parameter: one plan, bound once, run with caps 0, 5 and 50 in turn,
/// gives each time the reference of the cap that run was given (never a cap fixed earlier).
#[test]
fn soft_cap_is_taken_from_each_run() {
    let cpu = CpuBackend::new(2);
    let mut r = rng(0x50f7);
    let spec = CaseSpec {
        batch_size: 3,
        max_kv: 300,
        page_size: 16,
        num_kv_heads: 2,
        group: 4,
        head_dim: 64,
        dtype: DType::F32,
        causal: true,
        decode_fraction: 0.5,
        hnd: false,
    };
    let mut case = Case::build(&mut r, &spec, &[(1, 280), (20, 200), (1, 9)], vec![]);
    let plan = Arc::new(Plan::build(case.shape, case.batch.clone(), &cpu.profile(), PlanOptions::default()).unwrap());
    let bound = cpu.bind(plan, 0, None).unwrap();
    let mut outs = Vec::new();
    for cap in [0.0, 5.0, 50.0, 0.0] {
        case.logits_soft_cap = cap;
        let mut o = Tensor::poisoned(case.shape.dtype, case.out_len());
        let mut lse = vec![f32::NAN; case.total_q() * case.shape.num_qo_heads as usize];
        // SAFETY: the case's Q, K and V, O of out_len() and LSE of total_q × heads elements, on the host.
        unsafe { bound.run(&case.run_args(&mut o, &mut lse)) }.expect("run");
        assert_close(&case, &o, &lse, &format!("cap {cap}"));
        outs.push(lse);
    }
    assert_ne!(outs[0], outs[1], "a soft-cap of 5 changed nothing: the test's scores are too small to tell");
    assert_eq!(outs[0], outs[3], "the same run arguments gave different results");
    // A bad cap is refused by name, before anything runs.
    case.logits_soft_cap = -1.0;
    let mut o = Tensor::poisoned(case.shape.dtype, case.out_len());
    let mut lse = vec![f32::NAN; case.total_q() * case.shape.num_qo_heads as usize];
    // SAFETY: as above.
    let err = unsafe { bound.run(&case.run_args(&mut o, &mut lse)) }.unwrap_err().to_string();
    assert!(err.contains("logits_soft_cap = -1"), "{err}");
}

/// Custom masks on random batches of every dtype, head size and GQA ratio, causal or not
/// (causal is not applied under a mask), with windows and soft-caps, masks of every density and
/// rows whose every key is masked, planned with the default options, with 64-key splits and
/// with every technique off, against the f64 reference that reads the bits by definition.
#[test]
fn custom_mask_random_batches_match_f64_reference() {
    let mut r = rng(0x3a5c);
    let (mut hidden, mut empty_rows) = (0usize, 0usize);
    for i in 0..120 {
        let mut spec = CaseSpec::random(&mut r);
        spec.max_kv = spec.max_kv.min(1200);
        let window = [None, None, Some(16), Some(100)][i % 4];
        let cap = [0.0, 30.0][(i / 4) % 2];
        let density = [0.5, 0.05, 1.0, 0.0, 0.9][(i / 8) % 5];
        let case = Case::random(&mut r, &spec).with_features(window, cap).with_random_mask(&mut r, density, i % 3 == 0);
        let base = match i % 3 {
            0 => PlanOptions::default(),
            1 => PlanOptions { deterministic: true, split_keys: 64, ..PlanOptions::default() },
            _ => PlanOptions { packing: false, balancing: false, prefix_sharing: false, split_kv: false, ..PlanOptions::default() },
        };
        run_and_check(&case, case.plan_options(base), &format!("case {i} density {density} window {window:?} cap {cap} {spec:?}"));
        for b in 0..case.batch.len() {
            for q in 0..case.batch.q_len(b) {
                let (first, end) = case.visible_keys(b, q);
                let seen = (first..end).filter(|&k| case.mask_bit(b, q, k)).count();
                hidden += (end - first) as usize - seen;
                empty_rows += (seen == 0) as usize;
            }
        }
    }
    // The mask must matter: many keys hidden, and rows with nothing to see.
    assert!(hidden > 100_000, "only {hidden} keys hidden by masks");
    assert!(empty_rows > 100, "only {empty_rows} rows fully masked");
}

/// A tree speculative-decoding step: each request's context is visible to all its draft tokens,
/// and draft token i sees itself and its ancestors in a binary tree (parent of i is (i-1)/2).
/// The shape says causal; with the mask it is not applied (siblings do not see each other,
/// though a causal mask would let them). Rows with no visible key give O = 0 and LSE = -inf
/// exactly, also when split.
#[test]
fn tree_mask_and_fully_masked_rows() {
    let mut r = rng(0x7ee);
    let spec = CaseSpec {
        batch_size: 2,
        max_kv: 1,
        page_size: 16,
        num_kv_heads: 2,
        group: 4,
        head_dim: 64,
        dtype: DType::F32,
        causal: true,
        decode_fraction: 0.0,
        hnd: false,
    };
    let (draft, context) = (7u32, 200u32);
    let mut case = Case::build(&mut r, &spec, &[(draft, context + draft), (3, 40)], vec![]);
    let (mut mask, mut indptr) = (Vec::new(), vec![0]);
    // Request 0: the tree. Request 1: query 1 sees nothing; queries 0 and 2 see keys 5..9.
    let kvl = (context + draft) as usize;
    let mut bits = vec![false; draft as usize * kvl];
    for i in 0..draft as usize {
        bits[i * kvl..i * kvl + context as usize].iter_mut().for_each(|b| *b = true);
        let mut a = i;
        loop {
            bits[i * kvl + context as usize + a] = true;
            if a == 0 {
                break;
            }
            a = (a - 1) / 2;
        }
    }
    let pack = |bits: &[bool], mask: &mut Vec<u8>| {
        let mut bytes = vec![0u8; bits.len().div_ceil(8)];
        for (j, _) in bits.iter().enumerate().filter(|(_, &b)| b) {
            bytes[j / 8] |= 1 << (j % 8);
        }
        mask.extend_from_slice(&bytes);
    };
    pack(&bits, &mut mask);
    indptr.push(mask.len() as i32);
    let bits1: Vec<bool> = (0..3 * 40).map(|j| j / 40 != 1 && (5..9).contains(&(j % 40))).collect();
    pack(&bits1, &mut mask);
    indptr.push(mask.len() as i32);
    case.batch.custom_mask = mask;
    case.batch.mask_indptr = indptr;
    // Draft token 1 (child of 0) does not see token 2 (its sibling) although causal would.
    assert!(!case.mask_bit(0, 2, context + 1) && case.mask_bit(0, 2, context + 2) && case.mask_bit(0, 2, context));
    for (name, opts) in [
        ("default", PlanOptions::default()),
        ("split every 16 keys", PlanOptions { deterministic: true, split_keys: 16, ..PlanOptions::default() }),
    ] {
        let cpu = CpuBackend::new(2);
        let plan = Arc::new(Plan::build(case.shape, case.batch.clone(), &cpu.profile(), opts).expect("plan"));
        let bound = cpu.bind(plan, 0, None).expect("bind");
        let mut o = Tensor::poisoned(case.shape.dtype, case.out_len());
        let mut lse = vec![f32::NAN; case.total_q() * case.shape.num_qo_heads as usize];
        // SAFETY: the case's Q, K and V, O of out_len() and LSE of total_q × heads elements, on the host.
        unsafe { bound.run(&case.run_args(&mut o, &mut lse)) }.expect("run");
        assert_close(&case, &o, &lse, name);
        // Request 1's query 1 is token draft + 1: every head's row is exactly 0 with LSE -inf.
        let (hq, d) = (case.shape.num_qo_heads as usize, case.shape.head_dim as usize);
        let tok = draft as usize + 1;
        for h in 0..hq {
            assert_eq!(lse[tok * hq + h], f32::NEG_INFINITY, "{name}: head {h}");
            assert!((0..d).all(|i| o.get((tok * hq + h) * d + i) == 0.0), "{name}: head {h} not 0");
        }
    }
}

/// Up to two prefix groups over distinct requests, each prefix within its members' keys.
fn random_prefix_groups(r: &mut rand::rngs::SmallRng, lens: &[(u32, u32)]) -> Vec<packinfer::types::PrefixGroup> {
    use rand::seq::SliceRandom;
    use rand::Rng;
    let mut free: Vec<u32> = (0..lens.len() as u32).filter(|&i| lens[i as usize].1 > 0).collect();
    free.shuffle(r);
    let mut groups = Vec::new();
    for _ in 0..r.random_range(0..=2) {
        let size = r.random_range(2..=4).min(free.len());
        if size < 2 {
            break;
        }
        let mut members: Vec<u32> = free.drain(..size).collect();
        // Case::build copies the prefix from the first member, which must come first in the batch.
        members.sort_unstable();
        let max = members.iter().map(|&m| lens[m as usize].1).min().unwrap();
        groups.push(packinfer::types::PrefixGroup { prefix_len: r.random_range(1..=max), members });
    }
    groups
}

/// An fp8 e4m3 K/V cache on random batches with every feature: Q of every dtype, every head
/// size and GQA ratio, causal or not, per-tensor, per-head and combined scales, prefix groups,
/// sliding windows, soft-caps, custom masks, splits (64-key deterministic pieces) and every
/// technique off. The reference computes in float64 with the dequantized cache (code × scale),
/// so the tolerance is the output dtype's (the fp8 rounding of the cache is not in it).
#[test]
fn fp8_cache_random_batches_match_f64_reference() {
    use common::Fp8Scales;
    let mut r = rng(0xf8e4);
    let mut grouped = 0;
    for i in 0..180 {
        let mut spec = CaseSpec::random(&mut r);
        spec.max_kv = spec.max_kv.min(1200);
        let lens = common::random_lengths(&mut r, &spec);
        let groups = if i % 3 == 0 { random_prefix_groups(&mut r, &lens) } else { Vec::new() };
        grouped += !groups.is_empty() as usize;
        let window = [None, None, Some(16), Some(100), Some(0)][i % 5];
        let cap = [0.0, 30.0, 0.0][i % 3];
        let scales = [Fp8Scales::PerTensor, Fp8Scales::PerHead, Fp8Scales::Both][(i / 3) % 3];
        let mut case = Case::build(&mut r, &spec, &lens, groups).with_features(window, cap);
        let masked = i % 7 == 3;
        if masked {
            case = case.with_random_mask(&mut r, [0.5, 0.9, 0.1][i % 3], i % 2 == 0);
        }
        let case = case.with_fp8_kv(&mut r, scales);
        let base = match i % 4 {
            0 | 3 => PlanOptions::default(),
            1 => PlanOptions { deterministic: true, split_keys: 64, ..PlanOptions::default() },
            _ => PlanOptions { packing: false, balancing: false, prefix_sharing: false, split_kv: false, ..PlanOptions::default() },
        };
        let ctx = format!("case {i} {scales:?} window {window:?} cap {cap} mask {masked} groups {:?} {spec:?}", case.batch.prefix_groups);
        let plan = run_and_check(&case, case.plan_options(base), &ctx);
        assert_eq!(plan.shape.kv_dtype, DType::Fp8E4m3);
    }
    assert!(grouped > 20, "only {grouped} cases had prefix groups");
}

/// Scales are run arguments: one fp8 plan, bound once, run with per-tensor scales, per-head
/// arrays, both, and the arrays' heads swapped, gives each time the reference of the scales that
/// run was given. Bad scales are refused by name before anything runs, and so are scales for a
/// cache of Q's dtype.
#[test]
fn fp8_scales_are_taken_from_each_run() {
    use common::Fp8Scales;
    use packinfer::types::KvScales;
    let cpu = CpuBackend::new(2);
    let mut r = rng(0x5ca1e);
    let spec = CaseSpec {
        batch_size: 3,
        max_kv: 300,
        page_size: 16,
        num_kv_heads: 2,
        group: 4,
        head_dim: 64,
        dtype: DType::Bf16,
        causal: true,
        decode_fraction: 0.5,
        hnd: true,
    };
    let mut case = Case::build(&mut r, &spec, &[(1, 280), (20, 200), (1, 9)], vec![]).with_fp8_kv(&mut r, Fp8Scales::Both);
    let plan = Arc::new(Plan::build(case.shape, case.batch.clone(), &cpu.profile(), PlanOptions::default()).unwrap());
    let bound = cpu.bind(plan, 0, None).unwrap();
    let run = |case: &Case| {
        let mut o = Tensor::poisoned(case.shape.dtype, case.out_len());
        let mut lse = vec![f32::NAN; case.total_q() * case.shape.num_qo_heads as usize];
        // SAFETY: the case's Q, K and V (and scale arrays), O of out_len() and LSE of total_q ×
        // heads elements, on the host.
        unsafe { bound.run(&case.run_args(&mut o, &mut lse)) }.map(|()| (o, lse))
    };
    let (k_heads, v_heads) = (case.k_head_scales.clone(), case.v_head_scales.clone());
    let mut lses = Vec::new();
    for (name, k_scale, v_scale, per_head) in [
        ("both", case.k_scale, case.v_scale, true),
        ("per-tensor only", 0.03, 0.05, false),
        ("per-head only", 1.0, 1.0, true),
        ("heads swapped", 1.0, 1.0, true),
    ] {
        case.k_scale = k_scale;
        case.v_scale = v_scale;
        case.k_head_scales = if per_head { k_heads.clone() } else { Vec::new() };
        case.v_head_scales = if per_head { v_heads.clone() } else { Vec::new() };
        if name == "heads swapped" {
            case.k_head_scales.reverse();
            case.v_head_scales.reverse();
        }
        let (o, lse) = run(&case).expect(name);
        assert_close(&case, &o, &lse, name);
        lses.push(lse);
    }
    assert_ne!(lses[2], lses[3], "swapping the heads' scales changed nothing: the test cannot tell heads apart");
    // Bad scales, by name.
    for (k_scale, v_scale, want) in [(-1.0, 1.0, "k_scale = -1"), (1.0, f32::NAN, "v_scale = NaN"), (f32::INFINITY, 1.0, "k_scale = inf")] {
        case.k_scale = k_scale;
        case.v_scale = v_scale;
        let Err(err) = run(&case) else { panic!("scales k {k_scale}, v {v_scale} ran") };
        assert!(matches!(err, packinfer::Error::InvalidArgument(_)) && err.to_string().contains(want), "{err}");
    }
    // Scales for a bf16 cache are a mistake, not ignored.
    let plain = Case::build(&mut r, &spec, &[(1, 40)], vec![]);
    let bf16_plan = Arc::new(Plan::build(plain.shape, plain.batch.clone(), &cpu.profile(), PlanOptions::default()).unwrap());
    let bf16_bound = cpu.bind(bf16_plan, 0, None).unwrap();
    let mut o = Tensor::poisoned(plain.shape.dtype, plain.out_len());
    let mut lse = vec![f32::NAN; plain.total_q() * plain.shape.num_qo_heads as usize];
    let mut args = plain.run_args(&mut o, &mut lse);
    args.kv_scales = KvScales { k_scale: 0.5, ..KvScales::NONE };
    // SAFETY: the case's host tensors, as above.
    let err = unsafe { bf16_bound.run(&args) }.unwrap_err().to_string();
    assert!(err.contains("k_scale = 0.5") && err.contains("fp8_e4m3 cache only"), "{err}");
    args.kv_scales = KvScales { v_head_scales: 8, ..KvScales::NONE };
    // SAFETY: as above (refused before anything is read).
    let err = unsafe { bf16_bound.run(&args) }.unwrap_err().to_string();
    assert!(err.contains("v_head_scales = 0x8"), "{err}");
}

/// K/V dtypes the API does not have are refused by name when planning: fp8 Q, and K/V of
/// another 16-bit dtype than Q's.
#[test]
fn kv_dtype_is_q_dtype_or_fp8() {
    use packinfer::types::Shape;
    let cpu = CpuBackend::new(1);
    let case = Case::build(&mut rng(1), &spec(16, true), &[(1, 10)], vec![]);
    let plan = |shape: Shape| Plan::build(shape, case.batch.clone(), &cpu.profile(), PlanOptions::default()).map(drop);
    for (dtype, kv_dtype, want) in [
        (DType::Fp8E4m3, DType::Fp8E4m3, Some("dtype = fp8_e4m3, but Q and O are")),
        (DType::F16, DType::Bf16, Some("kv_dtype = bf16 with dtype = f16")),
        (DType::F32, DType::F16, Some("kv_dtype = f16 with dtype = f32")),
        (DType::F16, DType::Fp8E4m3, None),
        (DType::Bf16, DType::Fp8E4m3, None),
        (DType::F32, DType::Fp8E4m3, None),
    ] {
        match (plan(Shape { dtype, kv_dtype, ..case.shape }), want) {
            (Ok(()), None) => {}
            (Err(e), Some(want)) => assert!(matches!(e, packinfer::Error::InvalidArgument(_)) && e.to_string().contains(want), "{e}"),
            (got, _) => panic!("{dtype:?}/{kv_dtype:?}: {got:?}, want {want:?}"),
        }
    }
}
