#!/usr/bin/env python3
"""Kernel-tuning loop on the GPU machine: W1-W5 (bench/workloads.py), FA2 and PackInfer kernel
variants on the same tensors, each checked against a float64 subset and FA2 before it is timed
(eager, CUDA events, median). No FlashInfer (its JIT takes minutes): the full comparison is
gpu_bench.py / run_gpu.sh. Variants are sets of kernel defines (PACKINFER_KERNEL_DEFINES), one
context each, e.g.

    quick_gpu.py --lib libpackinfer.so --trace trace.csv --variant wgmma= --variant mma=-DPI_WGMMA=0
"""
import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gpu_bench as gb  # noqa: E402
import packinfer_ctypes as pc  # noqa: E402
import workloads as wl  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--out", default=".")
    ap.add_argument("--only", default="W1,W2,W3,W4,W5")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=DEFINES (space separated -D...), or NAME=DEFINES|WARPS|SHORT_KEYS|VAR=V,... to set "
                         "PACKINFER_TILE_WARPS, PACKINFER_SHORT_BATCH_KEYS and other variables too")
    args = ap.parse_args()
    variants = [v.split("=", 1) for v in (args.variant or ["default="])]
    works = [w for w in wl.build_all(wl.load_trace(args.trace), seed=0) if w.name in args.only.split(",")]
    timer = gb.Timer()
    lib = pc.Library(args.lib)
    ctxs = {}
    for name, defines in variants:
        defines, warps, short_keys, extra = (defines.split("|") + ["", "", ""])[:4]
        os.environ["PACKINFER_KERNEL_DEFINES"] = defines
        os.environ["PACKINFER_TILE_WARPS"] = warps
        os.environ["PACKINFER_SHORT_BATCH_KEYS"] = short_keys
        extra = dict(kv.split("=", 1) for kv in extra.split(",") if kv)
        os.environ.update(extra)
        ctx = lib.context(pc.BACKEND_CUDA)
        for k in extra:
            del os.environ[k]
        ctx.calibrate()
        ctxs[name] = ctx
    rows = []
    results = {"device": torch.cuda.get_device_name(0), "variants": dict(variants), "workloads": {}}
    for w in works:
        t = gb.WorkloadTensors(w, 0, gb.l2_cache_bytes())
        refs = t.reference(gb.check_requests(w, 0))
        fa2, fa2_out = gb.measure(timer, gb.fa2_call(t), t.fa2_sets, refs, {}, graph=False)
        entry = results["workloads"][w.name] = {"FA2": fa2}
        line = [w.name, fmt(fa2)]
        for name, _ in variants:
            res, _ = gb.run_ours(lib, ctxs[name], t, timer, refs, {"FA2": fa2_out}, graph=False)
            entry[name] = res
            line.append(fmt(res) + ratio(fa2, res))
        rows.append(line)
        print(" | ".join(line), flush=True)
        del t
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "quick.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    print("\n| workload | FA2 | " + " | ".join(n for n, _ in variants) + " |")
    print("|---" * (2 + len(variants)) + "|")
    for line in rows:
        print("| " + " | ".join(line) + " |")


def fmt(res):
    if res.get("status") != "ok":
        chk = res.get("check", {})
        return f"{res.get('status')} (err {chk.get('rel_err_fp64', '?')}, unwritten {chk.get('unwritten_or_nan', '?')}) {res.get('note', '')[:200]}"
    return f"{res['time_us']['median']:.1f} us"


def ratio(fa2, res):
    try:
        return f" ({fa2['time_us']['median'] / res['time_us']['median']:.2f}x FA2)"
    except Exception:
        return ""


if __name__ == "__main__":
    main()
