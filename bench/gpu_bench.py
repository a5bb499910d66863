"""GPU benchmark: PackInfer against FlashAttention-2 (PyTorch's), FlashAttention-3 and FlashInfer
(every API that applies, anchors.py) on W1-W7.

Runs on the GPU machine in phases, each its own process so that a crash of one contender (a
kernel fault poisons the whole CUDA context) cannot lose the others' numbers; results.json is
rewritten after every measurement. `bench/run_anchors.sh` runs them:

    gpu_bench.py --phase warm-MODULE             one FlashInfer JIT module (anchors.MODULES), in background
    gpu_bench.py --phase ours    --out DIR ...   PackInfer through ctypes, ablations, capacity sweep
                                                 (--no-planning: planning time left to the last phase)
    gpu_bench.py --phase anchors --out DIR ...   ceilings, FA2, FA3 and FlashInfer on W1-W7, plan() per API
    gpu_bench.py --phase features --out DIR ...  W1-window, W2-softcap: PackInfer, FA2, FA3, FlashInfer
    gpu_bench.py --phase planning --out DIR ...  host planning time, ours and the anchors', CPU idle
    gpu_bench.py --phase report  --out DIR       results.md and the PNG charts

(`bench/run_gpu.sh`, the older order: anchors first, then ours, still works.)

Every phase builds the same tensors: workloads from the trace with a fixed seed (workloads.py),
values from torch generators seeded per (workload, rotation set), so the "ours" process sees
bit-identical inputs (checked by a checksum) and compares its output with the anchors' outputs
saved by the "anchors" process.

Method (bench/README.md, "Method"): before any timing each contender's output is compared with a float64
reference on a subset of requests and with the other contenders on the whole output; a
mismatch is reported, not timed. Timing uses CUDA events around each call, after warm-up, median
of >= 30; a short GPU sleep before each timed call lets the host enqueue it ahead, so the events
measure device time, and the host time per call is recorded beside it. Inputs rotate over
several copies so that each step's working set exceeds 3x the L2 cache. Where a contender can be
captured in a CUDA graph, graph replay is timed too (both are reported).
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import urllib.parse

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import anchors  # noqa: E402
import common  # noqa: E402
import managed  # noqa: E402
import packinfer_ctypes as pc  # noqa: E402
import report  # noqa: E402
import workloads as wl  # noqa: E402

DT = torch.bfloat16
# "cpu" only for bench/test_anchors_plumbing.py's dry run of the anchors phase (fake kernels).
DEV = os.environ.get("PACKINFER_BENCH_DEVICE", "cuda")
# Every token count / SCALE (1 on the GPU: the definitions; larger only in the dry run).
SCALE = int(os.environ.get("PACKINFER_BENCH_SCALE", "1"))
SHAPE = wl.ModelShape(num_qo_heads=32, num_kv_heads=8, head_dim=128, dtype="bf16")
EAGER_ITERS, GRAPH_ITERS, WARMUP = 40, 30, 5
HOST_PATH_ITERS = 50
MAX_SETS = 8
FA2 = "FA2 varlen"
FI = "FlashInfer"
FI_CASCADE = "FlashInfer cascade"
FI_TC = "FlashInfer tensor-core decode"
OURS = "PackInfer"
OURS_MANAGED = "PackInfer managed (forked sequences)"


def l2_cache_bytes():
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20) or (50 << 20))


def gpu_sleep(cycles):
    """Keeps the GPU busy for `cycles` clocks (so the host can enqueue ahead); a no-op if absent."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is not None and cycles > 0:
        sleep(cycles)


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# ----------------------------------------------------------------------------------------------
# Tensors


class WorkloadTensors:
    """The device tensors of one workload: `sets` rotation copies of Q and of the paged K/V cache
    (NHD, [num_pages, page_size, kv_heads, head_dim]; a ragged workload has page_size 1, so its
    cache *is* the packed [total_kv, kv_heads, head_dim] tensor FA2 reads), index tensors, and for
    paged workloads FA2's unpaged copy of each request's keys (gathered once, outside timing)."""

    def __init__(self, w, seed, l2_bytes):
        self.w = w
        dev = DEV
        hq, hkv, d = SHAPE.num_qo_heads, SHAPE.num_kv_heads, SHAPE.head_dim
        q_bytes = w.total_q * hq * d * 2
        cache_bytes = 2 * w.num_pages * w.page_size * hkv * d * 2
        self.sets = max(1, min(MAX_SETS, math.ceil(3 * l2_bytes / (q_bytes + cache_bytes))))
        self.q, self.k, self.v = [], [], []
        for s in range(self.sets):
            g = torch.Generator(device=dev)
            g.manual_seed(seed * 1_000_003 + wl.number(w.name) * 101 + s)
            self.q.append(torch.randn(w.total_q, hq, d, generator=g, device=dev, dtype=DT))
            self.k.append(torch.randn(w.num_pages, w.page_size, hkv, d, generator=g, device=dev, dtype=DT))
            self.v.append(torch.randn(w.num_pages, w.page_size, hkv, d, generator=g, device=dev, dtype=DT))
        i32 = dict(device=dev, dtype=torch.int32)
        self.qo_indptr = torch.tensor(w.qo_indptr, **i32)
        self.kv_indptr = torch.tensor(w.kv_indptr, **i32)
        self.kv_indices = torch.tensor(w.kv_page_indices, **i32)
        self.kv_last = torch.tensor(w.kv_last_page_len, **i32)
        self.cu_k = torch.tensor(np.concatenate([[0], np.cumsum(w.kv_lens)]), **i32)
        self.max_q, self.max_k = int(w.q_lens.max()), int(w.kv_lens.max())
        self.slots = w.kv_slots()
        slots_all = torch.tensor(np.concatenate(self.slots), device=dev, dtype=torch.int64)
        # FA2 reads contiguous per-request keys: for paged workloads gather them once.
        if w.ragged:
            self.fa2_sets = self.sets
            self.k_flat = [k.view(-1, hkv, d) for k in self.k]
            self.v_flat = [v.view(-1, hkv, d) for v in self.v]
        else:
            unpaged_bytes = 2 * w.total_kv * hkv * d * 2
            self.fa2_sets = max(1, min(self.sets, math.ceil(3 * l2_bytes / (q_bytes + unpaged_bytes))))
            self.k_flat = [self.k[s].view(-1, hkv, d)[slots_all] for s in range(self.fa2_sets)]
            self.v_flat = [self.v[s].view(-1, hkv, d)[slots_all] for s in range(self.fa2_sets)]
        self.checksum = float(sum(float(x.float().sum()) for x in (self.q[0], self.k[0], self.v[0])))

    def reference(self, requests, rows=64):
        """float64 outputs of the last `rows` queries of each of `requests` (set 0)."""
        out = {}
        g = SHAPE.num_qo_heads // SHAPE.num_kv_heads
        kf, vf = self.k[0].view(-1, SHAPE.num_kv_heads, SHAPE.head_dim), self.v[0].view(-1, SHAPE.num_kv_heads, SHAPE.head_dim)
        for r in requests:
            q1 = int(self.w.qo_indptr[r + 1])
            n = min(int(self.w.q_lens[r]), rows)
            qs = self.q[0][q1 - n:q1].double()
            idx = torch.tensor(self.slots[r], device=DEV, dtype=torch.int64)
            k = kf[idx].double().repeat_interleave(g, dim=1)
            v = vf[idx].double().repeat_interleave(g, dim=1)
            s = torch.einsum("nhd,khd->hnk", qs, k) * SHAPE.sm_scale
            cap = self.w.logits_soft_cap
            if cap:
                s = cap * torch.tanh(s / cap)
            kv = k.shape[0]
            keys = torch.arange(kv, device=DEV)[None, None, :]
            pos = (kv - n + torch.arange(n, device=DEV))[None, :, None]  # each query's own key
            if self.w.causal:
                s = s.masked_fill(keys > pos, float("-inf"))
            if self.w.window_left is not None:
                s = s.masked_fill(keys < pos - self.w.window_left, float("-inf"))
            p = torch.softmax(s, dim=-1)
            out[r] = (q1 - n, q1, torch.einsum("hnk,khd->nhd", p, v))
        return out


def check_requests(w, seed):
    rng = np.random.default_rng([seed, 7, wl.number(w.name)])
    order = np.argsort(w.q_lens * 1_000_000 + w.kv_lens)
    picks = [int(order[-1]), int(order[0]), int(rng.integers(0, w.batch_size))]
    return list(dict.fromkeys(picks))


def check_output(out, refs, others):
    """Relative errors against the float64 subset and against other contenders' full outputs."""
    res = {"unwritten_or_nan": int(torch.isnan(out).sum().item()) + int(torch.isinf(out).sum().item())}
    errs = {}
    for r, (a, b, ref) in refs.items():
        o = out[a:b].double()
        errs[str(r)] = float((o - ref).norm() / ref.norm())
    res["rel_err_fp64_by_request"] = errs
    res["rel_err_fp64"] = max(errs.values()) if errs else float("nan")
    vs = {}
    for name, other in others.items():
        if other is None or other.shape != out.shape:
            continue
        o2 = other.to(out.device).float()
        vs[name] = float((out.float() - o2).norm() / o2.norm())
    res["rel_err_vs"] = vs
    worst = max([res["rel_err_fp64"]] + list(vs.values()))
    res["ok"] = bool(res["unwritten_or_nan"] == 0 and worst <= common.REL_TOL)
    return res


# ----------------------------------------------------------------------------------------------
# Timing


class Timer:
    def __init__(self):
        # Calibrate torch.cuda._sleep: cycles per microsecond.
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 10_000_000
        gpu_sleep(cycles)
        a.record()
        gpu_sleep(cycles)
        b.record()
        torch.cuda.synchronize()
        self.cycles_per_us = cycles / max(a.elapsed_time(b) * 1000, 1.0)

    def eager(self, call, sets, iters=EAGER_ITERS, warmup=WARMUP):
        """Device time per call (events around it, host enqueued ahead), and host time per call."""
        host_warm = []
        for i in range(warmup):
            t0 = time.perf_counter()
            call(i % sets)
            host_warm.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        lead_us = min(20000.0, max(100.0, 3e6 * float(np.median(host_warm))))
        cycles = int(lead_us * self.cycles_per_us)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        host = []
        for i in range(iters):
            gpu_sleep(cycles)
            t0 = time.perf_counter()
            starts[i].record()
            call(i % sets)
            ends[i].record()
            host.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
        dev = [s.elapsed_time(e) * 1000 for s, e in zip(starts, ends)]
        return common.summary(dev), common.summary(host)

    def graph(self, call, sets, iters=GRAPH_ITERS):
        """Per-call time of CUDA-graph replays of a graph of >= 8 calls rotating over the sets."""
        per_graph = sets * max(1, math.ceil(8 / sets))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(sets):
                call(i)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for j in range(per_graph):
                call(j % sets)
        g.replay()
        g.replay()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            starts[i].record()
            g.replay()
            ends[i].record()
        torch.cuda.synchronize()
        res = common.summary([s.elapsed_time(e) * 1000 / per_graph for s, e in zip(starts, ends)])
        res["calls_per_graph"] = per_graph
        del g
        return res


def measure(timer, call, sets, refs, others, graph=True, view=None):
    """Check, then time. Returns (result dict, output of set 0). `view` turns what `call`
    returns into the [total_q, heads, dim] output (outside timing)."""
    res = {}
    try:
        out = call(0)
        torch.cuda.synchronize()
        if view is not None:
            out = view(out)
        res["check"] = check_output(out, refs, others)
    except anchors.Unsupported as e:
        return {"status": "not run", "note": str(e)[:2000]}, None
    except Exception as e:
        return {"status": "error", "note": f"{type(e).__name__}: {e}"[:2000]}, None
    if not res["check"]["ok"]:
        res["status"] = "mismatch"
        res["note"] = "output differs from the float64 reference or the other contenders; not timed"
        return res, out
    try:
        res["time_us"], res["host_us"] = timer.eager(call, sets)
        res["status"] = "ok"
    except Exception as e:
        return {"status": "error", "note": f"timing: {type(e).__name__}: {e}"[:2000], "check": res["check"]}, out
    if graph:
        try:
            res["graph_us"] = timer.graph(call, sets)
        except Exception as e:
            res["graph_note"] = f"graph capture failed: {type(e).__name__}: {e}"[:500]
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
    return res, out


# ----------------------------------------------------------------------------------------------
# Results file


def base_results(args, trace, works, l2_bytes):
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:
        driver = f"unknown ({e})"
    meta = {
        "mode": "gpu", "device": torch.cuda.get_device_name(0), "driver": driver, "cuda": torch.version.cuda,
        "torch": torch.__version__, "sms": props.multi_processor_count, "l2_bytes": l2_bytes,
        "date": common.utc_now(), "git_commit": common.git_commit(os.path.dirname(HERE)),
        "python": platform.python_version(), "shape": vars(SHAPE), "seed": args.seed, "scale": SCALE,
        "trace": os.path.basename(args.trace), "host": platform.node(),
        "timing": f"CUDA events around each call with the host enqueued ahead (device time), {WARMUP} warm-up "
                  f"calls, median of {EAGER_ITERS}; CUDA-graph replay of >= 8 calls, median of {GRAPH_ITERS} replays; "
                  f"inputs rotated over copies so each workload's working set is >= 3x L2 ({l2_bytes >> 20} MiB)",
    }
    results = {"meta": meta, "ceilings": {}, "workloads": {}, "ablations": {}, "capacity_sweep": {}, "planning": {},
               "not_measured": {}, "not_run": {}, "errors": []}
    for w in works:
        entry = {"describe": w.describe(), "flops": wl.flops(w, SHAPE), "min_bytes": wl.min_bytes(w, SHAPE),
                 "contenders": {}}
        results["workloads"][w.name] = entry
    return results


def load_results(path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def set_floors(results):
    c = results.get("ceilings", {})
    if not c.get("copy_gbps"):
        return
    for e in list(results["workloads"].values()) + list(results.get("features", {}).values()):
        e.update(common.floor_of(e["flops"], e["min_bytes"], c))


def _copy_ceiling(t):
    src = torch.randn(512 << 20, device="cuda", dtype=DT)  # 1 GiB
    dst = torch.empty_like(src)
    copy, _ = t.eager(lambda i: dst.copy_(src), 1, iters=30)
    return copy, 2 * src.numel() * 2 / (copy["median"] * 1e-6) / 1e9


def _matmul_ceiling(t, m=8192):
    a = torch.randn(m, m, device="cuda", dtype=DT)
    b = torch.randn(m, m, device="cuda", dtype=DT)
    mm, _ = t.eager(lambda i: a @ b, 1, iters=30)
    return mm, 2 * m ** 3 / (mm["median"] * 1e-6) / 1e12


def ceilings():
    t = Timer()
    copy, gbps = _copy_ceiling(t)
    mm, tflops = _matmul_ceiling(t)
    torch.cuda.empty_cache()
    return {"copy_gbps": gbps, "matmul_tflops": tflops, "copy_us": copy, "matmul_us": mm,
            "how": "1 GiB device-to-device copy_ (bytes read + written); bf16 8192^3 torch.matmul; medians of 30"}


# ----------------------------------------------------------------------------------------------
# Anchors


def fa2_call(t):
    # PyTorch's FA2 takes a sliding window (left, right); it has no soft-cap.
    window = {} if t.w.window_left is None else {"window_size_left": int(t.w.window_left), "window_size_right": 0}

    def call(i):
        s = i % t.fa2_sets
        return torch.ops.aten._flash_attention_forward(
            t.q[i % t.sets], t.k_flat[s], t.v_flat[s], t.qo_indptr, t.cu_k, t.max_q, t.max_k, 0.0, t.w.causal,
            False, scale=SHAPE.sm_scale, **window)[0]
    return call


def workspace():
    return torch.zeros(256 << 20 if DEV == "cuda" else 8, dtype=torch.uint8, device=DEV)


def time_plan(plan, iters=20):
    plan()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        plan()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return common.summary(times)


# FlashInfer's units (workload, JIT module) are taken in this order of workloads as their modules
# become ready; FA2 and FA3 need no JIT and run first.
ANCHOR_ORDER = ["W1", "W6", "W5", "W2", "W7", "W4", "W3"]
# Anchors whose outputs later phases compare with (the others' are checked, not kept).
KEPT_OUTPUTS = (FA2, OURS)


def output_file(state, wname, contender):
    return os.path.join(state, f"{wname}__{urllib.parse.quote(contender, safe='')}.pt")


def saved_outputs(state, wname, names=KEPT_OUTPUTS):
    out = {}
    for n in names:
        f = output_file(state, wname, n)
        if os.path.exists(f):
            try:
                out[n] = torch.load(f)
            except Exception:
                pass
    return out


def context_alive():
    """False once a kernel fault has poisoned this process's CUDA context."""
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device=DEV).add_(1).item()
        return True
    except Exception:
        return False


class ContextLost(Exception):
    pass


def record(results, path, wname, name, res, section="workloads"):
    """Stores one contender's result under results[section][wname] ("workloads" or "features")."""
    results[section][wname]["contenders"][name] = res
    common.write_json(path, results)
    log(f"{wname} {name}: {report.cell(res, results[section][wname])}")


def run_contender(results, path, t, timer, refs, others, c, state, plan_entry, busy, section="workloads"):
    """Plans, checks and times one anchors.Contender; records it. Raises ContextLost when the
    CUDA context died under it (the caller exits; bench/run_anchors.sh resumes in a new process)."""
    w = t.w
    try:
        t0 = time.perf_counter()
        if c.plan is not None:
            c.plan()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        res, out = measure(timer, c.run, t.sets, refs, others, graph=c.graph, view=c.view)
        res["api"] = c.api
        if c.module:
            res["jit_module"] = c.module
        res["first_plan_s"] = first
        if c.info is not None:
            try:
                res.update(c.info())
            except Exception:
                pass
        if res.get("status") == "ok" and c.plan is not None:
            res["plan_us"] = time_plan(c.plan)
            res["plan_while_jit_builds_ran"] = busy()
            plan_entry[f"{c.name} plan_us"] = res["plan_us"]
            if c.name in KEPT_OUTPUTS and out is not None:
                torch.save(out.cpu(), output_file(state, w.name, c.name))
    except anchors.Unsupported as ex:  # this version's API lacks a keyword the workload needs
        res = {"status": "not run", "api": c.api, "note": str(ex)[:2000]}
    except Exception as ex:
        res = {"status": "error", "api": c.api, "note": f"{type(ex).__name__}: {ex}"[:2000]}
        results["errors"].append(f"{w.name} {c.name}: {traceback.format_exc()[-1500:]}")
    if c.module:
        res.setdefault("jit_module", c.module)
    record(results, path, w.name, c.name, res, section)
    if res.get("status") == "error" and not context_alive():
        raise ContextLost(f"{w.name} {c.name}: {res.get('note')}")
    return res


def jit_busy():
    d = anchors.marker_dir()
    if not os.path.isdir(d):
        return False
    started = {f[:-8] for f in os.listdir(d) if f.endswith(".started")}
    done = {f.rsplit(".", 1)[0] for f in os.listdir(d) if f.endswith((".ok", ".err"))}
    return bool(started - done)


def run_unit(results, path, progress, u, fn):
    """Runs one (workload, anchor) unit once: an exception is recorded, not raised, unless the
    CUDA context died (then ContextLost ends the process; the unit stays "started" in `progress`,
    and a resumed anchors process records it as lost)."""
    if u in progress["done"]:
        return
    progress["started"].append(u)
    common.write_json(path, results)
    try:
        fn()
    except ContextLost:
        raise
    except Exception as ex:
        results["errors"].append(f"{u}: {traceback.format_exc()[-1500:]}")
        results["not_run"][u] = f"{type(ex).__name__}: {ex}"[:1000]
        if not context_alive():
            common.write_json(path, results)
            raise ContextLost(u)
    progress["done"].append(u)
    common.write_json(path, results)


def flashinfer_units(fi, results, path, works, tensors_of, progress, timer, state, end, deadline, section="workloads"):
    """FlashInfer on `works`, one unit per (workload, JIT module), each once its warm-up marker says
    the module was built (its contenders run) or failed (nvcc's error recorded); a module neither
    by `deadline` is recorded "not compiled". Results go to results[section]; plan() times to
    results["planning"] (workloads) or the feature entry's "planning". Returns the units `end`
    left pending. The anchors and features phases both schedule FlashInfer through this."""
    pending = [(w, m) for w in works for m in anchors.modules_for(anchors.kind_of(w))
               if f"{w.name}/{m}" not in progress["done"]]
    while pending and time.time() < end:
        ready = []
        for w, m in pending:
            status, text = anchors.marker_state(m)
            if status in ("ok", "err") or time.time() >= deadline:
                ready.append((w, m, status, text))
        if not ready:
            time.sleep(1.0)
            continue
        for w, m, status, text in ready:
            pending.remove((w, m))
            if time.time() >= end:
                pending.append((w, m))
                break

            def fi_unit(w=w, m=m, status=status, text=text):
                t, refs = tensors_of(w)
                others = saved_outputs(state, w.name)
                if section == "workloads":
                    plan_entry = results["planning"].setdefault(w.name, {"requests": w.batch_size})
                else:
                    plan_entry = results[section][w.name].setdefault("planning", {})
                built = anchors.flashinfer_contenders(fi, t, SHAPE, DT, workspace, only_modules={m})
                for c in built:
                    name = c[0] if isinstance(c, tuple) else c.name
                    api = c[1] if isinstance(c, tuple) else c.api
                    if status == "err":
                        record(results, path, w.name, name, {"status": "error", "api": api, "jit_module": m,
                                                             "note": f"JIT build of '{m}' failed: {text[-1500:]}"},
                               section)
                    elif status != "ok":
                        record(results, path, w.name, name, {
                            "status": "not compiled", "api": api, "jit_module": m,
                            "note": f"JIT build of '{m}' {status} at the warm-up deadline "
                                    f"({os.environ.get('PACKINFER_WARM_BUDGET_S', '?')} s)"}, section)
                    elif isinstance(c, tuple):
                        record(results, path, w.name, name, {"status": "error", "api": api, "jit_module": m,
                                                             "note": c[3]}, section)
                    else:
                        run_contender(results, path, t, timer, refs, others, c, state, plan_entry, jit_busy, section)
                del built
                torch.cuda.empty_cache()
            run_unit(results, path, progress, f"{w.name}/{m}", fi_unit)
    return pending


def phase_anchors(args):
    trace = wl.load_trace(args.trace)
    works = wl.build_all(trace, seed=args.seed, scale=SCALE)
    l2 = l2_cache_bytes()
    path = os.path.join(args.out, "results.json")
    results = load_results(path) or base_results(args, trace, works, l2)
    results.setdefault("not_run", {})
    for w in works:  # a results.json of an older harness may lack W6/W7
        if w.name not in results["workloads"]:
            results["workloads"][w.name] = {"describe": w.describe(), "flops": wl.flops(w, SHAPE),
                                            "min_bytes": wl.min_bytes(w, SHAPE), "contenders": {}}
    state = os.path.join(args.state, "outputs")
    os.makedirs(state, exist_ok=True)
    end = float(os.environ.get("PACKINFER_ANCHORS_END", time.time() + 400))
    deadline = min(end, float(os.environ.get("PACKINFER_WARM_DEADLINE", end)))
    progress = results.setdefault("anchor_progress", {"started": [], "done": []})
    # A unit started but never finished: the process died in it (bench/run_anchors.sh resumed us).
    for u in progress["started"]:
        if u not in progress["done"]:
            wname, what = u.split("/", 1)
            results["errors"].append(f"{u}: the anchors process died here (CUDA context lost); resumed after it")
            results["not_run"][u] = ("the anchors process died in this unit (CUDA context lost, see run.log); "
                                     "its contenders not recorded above did not run")
            progress["done"].append(u)
            results.setdefault("lost_units", []).append(u)
    meta = results["meta"]
    log(f"device {meta['device']}, driver {meta['driver']}, torch {torch.__version__}")
    manifest = os.environ.get("PACKINFER_ANCHORS_MANIFEST")
    if manifest and os.path.exists(manifest):
        try:
            m = json.load(open(manifest))
            meta["not_staged"] = m.pop("not_staged", {})
            meta["anchors_manifest"] = m
        except Exception as ex:
            results["errors"].append(f"{manifest}: {type(ex).__name__}: {ex}")
    if not results.get("ceilings", {}).get("copy_gbps"):
        try:
            results["ceilings"] = ceilings()
            log(f"ceilings: copy {results['ceilings']['copy_gbps']:.0f} GB/s, matmul "
                f"{results['ceilings']['matmul_tflops']:.0f} TFLOP/s")
        except Exception as e:
            results["errors"].append(f"ceilings: {type(e).__name__}: {e}")
        set_floors(results)
        common.write_json(path, results)
    timer = Timer()
    tensors, refs_of = {}, {}

    def tensors_of(w):
        if w.name not in tensors:
            t = tensors[w.name] = WorkloadTensors(w, args.seed, l2)
            e = results["workloads"][w.name]
            e["rotation_sets"] = t.sets
            e["input_checksum"] = t.checksum
            refs_of[w.name] = t.reference(check_requests(w, args.seed))
        return tensors[w.name], refs_of[w.name]

    def unit(u, fn):
        run_unit(results, path, progress, u, fn)

    by_name = {w.name: w for w in works}
    order = [by_name[n] for n in ANCHOR_ORDER if n in by_name] + [w for w in works if w.name not in ANCHOR_ORDER]
    # FA2 (PyTorch's) on every workload.
    for w in order:
        def fa2(w=w):
            try:
                t, refs = tensors_of(w)
                others = saved_outputs(state, w.name, (OURS,))
                res, out = measure(timer, fa2_call(t), t.sets, refs, others)
                res["api"] = "torch.ops.aten._flash_attention_forward (varlen)"
                if not w.ragged:
                    res["layout"] = "unpaged copy of each request's keys (FA2 varlen has no page table)"
                if res.get("check", {}).get("ok") and out is not None:
                    torch.save(out.cpu(), output_file(state, w.name, FA2))
            except Exception as ex:
                res = {"status": "error", "note": f"{type(ex).__name__}: {ex}"[:2000]}
                results["errors"].append(f"{w.name} FA2: {traceback.format_exc()[-1500:]}")
            record(results, path, w.name, FA2, res)
            if res.get("status") == "error" and not context_alive():
                raise ContextLost(f"{w.name} FA2")
        unit(f"{w.name}/FA2", fa2)
    # FlashAttention-3.
    fa3, fa3_version, fa3_err = anchors.import_fa3()
    meta["fa3"] = fa3_version if fa3 else f"did not load: {fa3_err}"
    if fa3 is None:
        results["not_run"][f"{anchors.FA3} (fa3-fwd)"] = f"import fa3_fwd_interface: {fa3_err}"
    else:
        results["not_run"][f"{anchors.FA3} flash_attn_with_kvcache with a page table"] = (
            "fa3-fwd is built with FLASHATTENTION_DISABLE_PAGEDKV (fa3_fwd_config.py): no paged KV; its "
            "flash_attn_with_kvcache runs on a padded contiguous cache instead (W2, W4, W7)")
        for w in order:
            def fa3_unit(w=w):
                t, refs = tensors_of(w)
                others = saved_outputs(state, w.name)
                plan_entry = results["planning"].setdefault(w.name, {"requests": w.batch_size})
                for c in anchors.fa3_contenders(fa3, t, SHAPE, DT):
                    if isinstance(c, tuple):
                        record(results, path, w.name, c[0], {"status": "error", "api": c[1], "note": c[3]})
                        continue
                    run_contender(results, path, t, timer, refs, others, c, state, plan_entry, jit_busy)
            unit(f"{w.name}/FA3", fa3_unit)
    # FlashInfer: each (workload, JIT module) unit once its module is built (or failed to build).
    fi, stubs, fi_err = anchors.import_flashinfer()
    meta["flashinfer"] = anchors.flashinfer_version(fi) if fi else f"did not import: {fi_err}"
    meta["flashinfer_site"] = os.environ.get("PACKINFER_FLASHINFER_SITE", "")
    if stubs:
        meta["flashinfer_stubbed_packages"] = stubs
    if fi is None:
        results["not_run"]["FlashInfer"] = f"import flashinfer: {fi_err}"
        common.write_json(path, results)
        log("anchors done (no FlashInfer)")
        return
    pending = flashinfer_units(fi, results, path, order, tensors_of, progress, timer, state, end, deadline)
    for w, m in pending:
        results["not_run"][f"{w.name} FlashInfer module '{m}'"] = "the anchors phase ran out of its time budget first"
    common.write_json(path, results)
    log("anchors done")


def phase_planning(args):
    """Host planning time with the CPU idle (after the JIT builds): PackInfer's plan + launch and
    each anchor's host work per step (FlashInfer plan() per API, FA3 scheduler metadata), on
    every workload and on decode steps of 256 and 1,024 trace contexts."""
    trace = wl.load_trace(args.trace)
    works = wl.build_all(trace, seed=args.seed)
    path = os.path.join(args.out, "results.json")
    results = load_results(path) or base_results(args, trace, works, l2_cache_bytes())
    results["meta"]["planning_jit_builds_running"] = jit_busy()
    try:
        lib = pc.Library(args.lib)
        try:
            ctx = lib.context(pc.BACKEND_CUDA)
            ctx.precompile()
        except pc.PackinferError:
            ctx = None
        packinfer_planning(results, path, lib, ctx, works, trace, args)
    except Exception as ex:
        results["errors"].append(f"planning (PackInfer): {type(ex).__name__}: {ex}")
    batches = [wl.decode_batch(trace, 256, args.seed), wl.decode_batch(trace, 1024, args.seed)]
    fi, _, fi_err = anchors.import_flashinfer()
    fa3, _, fa3_err = anchors.import_fa3()
    for w in batches:
        p = results["planning"].setdefault(w.name, {"requests": w.batch_size})
        if fi is not None:
            try:
                for name, plan in anchors.flashinfer_plan_batches(fi, w, SHAPE, DT, workspace).items():
                    try:
                        p[f"{name} plan_us"] = time_plan(plan)
                    except Exception as ex:
                        p[f"{name} plan_us"] = f"error: {type(ex).__name__}: {ex}"[:300]
            except Exception as ex:
                results["errors"].append(f"FlashInfer plan {w.name}: {type(ex).__name__}: {ex}")
        else:
            p["FlashInfer plan_us"] = f"error: {fi_err}"[:300]
        if fa3 is not None:
            try:
                p[f"{anchors.FA3} kvcache plan_us"] = time_plan(anchors.fa3_plan_batch(fa3, w, SHAPE, DT))
            except Exception as ex:
                p[f"{anchors.FA3} kvcache plan_us"] = f"error: {type(ex).__name__}: {ex}"[:300]
        common.write_json(path, results)
    log("planning done")


# ----------------------------------------------------------------------------------------------
# Ours


def ours_call(lib, launch, t, outs):
    """A run(set) callable: PackInfer on set i's tensors, on the current stream (the capture
    stream while a graph is being captured), into the preallocated output of set i."""
    hkv, d = SHAPE.num_kv_heads, SHAPE.head_dim
    layouts = [lib.kv_layout_nhd(t.k[s].data_ptr(), t.v[s].data_ptr(), t.w.page_size, hkv, d) for s in range(t.sets)]

    def call(i):
        s = i % t.sets
        launch.run(t.q[s].data_ptr(), layouts[s], outs[s].data_ptr(), 0, torch.cuda.current_stream().cuda_stream,
                   logits_soft_cap=t.w.logits_soft_cap)
        return outs[s]
    return call


def phase_ours(args):
    trace = wl.load_trace(args.trace)
    works = wl.build_all(trace, seed=args.seed)
    l2 = l2_cache_bytes()
    path = os.path.join(args.out, "results.json")
    results = load_results(path) or base_results(args, trace, works, l2)
    state = os.path.join(args.state, "outputs")
    os.makedirs(state, exist_ok=True)
    try:
        lib = pc.Library(args.lib)
        results["meta"]["packinfer_version"], results["meta"]["abi_version"] = lib.version, lib.abi_version
        results["meta"]["optional_exports"] = lib.optional_exports()
    except Exception as ex:
        note = f"library did not load: {type(ex).__name__}: {ex}"
        for w in works:
            results["workloads"][w.name]["contenders"][OURS] = {"status": "error", "note": note}
        results["errors"].append(note)
        common.write_json(path, results)
        return
    try:
        ctx = lib.context(pc.BACKEND_CUDA)
        results["meta"]["packinfer_device"] = ctx.device_name
        results["meta"]["packinfer_precompile_s"] = ctx.precompile()
        cuda_note, cuda_status = None, None
        try:
            # What an engine does once per device and install: fit the planner's cost model.
            results["meta"]["packinfer_calibrate_s"] = ctx.calibrate()
        except pc.PackinferError as ex:
            results["meta"]["packinfer_calibrate_s"] = f"failed: {ex}"
            results["errors"].append(f"packinfer_context_calibrate: {ex}")
    except pc.PackinferError as ex:
        ctx = None
        # UNSUPPORTED: a build without the CUDA kernels; anything else is a real failure.
        cuda_status = "not yet" if ex.status == "UNSUPPORTED" else "error"
        cuda_note = f"no CUDA context: {ex.status}: {ex.message}"
    timer = Timer()
    tensors = {}
    for w in works:
        e = results["workloads"][w.name]
        if ctx is None:
            e["contenders"][OURS] = {"status": cuda_status, "note": cuda_note}
            continue
        try:
            t = tensors[w.name] = WorkloadTensors(w, args.seed, l2)
            if e.get("input_checksum") is not None and abs(e["input_checksum"] - t.checksum) > 1e-6 * max(1, abs(t.checksum)):
                results["errors"].append(f"{w.name}: inputs differ from the anchors' process "
                                         f"(checksum {t.checksum} vs {e['input_checksum']}); cross-check void")
            refs = t.reference(check_requests(w, args.seed))
            others = saved_outputs(state, w.name, (FA2,))
            res, plan_info = run_ours(lib, ctx, t, timer, refs, others, flags=0, graph=True,
                                      save_to=output_file(state, w.name, OURS))
            e["contenders"][OURS] = res
            log(f"{w.name} {OURS}: {report.cell(res, e)}")
        except Exception as ex:
            e["contenders"][OURS] = {"status": "error", "note": f"{type(ex).__name__}: {ex}"[:2000]}
            results["errors"].append(f"{w.name} PackInfer: {traceback.format_exc()[-1500:]}")
            log(f"{w.name} {OURS}: error {ex}")
        common.write_json(path, results)
    if ctx is not None:
        # Ablations: every workload, each switch alone. Eager timing, checked like the default.
        refs_of = {}
        for w in works:
            t = tensors.get(w.name)
            if t is None:
                continue
            try:
                refs = refs_of[w.name] = t.reference(check_requests(w, args.seed))
            except Exception as ex:
                results["errors"].append(f"{w.name} float64 reference (ablations): {type(ex).__name__}: {ex}")
                continue
            rows = {}
            for name, flags in common.ABLATIONS.items():
                try:
                    res, _ = run_ours(lib, ctx, t, timer, refs, {}, flags=flags, graph=False)
                    rows[name] = {"status": res["status"], "time_us": res.get("time_us", {}).get("median"),
                                  "stats": res.get("plan_stats"), "rel_err_fp64": res.get("check", {}).get("rel_err_fp64"),
                                  "note": res.get("note")}
                except Exception as ex:
                    rows[name] = {"status": "error", "note": f"{type(ex).__name__}: {ex}"[:500]}
            results["ablations"][w.name] = rows
            log(f"{w.name} ablations: " + ", ".join(f"{k} {v.get('time_us') or v.get('status')}" for k, v in rows.items()))
            common.write_json(path, results)
        # Capacity sweep.
        for name in ("W1", "W2", "W5"):
            t = tensors.get(name)
            if t is None or name not in refs_of:
                continue
            try:
                plan, _ = ctx.plan(wl.batch_arrays(t.w, SHAPE))
                auto = plan.stats()
                plan.destroy()
                base = auto["capacity"] if auto["capacity"] > 0 else auto["max_group_cost"]
                pts = []
                for f in common.CAPACITY_FACTORS:
                    try:
                        res, _ = run_ours(lib, ctx, t, timer, refs_of[name], {}, capacity=base * f, graph=False)
                        pts.append({"factor": f, "capacity": base * f, "time_us": res.get("time_us", {}).get("median"),
                                    "groups": res.get("plan_stats", {}).get("num_groups"), "status": res["status"]})
                    except Exception as ex:
                        pts.append({"factor": f, "capacity": base * f, "error": f"{type(ex).__name__}: {ex}"[:300]})
                results["capacity_sweep"][name] = {"reference_capacity": base, "auto_capacity_reported": auto["capacity"],
                                                   "points": pts}
            except Exception as ex:
                results["capacity_sweep"][name] = {"error": f"{type(ex).__name__}: {ex}"[:500]}
            common.write_json(path, results)
    if ctx is not None and tensors.get("W2") is not None:
        # W2 with an fp8 e4m3 cache: the same values quantized, against the bf16 run above.
        try:
            results["fp8"] = {"W2": run_w2_fp8(lib, ctx, tensors["W2"], timer, args.seed,
                                               results["workloads"]["W2"]["contenders"].get(OURS, {}))}
        except Exception as ex:
            results["fp8"] = {"W2": {"status": "error", "note": f"{type(ex).__name__}: {ex}"[:2000]}}
            results["errors"].append(f"W2 fp8: {traceback.format_exc()[-1500:]}")
        log(f"W2 fp8: {results['fp8']['W2'].get('status')} {results['fp8']['W2'].get('speedup_vs_bf16')}")
        common.write_json(path, results)
    if not getattr(args, "no_planning", False):
        packinfer_planning(results, path, lib, ctx, works, trace, args)
    # Last, as the newest code path: W4 at the managed level.
    # W4 at the managed level (forked sequences in a pool), pages as appended and after relayout.
    w4 = results["workloads"]["W4"]
    if not lib.has("packinfer_pool_create"):
        w4["contenders"][OURS_MANAGED] = {"status": "not yet", "note": "no packinfer_pool_* exports in this build"}
    elif ctx is None:
        w4["contenders"][OURS_MANAGED] = {"status": cuda_status, "note": cuda_note}
    elif tensors.get("W4") is not None:
        try:
            t = tensors["W4"]
            others = saved_outputs(state, "W4")
            variants = run_w4_managed(lib, ctx, t, timer, t.reference(check_requests(t.w, args.seed)), others)
            w4["contenders"][OURS_MANAGED] = variants["group-contiguous (after relayout)"]
            results.setdefault("managed", {})["W4"] = {
                k: {"status": v["status"], "time_us": v.get("time_us", {}).get("median"), "note": v.get("note"),
                    "rel_err_fp64": v.get("check", {}).get("rel_err_fp64"), "relayout": v.get("relayout"),
                    "pool_stats": v.get("pool_stats"), "stats": v.get("plan_stats")} for k, v in variants.items()}
        except pc.PackinferError as ex:
            w4["contenders"][OURS_MANAGED] = {"status": "unsupported" if ex.status == "UNSUPPORTED" else "error",
                                              "note": f"{ex.func}: {ex.message}"[:500]}
        except Exception as ex:
            w4["contenders"][OURS_MANAGED] = {"status": "error", "note": f"{type(ex).__name__}: {ex}"[:500]}
        log(f"W4 {OURS_MANAGED}: {report.cell(w4['contenders'][OURS_MANAGED], w4)}")
    m = w4["contenders"].get(OURS_MANAGED, {})
    if m.get("status") != "ok":
        results["not_measured"]["W4 at the managed level and group-contiguous layout on/off"] = (
            f"{m.get('status')}: {m.get('note')}")
    common.write_json(path, results)
    log("ours done")


def packinfer_planning(results, path, lib, ctx, works, trace, args):
    """Planning time (host): plan_create, the planner's own clock, launch_create (+ upload wait)."""
    def stream():
        return torch.cuda.current_stream().cuda_stream
    plan_ctx = ctx or lib.context(pc.BACKEND_CPU)
    note = None if ctx else "PackInfer planned for the CPU backend's profile (no CUDA backend in this build)"
    sets = works + [wl.decode_batch(trace, 256, args.seed), wl.decode_batch(trace, 1024, args.seed)]
    for w in sets:
        p = results["planning"].setdefault(w.name, {"requests": w.batch_size})
        try:
            batch = wl.batch_arrays(w, SHAPE)
            host, inner, launch_us = [], [], []
            for _ in range(20):
                plan, s = plan_ctx.plan(batch)
                host.append(s * 1e6)
                inner.append(plan.stats()["planning_time_us"])
                if ctx is not None:
                    t0 = time.perf_counter()
                    launch = ctx.launch(plan, stream())
                    launch.wait()
                    launch_us.append((time.perf_counter() - t0) * 1e6)
                    launch.destroy()
                plan.destroy()
            p["packinfer_plan_us"], p["packinfer_planner_us"] = common.summary(host), common.summary(inner)
            if launch_us:
                p["packinfer_launch_us"] = common.summary(launch_us)
            if note:
                p["note"] = note
        except Exception as ex:
            p["packinfer_plan_us"] = f"error: {ex}"
    common.write_json(path, results)
    # The host path of an engine's step (issue 21): packinfer_plan_update into the last step's
    # plan, then packinfer_launch_update of a capacity launch while the GPU is still busy with
    # the step before (a GPU sleep stands for its layers), and their sum; with and without prefix
    # groups for the decode batches (8 consecutive requests share half the shortest's KV).
    host_sets = [(w, wl.batch_arrays(w, SHAPE)) for w in sets]
    for n in (256, 1024):
        w = wl.decode_batch(trace, n, args.seed)
        groups = [(max(1, int(w.kv_lens[i:i + 8].min()) // 2), list(range(i, min(i + 8, n)))) for i in range(0, n, 8)]
        shared = dataclasses.replace(w, name=f"{w.name}+prefix", prefix_groups=groups)
        host_sets.append((shared, wl.batch_arrays(shared, SHAPE)))
    for w, batch in host_sets:
        p = results["planning"].setdefault(w.name, {"requests": w.batch_size})
        try:
            if not lib.has("packinfer_plan_update"):
                p["host_path"] = "not yet: no packinfer_plan_update in this build"
                continue
            plan, _ = plan_ctx.plan(batch)
            launch = ctx.launch_with_capacity(plan, stream()) if ctx is not None else None
            replan_us, update_us = [], []
            for _ in range(HOST_PATH_ITERS):
                replan_us.append(plan_ctx.replan(plan, batch) * 1e6)
                if launch is not None:
                    gpu_sleep(200_000)
                    update_us.append(launch.update(plan, stream()) * 1e6)
                    torch.cuda.synchronize()
            p["packinfer_replan_us"] = common.summary(replan_us)
            if update_us:
                p["packinfer_update_us"] = common.summary(update_us)
                p["packinfer_replan_plus_update_us"] = common.summary([a + b for a, b in zip(replan_us, update_us)])
            if launch is not None:
                launch.destroy()
            plan.destroy()
        except Exception as ex:
            p["host_path"] = f"error: {type(ex).__name__}: {ex}"[:500]
    common.write_json(path, results)


def run_w4_managed(lib, ctx, t, timer, refs, others):
    """W4 through the managed pool (managed.py), one pool per rotation set built from that set's
    cache rows: timed with the pages as appended, then after packinfer_pool_relayout."""
    w = t.w
    prefix, own, _ = managed.w4_rows(w)
    prefix, own = torch.tensor(prefix, device="cuda"), torch.tensor(own, device="cuda")
    hkv, d = SHAPE.num_kv_heads, SHAPE.head_dim
    stream = torch.cuda.current_stream().cuda_stream
    pools = []
    try:
        for s in range(t.sets):
            kf, vf = t.k[s].view(-1, hkv, d), t.v[s].view(-1, hkv, d)
            rows = [kf[prefix].contiguous(), vf[prefix].contiguous(), kf[own].contiguous(), vf[own].contiguous()]
            pool, forks = managed.build_w4_pool(ctx, w, SHAPE, *[r.data_ptr() for r in rows], stream=stream)
            pools.append((pool, forks, rows))
        torch.cuda.synchronize()
        out = {}
        for name, relayout in (("as appended (pages interleaved)", False), ("group-contiguous (after relayout)", True)):
            plans, launches, report_ = [], [], None
            try:
                for pool, forks, _ in pools:
                    plan, _ = pool.plan(forks, [1] * len(forks))
                    if relayout:
                        report_ = pool.relayout(plan, forks, True, stream)
                        plan.destroy()
                        plan, _ = pool.plan(forks, [1] * len(forks))
                    plans.append(plan)
                    launches.append(ctx.launch(plan, stream))
                torch.cuda.synchronize()
                outs = [torch.full((w.total_q, SHAPE.num_qo_heads, d), float("nan"), device="cuda", dtype=DT)
                        for _ in range(t.sets)]
                layouts = [pool.kv_layout(0) for pool, _, _ in pools]

                def call(i):
                    s = i % t.sets
                    launches[s].run(t.q[s].data_ptr(), layouts[s], outs[s].data_ptr(), 0,
                                    torch.cuda.current_stream().cuda_stream)
                    return outs[s]
                res, _ = measure(timer, call, t.sets, refs, others, graph=True)
                res["plan_stats"] = plans[0].stats()
                res["pool_stats"] = pools[0][0].stats()
                if relayout:
                    res["relayout"] = report_
                out[name] = res
            finally:
                torch.cuda.synchronize()
                for x in launches + plans:
                    x.destroy()
        return out
    finally:
        for pool, _, _ in pools:
            pool.destroy()


def fp8_cache(t):
    """fp8 e4m3 copies of t's K/V sets with one per-tensor scale each for K and V (amax / 448 over
    every set, as an engine's calibration gives), and a view of t whose set 0 is the dequantized
    cache (code x scale, float32) for the float64 reference."""
    scale_k = max(float(k.abs().max()) for k in t.k) / 448.0
    scale_v = max(float(v.abs().max()) for v in t.v) / 448.0

    def quantize(x, scale):
        # Round to nearest even, saturated (torch's cast gives NaN past the range).
        return (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    k8 = [quantize(k, scale_k) for k in t.k]
    v8 = [quantize(v, scale_v) for v in t.v]
    deq = copy.copy(t)
    deq.k = [k8[0].float() * scale_k]
    deq.v = [v8[0].float() * scale_v]
    return k8, v8, scale_k, scale_v, deq


def run_w2_fp8(lib, ctx, t, timer, seed, bf16):
    """PackInfer on W2 with an fp8 cache of the same values (per-tensor scales), checked against
    the float64 reference of the dequantized cache and timed like the bf16 run (`bf16`, this
    process's result on the same tensors)."""
    k8, v8, scale_k, scale_v, deq = fp8_cache(t)
    refs = deq.reference(check_requests(t.w, seed))
    arrays = wl.batch_arrays(t.w, SHAPE)
    arrays.desc.kv_dtype = pc.DTYPE_FP8_E4M3
    plan, plan_s = ctx.plan(arrays)
    launch = None
    try:
        launch = ctx.launch(plan, torch.cuda.current_stream().cuda_stream)
        launch.wait()
        hkv, d = SHAPE.num_kv_heads, SHAPE.head_dim
        layouts = [lib.kv_layout_nhd(k8[s].data_ptr(), v8[s].data_ptr(), t.w.page_size, hkv, d) for s in range(t.sets)]
        outs = [torch.full((t.w.total_q, SHAPE.num_qo_heads, d), float("nan"), device="cuda", dtype=DT)
                for _ in range(t.sets)]

        def call(i):
            s = i % t.sets
            launch.run(t.q[s].data_ptr(), layouts[s], outs[s].data_ptr(), 0, torch.cuda.current_stream().cuda_stream,
                       k_scale=scale_k, v_scale=scale_v)
            return outs[s]
        res, _ = measure(timer, call, t.sets, refs, {}, graph=True)
        res["scales"] = {"k_scale": scale_k, "v_scale": scale_v, "kind": "per-tensor, amax / 448"}
        res["plan_us"] = plan_s * 1e6
        fp8_us, bf16_us = res.get("time_us", {}).get("median"), bf16.get("time_us", {}).get("median")
        res["bf16_time_us"] = bf16_us
        if fp8_us and bf16_us:
            res["speedup_vs_bf16"] = bf16_us / fp8_us
        torch.cuda.synchronize()
    finally:
        if launch is not None:
            launch.destroy()
        plan.destroy()
    if os.environ.get("PACKINFER_FP8_FLASHINFER", "0") == "1":
        # The anchor: FlashInfer's tensor-core decode on the same fp8 cache and scales. Opt-in:
        # its fp8 module is JIT-built here, inside the ours phase's time limit and outside the
        # anchors phase's warm-up, which the ours phase is meant to leave the CPU to.
        try:
            res["flashinfer"] = flashinfer_fp8_decode(t, k8, v8, scale_k, scale_v, refs, timer)
            fi_us = res["flashinfer"].get("time_us", {}).get("median")
            if fi_us and res.get("time_us", {}).get("median"):
                res["speedup_vs_flashinfer_fp8"] = fi_us / res["time_us"]["median"]
        except Exception as ex:
            res["flashinfer"] = {"status": "error", "note": f"{type(ex).__name__}: {ex}"[:2000]}
    return res


def flashinfer_fp8_decode(t, k8, v8, scale_k, scale_v, refs, timer):
    """FlashInfer's BatchDecodeWithPagedKVCacheWrapper (tensor cores) over fp8 e4m3 K/V sets
    k8/v8 with per-tensor scales, checked against `refs` (the dequantized cache's) and timed."""
    fi, _, err = anchors.import_flashinfer()
    if fi is None:
        return {"status": "not run", "note": f"flashinfer did not import: {err}"}
    hq, hkv, d = SHAPE.num_qo_heads, SHAPE.num_kv_heads, SHAPE.head_dim
    wr = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(), "NHD", use_tensor_cores=True)

    def plan(sm_scale):
        t0 = time.perf_counter()
        wr.plan(t.kv_indptr, t.kv_indices, t.kv_last, hq, hkv, d, t.w.page_size, q_data_type=DT,
                kv_data_type=torch.float8_e4m3fn, sm_scale=sm_scale)
        return time.perf_counter() - t0
    plan_s = plan(SHAPE.sm_scale)
    outs = [torch.full((t.w.total_q, hq, d), float("nan"), device="cuda", dtype=DT) for _ in range(t.sets)]
    api = "BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=True), kv_data_type=float8_e4m3fn, run(k_scale, v_scale)"
    try:
        wr.run(t.q[0], (k8[0], v8[0]), k_scale=scale_k, v_scale=scale_v, out=outs[0])

        def call(i):
            s = i % t.sets
            return wr.run(t.q[s], (k8[s], v8[s]), k_scale=scale_k, v_scale=scale_v, out=outs[s])
    except TypeError:
        # A run() without scale arguments: the K scale folded into sm_scale at plan time and the
        # output multiplied by the V scale (what engines did before; the multiply is timed).
        plan_s = plan(SHAPE.sm_scale * scale_k)
        api = ("BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=True), kv_data_type=float8_e4m3fn, "
               "plan(sm_scale x k_scale), out *= v_scale")

        def call(i):
            s = i % t.sets
            return wr.run(t.q[s], (k8[s], v8[s]), out=outs[s]).mul_(scale_v)
    res, _ = measure(timer, call, t.sets, refs, {}, graph=True)
    res["api"] = api
    res["version"] = anchors.flashinfer_version(fi)
    res["first_plan_s"] = plan_s
    return res


def phase_features(args):
    """The serving-feature variants (workloads.build_features: W1 under a 4096-token sliding window,
    W2 with a logit soft-cap of 50): PackInfer, FA2 (window only: PyTorch's FA2 has no soft-cap),
    FA3 (varlen, and for decodes flash_attn_with_kvcache) and FlashInfer (ragged prefill fa2/fa3
    with plan(window_left); decode on CUDA and tensor cores with plan(logits_soft_cap), and
    BatchAttention), each checked against the float64 reference of the same masked or capped
    attention, into results["features"]. FlashInfer's window and soft-cap kernels are JIT modules
    of their own (anchors.FEATURE_MODULES): a contender runs only when the warm-up built its module
    (flashinfer_units, as in the anchors phase); why any other did not run is in results["not_run"]."""
    trace = wl.load_trace(args.trace)
    feats = wl.build_features(trace, seed=args.seed, scale=SCALE)
    l2 = l2_cache_bytes()
    path = os.path.join(args.out, "results.json")
    results = load_results(path) or base_results(args, trace, wl.build_all(trace, seed=args.seed, scale=SCALE), l2)
    out = results.setdefault("features", {})
    results["not_run"] = results.get("not_run", {})
    results.setdefault("planning", {})
    # What an earlier features run (or a harness before FlashInfer's feature contenders) said did
    # not run: this run says it again where it still holds.
    results["not_run"].pop("FlashInfer with a sliding window or soft-cap (W1-window, W2-softcap)", None)
    names = {w.name for w in feats}
    for k in [k for k in results["not_run"] if k.replace("/", " ").split(" ")[0] in names]:
        del results["not_run"][k]
    end = float(os.environ.get("PACKINFER_FEATURES_END", time.time() + 600))
    # The warm-up has ended when run_anchors.sh starts this phase: no marker is waited for, unless
    # the warm-up's deadline is still ahead.
    deadline = min(end, float(os.environ.get("PACKINFER_WARM_DEADLINE", 0)))
    state = os.path.join(args.state, "outputs")
    os.makedirs(state, exist_ok=True)
    timer = Timer()
    try:
        lib = pc.Library(args.lib)
        ctx = lib.context(pc.BACKEND_CUDA)  # kernels compile on first use (or come from the disk cache)
        ours_note = None
    except Exception as ex:
        lib = ctx = None
        ours_note = f"no PackInfer CUDA context ({args.lib}): {type(ex).__name__}: {ex}"[:1000]
    fa3, _, fa3_err = anchors.import_fa3()
    tensors = {}
    for w in feats:
        e = out[w.name] = {"describe": w.describe(), "flops": wl.flops(w, SHAPE), "min_bytes": wl.min_bytes(w, SHAPE),
                           "window_left": w.window_left, "logits_soft_cap": w.logits_soft_cap,
                           "plain": w.name.split("-")[0], "contenders": {}}
        c = e["contenders"]
        try:
            t = WorkloadTensors(w, args.seed, l2)
            refs = t.reference(check_requests(w, args.seed))
            tensors[w.name] = (t, refs)
        except Exception as ex:
            e["error"] = f"inputs: {type(ex).__name__}: {ex}"[:1000]
            continue
        if ctx is None:
            c[OURS] = {"status": "error", "note": ours_note}
        else:
            try:
                c[OURS], _ = run_ours(lib, ctx, t, timer, refs, {}, graph=True)
            except Exception as ex:
                c[OURS] = {"status": "error", "note": f"{type(ex).__name__}: {ex}"[:2000]}
        if w.logits_soft_cap:
            c[FA2] = {"status": "unsupported", "note": "torch.ops.aten._flash_attention_forward has no soft-cap"}
        else:
            c[FA2], _ = measure(timer, fa2_call(t), t.sets, refs, {})
            c[FA2]["api"] = "torch.ops.aten._flash_attention_forward (varlen, window_size_left/right)"
        if fa3 is None:
            c[f"{anchors.FA3} varlen"] = {"status": "error", "note": f"import fa3_fwd_interface: {fa3_err}"[:1000]}
        else:
            for a in anchors.fa3_contenders(fa3, t, SHAPE, DT):
                if isinstance(a, tuple):
                    c[a[0]] = {"status": "error", "api": a[1], "note": a[3]}
                    continue
                try:
                    if a.plan is not None:
                        a.plan()
                    res, _ = measure(timer, a.run, t.sets, refs, {}, graph=a.graph, view=a.view)
                except Exception as ex:
                    res = {"status": "error", "note": f"{type(ex).__name__}: {ex}"[:2000]}
                res["api"] = a.api
                c[a.name] = res
        for name, res in c.items():
            log(f"{w.name} {name}: {res.get('status')} {(res.get('time_us') or {}).get('median')} {res.get('note', '')[:200]}")
        set_floors(results)
        common.write_json(path, results)
    # FlashInfer last: a CUDA fault in one of its units loses only the units after it.
    works = [w for w in feats if w.name in tensors]
    fi, stubs, fi_err = anchors.import_flashinfer()
    if fi is None:
        results["not_run"]["FlashInfer (W1-window, W2-softcap)"] = f"import flashinfer: {fi_err}"
        works = []
    for w in works:
        for name, why in anchors.not_applicable(anchors.kind_of(w)).items():
            results["not_run"][f"{w.name} {name}"] = why
    progress = {"started": [], "done": []}  # this process's only: a rerun of the phase measures again
    pending = flashinfer_units(fi, results, path, works, lambda w: tensors[w.name], progress, timer, state, end,
                               deadline, section="features")
    for w, m in pending:
        results["not_run"][f"{w.name} FlashInfer module '{m}'"] = "the features phase ran out of its time budget first"
    for w in works:
        for name, res in out[w.name]["contenders"].items():
            if name.startswith(FI) and res.get("status") != "ok":
                results["not_run"][f"{w.name} {name}"] = f"{res.get('status')}: {res.get('note', '')}"[:2000]
    common.write_json(path, results)
    tensors.clear()
    torch.cuda.empty_cache()
    log("features done")


def run_ours(lib, ctx, t, timer, refs, others, flags=0, capacity=0.0, graph=True, save_to=None):
    """Plans t's batch with `flags`/`capacity`, binds it, checks (unless refs is None) and times;
    `save_to`: where to keep a checked output for the other phases' cross-checks."""
    batch = wl.batch_arrays(t.w, SHAPE)
    plan, plan_s = ctx.plan(batch, flags=flags, capacity=capacity, window_left=t.w.window_left)
    launch = None
    try:
        stats = plan.stats()
        launch = ctx.launch(plan, torch.cuda.current_stream().cuda_stream)
        launch.wait()
        outs = [torch.full((t.w.total_q, SHAPE.num_qo_heads, SHAPE.head_dim), float("nan"), device="cuda", dtype=DT)
                for _ in range(t.sets)]
        call = ours_call(lib, launch, t, outs)
        res, out = measure(timer, call, t.sets, refs, others, graph=graph)
        if save_to and out is not None and res.get("check", {}).get("ok"):
            torch.save(out.cpu(), save_to)
        res["plan_stats"] = stats
        res["plan_us"] = plan_s * 1e6
        torch.cuda.synchronize()
        return res, stats
    finally:
        if launch is not None:
            launch.destroy()
        plan.destroy()


# ----------------------------------------------------------------------------------------------
# FlashInfer JIT warm-up (runs in the background while the anchors phase builds tensors)


def phase_warm(module):
    """Builds FlashInfer's JIT module `module` (anchors.MODULES) by running its contenders on a
    tiny workload of the same shape, dtype, mask and page size; writes the outcome marker."""
    anchors.write_marker(module, None, f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}")
    t0 = time.time()
    try:
        fi, stubs, err = anchors.import_flashinfer()
        if fi is None:
            raise RuntimeError(f"import flashinfer: {err}")
        w = anchors.tiny_workload(anchors.MODULE_KIND[module])
        t = WorkloadTensors(w, 0, 1 << 20)
        built = anchors.flashinfer_contenders(fi, t, SHAPE, DT, workspace, only_modules={module})
        if not built:
            raise RuntimeError(f"no contender uses module {module!r} for a {anchors.MODULE_KIND[module]} workload")
        errors, unsupported = [], []
        for c in built:
            if isinstance(c, tuple):
                errors.append(f"{c[0]}: {c[3]}")
                continue
            try:
                if c.plan is not None:
                    c.plan()
                c.run(0)
                torch.cuda.synchronize()
            except anchors.Unsupported as ex:
                unsupported.append(f"{c.name}: {ex}"[-3000:])
            except Exception as ex:
                errors.append(f"{c.name}: {type(ex).__name__}: {ex}"[-3000:])
        if errors and len(errors) + len(unsupported) == len(built):
            raise RuntimeError("; ".join(errors + unsupported))
        # An API that does not take the workload's keywords has nothing to build: the marker says
        # done, and the measuring phase records the contender as not run with the same message.
        done = f"built in {time.time() - t0:.0f} s" if len(unsupported) < len(built) else "nothing to build"
        anchors.write_marker(module, True, done + (f"; {errors + unsupported}" if errors or unsupported else ""))
        log(f"FlashInfer JIT warm-up '{module}' done in {time.time() - t0:.0f} s")
    except Exception as ex:
        anchors.write_marker(module, False, f"{type(ex).__name__}: {ex}"[-4000:] + f" (after {time.time() - t0:.0f} s)")
        log(f"FlashInfer JIT warm-up '{module}' failed after {time.time() - t0:.0f} s: {ex}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase", required=True,
                    choices=["anchors", "ours", "features", "planning", "report"] + [f"warm-{m}" for m in anchors.MODULES])
    ap.add_argument("--out", default=".")
    ap.add_argument("--state", default="/tmp/packinfer_bench", help="where outputs are kept between phases")
    ap.add_argument("--trace", default="../shared/traces/azure_llm_2023_code.csv")
    ap.add_argument("--lib", default="target/release/libpackinfer.so")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-planning", action="store_true", help="ours: leave planning time to --phase planning")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.phase.startswith("warm-"):
        phase_warm(args.phase[5:])
    elif args.phase == "anchors":
        try:
            phase_anchors(args)
        except ContextLost as ex:
            log(f"CUDA context lost in {ex}; exiting for a resume in a new process")
            sys.exit(3)
    elif args.phase == "ours":
        phase_ours(args)
    elif args.phase == "features":
        try:
            phase_features(args)
        except ContextLost as ex:
            log(f"CUDA context lost in {ex}; the features measured before it are in results.json")
            sys.exit(3)
    elif args.phase == "planning":
        phase_planning(args)
    else:
        path = os.path.join(args.out, "results.json")
        results = load_results(path)
        if results is None:
            sys.exit(f"{path} does not exist: no phase wrote results")
        set_floors(results)
        report.write_all(results, args.out)
        common.write_json(path, results)
        print(open(os.path.join(args.out, "results.md")).read())


if __name__ == "__main__":
    main()
