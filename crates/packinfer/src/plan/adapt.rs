//! Adapting the schedule across decode steps (used by the managed level and the replay tool):
//! when to regroup, and which capacity to group with.

/// Decides when a grouping kept across decode steps has drifted too far out of balance.
///
/// Spread of a set of group loads = max − min (cost units; all groups counted, an empty one as
/// 0). Imbalance of one step = how much wider the kept grouping's spread is under the step's
/// work than the spread of the groups the planner would form now, or 0, in units of the
/// capacity C: the planner makes every unit its own group (a piece, a prefix group or a
/// request's run, up to the capacity), so its own groups differ by up to a capacity by design,
/// and only what the kept grouping adds to that is drift (members that grew, new requests no
/// kept group holds). Accumulated imbalance = the per-step imbalances summed with decay
/// (`a ← decay · a + imbalance`), so a burst that the next steps do not confirm fades instead of
/// adding up forever; the grouping is kept while it is below the threshold (in capacities) and
/// re-planned once it reaches it.
///
/// Calibrated on the step sequences of the code trace and the synthetic trace
/// (docs/performance-log.md#regroup-trigger): the plain sum against C/2 fired on 987 of 1066
/// steps of the code trace; [`DECAY`](Self::DECAY) and [`THRESHOLD`](Self::THRESHOLD) fire
/// when the added spread has stayed above a quarter of a capacity for about ten steps.
#[derive(Debug, Clone, PartialEq)]
pub struct RegroupTrigger {
    capacity: f64,
    decay: f64,
    threshold: f64,
    accumulated: f64,
    last: f64,
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
    /// How much of the accumulated imbalance a step keeps.
    pub const DECAY: f64 = 0.85;
    /// Accumulated imbalance, in capacities, at which the trigger fires.
    pub const THRESHOLD: f64 = 1.5;

    /// A trigger for groups of capacity `capacity` (the plan's `stats.capacity`), nothing
    /// accumulated, with the calibrated decay and threshold.
    pub fn new(capacity: f64) -> Self {
        Self::with_params(capacity, Self::DECAY, Self::THRESHOLD)
    }

    /// A trigger with another `decay` (0..=1; 1 sums without decay) and `threshold` (capacities).
    pub fn with_params(capacity: f64, decay: f64, threshold: f64) -> Self {
        RegroupTrigger { capacity, decay: decay.clamp(0.0, 1.0), threshold, accumulated: 0.0, last: 0.0, steps: 0 }
    }

    /// Adds one step: the kept grouping's loads under the step's work, and the loads of the
    /// groups planned for it now (`Plan::group_costs`). True means re-plan now (and then call
    /// [`reset`](Self::reset)).
    pub fn observe(&mut self, kept_loads: &[f64], planned_loads: &[f64]) -> bool {
        let added = (spread(kept_loads) - spread(planned_loads)).max(0.0);
        self.last = if self.capacity > 0.0 { added / self.capacity } else { 0.0 };
        self.accumulated = self.accumulated * self.decay + self.last;
        self.steps += 1;
        self.should_regroup()
    }

    /// Whether the accumulated imbalance has reached the threshold.
    pub fn should_regroup(&self) -> bool {
        self.capacity > 0.0 && self.accumulated >= self.threshold
    }

    /// Starts counting again after a regroup.
    pub fn reset(&mut self) {
        self.accumulated = 0.0;
        self.steps = 0;
    }

    /// The capacity changed (the tuner moved it, or the batch did): imbalances are measured in it.
    pub fn set_capacity(&mut self, capacity: f64) {
        self.capacity = capacity;
    }

    /// The decayed imbalance accumulated since the last regroup, in capacities.
    pub fn accumulated_imbalance(&self) -> f64 {
        self.accumulated
    }
    /// The last step's imbalance, in capacities.
    pub fn last_imbalance(&self) -> f64 {
        self.last
    }
    /// Steps observed since the last regroup.
    pub fn steps_since_regroup(&self) -> u64 {
        self.steps
    }
}

/// Golden-section search for the capacity with the shortest step time, over log C in
/// `[initial / span, initial · span]` (`SPAN` = 4 for a first search) (the step time is convex in C near its best: too small
/// splits and merges too much, too large balances too coarsely). Each candidate is measured
/// `samples_per_point` times and scored by its median; the search stops when the bracket is
/// narrower than 5% or after `max_points` candidates (`MAX_POINTS` = 16 for a first search),
/// then stays on the best measured capacity (docs/performance-log.md#capacity-tuner). A search
/// re-opened when the step mix drifted ([`reopen`](CapacityTuner::reopen)) starts around the
/// capacity it found, in a narrower bracket with fewer candidates.
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
    max_points: usize,
    best: (f64, f64),
    /// ln C of the starting capacity and its score once measured: the search ends there unless
    /// a candidate beat it by `MARGIN` (noise alone must not move the capacity).
    center: f64,
    center_score: Option<f64>,
    done: bool,
}

const SPAN: f64 = 4.0;
const MAX_POINTS: usize = 16;
const REOPEN_SPAN: f64 = 2.0;
const REOPEN_POINTS: usize = 8;
/// How much better than the starting capacity a candidate must score to be kept.
const MARGIN: f64 = 0.03;
const INV_PHI: f64 = 0.618_033_988_749_895;

impl CapacityTuner {
    /// Starts around the calibrated `initial` capacity (must be positive), 3 samples per point.
    pub fn new(initial: f64) -> Self {
        Self::with_samples(initial, 3)
    }

    /// Like [`new`](Self::new), measuring each candidate `samples_per_point` times.
    pub fn with_samples(initial: f64, samples_per_point: usize) -> Self {
        Self::search(initial, SPAN, samples_per_point, MAX_POINTS)
    }

    /// A new search around `center` over `[center / span, center · span]` (`span` > 1), at most
    /// `max_points` candidates of `samples_per_point` steps each.
    pub fn search(center: f64, span: f64, samples_per_point: usize, max_points: usize) -> Self {
        let c = center.max(f64::MIN_POSITIVE).ln();
        let span = span.max(1.0 + 1e-6).ln();
        let (lo, hi) = (c - span, c + span);
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
            max_points: max_points.max(1),
            best: (c, f64::INFINITY),
            center: c,
            center_score: None,
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

    /// Re-opens the search after the step mix drifted: around the best capacity found, over
    /// `[best / REOPEN_SPAN, best · REOPEN_SPAN]`, at most `REOPEN_POINTS` candidates, so one
    /// re-opened search costs a bounded number of steps.
    pub fn reopen(&mut self) {
        *self = Self::search(self.best().0, REOPEN_SPAN, self.samples_per_point, REOPEN_POINTS);
    }

    /// Steps a re-opened search measures at most (the center, then its candidates).
    pub fn reopen_steps(&self) -> usize {
        (REOPEN_POINTS + 1) * self.samples_per_point
    }

    /// Whether the capacity being measured is the best one found (a step that explores another
    /// costs what it costs more: the scheduler counts those steps).
    pub fn exploring(&self) -> bool {
        !self.done
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
        if self.center_score.is_none() {
            self.center_score = Some(score);
            self.best = (x, score);
            return;
        }
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
        if self.hi - self.lo < 1.05f64.ln() || self.points >= self.max_points {
            self.done = true;
            if let Some(c) = self.center_score {
                if self.best.1 > c * (1.0 - MARGIN) {
                    self.best = (self.center, c);
                }
            }
        }
    }

    /// The point (ln C) waiting for measurements, if the search is still running.
    fn pending(&self) -> Option<f64> {
        if self.done {
            None
        } else if self.center_score.is_none() {
            Some(self.center)
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
    fn trigger_fires_when_accumulated_imbalance_reaches_the_threshold() {
        // Without decay: a plain sum, in capacities.
        let mut t = RegroupTrigger::with_params(100.0, 1.0, 0.5);
        assert!(!t.observe(&[10.0, 30.0, 20.0], &[])); // 0.2
        assert!(!t.observe(&[10.0, 30.0], &[])); // 0.4
        assert!(!t.observe(&[5.0, 5.0], &[])); // 0.4
        assert!(t.observe(&[0.0, 10.0], &[])); // 0.5
        assert!((t.accumulated_imbalance() - 0.5).abs() < 1e-12);
        assert_eq!(t.steps_since_regroup(), 4);
        t.reset();
        assert!(!t.should_regroup());
        assert!(!t.observe(&[], &[]));
        t.set_capacity(10.0);
        assert!(t.observe(&[0.0, 5.0], &[]));
    }

    #[test]
    fn decay_forgets_a_burst_but_not_a_lasting_drift() {
        // A single step 1.4 capacities wider, then none: decays away, never fires.
        let mut t = RegroupTrigger::new(100.0);
        assert!(!t.observe(&[0.0, 140.0], &[]));
        for _ in 0..50 {
            assert!(!t.observe(&[50.0, 50.0], &[]));
        }
        assert!(t.accumulated_imbalance() < 1e-3);
        // A quarter of a capacity wider on every step: fires after several steps, not at once.
        let mut t = RegroupTrigger::new(100.0);
        let mut steps = 0;
        while !t.observe(&[0.0, 30.0], &[]) {
            steps += 1;
            assert!(steps < 100, "a lasting drift must fire");
        }
        assert!((5..=20).contains(&steps), "{steps}");
        // Below THRESHOLD × (1 − DECAY) per step it converges under the threshold: never fires.
        let mut t = RegroupTrigger::new(100.0);
        for _ in 0..1000 {
            assert!(!t.observe(&[0.0, 20.0], &[]));
        }
        // No capacity (a plan without one): never fires.
        let mut t = RegroupTrigger::new(0.0);
        assert!(!t.observe(&[0.0, 1e9], &[]));
    }

    #[test]
    fn only_spread_beyond_the_planners_own_counts() {
        let mut t = RegroupTrigger::with_params(100.0, 1.0, 0.5);
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
        assert!((t.accumulated_imbalance() - 0.5).abs() < 1e-12);
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

    #[test]
    fn a_flat_curve_leaves_the_capacity_where_it_started() {
        // Within 2% everywhere (noise): no candidate beats the start by the margin.
        let mut t = CapacityTuner::with_samples(1000.0, 1);
        let mut i = 0u32;
        while !t.converged() {
            let c = t.capacity();
            i += 1;
            t.record(c, 1.0 + 0.02 * ((i * 7919) % 13) as f64 / 13.0 - if (c - 1000.0).abs() < 1e-6 { 0.0 } else { 0.01 });
        }
        assert!((t.capacity() - 1000.0).abs() < 1e-6, "{}", t.capacity());
    }

    #[test]
    fn a_reopened_search_is_narrower_and_shorter_and_follows_a_moved_minimum() {
        let mut t = CapacityTuner::with_samples(1000.0, 1);
        while !t.converged() {
            let c = t.capacity();
            t.record(c, step_time(c, 1000.0));
        }
        // The workload changed: the best capacity is now 1.6x higher.
        t.reopen();
        assert!(t.exploring());
        let mut steps = 0;
        while !t.converged() {
            let c = t.capacity();
            assert!((499.0..=2001.0).contains(&c), "{c}");
            t.record(c, step_time(c, 1600.0));
            steps += 1;
        }
        assert!(steps <= REOPEN_POINTS + 1, "{steps} (the center first, then the candidates)");
        assert!((t.capacity() / 1600.0).ln().abs() < 0.15, "{}", t.capacity());
    }
}
