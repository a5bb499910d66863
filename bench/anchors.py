"""The anchors of the GPU benchmark beyond PyTorch's FlashAttention-2: every FlashInfer API that
applies to a workload, and FlashAttention-3 (fa3-fwd), on the tensors of gpu_bench.WorkloadTensors.

A contender is (name, api, module, plan, run, view):
- `module` names the FlashInfer JIT module it compiles ("ragged-fa2", "decode-tc", ...), which
  the warm-up processes (`gpu_bench.py --phase warm-MODULE`) build ahead in parallel;
- `plan()` is the host work of one step (FlashInfer's plan(), FA3's scheduler metadata), timed apart;
  None where the API has none (XQA, FA3 varlen);
- `run(i)` launches one step on rotation set i into a preallocated output poisoned with NaN;
- `view(out)` turns run's result into the [total_q, heads, dim] output checked against the
  float64 reference (POD returns its prefill and decode outputs apart; concatenated outside timing).

Workload kinds: ragged prefill (W1, W5, W6), paged decode (W2, W4, W7), mixed (W3), and the
serving-feature variants (gpu_bench.py --phase features): ragged prefill under a sliding window
(W1-window) and paged decode with a logit soft-cap (W2-softcap). FlashInfer compiles a window and
a soft-cap into modules of their own (use_sliding_window / use_logits_soft_cap), so those
contenders have their own JIT modules ("ragged-fa2-window", "decode-tc-softcap", ...).

torch is imported lazily so that `import anchors` works without it (bench/test_anchors.py).
"""

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import time
import types

import numpy as np

# Small pure-Python packages carried as a fallback (bench/fetch_anchors.sh): after the machine's own.
for _p in filter(None, os.environ.get("PACKINFER_PYDEPS", "").split(os.pathsep)):
    if _p not in sys.path:
        sys.path.append(_p)

FI = "FlashInfer"
FA3 = "FA3"
# The device of every tensor made here ("cpu" only in bench/test_report.py's plumbing test).
DEVICE = os.environ.get("PACKINFER_BENCH_DEVICE", "cuda")

# FlashInfer modules, in the order the warm-up builds them (most needed first: on 16 cores the
# whole set takes longer than a device call can give, see bench/run_anchors.sh).
# The serving-feature variants' modules come last: only the features phase uses them (a call
# that measures them names them in run_anchors.sh's WARM_MODULES).
FEATURE_MODULES = ["ragged-fa2-window", "ragged-fa3-window", "decode-tc-softcap", "batch-attention-softcap",
                   "decode-softcap"]
MODULES = ["ragged-fa2", "ragged-fa3", "decode-tc", "batch-attention", "paged-prefill", "pod", "batch-pod",
           "decode", "cascade", "xqa"] + FEATURE_MODULES
# Which tiny workload warms each module (see tiny_workload).
MODULE_KIND = {"ragged-fa2": "ragged", "ragged-fa3": "ragged", "decode-tc": "decode", "decode": "decode",
               "xqa": "decode", "batch-attention": "mixed", "paged-prefill": "mixed", "pod": "mixed",
               "batch-pod": "mixed", "cascade": "prefix",
               "ragged-fa2-window": "ragged-window", "ragged-fa3-window": "ragged-window",
               "decode-tc-softcap": "decode-softcap", "batch-attention-softcap": "decode-softcap",
               "decode-softcap": "decode-softcap"}


def modules_for(kind):
    """The FlashInfer JIT modules whose contenders apply to a workload kind (flashinfer_contenders)."""
    return {"ragged": ["ragged-fa2", "ragged-fa3"],
            "decode": ["decode-tc", "batch-attention", "decode", "xqa"],
            "prefix": ["decode-tc", "cascade", "batch-attention", "decode", "xqa"],
            "mixed": ["paged-prefill", "batch-attention", "pod", "batch-pod"],
            "ragged-window": ["ragged-fa2-window", "ragged-fa3-window"],
            "decode-softcap": ["decode-tc-softcap", "batch-attention-softcap", "decode-softcap"]}[kind]


def not_applicable(kind):
    """{contender: why} for the FlashInfer APIs of the plain kind that a feature kind cannot use
    (recorded as not run by the features phase)."""
    return {"decode-softcap": {f"{FI} XQA decode": "xqa_batch_decode_with_kv_cache takes no logits soft-cap "
                                                   "(FlashInfer 0.5.3 and 0.7.4: window_left, sinks, no cap)"},
            }.get(kind, {})


class Unsupported(Exception):
    """This FlashInfer's API does not take an argument the workload needs (the feature keywords
    differ between versions): the contender is recorded as not run, not as an error."""


def feature_args(w):
    """FlashInfer's plan() keywords for w's sliding window and soft-cap ({} for a plain workload)."""
    out = {}
    if w.window_left is not None:
        out["window_left"] = int(w.window_left)
    if w.logits_soft_cap:
        out["logits_soft_cap"] = float(w.logits_soft_cap)
    return out


def _with_features(fn, feat, *a, **kw):
    """fn(*a, **kw, **feat); a TypeError naming one of feat's keywords becomes Unsupported."""
    try:
        return fn(*a, **kw, **feat)
    except TypeError as e:
        if any(k in str(e) for k in feat):
            raise Unsupported(f"does not take {', '.join(sorted(feat))}: TypeError: {e}") from e
        raise


class Contender:
    def __init__(self, name, api, module, plan, run, view=None, graph=True, info=None):
        self.name, self.api, self.module, self.plan, self.run = name, api, module, plan, run
        self.view = view
        self.graph = graph
        self.info = info  # () -> dict recorded beside the result (e.g. the backend "auto" chose)


def _resolved(wr):
    """What FlashInfer's wrapper says it runs after plan() (attribute names vary by version)."""
    out = {}
    for attr in ("_backend", "resolved_backend", "_use_tensor_cores"):
        try:
            v = getattr(wr, attr, None)
            v = v() if callable(v) else v
        except Exception:  # noqa: BLE001
            continue
        if v is not None:
            out[f"flashinfer{attr if attr.startswith('_') else '_' + attr}"] = str(v)
    return out


def kind_of(w):
    if w.ragged:
        base = "ragged"
    elif (w.q_lens == 1).all():
        base = "prefix" if w.prefix_groups else "decode"
    else:
        base = "mixed"
    window, cap = w.window_left is not None, bool(w.logits_soft_cap)
    if not window and not cap:
        return base
    kind = {("ragged", True, False): "ragged-window", ("decode", False, True): "decode-softcap"}.get((base, window, cap))
    if kind is None:
        raise ValueError(f"{w.name}: no FlashInfer set-up for a {base} workload with window_left {w.window_left} "
                         f"and logits soft-cap {w.logits_soft_cap}")
    return kind


# ----------------------------------------------------------------------------------------------
# Importing FlashInfer where optional packages are missing


class _Stub(type):
    """A class standing for anything in a package that is not installed: attribute access, calls,
    indexing and subclassing all give more stubs, so that module-level code of FlashInfer's
    non-attention features (CuTe DSL kernels: decorators, type annotations, base classes) imports."""

    def __getattr__(cls, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Stub(name, (), {})

    def __call__(cls, *a, **k):
        if len(a) == 1 and callable(a[0]) and not k and isinstance(a[0], types.FunctionType):
            return a[0]  # used as a decorator
        return _Stub("call", (), {})

    def __getitem__(cls, item):
        return _Stub("item", (), {})

    def __iter__(cls):
        return iter(())

    def __len__(cls):
        return 0

    def __bool__(cls):
        return False

    def __or__(cls, other):
        return cls

    __ror__ = __or__

    def __int__(cls):
        return 0

    def __index__(cls):
        return 0

    def __float__(cls):
        return 0.0

    def __str__(cls):
        return "stub"

    def __contains__(cls, _):
        return False

    def __lt__(cls, _):
        return False

    __le__ = __gt__ = __ge__ = __lt__

    def __add__(cls, other):
        return cls

    __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __floordiv__ = __mod__ = __add__


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Stub(name, (), {})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on sys.meta_path: answers for the root packages in `roots` only when nothing real does."""

    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, fullname, path=None, target=None):
        if any(fullname == r or fullname.startswith(r + ".") for r in self.roots):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _StubModule(spec.name)
        m.__path__ = []
        m.__packinfer_stub__ = True
        return m

    def exec_module(self, module):
        pass


# Packages FlashInfer >= 0.6 imports at module level for features the benchmark does not use;
# when absent on the GPU machine they are stubbed (and the stubs named in the results).
STUBBABLE = {"cutlass", "cudnn", "cuda_tile", "nccl4py", "nccl_extensions", "nvshmem", "tqdm", "tabulate", "click",
             "requests", "pynvml", "iket", "quack", "cuda"}


def import_flashinfer(max_stubs=12):
    """(flashinfer module or None, stubbed package names, error text or None). A missing package
    in STUBBABLE is stubbed and the import retried; anything else is the error. Under the `cuda`
    namespace only the missing module is stubbed (cuda.tile), never cuda.bindings."""
    stubbed = []
    finder = None
    for _ in range(max_stubs + 1):
        try:
            return importlib.import_module("flashinfer"), stubbed, None
        except ModuleNotFoundError as e:
            name = e.name or ""
            root = name.split(".")[0]
            key = name if root == "cuda" else root
            if not name or root not in STUBBABLE or key in stubbed or key == "cuda":
                return None, stubbed, f"ModuleNotFoundError: {e}" + (" (after stubbing " + ", ".join(stubbed) + ")"
                                                                     if stubbed else "")
            stubbed.append(key)
            for k in [k for k in sys.modules if k == "flashinfer" or k.startswith("flashinfer.")]:
                del sys.modules[k]
            if finder is None:
                finder = _StubFinder(())
                sys.meta_path.append(finder)
            finder.roots = set(stubbed)
        except Exception as e:  # noqa: BLE001 - any import failure is the result
            return None, stubbed, f"{type(e).__name__}: {e}" + (" (after stubbing " + ", ".join(stubbed) + ")"
                                                                if stubbed else "")
    return None, stubbed, "gave up after stubbing " + ", ".join(stubbed)


def flashinfer_version(fi):
    return str(getattr(fi, "__version__", "?"))


# ----------------------------------------------------------------------------------------------
# Tiny workloads for the JIT warm-up: same dtypes, head dims, masks and page size as W1-W7 (and the
# same window and soft-cap as the feature variants: FlashInfer's module depends on whether there is one).


def tiny_workload(kind):
    import workloads as wl
    rng = np.random.default_rng(1)
    if kind == "ragged-window":
        w = tiny_workload("ragged")
        w.window_left = wl.FEATURE_WINDOW - 1
        return w
    if kind == "decode-softcap":
        w = tiny_workload("decode")
        w.logits_soft_cap = wl.FEATURE_SOFT_CAP
        return w
    if kind == "ragged":
        return wl.build_ragged("W1", [[40, 40], [17, 17]], causal=True, title="warm-up ragged")
    if kind == "decode":
        return wl.build_paged("W2", [[1, 50], [1, 33], [1, 16]], wl.PAGE_SIZE, rng, causal=True, title="warm-up decode")
    if kind == "prefix":
        return wl.build_paged("W4", [[1, 40], [1, 35], [1, 50]], wl.PAGE_SIZE, rng, causal=True, shared_prefix=32,
                              title="warm-up prefix")
    return wl.build_paged("W3", [[1, 40], [1, 21], [1, 70], [48, 96]], wl.PAGE_SIZE, rng, causal=True,
                          title="warm-up mixed")


# ----------------------------------------------------------------------------------------------
# FlashInfer contenders


def _nan_outputs(t, shape, dt):
    import torch
    return [torch.full((t.w.total_q,) + shape, float("nan"), device=DEVICE, dtype=dt) for _ in range(t.sets)]


def flashinfer_contenders(fi, t, shape, dt, workspace, only_modules=None):
    """[Contender] for workload tensors t (gpu_bench.WorkloadTensors). Building one may fail
    (an API absent from this version): that contender is returned as (name, api, module, error).
    A feature workload (sliding window, soft-cap) gets the APIs that take it, with it, in their
    own modules; their plan() raises Unsupported where this version's API does not take it."""
    import torch
    w = t.w
    hq, hkv, d = shape.num_qo_heads, shape.num_kv_heads, shape.head_dim
    kw = dict(q_data_type=dt, kv_data_type=dt, sm_scale=shape.sm_scale)
    i32 = dict(device=DEVICE, dtype=torch.int32)
    kind = kind_of(w)
    feat = feature_args(w)
    # The module suffix and the API text of the feature variants.
    sfx = {"ragged-window": "-window", "decode-softcap": "-softcap"}.get(kind, "")
    with_feat = "".join(f", {k}={v:g}" for k, v in feat.items())
    outs = _nan_outputs(t, (hq, d), dt)
    out = []

    def add(name, api, module, build):
        if only_modules is not None and module not in only_modules:
            return
        try:
            out.append(build(name, api, module))
        except Exception as e:  # noqa: BLE001
            out.append((name, api, module, f"{type(e).__name__}: {e}"[:2000]))

    def paged_kv(i):
        return (t.k[i % t.sets], t.v[i % t.sets])

    if kind in ("ragged", "ragged-window"):
        def ragged(backend, invariant=False):
            def build(name, api, module):
                wr = fi.BatchPrefillWithRaggedKVCacheWrapper(workspace(), "NHD", backend=backend)
                extra = dict(disable_split_kv=True) if invariant else {}

                def plan():
                    _with_features(wr.plan, feat, t.qo_indptr, t.cu_k, hq, hkv, d, causal=w.causal, **kw, **extra)
                return Contender(name, api, module, plan,
                                 lambda i: wr.run(t.q[i % t.sets], t.k_flat[i % t.sets], t.v_flat[i % t.sets],
                                                  out=outs[i % t.sets]), info=lambda: _resolved(wr))
            return build
        for backend in ("fa2", "fa3"):
            add(f"{FI} ragged prefill {backend}",
                f'BatchPrefillWithRaggedKVCacheWrapper(backend="{backend}")' + (f", plan({with_feat[2:]})" if feat else ""),
                f"ragged-{backend}{sfx}", ragged(backend))
        if not feat:
            add(f"{FI} ragged prefill fa2 batch-invariant", 'ragged fa2, plan(disable_split_kv=True)', "ragged-fa2",
                ragged("fa2", invariant=True))
        return out

    if kind in ("decode", "prefix", "decode-softcap"):
        def decode(tc, invariant=False, backend=None):
            def build(name, api, module):
                extra_init = dict(backend=backend) if backend else {}
                wr = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(), "NHD", use_tensor_cores=tc, **extra_init)
                extra = dict(disable_split_kv=True) if invariant else {}

                def plan():
                    _with_features(wr.plan, feat, t.kv_indptr, t.kv_indices, t.kv_last, hq, hkv, d, w.page_size, **kw,
                                   **extra)
                return Contender(name, api, module, plan,
                                 lambda i: wr.run(t.q[i % t.sets], paged_kv(i), out=outs[i % t.sets]),
                                 info=lambda: _resolved(wr))
            return build
        plan_feat = f", plan({with_feat[2:]})" if feat else ""
        add(f"{FI} decode CUDA cores", "BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=False)" + plan_feat,
            f"decode{sfx}", decode(False))
        add(f"{FI} decode tensor cores", "BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=True)" + plan_feat,
            f"decode-tc{sfx}", decode(True))
        if not feat:
            add(f"{FI} decode tensor cores batch-invariant", "tensor-core decode, plan(disable_split_kv=True)",
                "decode-tc", decode(True, invariant=True))

        def xqa(name, api, module):
            f = getattr(getattr(fi, "decode", None), "xqa_batch_decode_with_kv_cache", None) \
                or getattr(fi, "xqa_batch_decode_with_kv_cache", None)
            if f is None:
                raise RuntimeError(f"flashinfer {flashinfer_version(fi)} has no xqa_batch_decode_with_kv_cache")
            pages = np.diff(w.kv_indptr)
            table = np.zeros((w.batch_size, int(pages.max())), dtype=np.int32)
            for r in range(w.batch_size):
                table[r, :pages[r]] = w.kv_page_indices[w.kv_indptr[r]:w.kv_indptr[r + 1]]
            block_tables = torch.tensor(table, **i32)
            seq_lens = torch.tensor(w.kv_lens, **i32)
            ws = torch.zeros(256 << 20, dtype=torch.uint8, device=DEVICE)
            max_len = int(w.kv_lens.max())
            return Contender(name, api, module, None,
                             lambda i: f(t.q[i % t.sets], paged_kv(i), ws, block_tables, seq_lens, max_len,
                                         bmm1_scale=shape.sm_scale, bmm2_scale=1.0, out=outs[i % t.sets],
                                         kv_layout="NHD"))
        if not feat:
            add(f"{FI} XQA decode", "xqa_batch_decode_with_kv_cache (block table, no plan)", "xqa", xqa)

    if kind in ("decode", "prefix", "mixed", "decode-softcap"):
        # Its run() takes the soft-cap again (it reaches the kernel from there; plan() picks the module).
        run_feat = {k: v for k, v in feat.items() if k == "logits_soft_cap"}

        def batch_attention(name, api, module):
            wr = fi.BatchAttention(kv_layout="NHD")
            kv_len = torch.tensor(w.kv_lens, **i32)

            def plan():
                _with_features(wr.plan, feat, t.qo_indptr, t.kv_indptr, t.kv_indices, kv_len, hq, hkv, d, d,
                               w.page_size, causal=w.causal, sm_scale=shape.sm_scale, q_data_type=dt, kv_data_type=dt)
            return Contender(name, api, module, plan,
                             lambda i: _with_features(wr.run, run_feat, t.q[i % t.sets], paged_kv(i),
                                                      out=outs[i % t.sets]), view=lambda o: o[0])
        add(f"{FI} BatchAttention", "BatchAttention (persistent prefill + decode)"
            + (f", plan/run({with_feat[2:]})" if feat else ""), f"batch-attention{sfx}", batch_attention)

    if kind == "mixed":
        def paged_prefill(invariant=False):
            def build(name, api, module):
                wr = fi.BatchPrefillWithPagedKVCacheWrapper(workspace(), "NHD")
                extra = dict(disable_split_kv=True) if invariant else {}

                def plan():
                    wr.plan(t.qo_indptr, t.kv_indptr, t.kv_indices, t.kv_last, hq, hkv, d, w.page_size,
                            causal=w.causal, **kw, **extra)
                return Contender(name, api, module, plan,
                                 lambda i: wr.run(t.q[i % t.sets], paged_kv(i), out=outs[i % t.sets]),
                                 info=lambda: _resolved(wr))
            return build
        add(f"{FI} paged prefill", "BatchPrefillWithPagedKVCacheWrapper (backend auto)", "paged-prefill",
            paged_prefill())
        add(f"{FI} paged prefill batch-invariant", "paged prefill, plan(disable_split_kv=True)", "paged-prefill",
            paged_prefill(invariant=True))
        # POD: the decodes (q_len 1) first, then one prefill chunk (W3's layout).
        nd = int((w.q_lens == 1).sum())
        if nd != w.batch_size - 1 or w.q_lens[-1] == 1:
            return out
        dq = int(w.qo_indptr[nd])
        pd = int(w.kv_indptr[nd])

        def views():
            return dict(
                qo_d=torch.arange(nd + 1, **i32), kv_indptr_d=t.kv_indptr[:nd + 1].contiguous(),
                kv_idx_d=t.kv_indices[:pd].contiguous(), last_d=t.kv_last[:nd].contiguous(),
                qo_p=torch.tensor([0, int(w.q_lens[-1])], **i32),
                kv_indptr_p=torch.tensor([0, int(w.kv_indptr[-1]) - pd], **i32),
                kv_idx_p=t.kv_indices[pd:].contiguous(), last_p=t.kv_last[nd:].contiguous())

        def cat(o):
            o_p, o_d = o if not isinstance(o[0], (tuple, list)) else (o[0][0], o[1][0])
            return torch.cat([o_d, o_p], 0)

        def pod(name, api, module):
            v = views()
            wr = fi.PODWithPagedKVCacheWrapper(workspace(), "NHD")
            # The chunk's keys contiguous (FA2's unpaged copy of the last request).
            k0 = int(np.sum(w.kv_lens[:nd]))

            def plan():
                wr.plan(v["kv_indptr_d"], v["kv_idx_d"], v["last_d"], hq, hkv, d, w.page_size, **kw)

            def run(i):
                s = i % t.fa2_sets
                return wr.run(t.q[i % t.sets][dq:], t.k_flat[s][k0:], t.v_flat[s][k0:], t.q[i % t.sets][:dq],
                              paged_kv(i), causal_p=True)
            return Contender(name, api, module, plan, run, view=cat)
        add(f"{FI} POD", "PODWithPagedKVCacheWrapper (ragged prefill chunk + paged decodes, one launch)", "pod", pod)

        def batch_pod(name, api, module):
            v = views()
            wr = fi.BatchPODWithPagedKVCacheWrapper(workspace(), "NHD")

            def plan():
                wr.plan(v["qo_p"], v["kv_indptr_p"], v["kv_idx_p"], v["last_p"], v["qo_d"], v["kv_indptr_d"],
                        v["kv_idx_d"], v["last_d"], hq, hkv, d, w.page_size, **kw)

            def run(i):
                return wr.run(t.q[i % t.sets][dq:], paged_kv(i), t.q[i % t.sets][:dq], paged_kv(i), causal_p=True)
            return Contender(name, api, module, plan, run, view=cat)
        add(f"{FI} BatchPOD", "BatchPODWithPagedKVCacheWrapper (paged prefill + paged decodes, one launch)",
            "batch-pod", batch_pod)
        return out

    if kind == "prefix":
        def cascade(name, api, module):
            prefix_len, members = w.prefix_groups[0]
            if members != list(range(w.batch_size)):
                raise ValueError("the cascade set-up expects one prefix group of every request")
            prefix_pages = prefix_len // w.page_size
            suffix_counts = np.diff(w.kv_indptr) - prefix_pages
            suffix_idx = torch.tensor(np.concatenate([w.kv_page_indices[w.kv_indptr[r] + prefix_pages:w.kv_indptr[r + 1]]
                                                      for r in range(w.batch_size)]), **i32)
            levels = (
                [torch.tensor([0, w.total_q], **i32), t.qo_indptr],
                [torch.tensor([0, prefix_pages], **i32),
                 torch.tensor(np.concatenate([[0], np.cumsum(suffix_counts)]), **i32)],
                [t.kv_indices[:prefix_pages].contiguous(), suffix_idx],
                [torch.tensor([w.page_size], **i32), t.kv_last],
            )
            cw = fi.MultiLevelCascadeAttentionWrapper(2, workspace(), "NHD")

            def plan():
                # Level 0 is every query against the prefix: no query may be masked there.
                cw.plan(*levels, hq, hkv, d, w.page_size, causal=False, **kw)
            return Contender(name, api, module, plan, lambda i: cw.run(t.q[i % t.sets], paged_kv(i)))
        add(f"{FI} cascade", "MultiLevelCascadeAttentionWrapper(2 levels: prefix once, suffixes, merged)", "cascade",
            cascade)
    return out


def flashinfer_plan_batches(fi, w, shape, dt, workspace):
    """{name: plan callable} for a decode batch `w` (planning overhead: no KV tensors needed)."""
    import torch
    i32 = dict(device=DEVICE, dtype=torch.int32)
    hq, hkv, d = shape.num_qo_heads, shape.num_kv_heads, shape.head_dim
    ind, idx = torch.tensor(w.kv_indptr, **i32), torch.tensor(w.kv_page_indices, **i32)
    last, kv_len = torch.tensor(w.kv_last_page_len, **i32), torch.tensor(w.kv_lens, **i32)
    qo = torch.tensor(w.qo_indptr, **i32)
    kw = dict(q_data_type=dt, kv_data_type=dt)
    out = {}
    try:
        dec = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(), "NHD")
        out[f"{FI} decode CUDA cores"] = lambda: dec.plan(ind, idx, last, hq, hkv, d, w.page_size, **kw)
        tc = fi.BatchDecodeWithPagedKVCacheWrapper(workspace(), "NHD", use_tensor_cores=True)
        out[f"{FI} decode tensor cores"] = lambda: tc.plan(ind, idx, last, hq, hkv, d, w.page_size, **kw)
    except Exception:  # noqa: BLE001
        pass
    try:
        ba = fi.BatchAttention(kv_layout="NHD")
        out[f"{FI} BatchAttention"] = lambda: ba.plan(qo, ind, idx, kv_len, hq, hkv, d, d, w.page_size, causal=True,
                                                       **kw)
    except Exception:  # noqa: BLE001
        pass
    return out


# ----------------------------------------------------------------------------------------------
# FlashAttention-3 (fa3-fwd: forward only, no paged KV in its build)


def import_fa3():
    """(module, version, error): fa3_fwd_interface, as fa3-fwd installs it."""
    try:
        m = importlib.import_module("fa3_fwd_interface")
    except Exception as e:  # noqa: BLE001
        return None, None, f"{type(e).__name__}: {e}"[:2000]
    try:
        from importlib.metadata import version
        v = version("fa3_fwd")
    except Exception:  # noqa: BLE001
        v = "?"
    return m, v, None


def fa3_contenders(fa3, t, shape, dt):
    """FA3 varlen on every workload (unpaged keys: the tensors FA2 reads), and for decode batches
    flash_attn_with_kvcache on a padded [batch, max_kv] cache with its scheduler metadata."""
    import torch
    w = t.w
    hq, hkv, d = shape.num_qo_heads, shape.num_kv_heads, shape.head_dim
    out = []
    decode_like = bool((w.q_lens == 1).all())
    splits = 0 if not w.ragged else 1  # 0: FA3's own split-KV heuristic (decode); prefill: no split

    # A sliding window (left, right) and the soft-cap, passed only where the workload has them.
    features = {}
    if w.window_left is not None:
        features["window_size"] = (int(w.window_left), 0)
    if w.logits_soft_cap:
        features["softcap"] = float(w.logits_soft_cap)

    def varlen(i):
        s = i % t.fa2_sets
        o = fa3.flash_attn_varlen_func(t.q[i % t.sets], t.k_flat[s], t.v_flat[s], t.qo_indptr, t.cu_k, t.max_q,
                                       t.max_k, softmax_scale=shape.sm_scale, causal=w.causal, num_splits=splits,
                                       **features)
        return o[0] if isinstance(o, (tuple, list)) else o
    out.append(Contender(f"{FA3} varlen", f"flash_attn_varlen_func(num_splits={splits})", None, None, varlen))
    if decode_like:
        try:
            b, max_kv = w.batch_size, int(w.kv_lens.max())
            kv_lens = torch.tensor(w.kv_lens, device=DEVICE, dtype=torch.int32)
            if (w.kv_lens == max_kv).all():
                kc = [t.k_flat[s].view(b, max_kv, hkv, d) for s in range(t.fa2_sets)]
                vc = [t.v_flat[s].view(b, max_kv, hkv, d) for s in range(t.fa2_sets)]
            else:
                kc, vc = [], []
                starts = np.concatenate([[0], np.cumsum(w.kv_lens)])
                for s in range(min(t.fa2_sets, 2)):
                    kp = torch.zeros(b, max_kv, hkv, d, device=DEVICE, dtype=dt)
                    vp = torch.zeros_like(kp)
                    for r in range(b):
                        kp[r, :w.kv_lens[r]] = t.k_flat[s][starts[r]:starts[r + 1]]
                        vp[r, :w.kv_lens[r]] = t.v_flat[s][starts[r]:starts[r + 1]]
                    kc.append(kp)
                    vc.append(vp)
            holder = {}

            def plan():
                holder["meta"] = fa3.get_scheduler_metadata(b, 1, max_kv, hq, hkv, d, kv_lens, qkv_dtype=dt,
                                                            causal=True, **{k: v for k, v in features.items()
                                                                            if k == "window_size"})

            def run(i):
                s = i % len(kc)
                q = t.q[i % t.sets].view(b, 1, hq, d)
                o = fa3.flash_attn_with_kvcache(q, kc[s], vc[s], cache_seqlens=kv_lens, softmax_scale=shape.sm_scale,
                                                causal=True, scheduler_metadata=holder.get("meta"), **features)
                o = o[0] if isinstance(o, (tuple, list)) else o
                return o.view(b, hq, d)
            out.append(Contender(f"{FA3} kvcache", "flash_attn_with_kvcache (padded cache, scheduler metadata)", None,
                                 plan, run))
        except Exception as e:  # noqa: BLE001
            out.append((f"{FA3} kvcache", "flash_attn_with_kvcache", None, f"{type(e).__name__}: {e}"[:2000]))
    return out


def fa3_plan_batch(fa3, w, shape, dt):
    import torch
    kv_lens = torch.tensor(w.kv_lens, device=DEVICE, dtype=torch.int32)
    return lambda: fa3.get_scheduler_metadata(w.batch_size, 1, int(w.kv_lens.max()), shape.num_qo_heads,
                                              shape.num_kv_heads, shape.head_dim, kv_lens, qkv_dtype=dt, causal=True)


# ----------------------------------------------------------------------------------------------
# Warm-up markers: the warm-up process of module M writes M.ok or M.err (the exact error) in
# the marker folder; the anchors process waits for them, up to a deadline.


def marker_dir():
    return os.environ.get("PACKINFER_WARM_DIR", "/tmp/packinfer_warm")


def write_marker(module, ok, text):
    """ok: True -> MODULE.ok, False -> MODULE.err, None -> MODULE.started."""
    os.makedirs(marker_dir(), exist_ok=True)
    p = os.path.join(marker_dir(), f"{module}.{ {True: 'ok', False: 'err', None: 'started'}[ok] }")
    with open(p + ".tmp", "w") as f:
        f.write(text)
    os.replace(p + ".tmp", p)


def marker_state(module):
    """('ok'|'err'|'running'|'not started', text) of `module`'s warm-up, now."""
    d = marker_dir()
    for kind in ("ok", "err"):
        p = os.path.join(d, f"{module}.{kind}")
        if os.path.exists(p):
            with open(p) as f:
                return kind, f.read()
    p = os.path.join(d, f"{module}.started")
    if os.path.exists(p):
        with open(p) as f:
            return "running", f.read()
    return "not started", ""


def probe():
    """`python3 anchors.py probe`: exit 0 when FlashInfer imports from this PYTHONPATH (printing
    its version and any stubbed packages), 1 otherwise; FA3's import is reported, not required."""
    import torch
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    t0 = time.time()
    fi, stubs, err = import_flashinfer()
    took = time.time() - t0
    if fi is None:
        print(f"flashinfer: did not import ({took:.1f} s): {err}")
    else:
        print(f"flashinfer {flashinfer_version(fi)} from {os.path.dirname(fi.__file__)} ({took:.1f} s)"
              + (f", stubbed: {', '.join(stubs)}" if stubs else ""))
    fa3, v, fa3_err = import_fa3()
    print(f"fa3-fwd {v}" if fa3 is not None else f"fa3: did not import: {fa3_err}")
    return 0 if fi is not None else 1


if __name__ == "__main__":
    sys.exit(probe() if sys.argv[1:] == ["probe"] else f"usage: {sys.argv[0]} probe")
