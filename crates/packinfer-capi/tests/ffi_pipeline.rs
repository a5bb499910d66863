//! `packinfer_plan_update` and the engine loop it is for: re-planning into a plan gives what
//! `packinfer_plan_create` gives, and planning step N+1 on another thread while step N runs
//! computes every step right (CPU backend; tests/cuda_ffi.rs runs the same loop on a GPU).

use packinfer_testkit as common;
mod support;
use support::{cpu_context, expect, last_error, ok, run_args, CDesc};

use std::ptr::{null, null_mut};
use std::sync::mpsc;

use common::{assert_close, rng, Case, CaseSpec, Tensor};
use packinfer::types::{DType, PrefixGroup};
use packinfer_capi::*;

fn spec() -> CaseSpec {
    CaseSpec {
        batch_size: 5,
        max_kv: 300,
        page_size: 16,
        num_kv_heads: 2,
        group: 4,
        head_dim: 64,
        dtype: DType::Bf16,
        causal: true,
        decode_fraction: 0.6,
        hnd: false,
    }
}

/// A step's batch and its C prefix groups (whose member arrays it owns).
struct Step {
    case: Case,
    members: Vec<Vec<i32>>,
}

impl Step {
    fn new(case: Case) -> Step {
        let members = case.batch.prefix_groups.iter().map(|g| g.members.iter().map(|&m| m as i32).collect()).collect();
        Step { case, members }
    }
    fn groups(&self) -> Vec<PackinferPrefixGroup> {
        self.case
            .batch
            .prefix_groups
            .iter()
            .zip(&self.members)
            .map(|(g, m)| PackinferPrefixGroup { prefix_len: g.prefix_len, num_members: m.len() as u32, members: m.as_ptr() })
            .collect()
    }
}

/// Steps of one shape: random batches, one with a shared prefix, one long prompt that splits.
fn steps() -> Vec<Step> {
    let mut r = rng(2121);
    let s = spec();
    let mut steps: Vec<Step> = (0..6).map(|_| Step::new(Case::random(&mut r, &s))).collect();
    steps.insert(
        2,
        Step::new(Case::build(
            &mut r,
            &s,
            &[(1, 120), (1, 140), (4, 90), (1, 130)],
            vec![PrefixGroup { prefix_len: 64, members: vec![0, 1, 3] }],
        )),
    );
    steps.insert(4, Step::new(Case::build(&mut r, &s, &[(200, 290), (1, 300)], vec![])));
    steps
}

/// The plan's statistics but its planning time, as text to compare.
fn stats(plan: PackinferPlan) -> String {
    let mut s = PackinferPlanStats { struct_size: std::mem::size_of::<PackinferPlanStats>(), ..Default::default() };
    // SAFETY: `s` is a live struct with its struct_size set.
    ok(unsafe { packinfer_plan_stats(plan, &mut s) });
    s.planning_time_us = 0.0;
    format!("{s:?}")
}

fn counts(plan: PackinferPlan) -> (u32, u32, u32) {
    let mut s = PackinferPlanStats { struct_size: std::mem::size_of::<PackinferPlanStats>(), ..Default::default() };
    // SAFETY: `s` is a live struct with its struct_size set.
    ok(unsafe { packinfer_plan_stats(plan, &mut s) });
    (s.num_requests, s.num_work_items, s.num_groups)
}

fn create(ctx: PackinferContext, step: &Step) -> PackinferPlan {
    let groups = step.groups();
    let d = step.case.c_desc(&groups);
    let mut plan = PackinferPlan::default();
    // SAFETY: `d` borrows the step's arrays, alive for the call.
    ok(unsafe { packinfer_plan_create(ctx, &d, null(), &mut plan) });
    plan
}

fn update(ctx: PackinferContext, plan: PackinferPlan, step: &Step) -> PackinferStatus {
    let groups = step.groups();
    let d = step.case.c_desc(&groups);
    // SAFETY: `d` borrows the step's arrays, alive for the call.
    unsafe { packinfer_plan_update(ctx, plan, &d, null()) }
}

/// Runs `layers` layers of `step` with `launch` and checks each against the reference.
fn run_step(launch: PackinferLaunch, step: &Step, layers: usize, what: &str) {
    let case = &step.case;
    for layer in 0..layers {
        let o = Tensor::poisoned(case.shape.dtype, case.out_len());
        let mut lse = vec![f32::NAN; case.total_q() * case.shape.num_qo_heads as usize];
        let args = run_args(case, &o, &mut lse);
        // SAFETY: the args address the case's host tensors, alive for the (synchronous) CPU run.
        ok(unsafe { packinfer_run(launch, &args) });
        assert_close(case, &o, &lse, &format!("{what}, layer {layer}"));
    }
}

fn big_capacity() -> PackinferLaunchCapacity {
    PackinferLaunchCapacity {
        struct_size: std::mem::size_of::<PackinferLaunchCapacity>(),
        max_work_items: 4096,
        max_row_segments: 4096,
        max_kv_chunks: 4096,
        max_requests: 64,
        max_pages: 4096,
        max_merge_rows: 1 << 16,
        max_merge_slots: 1 << 16,
        max_groups: 4096,
        max_partial_slots: 1 << 16,
        max_custom_mask_bytes: 0,
        max_masked_query_tokens: 0,
    }
}

#[test]
fn plan_update_plans_what_plan_create_plans_and_an_error_empties_the_plan() {
    let ctx = cpu_context(2);
    let steps = steps();
    let plan = create(ctx, &steps[0]);
    for (i, step) in steps.iter().enumerate() {
        ok(update(ctx, plan, step));
        let fresh = create(ctx, step);
        assert_eq!(stats(plan), stats(fresh), "step {i}");
        ok(packinfer_plan_destroy(fresh));
    }
    // Another shape is fine: the plan is planned anew.
    let other = Step::new(Case::random(&mut rng(5), &CaseSpec { head_dim: 128, num_kv_heads: 1, ..spec() }));
    ok(update(ctx, plan, &other));
    assert_eq!(stats(plan), stats(create(ctx, &other)));
    // A bad page index: the message names it, and the plan holds no work until the next update.
    let mut pages = steps[1].case.batch.kv_page_indices.clone();
    pages[0] = 1 << 30;
    let mut d = steps[1].case.c_desc(&[]);
    d.kv_page_indices = pages.as_ptr();
    // SAFETY: `d` borrows the step's arrays and `pages`, alive for the call.
    let status = unsafe { packinfer_plan_update(ctx, plan, &d, null()) };
    expect(status, PackinferStatus::InvalidArgument, &["packinfer_plan_update", "1073741824"]);
    assert_eq!(counts(plan), (0, 0, 0));
    // A negative one, last in the list (the plan checks the list as it copies it).
    ok(update(ctx, plan, &steps[1]));
    let mut pages = steps[1].case.batch.kv_page_indices.clone();
    let last = pages.len() - 1;
    pages[last] = -1;
    d.kv_page_indices = pages.as_ptr();
    // SAFETY: `d` borrows the step's arrays and `pages`, alive for the call.
    let status = unsafe { packinfer_plan_update(ctx, plan, &d, null()) };
    expect(status, PackinferStatus::InvalidArgument, &[&format!("kv_page_indices[{last}] = -1")]);
    assert_eq!(counts(plan), (0, 0, 0));
    // Bad arguments found before planning leave the plan as it was.
    ok(update(ctx, plan, &steps[1]));
    let before = stats(plan);
    let mut d = steps[1].case.c_desc(&[]);
    d.dtype = 77;
    // SAFETY: `d` borrows the step's arrays, alive for the call.
    expect(unsafe { packinfer_plan_update(ctx, plan, &d, null()) }, PackinferStatus::InvalidArgument, &["dtype = 77"]);
    assert_eq!(stats(plan), before);
    // SAFETY: a null batch is checked by the call.
    expect(unsafe { packinfer_plan_update(ctx, plan, null(), null()) }, PackinferStatus::InvalidArgument, &["batch is a null pointer"]);
    expect(update(ctx, PackinferPlan { bits: 12345 }, &steps[1]), PackinferStatus::InvalidHandle, &["plan handle"]);
    ok(packinfer_plan_destroy(plan));
    ok(packinfer_context_destroy(ctx));
}

/// The engine loop of docs/design.md §10: the main thread runs step N (every layer), while a
/// planner thread plans step N+1 into the other of two plans; then the launch is updated to
/// it. Every layer of every step is checked against the reference. A launch on the CPU keeps
/// the plan it runs, so the planner writes the plan the launch let go at its last update.
#[test]
fn an_engine_plans_the_next_step_on_another_thread_while_this_one_runs() {
    let ctx = cpu_context(2);
    let steps = steps();
    let plans = [create(ctx, &steps[0]), create(ctx, &steps[1])];
    let cap = big_capacity();
    let mut launch = PackinferLaunch::default();
    // SAFETY: live locals; the NULL options and stream are allowed.
    ok(unsafe { packinfer_launch_create_with_capacity(ctx, plans[0], null(), &cap, null_mut(), &mut launch) });
    let (to_planner, planner_in) = mpsc::channel::<Option<usize>>();
    let (planner_out, from_planner) = mpsc::channel::<PackinferStatus>();
    std::thread::scope(|scope| {
        let steps = &steps;
        scope.spawn(move || {
            // Plans step n into plans[n % 2] when told to.
            while let Ok(Some(n)) = planner_in.recv() {
                let status = update(ctx, plans[n % 2], &steps[n]);
                if status != PackinferStatus::Ok {
                    eprintln!("planning step {n}: {}", last_error());
                }
                planner_out.send(status).unwrap();
            }
        });
        for n in 0..steps.len() {
            if n + 1 < steps.len() && n > 0 {
                // Step n+1 is planned while step n runs below.
                to_planner.send(Some(n + 1)).unwrap();
            }
            if n > 0 {
                // SAFETY: the NULL stream is the default stream.
                ok(unsafe { packinfer_launch_update(launch, plans[n % 2], null_mut()) });
            }
            run_step(launch, &steps[n], 3, &format!("step {n}"));
            if n + 1 < steps.len() && n > 0 {
                assert_eq!(from_planner.recv().unwrap(), PackinferStatus::Ok, "planning step {}", n + 1);
            }
        }
        to_planner.send(None).unwrap();
    });
    ok(packinfer_launch_destroy(launch));
    for p in plans {
        ok(packinfer_plan_destroy(p));
    }
    ok(packinfer_context_destroy(ctx));
}

/// Re-planning the plan a CPU launch still runs does not change what the launch computes: the
/// update plans into new memory, and the launch computes its step until it is updated.
#[test]
fn updating_the_plan_a_cpu_launch_runs_leaves_the_launch_its_step() {
    let ctx = cpu_context(2);
    let steps = steps();
    let plan = create(ctx, &steps[0]);
    let cap = big_capacity();
    let mut launch = PackinferLaunch::default();
    // SAFETY: live locals; the NULL options and stream are allowed.
    ok(unsafe { packinfer_launch_create_with_capacity(ctx, plan, null(), &cap, null_mut(), &mut launch) });
    ok(update(ctx, plan, &steps[3]));
    run_step(launch, &steps[0], 1, "the launch's own step after the plan moved on");
    // SAFETY: the NULL stream is the default stream.
    ok(unsafe { packinfer_launch_update(launch, plan, null_mut()) });
    run_step(launch, &steps[3], 1, "after the launch update");
    ok(packinfer_launch_destroy(launch));
    ok(packinfer_plan_destroy(plan));
    ok(packinfer_context_destroy(ctx));
}

fn suits(launch: PackinferLaunch, plan: PackinferPlan) -> bool {
    let mut s = false;
    // SAFETY: `s` is a live local.
    ok(unsafe { packinfer_launch_suits(launch, plan, &mut s) });
    s
}

/// On the CPU every plan within the launch's capacity suits it (one kernel), and one over it
/// does not; a null out pointer is refused by name and leaves the launch usable.
#[test]
fn a_launch_suits_the_plans_its_update_takes() {
    let ctx = cpu_context(2);
    let steps = steps();
    let plans: Vec<PackinferPlan> = steps.iter().map(|s| create(ctx, s)).collect();
    let requests: Vec<u32> = plans.iter().map(|&p| counts(p).0).collect();
    let small = (0..plans.len()).min_by_key(|&i| requests[i]).unwrap();
    let big = (0..plans.len()).max_by_key(|&i| requests[i]).unwrap();
    assert!(requests[big] > requests[small], "the steps differ in requests: {requests:?}");
    // Room for the small step's requests only.
    let cap = PackinferLaunchCapacity { max_requests: requests[small], ..big_capacity() };
    let mut launch = PackinferLaunch::default();
    // SAFETY: live locals; the NULL options and stream are allowed.
    ok(unsafe { packinfer_launch_create_with_capacity(ctx, plans[small], null(), &cap, null_mut(), &mut launch) });
    for (i, &p) in plans.iter().enumerate() {
        let fits = requests[i] <= requests[small];
        assert_eq!(suits(launch, p), fits, "step {i}: {} requests, capacity {}", requests[i], requests[small]);
        // SAFETY: the NULL stream is the default stream.
        let st = unsafe { packinfer_launch_update(launch, p, null_mut()) };
        assert_eq!(st == PackinferStatus::Ok, fits, "step {i}: update agrees with suits ({})", last_error());
    }
    // SAFETY: a null out pointer is what is tested.
    let st = unsafe { packinfer_launch_suits(launch, plans[small], null_mut()) };
    assert_eq!(st, PackinferStatus::InvalidArgument);
    assert!(last_error().contains("suits"), "{}", last_error());
    // SAFETY: the NULL stream is the default stream.
    ok(unsafe { packinfer_launch_update(launch, plans[small], null_mut()) });
    run_step(launch, &steps[small], 1, "after the refused call");
    ok(packinfer_launch_destroy(launch));
    for p in plans {
        ok(packinfer_plan_destroy(p));
    }
    ok(packinfer_context_destroy(ctx));
}
