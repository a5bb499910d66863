//! Adapting the schedule across decode steps (used by the managed level and the replay tool):
//! when to regroup, and which capacity to group with.

/// Decides when a grouping kept across decode steps has drifted too far out of balance.
///
/// Spread of a set of group loads = max − min (cost units; all groups counted, an empty one as
/// 0). Imbalance of one step = how much wider the kept grouping's spread is under the step's
/// work than the spread of the groups the planner would form now, or 0: the planner makes every
/// unit its own group (a piece, a prefix group or a request's run, up to the capacity), so its
/// own groups differ by up to a capacity by design, and only what the kept grouping adds to
/// that is drift (members that grew, new requests no kept group holds). Accumulated imbalance =
/// the sum of the per-step imbalances since the last regroup (`new` or `reset`). The grouping is
/// kept while the accumulated imbalance is below C/2 and re-planned once it reaches C/2: the
/// time lost to waiting on the busiest group since the last regroup has then grown to half of
/// what one group is meant to hold, which is more than a re-layout costs.
///
/// (Against the planner's own spread, not against 0: when the planner balanced groups into
/// equal bins the two were the same; with one group per unit, measured against 0 the trigger
/// fired on nearly every replay step: docs/performance-log.md#regroup-trigger.)
#[derive(Debug, Clone, PartialEq)]
pub struct RegroupTrigger {
    capacity: f64,
    accumulated: f64,
    steps: u64,
}

fn spread(loads: &[f64]) -> f64 {
    if loads.is_empty() {
        return 0.0;
    }
    let max = loads.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let min = loads.iter().cloned().fold(f64::INFINITY, f64::min);
    max - min
}

impl RegroupTrigger {
    /// A trigger for groups of capacity `capacity` (the plan's `stats.capacity`), nothing
    /// accumulated.
    pub fn new(capacity: f64) -> Self {
        RegroupTrigger { capacity, accumulated: 0.0, steps: 0 }
    }

    /// Adds one step: the kept grouping's loads under the step's work, and the loads of the
    /// groups planned for it now (`Plan::group_costs`). True means re-plan now (and then call
    /// [`reset`](Self::reset)).
    pub fn observe(&mut self, kept_loads: &[f64], planned_loads: &[f64]) -> bool {
        self.accumulated += (spread(kept_loads) - spread(planned_loads)).max(0.0);
        self.steps += 1;
        self.should_regroup()
    }

    /// Whether the accumulated imbalance has reached C/2.
    pub fn should_regroup(&self) -> bool {
        self.accumulated >= self.capacity / 2.0
    }

    /// Starts counting again after a regroup.
    pub fn reset(&mut self) {
        self.accumulated = 0.0;
        self.steps = 0;
    }

    /// The capacity changed (the tuner moved it): the threshold follows.
    pub fn set_capacity(&mut self, capacity: f64) {
        self.capacity = capacity;
    }

    /// The imbalance accumulated since the last regroup, in cost units.
    pub fn accumulated_imbalance(&self) -> f64 {
        self.accumulated
    }
    /// Steps observed since the last regroup.
    pub fn steps_since_regroup(&self) -> u64 {
        self.steps
    }
}

/// Golden-section search for the capacity with the shortest step time, over log C in
/// `[initial / SPAN, initial · SPAN]` (the step time is convex in C near its best: too small
/// splits and merges too much, too large balances too coarsely). Each candidate is measured
/// `samples_per_point` times and scored by its median; the search stops when the bracket is
/// narrower than 5% or after `MAX_POINTS` candidates, then stays on the best measured capacity
/// (docs/performance-log.md#capacity-tuner).
///
/// Feed it comparable times: when batches change between steps, pass the step time divided by
/// the step's total cost, not the raw time.
#[derive(Debug, Clone)]
pub struct CapacityTuner {
    /// Bracket [lo, hi] and interior points x1 < x2, all in ln(capacity).
    lo: f64,
    hi: f64,
    x1: f64,
    x2: f64,
    f1: Option<f64>,
    f2: Option<f64>,
    samples: Vec<f64>,
    samples_per_point: usize,
    points: usize,
    best: (f64, f64),
    done: bool,
}

const SPAN: f64 = 4.0;
const MAX_POINTS: usize = 16;
const INV_PHI: f64 = 0.618_033_988_749_895;

impl CapacityTuner {
    /// Starts around the calibrated `initial` capacity (must be positive), 3 samples per point.
    pub fn new(initial: f64) -> Self {
        Self::with_samples(initial, 3)
    }

    /// Like [`new`](Self::new), measuring each candidate `samples_per_point` times.
    pub fn with_samples(initial: f64, samples_per_point: usize) -> Self {
        let c = initial.max(f64::MIN_POSITIVE).ln();
        let (lo, hi) = (c - SPAN.ln(), c + SPAN.ln());
        CapacityTuner {
            lo,
            hi,
            x1: hi - INV_PHI * (hi - lo),
            x2: lo + INV_PHI * (hi - lo),
            f1: None,
            f2: None,
            samples: Vec::new(),
            samples_per_point: samples_per_point.max(1),
            points: 0,
            best: (c, f64::INFINITY),
            done: false,
        }
    }

    /// The capacity to plan the next step with.
    pub fn capacity(&self) -> f64 {
        self.pending().unwrap_or(self.best.0).exp()
    }

    /// Whether the search has finished.
    pub fn converged(&self) -> bool {
        self.done
    }

    /// The best capacity measured so far and its score.
    pub fn best(&self) -> (f64, f64) {
        (self.best.0.exp(), self.best.1)
    }

    /// Records a step planned with `capacity` that took `step_seconds`. Steps planned with
    /// another capacity than the one being measured are ignored.
    pub fn record(&mut self, capacity: f64, step_seconds: f64) {
        let Some(x) = self.pending() else { return };
        if !(capacity > 0.0 && step_seconds.is_finite()) || (capacity.ln() - x).abs() > 1e-9 {
            return;
        }
        self.samples.push(step_seconds);
        if self.samples.len() < self.samples_per_point {
            return;
        }
        self.samples.sort_by(f64::total_cmp);
        let score = self.samples[self.samples.len() / 2];
        self.samples.clear();
        self.points += 1;
        if score < self.best.1 {
            self.best = (x, score);
        }
        if self.f1.is_none() {
            self.f1 = Some(score);
        } else {
            self.f2 = Some(score);
        }
        if let (Some(f1), Some(f2)) = (self.f1, self.f2) {
            if f1 <= f2 {
                self.hi = self.x2;
                self.x2 = self.x1;
                self.f2 = Some(f1);
                self.x1 = self.hi - INV_PHI * (self.hi - self.lo);
                self.f1 = None;
            } else {
                self.lo = self.x1;
                self.x1 = self.x2;
                self.f1 = Some(f2);
                self.x2 = self.lo + INV_PHI * (self.hi - self.lo);
                self.f2 = None;
            }
        }
        if self.hi - self.lo < 1.05f64.ln() || self.points >= MAX_POINTS {
            self.done = true;
        }
    }

    /// The point (ln C) waiting for measurements, if the search is still running.
    fn pending(&self) -> Option<f64> {
        if self.done {
            None
        } else if self.f1.is_none() {
            Some(self.x1)
        } else {
            Some(self.x2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_fires_when_accumulated_imbalance_reaches_half_capacity() {
        let mut t = RegroupTrigger::new(100.0);
        assert!(!t.observe(&[10.0, 30.0, 20.0], &[])); // 20
        assert!(!t.observe(&[10.0, 30.0], &[])); // 40
        assert!(!t.observe(&[5.0, 5.0], &[])); // 40
        assert!(t.observe(&[0.0, 10.0], &[])); // 50 = C/2
        assert_eq!(t.accumulated_imbalance(), 50.0);
        assert_eq!(t.steps_since_regroup(), 4);
        t.reset();
        assert!(!t.should_regroup());
        assert!(!t.observe(&[], &[]));
        t.set_capacity(10.0);
        assert!(t.observe(&[0.0, 5.0], &[]));
    }

    #[test]
    fn only_spread_beyond_the_planners_own_counts() {
        let mut t = RegroupTrigger::new(100.0);
        // The planner's groups differ by 40 by design: a kept grouping as wide is no drift.
        for _ in 0..10 {
            assert!(!t.observe(&[50.0, 10.0, 30.0], &[45.0, 5.0]));
        }
        assert_eq!(t.accumulated_imbalance(), 0.0);
        // Narrower than the planner's: still none (never negative).
        assert!(!t.observe(&[20.0, 20.0], &[45.0, 5.0]));
        // New requests pile up in the unplaced group: 25 wider per step, fires on the second.
        assert!(!t.observe(&[50.0, 10.0, 75.0], &[45.0, 5.0]));
        assert!(t.observe(&[50.0, 10.0, 75.0], &[45.0, 5.0]));
        assert_eq!(t.accumulated_imbalance(), 50.0);
    }

    /// A convex step-time curve with its minimum at `best` (in log space, like the paper's).
    fn step_time(c: f64, best: f64) -> f64 {
        let x = (c / best).ln();
        1.0 + x * x
    }

    #[test]
    fn tuner_finds_the_minimum_of_a_convex_curve_in_bounded_steps() {
        for &(initial, best) in &[(2048.0, 2048.0), (2048.0, 700.0), (1000.0, 3500.0), (5e6, 1.2e7)] {
            let mut t = CapacityTuner::new(initial);
            let mut steps = 0;
            while !t.converged() {
                let c = t.capacity();
                t.record(c, step_time(c, best));
                steps += 1;
                assert!(steps <= 3 * MAX_POINTS, "no convergence for initial {initial}, best {best}");
            }
            let found = t.capacity();
            assert!((found / best).ln().abs() < 0.06, "initial {initial}: found {found}, best {best}");
            assert!(steps <= 3 * 12, "{steps} steps");
        }
    }

    #[test]
    fn tuner_stays_in_its_bracket_and_ignores_other_capacities() {
        let mut t = CapacityTuner::with_samples(1000.0, 1);
        t.record(123.0, 0.0); // not the pending capacity: ignored
        assert!(!t.converged());
        while !t.converged() {
            let c = t.capacity();
            assert!((250.0..=4000.0).contains(&c));
            t.record(c, step_time(c, 1e9)); // best far outside: ends at the top of the bracket
        }
        assert!(t.capacity() > 3500.0 && t.capacity() <= 4000.0, "{}", t.capacity());
    }
}
