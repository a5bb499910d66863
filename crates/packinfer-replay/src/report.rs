//! The replay's numbers: one summary per schedule, the comparison table, and the CSV files.

use std::fmt::Write as _;

use crate::engine::{RunResult, StepRecord};

/// The `p`-th percentile (0..=100) by nearest rank; NaN for no samples.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// What one replay adds up to.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub name: String,
    pub steps: usize,
    pub requests: usize,
    pub finished: usize,
    pub generated_tokens: u64,
    pub prefill_tokens: u64,
    pub attention_s: f64,
    pub plan_s: f64,
    /// Launch updates (binding each step's plan).
    pub bind_s: f64,
    /// Planning (every plan made), launch updates, KV writes, relayout copies and attention:
    /// the schedule's whole cost.
    pub total_s: f64,
    /// Percentiles (p50, p90, p99) of each step's whole cost (`StepRecord::total_s`).
    pub step_ms: [f64; 3],
    /// Percentiles of each step's attention alone.
    pub attention_step_ms: [f64; 3],
    /// TTFT and TBT percentiles: the whole cost of the steps a request waited through.
    pub ttft_ms: [f64; 3],
    pub tbt_ms: [f64; 3],
    /// Generated tokens per second of the whole cost.
    pub decode_tokens_per_s: f64,
    /// Prefill and decode tokens per second of the whole cost.
    pub tokens_per_s: f64,
    /// Real (row, key) pairs over computed ones, over the whole replay.
    pub tile_utilization: f64,
    pub imbalance_mean: f64,
    pub imbalance_max: f64,
    pub groups_mean: f64,
    /// Where the capacity tuner ended (1 = one group per worker; 0 for the baseline).
    pub capacity_factor_last: f64,
    pub items_mean: f64,
    pub plan_ms_mean: f64,
    pub kv_write_s: f64,
    pub relayout_s: f64,
    pub regroups: u64,
    /// Launches created (the other steps were uploaded into a kept launch).
    pub launches_created: u64,
    /// Steps on which the trigger fired, over all steps.
    pub regroup_rate: f64,
    pub relayouts: u64,
    pub bytes_moved: u64,
    /// KV bytes attention read over the replay (a shared prefix once per prefix group when the
    /// schedule shares prefixes), as the pool counts them.
    pub read_bytes: f64,
    pub peak_pages_used: u32,
    pub pages_total: u32,
    pub fragmentation_mean: f64,
    /// Tokens stored over tokens the sequences hold: below 1 when prefixes are shared.
    pub sharing_ratio_mean: f64,
    pub final_pages_used: u32,
}

const PCT: [f64; 3] = [50.0, 90.0, 99.0];

fn pcts(samples: &[f64], scale: f64) -> [f64; 3] {
    PCT.map(|p| percentile(samples, p) * scale)
}

fn mean(it: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = it.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

impl Summary {
    pub fn new(name: &str, r: &RunResult) -> Summary {
        let steps = &r.steps;
        let attention_s: f64 = steps.iter().map(|s| s.attention_s).sum();
        let step_times: Vec<f64> = steps.iter().map(|s| s.total_s()).collect();
        let attention_times: Vec<f64> = steps.iter().map(|s| s.attention_s).collect();
        let useful: f64 = steps.iter().map(|s| s.useful_pairs).sum();
        let computed: f64 = steps.iter().map(|s| s.computed_pairs).sum();
        let last = steps.last().map(|s| s.kv).unwrap_or_default();
        let read_bytes: f64 =
            steps.iter().map(|s| if s.prefix_shared { s.kv.step_read_bytes_shared } else { s.kv.step_read_bytes_unshared } as f64).sum();
        let plan_s: f64 = steps.iter().map(|s| s.plan_s).sum();
        let relayout_s: f64 = steps.iter().map(|s| s.relayout_s).sum();
        let bind_s: f64 = steps.iter().map(|s| s.bind_s).sum();
        let kv_write_s: f64 = steps.iter().map(|s| s.kv_write_s).sum();
        let total_s = attention_s + plan_s + relayout_s + bind_s + kv_write_s;
        Summary {
            name: name.into(),
            plan_s,
            total_s,
            bind_s,
            regroup_rate: r.regroups as f64 / steps.len().max(1) as f64,
            steps: steps.len(),
            requests: r.requests,
            finished: r.finished,
            generated_tokens: r.generated_tokens,
            prefill_tokens: r.prefill_tokens,
            attention_s,
            step_ms: pcts(&step_times, 1e3),
            attention_step_ms: pcts(&attention_times, 1e3),
            ttft_ms: pcts(&r.ttft_s, 1e3),
            tbt_ms: pcts(&r.tbt_s, 1e3),
            decode_tokens_per_s: r.generated_tokens as f64 / total_s,
            tokens_per_s: steps.iter().map(|s| (s.prefill_tokens + s.decode_tokens) as f64).sum::<f64>() / total_s,
            tile_utilization: if computed > 0.0 { useful / computed } else { 1.0 },
            imbalance_mean: mean(steps.iter().map(|s| s.imbalance)),
            imbalance_max: steps.iter().map(|s| s.imbalance).fold(0.0, f64::max),
            groups_mean: mean(steps.iter().map(|s| s.groups as f64)),
            capacity_factor_last: steps.last().map_or(0.0, |s| s.capacity_factor),
            items_mean: mean(steps.iter().map(|s| s.items as f64)),
            plan_ms_mean: mean(steps.iter().map(|s| s.plan_s * 1e3)),
            kv_write_s,
            relayout_s,
            regroups: r.regroups,
            launches_created: r.launches_created,
            relayouts: r.final_kv.relayouts,
            bytes_moved: r.final_kv.bytes_moved,
            read_bytes,
            peak_pages_used: r.peak_pages_used,
            pages_total: last.pages_total,
            fragmentation_mean: mean(steps.iter().map(|s| s.kv.fragmentation())),
            sharing_ratio_mean: mean(
                steps.iter().filter(|s| s.kv.tokens_logical > 0).map(|s| s.kv.tokens_stored as f64 / s.kv.tokens_logical as f64),
            ),
            final_pages_used: r.final_kv.pages_used,
        }
    }

    /// (metric, value, how to compare: "lower" / "higher" is better, or "" for neither).
    pub fn rows(&self) -> Vec<(&'static str, f64, &'static str)> {
        vec![
            ("steps", self.steps as f64, ""),
            ("requests finished", self.finished as f64, ""),
            ("tokens generated", self.generated_tokens as f64, ""),
            ("prefill tokens", self.prefill_tokens as f64, ""),
            ("TOTAL: planning + launch update + KV writes + relayout + attention (s)", self.total_s, "lower"),
            ("attention time total (s)", self.attention_s, "lower"),
            ("planning time total (s)", self.plan_s, "lower"),
            ("launch update time total (s)", self.bind_s, "lower"),
            ("KV writes total (s)", self.kv_write_s, ""),
            ("relayout time total (s)", self.relayout_s, "lower"),
            ("step time p50 (ms, all costs)", self.step_ms[0], "lower"),
            ("step time p90 (ms, all costs)", self.step_ms[1], "lower"),
            ("step time p99 (ms, all costs)", self.step_ms[2], "lower"),
            ("attention per step p50 (ms)", self.attention_step_ms[0], "lower"),
            ("attention per step p90 (ms)", self.attention_step_ms[1], "lower"),
            ("attention per step p99 (ms)", self.attention_step_ms[2], "lower"),
            ("TTFT p50 (ms, all costs)", self.ttft_ms[0], "lower"),
            ("TTFT p90 (ms, all costs)", self.ttft_ms[1], "lower"),
            ("TTFT p99 (ms, all costs)", self.ttft_ms[2], "lower"),
            ("TBT p50 (ms, all costs)", self.tbt_ms[0], "lower"),
            ("TBT p90 (ms, all costs)", self.tbt_ms[1], "lower"),
            ("TBT p99 (ms, all costs)", self.tbt_ms[2], "lower"),
            ("generated tokens / s (all costs)", self.decode_tokens_per_s, "higher"),
            ("all tokens / s (all costs)", self.tokens_per_s, "higher"),
            ("tile utilization (%)", 100.0 * self.tile_utilization, "higher"),
            ("load imbalance, mean (busiest/mean worker)", self.imbalance_mean, "lower"),
            ("load imbalance, worst step", self.imbalance_max, "lower"),
            ("groups per step, mean", self.groups_mean, ""),
            ("capacity / automatic capacity, last step", self.capacity_factor_last, ""),
            ("work items per step, mean", self.items_mean, ""),
            ("planning per step, mean (ms)", self.plan_ms_mean, "lower"),
            ("launches created (other steps: launch update)", self.launches_created as f64, ""),
            ("KV bytes read by attention (GiB, all layers)", self.read_bytes / (1u64 << 30) as f64, "lower"),
            ("regroups (trigger fired)", self.regroups as f64, ""),
            ("steps the trigger fired on (%)", 100.0 * self.regroup_rate, ""),
            ("relayouts that moved pages", self.relayouts as f64, ""),
            ("relayout bytes moved (MiB)", self.bytes_moved as f64 / (1 << 20) as f64, ""),
            ("KV pages used, peak", self.peak_pages_used as f64, "lower"),
            ("KV pool use, peak (%)", 100.0 * self.peak_pages_used as f64 / self.pages_total.max(1) as f64, "lower"),
            ("KV fragmentation, mean (% of used slots empty)", 100.0 * self.fragmentation_mean, "lower"),
            ("KV stored / logical tokens, mean (%)", 100.0 * self.sharing_ratio_mean, "lower"),
            ("KV pages used after the replay", self.final_pages_used as f64, ""),
        ]
    }
}

/// What the scheduler did over a replay: the trigger's firing rate and what each firing bought,
/// the relayouts the cost model allowed, their predicted and measured cost and gain, and the
/// capacity searches. None for a schedule without a scheduler.
pub fn scheduler_report(name: &str, r: &RunResult) -> Option<String> {
    let st = r.scheduler?;
    let steps = &r.steps;
    let n = steps.len().max(1);
    let mut s = String::new();
    let fired: Vec<&StepRecord> = steps.iter().filter(|x| x.regrouped && x.step > 0).collect();
    let _ = writeln!(s, "\n{name}: scheduler");
    if r.regroups > 0 {
        // What a firing bought: the imbalance (in capacities) the kept grouping had added that a
        // fresh grouping removes, and the relayouts it allowed.
        let drift: f64 = fired.iter().map(|x| x.drift).sum::<f64>() / fired.len().max(1) as f64;
        let with_relayout = fired.iter().filter(|x| x.relayout).count();
        let _ = writeln!(
            s,
            "  regroup trigger: fired on {} of {} steps ({:.1}%, the first grouping included); each firing removed a drift of {:.2} capacities per step on average; {} of {} firings led to a relayout",
            r.regroups,
            n,
            100.0 * r.regroups as f64 / n as f64,
            drift,
            with_relayout,
            fired.len()
        );
    }
    let _ = writeln!(
        s,
        "  relayouts: {} run ({} probes), {} declined by the cost model, {:.1} MiB moved; relayout time (decisions and copies) {:.4} s; copy rate {:.2} GB/s",
        st.relayouts,
        st.probes,
        st.relayouts_declined,
        st.bytes_moved as f64 / (1 << 20) as f64,
        st.relayout_s,
        st.copy_bytes_per_s / 1e9
    );
    let gain = |g: f64| if g.is_nan() { "unmeasured".to_string() } else { format!("{:+.1}%", 100.0 * g) };
    let _ = writeln!(
        s,
        "  relayout cost model, for the relayouts run: predicted copy {:.4} s, gain {:.4} s; measured copy {:.4} s, gain {:.4} s ({} relayouts measured); attention saved by contiguity on laid-out KV: decode steps {}, prefill steps {}",
        st.predicted_cost_s,
        st.predicted_gain_s,
        st.copy_s,
        st.measured_gain_s,
        st.gains_measured,
        gain(st.contiguous_gain[0]),
        gain(st.contiguous_gain[1])
    );
    let _ = writeln!(
        s,
        "  capacity tuner: {} searches, {} steps measuring candidates ({:.1}%), now at {:.2} x the automatic capacity",
        st.capacity_searches,
        st.exploring_steps,
        100.0 * st.exploring_steps as f64 / n as f64,
        st.capacity_factor
    );
    Some(s)
}

/// Each adaptive part's net effect, all costs counted: the total (planning + launch update + KV writes + relayout +
/// attention) without it minus the total with everything on (positive: the part pays).
pub fn ablation(summaries: &[Summary]) -> String {
    let mut s = String::new();
    let Some(full) = summaries.iter().find(|x| x.name == "PackInfer") else { return s };
    let _ = writeln!(s, "\nablation: net effect of each adaptive part = total without it - total with it (planning + launch update + KV writes + relayout + attention; positive: it pays)");
    for (part, without) in [
        ("capacity tuning", "no tuning"),
        ("regroup trigger", "no regroup"),
        ("relayout cost model (vs never moving)", "no relayout"),
        ("relayout cost model (vs relayout always)", "relayout always"),
        ("all adaptive parts", "no adaptive"),
    ] {
        if let Some(x) = summaries.iter().find(|x| x.name == without) {
            let _ = writeln!(
                s,
                "  {part:<42} {:+.4} s ({:+.2}%; attention {:+.4} s, planning {:+.4} s, relayout {:+.4} s)",
                x.total_s - full.total_s,
                100.0 * (x.total_s - full.total_s) / full.total_s,
                x.attention_s - full.attention_s,
                x.plan_s - full.plan_s,
                x.relayout_s - full.relayout_s
            );
        }
    }
    s
}

fn num(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else if x == x.trunc() && x.abs() < 1e12 {
        format!("{x:.0}")
    } else if x.abs() >= 100.0 {
        format!("{x:.1}")
    } else if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.4}")
    }
}

/// The comparison table: one column per schedule and, with two, the gain of the first.
pub fn table(summaries: &[Summary]) -> String {
    let mut s = String::new();
    let w = 48;
    let _ = write!(s, "{:<w$}", "metric");
    for x in summaries {
        let _ = write!(s, " {:>14}", x.name);
    }
    if summaries.len() == 2 {
        let _ = write!(s, " {:>10}", "gain");
    }
    s.push('\n');
    let rows: Vec<_> = summaries.iter().map(|x| x.rows()).collect();
    for i in 0..rows[0].len() {
        let (name, _, better) = rows[0][i];
        let _ = write!(s, "{name:<w$}");
        for r in &rows {
            let _ = write!(s, " {:>14}", num(r[i].1));
        }
        if rows.len() == 2 {
            let (a, b) = (rows[0][i].1, rows[1][i].1);
            // Gain of the first schedule: how many times better, in the metric's direction.
            let g = match better {
                "lower" if a > 0.0 => format!("{:.2}x", b / a),
                "higher" if b > 0.0 => format!("{:.2}x", a / b),
                _ => String::new(),
            };
            let _ = write!(s, " {g:>10}");
        }
        s.push('\n');
    }
    s
}

/// `summary.csv`: metric, one column per schedule.
pub fn summary_csv(summaries: &[Summary]) -> String {
    let mut s = String::from("metric");
    for x in summaries {
        let _ = write!(s, ",{}", x.name);
    }
    s.push('\n');
    let rows: Vec<_> = summaries.iter().map(|x| x.rows()).collect();
    for i in 0..rows[0].len() {
        s.push_str(&csv_field(rows[0][i].0));
        for r in &rows {
            let _ = write!(s, ",{}", r[i].1);
        }
        s.push('\n');
    }
    s
}

fn csv_field(x: &str) -> String {
    if x.contains([',', '"']) {
        format!("\"{}\"", x.replace('"', "\"\""))
    } else {
        x.into()
    }
}

pub const STEPS_HEADER: &str = "schedule,step,clock_s,requests,prefill_tokens,decode_tokens,kv_tokens,attention_ms,plan_ms,bind_ms,kv_write_ms,relayout_ms,capacity,capacity_factor,groups,items,split_requests,tile_utilization,imbalance,regrouped,drift,drift_accumulated,due_pages,relayout,probe,predicted_gain_ms,predicted_cost_ms,pages_moved,bytes_moved,kv_pages_used,kv_pages_total,kv_tokens_stored,kv_tokens_logical,kv_fragmentation,kv_read_bytes_shared,kv_read_bytes_unshared";

/// `steps.csv`: one line per step of every schedule.
pub fn steps_csv(runs: &[(&str, &[StepRecord])]) -> String {
    let mut s = String::from(STEPS_HEADER);
    s.push('\n');
    for (name, steps) in runs {
        for r in steps.iter() {
            let _ = writeln!(
                s,
                "{name},{},{:.4},{},{},{},{},{:.4},{:.4},{:.4},{:.4},{:.4},{:.1},{:.3},{},{},{},{:.4},{:.4},{},{:.4},{:.4},{},{},{},{:.4},{:.4},{},{},{},{},{},{},{:.4},{},{}",
                r.step,
                r.clock_s,
                r.requests,
                r.prefill_tokens,
                r.decode_tokens,
                r.kv_tokens,
                r.attention_s * 1e3,
                r.plan_s * 1e3,
                r.bind_s * 1e3,
                r.kv_write_s * 1e3,
                r.relayout_s * 1e3,
                r.capacity,
                r.capacity_factor,
                r.groups,
                r.items,
                r.split_requests,
                r.tile_utilization,
                r.imbalance,
                r.regrouped as u8,
                r.drift,
                r.drift_accumulated,
                r.due_pages,
                r.relayout as u8,
                r.probe as u8,
                r.predicted_gain_s * 1e3,
                r.predicted_cost_s * 1e3,
                r.pages_moved,
                r.bytes_moved,
                r.kv.pages_used,
                r.kv.pages_total,
                r.kv.tokens_stored,
                r.kv.tokens_logical,
                r.kv.fragmentation(),
                r.kv.step_read_bytes_shared,
                r.kv.step_read_bytes_unshared
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(|x| x as f64).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0], 90.0), 3.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
