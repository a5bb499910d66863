"""Plumbing test of bench/anchors.py on the CPU (needs torch; skipped without it): every
FlashInfer and FA3 contender is built on small workloads of each kind against fake `flashinfer`
and `fa3_fwd_interface` modules whose kernels compute exact attention from the arguments they are
given (page tables, indptrs, block tables, padded caches, POD's prefill/decode split, the sliding
window and soft-cap of the feature variants, given at plan or run time as the real APIs take
them). Each contender's output, through its `view`, must match a float64 reference of the
workload: this checks the index plumbing (which pages, which rows, in which order, which window
and cap), not FlashInfer itself.

    python3 bench/test_anchors_plumbing.py
    PACKINFER_BENCH_DRY_RUN=1 python3 bench/test_anchors_plumbing.py     (+ the anchors and features phases, ~7 min)

The dry run (DryRunTest) also runs gpu_bench.py's anchors and features phases end to end on the CPU.
"""

import contextlib
import os
import sys
import types
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

try:
    import torch
except ImportError:  # CI has no torch: the test reports itself skipped
    torch = None

import anchors  # noqa: E402
import common  # noqa: E402
import workloads as wl  # noqa: E402

SHAPE = wl.ModelShape(num_qo_heads=4, num_kv_heads=2, head_dim=8, dtype="bf16")


def attend(q, k, v, scale, window_left=-1, cap=0.0):
    """q [n, hq, d], k/v [kv, hkv, d] -> [n, hq, d], bottom-right causal (float32); FlashInfer's
    conventions: window_left -1 for none, cap 0 for none."""
    g = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(g, 1)
    v = v.float().repeat_interleave(g, 1)
    s = torch.einsum("nhd,khd->hnk", q.float(), k) * scale
    if cap:
        s = cap * torch.tanh(s / cap)
    n, kv = q.shape[0], k.shape[0]
    limit = (kv - n + torch.arange(n))[None, :, None]
    keys = torch.arange(kv)[None, None, :]
    s = s.masked_fill(keys > limit, float("-inf"))
    if window_left >= 0:
        s = s.masked_fill(keys < limit - window_left, float("-inf"))
    return torch.einsum("hnk,khd->nhd", torch.softmax(s, -1), v).to(q.dtype)


def paged_rows(cache, indptr, indices, lens, r):
    pages = indices[int(indptr[r]):int(indptr[r + 1])].long()
    return cache[pages].reshape(-1, cache.shape[2], cache.shape[3])[:int(lens[r])]


def lens_from_last(indptr, last, page):
    n = (indptr[1:] - indptr[:-1]).long()
    return torch.where(n > 0, (n - 1) * page + last.long(), torch.zeros_like(n))


def fake_flashinfer():
    fi = types.ModuleType("flashinfer")
    fi.__version__ = "fake"

    class Ragged:
        def __init__(self, ws, layout, backend="auto"):
            self.backend = backend

        def plan(self, qo, kv, hq, hkv, d, causal=False, sm_scale=None, window_left=-1, logits_soft_cap=None, **kw):
            self.qo, self.kv, self.scale = qo.cpu(), kv.cpu(), sm_scale
            self.window, self.cap = window_left, logits_soft_cap or 0.0

        def run(self, q, k, v, out=None):
            for r in range(len(self.qo) - 1):
                a, b, c, e = int(self.qo[r]), int(self.qo[r + 1]), int(self.kv[r]), int(self.kv[r + 1])
                out[a:b] = attend(q[a:b], k[c:e], v[c:e], self.scale, self.window, self.cap)
            return out

    class Paged:
        def __init__(self, ws, layout, use_tensor_cores=False, backend="auto"):
            pass

        def plan(self, *a, sm_scale=None, window_left=-1, logits_soft_cap=None, **kw):
            if len(a) == 8:  # prefill: qo, indptr, indices, last, hq, hkv, d, page
                self.qo, self.ind, self.idx, self.last, self.page = a[0], a[1], a[2], a[3], a[7]
            else:  # decode: indptr, indices, last, hq, hkv, d, page
                self.ind, self.idx, self.last, self.page = a[0], a[1], a[2], a[6]
                self.qo = torch.arange(len(self.ind), dtype=torch.int32)
            self.scale, self.window, self.cap = sm_scale, window_left, logits_soft_cap or 0.0

        def run(self, q, kv, out=None):
            out = torch.empty_like(q) if out is None else out
            lens = lens_from_last(self.ind, self.last, self.page)
            for r in range(len(self.ind) - 1):
                a, b = int(self.qo[r]), int(self.qo[r + 1])
                out[a:b] = attend(q[a:b], paged_rows(kv[0], self.ind, self.idx, lens, r),
                                  paged_rows(kv[1], self.ind, self.idx, lens, r), self.scale, self.window, self.cap)
            return out

    class BatchAttention:
        def __init__(self, kv_layout="NHD"):
            pass

        def plan(self, qo, ind, idx, kv_len, hq, hkv, d, dv, page, causal=False, sm_scale=None, logits_soft_cap=None,
                 **kw):
            self.qo, self.ind, self.idx, self.lens, self.scale = qo, ind, idx, kv_len, sm_scale
            self.plan_cap = logits_soft_cap or 0.0

        def run(self, q, kv, out=None, logits_soft_cap=0.0):
            # Like FlashInfer's: plan() picks the module, the cap that reaches the kernel is run()'s.
            if logits_soft_cap > 0.0 and self.plan_cap <= 0.0:
                raise ValueError("logits_soft_cap used in kernel run but not provided in plan()")
            for r in range(len(self.ind) - 1):
                a, b = int(self.qo[r]), int(self.qo[r + 1])
                out[a:b] = attend(q[a:b], paged_rows(kv[0], self.ind, self.idx, self.lens, r),
                                  paged_rows(kv[1], self.ind, self.idx, self.lens, r), self.scale, cap=logits_soft_cap)
            return out, None

    class POD:
        def __init__(self, ws, layout):
            self.d = Paged(None, None)

        def plan(self, ind, idx, last, hq, hkv, d, page, sm_scale=None, **kw):
            self.d.plan(ind, idx, last, hq, hkv, d, page, sm_scale=sm_scale)
            self.scale = sm_scale

        def run(self, q_p, k_p, v_p, q_d, kv_d, causal_p=False):
            return attend(q_p, k_p, v_p, self.scale), self.d.run(q_d, kv_d)

    class BatchPOD:
        def __init__(self, ws, layout):
            self.p, self.d = Paged(None, None), Paged(None, None)

        def plan(self, qo_p, ind_p, idx_p, last_p, qo_d, ind_d, idx_d, last_d, hq, hkv, d, page, sm_scale=None, **kw):
            self.p.plan(qo_p, ind_p, idx_p, last_p, hq, hkv, d, page, sm_scale=sm_scale)
            self.d.plan(qo_d, ind_d, idx_d, last_d, hq, hkv, d, page, sm_scale=sm_scale)

        def run(self, q_p, kv_p, q_d, kv_d, causal_p=False):
            return self.p.run(q_p, kv_p), self.d.run(q_d, kv_d)

    class Cascade:
        def __init__(self, levels, ws, layout):
            pass

        def plan(self, qo, ind, idx, last, hq, hkv, d, page, causal=False, sm_scale=None, **kw):
            # Rebuild each request's full page list: the shared prefix, then its own suffix pages.
            pre = idx[0][int(ind[0][0]):int(ind[0][1])]
            tables, counts = [], []
            for r in range(len(ind[1]) - 1):
                t = torch.cat([pre, idx[1][int(ind[1][r]):int(ind[1][r + 1])]])
                tables.append(t)
                counts.append(len(t))
            self.full = Paged(None, None)
            self.full.plan(torch.tensor(np.concatenate([[0], np.cumsum(counts)]), dtype=torch.int32),
                           torch.cat(tables), last[1], hq, hkv, d, page, sm_scale=sm_scale)

        def run(self, q, kv):
            return self.full.run(q, kv)

    def xqa(q, kv, ws, tables, seq_lens, max_len, bmm1_scale=1.0, bmm2_scale=1.0, out=None, kv_layout="NHD"):
        for r in range(q.shape[0]):
            pages = tables[r].long()
            k = kv[0][pages].reshape(-1, kv[0].shape[2], kv[0].shape[3])[:int(seq_lens[r])]
            vv = kv[1][pages].reshape(-1, kv[1].shape[2], kv[1].shape[3])[:int(seq_lens[r])]
            out[r:r + 1] = attend(q[r:r + 1], k, vv, bmm1_scale)
        return out

    fi.BatchPrefillWithRaggedKVCacheWrapper = Ragged
    fi.BatchPrefillWithPagedKVCacheWrapper = Paged
    fi.BatchDecodeWithPagedKVCacheWrapper = Paged
    fi.BatchAttention = BatchAttention
    fi.PODWithPagedKVCacheWrapper = POD
    fi.BatchPODWithPagedKVCacheWrapper = BatchPOD
    fi.MultiLevelCascadeAttentionWrapper = Cascade
    fi.decode = types.SimpleNamespace(xqa_batch_decode_with_kv_cache=xqa)
    return fi


def fake_fa3():
    m = types.ModuleType("fa3_fwd_interface")

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False, num_splits=1,
               window_size=(-1, -1), softcap=0.0):
        out = torch.empty_like(q)
        for r in range(len(cu_q) - 1):
            a, b, c, e = int(cu_q[r]), int(cu_q[r + 1]), int(cu_k[r]), int(cu_k[r + 1])
            out[a:b] = attend(q[a:b], k[c:e], v[c:e], softmax_scale, window_size[0], softcap)
        return out

    def kvcache(q, kc, vc, cache_seqlens=None, softmax_scale=None, causal=False, scheduler_metadata=None,
                window_size=(-1, -1), softcap=0.0):
        out = torch.empty_like(q)
        for r in range(q.shape[0]):
            n = int(cache_seqlens[r])
            out[r] = attend(q[r], kc[r, :n], vc[r, :n], softmax_scale, window_size[0], softcap)
        return out

    m.flash_attn_varlen_func = varlen
    m.flash_attn_with_kvcache = kvcache
    m.get_scheduler_metadata = lambda *a, **k: "meta"
    return m


class CpuTensors:
    """gpu_bench.WorkloadTensors' fields, on the CPU, two rotation sets."""

    def __init__(self, w, sets=2):
        self.w, self.sets, self.fa2_sets = w, sets, sets
        hq, hkv, d = SHAPE.num_qo_heads, SHAPE.num_kv_heads, SHAPE.head_dim
        g = torch.Generator().manual_seed(7)
        dt = torch.bfloat16
        self.q = [torch.randn(w.total_q, hq, d, generator=g).to(dt) for _ in range(sets)]
        self.k = [torch.randn(w.num_pages, w.page_size, hkv, d, generator=g).to(dt) for _ in range(sets)]
        self.v = [torch.randn(w.num_pages, w.page_size, hkv, d, generator=g).to(dt) for _ in range(sets)]
        i32 = dict(dtype=torch.int32)
        self.qo_indptr = torch.tensor(w.qo_indptr, **i32)
        self.kv_indptr = torch.tensor(w.kv_indptr, **i32)
        self.kv_indices = torch.tensor(w.kv_page_indices, **i32)
        self.kv_last = torch.tensor(w.kv_last_page_len, **i32)
        self.cu_k = torch.tensor(np.concatenate([[0], np.cumsum(w.kv_lens)]), **i32)
        self.max_q, self.max_k = int(w.q_lens.max()), int(w.kv_lens.max())
        slots = torch.tensor(np.concatenate(w.kv_slots()), dtype=torch.int64)
        self.k_flat = [k.view(-1, hkv, d)[slots] for k in self.k]
        self.v_flat = [v.view(-1, hkv, d)[slots] for v in self.v]

    def reference(self, s, features=True):
        """float64 outputs of set s; features=False: without w's window and soft-cap."""
        w, out = self.w, []
        kf = self.k[s].view(-1, SHAPE.num_kv_heads, SHAPE.head_dim).double().numpy()
        vf = self.v[s].view(-1, SHAPE.num_kv_heads, SHAPE.head_dim).double().numpy()
        for r, slots in enumerate(w.kv_slots()):
            q = self.q[s][int(w.qo_indptr[r]):int(w.qo_indptr[r + 1])].double().numpy()
            out.append(common.reference_attention(q, kf[slots], vf[slots], True, SHAPE.sm_scale,
                                                  window_left=w.window_left if features else None,
                                                  soft_cap=w.logits_soft_cap if features else 0.0))
        return torch.tensor(np.concatenate(out))


@unittest.skipIf(torch is None, "needs torch (CPU build is enough)")
class PlumbingTest(unittest.TestCase):
    def setUp(self):
        anchors.DEVICE = "cpu"

    def check_all(self, w, expect):
        t = CpuTensors(w)
        built = anchors.flashinfer_contenders(fake_flashinfer(), t, SHAPE, torch.bfloat16,
                                              lambda: torch.zeros(8, dtype=torch.uint8))
        built += anchors.fa3_contenders(fake_fa3(), t, SHAPE, torch.bfloat16)
        names = []
        for c in built:
            self.assertFalse(isinstance(c, tuple), f"{w.name}: contender failed to build: {c}")
            names.append(c.name)
            if c.plan is not None:
                c.plan()
            for s in range(t.sets):
                out = c.run(s)
                out = c.view(out) if c.view else out
                ref = t.reference(s)
                self.assertEqual(tuple(out.shape), tuple(ref.shape), f"{w.name} {c.name}")
                err = float((out.double() - ref).norm() / ref.norm())
                self.assertLess(err, 2e-2, f"{w.name} {c.name} set {s}: rel err {err}")
        self.assertEqual(sorted(names), sorted(expect))
        modules = {c.module for c in built if c.module}
        self.assertEqual(modules, set(anchors.modules_for(anchors.kind_of(w))))

    def test_ragged(self):
        self.check_all(wl.build_ragged("W1", [[9, 9], [3, 3], [17, 17]], causal=True),
                       ["FlashInfer ragged prefill fa2", "FlashInfer ragged prefill fa3",
                        "FlashInfer ragged prefill fa2 batch-invariant", "FA3 varlen"])

    def test_decode(self):
        w = wl.build_paged("W2", [[1, 40], [1, 7], [1, 33]], 16, np.random.default_rng(3), causal=True)
        self.check_all(w, ["FlashInfer decode CUDA cores", "FlashInfer decode tensor cores",
                           "FlashInfer decode tensor cores batch-invariant", "FlashInfer XQA decode",
                           "FlashInfer BatchAttention", "FA3 varlen", "FA3 kvcache"])

    def test_decode_equal_lengths(self):  # W7's shape: the FA3 cache is a view, no padding
        w = wl.build_paged("W7", [[1, 48]] * 3, 16, np.random.default_rng(4), causal=True)
        self.check_all(w, ["FlashInfer decode CUDA cores", "FlashInfer decode tensor cores",
                           "FlashInfer decode tensor cores batch-invariant", "FlashInfer XQA decode",
                           "FlashInfer BatchAttention", "FA3 varlen", "FA3 kvcache"])

    def test_prefix(self):
        w = wl.build_paged("W4", [[1, 40], [1, 35], [1, 50]], 16, np.random.default_rng(5), causal=True,
                           shared_prefix=32)
        self.check_all(w, ["FlashInfer decode CUDA cores", "FlashInfer decode tensor cores",
                           "FlashInfer decode tensor cores batch-invariant", "FlashInfer XQA decode",
                           "FlashInfer BatchAttention", "FlashInfer cascade", "FA3 varlen", "FA3 kvcache"])

    def test_mixed(self):
        w = wl.build_paged("W3", [[1, 40], [1, 21], [1, 70], [24, 50]], 16, np.random.default_rng(6), causal=True)
        self.check_all(w, ["FlashInfer paged prefill", "FlashInfer paged prefill batch-invariant",
                           "FlashInfer BatchAttention", "FlashInfer POD", "FlashInfer BatchPOD", "FA3 varlen"])

    def assert_feature_matters(self, w):
        """The window or cap changes the reference by far more than the tolerance (so a contender
        that dropped it would fail check_all)."""
        t = CpuTensors(w, sets=1)
        a, b = t.reference(0), t.reference(0, features=False)
        self.assertGreater(float((a - b).norm() / b.norm()), 0.1)

    def test_ragged_window(self):
        w = wl.build_ragged("W1", [[9, 9], [3, 3], [17, 17]], causal=True)
        w.name, w.window_left = "W1-window", 4
        self.assertEqual(anchors.kind_of(w), "ragged-window")
        self.assert_feature_matters(w)
        self.check_all(w, ["FlashInfer ragged prefill fa2", "FlashInfer ragged prefill fa3", "FA3 varlen"])

    def test_decode_softcap(self):
        w = wl.build_paged("W2", [[1, 40], [1, 7], [1, 33]], 16, np.random.default_rng(3), causal=True)
        # A cap near the scores' own size, so that it changes the output (50 would not at head_dim 8).
        w.name, w.logits_soft_cap = "W2-softcap", 0.5
        self.assertEqual(anchors.kind_of(w), "decode-softcap")
        self.assert_feature_matters(w)
        self.check_all(w, ["FlashInfer decode CUDA cores", "FlashInfer decode tensor cores", "FlashInfer BatchAttention",
                           "FA3 varlen", "FA3 kvcache"])
        self.assertEqual(list(anchors.not_applicable("decode-softcap")), ["FlashInfer XQA decode"])

    def test_feature_workloads_of_the_harness(self):
        trace = np.array([[1000 + 37 * i % 5000, 1 + 13 * i % 400] for i in range(6000)], dtype=np.int64)
        kinds = [anchors.kind_of(w) for w in wl.build_features(trace, seed=0, scale=8)]
        self.assertEqual(kinds, ["ragged-window", "decode-softcap"])
        for k in ("ragged-window", "decode-softcap"):
            tiny = anchors.tiny_workload(k)
            self.assertEqual(anchors.kind_of(tiny), k)
            self.assertIn(anchors.feature_args(tiny), ({"window_left": wl.FEATURE_WINDOW - 1},
                                                       {"logits_soft_cap": wl.FEATURE_SOFT_CAP}))

    def test_api_without_the_feature_keyword(self):
        """A version whose plan() lacks the keyword: Unsupported naming it (recorded as not run);
        any other TypeError stays a TypeError (recorded as an error)."""
        fi = fake_flashinfer()

        class OldDecode(fi.BatchDecodeWithPagedKVCacheWrapper):
            def plan(self, indptr, indices, last, hq, hkv, d, page, q_data_type=None, kv_data_type=None, sm_scale=None):
                raise AssertionError("not reached: the soft-cap keyword is refused first")

        class BrokenAttention(fi.BatchAttention):
            def plan(self, *a, **kw):
                raise TypeError("expected a Tensor for kv_len_arr")
        fi.BatchDecodeWithPagedKVCacheWrapper = OldDecode
        fi.BatchAttention = BrokenAttention
        w = wl.build_paged("W2", [[1, 40], [1, 7]], 16, np.random.default_rng(3), causal=True)
        w.name, w.logits_soft_cap = "W2-softcap", 50.0
        built = anchors.flashinfer_contenders(fi, CpuTensors(w, sets=1), SHAPE, torch.bfloat16,
                                              lambda: torch.zeros(8, dtype=torch.uint8))
        by_module = {c.module: c for c in built}
        self.assertEqual(set(by_module), {"decode-softcap", "decode-tc-softcap", "batch-attention-softcap"})
        for m in ("decode-softcap", "decode-tc-softcap"):
            with self.assertRaises(anchors.Unsupported) as e:
                by_module[m].plan()
            self.assertIn("logits_soft_cap", str(e.exception))
        with self.assertRaises(TypeError):
            by_module["batch-attention-softcap"].plan()

    def test_only_modules(self):
        w = wl.build_paged("W3", [[1, 40], [24, 50]], 16, np.random.default_rng(6), causal=True)
        t = CpuTensors(w, sets=1)
        got = anchors.flashinfer_contenders(fake_flashinfer(), t, SHAPE, torch.bfloat16,
                                            lambda: torch.zeros(8, dtype=torch.uint8), only_modules={"pod"})
        self.assertEqual([c.name for c in got], ["FlashInfer POD"])




TRACE = os.environ.get("PACKINFER_TRACE", os.path.join(HERE, "..", "..", "shared", "traces", "azure_llm_2023_code.csv"))
if not os.path.exists(TRACE):
    TRACE = "/work/shared/traces/azure_llm_2023_code.csv"


class _CpuEvent:
    def __init__(self, enable_timing=True):
        self.t = None

    def record(self, stream=None):
        import time
        self.t = time.perf_counter()

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


@contextlib.contextmanager
def dry_run_env(d):
    """gpu_bench imported for a CPU dry run in folder d: fake FlashInfer and FA3 kernels,
    torch.cuda's timing calls replaced by host clocks, W1-W7 scaled down by 256, few iterations.
    Yields the module; everything is put back after."""
    env = {"PACKINFER_BENCH_DEVICE": "cpu", "PACKINFER_BENCH_SCALE": "256",
           "PACKINFER_WARM_DIR": os.path.join(d, "warm"), "PACKINFER_WARM_BUDGET_S": "330"}
    old = {k: os.environ.get(k) for k in list(env) + ["PACKINFER_WARM_DEADLINE", "PACKINFER_ANCHORS_END",
                                                       "PACKINFER_FEATURES_END"]}
    os.environ.update(env)
    saved_cuda = {}
    try:
        sys.modules.pop("gpu_bench", None)
        import gpu_bench as gb
        cuda = torch.cuda
        fakes = {"synchronize": lambda *a: None, "Event": _CpuEvent, "empty_cache": lambda: None,
                 "get_device_name": lambda *a: "CPU dry run",
                 "get_device_properties": lambda *a: types.SimpleNamespace(L2_cache_size=1 << 20,
                                                                          multi_processor_count=1),
                 "_sleep": None}
        for k, v in fakes.items():
            saved_cuda[k] = getattr(cuda, k, None)
            setattr(cuda, k, v)
        gb.ceilings = lambda: {"copy_gbps": 3000.0, "matmul_tflops": 800.0}
        gb.EAGER_ITERS, gb.GRAPH_ITERS, gb.WARMUP = 3, 2, 1
        plan_timer = gb.time_plan
        gb.time_plan = lambda plan, iters=2: plan_timer(plan, iters)
        gb.MAX_SETS = 2
        gb.SHAPE = SHAPE  # 4 query / 2 KV heads, head_dim 8: the fake kernels are plain torch on the CPU
        anchors.DEVICE = "cpu"
        sys.modules["flashinfer"] = fake_flashinfer()
        sys.modules["fa3_fwd_interface"] = fake_fa3()
        yield gb
    finally:
        for k, v in saved_cuda.items():
            if v is None:
                delattr(torch.cuda, k) if hasattr(torch.cuda, k) else None
            else:
                setattr(torch.cuda, k, v)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        sys.modules.pop("flashinfer", None)
        sys.modules.pop("fa3_fwd_interface", None)
        sys.modules.pop("gpu_bench", None)
        anchors.DEVICE = "cuda"


@unittest.skipIf(torch is None, "needs torch (CPU build is enough)")
class WarmUpTest(unittest.TestCase):
    """gpu_bench.py --phase warm-MODULE on the CPU: the feature modules are warmed with the
    feature's window or cap, an API without the keyword is "nothing to build", a failure is the error."""

    def test_feature_modules(self):
        import tempfile
        with tempfile.TemporaryDirectory() as d, dry_run_env(d) as gb:
            fi = sys.modules["flashinfer"]
            seen = []

            class Ragged(fi.BatchPrefillWithRaggedKVCacheWrapper):
                def plan(self, *a, **kw):
                    seen.append(kw.get("window_left"))
                    return super().plan(*a, **kw)

            class OldDecode(fi.BatchDecodeWithPagedKVCacheWrapper):
                def plan(self, indptr, indices, last, hq, hkv, d, page, q_data_type=None, kv_data_type=None,
                         sm_scale=None):
                    raise AssertionError("not reached")

            class BrokenAttention(fi.BatchAttention):
                def run(self, *a, **kw):
                    raise RuntimeError("nvcc fatal : Unsupported gpu architecture 'compute_90a'")
            fi.BatchPrefillWithRaggedKVCacheWrapper = Ragged
            fi.BatchDecodeWithPagedKVCacheWrapper = OldDecode
            fi.BatchAttention = BrokenAttention
            for m in ("ragged-fa2-window", "decode-tc-softcap", "batch-attention-softcap"):
                gb.phase_warm(m)
            self.assertEqual(seen, [wl.FEATURE_WINDOW - 1])  # the one contender of the module, planned once
            state, text = anchors.marker_state("ragged-fa2-window")
            self.assertEqual(state, "ok", text)
            state, text = anchors.marker_state("decode-tc-softcap")
            self.assertEqual(state, "ok", text)
            self.assertTrue(text.startswith("nothing to build"), text)
            self.assertIn("logits_soft_cap", text)
            state, text = anchors.marker_state("batch-attention-softcap")
            self.assertEqual(state, "err")
            self.assertIn("Unsupported gpu architecture", text)


@unittest.skipIf(torch is None or not os.path.exists(TRACE) or os.environ.get("PACKINFER_BENCH_DRY_RUN") != "1",
                 "needs torch (CPU build is enough), the trace and PACKINFER_BENCH_DRY_RUN=1 (it takes minutes)")
class DryRunTest(unittest.TestCase):
    """gpu_bench.py's anchors and features phases end to end on the CPU: W1-W7 (and W1-window,
    W2-softcap) scaled down by 256, fake FlashInfer and FA3 kernels, torch.cuda's timing calls
    replaced by host clocks, and JIT warm-up markers saying: built, failed (with nvcc's message),
    still running at the deadline, never started. Checks what results.json and the report say
    about each."""

    def test_anchors_phase(self):
        import argparse
        import json
        import tempfile
        import time
        with tempfile.TemporaryDirectory() as d, dry_run_env(d) as gb:
            for m in anchors.MODULES:
                if m in anchors.FEATURE_MODULES:
                    continue
                anchors.write_marker(m, None, "pid 1")
                if m == "ragged-fa3":
                    anchors.write_marker(m, False, "RuntimeError: nvcc fatal : Unsupported gpu architecture")
                elif m != "xqa":
                    anchors.write_marker(m, True, "built in 1 s")
            os.environ["PACKINFER_WARM_DEADLINE"] = str(time.time() + 3)
            os.environ["PACKINFER_ANCHORS_END"] = str(time.time() + 600)
            out = os.path.join(d, "out")
            os.makedirs(out)
            args = argparse.Namespace(out=out, state=os.path.join(d, "state"), trace=TRACE, seed=0)
            gb.phase_anchors(args)
            res = json.load(open(os.path.join(out, "results.json")))
            ws = res["workloads"]
            self.assertEqual(sorted(ws), ["W1", "W2", "W3", "W4", "W5", "W6", "W7"])
            for w, e in ws.items():
                cs = e["contenders"]
                self.assertEqual(cs["FA2 varlen"]["status"], "error", w)  # no FA2 on the CPU
                self.assertEqual(cs["FA3 varlen"]["status"], "ok", (w, cs["FA3 varlen"]))
            self.assertEqual(ws["W1"]["contenders"]["FlashInfer ragged prefill fa2"]["status"], "ok")
            fa3 = ws["W6"]["contenders"]["FlashInfer ragged prefill fa3"]
            self.assertEqual(fa3["status"], "error")
            self.assertIn("nvcc fatal : Unsupported gpu architecture", fa3["note"])
            self.assertEqual(ws["W7"]["contenders"]["FlashInfer XQA decode"]["status"], "not compiled")
            for name in ("FlashInfer POD", "FlashInfer BatchPOD", "FlashInfer BatchAttention",
                         "FlashInfer paged prefill"):
                self.assertEqual(ws["W3"]["contenders"][name]["status"], "ok", name)
            self.assertEqual(ws["W4"]["contenders"]["FlashInfer cascade"]["status"], "ok")
            self.assertEqual(ws["W7"]["contenders"]["FA3 kvcache"]["status"], "ok")
            self.assertIn("FlashInfer decode tensor cores plan_us", res["planning"]["W2"])
            self.assertEqual(sorted(res["anchor_progress"]["started"]), sorted(res["anchor_progress"]["done"]))
            # A second run (a resume) does nothing again.
            before = json.dumps(res["workloads"], sort_keys=True)
            gb.phase_anchors(args)
            again = json.load(open(os.path.join(out, "results.json")))
            self.assertEqual(json.dumps(again["workloads"], sort_keys=True), before)
            import report
            md = report.markdown(again)
            self.assertIn("nvcc fatal : Unsupported gpu architecture", md)
            self.assertIn("not compiled", md)

    def test_features_phase(self):
        """Markers: ragged-fa2-window and decode-tc-softcap built, ragged-fa3-window failed,
        batch-attention-softcap built but this FlashInfer's BatchAttention takes no soft-cap,
        decode-softcap never started. No PackInfer library: recorded, the anchors still run."""
        import argparse
        import json
        import tempfile
        with tempfile.TemporaryDirectory() as d, dry_run_env(d) as gb:
            fi = sys.modules["flashinfer"]

            class OldAttention(fi.BatchAttention):
                def plan(self, qo, ind, idx, kv_len, hq, hkv, d, dv, page, causal=False, sm_scale=None,
                         q_data_type=None, kv_data_type=None):
                    raise AssertionError("not reached")
            fi.BatchAttention = OldAttention
            anchors.write_marker("ragged-fa2-window", True, "built in 1 s")
            anchors.write_marker("ragged-fa3-window", False, "RuntimeError: nvcc fatal : window kernel broke")
            anchors.write_marker("decode-tc-softcap", True, "built in 1 s")
            anchors.write_marker("batch-attention-softcap", True, "nothing to build")
            out = os.path.join(d, "out")
            os.makedirs(out)
            args = argparse.Namespace(out=out, state=os.path.join(d, "state"), trace=TRACE, seed=0,
                                      lib=os.path.join(d, "no-libpackinfer.so"))
            gb.phase_features(args)
            res = json.load(open(os.path.join(out, "results.json")))
            self.assertEqual(sorted(res["features"]), ["W1-window", "W2-softcap"])
            w1 = res["features"]["W1-window"]["contenders"]
            w2 = res["features"]["W2-softcap"]["contenders"]
            self.assertEqual(res["features"]["W1-window"]["window_left"], 4096 // 256 - 1)
            self.assertEqual(w1["PackInfer"]["status"], "error")
            self.assertIn("no-libpackinfer.so", w1["PackInfer"]["note"])
            self.assertEqual(w1["FA3 varlen"]["status"], "ok", w1["FA3 varlen"])
            fa2 = w1["FlashInfer ragged prefill fa2"]
            self.assertEqual(fa2["status"], "ok", fa2)
            self.assertLess(fa2["check"]["rel_err_fp64"], 2e-2)
            self.assertEqual(fa2["jit_module"], "ragged-fa2-window")
            self.assertIn("window_left=15", fa2["api"])
            self.assertIn("FlashInfer ragged prefill fa2 plan_us", res["features"]["W1-window"]["planning"])
            self.assertEqual(w1["FlashInfer ragged prefill fa3"]["status"], "error")
            self.assertNotIn("FlashInfer ragged prefill fa2 batch-invariant", w1)
            self.assertEqual(w2["FA2 varlen"]["status"], "unsupported")
            self.assertEqual(w2["FA3 kvcache"]["status"], "ok", w2["FA3 kvcache"])
            self.assertEqual(w2["FlashInfer decode tensor cores"]["status"], "ok", w2["FlashInfer decode tensor cores"])
            self.assertEqual(w2["FlashInfer decode CUDA cores"]["status"], "not compiled")
            self.assertEqual(w2["FlashInfer BatchAttention"]["status"], "not run")
            self.assertNotIn("FlashInfer XQA decode", w2)
            nr = res["not_run"]
            self.assertIn("window kernel broke", nr["W1-window FlashInfer ragged prefill fa3"])
            self.assertIn("not compiled: JIT build of 'decode-softcap' not started",
                          nr["W2-softcap FlashInfer decode CUDA cores"])
            self.assertIn("logits_soft_cap", nr["W2-softcap FlashInfer BatchAttention"])
            self.assertIn("no logits soft-cap", nr["W2-softcap FlashInfer XQA decode"])
            self.assertNotIn("W1-window FlashInfer ragged prefill fa2", nr)
            self.assertNotIn("FlashInfer with a sliding window or soft-cap (W1-window, W2-softcap)", nr)
            import report
            md = report.markdown(res)
            row = next(line for line in md.splitlines() if line.startswith("| W1-window |"))
            self.assertIn("FlashInfer ragged prefill fa2 ", row)
            self.assertIn("window kernel broke", md)
            # A rerun after decode-softcap was built: its contender runs, its not_run entry is gone,
            # the others' stay.
            anchors.write_marker("decode-softcap", True, "built in 1 s")
            gb.phase_features(args)
            res = json.load(open(os.path.join(out, "results.json")))
            self.assertEqual(res["features"]["W2-softcap"]["contenders"]["FlashInfer decode CUDA cores"]["status"], "ok")
            self.assertNotIn("W2-softcap FlashInfer decode CUDA cores", res["not_run"])
            self.assertIn("W1-window FlashInfer ragged prefill fa3", res["not_run"])
            self.assertIn("W2-softcap FlashInfer XQA decode", res["not_run"])


if __name__ == "__main__":
    unittest.main()
