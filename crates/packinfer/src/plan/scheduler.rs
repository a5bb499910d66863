//! The scheduler an engine keeps for the life of its KV pool: each step it picks the capacity
//! (online tuning that re-opens when the step mix drifts), says whether the kept grouping has
//! drifted (the regroup trigger), and moves pages only where a cost model with measured inputs
//! predicts that contiguity pays within a horizon. The C API's scheduler handle and the replay
//! tool both drive this type; it is the one place the policy lives.
//!
//! Per step: [`Scheduler::step`] plans from the pool (once at the tuner's factor of the
//! automatic capacity, twice when a relayout moved pages), then the engine runs the plan and
//! reports what it measured with [`Scheduler::record`].
//!
//! The relayout cost model. Moving a group's pages costs `bytes / copy rate` (the rate measured
//! from the relayouts done so far, or given) and delays the step by as much. What it buys is a
//! fraction `g` of attention time on the following steps (contiguous reads, TMA boxes for
//! prompt chunks), measured per kind of step (decode only / with prefill chunks): the attention
//! time per unit of planned cost over the steps after a relayout against the steps before it.
//! `g` is per laid-out share of the step's KV. A relayout is done when `g_low × attention per
//! step × share laid out × horizon > predicted copy time`, with `g_low` the measured gain less
//! two standard errors, so noise does not buy copies. While `g` is unmeasured (or uncertain but
//! at least 2%), a relayout is a probe, at most one per horizon and only while probes have cost
//! at most `explore_fraction` of the attention time so far; with no measured gain the default is
//! not to move.

use std::time::Instant;

use super::adapt::{CapacityTuner, RegroupTrigger};
use super::{DeviceProfile, Plan, PlanOptions};
use crate::error::Result;
use crate::invalid;
use crate::kv::{groups_of_plan, KvPool, RelayoutReport, SeqId};

/// How the scheduler moves pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayoutPolicy {
    /// Never (the pool keeps pages where they fell).
    Never,
    /// Where the cost model predicts a net gain within the horizon (the default).
    CostModel,
    /// Whenever the trigger fired or a group outgrew its headroom (the behaviour before the
    /// cost model; for comparisons).
    Always,
}

/// What the scheduler adapts. The default adapts everything.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerOptions {
    /// Tune the capacity online (as a factor of each step's automatic capacity).
    pub tune_capacity: bool,
    /// Without tuning: the fixed factor of the automatic capacity (1 = automatic).
    pub capacity_factor: f64,
    /// Keep a grouping across steps and re-plan it when the regroup trigger fires (else every
    /// step's groups are new, and a relayout lays out the current plan's groups).
    pub regroup: bool,
    /// When to move pages.
    pub relayout: RelayoutPolicy,
    /// Steps a layout is expected to serve (the cost model's horizon).
    pub horizon_steps: u32,
    /// Copy rate for the cost model in bytes per second; 0: measured from the relayouts done.
    pub copy_bytes_per_s: f64,
    /// Fraction of attention time contiguity saves, if the engine measured it on its device;
    /// negative: measured online by probes.
    pub contiguous_gain: f64,
    /// Share of the attention time so far that probing relayouts (and re-opened capacity
    /// searches) may cost.
    pub explore_fraction: f64,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions {
            tune_capacity: true,
            capacity_factor: 1.0,
            regroup: true,
            relayout: RelayoutPolicy::CostModel,
            horizon_steps: 32,
            copy_bytes_per_s: 0.0,
            contiguous_gain: -1.0,
            explore_fraction: 0.01,
        }
    }
}

impl SchedulerOptions {
    /// Checks the values; the message names the bad one.
    pub fn validate(&self) -> Result<()> {
        if !(self.capacity_factor.is_finite() && self.capacity_factor > 0.0) {
            return Err(invalid!("capacity_factor = {} must be positive and finite", self.capacity_factor));
        }
        if self.horizon_steps == 0 {
            return Err(invalid!("horizon_steps = 0 must be at least 1"));
        }
        if !(self.copy_bytes_per_s.is_finite() && self.copy_bytes_per_s >= 0.0) {
            return Err(invalid!("copy_bytes_per_s = {} must be finite and not negative (0 = measured)", self.copy_bytes_per_s));
        }
        if !(self.contiguous_gain.is_finite() && self.contiguous_gain < 1.0) {
            return Err(invalid!("contiguous_gain = {} must be finite and below 1 (negative = measured)", self.contiguous_gain));
        }
        if !(self.explore_fraction.is_finite() && (0.0..=1.0).contains(&self.explore_fraction)) {
            return Err(invalid!("explore_fraction = {} must be between 0 and 1", self.explore_fraction));
        }
        Ok(())
    }
}

/// What [`Scheduler::step`] decided and did.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepDecision {
    /// Capacity the returned plan was made with (0: a plan without one).
    pub capacity: f64,
    /// Its ratio to the step's automatic capacity (what the tuner moves).
    pub capacity_factor: f64,
    /// The regroup trigger fired: the plan's groups are now the kept grouping.
    pub regrouped: bool,
    /// The trigger's imbalance of this step, in capacities.
    pub imbalance: f64,
    /// Its decayed sum since the last regroup, in capacities.
    pub accumulated_imbalance: f64,
    /// Pages a relayout was due to copy at most (0: nothing to lay out).
    pub due_pages: u64,
    /// A relayout ran.
    pub relayout: bool,
    /// It was a probe (the gain of contiguity not measured yet).
    pub probe: bool,
    /// What it did.
    pub report: RelayoutReport,
    /// The cost model's predicted attention time saved over the horizon by a relayout due
    /// this step (done or not), seconds.
    pub predicted_gain_s: f64,
    /// Its predicted copy time (NaN before a copy rate is known), seconds.
    pub predicted_cost_s: f64,
    /// Host time of the step's planning (every plan made), seconds.
    pub plan_s: f64,
    /// Host time of the relayout decision and call, seconds.
    pub relayout_s: f64,
}

/// What the engine measured for the step it ran.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepTimes {
    /// Attention time of the step (every layer's run).
    pub attention_s: f64,
    /// Device time of the relayout's copies when the engine timed them (events); 0 or less:
    /// the scheduler's own host timing is used (right for the CPU backend).
    pub relayout_s: f64,
}

/// Totals since the scheduler was created.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SchedulerStats {
    /// Steps recorded.
    pub steps: u64,
    /// Times the trigger fired (the first grouping included).
    pub regroups: u64,
    /// Relayouts that moved pages.
    pub relayouts: u64,
    /// Of those, probes.
    pub probes: u64,
    /// Bytes the relayouts moved.
    pub bytes_moved: u64,
    /// Relayouts that were due but the cost model declined.
    pub relayouts_declined: u64,
    /// Planning time, seconds (host).
    pub plan_s: f64,
    /// Relayout time, seconds (the engine's measurement, else host time): decisions (dry runs)
    /// and copies.
    pub relayout_s: f64,
    /// Of it, the time of the relayouts that moved pages: the measured copy cost.
    pub copy_s: f64,
    /// Attention time, seconds (the engine's measurement).
    pub attention_s: f64,
    /// Predicted copy time of the relayouts run, seconds.
    pub predicted_cost_s: f64,
    /// Their predicted attention time saved over the horizon, seconds.
    pub predicted_gain_s: f64,
    /// Their measured attention time saved: the per-step saving over the steps after each
    /// relayout against the rate before it, times the horizon, seconds.
    pub measured_gain_s: f64,
    /// Relayouts whose gain has been measured.
    pub gains_measured: u64,
    /// The measured gain fraction per kind of step (decode only, with prefill); NaN: unmeasured.
    pub contiguous_gain: [f64; 2],
    /// The copy rate the cost model uses, bytes per second (0: none measured yet).
    pub copy_bytes_per_s: f64,
    /// Capacity searches run, the first included.
    pub capacity_searches: u64,
    /// Steps spent measuring a candidate capacity.
    pub exploring_steps: u64,
    /// The capacity factor the tuner stands at.
    pub capacity_factor: f64,
}

/// A drifted mix re-opens the capacity search only while the steps spent measuring candidates,
/// the new search's included, stay at most this share of all steps.
const MAX_EXPLORING_SHARE: f64 = 0.2;

/// A measured mean gain of contiguity below this is not worth more probes.
const PROMISING_GAIN: f64 = 0.02;

/// Steps per window that measure the attention rate before and after a relayout.
const WINDOW: usize = 8;

/// Attention rates (seconds per unit of planned cost) of one kind of step.
#[derive(Debug, Clone, Default)]
struct Rates {
    /// Since the last relayout (the layout as it was), the latest `WINDOW`.
    before: Vec<f64>,
    /// After a relayout whose gain is being measured, and the rate before it.
    after: Vec<f64>,
    measuring: Option<Measuring>,
    /// Measured gain fractions, one per relayout.
    gains: Vec<f64>,
}

#[derive(Debug, Clone, Copy)]
struct Measuring {
    /// Share of the step's KV the relayout laid out: the gain is measured per share.
    share: f64,
    before_rate: f64,
    /// Saved seconds summed over the after-window.
    saved_s: f64,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

impl Rates {
    /// The gain fraction less two standard errors (None: fewer than three measurements).
    fn gain_low(&self) -> Option<f64> {
        let n = self.gains.len();
        if n < 3 {
            return None;
        }
        let mean = self.gains.iter().sum::<f64>() / n as f64;
        let var = self.gains.iter().map(|g| (g - mean) * (g - mean)).sum::<f64>() / (n - 1) as f64;
        Some(mean - 2.0 * (var / n as f64).sqrt())
    }
    fn gain_mean(&self) -> f64 {
        if self.gains.is_empty() {
            f64::NAN
        } else {
            self.gains.iter().sum::<f64>() / self.gains.len() as f64
        }
    }
}

/// The step mix the capacity was tuned for.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Mix {
    prefill_share: f64,
    batch: f64,
    mean_context: f64,
}

impl Mix {
    /// Whether `self` (a running average) has drifted from `tuned`: the prefill share by more
    /// than 0.2, batch size or mean context by more than 1.5×.
    fn drifted_from(&self, tuned: &Mix) -> bool {
        let ratio = |a: f64, b: f64| (a.max(1.0) / b.max(1.0)).ln().abs() > 1.5f64.ln();
        (self.prefill_share - tuned.prefill_share).abs() > 0.2
            || ratio(self.batch, tuned.batch)
            || ratio(self.mean_context, tuned.mean_context)
    }
}

/// What `step` leaves for `record`.
#[derive(Debug, Clone, Copy)]
struct Pending {
    cost: f64,
    kind: usize,
    factor: f64,
    tuned: bool,
    relayout: bool,
    probe: bool,
    host_relayout_s: f64,
    bytes: u64,
    /// Share of the step's KV the relayout laid out.
    share: f64,
    plan_s: f64,
}

/// The adaptive schedule of one KV pool. See the module documentation.
#[derive(Debug, Clone)]
pub struct Scheduler {
    options: SchedulerOptions,
    profile: DeviceProfile,
    trigger: RegroupTrigger,
    tuner: CapacityTuner,
    /// Sequence -> its group at the last regroup; empty before the first.
    kept_group: std::collections::HashMap<SeqId, usize>,
    kept_groups: usize,
    rates: [Rates; 2],
    mix: Option<Mix>,
    tuned_mix: Option<Mix>,
    /// Seconds of attention per step, a running average (for the horizon's gain).
    attention_per_step: [f64; 2],
    probe_cost_s: f64,
    /// Step of the last probe.
    last_probe: Option<u64>,
    pending: Option<Pending>,
    stats: SchedulerStats,
}

impl Scheduler {
    /// A scheduler for plans made with `profile`'s cost model (the pool's: [`KvPool::profile`]).
    pub fn new(options: SchedulerOptions, profile: DeviceProfile) -> Result<Self> {
        options.validate()?;
        let mut stats = SchedulerStats { contiguous_gain: [f64::NAN; 2], capacity_factor: 1.0, ..Default::default() };
        if options.tune_capacity {
            stats.capacity_searches = 1;
        }
        if options.copy_bytes_per_s > 0.0 {
            stats.copy_bytes_per_s = options.copy_bytes_per_s;
        }
        let mut rates: [Rates; 2] = Default::default();
        if options.contiguous_gain >= 0.0 {
            // Given by the engine: as certain as three agreeing measurements.
            for r in &mut rates {
                r.gains = vec![options.contiguous_gain; 3];
            }
        }
        Ok(Scheduler {
            trigger: RegroupTrigger::new(0.0),
            tuner: CapacityTuner::new(1.0),
            options,
            profile,
            kept_group: Default::default(),
            kept_groups: 0,
            rates,
            mix: None,
            tuned_mix: None,
            attention_per_step: [0.0; 2],
            probe_cost_s: 0.0,
            last_probe: None,
            pending: None,
            stats,
        })
    }

    /// The options it was created with.
    pub fn options(&self) -> &SchedulerOptions {
        &self.options
    }

    /// Totals so far.
    pub fn stats(&self) -> SchedulerStats {
        let mut s = self.stats;
        s.contiguous_gain = [self.rates[0].gain_mean(), self.rates[1].gain_mean()];
        s.capacity_factor = self.factor();
        s
    }

    fn factor(&self) -> f64 {
        if self.options.tune_capacity {
            self.tuner.capacity()
        } else {
            self.options.capacity_factor
        }
    }

    /// Plans one step of `requests` (sequence, new tokens, already appended) from `pool` with
    /// `options` (its capacity is the scheduler's to choose), runs the trigger and, where the
    /// cost model says so, a relayout on `stream`; returns the plan to run and what was decided.
    /// Call [`record`](Self::record) with the step's measured times before the next step.
    pub fn step(&mut self, pool: &KvPool, requests: &[(SeqId, u32)], options: PlanOptions, stream: u64) -> Result<(Plan, StepDecision)> {
        let mut plan = Plan::empty(pool.config().shape(), options.clone(), 0);
        let d = self.step_into(pool, requests, options, stream, &mut plan)?;
        Ok((plan, d))
    }

    /// [`step`](Self::step) into `plan` (a plan of an earlier step, or any plan), re-planned in
    /// its memory as [`KvPool::replan`] does: once it has held a step as large, planning
    /// allocates nothing. On error `plan` holds an empty batch.
    pub fn step_into(
        &mut self,
        pool: &KvPool,
        requests: &[(SeqId, u32)],
        options: PlanOptions,
        stream: u64,
        plan: &mut Plan,
    ) -> Result<StepDecision> {
        let started = Instant::now();
        let mut d = StepDecision::default();
        let options = PlanOptions { capacity: None, ..options };
        // One planning pass at the tuner's factor of the automatic capacity.
        let automatic = pool.replan_scaled(plan, requests.iter().copied(), None, options, self.factor())?;
        // A plan without capacity (every technique off) has nothing to tune.
        let factor = if automatic > 0.0 { self.factor() } else { 0.0 };
        d.capacity_factor = factor;
        d.plan_s = started.elapsed().as_secs_f64();
        let seq_ids: Vec<SeqId> = requests.iter().map(|r| r.0).collect();

        // The trigger, against the grouping kept since the last regroup.
        let groups = groups_of_plan(plan, &seq_ids)?;
        if self.options.regroup {
            // In automatic capacities (the step's cost over twice the workers), so the tuner's
            // factor does not change what counts as drift.
            self.trigger.set_capacity(automatic);
            let fired = self.trigger.observe(&self.kept_loads(plan, &seq_ids), &plan.group_costs);
            (d.imbalance, d.accumulated_imbalance) = (self.trigger.last_imbalance(), self.trigger.accumulated_imbalance());
            // The first step makes the first grouping.
            d.regrouped = fired || self.kept_groups == 0;
            if d.regrouped {
                self.trigger.reset();
                self.keep(&groups);
                self.stats.regroups += 1;
            }
        } else {
            // Every step's groups are new.
            d.regrouped = true;
        }

        let kind = kind_of(plan);
        let mut share = 0.0;
        if self.options.relayout != RelayoutPolicy::Never && !groups.is_empty() {
            let t = Instant::now();
            d.due_pages = pool.relayout_estimate(&groups, d.regrouped)?;
            if d.due_pages > 0 {
                let bytes = d.due_pages * pool.config().page_bytes_all_layers();
                let step_bytes = plan.requests.iter().map(|r| r.kv_len as u64).sum::<u64>() * pool.config().token_bytes_all_layers();
                // Contiguity speeds up the share of the step's KV it lays out.
                share = if step_bytes > 0 { (bytes as f64 / step_bytes as f64).min(1.0) } else { 0.0 };
                let (go, probe) = self.decide(kind, bytes, share, &mut d);
                if go {
                    d.report = pool.relayout(&groups, d.regrouped, stream)?;
                    d.relayout = true;
                    d.probe = probe;
                    if d.predicted_cost_s.is_finite() {
                        self.stats.predicted_cost_s += d.predicted_cost_s;
                    }
                    self.stats.predicted_gain_s += d.predicted_gain_s;
                } else {
                    self.stats.relayouts_declined += 1;
                }
            }
            d.relayout_s = t.elapsed().as_secs_f64();
            if d.report.pages_moved > 0 {
                // The plan holds page numbers; the relayout changed them.
                let t = Instant::now();
                let options = plan.options.clone();
                pool.replan(plan, requests.iter().copied(), None, options)?;
                d.plan_s += t.elapsed().as_secs_f64();
            }
        }
        d.capacity = plan.stats.capacity;
        let cost: f64 = plan.group_costs.iter().sum();
        self.observe_mix(plan);
        self.pending = Some(Pending {
            cost,
            kind,
            factor,
            tuned: self.options.tune_capacity && automatic > 0.0,
            relayout: d.report.pages_moved > 0,
            probe: d.probe,
            host_relayout_s: d.relayout_s,
            bytes: d.report.bytes_moved,
            share,
            plan_s: d.plan_s,
        });
        Ok(d)
    }

    /// The cost model: whether to move `bytes` now, and whether that is a probe.
    fn decide(&mut self, kind: usize, bytes: u64, share: f64, d: &mut StepDecision) -> (bool, bool) {
        let rate = if self.options.copy_bytes_per_s > 0.0 { self.options.copy_bytes_per_s } else { self.stats.copy_bytes_per_s };
        d.predicted_cost_s = if rate > 0.0 { bytes as f64 / rate } else { f64::NAN };
        // Attention time the laid-out share of the KV takes over the horizon.
        let at_stake = self.attention_per_step[kind] * share * self.options.horizon_steps as f64;
        let r = &self.rates[kind];
        match self.options.relayout {
            RelayoutPolicy::Never => return (false, false),
            RelayoutPolicy::Always => {
                d.predicted_gain_s = r.gain_mean().max(0.0) * at_stake;
                return (true, false);
            }
            RelayoutPolicy::CostModel => {}
        }
        if let Some(low) = r.gain_low() {
            d.predicted_gain_s = r.gain_mean() * at_stake;
            // Net gain predicted with the pessimistic gain, against the copy.
            if rate > 0.0 && low * at_stake > d.predicted_cost_s {
                return (true, false);
            }
            if r.gain_mean() < PROMISING_GAIN || self.options.contiguous_gain >= 0.0 {
                return (false, false);
            }
            // A gain measured, worth having but not yet certain: more probes, within the budget.
        }
        // Unmeasured: a probe, when one measures something (enough steps before it, no other
        // measurement running), at most one per horizon, and probes so far stay within the
        // exploration budget.
        let spaced = self.last_probe.is_none_or(|at| self.stats.steps >= at + self.options.horizon_steps as u64);
        let ready = r.before.len() >= WINDOW / 2 && r.measuring.is_none() && spaced;
        let cost = if d.predicted_cost_s.is_finite() { d.predicted_cost_s } else { 0.0 };
        let budget = self.options.explore_fraction * self.stats.attention_s;
        let first = self.stats.probes == 0 && self.stats.attention_s > 0.0;
        let go = ready && (first || self.probe_cost_s + cost <= budget);
        if go {
            self.last_probe = Some(self.stats.steps);
        }
        (go, go)
    }

    /// Reports the step's measured times (after running the plan [`step`](Self::step) returned).
    pub fn record(&mut self, times: StepTimes) -> Result<()> {
        let Some(p) = self.pending.take() else {
            return Err(invalid!("record without a step: call step first, then record once with its times"));
        };
        if !(times.attention_s.is_finite() && times.attention_s >= 0.0) {
            self.pending = Some(p);
            return Err(invalid!("attention_s = {} must be finite and not negative", times.attention_s));
        }
        if !times.relayout_s.is_finite() {
            self.pending = Some(p);
            return Err(invalid!("relayout_s = {} must be finite (0 or less: the scheduler's host timing)", times.relayout_s));
        }
        let relayout_s = if times.relayout_s > 0.0 { times.relayout_s } else { p.host_relayout_s };
        let s = &mut self.stats;
        s.steps += 1;
        s.plan_s += p.plan_s;
        s.relayout_s += relayout_s;
        s.attention_s += times.attention_s;
        if p.relayout {
            s.relayouts += 1;
            s.copy_s += relayout_s;
            s.bytes_moved += p.bytes;
            if p.probe {
                s.probes += 1;
                self.probe_cost_s += relayout_s;
            }
            if relayout_s > 0.0 && p.bytes > 0 {
                let measured = p.bytes as f64 / relayout_s;
                s.copy_bytes_per_s = if s.copy_bytes_per_s > 0.0 { 0.7 * s.copy_bytes_per_s + 0.3 * measured } else { measured };
            }
        }
        let a = &mut self.attention_per_step[p.kind];
        *a = if *a > 0.0 { 0.9 * *a + 0.1 * times.attention_s } else { times.attention_s };

        // Gain measurement: the rate after a relayout against the rate before it.
        if p.cost > 0.0 {
            let rate = times.attention_s / p.cost;
            if p.relayout {
                for r in &mut self.rates {
                    if let Some(m) = r.measuring.take() {
                        // Cut short by another relayout: what was measured so far counts.
                        Self::finish(r, m, &mut self.stats, self.options.horizon_steps);
                    }
                    r.after.clear();
                }
                for r in &mut self.rates {
                    if r.before.len() >= WINDOW / 2 {
                        r.measuring = Some(Measuring { share: p.share, before_rate: median(&r.before), saved_s: 0.0 });
                    }
                    r.before.clear();
                }
                // The relayout step itself carries the copy: its rate is not the layout's.
            } else {
                let r = &mut self.rates[p.kind];
                if let Some(m) = &mut r.measuring {
                    m.saved_s += m.before_rate * p.cost - times.attention_s;
                    r.after.push(rate);
                    if r.after.len() >= WINDOW {
                        let m = r.measuring.take().expect("measuring");
                        Self::finish(r, m, &mut self.stats, self.options.horizon_steps);
                    }
                }
                r.before.push(rate);
                if r.before.len() > WINDOW {
                    r.before.remove(0);
                }
            }
        }

        // The capacity tuner, scored on attention and planning per unit of cost; re-opened
        // when the mix drifted from the one it was tuned for, within the exploration budget.
        if p.tuned && p.cost > 0.0 {
            if self.tuner.exploring() {
                self.stats.exploring_steps += 1;
                self.tuner.record(p.factor, (times.attention_s + p.plan_s) / p.cost);
                if self.tuner.converged() {
                    self.tuned_mix = self.mix;
                }
            } else if let (Some(mix), Some(tuned)) = (self.mix, self.tuned_mix) {
                // Within budget even once the new search has run its course.
                let explored = (self.stats.exploring_steps + self.tuner.reopen_steps() as u64) as f64;
                if mix.drifted_from(&tuned) && explored <= MAX_EXPLORING_SHARE * self.stats.steps as f64 {
                    self.tuner.reopen();
                    self.stats.capacity_searches += 1;
                    self.tuned_mix = None;
                }
            }
        }
        Ok(())
    }

    fn finish(r: &mut Rates, m: Measuring, stats: &mut SchedulerStats, horizon: u32) {
        if r.after.len() >= WINDOW / 2 {
            // The whole step's gain over the share laid out: the gain on laid-out KV.
            let gain = ((1.0 - median(&r.after) / m.before_rate) / m.share.max(0.05)).clamp(-1.0, 1.0);
            r.gains.push(gain);
            stats.measured_gain_s += m.saved_s / r.after.len() as f64 * horizon as f64;
            stats.gains_measured += 1;
        }
        r.after.clear();
    }

    /// Loads of the groups the step runs in if the kept grouping is kept: each kept group with
    /// members in the step (each chunk's cost charged to its request's group), and for requests
    /// no kept group holds (admitted since the last regroup), the groups the fresh plan gives
    /// them. Kept groups whose members all left are gone, not empty.
    fn kept_loads(&self, plan: &Plan, seq_ids: &[SeqId]) -> Vec<f64> {
        let mut loads = vec![0.0; self.kept_groups + plan.group_costs.len()];
        // Every KV head's copy: each runs in a group of its own.
        for copy in plan.item_copies() {
            let item = &plan.items[copy.item as usize];
            for c in &plan.kv_chunks[item.chunk_begin as usize..(item.chunk_begin + item.chunk_count) as usize] {
                let g = self.kept_group.get(&seq_ids[c.request as usize]).copied().unwrap_or(self.kept_groups + copy.group as usize);
                loads[g] += self.profile.chunk_cost(c);
            }
        }
        loads.retain(|&l| l > 0.0);
        loads
    }

    fn keep(&mut self, groups: &[Vec<SeqId>]) {
        self.kept_group = groups.iter().enumerate().flat_map(|(g, members)| members.iter().map(move |&id| (id, g))).collect();
        self.kept_groups = groups.len();
    }

    fn observe_mix(&mut self, plan: &Plan) {
        let n = plan.requests.len().max(1) as f64;
        let q: f64 = plan.requests.iter().map(|r| r.q_len as f64).sum();
        let prefill: f64 = plan.requests.iter().filter(|r| r.q_len > 1).map(|r| r.q_len as f64).sum();
        let now = Mix {
            prefill_share: if q > 0.0 { prefill / q } else { 0.0 },
            batch: n,
            mean_context: plan.requests.iter().map(|r| r.kv_len as f64).sum::<f64>() / n,
        };
        self.mix = Some(match self.mix {
            None => now,
            Some(m) => Mix {
                prefill_share: 0.9 * m.prefill_share + 0.1 * now.prefill_share,
                batch: 0.9 * m.batch + 0.1 * now.batch,
                mean_context: 0.9 * m.mean_context + 0.1 * now.mean_context,
            },
        });
    }
}

/// 0: a step of decodes only; 1: a step with prefill chunks (other kernels, other gains).
fn kind_of(plan: &Plan) -> usize {
    plan.requests.iter().any(|r| r.q_len > 1) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::kv::PoolConfig;
    use crate::plan::automatic_capacity;
    use crate::types::{DType, Shape};
    use std::sync::Arc;

    fn pool() -> KvPool {
        pool_with_headroom(1)
    }

    fn pool_with_headroom(headroom_pages: u32) -> KvPool {
        let shape =
            Shape { num_qo_heads: 4, num_kv_heads: 2, head_dim: 8, dtype: DType::F32, kv_dtype: DType::F32, causal: true, sm_scale: 0.0 };
        let config = PoolConfig { num_layers: 1, shape, page_size: 4, num_pages: 16384, headroom_pages };
        KvPool::new(Arc::new(CpuBackend::new(1)), config).unwrap()
    }

    /// `n` sequences whose pages interleave (3 rounds of `tokens` each).
    fn scattered(pool: &KvPool, n: usize, tokens: u32) -> Vec<SeqId> {
        let seqs: Vec<SeqId> = (0..n).map(|_| pool.create_sequence()).collect();
        for _ in 0..3 {
            for &s in &seqs {
                pool.append(s, tokens, 0).unwrap();
            }
        }
        seqs
    }

    /// Runs `steps` decode steps; the "measured" attention time per unit of planned cost is
    /// `rate(steps since the last relayout that moved pages, capacity factor)`.
    fn serve(s: &mut Scheduler, pool: &KvPool, seqs: &[SeqId], steps: usize, rate: impl Fn(usize, f64) -> f64) -> Vec<StepDecision> {
        let mut out = Vec::new();
        let mut since = usize::MAX / 2;
        for _ in 0..steps {
            for &q in seqs {
                pool.append(q, 1, 0).unwrap();
            }
            let reqs: Vec<(SeqId, u32)> = seqs.iter().map(|&q| (q, 1)).collect();
            let (plan, d) = s.step(pool, &reqs, PlanOptions::default(), 0).unwrap();
            since = if d.report.pages_moved > 0 { 0 } else { since + 1 };
            let cost: f64 = plan.group_costs.iter().sum();
            s.record(StepTimes { attention_s: cost * rate(since, d.capacity_factor), relayout_s: 0.0 }).unwrap();
            out.push(d);
        }
        out
    }

    #[test]
    fn a_measured_gain_buys_relayouts_and_none_buys_none() {
        let options = SchedulerOptions { regroup: false, tune_capacity: false, copy_bytes_per_s: 1e9, ..Default::default() };
        // Scattered pages cost 40% more attention than a layout, which lasts 8 steps.
        let p = pool_with_headroom(8);
        let seqs = scattered(&p, 8, 5);
        let mut s = Scheduler::new(options.clone(), p.profile()).unwrap();
        serve(&mut s, &p, &seqs, 300, |since, _| 1e-6 * if since <= 8 { 1.0 } else { 1.4 });
        let st = s.stats();
        assert!(st.probes >= 1 && st.gains_measured >= 3, "{st:?}");
        assert!(st.contiguous_gain[0] > 0.15 && st.contiguous_gain[0] <= 1.0, "measured gain {:?}", st.contiguous_gain);
        assert!(st.relayouts > st.probes, "once measured, the cost model moves pages: {st:?}");
        assert!(st.measured_gain_s > 0.0 && st.predicted_gain_s > 0.0);

        // Contiguity buys nothing: after the probes measured that, nothing moves.
        let p = pool();
        let seqs = scattered(&p, 8, 5);
        let mut s = Scheduler::new(options, p.profile()).unwrap();
        let steps = serve(&mut s, &p, &seqs, 200, |_, _| 1e-6);
        let st = s.stats();
        assert_eq!(st.relayouts, st.probes, "{st:?}");
        assert!(st.probes <= 3, "no measured gain, no more probes: {st:?}");
        assert!(st.relayouts_declined > 100, "{st:?}");
        assert!(steps[150..].iter().all(|d| !d.relayout));
    }

    #[test]
    fn the_tuner_reopens_when_the_step_mix_drifts() {
        let options = SchedulerOptions { regroup: false, relayout: RelayoutPolicy::Never, ..Default::default() };
        let p = pool();
        let seqs = scattered(&p, 6, 100);
        let mut s = Scheduler::new(options, p.profile()).unwrap();
        let curve = |_: usize, f: f64| 1e-6 * (1.0 + (f / 1.5).ln().powi(2));
        serve(&mut s, &p, &seqs, 120, curve);
        let st = s.stats();
        assert_eq!(st.capacity_searches, 1);
        assert!((st.capacity_factor / 1.5).ln().abs() < 0.2, "{st:?}");
        let explored = st.exploring_steps;
        // Steady decodes: no drift, no new search.
        serve(&mut s, &p, &seqs, 60, curve);
        assert_eq!(s.stats().capacity_searches, 1);
        // The batch grows 4x: the search re-opens, and ends within a bounded number of steps.
        let more: Vec<SeqId> = seqs.iter().copied().chain(scattered(&p, 18, 100)).collect();
        serve(&mut s, &p, &more, 200, curve);
        let st = s.stats();
        assert_eq!(st.capacity_searches, 2, "{st:?}");
        assert!(st.exploring_steps - explored <= 3 * 9, "{st:?}");
        assert!((st.exploring_steps as f64) <= MAX_EXPLORING_SHARE * st.steps as f64, "{st:?}");
    }

    #[test]
    fn each_step_plans_once_as_the_pool_would_at_the_reported_capacity() {
        // Every kind of factor: tuned (the search moves it), fixed above and below 1, and 1.
        // (No relayouts: the twin below plans from the same pages.)
        let never = SchedulerOptions { relayout: RelayoutPolicy::Never, ..Default::default() };
        for options in [
            never.clone(),
            SchedulerOptions { tune_capacity: false, capacity_factor: 2.5, ..never.clone() },
            SchedulerOptions { tune_capacity: false, capacity_factor: 0.3, ..never.clone() },
            SchedulerOptions { tune_capacity: false, capacity_factor: 1.0, ..never.clone() },
        ] {
            let p = pool();
            let seqs = scattered(&p, 6, 40);
            let mut s = Scheduler::new(options.clone(), p.profile()).unwrap();
            let mut kept = Plan::empty(p.config().shape(), PlanOptions::default(), 0);
            let mut factors = Vec::new();
            for step in 0..24 {
                for (i, &q) in seqs.iter().enumerate() {
                    p.append(q, 1 + (i + step) as u32 % 3, 0).unwrap();
                }
                let reqs: Vec<(SeqId, u32)> = seqs.iter().enumerate().map(|(i, &q)| (q, 1 + (i + step) as u32 % 3)).collect();
                // step and step_into decide alike from the same state.
                let mut twin = s.clone();
                let (plan, d) = s.step(&p, &reqs, PlanOptions::default(), 0).unwrap();
                let d_into = twin.step_into(&p, &reqs, PlanOptions::default(), 0, &mut kept).unwrap();
                assert_eq!(d, StepDecision { plan_s: d.plan_s, relayout_s: d.relayout_s, ..d_into });
                let automatic = automatic_capacity(&plan.shape, &plan.batch, &p.profile(), &PlanOptions::default()).unwrap();
                assert_eq!(d.capacity, automatic * d.capacity_factor, "{options:?}");
                let expected = p.plan(&reqs, None, PlanOptions { capacity: Some(d.capacity), ..Default::default() }).unwrap();
                for got in [&plan, &kept] {
                    assert_eq!(got.items, expected.items);
                    assert_eq!(got.kv_chunks, expected.kv_chunks);
                    assert_eq!(got.row_segments, expected.row_segments);
                    assert_eq!(got.merges, expected.merges);
                    assert_eq!(got.group_costs, expected.group_costs);
                    assert_eq!(got.stats().capacity, d.capacity);
                }
                s.record(StepTimes { attention_s: 1e-6 * (1.0 + d.capacity_factor), relayout_s: 0.0 }).unwrap();
                factors.push(d.capacity_factor);
            }
            if options.tune_capacity {
                assert!(factors.iter().any(|&f| f != 1.0), "the search tried other factors: {factors:?}");
            } else {
                assert!(factors.iter().all(|&f| f == options.capacity_factor));
            }
        }
    }

    #[test]
    fn steady_decodes_keep_their_grouping() {
        let p = pool();
        let seqs = scattered(&p, 12, 5);
        let mut s = Scheduler::new(SchedulerOptions::default(), p.profile()).unwrap();
        let steps = serve(&mut s, &p, &seqs, 100, |_, _| 1e-6);
        let fired = steps.iter().filter(|d| d.regrouped).count();
        assert!(steps[0].regrouped, "the first step makes the first grouping");
        assert!(fired <= 10, "fired on {fired} of 100 steps");
    }

    #[test]
    fn record_needs_a_step_and_options_are_checked() {
        let p = pool();
        let mut s = Scheduler::new(SchedulerOptions::default(), p.profile()).unwrap();
        assert!(s.record(StepTimes::default()).is_err());
        for bad in [
            SchedulerOptions { capacity_factor: 0.0, ..Default::default() },
            SchedulerOptions { horizon_steps: 0, ..Default::default() },
            SchedulerOptions { copy_bytes_per_s: -1.0, ..Default::default() },
            SchedulerOptions { contiguous_gain: 1.0, ..Default::default() },
            SchedulerOptions { explore_fraction: 2.0, ..Default::default() },
        ] {
            assert!(Scheduler::new(bad.clone(), p.profile()).is_err(), "{bad:?}");
        }
    }
}
