//! The scheduler handle through the C ABI on the CPU backend: an engine's serving loop (plan by
//! the scheduler, launch, run every layer, record the measured times), what each adaptive part
//! does when switched on or off, and bad input named in the message.

mod support;

use std::ptr::{null, null_mut};
use std::time::Instant;

use packinfer_capi::*;
use support::{cpu_context, expect, ok};

const LAYERS: u32 = 2;
const QO_HEADS: u32 = 4;
const KV_HEADS: u32 = 2;
const HEAD_DIM: u32 = 8;

fn pool(ctx: PackinferContext, pages: u32) -> PackinferPool {
    // SAFETY: a C struct of integers and pointers, for which all zeros is a valid value.
    let mut o: PackinferPoolOptions = unsafe { std::mem::zeroed() };
    // SAFETY: `o` is writable.
    ok(unsafe { packinfer_pool_options_default(&mut o) });
    (o.num_layers, o.num_qo_heads, o.num_kv_heads, o.head_dim) = (LAYERS, QO_HEADS, KV_HEADS, HEAD_DIM);
    o.dtype = PackinferDtype::F32 as u32;
    o.page_size = 4;
    o.num_pages = pages;
    let mut p = PackinferPool::default();
    // SAFETY: `o` initialized, `p` writable.
    ok(unsafe { packinfer_pool_create(ctx, &o, &mut p) });
    p
}

fn options() -> PackinferSchedulerOptions {
    // SAFETY: a C struct of integers and doubles, for which all zeros is a valid value.
    let mut o: PackinferSchedulerOptions = unsafe { std::mem::zeroed() };
    // SAFETY: `o` is writable.
    ok(unsafe { packinfer_scheduler_options_default(&mut o) });
    o
}

fn scheduler(pool: PackinferPool, o: &PackinferSchedulerOptions) -> PackinferScheduler {
    let mut s = PackinferScheduler::default();
    // SAFETY: `o` initialized, `s` writable.
    ok(unsafe { packinfer_scheduler_create(pool, o, &mut s) });
    s
}

fn stats(s: PackinferScheduler) -> PackinferSchedulerStats {
    let mut st = PackinferSchedulerStats { struct_size: std::mem::size_of::<PackinferSchedulerStats>(), ..Default::default() };
    // SAFETY: `st` has its struct_size set.
    ok(unsafe { packinfer_scheduler_stats(s, &mut st) });
    st
}

/// An engine: `n` sequences with prompts of different lengths, then decodes; each step is
/// planned by the scheduler, launched, run on every layer and its times recorded.
struct Engine {
    ctx: PackinferContext,
    pool: PackinferPool,
    sched: PackinferScheduler,
    seqs: Vec<u64>,
    lens: Vec<u32>,
    steps: Vec<PackinferSchedulerStep>,
    /// With `packinfer_scheduler_plan_update`: the plan every step re-plans into (a null handle
    /// before the first step); else every step creates and destroys its own.
    kept: Option<PackinferPlan>,
}

impl Engine {
    fn new(o: &PackinferSchedulerOptions, n: usize) -> Engine {
        let ctx = cpu_context(1);
        let pool = pool(ctx, 512);
        let sched = scheduler(pool, o);
        let mut seqs = Vec::new();
        for _ in 0..n {
            let mut id = 0u64;
            // SAFETY: `id` writable.
            ok(unsafe { packinfer_pool_sequence_create(pool, &mut id) });
            seqs.push(id);
        }
        Engine { ctx, pool, sched, seqs, lens: vec![0; n], steps: Vec::new(), kept: None }
    }

    /// An engine whose steps re-plan one plan handle (`packinfer_scheduler_plan_update`).
    fn updating(o: &PackinferSchedulerOptions, n: usize) -> Engine {
        let mut e = Engine::new(o, n);
        e.kept = Some(PackinferPlan::default());
        e
    }

    /// One step: sequence i gets `new[i]` tokens (0: not in the step).
    fn step(&mut self, new: &[u32]) -> PackinferSchedulerStep {
        let (mut ids, mut counts) = (Vec::new(), Vec::new());
        for (i, &n) in new.iter().enumerate() {
            if n > 0 {
                let mut slots = vec![0i64; n as usize];
                // SAFETY: `slots` holds n entries; the stream is the CPU's (ignored).
                ok(unsafe { packinfer_pool_append(self.pool, self.seqs[i], n, slots.as_mut_ptr(), null_mut()) });
                self.lens[i] += n;
                ids.push(self.seqs[i]);
                counts.push(n);
            }
        }
        let mut plan = PackinferPlan::default();
        let mut step = PackinferSchedulerStep { struct_size: std::mem::size_of::<PackinferSchedulerStep>(), ..Default::default() };
        let n = ids.len() as u32;
        match self.kept {
            // SAFETY: arrays of `n` entries; `step` writable, its struct_size set.
            Some(kept) if kept.bits != 0 => ok(unsafe {
                packinfer_scheduler_plan_update(self.sched, self.ctx, kept, ids.as_ptr(), counts.as_ptr(), n, null(), null_mut(), &mut step)
            }),
            // SAFETY: arrays of `n` entries; `plan` and `step` writable.
            _ => ok(unsafe {
                packinfer_scheduler_plan(self.sched, self.ctx, ids.as_ptr(), counts.as_ptr(), n, null(), null_mut(), &mut plan, &mut step)
            }),
        }
        if let Some(kept) = &mut self.kept {
            if kept.bits == 0 {
                *kept = plan;
            }
            plan = *kept;
        }
        // The plan is made after any relayout: it launches and runs.
        let mut launch = PackinferLaunch::default();
        // SAFETY: live handles, `launch` writable.
        ok(unsafe { packinfer_launch_create(self.ctx, plan, null(), null_mut(), &mut launch) });
        let total_q: usize = counts.iter().map(|&n| n as usize).sum();
        let q = vec![0.25f32; total_q * (QO_HEADS * HEAD_DIM) as usize];
        let mut o = vec![f32::NAN; q.len()];
        let t = Instant::now();
        for layer in 0..LAYERS {
            // SAFETY: a C struct of integers and pointers, for which all zeros is a valid value.
            let mut args: PackinferRunArgs = unsafe { std::mem::zeroed() };
            args.struct_size = std::mem::size_of::<PackinferRunArgs>();
            args.q = q.as_ptr() as *const _;
            args.o = o.as_mut_ptr() as *mut _;
            // SAFETY: `args.kv` is writable.
            ok(unsafe { packinfer_pool_kv_layout(self.pool, layer, &mut args.kv) });
            // SAFETY: Q and O hold total_q rows of the shape; the pool's K/V; a CPU run is synchronous.
            ok(unsafe { packinfer_run(launch, &args) });
        }
        assert!(o.iter().all(|x| x.is_finite()), "every output row written");
        let times = PackinferStepTimes {
            struct_size: std::mem::size_of::<PackinferStepTimes>(),
            attention_seconds: t.elapsed().as_secs_f64(),
            relayout_seconds: 0.0,
        };
        // SAFETY: `times` has its struct_size set.
        ok(unsafe { packinfer_scheduler_record(self.sched, &times) });
        ok(packinfer_launch_destroy(launch));
        if self.kept.is_none() {
            ok(packinfer_plan_destroy(plan));
        }
        self.steps.push(step);
        step
    }

    /// Appends `rounds` × 3 tokens to every sequence, round by round, without a step: each
    /// sequence's pages end up interleaved with the others' (what a relayout would gather).
    fn scatter(&mut self, rounds: u32) {
        for _ in 0..rounds {
            for i in 0..self.seqs.len() {
                let mut slots = [0i64; 3];
                // SAFETY: `slots` holds 3 entries; the stream is the CPU's (ignored).
                ok(unsafe { packinfer_pool_append(self.pool, self.seqs[i], 3, slots.as_mut_ptr(), null_mut()) });
                self.lens[i] += 3;
            }
        }
    }

    /// Prefills of different lengths in the first step, then `decodes` decode steps of all.
    fn serve(&mut self, prompts: &[u32], decodes: usize) {
        self.step(prompts);
        for _ in 0..decodes {
            self.step(&vec![1; prompts.len()]);
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(kept) = self.kept.filter(|p| p.bits != 0) {
            ok(packinfer_plan_destroy(kept));
        }
        ok(packinfer_scheduler_destroy(self.sched));
        ok(packinfer_pool_destroy(self.pool));
        ok(packinfer_context_destroy(self.ctx));
    }
}

const PROMPTS: [u32; 6] = [5, 40, 13, 70, 2, 27];

#[test]
fn the_defaults_adapt_everything_and_move_nothing_without_a_measured_gain() {
    let o = options();
    assert_eq!((o.flags, o.horizon_steps, o.capacity_factor, o.copy_bytes_per_second), (0, 32, 1.0, 0.0));
    assert!(o.contiguous_gain < 0.0 && o.explore_fraction > 0.0 && o.explore_fraction <= 0.05);
    let mut e = Engine::new(&o, PROMPTS.len());
    e.serve(&PROMPTS, 40);
    let st = stats(e.sched);
    assert_eq!(st.steps, 41);
    assert!(st.regroups >= 1, "the first step makes the first grouping");
    assert!(st.regroups <= 5, "a decode-only tail barely drifts: {} regroups in 41 steps", st.regroups);
    assert!(e.steps[0].regrouped);
    // Every relayout is a probe (nothing measured a gain), each within the exploration budget.
    assert_eq!(st.relayouts, st.probes);
    assert!(st.attention_seconds > 0.0 && st.plan_seconds > 0.0);
    assert!(st.capacity_searches == 1 && st.exploring_steps > 0, "the tuner searched");
    assert!(e.steps.iter().all(|s| s.capacity > 0.0 && s.capacity_factor > 0.0));
}

#[test]
fn each_part_switches_off() {
    let mut o = options();
    o.flags =
        PackinferSchedulerFlags::NoTuning as u32 | PackinferSchedulerFlags::NoRegroup as u32 | PackinferSchedulerFlags::NoRelayout as u32;
    o.capacity_factor = 2.0;
    let mut e = Engine::new(&o, PROMPTS.len());
    e.serve(&PROMPTS, 12);
    let st = stats(e.sched);
    assert_eq!((st.regroups, st.relayouts, st.bytes_moved, st.capacity_searches, st.exploring_steps), (0, 0, 0, 0, 0));
    assert!(e.steps.iter().all(|s| s.capacity_factor == 2.0 && s.due_pages == 0 && !s.relayout));
    assert_eq!(st.capacity_factor, 2.0);
}

#[test]
fn relayout_always_moves_pages_and_the_returned_plan_is_fresh() {
    let mut o = options();
    o.flags = PackinferSchedulerFlags::RelayoutAlways as u32;
    let mut e = Engine::new(&o, PROMPTS.len());
    // Interleaved appends scatter each sequence's pages: the first grouping has pages to move.
    e.scatter(4);
    for _ in 0..4 {
        e.step(&[1; 6]);
    }
    let st = stats(e.sched);
    assert!(st.relayouts >= 1 && st.bytes_moved > 0, "{st:?}");
    let moved: Vec<_> = e.steps.iter().filter(|s| s.relayout).collect();
    assert!(moved.iter().all(|s| s.pages_moved > 0 && s.pages_moved <= s.due_pages && s.bytes_moved > 0));
    // The copy rate is measured from the relayouts' times, which are part of the relayout time.
    assert!(st.copy_bytes_per_second > 0.0);
    assert!(st.copy_seconds > 0.0 && st.copy_seconds <= st.relayout_seconds, "{st:?}");
}

#[test]
fn a_gain_the_engine_measured_drives_the_cost_model() {
    // Without a kept grouping every step's groups are due for a layout. No gain: declined.
    let mut o = options();
    o.flags = PackinferSchedulerFlags::NoRegroup as u32;
    o.contiguous_gain = 0.0;
    o.copy_bytes_per_second = 1e12;
    let mut e = Engine::new(&o, PROMPTS.len());
    e.scatter(4);
    for _ in 0..3 {
        e.step(&[1; 6]);
    }
    let st = stats(e.sched);
    assert_eq!(st.relayouts, 0);
    assert!(st.relayouts_declined >= 1, "{st:?}");
    assert!(e.steps.iter().any(|s| s.due_pages > 0 && s.predicted_cost_seconds > 0.0));
    // A large gain and a fast copy: the same relayout pays within the horizon.
    o.contiguous_gain = 0.5;
    let mut e = Engine::new(&o, PROMPTS.len());
    // One step to measure attention time, then scattered pages.
    e.step(&[1; 6]);
    e.scatter(4);
    for _ in 0..3 {
        e.step(&[1; 6]);
    }
    let st = stats(e.sched);
    assert!(st.relayouts >= 1, "{st:?}");
    assert!(st.predicted_gain_seconds > st.predicted_cost_seconds);
    assert_eq!(st.probes, 0, "a given gain needs no probe");
}

#[test]
fn plan_update_decides_as_plan_does_and_reuses_one_handle() {
    // Decisions that do not depend on measured times: a fixed factor, no relayouts.
    let mut o = options();
    o.flags = PackinferSchedulerFlags::NoTuning as u32 | PackinferSchedulerFlags::NoRelayout as u32;
    o.capacity_factor = 0.4;
    let (mut fresh, mut updating) = (Engine::new(&o, PROMPTS.len()), Engine::updating(&o, PROMPTS.len()));
    fresh.serve(&PROMPTS, 12);
    updating.serve(&PROMPTS, 12);
    let first = updating.kept.unwrap();
    for (a, b) in fresh.steps.iter().zip(&updating.steps) {
        let timeless = |s: &PackinferSchedulerStep| PackinferSchedulerStep { plan_seconds: 0.0, relayout_seconds: 0.0, ..*s };
        assert_eq!(timeless(a), timeless(b));
        assert_eq!(a.capacity_factor, 0.4);
    }
    assert!(updating.steps.iter().any(|s| !s.regrouped), "the trigger kept a grouping");

    // A launch still holds the plan: the update goes into a copy, the launch keeps the old.
    let mut launch = PackinferLaunch::default();
    // SAFETY: live handles, `launch` writable.
    ok(unsafe { packinfer_launch_create(updating.ctx, first, null(), null_mut(), &mut launch) });
    updating.step(&[1; PROMPTS.len()]);
    assert_eq!(updating.kept.unwrap(), first, "one handle throughout");
    ok(packinfer_launch_destroy(launch));
}

#[test]
fn bad_input_is_named() {
    use PackinferStatus::*;
    let ctx = cpu_context(1);
    let p = pool(ctx, 64);
    let mut s = PackinferScheduler::default();
    // SAFETY: each pointer below is NULL where the call checks for it, or a live local of the
    // type and length the call expects.
    unsafe {
        let mut o = options();
        o.flags = 64;
        expect(packinfer_scheduler_create(p, &o, &mut s), InvalidArgument, &["options->flags = 0x40"]);
        o.flags = PackinferSchedulerFlags::NoRelayout as u32 | PackinferSchedulerFlags::RelayoutAlways as u32;
        expect(packinfer_scheduler_create(p, &o, &mut s), InvalidArgument, &["NO_RELAYOUT and RELAYOUT_ALWAYS"]);
        let mut o = options();
        o.horizon_steps = 0;
        expect(packinfer_scheduler_create(p, &o, &mut s), InvalidArgument, &["options->horizon_steps = 0"]);
        let mut o = options();
        o.capacity_factor = -1.0;
        expect(packinfer_scheduler_create(p, &o, &mut s), InvalidArgument, &["options->capacity_factor = -1"]);
        let mut o = options();
        o.explore_fraction = f64::NAN;
        expect(packinfer_scheduler_create(p, &o, &mut s), InvalidArgument, &["options->explore_fraction = NaN"]);
        let mut o = options();
        o.struct_size = 12;
        expect(packinfer_scheduler_create(p, &o, &mut s), InvalidArgument, &["options->struct_size = 12"]);
        expect(packinfer_scheduler_create(PackinferPool::default(), null(), &mut s), InvalidHandle, &["pool handle 0x0 is null"]);
        expect(packinfer_scheduler_create(p, null(), null_mut()), InvalidArgument, &["out is a null pointer"]);
        ok(packinfer_scheduler_create(p, null(), &mut s));

        let mut t =
            PackinferStepTimes { struct_size: std::mem::size_of::<PackinferStepTimes>(), attention_seconds: 1e-3, relayout_seconds: 0.0 };
        expect(packinfer_scheduler_record(s, &t), InvalidArgument, &["record without a step"]);
        let mut id = 0u64;
        ok(packinfer_pool_sequence_create(p, &mut id));
        let mut slots = [0i64; 5];
        ok(packinfer_pool_append(p, id, 5, slots.as_mut_ptr(), null_mut()));
        let (ids, counts) = ([id], [5u32]);
        let mut plan = PackinferPlan::default();
        expect(
            packinfer_scheduler_plan(s, ctx, ids.as_ptr(), null(), 1, null(), null_mut(), &mut plan, null_mut()),
            InvalidArgument,
            &["num_new_tokens is a null pointer"],
        );
        expect(
            packinfer_scheduler_plan(s, ctx, ids.as_ptr(), counts.as_ptr(), 1, null(), null_mut(), null_mut(), null_mut()),
            InvalidArgument,
            &["out is a null pointer"],
        );
        let mut step = PackinferSchedulerStep { struct_size: 3, ..Default::default() };
        expect(
            packinfer_scheduler_plan(s, ctx, ids.as_ptr(), counts.as_ptr(), 1, null(), null_mut(), &mut plan, &mut step),
            InvalidArgument,
            &["step->struct_size = 3"],
        );
        let bad = [id + 1000];
        expect(
            packinfer_scheduler_plan(s, ctx, bad.as_ptr(), counts.as_ptr(), 1, null(), null_mut(), &mut plan, null_mut()),
            InvalidArgument,
            &[],
        );
        ok(packinfer_scheduler_plan(s, ctx, ids.as_ptr(), counts.as_ptr(), 1, null(), null_mut(), &mut plan, null_mut()));
        expect(
            packinfer_scheduler_plan_update(
                s,
                ctx,
                PackinferPlan::default(),
                ids.as_ptr(),
                counts.as_ptr(),
                1,
                null(),
                null_mut(),
                null_mut(),
            ),
            InvalidHandle,
            &["plan handle 0x0 is null"],
        );
        expect(
            packinfer_scheduler_plan_update(s, ctx, plan, ids.as_ptr(), counts.as_ptr(), 1, null(), null_mut(), &mut step),
            InvalidArgument,
            &["step->struct_size = 3"],
        );
        expect(
            packinfer_scheduler_plan_update(s, ctx, plan, bad.as_ptr(), counts.as_ptr(), 1, null(), null_mut(), null_mut()),
            InvalidArgument,
            &[],
        );
        // The refused updates left the step planned above pending.
        t.attention_seconds = -1.0;
        expect(packinfer_scheduler_record(s, &t), InvalidArgument, &["times->attention_seconds = -1"]);
        t.attention_seconds = 1e-3;
        t.relayout_seconds = f64::INFINITY;
        expect(packinfer_scheduler_record(s, &t), InvalidArgument, &["times->relayout_seconds = inf"]);
        t.relayout_seconds = 0.0;
        // The refused records left the step pending: this one counts it.
        ok(packinfer_scheduler_record(s, &t));
        expect(packinfer_scheduler_record(s, &t), InvalidArgument, &["record without a step"]);
        let mut st = PackinferSchedulerStats { struct_size: 7, ..Default::default() };
        expect(packinfer_scheduler_stats(s, &mut st), InvalidArgument, &["stats->struct_size = 7"]);
        st.struct_size = std::mem::size_of::<PackinferSchedulerStats>();
        // A newer header's longer struct: the fields this library knows are written, the rest left.
        let words = std::mem::size_of::<PackinferSchedulerStats>() / 8;
        let mut long = vec![u64::MAX; words + 2];
        long[0] = (8 * (words + 2)) as u64;
        ok(packinfer_scheduler_stats(s, long.as_mut_ptr() as *mut PackinferSchedulerStats));
        assert_eq!((long[1], long[2]), (1, 1), "steps and regroups");
        assert_eq!(long[words..], [u64::MAX; 2]);
        ok(packinfer_plan_destroy(plan));
        ok(packinfer_scheduler_destroy(s));
        expect(packinfer_scheduler_destroy(s), InvalidHandle, &["scheduler handle", "was destroyed"]);
        expect(packinfer_scheduler_stats(s, &mut st), InvalidHandle, &["scheduler handle"]);
        // A scheduler handle is not a pool handle.
        expect(packinfer_pool_destroy(PackinferPool { bits: s.bits }), InvalidHandle, &["not a handle of this kind"]);
    }
    ok(packinfer_pool_destroy(p));
    ok(packinfer_context_destroy(ctx));
}
