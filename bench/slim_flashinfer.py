"""Slims an unpacked FlashInfer package to what attention needs, and checks the result.

    python3 bench/slim_flashinfer.py SITE_DIR      (SITE_DIR holds flashinfer/ and its dist-info)

FlashInfer >= 0.6 ships ~450 MB unpacked (MoE, GEMM, communication and experimental kernel
sources in flashinfer/data/csrc); the GPU machine takes 64 MiB per call. Every Python file stays
(`import flashinfer` imports nearly every module), and so do the header trees the JIT puts on its
include path (data/include, cutlass/include, cutlass/tools/util/include, spdlog/include, cccl's
cub/libcudacxx/thrust). From data/csrc it keeps the top-level files up to KEEP_MAX_BYTES (the
attention, decode, POD, cascade, page sources and the jinja templates are all small) and the
subfolders in KEEP_CSRC_DIRS (xqa for XQA decode, fmha_v2 for the TRT-LLM FMHA that sm90's
"auto" may pick); everything else is deleted.

The check: every source file that the attention JIT generators (jit/attention/*.py, jit/xqa.py,
jit/cascade.py, jit/page.py) name and that our benchmark's paths compile must still exist, and
each kept .cu/.cuh/.h under csrc must find its quoted #includes in the kept trees. Exit status 1
(and the missing names) otherwise.
"""

import ast
import os
import re
import shutil
import sys

KEEP_MAX_BYTES = 300_000
KEEP_CSRC_DIRS = {"xqa", "nv_internal", "generated", "fmha_v2"}
KEEP_DATA = ["include", "spdlog/include", "cutlass/include", "cutlass/tools/util/include", "cccl/cub/cub",
             "cccl/libcudacxx/include", "cccl/thrust/thrust", "build_utils.py", "build_backend.py"]
# Sources the benchmark's wrappers compile (by name prefix in data/csrc): ragged/paged prefill
# (fa2 and fa3 = "*_sm90"), decode, BatchAttention, POD / BatchPOD, cascade, page, XQA.
REQUIRED_PREFIXES = ["batch_prefill", "batch_decode", "batch_attention", "pod", "batch_pod", "cascade", "page",
                     "flashinfer_xqa_binding", "xqa/mha.cu", "xqa/mha_sm90.cu", "xqa/tensorMap.cpp",
                     "xqa/xqa_wrapper.cu"]
# Python subpackages never pruned even when `import flashinfer` does not reach them (the wrappers'
# lazy imports point there).
PROTECTED_PACKAGES = {"attention", "jit", "cute_dsl", "mla", "quantization", "triton", "prims_ts", "data"}
PRUNE_MIN_BYTES = 1 << 20
GENERATORS = ["jit/attention/modules.py", "jit/xqa.py", "jit/cascade.py", "jit/page.py"]


def du(path):
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def reached_modules(site, pkg="flashinfer"):
    """Modules that `import flashinfer` imports (module-level imports followed from __init__.py,
    whether guarded by try or not)."""
    seen = set()

    def modpath(mod):
        p = os.path.join(site, *mod.split("."))
        if os.path.exists(os.path.join(p, "__init__.py")):
            return os.path.join(p, "__init__.py")
        return p + ".py" if os.path.exists(p + ".py") else None

    def walk(mod):
        if mod in seen:
            return
        seen.add(mod)
        f = modpath(mod)
        if f is None:
            return
        is_pkg = f.endswith("__init__.py")
        tree = ast.parse(open(f, encoding="utf-8").read(), f)

        def visit(nodes):
            for n in nodes:
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                if isinstance(n, ast.ClassDef):
                    visit(n.body)
                elif isinstance(n, ast.Try):
                    visit(n.body)
                    visit(n.orelse)
                    visit(n.finalbody)
                    for h in n.handlers:
                        visit(h.body)
                elif isinstance(n, (ast.If, ast.With)):
                    visit(n.body)
                    visit(getattr(n, "orelse", []))
                elif isinstance(n, ast.Import):
                    for a in n.names:
                        if a.name.split(".")[0] == pkg:
                            parts = a.name.split(".")
                            for i in range(1, len(parts) + 1):
                                walk(".".join(parts[:i]))
                elif isinstance(n, ast.ImportFrom):
                    if n.level:
                        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                        base = base[: len(base) - (n.level - 1)]
                        m = ".".join(base + ([n.module] if n.module else []))
                    elif n.module and n.module.split(".")[0] == pkg:
                        m = n.module
                    else:
                        continue
                    parts = m.split(".")
                    for i in range(1, len(parts) + 1):
                        walk(".".join(parts[:i]))
                    for a in n.names:
                        if modpath(m + "." + a.name):
                            walk(m + "." + a.name)
        visit(tree.body)
    walk(pkg)
    return seen


def prune_unreached(site):
    """Deletes subpackages (>= PRUNE_MIN_BYTES, not PROTECTED_PACKAGES) that `import flashinfer`
    does not reach: MoE, communication and experimental kernels' Python and sources."""
    reach = reached_modules(site)
    root = os.path.join(site, "flashinfer")
    dropped = []

    def visit(d, dotted, depth):
        for name in sorted(os.listdir(d)):
            p = os.path.join(d, name)
            if not os.path.isdir(p) or name == "__pycache__":
                continue
            if depth == 0 and name in PROTECTED_PACKAGES:
                continue
            mod = f"{dotted}.{name}"
            hit = any(m == mod or m.startswith(mod + ".") for m in reach)
            if not hit and du(p) >= PRUNE_MIN_BYTES:
                dropped.append((mod, du(p)))
                shutil.rmtree(p)
            elif hit:
                visit(p, mod, depth + 1)
    visit(root, "flashinfer", 0)
    return dropped


def slim(site):
    pkg = os.path.join(site, "flashinfer")
    data = os.path.join(pkg, "data")
    before = du(pkg)
    # data/: keep only the trees on the JIT include path and the csrc kept below.
    keep_tmp = os.path.join(site, ".keep_data")
    shutil.rmtree(keep_tmp, ignore_errors=True)
    for rel in KEEP_DATA:
        src = os.path.join(data, rel)
        if os.path.exists(src):
            dst = os.path.join(keep_tmp, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.move(src, dst)
    csrc = os.path.join(data, "csrc")
    kept_csrc = os.path.join(keep_tmp, "csrc")
    os.makedirs(kept_csrc, exist_ok=True)
    dropped = []
    for name in sorted(os.listdir(csrc)):
        p = os.path.join(csrc, name)
        if os.path.isdir(p):
            if name in KEEP_CSRC_DIRS:
                shutil.move(p, os.path.join(kept_csrc, name))
            else:
                dropped.append((name + "/", du(p)))
        elif os.path.getsize(p) <= KEEP_MAX_BYTES or any(name.startswith(x) for x in REQUIRED_PREFIXES):
            shutil.move(p, os.path.join(kept_csrc, name))
        else:
            dropped.append((name, os.path.getsize(p)))
    shutil.rmtree(data)
    shutil.move(keep_tmp, data)
    # Byte-compiled caches and tests are never needed.
    for d, dirs, _ in os.walk(pkg):
        for x in list(dirs):
            if x == "__pycache__":
                shutil.rmtree(os.path.join(d, x))
                dirs.remove(x)
    pruned = prune_unreached(site)
    after = du(pkg)
    print("unreached Python subpackages dropped: " + ", ".join(f"{n} ({b / 2**20:.1f} MiB)" for n, b in pruned))
    print(f"flashinfer: {before / 2**20:.0f} MiB -> {after / 2**20:.0f} MiB unpacked; dropped from data/csrc: "
          + ", ".join(f"{n} ({s / 2**20:.1f} MiB)" for n, s in sorted(dropped, key=lambda x: -x[1])[:12])
          + (f" and {len(dropped) - 12} more" if len(dropped) > 12 else ""))
    return dropped


def check(site):
    pkg = os.path.join(site, "flashinfer")
    csrc = os.path.join(pkg, "data", "csrc")
    include_roots = [csrc, os.path.join(pkg, "data", "include"), os.path.join(pkg, "data", "cutlass", "include"),
                     os.path.join(pkg, "data", "cutlass", "tools", "util", "include"),
                     os.path.join(pkg, "data", "spdlog", "include"), os.path.join(pkg, "data", "cccl", "cub"),
                     os.path.join(pkg, "data", "cccl", "libcudacxx", "include"), os.path.join(pkg, "data", "cccl", "thrust")]
    problems = []
    # 1. The sources our paths compile exist.
    names = []
    for d, _, files in os.walk(csrc):
        names += [os.path.relpath(os.path.join(d, f), csrc) for f in files]
    for prefix in REQUIRED_PREFIXES:
        if not any(n.startswith(prefix) for n in names):
            problems.append(f"no data/csrc file starts with {prefix!r}")
    # 2. Names of csrc files in the attention generators: report the ones that are gone.
    referenced = set()
    for g in GENERATORS:
        p = os.path.join(pkg, g)
        if os.path.exists(p):
            referenced |= set(re.findall(r'"([\w./-]+\.(?:cu|cuh|cpp|h|jinja))"', open(p).read()))
    gone = sorted(r for r in referenced if not os.path.exists(os.path.join(csrc, r))
                  and not any(os.path.exists(os.path.join(root, r)) for root in include_roots))
    # 3. Quoted includes of kept attention sources resolve.
    unresolved = set()
    for n in names:
        if not n.endswith((".cu", ".cuh", ".h", ".jinja", ".cpp")):
            continue
        if not any(n.startswith(x) for x in REQUIRED_PREFIXES) and not n.startswith("xqa/"):
            continue
        src = os.path.join(csrc, n)
        for inc in re.findall(r'#include\s+"([^"]+)"', open(src, errors="replace").read()):
            here = os.path.join(os.path.dirname(src), inc)
            if os.path.exists(here) or any(os.path.exists(os.path.join(r, inc)) for r in include_roots):
                continue
            # Written by the JIT from the jinja config at build time; tvm-ffi's own headers.
            if inc.endswith("_config.inc") or inc.startswith(("tvm/", "dlpack/")):
                continue
            unresolved.add(f"{n}: {inc}")
    return problems, gone, sorted(unresolved)


def main():
    site = sys.argv[1]
    if len(sys.argv) < 3 or sys.argv[2] != "--check-only":
        slim(site)
    problems, gone, unresolved = check(site)
    if gone:
        print(f"referenced by the JIT generators but not kept ({len(gone)}; sm100/trtllm/MLA paths the benchmark "
              f"does not use): " + ", ".join(gone))
    for u in unresolved:
        problems.append(f"unresolved #include in {u}")
    for p in problems:
        print("MISSING:", p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
