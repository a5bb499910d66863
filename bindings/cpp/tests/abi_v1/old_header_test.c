/* A program built against an older header (abi_v1/packinfer.h: PackinferPlanStats without the
 * fields added since ABI 1's first release) runs against the current library: its structs are
 * accepted, its stats are filled as far as its struct reaches and not a byte beyond, and a plan
 * computes the same attention as ever. */
#include "packinfer.h" /* the reduced copy CMake writes into the build tree, found first */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

#define CHECK(cond, ...)                                         \
  do {                                                           \
    if (!(cond)) {                                               \
      fprintf(stderr, "FAILED %s:%d: ", __FILE__, __LINE__);     \
      fprintf(stderr, __VA_ARGS__);                              \
      fprintf(stderr, " (last error: %s)\n", packinfer_last_error()); \
      failures++;                                                \
    }                                                            \
  } while (0)

int main(void) {
  CHECK(packinfer_abi_version() == PACKINFER_ABI_VERSION, "ABI %u, header %u", packinfer_abi_version(),
        (unsigned)PACKINFER_ABI_VERSION);

  PackinferContextOptions copt;
  packinfer_context_options_default(&copt);
  copt.backend = PACKINFER_BACKEND_CPU;
  copt.num_threads = 1;
  PackinferContext ctx;
  CHECK(packinfer_context_create(&copt, &ctx) == PACKINFER_STATUS_OK, "context");

  /* One request: 3 queries over 5 keys of one KV head, f32, head_dim 8, page size 4. */
  enum { D = 8, Q = 3, K = 5 };
  int32_t qo[2] = {0, Q}, kv[2] = {0, 2}, pages[2] = {1, 0}, last[1] = {K - 4};
  PackinferBatchDesc b;
  memset(&b, 0, sizeof b);
  b.struct_size = sizeof b;
  b.batch_size = 1;
  b.qo_indptr = qo;
  b.kv_indptr = kv;
  b.kv_page_indices = pages;
  b.kv_last_page_len = last;
  b.page_size = 4;
  b.num_pages = 2;
  b.num_qo_heads = 1;
  b.num_kv_heads = 1;
  b.head_dim = D;
  b.dtype = PACKINFER_DTYPE_F32;
  b.causal = true;
  PackinferPlan plan;
  CHECK(packinfer_plan_create(ctx, &b, NULL, &plan) == PACKINFER_STATUS_OK, "plan");

  /* The old stats struct, followed by a canary the library must not touch. */
  struct {
    PackinferPlanStats stats;
    unsigned char canary[64];
  } s;
  memset(&s, 0xAB, sizeof s);
  s.stats.struct_size = sizeof s.stats;
  CHECK(packinfer_plan_stats(plan, &s.stats) == PACKINFER_STATUS_OK, "stats");
  CHECK(s.stats.struct_size == sizeof s.stats, "struct_size kept: %zu", s.stats.struct_size);
  CHECK(s.stats.num_requests == 1, "num_requests = %u", s.stats.num_requests);
  CHECK(s.stats.num_work_items >= 1, "num_work_items = %u", s.stats.num_work_items);
  for (size_t i = 0; i < sizeof s.canary; i++) CHECK(s.canary[i] == 0xAB, "canary byte %zu written", i);

  /* Attention through the old structs: keys/values [page][token][dim], query all ones. */
  float kc[2 * 4 * D], vc[2 * 4 * D], q[Q * D], o[Q * D];
  for (int i = 0; i < 2 * 4 * D; i++) {
    kc[i] = (float)((i * 7) % 11) / 11.0f;
    vc[i] = (float)((i * 5) % 13) / 13.0f;
  }
  for (int i = 0; i < Q * D; i++) q[i] = 1.0f, o[i] = NAN;
  PackinferLaunch launch;
  CHECK(packinfer_launch_create(ctx, plan, NULL, NULL, &launch) == PACKINFER_STATUS_OK, "launch");
  PackinferRunArgs a;
  memset(&a, 0, sizeof a);
  a.struct_size = sizeof a;
  a.q = q;
  a.o = o;
  packinfer_kv_layout_nhd(kc, vc, 4, 1, D, &a.kv);
  CHECK(packinfer_run(launch, &a) == PACKINFER_STATUS_OK, "run");
  /* Reference: query t sees keys 0..=K-Q+t (bottom-right causal); key k is in page pages[k/4]. */
  double worst = 0;
  for (int t = 0; t < Q; t++) {
    double w[K], m = -1e30, l = 0;
    int visible = K - Q + t + 1;
    for (int k = 0; k < visible; k++) {
      const float *row = kc + (pages[k / 4] * 4 + k % 4) * D;
      double dot = 0;
      for (int d = 0; d < D; d++) dot += row[d];
      w[k] = dot / sqrt((double)D);
      if (w[k] > m) m = w[k];
    }
    for (int k = 0; k < visible; k++) l += (w[k] = exp(w[k] - m));
    for (int d = 0; d < D; d++) {
      double want = 0;
      for (int k = 0; k < visible; k++) want += w[k] / l * vc[(pages[k / 4] * 4 + k % 4) * D + d];
      double err = fabs(want - o[t * D + d]);
      if (!(err <= worst)) worst = err;
    }
  }
  CHECK(worst < 1e-5, "attention differs from the reference by %g", worst);

  packinfer_launch_destroy(launch);
  packinfer_plan_destroy(plan);
  packinfer_context_destroy(ctx);
  if (failures) {
    fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  printf("old header: 1 passed, 0 failed\n");
  return 0;
}
