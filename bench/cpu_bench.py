"""CPU benchmark of PackInfer's CPU backend through the C ABI (numpy only, no torch).

    python3 bench/cpu_bench.py --lib target/release/libpackinfer.so \
        --trace ../shared/traces/azure_llm_2023_code.csv --out bench/results/cpu-DATE

Runs W1-W5 scaled down (every token count / --scale, model shape 8 query heads / 2 KV heads /
head_dim 64, bf16) on the CPU backend: each workload is planned, run once on poisoned output and
checked against a float64 numpy reference on a subset of requests, then timed (wall clock, median
of --iters runs). Reports tokens/s (query tokens; for decode also KV tokens read), GFLOP/s against
a numpy float32 matrix-product ceiling, the ablation flags, and planning time of the full-size
(unscaled, 32/8/128) workloads. This is what CPU users can expect, and it exercises the ctypes
layer and the workload construction that the GPU harness shares.
"""

import argparse
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402
import packinfer_ctypes as pc  # noqa: E402
import managed  # noqa: E402
import report  # noqa: E402
import workloads as wl  # noqa: E402

BF16_NAN = np.uint16(0x7FC0)
MANAGED = "PackInfer managed (forked sequences)"


def to_bf16(x):
    """float32 -> bf16 bits (round to nearest even), as uint16."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(b):
    return (b.astype(np.uint32) << 16).view(np.float32)


def check_requests(w, rng, k=3):
    """The longest request, the shortest and a random one (distinct)."""
    order = np.argsort(w.q_lens * 1_000_000 + w.kv_lens)
    picks = [int(order[-1]), int(order[0]), int(rng.integers(0, w.batch_size))]
    return list(dict.fromkeys(picks))[:k]


def cpu_ceilings(threads):
    n = 1024
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t0)
    matmul = 2 * n ** 3 / np.median(times) / 1e12
    src = np.ones(32 << 20, dtype=np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    copy = 2 * src.nbytes / np.median(times) / 1e9
    return {"matmul_tflops": float(matmul), "copy_gbps": float(copy),
            "how": f"numpy float32 {n}^3 matrix product; np.copyto of 128 MiB (read + write); medians of 5",
            "threads": threads}


class Inputs:
    """bf16 Q and paged K/V cache of a workload (random normal), and float64 reference rows of a
    few requests (their last 64 queries)."""

    def __init__(self, w, shape, rng):
        self.w, self.shape = w, shape
        self.q = to_bf16(rng.standard_normal((w.total_q, shape.num_qo_heads, shape.head_dim), dtype=np.float32))
        cache_shape = (w.num_pages, w.page_size, shape.num_kv_heads, shape.head_dim)
        self.k = to_bf16(rng.standard_normal(cache_shape, dtype=np.float32))
        self.v = to_bf16(rng.standard_normal(cache_shape, dtype=np.float32))
        kf = from_bf16(self.k).reshape(-1, shape.num_kv_heads, shape.head_dim)
        vf = from_bf16(self.v).reshape(-1, shape.num_kv_heads, shape.head_dim)
        qf = from_bf16(self.q)
        slots = w.kv_slots()
        self.refs = {}
        for r in check_requests(w, rng):
            q1 = int(w.qo_indptr[r + 1])
            n = min(int(w.q_lens[r]), 64)
            self.refs[r] = (q1 - n, q1, common.reference_attention(qf[q1 - n:q1], kf[slots[r]], vf[slots[r]], w.causal, shape.sm_scale))

    def flat_rows(self, slots):
        """Contiguous [len(slots), kv_heads, head_dim] copies of K and V rows of the cache."""
        d = (-1, self.shape.num_kv_heads, self.shape.head_dim)
        return np.ascontiguousarray(self.k.reshape(d)[slots]), np.ascontiguousarray(self.v.reshape(d)[slots])


def run_plan(ctx, plan, plan_s, layout, inp, iters, check=True):
    """Binds `plan`, runs it once on poisoned output, checks it, times it (microseconds)."""
    o = np.full(inp.q.shape, BF16_NAN, dtype=np.uint16)
    stats = plan.stats()
    launch = ctx.launch(plan)
    try:
        result = {"plan_us": plan_s * 1e6, "stats": stats}
        launch.run(inp.q.ctypes.data, layout, o.ctypes.data)
        out = from_bf16(o)
        if check:
            unwritten = int(np.isnan(out).sum())
            errs = {r: float(np.linalg.norm(out[a:b] - ref) / np.linalg.norm(ref)) for r, (a, b, ref) in inp.refs.items()}
            worst = max(errs.values())
            ok = unwritten == 0 and worst <= common.REL_TOL
            result["check"] = {"unwritten_elements": unwritten, "rel_err_fp64_by_request": errs, "rel_err_fp64": worst,
                               "ok": ok}
            if not ok:
                result["status"] = "mismatch"
                return result
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            launch.run(inp.q.ctypes.data, layout, o.ctypes.data)
            times.append((time.perf_counter() - t0) * 1e6)
        result["status"] = "ok"
        result["time_us"] = common.summary(times)
        return result
    finally:
        launch.destroy()


def run_workload(lib, ctx, inp, iters, flags=0, capacity=0.0, check=True):
    """Plans the kernel-level batch of `inp.w` and runs it (run_plan)."""
    w, shape = inp.w, inp.shape
    plan, plan_s = ctx.plan(wl.batch_arrays(w, shape), flags=flags, capacity=capacity)
    try:
        layout = lib.kv_layout_nhd(inp.k.ctypes.data, inp.v.ctypes.data, w.page_size, shape.num_kv_heads, shape.head_dim)
        return run_plan(ctx, plan, plan_s, layout, inp, iters, check)
    finally:
        plan.destroy()


def run_w4_managed(lib, ctx, inp, iters):
    """W4 through the managed pool (managed.py): as appended, then after relayout."""
    w = inp.w
    prefix, own, _ = managed.w4_rows(w)
    pk, pv = inp.flat_rows(prefix)
    ok_, ov = inp.flat_rows(own)
    pool, forks = managed.build_w4_pool(ctx, w, inp.shape, pk.ctypes.data, pv.ctypes.data, ok_.ctypes.data, ov.ctypes.data)
    out = {}
    try:
        layout = pool.kv_layout(0)
        ones = [1] * len(forks)
        for name, relayout in (("as appended (pages interleaved)", False), ("group-contiguous (after relayout)", True)):
            plan, plan_s = pool.plan(forks, ones)
            try:
                if relayout:
                    report = pool.relayout(plan, forks, regroup=True)
                    plan.destroy()
                    plan, plan_s = pool.plan(forks, ones)
                res = run_plan(ctx, plan, plan_s, layout, inp, iters)
                if relayout:
                    res["relayout"] = report
                res["pool_stats"] = pool.stats()
                out[name] = res
            finally:
                plan.destroy()
    finally:
        pool.destroy()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", default=os.path.join(os.path.dirname(HERE), "target", "release", "libpackinfer.so"))
    ap.add_argument("--trace", default="../shared/traces/azure_llm_2023_code.csv")
    ap.add_argument("--out", required=True, help="results directory (created)")
    ap.add_argument("--scale", type=int, default=8, help="divide every token count by this")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="CPU backend threads (0 = one per core)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    lib = pc.Library(args.lib)
    ctx = lib.context(pc.BACKEND_CPU, num_threads=args.threads)
    shape = wl.ModelShape(num_qo_heads=8, num_kv_heads=2, head_dim=64, dtype="bf16")
    trace = wl.load_trace(args.trace)
    os.makedirs(args.out, exist_ok=True)
    results = {
        "meta": {"mode": "cpu", "device": f"cpu: {platform.processor() or platform.machine()}, "
                 f"{ctx.num_workers} threads ({os.cpu_count()} cores visible)",
                 "date": common.utc_now(), "git_commit": common.git_commit(os.path.dirname(HERE)),
                 "packinfer_version": lib.version, "abi_version": lib.abi_version, "numpy": np.__version__,
                 "python": platform.python_version(), "shape": vars(shape), "seed": args.seed, "scale": args.scale,
                 "trace": os.path.basename(args.trace), "iters": args.iters,
                 "optional_exports": lib.optional_exports()},
        "ceilings": cpu_ceilings(ctx.num_workers), "workloads": {}, "ablations": {}, "capacity_sweep": {},
        "planning": {}, "errors": [],
    }
    print(f"PackInfer {lib.version} (ABI {lib.abi_version}) CPU backend, {ctx.num_workers} threads; "
          f"ceilings {results['ceilings']['matmul_tflops'] * 1e3:.1f} GFLOP/s, {results['ceilings']['copy_gbps']:.1f} GB/s")
    work = wl.build_all(trace, seed=args.seed, scale=args.scale, names=("W1", "W2", "W3", "W4", "W5"))
    inputs = {}
    for w in work:
        inp = inputs[w.name] = Inputs(w, shape, np.random.default_rng([args.seed, 1000 + int(w.name[1:])]))
        entry = {"describe": w.describe(), "flops": wl.flops(w, shape), "min_bytes": wl.min_bytes(w, shape)}
        entry.update(common.floor_of(entry["flops"], entry["min_bytes"], results["ceilings"]))
        try:
            res = run_workload(lib, ctx, inp, args.iters)
        except pc.PackinferError as e:
            res = {"status": "error", "note": str(e)}
        if res.get("status") == "ok":
            t = res["time_us"]["median"] * 1e-6
            res["tokens_per_s"] = w.total_q / t
            res["kv_tokens_per_s"] = w.total_kv / t
            res["gflops"] = entry["flops"] / t / 1e9
            res["fraction_of_floor"] = entry["floor_us"] / res["time_us"]["median"]
        entry["contenders"] = {"PackInfer (CPU)": res}
        results["workloads"][w.name] = entry
        print(f"{w.name}: {w.title}: {report.cell(res, entry)}")
        common.write_json(os.path.join(args.out, "results.json"), results)

    # W4 at the managed level: forked sequences in a pool, pages as appended, then relayout.
    w4 = results["workloads"]["W4"]
    if lib.has("packinfer_pool_create"):
        try:
            variants = run_w4_managed(lib, ctx, inputs["W4"], args.iters)
            w4["contenders"][MANAGED] = variants["group-contiguous (after relayout)"]
            rows = results.setdefault("managed", {}).setdefault("W4", {})
            for name, res in variants.items():
                rows[name] = {"status": res["status"], "time_us": res.get("time_us", {}).get("median"),
                              "rel_err_fp64": res.get("check", {}).get("rel_err_fp64"), "relayout": res.get("relayout"),
                              "pool_stats": res.get("pool_stats"), "stats": res.get("stats")}
        except pc.PackinferError as e:
            w4["contenders"][MANAGED] = {"status": "error", "note": str(e)}
    else:
        w4["contenders"][MANAGED] = {"status": "not yet", "note": "no packinfer_pool_* exports in this build"}
    print(f"W4 managed: {report.cell(w4['contenders'][MANAGED], w4)}")

    # Ablations (W1, W4, W5) and the capacity sweep (W1, W5), scaled down like the rest.
    for w in [x for x in work if x.name in ("W1", "W4", "W5")]:
        rows = {}
        for name, flags in common.ABLATIONS.items():
            try:
                res = run_workload(lib, ctx, inputs[w.name], args.iters, flags=flags)
                rows[name] = {"status": res["status"], "time_us": res.get("time_us", {}).get("median"),
                              "stats": res.get("stats"), "rel_err_fp64": res.get("check", {}).get("rel_err_fp64")}
            except pc.PackinferError as e:
                rows[name] = {"status": "error", "note": str(e)}
        results["ablations"][w.name] = rows
    for w in [x for x in work if x.name in ("W1", "W5")]:
        base = ctx.plan(wl.batch_arrays(w, shape))[0]
        auto = base.stats()
        base.destroy()
        reference_capacity = auto["capacity"] if auto["capacity"] > 0 else auto["max_group_cost"]
        sweep = []
        for f in common.CAPACITY_FACTORS:
            c = reference_capacity * f
            try:
                res = run_workload(lib, ctx, inputs[w.name], args.iters, capacity=c)
                if res["status"] != "ok":
                    sweep.append({"factor": f, "capacity": c, "error": res["status"]})
                    continue
                sweep.append({"factor": f, "capacity": c, "time_us": res["time_us"]["median"],
                              "groups": res["stats"]["num_groups"], "items": res["stats"]["num_work_items"]})
            except pc.PackinferError as e:
                sweep.append({"factor": f, "capacity": c, "error": str(e)})
        results["capacity_sweep"][w.name] = {"reference_capacity": reference_capacity,
                                             "auto_capacity_reported": auto["capacity"], "points": sweep}

    # Planning time of the full-size workloads (planned for this CPU context's profile).
    full_shape = wl.ModelShape()
    plan_sets = wl.build_all(trace, seed=args.seed, scale=1, names=("W1", "W2", "W3", "W4", "W5")) + [wl.decode_batch(trace, 256, args.seed),
                                                                wl.decode_batch(trace, 1024, args.seed)]
    for w in plan_sets:
        batch = wl.batch_arrays(w, full_shape)
        host, inner = [], []
        for _ in range(max(args.iters, 10)):
            plan, s = ctx.plan(batch)
            inner.append(plan.stats()["planning_time_us"])
            host.append(s * 1e6)
            plan.destroy()
        results["planning"][w.name] = {"requests": w.batch_size, "packinfer_plan_us": common.summary(host),
                                       "packinfer_planner_us": common.summary(inner),
                                       "note": "planned for the CPU backend's device profile"}
    common.write_json(os.path.join(args.out, "results.json"), results)
    report.write_all(results, args.out)
    print(open(os.path.join(args.out, "results.md")).read())


if __name__ == "__main__":
    main()
