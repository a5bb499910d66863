"""Tests of the ctypes layer and the workload construction, on the CPU backend (numpy only).

    python3 bench/test_packinfer_ctypes.py [path/to/libpackinfer.so]

1. Every ctypes struct has the size and field offsets the C compiler gives the header's struct.
2. The library loads, reports ABI version 1, plans and runs a small paged batch on the CPU
   backend through ctypes, and the output matches a float64 numpy reference.
3. A bad argument comes back as PackinferError naming the argument and its value.
4. W1-W5 are built as docs/workloads.md defines them (on a synthetic trace) and their page
   tables are valid: every request's keys map to distinct slots, W4's prefix pages are shared.
"""

import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import common  # noqa: E402
import managed  # noqa: E402
import packinfer_ctypes as pc  # noqa: E402
import workloads as wl  # noqa: E402

if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
    os.environ["PACKINFER_LIB"] = os.path.abspath(sys.argv.pop(1))
LIB_PATH = os.environ.get("PACKINFER_LIB", os.path.join(ROOT, "target", "release", "libpackinfer.so"))
INCLUDE_DIR = os.environ.get("PACKINFER_INCLUDE", os.path.join(ROOT, "include"))


class LayoutTest(unittest.TestCase):
    def test_struct_layouts_match_header(self):
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            self.skipTest("no C compiler")
        with open(os.path.join(INCLUDE_DIR, "packinfer.h")) as f:
            header = f.read()
        structs = []
        for s in pc.STRUCTS:
            start = header.find(f"typedef struct {s.__name__} {{")
            if start >= 0:
                body = re.sub(r"/\*.*?\*/", "", header[start:header.index(f"}} {s.__name__};", start)], flags=re.S)
                declared = re.findall(r"(\w+)(?:\[\d+\])?;", body)
                self.assertEqual([n for n, _ in s._fields_], declared, f"fields of {s.__name__}")
                structs.append(s)
            else:
                # Only a struct of an optional export (Library.has) may be missing from the header.
                self.assertIn(s, pc.OPTIONAL_STRUCTS, f"struct {s.__name__} is not in the header")
        lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "packinfer.h"', 'int main(void) {']
        for s in structs:
            lines.append(f'printf("{s.__name__} size %zu\\n", sizeof(struct {s.__name__}));')
            for name, _ in s._fields_:
                lines.append(f'printf("{s.__name__}.{name} %zu\\n", offsetof(struct {s.__name__}, {name}));')
        lines += ['return 0;', '}']
        with tempfile.TemporaryDirectory() as d:
            src, exe = os.path.join(d, "layout.c"), os.path.join(d, "layout")
            with open(src, "w") as f:
                f.write("\n".join(lines))
            subprocess.run([cc, "-I", INCLUDE_DIR, src, "-o", exe], check=True)
            out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
        c_values = dict(line.rsplit(" ", 1) for line in out.splitlines())
        for s in structs:
            self.assertEqual(int(c_values[f"{s.__name__} size"]), ctypes.sizeof(s), f"sizeof({s.__name__})")
            for name, _ in s._fields_:
                self.assertEqual(int(c_values[f"{s.__name__}.{name}"]), getattr(s, name).offset, f"{s.__name__}.{name}")


    def test_every_export_has_a_signature(self):
        with open(os.path.join(INCLUDE_DIR, "packinfer.h")) as f:
            header = f.read()
        declared = set(re.findall(r"\b(packinfer_\w+)\(", header))
        typed = set(pc._SIGNATURES) | set(pc.OPTIONAL_SIGNATURES)
        self.assertEqual(sorted(declared - typed), [], "exports of the header without a ctypes signature")
        self.assertEqual(sorted(set(pc._SIGNATURES) - declared), [], "ctypes signatures of functions the header lacks")
        sigs = dict(pc._SIGNATURES, **pc.OPTIONAL_SIGNATURES)
        for name, params in re.findall(r"\b(packinfer_\w+)\(([^;]*)\);", header):
            params = " ".join(params.split())
            count = 0 if params in ("", "void") else params.count(",") + 1
            self.assertEqual(len(sigs[name][1]), count, f"{name}: the header declares ({params})")


@unittest.skipUnless(os.path.exists(LIB_PATH), f"{LIB_PATH} not built (cargo build --release)")
class CpuBackendTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.lib = pc.Library(LIB_PATH)
        cls.ctx = cls.lib.context(pc.BACKEND_CPU, num_threads=2)

    def test_abi_and_context(self):
        self.assertEqual(self.lib.abi_version, pc.ABI_VERSION)
        self.assertEqual(self.ctx.backend, "cpu")
        self.assertEqual(self.ctx.device_name, "cpu")
        self.assertEqual(self.ctx.num_workers, 2)

    def test_paged_batch_matches_reference(self):
        shape = wl.ModelShape(num_qo_heads=4, num_kv_heads=2, head_dim=32, dtype="f32")
        rng = np.random.default_rng(7)
        # A prefill, a decode, and a chunk over a longer context; scattered pages of 4.
        w = wl.build_paged("test", [(9, 9), (1, 23), (5, 17)], page_size=4, rng=rng, causal=True)
        q = rng.standard_normal((w.total_q, shape.num_qo_heads, shape.head_dim)).astype(np.float32)
        k = rng.standard_normal((w.num_pages, w.page_size, shape.num_kv_heads, shape.head_dim)).astype(np.float32)
        v = rng.standard_normal(k.shape).astype(np.float32)
        o = np.full_like(q, np.nan)
        batch = wl.batch_arrays(w, shape)
        plan, _ = self.ctx.plan(batch)
        launch = self.ctx.launch(plan)
        layout = self.lib.kv_layout_nhd(k.ctypes.data, v.ctypes.data, w.page_size, shape.num_kv_heads, shape.head_dim)
        launch.run(q.ctypes.data, layout, o.ctypes.data)
        self.assertFalse(np.isnan(o).any(), "output not fully written")
        slots = w.kv_slots()
        kf, vf = k.reshape(-1, shape.num_kv_heads, shape.head_dim), v.reshape(-1, shape.num_kv_heads, shape.head_dim)
        for r in range(w.batch_size):
            q0, q1 = w.qo_indptr[r], w.qo_indptr[r + 1]
            ref = common.reference_attention(q[q0:q1], kf[slots[r]], vf[slots[r]], True, shape.sm_scale)
            err = np.linalg.norm(o[q0:q1] - ref) / np.linalg.norm(ref)
            self.assertLess(err, 1e-5, f"request {r}")
        stats = plan.stats()
        self.assertEqual(stats["num_requests"], 3)
        self.assertGreater(stats["num_work_items"], 0)
        launch.destroy()
        plan.destroy()
        with self.assertRaises(pc.PackinferError) as e:
            plan.handle = pc.PackinferPlan(12345)
            plan.destroy()
        self.assertEqual(e.exception.status, "INVALID_HANDLE")

    def test_replan_and_update_compute_the_next_step(self):
        """packinfer_plan_update into the plan, launch_update of a capacity launch: the launch
        computes the new step (the benchmark's host-path measurement makes these calls)."""
        shape = wl.ModelShape(num_qo_heads=4, num_kv_heads=2, head_dim=32, dtype="f32")
        rng = np.random.default_rng(8)
        first = wl.build_paged("a", [(9, 9), (1, 23)], page_size=4, rng=rng, causal=True)
        nxt = wl.build_paged("b", [(1, 30), (1, 7), (6, 12)], page_size=4, rng=rng, causal=True)
        plan, _ = self.ctx.plan(wl.batch_arrays(first, shape))
        launch = self.ctx.launch_with_capacity(plan, max_work_items=256, max_row_segments=256, max_kv_chunks=256,
                                               max_requests=16, max_pages=256, max_merge_rows=1024,
                                               max_merge_slots=1024, max_groups=256, max_partial_slots=1024)
        self.assertGreater(self.ctx.replan(plan, wl.batch_arrays(nxt, shape)), 0.0)
        self.assertEqual(plan.stats()["num_requests"], 3)
        self.assertGreater(launch.update(plan), 0.0)
        q = rng.standard_normal((nxt.total_q, shape.num_qo_heads, shape.head_dim)).astype(np.float32)
        k = rng.standard_normal((nxt.num_pages, nxt.page_size, shape.num_kv_heads, shape.head_dim)).astype(np.float32)
        v = rng.standard_normal(k.shape).astype(np.float32)
        o = np.full_like(q, np.nan)
        layout = self.lib.kv_layout_nhd(k.ctypes.data, v.ctypes.data, nxt.page_size, shape.num_kv_heads, shape.head_dim)
        launch.run(q.ctypes.data, layout, o.ctypes.data)
        slots = nxt.kv_slots()
        kf, vf = k.reshape(-1, shape.num_kv_heads, shape.head_dim), v.reshape(-1, shape.num_kv_heads, shape.head_dim)
        for r in range(nxt.batch_size):
            q0, q1 = nxt.qo_indptr[r], nxt.qo_indptr[r + 1]
            ref = common.reference_attention(q[q0:q1], kf[slots[r]], vf[slots[r]], True, shape.sm_scale)
            self.assertLess(np.linalg.norm(o[q0:q1] - ref) / np.linalg.norm(ref), 1e-5, f"request {r}")
        launch.destroy()
        plan.destroy()

    def test_managed_pool_forks_match_reference(self):
        """W4's managed build (managed.py) on a small case: forks of a prefix, pages interleaved,
        then relayout; both plans' outputs match the float64 reference of the same values."""
        if not self.lib.has("packinfer_pool_create"):
            self.skipTest("this build has no packinfer_pool_* exports")
        shape = wl.ModelShape(num_qo_heads=4, num_kv_heads=2, head_dim=32, dtype="f32")
        rng = np.random.default_rng(3)
        own = [1, 37, 5, 20]
        w = wl.build_paged("W4", [(1, 32 + n) for n in own], page_size=4, rng=rng, causal=True, shared_prefix=32)
        k = rng.standard_normal((w.num_pages, w.page_size, shape.num_kv_heads, shape.head_dim)).astype(np.float32)
        v = rng.standard_normal(k.shape).astype(np.float32)
        q = rng.standard_normal((w.total_q, shape.num_qo_heads, shape.head_dim)).astype(np.float32)
        kf, vf = k.reshape(-1, shape.num_kv_heads, shape.head_dim), v.reshape(-1, shape.num_kv_heads, shape.head_dim)
        prefix, own_slots, _ = managed.w4_rows(w)
        rows = [np.ascontiguousarray(x) for x in (kf[prefix], vf[prefix], kf[own_slots], vf[own_slots])]
        pool, forks = managed.build_w4_pool(self.ctx, w, shape, *[r.ctypes.data for r in rows], headroom_pages=1)
        slots = w.kv_slots()
        refs = [common.reference_attention(q[r:r + 1], kf[slots[r]], vf[slots[r]], True, shape.sm_scale) for r in range(4)]
        try:
            for relayout in (False, True):
                plan, _ = pool.plan(forks, [1] * len(forks))
                if relayout:
                    report = pool.relayout(plan, forks, regroup=True)
                    self.assertEqual(report["groups_no_room"], 0)
                    plan.destroy()
                    plan, _ = pool.plan(forks, [1] * len(forks))
                launch = self.ctx.launch(plan)
                o = np.full_like(q, np.nan)
                launch.run(q.ctypes.data, pool.kv_layout(0), o.ctypes.data)
                for r in range(4):
                    err = np.linalg.norm(o[r:r + 1] - refs[r]) / np.linalg.norm(refs[r])
                    self.assertLess(err, 1e-5, f"request {r}, relayout {relayout}")
                launch.destroy()
                plan.destroy()
            stats = pool.stats()
            self.assertEqual(stats["tokens_stored"], 32 + sum(own))
            self.assertEqual(stats["num_sequences"], 5)
        finally:
            pool.destroy()

    def test_fp8_cache_matches_reference_of_the_dequantized_cache(self):
        """kv_dtype = FP8_E4M3 in the batch description, per-tensor and per-head scales in the run
        arguments; the output matches float64 attention over code value x scale. An fp8 pool
        gives its layer's scales back."""
        shape = wl.ModelShape(num_qo_heads=4, num_kv_heads=2, head_dim=32, dtype="f32")
        rng = np.random.default_rng(11)
        w = wl.build_paged("fp8", [(9, 9), (1, 23), (5, 17)], page_size=4, rng=rng, causal=True)
        # e4m3 by its definition: bias 7, subnormals at exponent 0 (codes with exponent <= 9 only).
        def value(c):
            e, m = (c >> 3) & 0xF, (c & 7).astype(np.float64)
            mag = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e.astype(np.float64) - 7))
            return np.where(c & 0x80, -mag, mag)
        dims = (w.num_pages, w.page_size, shape.num_kv_heads, shape.head_dim)
        codes = [(rng.integers(0, 2, dims) * 0x80 | rng.integers(0, 10, dims) << 3 | rng.integers(0, 8, dims)).astype(np.uint8)
                 for _ in range(2)]
        q = rng.standard_normal((w.total_q, shape.num_qo_heads, shape.head_dim)).astype(np.float32)
        b = wl.batch_arrays(w, shape)
        b.desc.kv_dtype = pc.DTYPE_FP8_E4M3
        plan, _ = self.ctx.plan(b)
        launch = self.ctx.launch(plan)
        layout = self.lib.kv_layout_nhd(codes[0].ctypes.data, codes[1].ctypes.data, w.page_size, shape.num_kv_heads,
                                        shape.head_dim)
        heads = [np.array([0.5, 0.125], np.float32), np.array([0.25, 1.0], np.float32)]
        slots = w.kv_slots()
        for k_scale, v_scale, per_head in ((0.3, 0.2, False), (0.0, 0.0, True), (0.5, 2.0, True)):
            o = np.full_like(q, np.nan)
            launch.run(q.ctypes.data, layout, o.ctypes.data, k_scale=k_scale, v_scale=v_scale,
                       k_head_scales_ptr=heads[0].ctypes.data if per_head else 0,
                       v_head_scales_ptr=heads[1].ctypes.data if per_head else 0)
            kv = []
            for i, scale in enumerate((k_scale or 1.0, v_scale or 1.0)):
                x = value(codes[i]) * scale * (heads[i].astype(np.float64)[None, None, :, None] if per_head else 1.0)
                kv.append(x.reshape(-1, shape.num_kv_heads, shape.head_dim))
            for r in range(w.batch_size):
                q0, q1 = w.qo_indptr[r], w.qo_indptr[r + 1]
                ref = common.reference_attention(q[q0:q1], kv[0][slots[r]], kv[1][slots[r]], True, shape.sm_scale)
                err = np.linalg.norm(o[q0:q1] - ref) / np.linalg.norm(ref)
                self.assertLess(err, 1e-5, f"request {r}, scales {k_scale} {v_scale} per head {per_head}")
        with self.assertRaises(pc.PackinferError) as e:
            launch.run(q.ctypes.data, layout, o.ctypes.data, k_scale=-1.0)
        self.assertIn("k_scale = -1", e.exception.message)
        launch.destroy()
        plan.destroy()
        if self.lib.has("packinfer_pool_create"):
            scales = [0.5, 0.25, 2.0, 4.0]  # [layer 0][K, V][2 kv heads]
            pool = self.ctx.pool(1, 4, 2, 32, pc.DTYPE_F32, True, 8, page_size=4, kv_dtype=pc.DTYPE_FP8_E4M3,
                                 kv_head_scales=scales)
            try:
                k_ptr, v_ptr = pool.kv_head_scales(0)
                got = [ctypes.cast(p, ctypes.POINTER(ctypes.c_float))[i] for p in (k_ptr, v_ptr) for i in range(2)]
                self.assertEqual(got, scales)
            finally:
                pool.destroy()

    def test_bad_argument_names_value(self):
        shape = wl.ModelShape(num_qo_heads=4, num_kv_heads=2, head_dim=32, dtype="f32")
        w = wl.build_paged("bad", [(1, 8)], page_size=4, rng=np.random.default_rng(0), causal=True)
        w.kv_page_indices[-1] = w.num_pages + 5
        with self.assertRaises(pc.PackinferError) as e:
            self.ctx.plan(wl.batch_arrays(w, shape))
        self.assertEqual(e.exception.status, "INVALID_ARGUMENT")
        self.assertIn(str(w.num_pages + 5), e.exception.message)


class WorkloadTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        rng = np.random.default_rng(1)
        ctx = rng.integers(2, 9000, size=6000)
        gen = rng.integers(1, 600, size=6000)
        cls.trace = np.stack([ctx, gen], axis=1)

    def check_tables(self, w):
        slots = w.kv_slots()
        self.assertEqual(len(slots), w.batch_size)
        for r, s in enumerate(slots):
            self.assertEqual(len(s), w.kv_lens[r])
            self.assertEqual(len(np.unique(s)), len(s), f"{w.name} request {r} reuses a slot")
            self.assertTrue((s < w.num_pages * w.page_size).all())
        for r in range(w.batch_size):
            self.assertLessEqual(w.q_lens[r], w.kv_lens[r])

    def test_definitions(self):
        ws = {w.name: w for w in wl.build_all(self.trace, seed=0, scale=1)}
        w1 = ws["W1"]
        caps = np.minimum(self.trace[:, 0], 16384)
        n = int(np.searchsorted(np.cumsum(caps), 16384) + 1)
        self.assertEqual(list(w1.q_lens), list(caps[:n]))
        self.assertGreaterEqual(w1.total_q, 16384)
        self.assertLess(w1.total_q - w1.q_lens[-1], 16384)
        self.assertEqual(list(w1.q_lens), list(w1.kv_lens))
        w2 = ws["W2"]
        self.assertEqual(w2.batch_size, 128)
        self.assertTrue((w2.q_lens == 1).all())
        lo, hi = self.trace[1000:1128, 0], self.trace[1000:1128, 0] + self.trace[1000:1128, 1]
        self.assertTrue(((w2.kv_lens >= lo) & (w2.kv_lens <= hi)).all())
        self.assertEqual(w2.page_size, 16)
        w3 = ws["W3"]
        self.assertEqual(w3.batch_size, 97)
        self.assertEqual((w3.q_lens[-1], w3.kv_lens[-1]), (2048, 4096))
        w4 = ws["W4"]
        self.assertEqual(w4.batch_size, 64)
        self.assertEqual(list(w4.kv_lens), list(4096 + 1 + self.trace[3000:3064, 1]))
        self.assertEqual(w4.prefix_groups[0][0], 4096)
        prefix_pages = w4.kv_page_indices[:256]
        for r in range(64):
            start = w4.kv_indptr[r]
            self.assertEqual(list(w4.kv_page_indices[start:start + 256]), list(prefix_pages))
        w5 = ws["W5"]
        self.assertEqual(w5.batch_size, 256)
        self.assertTrue(((w5.q_lens >= 16) & (w5.q_lens <= 256)).all())
        w6 = ws["W6"]
        self.assertEqual((w6.batch_size, w6.total_q, w6.total_kv, w6.causal, w6.ragged), (1, 16384, 16384, True, True))
        w7 = ws["W7"]
        self.assertEqual((w7.batch_size, w7.page_size), (32, 16))
        self.assertTrue((w7.q_lens == 1).all() and (w7.kv_lens == 32768).all())
        self.assertEqual(w7.unique_kv_tokens(), 32 * 32768)
        for w in ws.values():
            self.check_tables(w)
        # Same seed, same workloads.
        again = {w.name: w for w in wl.build_all(self.trace, seed=0, scale=1)}
        self.assertEqual(list(again["W2"].kv_lens), list(w2.kv_lens))
        self.assertEqual(list(again["W2"].kv_page_indices), list(w2.kv_page_indices))

    def test_scaled_down(self):
        for w in wl.build_all(self.trace, seed=0, scale=8):
            self.check_tables(w)
        w4 = [w for w in wl.build_all(self.trace, seed=0, scale=8) if w.name == "W4"][0]
        self.assertEqual(w4.prefix_groups[0][0], 512)

    def test_floor_counts(self):
        shape = wl.ModelShape(num_qo_heads=32, num_kv_heads=8, head_dim=128, dtype="bf16")
        w = wl.build_ragged("t", [(3, 3), (1, 5)], causal=True)
        # Causal visible pairs: 1+2+3 for the prefill, 5 for the decode.
        self.assertEqual(w.visible_pairs(), 11)
        self.assertEqual(wl.flops(w, shape), 4 * 32 * 128 * 11)
        self.assertEqual(wl.min_bytes(w, shape), 2 * (4 * 32 * 128 * 2 + 8 * 8 * 128 * 2))


if __name__ == "__main__":
    unittest.main()
