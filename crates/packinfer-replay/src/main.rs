//! `packinfer-replay`: replays a request trace through continuous batching with the library doing
//! the attention, once with PackInfer's schedule and once with one request per tile, and reports
//! what each cost on identical work. See `--help`.

mod args;
mod chart;
mod device;
mod engine;
mod record;
mod report;
mod store;

use packinfer_replay::trace;

use std::process::ExitCode;
use std::time::Instant;

use packinfer::backend::{self, BackendChoice, BackendKind};
use packinfer::kv::PoolConfig;
use packinfer::plan::scheduler::{RelayoutPolicy, SchedulerOptions};
use packinfer::plan::PlanOptions;
use packinfer::types::DType;

use args::{Args, Device, Mode, Setup};
use clap::Parser;
use engine::{Arrivals, EngineConfig, Request};
use report::Summary;
use store::PoolStore;

/// A failure and the exit status it maps to: 2 for what the user can fix in the arguments or the
/// trace, 1 for everything else.
struct Failure {
    code: u8,
    message: String,
}

fn usage(message: String) -> Failure {
    Failure { code: 2, message }
}

impl From<packinfer::Error> for Failure {
    fn from(e: packinfer::Error) -> Self {
        Failure { code: 1, message: e.to_string() }
    }
}

fn scale_len(x: u32, scale: f64) -> u32 {
    ((x as f64 * scale).round() as u32).max(1)
}

/// The replay's requests: scaled lengths and, for a seeded share of them, a system prompt.
fn requests(trace: &[trace::TraceRequest], a: &Args, s: &Setup) -> Vec<Request> {
    let mut rng = trace::Rng::new(a.seed ^ 0x5eed_5eed);
    trace
        .iter()
        .map(|t| {
            let shared = a.system_prompts > 0 && rng.uniform() < a.shared_fraction;
            let which = rng.next_u64() % a.system_prompts.max(1) as u64;
            Request {
                line: t.line,
                arrival_s: t.arrival_s,
                prompt: scale_len(t.context_tokens, s.len_scale).min(s.max_context),
                system_prompt: shared.then_some(which as u32),
                generated: t.generated_tokens.min(s.max_generated),
            }
        })
        .collect()
}

/// The pool for this replay, or an error that says what would fit: it must hold the system
/// prompts and the longest request (with its relayout headroom) at once.
fn pool_config(reqs: &[Request], a: &Args, s: &Setup, system_prompt_len: u32, prompts: u32) -> Result<PoolConfig, Failure> {
    let mut config =
        PoolConfig { num_layers: s.layers, shape: s.shape, page_size: a.page_size, num_pages: 0, headroom_pages: a.headroom_pages };
    let pages = config.pages_for_bytes(s.kv_mib << 20);
    let prompt_pages = prompts as u64 * PoolStore::pages_to_reserve(&config, system_prompt_len, 0) as u64;
    let (worst, worst_tokens, worst_pages) = reqs
        .iter()
        .map(|r| {
            let prefix = if r.system_prompt.is_some() { system_prompt_len } else { 0 };
            let tokens = prefix + r.prompt + r.generated.saturating_sub(1);
            (r, tokens, PoolStore::pages_to_reserve(&config, tokens, prefix) as u64)
        })
        .max_by_key(|&(_, _, p)| p)
        .expect("the trace has requests");
    let need = prompt_pages + worst_pages;
    // (More pages than the page tables address was refused with the other options.)
    if pages < need {
        let where_ = if worst.line > 0 { format!("trace line {}", worst.line) } else { "a synthetic request".into() };
        let fits_tokens = pages.saturating_sub(prompt_pages + a.headroom_pages as u64) * a.page_size as u64;
        return Err(usage(format!(
            "the model shape does not fit the KV pool: {} MiB holds {pages} pages of {} tokens = {} tokens at {} bytes per token \
             ({} layers x K and V x {} KV heads x head_dim {} x {} bytes); the {prompts} system prompts take {prompt_pages} pages and the \
             longest request ({where_}) needs {worst_tokens} tokens = {worst_pages} pages with {} pages of headroom. What would fit: \
             --kv-mib {} or more, or requests of at most {fits_tokens} tokens (lower --max-context / --max-generated / --len-scale), \
             or fewer --layers or KV heads.",
            s.kv_mib,
            a.page_size,
            pages * a.page_size as u64,
            config.token_bytes_all_layers(),
            s.layers,
            s.shape.num_kv_heads,
            s.shape.head_dim,
            s.shape.dtype.size_bytes(),
            a.headroom_pages,
            (need as u128 * config.page_bytes_all_layers() as u128).div_ceil(1 << 20),
        )));
    }
    config.num_pages = pages as u32;
    Ok(config)
}

/// Largest difference two schedules' outputs may show: a few bf16 rounding steps of values of
/// magnitude about 1 (split pieces are merged in another order than one pass accumulates).
const OUTPUT_TOLERANCE: f32 = 0.03;

/// Seconds between the plain progress lines of a replay whose stderr is not a terminal.
const PROGRESS_EVERY_S: f64 = 30.0;

fn max_abs_difference(a: &[u16], b: &[u16], dtype: DType) -> f32 {
    let value = |x: u16| match dtype {
        DType::F16 => half::f16::from_bits(x).to_f32(),
        _ => half::bf16::from_bits(x).to_f32(),
    };
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter().zip(b).map(|(&x, &y)| (value(x) - value(y)).abs()).fold(0.0, f32::max)
}

/// What PackInfer's schedule is made of, as the options left it (`--without`, `--relayout`,
/// `--capacity`).
fn packinfer_banner(a: &Args) -> String {
    let o = &a.options;
    let mut parts: Vec<String> = Vec::new();
    if !(o.packing || o.balancing || o.prefix_sharing || o.split_kv) {
        parts.push("one request per tile (every plan technique off)".into());
    } else {
        for (on, what) in [
            (o.packing, "packed tiles"),
            (o.balancing, "load-balanced groups"),
            (o.split_kv, "KV splits"),
            (o.prefix_sharing, "shared prefixes read once"),
        ] {
            if on {
                parts.push(what.into());
            }
        }
    }
    let s = &a.scheduler;
    parts.push(match s.relayout {
        RelayoutPolicy::Never => "KV left where the pages fell".into(),
        RelayoutPolicy::CostModel => "group-contiguous KV where the relayout cost model predicts a net gain".into(),
        RelayoutPolicy::Always => "group-contiguous KV whenever the trigger fires or headroom runs out".into(),
    });
    parts.push(if s.regroup { "regroup when the trigger fires".into() } else { "no kept grouping (groups new every step)".into() });
    parts.push(match a.capacity_factor {
        None if s.tune_capacity => "capacity tuned online".to_string(),
        None => "automatic capacity".to_string(),
        Some(f) => format!("capacity {f} x each step's automatic capacity"),
    });
    let mut line = parts.join(", ");
    if !a.without.is_empty() {
        line.push_str(&format!(" (--without {})", a.without.join(",")));
    }
    line
}

fn run() -> Result<(), Failure> {
    // clap prints --help (exit status 0) and its own errors (exit status 2) and exits.
    let a = args::validate(args::Cli::parse())?;

    // The GPU: the CUDA backend holds each schedule's KV pool in device memory, the step's
    // inputs and output are device buffers (`device.rs`) and attention is timed with events.
    const ORDINAL: u32 = 0;
    let cuda = match a.device {
        Device::Cpu => Err(packinfer::Error::NoDevice("not asked for".into())),
        _ => {
            backend::open(&BackendChoice { kind: Some(BackendKind::Cuda), device_ordinal: ORDINAL, cpu_threads: 0, kernel_cache_dir: None })
        }
    };
    let backend = match (a.device, cuda) {
        (_, Ok(b)) => b,
        (Device::Gpu, Err(e)) => return Err(Failure { code: 1, message: format!("--device gpu: {e}") }),
        (d, Err(e)) => {
            if d == Device::Auto {
                eprintln!("note: no usable GPU ({e}); replaying on the CPU");
            }
            backend::open(&BackendChoice {
                kind: Some(BackendKind::Cpu),
                device_ordinal: 0,
                cpu_threads: a.threads,
                kernel_cache_dir: None,
            })?
        }
    };
    let gpu = backend.kind() == BackendKind::Cuda;
    let s = a.setup(gpu)?;

    let (trace_name, trace) = match &a.trace {
        Some(path) => {
            let name = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|e| usage(format!("cannot read the trace {name}: {e}")))?;
            let t = trace::parse_csv(&name, &text, Some(s.requests)).map_err(|e| usage(e.0))?;
            (format!("{name} (first {} rows)", t.len()), t)
        }
        None => (
            "built-in synthetic trace (long-tailed lengths, Poisson arrivals at 10/s)".to_string(),
            trace::synthetic(s.requests, a.seed, 10.0),
        ),
    };
    let reqs = requests(&trace, &a, &s);
    let shared = reqs.iter().filter(|r| r.system_prompt.is_some()).count();
    let prompts = if shared > 0 { a.system_prompts } else { 0 };
    let system_prompt_len = scale_len(a.system_prompt_len, s.len_scale);
    let pool = pool_config(&reqs, &a, &s, system_prompt_len, prompts)?;

    let arrivals =
        if a.arrivals_trace { Arrivals::Timestamps { speedup: a.speedup, step_s: a.step_ms / 1e3 } } else { Arrivals::AllAtOnce };
    let base = EngineConfig {
        shape: s.shape,
        layers: s.layers,
        token_budget: s.token_budget,
        max_batch: s.max_batch,
        arrivals,
        options: PlanOptions::default(),
        scheduler: None,
        system_prompt_len,
        num_system_prompts: prompts,
        seed: a.seed,
        device_ordinal: gpu.then_some(ORDINAL),
        record_batches: a.record_batches,
    };
    let baseline_options =
        PlanOptions { packing: false, balancing: false, prefix_sharing: false, split_kv: false, ..PlanOptions::default() };
    let mut schedules: Vec<(&str, PlanOptions, Option<SchedulerOptions>)> = Vec::new();
    if a.mode != Mode::Baseline {
        schedules.push(("PackInfer", a.options.clone(), Some(a.scheduler.clone())));
        if a.ablation {
            let s = &a.scheduler;
            let fixed = SchedulerOptions { tune_capacity: false, capacity_factor: 1.0, ..s.clone() };
            schedules.push(("no tuning", a.options.clone(), Some(fixed)));
            schedules.push(("no regroup", a.options.clone(), Some(SchedulerOptions { regroup: false, ..s.clone() })));
            schedules.push(("no relayout", a.options.clone(), Some(SchedulerOptions { relayout: RelayoutPolicy::Never, ..s.clone() })));
            schedules.push((
                "relayout always",
                a.options.clone(),
                Some(SchedulerOptions { relayout: RelayoutPolicy::Always, ..s.clone() }),
            ));
            let off = SchedulerOptions {
                tune_capacity: false,
                capacity_factor: 1.0,
                regroup: false,
                relayout: RelayoutPolicy::Never,
                ..s.clone()
            };
            schedules.push(("no adaptive", a.options.clone(), Some(off)));
        }
    }
    if a.mode != Mode::PackInfer {
        schedules.push(("baseline", baseline_options, None));
    }

    let threads = match (gpu, backend.profile().num_workers) {
        (true, n) => format!("planned for {n} resident CTAs; attention timed with CUDA events"),
        (false, 1) => "1 thread".to_string(),
        (false, n) => format!("{n} threads"),
    };
    println!("PackInfer replay: {} requests from the {trace_name}", reqs.len());
    println!(
        "backend: {} ({threads}) | model: {} query heads / {} KV heads, head_dim {}, {}, {} layers",
        backend.device_name(),
        s.shape.num_qo_heads,
        s.shape.num_kv_heads,
        s.shape.head_dim,
        s.shape.dtype.name(),
        s.layers
    );
    if !gpu && !s.full_shape || s.len_scale != 1.0 {
        println!(
            "SCALED DOWN for the CPU: trace lengths x {}, prompts capped at {} tokens, outputs at {}; the full 32/8/128 shape with 32 layers and unscaled lengths is what --device gpu runs",
            s.len_scale, s.max_context, s.max_generated
        );
    }
    println!(
        "engine: continuous batching, {} tokens per step (chunked prefill + decode), up to {} requests per step, {}",
        s.token_budget,
        s.max_batch,
        match arrivals {
            Arrivals::AllAtOnce => "every request waiting at the start".to_string(),
            Arrivals::Timestamps { speedup, step_s } =>
                format!("arrivals at trace timestamps / {speedup} on a virtual clock of {} ms per step", step_s * 1e3),
        }
    );
    if prompts > 0 {
        println!("shared prefixes: {shared} of {} requests start with one of {prompts} system prompts of {system_prompt_len} tokens (KV forked, not recomputed)", reqs.len());
    }
    println!(
        "KV: the library's managed pool, {}-token pages, {} MiB = {} pages, {} headroom page(s) per sequence in a laid-out group",
        a.page_size, s.kv_mib, pool.num_pages, a.headroom_pages
    );
    println!("PackInfer: {}", packinfer_banner(&a));
    println!("baseline: the same replay with one request per tile, one group per tile, no prefix sharing, no splits, KV left where the pages fell");
    println!("TIMES ARE THE ATTENTION STAGE ONLY: no projections, MLP or sampling. The headline total adds up planning, the launch update, KV writes, relayout copies and attention (the backend's run calls for every layer); so do the step-time, TTFT, TBT and tokens/s rows (TTFT and TBT add up the steps a request waited through); the attention rows are attention alone.");
    println!();

    // The schedules run interleaved, step by step, alternating which goes first, so a change in
    // the machine's load (other processes) hits both alike.
    let bars = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len} requests done, {msg} ({elapsed})")
        .expect("a valid template")
        .progress_chars("=> ");
    let fail = |message: String| Failure { code: 1, message };
    if a.record_batches {
        std::fs::create_dir_all(&a.out).map_err(|e| fail(format!("cannot create --out {}: {e}", a.out.display())))?;
    }
    let device_name = backend.device_name();
    let mut engines = Vec::new();
    let mut recorders = Vec::new();
    for (name, options, scheduler) in &schedules {
        let config = EngineConfig { options: options.clone(), scheduler: scheduler.clone(), ..base.clone() };
        let store = PoolStore::new(backend.clone(), pool)?;
        let bar = bars.add(indicatif::ProgressBar::new(reqs.len() as u64).with_style(style.clone()));
        bar.set_prefix(name.to_string());
        engines.push((*name, engine::Engine::new(&reqs, config, Box::new(store), backend.as_ref())?, bar));
        if a.record_batches {
            let header = record::Header {
                schedule: name,
                shape: s.shape,
                layers: s.layers,
                page_size: a.page_size,
                num_pages: pool.num_pages,
                requests: reqs.len(),
                arrivals: if a.arrivals_trace { "trace" } else { "all" },
                trace: &trace_name,
                device: &device_name,
            };
            recorders.push(record::Recorder::create(&a.out, &header).map_err(fail)?);
        }
    }
    let started = Instant::now();
    // Without a terminal (a log file, a remote run cut off by a time limit) the bars do not show:
    // a line now and then says how far the replay got.
    let plain_progress = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_progress = Instant::now();
    let mut round = 0usize;
    // Both schedules compute the same attention from the same inputs: checked every step.
    let mut max_difference = 0f32;
    while engines.iter().any(|e| !e.1.is_done()) {
        let k = engines.len();
        for i in 0..k {
            let (_, engine, bar) = &mut engines[(i + round) % k];
            if let Some(rec) = engine.step()? {
                bar.set_position(engine.finished() as u64);
                bar.set_message(format!("step {}", rec.step + 1));
                if let Some(r) = recorders.get_mut((i + round) % k) {
                    r.step(&rec, engine.last_batch()).map_err(fail)?;
                }
            }
        }
        if let [a, rest @ ..] = &engines[..] {
            for b in rest {
                let d = max_abs_difference(a.1.last_output(), b.1.last_output(), a.1.dtype());
                if d.is_nan() || d > OUTPUT_TOLERANCE {
                    return Err(Failure {
                        code: 1,
                        message: format!(
                            "internal error: at step {round} the schedules {} and {}'s attention outputs differ by {d} (more than {OUTPUT_TOLERANCE})",
                            a.0, b.0
                        ),
                    });
                }
                max_difference = max_difference.max(d);
            }
        }
        round += 1;
        if plain_progress && last_progress.elapsed().as_secs_f64() >= PROGRESS_EVERY_S {
            last_progress = Instant::now();
            let done: Vec<String> = engines.iter().map(|(n, e, _)| format!("{n} {}", e.finished())).collect();
            eprintln!("[{:.0} s] round {round}: requests finished of {}: {}", started.elapsed().as_secs_f64(), reqs.len(), done.join(", "));
        }
    }
    bars.clear().ok();
    let mut results = Vec::new();
    for (name, engine, _) in engines {
        results.push((name, engine.into_result()));
    }
    eprintln!("replayed {} steps per schedule in {:.1} s wall time", results[0].1.steps.len(), started.elapsed().as_secs_f64());
    if let [first, rest @ ..] = &results[..] {
        let same = rest.iter().all(|(_, r)| {
            first.1.steps.len() == r.steps.len() && first.1.steps.iter().zip(&r.steps).all(|(x, y)| x.work_digest == y.work_digest)
        });
        if !same {
            return Err(Failure { code: 1, message: "internal error: the two replays did not schedule the same work".into() });
        }
    }

    let summaries: Vec<Summary> = results.iter().map(|(n, r)| Summary::new(n, r)).collect();
    print!("{}", report::table(&summaries));
    if results.len() == 2 {
        println!("(gain: how many times better PackInfer is than the baseline on the same steps; above 1 is better)");
    }
    if results.len() >= 2 {
        println!(
            "{} computed the same attention: max |difference| of the outputs = {max_difference:.2e} ({} outputs, last layer of every step, up to {} evenly spaced tokens of each)",
            if results.len() == 2 { "both schedules" } else { "every schedule" },
            s.shape.dtype.name(),
            engine::CHECKED_TOKENS
        );
    }
    for (name, r) in &results {
        if let Some(text) = report::scheduler_report(name, r) {
            print!("{text}");
        }
    }
    if a.ablation {
        print!("{}", report::ablation(&summaries));
    }
    if backend.kind() == BackendKind::Cpu {
        println!(
            "note: the CPU reference backend computes only the real rows of a tile and hands work items to its threads one by one, \
             so packed tiles and balanced groups, which pay on a GPU, have little to win on it; the tile utilization, work items, \
             imbalance and KV bytes rows show what the schedule changed."
        );
    }

    std::fs::create_dir_all(&a.out).map_err(|e| Failure { code: 1, message: format!("cannot create --out {}: {e}", a.out.display()) })?;
    let write = |file: &str, bytes: &[u8]| -> Result<(), Failure> {
        let p = a.out.join(file);
        std::fs::write(&p, bytes).map_err(|e| Failure { code: 1, message: format!("cannot write {}: {e}", p.display()) })
    };
    let runs: Vec<(&str, &[engine::StepRecord])> = results.iter().map(|(n, r)| (*n, &r.steps[..])).collect();
    write("steps.csv", report::steps_csv(&runs).as_bytes())?;
    write("summary.csv", report::summary_csv(&summaries).as_bytes())?;
    let names: Vec<String> = summaries.iter().map(|x| legend_name(x, &summaries[0])).collect();
    let series: Vec<(&str, Vec<f64>)> =
        results.iter().zip(&names).map(|((_, r), name)| (name.as_str(), r.steps.iter().map(|x| x.total_s() * 1e3).collect())).collect();
    write(
        "steps.png",
        &chart::step_chart(
            &chart_title(&summaries),
            &format!("{trace_name}, {} layers, {}", s.layers, backend.device_name()),
            "ms per step, all costs (log scale)",
            &series,
        ),
    )?;
    println!("\nwrote {0}/steps.csv, {0}/summary.csv, {0}/steps.png", a.out.display());
    for r in recorders {
        let path = r.finish().map_err(fail)?;
        println!("wrote {} (every step's batch and costs; bench/replay_anchors.py replays it)", path.display());
    }
    Ok(())
}

/// "Total, all costs: PackInfer 1.23 s, baseline 1.50 s = 1.22x PackInfer's": the first
/// schedule against the last (the baseline; the legend has the others).
fn chart_title(summaries: &[Summary]) -> String {
    match summaries {
        [first, .., last] if first.total_s > 0.0 => format!(
            "Total, all costs: {} {:.3} s, {} {:.3} s = {:.2}x {}'s",
            first.name,
            first.total_s,
            last.name,
            last.total_s,
            last.total_s / first.total_s,
            first.name
        ),
        _ => summaries.iter().map(|s| format!("{} {:.3} s", s.name, s.total_s)).collect::<Vec<_>>().join(", "),
    }
}

/// A schedule's name in the chart's legend, with its total and its multiple of the first's.
fn legend_name(s: &Summary, first: &Summary) -> String {
    if std::ptr::eq(s, first) || first.total_s <= 0.0 {
        format!("{} {:.3} s", s.name, s.total_s)
    } else {
        format!("{} {:.3} s ({:.2}x)", s.name, s.total_s, s.total_s / first.total_s)
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
