"""ctypes binding of PackInfer's C ABI (`include/packinfer.h`), for the benchmarks.

This is the one place in Python that knows the C structs: every `Structure` below mirrors the
header field for field (`test_packinfer_ctypes.py` compiles a C program against the header and
checks every size and offset). Pointers are plain integers (`tensor.data_ptr()`,
`ndarray.ctypes.data`), so the same code drives the CPU backend with numpy arrays and the CUDA
backend with torch tensors.

Functions that newer builds may add (the CUDA backend's precompile and launch update, the managed
KV pool's `packinfer_pool_*`) are looked up lazily: `Library.has(name)` says whether this build
exports them, so the harness can say "not in this build" instead of failing.
"""

import ctypes
import os
import time
from ctypes import (POINTER, Structure, c_bool, c_char, c_char_p, c_double, c_float, c_int, c_int32, c_int64,
                    c_size_t, c_uint8, c_uint32, c_uint64, c_void_p)

ABI_VERSION = 1

# PackinferStatus
STATUS_NAMES = {
    0: "OK", 1: "INVALID_ARGUMENT", 2: "INVALID_HANDLE", 3: "UNSUPPORTED", 4: "OUT_OF_MEMORY",
    5: "POOL_EXHAUSTED", 6: "NO_DEVICE", 7: "DEVICE_ERROR", 8: "COMPILE_ERROR", 9: "INTERNAL",
}
STATUS_OK = 0

# PackinferBackend
BACKEND_AUTO, BACKEND_CPU, BACKEND_CUDA = 0, 1, 2
# PackinferDtype
DTYPE_F16, DTYPE_BF16, DTYPE_F32, DTYPE_FP8_E4M3 = 0, 1, 2, 3  # fp8: K/V only (kv_dtype)
# PackinferPlanFlags
FLAG_DETERMINISTIC = 1
FLAG_NO_PACKING = 2
FLAG_NO_BALANCING = 4
FLAG_NO_PREFIX_SHARING = 8
FLAG_NO_SPLIT_KV = 16
FLAG_SLIDING_WINDOW = 32


class PackinferContextOptions(Structure):
    _fields_ = [("struct_size", c_size_t), ("backend", c_uint32), ("device_ordinal", c_uint32),
                ("num_threads", c_uint32), ("kernel_cache_dir", c_char_p)]


class PackinferContext(Structure):
    _fields_ = [("bits", c_uint64)]


class PackinferContextInfo(Structure):
    _fields_ = [("struct_size", c_size_t), ("backend", c_uint32), ("num_workers", c_uint32),
                ("device_name", c_char * 128)]


class PackinferPlanOptions(Structure):
    _fields_ = [("struct_size", c_size_t), ("flags", c_uint32), ("split_keys", c_uint32), ("capacity", c_double),
                ("window_left", c_uint32)]


class PackinferPrefixGroup(Structure):
    _fields_ = [("prefix_len", c_uint32), ("num_members", c_uint32), ("members", POINTER(c_int32))]


class PackinferBatchDesc(Structure):
    _fields_ = [("struct_size", c_size_t), ("batch_size", c_uint32),
                ("qo_indptr", POINTER(c_int32)), ("kv_indptr", POINTER(c_int32)),
                ("kv_page_indices", POINTER(c_int32)), ("kv_last_page_len", POINTER(c_int32)),
                ("page_size", c_uint32), ("num_pages", c_uint32), ("num_qo_heads", c_uint32),
                ("num_kv_heads", c_uint32), ("head_dim", c_uint32), ("dtype", c_uint32),
                ("causal", c_bool), ("sm_scale", c_float), ("num_prefix_groups", c_uint32),
                ("prefix_groups", POINTER(PackinferPrefixGroup)), ("custom_mask", POINTER(c_uint8)),
                ("mask_indptr", POINTER(c_int32)), ("kv_dtype", c_uint32)]


class PackinferPlan(Structure):
    _fields_ = [("bits", c_uint64)]


class PackinferPlanStats(Structure):
    _fields_ = [("struct_size", c_size_t), ("num_requests", c_uint32), ("num_groups", c_uint32),
                ("num_work_items", c_uint32), ("num_split_requests", c_uint32), ("num_merge_rows", c_uint32),
                ("num_partial_slots", c_uint32), ("tile_utilization", c_double), ("max_group_cost", c_double),
                ("mean_group_cost", c_double), ("capacity", c_double), ("planning_time_us", c_double),
                ("scratch_bytes", c_uint64), ("max_worker_cost", c_double), ("mean_worker_cost", c_double),
                ("num_partial_items", c_uint32)]


class PackinferLaunchOptions(Structure):
    _fields_ = [("struct_size", c_size_t), ("scratch", c_void_p), ("scratch_bytes", c_size_t)]


class PackinferLaunch(Structure):
    _fields_ = [("bits", c_uint64)]


class PackinferKvLayout(Structure):
    _fields_ = [("k", c_void_p), ("v", c_void_p), ("stride_page", c_int64), ("stride_token", c_int64),
                ("stride_head", c_int64), ("stride_dim", c_int64)]


class PackinferRunArgs(Structure):
    _fields_ = [("struct_size", c_size_t), ("q", c_void_p), ("q_stride_token", c_int64),
                ("q_stride_head", c_int64), ("kv", PackinferKvLayout), ("o", c_void_p),
                ("o_stride_token", c_int64), ("o_stride_head", c_int64), ("lse", POINTER(c_float)),
                ("stream", c_void_p), ("logits_soft_cap", c_float), ("k_head_scales", POINTER(c_float)),
                ("v_head_scales", POINTER(c_float)), ("k_scale", c_float), ("v_scale", c_float)]


class PackinferLaunchCapacity(Structure):
    _fields_ = [("struct_size", c_size_t), ("max_work_items", c_uint32), ("max_row_segments", c_uint32),
                ("max_kv_chunks", c_uint32), ("max_requests", c_uint32), ("max_pages", c_uint32),
                ("max_merge_rows", c_uint32), ("max_merge_slots", c_uint32), ("max_groups", c_uint32),
                ("max_partial_slots", c_uint32), ("max_custom_mask_bytes", c_uint32),
                ("max_masked_query_tokens", c_uint32)]


class PackinferPoolOptions(Structure):
    _fields_ = [("struct_size", c_size_t), ("num_layers", c_uint32), ("num_qo_heads", c_uint32),
                ("num_kv_heads", c_uint32), ("head_dim", c_uint32), ("dtype", c_uint32), ("causal", c_bool),
                ("sm_scale", c_float), ("page_size", c_uint32), ("num_pages", c_uint32), ("capacity_bytes", c_uint64),
                ("headroom_pages", c_uint32), ("kv_head_scales", POINTER(c_float)), ("kv_dtype", c_uint32)]


class PackinferPool(Structure):
    _fields_ = [("bits", c_uint64)]


class PackinferScheduler(Structure):
    _fields_ = [("bits", c_uint64)]


class PackinferKvSource(Structure):
    _fields_ = [("struct_size", c_size_t), ("k", c_void_p), ("v", c_void_p), ("num_rows", c_uint32),
                ("num_kv_heads", c_uint32), ("head_dim", c_uint32), ("dtype", c_uint32), ("stride_token", c_int64)]


class PackinferRelayoutReport(Structure):
    _fields_ = [("struct_size", c_size_t), ("groups", c_uint32), ("groups_in_place", c_uint32),
                ("groups_rebuilt", c_uint32), ("groups_no_room", c_uint32), ("pages_moved", c_uint64),
                ("bytes_moved", c_uint64)]


class PackinferPoolStats(Structure):
    _fields_ = [("struct_size", c_size_t), ("num_pages", c_uint32), ("pages_used", c_uint32), ("pages_free", c_uint32),
                ("num_sequences", c_uint32), ("tokens_logical", c_uint64), ("tokens_stored", c_uint64),
                ("slots_reserved_unused", c_uint64), ("step_read_bytes_shared", c_uint64),
                ("step_read_bytes_unshared", c_uint64), ("relayouts", c_uint64), ("relayout_pages_moved", c_uint64),
                ("relayout_bytes_moved", c_uint64), ("cow_page_copies", c_uint64)]


# Structs that only the optional exports below use: a build without those exports may lack them.
OPTIONAL_STRUCTS = [PackinferLaunchCapacity, PackinferPoolOptions, PackinferPool, PackinferKvSource,
                    PackinferRelayoutReport, PackinferPoolStats]

# Every struct of the header, for the layout test.
STRUCTS = [PackinferContextOptions, PackinferContext, PackinferContextInfo, PackinferPlanOptions,
           PackinferPrefixGroup, PackinferBatchDesc, PackinferPlan, PackinferPlanStats, PackinferLaunchOptions,
           PackinferLaunch, PackinferKvLayout, PackinferRunArgs, PackinferLaunchCapacity, PackinferPoolOptions,
           PackinferPool, PackinferKvSource, PackinferRelayoutReport, PackinferPoolStats]

# name: (restype, argtypes) of every export in the header.
_SIGNATURES = {
    "packinfer_abi_version": (c_uint32, []),
    "packinfer_version": (c_char_p, []),
    "packinfer_status_string": (c_char_p, [c_uint32]),
    "packinfer_last_error": (c_char_p, []),
    "packinfer_context_options_default": (c_int, [POINTER(PackinferContextOptions)]),
    "packinfer_context_create": (c_int, [POINTER(PackinferContextOptions), POINTER(PackinferContext)]),
    "packinfer_context_destroy": (c_int, [PackinferContext]),
    "packinfer_context_info": (c_int, [PackinferContext, POINTER(PackinferContextInfo)]),
    "packinfer_plan_options_default": (c_int, [POINTER(PackinferPlanOptions)]),
    "packinfer_batch_desc_default": (c_int, [POINTER(PackinferBatchDesc)]),
    "packinfer_launch_options_default": (c_int, [POINTER(PackinferLaunchOptions)]),
    "packinfer_launch_capacity_default": (c_int, [POINTER(PackinferLaunchCapacity)]),
    "packinfer_run_args_default": (c_int, [POINTER(PackinferRunArgs)]),
    "packinfer_kv_source_default": (c_int, [POINTER(PackinferKvSource)]),
    "packinfer_plan_create": (c_int, [PackinferContext, POINTER(PackinferBatchDesc), POINTER(PackinferPlanOptions),
                                      POINTER(PackinferPlan)]),
    "packinfer_plan_destroy": (c_int, [PackinferPlan]),
    "packinfer_plan_stats": (c_int, [PackinferPlan, POINTER(PackinferPlanStats)]),
    "packinfer_launch_create": (c_int, [PackinferContext, PackinferPlan, POINTER(PackinferLaunchOptions), c_void_p,
                                        POINTER(PackinferLaunch)]),
    "packinfer_launch_query": (c_int, [PackinferLaunch, POINTER(c_bool)]),
    "packinfer_launch_wait": (c_int, [PackinferLaunch]),
    "packinfer_launch_destroy": (c_int, [PackinferLaunch]),
    "packinfer_run": (c_int, [PackinferLaunch, POINTER(PackinferRunArgs)]),
    "packinfer_kv_layout_nhd": (c_int, [c_void_p, c_void_p, c_uint32, c_uint32, c_uint32, POINTER(PackinferKvLayout)]),
    "packinfer_kv_layout_hnd": (c_int, [c_void_p, c_void_p, c_uint32, c_uint32, c_uint32, POINTER(PackinferKvLayout)]),
}

_U64P, _U32P = POINTER(c_uint64), POINTER(c_uint32)
# The CUDA backend's precompile and capacity launches, and the managed KV pool. Typed when the
# library exports them (`Library.has` says), so a build without one still loads.
OPTIONAL_SIGNATURES = {
    "packinfer_context_precompile": (c_int, [PackinferContext]),
    "packinfer_context_calibrate": (c_int, [PackinferContext]),
    "packinfer_launch_create_with_capacity": (c_int, [PackinferContext, PackinferPlan, POINTER(PackinferLaunchOptions),
                                                      POINTER(PackinferLaunchCapacity), c_void_p,
                                                      POINTER(PackinferLaunch)]),
    "packinfer_launch_update": (c_int, [PackinferLaunch, PackinferPlan, c_void_p]),
    "packinfer_launch_suits": (c_int, [PackinferLaunch, PackinferPlan, POINTER(c_bool)]),
    "packinfer_plan_update": (c_int, [PackinferContext, PackinferPlan, POINTER(PackinferBatchDesc),
                                      POINTER(PackinferPlanOptions)]),
    "packinfer_pool_options_default": (c_int, [POINTER(PackinferPoolOptions)]),
    "packinfer_pool_create": (c_int, [PackinferContext, POINTER(PackinferPoolOptions), POINTER(PackinferPool)]),
    "packinfer_pool_destroy": (c_int, [PackinferPool]),
    "packinfer_pool_kv_layout": (c_int, [PackinferPool, c_uint32, POINTER(PackinferKvLayout)]),
    "packinfer_pool_kv_scales": (c_int, [PackinferPool, c_uint32, POINTER(POINTER(c_float)), POINTER(POINTER(c_float))]),
    "packinfer_pool_sequence_create": (c_int, [PackinferPool, _U64P]),
    "packinfer_pool_sequence_length": (c_int, [PackinferPool, c_uint64, _U32P]),
    "packinfer_pool_append": (c_int, [PackinferPool, c_uint64, c_uint32, POINTER(c_int64), c_void_p]),
    "packinfer_pool_fork": (c_int, [PackinferPool, c_uint64, c_uint32, c_void_p, _U64P]),
    "packinfer_pool_truncate": (c_int, [PackinferPool, c_uint64, c_uint32]),
    "packinfer_pool_release": (c_int, [PackinferPool, c_uint64]),
    "packinfer_pool_write_kv": (c_int, [PackinferPool, c_uint32, _U64P, _U32P, c_uint32, POINTER(PackinferKvSource),
                                        c_void_p]),
    "packinfer_pool_register_page_hashes": (c_int, [PackinferPool, c_uint64, _U64P, c_uint32]),
    "packinfer_pool_match_prefix": (c_int, [PackinferPool, c_uint64, _U64P, c_uint32, _U32P]),
    "packinfer_pool_plan_create": (c_int, [PackinferContext, PackinferPool, _U64P, _U32P, c_uint32,
                                           POINTER(PackinferPlanOptions), POINTER(PackinferPlan)]),
    "packinfer_pool_plan_update": (c_int, [PackinferContext, PackinferPool, PackinferPlan, _U64P, _U32P, c_uint32,
                                           POINTER(PackinferPlanOptions)]),
    "packinfer_pool_relayout": (c_int, [PackinferPool, PackinferPlan, _U64P, c_uint32, c_bool, c_void_p,
                                        POINTER(PackinferRelayoutReport)]),
    "packinfer_pool_stats": (c_int, [PackinferPool, POINTER(PackinferPoolStats)]),
    # The adaptive scheduler (the benchmark does not drive it: its options, step and stats
    # structs are passed as opaque pointers).
    "packinfer_scheduler_options_default": (c_int, [c_void_p]),
    "packinfer_scheduler_create": (c_int, [PackinferPool, c_void_p, POINTER(PackinferScheduler)]),
    "packinfer_scheduler_destroy": (c_int, [PackinferScheduler]),
    "packinfer_scheduler_plan": (c_int, [PackinferScheduler, PackinferContext, _U64P, _U32P, c_uint32,
                                         POINTER(PackinferPlanOptions), c_void_p, POINTER(PackinferPlan), c_void_p]),
    "packinfer_scheduler_plan_update": (c_int, [PackinferScheduler, PackinferContext, PackinferPlan, _U64P, _U32P,
                                                c_uint32, POINTER(PackinferPlanOptions), c_void_p, c_void_p]),
    "packinfer_scheduler_record": (c_int, [PackinferScheduler, c_void_p]),
    "packinfer_scheduler_stats": (c_int, [PackinferScheduler, c_void_p]),
}
FUTURE_EXPORTS = list(OPTIONAL_SIGNATURES)


class PackinferError(RuntimeError):
    """A call returned a status other than OK; `status` is the name, the text is last_error."""

    def __init__(self, func, status, message):
        self.func, self.status, self.message = func, STATUS_NAMES.get(status, f"UNKNOWN({status})"), message
        super().__init__(f"{func} -> {self.status}: {message}")


def _i32_array(values):
    """A ctypes int32 array holding `values` (a list or numpy array); kept alive by the caller."""
    if hasattr(values, "dtype") and hasattr(values, "tobytes"):
        # numpy: one copy of the buffer (a replayed step's page tables hold ~10^5 entries).
        import numpy as np
        a = np.ascontiguousarray(values, dtype=np.int32)
        if len(a):
            return (c_int32 * len(a)).from_buffer_copy(a)
        values = []
    values = [int(v) for v in values]
    return (c_int32 * max(len(values), 1))(*values)


class Library:
    """The loaded `libpackinfer.so` with typed exports; raises PackinferError on a bad status."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.lib = ctypes.CDLL(self.path)
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        for name, (restype, argtypes) in OPTIONAL_SIGNATURES.items():
            if self.has(name):
                fn = getattr(self.lib, name)
                fn.restype, fn.argtypes = restype, argtypes
        abi = self.lib.packinfer_abi_version()
        if abi != ABI_VERSION:
            raise RuntimeError(f"{self.path} implements C ABI version {abi}; this binding was written for "
                               f"version {ABI_VERSION} (include/packinfer.h): update bench/packinfer_ctypes.py")
        self.abi_version = abi
        self.version = self.lib.packinfer_version().decode()

    def has(self, name):
        try:
            getattr(self.lib, name)
            return True
        except AttributeError:
            return False

    def optional_exports(self):
        return {name: self.has(name) for name in FUTURE_EXPORTS}

    def _check(self, func, status):
        if status != STATUS_OK:
            raise PackinferError(func, status, self.lib.packinfer_last_error().decode(errors="replace"))

    def context(self, backend=BACKEND_AUTO, device_ordinal=0, num_threads=0, kernel_cache_dir=None):
        opts = PackinferContextOptions()
        self._check("packinfer_context_options_default", self.lib.packinfer_context_options_default(ctypes.byref(opts)))
        opts.backend, opts.device_ordinal, opts.num_threads = backend, device_ordinal, num_threads
        if kernel_cache_dir is not None:
            opts.kernel_cache_dir = kernel_cache_dir.encode()
        handle = PackinferContext()
        self._check("packinfer_context_create", self.lib.packinfer_context_create(ctypes.byref(opts), ctypes.byref(handle)))
        return Context(self, handle)

    def kv_layout_nhd(self, k_ptr, v_ptr, page_size, num_kv_heads, head_dim):
        layout = PackinferKvLayout()
        self._check("packinfer_kv_layout_nhd",
                    self.lib.packinfer_kv_layout_nhd(k_ptr, v_ptr, page_size, num_kv_heads, head_dim, ctypes.byref(layout)))
        return layout


class Context:
    def __init__(self, library, handle):
        self.library, self.handle = library, handle
        info = PackinferContextInfo()
        info.struct_size = ctypes.sizeof(PackinferContextInfo)
        library._check("packinfer_context_info", library.lib.packinfer_context_info(handle, ctypes.byref(info)))
        self.backend = {BACKEND_CPU: "cpu", BACKEND_CUDA: "cuda"}.get(info.backend, str(info.backend))
        self.num_workers = info.num_workers
        self.device_name = info.device_name.decode(errors="replace")

    def precompile(self):
        """Compiles every kernel variant now (where the build has packinfer_context_precompile);
        returns the seconds it took, or None when the export is absent."""
        if not self.library.has("packinfer_context_precompile"):
            return None
        t0 = time.perf_counter()
        self.library._check("packinfer_context_precompile", self.library.lib.packinfer_context_precompile(self.handle))
        return time.perf_counter() - t0

    def calibrate(self):
        """Fits the planner's cost model on this device (packinfer_context_calibrate, once per
        device and install); returns the seconds it took, or None when the export is absent."""
        if not self.library.has("packinfer_context_calibrate"):
            return None
        t0 = time.perf_counter()
        self.library._check("packinfer_context_calibrate", self.library.lib.packinfer_context_calibrate(self.handle))
        return time.perf_counter() - t0

    def plan_options(self, flags=0, capacity=0.0, split_keys=0, window_left=None):
        opts = PackinferPlanOptions()
        lib = self.library
        lib._check("packinfer_plan_options_default", lib.lib.packinfer_plan_options_default(ctypes.byref(opts)))
        opts.flags, opts.capacity = flags, float(capacity)
        if split_keys:
            opts.split_keys = split_keys
        if window_left is not None:  # a sliding window, fixed at plan time
            opts.flags |= FLAG_SLIDING_WINDOW
            opts.window_left = window_left
        return opts

    def pool(self, num_layers, num_qo_heads, num_kv_heads, head_dim, dtype, causal, num_pages, page_size=16,
             headroom_pages=None, sm_scale=0.0, kv_dtype=0, kv_head_scales=None):
        """A managed KV pool on this context (packinfer_pool_*). kv_dtype=DTYPE_FP8_E4M3 stores
        K/V as fp8 with `kv_head_scales` ([layer][K, V][kv head] floats; None = all 1)."""
        lib = self.library
        opts = PackinferPoolOptions()
        lib._check("packinfer_pool_options_default", lib.lib.packinfer_pool_options_default(ctypes.byref(opts)))
        opts.num_layers, opts.num_qo_heads, opts.num_kv_heads, opts.head_dim = num_layers, num_qo_heads, num_kv_heads, head_dim
        opts.dtype, opts.causal, opts.sm_scale, opts.page_size, opts.num_pages = dtype, causal, sm_scale, page_size, num_pages
        if headroom_pages is not None:
            opts.headroom_pages = headroom_pages
        opts.kv_dtype = kv_dtype
        scales = None
        if kv_head_scales is not None:  # copied by the call
            scales = (c_float * len(kv_head_scales))(*[float(x) for x in kv_head_scales])
            opts.kv_head_scales = ctypes.cast(scales, POINTER(c_float))
        handle = PackinferPool()
        lib._check("packinfer_pool_create", lib.lib.packinfer_pool_create(self.handle, ctypes.byref(opts), ctypes.byref(handle)))
        return Pool(self, handle, num_kv_heads, head_dim, dtype)

    def plan(self, batch, flags=0, capacity=0.0, split_keys=0, window_left=None):
        """Plans `batch` (a BatchArrays); returns (Plan, host seconds spent in plan_create)."""
        lib = self.library
        opts = self.plan_options(flags, capacity, split_keys, window_left)
        handle = PackinferPlan()
        t0 = time.perf_counter()
        status = lib.lib.packinfer_plan_create(self.handle, ctypes.byref(batch.desc), ctypes.byref(opts), ctypes.byref(handle))
        seconds = time.perf_counter() - t0
        lib._check("packinfer_plan_create", status)
        return Plan(lib, handle), seconds

    def replan(self, plan, batch, flags=0, capacity=0.0, split_keys=0):
        """Plans `batch` into `plan` (packinfer_plan_update, reusing its memory); returns the
        host seconds the call took."""
        lib = self.library
        opts = self.plan_options(flags, capacity, split_keys)
        t0 = time.perf_counter()
        status = lib.lib.packinfer_plan_update(self.handle, plan.handle, ctypes.byref(batch.desc), ctypes.byref(opts))
        seconds = time.perf_counter() - t0
        lib._check("packinfer_plan_update", status)
        return seconds

    def launch_with_capacity(self, plan, stream=0, **counts):
        """A launch whose buffers hold `counts` (max_work_items=..., ...; 0 or absent: the plan's
        own), so that `Launch.update` can upload later plans into it."""
        lib = self.library
        cap = PackinferLaunchCapacity()
        lib._check("packinfer_launch_capacity_default", lib.lib.packinfer_launch_capacity_default(ctypes.byref(cap)))
        for name, value in counts.items():
            setattr(cap, name, int(value))
        handle = PackinferLaunch()
        lib._check("packinfer_launch_create_with_capacity",
                   lib.lib.packinfer_launch_create_with_capacity(self.handle, plan.handle, None, ctypes.byref(cap),
                                                                 stream or None, ctypes.byref(handle)))
        return Launch(lib, handle)

    def launch(self, plan, stream=0, scratch_ptr=0, scratch_bytes=0):
        lib = self.library
        handle = PackinferLaunch()
        if scratch_ptr or scratch_bytes:
            opts = PackinferLaunchOptions(ctypes.sizeof(PackinferLaunchOptions), scratch_ptr, scratch_bytes)
            opts_ptr = ctypes.byref(opts)
        else:
            opts_ptr = None
        lib._check("packinfer_launch_create",
                   lib.lib.packinfer_launch_create(self.handle, plan.handle, opts_ptr, stream or None, ctypes.byref(handle)))
        return Launch(lib, handle)

    def destroy(self):
        if self.handle is not None:
            self.library._check("packinfer_context_destroy", self.library.lib.packinfer_context_destroy(self.handle))
            self.handle = None


class Plan:
    def __init__(self, library, handle):
        self.library, self.handle = library, handle

    def stats(self):
        s = PackinferPlanStats()
        s.struct_size = ctypes.sizeof(PackinferPlanStats)
        self.library._check("packinfer_plan_stats", self.library.lib.packinfer_plan_stats(self.handle, ctypes.byref(s)))
        return {name: getattr(s, name) for name, _ in PackinferPlanStats._fields_ if name != "struct_size"}

    def destroy(self):
        if self.handle is not None:
            self.library._check("packinfer_plan_destroy", self.library.lib.packinfer_plan_destroy(self.handle))
            self.handle = None


class Launch:
    def __init__(self, library, handle):
        self.library, self.handle = library, handle
        self._args = PackinferRunArgs()
        self._args.struct_size = ctypes.sizeof(PackinferRunArgs)

    def wait(self):
        self.library._check("packinfer_launch_wait", self.library.lib.packinfer_launch_wait(self.handle))

    def update(self, plan, stream=0):
        """Uploads `plan` into this launch (packinfer_launch_update); returns the host seconds."""
        t0 = time.perf_counter()
        status = self.library.lib.packinfer_launch_update(self.handle, plan.handle, stream or None)
        seconds = time.perf_counter() - t0
        self.library._check("packinfer_launch_update", status)
        return seconds

    def suits(self, plan):
        """Whether `update(plan)` takes the plan and runs it on the kernel a launch made for it
        would choose (packinfer_launch_suits)."""
        s = c_bool(False)
        self.library._check("packinfer_launch_suits",
                            self.library.lib.packinfer_launch_suits(self.handle, plan.handle, ctypes.byref(s)))
        return bool(s.value)

    def run(self, q_ptr, kv_layout, o_ptr, lse_ptr=0, stream=0, logits_soft_cap=0.0, k_scale=0.0, v_scale=0.0,
            k_head_scales_ptr=0, v_head_scales_ptr=0):
        """One layer: contiguous Q/O (`[total_q, heads, head_dim]`), K/V through `kv_layout`; the
        soft-cap (0 = none) and an fp8 cache's scales (per tensor, 0 = 1; per KV head, addresses
        of num_kv_heads floats, 0 = none) are this run's."""
        a = self._args
        a.q, a.o, a.kv, a.stream = q_ptr, o_ptr, kv_layout, stream or None
        a.logits_soft_cap = logits_soft_cap
        a.k_scale, a.v_scale = k_scale, v_scale
        a.k_head_scales = ctypes.cast(k_head_scales_ptr, POINTER(c_float)) if k_head_scales_ptr else None
        a.v_head_scales = ctypes.cast(v_head_scales_ptr, POINTER(c_float)) if v_head_scales_ptr else None
        a.q_stride_token = a.q_stride_head = a.o_stride_token = a.o_stride_head = 0
        a.lse = ctypes.cast(lse_ptr, POINTER(c_float)) if lse_ptr else None
        self.library._check("packinfer_run", self.library.lib.packinfer_run(self.handle, ctypes.byref(a)))

    def destroy(self):
        if self.handle is not None:
            self.library._check("packinfer_launch_destroy", self.library.lib.packinfer_launch_destroy(self.handle))
            self.handle = None


class Pool:
    """A managed KV pool: sequences, forks (shared prefixes), K/V writes, plans, relayout."""

    def __init__(self, context, handle, num_kv_heads, head_dim, dtype):
        self.context, self.library, self.handle = context, context.library, handle
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype

    def _call(self, name, *args):
        self.library._check(name, getattr(self.library.lib, name)(*args))

    def sequence(self):
        out = c_uint64()
        self._call("packinfer_pool_sequence_create", self.handle, ctypes.byref(out))
        return out.value

    def append(self, seq, n, stream=0):
        self._call("packinfer_pool_append", self.handle, seq, n, None, stream or None)

    def fork(self, parent, prefix_len, stream=0):
        out = c_uint64()
        self._call("packinfer_pool_fork", self.handle, parent, prefix_len, stream or None, ctypes.byref(out))
        return out.value

    def write_kv(self, layer, seqs, num_tokens, k_ptr, v_ptr, stream=0):
        """Rows of contiguous `[sum(num_tokens), kv_heads, head_dim]` K and V go, in order, to the
        last num_tokens[i] tokens of seqs[i]."""
        ids = (c_uint64 * len(seqs))(*seqs)
        counts = (c_uint32 * len(seqs))(*[int(n) for n in num_tokens])
        src = PackinferKvSource(ctypes.sizeof(PackinferKvSource), k_ptr, v_ptr, sum(int(n) for n in num_tokens),
                                self.num_kv_heads, self.head_dim, self.dtype, 0)
        self._call("packinfer_pool_write_kv", self.handle, layer, ids, counts, len(seqs), ctypes.byref(src), stream or None)

    def kv_layout(self, layer=0):
        layout = PackinferKvLayout()
        self._call("packinfer_pool_kv_layout", self.handle, layer, ctypes.byref(layout))
        return layout

    def kv_head_scales(self, layer=0):
        """Addresses of the layer's per-head K and V scales (an fp8 pool; 0, 0 otherwise), for
        Launch.run's k_head_scales_ptr and v_head_scales_ptr."""
        k, v = POINTER(c_float)(), POINTER(c_float)()
        self._call("packinfer_pool_kv_scales", self.handle, layer, ctypes.byref(k), ctypes.byref(v))
        return (ctypes.cast(k, ctypes.c_void_p).value or 0, ctypes.cast(v, ctypes.c_void_p).value or 0)

    def plan(self, seqs, num_new_tokens, flags=0, capacity=0.0):
        """Plans a step from the pool; returns (Plan, host seconds)."""
        opts = self.context.plan_options(flags, capacity)
        ids = (c_uint64 * len(seqs))(*seqs)
        counts = (c_uint32 * len(seqs))(*[int(n) for n in num_new_tokens])
        handle = PackinferPlan()
        t0 = time.perf_counter()
        status = self.library.lib.packinfer_pool_plan_create(self.context.handle, self.handle, ids, counts, len(seqs),
                                                             ctypes.byref(opts), ctypes.byref(handle))
        seconds = time.perf_counter() - t0
        self.library._check("packinfer_pool_plan_create", status)
        return Plan(self.library, handle), seconds

    def relayout(self, plan, seqs, regroup=True, stream=0):
        """Makes the plan's groups contiguous in the pool; returns the report as a dict."""
        ids = (c_uint64 * len(seqs))(*seqs)
        report = PackinferRelayoutReport()
        report.struct_size = ctypes.sizeof(PackinferRelayoutReport)
        self._call("packinfer_pool_relayout", self.handle, plan.handle, ids, len(seqs), regroup, stream or None,
                   ctypes.byref(report))
        return {n: getattr(report, n) for n, _ in PackinferRelayoutReport._fields_ if n != "struct_size"}

    def stats(self):
        st = PackinferPoolStats()
        st.struct_size = ctypes.sizeof(PackinferPoolStats)
        self._call("packinfer_pool_stats", self.handle, ctypes.byref(st))
        return {n: getattr(st, n) for n, _ in PackinferPoolStats._fields_ if n != "struct_size"}

    def destroy(self):
        if self.handle is not None:
            self._call("packinfer_pool_destroy", self.handle)
            self.handle = None


class BatchArrays:
    """A `PackinferBatchDesc` plus the int32 arrays it points to (kept alive with it).

    `prefix_groups` is a list of (prefix_len, [member request indices]).
    """

    def __init__(self, qo_indptr, kv_indptr, kv_page_indices, kv_last_page_len, page_size, num_pages,
                 num_qo_heads, num_kv_heads, head_dim, dtype, causal, sm_scale=0.0, prefix_groups=(), kv_dtype=0):
        self._qo = _i32_array(qo_indptr)
        self._kv = _i32_array(kv_indptr)
        self._pages = _i32_array(kv_page_indices)
        self._last = _i32_array(kv_last_page_len)
        self._members = [_i32_array(m) for _, m in prefix_groups]
        groups = (PackinferPrefixGroup * max(len(prefix_groups), 1))()
        for g, ((prefix_len, members), arr) in enumerate(zip(prefix_groups, self._members)):
            groups[g] = PackinferPrefixGroup(int(prefix_len), len(members), ctypes.cast(arr, POINTER(c_int32)))
        self._groups = groups
        d = PackinferBatchDesc()
        d.struct_size = ctypes.sizeof(PackinferBatchDesc)
        d.batch_size = len(kv_last_page_len)
        d.qo_indptr = ctypes.cast(self._qo, POINTER(c_int32))
        d.kv_indptr = ctypes.cast(self._kv, POINTER(c_int32))
        d.kv_page_indices = ctypes.cast(self._pages, POINTER(c_int32))
        d.kv_last_page_len = ctypes.cast(self._last, POINTER(c_int32))
        d.page_size, d.num_pages = int(page_size), int(num_pages)
        d.num_qo_heads, d.num_kv_heads, d.head_dim, d.dtype = num_qo_heads, num_kv_heads, head_dim, dtype
        d.causal, d.sm_scale = bool(causal), float(sm_scale)
        d.kv_dtype = kv_dtype  # 0 = dtype; DTYPE_FP8_E4M3 for an fp8 cache
        d.num_prefix_groups = len(prefix_groups)
        d.prefix_groups = ctypes.cast(groups, POINTER(PackinferPrefixGroup)) if prefix_groups else None
        self.desc = d
