"""The benchmark workloads W1-W7 of docs/workloads.md, built from the trace with a fixed seed.

numpy only: the GPU harness turns these into torch tensors, the CPU benchmark into numpy arrays,
and both hand the same page tables to PackInfer, FlashAttention-2 and FlashInfer.

A workload is a list of requests (q_len, kv_len) plus where each request's keys live:
- paged (W2, W3, W4, W7): pages of 16 tokens, their physical order shuffled by the seed so a request's
  pages are scattered over the cache, as in a serving engine after some churn; W4's 64 requests
  all point at the same 256 prefix pages, then at their own suffix pages;
- ragged (W1, W5, W6): the keys of all requests packed back to back (FlashAttention's varlen layout),
  described to PackInfer as pages of one token in order, i.e. the very same tensor.

`scale` > 1 divides every token count (for the CPU benchmark); scale 1 is the definition.
"""

import csv
from dataclasses import dataclass, field

import numpy as np

import packinfer_ctypes as pc

PAGE_SIZE = 16
# The serving-feature variants (build_features): W1's sliding window in keys (window_left is one
# less: the query's own key plus the ones before it) and W2's logit soft-cap (Gemma 2's value).
FEATURE_WINDOW = 4096
FEATURE_SOFT_CAP = 50.0


@dataclass
class ModelShape:
    num_qo_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bf16"

    @property
    def sm_scale(self):
        return 1.0 / np.sqrt(self.head_dim)

    @property
    def elem_bytes(self):
        return 4 if self.dtype == "f32" else 2

    @property
    def packinfer_dtype(self):
        return {"f16": pc.DTYPE_F16, "bf16": pc.DTYPE_BF16, "f32": pc.DTYPE_F32}[self.dtype]


@dataclass
class Workload:
    name: str
    title: str
    q_lens: np.ndarray
    kv_lens: np.ndarray
    causal: bool
    page_size: int
    num_pages: int
    kv_indptr: np.ndarray
    kv_page_indices: np.ndarray
    kv_last_page_len: np.ndarray
    # [(prefix_len, [member requests])]: keys the members share (same pages, same content).
    prefix_groups: list = field(default_factory=list)
    ragged: bool = False
    # Sliding window (FlashInfer's window_left; None = none), fixed when the step is planned, and
    # the logit soft-cap (0 = none), given with each run: build_features' workloads set them.
    window_left: object = None
    logits_soft_cap: float = 0.0

    @property
    def batch_size(self):
        return len(self.q_lens)

    @property
    def qo_indptr(self):
        return np.concatenate([[0], np.cumsum(self.q_lens)]).astype(np.int64)

    @property
    def total_q(self):
        return int(self.q_lens.sum())

    @property
    def total_kv(self):
        return int(self.kv_lens.sum())

    def kv_slots(self):
        """For each request, the cache slot (page * page_size + offset) of each of its keys."""
        out = []
        for r in range(self.batch_size):
            pages = self.kv_page_indices[self.kv_indptr[r]:self.kv_indptr[r + 1]].astype(np.int64)
            slots = (pages[:, None] * self.page_size + np.arange(self.page_size)[None, :]).reshape(-1)
            out.append(slots[: self.kv_lens[r]])
        return out

    def unique_kv_tokens(self):
        return int(np.unique(np.concatenate(self.kv_slots())).size)

    def visible_pairs(self):
        """(query, key) pairs the mask lets through: what any exact kernel must compute."""
        q, k = self.q_lens.astype(np.int64), self.kv_lens.astype(np.int64)
        if self.window_left is not None:
            total = 0
            for qi, ki in zip(q, k):
                pos = ki - qi + np.arange(qi)  # each query's position
                end = pos + 1 if self.causal else np.full(qi, ki)
                total += int((end - np.clip(pos - self.window_left, 0, None)).clip(0).sum())
            return total
        if self.causal:
            return int((q * k - q * (q - 1) // 2).sum())
        return int((q * k).sum())

    def describe(self):
        return {
            "name": self.name, "title": self.title, "requests": self.batch_size, "query_tokens": self.total_q,
            "kv_tokens": self.total_kv, "unique_kv_tokens": self.unique_kv_tokens(), "causal": self.causal,
            "page_size": self.page_size, "ragged": self.ragged, "max_q": int(self.q_lens.max()),
            "max_kv": int(self.kv_lens.max()), "prefix_groups": [[int(p), len(m)] for p, m in self.prefix_groups],
        }


def flops(w, shape):
    """Two matrix products (QK^T and PV) of 2 flops per multiply-add over the visible pairs."""
    return 4 * shape.num_qo_heads * shape.head_dim * w.visible_pairs()


def min_bytes(w, shape):
    """Q read and O written once, each distinct key's K and V read once (W4's prefix once)."""
    rows = 2 * w.total_q * shape.num_qo_heads * shape.head_dim
    keys = 2 * w.unique_kv_tokens() * shape.num_kv_heads * shape.head_dim
    return (rows + keys) * shape.elem_bytes


def load_trace(path):
    """[rows, 2] int64 array of (ContextTokens, GeneratedTokens), rows counted from 0 after the header."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        try:
            ci, gi = header.index("ContextTokens"), header.index("GeneratedTokens")
        except ValueError:
            raise ValueError(f"{path}: header {header} lacks ContextTokens/GeneratedTokens")
        rows = [(int(r[ci]), int(r[gi])) for r in reader if r]
    if not rows:
        raise ValueError(f"{path} has no requests")
    return np.array(rows, dtype=np.int64)


def build_ragged(name, lens, causal, title=""):
    lens = np.array(lens, dtype=np.int64).reshape(-1, 2)
    q, k = lens[:, 0], lens[:, 1]
    kv_indptr = np.concatenate([[0], np.cumsum(k)])
    return Workload(name, title, q, k, causal, page_size=1, num_pages=int(k.sum()), kv_indptr=kv_indptr,
                    kv_page_indices=np.arange(k.sum(), dtype=np.int64), kv_last_page_len=(k > 0).astype(np.int64),
                    ragged=True)


def build_paged(name, lens, page_size, rng, causal, shared_prefix=0, title=""):
    """Pages scattered by `rng`; with `shared_prefix` > 0 every request's first `shared_prefix`
    keys are the same pages (a multiple of page_size, so no page is half shared)."""
    lens = np.array(lens, dtype=np.int64).reshape(-1, 2)
    q, k = lens[:, 0], lens[:, 1]
    if shared_prefix % page_size:
        raise ValueError(f"shared_prefix = {shared_prefix} is not a multiple of page_size = {page_size}")
    prefix_pages = shared_prefix // page_size
    own_pages = [-(-(kv - shared_prefix) // page_size) for kv in k]
    total = prefix_pages + sum(own_pages)
    physical = rng.permutation(total)
    prefix, next_page = physical[:prefix_pages], prefix_pages
    tables = []
    for n in own_pages:
        tables.append(np.concatenate([prefix, physical[next_page:next_page + n]]))
        next_page += n
    kv_indptr = np.concatenate([[0], np.cumsum([len(t) for t in tables])])
    last = np.where(k > 0, (k - 1) % page_size + 1, 0)
    groups = [(shared_prefix, list(range(len(k))))] if shared_prefix else []
    return Workload(name, title, q, k, causal, page_size, int(total), kv_indptr, np.concatenate(tables).astype(np.int64),
                    last, prefix_groups=groups)


def _scaled(x, scale):
    return np.maximum(1, np.asarray(x, dtype=np.int64) // scale)


ALL = ("W1", "W2", "W3", "W4", "W5", "W6", "W7")


def build_all(trace, seed=0, scale=1, names=ALL):
    """W1-W7 exactly as docs/workloads.md defines them (every token count divided by `scale`);
    `names` picks some of them (same definitions)."""
    ctx, gen = trace[:, 0], trace[:, 1]

    def rng(i):
        return np.random.default_rng([seed, i])

    def decode_kv(rows, r):
        return ctx[rows] + r.integers(0, gen[rows] + 1)

    need = {"W1": 1, "W2": 1128, "W3": 5096, "W4": 3064}
    if len(trace) < max(need.values()):
        raise ValueError(f"the trace has {len(trace)} rows; W3 needs rows 5000-5095 (5096 rows)")
    out = []
    # W1: prompts of rows 0, 1, 2, ... (each capped at 16384) until their sum reaches 16384.
    caps = np.minimum(ctx, 16384)
    n = int(np.searchsorted(np.cumsum(caps), 16384) + 1)
    p = _scaled(caps[:n], scale)
    out.append(build_ragged("W1", np.stack([p, p], 1), causal=True,
                            title=f"prefill, {n} trace prompts, {p.sum()} tokens"))
    # W2: rows 1000-1127 decoding: one query over ContextTokens + U[0, GeneratedTokens] keys.
    kv = _scaled(decode_kv(np.arange(1000, 1128), rng(2)), scale)
    out.append(build_paged("W2", np.stack([np.ones_like(kv), kv], 1), PAGE_SIZE, rng(20), causal=True,
                           title=f"decode, 128 trace contexts, {kv.sum()} KV tokens, page 16 scattered"))
    # W3: rows 5000-5095 decoding as in W2, plus one 2048-token prefill chunk over 4096 keys.
    kv = _scaled(decode_kv(np.arange(5000, 5096), rng(3)), scale)
    chunk_q, chunk_kv = max(1, 2048 // scale), max(1, 4096 // scale)
    lens = np.concatenate([np.stack([np.ones_like(kv), kv], 1), [[chunk_q, chunk_kv]]])
    out.append(build_paged("W3", lens, PAGE_SIZE, rng(30), causal=True,
                           title=f"mixed, 96 trace decodes + one {chunk_q}-token chunk over {chunk_kv} keys, paged"))
    # W4: 64 decodes sharing a 4096-token prefix; suffix of request i = 1 + GeneratedTokens of row 3000+i.
    prefix = max(PAGE_SIZE, (4096 // scale) // PAGE_SIZE * PAGE_SIZE)
    suffix = _scaled(1 + gen[3000:3064], scale)
    kv = prefix + suffix
    out.append(build_paged("W4", np.stack([np.ones_like(kv), kv], 1), PAGE_SIZE, rng(40), causal=True,
                           shared_prefix=prefix,
                           title=f"shared prefix, 64 decodes over one {prefix}-token prefix + trace suffixes"))
    # W5: 256 prompts of seeded uniform length in [16, 256].
    p = _scaled(rng(5).integers(16, 257, size=256), scale)
    out.append(build_ragged("W5", np.stack([p, p], 1), causal=True,
                            title=f"many short, 256 prompts of {p.min()}-{p.max()} tokens, {p.sum()} tokens"))
    # W6: one 16,384-token causal prompt (FlashAttention-3's benchmark shape: the compute ceiling).
    n6 = max(1, 16384 // scale)
    out.append(build_ragged("W6", [[n6, n6]], causal=True, title=f"one {n6}-token causal prompt"))
    # W7: a decode step of 32 requests over 32,768 keys each (long-context decode: split-KV decides).
    kv7 = max(1, 32768 // scale)
    out.append(build_paged("W7", [[1, kv7]] * 32, PAGE_SIZE, rng(70), causal=True,
                           title=f"long decode, 32 requests over {kv7} keys each, page 16 scattered"))
    return [w for w in out if w.name in names]


def build_features(trace, seed=0, scale=1):
    """The serving-feature variants of docs/workloads.md: W1 under a 4096-token sliding window
    (Mistral-style, window_left 4095: each query sees itself and the 4095 keys before it) and W2
    with a Gemma-2-like logit soft-cap of 50. Same requests, pages and seeds as build_all; a
    harness plans with `w.window_left` and runs with `w.logits_soft_cap`."""
    w1, w2 = build_all(trace, seed, scale)[:2]
    w1.name, w1.window_left = "W1-window", max(0, FEATURE_WINDOW // scale - 1)
    w1.title += f", sliding window of {w1.window_left + 1} keys"
    w2.name, w2.logits_soft_cap = "W2-softcap", FEATURE_SOFT_CAP
    w2.title += f", logit soft-cap {FEATURE_SOFT_CAP:g}"
    return [w1, w2]


def number(name):
    """The workload number of `name` ("W1" and its variant "W1-window": 1), which seeds its inputs."""
    return int(name[1:].split("-")[0])


def decode_batch(trace, num_requests, seed=0, first_row=2000):
    """A decode step of `num_requests` trace contexts (for planning-time measurements)."""
    rows = (first_row + np.arange(num_requests)) % len(trace)
    r = np.random.default_rng([seed, 100 + num_requests])
    kv = trace[rows, 0] + r.integers(0, trace[rows, 1] + 1)
    return build_paged(f"decode{num_requests}", np.stack([np.ones_like(kv), kv], 1), PAGE_SIZE,
                       np.random.default_rng([seed, 200 + num_requests]), causal=True,
                       title=f"decode, {num_requests} trace contexts")


def batch_arrays(w, shape, use_prefix_groups=True):
    """The PackInfer batch description of `w` (its page tables, shape and prefix groups)."""
    return pc.BatchArrays(w.qo_indptr, w.kv_indptr, w.kv_page_indices, w.kv_last_page_len, w.page_size, w.num_pages,
                          shape.num_qo_heads, shape.num_kv_heads, shape.head_dim, shape.packinfer_dtype, w.causal,
                          float(shape.sm_scale), w.prefix_groups if use_prefix_groups else [])
