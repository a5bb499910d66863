//! The replay's command line: clap parses it ([`Cli`]), [`validate`] checks every value before
//! anything runs, and [`Args::setup`] fills in the defaults of the device the replay got.
//!
//! Every option is checked here. [`validate`] runs before the backend opens, so a bad value is
//! reported the same with or without a GPU; [`Args::setup`] checks only what a device's defaults
//! take part in (pool pages, sequence and step sizes), before the trace is read or a pool
//! allocated. Any bad value: exit status 2 and one line naming the option. What is left for
//! later needs the trace: its rows (`trace.rs`) and whether its longest request fits the pool
//! (`pool_config`, which says what would).

use std::fmt::Display;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Parser, ValueEnum};
use packinfer::plan::scheduler::{RelayoutPolicy, SchedulerOptions};
use packinfer::plan::PlanOptions;
use packinfer::types::{DType, Shape};

use crate::{usage, Failure};

const ABOUT: &str = "\
packinfer-replay: replay an LLM request trace through continuous batching, with PackInfer's
planner and attention backend doing the work, against a one-request-per-tile baseline.";

const AFTER_HELP: &str = "Exit status: 0 done, 2 bad arguments, trace or model shape that does not fit, 1 other errors.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    Auto,
    Cpu,
    #[value(alias = "cuda")]
    Gpu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Both,
    #[value(name = "packinfer")]
    PackInfer,
    Baseline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ArrivalsArg {
    All,
    Trace,
}

// Only the 16-bit types: the replay writes 16-bit K/V.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DTypeArg {
    Bf16,
    #[value(alias = "fp16")]
    F16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Technique {
    Packing,
    Balancing,
    PrefixSharing,
    SplitKv,
    /// The adaptive parts (the scheduler's).
    Tuning,
    Regroup,
    Relayout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RelayoutArg {
    CostModel,
    Always,
    Never,
}

/// `--capacity`: `None` = tuned online, else a factor of each step's automatic capacity.
#[derive(Debug, Clone, Copy)]
struct Capacity(Option<f64>);

fn parse_capacity(v: &str) -> Result<Capacity, String> {
    match v {
        "tuned" => Ok(Capacity(None)),
        "auto" => Ok(Capacity(Some(1.0))),
        _ => v.parse().map(|f| Capacity(Some(f))).map_err(|_| "not tuned, auto or a number".to_string()),
    }
}

/// `--heads Q/KV`; the values are checked in [`validate`].
fn parse_heads(v: &str) -> Result<(u32, u32), String> {
    let (q, kv) = v.split_once('/').ok_or("write query/KV heads, e.g. 32/8")?;
    let n = |x: &str| x.parse::<u32>().map_err(|e| format!("{x:?}: {e}; write query/KV heads, e.g. 32/8"));
    Ok((n(q)?, n(kv)?))
}

/// The command line as typed. `None`: the default for the device (see [`Args::setup`]).
/// Numbers accept a leading minus so that a negative value reaches [`validate`], whose message
/// says what the option takes, instead of being taken for an option.
#[derive(Debug, Parser)]
#[command(
    name = "packinfer-replay",
    about = ABOUT,
    after_help = AFTER_HELP,
    help_template = "{about}\n\nusage: {usage}\n\n{all-args}{after-help}",
    // As the hand-written parser did: a repeated option's last value wins.
    args_override_self = true
)]
pub struct Cli {
    #[arg(
        value_name = "TRACE.csv",
        help = "columns TIMESTAMP,ContextTokens,GeneratedTokens (the Azure LLM inference trace's);\nwithout it a built-in synthetic trace with a long-tailed length mix is replayed"
    )]
    trace: Option<PathBuf>,
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        help = "requests to replay: the first N rows, or N synthetic ones [default: cpu 300, gpu 2000]"
    )]
    requests: Option<usize>,
    #[arg(
        long,
        value_enum,
        value_name = "all|trace",
        hide_possible_values = true,
        default_value = "all",
        help = "all: every request waits at the start (saturated engine);\ntrace: requests arrive at their timestamps on a virtual clock"
    )]
    arrivals: ArrivalsArg,
    #[arg(
        long,
        value_name = "X",
        default_value_t = 1.0,
        allow_negative_numbers = true,
        help = "with --arrivals trace: replay the timestamps X times faster"
    )]
    speedup: f64,
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 20.0,
        allow_negative_numbers = true,
        help = "with --arrivals trace: virtual time of one engine step"
    )]
    step_ms: f64,
    #[arg(
        long,
        value_enum,
        value_name = "both|packinfer|baseline",
        hide_possible_values = true,
        default_value = "both",
        help = "which schedules to replay"
    )]
    mode: Mode,
    #[arg(long, value_enum, value_name = "auto|cpu|gpu", hide_possible_values = true, default_value = "auto", overrides_with_all = ["cpu", "gpu"], help = "auto: the GPU when the CUDA backend is usable, else the CPU")]
    device: Device,
    // Short forms of --device that the hand-written parser took; the last of the three wins.
    #[arg(long, hide = true, overrides_with_all = ["device", "gpu"])]
    cpu: bool,
    #[arg(long, hide = true, overrides_with_all = ["device", "cpu"])]
    gpu: bool,
    #[arg(long, value_name = "N", allow_negative_numbers = true, help = "attention layers run per step [default: cpu 2, gpu 32]")]
    layers: Option<u32>,
    #[arg(long, value_name = "Q/KV", value_parser = parse_heads, help = "query heads / KV heads [default: cpu 8/2, gpu 32/8]")]
    heads: Option<(u32, u32)>,
    #[arg(long, value_name = "D", allow_negative_numbers = true, help = "head dimension [default: cpu 64, gpu 128]")]
    head_dim: Option<u32>,
    #[arg(
        long,
        value_enum,
        value_name = "bf16|f16",
        hide_possible_values = true,
        default_value = "bf16",
        help = "element type of Q, K, V and the output"
    )]
    dtype: DTypeArg,
    #[arg(
        long,
        value_name = "F",
        allow_negative_numbers = true,
        help = "multiply trace lengths (prompts, system prompts) by F [default: cpu 0.0625, gpu 1]"
    )]
    len_scale: Option<f64>,
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        help = "cap on a request's prompt after scaling [default: cpu 1024, gpu 16384]"
    )]
    max_context: Option<u32>,
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        help = "cap on a request's generated tokens [default: cpu 128, gpu 2048]"
    )]
    max_generated: Option<u32>,
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        help = "tokens per step, chunked prefill plus decode [default: cpu 512, gpu 8192]"
    )]
    token_budget: Option<u32>,
    #[arg(long, value_name = "N", allow_negative_numbers = true, help = "requests per step [default: cpu 64, gpu 256]")]
    max_batch: Option<u32>,
    #[arg(long, value_name = "N", default_value_t = 4, allow_negative_numbers = true, help = "shared system prompts (0: none)")]
    system_prompts: u32,
    #[arg(
        long,
        value_name = "F",
        default_value_t = 0.3,
        allow_negative_numbers = true,
        help = "fraction of requests that start with one of them"
    )]
    shared_fraction: f64,
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1024,
        allow_negative_numbers = true,
        help = "their length in trace tokens, scaled by --len-scale"
    )]
    system_prompt_len: u32,
    #[arg(long, value_name = "N", default_value_t = 16, allow_negative_numbers = true, help = "tokens per KV page")]
    page_size: u32,
    #[arg(
        long,
        value_name = "N",
        default_value_t = 2,
        allow_negative_numbers = true,
        help = "empty pages after each sequence in a laid-out group, for its next tokens"
    )]
    headroom_pages: u32,
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        help = "KV pool size in MiB, all layers, per schedule (each has its own pool)\n[default: cpu 64, gpu 24576]"
    )]
    kv_mib: Option<u64>,
    #[arg(
        long,
        value_name = "tuned|auto|F",
        value_parser = parse_capacity,
        default_value = "tuned",
        allow_negative_numbers = true,
        help = "PackInfer's capacity (costlier pieces are split): tuned online from step times,\nauto (each step's total cost over twice the workers), or F times auto"
    )]
    capacity: Capacity,
    #[arg(
        long,
        value_name = "LIST",
        value_enum,
        value_delimiter = ',',
        help = "PackInfer techniques to switch off, comma-separated (ablations) [default: none]:\npacking, balancing, prefix-sharing, split-kv (the plan), tuning, regroup, relayout (adaptive)"
    )]
    without: Vec<Technique>,
    #[arg(
        long,
        value_enum,
        value_name = "cost-model|always|never",
        hide_possible_values = true,
        default_value = "cost-model",
        help = "when PackInfer moves KV pages: where the cost model predicts a net gain, whenever the\ntrigger fired or headroom ran out (the old rule), or never"
    )]
    relayout: RelayoutArg,
    #[arg(
        long,
        help = "also replay PackInfer with each adaptive part off (tuning, regroup, relayout), with\nrelayout always, and with all adaptive parts off, and report each part's net effect\n(7 schedules, each with its own KV pool: on one GPU give --kv-mib 8192 or less)"
    )]
    ablation: bool,
    #[arg(long, value_name = "N", default_value_t = 0, allow_negative_numbers = true, help = "CPU backend threads (0: every core)")]
    threads: u32,
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        allow_negative_numbers = true,
        help = "seeds the synthetic trace, the shared prompts and the inputs"
    )]
    seed: u64,
    #[arg(
        long,
        value_name = "DIR",
        default_value = "replay-out",
        help = "where steps.csv, summary.csv, steps.png (and batches-*.jsonl) go"
    )]
    out: PathBuf,
    #[arg(
        long,
        help = "also write each step's exact batch and costs to DIR/batches-<schedule>.jsonl: a header line\n(shape, layers, page size), then one JSON line per step: request ids, query and KV\nlengths, tokens produced, page tables as runs of consecutive pages relative to the\nrequest's previous table, prefix groups, and planning, launch update, KV write, relayout\nand attention seconds. bench/replay_anchors.py replays it through FlashInfer and\nFlashAttention (format: bench/README.md)"
    )]
    record_batches: bool,
}

/// Checked command-line settings; `None` means "the default for the device".
#[derive(Debug, Clone)]
pub struct Args {
    pub trace: Option<PathBuf>,
    pub requests: Option<usize>,
    pub arrivals_trace: bool,
    pub speedup: f64,
    pub step_ms: f64,
    pub mode: Mode,
    pub device: Device,
    pub layers: Option<u32>,
    pub heads: Option<(u32, u32)>,
    pub head_dim: Option<u32>,
    pub dtype: DType,
    pub len_scale: Option<f64>,
    pub max_context: Option<u32>,
    pub max_generated: Option<u32>,
    pub token_budget: Option<u32>,
    pub max_batch: Option<u32>,
    pub system_prompts: u32,
    pub shared_fraction: f64,
    pub system_prompt_len: u32,
    pub page_size: u32,
    pub headroom_pages: u32,
    pub kv_mib: Option<u64>,
    pub capacity_factor: Option<f64>,
    /// PackInfer's plan options (`--without` switches techniques off).
    pub options: PlanOptions,
    /// PackInfer's scheduler (`--without tuning,regroup,relayout`, `--relayout`, `--capacity`).
    pub scheduler: SchedulerOptions,
    /// What `--without` switched off, as typed (for the banner).
    pub without: Vec<String>,
    pub ablation: bool,
    pub threads: u32,
    pub seed: u64,
    pub out: PathBuf,
    pub record_batches: bool,
}

/// Page tables, request and step indices are int32 in the library; counts and sizes the replay
/// derives from the options stay within this so none of its u32 sums can wrap.
const INT32_MAX: u64 = i32::MAX as u64;

fn bad(name: &str, value: impl Display, why: impl Display) -> Failure {
    usage(format!("{name} = {value} {why}"))
}

/// A count that cannot be 0 (`None`: the device's default, which is not).
fn nonzero<T: Copy + Default + PartialEq + Display>(name: &str, v: Option<T>) -> Result<(), Failure> {
    match v {
        Some(x) if x == T::default() => Err(bad(name, x, "must be greater than 0")),
        _ => Ok(()),
    }
}

fn at_most_int32(name: &str, v: Option<u64>, what: &str) -> Result<(), Failure> {
    match v {
        Some(x) if x > INT32_MAX => Err(bad(name, x, format_args!("is more {what} than the library's int32 indices hold ({INT32_MAX})"))),
        _ => Ok(()),
    }
}

/// `x` as typed, more or less: Display writes 1e-322 with 300 zeros.
fn real(x: f64) -> String {
    let s = x.to_string();
    if s.len() > 24 {
        format!("{x:e}")
    } else {
        s
    }
}

/// A real number that must be finite and above 0: NaN compares false with everything, so a NaN
/// speedup or step never lets the virtual clock reach an arrival (the replay spun forever).
fn positive_finite(name: &str, v: Option<f64>) -> Result<(), Failure> {
    match v {
        Some(x) if !(x.is_finite() && x > 0.0) => Err(bad(name, real(x), "must be a finite number greater than 0")),
        _ => Ok(()),
    }
}

/// Checks every option's value, and that `--out` can be written, before anything runs.
pub fn validate(cli: Cli) -> Result<Args, Failure> {
    nonzero("--requests", cli.requests)?;
    at_most_int32("--requests", cli.requests.map(|n| n as u64), "requests")?;
    positive_finite("--speedup", Some(cli.speedup))?;
    positive_finite("--step-ms", Some(cli.step_ms))?;
    if cli.step_ms / 1e3 == 0.0 {
        // A step of 0 s after the conversion would stall the virtual clock as NaN does.
        return Err(bad("--step-ms", real(cli.step_ms), "is too small to advance the virtual clock"));
    }
    nonzero("--layers", cli.layers)?;
    if cli.heads.is_some() || cli.head_dim.is_some() {
        // Whether a shape is valid does not depend on which device's default fills in the part
        // not given (the defaults are valid for either), so only the given options are named.
        let (q, kv) = cli.heads.unwrap_or((8, 2));
        let d = cli.head_dim.unwrap_or(64);
        let named = match (cli.heads, cli.head_dim) {
            (Some(_), Some(_)) => format!("--heads {q}/{kv} --head-dim {d}"),
            (Some(_), None) => format!("--heads = {q}/{kv}"),
            _ => format!("--head-dim = {d}"),
        };
        shape(q, kv, d, DType::Bf16).validate().map_err(|e| usage(format!("{named}: {e}")))?;
    }
    positive_finite("--len-scale", cli.len_scale)?;
    nonzero("--max-context", cli.max_context)?;
    nonzero("--max-generated", cli.max_generated)?;
    nonzero("--token-budget", cli.token_budget)?;
    at_most_int32("--token-budget", cli.token_budget.map(u64::from), "tokens")?;
    nonzero("--max-batch", cli.max_batch)?;
    at_most_int32("--system-prompts", Some(cli.system_prompts.into()), "system prompts")?;
    if !(0.0..=1.0).contains(&cli.shared_fraction) {
        return Err(bad("--shared-fraction", real(cli.shared_fraction), "must be between 0 and 1"));
    }
    nonzero("--system-prompt-len", Some(cli.system_prompt_len))?;
    nonzero("--page-size", Some(cli.page_size))?;
    at_most_int32("--page-size", Some(cli.page_size.into()), "tokens")?;
    at_most_int32("--headroom-pages", Some(cli.headroom_pages.into()), "pages")?;
    nonzero("--kv-mib", cli.kv_mib)?;
    if let Some(m) = cli.kv_mib {
        if m.checked_mul(1 << 20).is_none() {
            return Err(bad("--kv-mib", m, "MiB is more bytes than 64 bits count"));
        }
    }
    positive_finite("--capacity", cli.capacity.0)?;
    probe_out(&cli.out)?;

    let mut options = PlanOptions::default();
    let mut scheduler = SchedulerOptions {
        tune_capacity: cli.capacity.0.is_none(),
        capacity_factor: cli.capacity.0.unwrap_or(1.0),
        relayout: match cli.relayout {
            RelayoutArg::CostModel => RelayoutPolicy::CostModel,
            RelayoutArg::Always => RelayoutPolicy::Always,
            RelayoutArg::Never => RelayoutPolicy::Never,
        },
        ..SchedulerOptions::default()
    };
    for t in &cli.without {
        match t {
            Technique::Packing => options.packing = false,
            Technique::Balancing => options.balancing = false,
            Technique::PrefixSharing => options.prefix_sharing = false,
            Technique::SplitKv => options.split_kv = false,
            Technique::Tuning => {
                scheduler.tune_capacity = false;
            }
            Technique::Regroup => scheduler.regroup = false,
            Technique::Relayout => scheduler.relayout = RelayoutPolicy::Never,
        }
    }
    let mut without: Vec<String> = Vec::new();
    for t in &cli.without {
        let name = t.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default();
        if !without.contains(&name) {
            without.push(name);
        }
    }
    Ok(Args {
        trace: cli.trace,
        requests: cli.requests,
        arrivals_trace: cli.arrivals == ArrivalsArg::Trace,
        speedup: cli.speedup,
        step_ms: cli.step_ms,
        mode: cli.mode,
        // clap keeps only the last of --device, --cpu and --gpu.
        device: if cli.cpu {
            Device::Cpu
        } else if cli.gpu {
            Device::Gpu
        } else {
            cli.device
        },
        layers: cli.layers,
        heads: cli.heads,
        head_dim: cli.head_dim,
        dtype: match cli.dtype {
            DTypeArg::Bf16 => DType::Bf16,
            DTypeArg::F16 => DType::F16,
        },
        len_scale: cli.len_scale,
        max_context: cli.max_context,
        max_generated: cli.max_generated,
        token_budget: cli.token_budget,
        max_batch: cli.max_batch,
        system_prompts: cli.system_prompts,
        shared_fraction: cli.shared_fraction,
        system_prompt_len: cli.system_prompt_len,
        page_size: cli.page_size,
        headroom_pages: cli.headroom_pages,
        kv_mib: cli.kv_mib,
        capacity_factor: cli.capacity.0,
        options,
        scheduler,
        without,
        ablation: cli.ablation,
        threads: cli.threads,
        seed: cli.seed,
        out: cli.out,
        record_batches: cli.record_batches,
    })
}

/// Creates `dir` and a file in it, then removes what it made: a replay runs for minutes and
/// should not fail only when writing its results, and a failed replay leaves no output behind.
fn probe_out(dir: &Path) -> Result<(), Failure> {
    let probe = dir.join(format!(".packinfer-replay-probe-{}", std::process::id()));
    let mut attempts = 0;
    loop {
        // The directories the probe creates, deepest first, so they can be removed again.
        let missing: Vec<&Path> =
            dir.ancestors().take_while(|p| !p.as_os_str().is_empty() && std::fs::symlink_metadata(p).is_err()).collect();
        let result = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::OpenOptions::new().write(true).create_new(true).open(&probe)?.write_all(b"probe"));
        let _ = std::fs::remove_file(&probe);
        for d in &missing {
            let _ = std::fs::remove_dir(d);
        }
        attempts += 1;
        match result {
            // Another replay probing the same new directory may remove it between our
            // create_dir_all and our file: try again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 3 => continue,
            r => return r.map_err(|e| bad("--out", dir.display(), format_args!("cannot be created or written: {e}"))),
        }
    }
}

fn shape(q: u32, kv: u32, head_dim: u32, dtype: DType) -> Shape {
    Shape { num_qo_heads: q, num_kv_heads: kv, head_dim, dtype, kv_dtype: dtype, causal: true, sm_scale: 1.0 / (head_dim as f32).sqrt() }
}

/// Everything the replay runs with, defaults filled in for the device.
pub struct Setup {
    pub shape: Shape,
    pub layers: u32,
    pub full_shape: bool,
    pub len_scale: f64,
    pub max_context: u32,
    pub max_generated: u32,
    pub token_budget: u32,
    pub max_batch: u32,
    pub kv_mib: u64,
    pub requests: usize,
}

impl Args {
    /// Fills in the defaults for the device and checks the sizes they take part in.
    pub fn setup(&self, gpu: bool) -> Result<Setup, Failure> {
        let pick = |v: Option<u32>, cpu: u32, g: u32| v.unwrap_or(if gpu { g } else { cpu });
        let (q, kv) = self.heads.unwrap_or(if gpu { (32, 8) } else { (8, 2) });
        let head_dim = pick(self.head_dim, 64, 128);
        let shape = shape(q, kv, head_dim, self.dtype);
        shape.validate().map_err(|e| usage(format!("model shape --heads {q}/{kv} --head-dim {head_dim}: {e}")))?;
        let s = Setup {
            shape,
            layers: pick(self.layers, 2, 32),
            full_shape: (q, kv, head_dim) == (32, 8, 128),
            len_scale: self.len_scale.unwrap_or(if gpu { 1.0 } else { 1.0 / 16.0 }),
            max_context: pick(self.max_context, 1024, 16384),
            max_generated: pick(self.max_generated, 128, 2048),
            token_budget: pick(self.token_budget, 512, 8192),
            max_batch: pick(self.max_batch, 64, 256),
            kv_mib: self.kv_mib.unwrap_or(if gpu { 24576 } else { 64 }),
            requests: self.requests.unwrap_or(if gpu { 2000 } else { 300 }),
        };

        // The pool's page count: too small a pool is the trace's business (`pool_config` says
        // what would fit); a page too big to count in 64 bits, or more pages than int32 page
        // tables address, is not.
        let page_bytes = self.page_size as u128 * s.layers as u128 * 2 * kv as u128 * head_dim as u128 * self.dtype.size_bytes() as u128;
        if page_bytes > u64::MAX as u128 {
            return Err(usage(format!(
                "--page-size = {}: one KV page of {} layers x K and V x {kv} KV heads x head_dim {head_dim} is {page_bytes} bytes, more than 64 bits count",
                self.page_size, s.layers
            )));
        }
        let pages = (s.kv_mib as u128) * (1 << 20) / page_bytes;
        if pages > INT32_MAX as u128 {
            return Err(bad(
                "--kv-mib",
                s.kv_mib,
                format_args!("holds {pages} pages of {} bytes, more than the library's int32 page tables address ({INT32_MAX}); give fewer MiB or a larger --page-size", page_bytes),
            ));
        }

        // The longest sequence: a system prompt, the capped prompt and the capped output.
        let system_prompt = self.system_prompt_len as f64 * s.len_scale;
        if self.system_prompts > 0 && self.shared_fraction > 0.0 && system_prompt.round() > INT32_MAX as f64 {
            return Err(usage(format!(
                "--system-prompt-len {} x --len-scale {} = {} tokens is more than a sequence's int32 indices hold ({INT32_MAX})",
                self.system_prompt_len,
                real(s.len_scale),
                real(system_prompt)
            )));
        }
        let prefix = if self.system_prompts > 0 && self.shared_fraction > 0.0 { system_prompt.round().max(1.0) as u64 } else { 0 };
        let longest = prefix + s.max_context as u64 + s.max_generated as u64;
        if longest > INT32_MAX {
            return Err(usage(format!(
                "--max-context {} + --max-generated {} (+ a system prompt of {prefix} tokens) = {longest} tokens is more than a sequence's int32 indices hold ({INT32_MAX})",
                s.max_context, s.max_generated
            )));
        }

        // The step's inputs (Q, new K and V) and output are allocated for a full token budget.
        let step_bytes = 3 * s.token_budget as u128 * q as u128 * head_dim as u128 * self.dtype.size_bytes() as u128;
        if step_bytes > isize::MAX as u128 {
            return Err(bad(
                "--token-budget",
                s.token_budget,
                format_args!(
                    "with {q} query heads x head_dim {head_dim} needs {step_bytes} bytes of step buffers, more than memory addresses"
                ),
            ));
        }
        Ok(s)
    }
}
