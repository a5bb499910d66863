"""Replays the steps `packinfer-replay --record-batches` recorded through PackInfer, FlashInfer,
FlashAttention-3 and FlashAttention-2, on the same model shape, step by step, all layers, host
planning included; reports per-step times, TTFT/TBT percentiles, tokens/s and total time.

    packinfer-replay TRACE.csv --device gpu --record-batches --out replay-out
    python3 bench/replay_anchors.py replay-out --lib target/release/libpackinfer.so --out replay-out/anchors
    python3 bench/replay_anchors.py replay-out --dry-run        (CPU, fake FlashInfer/FA kernels; needs torch)

Contenders, per step (the recording's `batches-*.jsonl`, format in bench/README.md):
- PackInfer: packinfer_plan_update of the step's batch (plan_create the first step), launch update
  (packinfer_launch_update; a new launch where the plan outgrows it), one packinfer_run per layer
  on the paged cache. Its page tables are batches-packinfer.jsonl's (after its relayouts).
- FlashInfer best API per step: decode-only steps BatchDecodeWithPagedKVCacheWrapper(
  use_tensor_cores=True), mixed steps BatchAttention; plan() every step, run() per layer, on the
  paged cache with the page tables of batches-baseline.jsonl (an engine that never relayouts).
- FA3 varlen (fa3_fwd_interface.flash_attn_varlen_func) and FA2 varlen (torch's
  _flash_attention_forward): no paged KV in these builds, so they read each request's keys as
  contiguous rows of a preallocated buffer (same key counts, not the same pages; no gather counted).

Step time = host planning seconds + device seconds of all layers (CUDA events around them); the
host wall clock of the step is recorded beside. The step's GPU is synchronized after each step so
times do not bleed into the next. The K/V caches rotate over --kv-buffers per-layer copies so
consecutive layers do not hit L2.

TTFT/TBT come from the recorded timeline: a request waits through every step from the one it
arrived before until its first token (TTFT) and between tokens (TBT); the same rule as the
replay, applied to each contender's step times. The parts that need no torch (reading, batches,
timeline, summary) are tested by bench/test_replay_anchors.py.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

FORMAT = "packinfer-replay-batches"
VERSION = 1
COST_KEYS = ("plan_s", "bind_s", "kv_write_s", "relayout_s", "attention_s")
PERCENTILES = (50, 90, 99)


# ----------------------------------------------------------------------------------------------
# Reading a recording (no torch)


class Step:
    """One recorded step: per request (batch order) id, q, kv, emit; the whole page tables as
    CSR arrays (page_indptr, pages); prefix groups [(prefix_len, [positions])]; recorded costs."""

    __slots__ = ("index", "clock_s", "arrived", "ids", "q", "kv", "emit", "finished", "page_indptr", "pages",
                 "groups", "costs", "pages_moved")

    @property
    def decode_only(self):
        return bool((self.q == 1).all())

    @property
    def total_q(self):
        return int(self.q.sum())

    @property
    def total_kv(self):
        return int(self.kv.sum())


class Recording:
    def __init__(self, header, steps, path):
        self.header, self.steps, self.path = header, steps, path

    @property
    def schedule(self):
        return self.header["schedule"]

    def recorded_times(self):
        """Per step, the replay's own measured total (planning, launch update, KV writes,
        relayout, attention of all layers)."""
        return np.array([sum(s.costs[k] for k in COST_KEYS) for s in self.steps])


def _runs_to_pages(entry, old, where):
    keep = entry[0]
    if keep > len(old) or len(entry) % 2 != 1:
        raise ValueError(f"{where}: page entry {entry[:8]}... keeps {keep} of {len(old)} pages or has a broken run list")
    parts = [old[:keep]]
    for start, n in zip(entry[1::2], entry[2::2]):
        if n <= 0:
            raise ValueError(f"{where}: a run of {n} pages")
        parts.append(np.arange(start, start + n, dtype=np.int32))
    return np.concatenate(parts) if len(parts) > 1 else old[:keep].copy()


def read_recording(path):
    """A Recording from batches-*.jsonl; every page table rebuilt and checked (one page per
    page_size keys, indices inside the pool)."""
    with open(path) as f:
        header = json.loads(f.readline())
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise ValueError(f"{path}: not a {FORMAT} v{VERSION} file (header {str(header)[:200]})")
        ps, num_pages = int(header["page_size"]), int(header["num_pages"])
        tables = {}
        steps = []
        for n, line in enumerate(f, start=2):
            if not line.strip():
                continue
            d = json.loads(line)
            s = Step()
            s.index, s.clock_s = int(d["step"]), float(d["clock_s"])
            s.arrived = np.asarray(d["arrived"], dtype=np.int64)
            s.ids = np.asarray(d["ids"], dtype=np.int64)
            s.q = np.asarray(d["q"], dtype=np.int64)
            s.kv = np.asarray(d["kv"], dtype=np.int64)
            s.emit = np.asarray(d["emit"], dtype=np.int8)
            s.finished = np.asarray(d["finished"], dtype=np.int64)
            where = f"{path}:{n} (step {s.index})"
            if not (len(s.ids) == len(s.q) == len(s.kv) == len(s.emit) == len(d["pages"])):
                raise ValueError(f"{where}: ids, q, kv, emit and pages differ in length")
            if len(s.ids) == 0 or (s.q < 1).any() or (s.q > s.kv).any():
                raise ValueError(f"{where}: a request with q outside 1..kv (or an empty step)")
            per = []
            for i, entry in enumerate(d["pages"]):
                rid = int(s.ids[i])
                t = _runs_to_pages(entry, tables.get(rid, np.zeros(0, np.int32)), where)
                if len(t) != -(-int(s.kv[i]) // ps):
                    raise ValueError(f"{where}: request {rid} has {len(t)} pages for {s.kv[i]} keys of {ps} per page")
                if len(t) and (t.min() < 0 or t.max() >= num_pages):
                    raise ValueError(f"{where}: request {rid} has a page outside 0..{num_pages}")
                tables[rid] = t
                per.append(t)
            for rid in s.finished:
                tables.pop(int(rid), None)
            s.page_indptr = np.concatenate([[0], np.cumsum([len(t) for t in per])]).astype(np.int32)
            s.pages = np.concatenate(per).astype(np.int32) if per else np.zeros(0, np.int32)
            s.groups = [(int(g[0]), [int(m) for m in g[1:]]) for g in d["groups"]]
            s.costs = {k: float(d[k]) if d[k] is not None else float("nan") for k in COST_KEYS}
            s.pages_moved = int(d.get("pages_moved", 0))
            steps.append(s)
    return Recording(header, steps, path)


def same_work(a, b):
    """Whether two recordings replayed the same steps (same requests, lengths and tokens)."""
    if len(a.steps) != len(b.steps):
        return False
    return all(np.array_equal(x.ids, y.ids) and np.array_equal(x.q, y.q) and np.array_equal(x.kv, y.kv)
               and np.array_equal(x.emit, y.emit) for x, y in zip(a.steps, b.steps))


def batch_arrays_np(step, page_size):
    """The step's paged batch as int32 numpy arrays (FlashInfer's and PackInfer's layout)."""
    qo = np.concatenate([[0], np.cumsum(step.q)]).astype(np.int32)
    n_pages = np.diff(step.page_indptr)
    last = (step.kv - (n_pages - 1) * page_size).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(step.kv)]).astype(np.int32)
    return {"qo_indptr": qo, "kv_indptr": step.page_indptr, "kv_page_indices": step.pages, "kv_last_page_len": last,
            "kv_lens": step.kv.astype(np.int32), "cu_k": cu_k}


# ----------------------------------------------------------------------------------------------
# Timeline and summary (no torch)


def nearest_rank(samples, p):
    """The replay's percentile: nearest rank; NaN without samples."""
    if len(samples) == 0:
        return float("nan")
    v = np.sort(np.asarray(samples, dtype=np.float64))
    rank = max(1, int(np.ceil(p / 100.0 * len(v))))
    return float(v[min(rank, len(v)) - 1])


def timeline(rec, step_s):
    """(ttft_s, tbt_s) lists: each request waits through every step from the one it arrived
    before, until its first token (TTFT), then between tokens (TBT), as the replay counts."""
    if len(step_s) != len(rec.steps):
        raise ValueError(f"{len(step_s)} step times for {len(rec.steps)} steps")
    since = {}
    ttft, tbt = [], []
    for s, t in zip(rec.steps, step_s):
        for rid in s.arrived:
            since[int(rid)] = 0.0
        for rid in since:
            since[rid] += t
        for rid, e in zip(s.ids, s.emit):
            if e == 1:
                ttft.append(since[int(rid)])
                since[int(rid)] = 0.0
            elif e == 2:
                tbt.append(since[int(rid)])
                since[int(rid)] = 0.0
        for rid in s.finished:
            since.pop(int(rid), None)
    return ttft, tbt


def summarize(rec, step_s):
    """What a contender's step times add up to on the recording's timeline."""
    step_s = np.asarray(step_s, dtype=np.float64)
    ttft, tbt = timeline(rec, step_s)
    total = float(step_s.sum())
    generated = int(sum(int((s.emit > 0).sum()) for s in rec.steps))
    all_tokens = int(sum(s.total_q for s in rec.steps))
    decode = np.array([s.decode_only for s in rec.steps], dtype=bool)
    out = {"total_s": total, "steps": len(step_s), "generated_tokens": generated, "all_tokens": all_tokens,
           "generated_tokens_per_s": generated / total if total > 0 else float("nan"),
           "all_tokens_per_s": all_tokens / total if total > 0 else float("nan"),
           "decode_only_steps": int(decode.sum()), "decode_only_total_s": float(step_s[decode].sum()),
           "mixed_total_s": float(step_s[~decode].sum())}
    for p in PERCENTILES:
        out[f"ttft_p{p}_ms"] = nearest_rank(ttft, p) * 1e3
        out[f"tbt_p{p}_ms"] = nearest_rank(tbt, p) * 1e3
        out[f"step_p{p}_ms"] = nearest_rank(step_s, p) * 1e3
    return out


def ratios(summaries, ours):
    """Each contender's total, TBT p50/p90 and tokens/s against `ours` (> 1: ours is better)."""
    o = summaries.get(ours)
    if o is None:
        return {}
    out = {}
    for name, s in summaries.items():
        if name == ours:
            continue
        r = {}
        for k in ("total_s", "tbt_p50_ms", "tbt_p90_ms", "ttft_p50_ms"):
            r[k] = s[k] / o[k] if o[k] > 0 else float("nan")
        r["all_tokens_per_s"] = o["all_tokens_per_s"] / s["all_tokens_per_s"] if s["all_tokens_per_s"] > 0 else float("nan")
        out[name] = r
    return out


def chart(result, path):
    """Per-step time (log scale, so decode-only steps show) and cumulative time per contender;
    totals and ratios in the title. Returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a, b) = plt.subplots(2, 1, figsize=(12, 8), sharex=True)
    for name, c in result["contenders"].items():
        if "step_s" not in c:
            continue
        ms = np.asarray(c["step_s"]) * 1e3
        a.plot(ms, lw=0.7, label=f"{name}: {c['summary']['total_s']:.2f} s")
        b.plot(np.cumsum(ms) / 1e3, lw=1.2, label=name)
    a.set_yscale("log")
    a.set_ylabel("ms per step (all layers, planning included)")
    b.set_ylabel("cumulative s")
    b.set_xlabel("step")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    h = result["recording"]
    rs = ", ".join(f"{n}/{result['ours']} {r['total_s']:.2f}x" for n, r in result["ratios"].items())
    fig.suptitle(f"{h['trace']} on {result['device']}: {h['num_qo_heads']}/{h['num_kv_heads']} heads, d {h['head_dim']}, "
                 f"{h['layers']} layers, {result['steps']} steps\ntotal time ratios (> 1: PackInfer faster): {rs}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Contenders (torch; fake kernels in --dry-run)


class Env:
    """Device tensors shared by the contenders: per-layer K/V paged caches (rotating over
    `kv_buffers` copies), contiguous K/V rows for the varlen APIs, Q and O for the largest step."""

    def __init__(self, torch, header, steps, device, kv_buffers, seed=1):
        self.torch, self.device = torch, device
        self.dt = torch.bfloat16 if header["dtype"] == "bf16" else torch.float16
        self.hq, self.hkv, self.d = header["num_qo_heads"], header["num_kv_heads"], header["head_dim"]
        self.layers, self.page_size, self.num_pages = header["layers"], header["page_size"], header["num_pages"]
        self.causal, self.sm_scale = bool(header["causal"]), float(header["sm_scale"])
        max_q = max(s.total_q for s in steps)
        max_kv = max(s.total_kv for s in steps)
        g = torch.Generator(device=device)
        g.manual_seed(seed)

        def rand(*shape):
            return torch.randn(*shape, generator=g, device=device, dtype=self.dt)
        self.k = [rand(self.num_pages, self.page_size, self.hkv, self.d) for _ in range(kv_buffers)]
        self.v = [rand(self.num_pages, self.page_size, self.hkv, self.d) for _ in range(kv_buffers)]
        # The varlen APIs' contiguous keys, for the step with the most: two copies where they are
        # small, one where a copy passes 8 GiB (a saturated engine's step can hold millions of keys).
        flat = 2 if 2 * max_kv * self.hkv * self.d * 2 <= 8 << 30 else 1
        self.k_flat = [rand(max_kv, self.hkv, self.d) for _ in range(min(kv_buffers, flat))]
        self.v_flat = [rand(max_kv, self.hkv, self.d) for _ in range(min(kv_buffers, flat))]
        self.q = [rand(max_q, self.hq, self.d) for _ in range(2)]
        self.o = torch.empty(max_q, self.hq, self.d, device=device, dtype=self.dt)

    def i32(self, a):
        return self.torch.as_tensor(np.ascontiguousarray(a), dtype=self.torch.int32).to(self.device, non_blocking=True)

    def layer_kv(self, layer):
        return self.k[layer % len(self.k)], self.v[layer % len(self.v)]


# Launches the PackInfer contender keeps, one per kernel its steps' plans want; the oldest goes
# first (as the replay's engine, crates/packinfer-replay/src/engine.rs).
MAX_KEPT_LAUNCHES = 4


class PackInferContender:
    name = "PackInfer"

    def __init__(self, env, lib_path, backend):
        import packinfer_ctypes as pc
        self.pc, self.env = pc, env
        self.lib = pc.Library(lib_path)
        self.ctx = self.lib.context(backend=backend)
        self.plan = self.launch = None
        # Every launch alive (`launch` is the one the step uses), destroyed by close().
        self.kept = []
        self.launches_created = self.presize_launches = 0
        self.capacity = {}
        self.pages = 0
        self.layouts = [self.lib.kv_layout_nhd(k.data_ptr(), v.data_ptr(), env.page_size, env.hkv, env.d)
                        for k, v in zip(env.k, env.v)]
        self.dtype = pc.DTYPE_BF16 if env.dt == env.torch.bfloat16 else pc.DTYPE_F16

    def marshal(self, step, b):
        self.pages = len(b["kv_page_indices"])
        return self._marshal(step, b)

    def _marshal(self, step, b):
        """The step's batch descriptor (the harness's data conversion, untimed: an engine holds
        these arrays already)."""
        e = self.env
        return self.pc.BatchArrays(b["qo_indptr"], b["kv_indptr"], b["kv_page_indices"], b["kv_last_page_len"],
                                   e.page_size, e.num_pages, e.hq, e.hkv, e.d, self.dtype, e.causal, e.sm_scale,
                                   prefix_groups=step.groups)

    def prepare(self, step, b, stream):
        """Host work of the step: plan (or re-plan) and launch update."""
        batch = b["marshal"]
        if self.plan is None:
            self.plan, _ = self.ctx.plan(batch)
        else:
            self.ctx.replan(self.plan, batch)
        if self.launch is None:
            self.launch = self._new_launch(stream)
            self.kept = [self.launch]
            return
        if self.lib.has("packinfer_launch_suits"):
            # A kept launch whose kernel this step's plan would get (the CUDA backend keeps a
            # launch's first kernel: warp-specialised for long prefills, plain otherwise).
            fit = next((k for k in self.kept if k.suits(self.plan)), None)
            if fit is not None:
                fit.update(self.plan, stream)
                self.launch = fit
                return
            if len(self.kept) == MAX_KEPT_LAUNCHES:
                self.kept.pop(0).destroy()
            self.launch = self._new_launch(stream)
            self.kept.append(self.launch)
            self.launches_created += 1
            return
        try:
            self.launch.update(self.plan, stream)
        except self.pc.PackinferError:
            # The plan outgrew the launch's buffers: a bigger launch (counted in the step).
            self.launch.destroy()
            self.launch = self._new_launch(stream)
            self.kept = [self.launch]
            self.launches_created += 1

    def _new_launch(self, stream):
        """A launch with room for 1.5x the largest counts seen so far, so later plans of the replay
        fit launch updates. Row segments, KV chunks and merge slots are not in the plan's stats:
        they get a multiple of the items and partial slots that doubles at every new launch."""
        st = self.plan.stats()
        self.chunk_factor = getattr(self, "chunk_factor", 2) * 2
        seen = {"max_work_items": st["num_work_items"], "max_requests": st["num_requests"],
                "max_groups": st["num_groups"], "max_merge_rows": st["num_merge_rows"],
                "max_partial_slots": st["num_partial_slots"], "max_pages": self.pages}
        items, partial = max(st["num_work_items"], st["num_requests"]), st["num_partial_slots"]
        seen.update(max_row_segments=self.chunk_factor * items, max_kv_chunks=self.chunk_factor * items,
                    max_merge_slots=self.chunk_factor * partial)
        for k, v in seen.items():
            self.capacity[k] = max(self.capacity.get(k, 0), int(1.5 * v) + 16)
        return self.ctx.launch_with_capacity(self.plan, stream, **self.capacity)

    def presize(self, rec, stream):
        """Plans every step once, untimed, growing the launch where a plan outgrows it: an engine
        sizes its launch once for the largest step, so the timed replay should not pay that."""
        ps = rec.header["page_size"]
        for s in rec.steps:
            b = batch_arrays_np(s, ps)
            b["marshal"] = self.marshal(s, b)
            self.prepare(s, b, stream)
        self.presize_launches, self.launches_created = self.launches_created, 0

    def run_layers(self, step, b, stream, qset):
        e = self.env
        q, o = e.q[qset].data_ptr(), e.o.data_ptr()
        for layer in range(e.layers):
            self.launch.run(q, self.layouts[layer % len(self.layouts)], o, 0, stream)

    def close(self):
        for launch in self.kept:
            launch.destroy()
        if self.plan is not None:
            self.plan.destroy()
        self.ctx.destroy()


class FlashInferContender:
    """Tensor-core decode for decode-only steps, BatchAttention for mixed steps; plan() each step."""
    name = "FlashInfer best"

    def __init__(self, env, fi):
        self.env = env
        ws = env.torch.zeros(256 << 20 if env.device == "cuda" else 8, dtype=env.torch.uint8, device=env.device)
        self.decode = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
        self.mixed = fi.BatchAttention(kv_layout="NHD")
        self.api = None

    def prepare(self, step, b, stream):
        e = self.env
        ind, idx, last = e.i32(b["kv_indptr"]), e.i32(b["kv_page_indices"]), e.i32(b["kv_last_page_len"])
        if step.decode_only:
            self.api = self.decode
            self.decode.plan(ind, idx, last, e.hq, e.hkv, e.d, e.page_size, q_data_type=e.dt, kv_data_type=e.dt,
                             sm_scale=e.sm_scale)
        else:
            self.api = self.mixed
            self.mixed.plan(e.i32(b["qo_indptr"]), ind, idx, e.i32(b["kv_lens"]), e.hq, e.hkv, e.d, e.d, e.page_size,
                            causal=e.causal, sm_scale=e.sm_scale, q_data_type=e.dt, kv_data_type=e.dt)

    def run_layers(self, step, b, stream, qset):
        e = self.env
        n = step.total_q
        q, o = e.q[qset][:n], e.o[:n]
        for layer in range(e.layers):
            self.api.run(q, e.layer_kv(layer), out=o)

    def close(self):
        pass


class VarlenContender:
    """FA3's or FA2's varlen forward on contiguous key rows; its only host work is the indptrs."""

    def __init__(self, env, name, fwd):
        self.env, self.name, self.fwd = env, name, fwd

    def prepare(self, step, b, stream):
        e = self.env
        self.cu_q, self.cu_k = e.i32(b["qo_indptr"]), e.i32(b["cu_k"])
        self.max_q, self.max_k = int(step.q.max()), int(step.kv.max())

    def run_layers(self, step, b, stream, qset):
        e = self.env
        n, nk = step.total_q, step.total_kv
        q = e.q[qset][:n]
        for layer in range(e.layers):
            s = layer % len(e.k_flat)
            self.fwd(q, e.k_flat[s][:nk], e.v_flat[s][:nk], self.cu_q, self.cu_k, self.max_q, self.max_k)

    def close(self):
        pass


def fa3_fwd(fa3, env):
    def f(q, k, v, cu_q, cu_k, max_q, max_k):
        return fa3.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=env.sm_scale,
                                          causal=env.causal)
    return f


def fa2_fwd(torch, env):
    def f(q, k, v, cu_q, cu_k, max_q, max_k):
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, env.causal, False,
                                                       scale=env.sm_scale)
    return f


class Clock:
    """Device time of a region: CUDA events on the GPU, the host clock on the CPU (synchronous)."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device == "cuda"

    def stream(self):
        return self.torch.cuda.current_stream().cuda_stream if self.cuda else 0

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def time(self, fn):
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        a, b = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3


def replay(contender, rec, clock, warmup_steps):
    """Per step (plan_s host, device_s, wall_s) of one contender over every step of `rec`."""
    ps = rec.header["page_size"]
    stream = clock.stream()
    # Warm-up (JIT, first allocations): the first decode-only and the first mixed step.
    picks = []
    for want in (True, False):
        picks += [s for s in rec.steps if s.decode_only == want][:warmup_steps]
    marshal = getattr(contender, "marshal", lambda s, b: None)
    if hasattr(contender, "presize"):
        contender.presize(rec, stream)
    for s in picks:
        b = batch_arrays_np(s, ps)
        b["marshal"] = marshal(s, b)
        contender.prepare(s, b, stream)
        contender.run_layers(s, b, stream, 0)
    clock.sync()
    plan_s, device_s, wall_s = [], [], []
    for i, s in enumerate(rec.steps):
        b = batch_arrays_np(s, ps)
        b["marshal"] = marshal(s, b)
        t0 = time.perf_counter()
        contender.prepare(s, b, stream)
        t1 = time.perf_counter()
        device_s.append(clock.time(lambda: contender.run_layers(s, b, stream, i % 2)))
        clock.sync()
        wall_s.append(time.perf_counter() - t0)
        plan_s.append(t1 - t0)
    return np.array(plan_s), np.array(device_s), np.array(wall_s)


def fake_modules(torch):
    """(flashinfer, fa3, fa2) stand-ins for --dry-run: each checks the index arrays it is given
    against the tensors (so the plumbing is exercised) and writes zeros."""
    import types

    def check_paged(ind, idx, kv_cache_pages):
        assert int(ind[-1]) == len(idx), "kv_indptr does not end at the page count"
        assert len(idx) == 0 or int(idx.max()) < kv_cache_pages, "a page index outside the cache"

    fi = types.ModuleType("flashinfer")

    class Decode:
        def __init__(self, ws, layout, use_tensor_cores=False):
            pass

        def plan(self, ind, idx, last, hq, hkv, d, page, **kw):
            self.ind, self.idx, self.last = ind, idx, last

        def run(self, q, kv, out=None):
            check_paged(self.ind, self.idx, kv[0].shape[0])
            assert q.shape[0] == len(self.ind) - 1, "decode: one query per request"
            out.zero_()
            return out

    class BatchAttention:
        def __init__(self, kv_layout="NHD"):
            pass

        def plan(self, qo, ind, idx, kv_len, *a, **kw):
            self.qo, self.ind, self.idx = qo, ind, idx

        def run(self, q, kv, out=None):
            check_paged(self.ind, self.idx, kv[0].shape[0])
            assert int(self.qo[-1]) == q.shape[0], "qo_indptr does not end at the queries"
            out.zero_()
            return out, None

    fi.BatchDecodeWithPagedKVCacheWrapper, fi.BatchAttention = Decode, BatchAttention
    fa3 = types.ModuleType("fa3_fwd_interface")

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        assert int(cu_q[-1]) == q.shape[0] and int(cu_k[-1]) == k.shape[0], "varlen indptrs"
        return torch.zeros_like(q)
    fa3.flash_attn_varlen_func = varlen

    def fa2(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, ret, scale=None):
        return (varlen(q, k, v, cu_q, cu_k, max_q, max_k),)
    return fi, fa3, fa2


def load_recordings(folder):
    """(PackInfer's recording, the anchors' recording): batches-packinfer.jsonl and
    batches-baseline.jsonl where both exist (checked to be the same work), else the one there is."""
    paths = {k: os.path.join(folder, f"batches-{k}.jsonl") for k in ("packinfer", "baseline")}
    found = {k: read_recording(p) for k, p in paths.items() if os.path.exists(p)}
    if not found:
        raise SystemExit(f"{folder}: no batches-packinfer.jsonl or batches-baseline.jsonl "
                         "(run packinfer-replay with --record-batches --out {folder})")
    ours = found.get("packinfer") or found["baseline"]
    anchors_rec = found.get("baseline") or ours
    if not same_work(ours, anchors_rec):
        raise SystemExit(f"{folder}: the two recordings did not replay the same steps")
    return ours, anchors_rec


def truncate(rec, max_steps):
    if max_steps and max_steps < len(rec.steps):
        rec.steps = rec.steps[:max_steps]
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recording", help="packinfer-replay's --out folder (with --record-batches)")
    ap.add_argument("--lib", default=os.path.join(HERE, "..", "target", "release", "libpackinfer.so"))
    ap.add_argument("--out", default=None, help="results folder [default: RECORDING/anchors]")
    ap.add_argument("--contenders", default="packinfer,flashinfer,fa3,fa2",
                    help="comma-separated: packinfer, flashinfer, fa3, fa2")
    ap.add_argument("--max-steps", type=int, default=0, help="replay only the first N steps (0: all)")
    ap.add_argument("--warmup-steps", type=int, default=2, help="decode-only and mixed steps run first, untimed")
    ap.add_argument("--kv-buffers", type=int, default=2, help="per-layer K/V cache copies the layers rotate over")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU: PackInfer's CPU backend and fake FlashInfer/FA kernels that check their indices")
    a = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        raise SystemExit("replay_anchors.py needs torch (only the recording and the timeline math work without it)")
    out_dir = a.out or os.path.join(a.recording, "anchors")
    os.makedirs(out_dir, exist_ok=True)
    ours_rec, anchors_rec = load_recordings(a.recording)
    truncate(ours_rec, a.max_steps)
    truncate(anchors_rec, a.max_steps)
    device = "cpu" if a.dry_run else "cuda"
    os.environ["PACKINFER_BENCH_DEVICE"] = device
    import anchors
    import packinfer_ctypes as pc
    env = Env(torch, ours_rec.header, ours_rec.steps, device, a.kv_buffers)
    clock = Clock(torch, device)
    wanted = [c.strip() for c in a.contenders.split(",") if c.strip()]
    errors = {}
    if a.dry_run:
        fi, fa3, fa2 = fake_modules(torch)
        fi_err = fa3_err = None
        versions = {"flashinfer": "fake", "fa3_fwd": "fake"}
        fa2f = lambda q, k, v, cq, ck, mq, mk: fa2(q, k, v, cq, ck, mq, mk, 0.0, env.causal, False)  # noqa: E731
    else:
        fi, stubs, fi_err = anchors.import_flashinfer()
        fa3, fa3_version, fa3_err = anchors.import_fa3()
        versions = {"flashinfer": anchors.flashinfer_version(fi) if fi is not None else None,
                    "flashinfer_stubbed": stubs, "fa3_fwd": fa3_version, "torch": torch.__version__}
        fa2f = fa2_fwd(torch, env)
    builders = {
        "packinfer": lambda: (PackInferContender(env, a.lib, pc.BACKEND_CPU if a.dry_run else pc.BACKEND_CUDA), ours_rec),
        "flashinfer": lambda: (FlashInferContender(env, fi) if fi is not None else _fail(fi_err), anchors_rec),
        "fa3": lambda: (VarlenContender(env, "FA3 varlen", fa3_fwd(fa3, env)) if fa3 is not None else _fail(fa3_err),
                        anchors_rec),
        "fa2": lambda: (VarlenContender(env, "FA2 varlen", fa2f), anchors_rec),
    }
    result = {"recording": ours_rec.header, "recording_dir": os.path.abspath(a.recording), "device":
              "cpu (dry run: fake kernels)" if a.dry_run else torch.cuda.get_device_name(0),
              "steps": len(ours_rec.steps), "ours": "PackInfer", "contenders": {}, "errors": errors,
              "versions": versions,
              "timing": "step = host planning (plan + launch update / plan()) + device time of all layers; "
                        "wall = host clock of the step, synchronized"}
    # The replay's own measurement, every library cost counted (relayouts and KV writes included).
    for rec in {id(ours_rec): ours_rec, id(anchors_rec): anchors_rec}.values():
        t = rec.recorded_times()
        result["contenders"][f"replay {rec.schedule} (recorded)"] = {
            "step_s": t.tolist(), "summary": summarize(rec, t),
            "breakdown_s": {k: float(sum(s.costs[k] for s in rec.steps)) for k in COST_KEYS}}
    path = os.path.join(out_dir, "replay_anchors.json")

    def save():
        # After every contender, so a run cut off by its time limit keeps what finished.
        result["ratios"] = ratios({n: c["summary"] for n, c in result["contenders"].items()}, "PackInfer")
        with open(path + ".part", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".part", path)

    for key in wanted:
        if key not in builders:
            raise SystemExit(f"--contenders: unknown {key!r} (packinfer, flashinfer, fa3, fa2)")
        c = None
        try:
            c, rec = builders[key]()
            plan_s, device_s, wall_s = replay(c, rec, clock, a.warmup_steps)
            step_s = plan_s + device_s
            extra = {k: getattr(c, k) for k in ("launches_created", "presize_launches") if hasattr(c, k)}
            result["contenders"][c.name] = {**extra, "step_s": step_s.tolist(), "plan_s": plan_s.tolist(),
                                            "device_s": device_s.tolist(), "wall_s": wall_s.tolist(),
                                            "summary": summarize(rec, step_s),
                                            "wall_summary": summarize(rec, wall_s)}
            print(f"{c.name}: {step_s.sum():.3f} s over {len(step_s)} steps "
                  f"(planning {plan_s.sum():.3f} s, device {device_s.sum():.3f} s, wall {wall_s.sum():.3f} s)")
        except Exception as e:  # noqa: BLE001 - one contender's failure is its result
            errors[key] = f"{type(e).__name__}: {e}"[:2000]
            print(f"{key}: failed: {errors[key]}")
        finally:
            if c is not None:
                c.close()
            save()
    try:
        png = chart(result, os.path.join(out_dir, "replay_anchors.png"))
    except Exception as e:  # noqa: BLE001 - the JSON is written; a chart failure must not hide it
        png = None
        print(f"chart failed: {type(e).__name__}: {e}")
    print(f"wrote {path}" + (f" and {png}" if png else " (no chart: matplotlib missing)"))
    if a.dry_run:
        print("DRY RUN on the CPU: fake FlashInfer/FA kernels write zeros; the times show nothing about the "
              "libraries, only that every step's batch reaches every contender.")
    return 1 if errors and a.dry_run else 0


def _fail(err):
    raise RuntimeError(err or "not importable")


if __name__ == "__main__":
    sys.exit(main())
