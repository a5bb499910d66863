// Stress and fuzz harness for the C ABI (include/packinfer.h), called directly (not through
// packinfer.hpp). Random call sequences are checked against a model: the statuses each call may
// return, the last error of every failing call, and, for the managed KV pool, the contents of
// every sequence (each token's K/V is a function of a per-write nonce), verified by planning a
// step from the pool, running it and comparing with attention computed here from the model.
// Directed cases reproduce known classes of defects (shared pages rewritten, negative page
// indices, allocation bombs, deep fork combs, thread-exit destructors, handle generations,
// 32-bit lengths, unchecked layout helpers, inconsistent statuses).
//
// Every phase and case runs in a child process (this program again, with --phase), so a crash,
// an abort or a hang is reported with the seed, the step and the call, and the other phases
// still run. Replay: `stress_test --seed N` (all), `--only api,pool` (some), or `--phase api
// --seed N` (one phase in this process, for a debugger). The multi-threaded phase replays
// each thread's choices but not their interleaving.
//
// Environment (flags win): PACKINFER_STRESS_SEED, PACKINFER_STRESS_CALLS (budget of the random
// phases, default 2M), PACKINFER_STRESS_SECONDS (their time cap, default 90; 300 under
// sanitizers), PACKINFER_STRESS_BACKEND=cpu|cuda, PACKINFER_STRESS_THREADS (default 4),
// PACKINFER_STRESS_ONLY (comma list). For debugging a replay: --trace prints every step, and
// PACKINFER_STRESS_DEBUG=1 prints every failure (not the first two of each kind), checks the
// pool's counters after every step and dumps the pool model when they disagree.
#include "packinfer.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <climits>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <dlfcn.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define STRESS_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define STRESS_ASAN 1
#endif
#endif
#ifndef STRESS_ASAN
#define STRESS_ASAN 0
#endif

namespace {

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

struct Config {
  uint64_t seed = 0;
  uint64_t calls = 2000000;  // random phases together
  double seconds = STRESS_ASAN ? 300.0 : 90.0;
  bool cuda = false;
  int threads = 4;
  std::string phase;  // child mode: run this one phase or case here
  std::string only;   // parent mode: comma list of phases/cases to run
  int report_fd = -1;
  bool trace = false;  // print every step (for replays)
  std::string self;    // path of this program, for children
};
Config g_cfg;

// ---------------------------------------------------------------------------------------------
// Random numbers (splitmix64: tiny state, so a seed replays exactly)
// ---------------------------------------------------------------------------------------------

uint64_t splitmix(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
uint64_t mix(uint64_t a, uint64_t b) { return splitmix(a ^ splitmix(b + 0x632BE59BD9B4E019ull)); }

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(splitmix(seed)) {}
  uint64_t next() { return splitmix(s += 0x9E3779B97F4A7C15ull); }
  uint32_t below(uint64_t n) { return n ? (uint32_t)(next() % n) : 0; }
  int range(int lo, int hi) { return lo + (int)below((uint64_t)(hi - lo + 1)); }  // inclusive
  bool chance(unsigned percent) { return below(100) < percent; }
  bool one_in(unsigned n) { return below(n) == 0; }
  template <class T> const T& pick(const std::vector<T>& v) { return v[below(v.size())]; }
};

// ---------------------------------------------------------------------------------------------
// Where we are, for reports: each worker thread owns a slot that its crash handler and the
// watchdog print. Only static strings and integers, so a signal handler can print it.
// ---------------------------------------------------------------------------------------------

struct Where {
  const char* phase = "";
  int thread = 0;
  uint64_t seed = 0;
  std::atomic<uint64_t> step{0};
  const char* op = "";
  const char* call = "";
  char detail[240] = {0};
};
Where g_where[64];
std::atomic<int> g_nwhere{0};
thread_local Where* tw = nullptr;
std::atomic<uint64_t> g_calls{0};
std::atomic<uint64_t> g_progress{0};

// What the checks covered (printed per phase): rows compared, prefix matches, ...
std::mutex g_cover_mu;
std::map<std::string, uint64_t> g_cover;
void cover(const char* what, uint64_t n = 1) {
  std::lock_guard<std::mutex> l(g_cover_mu);
  g_cover[what] += n;
}

Where* enter_worker(const char* phase, int thread, uint64_t seed) {
  int i = g_nwhere.fetch_add(1);
  if (i >= 64) i = 63;
  Where* w = &g_where[i];
  w->phase = phase;
  w->thread = thread;
  w->seed = g_cfg.seed;  // what a replay takes (threads derive theirs from it)
  (void)seed;
  w->step = 0;
  w->op = "start";
  w->call = "";
  tw = w;
  return w;
}

// Every C API call goes through API(): counted, and named in reports.
#define API(fn, ...) (tw->call = #fn, g_calls.fetch_add(1, std::memory_order_relaxed), fn(__VA_ARGS__))

void set_detail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void set_detail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(tw->detail, sizeof tw->detail, fmt, ap);
  va_end(ap);
}

void trace_step() {
  if (g_cfg.trace) fprintf(stderr, "[%s %d] step %" PRIu64 " %s: %s\n", tw->phase, tw->thread, tw->step.load(), tw->op, tw->detail);
}

// Async-signal-safe printing of the where-record (write(2) and hand-made numbers only).
void raw_write(const char* s) {
  ssize_t r = write(2, s, strlen(s));
  (void)r;
}
void raw_u64(uint64_t v) {
  char buf[24];
  int i = 23;
  buf[i] = 0;
  do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v && i > 0);
  raw_write(buf + i);
}
void raw_where(const Where* w) {
  raw_write("  phase ");
  raw_write(w->phase);
  raw_write(", thread ");
  raw_u64((uint64_t)w->thread);
  raw_write(", seed ");
  raw_u64(w->seed);
  raw_write(", step ");
  raw_u64(w->step.load());
  raw_write(", op ");
  raw_write(w->op);
  raw_write(", call ");
  raw_write(w->call);
  raw_write("\n  detail: ");
  raw_write(w->detail);
  raw_write("\n");
}

void replay_hint(const Where* w) {
  raw_write("  replay: stress_test --phase ");
  raw_write(w->phase);
  raw_write(" --seed ");
  raw_u64(w->seed);
  raw_write(g_cfg.cuda ? " --backend cuda\n" : "\n");
}

// The child's call count for the parent, also from a crash handler (write(2) only).
void report_calls() {
  if (g_cfg.report_fd < 0) return;
  char line[40] = "calls ";
  char num[24];
  int i = 23;
  num[i] = 0;
  uint64_t v = g_calls.load();
  do { num[--i] = (char)('0' + v % 10); v /= 10; } while (v && i > 0);
  strcat(line, num + i);
  strcat(line, "\n");
  ssize_t w = write(g_cfg.report_fd, line, strlen(line));
  (void)w;
  g_cfg.report_fd = -1;
}

void crash_handler(int sig) {
  report_calls();
  raw_write("\nstress_test: CRASH: signal ");
  raw_u64((uint64_t)sig);
  raw_write(sig == SIGABRT ? " (abort)" : sig == SIGSEGV ? " (segmentation fault)" : sig == SIGBUS ? " (bus error)" : "");
  raw_write(" during a C API call\n");
  if (tw) {
    raw_where(tw);
    replay_hint(tw);
  }
  signal(sig, SIG_DFL);
  raise(sig);
}

extern "C" void __sanitizer_set_death_callback(void (*)(void)) __attribute__((weak));
void sanitizer_death() {
  report_calls();
  raw_write("\nstress_test: the sanitizer stopped the program\n");
  if (tw) {
    raw_where(tw);
    replay_hint(tw);
  }
}

// An alternate signal stack for this thread, so that a stack overflow still gets its report;
// given back before its memory is. The sanitizer keeps its own (and unmaps it at thread exit,
// so it must not be replaced).
struct AltStack {
  std::vector<char> mem;
  stack_t old{};
  bool set = false;
  AltStack() {
    if (STRESS_ASAN) return;
    mem.resize(1 << 16);
    stack_t ss{};
    ss.ss_sp = mem.data();
    ss.ss_size = mem.size();
    set = sigaltstack(&ss, &old) == 0;
  }
  ~AltStack() {
    if (!set) return;
    stack_t off{};
    off.ss_flags = SS_DISABLE;
    sigaltstack((old.ss_flags & SS_DISABLE) ? &off : &old, nullptr);
  }
  AltStack(const AltStack&) = delete;
  AltStack& operator=(const AltStack&) = delete;
};

void install_crash_handlers() {
  static AltStack main_stack;
  struct sigaction sa{};
  sa.sa_handler = crash_handler;
  sa.sa_flags = SA_ONSTACK | SA_RESETHAND;
  sigaction(SIGABRT, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
  sigaction(SIGFPE, &sa, nullptr);
  sigaction(SIGILL, &sa, nullptr);
  if (STRESS_ASAN) {
    if (__sanitizer_set_death_callback) __sanitizer_set_death_callback(sanitizer_death);
  } else {
    sigaction(SIGSEGV, &sa, nullptr);
  }
}

// ---------------------------------------------------------------------------------------------
// Failures: each check has a short id; the first failure of each id is printed in full, later
// ones are counted. A failure ends the current step (StepFailed), the phase resynchronises.
// ---------------------------------------------------------------------------------------------

struct StepFailed {};
std::mutex g_fail_mu;
std::map<std::string, std::pair<uint64_t, std::string>> g_fail_counts;  // id -> (count, first where)
std::atomic<uint64_t> g_failures{0};

[[noreturn]] void fail(const std::string& id, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
[[noreturn]] void fail(const std::string& id, const char* fmt, ...) {
  char msg[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  g_failures++;
  {
    std::lock_guard<std::mutex> lock(g_fail_mu);
    auto& e = g_fail_counts[id];
    static const bool all = getenv("PACKINFER_STRESS_DEBUG") != nullptr;
    if (e.first++ < 2 || all) {
      char where[512];
      snprintf(where, sizeof where, "phase %s, thread %d, seed %" PRIu64 ", step %" PRIu64 ", op %s, call %s", tw->phase, tw->thread,
               tw->seed, tw->step.load(), tw->op, tw->call);
      if (e.first == 1) e.second = where;
      fprintf(stderr, "\nstress_test: FAIL [%s]: %s\n  %s\n  detail: %s\n  replay: stress_test --phase %s --seed %" PRIu64 "%s\n", id.c_str(), msg,
              where, tw->detail, tw->phase, tw->seed, g_cfg.cuda ? " --backend cuda" : "");
      fflush(stderr);
    }
  }
  throw StepFailed{};
}

// ---------------------------------------------------------------------------------------------
// Statuses
// ---------------------------------------------------------------------------------------------

using Allowed = uint32_t;
constexpr Allowed bit(PackinferStatus s) { return 1u << (unsigned)s; }
constexpr Allowed S_OK = bit(PACKINFER_STATUS_OK);
constexpr Allowed S_INVALID = bit(PACKINFER_STATUS_INVALID_ARGUMENT);
constexpr Allowed S_HANDLE = bit(PACKINFER_STATUS_INVALID_HANDLE);
constexpr Allowed S_UNSUP = bit(PACKINFER_STATUS_UNSUPPORTED);
constexpr Allowed S_OOM = bit(PACKINFER_STATUS_OUT_OF_MEMORY);
constexpr Allowed S_EXHAUSTED = bit(PACKINFER_STATUS_POOL_EXHAUSTED);

std::string allowed_names(Allowed a) {
  std::string s;
  for (unsigned i = 0; i < 16; i++)
    if (a & (1u << i)) {
      if (!s.empty()) s += " or ";
      s += packinfer_status_string(i);
    }
  return s.empty() ? "nothing" : s;
}

const char* status_name(PackinferStatus s) { return packinfer_status_string((uint32_t)s); }

// Checks a call's status against what the model allows, and that a failure left a message
// that names the function ("packinfer_x: ..."). INTERNAL (a caught panic) is never allowed.
PackinferStatus expect(const char* fn, PackinferStatus got, Allowed allowed, const char* why) {
  if (got == PACKINFER_STATUS_OK) {
    if (!(allowed & S_OK))
      fail(std::string("status: ") + fn + " OK for " + why, "%s returned OK, expected %s (%s)", fn, allowed_names(allowed).c_str(), why);
    return got;
  }
  const char* call = tw->call;
  const char* msg = API(packinfer_last_error);
  tw->call = call;  // reports name the call that failed, not this one
  if (msg == nullptr) fail("last_error", "%s failed with %s and packinfer_last_error() returned NULL", fn, status_name(got));
  if (!((1u << (unsigned)got) & allowed) || got == PACKINFER_STATUS_INTERNAL)
    fail(std::string("status: ") + fn + " " + (status_name(got) + 17) + " for " + why, "%s returned %s (\"%s\"), expected %s (%s)", fn,
         status_name(got), msg, allowed_names(allowed).c_str(), why);
  size_t n = strlen(fn);
  if (msg[0] == 0) fail("last_error", "%s failed with %s but the last error is empty", fn, status_name(got));
  if (strncmp(msg, fn, n) != 0 || msg[n] != ':')
    fail("last_error", "%s failed with %s but the last error does not name it: \"%s\"", fn, status_name(got), msg);
  return got;
}

// ---------------------------------------------------------------------------------------------
// Element types. Every K/V/Q value here is a multiple of 1/64 in [-1, 1], exact in f32, f16 and
// bf16, so the model's values are the stored values on every backend.
// ---------------------------------------------------------------------------------------------

size_t dtype_bytes(uint32_t dt) { return dt == PACKINFER_DTYPE_F32 ? 4 : 2; }

uint16_t f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC1;  // NaN stays NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
uint16_t f32_to_f16(float f) {
  if (std::isnan(f)) return 0x7E01;
  uint32_t u;
  memcpy(&u, &f, 4);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  float a = std::fabs(f);
  if (a >= 65520.0f) return (uint16_t)(sign | 0x7C00u);
  if (a < 6.103515625e-05f) return (uint16_t)(sign | (uint16_t)std::lrint(a * 16777216.0f));
  uint32_t exp = ((u >> 23) & 0xFFu) - 127u + 15u, mant = u & 0x7FFFFFu;
  uint32_t h = (exp << 10) | (mant >> 13), rest = mant & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
  return (uint16_t)(sign | h);
}
float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  float f;
  if (exp == 0) return (sign ? -1.0f : 1.0f) * (float)mant / 16777216.0f;
  uint32_t u = exp == 31 ? (sign | 0x7F800000u | (mant << 13)) : (sign | ((exp - 15 + 127) << 23) | (mant << 13));
  memcpy(&f, &u, 4);
  return f;
}
void store_elem(void* buf, size_t i, uint32_t dt, float x) {
  if (dt == PACKINFER_DTYPE_F32) ((float*)buf)[i] = x;
  else if (dt == PACKINFER_DTYPE_F16) ((uint16_t*)buf)[i] = f32_to_f16(x);
  else ((uint16_t*)buf)[i] = f32_to_bf16(x);
}
float load_elem(const void* buf, size_t i, uint32_t dt) {
  if (dt == PACKINFER_DTYPE_F32) return ((const float*)buf)[i];
  if (dt == PACKINFER_DTYPE_F16) return f16_to_f32(((const uint16_t*)buf)[i]);
  return bf16_to_f32(((const uint16_t*)buf)[i]);
}
// A sentinel no computation produces, compared bitwise: an element the library must not write.
void store_sentinel(void* buf, size_t i, uint32_t dt) {
  if (dt == PACKINFER_DTYPE_F32) {
    uint32_t u = 0x7FA5A5A5u;
    memcpy((char*)buf + 4 * i, &u, 4);
  } else {
    ((uint16_t*)buf)[i] = 0x7DA5;
  }
}
bool is_sentinel(const void* buf, size_t i, uint32_t dt) {
  if (dt == PACKINFER_DTYPE_F32) {
    uint32_t u;
    memcpy(&u, (const char*)buf + 4 * i, 4);
    return u == 0x7FA5A5A5u;
  }
  return ((const uint16_t*)buf)[i] == 0x7DA5;
}
float random_value(Rng& r) { return (float)((int)r.below(129) - 64) / 64.0f; }
// The K (or V) value of a token written with nonce `tag`: what the pool model predicts.
float tag_value(uint64_t tag, uint32_t layer, uint32_t head, uint32_t dim, bool is_v) {
  uint64_t h = mix(mix(tag, layer * 2u + (is_v ? 1u : 0u)), (uint64_t)head * 65536u + dim);
  return (float)((int)(h % 129) - 64) / 64.0f;
}
double tolerance(uint32_t dt) { return dt == PACKINFER_DTYPE_F32 ? 2e-4 : dt == PACKINFER_DTYPE_F16 ? 4e-3 : 2e-2; }

}  // namespace

namespace {

// ---------------------------------------------------------------------------------------------
// Memory the library reads and writes: host memory on the CPU backend, device memory (through
// the driver API, loaded at run time so the CPU build needs no CUDA) on the CUDA backend. Every
// buffer has 256 guard bytes of 0xFF on both sides: NaN in every dtype, so a read outside a K/V
// cache shows in the output, and a write outside an output changes them.
// ---------------------------------------------------------------------------------------------

struct CudaApi {
  using CUdeviceptr = unsigned long long;
  int (*cuInit)(unsigned) = nullptr;
  int (*cuDeviceGet)(int*, int) = nullptr;
  int (*cuDevicePrimaryCtxRetain)(void**, int) = nullptr;
  int (*cuCtxSetCurrent)(void*) = nullptr;
  int (*cuMemAlloc)(CUdeviceptr*, size_t) = nullptr;
  int (*cuMemFree)(CUdeviceptr) = nullptr;
  int (*cuMemcpyHtoD)(CUdeviceptr, const void*, size_t) = nullptr;
  int (*cuMemcpyDtoH)(void*, CUdeviceptr, size_t) = nullptr;
  int (*cuCtxSynchronize)() = nullptr;
  void* ctx = nullptr;

  void load() {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!lib) die("cannot load libcuda.so.1: %s", dlerror());
    auto sym = [&](const char* name) {
      void* p = dlsym(lib, name);
      if (!p) die("libcuda.so.1 has no %s", name);
      return p;
    };
    cuInit = (int (*)(unsigned))sym("cuInit");
    cuDeviceGet = (int (*)(int*, int))sym("cuDeviceGet");
    cuDevicePrimaryCtxRetain = (int (*)(void**, int))sym("cuDevicePrimaryCtxRetain");
    cuCtxSetCurrent = (int (*)(void*))sym("cuCtxSetCurrent");
    cuMemAlloc = (int (*)(CUdeviceptr*, size_t))sym("cuMemAlloc_v2");
    cuMemFree = (int (*)(CUdeviceptr))sym("cuMemFree_v2");
    cuMemcpyHtoD = (int (*)(CUdeviceptr, const void*, size_t))sym("cuMemcpyHtoD_v2");
    cuMemcpyDtoH = (int (*)(void*, CUdeviceptr, size_t))sym("cuMemcpyDtoH_v2");
    cuCtxSynchronize = (int (*)())sym("cuCtxSynchronize");
    int dev = 0;
    check(cuInit(0), "cuInit");
    check(cuDeviceGet(&dev, 0), "cuDeviceGet");
    // The library runs on the device's primary context; so does this program.
    check(cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    bind_thread();
  }
  void bind_thread() { check(cuCtxSetCurrent(ctx), "cuCtxSetCurrent"); }
  void sync() { check(cuCtxSynchronize(), "cuCtxSynchronize (a kernel or copy of the library failed)"); }
  void check(int r, const char* what) {
    if (r != 0) die("%s failed with CUDA error %d", what, r);
  }
  [[noreturn]] static void die(const char* fmt, ...) __attribute__((format(printf, 1, 2))) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "stress_test: CUDA: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    if (tw) raw_where(tw);
    abort();
  }
};
CudaApi g_cuda;

constexpr size_t kGuard = 256;

struct Buf {
  std::vector<unsigned char> host;  // guard + payload + guard, the host image of the buffer
  unsigned long long dev = 0;
  size_t bytes = 0;

  explicit Buf(size_t n) : host(n + 2 * kGuard, 0xFF), bytes(n) {
    if (g_cfg.cuda) {
      g_cuda.check(g_cuda.cuMemAlloc(&dev, host.size()), "cuMemAlloc");
      upload();
    }
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() {
    if (dev) g_cuda.cuMemFree(dev);
  }
  unsigned char* h() { return host.data() + kGuard; }
  const unsigned char* h() const { return host.data() + kGuard; }
  // The address handed to the library.
  void* ptr() const { return g_cfg.cuda ? (void*)(uintptr_t)(dev + kGuard) : (void*)(host.data() + kGuard); }
  void upload() {
    if (g_cfg.cuda) g_cuda.check(g_cuda.cuMemcpyHtoD(dev, host.data(), host.size()), "cuMemcpyHtoD");
  }
  void download() {
    if (g_cfg.cuda) g_cuda.check(g_cuda.cuMemcpyDtoH(host.data(), dev, host.size()), "cuMemcpyDtoH");
  }
  bool guards_intact() const {
    for (size_t i = 0; i < kGuard; i++)
      if (host[i] != 0xFF || host[kGuard + bytes + i] != 0xFF) return false;
    return true;
  }
};

// ---------------------------------------------------------------------------------------------
// Reference attention, in double: one query row of one head over `visible` keys.
// ---------------------------------------------------------------------------------------------

template <class KeyFn, class ValFn>
void attend_row(const float* q, uint32_t d, int visible, double scale, KeyFn key, ValFn val, double* out, double* lse) {
  thread_local std::vector<double> scores;
  scores.resize((size_t)std::max(visible, 1));
  double m = -INFINITY, z = 0.0;
  for (int j = 0; j < visible; j++) {
    double dot = 0.0;
    for (uint32_t e = 0; e < d; e++) dot += (double)q[e] * key(j, e);
    scores[(size_t)j] = dot * scale;
    m = std::max(m, scores[(size_t)j]);
  }
  for (uint32_t e = 0; e < d; e++) out[e] = 0.0;
  if (visible == 0) {  // no key: the library's convention is O = 0, LSE = -inf
    *lse = -INFINITY;
    return;
  }
  for (int j = 0; j < visible; j++) z += std::exp(scores[(size_t)j] - m);
  for (int j = 0; j < visible; j++) {
    double p = std::exp(scores[(size_t)j] - m) / z;
    for (uint32_t e = 0; e < d; e++) out[e] += p * val(j, e);
  }
  *lse = m + std::log(z);
}

bool close_enough(double got, double want, double tol) { return std::fabs(got - want) <= tol * (1.0 + std::fabs(want)); }

// Q, O and LSE of one run, with random strides; checks O and LSE against `ref` (called for
// each (token, head) row) and that nothing outside the rows was written.
struct RunIo {
  uint32_t total_q, heads, d, dt;
  int64_t q_st, q_sh, o_st, o_sh;  // element strides passed (0 = contiguous)
  int64_t q_et, q_eh, o_et, o_eh;  // effective strides
  std::unique_ptr<Buf> q, o, lse;
  std::vector<float> qf;  // Q as floats, contiguous

  RunIo(Rng& r, uint32_t total_q_, uint32_t heads_, uint32_t d_, uint32_t dt_) : total_q(total_q_), heads(heads_), d(d_), dt(dt_) {
    auto strides = [&](int64_t& st, int64_t& sh, int64_t& et, int64_t& eh) {
      st = sh = 0;
      eh = d;
      if (r.chance(25)) sh = eh = d + 8 * r.range(0, 2);
      et = (int64_t)heads * eh;
      if (r.chance(25)) st = et = et + r.range(0, 5) * 8;
      else if (sh != 0 && r.chance(50)) st = et;
    };
    strides(q_st, q_sh, q_et, q_eh);
    strides(o_st, o_sh, o_et, o_eh);
    size_t es = dtype_bytes(dt);
    size_t qn = std::max<size_t>(1, (size_t)total_q * (size_t)q_et), on = std::max<size_t>(1, (size_t)total_q * (size_t)o_et);
    q = std::make_unique<Buf>(qn * es);
    o = std::make_unique<Buf>(on * es);
    lse = std::make_unique<Buf>(std::max<size_t>(1, (size_t)total_q * heads) * 4);
    qf.assign((size_t)total_q * heads * d, 0.0f);
    for (size_t i = 0; i < qn; i++) store_sentinel(q->h(), i, dt);
    for (uint32_t t = 0; t < total_q; t++)
      for (uint32_t h = 0; h < heads; h++)
        for (uint32_t e = 0; e < d; e++) {
          float x = random_value(r);
          qf[((size_t)t * heads + h) * d + e] = x;
          store_elem(q->h(), (size_t)t * q_et + (size_t)h * q_eh + e, dt, x);
        }
    for (size_t i = 0; i < on; i++) store_sentinel(o->h(), i, dt);
    for (size_t i = 0; i < std::max<size_t>(1, (size_t)total_q * heads); i++) store_sentinel(lse->h(), i, PACKINFER_DTYPE_F32);
    q->upload();
    o->upload();
    lse->upload();
  }
  const float* qrow(uint32_t t, uint32_t h) const { return &qf[((size_t)t * heads + h) * d]; }
  void fill_args(PackinferRunArgs& a, bool with_lse) const {
    a.q = q->ptr();
    a.q_stride_token = q_st;
    a.q_stride_head = q_sh;
    a.o = o->ptr();
    a.o_stride_token = o_st;
    a.o_stride_head = o_sh;
    a.lse = with_lse ? (float*)lse->ptr() : nullptr;
  }
  // `ref(t, h, out, lse)` gives the reference of row (t, h). Fails the step on any mismatch.
  uint64_t rows_checked = 0;
  std::function<std::string(uint32_t)> row_name;  // names a query row in failures
  template <class RefFn>
  void verify(const char* what, bool with_lse, RefFn ref) {
    o->download();
    lse->download();
    if (!o->guards_intact() || !lse->guards_intact()) fail("output bounds", "%s: the run wrote outside the O or LSE buffer", what);
    std::vector<double> want(d);
    std::vector<char> is_row((size_t)std::max<int64_t>(1, (int64_t)total_q * o_et), 0);
    for (uint32_t t = 0; t < total_q; t++)
      for (uint32_t h = 0; h < heads; h++) {
        double want_lse = 0;
        ref(t, h, want.data(), &want_lse);
        for (uint32_t e = 0; e < d; e++) {
          size_t at = (size_t)t * o_et + (size_t)h * o_eh + e;
          is_row[at] = 1;
          if (e == 0) rows_checked++;
          double got = load_elem(o->h(), at, dt);
          if (!close_enough(got, want[e], tolerance(dt)))
            fail("attention output", "%s: O[token %u, head %u, dim %u] = %.6f, reference %.6f%s", what, t, h, e, got, want[e],
                 row_name ? row_name(t).c_str() : "");
        }
        if (with_lse) {
          double got = ((const float*)lse->h())[(size_t)t * heads + h];
          bool ok = std::isinf(want_lse) ? (std::isinf(got) && got < 0) : close_enough(got, want_lse, dt == PACKINFER_DTYPE_F32 ? 2e-4 : 2e-3);
          if (!ok) fail("attention lse", "%s: LSE[token %u, head %u] = %.6f, reference %.6f", what, t, h, got, want_lse);
        } else if (total_q > 0 && !is_sentinel(lse->h(), (size_t)t * heads + h, PACKINFER_DTYPE_F32)) {
          fail("output bounds", "%s: the run wrote LSE although args.lse was NULL", what);
        }
      }
    for (size_t i = 0; i < (size_t)total_q * (size_t)o_et; i++)
      if (!is_row[i] && !is_sentinel(o->h(), i, dt))
        fail("output bounds", "%s: the run wrote O element %zu, between rows (strides %" PRId64 ", %" PRId64 ")", what, i, o_st, o_sh);
  }
};

// ---------------------------------------------------------------------------------------------
// A batch in a paged cache the caller owns (packinfer_plan_create's level).
// ---------------------------------------------------------------------------------------------

struct Shape {
  uint32_t qo_heads = 1, kv_heads = 1, head_dim = 8, dtype = PACKINFER_DTYPE_F32;
  bool causal = true;
  float sm_scale = 0.0f;
  uint32_t page_size = 4;
  bool operator==(const Shape& o) const {
    return qo_heads == o.qo_heads && kv_heads == o.kv_heads && head_dim == o.head_dim && dtype == o.dtype && causal == o.causal &&
           sm_scale == o.sm_scale && page_size == o.page_size;
  }
  double scale() const { return sm_scale == 0.0f ? 1.0 / std::sqrt((double)head_dim) : (double)sm_scale; }
};

Shape random_shape(Rng& r) {
  Shape s;
  s.kv_heads = r.chance(70) ? 1 : 2;
  s.qo_heads = s.kv_heads * (uint32_t)(r.chance(60) ? 1 : r.range(2, 3));
  if (g_cfg.cuda) {
    s.head_dim = r.chance(70) ? 64 : 128;
    s.dtype = r.chance(50) ? PACKINFER_DTYPE_BF16 : PACKINFER_DTYPE_F16;
  } else {
    s.head_dim = r.chance(80) ? 8 : 16;
    s.dtype = r.chance(80) ? PACKINFER_DTYPE_F32 : (r.chance(50) ? PACKINFER_DTYPE_F16 : PACKINFER_DTYPE_BF16);
  }
  s.causal = r.chance(70);
  s.sm_scale = r.chance(70) ? 0.0f : (float)r.range(1, 16) / 16.0f;
  s.page_size = r.chance(85) ? (uint32_t)r.range(1, 8) : 16;
  return s;
}

struct BatchCase {
  Shape sh;
  uint32_t num_pages = 0, buffer_pages = 0;
  int n = 0;
  std::vector<int32_t> qo_indptr, kv_indptr, pages, last;
  std::vector<int> q_len, kv_len;
  std::vector<std::vector<int32_t>> members;
  std::vector<PackinferPrefixGroup> groups;
  bool hnd = false;
  std::unique_ptr<Buf> k, v;
  std::vector<float> kf, vf;  // host floats of the cache, for the reference
  uint32_t total_q = 0;

  BatchCase() = default;
  BatchCase(const BatchCase&) = delete;
  size_t elem(uint32_t page, uint32_t tok, uint32_t head, uint32_t dim) const {
    if (hnd) return (((size_t)page * sh.kv_heads + head) * sh.page_size + tok) * sh.head_dim + dim;
    return (((size_t)page * sh.page_size + tok) * sh.kv_heads + head) * sh.head_dim + dim;
  }
  // Key j of request r, head h, dim e (K or V).
  double at(const std::vector<float>& f, int r, int j, uint32_t h, uint32_t e) const {
    uint32_t page = (uint32_t)pages[(size_t)kv_indptr[(size_t)r] + (size_t)j / sh.page_size];
    return f[elem(page, (uint32_t)j % sh.page_size, h, e)];
  }
  PackinferBatchDesc desc() const {
    PackinferBatchDesc d;
    memset(&d, 0, sizeof d);
    d.struct_size = sizeof d;
    d.batch_size = (uint32_t)n;
    d.qo_indptr = qo_indptr.data();
    d.kv_indptr = kv_indptr.data();
    d.kv_page_indices = pages.empty() ? nullptr : pages.data();
    d.kv_last_page_len = last.empty() ? nullptr : last.data();
    d.page_size = sh.page_size;
    d.num_pages = num_pages;
    d.num_qo_heads = sh.qo_heads;
    d.num_kv_heads = sh.kv_heads;
    d.head_dim = sh.head_dim;
    d.dtype = sh.dtype;
    d.causal = sh.causal;
    d.sm_scale = sh.sm_scale;
    d.num_prefix_groups = (uint32_t)groups.size();
    d.prefix_groups = groups.empty() ? nullptr : groups.data();
    return d;
  }
  // The reference of query row `t` (batch-wide token), head `h`.
  void reference(uint32_t t, uint32_t h, double* out, double* lse) const {
    int r = 0;
    while (r + 1 <= n && (uint32_t)qo_indptr[(size_t)r + 1] <= t) r++;
    int i = (int)t - qo_indptr[(size_t)r];
    int visible = sh.causal ? kv_len[(size_t)r] - q_len[(size_t)r] + i + 1 : kv_len[(size_t)r];
    uint32_t kvh = h / (sh.qo_heads / sh.kv_heads);
    attend_row(
        qrow_ptr(t, h), sh.head_dim, visible, sh.scale(), [&](int j, uint32_t e) { return at(kf, r, j, kvh, e); },
        [&](int j, uint32_t e) { return at(vf, r, j, kvh, e); }, out, lse);
  }
  const RunIo* io = nullptr;  // the Q of the run being verified
  const float* qrow_ptr(uint32_t t, uint32_t h) const { return io->qrow(t, h); }
};

// A random valid batch; `like` fixes the shape (a plan for packinfer_launch_update).
std::shared_ptr<BatchCase> make_batch(Rng& r, const Shape* like) {
  auto c = std::make_shared<BatchCase>();
  c->sh = like ? *like : random_shape(r);
  const uint32_t ps = c->sh.page_size;
  c->n = r.range(0, 5);
  c->qo_indptr.assign(1, 0);
  c->kv_indptr.assign(1, 0);
  int maxkv = g_cfg.cuda ? 300 : 48;
  for (int i = 0; i < c->n; i++) {
    int kv = r.chance(8) ? 0 : r.range(1, std::min<int>(maxkv, (int)(4 * ps + 3)) + (r.chance(10) ? maxkv / 2 : 0));
    int q;
    if (c->sh.causal) q = r.range(0, std::min(kv, 6));
    else q = kv == 0 ? r.range(0, 1) : r.range(0, 6);
    c->kv_len.push_back(kv);
    c->q_len.push_back(q);
  }
  // A prefix group: members share the first pages of the first member.
  std::vector<int> share_with((size_t)c->n, -1);
  int share_pages = 0;
  std::vector<int> full;
  for (int i = 0; i < c->n; i++)
    if (c->kv_len[(size_t)i] >= (int)ps) full.push_back(i);
  if (full.size() >= 2 && r.chance(35)) {
    for (size_t i = full.size() - 1; i > 0; i--) std::swap(full[i], full[r.below(i + 1)]);
    size_t m = (size_t)r.range(2, (int)full.size());
    full.resize(m);
    int min_full = INT_MAX, min_kv = INT_MAX;
    for (int x : full) {
      min_full = std::min(min_full, c->kv_len[(size_t)x] / (int)ps);
      min_kv = std::min(min_kv, c->kv_len[(size_t)x]);
    }
    share_pages = r.range(1, min_full);
    c->members.push_back(std::vector<int32_t>(full.begin(), full.end()));
    for (size_t j = 1; j < full.size(); j++) share_with[(size_t)full[j]] = full[0];
    PackinferPrefixGroup g;
    g.prefix_len = (uint32_t)r.range(1, std::min(share_pages * (int)ps, min_kv));
    g.num_members = (uint32_t)m;
    g.members = c->members.back().data();
    c->groups.push_back(g);
  }
  uint32_t used = 0;
  for (int i = 0; i < c->n; i++) used += (uint32_t)((c->kv_len[(size_t)i] + (int)ps - 1) / (int)ps);
  c->buffer_pages = used + (uint32_t)r.range(0, 3);
  std::vector<int32_t> order(c->buffer_pages);
  for (uint32_t i = 0; i < c->buffer_pages; i++) order[i] = (int32_t)i;
  for (uint32_t i = c->buffer_pages; i > 1; i--) std::swap(order[i - 1], order[r.below(i)]);
  uint32_t next = 0;
  // The members' own requests must come after the first member's pages exist: build in order,
  // the first member first.
  std::vector<std::vector<int32_t>> table((size_t)c->n);
  std::vector<int> build;
  for (int i = 0; i < c->n; i++)
    if (share_with[(size_t)i] < 0) build.push_back(i);
  for (int i = 0; i < c->n; i++)
    if (share_with[(size_t)i] >= 0) build.push_back(i);
  for (int i : build) {
    int np = (c->kv_len[(size_t)i] + (int)ps - 1) / (int)ps;
    for (int p = 0; p < np; p++) {
      int src = share_with[(size_t)i];
      if (src >= 0 && p < share_pages) table[(size_t)i].push_back(table[(size_t)src][(size_t)p]);
      else table[(size_t)i].push_back(order[next++]);
    }
  }
  for (int i = 0; i < c->n; i++) {
    c->qo_indptr.push_back(c->qo_indptr.back() + c->q_len[(size_t)i]);
    c->pages.insert(c->pages.end(), table[(size_t)i].begin(), table[(size_t)i].end());
    c->kv_indptr.push_back((int32_t)c->pages.size());
    c->last.push_back(c->kv_len[(size_t)i] == 0 ? 0 : (c->kv_len[(size_t)i] - 1) % (int)ps + 1);
  }
  c->total_q = (uint32_t)c->qo_indptr.back();
  c->num_pages = c->buffer_pages + (r.chance(10) ? (uint32_t)r.range(1, 1000) : 0);
  c->hnd = r.chance(30);
  // The cache: referenced pages hold values; on the CPU the others hold NaN, so reading a page
  // the batch does not reference shows (GPU kernels may read whole blocks, so not there).
  size_t elems = (size_t)c->buffer_pages * ps * c->sh.kv_heads * c->sh.head_dim;
  size_t es = dtype_bytes(c->sh.dtype);
  c->k = std::make_unique<Buf>(std::max<size_t>(1, elems) * es);
  c->v = std::make_unique<Buf>(std::max<size_t>(1, elems) * es);
  c->kf.assign(elems, NAN);
  c->vf.assign(elems, NAN);
  std::vector<char> referenced(c->buffer_pages, 0);
  for (int32_t p : c->pages) referenced[(size_t)p] = 1;
  for (uint32_t p = 0; p < c->buffer_pages; p++) {
    bool poison = !referenced[p] && !g_cfg.cuda;
    for (uint32_t t = 0; t < ps; t++)
      for (uint32_t h = 0; h < c->sh.kv_heads; h++)
        for (uint32_t e = 0; e < c->sh.head_dim; e++) {
          size_t at = c->elem(p, t, h, e);
          float kx = poison ? NAN : random_value(r), vx = poison ? NAN : random_value(r);
          c->kf[at] = kx;
          c->vf[at] = vx;
          store_elem(c->k->h(), at, c->sh.dtype, kx);
          store_elem(c->v->h(), at, c->sh.dtype, vx);
        }
  }
  c->k->upload();
  c->v->upload();
  return c;
}

// The K/V layout of a case, through the library's helpers (whose strides are checked here).
PackinferKvLayout case_layout(const BatchCase& c) {
  PackinferKvLayout l;
  memset(&l, 0, sizeof l);
  const Shape& s = c.sh;
  PackinferStatus st = c.hnd ? API(packinfer_kv_layout_hnd, c.k->ptr(), c.v->ptr(), s.page_size, s.kv_heads, s.head_dim, &l)
                             : API(packinfer_kv_layout_nhd, c.k->ptr(), c.v->ptr(), s.page_size, s.kv_heads, s.head_dim, &l);
  expect(c.hnd ? "packinfer_kv_layout_hnd" : "packinfer_kv_layout_nhd", st, S_OK, "a valid cache shape");
  int64_t p = s.page_size, h = s.kv_heads, d = s.head_dim;
  bool ok = l.k == c.k->ptr() && l.v == c.v->ptr() && l.stride_dim == 1 && l.stride_page == p * h * d &&
            (c.hnd ? (l.stride_head == p * d && l.stride_token == d) : (l.stride_head == d && l.stride_token == h * d));
  if (!ok)
    fail("layout helper", "%s(page_size %u, heads %u, head_dim %u) gave strides (%" PRId64 ", %" PRId64 ", %" PRId64 ", %" PRId64 ")",
         c.hnd ? "hnd" : "nhd", s.page_size, s.kv_heads, s.head_dim, l.stride_page, l.stride_token, l.stride_head, l.stride_dim);
  return l;
}

// Runs `launch`, whose current plan is `c`'s, and checks the output.
void run_case(PackinferLaunch launch, BatchCase& c, Rng& r, const char* what) {
  RunIo io(r, c.total_q, c.sh.qo_heads, c.sh.head_dim, c.sh.dtype);
  PackinferRunArgs a;
  memset(&a, 0, sizeof a);
  a.struct_size = sizeof a;
  bool with_lse = r.chance(70);
  io.fill_args(a, with_lse);
  if (c.total_q == 0 && r.chance(50)) a.q = nullptr, a.o = nullptr;  // nothing to read or write
  a.kv = case_layout(c);
  expect("packinfer_run", API(packinfer_run, launch, &a), S_OK, what);
  c.io = &io;
  io.verify(what, with_lse, [&](uint32_t t, uint32_t h, double* out, double* lse) { c.reference(t, h, out, lse); });
  c.io = nullptr;
  cover("rows compared", io.rows_checked);
}

}  // namespace

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// A phase runs until it has made its share of the calls or spent its share of the time.
struct Budget {
  uint64_t start_calls, calls;
  Clock::time_point t0;
  double seconds;
  Budget(uint64_t calls_, double seconds_) : start_calls(g_calls.load()), calls(calls_), t0(Clock::now()), seconds(seconds_) {}
  bool done() const { return g_calls.load() - start_calls >= calls || seconds_since(t0) >= seconds; }
};

// What a call may return: `must` statuses when a mutation makes it fail, `may` statuses the
// API leaves open (a policy the harness does not pin down).
struct Expect {
  Allowed fails = 0, may = 0;
  bool must_fail = false;
  void must(Allowed a) {
    must_fail = true;
    fails |= a;
  }
  void maybe(Allowed a) { may |= a; }
  Allowed allowed() const { return must_fail ? ((fails | may) & ~S_OK) : (S_OK | may); }
};

PackinferContext make_context(uint32_t threads) {
  PackinferContextOptions o;
  expect("packinfer_context_options_default", API(packinfer_context_options_default, &o), S_OK, "defaults");
  if (o.struct_size != sizeof o || o.backend != PACKINFER_BACKEND_AUTO)
    fail("defaults", "context defaults: struct_size %zu, backend %u", o.struct_size, o.backend);
  o.backend = g_cfg.cuda ? PACKINFER_BACKEND_CUDA : PACKINFER_BACKEND_CPU;
  o.num_threads = threads;
  PackinferContext ctx{0};
  expect("packinfer_context_create", API(packinfer_context_create, &o, &ctx), S_OK, "a context of the backend under test");
  return ctx;
}

// ---------------------------------------------------------------------------------------------
// Handles: every live one the phase holds, and destroyed ones to use again.
// ---------------------------------------------------------------------------------------------

struct PlanRec {
  PackinferPlan h;
  std::shared_ptr<BatchCase> c;
  bool runnable;
};
struct LaunchRec {
  PackinferLaunch h;
  std::shared_ptr<BatchCase> c;  // the batch of the plan it runs now
  bool runnable;
  bool with_capacity;
  PackinferLaunchCapacity cap;
  std::shared_ptr<Buf> scratch;  // caller-owned scratch lives as long as the launch
};

enum Kind { K_CONTEXT, K_PLAN, K_LAUNCH, K_POOL };
const char* kind_name(int k) { return k == K_CONTEXT ? "context" : k == K_PLAN ? "plan" : k == K_LAUNCH ? "launch" : "pool"; }

struct Book {
  std::vector<PackinferContext> ctxs;
  std::vector<PlanRec> plans;
  std::vector<LaunchRec> launches;
  std::vector<PackinferPool> pools;
  std::vector<uint64_t> dead;  // destroyed handles, any kind

  bool live(uint64_t bits) const {
    for (auto& x : ctxs)
      if (x.bits == bits) return true;
    for (auto& x : plans)
      if (x.h.bits == bits) return true;
    for (auto& x : launches)
      if (x.h.bits == bits) return true;
    for (auto& x : pools)
      if (x.bits == bits) return true;
    return false;
  }
  uint64_t any_live(Rng& r, int kind) const {
    switch (kind) {
      case K_CONTEXT: return ctxs.empty() ? 0 : ctxs[r.below(ctxs.size())].bits;
      case K_PLAN: return plans.empty() ? 0 : plans[r.below(plans.size())].h.bits;
      case K_LAUNCH: return launches.empty() ? 0 : launches[r.below(launches.size())].h.bits;
      default: return pools.empty() ? 0 : pools[r.below(pools.size())].bits;
    }
  }
  void bury(uint64_t bits) {
    dead.push_back(bits);
    if (dead.size() > 512) dead.erase(dead.begin(), dead.begin() + 256);
  }
};

// A handle of `kind` that is not live: null, random, destroyed, another kind's, or a live one
// with its generation or index changed.
// With other threads making handles (`concurrent`), a neighbour's index is not forged: it may
// be another thread's live handle.
uint64_t forge(Rng& r, const Book& b, int kind, bool concurrent = false) {
  for (int attempt = 0; attempt < 20; attempt++) {
    uint64_t x = 0;
    unsigned how = r.below(7);
    if (concurrent && how == 5) how = 4;
    switch (how) {
      case 0: x = 0; break;
      case 1: x = r.next(); break;
      case 2: x = b.dead.empty() ? r.next() : b.dead[r.below(b.dead.size())]; break;
      case 3: x = b.any_live(r, (kind + 1 + (int)r.below(3)) % 4); break;
      case 4: x = b.any_live(r, kind) ^ (1ull << (32 + r.below(24))); break;
      case 5: x = b.any_live(r, kind) + 1 + r.below(3); break;
      case 6: x = (b.any_live(r, kind) & 0xFF00000000000000ull) | (r.next() & 0x00FFFFFFFFFFFFFFull); break;
    }
    if (x == 0 && attempt < 19 && r.chance(50)) continue;  // null is one choice among many
    if (!b.live(x)) return x;
  }
  return 0;
}

PackinferPoolOptions small_pool_options(Rng& r) {
  PackinferPoolOptions po;
  expect("packinfer_pool_options_default", API(packinfer_pool_options_default, &po), S_OK, "defaults");
  po.num_layers = 1 + r.below(2);
  po.num_kv_heads = r.chance(70) ? 1 : 2;
  po.num_qo_heads = po.num_kv_heads * (r.chance(50) ? 1 : 2);
  po.head_dim = g_cfg.cuda ? 64 : 8;
  po.dtype = g_cfg.cuda ? PACKINFER_DTYPE_F16 : PACKINFER_DTYPE_F32;
  po.page_size = (uint32_t)r.range(1, 8);
  po.num_pages = (uint32_t)r.range(8, 64);
  po.headroom_pages = r.below(3);
  return po;
}

// ---------------------------------------------------------------------------------------------
// Phase "api": contexts, plans, launches and runs from caller-owned caches, valid and mutated.
// ---------------------------------------------------------------------------------------------

// A batch description with its own arrays, for mutating.
struct MutableDesc {
  PackinferBatchDesc d;
  std::vector<int32_t> qo, kv, pages, last;
  std::vector<std::vector<int32_t>> members;
  std::vector<PackinferPrefixGroup> groups;
  bool null_qo = false, null_kv = false, null_pages = false, null_last = false, null_groups = false;
  int null_members = -1;
  explicit MutableDesc(const BatchCase& c)
      : d(c.desc()), qo(c.qo_indptr), kv(c.kv_indptr), pages(c.pages), last(c.last), members(c.members), groups(c.groups) {}
  void point() {
    d.qo_indptr = null_qo ? nullptr : qo.data();
    d.kv_indptr = null_kv ? nullptr : kv.data();
    d.kv_page_indices = null_pages || pages.empty() ? nullptr : pages.data();
    d.kv_last_page_len = null_last || last.empty() ? nullptr : last.data();
    for (size_t g = 0; g < groups.size(); g++) groups[g].members = (int)g == null_members ? nullptr : members[g].data();
    if (null_groups) d.prefix_groups = nullptr;
    else d.prefix_groups = groups.empty() ? nullptr : groups.data();
  }
};

struct ApiPhase {
  Rng r;
  Book b;
  PackinferPool pool{0};
  uint64_t pool_seq = 0;
  uint32_t pool_layers = 1, pool_kv_heads = 1, pool_head_dim = 8, pool_dtype = PACKINFER_DTYPE_F32;
  std::vector<unsigned char> dummy = std::vector<unsigned char>(4096, 0);

  PackinferContext keep{0};  // a context shared with other threads: used, never destroyed here
  bool concurrent = false;

  explicit ApiPhase(uint64_t seed) : r(seed) {}

  PackinferContext ctx() { return b.ctxs[r.below(b.ctxs.size())]; }
  uint64_t bad_handle(int kind) { return forge(r, b, kind, concurrent); }

  void setup() {
    tw->op = "setup";
    b.ctxs.push_back(keep.bits ? keep : make_context(1));
    PackinferPoolOptions po = small_pool_options(r);
    pool_layers = po.num_layers;
    pool_kv_heads = po.num_kv_heads;
    pool_head_dim = po.head_dim;
    pool_dtype = po.dtype;
    expect("packinfer_pool_create", API(packinfer_pool_create, b.ctxs[0], &po, &pool), S_OK, "a small pool for handle checks");
    b.pools.push_back(pool);
    expect("packinfer_pool_sequence_create", API(packinfer_pool_sequence_create, pool, &pool_seq), S_OK, "a sequence");
    expect("packinfer_pool_append", API(packinfer_pool_append, pool, pool_seq, 2, nullptr, nullptr), S_OK, "two tokens");
  }

  void teardown() {
    tw->op = "teardown";
    for (auto& l : b.launches) expect("packinfer_launch_destroy", API(packinfer_launch_destroy, l.h), S_OK, "a live launch");
    for (auto& p : b.plans) expect("packinfer_plan_destroy", API(packinfer_plan_destroy, p.h), S_OK, "a live plan");
    for (auto& p : b.pools) expect("packinfer_pool_destroy", API(packinfer_pool_destroy, p), S_OK, "a live pool");
    for (auto& c : b.ctxs)
      if (c.bits != keep.bits) expect("packinfer_context_destroy", API(packinfer_context_destroy, c), S_OK, "a live context");
    b = Book();
  }

  PackinferPlanOptions random_plan_options(bool* use_null) {
    PackinferPlanOptions o;
    expect("packinfer_plan_options_default", API(packinfer_plan_options_default, &o), S_OK, "defaults");
    *use_null = r.chance(30);
    o.flags = r.chance(50) ? 0 : r.below(32);
    o.split_keys = r.chance(60) ? 0 : (r.chance(70) ? (uint32_t)r.range(1, 64) : r.below(1u << 31));
    switch (r.below(5)) {
      case 0: o.capacity = 1e-300; break;
      case 1: o.capacity = std::ldexp(1.0, r.range(-20, 40)); break;
      case 2: o.capacity = 1e300; break;
      default: o.capacity = 0.0;
    }
    return o;
  }

  // Handles enter the book as soon as they exist (so a failed step leaves none untracked) and
  // leave it when destroyed.
  void destroy_plan(PackinferPlan h) {
    expect("packinfer_plan_destroy", API(packinfer_plan_destroy, h), S_OK, "a live plan");
    b.bury(h.bits);
    for (size_t i = 0; i < b.plans.size(); i++)
      if (b.plans[i].h.bits == h.bits) {
        b.plans.erase(b.plans.begin() + (long)i);
        break;
      }
  }
  void destroy_launch(PackinferLaunch h) {
    expect("packinfer_launch_destroy", API(packinfer_launch_destroy, h), S_OK, "a live launch");
    b.bury(h.bits);
    for (size_t i = 0; i < b.launches.size(); i++)
      if (b.launches[i].h.bits == h.bits) {
        b.launches.erase(b.launches.begin() + (long)i);
        break;
      }
  }
  LaunchRec* tracked(PackinferLaunch h) {
    for (auto& l : b.launches)
      if (l.h.bits == h.bits) return &l;
    return nullptr;
  }
  // Keeps at most 12 of each for later steps.
  void trim() {
    while (b.plans.size() > 12) destroy_plan(b.plans[r.below(b.plans.size())].h);
    while (b.launches.size() > 12) destroy_launch(b.launches[r.below(b.launches.size())].h);
  }

  PlanRec plan_valid(std::shared_ptr<BatchCase> c, PackinferContext cx) {
    bool null_opts;
    PackinferPlanOptions o = random_plan_options(&null_opts);
    PackinferBatchDesc d = c->desc();
    PackinferPlan p{0};
    set_detail("valid batch: n %d, page_size %u, heads %u/%u, head_dim %u, dtype %u, causal %d, groups %zu; flags %u split %u capacity %g",
               c->n, c->sh.page_size, c->sh.qo_heads, c->sh.kv_heads, c->sh.head_dim, c->sh.dtype, (int)c->sh.causal, c->groups.size(),
               null_opts ? 0 : o.flags, null_opts ? 0 : o.split_keys, null_opts ? 0.0 : o.capacity);
    PackinferStatus st = API(packinfer_plan_create, cx, &d, null_opts ? nullptr : &o, &p);
    if (st == PACKINFER_STATUS_OK) b.plans.push_back(PlanRec{p, c, true});
    expect("packinfer_plan_create", st, S_OK, "a valid batch");
    if (r.chance(40)) {
      PackinferPlanStats ps;
      memset(&ps, 0, sizeof ps);
      ps.struct_size = sizeof ps;
      expect("packinfer_plan_stats", API(packinfer_plan_stats, p, &ps), S_OK, "a live plan");
      if (ps.num_requests != (uint32_t)c->n || ps.struct_size != sizeof ps || !(ps.tile_utilization >= 0.0 && ps.tile_utilization <= 1.0))
        fail("plan stats", "plan stats: %u requests (batch has %d), tile_utilization %g", ps.num_requests, c->n, ps.tile_utilization);
    }
    return b.plans.back();
  }

  LaunchRec launch_for(PackinferContext cx, const PlanRec& p) {
    LaunchRec l{PackinferLaunch{0}, p.c, p.runnable, false, PackinferLaunchCapacity{}, nullptr};
    PackinferLaunchOptions lo{sizeof(PackinferLaunchOptions), nullptr, 0};
    bool use_opts = r.chance(30);
    l.with_capacity = r.chance(35);
    memset(&l.cap, 0, sizeof l.cap);
    l.cap.struct_size = sizeof l.cap;
    if (l.with_capacity) {
      uint32_t* f = &l.cap.max_work_items;
      for (int i = 0; i < 9; i++) f[i] = r.chance(40) ? 0 : (r.chance(70) ? (uint32_t)r.range(1, 300) : r.below(1u << 12));
    }
    if (use_opts && r.chance(60)) {
      // Caller scratch sized by the plan's stats; a capacity launch then keeps its partial
      // slots at the plan's (0 = the plan's count), which that scratch covers.
      PackinferPlanStats st;
      memset(&st, 0, sizeof st);
      st.struct_size = sizeof st;
      expect("packinfer_plan_stats", API(packinfer_plan_stats, p.h, &st), S_OK, "a live plan");
      size_t bytes = (size_t)st.scratch_bytes + (r.chance(50) ? 0 : r.below(256) * 4);
      if (bytes > 0) {
        l.scratch = std::make_shared<Buf>(bytes);
        lo.scratch = l.scratch->ptr();
        lo.scratch_bytes = bytes;
        l.cap.max_partial_slots = 0;
      }
    }
    PackinferStatus st;
    if (l.with_capacity) {
      st = API(packinfer_launch_create_with_capacity, cx, p.h, use_opts ? &lo : nullptr, &l.cap, nullptr, &l.h);
      if (st == PACKINFER_STATUS_OK) b.launches.push_back(l);
      expect("packinfer_launch_create_with_capacity", st, S_OK | S_OOM, "a live plan and a valid capacity");
    } else {
      st = API(packinfer_launch_create, cx, p.h, use_opts ? &lo : nullptr, nullptr, &l.h);
      if (st == PACKINFER_STATUS_OK) b.launches.push_back(l);
      expect("packinfer_launch_create", st, S_OK, "a live plan");
    }
    if (st != PACKINFER_STATUS_OK) l.h.bits = 0;
    if (l.h.bits && r.chance(20)) {
      bool done = false;
      expect("packinfer_launch_query", API(packinfer_launch_query, l.h, &done), S_OK, "a live launch");
      expect("packinfer_launch_wait", API(packinfer_launch_wait, l.h), S_OK, "a live launch");
    }
    return l;
  }

  // After a step: the plan and the launch are destroyed (in either order; a launch outlives its
  // plan) or kept for later steps.
  void keep_or_destroy(const PlanRec& p, const LaunchRec& l) {
    if (r.chance(60)) {
      destroy_plan(p.h);
      if (l.h.bits && l.runnable && r.chance(20)) run_case(l.h, *l.c, r, "a launch whose plan was destroyed");
    }
    if (l.h.bits && r.chance(50)) {
      destroy_launch(l.h);
      if (r.chance(20)) expect("packinfer_launch_destroy", API(packinfer_launch_destroy, l.h), S_HANDLE, "destroyed twice");
    }
    trim();
  }

  // A valid step: plan, launch, run and check; sometimes update the launch to another plan.
  void op_flow() {
    tw->op = "flow";
    PackinferContext cx = ctx();
    bool from_book = r.chance(20) && !b.plans.empty();
    PlanRec p = from_book ? b.plans[r.below(b.plans.size())] : plan_valid(make_batch(r, nullptr), cx);
    LaunchRec l = launch_for(cx, p);
    if (!l.h.bits) return;
    if (l.runnable) {
      run_case(l.h, *l.c, r, "a valid step");
      if (r.chance(15)) run_case(l.h, *l.c, r, "the same launch again (next layer)");
    }
    if (r.chance(l.with_capacity ? 50 : 15)) {
      // Another batch of the same shape: fits the capacity or is refused; either way the launch
      // runs the plan it holds.
      auto c2 = make_batch(r, &l.c->sh);
      PlanRec p2 = plan_valid(c2, cx);
      PackinferStatus st = API(packinfer_launch_update, l.h, p2.h, nullptr);
      Allowed allowed = S_OK | S_INVALID;
      if ((uint32_t)c2->n > std::max<uint32_t>(l.cap.max_requests, (uint32_t)l.c->n) ||
          c2->pages.size() > std::max<size_t>(l.cap.max_pages, l.c->pages.size()))
        allowed = S_INVALID;  // more requests or pages than the launch holds
      expect("packinfer_launch_update", st, allowed, "a plan of the launch's shape");
      if (st == PACKINFER_STATUS_OK) {
        l.c = c2;
        if (LaunchRec* t = tracked(l.h)) t->c = c2;
      }
      if (l.runnable) run_case(l.h, *l.c, r, st == PACKINFER_STATUS_OK ? "the updated launch" : "a launch whose update was refused");
      destroy_plan(p2.h);
      if (l.runnable && r.chance(30)) run_case(l.h, *l.c, r, "an updated launch after its plan was destroyed");
    }
    if (r.chance(l.with_capacity ? 20 : 5)) {
      // Another shape is always refused.
      Shape s2 = l.c->sh;
      if (r.chance(50)) s2.page_size = s2.page_size % 8 + 1;
      else s2.causal = !s2.causal;
      auto c3 = make_batch(r, &s2);
      PlanRec p3 = plan_valid(c3, cx);
      expect("packinfer_launch_update", API(packinfer_launch_update, l.h, p3.h, nullptr), S_INVALID, "a plan of another shape or page size");
      destroy_plan(p3.h);
      if (l.runnable) run_case(l.h, *l.c, r, "a launch after a refused update");
    }
    if (from_book) {  // the plan stays for other steps; the launch may go
      if (r.chance(50)) destroy_launch(l.h);
      trim();
      return;
    }
    keep_or_destroy(p, l);
  }

  // A batch description with one to three defects (or harmless changes): the call must fail
  // with a status that names one of them, and write no handle.
  void op_plan_mutated() {
    tw->op = "plan mutated";
    auto c = make_batch(r, nullptr);
    MutableDesc m(*c);
    Expect ex;
    bool runnable = true;
    std::string names;
    PackinferContext cx = ctx();
    bool null_batch = false, null_out = false;
    size_t struct_extra = 0;
    bool null_opts = true;
    PackinferPlanOptions o;
    int n = r.chance(70) ? 1 : r.range(2, 3);
    const uint32_t ps = c->sh.page_size;
    // Mutations of the same field (or of fields checked together) would undo each other: one per group.
    static const int group_of[31] = {1, 1, 1, 3, 4, 5, 6, 7, 7, 9, 9, 11, 11, 11, 14, 7, 16, 16, 16, 19, 19, 21, 21, 23, 24, 25, 26, 27, 28, 29, 30};
    uint64_t used = 0;
    for (int i = 0; i < n; i++) {
      int kind = (int)r.below(31);
      if (used & (1ull << group_of[kind])) continue;
      used |= 1ull << group_of[kind];
      char nm[64];
      snprintf(nm, sizeof nm, "%d ", kind);
      names += nm;
      switch (kind) {
        case 0: {
          // Any size below this header's that ends inside a field: not an older version's size
          // nor a field boundary (a first-release struct ends before custom_mask, a
          // second-release one before kv_dtype; sizes from kv_dtype on end in kv_dtype or in
          // the padding after it, which the library accepts as a newer field's end).
          size_t v = r.below(sizeof m.d);
          if (v >= offsetof(PackinferBatchDesc, kv_dtype)) v = offsetof(PackinferBatchDesc, kv_dtype);
          if (v == offsetof(PackinferBatchDesc, custom_mask) || v == offsetof(PackinferBatchDesc, mask_indptr) ||
              v == offsetof(PackinferBatchDesc, kv_dtype))
            v--;
          m.d.struct_size = v;
          ex.must(S_INVALID);
          break;
        }
        case 1: m.d.struct_size = r.chance(50) ? SIZE_MAX : sizeof m.d + 4097 + r.below(1u << 20); ex.must(S_INVALID); break;
        case 2: struct_extra = (size_t)r.range(1, 4096); break;  // a newer header's larger struct
        case 3: m.null_qo = true; ex.must(S_INVALID); break;
        case 4: m.null_kv = true; ex.must(S_INVALID); break;
        case 5: m.null_last = true; if (c->n > 0) ex.must(S_INVALID); break;
        case 6: m.null_pages = true; if (!c->pages.empty()) ex.must(S_INVALID); break;
        case 7: { int k = r.range(1, 5); for (auto& x : m.qo) x += k; ex.must(S_INVALID); runnable = false; break; }
        case 8: if (c->n >= 1) { int j = r.range(1, c->n); m.qo[(size_t)j] = m.qo[(size_t)j - 1] - r.range(1, 5); ex.must(S_INVALID); runnable = false; } break;
        case 9: if (c->n >= 1) { int j = r.range(1, c->n); m.kv[(size_t)j] = m.kv[(size_t)j - 1] - r.range(1, 5); ex.must(S_INVALID); runnable = false; } break;
        case 10: {
          int k = r.range(1, 3);
          for (auto& x : m.kv) x += k;
          for (int j = 0; j < k; j++) m.pages.push_back((int32_t)r.below(std::max<uint32_t>(1, c->buffer_pages)));
          ex.must(S_INVALID);
          runnable = false;
          break;
        }
        case 11:
          if (!m.pages.empty()) {
            const int32_t neg[] = {-1, -2, INT32_MIN, -r.range(1, 1000)};
            m.pages[r.below(m.pages.size())] = neg[r.below(4)];
            if (r.chance(50)) m.d.num_pages = UINT32_MAX;  // -1 as unsigned would then still be out of range, -2 not
            ex.must(S_INVALID);
            runnable = false;
          }
          break;
        case 12:
          if (!m.pages.empty()) {
            if (r.chance(50)) m.pages[r.below(m.pages.size())] = (int32_t)std::min<uint64_t>(INT32_MAX, (uint64_t)m.d.num_pages + r.below(1000));
            else m.d.num_pages = (uint32_t)*std::max_element(m.pages.begin(), m.pages.end());
            ex.must(S_INVALID);
            runnable = false;
          }
          break;
        case 13: { const uint32_t big[] = {UINT32_MAX, 1u << 31, INT32_MAX}; m.d.num_pages = big[r.below(3)]; ex.maybe(S_INVALID); break; }
        case 14:
          if (c->n >= 1) {
            int j = r.below((uint32_t)c->n);
            bool has = m.kv[(size_t)j + 1] > m.kv[(size_t)j];
            const int32_t bad_has[] = {0, (int32_t)ps + r.range(1, 5), -r.range(1, 5), INT32_MIN};
            m.last[(size_t)j] = has ? bad_has[r.below(4)] : (r.chance(50) ? 1 : -1);
            ex.must(S_INVALID);
            runnable = false;
          }
          break;
        case 15:
          if (c->sh.causal && c->n >= 1) {
            int j = r.below((uint32_t)c->n);
            int extra = c->kv_len[(size_t)j] - c->q_len[(size_t)j] + r.range(1, 3);
            for (size_t t = (size_t)j + 1; t < m.qo.size(); t++) m.qo[t] += extra;
            ex.must(S_INVALID);
            runnable = false;
          }
          break;
        case 16:
          if (m.d.num_kv_heads >= 2) m.d.num_qo_heads = m.d.num_kv_heads * 2 + 1;
          else m.d.num_kv_heads = 2, m.d.num_qo_heads = 3;
          ex.must(S_INVALID);
          runnable = false;
          break;
        case 17: m.d.num_kv_heads = 0; ex.must(S_INVALID); runnable = false; break;
        case 18: m.d.num_qo_heads = 0; ex.must(S_INVALID); runnable = false; break;
        case 19: m.d.head_dim = 0; ex.must(S_INVALID); runnable = false; break;  // no head is not a size
        case 20: {
          const uint32_t odd[] = {8u * r.below(64) + 1 + r.below(7), 520 + 8 * r.below(100), 1u << 31, 0xFFFFFFF8u};
          m.d.head_dim = odd[r.below(4)];
          ex.must(S_UNSUP);  // a size, just not one this build computes
          runnable = false;
          break;
        }
        case 21: { const uint32_t bad[] = {3, 4, 255, UINT32_MAX, 3 + r.below(1u << 30)}; m.d.dtype = bad[r.below(5)]; ex.must(S_INVALID); runnable = false; break; }
        case 22:
          m.d.dtype = (m.d.dtype + 1 + r.below(2)) % 3;
          if (g_cfg.cuda && m.d.dtype == PACKINFER_DTYPE_F32) ex.must(S_UNSUP);
          runnable = false;
          break;
        case 23: { const float bad[] = {-1.0f, -1e-30f, NAN, INFINITY, -INFINITY}; m.d.sm_scale = bad[r.below(5)]; ex.must(S_INVALID); runnable = false; break; }
        case 24: m.d.page_size = 0; ex.must(S_INVALID); runnable = false; break;
        case 25: mutate_groups(m, *c, ex); runnable = false; break;
        case 26: {
          const uint32_t big[] = {1u << 20, UINT32_MAX, INT32_MAX};
          m.d.batch_size = big[r.below(3)];
          m.null_qo = m.null_kv = m.null_last = m.null_pages = true;  // nothing to read past
          ex.must(S_INVALID);
          runnable = false;
          break;
        }
        case 27: null_batch = true; ex.must(S_INVALID); break;
        case 28: null_out = true; ex.must(S_INVALID); break;
        case 29: cx.bits = bad_handle(K_CONTEXT); ex.must(S_HANDLE); break;
        default: {  // plan options
          null_opts = false;
          expect("packinfer_plan_options_default", API(packinfer_plan_options_default, &o), S_OK, "defaults");
          switch (r.below(5)) {
            // Below the first release's struct (which ends before window_left): no version.
            case 0: o.struct_size = r.chance(50) ? r.below(offsetof(PackinferPlanOptions, window_left)) : sizeof o + 4097; ex.must(S_INVALID); break;
            case 1: { const double bad[] = {-1.0, -1e-300, NAN, INFINITY, -INFINITY}; o.capacity = bad[r.below(5)]; ex.must(S_INVALID); break; }
            case 2: o.flags = (1u << r.range(6, 31)) | r.below(64); ex.must(S_INVALID); break;  // bits this library does not know
            case 3: o.flags = r.below(32); o.split_keys = (uint32_t)r.range(1, 64); break;
            default: o.capacity = r.chance(50) ? 1e-300 : 1e300; break;
          }
        }
      }
    }
    m.point();
    set_detail("mutations [%s] on batch: n %d, page_size %u, heads %u/%u, head_dim %u, dtype %u, causal %d, num_pages %u", names.c_str(), c->n,
               ps, c->sh.qo_heads, c->sh.kv_heads, c->sh.head_dim, c->sh.dtype, (int)c->sh.causal, m.d.num_pages);
    std::vector<unsigned char> big;
    const PackinferBatchDesc* dp = &m.d;
    if (struct_extra) {
      big.assign(sizeof m.d + struct_extra, 0);
      m.d.struct_size = sizeof m.d + struct_extra;
      memcpy(big.data(), &m.d, sizeof m.d);
      dp = (const PackinferBatchDesc*)big.data();
    }
    if (null_batch) dp = nullptr;
    PackinferPlan p{0xABCDEFull};
    PackinferStatus st = API(packinfer_plan_create, cx, dp, null_opts ? nullptr : &o, null_out ? nullptr : &p);
    if (st == PACKINFER_STATUS_OK && !null_out) b.plans.push_back(PlanRec{p, c, runnable});  // destroyed later, whatever the verdict
    expect("packinfer_plan_create", st, ex.allowed(), "the mutated batch description");
    if (st != PACKINFER_STATUS_OK) {
      if (p.bits != 0xABCDEFull) fail("failed call wrote out", "packinfer_plan_create failed but wrote a plan handle 0x%" PRIx64, p.bits);
      return;
    }
    if (null_out) return;
    PlanRec rec = b.plans.back();
    LaunchRec l = launch_for(ctx(), rec);
    if (!l.h.bits) return;
    if (l.runnable) run_case(l.h, *l.c, r, "a plan from a harmlessly changed description");
    keep_or_destroy(rec, l);
  }

  void mutate_groups(MutableDesc& m, const BatchCase& c, Expect& ex) {
    if (m.groups.empty()) {
      if (c.n >= 1 && r.chance(50)) {
        m.members.push_back({(int32_t)r.below((uint32_t)c.n)});
        m.groups.push_back(PackinferPrefixGroup{1, 1, nullptr});  // one member shares with nobody
      } else {
        m.d.num_prefix_groups = (uint32_t)r.range(1, INT32_MAX);
        m.null_groups = true;
      }
      m.d.num_prefix_groups = m.null_groups ? m.d.num_prefix_groups : (uint32_t)m.groups.size();
      ex.must(S_INVALID);
      return;
    }
    PackinferPrefixGroup& g = m.groups[0];
    std::vector<int32_t>& mem = m.members[0];
    uint32_t min_kv = UINT32_MAX;
    for (int32_t x : mem) min_kv = std::min(min_kv, (uint32_t)c.kv_len[(size_t)x]);
    switch (r.below(9)) {
      case 0: g.num_members = 1; break;
      case 1: g.prefix_len = 0; break;
      case 2: mem[r.below(mem.size())] = c.n + r.range(0, 100); break;
      case 3: mem[r.below(mem.size())] = -r.range(1, 100); break;
      case 4: mem[1] = mem[0]; break;
      case 5: g.prefix_len = min_kv + (uint32_t)r.range(1, 100); break;
      case 6: m.null_members = 0; break;
      case 7: m.null_groups = true; break;
      default:  // a second group with a member of the first
        m.members.push_back({mem[0], mem[1]});
        m.groups.push_back(PackinferPrefixGroup{1, 2, nullptr});
        m.d.num_prefix_groups = 2;
    }
    ex.must(S_INVALID);
  }

  // Every function that takes a handle, given a dead or forged one (and valid other
  // arguments): INVALID_HANDLE, and no output written.
  void op_handle_abuse() {
    tw->op = "handle abuse";
    int kind = (int)r.below(4);
    uint64_t bad = bad_handle(kind);
    set_detail("%s handle 0x%" PRIx64, kind_name(kind), bad);
    PackinferContext cx = ctx();
    PackinferPlan live_plan = b.plans.empty() ? PackinferPlan{0} : b.plans[r.below(b.plans.size())].h;
    PackinferLaunch live_launch = b.launches.empty() ? PackinferLaunch{0} : b.launches[r.below(b.launches.size())].h;
    uint64_t ids[1] = {pool_seq};
    uint32_t counts[1] = {1};
    uint64_t hashes[1] = {1};
    const uint64_t sentinel = 0x5EB71A1Eull;
    auto check_out = [&](const char* fn, uint64_t v) {
      if (v != sentinel) fail("failed call wrote out", "%s failed but wrote its output (0x%" PRIx64 ")", fn, v);
    };
    if (kind == K_CONTEXT) {
      PackinferContext c{bad};
      auto bc = make_batch(r, nullptr);
      auto d = bc->desc();
      PackinferPlan p{sentinel};
      PackinferLaunch l{sentinel};
      PackinferPool pl{sentinel};
      PackinferContextInfo info;
      memset(&info, 0, sizeof info);
      info.struct_size = sizeof info;
      PackinferLaunchCapacity cap;
      memset(&cap, 0, sizeof cap);
      cap.struct_size = sizeof cap;
      PackinferPoolOptions po = small_pool_options(r);
      switch (r.below(9)) {
        case 0: expect("packinfer_context_destroy", API(packinfer_context_destroy, c), S_HANDLE, "a bad context"); break;
        case 1: expect("packinfer_context_info", API(packinfer_context_info, c, &info), S_HANDLE, "a bad context"); break;
        case 2: expect("packinfer_plan_create", API(packinfer_plan_create, c, &d, nullptr, &p), S_HANDLE, "a bad context"); check_out("packinfer_plan_create", p.bits); break;
        case 3:
          if (!live_plan.bits) break;
          expect("packinfer_launch_create", API(packinfer_launch_create, c, live_plan, nullptr, nullptr, &l), S_HANDLE, "a bad context");
          check_out("packinfer_launch_create", l.bits);
          break;
        case 4:
          if (!live_plan.bits) break;
          expect("packinfer_launch_create_with_capacity", API(packinfer_launch_create_with_capacity, c, live_plan, nullptr, &cap, nullptr, &l), S_HANDLE, "a bad context");
          check_out("packinfer_launch_create_with_capacity", l.bits);
          break;
        case 5: expect("packinfer_pool_create", API(packinfer_pool_create, c, &po, &pl), S_HANDLE, "a bad context"); check_out("packinfer_pool_create", pl.bits); break;
        case 6: expect("packinfer_context_precompile", API(packinfer_context_precompile, c), S_HANDLE, "a bad context"); break;
        case 7: expect("packinfer_context_calibrate", API(packinfer_context_calibrate, c), S_HANDLE, "a bad context"); break;
        default:
          expect("packinfer_pool_plan_create", API(packinfer_pool_plan_create, c, pool, ids, counts, 1, nullptr, &p), S_HANDLE, "a bad context");
          check_out("packinfer_pool_plan_create", p.bits);
      }
    } else if (kind == K_PLAN) {
      PackinferPlan p{bad};
      PackinferPlanStats st;
      memset(&st, 0, sizeof st);
      st.struct_size = sizeof st;
      PackinferLaunch l{sentinel};
      PackinferLaunchCapacity cap;
      memset(&cap, 0, sizeof cap);
      cap.struct_size = sizeof cap;
      switch (r.below(6)) {
        case 0: expect("packinfer_plan_destroy", API(packinfer_plan_destroy, p), S_HANDLE, "a bad plan"); break;
        case 1: expect("packinfer_plan_stats", API(packinfer_plan_stats, p, &st), S_HANDLE, "a bad plan"); break;
        case 2: expect("packinfer_launch_create", API(packinfer_launch_create, cx, p, nullptr, nullptr, &l), S_HANDLE, "a bad plan"); check_out("packinfer_launch_create", l.bits); break;
        case 3:
          expect("packinfer_launch_create_with_capacity", API(packinfer_launch_create_with_capacity, cx, p, nullptr, &cap, nullptr, &l), S_HANDLE, "a bad plan");
          check_out("packinfer_launch_create_with_capacity", l.bits);
          break;
        case 4:
          if (live_launch.bits) expect("packinfer_launch_update", API(packinfer_launch_update, live_launch, p, nullptr), S_HANDLE, "a bad plan");
          break;
        default: expect("packinfer_pool_relayout", API(packinfer_pool_relayout, pool, p, ids, 1, true, nullptr, nullptr), S_HANDLE, "a bad plan");
      }
    } else if (kind == K_LAUNCH) {
      PackinferLaunch l{bad};
      bool done = false;
      PackinferRunArgs a;
      memset(&a, 0, sizeof a);
      a.struct_size = sizeof a;
      a.q = dummy.data();
      a.o = dummy.data();
      a.kv.k = a.kv.v = dummy.data();
      switch (r.below(5)) {
        case 0: expect("packinfer_launch_destroy", API(packinfer_launch_destroy, l), S_HANDLE, "a bad launch"); break;
        case 1: expect("packinfer_launch_query", API(packinfer_launch_query, l, &done), S_HANDLE, "a bad launch"); break;
        case 2: expect("packinfer_launch_wait", API(packinfer_launch_wait, l), S_HANDLE, "a bad launch"); break;
        case 3: expect("packinfer_run", API(packinfer_run, l, &a), S_HANDLE, "a bad launch"); break;
        default:
          if (live_plan.bits) expect("packinfer_launch_update", API(packinfer_launch_update, l, live_plan, nullptr), S_HANDLE, "a bad launch");
      }
    } else {
      PackinferPool pl{bad};
      PackinferKvLayout lay;
      uint64_t out = sentinel;
      uint32_t len32 = 0x5EB7;
      PackinferPlan p{sentinel};
      PackinferPoolStats ps;
      memset(&ps, 0, sizeof ps);
      ps.struct_size = sizeof ps;
      std::vector<float> rows(64, 0.0f);
      PackinferKvSource src{sizeof(PackinferKvSource), rows.data(), rows.data(), 1, pool_kv_heads, pool_head_dim, pool_dtype, 0};
      switch (r.below(14)) {
        case 0: expect("packinfer_pool_destroy", API(packinfer_pool_destroy, pl), S_HANDLE, "a bad pool"); break;
        case 1: expect("packinfer_pool_kv_layout", API(packinfer_pool_kv_layout, pl, 0, &lay), S_HANDLE, "a bad pool"); break;
        case 2: expect("packinfer_pool_sequence_create", API(packinfer_pool_sequence_create, pl, &out), S_HANDLE, "a bad pool"); check_out("packinfer_pool_sequence_create", out); break;
        case 3: expect("packinfer_pool_sequence_length", API(packinfer_pool_sequence_length, pl, pool_seq, &len32), S_HANDLE, "a bad pool"); break;
        case 4: expect("packinfer_pool_append", API(packinfer_pool_append, pl, pool_seq, 1, nullptr, nullptr), S_HANDLE, "a bad pool"); break;
        case 5: expect("packinfer_pool_fork", API(packinfer_pool_fork, pl, pool_seq, 1, nullptr, &out), S_HANDLE, "a bad pool"); check_out("packinfer_pool_fork", out); break;
        case 6: expect("packinfer_pool_truncate", API(packinfer_pool_truncate, pl, pool_seq, 1), S_HANDLE, "a bad pool"); break;
        case 7: expect("packinfer_pool_release", API(packinfer_pool_release, pl, pool_seq), S_HANDLE, "a bad pool"); break;
        case 8: expect("packinfer_pool_write_kv", API(packinfer_pool_write_kv, pl, 0, ids, counts, 1, &src, nullptr), S_HANDLE, "a bad pool"); break;
        case 9: expect("packinfer_pool_register_page_hashes", API(packinfer_pool_register_page_hashes, pl, pool_seq, hashes, 0), S_HANDLE, "a bad pool"); break;
        case 10: expect("packinfer_pool_match_prefix", API(packinfer_pool_match_prefix, pl, pool_seq, hashes, 0, &len32), S_HANDLE, "a bad pool"); break;
        case 11:
          expect("packinfer_pool_plan_create", API(packinfer_pool_plan_create, cx, pl, ids, counts, 1, nullptr, &p), S_HANDLE, "a bad pool");
          check_out("packinfer_pool_plan_create", p.bits);
          break;
        case 12:
          if (live_plan.bits) expect("packinfer_pool_relayout", API(packinfer_pool_relayout, pl, live_plan, ids, 1, false, nullptr, nullptr), S_HANDLE, "a bad pool");
          break;
        default: expect("packinfer_pool_stats", API(packinfer_pool_stats, pl, &ps), S_HANDLE, "a bad pool");
      }
    }
  }

  // Run arguments with a defect: refused, and nothing written.
  void op_run_mutated() {
    tw->op = "run mutated";
    if (b.launches.empty()) return op_flow();
    LaunchRec& l = b.launches[r.below(b.launches.size())];
    if (!l.runnable) return;
    BatchCase& c = *l.c;
    RunIo io(r, c.total_q, c.sh.qo_heads, c.sh.head_dim, c.sh.dtype);
    PackinferRunArgs a;
    memset(&a, 0, sizeof a);
    a.struct_size = sizeof a;
    io.fill_args(a, true);
    a.kv = case_layout(c);
    Expect ex;
    const PackinferRunArgs* ap = &a;
    std::vector<unsigned char> big;
    int kind = (int)r.below(8);
    set_detail("run mutation %d on a launch of %u query tokens, %zu pages", kind, c.total_q, c.pages.size());
    switch (kind) {
      case 0: ap = nullptr; ex.must(S_INVALID); break;
      // Below the first release's struct (which ends before logits_soft_cap): no version.
      case 1: a.struct_size = r.below(offsetof(PackinferRunArgs, logits_soft_cap)); ex.must(S_INVALID); break;
      case 2: a.struct_size = sizeof a + 4097 + r.below(100000); ex.must(S_INVALID); break;
      case 3: a.q = nullptr; if (c.total_q > 0) ex.must(S_INVALID); break;
      case 4: a.o = nullptr; if (c.total_q > 0) ex.must(S_INVALID); break;
      case 5: {
        int64_t* s[] = {&a.q_stride_token, &a.q_stride_head, &a.o_stride_token, &a.o_stride_head};
        *s[r.below(4)] = r.chance(50) ? -1 : INT64_MIN;
        ex.must(S_INVALID);
        break;
      }
      case 6: (r.chance(50) ? a.kv.k : a.kv.v) = nullptr; if (c.total_q > 0 && !c.pages.empty()) ex.must(S_INVALID); break;
      default:  // a newer header's larger struct: the fields this library knows are read
        big.assign(sizeof a + (size_t)r.range(1, 4096), 0);
        a.struct_size = big.size();
        memcpy(big.data(), &a, sizeof a);
        ap = (const PackinferRunArgs*)big.data();
    }
    PackinferStatus st = API(packinfer_run, l.h, ap);
    expect("packinfer_run", st, ex.allowed(), "mutated run arguments");
    c.io = &io;
    if (st == PACKINFER_STATUS_OK) {
      if (a.q && a.o && a.kv.k && a.kv.v)
        io.verify("a run with harmless changes", true, [&](uint32_t t, uint32_t h, double* out, double* lse) { c.reference(t, h, out, lse); });
    } else {
      io.o->download();
      io.lse->download();
      size_t on = (size_t)c.total_q * (size_t)io.o_et;
      for (size_t i = 0; i < on; i++)
        if (!is_sentinel(io.o->h(), i, c.sh.dtype)) fail("failed call wrote out", "packinfer_run failed but wrote O element %zu", i);
    }
    c.io = nullptr;
  }

  // Launch creation and update with a defect.
  void op_launch_mutated() {
    tw->op = "launch mutated";
    if (b.plans.empty()) return op_flow();
    PlanRec& p = b.plans[r.below(b.plans.size())];
    PackinferPlanStats st;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    expect("packinfer_plan_stats", API(packinfer_plan_stats, p.h, &st), S_OK, "a live plan");
    PackinferLaunchOptions lo{sizeof(PackinferLaunchOptions), nullptr, 0};
    PackinferLaunchCapacity cap;
    memset(&cap, 0, sizeof cap);
    cap.struct_size = sizeof cap;
    Expect ex;
    bool with_cap = r.chance(50), null_cap = false, null_out = false;
    Buf small(std::max<size_t>(4, st.scratch_bytes / 2));
    int kind = (int)r.below(6);
    set_detail("launch mutation %d, plan scratch %" PRIu64 " bytes", kind, st.scratch_bytes);
    switch (kind) {
      case 0: lo.struct_size = r.chance(50) ? r.below(sizeof lo) : sizeof lo + 4097; ex.must(S_INVALID); break;
      case 1:
        lo.scratch = small.ptr();
        lo.scratch_bytes = st.scratch_bytes ? r.below(st.scratch_bytes) : 0;
        if (st.scratch_bytes > 0) ex.must(S_INVALID);
        break;
      case 2:
        lo.scratch = nullptr;
        lo.scratch_bytes = st.scratch_bytes + r.range(1, 64);
        if (st.scratch_bytes > 0) ex.must(S_INVALID);
        else ex.maybe(S_INVALID);
        break;
      // Below the first release's struct (which ends before max_custom_mask_bytes): no version.
      case 3:
        with_cap = true;
        if (r.chance(50)) null_cap = true;
        else cap.struct_size = r.chance(50) ? r.below(offsetof(PackinferLaunchCapacity, max_custom_mask_bytes)) : sizeof cap + 5000;
        ex.must(S_INVALID);
        break;
      case 4: null_out = true; ex.must(S_INVALID); break;
      default: {
        PackinferLaunch some = b.launches.empty() ? PackinferLaunch{0} : b.launches[r.below(b.launches.size())].h;
        if (some.bits) expect("packinfer_launch_query", API(packinfer_launch_query, some, nullptr), S_INVALID, "done is NULL");
        return;
      }
    }
    PackinferLaunch l{0x5EB71A1Eull};
    PackinferStatus s = with_cap ? API(packinfer_launch_create_with_capacity, ctx(), p.h, &lo, null_cap ? nullptr : &cap, nullptr, null_out ? nullptr : &l)
                                 : API(packinfer_launch_create, ctx(), p.h, &lo, nullptr, null_out ? nullptr : &l);
    if (s == PACKINFER_STATUS_OK && !null_out) {
      expect("packinfer_launch_destroy", API(packinfer_launch_destroy, l), S_OK, "the launch just made");
      b.bury(l.bits);
    }
    expect(with_cap ? "packinfer_launch_create_with_capacity" : "packinfer_launch_create", s, ex.allowed(), "mutated launch arguments");
    if (s != PACKINFER_STATUS_OK && l.bits != 0x5EB71A1Eull) fail("failed call wrote out", "a failed launch creation wrote a handle");
  }

  // The layout helpers compute strides from sizes; sizes that are no sizes, or whose strides
  // overflow, are refused.
  void op_layout() {
    tw->op = "layout helpers";
    bool hnd = r.chance(50);
    uint32_t p = (uint32_t)r.range(1, 64), h = (uint32_t)r.range(1, 8), d = 8u * (uint32_t)r.range(1, 32);
    const void *k = dummy.data(), *v = dummy.data() + 64;
    Expect ex;
    bool null_layout = false;
    int kind = (int)r.below(6);
    switch (kind) {
      case 0: break;
      case 1: { uint32_t* f[] = {&p, &h, &d}; *f[r.below(3)] = 0; ex.must(S_INVALID); break; }
      case 2: p = h = d = UINT32_MAX; ex.must(S_INVALID); break;
      case 3: p = 1u << 31; h = 1u << 31; d = (uint32_t)r.range(4, 64); ex.must(S_INVALID); break;  // 2^62 * d > INT64_MAX
      case 4: null_layout = true; ex.must(S_INVALID); break;
      default: (r.chance(50) ? k : v) = nullptr; ex.maybe(S_INVALID); break;
    }
    set_detail("%s(k %p, v %p, page_size %u, heads %u, head_dim %u)", hnd ? "hnd" : "nhd", k, v, p, h, d);
    PackinferKvLayout l;
    memset(&l, 0x5A, sizeof l);
    PackinferStatus st = hnd ? API(packinfer_kv_layout_hnd, k, v, p, h, d, null_layout ? nullptr : &l)
                             : API(packinfer_kv_layout_nhd, k, v, p, h, d, null_layout ? nullptr : &l);
    expect(hnd ? "packinfer_kv_layout_hnd" : "packinfer_kv_layout_nhd", st, ex.allowed(), "layout helper arguments");
    if (st != PACKINFER_STATUS_OK || null_layout) return;
    int64_t P = p, H = h, D = d;
    bool ok = l.k == k && l.v == v && l.stride_dim == 1 && l.stride_page == P * H * D &&
              (hnd ? (l.stride_head == P * D && l.stride_token == D) : (l.stride_head == D && l.stride_token == H * D));
    if (!ok) fail("layout helper", "strides (%" PRId64 ", %" PRId64 ", %" PRId64 ", %" PRId64 ")", l.stride_page, l.stride_token, l.stride_head, l.stride_dim);
  }

  void op_misc() {
    tw->op = "misc";
    switch (r.below(8)) {
      case 0: {
        uint32_t s = r.chance(50) ? r.below(12) : (uint32_t)r.next();
        const char* got = API(packinfer_status_string, s);
        static const char* names[] = {"OK", "INVALID_ARGUMENT", "INVALID_HANDLE", "UNSUPPORTED", "OUT_OF_MEMORY", "POOL_EXHAUSTED",
                                      "NO_DEVICE", "DEVICE_ERROR", "COMPILE_ERROR", "INTERNAL"};
        std::string want = std::string("PACKINFER_STATUS_") + (s < 10 ? names[s] : "UNKNOWN");
        if (!got || want != got) fail("status string", "packinfer_status_string(%u) = %s, want %s", s, got ? got : "NULL", want.c_str());
        break;
      }
      case 1: {
        const char* v = API(packinfer_version);
        if (!v || !*v) fail("version", "packinfer_version() is empty");
        if (API(packinfer_abi_version) != PACKINFER_ABI_VERSION) fail("version", "ABI version differs from the header's");
        break;
      }
      case 2: {
        PackinferContextInfo info;
        memset(&info, 0x5A, sizeof info);
        info.struct_size = sizeof info;
        expect("packinfer_context_info", API(packinfer_context_info, ctx(), &info), S_OK, "a live context");
        bool ok = memchr(info.device_name, 0, sizeof info.device_name) != nullptr && info.num_workers >= 1 &&
                  info.backend == (g_cfg.cuda ? PACKINFER_BACKEND_CUDA : PACKINFER_BACKEND_CPU);
        if (!ok) fail("context info", "context info: backend %u, %u workers", info.backend, info.num_workers);
        info.struct_size = r.chance(50) ? r.below(sizeof info) : sizeof info + 4097;
        expect("packinfer_context_info", API(packinfer_context_info, ctx(), &info), S_INVALID, "a bad struct_size");
        expect("packinfer_context_info", API(packinfer_context_info, ctx(), nullptr), S_INVALID, "info is NULL");
        break;
      }
      case 3:
        if (!g_cfg.cuda) {  // GPU-only calls on the CPU: precompile does nothing, calibrate is unsupported
          expect("packinfer_context_precompile", API(packinfer_context_precompile, ctx()), S_OK, "the CPU backend");
          expect("packinfer_context_calibrate", API(packinfer_context_calibrate, ctx()), S_UNSUP, "the CPU backend");
        }
        break;
      case 4: {
        // The options defaults take NULL (documented) and then have nothing to fill.
        PackinferStatus s = API(packinfer_context_options_default, nullptr);
        expect("packinfer_context_options_default", s, S_OK | S_INVALID, "NULL options");
        s = API(packinfer_plan_options_default, nullptr);
        expect("packinfer_plan_options_default", s, S_OK | S_INVALID, "NULL options");
        s = API(packinfer_pool_options_default, nullptr);
        expect("packinfer_pool_options_default", s, S_OK | S_INVALID, "NULL options");
        // The other defaults fill struct_size with this header's size.
        PackinferBatchDesc bd;
        PackinferLaunchOptions lo;
        PackinferLaunchCapacity lc;
        PackinferRunArgs ra;
        PackinferKvSource ks;
        expect("packinfer_batch_desc_default", API(packinfer_batch_desc_default, &bd), S_OK, "defaults");
        expect("packinfer_launch_options_default", API(packinfer_launch_options_default, &lo), S_OK, "defaults");
        expect("packinfer_launch_capacity_default", API(packinfer_launch_capacity_default, &lc), S_OK, "defaults");
        expect("packinfer_run_args_default", API(packinfer_run_args_default, &ra), S_OK, "defaults");
        expect("packinfer_kv_source_default", API(packinfer_kv_source_default, &ks), S_OK, "defaults");
        if (bd.struct_size != sizeof bd || lo.struct_size != sizeof lo || lc.struct_size != sizeof lc || ra.struct_size != sizeof ra ||
            ks.struct_size != sizeof ks || lo.scratch != nullptr || lc.max_work_items != 0 || ra.q != nullptr || ra.lse != nullptr)
          fail("defaults", "a _default() function left a struct_size or field other than documented");
        expect("packinfer_batch_desc_default", API(packinfer_batch_desc_default, nullptr), S_OK | S_INVALID, "NULL");
        expect("packinfer_run_args_default", API(packinfer_run_args_default, nullptr), S_OK | S_INVALID, "NULL");
        break;
      }
      case 5: {
        // The last error belongs to the last failing call and survives successful ones.
        PackinferPlan bad{bad_handle(K_PLAN)};
        expect("packinfer_plan_destroy", API(packinfer_plan_destroy, bad), S_HANDLE, "a bad plan");
        std::string before = API(packinfer_last_error);
        PackinferContextInfo info;
        memset(&info, 0, sizeof info);
        info.struct_size = sizeof info;
        expect("packinfer_context_info", API(packinfer_context_info, ctx(), &info), S_OK, "a live context");
        const char* after = API(packinfer_last_error);
        if (before != after) fail("last_error", "a successful call changed the last error from \"%s\" to \"%s\"", before.c_str(), after);
        break;
      }
      case 6:
        if (!b.plans.empty()) {
          // PlanStats grew under ABI 1: the first release's size (up to max_worker_cost) and
          // every later field boundary are sizes of some header's struct, written only that far.
          unsigned char buf[sizeof(PackinferPlanStats) + 64];
          memset(buf, 0xA5, sizeof buf);
          size_t oldest = offsetof(PackinferPlanStats, max_worker_cost), size;
          switch (r.below(3)) {
            case 0: size = r.below(sizeof(PackinferPlanStats)); break;
            case 1: { const size_t older[] = {oldest, offsetof(PackinferPlanStats, mean_worker_cost), offsetof(PackinferPlanStats, num_partial_items)}; size = older[r.below(3)]; break; }
            default: size = sizeof(PackinferPlanStats) + 4097; break;
          }
          bool valid = size == oldest || size == offsetof(PackinferPlanStats, mean_worker_cost) ||
                       size == offsetof(PackinferPlanStats, num_partial_items) ||
                       (size >= offsetof(PackinferPlanStats, num_partial_items) + 4 && size <= sizeof(PackinferPlanStats) + 4096);
          memcpy(buf, &size, sizeof size);
          set_detail("plan_stats with struct_size %zu (this header's %zu, the first release's %zu)", size, sizeof(PackinferPlanStats), oldest);
          PackinferStatus st = API(packinfer_plan_stats, b.plans[0].h, (PackinferPlanStats*)buf);
          expect("packinfer_plan_stats", st, valid ? S_OK : S_INVALID, "a struct_size of an older, this or no header");
          size_t reach = st == PACKINFER_STATUS_OK ? std::min(size, sizeof(PackinferPlanStats)) : sizeof(size_t);
          for (size_t i = reach; i < sizeof buf; i++)
            if (buf[i] != 0xA5) fail("output bounds", "plan_stats with struct_size %zu wrote byte %zu", size, i);
          expect("packinfer_plan_stats", API(packinfer_plan_stats, b.plans[0].h, nullptr), S_INVALID, "stats is NULL");
        }
        break;
      default: {
        PackinferKvLayout l;
        expect("packinfer_pool_kv_layout", API(packinfer_pool_kv_layout, pool, pool_layers + r.below(100), &l), S_INVALID, "a layer past the last");
        expect("packinfer_pool_kv_layout", API(packinfer_pool_kv_layout, pool, 0, nullptr), S_INVALID, "layout is NULL");
      }
    }
  }

  // Contexts made and destroyed with valid and invalid options.
  void op_context() {
    tw->op = "context";
    if (g_cfg.cuda) return;  // a CUDA context opens the device: the phase keeps its one
    PackinferContextOptions o;
    expect("packinfer_context_options_default", API(packinfer_context_options_default, &o), S_OK, "defaults");
    o.backend = PACKINFER_BACKEND_CPU;
    const uint32_t threads[] = {0, 1, 2, 3, 64};
    o.num_threads = threads[r.below(5)];
    std::string dir = "/tmp/packinfer-stress-" + std::to_string(r.below(4));
    static const char bad_utf8[] = {'/', 't', 'm', 'p', '/', (char)0xC3, (char)0x28, 0};
    Expect ex;
    const PackinferContextOptions* op = &o;
    bool null_out = false;
    int kind = (int)r.below(7);
    switch (kind) {
      case 0: break;
      case 1: o.kernel_cache_dir = dir.c_str(); break;
      case 2: o.kernel_cache_dir = bad_utf8; ex.must(S_INVALID); break;
      case 3: o.backend = 3 + r.below(1000); ex.must(S_INVALID); break;
      case 4: o.struct_size = r.chance(50) ? r.below(sizeof o) : sizeof o + 4097; ex.must(S_INVALID); break;
      case 5: op = nullptr; ex.must(S_INVALID); break;
      default: null_out = true; ex.must(S_INVALID);
    }
    set_detail("context options case %d, threads %u", kind, o.num_threads);
    PackinferContext c{0x5EB71A1Eull};
    PackinferStatus st = API(packinfer_context_create, op, null_out ? nullptr : &c);
    if (st == PACKINFER_STATUS_OK && !null_out) b.ctxs.push_back(c);
    expect("packinfer_context_create", st, ex.allowed(), "context options");
    if (st != PACKINFER_STATUS_OK && c.bits != 0x5EB71A1Eull) fail("failed call wrote out", "a failed context creation wrote a handle");
    while (b.ctxs.size() > 3) {
      size_t i = r.below(b.ctxs.size());
      if (b.ctxs[i].bits == keep.bits) continue;
      expect("packinfer_context_destroy", API(packinfer_context_destroy, b.ctxs[i]), S_OK, "a live context");
      b.bury(b.ctxs[i].bits);
      if (r.chance(30)) expect("packinfer_context_destroy", API(packinfer_context_destroy, b.ctxs[i]), S_HANDLE, "destroyed twice");
      b.ctxs.erase(b.ctxs.begin() + (long)i);
    }
  }

  void op_destroy_some() {
    tw->op = "destroy";
    if (!b.plans.empty() && r.chance(50)) {
      size_t i = r.below(b.plans.size());
      expect("packinfer_plan_destroy", API(packinfer_plan_destroy, b.plans[i].h), S_OK, "a live plan");
      b.bury(b.plans[i].h.bits);
      if (r.chance(40)) expect("packinfer_plan_destroy", API(packinfer_plan_destroy, b.plans[i].h), S_HANDLE, "destroyed twice");
      b.plans.erase(b.plans.begin() + (long)i);
    } else if (!b.launches.empty()) {
      size_t i = r.below(b.launches.size());
      if (b.launches[i].runnable && r.chance(30)) run_case(b.launches[i].h, *b.launches[i].c, r, "a launch kept across steps");
      expect("packinfer_launch_destroy", API(packinfer_launch_destroy, b.launches[i].h), S_OK, "a live launch");
      b.bury(b.launches[i].h.bits);
      b.launches.erase(b.launches.begin() + (long)i);
    }
  }

  void step() {
    unsigned x = r.below(100);
    if (x < 22) op_flow();
    else if (x < 47) op_plan_mutated();
    else if (x < 67) op_handle_abuse();
    else if (x < 75) op_run_mutated();
    else if (x < 81) op_launch_mutated();
    else if (x < 88) op_layout();
    else if (x < 95) op_misc();
    else if (x < 97) op_context();
    else op_destroy_some();
  }
};

void run_api_phase(uint64_t seed, const Budget& budget) {
  enter_worker("api", 0, seed);
  ApiPhase ph(seed);
  try {
    ph.setup();
  } catch (StepFailed&) {
    return;
  }
  while (!budget.done()) {
    tw->step++;
    g_progress++;
    tw->detail[0] = 0;
    try {
      ph.step();
      trace_step();
    } catch (StepFailed&) {
    }
  }
  try {
    ph.teardown();
  } catch (StepFailed&) {
  }
}

}  // namespace

namespace {

// ---------------------------------------------------------------------------------------------
// Phase "pool": the managed KV pool against a model of every sequence's contents.
//
// A token's K/V in layer l is tag_value(tag, l, head, dim), `tag` being the nonce of the
// write_kv that stored it (0: appended, never written: unknown). The model keeps pages as the
// API defines their sharing (fork shares full pages and copies a partly covered one, an append
// into a shared partial page copies it, truncate and release drop references, match_prefix
// shares registered pages), so it predicts which writes are refused, when the pool is
// exhausted, and the pool's counters. Content hashes are chained over the tags, so a hash names
// the content it was registered for: a page that match_prefix hands out must hold exactly that
// content, whatever the pool did to it since.
// ---------------------------------------------------------------------------------------------

struct MPage {
  std::vector<uint64_t> tags;  // [layer][slot in page]
  int refs = 0;
  bool maybe_shared = false;  // may also be held by sequences the model does not know
  bool hashed = false;        // the model's copy of the pool's hash registry
  uint64_t hash = 0;
  int64_t lib_page = -1;  // the pool's page number, as append's slots showed it
};

struct MSeq {
  std::vector<int> pages;
  uint32_t len = 0;
  bool may_reserve = false;  // a relayout may have given it headroom pages
};

// Hash -> the content (tags of one page, all layers) it was registered for. Shared by the
// threads of the multi-threaded phase, whose sequences match each other's prefixes.
struct HashDict {
  std::mutex mu;
  std::unordered_map<uint64_t, std::vector<uint64_t>> content;
  std::vector<std::vector<uint64_t>> chains;  // registered hash chains, for match_prefix to ask
  void add(const std::vector<uint64_t>& hashes, const std::vector<std::vector<uint64_t>>& pages) {
    std::lock_guard<std::mutex> l(mu);
    for (size_t i = 0; i < hashes.size(); i++) content.emplace(hashes[i], pages[i]);
    chains.push_back(hashes);
    if (chains.size() > 256) chains.erase(chains.begin(), chains.begin() + 128);
  }
  bool get(uint64_t h, std::vector<uint64_t>* out) {
    std::lock_guard<std::mutex> l(mu);
    auto it = content.find(h);
    if (it == content.end()) return false;
    *out = it->second;
    return true;
  }
  std::vector<uint64_t> some_chain(Rng& r) {
    std::lock_guard<std::mutex> l(mu);
    if (chains.empty()) return {};
    return chains[r.below(chains.size())];
  }
};

std::atomic<uint64_t> g_nonce{1};

struct PoolPhase {
  Rng r;
  PackinferContext ctx{0};
  bool own_ctx = true;
  HashDict* dict;
  bool shared;  // the multi-threaded phase: other threads use the same pool

  PackinferPool pool{0};
  PackinferPoolOptions o{};
  uint32_t ps = 1, layers = 1, kvh = 1, qoh = 1, d = 8, dt = PACKINFER_DTYPE_F32;
  std::vector<MPage> pages;
  std::vector<int> free_ids;
  std::map<uint64_t, MSeq> seqs;
  std::vector<uint64_t> released;
  std::unordered_map<uint64_t, int> by_hash;
  std::unordered_map<int64_t, int> by_lib_page;
  bool exact = true, cow_exact = true;
  uint64_t cow = 0;
  std::vector<PackinferPool> dead_pools;
  uint64_t steps_on_pool = 0;

  PoolPhase(uint64_t seed, HashDict* dict_, bool shared_) : r(seed), dict(dict_), shared(shared_) {}

  // ---- the model ----
  int new_page() {
    int id;
    if (!free_ids.empty()) {
      id = free_ids.back();
      free_ids.pop_back();
    } else {
      id = (int)pages.size();
      pages.emplace_back();
    }
    MPage& p = pages[(size_t)id];
    p = MPage();
    p.tags.assign((size_t)layers * ps, 0);
    p.refs = 1;
    return id;
  }
  void unref(int id) {
    MPage& p = pages[(size_t)id];
    if (--p.refs > 0) return;
    if (p.hashed) {
      auto it = by_hash.find(p.hash);
      if (it != by_hash.end() && it->second == id) by_hash.erase(it);
    }
    if (p.lib_page >= 0) {
      auto it = by_lib_page.find(p.lib_page);
      if (it != by_lib_page.end() && it->second == id) by_lib_page.erase(it);
    }
    p = MPage();
    free_ids.push_back(id);
  }
  uint64_t tag_at(const MSeq& s, uint32_t t, uint32_t layer) const {
    return pages[(size_t)s.pages[t / ps]].tags[(size_t)layer * ps + t % ps];
  }
  bool known(const MSeq& s, uint32_t upto) const {
    for (uint32_t t = 0; t < upto; t++)
      for (uint32_t l = 0; l < layers; l++)
        if (tag_at(s, t, l) == 0) return false;
    return true;
  }
  bool any_reserve() const {
    for (auto& kv : seqs)
      if (kv.second.may_reserve) return true;
    return false;
  }
  uint32_t model_pages_used() const {
    uint32_t n = 0;
    for (auto& p : pages) n += p.refs > 0;
    return n;
  }
  uint64_t model_tokens_stored() const {
    std::vector<uint32_t> fill(pages.size(), 0);
    for (auto& kv : seqs)
      for (size_t i = 0; i < kv.second.pages.size(); i++) {
        uint32_t in_page = std::min<uint32_t>(ps, kv.second.len - (uint32_t)i * ps);
        fill[(size_t)kv.second.pages[i]] = std::max(fill[(size_t)kv.second.pages[i]], in_page);
      }
    uint64_t s = 0;
    for (uint32_t f : fill) s += f;
    return s;
  }
  std::vector<uint64_t> page_content(int id) const { return pages[(size_t)id].tags; }
  // The chained hash of the first `n` full pages of a sequence.
  uint64_t pool_serial = 0;  // in the hashes: contents of an earlier pool never match this one's
  std::vector<uint64_t> chain(const MSeq& s, uint32_t n) const {
    std::vector<uint64_t> h;
    uint64_t x = mix(0xC0FFEEull, pool_serial);
    for (uint32_t j = 0; j < n; j++) {
      for (uint64_t t : pages[(size_t)s.pages[j]].tags) x = mix(x, t);
      h.push_back(x);
    }
    return h;
  }

  void debug_dump() const {
    if (!getenv("PACKINFER_STRESS_DEBUG")) return;
    fprintf(stderr, "model: exact %d, %zu sequences\n", (int)exact, seqs.size());
    for (auto& kv : seqs) {
      fprintf(stderr, "  seq %lu len %u res %d:", (unsigned long)kv.first, kv.second.len, (int)kv.second.may_reserve);
      for (int pg : kv.second.pages)
        fprintf(stderr, " m%d/l%ld/r%d%s%s", pg, (long)pages[(size_t)pg].lib_page, pages[(size_t)pg].refs, pages[(size_t)pg].maybe_shared ? "?" : "",
                pages[(size_t)pg].hashed ? "#" : "");
      fprintf(stderr, "\n");
    }
  }

  PackinferPoolStats stats() {
    PackinferPoolStats s;
    memset(&s, 0, sizeof s);
    s.struct_size = sizeof s;
    expect("packinfer_pool_stats", API(packinfer_pool_stats, pool, &s), S_OK, "a live pool");
    if (s.pages_used + s.pages_free != s.num_pages || s.num_pages != o.num_pages)
      fail("pool stats", "pool stats: %u pages used + %u free != %u (pool of %u)", s.pages_used, s.pages_free, s.num_pages, o.num_pages);
    return s;
  }
  static bool same(const PackinferPoolStats& a, const PackinferPoolStats& b) {
    return a.num_pages == b.num_pages && a.pages_used == b.pages_used && a.pages_free == b.pages_free && a.num_sequences == b.num_sequences &&
           a.tokens_logical == b.tokens_logical && a.tokens_stored == b.tokens_stored && a.slots_reserved_unused == b.slots_reserved_unused &&
           a.relayouts == b.relayouts && a.relayout_pages_moved == b.relayout_pages_moved && a.cow_page_copies == b.cow_page_copies;
  }
  // The counters the model knows, compared with the pool's.
  void check_stats() {
    PackinferPoolStats s = stats();
    if (shared) return;
    uint64_t logical = 0;
    for (auto& kv : seqs) logical += kv.second.len;
    if (s.num_sequences != seqs.size() || s.tokens_logical != logical)
      fail("pool stats", "pool stats: %u sequences, %" PRIu64 " tokens; the model has %zu and %" PRIu64, s.num_sequences, s.tokens_logical,
           seqs.size(), logical);
    if (!exact) return;
    uint32_t used = model_pages_used();
    bool reserves = any_reserve();
    if (reserves ? s.pages_used < used : s.pages_used != used) {
      debug_dump();
      fail("pool stats", "pool stats: %u pages used; the model's sequences hold %u%s", s.pages_used, used, reserves ? " (plus headroom)" : "");
    }
    uint64_t stored = model_tokens_stored();
    if (s.tokens_stored != stored) fail("pool stats", "pool stats: %" PRIu64 " tokens stored; the model has %" PRIu64, s.tokens_stored, stored);
    if (cow_exact && s.cow_page_copies != cow)
      fail("pool stats", "pool stats: %" PRIu64 " copy-on-write copies; the model made %" PRIu64, s.cow_page_copies, cow);
  }
  // Free pages as far as the model can tell: exact in a single-threaded pool without headroom.
  bool model_free(uint32_t* free) const {
    if (shared || !exact || any_reserve()) return false;
    *free = o.num_pages - model_pages_used();
    return true;
  }

  // ---- pools ----
  PackinferPoolOptions random_options() {
    PackinferPoolOptions p;
    expect("packinfer_pool_options_default", API(packinfer_pool_options_default, &p), S_OK, "defaults");
    if (p.struct_size != sizeof p || p.page_size != 16 || p.headroom_pages != 2 || !p.causal || p.dtype != PACKINFER_DTYPE_BF16)
      fail("defaults", "pool defaults: page_size %u, headroom %u, causal %d, dtype %u", p.page_size, p.headroom_pages, (int)p.causal, p.dtype);
    p.num_layers = 1 + r.below(2);
    p.num_kv_heads = r.chance(70) ? 1 : 2;
    p.num_qo_heads = p.num_kv_heads * (r.chance(50) ? 1 : 2);
    if (g_cfg.cuda) {
      p.head_dim = 64;
      p.dtype = r.chance(50) ? PACKINFER_DTYPE_F16 : PACKINFER_DTYPE_BF16;
    } else {
      p.head_dim = r.chance(80) ? 8 : 16;
      p.dtype = r.chance(85) ? PACKINFER_DTYPE_F32 : PACKINFER_DTYPE_BF16;
    }
    p.causal = r.chance(75);
    p.sm_scale = r.chance(70) ? 0.0f : (float)r.range(1, 16) / 16.0f;
    p.page_size = (uint32_t)(r.chance(90) ? r.range(1, 8) : 16);
    p.num_pages = (uint32_t)(r.chance(70) ? r.range(4, 48) : r.range(48, 200));
    p.headroom_pages = r.below(4);
    if (r.chance(15)) {  // sized in bytes instead: whole pages of every layer, K and V
      uint64_t page_bytes = (uint64_t)p.page_size * p.num_kv_heads * p.head_dim * dtype_bytes(p.dtype) * 2 * p.num_layers;
      p.capacity_bytes = page_bytes * p.num_pages + r.below((uint32_t)page_bytes);
      p.num_pages = 0;
    }
    return p;
  }

  void open_pool(const PackinferPoolOptions& po) {
    o = po;
    if (o.num_pages == 0) {
      uint64_t page_bytes = (uint64_t)o.page_size * o.num_kv_heads * o.head_dim * dtype_bytes(o.dtype) * 2 * o.num_layers;
      o.num_pages = (uint32_t)(o.capacity_bytes / page_bytes);
    }
    ps = o.page_size;
    layers = o.num_layers;
    kvh = o.num_kv_heads;
    qoh = o.num_qo_heads;
    d = o.head_dim;
    dt = o.dtype;
    pages.clear();
    free_ids.clear();
    seqs.clear();
    released.clear();
    by_hash.clear();
    by_lib_page.clear();
    exact = !shared;
    cow_exact = true;
    cow = 0;
    steps_on_pool = 0;
    pool_serial = shared ? 0 : pool_serial + 1;
  }

  void create_pool() {
    tw->op = "pool create";
    PackinferPoolOptions po = random_options();
    set_detail("pool: layers %u, heads %u/%u, head_dim %u, dtype %u, page_size %u, pages %u, bytes %" PRIu64 ", headroom %u", po.num_layers,
               po.num_qo_heads, po.num_kv_heads, po.head_dim, po.dtype, po.page_size, po.num_pages, po.capacity_bytes, po.headroom_pages);
    PackinferPool p{0};
    expect("packinfer_pool_create", API(packinfer_pool_create, ctx, &po, &p), S_OK, "valid pool options");
    pool = p;
    open_pool(po);
    PackinferPoolStats s = stats();
    if (s.pages_used != 0 || s.num_sequences != 0) fail("pool stats", "a new pool has %u pages used, %u sequences", s.pages_used, s.num_sequences);
  }

  void destroy_pool() {
    tw->op = "pool destroy";
    if (!pool.bits) return;
    expect("packinfer_pool_destroy", API(packinfer_pool_destroy, pool), S_OK, "a live pool");
    dead_pools.push_back(pool);
    if (dead_pools.size() > 16) dead_pools.erase(dead_pools.begin());
    pool.bits = 0;
    seqs.clear();
  }

  // Pool options with defects: refused with the status of the defect's class.
  void op_pool_create_mutated() {
    tw->op = "pool create mutated";
    PackinferPoolOptions po = random_options();
    uint64_t page_bytes = (uint64_t)po.page_size * po.num_kv_heads * po.head_dim * dtype_bytes(po.dtype) * 2 * po.num_layers;
    if (po.num_pages == 0) po.num_pages = (uint32_t)(po.capacity_bytes / page_bytes), po.capacity_bytes = 0;  // sized in pages here
    Expect ex;
    const PackinferPoolOptions* op = &po;
    bool null_out = false;
    int kind = (int)r.below(15);
    switch (kind) {
      case 0: { const uint32_t bad[] = {3, 7, 255, UINT32_MAX}; po.dtype = bad[r.below(4)]; ex.must(S_INVALID); break; }  // not a dtype
      case 1: po.head_dim = 0; ex.must(S_INVALID); break;  // not a size
      case 2: po.head_dim = r.chance(50) ? 12 : 520; ex.must(S_UNSUP); break;
      case 3: po.num_kv_heads = 0; ex.must(S_INVALID); break;
      case 4: po.num_kv_heads = 2; po.num_qo_heads = 3; ex.must(S_INVALID); break;
      case 5: po.page_size = 0; ex.must(S_INVALID); break;
      case 6: po.num_pages = 0; po.capacity_bytes = r.chance(50) ? 0 : 1; ex.must(S_INVALID); break;
      case 7: po.num_pages = (uint32_t)INT32_MAX + 1 + r.below(1000); ex.must(S_INVALID); break;
      case 8: po.num_layers = 0; ex.must(S_INVALID); break;
      case 9: { const float bad[] = {-1.0f, NAN, INFINITY}; po.sm_scale = bad[r.below(3)]; ex.must(S_INVALID); break; }
      case 10:  // below the first release's size (which ends before kv_head_scales), or past any
        po.struct_size = r.chance(50) ? r.below(offsetof(PackinferPoolOptions, kv_head_scales)) : sizeof po + 4097;
        ex.must(S_INVALID);
        break;
      case 11: op = nullptr; ex.must(S_INVALID); break;
      case 12: null_out = true; ex.must(S_INVALID); break;
      case 13: po.num_qo_heads = 0; ex.must(S_INVALID); break;
      default:
        if (g_cfg.cuda) {  // the GPU pool takes what its kernels take
          if (r.chance(50)) po.dtype = PACKINFER_DTYPE_F32;
          else po.head_dim = 8;
          ex.must(S_UNSUP);
        } else {
          po.capacity_bytes = page_bytes - 1 - r.below((uint32_t)page_bytes - 1);  // less than a page
          po.num_pages = 0;
          ex.must(S_INVALID);
        }
    }
    set_detail("pool option defect %d: dtype %u head_dim %u heads %u/%u page_size %u pages %u bytes %" PRIu64, kind, po.dtype, po.head_dim,
               po.num_qo_heads, po.num_kv_heads, po.page_size, po.num_pages, po.capacity_bytes);
    PackinferPool p{0x5EB71A1Eull};
    PackinferStatus st = API(packinfer_pool_create, ctx, op, null_out ? nullptr : &p);
    if (st == PACKINFER_STATUS_OK && !null_out) expect("packinfer_pool_destroy", API(packinfer_pool_destroy, p), S_OK, "the pool just made");
    expect("packinfer_pool_create", st, ex.allowed(), "pool options with a defect");
    if (p.bits != 0x5EB71A1Eull) fail("failed call wrote out", "a failed pool creation wrote a handle");
  }

  // ---- sequences ----
  // Half the time one of the last sequences touched: engines work on few requests at a time,
  // and defects need several calls on the same sequences.
  std::vector<uint64_t> recent;
  uint64_t pick_live() {
    uint64_t id;
    if (!recent.empty() && r.chance(50) && seqs.count(recent[r.below(recent.size())])) {
      id = recent[r.below(recent.size())];
      if (seqs.count(id)) return id;
    }
    auto it = seqs.begin();
    std::advance(it, (long)r.below(seqs.size()));
    id = it->first;
    recent.push_back(id);
    if (recent.size() > 4) recent.erase(recent.begin());
    return id;
  }
  // A sequence id that is not live: released, never created, or 0.
  uint64_t pick_dead() {
    if (!released.empty() && r.chance(60)) return released[r.below(released.size())];
    return r.chance(30) ? 0 : (r.chance(50) ? UINT64_MAX - r.below(100) : (1ull << 40) + r.below(1000));
  }
  uint32_t length_of(uint64_t id) {
    uint32_t n = 0;
    expect("packinfer_pool_sequence_length", API(packinfer_pool_sequence_length, pool, id, &n), S_OK, "a live sequence");
    return n;
  }

  void op_create() {
    tw->op = "sequence create";
    uint64_t id = 0;
    expect("packinfer_pool_sequence_create", API(packinfer_pool_sequence_create, pool, &id), S_OK, "a live pool");
    if (id == 0 || seqs.count(id) || std::find(released.begin(), released.end(), id) != released.end())
      fail("sequence ids", "sequence_create returned id %" PRIu64 ", which is 0, live or was released", id);
    seqs[id] = MSeq();
    recent.push_back(id);
    if (recent.size() > 4) recent.erase(recent.begin());
    set_detail("created sequence %" PRIu64, id);
    if (r.chance(10)) expect("packinfer_pool_sequence_create", API(packinfer_pool_sequence_create, pool, nullptr), S_INVALID, "out is NULL");
  }

  // Learns or checks the pool's page number of model page `id` from a slot.
  void note_slot(int id, int64_t slot, uint32_t token) {
    if (slot < 0 || (uint64_t)slot >= (uint64_t)o.num_pages * ps || (uint64_t)slot % ps != token % ps)
      fail("append slots", "append gave token %u slot %" PRId64 " (pool of %u pages of %u)", token, slot, o.num_pages, ps);
    int64_t page = slot / ps;
    MPage& p = pages[(size_t)id];
    if (p.lib_page >= 0 && p.lib_page != page)
      fail("append slots", "append gave token %u slot %" PRId64 " in page %" PRId64 ", but its page is %" PRId64, token, slot, page, p.lib_page);
    if (p.lib_page < 0) {
      auto it = by_lib_page.find(page);
      if (it != by_lib_page.end() && it->second != id && pages[(size_t)it->second].refs > 0 && !shared && exact) {
        debug_dump();
        fail("append slots", "append put token %u in pool page %" PRId64 ", which another sequence's page already is", token, page);
      }
      p.lib_page = page;
      by_lib_page[page] = id;
    }
  }

  // The ops take their target and size at random unless given (0 / -1 = random).
  void op_append(uint64_t id = 0, int64_t want_n = -1) {
    tw->op = "append";
    if (seqs.empty()) return op_create();
    if (!id) id = pick_live();
    MSeq& s = seqs[id];
    uint32_t n;
    unsigned x = r.below(100);
    if (want_n >= 0) n = (uint32_t)want_n;
    else if (x < 75) n = (uint32_t)r.range(0, 2 * (int)ps + 1);
    else if (x < 94) n = (uint32_t)r.range(1, 8 * (int)ps);
    else if (x < 98) n = (uint32_t)r.range(1, (int)(o.num_pages * ps) + 10);  // likely exhausts the pool
    else n = (uint32_t)INT32_MAX - s.len + 1 + r.below(1000);  // longer than int32 can count
    set_detail("append %u tokens to sequence %" PRIu64 " of %u tokens in %zu pages", n, id, s.len, s.pages.size());
    Allowed allowed;
    uint32_t need = 0;
    bool cow_lo = false, cow_hi = false;
    PackinferPoolStats before{};
    bool have_before = !shared;
    if (have_before) before = stats();
    if (n == 0) allowed = S_OK;
    else if ((uint64_t)s.len + n > (uint64_t)INT32_MAX) allowed = S_INVALID;
    else {
      need = (uint32_t)(((uint64_t)s.len + n + ps - 1) / ps - s.pages.size());
      if (s.len % ps != 0) {
        const MPage& last = pages[(size_t)s.pages.back()];
        // Whether the pool copies the partial last page depends on sharing the model knows
        // only while it is exact.
        cow_lo = exact && last.refs > 1;
        cow_hi = last.refs > 1 || last.maybe_shared || !exact;
      }
      uint32_t fresh_hi = need + cow_hi, fresh_lo = (s.may_reserve ? 0 : need) + cow_lo;
      uint32_t free_pages;
      if (shared) allowed = S_OK | S_EXHAUSTED;
      else {
        if (!model_free(&free_pages)) free_pages = before.pages_free;
        allowed = fresh_hi <= free_pages ? S_OK : fresh_lo > free_pages ? S_EXHAUSTED : (S_OK | S_EXHAUSTED);
      }
    }
    bool want_slots = n <= 100000 && r.chance(80);
    std::vector<int64_t> slots;
    if (want_slots) slots.assign((size_t)n + 4, -7);
    PackinferStatus st = API(packinfer_pool_append, pool, id, n, want_slots ? slots.data() : nullptr, nullptr);
    expect("packinfer_pool_append", st, allowed, "the model's free pages and the sequence's length");
    if (want_slots)
      for (size_t i = n; i < slots.size(); i++)
        if (slots[i] != -7) fail("output bounds", "append of %u tokens wrote slot entry %zu", n, i);
    if (st != PACKINFER_STATUS_OK) {
      if (st == PACKINFER_STATUS_POOL_EXHAUSTED) cover("appends refused (pool exhausted)");
      if (have_before && !same(before, stats())) fail("exhausted changed the pool", "a refused append changed the pool's counters");
      if (length_of(id) != s.len) fail("exhausted changed the pool", "a refused append changed the sequence's length");
      if (known(s, s.len) && s.len > 0) verify({id});
      return;
    }
    if (n == 0) return;
    if (s.len % ps != 0) {
      int& lastp = s.pages.back();
      MPage& last = pages[(size_t)lastp];
      if (last.refs > 1 || last.maybe_shared || !exact) {  // copied on write (or maybe): a private copy of the same content
        int copy = new_page();
        pages[(size_t)copy].tags = pages[(size_t)lastp].tags;
        unref(lastp);
        lastp = copy;
        cow++;
        if (!cow_lo) cow_exact = false;  // the pool may have written in place: it alone knew the page was private
      }
    }
    // The appended slots of the last page are new tokens: unknown until written.
    for (uint32_t t = s.len; t < std::min<uint32_t>(s.len + n, (uint32_t)s.pages.size() * ps); t++)
      for (uint32_t l = 0; l < layers; l++) pages[(size_t)s.pages[t / ps]].tags[(size_t)l * ps + t % ps] = 0;
    while (s.pages.size() * ps < (size_t)s.len + n) s.pages.push_back(new_page());
    if (want_slots)
      for (uint32_t i = 0; i < n; i++) note_slot(s.pages[(s.len + i) / ps], slots[i], s.len + i);
    s.len += n;
    if (length_of(id) != s.len) fail("sequence length", "after append the pool says %u tokens, the model %u", length_of(id), s.len);
    if (r.chance(75)) op_write({id});  // as an engine does: the step's K/V right after the append
  }

  // Tokens at the end of `s` that may be written: never over a written token of a page whose
  // hash was registered (that content is the hash's; an engine writes new tokens only).
  uint32_t writable_tail(const MSeq& s) const {
    uint32_t n = 0;
    while (n < s.len) {
      uint32_t t = s.len - 1 - n;
      const MPage& p = pages[(size_t)s.pages[t / ps]];
      bool written = false;
      for (uint32_t l = 0; l < layers; l++) written |= p.tags[(size_t)l * ps + t % ps] != 0;
      if (written && (p.hashed || p.maybe_shared)) break;
      n++;
    }
    return n;
  }
  uint32_t unwritten_tail(const MSeq& s) const {
    uint32_t n = 0;
    while (n < s.len && tag_at(s, s.len - 1 - n, 0) == 0) n++;
    return n;
  }

  // One write_kv per layer for the last tokens of 1-3 sequences, valid or with a defect.
  // `targets` (else 1-3 random sequences): their unwritten tails, or other writable tails.
  void op_write(std::vector<uint64_t> targets = {}) {
    tw->op = "write_kv";
    if (seqs.empty()) return op_create();
    bool fresh_only = !targets.empty();
    if (targets.empty()) {
      int k = r.chance(70) ? 1 : r.range(2, 3);
      for (int i = 0; i < k; i++) targets.push_back(pick_live());
    }
    std::vector<uint64_t> ids;
    std::vector<uint32_t> counts;
    for (uint64_t id : targets) {
      const MSeq& s = seqs[id];
      uint32_t tail = writable_tail(s), fresh = std::min(tail, unwritten_tail(s));
      ids.push_back(id);
      counts.push_back(fresh_only || r.chance(70) ? fresh : tail == 0 ? 0 : (uint32_t)r.range(0, (int)tail));
    }
    Expect ex;
    int defect = fresh_only || r.chance(75) ? -1 : (int)r.below(14);
    uint64_t total = 0;
    for (uint32_t c : counts) total += c;
    uint32_t rows = (uint32_t)total;
    std::vector<uint64_t> tags(rows);
    for (auto& t : tags) t = g_nonce.fetch_add(1) * 0x9E3779B97F4A7C15ull | 1;
    // Sharing: a page another sequence holds is refused; one that may be held elsewhere may be.
    for (size_t i = 0; i < ids.size(); i++) {
      const MSeq& s = seqs[ids[i]];
      for (uint32_t t = s.len - counts[i]; t < s.len; t++) {
        const MPage& p = pages[(size_t)s.pages[t / ps]];
        if (p.refs > 1 && exact) ex.must(S_INVALID);
        else if (p.refs > 1 || p.maybe_shared || !exact) ex.maybe(S_INVALID);
      }
    }
    uint32_t layer_defect = UINT32_MAX;
    int64_t stride = r.chance(70) ? 0 : (int64_t)kvh * d + 8 * r.range(0, 3);
    int64_t eff = stride == 0 ? (int64_t)kvh * d : stride;
    PackinferKvSource src{sizeof(PackinferKvSource), nullptr, nullptr, rows, kvh, d, dt, stride};
    const uint64_t* idp = ids.data();
    const uint32_t* cp = counts.data();
    const PackinferKvSource* sp = &src;
    uint32_t nreq = (uint32_t)ids.size();
    std::vector<unsigned char> big;
    switch (defect) {
      case -1: break;
      case 0: src.struct_size = r.chance(50) ? r.below(sizeof src) : sizeof src + 4097; ex.must(S_INVALID); break;
      case 1: src.dtype = (dt + 1 + r.below(2)) % 3; ex.must(S_INVALID); break;
      case 2: src.dtype = 3 + r.below(100); ex.must(S_INVALID); break;
      case 3: src.num_kv_heads = kvh + 1; ex.must(S_INVALID); break;
      case 4: src.head_dim = d + 8; ex.must(S_INVALID); break;
      case 5: src.num_rows = rows + 1 + r.below(3); ex.must(S_INVALID); break;
      case 6: src.stride_token = r.chance(50) ? -1 : (int64_t)kvh * d - 1; ex.must(S_INVALID); break;
      case 7: if (rows > 0) ex.must(S_INVALID); sp = &src; src.k = nullptr; break;  // set below; k stays NULL
      case 8: idp = nullptr; if (nreq > 0) ex.must(S_INVALID); break;
      case 9: cp = nullptr; if (nreq > 0) ex.must(S_INVALID); break;
      case 10: layer_defect = layers + r.below(5); ex.must(S_INVALID); break;
      case 11: ids[0] = pick_dead(); ex.must(S_INVALID); break;
      case 12: counts[0] = seqs[ids[0]].len + 1 + r.below(3); src.num_rows += counts[0]; ex.must(S_INVALID); break;
      default:  // a newer header's larger source struct
        big.assign(sizeof src + (size_t)r.range(1, 4096), 0);
        src.struct_size = big.size();
        break;
    }
    set_detail("write_kv of %u rows to %u sequences (first %" PRIu64 ": %u tokens of %u), defect %d", rows, nreq, ids[0], counts[0],
               seqs.count(ids[0]) ? seqs[ids[0]].len : 0, defect);
    size_t nrows = std::max<size_t>(1, std::max<size_t>(rows, src.num_rows));
    Buf kb(nrows * (size_t)eff * dtype_bytes(dt)), vb(nrows * (size_t)eff * dtype_bytes(dt));
    for (uint32_t l = 0; l < layers; l++) {
      for (uint32_t row = 0; row < rows; row++)
        for (uint32_t h = 0; h < kvh; h++)
          for (uint32_t e = 0; e < d; e++) {
            size_t at = (size_t)row * (size_t)eff + (size_t)h * d + e;
            store_elem(kb.h(), at, dt, tag_value(tags[row], l, h, e, false));
            store_elem(vb.h(), at, dt, tag_value(tags[row], l, h, e, true));
          }
      kb.upload();
      vb.upload();
      if (defect != 7) src.k = kb.ptr();
      src.v = vb.ptr();
      if (!big.empty()) {
        memcpy(big.data(), &src, sizeof src);
        sp = (const PackinferKvSource*)big.data();
      }
      uint32_t layer = layer_defect != UINT32_MAX ? layer_defect : l;
      PackinferStatus st = API(packinfer_pool_write_kv, pool, layer, idp, cp, nreq, sp, nullptr);
      if (g_cfg.cuda) g_cuda.sync();  // the copies read kb/vb
      // Once the first layer is written, the others (same sequences, same source) must be too.
      expect("packinfer_pool_write_kv", st, l == 0 ? ex.allowed() : S_OK, "the sequences' lengths and sharing, and the source");
      if (st != PACKINFER_STATUS_OK) {
        if (!ex.must_fail) exact = false;  // the pool knew of a sharer the model did not
        if (defect == -1) cover("writes refused (shared page)");
        return;
      }
      if (l == 0 && !exact) {
        // Written, so the pool holds these pages privately: where the model thought them shared,
        // the writer gets its own copy and the other holders keep the old content.
        for (size_t i = 0; i < ids.size(); i++) {
          MSeq& s = seqs[ids[i]];
          for (uint32_t t = s.len - counts[i]; t < s.len; t++) {
            int& pg = s.pages[t / ps];
            if (pages[(size_t)pg].refs <= 1) continue;
            int copy = new_page();
            pages[(size_t)copy].tags = pages[(size_t)pg].tags;
            unref(pg);
            pg = copy;
          }
        }
      }
      // The rows go, in order, to the last counts[i] tokens of ids[i].
      uint32_t row = 0;
      for (size_t i = 0; i < ids.size(); i++) {
        MSeq& s = seqs[ids[i]];
        for (uint32_t t = s.len - counts[i]; t < s.len; t++, row++) {
          // New content in a registered page (only unwritten slots come here) stays registered in
          // the model as in the pool; match_prefix then checks the page still holds the hash's content.
          pages[(size_t)s.pages[t / ps]].tags[(size_t)l * ps + t % ps] = tags[row];
        }
      }
    }
  }

  uint64_t op_fork(uint64_t parent = 0, int64_t want_L = -1) {
    tw->op = "fork";
    if (seqs.empty()) return op_create(), 0;
    if (!parent) parent = pick_live();
    MSeq ps_ = seqs[parent];
    uint32_t L = r.chance(90) ? (uint32_t)r.range(0, (int)ps_.len) : ps_.len + 1 + r.below(10);
    if (L <= ps_.len && r.chance(40)) L -= L % ps;  // at a page boundary: every page shared, none copied
    if (want_L >= 0) L = (uint32_t)want_L;
    bool null_child = want_L < 0 && r.chance(3);
    set_detail("fork sequence %" PRIu64 " (%u tokens) at %u", parent, ps_.len, L);
    Allowed allowed;
    PackinferPoolStats before{};
    if (!shared) before = stats();
    if (null_child || L > ps_.len) allowed = S_INVALID;
    else if (L % ps == 0) allowed = S_OK;
    else {
      uint32_t free_pages;
      if (shared) allowed = S_OK | S_EXHAUSTED;
      else {
        if (!model_free(&free_pages)) free_pages = before.pages_free;
        allowed = free_pages >= 1 ? S_OK : S_EXHAUSTED;
      }
    }
    uint64_t child = 0x5EB71A1Eull;
    PackinferStatus st = API(packinfer_pool_fork, pool, parent, L, nullptr, null_child ? nullptr : &child);
    expect("packinfer_pool_fork", st, allowed, "the parent's length and the free pages");
    if (st != PACKINFER_STATUS_OK) {
      if (child != 0x5EB71A1Eull) fail("failed call wrote out", "a failed fork wrote a child id");
      if (!shared && !same(before, stats())) fail("exhausted changed the pool", "a refused fork changed the pool's counters");
      return 0;
    }
    if (child == 0 || seqs.count(child)) fail("sequence ids", "fork returned id %" PRIu64 ", 0 or live", child);
    set_detail("forked sequence %" PRIu64 " (%u tokens) at %u: child %" PRIu64, parent, ps_.len, L, child);
    MSeq c;
    c.len = L;
    for (uint32_t j = 0; j < L / ps; j++) {
      c.pages.push_back(ps_.pages[j]);
      pages[(size_t)ps_.pages[j]].refs++;
    }
    if (L % ps) {
      int copy = new_page();
      pages[(size_t)copy].tags = pages[(size_t)ps_.pages[L / ps]].tags;
      c.pages.push_back(copy);
      cow++;
    }
    seqs[child] = c;
    recent.push_back(child);
    if (recent.size() > 4) recent.erase(recent.begin());
    return child;
  }

  void op_truncate(uint64_t id = 0, int64_t want_L = -1) {
    tw->op = "truncate";
    if (seqs.empty()) return op_create();
    if (!id) id = pick_live();
    MSeq& s = seqs[id];
    uint32_t L = r.chance(92) ? (uint32_t)r.range(0, (int)s.len) : s.len + 1 + r.below(10);
    if (want_L >= 0) L = (uint32_t)want_L;
    set_detail("truncate sequence %" PRIu64 " from %u to %u tokens", id, s.len, L);
    PackinferStatus st = API(packinfer_pool_truncate, pool, id, L);
    expect("packinfer_pool_truncate", st, L > s.len ? S_INVALID : S_OK, "the sequence's length");
    if (st != PACKINFER_STATUS_OK) return;
    size_t keep = (L + ps - 1) / ps;
    for (size_t j = keep; j < s.pages.size(); j++) unref(s.pages[j]);
    s.pages.resize(keep);
    s.len = L;
    s.may_reserve = false;  // truncate returns the headroom
    if (L % ps != 0) {  // a partial page is no longer the content of a full page's hash
      MPage& p = pages[(size_t)s.pages.back()];
      if (p.hashed) {
        auto it = by_hash.find(p.hash);
        if (it != by_hash.end() && it->second == s.pages.back()) by_hash.erase(it);
        p.hashed = false;
      }
    }
  }

  void op_release(uint64_t target = 0) {
    tw->op = "release";
    if (target || (!seqs.empty() && r.chance(85))) {
      uint64_t id = target ? target : pick_live();
      set_detail("release sequence %" PRIu64, id);
      expect("packinfer_pool_release", API(packinfer_pool_release, pool, id), S_OK, "a live sequence");
      for (int p : seqs[id].pages) unref(p);
      seqs.erase(id);
      released.push_back(id);
      if (released.size() > 64) released.erase(released.begin());
      if (r.chance(30)) expect("packinfer_pool_release", API(packinfer_pool_release, pool, id), S_INVALID, "released twice");
    } else {
      uint64_t id = pick_dead();
      set_detail("calls on dead sequence %" PRIu64, id);
      uint32_t n = 0;
      uint64_t child = 0;
      switch (r.below(5)) {
        case 0: expect("packinfer_pool_release", API(packinfer_pool_release, pool, id), S_INVALID, "a dead sequence"); break;
        case 1: expect("packinfer_pool_sequence_length", API(packinfer_pool_sequence_length, pool, id, &n), S_INVALID, "a dead sequence"); break;
        case 2: expect("packinfer_pool_append", API(packinfer_pool_append, pool, id, 1, nullptr, nullptr), S_INVALID, "a dead sequence"); break;
        case 3: expect("packinfer_pool_truncate", API(packinfer_pool_truncate, pool, id, 0), S_INVALID, "a dead sequence"); break;
        default: expect("packinfer_pool_fork", API(packinfer_pool_fork, pool, id, 0, nullptr, &child), S_INVALID, "a dead sequence");
      }
      if (!seqs.empty() && r.chance(30)) {
        uint64_t live = pick_live();
        expect("packinfer_pool_sequence_length", API(packinfer_pool_sequence_length, pool, live, nullptr), S_INVALID, "out is NULL");
      }
    }
  }

  void op_register(uint64_t id = 0, bool all_known = false) {
    tw->op = "register hashes";
    if (seqs.empty()) return op_create();
    if (!id) id = pick_live();
    MSeq& s = seqs[id];
    uint32_t full = s.len / ps;
    // An engine hashes tokens it knows: only leading pages whose every token was written (or
    // more pages than the sequence has full, which is refused).
    uint32_t known_pages = 0;
    while (known_pages < full && known(s, (known_pages + 1) * ps)) known_pages++;
    uint32_t n = r.chance(90) ? (r.chance(60) ? known_pages : (uint32_t)r.range(0, (int)known_pages)) : full + 1 + r.below(3);
    if (all_known) n = known_pages;
    std::vector<uint64_t> h = chain(s, std::min(n, full));
    while (h.size() < n) h.push_back(r.next());
    bool null_hashes = n > 0 && !all_known && r.chance(3);
    set_detail("register %u hashes of sequence %" PRIu64 " (%u tokens)", n, id, s.len);
    PackinferStatus st = API(packinfer_pool_register_page_hashes, pool, id, null_hashes ? nullptr : h.data(), n);
    expect("packinfer_pool_register_page_hashes", st, (n > full || null_hashes) ? S_INVALID : S_OK, "the sequence's full pages");
    if (st != PACKINFER_STATUS_OK) return;
    std::vector<std::vector<uint64_t>> contents;
    for (uint32_t j = 0; j < n; j++) contents.push_back(page_content(s.pages[j]));
    if (n > 0) dict->add(h, contents);
    for (uint32_t j = 0; j < n; j++)
      for (auto& kv : seqs)
        if (kv.first != id && kv.second.len % ps != 0 && kv.second.pages.back() == s.pages[j]) cover("registered a page another sequence holds partly");
    for (uint32_t j = 0; j < n; j++) {
      int p = s.pages[j];
      MPage& pg = pages[(size_t)p];
      if (shared) pg.maybe_shared = true;  // another thread may match it now
      if (by_hash.count(h[j]) || pg.hashed) continue;  // a hash or page registered before keeps its first registration
      by_hash[h[j]] = p;
      pg.hashed = true;
      pg.hash = h[j];
    }
  }

  void op_match(uint64_t donor = 0, const std::vector<uint64_t>* given = nullptr) {
    tw->op = "match prefix";
    uint64_t id = 0;
    if (given) donor = UINT64_MAX;  // the hashes are given
    bool fresh = donor || seqs.empty() || r.chance(85);
    if (fresh) {
      expect("packinfer_pool_sequence_create", API(packinfer_pool_sequence_create, pool, &id), S_OK, "a live pool");
      seqs[id] = MSeq();
    } else {
      id = pick_live();
    }
    MSeq& s = seqs[id];
    // The hashes of a prompt: the leading part of a registered chain or of a live sequence's
    // full pages (registered or not), maybe followed by pages nobody has.
    std::vector<uint64_t> h;
    std::vector<uint64_t> donors;
    for (auto& kv : seqs)
      if (kv.second.len >= ps && kv.first != id) donors.push_back(kv.first);
    if (donor && seqs.count(donor)) donors = {donor};
    if (given) h = *given;
    else if (!donors.empty() && (donor || r.chance(60))) {
      const MSeq& d = seqs[donors[r.below(donors.size())]];
      uint32_t kp = 0;
      while (kp < d.len / ps && known(d, (kp + 1) * ps)) kp++;
      h = chain(d, kp);
    } else {
      h = dict->some_chain(r);
    }
    if (!h.empty()) h.resize((size_t)r.range(1, (int)h.size()));
    while (!donor && r.chance(30)) h.push_back(r.next());
    bool null_hashes = !donor && !h.empty() && r.chance(3), null_out = !donor && r.chance(3);
    Allowed allowed = (null_hashes || null_out) ? S_INVALID : s.len != 0 ? S_INVALID : s.may_reserve ? (S_OK | S_INVALID) : S_OK;
    set_detail("match %zu hashes for sequence %" PRIu64 " of %u tokens", h.size(), id, s.len);
    uint32_t matched = 0x5EB7;
    PackinferStatus st = API(packinfer_pool_match_prefix, pool, id, null_hashes ? nullptr : h.data(), (uint32_t)h.size(), null_out ? nullptr : &matched);
    expect("packinfer_pool_match_prefix", st, allowed, "an empty sequence");
    if (st != PACKINFER_STATUS_OK) return;
    if (matched % ps != 0 || matched / ps > h.size())
      fail("match prefix", "match_prefix matched %u tokens for %zu hashes of pages of %u", matched, h.size(), ps);
    uint32_t m = matched / ps;
    if (m > 0) cover("prefix matches");
    uint32_t predicted = 0;
    while (predicted < h.size() && by_hash.count(h[predicted])) predicted++;
    if (m != predicted && !shared) exact = false;  // the pool's registry differs from the model's: sharing no longer known
    for (uint32_t j = 0; j < m; j++) {
      std::vector<uint64_t> want;
      if (!dict->get(h[j], &want)) fail("match prefix", "match_prefix matched hash %u (0x%" PRIx64 "), which nobody registered", j, h[j]);
      auto it = by_hash.find(h[j]);
      if (it != by_hash.end() && pages[(size_t)it->second].refs > 0 && pages[(size_t)it->second].tags == want) {
        s.pages.push_back(it->second);
        pages[(size_t)it->second].refs++;
      } else {
        if (it != by_hash.end() && pages[(size_t)it->second].refs > 0) {
          cover("matched a registered page since rewritten");
          if (getenv("PACKINFER_STRESS_DEBUG")) {
            const auto& have = pages[(size_t)it->second].tags;
            std::string diff;
            for (size_t q = 0; q < want.size(); q++)
              if (have[q] != want[q]) diff += " " + std::to_string(q) + (have[q] == 0 ? "(unwritten)" : "");
            fprintf(stderr, "match of sequence %lu: page %u (model m%d) differs from hash content at slots%s; matched %u of %zu, predicted %u\n",
                    (unsigned long)id, j, it->second, diff.c_str(), m, h.size(), predicted);
          }
        }
        // The pool's page for this hash is one the model cannot name; its content must be the hash's.
        int p = new_page();
        pages[(size_t)p].tags = want;
        pages[(size_t)p].maybe_shared = true;
        pages[(size_t)p].hashed = true;
        pages[(size_t)p].hash = h[j];
        if (it != by_hash.end()) pages[(size_t)it->second].hashed = false;
        by_hash[h[j]] = p;
        s.pages.push_back(p);
        if (!shared) exact = false;
      }
    }
    if (m < predicted) {  // the pool dropped a registration the model kept
      pages[(size_t)by_hash[h[m]]].hashed = false;
      by_hash.erase(h[m]);
    }
    s.len = matched;
    if (length_of(id) != s.len) fail("sequence length", "after match_prefix the pool says %u tokens, the model %u", length_of(id), s.len);
    // An engine runs the matched prompt's next step right away: check what it reads.
    if (m > 0 && r.chance(70)) verify({id});
  }

  // Plans a step from the pool for some sequences, maybe relays out, runs every layer and
  // compares each query row whose keys the model knows with attention over the model's K/V.
  void verify(std::vector<uint64_t> ids) {
    tw->op = "verify";
    if (ids.empty()) {
      if (seqs.empty()) return op_create();
      std::vector<uint64_t> all, known_ones;
      for (auto& kv : seqs) {
        all.push_back(kv.first);
        if (kv.second.len > 0 && known(kv.second, kv.second.len)) known_ones.push_back(kv.first);
      }
      // Mostly sequences whose every token the model knows: all their rows are compared.
      if (r.chance(80) && !known_ones.empty()) all = known_ones;
      int k = r.range(1, std::min<int>(6, (int)all.size()));
      for (int i = 0; i < k; i++) {
        size_t j = i + r.below(all.size() - (size_t)i);
        std::swap(all[(size_t)i], all[j]);
        ids.push_back(all[(size_t)i]);
      }
    }
    std::vector<uint32_t> nq;
    uint32_t total_q = 0;
    uint64_t total_len = 0;
    for (uint64_t id : ids) {
      const MSeq& s = seqs[id];
      uint32_t q = s.len == 0 ? 0 : (uint32_t)r.range(r.chance(80) ? 1 : 0, (int)std::min<uint32_t>(s.len, 4));
      nq.push_back(q);
      total_q += q;
      total_len += s.len;
    }
    set_detail("plan from the pool: %zu sequences, first %" PRIu64 " with %u tokens, %u queries", ids.size(), ids[0], seqs[ids[0]].len, nq[0]);
    PackinferPlanOptions po;
    expect("packinfer_plan_options_default", API(packinfer_plan_options_default, &po), S_OK, "defaults");
    po.flags = r.chance(60) ? 0 : r.below(32);
    po.split_keys = r.chance(50) ? 0 : (uint32_t)r.range(1, 16);
    po.capacity = r.chance(60) ? 0.0 : std::ldexp(1.0, r.range(-30, 20));
    bool use_opts = r.chance(50);
    PackinferPlan plan{0};
    expect("packinfer_pool_plan_create", API(packinfer_pool_plan_create, ctx, pool, ids.data(), nq.data(), (uint32_t)ids.size(), use_opts ? &po : nullptr, &plan),
           S_OK, "live, distinct sequences with their queries appended");
    PackinferPoolStats st = stats();
    uint64_t token_bytes = (uint64_t)kvh * d * dtype_bytes(dt) * 2 * layers;
    // (Another thread's plan may be the pool's last one: then these are its numbers.)
    if (!shared && (st.step_read_bytes_unshared != total_len * token_bytes || st.step_read_bytes_shared > st.step_read_bytes_unshared))
      fail("pool stats", "step reads %" PRIu64 " bytes unshared (want %" PRIu64 "), %" PRIu64 " shared", st.step_read_bytes_unshared,
           total_len * token_bytes, st.step_read_bytes_shared);
    if (r.chance(30)) {
      PackinferRelayoutReport rep;
      memset(&rep, 0, sizeof rep);
      rep.struct_size = sizeof rep;
      bool regroup = r.chance(60), null_report = r.chance(20);
      PackinferStatus rs = API(packinfer_pool_relayout, pool, plan, ids.data(), (uint32_t)ids.size(), regroup, nullptr, null_report ? nullptr : &rep);
      expect("packinfer_pool_relayout", rs, S_OK, "the plan's own sequences");
      for (uint64_t id : ids) seqs[id].may_reserve = true;
      PackinferPoolStats after = stats();
      if (null_report) rep.pages_moved = after.relayout_pages_moved - st.relayout_pages_moved;  // no report: what the counters say
      else if (rep.groups != rep.groups_in_place + rep.groups_rebuilt + rep.groups_no_room ||
          rep.bytes_moved != rep.pages_moved * (uint64_t)ps * kvh * d * dtype_bytes(dt) * 2 * layers)
        fail("relayout report", "relayout: %u groups = %u in place + %u rebuilt + %u no room; %" PRIu64 " pages, %" PRIu64 " bytes", rep.groups,
             rep.groups_in_place, rep.groups_rebuilt, rep.groups_no_room, rep.pages_moved, rep.bytes_moved);
      if (g_cfg.trace) {
        std::string l;
        for (uint64_t id : ids) l += " " + std::to_string(id);
        fprintf(stderr, "  relayout of [%s ] (regroup %d): %u groups, %u rebuilt, %" PRIu64 " pages moved\n", l.c_str(), (int)regroup, rep.groups,
                rep.groups_rebuilt, rep.pages_moved);
      }
      // Other threads' relayouts of the same pool move the counter too: then it moved at least ours.
      uint64_t moved = after.relayout_pages_moved - st.relayout_pages_moved;
      if (shared ? moved < rep.pages_moved : moved != rep.pages_moved)
        fail("relayout report", "the pool's relayout counter moved by %" PRIu64 ", the report says %" PRIu64, after.relayout_pages_moved - st.relayout_pages_moved,
             rep.pages_moved);
      if (rep.pages_moved > 0 || r.chance(10)) {
        if (rep.pages_moved > 0) {  // page numbers changed; the plan is stale
          for (auto& p : pages) p.lib_page = -1;
          by_lib_page.clear();
        }
        expect("packinfer_plan_destroy", API(packinfer_plan_destroy, plan), S_OK, "a live plan");
        expect("packinfer_pool_plan_create", API(packinfer_pool_plan_create, ctx, pool, ids.data(), nq.data(), (uint32_t)ids.size(), nullptr, &plan),
               S_OK, "the same step after a relayout");
      }
    }
    PackinferLaunch launch{0};
    // In the multi-threaded phase another thread's relayout may move pages between this plan and
    // its launch or runs: the plan is then stale and refused, and this step compares nothing.
    const Allowed fresh = shared ? (S_OK | S_INVALID) : S_OK;
    auto refused_as_stale = [&](const char* fn) {
      const char* msg = API(packinfer_last_error);
      if (!strstr(msg, "stale")) fail(std::string("status: ") + fn + " refused a fresh pool plan", "%s: \"%s\"", fn, msg);
      cover("pool plans made stale by another thread's relayout", 1);
    };
    if (expect("packinfer_launch_create", API(packinfer_launch_create, ctx, plan, nullptr, nullptr, &launch), fresh, "a plan from the pool") !=
        PACKINFER_STATUS_OK) {
      refused_as_stale("packinfer_launch_create");
      expect("packinfer_plan_destroy", API(packinfer_plan_destroy, plan), S_OK, "a live plan");
      return;
    }
    for (uint32_t l = 0; l < layers; l++) {
      PackinferRunArgs a;
      memset(&a, 0, sizeof a);
      a.struct_size = sizeof a;
      expect("packinfer_pool_kv_layout", API(packinfer_pool_kv_layout, pool, l, &a.kv), S_OK, "a layer of the pool");
      int64_t row = (int64_t)kvh * d;
      if (a.kv.stride_dim != 1 || a.kv.stride_head != (int64_t)d || a.kv.stride_token != row || a.kv.stride_page != row * ps)
        fail("layout helper", "pool layout strides (%" PRId64 ", %" PRId64 ", %" PRId64 ", %" PRId64 ")", a.kv.stride_page, a.kv.stride_token,
             a.kv.stride_head, a.kv.stride_dim);
      RunIo io(r, total_q, qoh, d, dt);
      bool with_lse = r.chance(60);
      io.fill_args(a, with_lse);
      if (expect("packinfer_run", API(packinfer_run, launch, &a), fresh, "a launch of a pool plan") != PACKINFER_STATUS_OK) {
        refused_as_stale("packinfer_run");
        break;
      }
      // Row t of the batch: request i, query j of it.
      std::vector<std::pair<size_t, uint32_t>> row_of;
      for (size_t i = 0; i < ids.size(); i++)
        for (uint32_t j = 0; j < nq[i]; j++) row_of.push_back({i, j});
      double scale = o.sm_scale == 0.0f ? 1.0 / std::sqrt((double)d) : (double)o.sm_scale;
      uint64_t unknown_rows = 0;
      io.row_name = [&](uint32_t t) {
        const MSeq& s = seqs[ids[row_of[t].first]];
        std::string pg;
        for (int p : s.pages) pg += " m" + std::to_string(p) + (pages[(size_t)p].maybe_shared ? "?" : "");
        return " (sequence " + std::to_string(ids[row_of[t].first]) + " of " + std::to_string(s.len) + " tokens, query " +
               std::to_string(row_of[t].second) + " of " + std::to_string(nq[row_of[t].first]) + ", model pages" + pg + ")";
      };
      io.verify("attention over the pool's K/V (the model's contents)", with_lse, [&](uint32_t t, uint32_t h, double* out, double* lse) {
        const MSeq& s = seqs[ids[row_of[t].first]];
        uint32_t q = nq[row_of[t].first], j = row_of[t].second;
        int visible = o.causal ? (int)(s.len - q + j + 1) : (int)s.len;
        uint32_t kh = h / (qoh / kvh);
        for (int k = 0; k < visible; k++)
          if (tag_at(s, (uint32_t)k, l) == 0) {  // a key the model does not know: accept what the pool computed
            unknown_rows++;
            for (uint32_t e = 0; e < d; e++) out[e] = load_elem(io.o->h(), (size_t)t * io.o_et + (size_t)h * io.o_eh + e, dt);
            *lse = with_lse ? ((const float*)io.lse->h())[(size_t)t * qoh + h] : 0.0;
            return;
          }
        attend_row(
            io.qrow(t, h), d, visible, scale, [&](int k, uint32_t e) { return (double)tag_value(tag_at(s, (uint32_t)k, l), l, kh, e, false); },
            [&](int k, uint32_t e) { return (double)tag_value(tag_at(s, (uint32_t)k, l), l, kh, e, true); }, out, lse);
      });
      cover("pool rows compared", io.rows_checked - unknown_rows);
      cover("pool rows over unwritten keys", unknown_rows);
    }
    expect("packinfer_launch_destroy", API(packinfer_launch_destroy, launch), S_OK, "a live launch");
    if (r.chance(20)) {
      // Relayout with the wrong sequences for the plan is refused.
      std::vector<uint64_t> wrong = ids;
      Allowed allowed = S_INVALID;
      if (r.chance(50)) wrong.push_back(ids[0]);
      else {
        wrong[0] = pick_dead();
        // A request without queries has no work item, so no group names it: its id may go unread.
        if (nq[0] == 0) allowed |= S_OK;
      }
      PackinferRelayoutReport rep;
      memset(&rep, 0, sizeof rep);
      rep.struct_size = sizeof rep;
      PackinferStatus rs = API(packinfer_pool_relayout, pool, plan, wrong.data(), (uint32_t)wrong.size(), true, nullptr, &rep);
      expect("packinfer_pool_relayout", rs, allowed, "seq_ids that are not the plan's");
      if (rs == PACKINFER_STATUS_OK) {  // it did lay the other requests out
        for (uint64_t id : wrong)
          if (seqs.count(id)) seqs[id].may_reserve = true;
        if (rep.pages_moved > 0) {
          for (auto& p : pages) p.lib_page = -1;
          by_lib_page.clear();
        }
      }
    }
    expect("packinfer_plan_destroy", API(packinfer_plan_destroy, plan), S_OK, "a live plan");
  }

  // A burst of calls on a few sequences around one shared page, in random order and sizes: a
  // fork at a page boundary, the child cut back into the shared page, the parent's hashes
  // registered, the parent maybe released, the child appending and writing, a new prompt
  // matching the parent's hashes; then both are checked. (Single calls rarely line these up.)
  void op_prefix_burst() {
    tw->op = "prefix burst";
    std::vector<uint64_t> parents;
    for (auto& kv : seqs)
      if (kv.second.len >= ps && known(kv.second, ps)) parents.push_back(kv.first);
    if (parents.empty()) {
      uint64_t id = 0;
      expect("packinfer_pool_sequence_create", API(packinfer_pool_sequence_create, pool, &id), S_OK, "a live pool");
      seqs[id] = MSeq();
      op_append(id, ps * (uint32_t)r.range(1, 3));
      op_write({id});
      return;
    }
    uint64_t a = parents[r.below(parents.size())];
    uint32_t full = seqs[a].len / ps, known_pages = 0;
    while (known_pages < full && known(seqs[a], (known_pages + 1) * ps)) known_pages++;
    std::vector<uint64_t> a_hashes = chain(seqs[a], known_pages);
    uint32_t at = ps * (uint32_t)r.range(1, (int)known_pages);
    uint64_t b = op_fork(a, at);
    if (!b) return;
    std::vector<int> order = {0, 1, 2};  // truncate B, register A, release A: any order
    for (int i = 2; i > 0; i--) std::swap(order[(size_t)i], order[r.below((uint32_t)i + 1)]);
    for (int step : order) {
      if (!seqs.count(a) && step != 0) continue;
      if (step == 0) op_truncate(b, at - 1 - r.below(ps));
      else if (step == 1) op_register(a, true);
      else if (r.chance(70)) {
        op_release(a);
      }
    }
    if (!seqs.count(b)) return;
    op_append(b, r.range(1, (int)ps));
    op_write({b});
    op_match(0, &a_hashes);  // a new prompt with the parent's content asks for its pages
    if (seqs.count(b) && known(seqs[b], seqs[b].len) && seqs[b].len > 0) verify({b});
  }

  // Plans from the pool with a defect in the request list.
  void op_plan_mutated() {
    tw->op = "pool plan mutated";
    if (seqs.empty()) return op_create();
    std::vector<uint64_t> ids = {pick_live()};
    std::vector<uint32_t> nq = {std::min<uint32_t>(seqs[ids[0]].len, 1)};
    const uint64_t* ip = ids.data();
    const uint32_t* qp = nq.data();
    PackinferPlanOptions po;
    expect("packinfer_plan_options_default", API(packinfer_plan_options_default, &po), S_OK, "defaults");
    const PackinferPlanOptions* pp = nullptr;
    bool null_out = false;
    Allowed allowed = S_INVALID;
    PackinferContext cx = ctx;
    int kind = (int)r.below(9);
    switch (kind) {
      case 0: ids.push_back(ids[0]); nq.push_back(0); break;  // a sequence twice
      case 1: nq[0] = seqs[ids[0]].len + 1 + r.below(5); break;
      case 2: ids[0] = pick_dead(); break;
      case 3: ip = nullptr; break;
      case 4: qp = nullptr; break;
      case 5: null_out = true; break;
      case 6: po.struct_size = 3; pp = &po; break;
      case 7: po.capacity = -1.0; pp = &po; break;
      default: ids.clear(); nq.clear(); allowed = S_OK; break;  // an empty step
    }
    ip = kind == 3 ? nullptr : ids.data();
    qp = kind == 4 ? nullptr : nq.data();
    set_detail("pool plan defect %d", kind);
    PackinferPlan plan{0x5EB71A1Eull};
    PackinferStatus st = API(packinfer_pool_plan_create, cx, pool, ip, qp, (uint32_t)ids.size(), pp, null_out ? nullptr : &plan);
    if (st == PACKINFER_STATUS_OK && !null_out) expect("packinfer_plan_destroy", API(packinfer_plan_destroy, plan), S_OK, "the plan just made");
    expect("packinfer_pool_plan_create", st, allowed, "a request list with a defect");
    if (st != PACKINFER_STATUS_OK && plan.bits != 0x5EB71A1Eull) fail("failed call wrote out", "a failed pool plan wrote a handle");
  }

  void op_misc() {
    tw->op = "pool misc";
    switch (r.below(4)) {
      case 0: {
        PackinferKvLayout l;
        expect("packinfer_pool_kv_layout", API(packinfer_pool_kv_layout, pool, layers + r.below(10), &l), S_INVALID, "a layer past the last");
        break;
      }
      case 1: {
        PackinferPoolStats s;
        memset(&s, 0, sizeof s);
        s.struct_size = r.chance(50) ? r.below(sizeof s) : sizeof s + 4097;
        expect("packinfer_pool_stats", API(packinfer_pool_stats, pool, &s), S_INVALID, "a bad struct_size");
        break;
      }
      case 2:
        if (!dead_pools.empty()) {
          PackinferPool dp = dead_pools[r.below(dead_pools.size())];
          uint64_t id = 0;
          expect("packinfer_pool_sequence_create", API(packinfer_pool_sequence_create, dp, &id), S_HANDLE, "a destroyed pool");
          expect("packinfer_pool_destroy", API(packinfer_pool_destroy, dp), S_HANDLE, "a destroyed pool");
        }
        break;
      default:
        if (!seqs.empty()) {
          uint64_t id = pick_live();
          if (length_of(id) != seqs[id].len) fail("sequence length", "the pool says %u tokens, the model %u", length_of(id), seqs[id].len);
          uint32_t m = 0;
          if (seqs[id].len > 0)
            expect("packinfer_pool_match_prefix", API(packinfer_pool_match_prefix, pool, id, nullptr, 0, &m), S_INVALID, "a sequence that holds tokens");
        }
    }
  }

  void step() {
    steps_on_pool++;
    if (!shared && (steps_on_pool > 3000 || r.one_in(1500))) {
      destroy_pool();
      create_pool();
      return;
    }
    unsigned x = r.below(1000);
    if (seqs.size() > 40) x = 660;  // release some
    if (x < 60) op_create();
    else if (x < 270) op_append();
    else if (x < 370) op_write();
    else if (x < 480) op_fork();
    else if (x < 550) op_truncate();
    else if (x < 620) op_release();
    else if (x < 700) op_register();
    else if (x < 780) op_match();
    else if (x < 905) verify({});
    else if (x < 920) op_prefix_burst();
    else if (x < 950) op_plan_mutated();
    else if (x < 975) op_misc();
    else if (x < 985 && !shared) op_pool_create_mutated();
    else if (!shared) check_stats();
    else op_misc();
  }
};

void run_pool_phase(uint64_t seed, const Budget& budget) {
  enter_worker("pool", 0, seed);
  HashDict dict;
  PoolPhase ph(seed, &dict, false);
  try {
    ph.ctx = make_context(1);
    ph.create_pool();
  } catch (StepFailed&) {
    return;
  }
  while (!budget.done()) {
    tw->step++;
    g_progress++;
    tw->detail[0] = 0;
    try {
      ph.step();
      trace_step();
      if (ph.r.one_in(8)) ph.check_stats();
      static const bool every_step = getenv("PACKINFER_STRESS_DEBUG") != nullptr;
      if (every_step) ph.check_stats();
    } catch (StepFailed&) {
      // The model may be off now: start over on a fresh pool.
      try {
        ph.destroy_pool();
        ph.create_pool();
      } catch (StepFailed&) {
        return;
      }
    }
  }
  try {
    ph.destroy_pool();
    expect("packinfer_context_destroy", API(packinfer_context_destroy, ph.ctx), S_OK, "a live context");
  } catch (StepFailed&) {
  }
}

}  // namespace

namespace {

// ---------------------------------------------------------------------------------------------
// Phase "threads": several threads on one context and one pool. Each thread keeps its own
// sequences (and model) in the shared pool and matches the others' registered prefixes; plans
// and launches are made on the shared context; a table of launches is run and destroyed by
// any thread (a run racing a destroy may find the handle gone, never a crash); each thread's
// last error stays its own.
// ---------------------------------------------------------------------------------------------

struct SharedLaunch {
  PackinferLaunch h;
  std::shared_ptr<BatchCase> c;
  // Runs in progress. On CUDA a launch may be destroyed only once its runs have finished on the
  // device, so a destroyer takes it out of the table and waits for these; on the CPU a run ends
  // before its call returns, and a destroy racing it is the case under test.
  std::shared_ptr<std::atomic<int>> runs = std::make_shared<std::atomic<int>>(0);
};

struct SharedState {
  PackinferContext ctx{0};
  PackinferPool pool{0};
  PackinferPoolOptions pool_options{};
  HashDict dict;
  std::mutex mu;
  std::vector<SharedLaunch> table;
};

void thread_worker(int index, uint64_t seed, SharedState* sh, const Budget* budget) {
  AltStack altstack;
  enter_worker("threads", index, seed);
  if (g_cfg.cuda) g_cuda.bind_thread();
  PoolPhase pp(mix(seed, 1), &sh->dict, true);
  ApiPhase ap(mix(seed, 2));
  ap.keep = sh->ctx;
  ap.concurrent = true;
  Rng r(mix(seed, 3));
  try {
    pp.ctx = sh->ctx;
    pp.pool = sh->pool;
    pp.open_pool(sh->pool_options);
    ap.setup();
  } catch (StepFailed&) {
    return;
  }
  auto reset_pool_model = [&]() {
    // Release this thread's sequences and forget them: the model may be off after a failure.
    for (auto& kv : pp.seqs) API(packinfer_pool_release, sh->pool, kv.first);
    PackinferPoolOptions o = pp.o;
    pp.open_pool(o);
  };
  while (!budget->done()) {
    tw->step++;
    g_progress++;
    tw->detail[0] = 0;
    unsigned x = r.below(100);
    try {
      if (x < 55) {
        pp.step();
      } else if (x < 75) {
        ap.step();
      } else if (x < 90) {
        tw->op = "shared launches";
        unsigned y = r.below(100);
        if (y < 30) {  // publish a launch of a fresh plan
          auto c = make_batch(r, nullptr);
          PackinferPlan p{0};
          PackinferBatchDesc d = c->desc();
          expect("packinfer_plan_create", API(packinfer_plan_create, sh->ctx, &d, nullptr, &p), S_OK, "a valid batch");
          PackinferLaunch l{0};
          expect("packinfer_launch_create", API(packinfer_launch_create, sh->ctx, p, nullptr, nullptr, &l), S_OK, "a live plan");
          expect("packinfer_plan_destroy", API(packinfer_plan_destroy, p), S_OK, "a live plan");
          std::lock_guard<std::mutex> lock(sh->mu);
          sh->table.push_back(SharedLaunch{l, c});
        } else if (y < 75) {  // run one; another thread may destroy it meanwhile
          SharedLaunch s{};
          {
            std::lock_guard<std::mutex> lock(sh->mu);
            if (sh->table.empty()) continue;
            s = sh->table[r.below(sh->table.size())];
            (*s.runs)++;
          }
          struct Done {
            std::atomic<int>& n;
            ~Done() { n--; }
          } done{*s.runs};
          RunIo io(r, s.c->total_q, s.c->sh.qo_heads, s.c->sh.head_dim, s.c->sh.dtype);
          PackinferRunArgs a;
          memset(&a, 0, sizeof a);
          a.struct_size = sizeof a;
          io.fill_args(a, true);
          a.kv = case_layout(*s.c);
          PackinferStatus st = API(packinfer_run, s.h, &a);
          expect("packinfer_run", st, S_OK | S_HANDLE, "a launch other threads may destroy");
          if (st == PACKINFER_STATUS_OK) {
            // The case is shared: its reference reads Q through `io`, so verify on a copy of the pointer.
            struct Ref {
              const BatchCase* c;
              const RunIo* io;
            } ref{s.c.get(), &io};
            io.verify("a shared launch", true, [&](uint32_t t, uint32_t h, double* out, double* lse) {
              const BatchCase& c = *ref.c;
              int rq = 0;
              while (rq + 1 <= c.n && (uint32_t)c.qo_indptr[(size_t)rq + 1] <= t) rq++;
              int i = (int)t - c.qo_indptr[(size_t)rq];
              int visible = c.sh.causal ? c.kv_len[(size_t)rq] - c.q_len[(size_t)rq] + i + 1 : c.kv_len[(size_t)rq];
              uint32_t kvh = h / (c.sh.qo_heads / c.sh.kv_heads);
              attend_row(
                  ref.io->qrow(t, h), c.sh.head_dim, visible, c.sh.scale(), [&](int j, uint32_t e) { return c.at(c.kf, rq, j, kvh, e); },
                  [&](int j, uint32_t e) { return c.at(c.vf, rq, j, kvh, e); }, out, lse);
            });
          }
        } else {  // destroy one (it may already be gone)
          SharedLaunch s{};
          bool take = g_cfg.cuda || r.chance(70);
          {
            std::lock_guard<std::mutex> lock(sh->mu);
            if (sh->table.empty()) continue;
            size_t i = r.below(sh->table.size());
            s = sh->table[i];
            if (take) sh->table.erase(sh->table.begin() + (long)i);
          }
          if (g_cfg.cuda)
            while (s.runs->load() > 0) std::this_thread::yield();
          expect("packinfer_launch_destroy", API(packinfer_launch_destroy, s.h), S_OK | S_HANDLE, "a launch other threads use");
        }
      } else {
        // This thread's last error names this thread's bad handle, whatever the others do.
        tw->op = "last error per thread";
        PackinferPlan bad{0xB100000000000000ull | ((uint64_t)(index + 1) << 40) | (r.next() & 0xFFFFFFFFull) | 1};
        PackinferStatus st = API(packinfer_plan_destroy, bad);
        char want[40];
        snprintf(want, sizeof want, "%" PRIx64, bad.bits);
        expect("packinfer_plan_destroy", st, S_HANDLE, "a forged plan");
        std::this_thread::yield();
        const char* msg = API(packinfer_last_error);
        if (!strstr(msg, want)) fail("last_error per thread", "thread %d's last error \"%s\" does not name its handle 0x%s", index, msg, want);
      }
    } catch (StepFailed&) {
      if (x < 55) {
        try {
          reset_pool_model();
        } catch (StepFailed&) {
        }
      }
    }
  }
  try {
    tw->op = "teardown";
    for (auto& kv : pp.seqs) expect("packinfer_pool_release", API(packinfer_pool_release, sh->pool, kv.first), S_OK, "this thread's sequence");
    ap.teardown();
  } catch (StepFailed&) {
  }
}

void run_threads_phase(uint64_t seed, const Budget& budget) {
  enter_worker("threads", -1, seed);
  auto sh = std::make_unique<SharedState>();
  Rng r(seed);
  try {
    sh->ctx = make_context(g_cfg.cuda ? 0 : 2);
    HashDict scratch_dict;
    PoolPhase opts(seed, &scratch_dict, true);
    PackinferPoolOptions po = opts.random_options();
    po.num_pages = (uint32_t)r.range(100, 400);
    po.capacity_bytes = 0;
    sh->pool_options = po;
    expect("packinfer_pool_create", API(packinfer_pool_create, sh->ctx, &po, &sh->pool), S_OK, "the shared pool");
  } catch (StepFailed&) {
    return;
  }
  std::vector<std::thread> ts;
  for (int i = 0; i < g_cfg.threads; i++) ts.emplace_back(thread_worker, i, mix(seed, 100 + (uint64_t)i), sh.get(), &budget);
  for (auto& t : ts) t.join();
  tw = &g_where[0];
  enter_worker("threads", -1, seed);
  try {
    for (auto& s : sh->table) expect("packinfer_launch_destroy", API(packinfer_launch_destroy, s.h), S_OK | S_HANDLE, "the launch table");
    PackinferPoolStats st;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    expect("packinfer_pool_stats", API(packinfer_pool_stats, sh->pool, &st), S_OK, "the shared pool");
    if (st.num_sequences != 0 || st.pages_used != 0 || st.tokens_logical != 0)
      fail("pool stats", "after every thread released its sequences the pool has %u sequences, %u pages used", st.num_sequences, st.pages_used);
    expect("packinfer_pool_destroy", API(packinfer_pool_destroy, sh->pool), S_OK, "the shared pool");
    expect("packinfer_context_destroy", API(packinfer_context_destroy, sh->ctx), S_OK, "the shared context");
  } catch (StepFailed&) {
  }
}

// ---------------------------------------------------------------------------------------------
// Phase "huge": sizes that would need more memory than there is, or wrap 32-bit arithmetic.
// Each must end in a status (never an abort, a hang or a wrapped result). Runs with an
// address-space limit (or the sanitizer's allocator returning NULL), so a failed allocation
// happens quickly instead of thrashing.
// ---------------------------------------------------------------------------------------------

struct OneRequest {
  int32_t qo[2] = {0, 1}, kv[2] = {0, 1}, last[1] = {1};
  std::vector<int32_t> pages = {0};
  PackinferBatchDesc d;
  OneRequest(uint32_t page_size, uint32_t num_pages_in_request, int32_t last_len, int32_t q, bool causal) {
    pages.assign(num_pages_in_request, 0);
    for (uint32_t i = 0; i < num_pages_in_request; i++) pages[i] = (int32_t)i;
    kv[1] = (int32_t)num_pages_in_request;
    last[0] = last_len;
    qo[1] = q;
    memset(&d, 0, sizeof d);
    d.struct_size = sizeof d;
    d.batch_size = 1;
    d.qo_indptr = qo;
    d.kv_indptr = kv;
    d.kv_page_indices = pages.data();
    d.kv_last_page_len = last;
    d.page_size = page_size;
    d.num_pages = num_pages_in_request;
    d.num_qo_heads = 1;
    d.num_kv_heads = 1;
    d.head_dim = g_cfg.cuda ? 64 : 8;
    d.dtype = g_cfg.cuda ? PACKINFER_DTYPE_F16 : PACKINFER_DTYPE_F32;
    d.causal = causal;
  }
};

double total_cost(PackinferPlan p) {
  PackinferPlanStats st;
  memset(&st, 0, sizeof st);
  st.struct_size = sizeof st;
  expect("packinfer_plan_stats", API(packinfer_plan_stats, p, &st), S_OK, "a live plan");
  return st.mean_group_cost * st.num_groups;
}

// A request of `pages` pages of `page_size` tokens, the last holding `last` (kv_len counted in
// 64 bits here). If the library plans it, its cost must be that of those keys: at least about
// the cost of min(kv_len, INT32_MAX) keys in one page, not of a wrapped 32-bit count.
void check_long_request(PackinferContext ctx, uint32_t page_size, uint32_t pages, int32_t last, bool causal, int32_t q) {
  uint64_t kv_len = (uint64_t)(pages - 1) * page_size + (uint64_t)last;
  set_detail("one request: %u pages of %u tokens, last %d (kv_len %" PRIu64 "), q %d, causal %d", pages, page_size, last, kv_len, q, (int)causal);
  OneRequest a(page_size, pages, last, q, causal);
  PackinferPlan p{0};
  PackinferStatus st = API(packinfer_plan_create, ctx, &a.d, nullptr, &p);
  // Past the documented 2^31 - 1 keys per request it is refused; below, planned as those keys.
  expect("packinfer_plan_create", st, kv_len > (uint64_t)INT32_MAX ? S_INVALID : (S_OK | S_OOM), "a request of more keys than 32 bits count");
  if (st != PACKINFER_STATUS_OK) {
    const char* msg = API(packinfer_last_error);
    if (kv_len > UINT32_MAX && strstr(msg, "kv_len = ") && !strstr(msg, std::to_string(kv_len).c_str()))
      fail("32-bit length", "refused a request of %" PRIu64 " keys with a message naming another kv_len: %s", kv_len, msg);
    return;
  }
  double cost = total_cost(p);
  expect("packinfer_plan_destroy", API(packinfer_plan_destroy, p), S_OK, "a live plan");
  int32_t ref_len = (int32_t)std::min<uint64_t>(kv_len, INT32_MAX);
  OneRequest b((uint32_t)ref_len, 1, ref_len, q, causal);
  PackinferPlan pr{0};
  expect("packinfer_plan_create", API(packinfer_plan_create, ctx, &b.d, nullptr, &pr), S_OK, "the same keys in one page");
  double ref = total_cost(pr);
  expect("packinfer_plan_destroy", API(packinfer_plan_destroy, pr), S_OK, "a live plan");
  if (!(cost >= 0.5 * ref))
    fail("32-bit length", "planned %" PRIu64 " keys (%u pages of %u) at cost %g, but %d keys in one page cost %g: the length wrapped", kv_len, pages,
         page_size, cost, ref_len, ref);
}

void huge_step(Rng& r, PackinferContext ctx) {
  const Allowed any = S_OK | S_INVALID | S_UNSUP | S_OOM;
  unsigned kind = r.below(10);
  switch (kind) {
    case 0: {
      tw->op = "huge heads";
      OneRequest a(4, 1, 1, 1, true);
      const uint32_t heads[][2] = {{1u << 31, 1u << 31}, {UINT32_MAX, 1}, {1u << 30, 1u << 30}, {1u << 31, 1}};
      unsigned i = r.below(4);
      a.d.num_qo_heads = heads[i][0];
      a.d.num_kv_heads = heads[i][1];
      set_detail("plan with %u query heads, %u KV heads", a.d.num_qo_heads, a.d.num_kv_heads);
      PackinferPlan p{0};
      PackinferStatus st = API(packinfer_plan_create, ctx, &a.d, nullptr, &p);
      expect("packinfer_plan_create", st, S_INVALID, "more query heads than the documented 65536");
      if (st == PACKINFER_STATUS_OK) {
        PackinferLaunch l{0};
        st = API(packinfer_launch_create, ctx, p, nullptr, nullptr, &l);
        expect("packinfer_launch_create", st, S_OK | S_INVALID | S_OOM, "a plan of billions of heads");
        if (st == PACKINFER_STATUS_OK) expect("packinfer_launch_destroy", API(packinfer_launch_destroy, l), S_OK, "a live launch");
        expect("packinfer_plan_destroy", API(packinfer_plan_destroy, p), S_OK, "a live plan");
      }
      break;
    }
    case 1: {
      tw->op = "32-bit lengths";
      const uint32_t sizes[] = {1u << 31, (1u << 31) - 1, 1u << 30, 3u << 30, UINT32_MAX};
      uint32_t page_size = sizes[r.below(5)];
      uint32_t pages = (uint32_t)r.range(2, 4);
      int32_t last = (int32_t)std::min<uint64_t>(page_size, (uint64_t)r.range(1, 1000));
      bool causal = r.chance(50);
      check_long_request(ctx, page_size, pages, last, causal, causal ? 2 : 1);
      break;
    }
    case 2:
    case 3: {
      tw->op = kind == 2 ? "tiny capacity" : "one-key splits";
      uint32_t keys = 1u << r.range(20, 30);
      OneRequest a(keys, 1, (int32_t)keys, 1, false);
      PackinferPlanOptions o;
      expect("packinfer_plan_options_default", API(packinfer_plan_options_default, &o), S_OK, "defaults");
      if (kind == 2) o.capacity = r.chance(50) ? 1e-300 : 1e-10;
      else o.flags = PACKINFER_PLAN_FLAGS_DETERMINISTIC, o.split_keys = 1;
      set_detail("%u keys, capacity %g, flags %u, split_keys %u", keys, o.capacity, o.flags, o.split_keys);
      PackinferPlan p{0};
      PackinferStatus st = API(packinfer_plan_create, ctx, &a.d, &o, &p);
      // A split into more pieces than the documented 2^22 work items is refused (how small a
      // piece gets is the planner's: the directed case alloc-tiny-capacity pins 2^30 keys).
      expect("packinfer_plan_create", st, S_OK | S_INVALID | S_OOM, "a split into a piece per key");
      if (st == PACKINFER_STATUS_OK) expect("packinfer_plan_destroy", API(packinfer_plan_destroy, p), S_OK, "a live plan");
      break;
    }
    case 4: {
      tw->op = "huge headroom";
      PackinferPoolOptions po;
      expect("packinfer_pool_options_default", API(packinfer_pool_options_default, &po), S_OK, "defaults");
      po.num_layers = 1;
      po.num_qo_heads = po.num_kv_heads = 1;
      po.head_dim = g_cfg.cuda ? 64 : 8;
      po.dtype = g_cfg.cuda ? PACKINFER_DTYPE_F16 : PACKINFER_DTYPE_F32;
      po.page_size = 4;
      po.num_pages = 16;
      const uint32_t room[] = {UINT32_MAX, 1u << 31, 1u << 20, 100000};
      po.headroom_pages = room[r.below(4)];
      set_detail("pool of 16 pages with headroom %u, then relayout", po.headroom_pages);
      PackinferPool pool{0};
      PackinferStatus st = API(packinfer_pool_create, ctx, &po, &pool);
      expect("packinfer_pool_create", st, S_OK | S_INVALID, "headroom larger than the pool");
      if (st != PACKINFER_STATUS_OK) break;
      uint64_t a = 0;
      expect("packinfer_pool_sequence_create", API(packinfer_pool_sequence_create, pool, &a), S_OK, "a live pool");
      expect("packinfer_pool_append", API(packinfer_pool_append, pool, a, 5, nullptr, nullptr), S_OK, "5 tokens in 16 pages");
      uint32_t one = 1;
      PackinferPlan p{0};
      expect("packinfer_pool_plan_create", API(packinfer_pool_plan_create, ctx, pool, &a, &one, 1, nullptr, &p), S_OK, "a live sequence");
      PackinferStatus rs = API(packinfer_pool_relayout, pool, p, &a, 1, true, nullptr, nullptr);
      expect("packinfer_pool_relayout", rs, S_OK | S_INVALID | S_OOM | S_EXHAUSTED, "headroom larger than the pool");
      uint32_t len = 0;
      expect("packinfer_pool_sequence_length", API(packinfer_pool_sequence_length, pool, a, &len), S_OK, "a live sequence");
      if (len != 5) fail("sequence length", "after a relayout the sequence has %u tokens, not 5", len);
      expect("packinfer_plan_destroy", API(packinfer_plan_destroy, p), S_OK, "a live plan");
      expect("packinfer_pool_destroy", API(packinfer_pool_destroy, pool), S_OK, "a live pool");
      break;
    }
    case 5: {
      tw->op = "huge pool";
      PackinferPoolOptions po;
      expect("packinfer_pool_options_default", API(packinfer_pool_options_default, &po), S_OK, "defaults");
      po.num_layers = r.chance(50) ? 1 : UINT32_MAX;
      po.num_qo_heads = po.num_kv_heads = r.chance(50) ? 1 : (1u << 20);
      po.head_dim = g_cfg.cuda ? 64 : 512;
      po.dtype = g_cfg.cuda ? PACKINFER_DTYPE_F16 : PACKINFER_DTYPE_F32;
      po.page_size = r.chance(50) ? 16 : (1u << 31);
      po.num_pages = r.chance(50) ? INT32_MAX : 1;
      if (r.chance(30)) po.num_pages = 0, po.capacity_bytes = UINT64_MAX;
      set_detail("pool: layers %u, heads %u, page_size %u, pages %u, bytes %" PRIu64, po.num_layers, po.num_kv_heads, po.page_size, po.num_pages,
                 po.capacity_bytes);
      PackinferPool pool{0};
      PackinferStatus st = API(packinfer_pool_create, ctx, &po, &pool);
      expect("packinfer_pool_create", st, any, "a pool larger than memory");
      if (st == PACKINFER_STATUS_OK) expect("packinfer_pool_destroy", API(packinfer_pool_destroy, pool), S_OK, "a live pool");
      break;
    }
    case 6: {
      tw->op = "huge capacity launch";
      OneRequest a(4, 2, 3, 1, true);
      PackinferPlan p{0};
      expect("packinfer_plan_create", API(packinfer_plan_create, ctx, &a.d, nullptr, &p), S_OK, "a small batch");
      PackinferLaunchCapacity cap;
      memset(&cap, 0, sizeof cap);
      cap.struct_size = sizeof cap;
      uint32_t* f = &cap.max_work_items;
      for (int i = 0; i < 9; i++) f[i] = r.chance(50) ? UINT32_MAX : (1u << r.range(20, 31));
      set_detail("capacity launch with max_partial_slots %u, max_pages %u", cap.max_partial_slots, cap.max_pages);
      PackinferLaunch l{0};
      PackinferStatus st = API(packinfer_launch_create_with_capacity, ctx, p, nullptr, &cap, nullptr, &l);
      expect("packinfer_launch_create_with_capacity", st, S_OK | S_INVALID | S_OOM, "a capacity larger than memory");
      if (st == PACKINFER_STATUS_OK) expect("packinfer_launch_destroy", API(packinfer_launch_destroy, l), S_OK, "a live launch");
      expect("packinfer_plan_destroy", API(packinfer_plan_destroy, p), S_OK, "a live plan");
      break;
    }
    case 7: {
      // Within the documented 2^31 - 1 query rows, but far more work items than a plan holds.
      tw->op = "huge query count";
      OneRequest a(4, 1, 4, INT32_MAX - r.below(10), false);
      set_detail("one request of %d queries over 4 keys", a.qo[1]);
      PackinferPlan p{0};
      PackinferStatus st = API(packinfer_plan_create, ctx, &a.d, nullptr, &p);
      expect("packinfer_plan_create", st, S_OK | S_INVALID | S_OOM, "two billion query tokens");
      if (st == PACKINFER_STATUS_OK) expect("packinfer_plan_destroy", API(packinfer_plan_destroy, p), S_OK, "a live plan");
      break;
    }
    case 8: {
      tw->op = "huge head_dim";
      OneRequest a(4, 1, 1, 1, true);
      const uint32_t dims[] = {0xFFFFFFF8u, 1u << 31, 1u << 20};
      a.d.head_dim = dims[r.below(3)];
      set_detail("head_dim %u", a.d.head_dim);
      PackinferPlan p{0};
      expect("packinfer_plan_create", API(packinfer_plan_create, ctx, &a.d, nullptr, &p), S_UNSUP, "a head_dim no kernel takes");
      break;
    }
    default: {
      tw->op = "many requests";
      uint32_t n = 1u << r.range(14, 18);
      std::vector<int32_t> qo(n + 1, 0), kv(n + 1, 0), last(n, 0);
      OneRequest a(4, 1, 1, 0, true);
      a.d.batch_size = n;
      a.d.qo_indptr = qo.data();
      a.d.kv_indptr = kv.data();
      a.d.kv_last_page_len = last.data();
      a.d.kv_page_indices = nullptr;
      set_detail("%u empty requests", n);
      PackinferPlan p{0};
      PackinferStatus st = API(packinfer_plan_create, ctx, &a.d, nullptr, &p);
      expect("packinfer_plan_create", st, S_OK | S_OOM, "many empty requests");
      if (st == PACKINFER_STATUS_OK) expect("packinfer_plan_destroy", API(packinfer_plan_destroy, p), S_OK, "a live plan");
    }
  }
}

void run_huge_phase(uint64_t seed, const Budget& budget) {
  enter_worker("huge", 0, seed);
  Rng r(seed);
  PackinferContext ctx{0};
  try {
    ctx = make_context(1);
  } catch (StepFailed&) {
    return;
  }
  while (!budget.done()) {
    tw->step++;
    g_progress++;
    tw->detail[0] = 0;
    try {
      huge_step(r, ctx);
    } catch (StepFailed&) {
    }
  }
  try {
    expect("packinfer_context_destroy", API(packinfer_context_destroy, ctx), S_OK, "a live context");
  } catch (StepFailed&) {
  }
}

}  // namespace

namespace {

// ---------------------------------------------------------------------------------------------
// Directed cases: the smallest call sequences that show each class of defect found so far.
// ---------------------------------------------------------------------------------------------

// A one-layer pool whose sequences' contents this case tracks itself (one tag per token).
struct MiniPool {
  PackinferContext ctx{0};
  PackinferPool pool{0};
  uint32_t ps, d, dt, kvh = 1, qoh = 2;
  std::map<uint64_t, std::vector<uint64_t>> content;

  MiniPool(uint32_t page_size, uint32_t num_pages, uint32_t headroom = 0) : ps(page_size) {
    d = g_cfg.cuda ? 64 : 8;
    dt = g_cfg.cuda ? PACKINFER_DTYPE_F16 : PACKINFER_DTYPE_F32;
    ctx = make_context(1);
    PackinferPoolOptions po;
    expect("packinfer_pool_options_default", API(packinfer_pool_options_default, &po), S_OK, "defaults");
    po.num_layers = 1;
    po.num_qo_heads = qoh;
    po.num_kv_heads = kvh;
    po.head_dim = d;
    po.dtype = dt;
    po.page_size = page_size;
    po.num_pages = num_pages;
    po.headroom_pages = headroom;
    expect("packinfer_pool_create", API(packinfer_pool_create, ctx, &po, &pool), S_OK, "a small pool");
  }
  ~MiniPool() {
    if (pool.bits) API(packinfer_pool_destroy, pool);
    if (ctx.bits) API(packinfer_context_destroy, ctx);
  }
  uint64_t create() {
    uint64_t id = 0;
    expect("packinfer_pool_sequence_create", API(packinfer_pool_sequence_create, pool, &id), S_OK, "a live pool");
    content[id];
    return id;
  }
  void append(uint64_t id, uint32_t n, Allowed allowed = S_OK) {
    PackinferStatus st = API(packinfer_pool_append, pool, id, n, nullptr, nullptr);
    expect("packinfer_pool_append", st, allowed, "append");
    if (st == PACKINFER_STATUS_OK) content[id].resize(content[id].size() + n, 0);
  }
  // Writes new values for the last n tokens.
  void write(uint64_t id, uint32_t n) {
    std::vector<uint64_t> tags(n);
    Buf kb((size_t)n * kvh * d * dtype_bytes(dt) + 4), vb((size_t)n * kvh * d * dtype_bytes(dt) + 4);
    for (uint32_t i = 0; i < n; i++) {
      tags[i] = g_nonce.fetch_add(1) * 0x9E3779B97F4A7C15ull | 1;
      for (uint32_t e = 0; e < d; e++) {
        store_elem(kb.h(), (size_t)i * d + e, dt, tag_value(tags[i], 0, 0, e, false));
        store_elem(vb.h(), (size_t)i * d + e, dt, tag_value(tags[i], 0, 0, e, true));
      }
    }
    kb.upload();
    vb.upload();
    PackinferKvSource src{sizeof(PackinferKvSource), kb.ptr(), vb.ptr(), n, kvh, d, dt, 0};
    expect("packinfer_pool_write_kv", API(packinfer_pool_write_kv, pool, 0, &id, &n, 1, &src, nullptr), S_OK, "new tokens of a private page");
    if (g_cfg.cuda) g_cuda.sync();
    auto& c = content[id];
    for (uint32_t i = 0; i < n; i++) c[c.size() - n + i] = tags[i];
  }
  std::vector<uint64_t> hashes(uint64_t id, uint32_t pages) {
    std::vector<uint64_t> h;
    uint64_t x = 0xC0FFEEull;
    for (uint32_t j = 0; j < pages; j++) {
      for (uint32_t t = 0; t < ps; t++) x = mix(x, content[id][j * ps + t]);
      h.push_back(x);
    }
    return h;
  }
  // Plans a step of `q` queries for each of `ids` and compares the output with attention over
  // the contents this case expects.
  void check(const std::vector<uint64_t>& ids, const char* what) {
    std::vector<uint32_t> nq;
    uint32_t total = 0;
    for (uint64_t id : ids) {
      uint32_t len = 0;
      expect("packinfer_pool_sequence_length", API(packinfer_pool_sequence_length, pool, id, &len), S_OK, "a live sequence");
      if (len != content[id].size()) fail("sequence length", "%s: sequence %" PRIu64 " has %u tokens, expected %zu", what, id, len, content[id].size());
      nq.push_back(std::min<uint32_t>(len, 3));
      total += nq.back();
    }
    PackinferPlan plan{0};
    expect("packinfer_pool_plan_create", API(packinfer_pool_plan_create, ctx, pool, ids.data(), nq.data(), (uint32_t)ids.size(), nullptr, &plan), S_OK, what);
    PackinferLaunch launch{0};
    expect("packinfer_launch_create", API(packinfer_launch_create, ctx, plan, nullptr, nullptr, &launch), S_OK, what);
    Rng r(1234);
    RunIo io(r, total, qoh, d, dt);
    PackinferRunArgs a;
    memset(&a, 0, sizeof a);
    a.struct_size = sizeof a;
    io.fill_args(a, true);
    expect("packinfer_pool_kv_layout", API(packinfer_pool_kv_layout, pool, 0, &a.kv), S_OK, what);
    expect("packinfer_run", API(packinfer_run, launch, &a), S_OK, what);
    std::vector<std::pair<size_t, uint32_t>> row_of;
    for (size_t i = 0; i < ids.size(); i++)
      for (uint32_t j = 0; j < nq[i]; j++) row_of.push_back({i, j});
    io.verify(what, true, [&](uint32_t t, uint32_t h, double* out, double* lse) {
      const std::vector<uint64_t>& c = content[ids[row_of[t].first]];
      int visible = (int)(c.size() - nq[row_of[t].first] + row_of[t].second + 1);
      (void)h;
      attend_row(
          io.qrow(t, h), d, visible, 1.0 / std::sqrt((double)d), [&](int k, uint32_t e) { return (double)tag_value(c[(size_t)k], 0, 0, e, false); },
          [&](int k, uint32_t e) { return (double)tag_value(c[(size_t)k], 0, 0, e, true); }, out, lse);
    });
    expect("packinfer_launch_destroy", API(packinfer_launch_destroy, launch), S_OK, what);
    expect("packinfer_plan_destroy", API(packinfer_plan_destroy, plan), S_OK, what);
  }
};

// A page registered by content hash, then written in place by a sequence that held it partly:
// a prefix match must get the hash's content (or nothing), never the rewritten page.
void case_shared_page_rewrite() {
  MiniPool m(4, 16);
  uint64_t a = m.create();
  m.append(a, 4);
  m.write(a, 4);
  uint64_t b = 0;
  expect("packinfer_pool_fork", API(packinfer_pool_fork, m.pool, a, 4, nullptr, &b), S_OK, "fork at a page boundary");
  m.content[b] = m.content[a];
  expect("packinfer_pool_truncate", API(packinfer_pool_truncate, m.pool, b, 1), S_OK, "truncate into the shared page");
  m.content[b].resize(1);
  std::vector<uint64_t> h = m.hashes(a, 1);
  std::vector<uint64_t> a_content = m.content[a];
  expect("packinfer_pool_register_page_hashes", API(packinfer_pool_register_page_hashes, m.pool, a, h.data(), 1), S_OK, "A's full page");
  expect("packinfer_pool_release", API(packinfer_pool_release, m.pool, a), S_OK, "A is done");
  m.content.erase(a);
  m.append(b, 3);
  m.write(b, 3);
  m.check({b}, "B reads its own tokens");
  uint64_t c = m.create();
  uint32_t matched = 0;
  expect("packinfer_pool_match_prefix", API(packinfer_pool_match_prefix, m.pool, c, h.data(), 1, &matched), S_OK, "a new sequence");
  if (matched != 0 && matched != 4) fail("match prefix", "matched %u tokens of one page of 4", matched);
  m.content[c].assign(a_content.begin(), a_content.begin() + matched);
  if (matched) m.check({c}, "C matched A's hash: it must read A's tokens, not B's");
  m.check({b}, "B after C's match");
}

// A negative page index that an unsigned comparison against num_pages = UINT32_MAX lets through.
void case_negative_page_index() {
  PackinferContext ctx = make_context(1);
  const int32_t neg[] = {-2, -1, INT32_MIN, -1000};
  const uint32_t num_pages[] = {UINT32_MAX, (uint32_t)INT32_MAX + 1, UINT32_MAX - 1};
  for (int32_t p : neg)
    for (uint32_t np : num_pages) {
      OneRequest a(4, 1, 1, 1, true);
      a.pages[0] = p;
      a.d.num_pages = np;
      set_detail("page index %d, num_pages %u", p, np);
      PackinferPlan plan{0};
      PackinferStatus st = API(packinfer_plan_create, ctx, &a.d, nullptr, &plan);
      if (st == PACKINFER_STATUS_OK) API(packinfer_plan_destroy, plan);  // never run: it would read before the cache
      expect("packinfer_plan_create", st, S_INVALID, "a negative page index");
    }
  API(packinfer_context_destroy, ctx);
}

void case_alloc_huge_heads() {
  PackinferContext ctx = make_context(1);
  OneRequest a(4, 1, 1, 1, true);
  a.d.num_qo_heads = a.d.num_kv_heads = 1u << 31;
  set_detail("plan with 2^31 query and KV heads");
  PackinferPlan p{0};
  PackinferStatus st = API(packinfer_plan_create, ctx, &a.d, nullptr, &p);
  expect("packinfer_plan_create", st, S_INVALID, "2^31 heads, past the documented 65536");
  if (st == PACKINFER_STATUS_OK) {
    PackinferLaunch l{0};
    st = API(packinfer_launch_create, ctx, p, nullptr, nullptr, &l);
    expect("packinfer_launch_create", st, S_OK | S_INVALID | S_OOM, "a plan of 2^31 heads");
    if (st == PACKINFER_STATUS_OK) API(packinfer_launch_destroy, l);
    API(packinfer_plan_destroy, p);
  }
  API(packinfer_context_destroy, ctx);
}

void case_alloc_headroom_relayout() {
  PackinferContext ctx = make_context(1);
  PackinferPoolOptions po;
  API(packinfer_pool_options_default, &po);
  po.num_layers = 1;
  po.num_qo_heads = po.num_kv_heads = 1;
  po.head_dim = g_cfg.cuda ? 64 : 8;
  po.dtype = g_cfg.cuda ? PACKINFER_DTYPE_F16 : PACKINFER_DTYPE_F32;
  po.page_size = 4;
  po.num_pages = 16;
  po.headroom_pages = UINT32_MAX;
  set_detail("pool of 16 pages, headroom UINT32_MAX, relayout");
  PackinferPool pool{0};
  PackinferStatus st = API(packinfer_pool_create, ctx, &po, &pool);
  expect("packinfer_pool_create", st, S_OK | S_INVALID, "headroom larger than the pool");
  if (st == PACKINFER_STATUS_OK) {
    uint64_t a = 0;
    API(packinfer_pool_sequence_create, pool, &a);
    expect("packinfer_pool_append", API(packinfer_pool_append, pool, a, 5, nullptr, nullptr), S_OK, "5 tokens");
    uint32_t one = 1;
    PackinferPlan p{0};
    expect("packinfer_pool_plan_create", API(packinfer_pool_plan_create, ctx, pool, &a, &one, 1, nullptr, &p), S_OK, "a live sequence");
    expect("packinfer_pool_relayout", API(packinfer_pool_relayout, pool, p, &a, 1, true, nullptr, nullptr), S_OK | S_INVALID | S_OOM | S_EXHAUSTED,
           "headroom larger than the pool");
    API(packinfer_plan_destroy, p);
    API(packinfer_pool_destroy, pool);
  }
  API(packinfer_context_destroy, ctx);
}

// One request of 2^31 - 5 query tokens and one head: within the documented 2^31 - 1 query
// rows, refused for its work items, but only after allocating per row (1.6 GB): under the
// 2 GiB limit this case runs with, a status and not an abort.
void case_alloc_huge_query_count() {
  PackinferContext ctx = make_context(1);
  OneRequest a(4, 1, 4, INT32_MAX - 4, false);
  set_detail("one request of %d queries over 4 keys", a.qo[1]);
  PackinferPlan p{0};
  PackinferStatus st = API(packinfer_plan_create, ctx, &a.d, nullptr, &p);
  expect("packinfer_plan_create", st, S_OK | S_INVALID | S_OOM, "two billion query tokens");
  if (st == PACKINFER_STATUS_OK) API(packinfer_plan_destroy, p);
  API(packinfer_context_destroy, ctx);
}

void case_alloc_tiny_capacity() {
  PackinferContext ctx = make_context(1);
  OneRequest a(1u << 30, 1, 1 << 30, 1, false);
  PackinferPlanOptions o;
  API(packinfer_plan_options_default, &o);
  o.capacity = 1e-300;
  set_detail("2^30 keys, capacity 1e-300");
  PackinferPlan p{0};
  PackinferStatus st = API(packinfer_plan_create, ctx, &a.d, &o, &p);
  expect("packinfer_plan_create", st, S_INVALID | S_OOM, "a piece per key of 2^30, past the documented 2^22 work items");
  if (st == PACKINFER_STATUS_OK) API(packinfer_plan_destroy, p);
  API(packinfer_context_destroy, ctx);
}

// A comb of forks: child i shares the root's first i pages. Planning it must not recurse once
// per tooth: it runs here on a thread with 256 KiB of stack (musl's default is 128 KiB; thread
// pools often choose small stacks), and any recursion depth proportional to the forks overflows
// some stack for some comb.
struct CombArgs {
  MiniPool* m;
  std::vector<uint64_t>* ids;
  std::vector<uint32_t>* nq;
  PackinferPlan plan;
  PackinferStatus st;
  uint64_t seed;
};
void* comb_thread(void* p) {
  auto* a = (CombArgs*)p;
  AltStack altstack;
  enter_worker("fork-comb", 1, a->seed);
  tw->op = "pool plan of the comb (256 KiB stack)";
  a->st = API(packinfer_pool_plan_create, a->m->ctx, a->m->pool, a->ids->data(), a->nq->data(), (uint32_t)a->ids->size(), nullptr, &a->plan);
  return nullptr;
}
void case_fork_comb() {
  const uint32_t forks = 2000;
  MiniPool m(1, 3 * forks + 16);
  uint64_t root = m.create();
  m.append(root, forks + 1);
  m.write(root, forks + 1);
  std::vector<uint64_t> ids = {root};
  std::vector<uint32_t> nq = {1};
  for (uint32_t i = 1; i <= forks; i++) {
    uint64_t c = 0;
    expect("packinfer_pool_fork", API(packinfer_pool_fork, m.pool, root, i, nullptr, &c), S_OK, "a tooth of the comb");
    m.content[c].assign(m.content[root].begin(), m.content[root].begin() + i);
    m.append(c, 1);
    m.write(c, 1);
    ids.push_back(c);
    nq.push_back(1);
  }
  CombArgs args{&m, &ids, &nq, PackinferPlan{0}, PACKINFER_STATUS_INTERNAL, tw->seed};
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 256 * 1024);
  pthread_t t;
  if (pthread_create(&t, &attr, comb_thread, &args) != 0) fail("setup", "cannot start a thread");
  pthread_join(t, nullptr);
  tw = &g_where[0];
  expect("packinfer_pool_plan_create", args.st, S_OK, "a comb of 2000 forks");
  API(packinfer_plan_destroy, args.plan);
  std::vector<uint64_t> some = {root, ids[1], ids[forks / 2], ids[forks]};
  m.check(some, "teeth of the comb");
}

// The library called from a thread-local destructor that runs after the library's own
// thread-locals are gone (registered before them, so destroyed after them): statuses and a
// last error, never a panic across the C boundary.
std::atomic<int> g_tls_status{-1};
std::atomic<int> g_tls_message{-1};
struct AtThreadExit {
  bool armed = false;
  ~AtThreadExit() {
    if (!armed) return;
    PackinferPlan bad{0xB1000000DEAD0001ull};
    PackinferStatus st = API(packinfer_plan_destroy, bad);
    const char* msg = API(packinfer_last_error);
    g_tls_status = (int)st;
    g_tls_message = msg != nullptr ? 1 : 0;
  }
};
void case_tls_exit() {
  for (int first_use_in_destructor = 0; first_use_in_destructor < 2; first_use_in_destructor++) {
    g_tls_status = -1;
    g_tls_message = -1;
    uint64_t seed = tw->seed;
    std::thread t([&] {
      enter_worker("tls-exit", 1, seed);
      tw->op = first_use_in_destructor ? "first call from a thread-exit destructor" : "call from a thread-exit destructor";
      static thread_local AtThreadExit guard;  // constructed (and registered) first
      guard.armed = true;
      if (!first_use_in_destructor) {
        PackinferPlan bad{0xB1000000DEAD0002ull};
        API(packinfer_plan_destroy, bad);  // the library's thread-locals are made now, after ours
      }
    });
    t.join();
    tw = &g_where[0];
    if (g_tls_status != PACKINFER_STATUS_INVALID_HANDLE || g_tls_message != 1)
      fail("thread exit", "a failing call from a thread-exit destructor returned %d (message %s)", g_tls_status.load(),
           g_tls_message == 1 ? "present" : "NULL");
  }
}

// A destroyed handle stays invalid however often its slot is reused: 2^24 objects made and
// destroyed in the same slot (a 24-bit generation wraps there). Launches on the CPU (the
// cheapest object there), plans on CUDA (a CUDA launch uploads to the device).
void case_handle_generation_wrap() {
  PackinferContext ctx = make_context(1);
  OneRequest a(4, 1, 1, 1, true);
  PackinferPlan p{0};
  expect("packinfer_plan_create", API(packinfer_plan_create, ctx, &a.d, nullptr, &p), S_OK, "a small batch");
  const uint32_t cycles = (1u << 24) - 1;
  uint64_t first = 0, live = 0;
  bool done = false;
  if (!g_cfg.cuda) {
    PackinferLaunch l0{0};
    expect("packinfer_launch_create", API(packinfer_launch_create, ctx, p, nullptr, nullptr, &l0), S_OK, "a live plan");
    expect("packinfer_launch_destroy", API(packinfer_launch_destroy, l0), S_OK, "a live launch");
    for (uint32_t i = 0; i < cycles; i++) {
      PackinferLaunch l{0};
      if (API(packinfer_launch_create, ctx, p, nullptr, nullptr, &l) != PACKINFER_STATUS_OK || API(packinfer_launch_destroy, l) != PACKINFER_STATUS_OK)
        fail("status", "launch create/destroy failed at cycle %u", i);
      if ((i & 0xFFFFF) == 0) g_progress++;
    }
    PackinferLaunch l1{0};
    expect("packinfer_launch_create", API(packinfer_launch_create, ctx, p, nullptr, nullptr, &l1), S_OK, "a live plan");
    first = l0.bits, live = l1.bits;
    set_detail("destroyed launch 0x%" PRIx64 ", live launch 0x%" PRIx64 " after %u reuses of the slot", first, live, cycles + 1);
    expect("packinfer_launch_query", API(packinfer_launch_query, l0, &done), S_HANDLE, "a launch destroyed 2^24 reuses ago");
    expect("packinfer_launch_destroy", API(packinfer_launch_destroy, l0), S_HANDLE, "a launch destroyed 2^24 reuses ago");
    API(packinfer_launch_destroy, l1);
  } else {
    PackinferPlan q0{0};
    expect("packinfer_plan_create", API(packinfer_plan_create, ctx, &a.d, nullptr, &q0), S_OK, "a small batch");
    expect("packinfer_plan_destroy", API(packinfer_plan_destroy, q0), S_OK, "a live plan");
    for (uint32_t i = 0; i < cycles; i++) {
      PackinferPlan q{0};
      if (API(packinfer_plan_create, ctx, &a.d, nullptr, &q) != PACKINFER_STATUS_OK || API(packinfer_plan_destroy, q) != PACKINFER_STATUS_OK)
        fail("status", "plan create/destroy failed at cycle %u", i);
      if ((i & 0xFFFFF) == 0) g_progress++;
    }
    PackinferPlan q1{0};
    expect("packinfer_plan_create", API(packinfer_plan_create, ctx, &a.d, nullptr, &q1), S_OK, "a small batch");
    first = q0.bits, live = q1.bits;
    set_detail("destroyed plan 0x%" PRIx64 ", live plan 0x%" PRIx64 " after %u reuses of the slot", first, live, cycles + 1);
    PackinferPlanStats st;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    expect("packinfer_plan_stats", API(packinfer_plan_stats, q0, &st), S_HANDLE, "a plan destroyed 2^24 reuses ago");
    expect("packinfer_plan_destroy", API(packinfer_plan_destroy, q0), S_HANDLE, "a plan destroyed 2^24 reuses ago");
    API(packinfer_plan_destroy, q1);
  }
  API(packinfer_plan_destroy, p);
  API(packinfer_context_destroy, ctx);
}

void case_kv_len_32bit() {
  PackinferContext ctx = make_context(1);
  check_long_request(ctx, 1u << 31, 3, 1, false, 1);  // 2^32 + 1 keys
  check_long_request(ctx, 1u << 31, 3, 1, true, 2);
  check_long_request(ctx, UINT32_MAX, 2, 2, false, 1);  // 2^32 + 1 keys again
  API(packinfer_context_destroy, ctx);
}

void case_layout_helpers() {
  static const char buf[64] = {0};
  const uint32_t args[][3] = {{0, 1, 8}, {1, 0, 8}, {1, 1, 0}, {0, 0, 0}, {UINT32_MAX, UINT32_MAX, UINT32_MAX}, {1u << 31, 1u << 31, 8}};
  for (int hnd = 0; hnd < 2; hnd++)
    for (auto& x : args) {
      PackinferKvLayout l;
      set_detail("%s(page_size %u, heads %u, head_dim %u)", hnd ? "hnd" : "nhd", x[0], x[1], x[2]);
      PackinferStatus st = hnd ? API(packinfer_kv_layout_hnd, buf, buf + 32, x[0], x[1], x[2], &l) : API(packinfer_kv_layout_nhd, buf, buf + 32, x[0], x[1], x[2], &l);
      expect(hnd ? "packinfer_kv_layout_hnd" : "packinfer_kv_layout_nhd", st, S_INVALID, "a zero size or strides past int64");
    }
}

// Argument errors are INVALID_ARGUMENT (a value that is no dtype, a head_dim of 0); UNSUPPORTED
// is for valid values this build does not compute (a head_dim of 100).
void case_status_classes() {
  PackinferContext ctx = make_context(1);
  const uint32_t ok_dt = g_cfg.cuda ? PACKINFER_DTYPE_F16 : PACKINFER_DTYPE_F32;
  struct {
    uint32_t dtype, head_dim;
    Allowed want;
    const char* why;
  } cases[] = {{7, 8, S_INVALID, "dtype 7 is no PackinferDtype"},
               {UINT32_MAX, 8, S_INVALID, "dtype UINT32_MAX is no PackinferDtype"},
               {ok_dt, 0, S_INVALID, "head_dim 0 is no size"},
               {ok_dt, 100, S_UNSUP, "head_dim 100 is valid but not computed"}};
  for (auto& c : cases) {
    OneRequest a(4, 1, 1, 1, true);
    a.d.dtype = c.dtype;
    a.d.head_dim = c.head_dim;
    set_detail("plan: dtype %u, head_dim %u", c.dtype, c.head_dim);
    PackinferPlan p{0};
    expect("packinfer_plan_create", API(packinfer_plan_create, ctx, &a.d, nullptr, &p), c.want, c.why);
    PackinferPoolOptions po;
    API(packinfer_pool_options_default, &po);
    po.num_layers = 1;
    po.num_qo_heads = po.num_kv_heads = 1;
    po.head_dim = c.head_dim;
    po.dtype = c.dtype;
    po.num_pages = 4;
    set_detail("pool: dtype %u, head_dim %u", c.dtype, c.head_dim);
    PackinferPool pool{0};
    expect("packinfer_pool_create", API(packinfer_pool_create, ctx, &po, &pool), c.want, c.why);
  }
  API(packinfer_context_destroy, ctx);
}

// A full pool refuses appends and forks and changes nothing: counters, lengths, contents.
void case_exhausted_unchanged() {
  MiniPool m(4, 4);
  uint64_t a = m.create();
  m.append(a, 12);
  m.write(a, 12);
  uint64_t b = 0;
  expect("packinfer_pool_fork", API(packinfer_pool_fork, m.pool, a, 6, nullptr, &b), S_OK, "the copied partial page takes the last page");
  m.content[b].assign(m.content[a].begin(), m.content[a].begin() + 6);
  auto stats = [&] {
    PackinferPoolStats s;
    memset(&s, 0, sizeof s);
    s.struct_size = sizeof s;
    expect("packinfer_pool_stats", API(packinfer_pool_stats, m.pool, &s), S_OK, "a live pool");
    return s;
  };
  PackinferPoolStats before = stats();
  if (before.pages_free != 0) fail("pool stats", "a full pool has %u free pages", before.pages_free);
  m.append(a, 1, S_EXHAUSTED);
  m.append(b, 3, S_EXHAUSTED);
  uint64_t c = 0x5EB71A1Eull;
  expect("packinfer_pool_fork", API(packinfer_pool_fork, m.pool, a, 5, nullptr, &c), S_EXHAUSTED, "a partial page to copy, no page free");
  if (c != 0x5EB71A1Eull) fail("failed call wrote out", "a refused fork wrote a child id");
  PackinferPoolStats after = stats();
  if (!PoolPhase::same(before, after)) fail("exhausted changed the pool", "refused appends and forks changed the pool's counters");
  m.check({a, b}, "contents after refused appends and forks");
  expect("packinfer_pool_release", API(packinfer_pool_release, m.pool, b), S_OK, "B is done");
  m.content.erase(b);
  m.append(a, 1);
  m.write(a, 1);
  m.check({a}, "A after B released its page");
}

struct CaseDef {
  const char* name;
  void (*fn)();
  const char* what;
};
const CaseDef kCases[] = {
    {"shared-page-rewrite", case_shared_page_rewrite, "a registered page rewritten in place is matched by hash"},
    {"negative-page-index", case_negative_page_index, "negative page indices with num_pages near UINT32_MAX"},
    {"alloc-huge-heads", case_alloc_huge_heads, "2^31 heads: a status, not an abort"},
    {"alloc-headroom-relayout", case_alloc_headroom_relayout, "headroom UINT32_MAX then relayout: a status, not an abort"},
    {"alloc-tiny-capacity", case_alloc_tiny_capacity, "capacity 1e-300 over 2^30 keys: a status, not an abort"},
    {"alloc-huge-query-count", case_alloc_huge_query_count, "2^31 - 5 query tokens: a status, not an abort"},
    {"fork-comb", case_fork_comb, "a comb of 2000 forks planned on a 256 KiB stack"},
    {"tls-exit", case_tls_exit, "calls from a thread-exit destructor"},
    {"handle-generation-wrap", case_handle_generation_wrap, "a destroyed handle after 2^24 reuses of its slot"},
    {"kv-len-32bit", case_kv_len_32bit, "kv_len past 32 bits"},
    {"layout-helpers", case_layout_helpers, "kv_layout_nhd/hnd refuse sizes that are no sizes"},
    {"status-classes", case_status_classes, "INVALID_ARGUMENT for non-values, UNSUPPORTED for unsupported values"},
    {"exhausted-unchanged", case_exhausted_unchanged, "POOL_EXHAUSTED changes nothing"},
};

}  // namespace

namespace {

// ---------------------------------------------------------------------------------------------
// Driver: the parent runs every phase and case in a child process and sums up.
// ---------------------------------------------------------------------------------------------

struct PhaseDef {
  const char* name;
  double share;  // of the call budget and of the time cap
  void (*fn)(uint64_t, const Budget&);
};
const PhaseDef kPhases[] = {
    {"api", 0.33, run_api_phase},
    {"pool", 0.42, run_pool_phase},
    {"threads", 0.18, run_threads_phase},
    {"huge", 0.07, run_huge_phase},
};

bool needs_alloc_limit(const std::string& name) { return name == "huge" || name.rfind("alloc-", 0) == 0; }

// A thread that aborts the child, with every worker's where-record, when no step finished
// for `limit` seconds.
void start_watchdog(double limit) {
  std::thread([limit] {
    uint64_t last = g_progress.load();
    double still = 0;
    for (;;) {
      std::this_thread::sleep_for(std::chrono::seconds(1));
      uint64_t now = g_progress.load();
      if (now != last) {
        last = now;
        still = 0;
        continue;
      }
      if (++still < limit) continue;
      raw_write("\nstress_test: HANG: no step finished for ");
      raw_u64((uint64_t)limit);
      raw_write(" s; the workers were at:\n");
      for (int i = 0; i < std::min(64, g_nwhere.load()); i++) raw_where(&g_where[i]);
      if (g_nwhere.load() > 0) replay_hint(&g_where[0]);
      report_calls();
      signal(SIGABRT, SIG_DFL);
      abort();
    }
  }).detach();
}

int run_child() {
  install_crash_handlers();
  if (g_cfg.cuda) g_cuda.load();
  start_watchdog(STRESS_ASAN ? 300 : g_cfg.cuda ? 600 : 120);
  const std::string& name = g_cfg.phase;
  auto t0 = Clock::now();
  bool found = false;
  for (auto& p : kPhases)
    if (name == p.name) {
      found = true;
      Budget budget(g_cfg.calls, g_cfg.seconds);
      p.fn(g_cfg.seed, budget);
    }
  for (auto& c : kCases)
    if (name == c.name) {
      found = true;
      enter_worker(c.name, 0, g_cfg.seed);
      tw->op = c.name;
      try {
        c.fn();
      } catch (StepFailed&) {
      }
    }
  if (!found) {
    fprintf(stderr, "stress_test: no phase or case named %s (--list lists them)\n", name.c_str());
    return 2;
  }
  uint64_t calls = g_calls.load();
  fprintf(stderr, "stress_test: %s: %" PRIu64 " calls in %.1f s, %" PRIu64 " failed checks\n", name.c_str(), calls, seconds_since(t0), g_failures.load());
  for (auto& kv : g_fail_counts)
    fprintf(stderr, "  [%s] x%" PRIu64 ", first at %s\n", kv.first.c_str(), kv.second.first, kv.second.second.c_str());
  if (!g_cover.empty()) {
    std::string line;
    for (auto& kv : g_cover) line += (line.empty() ? "" : ", ") + kv.first + " " + std::to_string(kv.second);
    fprintf(stderr, "  covered: %s\n", line.c_str());
  }
  report_calls();
  return g_failures.load() == 0 ? 0 : 1;
}

struct ChildResult {
  std::string name, verdict;
  uint64_t calls = 0;
  double seconds = 0;
  bool ok = false;
};

ChildResult spawn(const std::string& name, uint64_t calls, double seconds, double timeout) {
  ChildResult res;
  res.name = name;
  int fds[2];
  if (pipe(fds) != 0) {
    perror("pipe");
    exit(2);
  }
  std::vector<std::string> args = {g_cfg.self,   "--phase",   name, "--seed", std::to_string(g_cfg.seed), "--calls", std::to_string(calls),
                                   "--seconds",  std::to_string(seconds), "--backend", g_cfg.cuda ? "cuda" : "cpu", "--threads",
                                   std::to_string(g_cfg.threads), "--report-fd", std::to_string(fds[1])};
  auto t0 = Clock::now();
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  if (pid < 0) {
    perror("fork");
    exit(2);
  }
  if (pid == 0) {
    close(fds[0]);
    if (STRESS_ASAN) {  // a sanitizer report exits with its own status, told apart from failed checks
      std::string o = getenv("ASAN_OPTIONS") ? getenv("ASAN_OPTIONS") : "";
      setenv("ASAN_OPTIONS", (o + (o.empty() ? "" : ":") + "exitcode=86").c_str(), 1);
    }
    if (needs_alloc_limit(name)) {
      // 2 GiB: enough for every sane request here, too little for the allocation bombs, so
      // they fail fast (and the library must turn that into a status).
      if (STRESS_ASAN) {
        // The sanitizer's allocator serves the library too: make it fail requests past the
        // limit like the system allocator does, instead of reporting them.
        // (Its limits count what is allocated, not address space: 1 GiB comes closest.)
        std::string o = getenv("ASAN_OPTIONS") ? getenv("ASAN_OPTIONS") : "";
        o += (o.empty() ? "" : ":") + std::string("allocator_may_return_null=1:max_allocation_size_mb=1024:soft_rss_limit_mb=1024");
        setenv("ASAN_OPTIONS", o.c_str(), 1);
      } else if (!g_cfg.cuda) {
        struct rlimit rl = {2ull << 30, 2ull << 30};
        setrlimit(RLIMIT_AS, &rl);
      }
    }
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(g_cfg.self.c_str(), argv.data());
    perror("execv");
    _exit(127);
  }
  close(fds[1]);
  fcntl(fds[0], F_SETFL, O_NONBLOCK);
  std::string report;
  int status = 0;
  bool timed_out = false;
  for (;;) {
    char buf[256];
    ssize_t n;
    while ((n = read(fds[0], buf, sizeof buf)) > 0) report.append(buf, (size_t)n);
    pid_t w = waitpid(pid, &status, WNOHANG);
    if (w == pid) break;
    if (seconds_since(t0) > timeout && !timed_out) {
      fprintf(stderr, "stress_test: %s still running after %.0f s: killed\n", name.c_str(), timeout);
      kill(pid, SIGKILL);
      timed_out = true;
    }
    struct pollfd pfd = {fds[0], POLLIN, 0};
    poll(&pfd, 1, 100);
  }
  char buf[256];
  ssize_t n;
  while ((n = read(fds[0], buf, sizeof buf)) > 0) report.append(buf, (size_t)n);
  close(fds[0]);
  res.seconds = seconds_since(t0);
  size_t at = report.find("calls ");
  if (at != std::string::npos) res.calls = strtoull(report.c_str() + at + 6, nullptr, 10);
  if (timed_out) res.verdict = "HANG (killed after the time limit)";
  else if (WIFSIGNALED(status)) res.verdict = std::string("CRASH (signal ") + std::to_string(WTERMSIG(status)) + ", " + strsignal(WTERMSIG(status)) + ")";
  else if (WIFEXITED(status) && WEXITSTATUS(status) == 0 && at != std::string::npos) res.ok = true, res.verdict = "ok";
  else if (WIFEXITED(status) && WEXITSTATUS(status) == 1) res.verdict = "FAILED checks";
  else if (WIFEXITED(status) && WEXITSTATUS(status) == 86) res.verdict = "SANITIZER REPORT";
  else res.verdict = "FAILED (exit status " + std::to_string(WIFEXITED(status) ? WEXITSTATUS(status) : -1) + ")";
  return res;
}

bool selected(const std::string& name) {
  if (g_cfg.only.empty()) return true;
  std::string list = "," + g_cfg.only + ",";
  return list.find("," + name + ",") != std::string::npos;
}

int run_parent() {
  printf("stress_test: seed %" PRIu64 ", backend %s, %" PRIu64 " calls or %.0f s for the random phases, %d threads%s\n", g_cfg.seed,
         g_cfg.cuda ? "cuda" : "cpu", g_cfg.calls, g_cfg.seconds, g_cfg.threads, STRESS_ASAN ? ", sanitizer build" : "");
  printf("stress_test: replay with --seed %" PRIu64 " (or PACKINFER_STRESS_SEED=%" PRIu64 ")\n", g_cfg.seed, g_cfg.seed);
  fflush(stdout);
  auto t0 = Clock::now();
  std::vector<ChildResult> results;
  double slow = STRESS_ASAN ? 4.0 : 1.0;
  for (auto& c : kCases)
    if (selected(c.name)) results.push_back(spawn(c.name, 0, 0, (g_cfg.cuda ? 600 : 240) * slow));
  uint64_t random_calls = 0;
  for (auto& p : kPhases)
    if (selected(p.name)) {
      double secs = g_cfg.seconds * p.share;
      results.push_back(spawn(p.name, (uint64_t)((double)g_cfg.calls * p.share), secs, secs + (g_cfg.cuda ? 900 : 180) * slow));
      random_calls += results.back().calls;
    }
  uint64_t total = 0;
  bool ok = true;
  printf("\nstress_test: results (seed %" PRIu64 ")\n", g_cfg.seed);
  for (auto& r : results) {
    bool is_case = true;
    for (auto& p : kPhases) is_case &= r.name != p.name;
    const char* what = "";
    for (auto& c : kCases)
      if (r.name == c.name) what = c.what;
    printf("  %-24s %-36s %10" PRIu64 " calls %7.1f s%s%s\n", r.name.c_str(), r.verdict.c_str(), r.calls, r.seconds, is_case ? "  " : "", what);
    total += r.calls;
    ok &= r.ok;
  }
  printf("stress_test: %" PRIu64 " calls (random phases %" PRIu64 ") in %.1f s\n", total, random_calls, seconds_since(t0));
  printf("stress_test: %s\n", ok ? "all phases and cases passed" : "FAILED: see the reports above; replay a phase with --phase NAME --seed SEED");
  return ok ? 0 : 1;
}

uint64_t parse_u64(const char* s, const char* what) {
  char* end = nullptr;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 0);
  if (errno || end == s || *end) {
    fprintf(stderr, "stress_test: %s = \"%s\" is not a number\n", what, s);
    exit(2);
  }
  return v;
}

void usage() {
  printf(
      "usage: stress_test [--seed N] [--calls N] [--seconds S] [--backend cpu|cuda] [--threads N] [--only a,b] [--phase NAME] [--list]\n"
      "  environment: PACKINFER_STRESS_SEED, _CALLS, _SECONDS, _BACKEND, _THREADS, _ONLY (flags win)\n");
}

}  // namespace

int main(int argc, char** argv) {
  char self[4096];
  ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  g_cfg.self = n > 0 ? std::string(self, (size_t)n) : argv[0];
  bool seed_given = false;
  if (const char* e = getenv("PACKINFER_STRESS_SEED")) g_cfg.seed = parse_u64(e, "PACKINFER_STRESS_SEED"), seed_given = true;
  if (const char* e = getenv("PACKINFER_STRESS_CALLS")) g_cfg.calls = parse_u64(e, "PACKINFER_STRESS_CALLS");
  if (const char* e = getenv("PACKINFER_STRESS_SECONDS")) g_cfg.seconds = (double)parse_u64(e, "PACKINFER_STRESS_SECONDS");
  if (const char* e = getenv("PACKINFER_STRESS_BACKEND")) g_cfg.cuda = std::string(e) == "cuda";
  if (const char* e = getenv("PACKINFER_STRESS_THREADS")) g_cfg.threads = (int)parse_u64(e, "PACKINFER_STRESS_THREADS");
  if (const char* e = getenv("PACKINFER_STRESS_ONLY")) g_cfg.only = e;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) {
        fprintf(stderr, "stress_test: %s needs a value\n", a.c_str());
        exit(2);
      }
      return argv[++i];
    };
    if (a == "--seed") g_cfg.seed = parse_u64(value(), "--seed"), seed_given = true;
    else if (a == "--calls") g_cfg.calls = parse_u64(value(), "--calls");
    else if (a == "--seconds") g_cfg.seconds = atof(value());
    else if (a == "--backend") g_cfg.cuda = std::string(value()) == "cuda";
    else if (a == "--threads") g_cfg.threads = (int)parse_u64(value(), "--threads");
    else if (a == "--only") g_cfg.only = value();
    else if (a == "--phase") g_cfg.phase = value();
    else if (a == "--report-fd") g_cfg.report_fd = (int)parse_u64(value(), "--report-fd");
    else if (a == "--trace") g_cfg.trace = true;
    else if (a == "--list") {
      for (auto& p : kPhases) printf("%-24s random phase, %.0f%% of the budget\n", p.name, p.share * 100);
      for (auto& c : kCases) printf("%-24s %s\n", c.name, c.what);
      return 0;
    } else {
      usage();
      return a == "--help" || a == "-h" ? 0 : 2;
    }
  }
  g_cfg.threads = std::max(1, std::min(g_cfg.threads, 32));
  if (!seed_given) {
    uint64_t s = (uint64_t)std::chrono::system_clock::now().time_since_epoch().count() ^ ((uint64_t)getpid() << 32);
    g_cfg.seed = splitmix(s) % 1000000000ull;
  }
  setvbuf(stdout, nullptr, _IOLBF, 0);
  if (!g_cfg.phase.empty()) {
    // A phase run by hand (no parent) runs with the whole budget.
    return run_child();
  }
  return run_parent();
}
