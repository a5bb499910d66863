"""Tests of bench/report.py on a synthetic results.json (no GPU, no torch): the summary picks the
fastest of all anchors, the ratio is that anchor over PackInfer, every anchor that could not run
is listed with its exact error, the README block is regenerated in place (and only it), and the
anchors' helper code that needs no GPU (workload kinds, JIT module lists, the import stub) works.

    python3 bench/test_report.py        (tests/run_all.sh runs it)
"""

import copy
import json
import os
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import anchors  # noqa: E402
import report  # noqa: E402
import workloads as wl  # noqa: E402


def timed(us, api, graph=None):
    r = {"status": "ok", "api": api, "time_us": {"median": us, "min": us, "p10": us, "p90": us, "n": 40},
         "check": {"ok": True, "rel_err_fp64": 3e-3, "rel_err_vs": {}}}
    if graph is not None:
        r["graph_us"] = {"median": graph, "min": graph, "p10": graph, "p90": graph, "n": 30}
    return r


def synthetic():
    w = {"describe": {"title": "prefill, 7 prompts"}, "flops": 2e12, "min_bytes": 1e8, "floor_us": 1400.0,
         "contenders": {
             "FA2 varlen": timed(3400.0, "torch.ops.aten._flash_attention_forward (varlen)"),
             "FA3 varlen": timed(1700.0, "flash_attn_varlen_func(num_splits=1)", graph=1650.0),
             "FlashInfer ragged prefill fa2": timed(1900.0, 'backend="fa2"'),
             "FlashInfer ragged prefill fa3": timed(1800.0, 'backend="fa3"'),
             "FlashInfer ragged prefill fa2 batch-invariant": {
                 "status": "not compiled", "api": "ragged fa2, plan(disable_split_kv=True)", "jit_module": "ragged-fa2",
                 "note": "JIT build of 'ragged-fa2' pending at the warm-up deadline (330 s)"},
             "PackInfer": timed(2100.0, None, graph=2000.0),
         }}
    w7 = {"describe": {"title": "long decode"}, "flops": 1e10, "min_bytes": 2.2e9, "floor_us": 700.0,
          "contenders": {
              "FA2 varlen": timed(900.0, "fa2"),
              "FlashInfer XQA decode": {"status": "error", "api": "xqa_batch_decode_with_kv_cache",
                                        "note": "RuntimeError: XQA: page_size 16 not supported on sm_90"},
              "FA3 kvcache": timed(760.0, "flash_attn_with_kvcache"),
              "PackInfer": timed(800.0, None),
          }}
    return {"meta": {"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-07T15:00:00Z", "git_commit": "abc1234",
                     "torch": "2.11.0+cu130", "fa3": "0.0.3", "flashinfer": "0.7.4", "cuda": "13.0",
                     "shape": {"num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "bf16"},
                     "flashinfer_stubbed_packages": ["cutlass"],
                     "not_staged": {"sgl-kernel 0.3.21": "wheel 535 MB"}},
            "ceilings": {"copy_gbps": 3000.0, "matmul_tflops": 790.0},
            "workloads": {"W1": w, "W7": w7},
            "ablations": {"W1": {"deterministic": {"status": "ok", "time_us": 2200.0}}},
            "planning": {"decode1024": {"requests": 1024, "packinfer_plan_us": {"median": 300.0},
                                        "FlashInfer decode tensor cores plan_us": {"median": 170.0},
                                        "FA3 kvcache plan_us": "error: RuntimeError: boom"}},
            "not_run": {"FA3 flash_attn_with_kvcache with a page table": "built with FLASHATTENTION_DISABLE_PAGEDKV"},
            "errors": []}


class ReportTest(unittest.TestCase):
    def test_fastest_anchor_and_ratio(self):
        res = synthetic()
        md = report.markdown(res)
        rows = {line.split(" ")[1]: line for line in md.splitlines() if line.startswith("| W")}
        # W1: FA3 varlen's graph replay (1650) beats FlashInfer fa3 (1800); PackInfer's best is 2000.
        w1 = [line for line in md.splitlines() if line.startswith("| W1 prefill")][0]
        self.assertIn("| FA3 varlen |", w1)
        self.assertIn(f"{1650 / 2000:.2f}×", w1)
        # W7: FA3 kvcache 760 over PackInfer 800.
        w7 = [line for line in md.splitlines() if line.startswith("| W7 long decode")][0]
        self.assertIn("| FA3 kvcache |", w7)
        self.assertIn(f"{760 / 800:.2f}×", w7)
        self.assertTrue(rows)

    def test_fp8_section(self):
        res = synthetic()
        fp8 = timed(250.0, None)
        fp8.update({"bf16_time_us": 325.0, "scales": {"kind": "per-tensor, amax / 448"},
                    "flashinfer": timed(300.0, "decode tensor cores, fp8")})
        res["fp8"] = {"W2": fp8, "W7": {"status": "error", "note": "RuntimeError: no fp8 kernel"}}
        md = report.markdown(res)
        self.assertIn("## fp8 e4m3 K/V cache", md)
        self.assertIn("| W2 | per-tensor, amax / 448 | 250.0 µs | 325.0 µs | 1.30× | 0.003 | 300.0 µs | 1.20× |", md)
        self.assertIn("| W7 | — | error: RuntimeError: no fp8 kernel |", md)
        self.assertNotIn("## fp8", report.markdown(synthetic()))

    def test_features_section(self):
        res = synthetic()
        w1 = res["workloads"]["W1"]
        res["features"] = {"W1-window": {
            "describe": {"title": "W1, window"}, "flops": 1e12, "min_bytes": 1e8, "floor_us": 1000.0,
            "window_left": 4095, "logits_soft_cap": 0.0, "plain": "W1",
            "contenders": {"PackInfer": timed(1600.0, None), "FA2 varlen": timed(2400.0, "fa2 window"),
                           "FA3 varlen": timed(1200.0, "fa3 window"),
                           "FA3 kvcache": {"status": "error", "note": "RuntimeError: no local"}}}}
        md = report.markdown(res)
        self.assertIn("## Serving features: sliding window and soft-cap", md)
        row = next(line for line in md.splitlines() if line.startswith("| W1-window |"))
        self.assertIn("| window_left 4095 | 1.600 ms · 62% of floor |", row)
        self.assertIn(f"| {report.fmt_us(report.best_us(w1['contenders']['PackInfer'])[0])} |", row)
        self.assertIn("FA3 kvcache: error (RuntimeError: no local)", row)
        self.assertTrue(row.endswith("| FA3 varlen | 0.75× |"), row)

    def test_features_section_flashinfer(self):
        """FlashInfer's window and soft-cap contenders: timed ones in the anchors cell and in the
        race for the fastest, the others with their status and reason (and listed under the
        anchors that could not run, from results["not_run"])."""
        res = synthetic()
        fi_fa3 = {"status": "not compiled", "api": 'ragged fa3, plan(window_left=4095)', "jit_module": "ragged-fa3-window",
                  "note": "JIT build of 'ragged-fa3-window' not started at the warm-up deadline (330 s)"}
        res["features"] = {
            "W1-window": {
                "describe": {"title": "W1, window"}, "flops": 1e12, "min_bytes": 1e8, "floor_us": 1000.0,
                "window_left": 4095, "logits_soft_cap": 0.0, "plain": "W1",
                "contenders": {"PackInfer": timed(1600.0, None), "FA3 varlen": timed(1200.0, "fa3 window"),
                               "FlashInfer ragged prefill fa2": timed(1100.0, 'ragged fa2, plan(window_left=4095)'),
                               "FlashInfer ragged prefill fa3": fi_fa3}},
            "W2-softcap": {
                "describe": {"title": "W2, soft-cap"}, "flops": 1e10, "min_bytes": 1e9, "floor_us": 300.0,
                "window_left": None, "logits_soft_cap": 50.0, "plain": "W2",
                "contenders": {"PackInfer": timed(400.0, None),
                               "FA2 varlen": {"status": "unsupported", "note": "no soft-cap"},
                               "FlashInfer decode tensor cores": timed(500.0, "tc decode, plan(logits_soft_cap=50)",
                                                                       graph=440.0),
                               "FlashInfer BatchAttention": {
                                   "status": "not run", "note": "BatchAttention.plan does not take logits_soft_cap"}}}}
        res["not_run"]["W1-window FlashInfer ragged prefill fa3"] = "not compiled: " + fi_fa3["note"]
        md = report.markdown(res)
        rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| W") and "-" in line[:12]}
        w1, w2 = rows["W1-window"], rows["W2-softcap"]
        self.assertIn("FlashInfer ragged prefill fa2 1.100 ms", w1)
        self.assertIn("FlashInfer ragged prefill fa3: not compiled (JIT build of 'ragged-fa3-window'", w1)
        self.assertTrue(w1.endswith(f"| FlashInfer ragged prefill fa2 | {1100 / 1600:.2f}× |"), w1)
        self.assertIn("| soft-cap 50 | 400.0 µs", w2)
        self.assertIn("FlashInfer decode tensor cores 440.0 µs", w2)
        self.assertIn("FlashInfer BatchAttention: not run (BatchAttention.plan does not take logits_soft_cap)", w2)
        self.assertIn("FA2 varlen: unsupported (no soft-cap)", w2)
        self.assertTrue(w2.endswith(f"| FlashInfer decode tensor cores | {440 / 400:.2f}× |"), w2)
        failed = md.split("## Anchors that could not run")[1]
        self.assertIn("**W1-window FlashInfer ragged prefill fa3**: `not compiled: JIT build of 'ragged-fa3-window'", failed)

    def test_could_not_run_lists_exact_errors(self):
        md = report.markdown(synthetic())
        self.assertIn("## Anchors that could not run", md)
        self.assertIn("RuntimeError: XQA: page_size 16 not supported on sm_90", md)
        self.assertIn("JIT build of 'ragged-fa2' pending at the warm-up deadline (330 s)", md)
        self.assertIn("FLASHATTENTION_DISABLE_PAGEDKV", md)
        self.assertIn("sgl-kernel 0.3.21", md)
        self.assertIn("stubbed", md)

    def test_versions_and_planning(self):
        md = report.markdown(synthetic())
        self.assertIn("| FlashInfer ragged prefill fa3 | FlashInfer 0.7.4 | backend=\"fa3\" | W1 |", md)
        self.assertIn("| FA3 kvcache | fa3-fwd 0.0.3 |", md)
        plan = [line for line in md.splitlines() if line.startswith("| decode1024 |")][0]
        self.assertIn("170.0 µs", plan)
        self.assertIn("error: RuntimeError: boom", plan)

    def test_invariance_table(self):
        res = synthetic()
        res["workloads"]["W1"]["contenders"]["FlashInfer ragged prefill fa2 batch-invariant"] = timed(2420.0, "inv")
        md = report.markdown(res)
        self.assertIn("## Batch-invariant settings against PackInfer's deterministic mode", md)
        section = md.split("## Batch-invariant settings against PackInfer's deterministic mode")[1].split("\n## ")[0]
        row = [line for line in section.splitlines() if line.startswith("| W1 | FlashInfer ragged prefill fa2 batch-invariant")]
        self.assertEqual(len(row), 1)
        self.assertIn(f"{2420 / 2200:.2f}×", row[0])

    def test_no_anchor_timed(self):
        res = synthetic()
        for e in res["workloads"].values():
            for n in list(e["contenders"]):
                if n != "PackInfer":
                    e["contenders"][n] = {"status": "error", "note": "x"}
        md = report.markdown(res)
        w1 = [line for line in md.splitlines() if line.startswith("| W1 prefill")][0]
        self.assertTrue(w1.rstrip().endswith("| — |"), w1)

    def test_readme_block(self):
        res = synthetic()
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "README.md")
            with open(p, "w") as f:
                f.write(f"# T\n\nbefore\n\n{report.README_BEGIN}\nold table\n{report.README_END}\n\nafter\n")
            self.assertTrue(report.update_readme(p, res))
            text = open(p).read()
            self.assertTrue(text.startswith("# T\n\nbefore\n\n"))
            self.assertTrue(text.endswith("\n\nafter\n"))
            self.assertNotIn("old table", text)
            self.assertIn("| W1 prefill, 7 prompts |", text)
            self.assertFalse(report.update_readme(p, res))  # idempotent
            with open(p, "w") as f:
                f.write("no block\n")
            with self.assertRaises(ValueError):
                report.update_readme(p, res)

    def test_cli_writes_results_md(self):
        res = synthetic()
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "results.json")
            with open(p, "w") as f:
                json.dump(res, f)
            report.write_all(copy.deepcopy(res), d)
            self.assertIn("## Summary", open(os.path.join(d, "results.md")).read())

    def test_repository_readme_has_block(self):
        with open(os.path.join(HERE, "..", "README.md"), encoding="utf-8") as f:
            text = f.read()
        self.assertIn(report.README_BEGIN, text)
        self.assertIn(report.README_END, text)


class AnchorsHelpersTest(unittest.TestCase):
    def test_kinds_and_modules(self):
        trace = wl.np.array([[1000 + 37 * i % 5000, 1 + 13 * i % 400] for i in range(6000)], dtype=wl.np.int64)
        kinds = {w.name: anchors.kind_of(w) for w in wl.build_all(trace, seed=0, scale=8)}
        self.assertEqual(kinds, {"W1": "ragged", "W2": "decode", "W3": "mixed", "W4": "prefix", "W5": "ragged",
                                 "W6": "ragged", "W7": "decode"})
        self.assertEqual([anchors.kind_of(w) for w in wl.build_features(trace, seed=0, scale=8)],
                         ["ragged-window", "decode-softcap"])
        used = set()
        for k in ("ragged", "decode", "prefix", "mixed", "ragged-window", "decode-softcap"):
            used |= set(anchors.modules_for(k))
            self.assertEqual(anchors.kind_of(anchors.tiny_workload(k)), k)
        self.assertEqual(used, set(anchors.MODULES))
        self.assertEqual(set(anchors.MODULE_KIND), set(anchors.MODULES))
        # Each module is warmed by a workload of a kind that uses it (gpu_bench.phase_warm).
        for m, k in anchors.MODULE_KIND.items():
            self.assertIn(m, anchors.modules_for(k))
        self.assertEqual(anchors.MODULES[-len(anchors.FEATURE_MODULES):], anchors.FEATURE_MODULES)
        w = anchors.tiny_workload("decode")
        w.window_left = 7  # a decode with a window: no set-up, said so
        with self.assertRaises(ValueError):
            anchors.kind_of(w)

    def test_stub_imports(self):
        name = "packinfer_absent_pkg_for_test"
        finder = anchors._StubFinder({name})
        sys.meta_path.append(finder)
        try:
            import importlib
            m = importlib.import_module(name + ".cute.nvgpu")
            self.assertTrue(m.__packinfer_stub__)

            @m.jit
            def f(x):
                return x + 1
            self.assertEqual(f(1), 2)

            class K(m.SomeBase):
                pass
            self.assertTrue(isinstance(K, type))
            self.assertFalse(bool(m.flag))
        finally:
            sys.meta_path.remove(finder)
            for k in [k for k in sys.modules if k.startswith(name)]:
                del sys.modules[k]

    def test_markers(self):
        with tempfile.TemporaryDirectory() as d:
            os.environ["PACKINFER_WARM_DIR"] = d
            try:
                self.assertEqual(anchors.marker_state("decode")[0], "not started")
                anchors.write_marker("decode", None, "pid 1")
                self.assertEqual(anchors.marker_state("decode"), ("running", "pid 1"))
                anchors.write_marker("decode", False, "nvcc: error")
                self.assertEqual(anchors.marker_state("decode"), ("err", "nvcc: error"))
            finally:
                del os.environ["PACKINFER_WARM_DIR"]


if __name__ == "__main__":
    unittest.main()
