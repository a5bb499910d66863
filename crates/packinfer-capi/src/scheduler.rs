//! The C ABI of the adaptive scheduler (`packinfer::plan::scheduler`): a handle an engine keeps
//! for the life of its KV pool. Each step it plans from the pool, choosing the capacity, running
//! the regroup trigger and relayouts by its cost model; the engine then reports the step's
//! measured times. This layer converts and checks; the policy is the core crate's.

use std::ffi::c_void;
use std::sync::Arc;

use parking_lot::Mutex;

use super::api::{PlanCell, CONTEXTS, PLANS};
use super::handles::Registry;
use super::pool::{zip_requests, PackinferPool, POOLS};
use super::types::{PackinferContext, PackinferPlan, PackinferPlanOptions};
use super::{guard, options, write_out, PackinferStatus};
use packinfer::invalid;
use packinfer::kv::{KvPool, SeqId};
use packinfer::plan::scheduler::{RelayoutPolicy, Scheduler, SchedulerOptions, StepDecision, StepTimes};
use packinfer::plan::PlanOptions;

struct SchedulerState {
    pool: Arc<KvPool>,
    scheduler: Mutex<Scheduler>,
}

static SCHEDULERS: Registry<SchedulerState> = Registry::new(0xE1, "scheduler");

/// Opaque handle to a scheduler: the adaptive schedule of one KV pool (capacity tuning, regroup
/// trigger, relayouts by a cost model with measured inputs).
///
/// Threads: any thread may call with it; calls on one scheduler are serialised. A scheduler
/// keeps its pool's memory alive until both are destroyed.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PackinferScheduler {
    /// The handle's value (a type tag and a serial number); 0 is never a handle.
    pub bits: u64,
}

/// Bits of `PackinferSchedulerOptions::flags`. 0 adapts everything.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackinferSchedulerFlags {
    /// Do not tune the capacity: plan with `capacity_factor` × the automatic capacity.
    NoTuning = 1,
    /// Keep no grouping across steps: every step's groups are new.
    NoRegroup = 2,
    /// Never move KV pages.
    NoRelayout = 4,
    /// Move pages whenever the trigger fired or a group outgrew its headroom, without asking the
    /// cost model (the rule before the cost model; for comparisons).
    RelayoutAlways = 8,
}

impl PackinferSchedulerFlags {
    const ALL: [PackinferSchedulerFlags; 4] = [Self::NoTuning, Self::NoRegroup, Self::NoRelayout, Self::RelayoutAlways];
}

/// How a scheduler adapts. `packinfer_scheduler_options_default` fills in the defaults.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PackinferSchedulerOptions {
    /// sizeof(PackinferSchedulerOptions).
    pub struct_size: usize,
    /// OR of PackinferSchedulerFlags (default 0).
    pub flags: u32,
    /// Steps a layout is expected to serve: the cost model weighs a relayout's gain over this
    /// many steps against its copy (default 32; 0 is INVALID_ARGUMENT).
    pub horizon_steps: u32,
    /// With NO_TUNING: the factor of each step's automatic capacity to plan with (default 1).
    pub capacity_factor: f64,
    /// The device's copy rate in bytes per second, if the engine measured it; 0 (default): the
    /// scheduler measures it from the relayouts' times.
    pub copy_bytes_per_second: f64,
    /// The fraction of attention time that contiguous KV saves, if the engine measured it on its
    /// device (contiguous against scattered pages); negative (default -1): measured online, by
    /// probing relayouts within `explore_fraction`. With no measured gain nothing moves.
    pub contiguous_gain: f64,
    /// Share of the attention time so far that probing may cost (default 0.01, at most 1).
    pub explore_fraction: f64,
}

/// What `packinfer_scheduler_plan` (or `packinfer_scheduler_plan_update`) decided and did.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PackinferSchedulerStep {
    /// sizeof(PackinferSchedulerStep).
    pub struct_size: usize,
    /// Capacity the plan was made with, cost units (0: a plan without one).
    pub capacity: f64,
    /// Its ratio to the step's automatic capacity.
    pub capacity_factor: f64,
    /// The regroup trigger fired (or this was the first step): the plan's groups are kept.
    pub regrouped: bool,
    /// A relayout moved pages (plans made from the pool before this call are stale).
    pub relayout: bool,
    /// That relayout was a probe (the gain of contiguity not yet measured).
    pub probe: bool,
    /// The trigger's imbalance this step and its decayed sum, in automatic capacities.
    pub imbalance: f64,
    /// See imbalance.
    pub accumulated_imbalance: f64,
    /// Pages a relayout was due to copy at most (0: none due).
    pub due_pages: u64,
    /// Pages and bytes moved.
    pub pages_moved: u64,
    /// See pages_moved.
    pub bytes_moved: u64,
    /// The cost model's predicted attention time saved over the horizon by the relayout due
    /// this step, seconds.
    pub predicted_gain_seconds: f64,
    /// Its predicted copy time, seconds (NaN before a copy rate is known).
    pub predicted_cost_seconds: f64,
    /// Host time of the step's planning, seconds.
    pub plan_seconds: f64,
    /// Host time of the relayout decision and call (the copies are enqueued on the stream).
    pub relayout_seconds: f64,
}

/// What the engine measured for the step `packinfer_scheduler_plan` returned.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PackinferStepTimes {
    /// sizeof(PackinferStepTimes).
    pub struct_size: usize,
    /// Attention time of the step, every layer's run, seconds (CUDA events on the GPU).
    pub attention_seconds: f64,
    /// Device time of the step's relayout copies, seconds, if the engine timed them; 0: the
    /// scheduler's host timing (right on the CPU backend).
    pub relayout_seconds: f64,
}

/// A scheduler's totals.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PackinferSchedulerStats {
    /// sizeof(PackinferSchedulerStats).
    pub struct_size: usize,
    /// Steps recorded.
    pub steps: u64,
    /// Times the trigger fired (the first grouping included).
    pub regroups: u64,
    /// Relayouts that moved pages.
    pub relayouts: u64,
    /// Of those, probes.
    pub probes: u64,
    /// Relayouts due that the cost model declined.
    pub relayouts_declined: u64,
    /// Bytes the relayouts moved.
    pub bytes_moved: u64,
    /// Planning time, seconds.
    pub plan_seconds: f64,
    /// Relayout time, seconds.
    pub relayout_seconds: f64,
    /// Attention time, seconds.
    pub attention_seconds: f64,
    /// Predicted copy time of the relayouts run, seconds.
    pub predicted_cost_seconds: f64,
    /// Their predicted attention time saved over the horizon, seconds.
    pub predicted_gain_seconds: f64,
    /// Their measured attention time saved (rate after against rate before, over the horizon).
    pub measured_gain_seconds: f64,
    /// Relayouts whose gain has been measured.
    pub gains_measured: u64,
    /// Measured gain fraction of contiguity on decode-only steps (NaN: unmeasured).
    pub contiguous_gain_decode: f64,
    /// The same on steps with prefill chunks.
    pub contiguous_gain_prefill: f64,
    /// The copy rate the cost model uses, bytes per second (0: none yet).
    pub copy_bytes_per_second: f64,
    /// Capacity searches run, the first included.
    pub capacity_searches: u64,
    /// Steps spent measuring a candidate capacity.
    pub exploring_steps: u64,
    /// The capacity factor the tuner stands at.
    pub capacity_factor: f64,
    /// Of relayout_seconds, the relayouts that moved pages: the measured copy cost, against
    /// predicted_cost_seconds.
    pub copy_seconds: f64,
}

fn default_options() -> PackinferSchedulerOptions {
    let d = SchedulerOptions::default();
    PackinferSchedulerOptions {
        struct_size: std::mem::size_of::<PackinferSchedulerOptions>(),
        flags: 0,
        horizon_steps: d.horizon_steps,
        capacity_factor: d.capacity_factor,
        copy_bytes_per_second: d.copy_bytes_per_s,
        contiguous_gain: d.contiguous_gain,
        explore_fraction: d.explore_fraction,
    }
}

fn convert_options(o: &PackinferSchedulerOptions) -> packinfer::Result<SchedulerOptions> {
    super::check_known_flags("options->flags", o.flags, PackinferSchedulerFlags::ALL.iter().fold(0u32, |m, &f| m | f as u32))?;
    let has = |f: PackinferSchedulerFlags| o.flags & f as u32 != 0;
    if has(PackinferSchedulerFlags::NoRelayout) && has(PackinferSchedulerFlags::RelayoutAlways) {
        return Err(invalid!("options->flags = 0x{:x} has both NO_RELAYOUT and RELAYOUT_ALWAYS", o.flags));
    }
    let s = SchedulerOptions {
        tune_capacity: !has(PackinferSchedulerFlags::NoTuning),
        capacity_factor: o.capacity_factor,
        regroup: !has(PackinferSchedulerFlags::NoRegroup),
        relayout: if has(PackinferSchedulerFlags::NoRelayout) {
            RelayoutPolicy::Never
        } else if has(PackinferSchedulerFlags::RelayoutAlways) {
            RelayoutPolicy::Always
        } else {
            RelayoutPolicy::CostModel
        },
        horizon_steps: o.horizon_steps,
        copy_bytes_per_s: o.copy_bytes_per_second,
        contiguous_gain: o.contiguous_gain,
        explore_fraction: o.explore_fraction,
    };
    s.validate().map_err(|e| invalid!("options->{e}"))?;
    Ok(s)
}

/// Fills `options` with the defaults: every part adaptive, horizon 32 steps, capacity factor 1,
/// copy rate and contiguity gain measured, 1% of attention time for exploring.
///
/// # Safety
/// `options` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn packinfer_scheduler_options_default(options: *mut PackinferSchedulerOptions) -> PackinferStatus {
    guard("packinfer_scheduler_options_default", || {
        // SAFETY: NULL or writable (this function's contract).
        unsafe { write_out("options", options, default_options()) }
    })
}

/// Creates a scheduler for `pool`; `options` may be NULL (the defaults). Keep it for the pool's
/// life and use it for every step planned from the pool.
///
/// # Safety
/// `options` NULL or a struct with `struct_size` set; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn packinfer_scheduler_create(
    pool: PackinferPool,
    options: *const PackinferSchedulerOptions,
    out: *mut PackinferScheduler,
) -> PackinferStatus {
    guard("packinfer_scheduler_create", || {
        let pool = POOLS.get(pool.bits)?;
        let o = if options.is_null() {
            default_options()
        } else {
            // SAFETY: a non-null `options` has struct_size set (this function's contract).
            unsafe { super::options("options", options)? }
        };
        let scheduler = Scheduler::new(convert_options(&o)?, pool.profile())?;
        if out.is_null() {
            return Err(invalid!("out is a null pointer"));
        }
        let bits = SCHEDULERS.insert(SchedulerState { pool, scheduler: Mutex::new(scheduler) })?;
        // SAFETY: `out` is writable (this function's contract).
        unsafe { write_out("out", out, PackinferScheduler { bits }) }
    })
}

/// Destroys a scheduler.
#[no_mangle]
pub extern "C" fn packinfer_scheduler_destroy(scheduler: PackinferScheduler) -> PackinferStatus {
    guard("packinfer_scheduler_destroy", || SCHEDULERS.remove(scheduler.bits).map(drop))
}

/// Plans a step from the scheduler's pool, as `packinfer_pool_plan_create` does (request i is
/// `seq_ids[i]` with its last `num_new_tokens[i]` tokens as queries, already appended), with
/// the capacity the scheduler chooses (`plan_options->capacity` is ignored; its flags apply).
/// The scheduler runs the regroup trigger and, where its cost model predicts a net gain, a
/// relayout whose copies go on `stream`; the returned plan is made after it. Report the step's
/// measured times with `packinfer_scheduler_record` before the next call. `plan_options` and
/// `step` may be NULL.
///
/// # Safety
/// Arrays of `n` entries; `plan_options` NULL or initialized; `out` writable; `step` NULL or a
/// struct with `struct_size` set.
#[no_mangle]
pub unsafe extern "C" fn packinfer_scheduler_plan(
    scheduler: PackinferScheduler,
    context: PackinferContext,
    seq_ids: *const u64,
    num_new_tokens: *const u32,
    n: u32,
    plan_options: *const PackinferPlanOptions,
    stream: *mut c_void,
    out: *mut PackinferPlan,
    step: *mut PackinferSchedulerStep,
) -> PackinferStatus {
    guard("packinfer_scheduler_plan", || {
        // SAFETY: this function's contract is step_args'.
        let (state, requests, plan_options) = unsafe { step_args(scheduler, context, seq_ids, num_new_tokens, n, plan_options, step)? };
        if out.is_null() {
            return Err(invalid!("out is a null pointer"));
        }
        let (plan, d) = state.scheduler.lock().step(&state.pool, &requests, plan_options, stream as u64)?;
        // SAFETY: `out` is writable (this function's contract).
        unsafe { write_out("out", out, PackinferPlan { bits: PLANS.insert(PlanCell::new(plan))? })? };
        // SAFETY: `step` is NULL or checked above.
        unsafe { write_step(step, &d) }
    })
}

/// `packinfer_scheduler_plan` into an existing plan (one of an earlier step, from any create or
/// update call), reusing its memory as `packinfer_pool_plan_update` does: once the plan has held
/// a step as large, re-planning allocates nothing; its rules on launches and threads apply.
/// After an error the plan is unchanged (bad handles or arguments are found first) or holds an
/// empty batch (no requests, no work): update it successfully before launching from it again.
///
/// # Safety
/// As `packinfer_scheduler_plan`, with `plan` in place of `out`.
#[no_mangle]
pub unsafe extern "C" fn packinfer_scheduler_plan_update(
    scheduler: PackinferScheduler,
    context: PackinferContext,
    plan: PackinferPlan,
    seq_ids: *const u64,
    num_new_tokens: *const u32,
    n: u32,
    plan_options: *const PackinferPlanOptions,
    stream: *mut c_void,
    step: *mut PackinferSchedulerStep,
) -> PackinferStatus {
    guard("packinfer_scheduler_plan_update", || {
        // SAFETY: this function's contract is step_args'.
        let (state, requests, plan_options) = unsafe { step_args(scheduler, context, seq_ids, num_new_tokens, n, plan_options, step)? };
        let cell = PLANS.get(plan.bits)?;
        let mut scheduler = state.scheduler.lock();
        let d = cell.update_into(|p| scheduler.step_into(&state.pool, &requests, plan_options, stream as u64, p))?;
        // SAFETY: `step` is NULL or checked above.
        unsafe { write_step(step, &d) }
    })
}

/// A step's checked arguments: the scheduler, its requests (sequence, new tokens), plan options.
type StepArgs = (Arc<SchedulerState>, Vec<(SeqId, u32)>, PlanOptions);

/// What both scheduler plan calls check and convert: the handles, the step's requests, the plan
/// options and the `step` out-struct's size.
///
/// # Safety
/// Arrays of `n` entries; `plan_options` NULL or initialized; `step` NULL or a struct with
/// `struct_size` set.
unsafe fn step_args(
    scheduler: PackinferScheduler,
    context: PackinferContext,
    seq_ids: *const u64,
    num_new_tokens: *const u32,
    n: u32,
    plan_options: *const PackinferPlanOptions,
    step: *mut PackinferSchedulerStep,
) -> packinfer::Result<StepArgs> {
    CONTEXTS.get(context.bits)?;
    let state = SCHEDULERS.get(scheduler.bits)?;
    // SAFETY: both arrays have `n` entries (this function's contract).
    let requests = unsafe { zip_requests("seq_ids", seq_ids, "num_new_tokens", num_new_tokens, n)? };
    // SAFETY: non-null `plan_options` are initialized (this function's contract).
    let plan_options = unsafe { super::api::plan_options(plan_options)? };
    if !step.is_null() {
        // SAFETY: a non-null `step` has its struct_size set (this function's contract).
        unsafe { super::check_out("step", step)? };
    }
    Ok((state, requests, plan_options))
}

/// Writes what a step decided to `step` (NULL: nothing).
///
/// # Safety
/// `step` is NULL or a struct whose `struct_size` was checked.
unsafe fn write_step(step: *mut PackinferSchedulerStep, d: &StepDecision) -> packinfer::Result<()> {
    if !step.is_null() {
        let value = PackinferSchedulerStep {
            struct_size: std::mem::size_of::<PackinferSchedulerStep>(),
            capacity: d.capacity,
            capacity_factor: d.capacity_factor,
            regrouped: d.regrouped,
            relayout: d.report.pages_moved > 0,
            probe: d.probe,
            imbalance: d.imbalance,
            accumulated_imbalance: d.accumulated_imbalance,
            due_pages: d.due_pages,
            pages_moved: d.report.pages_moved,
            bytes_moved: d.report.bytes_moved,
            predicted_gain_seconds: d.predicted_gain_s,
            predicted_cost_seconds: d.predicted_cost_s,
            plan_seconds: d.plan_s,
            relayout_seconds: d.relayout_s,
        };
        // SAFETY: `step` was checked (this function's contract).
        unsafe { super::write_versioned("step", step, value)? };
    }
    Ok(())
}

/// Reports the measured times of the step the last `packinfer_scheduler_plan` (or `_update`)
/// planned (once per step). Negative or non-finite times are INVALID_ARGUMENT; a record without
/// a step before it is INVALID_ARGUMENT.
///
/// # Safety
/// `times` must point to a struct with `struct_size` set.
#[no_mangle]
pub unsafe extern "C" fn packinfer_scheduler_record(scheduler: PackinferScheduler, times: *const PackinferStepTimes) -> PackinferStatus {
    guard("packinfer_scheduler_record", || {
        let state = SCHEDULERS.get(scheduler.bits)?;
        // SAFETY: `times` has struct_size set (this function's contract).
        let t = unsafe { options("times", times)? };
        if !(t.relayout_seconds.is_finite() && t.relayout_seconds >= 0.0) {
            return Err(invalid!("times->relayout_seconds = {} must be finite and not negative (0: host timing)", t.relayout_seconds));
        }
        if !(t.attention_seconds.is_finite() && t.attention_seconds >= 0.0) {
            return Err(invalid!("times->attention_seconds = {} must be finite and not negative", t.attention_seconds));
        }
        let result = state.scheduler.lock().record(StepTimes { attention_s: t.attention_seconds, relayout_s: t.relayout_seconds });
        result
    })
}

/// The scheduler's totals.
///
/// # Safety
/// `stats` must point to a struct whose `struct_size` is set.
#[no_mangle]
pub unsafe extern "C" fn packinfer_scheduler_stats(scheduler: PackinferScheduler, stats: *mut PackinferSchedulerStats) -> PackinferStatus {
    guard("packinfer_scheduler_stats", || {
        // SAFETY: `stats` has struct_size set (this function's contract).
        unsafe { super::check_out("stats", stats)? };
        let s = SCHEDULERS.get(scheduler.bits)?.scheduler.lock().stats();
        let value = PackinferSchedulerStats {
            struct_size: std::mem::size_of::<PackinferSchedulerStats>(),
            steps: s.steps,
            regroups: s.regroups,
            relayouts: s.relayouts,
            probes: s.probes,
            relayouts_declined: s.relayouts_declined,
            bytes_moved: s.bytes_moved,
            plan_seconds: s.plan_s,
            relayout_seconds: s.relayout_s,
            attention_seconds: s.attention_s,
            predicted_cost_seconds: s.predicted_cost_s,
            predicted_gain_seconds: s.predicted_gain_s,
            measured_gain_seconds: s.measured_gain_s,
            gains_measured: s.gains_measured,
            contiguous_gain_decode: s.contiguous_gain[0],
            contiguous_gain_prefill: s.contiguous_gain[1],
            copy_bytes_per_second: s.copy_bytes_per_s,
            capacity_searches: s.capacity_searches,
            exploring_steps: s.exploring_steps,
            capacity_factor: s.capacity_factor,
            copy_seconds: s.copy_s,
        };
        // SAFETY: as above.
        unsafe { super::write_versioned("stats", stats, value) }
    })
}

super::versioned!(
    PackinferSchedulerOptions,
    default_options(),
    [flags, horizon_steps, capacity_factor, copy_bytes_per_second, contiguous_gain, explore_fraction]
);

super::versioned!(
    PackinferSchedulerStep,
    PackinferSchedulerStep { struct_size: std::mem::size_of::<PackinferSchedulerStep>(), ..Default::default() },
    [
        capacity,
        capacity_factor,
        regrouped,
        relayout,
        probe,
        imbalance,
        accumulated_imbalance,
        due_pages,
        pages_moved,
        bytes_moved,
        predicted_gain_seconds,
        predicted_cost_seconds,
        plan_seconds,
        relayout_seconds
    ]
);

super::versioned!(
    PackinferStepTimes,
    PackinferStepTimes { struct_size: std::mem::size_of::<PackinferStepTimes>(), attention_seconds: 0.0, relayout_seconds: 0.0 },
    [attention_seconds, relayout_seconds]
);

super::versioned!(
    PackinferSchedulerStats,
    PackinferSchedulerStats { struct_size: std::mem::size_of::<PackinferSchedulerStats>(), ..Default::default() },
    [
        steps,
        regroups,
        relayouts,
        probes,
        relayouts_declined,
        bytes_moved,
        plan_seconds,
        relayout_seconds,
        attention_seconds,
        predicted_cost_seconds,
        predicted_gain_seconds,
        measured_gain_seconds,
        gains_measured,
        contiguous_gain_decode,
        contiguous_gain_prefill,
        copy_bytes_per_second,
        capacity_searches,
        exploring_steps,
        capacity_factor,
        copy_seconds
    ]
);
