//! Continuous batching as a serving engine does it, with attention done by the library.
//!
//! Requests arrive (by trace timestamp on a virtual clock, or all at once), are admitted FIFO
//! while the batch has a slot and the KV store can promise room for the whole request, then each
//! step spends a token budget: one token for every decoding request first, then prefill chunks.
//! A request's last prefill chunk yields its first token; each decode step yields one more; when
//! it has produced its `GeneratedTokens` it leaves and its KV is freed.
//!
//! The step composition depends only on the trace and the configuration, never on measured
//! time, so PackInfer and the baseline replay exactly the same work.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use packinfer::backend::{Backend, BoundPlan, LaunchCapacity};
use packinfer::plan::scheduler::{Scheduler, SchedulerOptions, SchedulerStats, StepTimes};
use packinfer::plan::{Plan, PlanOptions};
use packinfer::types::{KvScales, RowsTensor, RunArgs, Shape};
use packinfer::{Error, Result};

use crate::device::DeviceIo;
use crate::store::{KvStore, StoreMetrics};
use crate::trace::Rng;

/// One request as the engine replays it (lengths already scaled for the machine).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Request {
    /// Trace line (0: synthetic), for messages.
    pub line: usize,
    pub arrival_s: f64,
    /// Prompt tokens to prefill (after the shared system prompt, if any).
    pub prompt: u32,
    /// Index of the shared system prompt it starts with.
    pub system_prompt: Option<u32>,
    pub generated: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrivals {
    /// Every request is waiting at the start (a saturated engine).
    AllAtOnce,
    /// At its trace timestamp divided by `speedup`, on a clock that advances `step_s` per step.
    Timestamps { speedup: f64, step_s: f64 },
}

/// Tokens of each step's output the schedules compare (see `Engine::last_output`).
pub const CHECKED_TOKENS: usize = 256;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub shape: Shape,
    pub layers: u32,
    pub token_budget: u32,
    pub max_batch: u32,
    pub arrivals: Arrivals,
    pub options: PlanOptions,
    /// PackInfer's step-to-step adaptation, by the library's scheduler (the same type the C
    /// API's scheduler handle drives): capacity tuning, the regroup trigger and relayouts by
    /// its cost model, each of which the options may switch off. `None`: the plan of each step
    /// alone, KV left where the pages fell (the baseline).
    pub scheduler: Option<SchedulerOptions>,
    /// Lengths of the shared system prompts.
    pub system_prompt_len: u32,
    pub num_system_prompts: u32,
    pub seed: u64,
    /// `Some(ordinal)`: the backend is CUDA on that device, so the step's inputs and output live
    /// in device memory and attention is timed with events; `None`: host memory, wall time.
    pub device_ordinal: Option<u32>,
    /// Keep each step's exact batch ([`Engine::last_batch`]) for `--record-batches`.
    pub record_batches: bool,
}

/// One step's exact batch, as `--record-batches` writes it (`record.rs`): per request of the
/// step, in batch order, its id (trace row index), queries, keys (the new tokens included) and
/// whether the step gave it a token; the page tables and prefix groups of the plan.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepBatch {
    /// Requests that arrived before this step (they wait from this step on).
    pub arrived: Vec<u32>,
    pub ids: Vec<u32>,
    pub q_lens: Vec<u32>,
    pub kv_lens: Vec<u32>,
    /// 0: no token this step, 1: its first token (last prefill chunk), 2: a later token.
    pub emits: Vec<u8>,
    /// Request r's pages are `pages[page_indptr[r] .. page_indptr[r + 1]]`.
    pub page_indptr: Vec<i32>,
    pub pages: Vec<i32>,
    /// (shared keys, members as batch positions) of each prefix group of the plan.
    pub prefix_groups: Vec<(u32, Vec<u32>)>,
    /// Requests of the step that finished with it.
    pub finished: Vec<u32>,
}

/// What one step did and cost.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepRecord {
    pub step: u32,
    pub clock_s: f64,
    pub requests: u32,
    pub prefill_tokens: u32,
    pub decode_tokens: u32,
    /// Keys of every request of the step added up (what attention reads, before sharing).
    pub kv_tokens: u64,
    /// The backend's run calls for every layer.
    pub attention_s: f64,
    pub plan_s: f64,
    pub bind_s: f64,
    pub kv_write_s: f64,
    /// Relayout copies (KV management, not attention).
    pub relayout_s: f64,
    /// The regroup trigger fired this step.
    pub regrouped: bool,
    /// The trigger's imbalance of the step and its decayed sum, in capacities.
    pub drift: f64,
    pub drift_accumulated: f64,
    /// Pages a relayout was due to copy (0: none due), whether one ran and was a probe, and
    /// the cost model's prediction for it (seconds saved over the horizon, copy seconds).
    pub due_pages: u64,
    pub relayout: bool,
    pub probe: bool,
    pub predicted_gain_s: f64,
    pub predicted_cost_s: f64,
    /// Pages and bytes the step's relayout moved.
    pub pages_moved: u64,
    pub bytes_moved: u64,
    /// Capacity the step was planned with (cost units), and its ratio to the step's
    /// automatic capacity (what the tuner moves).
    pub capacity: f64,
    pub capacity_factor: f64,
    /// The plan read shared prefixes once per prefix group.
    pub prefix_shared: bool,
    pub groups: u32,
    pub items: u32,
    pub split_requests: u32,
    pub tile_utilization: f64,
    /// Real (row, visible key) pairs of one layer, and the pairs the tiles compute.
    pub useful_pairs: f64,
    pub computed_pairs: f64,
    /// Busiest worker's load over the mean worker's, as the planner's cost model sees the
    /// schedule (1 = perfectly balanced).
    pub imbalance: f64,
    pub kv: StoreMetrics,
    /// A digest of (request, tokens) of the step, to check two replays did the same work.
    pub work_digest: u64,
}

impl StepRecord {
    /// Everything the engine waited for in this step: planning, the launch update, KV writes,
    /// relayout copies and the attention of every layer.
    pub fn total_s(&self) -> f64 {
        self.plan_s + self.bind_s + self.kv_write_s + self.relayout_s + self.attention_s
    }
}

#[derive(Debug, Clone, Default)]
pub struct RunResult {
    pub steps: Vec<StepRecord>,
    /// Step time (all library costs, `StepRecord::total_s`) from arrival to first token, per
    /// request that produced one.
    pub ttft_s: Vec<f64>,
    /// Step time (all library costs) between consecutive tokens of a request.
    pub tbt_s: Vec<f64>,
    pub generated_tokens: u64,
    pub prefill_tokens: u64,
    pub finished: usize,
    pub requests: usize,
    /// The store after every request left and the system prompts were released.
    pub final_kv: StoreMetrics,
    pub peak_pages_used: u32,
    pub regroups: u64,
    /// Launches created: the first, then one each time no kept launch suited a step's plan (the
    /// other steps were uploaded into a kept one).
    pub launches_created: u64,
    /// The scheduler's totals (predicted and measured relayout gains, tuner searches).
    pub scheduler: Option<SchedulerStats>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    NotArrived,
    Waiting,
    Running { prefilled: u32, produced: u32 },
    Done,
}

/// Launches an engine keeps, one per kind of step (their kernels differ, `BoundPlan::suits`);
/// the least recently used goes first.
const MAX_KEPT_LAUNCHES: usize = 4;

struct KeptLaunch {
    bound: Box<dyn BoundPlan>,
    /// The counts `bound` was created for.
    capacity: LaunchCapacity,
    /// The step (1-based) that last used it.
    last_step: usize,
}

/// `c` with half as much again of every count (at least one more), so that a growing batch
/// creates a new launch a few times, not every step.
fn with_headroom(c: &LaunchCapacity) -> LaunchCapacity {
    let more = |n: u32| n.saturating_add(n / 2 + 1);
    LaunchCapacity {
        items: more(c.items),
        row_segments: more(c.row_segments),
        kv_chunks: more(c.kv_chunks),
        requests: more(c.requests),
        pages: more(c.pages),
        merge_rows: more(c.merge_rows),
        merge_slots: more(c.merge_slots),
        groups: more(c.groups),
        partial_slots: more(c.partial_slots),
        mask_bytes: c.mask_bytes,
        mask_queries: c.mask_queries,
    }
}

/// `n` zero elements, or an error instead of an abort when a huge --token-budget asks for more
/// memory than there is.
fn zeroed(n: usize, what: &str) -> Result<Vec<u16>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| Error::OutOfMemory(format!("cannot allocate {} bytes for {what} (lower --token-budget)", n as u128 * 2)))?;
    v.resize(n, 0);
    Ok(v)
}

/// Random 16-bit inputs the steps read Q and new K/V from: the point is the work, not the values.
struct Inputs {
    data: Vec<u16>,
    rng: Rng,
}

impl Inputs {
    fn new(shape: &Shape, max_tokens: usize, seed: u64) -> Result<Self> {
        let mut rng = Rng::new(seed);
        let n = 2 * max_tokens * shape.num_qo_heads as usize * shape.head_dim as usize + 4096;
        let data = zeroed(n, "a step's inputs")?
            .into_iter()
            .map(|_| {
                let x = rng.uniform() as f32 * 2.0 - 1.0;
                match shape.dtype {
                    packinfer::types::DType::F16 => half::f16::from_f32(x).to_bits(),
                    _ => half::bf16::from_f32(x).to_bits(),
                }
            })
            .collect();
        Ok(Inputs { data, rng })
    }
    /// Where `n` elements starting at a random place begin: in the host vector, or at the same
    /// index of its copy on the GPU.
    fn take(&mut self, n: usize, device: Option<&DeviceIo>) -> u64 {
        assert!(n <= self.data.len(), "a step reads {n} input elements but the inputs hold {}", self.data.len());
        let at = (self.rng.next_u64() % (self.data.len() - n + 1) as u64) as usize;
        match device {
            Some(d) => d.input_ptr(at),
            None => self.data[at..].as_ptr() as u64,
        }
    }
}

/// The store's sequence id of shared system prompt `p`: after the requests' ids.
fn prompt_id(requests: &[Request], p: u32) -> u32 {
    requests.len() as u32 + p
}

/// One replay in progress: the requests' states, the store and the backend. [`Engine::step`] runs
/// one engine step, so two replays can be interleaved step by step and share the machine's
/// load alike.
pub struct Engine<'a> {
    requests: &'a [Request],
    config: EngineConfig,
    store: Box<dyn KvStore + 'a>,
    backend: &'a dyn Backend,
    inputs: Inputs,
    /// The inputs and output on the GPU (CUDA backend), allocated once for the largest step.
    device: Option<DeviceIo>,
    /// The last step's output (CPU backend; the GPU's stays on the device).
    out: Vec<u16>,
    /// Elements of `out` the last step wrote.
    out_len: usize,
    /// The last step's output at up to `CHECKED_TOKENS` evenly spaced tokens, on the host.
    checked: Vec<u16>,
    /// Elements of `checked` the last step wrote.
    checked_len: usize,
    state: Vec<State>,
    /// Attention time since the request's previous token (or since it arrived).
    since_token: Vec<f64>,
    to_arrive: VecDeque<usize>,
    waiting: VecDeque<usize>,
    running: Vec<usize>,
    clock: f64,
    result: RunResult,
    scheduler: Option<Scheduler>,
    /// The last step's plan, re-planned for the next (without the scheduler).
    last_plan: Option<Arc<Plan>>,
    /// The launches steps are uploaded into (at most `MAX_KEPT_LAUNCHES`).
    launches: Vec<KeptLaunch>,
    /// The last step's batch (kept only with `record_batches`).
    batch: StepBatch,
}

impl<'a> Engine<'a> {
    /// Sets up a replay of `requests` and writes the shared system prompts' KV (their prefill
    /// is not part of any request's work).
    pub fn new(requests: &'a [Request], config: EngineConfig, mut store: Box<dyn KvStore + 'a>, backend: &'a dyn Backend) -> Result<Self> {
        let shape = config.shape;
        let (hq, hk, d) = (shape.num_qo_heads as usize, shape.num_kv_heads as usize, shape.head_dim as usize);
        let n = requests.len();
        let mut inputs = Inputs::new(&shape, config.token_budget as usize, config.seed)?;
        let out_elems = config.token_budget as usize * hq * d;
        let device = config.device_ordinal.map(|o| DeviceIo::new(o, &inputs.data, out_elems)).transpose()?;
        for p in 0..config.num_system_prompts {
            let (id, len) = (prompt_id(requests, p), config.system_prompt_len);
            if !store.admit(id, None, len)? {
                return Err(Error::PoolExhausted(format!(
                    "the KV pool cannot hold the {} shared system prompts of {len} tokens",
                    config.num_system_prompts
                )));
            }
            for t in (0..len).step_by(config.token_budget as usize) {
                let chunk = (len - t).min(config.token_budget);
                store.append(id, chunk)?;
                let m = chunk as usize * hk * d;
                for layer in 0..config.layers {
                    let (k, v) = (inputs.take(m, device.as_ref()), inputs.take(m, device.as_ref()));
                    // SAFETY: each points at `m` elements of the inputs, in the backend's memory.
                    unsafe { store.write_kv(layer, &[(id, chunk)], k, v, m)? };
                }
            }
        }
        let scheduler = config.scheduler.clone().map(|o| Scheduler::new(o, backend.profile())).transpose()?;
        let mut order: Vec<usize> = (0..n).collect();
        if let Arrivals::Timestamps { .. } = config.arrivals {
            order.sort_by(|&a, &b| requests[a].arrival_s.total_cmp(&requests[b].arrival_s));
        }
        Ok(Engine {
            requests,
            out: zeroed(if device.is_some() { 0 } else { out_elems }, "a step's output")?,
            checked: zeroed(CHECKED_TOKENS.min(config.token_budget as usize) * hq * d, "a step's checked output")?,
            checked_len: 0,
            device,
            out_len: 0,
            config,
            store,
            backend,
            inputs,
            state: vec![State::NotArrived; n],
            since_token: vec![0.0; n],
            to_arrive: order.into(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            clock: 0.0,
            result: RunResult { requests: n, ..Default::default() },
            scheduler,
            last_plan: None,
            launches: Vec::new(),
            batch: StepBatch::default(),
        })
    }

    pub fn finished(&self) -> usize {
        self.result.finished
    }

    pub fn is_done(&self) -> bool {
        self.result.finished == self.requests.len()
    }

    /// The attention output of the last step's last layer at up to `CHECKED_TOKENS` evenly
    /// spaced tokens, the first included (16-bit elements, token-major). Two engines fed the
    /// same trace and seed compute it from the same inputs.
    pub fn last_output(&self) -> &[u16] {
        &self.checked[..self.checked_len]
    }

    pub fn dtype(&self) -> packinfer::types::DType {
        self.config.shape.dtype
    }

    /// The last step's exact batch (empty unless the config asked to record batches).
    pub fn last_batch(&self) -> &StepBatch {
        &self.batch
    }

    /// Runs one engine step (idling the virtual clock until an arrival first, if nothing runs).
    /// Returns the step's record, or `None` when every request has finished.
    pub fn step(&mut self) -> Result<Option<StepRecord>> {
        if self.is_done() {
            return Ok(None);
        }
        let requests = self.requests;
        let config = &self.config;
        let (state, store) = (&mut self.state, &mut self.store);
        let record = config.record_batches;
        let batch = &mut self.batch;
        batch.arrived.clear();
        loop {
            // Arrivals.
            while let Some(&r) = self.to_arrive.front() {
                let arrives = match config.arrivals {
                    Arrivals::AllAtOnce => true,
                    Arrivals::Timestamps { speedup, .. } => requests[r].arrival_s / speedup <= self.clock,
                };
                if !arrives {
                    break;
                }
                self.to_arrive.pop_front();
                if record {
                    batch.arrived.push(r as u32);
                }
                state[r] = State::Waiting;
                self.waiting.push_back(r);
            }
            // Admission, first come first served: a request that does not fit blocks those
            // behind it.
            while let Some(&r) = self.waiting.front() {
                if self.running.len() >= config.max_batch as usize {
                    break;
                }
                let req = &requests[r];
                let prefix = req.system_prompt.map(|p| prompt_id(requests, p));
                let prefix_len = if prefix.is_some() { config.system_prompt_len } else { 0 };
                // The last generated token is never fed back, so it needs no KV.
                let final_len = prefix_len + req.prompt + req.generated.saturating_sub(1);
                if !store.admit(r as u32, prefix, final_len)? {
                    break;
                }
                self.waiting.pop_front();
                state[r] = State::Running { prefilled: 0, produced: 0 };
                self.running.push(r);
            }
            if !self.running.is_empty() {
                break;
            }
            if let Some(&r) = self.waiting.front() {
                let m = store.metrics();
                return Err(Error::PoolExhausted(format!(
                    "request {r} (trace line {}) does not fit in the empty KV pool ({} pages of {} tokens)",
                    requests[r].line, m.pages_total, m.page_size
                )));
            }
            match (self.to_arrive.front(), config.arrivals) {
                (Some(&r), Arrivals::Timestamps { speedup, step_s }) => {
                    // Idle until the next arrival, in whole steps.
                    let t = requests[r].arrival_s / speedup;
                    self.clock += ((t - self.clock) / step_s).ceil().max(1.0) * step_s;
                }
                _ => return Err(Error::Internal("the engine has nothing to run but not every request finished".into())),
            }
        }

        let shape = config.shape;
        let (hq, hk, d) = (shape.num_qo_heads as usize, shape.num_kv_heads as usize, shape.head_dim as usize);
        // The step: decodes first, one token each, then prefill chunks in admission order.
        let mut budget = config.token_budget;
        let mut step: Vec<(u32, u32)> = Vec::new();
        for &r in &self.running {
            if let State::Running { prefilled, .. } = state[r] {
                if prefilled == requests[r].prompt && budget > 0 {
                    step.push((r as u32, 1));
                    budget -= 1;
                }
            }
        }
        let decode_tokens = step.len() as u32;
        for &r in &self.running {
            if let State::Running { prefilled, .. } = state[r] {
                let chunk = (requests[r].prompt - prefilled).min(budget);
                if chunk > 0 {
                    step.push((r as u32, chunk));
                    budget -= chunk;
                }
            }
        }
        let mut rec = StepRecord {
            step: self.result.steps.len() as u32,
            clock_s: self.clock,
            requests: step.len() as u32,
            decode_tokens,
            ..Default::default()
        };
        rec.prefill_tokens = step.iter().map(|s| s.1).sum::<u32>() - decode_tokens;
        rec.work_digest =
            step.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &(r, q)| (h ^ ((r as u64) << 32 | q as u64)).wrapping_mul(0x100_0000_01b3));

        // New tokens' K/V, every layer.
        let t = Instant::now();
        for &(r, q) in &step {
            store.append(r, q)?;
        }
        let m = (rec.prefill_tokens + decode_tokens) as usize * hk * d;
        for layer in 0..config.layers {
            let (k, v) = (self.inputs.take(m, self.device.as_ref()), self.inputs.take(m, self.device.as_ref()));
            // SAFETY: each points at `m` elements of the inputs, in the backend's memory.
            unsafe { store.write_kv(layer, &step, k, v, m)? };
        }
        // On the GPU the writes are queued on the stream; the host time is what the engine
        // spends issuing them (the attention events below start after they finish).
        rec.kv_write_s = t.elapsed().as_secs_f64();

        let mut relayout_device_s = 0.0;
        // Into the last step's plan: its memory is reused (the launch holding it is gone).
        let reuse = self.last_plan.take().and_then(|p| Arc::try_unwrap(p).ok());
        let plan = match &mut self.scheduler {
            None => {
                let t = Instant::now();
                let plan = store.plan(reuse, &step, config.options.clone())?;
                rec.plan_s = t.elapsed().as_secs_f64();
                plan
            }
            Some(sched) => {
                let (plan, d) = store.schedule(sched, reuse, &step, config.options.clone())?;
                if d.relayout {
                    if let Some(dev) = &self.device {
                        // The copies run on the stream: what is left of them after the call
                        // returned delays the step too.
                        let t = Instant::now();
                        dev.time(0, || Ok(()))?;
                        relayout_device_s = d.relayout_s + t.elapsed().as_secs_f64();
                    }
                }
                rec.plan_s = d.plan_s;
                rec.relayout_s = if relayout_device_s > 0.0 { relayout_device_s } else { d.relayout_s };
                rec.capacity_factor = d.capacity_factor;
                rec.regrouped = d.regrouped;
                rec.drift = d.imbalance;
                rec.drift_accumulated = d.accumulated_imbalance;
                rec.due_pages = d.due_pages;
                rec.relayout = d.relayout;
                rec.probe = d.probe;
                rec.predicted_gain_s = d.predicted_gain_s;
                rec.predicted_cost_s = d.predicted_cost_s;
                (rec.pages_moved, rec.bytes_moved) = (d.report.pages_moved, d.report.bytes_moved);
                if d.regrouped && config.scheduler.as_ref().is_some_and(|o| o.regroup) {
                    self.result.regroups += 1;
                }
                plan
            }
        };
        rec.capacity = plan.stats().capacity;
        rec.prefix_shared = plan.options.prefix_sharing;
        let plan = Arc::new(plan);
        let t = Instant::now();
        // As an engine does: the step is uploaded (`update_planned`, what packinfer_launch_update
        // runs) into a kept launch that suits it (within its capacity, on the kernel a launch
        // made for this plan would choose); a new launch, with room to grow, where none does.
        let used = match self.launches.iter().position(|l| l.bound.suits(&plan)) {
            Some(i) => {
                // SAFETY: the plan is the pool's (`KvStore::plan`/`schedule`), unchanged since.
                unsafe { self.launches[i].bound.update_planned(plan.clone(), 0)? };
                i
            }
            None => {
                if self.launches.len() == MAX_KEPT_LAUNCHES {
                    let lru = (0..self.launches.len()).min_by_key(|&i| self.launches[i].last_step).unwrap_or(0);
                    self.launches.swap_remove(lru);
                }
                let largest = self.launches.iter().fold(LaunchCapacity::default(), |c, l| c.max(&l.capacity));
                let capacity = with_headroom(&LaunchCapacity::of(&plan).max(&largest));
                let bound = self.backend.bind_with_capacity(plan.clone(), 0, None, &capacity)?;
                self.launches.push(KeptLaunch { bound, capacity, last_step: 0 });
                self.result.launches_created += 1;
                self.launches.len() - 1
            }
        };
        self.launches[used].last_step = self.result.steps.len() + 1;
        let bound = &*self.launches[used].bound;
        bound.wait()?;
        rec.bind_s = t.elapsed().as_secs_f64();
        let total_q = plan.batch.total_q() as usize;
        self.out_len = total_q * hq * d;
        let rows = RowsTensor { ptr: 0, stride_token: (hq * d) as i64, stride_head: d as i64 };
        let out_ptr = match &self.device {
            Some(dev) => dev.out_ptr(),
            None => self.out.as_mut_ptr() as u64,
        };
        let layouts = (0..config.layers).map(|layer| store.layout(layer)).collect::<Result<Vec<_>>>()?;
        let (inputs, device) = (&mut self.inputs, self.device.as_ref());
        let mut run_layers = || -> Result<()> {
            for kv in &layouts {
                let q = inputs.take(total_q * hq * d, device);
                let args = RunArgs {
                    q: RowsTensor { ptr: q, ..rows },
                    kv: *kv,
                    o: RowsTensor { ptr: out_ptr, ..rows },
                    lse: 0,
                    stream: 0,
                    logits_soft_cap: 0.0,
                    // The replay's pools hold K/V of Q's dtype.
                    kv_scales: KvScales::NONE,
                };
                // SAFETY: Q is total_q × hq × d input elements (`take`), O holds token_budget >=
                // total_q tokens' rows, K/V are the pool the plan was made from: all in the
                // backend's memory, which outlives the run (on the GPU, `time` waits for it).
                unsafe { bound.run(&args)? };
            }
            Ok(())
        };
        rec.attention_s = match device {
            // Events recorded on the stream around every layer's run.
            Some(dev) => dev.time(0, run_layers)?,
            // On the CPU the run is synchronous, so its wall time is the attention time.
            None => {
                let t = Instant::now();
                run_layers()?;
                t.elapsed().as_secs_f64()
            }
        };
        // Every `stride`-th token: a full 8192-token output is 64 MiB, whose read-back and
        // comparison between schedules took longer than the attention itself.
        let row = hq * d;
        let stride = total_q.div_ceil(CHECKED_TOKENS).max(1);
        self.checked_len = total_q.div_ceil(stride) * row;
        let checked = &mut self.checked[..self.checked_len];
        match &self.device {
            Some(dev) => dev.read_out_rows(checked, row, stride)?,
            None => {
                for (dst, src) in checked.chunks_exact_mut(row).zip(self.out[..self.out_len].chunks_exact(row).step_by(stride)) {
                    dst.copy_from_slice(src);
                }
            }
        }
        let s = plan.stats();
        rec.kv_tokens = plan.requests.iter().map(|r| r.kv_len as u64).sum();
        rec.groups = s.num_groups;
        rec.items = s.num_items;
        rec.split_requests = s.num_split_requests;
        rec.tile_utilization = s.tile_utilization;
        rec.imbalance = if s.mean_worker_cost > 0.0 { s.max_worker_cost / s.mean_worker_cost } else { 1.0 };
        if let Some(sched) = &mut self.scheduler {
            sched.record(StepTimes { attention_s: rec.attention_s, relayout_s: relayout_device_s })?;
        }
        rec.useful_pairs = plan
            .requests
            .iter()
            .map(|r| {
                let (q, k) = (r.q_len as f64, r.kv_len as f64);
                let per_head = if shape.causal { q * (k - q) + q * (q + 1.0) / 2.0 } else { q * k };
                per_head * hq as f64
            })
            .sum();
        rec.computed_pairs = if s.tile_utilization > 0.0 { rec.useful_pairs / s.tile_utilization } else { 0.0 };
        if record {
            let b = &plan.batch;
            batch.ids.clear();
            batch.ids.extend(step.iter().map(|s| s.0));
            batch.q_lens.clear();
            batch.q_lens.extend(plan.requests.iter().map(|r| r.q_len));
            batch.kv_lens.clear();
            batch.kv_lens.extend(plan.requests.iter().map(|r| r.kv_len));
            batch.page_indptr.clone_from(&b.kv_indptr);
            batch.pages.clone_from(&b.kv_page_indices);
            batch.prefix_groups.clear();
            batch.prefix_groups.extend(b.prefix_groups.iter().map(|g| (g.prefix_len, g.members.clone())));
            batch.emits.clear();
            batch.finished.clear();
        }
        self.last_plan = Some(plan);

        // Every request in the system waited for this step.
        for (r, st) in state.iter().enumerate() {
            if matches!(st, State::Waiting | State::Running { .. }) {
                self.since_token[r] += rec.total_s();
            }
        }
        let result = &mut self.result;
        for &(r, q) in &step {
            let r = r as usize;
            let req = requests[r];
            let State::Running { mut prefilled, mut produced } = state[r] else { unreachable!("scheduled requests run") };
            let produced_before = produced;
            if prefilled < req.prompt {
                prefilled += q;
                result.prefill_tokens += q as u64;
                if prefilled == req.prompt && req.generated > 0 {
                    produced = 1;
                    result.ttft_s.push(self.since_token[r]);
                    self.since_token[r] = 0.0;
                }
            } else {
                produced += 1;
                result.tbt_s.push(self.since_token[r]);
                self.since_token[r] = 0.0;
            }
            if record {
                batch.emits.push(match (produced_before, produced) {
                    (a, b) if a == b => 0,
                    (0, _) => 1,
                    _ => 2,
                });
            }
            state[r] =
                if prefilled == req.prompt && produced == req.generated { State::Done } else { State::Running { prefilled, produced } };
            if state[r] == State::Done {
                if record {
                    batch.finished.push(r as u32);
                }
                result.generated_tokens += produced as u64;
                result.finished += 1;
                store.release(r as u32)?;
            }
        }
        self.running.retain(|&r| state[r] != State::Done);
        rec.kv = store.metrics();
        result.peak_pages_used = result.peak_pages_used.max(rec.kv.pages_used);
        result.steps.push(rec);
        if let Arrivals::Timestamps { step_s, .. } = config.arrivals {
            self.clock += step_s;
        }
        if self.is_done() {
            for p in 0..self.config.num_system_prompts {
                let id = prompt_id(self.requests, p);
                self.store.release(id)?;
            }
            self.result.final_kv = self.store.metrics();
            self.result.scheduler = self.scheduler.as_ref().map(|s| s.stats());
        }
        Ok(Some(rec))
    }

    /// What the replay added up to (complete once [`Engine::is_done`]).
    pub fn into_result(self) -> RunResult {
        self.result
    }
}
