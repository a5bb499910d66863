"""Turns a results.json (either harness) into results.md and PNG charts.

    python3 bench/report.py bench/results/<device>-<date>/results.json

Times are medians in microseconds. A contender's headline time is its CUDA-graph replay when it
has one, else its eager time (both are in the tables). Ratios are anchor time / PackInfer time:
above 1 PackInfer is faster, below 1 it is slower; they are printed as they come out.
"""

import json
import os
import sys


def best_us(res):
    """(time in us, 'graph'|'eager') of a timed contender: the better of its CUDA-graph replay and
    eager medians (each contender is credited with its faster mode), or (None, None)."""
    if not res or res.get("status") != "ok":
        return None, None
    cands = []
    for key, how in (("graph_us", "graph"), ("time_us", "eager")):
        v = res.get(key)
        if isinstance(v, dict) and v.get("median"):
            cands.append((v["median"], how))
    return min(cands) if cands else (None, None)


def derive(res, entry):
    """Adds rates and the fraction of the physical floor to a timed contender, from its best time."""
    t, how = best_us(res)
    if t is None:
        return res
    res["best_us"], res["best_is"] = t, how
    res["tflops"] = entry["flops"] / (t * 1e-6) / 1e12
    res["gbps"] = entry["min_bytes"] / (t * 1e-6) / 1e9
    if entry.get("floor_us"):
        res["fraction_of_floor"] = entry["floor_us"] / t
    return res


def fmt_us(us):
    if us is None:
        return "—"
    return f"{us / 1000:.3f} ms" if us >= 1000 else f"{us:.1f} µs"


def cell(res, entry):
    if res is None:
        return "n/a"
    status = res.get("status", "not run")
    if status != "ok":
        note = (res or {}).get("note", "")
        short = (note[:90] + "…") if len(note) > 90 else note
        if status == "mismatch":
            c = (res or {}).get("check", {})
            return f"MISMATCH (rel err {c.get('rel_err_fp64', float('nan')):.3g}; not timed)"
        return f"{status}" + (f": {short}" if short else "")
    t, how = best_us(res)
    parts = [fmt_us(t)]
    g, e = res.get("graph_us"), res.get("time_us")
    if isinstance(g, dict) and isinstance(e, dict):
        parts.append(f"({'eager' if how == 'graph' else 'graph'} "
                     f"{fmt_us(e['median'] if how == 'graph' else g['median'])})")
    if entry.get("floor_us"):
        parts.append(f"· {100 * entry['floor_us'] / t:.0f}% of floor")
    return " ".join(parts)


def contender_names(results):
    """Every contender, anchors first (in order of appearance), then ours."""
    names = []
    for entry in results["workloads"].values():
        for n in entry.get("contenders", {}):
            if n not in names:
                names.append(n)
    return [n for n in names if not n.startswith("PackInfer")] + [n for n in names if n.startswith("PackInfer")]


def ours_and_anchors(names, results=None):
    """(our contenders, anchors); with `results`, only those with at least one timed workload."""
    def timed(n):
        return results is None or any(best_us(e.get("contenders", {}).get(n))[0] for e in results["workloads"].values())
    ours = [n for n in names if n.startswith("PackInfer") and timed(n)]
    return ours, [n for n in names if not n.startswith("PackInfer") and timed(n)]


def is_anchor(name):
    return not name.startswith("PackInfer")


def fastest_anchor(entry):
    """(time, name) of the fastest timed anchor of a workload entry, or (None, None)."""
    timed = [(best_us(r)[0], n) for n, r in entry.get("contenders", {}).items() if is_anchor(n) and best_us(r)[0]]
    return min(timed) if timed else (None, None)


def _best_of(entry, prefix):
    timed = [(best_us(r)[0], n) for n, r in entry.get("contenders", {}).items()
             if n.startswith(prefix) and best_us(r)[0]]
    return min(timed) if timed else (None, None)


def summary_table(results):
    """The headline table (README and results.md): per workload the floor, the best of each anchor
    family, PackInfer, and the fastest of all anchors over PackInfer."""
    out = ["Best time per step (the faster of CUDA-graph replay and eager, for every contender); % = share of the "
           "physical floor reached; last column: the fastest anchor's time over PackInfer's (above 1: PackInfer "
           "faster, below 1: PackInfer behind).", "",
           "| workload | floor | FA2 varlen | FA3 (best API) | FlashInfer (best API) | fastest anchor | PackInfer | "
           "fastest anchor / PackInfer |",
           "|---|---|---|---|---|---|---|---|"]
    for w, e in results["workloads"].items():
        cs = e.get("contenders", {})

        def pct(t):
            return f" ({100 * e['floor_us'] / t:.0f}%)" if t and e.get("floor_us") else ""

        def fam(prefix):
            t, n = _best_of(e, prefix)
            if t is None:
                stat = [r.get("status") for k, r in cs.items() if k.startswith(prefix) and r]
                return "—" if not stat else f"not timed ({', '.join(sorted(set(map(str, stat))))})"
            api = n[len(prefix):].strip()
            return f"{fmt_us(t)}{pct(t)}" + (f", {api}" if api else "")
        fa2, _ = best_us(cs.get("FA2 varlen"))
        fa, fa_name = fastest_anchor(e)
        ours_res = cs.get("PackInfer")
        ours_t, _ = best_us(ours_res)
        ours_cell = f"{fmt_us(ours_t)}{pct(ours_t)}" if ours_t else cell(ours_res, {})
        ratio = f"{fa / ours_t:.2f}×" if ours_t and fa else "—"
        title = e.get("describe", {}).get("title", "")
        out.append(f"| {w}{' ' + title if title else ''} | {fmt_us(e.get('floor_us'))} | "
                   f"{fmt_us(fa2)}{pct(fa2) if fa2 else ''} | {fam('FA3')} | {fam('FlashInfer')} | "
                   f"{fa_name or '—'} | {ours_cell} | {ratio} |")
    return out


def anchor_list(results):
    """Every anchor with its version and API, and how many workloads it was timed on."""
    m = results.get("meta", {})
    version = {"FA2": f"PyTorch {m.get('torch', '?')}", "FA3": f"fa3-fwd {m.get('fa3', '?')}",
               "FlashInfer": f"FlashInfer {m.get('flashinfer', '?')}"}
    rows = {}
    for w, e in results["workloads"].items():
        for n, r in e.get("contenders", {}).items():
            if not is_anchor(n) or not r:
                continue
            row = rows.setdefault(n, {"api": r.get("api"), "timed": [], "other": []})
            row["api"] = row["api"] or r.get("api")
            (row["timed"] if best_us(r)[0] else row["other"]).append(f"{w}" + ("" if best_us(r)[0] else f" {r.get('status')}"))
    out = ["| anchor | version | API | timed on | not timed |", "|---|---|---|---|---|"]
    for n, row in rows.items():
        v = next((v for k, v in version.items() if n.startswith(k)), "?")
        out.append(f"| {n} | {v} | {row['api'] or '—'} | {', '.join(row['timed']) or '—'} | "
                   f"{', '.join(row['other']) or '—'} |")
    stubs = m.get("flashinfer_stubbed_packages")
    if stubs:
        out += ["", f"FlashInfer imported with these packages absent and stubbed (used only by its non-attention "
                f"features): {', '.join(stubs)}."]
    return out


def invariance_table(results):
    """Rows comparing each FlashInfer batch-invariant contender with PackInfer's deterministic plan."""
    rows = []
    for w, e in results["workloads"].items():
        det = ((results.get("ablations") or {}).get(w) or {}).get("deterministic") or {}
        det_t = det.get("time_us") if det.get("status") == "ok" else None
        for n, r in e.get("contenders", {}).items():
            if "batch-invariant" not in n:
                continue
            t, _ = best_us(r)
            ratio = f"{t / det_t:.2f}×" if t and det_t else "—"
            rows.append(f"| {w} | {n} | {fmt_us(t) if t else cell(r, {})} | "
                        f"{fmt_us(det_t) if det_t else (det.get('status') or '—')} | {ratio} |")
    if not rows:
        return []
    return ["| workload | FlashInfer batch-invariant | its time | PackInfer deterministic | ratio |",
            "|---|---|---|---|---|"] + rows


def fp8_table(results):
    """Rows of the fp8 K/V section: PackInfer on an fp8 e4m3 copy of a workload's cache against
    its bf16 run, and FlashInfer's fp8 decode on the same codes and scales where it ran. Eager
    medians throughout (the bf16 run's is the one the harness recorded beside it)."""
    def eager(r):
        return (r.get("time_us") or {}).get("median") if r.get("status") == "ok" else None
    out = ["| workload | scales | PackInfer fp8 | PackInfer bf16 | fp8 speedup | vs float64 | "
           "FlashInfer fp8 | PackInfer fp8 vs FlashInfer fp8 |", "|---|---|---|---|---|---|---|---|"]
    for w, r in results.get("fp8", {}).items():
        ours, bf16 = eager(r), r.get("bf16_time_us")
        if ours is None:
            out.append(f"| {w} | — | {r.get('status', '?')}: {r.get('note', '')[:100]} | — | — | — | — | — |")
            continue
        fi = r.get("flashinfer") or {}
        fi_us = eager(fi)
        fi_cell = fmt_us(fi_us) if fi_us else fi.get("status", "not run") + (f": {fi['note'][:60]}" if fi.get("note") else "")
        err = (r.get("check") or {}).get("rel_err_fp64")
        out.append(f"| {w} | {(r.get('scales') or {}).get('kind', '—')} | {fmt_us(ours)} | "
                   f"{fmt_us(bf16) if bf16 else '—'} | {f'{bf16 / ours:.2f}×' if bf16 else '—'} | "
                   f"{'—' if err is None else f'{err:.2g}'} | {fi_cell} | {f'{fi_us / ours:.2f}×' if fi_us else '—'} |")
    return out


def features_table(results):
    """Rows of the serving-features section: each feature workload's contenders (best time, share
    of the floor; why not, for those not timed), the fastest anchor and its time over PackInfer's,
    and PackInfer's time on the plain workload."""
    out = ["| workload | feature | PackInfer | same workload without it | anchors | fastest anchor | "
           "fastest anchor / PackInfer |", "|---|---|---|---|---|---|---|"]
    for w, e in results.get("features", {}).items():
        if e.get("error"):
            out.append(f"| {w} | — | {e['error'][:100]} | — | — | — | — |")
            continue
        feature = []
        if e.get("window_left") is not None:
            feature.append(f"window_left {e['window_left']}")
        if e.get("logits_soft_cap"):
            feature.append(f"soft-cap {e['logits_soft_cap']:g}")
        c = e["contenders"]
        ours = c.get("PackInfer", {})
        plain = results.get("workloads", {}).get(e.get("plain"), {}).get("contenders", {}).get("PackInfer", {})
        cells = []
        for name, r in c.items():
            if name == "PackInfer":
                continue
            t, _ = best_us(r)
            if t is None:
                cells.append(f"{name}: {r.get('status', '?')}" + (f" ({r['note'][:80]})" if r.get("note") else ""))
            else:
                cells.append(f"{name} {fmt_us(t)}")
        fastest, fastest_name = fastest_anchor(e)
        ours_t, _ = best_us(ours)
        ours_cell = cell(ours, e)
        plain_t, _ = best_us(plain)
        out.append(f"| {w} | {', '.join(feature) or '—'} | {ours_cell} | {fmt_us(plain_t) if plain_t else '—'} | "
                   f"{'; '.join(cells) or '—'} | {fastest_name or '—'} | "
                   f"{f'{fastest / ours_t:.2f}×' if fastest and ours_t else '—'} |")
    return out


def could_not_run(results):
    """'- name (workloads): status: exact error' lines for every anchor that was not timed, and
    the anchors that were never staged or imported."""
    groups = {}
    for w, e in results["workloads"].items():
        for n, r in e.get("contenders", {}).items():
            if not is_anchor(n) or not r or r.get("status") == "ok":
                continue
            key = (n, r.get("status"), (r.get("note") or "").strip())
            groups.setdefault(key, []).append(w)
    out = [f"- **{n}** ({', '.join(ws)}): {status}: `{note}`" for (n, status, note), ws in groups.items()]
    for k, v in (results.get("not_run") or {}).items():
        out.append(f"- **{k}**: `{v}`")
    for k, v in (results.get("meta", {}).get("not_staged") or {}).items():
        out.append(f"- **{k}** (not staged): {v}")
    return out


README_BEGIN = "<!-- results-table:begin (bench/report.py --readme) -->"
README_END = "<!-- results-table:end -->"


def readme_block(results):
    m = results["meta"]
    lines = [README_BEGIN, "",
             f"{m.get('device')}, {m.get('date', '')[:10]}, commit `{m.get('git_commit')}`; PyTorch {m.get('torch')} "
             f"(FA2), FA3 {m.get('fa3', '—')}, FlashInfer {m.get('flashinfer', '—')}.", ""]
    lines += summary_table(results)
    failed = could_not_run(results)
    if failed:
        lines += ["", "Anchors that could not run, with their exact errors:", ""] + failed
    lines += ["", README_END]
    return "\n".join(lines)


def update_readme(readme_path, results):
    """Replaces the block between README_BEGIN and README_END in `readme_path` with this run's
    table. Returns True when the file changed."""
    with open(readme_path, encoding="utf-8") as f:
        text = f.read()
    a, b = text.find(README_BEGIN), text.find(README_END)
    if a < 0 or b < a:
        raise ValueError(f"{readme_path} has no {README_BEGIN} ... {README_END} block")
    new = text[:a] + readme_block(results) + text[b + len(README_END):]
    if new != text:
        with open(readme_path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text


def markdown(results):
    m = results["meta"]
    out = [f"# PackInfer benchmark — {m.get('device')}, {m.get('date')}", ""]
    out.append(f"Commit `{m.get('git_commit')}`; PackInfer {m.get('packinfer_version')} (C ABI {m.get('abi_version')}); "
               + ", ".join(f"{k} {m[k]}" for k in ("driver", "cuda", "torch", "flashinfer", "numpy") if m.get(k))
               + f". Model shape {m['shape']['num_qo_heads']} query / {m['shape']['num_kv_heads']} KV heads, "
               f"head_dim {m['shape']['head_dim']}, {m['shape']['dtype']}; trace `{m.get('trace')}`, seed {m.get('seed')}"
               + (f", every token count / {m['scale']}" if m.get("scale", 1) != 1 else "") + ".")
    extra = [f"{k.replace('packinfer_', '').replace('_s', '')} {v:.2f} s" if isinstance(v, (int, float)) else f"{k}: {v}"
             for k, v in m.items() if k in ("packinfer_precompile_s", "packinfer_calibrate_s") and v is not None]
    if extra:
        out.append("")
        out.append("PackInfer set-up on the device, before any timing: " + ", ".join(extra) + ".")
    if m.get("timing"):
        out.append("")
        out.append(f"Timing: {m['timing']}")
    c = results.get("ceilings", {})
    if c.get("copy_gbps"):
        out += ["", f"**Ceilings, same run:** copy {c['copy_gbps']:.0f} GB/s (read + write), "
                + (f"matrix product {c['matmul_tflops']:.1f} TFLOP/s" if c['matmul_tflops'] >= 1 else f"matrix product {c['matmul_tflops'] * 1e3:.1f} GFLOP/s") + (f" ({c['how']})" if c.get("how") else "") + "."]
    names = contender_names(results)
    ours, anchors = ours_and_anchors(names, results)
    cpu = m.get("mode") == "cpu"
    if not cpu:
        out += ["", "## Summary", ""] + summary_table(results)
        out += ["", "## Anchors: versions and APIs", ""] + anchor_list(results)
    if cpu:
        out += ["", "## Tokens per second (CPU backend)", "",
                "Wall time of one `packinfer_run` (median of the runs; min and p90 beside it: the machine is shared, "
                "so the spread is wide).", "",
                "| workload | query tokens/s | KV tokens/s | median | min | p90 |", "|---|---|---|---|---|---|"]
        for w, e in results["workloads"].items():
            for n, r in e.get("contenders", {}).items():
                if r and r.get("status") == "ok" and "tokens_per_s" in r:
                    t = r["time_us"]
                    out.append(f"| {w} | {r['tokens_per_s']:.4g} | {r['kv_tokens_per_s']:.4g} | {fmt_us(t['median'])} | "
                               f"{fmt_us(t['min'])} | {fmt_us(t['p90'])} |")
    out += ["", "## Time per workload", "",
            ("Median wall time" if cpu else "Median time, the faster of CUDA-graph replay and eager (the other in brackets)")
            + " and the fraction of the physical floor = max(FLOPs / matrix rate, minimum bytes / copy rate).", ""]
    out.append("| workload | FLOPs | min bytes | floor | " + " | ".join(names) + " |")
    out.append("|---|---|---|---|" + "---|" * len(names))
    for w, e in results["workloads"].items():
        d = e.get("describe", {})
        row = [f"**{w}** {d.get('title', '')}", f"{e['flops'] / 1e9:.1f} G", f"{e['min_bytes'] / 1e6:.1f} MB",
               f"{fmt_us(e.get('floor_us'))} ({e.get('bound', '?')})"]
        row += [cell(e.get("contenders", {}).get(n), e) for n in names]
        out.append("| " + " | ".join(row) + " |")
    if ours and anchors:
        out += ["", "## PackInfer against the anchors", "", "Anchor time / PackInfer time (above 1: PackInfer faster).", ""]
        out.append("| workload | " + " | ".join(f"{o} vs {a}" for o in ours for a in anchors) + " |")
        out.append("|---|" + "---|" * (len(ours) * len(anchors)))
        for w, e in results["workloads"].items():
            cs = e.get("contenders", {})
            row = [w]
            for o in ours:
                to, _ = best_us(cs.get(o))
                for a in anchors:
                    ta, _ = best_us(cs.get(a))
                    row.append(f"{ta / to:.2f}×" if to and ta else "—")
            out.append("| " + " | ".join(row) + " |")
    out += ["", "## Rates", "", "| workload | contender | TFLOP/s | GB/s (min bytes) | host µs/call |", "|---|---|---|---|---|"]
    for w, e in results["workloads"].items():
        for n, r in e.get("contenders", {}).items():
            t, _ = best_us(r)
            if t is None:
                continue
            tfl = e["flops"] / (t * 1e-6) / 1e12
            gbs = e["min_bytes"] / (t * 1e-6) / 1e9
            host = r.get("host_us", {}).get("median") if isinstance(r.get("host_us"), dict) else None
            extra = ""
            if "tokens_per_s" in r:
                extra = f" ({r['tokens_per_s']:.0f} query tokens/s, {r['kv_tokens_per_s']:.0f} KV tokens/s)"
            out.append(f"| {w} | {n} | {tfl:.4g} | {gbs:.4g}{extra} | {'—' if host is None else f'{host:.1f}'} |")
    out += ["", "## Correctness before timing", "",
            "‖out − ref‖ / ‖ref‖ against a float64 reference on a subset of requests, and against the other "
            "contenders on the whole output; a contender over the tolerance is reported, not timed.", "",
            "| workload | contender | status | vs float64 | vs others |", "|---|---|---|---|---|"]
    for w, e in results["workloads"].items():
        for n, r in e.get("contenders", {}).items():
            ch = r.get("check", {}) if r else {}
            fp = ch.get("rel_err_fp64")
            vs = ", ".join(f"{k} {v:.2g}" for k, v in ch.get("rel_err_vs", {}).items())
            out.append(f"| {w} | {n} | {r.get('status') if r else 'not run'} | "
                       f"{'—' if fp is None else f'{fp:.2g}'} | {vs or '—'} |")
    inv = invariance_table(results)
    if inv:
        out += ["", "## Batch-invariant settings against PackInfer's deterministic mode", "",
                "FlashInfer with `disable_split_kv=True` (its batch-invariance control) against PackInfer planned with "
                "the deterministic flag (ablation 'deterministic'); ratio above 1: PackInfer faster.", ""] + inv
    if results.get("ablations"):
        cols = []
        for rows in results["ablations"].values():
            for k in rows:
                if k not in cols:
                    cols.append(k)
        out += ["", "## Ablations (PackInfer)", "", "Median time; in brackets the ratio to the default plan.", ""]
        out.append("| workload | " + " | ".join(cols) + " |")
        out.append("|---|" + "---|" * len(cols))
        for w, rows in results["ablations"].items():
            base = (rows.get("default") or {}).get("time_us")
            row = [w]
            for k in cols:
                r = rows.get(k)
                if not r:
                    row.append("—")
                elif r.get("time_us"):
                    ratio = f" ({r['time_us'] / base:.2f}×)" if base else ""
                    row.append(f"{fmt_us(r['time_us'])}{ratio}")
                else:
                    row.append(r.get("status", "?") + (f": {r['note'][:60]}" if r.get("note") else ""))
            out.append("| " + " | ".join(row) + " |")
    if results.get("managed"):
        out += ["", "## Managed level (W4 through forked sequences)", "",
                "The library owns the KV cache: one sequence holds the prefix, 64 forks share its pages, each "
                "fork's own tokens appended a page at a time round-robin (pages interleaved); then "
                "`packinfer_pool_relayout` makes each group contiguous (prefix once, members after it).", ""]
        out.append("| workload | pool state | status | time | vs float64 | pages moved | tokens stored / logical |")
        out.append("|---|---|---|---|---|---|---|")
        for w, rows in results["managed"].items():
            for k, r in rows.items():
                ps = r.get("pool_stats") or {}
                moved = (r.get("relayout") or {}).get("pages_moved", "—")
                err = r.get("rel_err_fp64")
                stored = f"{ps['tokens_stored']} / {ps['tokens_logical']}" if ps else "—"
                out.append(f"| {w} | {k} | {r.get('status')}{(': ' + r['note'][:80]) if r.get('note') else ''} | "
                           f"{fmt_us(r.get('time_us'))} | {'—' if err is None else f'{err:.2g}'} | {moved} | {stored} |")
    if results.get("fp8"):
        out += ["", "## fp8 e4m3 K/V cache", "",
                "The same K/V values quantized to fp8 e4m3 (the scales column), PackInfer's run over the fp8 "
                "cache against its bf16 run in the same call, and FlashInfer's fp8 decode on the same codes "
                "and scales. Eager medians; error against float64 attention over the dequantized cache.", ""] + fp8_table(results)
    if results.get("features"):
        out += ["", "## Serving features: sliding window and soft-cap", "",
                "W1 under a 4096-token sliding window and W2 with a Gemma-2-like logit soft-cap of 50 "
                "(docs/workloads.md), every contender checked against float64 attention with the same "
                "window or cap; best of CUDA-graph replay and eager. FlashInfer's window and soft-cap kernels are "
                "JIT modules of their own: its contenders ran where the warm-up built them.", ""] + features_table(results)
    if results.get("capacity_sweep"):
        out += ["", "## Capacity sweep (PackInfer)", "",
                "Time against the group capacity C, as multiples of the planner's own choice.", ""]
        out.append("| workload | C / chosen | C | groups | time |")
        out.append("|---|---|---|---|---|")
        for w, s in results["capacity_sweep"].items():
            if "error" in s:
                out.append(f"| {w} | — | — | — | {s['error']} |")
                continue
            for p in s.get("points", []):
                out.append(f"| {w} | {p['factor']:g} | {p['capacity']:.4g} | {p.get('groups', '—')} | "
                           f"{fmt_us(p.get('time_us')) if p.get('time_us') else p.get('error', '—')} |")
    if results.get("planning"):
        out += ["", "## Planning overhead (host)", "",
                "Median wall time of one call; PackInfer's plan_create (and the planner's own clock), launch_create, "
                "FlashInfer's `plan()` per API and FA3's scheduler metadata (Python, with their copies). The "
                "steady-state host path of an engine's step: plan_update into the last step's plan (*replan*), "
                "launch_update of a capacity launch while the GPU is busy (*update*), and their sum.", ""]
        keys = []
        for p in results["planning"].values():
            for k in p:
                if k.endswith("plan_us") and not k.startswith("packinfer") and k not in keys:
                    keys.append(k)
        out.append("| batch | requests | PackInfer plan | planner only | PackInfer launch | replan | update | replan + update | "
                   + " | ".join(k[:-len(" plan_us")] if k.endswith(" plan_us") else k for k in keys) + " |")
        out.append("|---|---|---|---|---|---|---|---|" + "---|" * len(keys))
        for w, p in results["planning"].items():
            def g(key):
                v = p.get(key)
                return fmt_us(v["median"]) if isinstance(v, dict) else (v[:80] if isinstance(v, str) else "—")
            out.append(f"| {w} | {p.get('requests', '—')} | {g('packinfer_plan_us')} | {g('packinfer_planner_us')} | "
                       f"{g('packinfer_launch_us')} | {g('packinfer_replan_us')} | {g('packinfer_update_us')} | "
                       f"{g('packinfer_replan_plus_update_us')} | " + " | ".join(g(k) for k in keys) + " |")
        notes = sorted({p["note"] for p in results["planning"].values() if p.get("note")})
        for n in notes:
            out.append(f"\n_{n}_")
    extra = results.get("not_measured")
    if extra:
        out += ["", "## Not measured in this run", ""] + [f"- **{k}**: {v}" for k, v in extra.items()]
    failed = could_not_run(results)
    if failed:
        out += ["", "## Anchors that could not run", "", "Each with its exact error (the harness records it "
                "instead of dropping the contender).", ""] + failed
    if results.get("errors"):
        out += ["", "## Errors", ""] + [f"- {e}" for e in results["errors"]]
    return "\n".join(out) + "\n"


def charts(results, out_dir):
    """time_per_workload.png and capacity_sweep.png; returns the files written (none without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return []
    written = []
    ours, anchors = ours_and_anchors(contender_names(results), results)
    names = anchors + ours
    wls = list(results["workloads"])
    if wls and names:
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(wls) + 2), 4.5))
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            xs, ys = [], []
            for j, w in enumerate(wls):
                t, _ = best_us(results["workloads"][w].get("contenders", {}).get(n))
                if t:
                    xs.append(j + i * width - 0.4 + width / 2)
                    ys.append(t)
            ax.bar(xs, ys, width, label=n)
        for j, w in enumerate(wls):
            f = results["workloads"][w].get("floor_us")
            if f:
                ax.hlines(f, j - 0.45, j + 0.45, colors="k", linestyles="dashed", label="physical floor" if j == 0 else None)
        ax.set_xticks(range(len(wls)))
        ax.set_xticklabels(wls)
        ax.set_yscale("log")
        ax.set_ylabel("time per step (µs, log)")
        ax.set_title(f"{results['meta'].get('device')} — {results['meta'].get('date', '')[:10]}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = os.path.join(out_dir, "time_per_workload.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    sweeps = {w: s for w, s in results.get("capacity_sweep", {}).items() if s.get("points")}
    if sweeps:
        fig, ax = plt.subplots(figsize=(6, 4))
        for w, s in sweeps.items():
            pts = [p for p in s["points"] if p.get("time_us")]
            if pts:
                ax.plot([p["factor"] for p in pts], [p["time_us"] for p in pts], marker="o", label=w)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("capacity C / the planner's choice")
        ax.set_ylabel("time (µs)")
        ax.set_title("PackInfer: time against group capacity")
        ax.legend()
        fig.tight_layout()
        p = os.path.join(out_dir, "capacity_sweep.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written


def write_all(results, out_dir):
    for e in results["workloads"].values():
        for r in e.get("contenders", {}).values():
            if r:
                derive(r, e)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(results))
    return charts(results, out_dir)


def main(argv):
    import argparse
    ap = argparse.ArgumentParser(description="results.json -> results.md, PNG charts, and the README's table")
    ap.add_argument("results_json")
    ap.add_argument("--readme", help="README.md whose results-table block is regenerated from this run")
    args = ap.parse_args(argv)
    with open(args.results_json) as f:
        res = json.load(f)
    out_dir = os.path.dirname(os.path.abspath(args.results_json))
    files = write_all(res, out_dir)
    with open(args.results_json, "w") as f:  # the derived fields (best_us, rates, fraction_of_floor) follow this report
        json.dump(res, f, indent=1)
    if args.readme:
        print(f"{args.readme}: {'updated' if update_readme(args.readme, res) else 'unchanged'}")
    print(open(os.path.join(out_dir, "results.md")).read())
    print("charts:", files)


if __name__ == "__main__":
    main(sys.argv[1:])
