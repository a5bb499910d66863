"""Pieces both harnesses share: the list of ablations, summary statistics, result files."""

import datetime
import json
import os
import subprocess

import numpy as np

import packinfer_ctypes as pc

# Ablations of our library: name -> PackinferPlanOptions.flags. "group-contiguous layout" is a
# property of the managed KV pool (packinfer_pool_*), reported separately.
ABLATIONS = {
    "default": 0,
    "no packed tiles": pc.FLAG_NO_PACKING,
    "one request per CTA (no balancing)": pc.FLAG_NO_BALANCING,
    "no prefix groups": pc.FLAG_NO_PREFIX_SHARING,
    "no split-KV": pc.FLAG_NO_SPLIT_KV,
    "deterministic": pc.FLAG_DETERMINISTIC,
}

# Capacity sweep: multiples of the capacity the planner chooses by itself.
CAPACITY_FACTORS = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]

REL_TOL = 2e-2  # ||out - ref|| / ||ref|| for bf16 outputs (bf16 operands land 1e-3..1e-2)


def summary(samples):
    """Median and spread of a list of times (same unit in, same unit out)."""
    a = np.asarray(samples, dtype=np.float64)
    return {"median": float(np.median(a)), "min": float(a.min()), "p10": float(np.percentile(a, 10)),
            "p90": float(np.percentile(a, 90)), "n": int(a.size)}


def git_commit(root):
    """The commit of the checkout, or what $PACKINFER_COMMIT / a COMMIT file next to the library says."""
    if os.environ.get("PACKINFER_COMMIT"):
        return os.environ["PACKINFER_COMMIT"]
    try:
        return subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except Exception:
        return "unknown"


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_json(path, results):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=_jsonable)
    os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def floor_of(flops, nbytes, ceilings):
    """The physical floor in microseconds: the larger of compute time and memory time."""
    t_compute = flops / (ceilings["matmul_tflops"] * 1e12) * 1e6
    t_memory = nbytes / (ceilings["copy_gbps"] * 1e9) * 1e6
    return {"floor_us": max(t_compute, t_memory), "compute_us": t_compute, "memory_us": t_memory,
            "bound": "compute" if t_compute >= t_memory else "memory"}


def reference_attention(q, k_slots, v_slots, causal, scale, window_left=None, soft_cap=0.0):
    """float64 attention of one request: q [n, Hq, D], k/v [kv, Hkv, D]; bottom-right causal;
    `window_left`: each query sees its own key and the window_left keys before it; `soft_cap`:
    scores become cap * tanh(score / cap)."""
    n, hq, _ = q.shape
    kv, hkv, _ = k_slots.shape
    g = hq // hkv
    k = np.repeat(k_slots.astype(np.float64), g, axis=1)
    v = np.repeat(v_slots.astype(np.float64), g, axis=1)
    s = np.einsum("nhd,khd->hnk", q.astype(np.float64), k) * scale
    if soft_cap:
        s = soft_cap * np.tanh(s / soft_cap)
    pos = kv - n + np.arange(n)  # each query's own key
    keys = np.arange(kv)[None, None, :]
    if causal:
        s = np.where(keys <= pos[None, :, None], s, -np.inf)
    if window_left is not None:
        s = np.where(keys >= pos[None, :, None] - window_left, s, -np.inf)
    s -= s.max(axis=2, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=2, keepdims=True)
    return np.einsum("hnk,khd->nhd", p, v)
