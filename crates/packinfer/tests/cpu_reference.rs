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
