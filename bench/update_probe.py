#!/usr/bin/env python3
"""Where `packinfer_launch_update`'s host time goes on the device (issue 21: W1 and W6 updates
took 0.5-1.6 ms in the planning phase against ~50-60 µs of host work in plan_bench):

    python3 update_probe.py LIB TRACE [W1 W6 W2 ...]

Per workload, the median host µs of packinfer_launch_update into a launch made with the plan's
own capacity, in four settings: the device idle (synchronized before each update), the device
busy (a GPU sleep queued first: the planning phase's setting), back to back with no
synchronization (the staging slots cycle), and packinfer_plan_update alone."""
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gpu_bench as gb  # noqa: E402
import packinfer_ctypes as pc  # noqa: E402
import workloads as wl  # noqa: E402


def median_us(f, n=40):
    times = []
    for _ in range(n):
        times.append(f() * 1e6)
    return statistics.median(times)


def main():
    lib_path, trace, names = sys.argv[1], sys.argv[2], sys.argv[3:] or ["W1", "W6", "W5", "W2"]
    lib = pc.Library(lib_path)
    ctx = lib.context(pc.BACKEND_CUDA)
    ctx.calibrate()  # the planning phase's plans use the calibrated profile
    works = {w.name: w for w in wl.build_all(wl.load_trace(trace))}

    def stream():
        return torch.cuda.current_stream().cuda_stream
    for name in names:
        batch = wl.batch_arrays(works[name], gb.SHAPE)
        plan, _ = ctx.plan(batch)
        launch = ctx.launch_with_capacity(plan, stream())
        launch.wait()

        def idle():
            torch.cuda.synchronize()
            return launch.update(plan, stream())

        def busy():
            gb.gpu_sleep(200_000)
            s = launch.update(plan, stream())
            torch.cuda.synchronize()
            return s

        def replan():
            return ctx.replan(plan, batch)
        row = {"idle": median_us(idle), "busy": median_us(busy), "back to back": median_us(lambda: launch.update(plan, stream())),
               "replan": median_us(replan)}
        torch.cuda.synchronize()
        stats = plan.stats()
        print(f"{name}: " + ", ".join(f"{k} {v:.1f} µs" for k, v in row.items())
              + f" | work items {stats['num_work_items']}, groups {stats['num_groups']}, "
              + f"split requests {stats['num_split_requests']}, merge rows {stats['num_merge_rows']}, "
              + f"partial slots {stats['num_partial_slots']}", flush=True)
        launch.destroy()
        plan.destroy()


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"done in {time.time() - t0:.1f} s")
