// PackInfer C++17 wrapper: RAII handles and exceptions over the C ABI in packinfer.h.
//
// Header-only, and thin on purpose: every call is one C call plus a status check, so the
// per-layer `Launch::run` costs what `packinfer_run` costs. Handles are move-only and destroyed
// in their destructor; any status other than OK becomes a `packinfer::Error` carrying the status
// and the library's message (which names the bad argument and value).
//
// Typical step (see examples/cpp/engine_step.cpp):
//   packinfer::Context ctx({packinfer::Backend::Cpu});
//   packinfer::Plan plan = ctx.plan(batch);            // once per engine step
//   packinfer::Launch launch = ctx.launch(plan);       // once per engine step
//   for (each layer) launch.run(args);                 // once per layer
//
// CUDA graphs: a launch made with ctx.launch_with_capacity(plan, capacity, stream) can be
// re-targeted at the next step's plan with launch.update(next_plan, stream), so a graph captured
// around its runs replays the new batch (GPU only; the CPU backend says Unsupported).
//
// Managed level, the library owns the KV cache (see examples/cpp/managed_step.cpp):
//   packinfer::Pool pool(ctx, pool_options);                 // at start-up
//   pool.append(seq, n);                                     // each step: reserve new tokens
//   pool.write_kv(layer, seq_ids, counts, source);           // each layer: store the new K/V
//   packinfer::Plan plan = pool.plan(ctx, seq_ids, counts);  // each step: plan from the pool
//   launch.run(pool.run_args(layer, q, o));                 // K/V layout (and fp8 scales)
//
// Adding a function of the C API: a method that calls it through `detail::check`. Adding a
// handle type: `using XHandle = detail::UniqueHandle<PackinferX, packinfer_x_destroy>;` and a
// class that holds one, like `Plan` below.
#ifndef PACKINFER_HPP
#define PACKINFER_HPP

#if !defined(__cplusplus) || __cplusplus < 201703L
#if !defined(_MSVC_LANG) || _MSVC_LANG < 201703L
#error "packinfer.hpp needs C++17 or later"
#endif
#endif

#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "packinfer.h"

namespace packinfer {

// ---------------------------------------------------------------------------------------------
// Status and errors

enum class Status : int {
  Ok = PACKINFER_STATUS_OK,
  InvalidArgument = PACKINFER_STATUS_INVALID_ARGUMENT,
  InvalidHandle = PACKINFER_STATUS_INVALID_HANDLE,
  Unsupported = PACKINFER_STATUS_UNSUPPORTED,
  OutOfMemory = PACKINFER_STATUS_OUT_OF_MEMORY,
  PoolExhausted = PACKINFER_STATUS_POOL_EXHAUSTED,
  NoDevice = PACKINFER_STATUS_NO_DEVICE,
  DeviceError = PACKINFER_STATUS_DEVICE_ERROR,
  CompileError = PACKINFER_STATUS_COMPILE_ERROR,
  Internal = PACKINFER_STATUS_INTERNAL,
};

// "PACKINFER_STATUS_INVALID_ARGUMENT" etc. (the library's static names).
inline const char* status_name(Status status) noexcept {
  return packinfer_status_string(static_cast<uint32_t>(status));
}

// A failed call: the status, and the library's message ("packinfer_plan_create:
// kv_last_page_len[1] = 99 is not valid ..."). what() is "<STATUS NAME>: <message>".
class Error : public std::runtime_error {
 public:
  Error(Status status, const std::string& message)
      : std::runtime_error(std::string(status_name(status)) + ": " + message),
        status_(status),
        message_(message) {}
  Status status() const noexcept { return status_; }
  // The library's message alone, without the status name.
  const std::string& message() const noexcept { return message_; }

 private:
  Status status_;
  std::string message_;
};

namespace detail {

// Throws for any status but OK. The message is read right away: it is thread-local and only
// valid until the next failing call on this thread.
[[noreturn]] inline void throw_status(PackinferStatus status) {
  throw Error(static_cast<Status>(status), packinfer_last_error());
}
inline void check(PackinferStatus status) {
  if (status != PACKINFER_STATUS_OK) throw_status(status);
}
// A check only the wrapper can make failed (e.g. two arrays that pair up differ in length).
[[noreturn]] inline void invalid_argument(const char* where, const std::string& message) {
  throw Error(Status::InvalidArgument, std::string(where) + ": " + message);
}

// A move-only owner of one C handle (`{uint64_t bits}`, 0 = none) that calls `Destroy` once.
template <typename Handle, PackinferStatus (*Destroy)(Handle)>
class UniqueHandle {
 public:
  UniqueHandle() noexcept = default;
  explicit UniqueHandle(Handle h) noexcept : h_(h) {}
  UniqueHandle(const UniqueHandle&) = delete;
  UniqueHandle& operator=(const UniqueHandle&) = delete;
  UniqueHandle(UniqueHandle&& other) noexcept : h_(other.release()) {}
  UniqueHandle& operator=(UniqueHandle&& other) noexcept {
    if (this != &other) {
      destroy_quietly();
      h_ = other.release();
    }
    return *this;
  }
  // Destructors cannot throw: a failure here (only possible if the handle was destroyed through
  // the C API behind our back) is ignored. Call reset() to see it.
  ~UniqueHandle() { destroy_quietly(); }

  Handle get() const noexcept { return h_; }
  explicit operator bool() const noexcept { return h_.bits != 0; }
  // Gives up ownership: the caller destroys the handle with the C API.
  Handle release() noexcept {
    Handle h = h_;
    h_.bits = 0;
    return h;
  }
  // Destroys now and reports failure; a no-op on an empty handle.
  void reset() {
    Handle h = release();
    if (h.bits != 0) check(Destroy(h));
  }

 private:
  void destroy_quietly() noexcept {
    if (h_.bits != 0) (void)Destroy(release());
  }
  Handle h_{};
};

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Views with sizes

// A read-only view of a contiguous array (std::span is C++20). Converts from std::vector,
// std::array, C arrays and (pointer, size), so the wrapper can check array lengths the C API
// cannot see.
template <typename T>
class ArrayView {
 public:
  constexpr ArrayView() noexcept = default;
  constexpr ArrayView(const T* data, std::size_t size) noexcept : data_(data), size_(size) {}
  template <std::size_t N>
  constexpr ArrayView(const T (&array)[N]) noexcept : data_(array), size_(N) {}
  // Anything with data() and size() over T: std::vector, std::array, std::string_view-likes.
  template <typename C,
            typename = std::enable_if_t<
                std::is_convertible_v<decltype(std::declval<const C&>().data()), const T*> &&
                std::is_convertible_v<decltype(std::declval<const C&>().size()), std::size_t>>>
  constexpr ArrayView(const C& c) noexcept : data_(c.data()), size_(c.size()) {}

  constexpr const T* data() const noexcept { return data_; }
  constexpr std::size_t size() const noexcept { return size_; }
  constexpr bool empty() const noexcept { return size_ == 0; }
  constexpr const T& operator[](std::size_t i) const noexcept { return data_[i]; }
  constexpr const T* begin() const noexcept { return data_; }
  constexpr const T* end() const noexcept { return data_ + size_; }

 private:
  const T* data_ = nullptr;
  std::size_t size_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Enums and plain descriptions

enum class Backend : int {
  Auto = PACKINFER_BACKEND_AUTO,
  Cpu = PACKINFER_BACKEND_CPU,
  Cuda = PACKINFER_BACKEND_CUDA,
};

enum class DType : int {
  F16 = PACKINFER_DTYPE_F16,
  BF16 = PACKINFER_DTYPE_BF16,
  F32 = PACKINFER_DTYPE_F32,  // CPU backend only
  // fp8 e4m3 for K and V only (AttentionShape::kv_dtype), dequantized with the run's scales
  // (RunArgs::with_kv_scales); the CPU backend runs it, the CUDA backend refuses it for now.
  FP8_E4M3 = PACKINFER_DTYPE_FP8_E4M3,
};

// Bits of PlanOptions::flags; combine with |.
enum class PlanFlags : uint32_t {
  None = 0,
  Deterministic = PACKINFER_PLAN_FLAGS_DETERMINISTIC,
  NoPacking = PACKINFER_PLAN_FLAGS_NO_PACKING,
  NoBalancing = PACKINFER_PLAN_FLAGS_NO_BALANCING,
  NoPrefixSharing = PACKINFER_PLAN_FLAGS_NO_PREFIX_SHARING,
  NoSplitKv = PACKINFER_PLAN_FLAGS_NO_SPLIT_KV,
  SlidingWindow = PACKINFER_PLAN_FLAGS_SLIDING_WINDOW,  // set by to_c from PlanOptions::window_left
};
constexpr PlanFlags operator|(PlanFlags a, PlanFlags b) noexcept {
  return static_cast<PlanFlags>(static_cast<uint32_t>(a) | static_cast<uint32_t>(b));
}
constexpr PlanFlags operator&(PlanFlags a, PlanFlags b) noexcept {
  return static_cast<PlanFlags>(static_cast<uint32_t>(a) & static_cast<uint32_t>(b));
}

struct ContextOptions {
  Backend backend = Backend::Auto;
  uint32_t device_ordinal = 0;
  uint32_t num_threads = 0;       // CPU backend worker threads; 0 = one per core
  std::string kernel_cache_dir;   // empty = $PACKINFER_CACHE_DIR, else ~/.cache/packinfer
};

struct ContextInfo {
  Backend backend;       // Cpu or Cuda, never Auto
  uint32_t num_workers;  // CPU threads, or the device's SM count
  std::string device_name;
};

struct PlanOptions {
  PlanFlags flags = PlanFlags::None;
  uint32_t split_keys = 0;  // deterministic split granularity in keys; 0 = 2048
  double capacity = 0.0;    // capacity in cost units (longer pieces are split); 0 = automatic
  // Sliding window (FlashInfer's window_left): a query at position p sees keys from
  // p - window_left on; -1 = none. Fixed at plan time (PackinferPlanOptions::window_left).
  int64_t window_left = -1;
};

namespace detail {
inline PackinferPlanOptions to_c(const PlanOptions& options) {
  PackinferPlanOptions o{};
  check(packinfer_plan_options_default(&o));
  o.flags = static_cast<uint32_t>(options.flags);
  o.split_keys = options.split_keys;
  o.capacity = options.capacity;
  if (options.window_left >= 0) {
    o.flags |= PACKINFER_PLAN_FLAGS_SLIDING_WINDOW;
    // A window beyond 32 bits is wider than any request's keys: the same as the widest.
    o.window_left = options.window_left > int64_t(UINT32_MAX) ? UINT32_MAX : uint32_t(options.window_left);
  }
  return o;
}
}  // namespace detail

// Scratch for a plan's split partials: null = the launch allocates it once, at creation; else
// the caller's buffer (device memory on CUDA) of at least PlanStats::scratch_bytes.
struct LaunchOptions {
  void* scratch = nullptr;
  std::size_t scratch_bytes = 0;
};

// Sizes of a launch's device buffers (Context::launch_with_capacity), so that Launch::update can
// upload later plans that fit into the same launch, and a CUDA graph captured around
// Launch::run replays them. 0 in a field = the first plan's own count.
struct LaunchCapacity {
  uint32_t max_work_items = 0;
  uint32_t max_row_segments = 0;
  uint32_t max_kv_chunks = 0;
  uint32_t max_requests = 0;
  uint32_t max_pages = 0;  // entries of kv_page_indices
  uint32_t max_merge_rows = 0;
  uint32_t max_merge_slots = 0;
  uint32_t max_groups = 0;
  uint32_t max_partial_slots = 0;
  uint32_t max_custom_mask_bytes = 0;    // bytes of custom_mask
  uint32_t max_masked_query_tokens = 0;  // query tokens of a step with a custom mask
};

// The C struct, as is: what the planner did (num_groups, tile_utilization, scratch_bytes, ...).
using PlanStats = PackinferPlanStats;

// Requests `members` share their first `prefix_len` keys (same content).
struct PrefixGroup {
  uint32_t prefix_len = 0;
  ArrayView<int32_t> members;
};

// The attention shape of the model's layers.
struct AttentionShape {
  uint32_t num_qo_heads = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::F16;
  bool causal = true;     // bottom-right aligned
  float sm_scale = 0.0f;  // 0 = 1/sqrt(head_dim)
};

// One engine step: CSR page tables (FlashInfer's convention) plus the shape. The batch size is
// kv_last_page_len.size(); the views are only read during Context::plan.
struct BatchDesc {
  AttentionShape shape;
  ArrayView<int32_t> qo_indptr;         // [batch + 1]
  ArrayView<int32_t> kv_indptr;         // [batch + 1]
  ArrayView<int32_t> kv_page_indices;   // [kv_indptr[batch]]
  ArrayView<int32_t> kv_last_page_len;  // [batch]
  uint32_t page_size = 0;
  uint32_t num_pages = 0;  // pages in the cache; every page index must be below it
  ArrayView<PrefixGroup> prefix_groups;
  // Custom masks (tree speculative decoding), FlashInfer's bit-packed layout: request i's
  // q_len x kv_len bits, row-major, little-endian within each byte, are the bytes
  // custom_mask[mask_indptr[i] .. mask_indptr[i+1]]. A set bit shows the key. With a mask the
  // causal mask is not applied (shape.causal is ignored); a window and soft-cap still are. A
  // query that sees no key gets O = 0 and LSE = -inf. Empty mask_indptr = no mask. The CUDA
  // backend refuses a masked batch (UNSUPPORTED) until its kernels apply masks.
  ArrayView<uint8_t> custom_mask;
  ArrayView<int32_t> mask_indptr;  // [batch + 1] byte offsets, or empty
  // K's and V's element type: none = shape.dtype; DType::FP8_E4M3 for an fp8 cache, read with
  // each run's scales (RunArgs::with_kv_scales, with_kv_head_scales). Fixed at plan time. Both
  // backends run fp8 caches.
  std::optional<DType> kv_dtype;
};

// Where K and V live (element strides). Built by nhd()/hnd() or by hand for other layouts.
using KvLayout = PackinferKvLayout;

// [num_pages, page_size, num_kv_heads, head_dim] for K and for V.
inline KvLayout kv_layout_nhd(const void* k, const void* v, uint32_t page_size,
                              uint32_t num_kv_heads, uint32_t head_dim) {
  KvLayout layout{};
  detail::check(packinfer_kv_layout_nhd(k, v, page_size, num_kv_heads, head_dim, &layout));
  return layout;
}
// [num_pages, num_kv_heads, page_size, head_dim] for K and for V.
inline KvLayout kv_layout_hnd(const void* k, const void* v, uint32_t page_size,
                              uint32_t num_kv_heads, uint32_t head_dim) {
  KvLayout layout{};
  detail::check(packinfer_kv_layout_hnd(k, v, page_size, num_kv_heads, head_dim, &layout));
  return layout;
}

// One layer's tensors: the C struct with struct_size filled in, so `Launch::run` passes it
// straight through. Pointers are host pointers on the CPU backend and device pointers on CUDA;
// strides are in elements, 0 = contiguous.
struct RunArgs : PackinferRunArgs {
  RunArgs() noexcept : PackinferRunArgs{} { struct_size = sizeof(PackinferRunArgs); }
  RunArgs(const void* q_, const KvLayout& kv_, void* o_, float* lse_ = nullptr,
          void* stream_ = nullptr) noexcept
      : RunArgs() {
    q = q_;
    kv = kv_;
    o = o_;
    lse = lse_;
    stream = stream_;
  }
  // The logit soft-cap of this run (Gemma 2; 0 = none): per run, never fixed by the plan.
  RunArgs& with_soft_cap(float cap) noexcept {
    logits_soft_cap = cap;
    return *this;
  }
  // An fp8 cache's per-tensor scales (vLLM's and FlashInfer's k_scale / v_scale; 0 = 1): per
  // run, so each layer passes its own.
  RunArgs& with_kv_scales(float k, float v) noexcept {
    k_scale = k;
    v_scale = v;
    return *this;
  }
  // An fp8 cache's per-head scales: num_kv_heads floats each (device memory on CUDA), read by
  // every run; nullptr = 1. Multiplied with the per-tensor scales.
  RunArgs& with_kv_head_scales(const float* k, const float* v) noexcept {
    k_head_scales = k;
    v_head_scales = v;
    return *this;
  }
};

// ---------------------------------------------------------------------------------------------
// Handles

using ContextHandle = detail::UniqueHandle<PackinferContext, packinfer_context_destroy>;
using PlanHandle = detail::UniqueHandle<PackinferPlan, packinfer_plan_destroy>;
using LaunchHandle = detail::UniqueHandle<PackinferLaunch, packinfer_launch_destroy>;

// The host-side schedule of one step. Made by Context::plan.
class Plan {
 public:
  Plan() noexcept = default;
  // Takes ownership of a handle made with the C API.
  explicit Plan(PackinferPlan handle) noexcept : h_(handle) {}

  PlanStats stats() const {
    PlanStats s{};
    s.struct_size = sizeof(s);
    detail::check(packinfer_plan_stats(h_.get(), &s));
    return s;
  }
  PackinferPlan handle() const noexcept { return h_.get(); }
  explicit operator bool() const noexcept { return static_cast<bool>(h_); }
  PackinferPlan release() noexcept { return h_.release(); }
  // Destroys now (the destructor does it otherwise). Launches made from it stay usable.
  void reset() { h_.reset(); }

 private:
  PlanHandle h_;
};

// A plan bound to a context, ready to run every layer of the step. Made by Context::launch.
class Launch {
 public:
  Launch() noexcept = default;
  explicit Launch(PackinferLaunch handle) noexcept : h_(handle) {}

  // One layer. On CUDA: enqueues on args.stream, allocates and waits for nothing.
  void run(const RunArgs& args) const { detail::check(packinfer_run(h_.get(), &args)); }
  // Whether the launch's upload has completed (never blocks).
  bool ready() const {
    bool done = false;
    detail::check(packinfer_launch_query(h_.get(), &done));
    return done;
  }
  // Blocks until the launch's upload has completed.
  void wait() const { detail::check(packinfer_launch_wait(h_.get())); }
  // Uploads `plan` (same shape and page size, within the launch's capacity: see
  // Context::launch_with_capacity) into this launch's buffers on `stream`; later runs, and CUDA
  // graphs that captured them, compute the new plan. Queue it on the stream that runs the launch.
  void update(const Plan& plan, void* stream = nullptr) const {
    detail::check(packinfer_launch_update(h_.get(), plan.handle(), stream));
  }
  // Whether update(plan) would take `plan` and run it on the kernel a launch created for it
  // this way would choose (on CUDA a launch keeps its first plan's kernel): an engine whose
  // steps differ in kind keeps a launch per kind and updates one that suits.
  bool suits(const Plan& plan) const {
    bool s = false;
    detail::check(packinfer_launch_suits(h_.get(), plan.handle(), &s));
    return s;
  }

  PackinferLaunch handle() const noexcept { return h_.get(); }
  explicit operator bool() const noexcept { return static_cast<bool>(h_); }
  PackinferLaunch release() noexcept { return h_.release(); }
  // Destroy only once the stream has passed the last run that used this launch.
  void reset() { h_.reset(); }

 private:
  LaunchHandle h_;
};

// A backend on one device. Plans and launches made from it stay usable after it is destroyed.
class Context {
 public:
  // An empty context (no handle); assign a created one to it.
  Context() noexcept = default;
  // Creates a context; throws Error (e.g. NoDevice for Backend::Cuda where CUDA is unusable).
  explicit Context(const ContextOptions& options) {
    PackinferContextOptions o{};
    detail::check(packinfer_context_options_default(&o));
    o.backend = static_cast<uint32_t>(options.backend);
    o.device_ordinal = options.device_ordinal;
    o.num_threads = options.num_threads;
    o.kernel_cache_dir = options.kernel_cache_dir.empty() ? nullptr : options.kernel_cache_dir.c_str();
    PackinferContext h{};
    detail::check(packinfer_context_create(&o, &h));
    h_ = ContextHandle(h);
  }
  explicit Context(Backend backend) : Context(options_for(backend)) {}
  // Takes ownership of a handle made with the C API.
  explicit Context(PackinferContext handle) noexcept : h_(handle) {}

  ContextInfo info() const {
    PackinferContextInfo i{};
    i.struct_size = sizeof(i);
    detail::check(packinfer_context_info(h_.get(), &i));
    return ContextInfo{static_cast<Backend>(i.backend), i.num_workers, std::string(i.device_name)};
  }

  // Plans one step. Checks that the arrays are as long as the batch says (what the C API cannot
  // see), then the library checks everything else; all arrays are copied during the call.
  Plan plan(const BatchDesc& batch, const PlanOptions& options = {}) const {
    PackinferPlan h{};
    with_desc(batch, options, [&](const PackinferBatchDesc& d, const PackinferPlanOptions& o) {
      detail::check(packinfer_plan_create(h_.get(), &d, &o, &h));
    });
    return Plan(h);
  }

  // Plans another step into `plan`, reusing its memory (packinfer_plan_update): once it has held
  // a step as large, planning allocates nothing in the library. Launches made or updated from
  // the plan keep their step until Launch::update. May run on another thread than the runs of
  // the step before (docs/design.md, "Threads"). After an exception the plan holds no work or
  // its previous step: plan again before launching from it.
  void replan(Plan& plan, const BatchDesc& batch, const PlanOptions& options = {}) const {
    with_desc(batch, options, [&](const PackinferBatchDesc& d, const PackinferPlanOptions& o) {
      detail::check(packinfer_plan_update(h_.get(), plan.handle(), &d, &o));
    });
  }

 private:
  // Checks `batch`'s array lengths and calls `f` with its C description and the C options.
  template <class F>
  void with_desc(const BatchDesc& batch, const PlanOptions& options, F&& f) const {
    const std::size_t n = batch.kv_last_page_len.size();
    check_length("batch.qo_indptr", batch.qo_indptr.size(), n + 1, "batch size + 1 (the batch size is kv_last_page_len.size())");
    check_length("batch.kv_indptr", batch.kv_indptr.size(), n + 1, "batch size + 1 (the batch size is kv_last_page_len.size())");
    const int32_t nnz = batch.kv_indptr[n];
    if (nnz >= 0 && batch.kv_page_indices.size() < static_cast<std::size_t>(nnz)) {
      invalid("batch.kv_page_indices has " + std::to_string(batch.kv_page_indices.size()) +
              " entries but kv_indptr[" + std::to_string(n) + "] = " + std::to_string(nnz));
    }
    if (!batch.mask_indptr.empty()) {
      check_length("batch.mask_indptr", batch.mask_indptr.size(), n + 1, "batch size + 1 (or none, for no custom mask)");
      const int32_t bytes = batch.mask_indptr[n];
      if (bytes >= 0 && batch.custom_mask.size() < static_cast<std::size_t>(bytes)) {
        invalid("batch.custom_mask has " + std::to_string(batch.custom_mask.size()) + " bytes but mask_indptr[" +
                std::to_string(n) + "] = " + std::to_string(bytes));
      }
    }
    std::vector<PackinferPrefixGroup> groups;
    groups.reserve(batch.prefix_groups.size());
    for (const PrefixGroup& g : batch.prefix_groups) {
      groups.push_back(PackinferPrefixGroup{g.prefix_len, static_cast<uint32_t>(g.members.size()), g.members.data()});
    }
    PackinferBatchDesc d{};
    d.struct_size = sizeof(d);
    d.batch_size = static_cast<uint32_t>(n);
    d.qo_indptr = batch.qo_indptr.data();
    d.kv_indptr = batch.kv_indptr.data();
    d.kv_page_indices = batch.kv_page_indices.data();
    d.kv_last_page_len = batch.kv_last_page_len.data();
    d.page_size = batch.page_size;
    d.num_pages = batch.num_pages;
    d.num_qo_heads = batch.shape.num_qo_heads;
    d.num_kv_heads = batch.shape.num_kv_heads;
    d.head_dim = batch.shape.head_dim;
    d.dtype = static_cast<uint32_t>(batch.shape.dtype);
    d.kv_dtype = batch.kv_dtype ? static_cast<uint32_t>(*batch.kv_dtype) : 0u;
    d.causal = batch.shape.causal;
    d.sm_scale = batch.shape.sm_scale;
    d.num_prefix_groups = static_cast<uint32_t>(groups.size());
    d.prefix_groups = groups.empty() ? nullptr : groups.data();
    d.custom_mask = batch.mask_indptr.empty() ? nullptr : batch.custom_mask.data();
    d.mask_indptr = batch.mask_indptr.empty() ? nullptr : batch.mask_indptr.data();
    const PackinferPlanOptions o = detail::to_c(options);
    f(d, o);
  }

 public:

  // Binds a plan to this context on `stream` (a CUstream, or nullptr for the default stream).
  Launch launch(const Plan& plan, void* stream = nullptr, const LaunchOptions& options = {}) const {
    PackinferLaunchOptions o{};
    o.struct_size = sizeof(o);
    o.scratch = options.scratch;
    o.scratch_bytes = options.scratch_bytes;
    PackinferLaunch h{};
    detail::check(packinfer_launch_create(h_.get(), plan.handle(), &o, stream, &h));
    return Launch(h);
  }

  // Like launch(), with buffers sized for `capacity`, so that Launch::update can re-target the
  // launch (and a CUDA graph captured around its runs) at later plans; the CPU backend keeps the
  // same contract in host memory.
  Launch launch_with_capacity(const Plan& plan, const LaunchCapacity& capacity, void* stream = nullptr,
                              const LaunchOptions& options = {}) const {
    PackinferLaunchOptions o{};
    o.struct_size = sizeof(o);
    o.scratch = options.scratch;
    o.scratch_bytes = options.scratch_bytes;
    PackinferLaunchCapacity c{};
    c.struct_size = sizeof(c);
    c.max_work_items = capacity.max_work_items;
    c.max_row_segments = capacity.max_row_segments;
    c.max_kv_chunks = capacity.max_kv_chunks;
    c.max_requests = capacity.max_requests;
    c.max_pages = capacity.max_pages;
    c.max_merge_rows = capacity.max_merge_rows;
    c.max_merge_slots = capacity.max_merge_slots;
    c.max_groups = capacity.max_groups;
    c.max_partial_slots = capacity.max_partial_slots;
    c.max_custom_mask_bytes = capacity.max_custom_mask_bytes;
    c.max_masked_query_tokens = capacity.max_masked_query_tokens;
    PackinferLaunch h{};
    detail::check(packinfer_launch_create_with_capacity(h_.get(), plan.handle(), &o, &c, stream, &h));
    return Launch(h);
  }

  // Compiles (or loads from the kernel cache) every kernel variant this context can need, so no
  // launch pays compile time later. A no-op on the CPU backend.
  void precompile() const { detail::check(packinfer_context_precompile(h_.get())); }
  // CUDA: times a few work shapes on the device and fits the planner's cost model, which plans
  // made afterwards use (and later contexts sharing the kernel cache directory). About a second:
  // once per device and install, not per request. Throws Unsupported on the CPU backend.
  void calibrate() const { detail::check(packinfer_context_calibrate(h_.get())); }

  PackinferContext handle() const noexcept { return h_.get(); }
  explicit operator bool() const noexcept { return static_cast<bool>(h_); }
  PackinferContext release() noexcept { return h_.release(); }
  void reset() { h_.reset(); }

 private:
  static ContextOptions options_for(Backend backend) {
    ContextOptions o;
    o.backend = backend;
    return o;
  }
  [[noreturn]] static void invalid(const std::string& message) {
    detail::invalid_argument("packinfer::Context::plan", message);
  }
  static void check_length(const char* name, std::size_t got, std::size_t want, const char* why) {
    if (got != want) {
      invalid(std::string(name) + " has " + std::to_string(got) + " entries; it needs " + std::to_string(want) + " = " + why);
    }
  }

  ContextHandle h_;
};

// ---------------------------------------------------------------------------------------------
// The managed KV pool

// A sequence of a pool (never 0, never reused: a released id stays invalid).
using SequenceId = uint64_t;

// How to create a pool. Memory is num_layers x 2 (K, V) x num_pages x page_size x num_kv_heads x
// head_dim elements of kv_dtype (else shape.dtype), allocated once; plans made from the pool use
// `shape`. A pool with kv_dtype = DType::FP8_E4M3 takes rows of shape.dtype in write_kv and
// stores x / scale as e4m3 (nearest even, saturated to ±448); CPU backend only for now.
struct PoolOptions {
  uint32_t num_layers = 0;
  AttentionShape shape;
  uint32_t page_size = 16;
  uint32_t num_pages = 0;        // capacity in pages; 0 = as many as fit in capacity_bytes
  uint64_t capacity_bytes = 0;   // used when num_pages is 0
  uint32_t headroom_pages = 2;   // δ: empty pages kept after each member of a laid-out group
  // K's and V's element type: none = shape.dtype; DType::FP8_E4M3 for an fp8 pool.
  std::optional<DType> kv_dtype;
  // An fp8 pool's scales, [layer][K, V][kv head] (num_layers x 2 x num_kv_heads), copied at
  // creation; empty = all 1.
  ArrayView<float> kv_head_scales;
};

// The step's new K and V for one layer as the engine holds them: [num_rows, num_kv_heads,
// head_dim] each, token-major. The shape and dtype are stated so that a mismatch with the pool
// is an error, not a silent misread. Host memory on the CPU backend, device memory on CUDA.
struct KvSource {
  const void* k = nullptr;
  const void* v = nullptr;
  uint32_t num_rows = 0;  // must equal the sum of the num_tokens passed with it
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::F16;
  int64_t stride_token = 0;  // elements between consecutive rows; 0 = contiguous
};

// The C structs, as they are.
using PoolStats = PackinferPoolStats;            // pages used/free, tokens, step reads, relayouts
using RelayoutReport = PackinferRelayoutReport;  // groups in place / rebuilt / no room, pages moved

using PoolHandle = detail::UniqueHandle<PackinferPool, packinfer_pool_destroy>;

// KV memory owned by the library, cut into pages that sequences share copy-on-write. Every
// method is one C call (plus the array-length checks the C API cannot make); a pool may be used
// from several threads. Launches that read its KV must be finished before it is destroyed.
class Pool {
 public:
  Pool() noexcept = default;
  // Allocates the whole pool on the context's backend (Unsupported where the backend has no
  // pool yet).
  Pool(const Context& context, const PoolOptions& options) {
    PackinferPoolOptions o{};
    detail::check(packinfer_pool_options_default(&o));
    o.num_layers = options.num_layers;
    o.num_qo_heads = options.shape.num_qo_heads;
    o.num_kv_heads = options.shape.num_kv_heads;
    o.head_dim = options.shape.head_dim;
    o.dtype = static_cast<uint32_t>(options.shape.dtype);
    o.causal = options.shape.causal;
    o.sm_scale = options.shape.sm_scale;
    o.page_size = options.page_size;
    o.num_pages = options.num_pages;
    o.capacity_bytes = options.capacity_bytes;
    o.headroom_pages = options.headroom_pages;
    o.kv_dtype = options.kv_dtype ? static_cast<uint32_t>(*options.kv_dtype) : 0u;
    if (!options.kv_head_scales.empty()) {
      const std::size_t want = std::size_t{options.num_layers} * 2 * options.shape.num_kv_heads;
      if (options.kv_head_scales.size() != want) {
        throw Error(Status::InvalidArgument, "packinfer::Pool: kv_head_scales has " + std::to_string(options.kv_head_scales.size()) +
                                                 " entries; num_layers x 2 x num_kv_heads = " + std::to_string(want));
      }
      o.kv_head_scales = options.kv_head_scales.data();
    }
    PackinferPool h{};
    detail::check(packinfer_pool_create(context.handle(), &o, &h));
    h_ = PoolHandle(h);
    capacity_tokens_ = uint64_t{stats().num_pages} * options.page_size;
  }
  // Takes ownership of a handle made with the C API.
  explicit Pool(PackinferPool handle) noexcept : h_(handle) {}

  // Layer `layer`'s K/V as RunArgs::kv wants them (NHD pages, K and V separate).
  KvLayout kv_layout(uint32_t layer) const {
    KvLayout layout{};
    detail::check(packinfer_pool_kv_layout(h_.get(), layer, &layout));
    return layout;
  }
  // Layer `layer`'s per-head K and V scales in the pool (an fp8 pool), for
  // RunArgs::with_kv_head_scales; {nullptr, nullptr} for a pool of Q's dtype.
  std::pair<const float*, const float*> kv_head_scales(uint32_t layer) const {
    const float* k = nullptr;
    const float* v = nullptr;
    detail::check(packinfer_pool_kv_scales(h_.get(), layer, &k, &v));
    return {k, v};
  }
  // One layer's run arguments over the pool: its K/V layout and, in an fp8 pool, its scales.
  RunArgs run_args(uint32_t layer, const void* q, void* o, float* lse = nullptr, void* stream = nullptr) const {
    const auto scales = kv_head_scales(layer);
    return RunArgs(q, kv_layout(layer), o, lse, stream).with_kv_head_scales(scales.first, scales.second);
  }

  // ---- sequences ----
  SequenceId create_sequence() {
    SequenceId id = 0;
    detail::check(packinfer_pool_sequence_create(h_.get(), &id));
    return id;
  }
  uint32_t sequence_length(SequenceId seq) const {
    uint32_t n = 0;
    detail::check(packinfer_pool_sequence_length(h_.get(), seq, &n));
    return n;
  }
  // Reserves n more tokens at the end of `seq` and returns their slots (page * page_size + token
  // in page; valid until a relayout moves pages). Throws PoolExhausted, leaving the pool
  // unchanged, when the pages do not fit. A copy-on-write copy runs on `stream`.
  std::vector<int64_t> append(SequenceId seq, uint32_t n, void* stream = nullptr) {
    if (capacity_tokens_ != 0 && n > capacity_tokens_) {
      // More tokens than the whole pool holds never fit: the library refuses them (with its
      // message) without this wrapper allocating n slots first.
      detail::check(packinfer_pool_append(h_.get(), seq, n, nullptr, stream));
      throw Error(Status::Internal, "packinfer::Pool::append: the library accepted n = " + std::to_string(n) +
                                        " tokens, more than the pool's " + std::to_string(capacity_tokens_));
    }
    std::vector<int64_t> slots(n);
    detail::check(packinfer_pool_append(h_.get(), seq, n, slots.empty() ? nullptr : slots.data(), stream));
    return slots;
  }
  // A new sequence sharing the first prefix_len tokens of `parent` (full pages shared, a partly
  // covered page copied on `stream`).
  SequenceId fork(SequenceId parent, uint32_t prefix_len, void* stream = nullptr) {
    SequenceId child = 0;
    detail::check(packinfer_pool_fork(h_.get(), parent, prefix_len, stream, &child));
    return child;
  }
  void truncate(SequenceId seq, uint32_t length) { detail::check(packinfer_pool_truncate(h_.get(), seq, length)); }
  // The id becomes invalid; pages return when their last user goes.
  void release(SequenceId seq) { detail::check(packinfer_pool_release(h_.get(), seq)); }

  // ---- K/V and content hashes ----
  // Layer `layer`'s K/V of the step's new tokens: the rows of `src` go, in order, to the last
  // num_tokens[i] tokens of seq_ids[i] (reserved by append). Runs on `stream`.
  void write_kv(uint32_t layer, ArrayView<SequenceId> seq_ids, ArrayView<uint32_t> num_tokens,
                const KvSource& src, void* stream = nullptr) {
    const uint32_t n = same_length("packinfer::Pool::write_kv", seq_ids, "num_tokens", num_tokens.size());
    PackinferKvSource s{};
    s.struct_size = sizeof(s);
    s.k = src.k;
    s.v = src.v;
    s.num_rows = src.num_rows;
    s.num_kv_heads = src.num_kv_heads;
    s.head_dim = src.head_dim;
    s.dtype = static_cast<uint32_t>(src.dtype);
    s.stride_token = src.stride_token;
    detail::check(packinfer_pool_write_kv(h_.get(), layer, seq_ids.data(), num_tokens.data(), n, &s, stream));
  }
  // The engine's chained content hashes of the first hashes.size() full pages of `seq`.
  void register_page_hashes(SequenceId seq, ArrayView<uint64_t> hashes) {
    detail::check(packinfer_pool_register_page_hashes(h_.get(), seq, hashes.data(), length("packinfer::Pool::register_page_hashes", hashes.size())));
  }
  // For an empty `seq`: shares the registered pages matching the leading hashes; returns the
  // number of tokens they hold.
  uint32_t match_prefix(SequenceId seq, ArrayView<uint64_t> hashes) {
    uint32_t matched = 0;
    detail::check(packinfer_pool_match_prefix(h_.get(), seq, hashes.data(), length("packinfer::Pool::match_prefix", hashes.size()), &matched));
    return matched;
  }

  // ---- steps ----
  // Plans a step from the pool: request i is seq_ids[i] with its last num_new_tokens[i] tokens
  // (already appended) as queries. A snapshot: make it after the step's appends and relayout.
  Plan plan(const Context& context, ArrayView<SequenceId> seq_ids, ArrayView<uint32_t> num_new_tokens,
            const PlanOptions& options = {}) const {
    const uint32_t n = same_length("packinfer::Pool::plan", seq_ids, "num_new_tokens", num_new_tokens.size());
    const PackinferPlanOptions o = detail::to_c(options);
    PackinferPlan h{};
    detail::check(packinfer_pool_plan_create(context.handle(), h_.get(), seq_ids.data(), num_new_tokens.data(), n, &o, &h));
    return Plan(h);
  }
  // Plans a step from the pool into `plan`, reusing its memory (packinfer_pool_plan_update), as
  // plan() would: once it has held a step as large, planning allocates nothing in the library.
  // Context::replan's rules on launches, threads and exceptions apply.
  void replan(const Context& context, Plan& plan, ArrayView<SequenceId> seq_ids, ArrayView<uint32_t> num_new_tokens,
              const PlanOptions& options = {}) const {
    const uint32_t n = same_length("packinfer::Pool::replan", seq_ids, "num_new_tokens", num_new_tokens.size());
    const PackinferPlanOptions o = detail::to_c(options);
    detail::check(packinfer_pool_plan_update(context.handle(), h_.get(), plan.handle(), seq_ids.data(), num_new_tokens.data(), n, &o));
  }
  // Keeps each execution group of `plan` (made from seq_ids) contiguous in the pool; copies run
  // on `stream`. If the report says pages moved, plans made before it are stale: plan again.
  RelayoutReport relayout(const Plan& plan, ArrayView<SequenceId> seq_ids, bool regroup, void* stream = nullptr) {
    RelayoutReport r{};
    r.struct_size = sizeof(r);
    detail::check(packinfer_pool_relayout(h_.get(), plan.handle(), seq_ids.data(),
                                          length("packinfer::Pool::relayout", seq_ids.size()), regroup, stream, &r));
    return r;
  }
  PoolStats stats() const {
    PoolStats s{};
    s.struct_size = sizeof(s);
    detail::check(packinfer_pool_stats(h_.get(), &s));
    return s;
  }

  PackinferPool handle() const noexcept { return h_.get(); }
  explicit operator bool() const noexcept { return static_cast<bool>(h_); }
  PackinferPool release() noexcept { return h_.release(); }
  // Destroys now and frees the KV memory (the destructor does it otherwise).
  void reset() { h_.reset(); }

 private:
  static uint32_t length(const char* where, std::size_t n) {
    if (n > UINT32_MAX) detail::invalid_argument(where, std::to_string(n) + " entries are more than the C API's uint32 count");
    return static_cast<uint32_t>(n);
  }
  static uint32_t same_length(const char* where, ArrayView<SequenceId> seq_ids, const char* other, std::size_t other_size) {
    if (seq_ids.size() != other_size) {
      detail::invalid_argument(where, std::string(other) + " has " + std::to_string(other_size) + " entries but seq_ids has " +
                                          std::to_string(seq_ids.size()) + "; they pair up one to one");
    }
    return length(where, seq_ids.size());
  }

  PoolHandle h_;
  uint64_t capacity_tokens_ = 0;  // num_pages * page_size; 0 = unknown (a handle adopted from C)
};

// ---------------------------------------------------------------------------------------------
// The adaptive scheduler of one pool: capacity tuning, regroup trigger, relayouts by a cost model

enum class SchedulerFlags : uint32_t {
  None = 0,
  NoTuning = PACKINFER_SCHEDULER_FLAGS_NO_TUNING,              // plan with capacity_factor x automatic
  NoRegroup = PACKINFER_SCHEDULER_FLAGS_NO_REGROUP,            // no grouping kept across steps
  NoRelayout = PACKINFER_SCHEDULER_FLAGS_NO_RELAYOUT,          // never move pages
  RelayoutAlways = PACKINFER_SCHEDULER_FLAGS_RELAYOUT_ALWAYS,  // move whenever due (comparisons)
};
constexpr SchedulerFlags operator|(SchedulerFlags a, SchedulerFlags b) noexcept {
  return static_cast<SchedulerFlags>(static_cast<uint32_t>(a) | static_cast<uint32_t>(b));
}

// The defaults are packinfer_scheduler_options_default's.
struct SchedulerOptions {
  SchedulerFlags flags = SchedulerFlags::None;
  uint32_t horizon_steps = 32;         // steps a layout is expected to serve
  double capacity_factor = 1.0;        // with NoTuning
  double copy_bytes_per_second = 0.0;  // 0 = measured from the relayouts
  double contiguous_gain = -1.0;       // attention share contiguity saves; negative = measured
  double explore_fraction = 0.01;      // share of attention time probes may cost
};

using SchedulerStep = PackinferSchedulerStep;    // capacity, regrouped, relayout, predictions
using SchedulerStats = PackinferSchedulerStats;  // totals: regroups, relayouts, predicted vs measured
using SchedulerHandle = detail::UniqueHandle<PackinferScheduler, packinfer_scheduler_destroy>;

// Keep one per pool, for the pool's life. Each step: plan() (after the step's appends), launch
// and run the plan, then record() the measured attention time.
class Scheduler {
 public:
  Scheduler() noexcept = default;
  explicit Scheduler(const Pool& pool, const SchedulerOptions& options = {}) {
    PackinferSchedulerOptions o{};
    o.struct_size = sizeof(o);
    detail::check(packinfer_scheduler_options_default(&o));
    o.flags = static_cast<uint32_t>(options.flags);
    o.horizon_steps = options.horizon_steps;
    o.capacity_factor = options.capacity_factor;
    o.copy_bytes_per_second = options.copy_bytes_per_second;
    o.contiguous_gain = options.contiguous_gain;
    o.explore_fraction = options.explore_fraction;
    PackinferScheduler h{};
    detail::check(packinfer_scheduler_create(pool.handle(), &o, &h));
    h_ = SchedulerHandle(h);
  }
  // Takes ownership of a handle made with the C API.
  explicit Scheduler(PackinferScheduler handle) noexcept : h_(handle) {}

  // Plans the step from the pool with the capacity the scheduler chooses, after the trigger and
  // any relayout it decided (copies on `stream`); what it decided goes to *step when given.
  Plan plan(const Context& context, ArrayView<SequenceId> seq_ids, ArrayView<uint32_t> num_new_tokens,
            const PlanOptions& options = {}, void* stream = nullptr, SchedulerStep* step = nullptr) {
    const uint32_t n = count("packinfer::Scheduler::plan", seq_ids, num_new_tokens);
    const PackinferPlanOptions o = detail::to_c(options);
    if (step != nullptr) step->struct_size = sizeof(*step);
    PackinferPlan h{};
    detail::check(packinfer_scheduler_plan(h_.get(), context.handle(), seq_ids.data(), num_new_tokens.data(), n, &o, stream, &h, step));
    return Plan(h);
  }
  // As plan(), into `plan` (an earlier step's), reusing its memory (packinfer_scheduler_plan_update):
  // once it has held a step as large, planning allocates nothing in the library.
  // Context::replan's rules on launches, threads and exceptions apply.
  void replan(const Context& context, Plan& plan, ArrayView<SequenceId> seq_ids, ArrayView<uint32_t> num_new_tokens,
              const PlanOptions& options = {}, void* stream = nullptr, SchedulerStep* step = nullptr) {
    const uint32_t n = count("packinfer::Scheduler::replan", seq_ids, num_new_tokens);
    const PackinferPlanOptions o = detail::to_c(options);
    if (step != nullptr) step->struct_size = sizeof(*step);
    detail::check(packinfer_scheduler_plan_update(h_.get(), context.handle(), plan.handle(), seq_ids.data(), num_new_tokens.data(), n,
                                                  &o, stream, step));
  }
  // The step's measured attention time (every layer) and, when timed on the device, its
  // relayout copies (0 = the scheduler's host timing).
  void record(double attention_seconds, double relayout_seconds = 0.0) {
    PackinferStepTimes t{};
    t.struct_size = sizeof(t);
    t.attention_seconds = attention_seconds;
    t.relayout_seconds = relayout_seconds;
    detail::check(packinfer_scheduler_record(h_.get(), &t));
  }
  SchedulerStats stats() const {
    SchedulerStats s{};
    s.struct_size = sizeof(s);
    detail::check(packinfer_scheduler_stats(h_.get(), &s));
    return s;
  }

  PackinferScheduler handle() const noexcept { return h_.get(); }
  explicit operator bool() const noexcept { return static_cast<bool>(h_); }
  PackinferScheduler release() noexcept { return h_.release(); }
  void reset() { h_.reset(); }

 private:
  // The request count for the C API: both arrays pair up, and fit its uint32.
  static uint32_t count(const char* where, ArrayView<SequenceId> seq_ids, ArrayView<uint32_t> num_new_tokens) {
    if (seq_ids.size() != num_new_tokens.size()) {
      detail::invalid_argument(where, "num_new_tokens has " + std::to_string(num_new_tokens.size()) + " entries but seq_ids has " +
                                          std::to_string(seq_ids.size()) + "; they pair up one to one");
    }
    if (seq_ids.size() > UINT32_MAX) {
      detail::invalid_argument(where, std::to_string(seq_ids.size()) + " entries are more than the C API's uint32 count");
    }
    return static_cast<uint32_t>(seq_ids.size());
  }
  SchedulerHandle h_;
};

// The library this program runs against.
inline uint32_t abi_version() noexcept { return packinfer_abi_version(); }
inline const char* version() noexcept { return packinfer_version(); }
// Whether the library loaded at run time implements the ABI this header was generated for.
inline bool abi_matches() noexcept { return packinfer_abi_version() == PACKINFER_ABI_VERSION; }

}  // namespace packinfer

#endif  // PACKINFER_HPP
