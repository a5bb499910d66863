/* Tests of the raw C API (include/packinfer.h) on the CPU backend: full flows compared against a
 * naive double-precision attention written here, in f32, f16 and bf16, and the error paths
 * (status and message). Plain C11, no framework: each CHECK that fails prints where and why, and
 * the program exits non-zero if any did. */
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "packinfer.h"

static int g_checks = 0;
static int g_failures = 0;

static void check_at(int ok, const char* file, int line, const char* fmt, ...) {
  g_checks++;
  if (ok) return;
  g_failures++;
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "%s:%d: FAILED: ", file, line);
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
}
#define CHECK(cond, ...) check_at((cond) ? 1 : 0, __FILE__, __LINE__, __VA_ARGS__)

/* The call must return `want`; when `want` is not OK, the last error must contain `needle`. */
static void check_status_at(PackinferStatus got, PackinferStatus want, const char* needle, const char* call,
                            const char* file, int line) {
  const char* msg = got == PACKINFER_STATUS_OK ? "" : packinfer_last_error();
  check_at(got == want, file, line, "%s returned %s, want %s (message: %s)", call, packinfer_status_string(got),
           packinfer_status_string(want), msg);
  if (got == want && want != PACKINFER_STATUS_OK && needle != NULL)
    check_at(strstr(msg, needle) != NULL, file, line, "%s: message \"%s\" lacks \"%s\"", call, msg, needle);
}
#define CHECK_STATUS(call, want, needle) check_status_at((call), (want), (needle), #call, __FILE__, __LINE__)

/* ---- deterministic random numbers (xorshift64*) ---- */
static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static uint64_t next_u64(void) {
  g_rng ^= g_rng >> 12;
  g_rng ^= g_rng << 25;
  g_rng ^= g_rng >> 27;
  return g_rng * 0x2545F4914F6CDD1Dull;
}
static float uniform(float lo, float hi) { return lo + (hi - lo) * (float)((next_u64() >> 40) / 16777216.0); }

/* ---- f16 / bf16 bits, round to nearest even ---- */
static uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
static float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

/* Inputs here are finite and in [-2, 2], outputs are in [-1, 1]: normal and subnormal f16. */
static uint16_t f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  float a = fabsf(f);
  if (a >= 65520.0f) return (uint16_t)(sign | 0x7C00u);
  if (a < 6.103515625e-05f) { /* subnormal: units of 2^-24 */
    return (uint16_t)(sign | (uint16_t)lrintf(a * 16777216.0f));
  }
  uint32_t exp = ((u >> 23) & 0xFFu) - 127u + 15u;
  uint32_t mant = u & 0x7FFFFFu;
  uint32_t h = (exp << 10) | (mant >> 13);
  uint32_t rest = mant & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++; /* a carry into the exponent is right */
  return (uint16_t)(sign | h);
}
static float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0) return (sign ? -1.0f : 1.0f) * (float)mant / 16777216.0f;
  if (exp == 31) return bits_f32(sign | 0x7F800000u | (mant << 13));
  return bits_f32(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}

static size_t dtype_size(PackinferDtype t) { return t == PACKINFER_DTYPE_F32 ? 4 : 2; }
/* Stores x in `buf[i]` as dtype `t` and returns the value actually stored. */
static float store(void* buf, size_t i, PackinferDtype t, float x) {
  if (t == PACKINFER_DTYPE_F32) { ((float*)buf)[i] = x; return x; }
  if (t == PACKINFER_DTYPE_F16) { uint16_t h = f32_to_f16(x); ((uint16_t*)buf)[i] = h; return f16_to_f32(h); }
  uint16_t h = f32_to_bf16(x); ((uint16_t*)buf)[i] = h; return bf16_to_f32(h);
}
static float load(const void* buf, size_t i, PackinferDtype t) {
  if (t == PACKINFER_DTYPE_F32) return ((const float*)buf)[i];
  if (t == PACKINFER_DTYPE_F16) return f16_to_f32(((const uint16_t*)buf)[i]);
  return bf16_to_f32(((const uint16_t*)buf)[i]);
}

/* ---- a batch in a paged NHD cache ---- */
#define MAX_REQ 8
typedef struct {
  int n;
  int q_len[MAX_REQ], kv_len[MAX_REQ];
  uint32_t page_size, kv_heads, group, head_dim;
  PackinferDtype dtype;
  int causal;
  /* Requests share_members[0..share_count) share their first share_len keys (a page multiple). */
  int share_count, share_len;
  int32_t share_members[MAX_REQ];
} Spec;

typedef struct {
  Spec s;
  int32_t qo_indptr[MAX_REQ + 1], kv_indptr[MAX_REQ + 1], last[MAX_REQ];
  int32_t* pages;
  uint32_t num_pages, qo_heads;
  int total_q;
  void *q, *k, *v;
  PackinferPrefixGroup group;
} Case;

static void case_build(Case* c, const Spec* s) {
  memset(c, 0, sizeof *c);
  c->s = *s;
  c->qo_heads = s->kv_heads * s->group;
  uint32_t total_pages = 3; /* a few pages no request uses */
  for (int r = 0; r < s->n; r++) total_pages += (uint32_t)(s->kv_len[r] + s->page_size - 1) / s->page_size;
  c->num_pages = total_pages;
  int32_t* order = malloc(sizeof(int32_t) * total_pages);
  for (uint32_t i = 0; i < total_pages; i++) order[i] = (int32_t)i;
  for (uint32_t i = total_pages - 1; i > 0; i--) { /* scatter pages */
    uint32_t j = (uint32_t)(next_u64() % (i + 1));
    int32_t t = order[i]; order[i] = order[j]; order[j] = t;
  }
  c->pages = malloc(sizeof(int32_t) * total_pages);
  uint32_t next_free = 0, used = 0;
  for (int r = 0; r < s->n; r++) {
    c->qo_indptr[r + 1] = c->qo_indptr[r] + s->q_len[r];
    int np = (s->kv_len[r] + (int)s->page_size - 1) / (int)s->page_size;
    int shares = 0;
    for (int m = 1; m < s->share_count; m++) shares |= s->share_members[m] == r;
    for (int p = 0; p < np; p++) {
      if (shares && (p + 1) * (int)s->page_size <= s->share_len) { /* the first member's page */
        c->pages[used++] = c->pages[c->kv_indptr[s->share_members[0]] + p];
      } else {
        c->pages[used++] = order[next_free++];
      }
    }
    c->kv_indptr[r + 1] = (int32_t)used;
    c->last[r] = s->kv_len[r] == 0 ? 0 : (s->kv_len[r] - 1) % (int)s->page_size + 1;
  }
  free(order);
  c->total_q = c->qo_indptr[s->n];
  size_t es = dtype_size(s->dtype);
  size_t kv_elems = (size_t)total_pages * s->page_size * s->kv_heads * s->head_dim;
  size_t q_elems = (size_t)c->total_q * c->qo_heads * s->head_dim;
  c->k = malloc(kv_elems * es);
  c->v = malloc(kv_elems * es);
  c->q = malloc(q_elems * es);
  for (size_t i = 0; i < kv_elems; i++) store(c->k, i, s->dtype, uniform(-1, 1));
  for (size_t i = 0; i < kv_elems; i++) store(c->v, i, s->dtype, uniform(-1, 1));
  for (size_t i = 0; i < q_elems; i++) store(c->q, i, s->dtype, uniform(-2, 2));
  if (s->share_count > 0) {
    c->group.prefix_len = (uint32_t)s->share_len;
    c->group.num_members = (uint32_t)s->share_count;
    c->group.members = s->share_members;
  }
}

static void case_free(Case* c) {
  free(c->pages); free(c->q); free(c->k); free(c->v);
}

static PackinferBatchDesc case_desc(const Case* c) {
  PackinferBatchDesc d;
  memset(&d, 0, sizeof d);
  d.struct_size = sizeof d;
  d.batch_size = (uint32_t)c->s.n;
  d.qo_indptr = c->qo_indptr;
  d.kv_indptr = c->kv_indptr;
  d.kv_page_indices = c->pages;
  d.kv_last_page_len = c->last;
  d.page_size = c->s.page_size;
  d.num_pages = c->num_pages;
  d.num_qo_heads = c->qo_heads;
  d.num_kv_heads = c->s.kv_heads;
  d.head_dim = c->s.head_dim;
  d.dtype = c->s.dtype;
  d.causal = c->s.causal != 0;
  d.sm_scale = 0.0f; /* the default, 1/sqrt(head_dim) */
  d.num_prefix_groups = c->s.share_count > 0 ? 1 : 0;
  d.prefix_groups = c->s.share_count > 0 ? &c->group : NULL;
  return d;
}

/* Naive attention in double over the stored values: full softmax per (token, head). */
static void reference(const Case* c, double* out, double* lse) {
  const Spec* s = &c->s;
  uint32_t d = s->head_dim, hq = c->qo_heads, hk = s->kv_heads, ps = s->page_size;
  double scale = 1.0 / sqrt((double)d);
  int max_kv = 1;
  for (int r = 0; r < s->n; r++) max_kv = s->kv_len[r] > max_kv ? s->kv_len[r] : max_kv;
  double* scores = malloc(sizeof(double) * (size_t)max_kv);
  for (int r = 0; r < s->n; r++) {
    for (int i = 0; i < s->q_len[r]; i++) {
      int tok = c->qo_indptr[r] + i;
      int visible = s->causal ? s->kv_len[r] - s->q_len[r] + i + 1 : s->kv_len[r];
      for (uint32_t h = 0; h < hq; h++) {
        uint32_t kvh = h / s->group;
        double m = -INFINITY, z = 0.0;
        for (int j = 0; j < visible; j++) {
          size_t base = (((size_t)c->pages[c->kv_indptr[r] + j / (int)ps] * ps + (size_t)(j % (int)ps)) * hk + kvh) * d;
          double dot = 0.0;
          for (uint32_t e = 0; e < d; e++)
            dot += (double)load(c->q, ((size_t)tok * hq + h) * d + e, s->dtype) * load(c->k, base + e, s->dtype);
          scores[j] = dot * scale;
          if (scores[j] > m) m = scores[j];
        }
        for (int j = 0; j < visible; j++) z += exp(scores[j] - m);
        double* o = out + ((size_t)tok * hq + h) * d;
        for (uint32_t e = 0; e < d; e++) o[e] = 0.0;
        for (int j = 0; j < visible; j++) {
          size_t base = (((size_t)c->pages[c->kv_indptr[r] + j / (int)ps] * ps + (size_t)(j % (int)ps)) * hk + kvh) * d;
          double p = exp(scores[j] - m) / z;
          for (uint32_t e = 0; e < d; e++) o[e] += p * load(c->v, base + e, s->dtype);
        }
        lse[(size_t)tok * hq + h] = m + log(z);
      }
    }
  }
  free(scores);
}

static PackinferContext cpu_context(void) {
  PackinferContextOptions o;
  PackinferContext ctx = {0};
  CHECK_STATUS(packinfer_context_options_default(&o), PACKINFER_STATUS_OK, NULL);
  o.backend = PACKINFER_BACKEND_CPU;
  o.num_threads = 2;
  CHECK_STATUS(packinfer_context_create(&o, &ctx), PACKINFER_STATUS_OK, NULL);
  return ctx;
}

/* Plan, launch, run, compare against the reference, destroy: the whole flow of one step. With
 * `capacity`, the launch is made by packinfer_launch_create_with_capacity, and between the two
 * layers packinfer_launch_update re-targets the launch at the same plan. */
static void flow(const char* name, const Spec* spec, const PackinferLaunchCapacity* capacity) {
  Case c;
  case_build(&c, spec);
  PackinferContext ctx = cpu_context();

  PackinferContextInfo info;
  memset(&info, 0, sizeof info);
  info.struct_size = sizeof info;
  CHECK_STATUS(packinfer_context_info(ctx, &info), PACKINFER_STATUS_OK, NULL);
  CHECK(info.backend == PACKINFER_BACKEND_CPU && strcmp(info.device_name, "cpu") == 0 && info.num_workers == 2,
        "%s: context info backend %d, device \"%s\", %u workers", name, (int)info.backend, info.device_name, info.num_workers);

  PackinferBatchDesc desc = case_desc(&c);
  PackinferPlan plan = {0};
  CHECK_STATUS(packinfer_plan_create(ctx, &desc, NULL, &plan), PACKINFER_STATUS_OK, NULL);
  PackinferPlanStats stats;
  memset(&stats, 0, sizeof stats);
  stats.struct_size = sizeof stats;
  CHECK_STATUS(packinfer_plan_stats(plan, &stats), PACKINFER_STATUS_OK, NULL);
  CHECK(stats.num_requests == (uint32_t)spec->n, "%s: stats.num_requests = %u, want %d", name, stats.num_requests, spec->n);
  CHECK(stats.num_work_items >= 1 && stats.num_groups >= 1, "%s: %u work items in %u groups", name, stats.num_work_items, stats.num_groups);
  CHECK(stats.tile_utilization > 0.0 && stats.tile_utilization <= 1.0, "%s: tile_utilization = %g", name, stats.tile_utilization);

  PackinferLaunch launch = {0};
  if (capacity == NULL) {
    CHECK_STATUS(packinfer_launch_create(ctx, plan, NULL, NULL, &launch), PACKINFER_STATUS_OK, NULL);
  } else {
    CHECK_STATUS(packinfer_launch_create_with_capacity(ctx, plan, NULL, capacity, NULL, &launch), PACKINFER_STATUS_OK, NULL);
  }
  CHECK(launch.bits != 0, "%s: the launch handle was written", name);
  bool done = false;
  CHECK_STATUS(packinfer_launch_query(launch, &done), PACKINFER_STATUS_OK, NULL);
  CHECK(done, "%s: the CPU backend's launch is ready at once", name);
  CHECK_STATUS(packinfer_launch_wait(launch), PACKINFER_STATUS_OK, NULL);

  size_t n_out = (size_t)c.total_q * c.qo_heads * spec->head_dim;
  size_t n_lse = (size_t)c.total_q * c.qo_heads;
  void* o = malloc(n_out * dtype_size(spec->dtype));
  float* lse = malloc(n_lse * sizeof(float));
  for (size_t i = 0; i < n_out; i++) store(o, i, spec->dtype, NAN); /* an unwritten element shows */
  for (size_t i = 0; i < n_lse; i++) lse[i] = NAN;

  PackinferRunArgs args;
  memset(&args, 0, sizeof args);
  args.struct_size = sizeof args;
  args.q = c.q;
  args.o = o;
  args.lse = lse;
  CHECK_STATUS(packinfer_kv_layout_nhd(c.k, c.v, spec->page_size, spec->kv_heads, spec->head_dim, &args.kv), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_run(launch, &args), PACKINFER_STATUS_OK, NULL);

  double* ref_o = malloc(n_out * sizeof(double));
  double* ref_lse = malloc(n_lse * sizeof(double));
  reference(&c, ref_o, ref_lse);
  double tol = spec->dtype == PACKINFER_DTYPE_F32 ? 1e-4 : spec->dtype == PACKINFER_DTYPE_F16 ? 2e-3 : 1.6e-2;
  int bad = 0;
  for (size_t i = 0; i < n_out && bad < 3; i++) {
    double got = load(o, i, spec->dtype), want = ref_o[i];
    if (!(fabs(got - want) <= tol * (1.0 + fabs(want)))) {
      bad++;
      CHECK(0, "%s: O[%zu] (token %zu, head %zu, dim %zu) = %.6f, reference %.6f", name, i,
            i / (c.qo_heads * spec->head_dim), (i / spec->head_dim) % c.qo_heads, i % spec->head_dim, got, want);
    }
  }
  for (size_t i = 0; i < n_lse && bad < 3; i++) {
    if (!(fabs(lse[i] - ref_lse[i]) <= 1e-4 * (1.0 + fabs(ref_lse[i])))) {
      bad++;
      CHECK(0, "%s: LSE[%zu] = %.6f, reference %.6f", name, i, lse[i], ref_lse[i]);
    }
  }
  CHECK(bad == 0, "%s: output matches the reference", name);

  if (capacity != NULL) {
    /* Re-targeting the launch at its own plan: the second layer below still computes it. */
    CHECK_STATUS(packinfer_launch_update(launch, plan, NULL), PACKINFER_STATUS_OK, NULL);
  }

  /* A second layer through the same launch: different Q, same metadata. */
  for (size_t i = 0; i < n_out; i++) store(c.q, i, spec->dtype, -load(c.q, i, spec->dtype)); /* Q has O's shape */
  CHECK_STATUS(packinfer_run(launch, &args), PACKINFER_STATUS_OK, NULL);
  reference(&c, ref_o, ref_lse);
  bad = 0;
  for (size_t i = 0; i < n_out && !bad; i++) bad = !(fabs(load(o, i, spec->dtype) - ref_o[i]) <= tol * (1.0 + fabs(ref_o[i])));
  CHECK(!bad, "%s: second layer matches the reference", name);

  CHECK_STATUS(packinfer_launch_destroy(launch), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_plan_destroy(plan), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_context_destroy(ctx), PACKINFER_STATUS_OK, NULL);
  free(o); free(lse); free(ref_o); free(ref_lse);
  case_free(&c);
}

static const Spec k_mixed = {
    .n = 4, .q_len = {1, 37, 1, 5}, .kv_len = {70, 37, 130, 40},
    .page_size = 16, .kv_heads = 2, .group = 4, .head_dim = 64, .causal = 1,
};

static void test_flows(void) {
  Spec s = k_mixed;
  s.dtype = PACKINFER_DTYPE_F32;
  flow("f32 causal mixed batch, GQA 4", &s, NULL);
  s.dtype = PACKINFER_DTYPE_F16;
  s.causal = 0;
  s.head_dim = 128;
  flow("f16 non-causal, head_dim 128", &s, NULL);
  Spec p = {
      .n = 3, .q_len = {1, 1, 3}, .kv_len = {40, 45, 33},
      .page_size = 1, .kv_heads = 1, .group = 8, .head_dim = 64, .dtype = PACKINFER_DTYPE_BF16, .causal = 1,
      .share_count = 3, .share_len = 32, .share_members = {0, 1, 2},
  };
  flow("bf16 page size 1, shared 32-token prefix", &p, NULL);
}

static void test_version(void) {
  CHECK(packinfer_abi_version() == PACKINFER_ABI_VERSION, "abi version %u, header %d", packinfer_abi_version(), PACKINFER_ABI_VERSION);
  CHECK(packinfer_version() != NULL && strlen(packinfer_version()) > 0, "packinfer_version() is empty");
  CHECK(strcmp(packinfer_status_string(PACKINFER_STATUS_INVALID_HANDLE), "PACKINFER_STATUS_INVALID_HANDLE") == 0,
        "status string %s", packinfer_status_string(PACKINFER_STATUS_INVALID_HANDLE));
  CHECK(packinfer_last_error() != NULL, "packinfer_last_error() is never NULL");
}

static void test_errors(void) {
  Case c;
  Spec s = k_mixed;
  s.dtype = PACKINFER_DTYPE_F32;
  case_build(&c, &s);
  PackinferContext ctx = cpu_context();
  PackinferPlan plan = {0};
  PackinferBatchDesc d;

  /* Context options. */
  PackinferContextOptions o;
  PackinferContext other = {0};
  packinfer_context_options_default(&o);
  o.struct_size = 8;
  CHECK_STATUS(packinfer_context_create(&o, &other), PACKINFER_STATUS_INVALID_ARGUMENT, "options->struct_size = 8");
  packinfer_context_options_default(&o);
  /* Enum fields are plain integers in the structs, so an out-of-range value is refused. */
  o.backend = 9;
  CHECK_STATUS(packinfer_context_create(&o, &other), PACKINFER_STATUS_INVALID_ARGUMENT, "options->backend = 9");
  CHECK_STATUS(packinfer_context_create(NULL, &other), PACKINFER_STATUS_INVALID_ARGUMENT, "options is a null pointer");

  /* CUDA where it cannot work: NO_DEVICE and the reason. On a GPU machine the status differs. */
  packinfer_context_options_default(&o);
  o.backend = PACKINFER_BACKEND_CUDA;
  if (access("/dev/nvidia0", F_OK) != 0) {
    CHECK_STATUS(packinfer_context_create(&o, &other), PACKINFER_STATUS_NO_DEVICE, "packinfer_context_create: ");
    const char* m = packinfer_last_error();
    CHECK(strstr(m, "CUDA") || strstr(m, "NVRTC") || strstr(m, "cuInit") || strstr(m, "device"), "NO_DEVICE message \"%s\" gives no reason", m);
  } else {
    PackinferStatus st = packinfer_context_create(&o, &other);
    if (st == PACKINFER_STATUS_OK) packinfer_context_destroy(other);
    printf("note: /dev/nvidia0 exists; NO_DEVICE not checked (CUDA context: %s)\n", packinfer_status_string(st));
  }

  /* Batch descriptions: struct_size, each bad value named. */
  d = case_desc(&c);
  d.struct_size = offsetof(PackinferBatchDesc, custom_mask) - 8; /* older than the oldest version */
  CHECK_STATUS(packinfer_plan_create(ctx, &d, NULL, &plan), PACKINFER_STATUS_INVALID_ARGUMENT, "batch->struct_size");
  d.struct_size = offsetof(PackinferBatchDesc, mask_indptr) + 4; /* ends inside mask_indptr */
  CHECK_STATUS(packinfer_plan_create(ctx, &d, NULL, &plan), PACKINFER_STATUS_INVALID_ARGUMENT, "batch->struct_size");
  d = case_desc(&c);
  int32_t bad_last[MAX_REQ];
  memcpy(bad_last, c.last, sizeof bad_last);
  bad_last[1] = 99;
  d.kv_last_page_len = bad_last;
  CHECK_STATUS(packinfer_plan_create(ctx, &d, NULL, &plan), PACKINFER_STATUS_INVALID_ARGUMENT, "kv_last_page_len[1] = 99");
  d = case_desc(&c);
  d.qo_indptr = NULL;
  CHECK_STATUS(packinfer_plan_create(ctx, &d, NULL, &plan), PACKINFER_STATUS_INVALID_ARGUMENT, "batch->qo_indptr is a null pointer");
  d = case_desc(&c);
  d.num_pages = 2;
  CHECK_STATUS(packinfer_plan_create(ctx, &d, NULL, &plan), PACKINFER_STATUS_INVALID_ARGUMENT, "outside the cache's 2 pages");
  d = case_desc(&c);
  d.num_qo_heads = 7;
  CHECK_STATUS(packinfer_plan_create(ctx, &d, NULL, &plan), PACKINFER_STATUS_INVALID_ARGUMENT, "num_qo_heads = 7");
  d = case_desc(&c);
  d.head_dim = 100;
  CHECK_STATUS(packinfer_plan_create(ctx, &d, NULL, &plan), PACKINFER_STATUS_UNSUPPORTED, "head_dim = 100");
  d = case_desc(&c);
  d.dtype = 7;
  CHECK_STATUS(packinfer_plan_create(ctx, &d, NULL, &plan), PACKINFER_STATUS_INVALID_ARGUMENT, "dtype = 7");
  d = case_desc(&c);
  PackinferPlanOptions po;
  packinfer_plan_options_default(&po);
  po.struct_size = 4;
  CHECK_STATUS(packinfer_plan_create(ctx, &d, &po, &plan), PACKINFER_STATUS_INVALID_ARGUMENT, "options->struct_size = 4");
  CHECK_STATUS(packinfer_plan_create(ctx, &d, NULL, NULL), PACKINFER_STATUS_INVALID_ARGUMENT, "out is a null pointer");
  CHECK(plan.bits == 0, "no failed call wrote a plan handle");

  /* Run arguments. */
  CHECK_STATUS(packinfer_plan_create(ctx, &d, NULL, &plan), PACKINFER_STATUS_OK, NULL);
  PackinferLaunch launch = {0};
  CHECK_STATUS(packinfer_launch_create(ctx, plan, NULL, NULL, &launch), PACKINFER_STATUS_OK, NULL);
  size_t n_out = (size_t)c.total_q * c.qo_heads * s.head_dim;
  float* out = malloc(n_out * sizeof(float));
  PackinferRunArgs a;
  memset(&a, 0, sizeof a);
  a.struct_size = sizeof a;
  a.q = c.q;
  a.o = out;
  packinfer_kv_layout_nhd(c.k, c.v, s.page_size, s.kv_heads, s.head_dim, &a.kv);
  a.q = NULL;
  CHECK_STATUS(packinfer_run(launch, &a), PACKINFER_STATUS_INVALID_ARGUMENT, "q is a null pointer");
  a.q = c.q;
  a.o_stride_head = -1;
  CHECK_STATUS(packinfer_run(launch, &a), PACKINFER_STATUS_INVALID_ARGUMENT, "o strides (0, -1)");
  a.o_stride_head = 0;
  a.struct_size = 16;
  CHECK_STATUS(packinfer_run(launch, &a), PACKINFER_STATUS_INVALID_ARGUMENT, "args->struct_size = 16");
  a.struct_size = sizeof a;
  CHECK_STATUS(packinfer_run(launch, NULL), PACKINFER_STATUS_INVALID_ARGUMENT, "args is a null pointer");
  CHECK_STATUS(packinfer_run(launch, &a), PACKINFER_STATUS_OK, NULL);
  PackinferPlanStats st;
  memset(&st, 0, sizeof st);
  st.struct_size = 3;
  CHECK_STATUS(packinfer_plan_stats(plan, &st), PACKINFER_STATUS_INVALID_ARGUMENT, "stats->struct_size = 3");
  PackinferContextInfo info;
  memset(&info, 0, sizeof info);
  CHECK_STATUS(packinfer_context_info(ctx, &info), PACKINFER_STATUS_INVALID_ARGUMENT, "info->struct_size = 0");

  /* Handles: null, of another kind, destroyed, destroyed twice; a launch outlives its context
   * and plan. */
  PackinferContext null_ctx = {0};
  CHECK_STATUS(packinfer_plan_create(null_ctx, &d, NULL, &plan), PACKINFER_STATUS_INVALID_HANDLE, "is null");
  PackinferContext wrong_kind = {plan.bits};
  CHECK_STATUS(packinfer_context_destroy(wrong_kind), PACKINFER_STATUS_INVALID_HANDLE, "is not a handle of this kind");
  CHECK_STATUS(packinfer_plan_destroy(plan), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_context_destroy(ctx), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_run(launch, &a), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_plan_destroy(plan), PACKINFER_STATUS_INVALID_HANDLE, "was destroyed");
  st.struct_size = sizeof st;
  CHECK_STATUS(packinfer_plan_stats(plan, &st), PACKINFER_STATUS_INVALID_HANDLE, "was destroyed");
  CHECK_STATUS(packinfer_context_destroy(ctx), PACKINFER_STATUS_INVALID_HANDLE, "was destroyed");
  CHECK_STATUS(packinfer_plan_create(ctx, &d, NULL, &plan), PACKINFER_STATUS_INVALID_HANDLE, "context handle");
  CHECK_STATUS(packinfer_launch_destroy(launch), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_run(launch, &a), PACKINFER_STATUS_INVALID_HANDLE, "launch handle");
  CHECK_STATUS(packinfer_launch_destroy(launch), PACKINFER_STATUS_INVALID_HANDLE, "was destroyed");
  bool done;
  CHECK_STATUS(packinfer_launch_query(launch, &done), PACKINFER_STATUS_INVALID_HANDLE, "was destroyed");
  CHECK_STATUS(packinfer_launch_wait(launch), PACKINFER_STATUS_INVALID_HANDLE, "was destroyed");
  free(out);
  case_free(&c);
}

/* ---- the managed KV pool: the library owns the cache ---- */

/* The pool's model and the test's own copy of what each sequence holds: K and V of every token
 * and layer, in token order ("gathered per sequence"), which the reference attends over. */
#define POOL_LAYERS 2
#define POOL_QO_HEADS 4
#define POOL_KV_HEADS 2
#define POOL_HEAD_DIM 32
#define POOL_PAGE 4
#define POOL_PAGES 40
#define POOL_MAX_TOK 32
#define POOL_ROW (POOL_KV_HEADS * POOL_HEAD_DIM)

typedef struct {
  uint64_t id;
  int len;
  float k[POOL_LAYERS][POOL_MAX_TOK * POOL_ROW];
  float v[POOL_LAYERS][POOL_MAX_TOK * POOL_ROW];
} SeqModel;

static PackinferPoolOptions pool_options(void) {
  PackinferPoolOptions o;
  CHECK_STATUS(packinfer_pool_options_default(&o), PACKINFER_STATUS_OK, NULL);
  CHECK(o.page_size == 16 && o.headroom_pages == 2 && o.causal && o.dtype == PACKINFER_DTYPE_BF16,
        "pool defaults: page_size %u, headroom %u, causal %d, dtype %u", o.page_size, o.headroom_pages, (int)o.causal, o.dtype);
  o.num_layers = POOL_LAYERS;
  o.num_qo_heads = POOL_QO_HEADS;
  o.num_kv_heads = POOL_KV_HEADS;
  o.head_dim = POOL_HEAD_DIM;
  o.dtype = PACKINFER_DTYPE_F32;
  o.page_size = POOL_PAGE;
  o.num_pages = POOL_PAGES;
  o.headroom_pages = 1;
  return o;
}

static PackinferPoolStats pool_stats(PackinferPool pool) {
  PackinferPoolStats s;
  memset(&s, 0, sizeof s);
  s.struct_size = sizeof s;
  CHECK_STATUS(packinfer_pool_stats(pool, &s), PACKINFER_STATUS_OK, NULL);
  return s;
}

static int same_stats(const PackinferPoolStats* a, const PackinferPoolStats* b) {
  return a->num_pages == b->num_pages && a->pages_used == b->pages_used && a->pages_free == b->pages_free &&
         a->num_sequences == b->num_sequences && a->tokens_logical == b->tokens_logical &&
         a->tokens_stored == b->tokens_stored && a->slots_reserved_unused == b->slots_reserved_unused &&
         a->step_read_bytes_shared == b->step_read_bytes_shared && a->step_read_bytes_unshared == b->step_read_bytes_unshared &&
         a->relayouts == b->relayouts && a->relayout_pages_moved == b->relayout_pages_moved &&
         a->relayout_bytes_moved == b->relayout_bytes_moved && a->cow_page_copies == b->cow_page_copies;
}

/* Appends n tokens to a sequence (pool and model) and checks the slots it gets back. */
static void pool_append(PackinferPool pool, SeqModel* m, uint32_t n) {
  int64_t slots[POOL_MAX_TOK];
  for (uint32_t i = 0; i < n; i++) slots[i] = -1;
  CHECK_STATUS(packinfer_pool_append(pool, m->id, n, slots, NULL), PACKINFER_STATUS_OK, NULL);
  for (uint32_t i = 0; i < n; i++) {
    CHECK(slots[i] >= 0 && slots[i] < (int64_t)POOL_PAGES * POOL_PAGE, "append: slot %lld of %u", (long long)slots[i], i);
    /* Consecutive tokens of one page have consecutive slots. */
    if (i > 0 && (m->len + (int)i) % POOL_PAGE != 0)
      CHECK(slots[i] == slots[i - 1] + 1, "append: slot %u = %lld follows %lld in the same page", i, (long long)slots[i], (long long)slots[i - 1]);
  }
  m->len += (int)n;
  uint32_t len = 0;
  CHECK_STATUS(packinfer_pool_sequence_length(pool, m->id, &len), PACKINFER_STATUS_OK, NULL);
  CHECK(len == (uint32_t)m->len, "sequence %llu has %u tokens, want %d", (unsigned long long)m->id, len, m->len);
}

/* A sequence forked from `parent` holds a copy of its first prefix_len tokens. */
static void pool_fork(PackinferPool pool, const SeqModel* parent, uint32_t prefix_len, SeqModel* child) {
  memset(child, 0, sizeof *child);
  CHECK_STATUS(packinfer_pool_fork(pool, parent->id, prefix_len, NULL, &child->id), PACKINFER_STATUS_OK, NULL);
  child->len = (int)prefix_len;
  for (int l = 0; l < POOL_LAYERS; l++) {
    memcpy(child->k[l], parent->k[l], sizeof(float) * prefix_len * POOL_ROW);
    memcpy(child->v[l], parent->v[l], sizeof(float) * prefix_len * POOL_ROW);
  }
}

/* Writes random K/V of every layer for the last counts[i] tokens of seqs[i] (one write_kv call
 * per layer, as an engine does) and records them in the models. */
static void pool_write(PackinferPool pool, SeqModel** seqs, const uint32_t* counts, uint32_t n) {
  uint64_t ids[8];
  uint32_t rows = 0;
  for (uint32_t i = 0; i < n; i++) { ids[i] = seqs[i]->id; rows += counts[i]; }
  float* k = malloc(sizeof(float) * rows * POOL_ROW);
  float* v = malloc(sizeof(float) * rows * POOL_ROW);
  for (int l = 0; l < POOL_LAYERS; l++) {
    for (uint32_t i = 0; i < rows * POOL_ROW; i++) { k[i] = uniform(-1, 1); v[i] = uniform(-1, 1); }
    PackinferKvSource src;
    memset(&src, 0, sizeof src);
    src.struct_size = sizeof src;
    src.k = k;
    src.v = v;
    src.num_rows = rows;
    src.num_kv_heads = POOL_KV_HEADS;
    src.head_dim = POOL_HEAD_DIM;
    src.dtype = PACKINFER_DTYPE_F32;
    CHECK_STATUS(packinfer_pool_write_kv(pool, (uint32_t)l, ids, counts, n, &src, NULL), PACKINFER_STATUS_OK, NULL);
    uint32_t row = 0;
    for (uint32_t i = 0; i < n; i++) {
      for (uint32_t t = 0; t < counts[i]; t++, row++) {
        int tok = seqs[i]->len - (int)counts[i] + (int)t;
        memcpy(&seqs[i]->k[l][tok * POOL_ROW], &k[row * POOL_ROW], sizeof(float) * POOL_ROW);
        memcpy(&seqs[i]->v[l][tok * POOL_ROW], &v[row * POOL_ROW], sizeof(float) * POOL_ROW);
      }
    }
  }
  free(k);
  free(v);
}

/* Plans the step from the pool (after an optional relayout), runs every layer with the pool's
 * layout and compares with attention over the models' K/V. */
static void pool_step(const char* name, PackinferContext ctx, PackinferPool pool, SeqModel** seqs, const uint32_t* q_lens,
                      uint32_t n, int relayout, int must_move) {
  uint64_t ids[8];
  int total_q = 0;
  for (uint32_t i = 0; i < n; i++) { ids[i] = seqs[i]->id; total_q += (int)q_lens[i]; }
  PackinferPlan plan = {0};
  CHECK_STATUS(packinfer_pool_plan_create(ctx, pool, ids, q_lens, n, NULL, &plan), PACKINFER_STATUS_OK, NULL);
  PackinferPlanStats ps;
  memset(&ps, 0, sizeof ps);
  ps.struct_size = sizeof ps;
  CHECK_STATUS(packinfer_plan_stats(plan, &ps), PACKINFER_STATUS_OK, NULL);
  CHECK(ps.num_requests == n, "%s: plan of %u requests, want %u", name, ps.num_requests, n);
  PackinferPoolStats st = pool_stats(pool);
  CHECK(st.step_read_bytes_shared > 0 && st.step_read_bytes_shared <= st.step_read_bytes_unshared,
        "%s: step reads %llu bytes shared, %llu unshared", name, (unsigned long long)st.step_read_bytes_shared,
        (unsigned long long)st.step_read_bytes_unshared);
  if (relayout) {
    PackinferRelayoutReport r;
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    CHECK_STATUS(packinfer_pool_relayout(pool, plan, ids, n, true, NULL, &r), PACKINFER_STATUS_OK, NULL);
    CHECK(r.groups >= 1 && r.groups == r.groups_in_place + r.groups_rebuilt + r.groups_no_room,
          "%s: relayout of %u groups: %u in place, %u rebuilt, %u no room", name, r.groups, r.groups_in_place, r.groups_rebuilt, r.groups_no_room);
    PackinferPoolStats after = pool_stats(pool);
    CHECK(after.relayout_pages_moved == st.relayout_pages_moved + r.pages_moved, "%s: stats count the %llu pages moved", name,
          (unsigned long long)r.pages_moved);
    CHECK(r.bytes_moved == r.pages_moved * POOL_PAGE * POOL_ROW * sizeof(float) * 2 * POOL_LAYERS,
          "%s: %llu bytes moved for %llu pages", name, (unsigned long long)r.bytes_moved, (unsigned long long)r.pages_moved);
    if (must_move)
      CHECK(r.groups_rebuilt >= 1 && r.pages_moved >= 1, "%s: relayout rebuilt %u groups, moved %llu pages; a scattered sequence must move",
            name, r.groups_rebuilt, (unsigned long long)r.pages_moved);
    /* The plan is stale once pages moved: plan again. */
    CHECK_STATUS(packinfer_plan_destroy(plan), PACKINFER_STATUS_OK, NULL);
    CHECK_STATUS(packinfer_pool_plan_create(ctx, pool, ids, q_lens, n, NULL, &plan), PACKINFER_STATUS_OK, NULL);
  }
  PackinferLaunch launch = {0};
  CHECK_STATUS(packinfer_launch_create(ctx, plan, NULL, NULL, &launch), PACKINFER_STATUS_OK, NULL);

  const size_t n_out = (size_t)total_q * POOL_QO_HEADS * POOL_HEAD_DIM;
  float* q = malloc(sizeof(float) * n_out);
  float* o = malloc(sizeof(float) * n_out);
  float* lse = malloc(sizeof(float) * (size_t)total_q * POOL_QO_HEADS);
  double scores[POOL_MAX_TOK];
  const double scale = 1.0 / sqrt((double)POOL_HEAD_DIM);
  for (int l = 0; l < POOL_LAYERS; l++) {
    for (size_t i = 0; i < n_out; i++) { q[i] = uniform(-2, 2); o[i] = NAN; }
    PackinferRunArgs a;
    memset(&a, 0, sizeof a);
    a.struct_size = sizeof a;
    a.q = q;
    a.o = o;
    a.lse = lse;
    CHECK_STATUS(packinfer_pool_kv_layout(pool, (uint32_t)l, &a.kv), PACKINFER_STATUS_OK, NULL);
    CHECK_STATUS(packinfer_run(launch, &a), PACKINFER_STATUS_OK, NULL);
    int tok = 0, bad = 0;
    for (uint32_t r = 0; r < n; r++) {
      const SeqModel* m = seqs[r];
      for (int i = 0; i < (int)q_lens[r]; i++, tok++) {
        int visible = m->len - (int)q_lens[r] + i + 1; /* causal, bottom-right aligned */
        for (int h = 0; h < POOL_QO_HEADS; h++) {
          int kvh = h / (POOL_QO_HEADS / POOL_KV_HEADS);
          const float* qv = &q[((size_t)tok * POOL_QO_HEADS + h) * POOL_HEAD_DIM];
          double mx = -INFINITY, z = 0.0;
          for (int j = 0; j < visible; j++) {
            double dot = 0.0;
            for (int e = 0; e < POOL_HEAD_DIM; e++) dot += (double)qv[e] * m->k[l][j * POOL_ROW + kvh * POOL_HEAD_DIM + e];
            scores[j] = dot * scale;
            if (scores[j] > mx) mx = scores[j];
          }
          for (int j = 0; j < visible; j++) z += exp(scores[j] - mx);
          for (int e = 0; e < POOL_HEAD_DIM; e++) {
            double want = 0.0;
            for (int j = 0; j < visible; j++) want += exp(scores[j] - mx) / z * m->v[l][j * POOL_ROW + kvh * POOL_HEAD_DIM + e];
            double got = o[((size_t)tok * POOL_QO_HEADS + h) * POOL_HEAD_DIM + e];
            if (!(fabs(got - want) <= 1e-4 * (1.0 + fabs(want))) && bad++ < 3)
              CHECK(0, "%s: layer %d, request %u (sequence %llu), query %d, head %d, dim %d: O = %.6f, reference %.6f", name, l, r,
                    (unsigned long long)m->id, i, h, e, got, want);
          }
          double want_lse = mx + log(z), got_lse = lse[(size_t)tok * POOL_QO_HEADS + h];
          if (!(fabs(got_lse - want_lse) <= 1e-4 * (1.0 + fabs(want_lse))) && bad++ < 3)
            CHECK(0, "%s: layer %d, request %u: LSE = %.6f, reference %.6f", name, l, r, got_lse, want_lse);
        }
      }
    }
    CHECK(bad == 0, "%s: layer %d matches the reference over the K/V written", name, l);
  }
  free(q); free(o); free(lse);
  CHECK_STATUS(packinfer_launch_destroy(launch), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_plan_destroy(plan), PACKINFER_STATUS_OK, NULL);
}

static void test_pool_flow(void) {
  PackinferContext ctx = cpu_context();
  PackinferPoolOptions po = pool_options();
  PackinferPool pool = {0};
  CHECK_STATUS(packinfer_pool_create(ctx, &po, &pool), PACKINFER_STATUS_OK, NULL);
  static SeqModel a, b, c, d, e;
  memset(&a, 0, sizeof a);
  memset(&b, 0, sizeof b);
  memset(&e, 0, sizeof e);

  /* The pool's memory is where kv_layout says, NHD: slot s of layer l's K is at k + s * row. */
  PackinferKvLayout layout0, layout1;
  CHECK_STATUS(packinfer_pool_kv_layout(pool, 0, &layout0), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_pool_kv_layout(pool, 1, &layout1), PACKINFER_STATUS_OK, NULL);
  CHECK(layout0.stride_dim == 1 && layout0.stride_head == POOL_HEAD_DIM && layout0.stride_token == POOL_ROW &&
            layout0.stride_page == POOL_PAGE * POOL_ROW && layout0.k != layout1.k && layout0.k != layout0.v,
        "pool layout strides (%lld, %lld, %lld, %lld)", (long long)layout0.stride_page, (long long)layout0.stride_token,
        (long long)layout0.stride_head, (long long)layout0.stride_dim);

  /* Step 1: two prompts, appended in turns so that A's pages are scattered ([0, 2, 3, 4]). */
  CHECK_STATUS(packinfer_pool_sequence_create(pool, &a.id), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_pool_sequence_create(pool, &b.id), PACKINFER_STATUS_OK, NULL);
  CHECK(a.id != 0 && b.id != 0 && a.id != b.id, "sequence ids %llu, %llu", (unsigned long long)a.id, (unsigned long long)b.id);
  int64_t first_slot_b = -1;
  pool_append(pool, &a, 4);
  CHECK_STATUS(packinfer_pool_append(pool, b.id, 1, &first_slot_b, NULL), PACKINFER_STATUS_OK, NULL);
  b.len = 1;
  pool_append(pool, &b, 3);
  pool_append(pool, &a, 9);
  pool_append(pool, &b, 3);
  {
    SeqModel* seqs[] = {&a, &b};
    const uint32_t counts[] = {13, 7};
    pool_write(pool, seqs, counts, 2);
    /* B's first token, in the slot append gave it, in layer 1's V. */
    const float* stored = (const float*)layout1.v + first_slot_b * layout1.stride_token;
    CHECK(memcmp(stored, b.v[1], sizeof(float) * POOL_ROW) == 0, "write_kv put B's first row in the slot append returned");
    pool_step("pool step 1 (prefill)", ctx, pool, seqs, counts, 2, 0, 0);
  }
  PackinferPoolStats st = pool_stats(pool);
  CHECK(st.num_pages == POOL_PAGES && st.num_sequences == 2 && st.tokens_logical == 20 && st.tokens_stored == 20 &&
            st.pages_used + st.pages_free == POOL_PAGES,
        "after step 1: %u pages (%u used, %u free), %u sequences, %llu tokens", st.num_pages, st.pages_used, st.pages_free,
        st.num_sequences, (unsigned long long)st.tokens_logical);

  /* Step 2: C shares A's first two pages; D's fork copies the partly covered third page. */
  pool_fork(pool, &a, 8, &c);
  pool_fork(pool, &a, 10, &d);
  st = pool_stats(pool);
  CHECK(st.tokens_logical == 38 && st.tokens_stored == 22 && st.cow_page_copies == 1,
        "after forks: %llu tokens logical, %llu stored, %llu copy-on-write copies", (unsigned long long)st.tokens_logical,
        (unsigned long long)st.tokens_stored, (unsigned long long)st.cow_page_copies);
  pool_append(pool, &a, 1);
  pool_append(pool, &b, 1);
  pool_append(pool, &c, 3);
  pool_append(pool, &d, 2);
  {
    SeqModel* seqs[] = {&a, &b, &c, &d};
    const uint32_t counts[] = {1, 1, 3, 2};
    pool_write(pool, seqs, counts, 4);
    /* C's shared tokens are A's: written once, by A, never through C. */
    const uint64_t cid[] = {c.id};
    const uint32_t eleven[] = {11};
    PackinferKvSource src = {sizeof src, a.k[0], a.v[0], 11, POOL_KV_HEADS, POOL_HEAD_DIM, PACKINFER_DTYPE_F32, 0};
    CHECK_STATUS(packinfer_pool_write_kv(pool, 0, cid, eleven, 1, &src, NULL), PACKINFER_STATUS_INVALID_ARGUMENT, "sequences share");
    pool_step("pool step 2 (forks, relayout)", ctx, pool, seqs, counts, 4, 1, 1);
  }

  /* Content hashes: E finds A's first two pages by their hashes. */
  const uint64_t hashes[] = {0x1111, 0x2222, 0x3333};
  CHECK_STATUS(packinfer_pool_register_page_hashes(pool, a.id, hashes, 2), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_pool_sequence_create(pool, &e.id), PACKINFER_STATUS_OK, NULL);
  uint32_t matched = 0;
  CHECK_STATUS(packinfer_pool_match_prefix(pool, e.id, hashes, 3, &matched), PACKINFER_STATUS_OK, NULL);
  CHECK(matched == 8, "match_prefix matched %u tokens, want 8", matched);
  e.len = (int)matched;
  for (int l = 0; l < POOL_LAYERS; l++) {
    memcpy(e.k[l], a.k[l], sizeof(float) * matched * POOL_ROW);
    memcpy(e.v[l], a.v[l], sizeof(float) * matched * POOL_ROW);
  }

  /* An append that does not fit: POOL_EXHAUSTED, nothing changed, and the pool still works. */
  PackinferPoolStats before = pool_stats(pool);
  CHECK_STATUS(packinfer_pool_append(pool, a.id, 1000, NULL, NULL), PACKINFER_STATUS_POOL_EXHAUSTED, "nothing was changed");
  PackinferPoolStats after = pool_stats(pool);
  CHECK(same_stats(&before, &after), "POOL_EXHAUSTED changed the pool's stats (%u -> %u pages used)", before.pages_used, after.pages_used);
  uint32_t len = 0;
  CHECK_STATUS(packinfer_pool_sequence_length(pool, a.id, &len), PACKINFER_STATUS_OK, NULL);
  CHECK(len == (uint32_t)a.len, "A has %u tokens after a failed append, want %d", len, a.len);

  /* Step 3: B is done; D goes back a token and takes another path; E continues A's prefix. */
  CHECK_STATUS(packinfer_pool_release(pool, b.id), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_pool_truncate(pool, d.id, 9), PACKINFER_STATUS_OK, NULL);
  d.len = 9;
  pool_append(pool, &a, 1);
  pool_append(pool, &d, 1);
  pool_append(pool, &e, 2);
  {
    SeqModel* seqs[] = {&a, &d, &e, &c};
    const uint32_t counts[] = {1, 1, 2, 0};
    pool_write(pool, seqs, counts, 3);
    const uint32_t q_lens[] = {1, 1, 2, 1};
    pool_step("pool step 3 (release, truncate, prefix match)", ctx, pool, seqs, q_lens, 4, 1, 0);
  }

  /* Bad sequence ids: a never-created one, a released one. */
  const uint64_t bad_ids[] = {a.id, b.id};
  const uint32_t ones[] = {1, 1};
  PackinferPlan plan = {0};
  CHECK_STATUS(packinfer_pool_sequence_length(pool, 9999, &len), PACKINFER_STATUS_INVALID_ARGUMENT, "sequence id 9999 is not a live sequence");
  CHECK_STATUS(packinfer_pool_append(pool, b.id, 1, NULL, NULL), PACKINFER_STATUS_INVALID_ARGUMENT, "is not a live sequence");
  CHECK_STATUS(packinfer_pool_release(pool, b.id), PACKINFER_STATUS_INVALID_ARGUMENT, "is not a live sequence");
  uint64_t child = 0;
  CHECK_STATUS(packinfer_pool_fork(pool, 0, 0, NULL, &child), PACKINFER_STATUS_INVALID_ARGUMENT, "sequence id 0");
  CHECK_STATUS(packinfer_pool_plan_create(ctx, pool, bad_ids, ones, 2, NULL, &plan), PACKINFER_STATUS_INVALID_ARGUMENT, "is not a live sequence");
  CHECK(plan.bits == 0, "a failed pool plan wrote a handle");
  PackinferKvSource src = {sizeof src, a.k[0], a.v[0], 2, POOL_KV_HEADS, POOL_HEAD_DIM, PACKINFER_DTYPE_F32, 0};
  CHECK_STATUS(packinfer_pool_write_kv(pool, 0, bad_ids, ones, 2, &src, NULL), PACKINFER_STATUS_INVALID_ARGUMENT, "is not a live sequence");
  /* Other arguments: the layer, the source's dtype, options. */
  CHECK_STATUS(packinfer_pool_kv_layout(pool, POOL_LAYERS, &layout0), PACKINFER_STATUS_INVALID_ARGUMENT, "layer = 2");
  src.dtype = PACKINFER_DTYPE_BF16;
  CHECK_STATUS(packinfer_pool_write_kv(pool, 0, bad_ids, ones, 1, &src, NULL), PACKINFER_STATUS_INVALID_ARGUMENT, "src->dtype");
  PackinferPool other = {0};
  po.dtype = 7;
  CHECK_STATUS(packinfer_pool_create(ctx, &po, &other), PACKINFER_STATUS_INVALID_ARGUMENT, "options->dtype = 7");
  po = pool_options();
  po.struct_size = 8;
  CHECK_STATUS(packinfer_pool_create(ctx, &po, &other), PACKINFER_STATUS_INVALID_ARGUMENT, "options->struct_size = 8");

  /* Use after destroy. */
  CHECK_STATUS(packinfer_pool_destroy(pool), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_pool_stats(pool, &st), PACKINFER_STATUS_INVALID_HANDLE, "was destroyed");
  CHECK_STATUS(packinfer_pool_sequence_create(pool, &child), PACKINFER_STATUS_INVALID_HANDLE, "was destroyed");
  CHECK_STATUS(packinfer_pool_append(pool, a.id, 1, NULL, NULL), PACKINFER_STATUS_INVALID_HANDLE, "was destroyed");
  CHECK_STATUS(packinfer_pool_plan_create(ctx, pool, bad_ids, ones, 1, NULL, &plan), PACKINFER_STATUS_INVALID_HANDLE, "pool handle");
  CHECK_STATUS(packinfer_pool_destroy(pool), PACKINFER_STATUS_INVALID_HANDLE, "was destroyed");
  PackinferPool null_pool = {0};
  CHECK_STATUS(packinfer_pool_kv_layout(null_pool, 0, &layout0), PACKINFER_STATUS_INVALID_HANDLE, "is null");
  CHECK_STATUS(packinfer_context_destroy(ctx), PACKINFER_STATUS_OK, NULL);
}

/* The calls the CUDA backend added (precompile, calibrate, capacity launches, update), pinned down
 * on the CPU backend: what each does there, and each bad argument. */
static void test_gpu_calls_on_cpu(void) {
  PackinferContext ctx = cpu_context();
  CHECK_STATUS(packinfer_context_precompile(ctx), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_context_precompile(ctx), PACKINFER_STATUS_OK, NULL); /* idempotent */
  CHECK_STATUS(packinfer_context_calibrate(ctx), PACKINFER_STATUS_UNSUPPORTED,
               "packinfer_context_calibrate: only the CUDA backend calibrates its cost model");

  /* Capacity launches compute what ordinary ones do: all-zero (the first plan's counts), larger
   * than the plan, and smaller than the plan (the launch grows it to the plan's own counts: not
   * an error, on either backend). */
  Spec s = k_mixed;
  s.dtype = PACKINFER_DTYPE_F32;
  PackinferLaunchCapacity cap;
  memset(&cap, 0, sizeof cap);
  cap.struct_size = sizeof cap;
  flow("capacity launch, all fields 0", &s, &cap);
  cap.max_work_items = cap.max_row_segments = cap.max_kv_chunks = cap.max_requests = 1000;
  cap.max_pages = cap.max_merge_rows = cap.max_merge_slots = cap.max_groups = cap.max_partial_slots = 1000;
  s.dtype = PACKINFER_DTYPE_BF16;
  flow("capacity launch, room for 1000 of everything", &s, &cap);
  memset(&cap, 0, sizeof cap);
  cap.struct_size = sizeof cap;
  cap.max_work_items = cap.max_requests = cap.max_pages = 1;
  s.dtype = PACKINFER_DTYPE_F16;
  flow("capacity launch, capacity below the plan's counts", &s, &cap);

  /* Bad arguments of packinfer_launch_create_with_capacity. */
  Case c;
  case_build(&c, &s);
  PackinferBatchDesc d = case_desc(&c);
  PackinferPlan plan = {0}, bigger = {0};
  CHECK_STATUS(packinfer_plan_create(ctx, &d, NULL, &plan), PACKINFER_STATUS_OK, NULL);
  memset(&cap, 0, sizeof cap);
  cap.struct_size = 8;
  PackinferLaunch launch = {0};
  char want[160];
  snprintf(want, sizeof want,
           "packinfer_launch_create_with_capacity: capacity->struct_size = 8 is not the size of any version of "
           "this struct (this library's is %zu",
           sizeof cap);
  CHECK_STATUS(packinfer_launch_create_with_capacity(ctx, plan, NULL, &cap, NULL, &launch), PACKINFER_STATUS_INVALID_ARGUMENT, want);
  cap.struct_size = sizeof cap + 5000;
  snprintf(want, sizeof want, "capacity->struct_size = %zu is not", sizeof cap + 5000);
  CHECK_STATUS(packinfer_launch_create_with_capacity(ctx, plan, NULL, &cap, NULL, &launch), PACKINFER_STATUS_INVALID_ARGUMENT, want);
  CHECK(launch.bits == 0, "a failed capacity launch wrote a handle");
  cap.struct_size = sizeof cap;
  CHECK_STATUS(packinfer_launch_create_with_capacity(ctx, plan, NULL, NULL, NULL, &launch), PACKINFER_STATUS_INVALID_ARGUMENT,
               "capacity is a null pointer");
  CHECK_STATUS(packinfer_launch_create_with_capacity(ctx, plan, NULL, &cap, NULL, NULL), PACKINFER_STATUS_INVALID_ARGUMENT,
               "out is a null pointer");
  PackinferLaunchOptions lo = {4, NULL, 0};
  CHECK_STATUS(packinfer_launch_create_with_capacity(ctx, plan, &lo, &cap, NULL, &launch), PACKINFER_STATUS_INVALID_ARGUMENT,
               "options->struct_size = 4");
  lo.struct_size = sizeof lo;
  lo.scratch_bytes = 1; /* a size without a buffer */
  /* Deterministic 64-key splits: a plan with split partials, which needs scratch. */
  PackinferPlanOptions split_opts;
  CHECK_STATUS(packinfer_plan_options_default(&split_opts), PACKINFER_STATUS_OK, NULL);
  split_opts.flags = PACKINFER_PLAN_FLAGS_DETERMINISTIC;
  split_opts.split_keys = 64;
  PackinferPlan split = {0};
  CHECK_STATUS(packinfer_plan_create(ctx, &d, &split_opts, &split), PACKINFER_STATUS_OK, NULL);
  PackinferPlanStats st;
  memset(&st, 0, sizeof st);
  st.struct_size = sizeof st;
  CHECK_STATUS(packinfer_plan_stats(split, &st), PACKINFER_STATUS_OK, NULL);
  CHECK(st.scratch_bytes > 0 && st.num_split_requests > 0, "the 64-key plan splits (%u split requests, %llu scratch bytes)",
        st.num_split_requests, (unsigned long long)st.scratch_bytes);
  CHECK_STATUS(packinfer_launch_create_with_capacity(ctx, split, &lo, &cap, NULL, &launch), PACKINFER_STATUS_INVALID_ARGUMENT,
               "scratch_bytes = 1 is smaller than");
  CHECK_STATUS(packinfer_plan_destroy(split), PACKINFER_STATUS_OK, NULL);
  PackinferContext null_ctx = {0};
  PackinferPlan null_plan = {0};
  CHECK_STATUS(packinfer_launch_create_with_capacity(null_ctx, plan, NULL, &cap, NULL, &launch), PACKINFER_STATUS_INVALID_HANDLE, "is null");
  CHECK_STATUS(packinfer_launch_create_with_capacity(ctx, null_plan, NULL, &cap, NULL, &launch), PACKINFER_STATUS_INVALID_HANDLE, "is null");
  CHECK(launch.bits == 0, "a failed capacity launch wrote a handle");
  CHECK_STATUS(packinfer_context_precompile(null_ctx), PACKINFER_STATUS_INVALID_HANDLE, "packinfer_context_precompile: ");
  CHECK_STATUS(packinfer_context_calibrate(null_ctx), PACKINFER_STATUS_INVALID_HANDLE, "packinfer_context_calibrate: ");

  /* packinfer_launch_update on the CPU: any plan within the launch's capacity (a launch without
   * one holds its own plan's counts), INVALID_ARGUMENT naming the count over it; handles first. */
  CHECK_STATUS(packinfer_launch_create_with_capacity(ctx, plan, NULL, &cap, NULL, &launch), PACKINFER_STATUS_OK, NULL);
  PackinferLaunch plain = {0};
  CHECK_STATUS(packinfer_launch_create(ctx, plan, NULL, NULL, &plain), PACKINFER_STATUS_OK, NULL);
  Spec big = k_mixed;
  big.n = 6;
  big.q_len[4] = 9; big.kv_len[4] = 300;
  big.q_len[5] = 1; big.kv_len[5] = 500;
  big.dtype = PACKINFER_DTYPE_F16;
  Case cb;
  case_build(&cb, &big);
  PackinferBatchDesc db = case_desc(&cb);
  CHECK_STATUS(packinfer_plan_create(ctx, &db, NULL, &bigger), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_launch_update(launch, plan, NULL), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_launch_update(launch, bigger, NULL), PACKINFER_STATUS_INVALID_ARGUMENT,
               "packinfer_launch_update: the plan has ");
  CHECK_STATUS(packinfer_launch_update(launch, bigger, NULL), PACKINFER_STATUS_INVALID_ARGUMENT,
               "but the launch was created with capacity for");
  CHECK_STATUS(packinfer_launch_update(plain, plan, NULL), PACKINFER_STATUS_OK, NULL);
  PackinferLaunch null_launch = {0};
  CHECK_STATUS(packinfer_launch_update(null_launch, plan, NULL), PACKINFER_STATUS_INVALID_HANDLE, "packinfer_launch_update: ");
  CHECK_STATUS(packinfer_launch_update(launch, null_plan, NULL), PACKINFER_STATUS_INVALID_HANDLE, "packinfer_launch_update: ");

  /* Destroyed handles: the plan, then the context (the launch outlives both), then the launch. */
  CHECK_STATUS(packinfer_plan_destroy(bigger), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_launch_update(launch, bigger, NULL), PACKINFER_STATUS_INVALID_HANDLE, "was destroyed");
  CHECK_STATUS(packinfer_launch_create_with_capacity(ctx, bigger, NULL, &cap, NULL, &plain), PACKINFER_STATUS_INVALID_HANDLE, "was destroyed");
  CHECK_STATUS(packinfer_context_destroy(ctx), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_context_precompile(ctx), PACKINFER_STATUS_INVALID_HANDLE, "was destroyed");
  CHECK_STATUS(packinfer_context_calibrate(ctx), PACKINFER_STATUS_INVALID_HANDLE, "was destroyed");
  CHECK_STATUS(packinfer_launch_create_with_capacity(ctx, plan, NULL, &cap, NULL, &launch), PACKINFER_STATUS_INVALID_HANDLE, "was destroyed");
  CHECK_STATUS(packinfer_launch_update(launch, plan, NULL), PACKINFER_STATUS_OK, NULL);  /* the launch outlives its context */
  CHECK_STATUS(packinfer_launch_destroy(launch), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_launch_update(launch, plan, NULL), PACKINFER_STATUS_INVALID_HANDLE, "was destroyed");
  CHECK_STATUS(packinfer_launch_destroy(plain), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_plan_destroy(plan), PACKINFER_STATUS_OK, NULL);
  case_free(&c);
  case_free(&cb);
}

/* ---- GPU only: `packinfer_c_api_test --gpu` (ctest c.api.gpu) ----
 * A CUDA context where one is usable, its info, and a plan and a launch for a bf16 batch (the
 * launch compiles and loads the kernels). Without a usable device the program exits with
 * SKIP_RETURN_CODE, which ctest reports as skipped, not passed; PACKINFER_REQUIRE_GPU=1 makes that
 * a failure. */
#define SKIP_RETURN_CODE 77

static int test_cuda_context(void) {
  PackinferContextOptions o;
  PackinferContext ctx = {0};
  CHECK_STATUS(packinfer_context_options_default(&o), PACKINFER_STATUS_OK, NULL);
  o.backend = PACKINFER_BACKEND_CUDA;
  PackinferStatus st = packinfer_context_create(&o, &ctx);
  if (st == PACKINFER_STATUS_NO_DEVICE || st == PACKINFER_STATUS_UNSUPPORTED) {
    const char* required = getenv("PACKINFER_REQUIRE_GPU");
    if (required != NULL && strcmp(required, "1") == 0) {
      fprintf(stderr, "FAILED: PACKINFER_REQUIRE_GPU=1 but CUDA is unusable here: %s\n", packinfer_last_error());
      return 1;
    }
    printf("skipped: no usable CUDA device here: %s\n", packinfer_last_error());
    return SKIP_RETURN_CODE;
  }
  CHECK_STATUS(st, PACKINFER_STATUS_OK, NULL);
  if (st != PACKINFER_STATUS_OK) return 1;
  PackinferContextInfo info;
  memset(&info, 0, sizeof info);
  info.struct_size = sizeof info;
  CHECK_STATUS(packinfer_context_info(ctx, &info), PACKINFER_STATUS_OK, NULL);
  CHECK(info.backend == PACKINFER_BACKEND_CUDA, "info.backend = %u", (unsigned)info.backend);
  CHECK(info.device_name[0] != 0, "the CUDA context has no device name");
  Case c;
  Spec s = k_mixed;
  s.dtype = PACKINFER_DTYPE_BF16;
  s.head_dim = 128;
  case_build(&c, &s);
  PackinferBatchDesc d = case_desc(&c);
  PackinferPlan plan = {0};
  PackinferLaunch launch = {0};
  CHECK_STATUS(packinfer_plan_create(ctx, &d, NULL, &plan), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_launch_create(ctx, plan, NULL, NULL, &launch), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_launch_destroy(launch), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_plan_destroy(plan), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_context_destroy(ctx), PACKINFER_STATUS_OK, NULL);
  case_free(&c);
  printf("c_api_test --gpu (%s): %d checks, %d failed\n", info.device_name, g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}

/* The scheduler handle from C: three sequences, a prefill step then decodes, each step planned by
 * the scheduler (which chooses the capacity, runs the trigger and may relayout), launched, run on
 * every layer and recorded; then its totals and bad arguments. */
static void test_scheduler(void) {
  PackinferContext ctx = cpu_context();
  PackinferPoolOptions po = pool_options();
  PackinferPool pool = {0};
  CHECK_STATUS(packinfer_pool_create(ctx, &po, &pool), PACKINFER_STATUS_OK, NULL);
  PackinferSchedulerOptions so;
  so.struct_size = sizeof so;
  CHECK_STATUS(packinfer_scheduler_options_default(&so), PACKINFER_STATUS_OK, NULL);
  CHECK(so.flags == 0 && so.horizon_steps == 32 && so.capacity_factor == 1.0 && so.contiguous_gain < 0.0,
        "scheduler defaults: flags %u, horizon %u, factor %g, gain %g", so.flags, so.horizon_steps, so.capacity_factor,
        so.contiguous_gain);
  PackinferScheduler sched = {0};
  CHECK_STATUS(packinfer_scheduler_create(pool, &so, &sched), PACKINFER_STATUS_OK, NULL);
  uint64_t ids[3];
  for (int i = 0; i < 3; i++) CHECK_STATUS(packinfer_pool_sequence_create(pool, &ids[i]), PACKINFER_STATUS_OK, NULL);
  static float q[8 * POOL_QO_HEADS * POOL_HEAD_DIM], o[8 * POOL_QO_HEADS * POOL_HEAD_DIM];
  for (size_t i = 0; i < sizeof q / sizeof q[0]; i++) q[i] = 0.25f;
  for (int step = 0; step < 6; step++) {
    const uint32_t counts[3] = {step == 0 ? 3u : 1u, step == 0 ? 2u : 1u, step == 0 ? 3u : 1u};
    for (int i = 0; i < 3; i++) CHECK_STATUS(packinfer_pool_append(pool, ids[i], counts[i], NULL, NULL), PACKINFER_STATUS_OK, NULL);
    PackinferPlan plan = {0};
    PackinferSchedulerStep st;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    CHECK_STATUS(packinfer_scheduler_plan(sched, ctx, ids, counts, 3, NULL, NULL, &plan, &st), PACKINFER_STATUS_OK, NULL);
    CHECK(st.capacity > 0.0 && (step > 0 || st.regrouped), "step %d: capacity %g, regrouped %d", step, st.capacity, (int)st.regrouped);
    PackinferLaunch launch = {0};
    CHECK_STATUS(packinfer_launch_create(ctx, plan, NULL, NULL, &launch), PACKINFER_STATUS_OK, NULL);
    for (uint32_t l = 0; l < POOL_LAYERS; l++) {
      PackinferRunArgs args;
      memset(&args, 0, sizeof args);
      args.struct_size = sizeof args;
      args.q = q;
      args.o = o;
      CHECK_STATUS(packinfer_pool_kv_layout(pool, l, &args.kv), PACKINFER_STATUS_OK, NULL);
      CHECK_STATUS(packinfer_run(launch, &args), PACKINFER_STATUS_OK, NULL);
    }
    PackinferStepTimes t = {sizeof t, 1e-4, 0.0};
    CHECK_STATUS(packinfer_scheduler_record(sched, &t), PACKINFER_STATUS_OK, NULL);
    CHECK_STATUS(packinfer_launch_destroy(launch), PACKINFER_STATUS_OK, NULL);
    CHECK_STATUS(packinfer_plan_destroy(plan), PACKINFER_STATUS_OK, NULL);
  }
  PackinferSchedulerStats stats;
  memset(&stats, 0, sizeof stats);
  stats.struct_size = sizeof stats;
  CHECK_STATUS(packinfer_scheduler_stats(sched, &stats), PACKINFER_STATUS_OK, NULL);
  CHECK(stats.steps == 6 && stats.regroups >= 1 && stats.attention_seconds > 5e-4 && stats.capacity_searches == 1,
        "scheduler stats: %llu steps, %llu regroups, %g s", (unsigned long long)stats.steps, (unsigned long long)stats.regroups,
        stats.attention_seconds);
  PackinferStepTimes t = {sizeof t, 1e-4, 0.0};
  CHECK_STATUS(packinfer_scheduler_record(sched, &t), PACKINFER_STATUS_INVALID_ARGUMENT, "record without a step");
  so.horizon_steps = 0;
  PackinferScheduler bad = {0};
  CHECK_STATUS(packinfer_scheduler_create(pool, &so, &bad), PACKINFER_STATUS_INVALID_ARGUMENT, "options->horizon_steps = 0");
  CHECK_STATUS(packinfer_scheduler_destroy(sched), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_scheduler_destroy(sched), PACKINFER_STATUS_INVALID_HANDLE, "scheduler handle");
  CHECK_STATUS(packinfer_pool_destroy(pool), PACKINFER_STATUS_OK, NULL);
  CHECK_STATUS(packinfer_context_destroy(ctx), PACKINFER_STATUS_OK, NULL);
}

int main(int argc, char** argv) {
  if (argc == 2 && strcmp(argv[1], "--gpu") == 0) return test_cuda_context();
  test_version();
  test_flows();
  test_errors();
  test_pool_flow();
  test_scheduler();
  test_gpu_calls_on_cpu();
  printf("c_api_test: %d checks, %d failed\n", g_checks, g_failures);
  return g_failures == 0 && g_checks > 0 ? 0 : 1;
}
