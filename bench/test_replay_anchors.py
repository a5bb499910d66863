"""Tests of bench/replay_anchors.py's parts that need no torch: reading a `--record-batches`
recording (page tables rebuilt from runs, relayouts, checks), the step's batch arrays, the
timeline -> TTFT/TBT math and the summary; against the replay binary where it is built (its
summary's TTFT/TBT percentiles recomputed from the recording), and the --dry-run end to end
(PackInfer's CPU backend, fake FlashInfer/FA kernels; on a numpy stand-in for torch where torch
is absent).

    python3 bench/test_replay_anchors.py [path/to/libpackinfer.so]
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import replay_anchors as ra  # noqa: E402

LIB = os.path.join(ROOT, "target", "release", "libpackinfer.so")
REPLAY = os.path.join(ROOT, "target", "release", "packinfer-replay")

HEADER = {"format": ra.FORMAT, "version": 1, "schedule": "baseline", "num_qo_heads": 4, "num_kv_heads": 2, "head_dim": 16,
          "dtype": "bf16", "causal": True, "sm_scale": 0.25, "layers": 2, "page_size": 4, "num_pages": 16, "requests": 3,
          "arrivals": "trace", "trace": "hand-made", "device": "cpu"}


def step(i, arrived, ids, q, kv, emit, pages, finished, t, groups=()):
    costs = {"plan_s": t / 10, "bind_s": 0.0, "kv_write_s": 0.0, "relayout_s": 0.0, "attention_s": t - t / 10}
    return dict(step=i, clock_s=0.02 * i, arrived=arrived, ids=ids, q=q, kv=kv, emit=emit, finished=finished,
                pages=pages, groups=list(groups), total_s=t, pages_moved=0, **costs)


# Request 0: 5-token prompt, 2 tokens; request 1: 3-token prompt, 2 tokens (its KV moved to page
# 10 by a relayout at step 2); request 2 arrives before step 2: 2-token prompt, 1 token.
STEPS = [
    step(0, [0, 1], [0], [5], [5], [1], [[0, 3, 2]], [], 1.0),
    step(1, [], [0, 1], [1, 3], [6, 3], [2, 1], [[2], [0, 7, 1]], [0], 2.0),
    step(2, [2], [1, 2], [1, 2], [4, 2], [2, 1], [[0, 10, 1], [0, 9, 1]], [1, 2], 4.0),
]


def write(path, header, steps):
    with open(path, "w") as f:
        f.write(json.dumps(header) + "\n")
        for s in steps:
            f.write(json.dumps(s) + "\n")


class RecordingTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="replay-anchors-test-")
        self.path = os.path.join(self.dir, "batches-baseline.jsonl")
        write(self.path, HEADER, STEPS)

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def test_tables_are_rebuilt_from_runs_and_relayouts(self):
        rec = ra.read_recording(self.path)
        self.assertEqual(len(rec.steps), 3)
        s0, s1, s2 = rec.steps
        self.assertEqual(s0.pages.tolist(), [3, 4])
        # Request 0 kept its 2 pages (6 keys: still 2 pages); request 1 got page 7.
        self.assertEqual(s1.pages.tolist(), [3, 4, 7])
        self.assertEqual(s1.page_indptr.tolist(), [0, 2, 3])
        # The relayout: request 1's table replaced (keep 0).
        self.assertEqual(s2.pages.tolist(), [10, 9])
        self.assertTrue(s1.decode_only is False and s0.decode_only is False)
        b = ra.batch_arrays_np(s1, 4)
        self.assertEqual(b["qo_indptr"].tolist(), [0, 1, 4])
        self.assertEqual(b["kv_last_page_len"].tolist(), [2, 3])
        self.assertEqual(b["cu_k"].tolist(), [0, 6, 9])
        self.assertEqual(rec.recorded_times().tolist(), [1.0, 2.0, 4.0])

    def test_timeline_gives_ttft_and_tbt(self):
        rec = ra.read_recording(self.path)
        ttft, tbt = ra.timeline(rec, [1.0, 2.0, 4.0])
        # r0 first token after step 0 (1); r1 waited steps 0-1 (3); r2 arrived before step 2 (4).
        self.assertEqual(sorted(ttft), [1.0, 3.0, 4.0])
        self.assertEqual(sorted(tbt), [2.0, 4.0])
        s = ra.summarize(rec, [1.0, 2.0, 4.0])
        self.assertEqual((s["total_s"], s["generated_tokens"], s["all_tokens"]), (7.0, 5, 12))
        self.assertAlmostEqual(s["all_tokens_per_s"], 12 / 7)
        self.assertEqual((s["ttft_p50_ms"], s["ttft_p99_ms"]), (3000.0, 4000.0))
        self.assertEqual((s["tbt_p50_ms"], s["tbt_p90_ms"]), (2000.0, 4000.0))
        self.assertEqual((s["decode_only_steps"], s["mixed_total_s"]), (0, 7.0))
        with self.assertRaises(ValueError):
            ra.timeline(rec, [1.0])
        r = ra.ratios({"PackInfer": s, "other": ra.summarize(rec, [2.0, 4.0, 8.0])}, "PackInfer")
        self.assertAlmostEqual(r["other"]["total_s"], 2.0)
        self.assertAlmostEqual(r["other"]["all_tokens_per_s"], 2.0)

    def test_nearest_rank_is_the_replays(self):
        self.assertEqual(ra.nearest_rank([5, 1, 3, 2, 4], 50), 3)
        self.assertEqual(ra.nearest_rank([5, 1, 3, 2, 4], 90), 5)
        self.assertEqual(ra.nearest_rank([7], 1), 7)
        self.assertTrue(np.isnan(ra.nearest_rank([], 50)))

    def test_broken_recordings_are_refused(self):
        cases = {
            "keeps more pages than it had": [dict(STEPS[0], pages=[[3, 3, 2]])],
            "2 pages for 9 keys": [dict(STEPS[0], kv=[9], q=[9])],
            "page outside": [dict(STEPS[0], pages=[[0, 15, 2]])],
            "q above kv": [dict(STEPS[0], q=[6])],
            "lengths differ": [dict(STEPS[0], emit=[1, 1])],
        }
        for what, steps in cases.items():
            write(self.path, HEADER, steps)
            with self.assertRaises(ValueError, msg=what):
                ra.read_recording(self.path)
        write(self.path, dict(HEADER, version=99), STEPS)
        with self.assertRaises(ValueError):
            ra.read_recording(self.path)

    def test_two_recordings_must_be_the_same_work(self):
        other = os.path.join(self.dir, "batches-packinfer.jsonl")
        write(other, dict(HEADER, schedule="PackInfer"), STEPS)
        ours, base = ra.load_recordings(self.dir)
        self.assertEqual((ours.schedule, base.schedule), ("PackInfer", "baseline"))
        write(other, dict(HEADER, schedule="PackInfer"), STEPS[:2])
        with self.assertRaises(SystemExit):
            ra.load_recordings(self.dir)


@unittest.skipUnless(os.path.exists(REPLAY), "target/release/packinfer-replay is not built")
class AgainstTheReplayTest(unittest.TestCase):
    """A real recording: read back, and the replay's own TTFT/TBT percentiles recomputed."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="replay-anchors-e2e-")
        subprocess.run([REPLAY, "--requests", "24", "--out", cls.dir, "--record-batches", "--arrivals", "trace",
                        "--device", "cpu", "--threads", "1", "--layers", "2"], check=True, capture_output=True)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def test_the_timeline_gives_the_replays_percentiles(self):
        ours, base = ra.load_recordings(self.dir)
        with open(os.path.join(self.dir, "summary.csv")) as f:
            rows = {r[0]: r[1:] for r in csv.reader(f)}
        names = rows["metric"]
        for rec in (ours, base):
            col = names.index(rec.schedule)
            s = ra.summarize(rec, rec.recorded_times())
            for p in ra.PERCENTILES:
                for key, row in ((f"ttft_p{p}_ms", f"TTFT p{p} (ms, all costs)"),
                                 (f"tbt_p{p}_ms", f"TBT p{p} (ms, all costs)")):
                    want = float(rows[row][col])
                    self.assertAlmostEqual(s[key], want, delta=1e-9 * max(want, 1.0), msg=f"{rec.schedule} {key}")
            self.assertEqual(s["generated_tokens"], float(rows["tokens generated"][col]))
            total = float(rows["TOTAL: planning + launch update + KV writes + relayout + attention (s)"][col])
            self.assertAlmostEqual(float(rec.recorded_times().sum()), total, delta=1e-9 * max(total, 1.0))


try:
    import torch  # noqa: F401
    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False


def numpy_torch():
    """A stand-in for the few CPU tensor operations replay_anchors.py's dry run uses, on numpy
    (bf16 as its bit patterns in uint16), so that the dry run runs where torch is not installed.
    PackInfer's CPU backend reads these buffers for real; the fake FlashInfer/FA kernels only
    check the index arrays they get."""
    import types
    t = types.ModuleType("torch")
    t.__packinfer_numpy_stand_in__ = True
    t.bfloat16, t.float16, t.int32, t.uint8 = "bfloat16", "float16", "int32", "uint8"
    storage = {"bfloat16": np.uint16, "float16": np.float16, "int32": np.int32, "uint8": np.uint8}

    class Tensor:
        def __init__(self, a):
            self.a = a

        shape = property(lambda self: self.a.shape)

        def data_ptr(self):
            return self.a.ctypes.data

        def __getitem__(self, i):
            return Tensor(self.a[i])

        def __len__(self):
            return len(self.a)

        def __int__(self):
            return int(self.a)

        def max(self):
            return Tensor(self.a.max())

        def zero_(self):
            self.a[...] = 0
            return self

        def to(self, device, non_blocking=False):
            assert device == "cpu"
            return self

    class Generator:
        def __init__(self, device="cpu"):
            self.rng = np.random.default_rng(0)

        def manual_seed(self, seed):
            self.rng = np.random.default_rng(seed)

    def randn(*shape, generator=None, device="cpu", dtype=None):
        x = generator.rng.standard_normal(shape, dtype=np.float32)
        if dtype == "bfloat16":
            return Tensor((x.view(np.uint32) >> 16).astype(np.uint16))
        return Tensor(x.astype(storage[dtype]))

    t.Tensor, t.Generator, t.randn = Tensor, Generator, randn
    t.empty = lambda *shape, device="cpu", dtype=None: Tensor(np.empty(shape, storage[dtype]))
    t.zeros = lambda *shape, device="cpu", dtype=None: Tensor(np.zeros(shape, storage[dtype]))
    t.zeros_like = lambda x: Tensor(np.zeros_like(x.a))
    t.as_tensor = lambda a, dtype=None: Tensor(np.ascontiguousarray(a, dtype=storage[dtype]))
    return t


@unittest.skipUnless(os.path.exists(REPLAY), "target/release/packinfer-replay is not built")
class DryRunTest(unittest.TestCase):
    """The --dry-run end to end: PackInfer's CPU backend and fake FlashInfer/FA kernels replay
    every recorded step (torch, or numpy_torch where torch is absent)."""

    def test_every_contender_replays_every_step_on_the_cpu(self):
        if not os.path.exists(LIB):
            self.skipTest(f"{LIB} is not built")
        d = tempfile.mkdtemp(prefix="replay-anchors-dry-")
        saved = sys.modules.get("torch")
        if not HAVE_TORCH:
            sys.modules["torch"] = numpy_torch()
        try:
            subprocess.run([REPLAY, "--requests", "12", "--out", d, "--record-batches", "--device", "cpu",
                            "--threads", "1", "--layers", "2", "--system-prompts", "1", "--shared-fraction", "0.5"],
                           check=True, capture_output=True)
            rc = ra.main([d, "--dry-run", "--lib", LIB, "--out", os.path.join(d, "anchors")])
            with open(os.path.join(d, "anchors", "replay_anchors.json")) as f:
                res = json.load(f)
            self.assertEqual(res["errors"], {})
            self.assertEqual(rc, 0)
            steps = res["steps"]
            self.assertGreater(steps, 10)
            for name in ("PackInfer", "FlashInfer best", "FA3 varlen", "FA2 varlen",
                         "replay PackInfer (recorded)", "replay baseline (recorded)"):
                c = res["contenders"][name]
                self.assertEqual(len(c["step_s"]), steps, name)
                self.assertGreater(c["summary"]["total_s"], 0.0, name)
                self.assertEqual(c["summary"]["steps"], steps, name)
            self.assertIn("FlashInfer best", res["ratios"])
            # The untimed pre-pass sized PackInfer's launch for every step: no launch made while timed.
            self.assertEqual(res["contenders"]["PackInfer"]["launches_created"], 0)
            # Both kinds of step reached FlashInfer (tensor-core decode and BatchAttention).
            decode = res["contenders"]["FlashInfer best"]["summary"]["decode_only_steps"]
            self.assertTrue(0 < decode < steps, decode)
        finally:
            if saved is None:
                sys.modules.pop("torch", None)
            else:
                sys.modules["torch"] = saved
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].endswith(".so"):
        LIB = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=1)
