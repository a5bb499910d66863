/* One engine step with PackInfer's C API (include/packinfer.h), for engines written in C:
 *
 *   start-up   packinfer_context_create
 *   each step  packinfer_plan_create (the schedule) + packinfer_launch_create (bound to the device)
 *   each layer packinfer_run
 *
 * Every call returns a PackinferStatus; packinfer_last_error() says what was wrong (on this
 * thread). Runs on the CPU backend with host buffers; on CUDA the same calls take device
 * pointers and a CUstream. The C++ wrapper (bindings/cpp/include/packinfer.hpp) does the same
 * with RAII and exceptions: see examples/cpp/engine_step.cpp. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "packinfer.h"

#define CHECK(call)                                                                            \
  do {                                                                                         \
    PackinferStatus s_ = (call);                                                               \
    if (s_ != PACKINFER_STATUS_OK) {                                                           \
      fprintf(stderr, "%s failed: %s: %s\n", #call, packinfer_status_string(s_), packinfer_last_error()); \
      exit(1);                                                                                 \
    }                                                                                          \
  } while (0)

int main(void) {
  /* Start-up: a context on the CPU (PACKINFER_BACKEND_AUTO picks CUDA where it works). */
  PackinferContextOptions copts;
  CHECK(packinfer_context_options_default(&copts));
  copts.backend = PACKINFER_BACKEND_CPU;
  PackinferContext ctx;
  CHECK(packinfer_context_create(&copts, &ctx));

  /* One step: two decodes sharing a 16-token prompt (page 5 starts both page lists) and one
   * 20-token prefill chunk. 4 query heads over 1 KV head, head_dim 64, f32 (CPU only; the GPU
   * takes f16 and bf16), pages of 16 tokens stored NHD. */
  enum { PAGE = 16, PAGES = 8, QO_HEADS = 4, KV_HEADS = 1, DIM = 64 };
  const int32_t qo_indptr[] = {0, 1, 2, 22};
  const int32_t kv_indptr[] = {0, 2, 4, 6};
  const int32_t kv_page_indices[] = {5, 0, 5, 3, 6, 7};
  const int32_t kv_last_page_len[] = {4, 9, 4}; /* 20, 25 and 20 keys */
  const int32_t members[] = {0, 1};
  PackinferPrefixGroup shared = {16, 2, members};

  PackinferBatchDesc batch = {0};
  batch.struct_size = sizeof batch;
  batch.batch_size = 3;
  batch.qo_indptr = qo_indptr;
  batch.kv_indptr = kv_indptr;
  batch.kv_page_indices = kv_page_indices;
  batch.kv_last_page_len = kv_last_page_len;
  batch.page_size = PAGE;
  batch.num_pages = PAGES;
  batch.num_qo_heads = QO_HEADS;
  batch.num_kv_heads = KV_HEADS;
  batch.head_dim = DIM;
  batch.dtype = PACKINFER_DTYPE_F32;
  batch.causal = true;
  batch.num_prefix_groups = 1;
  batch.prefix_groups = &shared;

  PackinferPlan plan;
  CHECK(packinfer_plan_create(ctx, &batch, NULL, &plan)); /* the arrays are copied here */
  PackinferPlanStats st = {0};
  st.struct_size = sizeof st;
  CHECK(packinfer_plan_stats(plan, &st));
  printf("plan: %u requests -> %u groups, %u work items, tile utilization %.1f%%, scratch %llu bytes\n",
         st.num_requests, st.num_groups, st.num_work_items, 100.0 * st.tile_utilization,
         (unsigned long long)st.scratch_bytes);

  PackinferLaunch launch;
  CHECK(packinfer_launch_create(ctx, plan, NULL, /*stream=*/NULL, &launch));

  /* Each layer: that layer's Q, KV cache and output. */
  const size_t total_q = 22, q_elems = total_q * QO_HEADS * DIM, kv_elems = (size_t)PAGES * PAGE * KV_HEADS * DIM;
  float* q = malloc(q_elems * sizeof(float));
  float* k = malloc(kv_elems * sizeof(float));
  float* v = malloc(kv_elems * sizeof(float));
  float* o = malloc(q_elems * sizeof(float));
  float* lse = malloc(total_q * QO_HEADS * sizeof(float));
  for (int layer = 0; layer < 2; layer++) {
    for (size_t i = 0; i < q_elems; i++) q[i] = sinf(0.37f * (float)i + (float)layer);
    for (size_t i = 0; i < kv_elems; i++) k[i] = cosf(0.11f * (float)i - (float)layer);
    for (size_t i = 0; i < kv_elems; i++) v[i] = sinf(0.05f * (float)i * (float)(layer + 1));
    PackinferRunArgs args = {0};
    args.struct_size = sizeof args;
    args.q = q; /* contiguous [total_q, QO_HEADS, DIM]: strides 0 */
    args.o = o;
    args.lse = lse;
    CHECK(packinfer_kv_layout_nhd(k, v, PAGE, KV_HEADS, DIM, &args.kv));
    CHECK(packinfer_run(launch, &args));
    printf("layer %d done: O[token 0, head 0, dim 0..2] = %.4f %.4f %.4f, LSE[token 21, head 3] = %.4f\n", layer,
           o[0], o[1], o[2], lse[21 * QO_HEADS + 3]);
  }

  CHECK(packinfer_launch_destroy(launch));
  CHECK(packinfer_plan_destroy(plan));
  CHECK(packinfer_context_destroy(ctx));
  free(q); free(k); free(v); free(o); free(lse);
  return 0;
}
