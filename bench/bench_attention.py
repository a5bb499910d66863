#!/usr/bin/env python3
"""First timing of PackInfer's CUDA kernels against FlashAttention-2 (as shipped in PyTorch) on
W1-like (prefill) and W2-like (paged decode) batches from the Azure code trace (docs/workloads.md).

Same tensors for every contender; our output is checked against FA2's before anything is timed;
CUDA events, warm-up, median of 30 runs; ceilings (device copy, bf16 matmul) measured in the
same run. Usage: bench_attention.py LIBPACKINFER.so TRACE.csv OUT.json
"""
import ctypes as C
import json
import random
import sys
import time

import torch

LIB, TRACE, OUT = sys.argv[1], sys.argv[2], sys.argv[3]
lib = C.CDLL(LIB)
lib.packinfer_last_error.restype = C.c_char_p


class Handle(C.Structure):
    _fields_ = [("bits", C.c_uint64)]


class ContextOptions(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("backend", C.c_int), ("device_ordinal", C.c_uint32),
                ("num_threads", C.c_uint32), ("kernel_cache_dir", C.c_char_p)]


class BatchDesc(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("batch_size", C.c_uint32), ("qo_indptr", C.c_void_p),
                ("kv_indptr", C.c_void_p), ("kv_page_indices", C.c_void_p), ("kv_last_page_len", C.c_void_p),
                ("page_size", C.c_uint32), ("num_pages", C.c_uint32), ("num_qo_heads", C.c_uint32),
                ("num_kv_heads", C.c_uint32), ("head_dim", C.c_uint32), ("dtype", C.c_int), ("causal", C.c_bool),
                ("sm_scale", C.c_float), ("num_prefix_groups", C.c_uint32), ("prefix_groups", C.c_void_p)]


class KvLayout(C.Structure):
    _fields_ = [("k", C.c_void_p), ("v", C.c_void_p), ("stride_page", C.c_int64), ("stride_token", C.c_int64),
                ("stride_head", C.c_int64), ("stride_dim", C.c_int64)]


class RunArgs(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("q", C.c_void_p), ("q_stride_token", C.c_int64),
                ("q_stride_head", C.c_int64), ("kv", KvLayout), ("o", C.c_void_p), ("o_stride_token", C.c_int64),
                ("o_stride_head", C.c_int64), ("lse", C.c_void_p), ("stream", C.c_void_p)]


def ok(status, what):
    if status != 0:
        raise RuntimeError(f"{what}: status {status}: {lib.packinfer_last_error().decode()}")


HQ, HKV, D = 32, 8, 128
DT = torch.bfloat16
dev = torch.device("cuda")
rows = []
with open(TRACE) as f:
    next(f)
    for line in f:
        _, ctx, gen = line.strip().split(",")
        rows.append((int(ctx), int(gen)))

opts = ContextOptions(C.sizeof(ContextOptions), 2, 0, 0, None)
ctx = Handle()
ok(lib.packinfer_context_create(C.byref(opts), C.byref(ctx)), "context_create")
t0 = time.time()
ok(lib.packinfer_context_precompile(ctx), "precompile")
precompile_s = time.time() - t0


def timed(fn, reps=30, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def ours(q_lens, kv_lens, page_size, pages_of, k_cache, v_cache, q, causal, kv_layout):
    """Plans and launches once; returns (run closure, output, plan time in ms)."""
    n = len(q_lens)
    qo = [0]
    for x in q_lens:
        qo.append(qo[-1] + x)
    kvp, idx, last = [0], [], []
    for r in range(n):
        pg = pages_of[r]
        idx += pg
        kvp.append(len(idx))
        last.append(kv_lens[r] - (len(pg) - 1) * page_size)
    arr = lambda xs: (C.c_int32 * len(xs))(*xs)
    qo_a, kvp_a, idx_a, last_a = arr(qo), arr(kvp), arr(idx), arr(last)
    num_pages = k_cache.shape[0]
    b = BatchDesc(C.sizeof(BatchDesc), n, C.cast(qo_a, C.c_void_p), C.cast(kvp_a, C.c_void_p),
                  C.cast(idx_a, C.c_void_p), C.cast(last_a, C.c_void_p), page_size, num_pages, HQ, HKV, D, 1,
                  causal, 0.0, 0, None)
    plan = Handle()
    t = time.time()
    ok(lib.packinfer_plan_create(ctx, C.byref(b), None, C.byref(plan)), "plan_create")
    plan_ms = (time.time() - t) * 1e3
    stream = torch.cuda.current_stream().cuda_stream
    launch = Handle()
    ok(lib.packinfer_launch_create(ctx, plan, None, C.c_void_p(stream), C.byref(launch)), "launch_create")
    ok(lib.packinfer_launch_wait(launch), "launch_wait")
    o = torch.full_like(q, float("nan"))
    lse = torch.full((q.shape[0], HQ), float("nan"), device=dev, dtype=torch.float32)
    args = RunArgs(C.sizeof(RunArgs), q.data_ptr(), HQ * D, D, kv_layout, o.data_ptr(), HQ * D, D, lse.data_ptr(),
                   C.c_void_p(stream))

    def run():
        ok(lib.packinfer_run(launch, C.byref(args)), "run")

    return run, o, plan_ms


def fa2(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    return lambda: torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
                                                         scale=D ** -0.5)[0]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


results = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "precompile_s": precompile_s}

# Ceilings.
x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
y = torch.empty_like(x)
ms = timed(lambda: y.copy_(x))
results["copy_GBps"] = 2 * x.numel() / ms / 1e6
del x, y
a = torch.randn(8192, 8192, dtype=DT, device=dev)
bm = torch.randn(8192, 8192, dtype=DT, device=dev)
ms = timed(lambda: a @ bm, reps=10)
results["matmul_TFLOPs"] = 2 * 8192 ** 3 / ms / 1e9
del a, bm

# W1 prefill: trace prompts (capped 16384) from row 0 until the sum reaches 16384; causal.
lens, tot = [], 0
for c, _ in rows:
    c = min(c, 16384)
    lens.append(c)
    tot += c
    if tot >= 16384:
        break
T = sum(lens)
q = torch.randn(T, HQ, D, dtype=DT, device=dev)
k = torch.randn(T, HKV, D, dtype=DT, device=dev)
v = torch.randn(T, HKV, D, dtype=DT, device=dev)
cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
ref_fn = fa2(q, k, v, cu, cu, max(lens), max(lens), True)
# Ours reads the same packed K/V as a page-size-1 cache (page = token).
starts = [0]
for x_ in lens:
    starts.append(starts[-1] + x_)
pages = [list(range(starts[r], starts[r + 1])) for r in range(len(lens))]
layout = KvLayout(k.data_ptr(), v.data_ptr(), HKV * D, 0, D, 1)
run, o, plan_ms = ours(lens, lens, 1, pages, k, v, q, True, layout)
run()
torch.cuda.synchronize()
err = rel(o, ref_fn())
flops = sum(4 * L * (L + 1) / 2 * HQ * D for L in lens)
t_ours, t_fa2 = timed(run), timed(ref_fn)
results["W1"] = {"requests": len(lens), "tokens": T, "err_vs_fa2": err, "ours_ms": t_ours, "fa2_ms": t_fa2,
                 "ours_TFLOPs": flops / t_ours / 1e9, "fa2_TFLOPs": flops / t_fa2 / 1e9, "speedup_vs_fa2": t_fa2 / t_ours,
                 "plan_ms": plan_ms}
print("W1", results["W1"], flush=True)
del q, k, v, o

# W2 decode: rows 1000..1127, kv = ContextTokens + uniform[0, GeneratedTokens]; page 16 scattered.
rnd = random.Random(2026)
kv_lens = [c + rnd.randint(0, g) for c, g in rows[1000:1128]]
n = len(kv_lens)
P = 16
npages = [(L + P - 1) // P for L in kv_lens]
total_pages = sum(npages) + 7
perm = list(range(total_pages))
rnd.shuffle(perm)
pages, at = [], 0
for c in npages:
    pages.append(perm[at:at + c])
    at += c
k_cache = torch.randn(total_pages, P, HKV, D, dtype=DT, device=dev)
v_cache = torch.randn(total_pages, P, HKV, D, dtype=DT, device=dev)
q = torch.randn(n, HQ, D, dtype=DT, device=dev)
# FA2 gets the same keys gathered contiguously (it has no page table here).
k_flat = torch.cat([k_cache[torch.tensor(pg, device=dev)].reshape(-1, HKV, D)[:L] for pg, L in zip(pages, kv_lens)])
v_flat = torch.cat([v_cache[torch.tensor(pg, device=dev)].reshape(-1, HKV, D)[:L] for pg, L in zip(pages, kv_lens)])
cu_q = torch.arange(n + 1, dtype=torch.int32, device=dev)
cu_k = torch.tensor([0] + list(torch.tensor(kv_lens).cumsum(0)), dtype=torch.int32, device=dev)
ref_fn = fa2(q, k_flat, v_flat, cu_q, cu_k, 1, max(kv_lens), True)
layout = KvLayout(k_cache.data_ptr(), v_cache.data_ptr(), P * HKV * D, HKV * D, D, 1)
run, o, plan_ms = ours([1] * n, kv_lens, P, pages, k_cache, v_cache, q, True, layout)
run()
torch.cuda.synchronize()
err = rel(o, ref_fn())
kv_bytes = 2 * sum(kv_lens) * HKV * D * 2
t_ours, t_fa2 = timed(run), timed(ref_fn)
results["W2"] = {"requests": n, "kv_tokens": sum(kv_lens), "err_vs_fa2": err, "ours_ms": t_ours, "fa2_unpaged_ms": t_fa2,
                 "ours_GBps": kv_bytes / t_ours / 1e6, "fraction_of_copy": kv_bytes / t_ours / 1e6 / results["copy_GBps"],
                 "speedup_vs_fa2": t_fa2 / t_ours, "plan_ms": plan_ms}
print("W2", results["W2"], flush=True)
json.dump(results, open(OUT, "w"), indent=1)
print(json.dumps(results, indent=1))
