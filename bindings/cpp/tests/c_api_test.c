/* Tests of the raw C API (include/packinfer.h) on the CPU backend: full flows compared against a
 * naive double-precision attention written here, in f32, f16 and bf16, and the error paths
 * (status and message). Plain C11, no framework: each CHECK that fails prints where and why, and
 * the program exits non-zero if any did. */
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
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

/* Plan, launch, run, compare against the reference, destroy: the whole flow of one step. */
static void flow(const char* name, const Spec* spec) {
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
  CHECK_STATUS(packinfer_launch_create(ctx, plan, NULL, NULL, &launch), PACKINFER_STATUS_OK, NULL);
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
  flow("f32 causal mixed batch, GQA 4", &s);
  s.dtype = PACKINFER_DTYPE_F16;
  s.causal = 0;
  s.head_dim = 128;
  flow("f16 non-causal, head_dim 128", &s);
  Spec p = {
      .n = 3, .q_len = {1, 1, 3}, .kv_len = {40, 45, 33},
      .page_size = 1, .kv_heads = 1, .group = 8, .head_dim = 64, .dtype = PACKINFER_DTYPE_BF16, .causal = 1,
      .share_count = 3, .share_len = 32, .share_members = {0, 1, 2},
  };
  flow("bf16 page size 1, shared 32-token prefix", &p);
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
  d.struct_size = sizeof d - 8;
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
  CHECK_STATUS(packinfer_plan_create(ctx, &d, NULL, &plan), PACKINFER_STATUS_UNSUPPORTED, "dtype = 7");
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

int main(void) {
  test_version();
  test_flows();
  test_errors();
  printf("c_api_test: %d checks, %d failed\n", g_checks, g_failures);
  return g_failures == 0 && g_checks > 0 ? 0 : 1;
}
