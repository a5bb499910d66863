#!/usr/bin/env python3
"""One PackInfer launch per named workload (no calibration, no timing loop), for a profiler:

    ncu --kernel-name packed_attention --launch-count 1 python3 profile_once.py LIB TRACE W1 [W5 ...]

Each workload is planned, bound and run twice (the first run compiles and warms up), so with
--launch-skip 1 per workload the profiler sees a warm launch."""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gpu_bench as gb  # noqa: E402
import packinfer_ctypes as pc  # noqa: E402
import workloads as wl  # noqa: E402

lib_path, trace, names = sys.argv[1], sys.argv[2], sys.argv[3:]
lib = pc.Library(lib_path)
ctx = lib.context(pc.BACKEND_CUDA)
for w in wl.build_all(wl.load_trace(trace), seed=0):
    if w.name not in names:
        continue
    t = gb.WorkloadTensors(w, 0, 0)
    plan, _ = ctx.plan(wl.batch_arrays(w, gb.SHAPE))
    launch = ctx.launch(plan, torch.cuda.current_stream().cuda_stream)
    launch.wait()
    out = torch.empty((w.total_q, gb.SHAPE.num_qo_heads, gb.SHAPE.head_dim), device="cuda", dtype=gb.DT)
    call = gb.ours_call(lib, launch, t, [out] * t.sets)
    for _ in range(2):
        call(0)
    torch.cuda.synchronize()
    print(w.name, "ran", plan.stats() if hasattr(plan, "stats") else "", flush=True)
    launch.destroy()
    plan.destroy()
