/* The pkg-config consumer: a C program that creates a CPU context and plans one request. */
#include <stdio.h>

#include <packinfer.h>

int main(void) {
  PackinferContextOptions o;
  PackinferContext ctx;
  packinfer_context_options_default(&o);
  o.backend = PACKINFER_BACKEND_CPU;
  if (packinfer_context_create(&o, &ctx) != PACKINFER_STATUS_OK) {
    printf("%s\n", packinfer_last_error());
    return 1;
  }
  const int32_t qo_indptr[] = {0, 1}, kv_indptr[] = {0, 1}, pages[] = {0}, last[] = {1};
  PackinferBatchDesc b = {0};
  b.struct_size = sizeof b;
  b.batch_size = 1;
  b.qo_indptr = qo_indptr;
  b.kv_indptr = kv_indptr;
  b.kv_page_indices = pages;
  b.kv_last_page_len = last;
  b.page_size = 1;
  b.num_pages = 1;
  b.num_qo_heads = 1;
  b.num_kv_heads = 1;
  b.head_dim = 64;
  b.dtype = PACKINFER_DTYPE_F16;
  b.causal = true;
  PackinferPlan plan;
  if (packinfer_plan_create(ctx, &b, NULL, &plan) != PACKINFER_STATUS_OK) {
    printf("%s\n", packinfer_last_error());
    return 1;
  }
  packinfer_plan_destroy(plan);
  packinfer_context_destroy(ctx);
  printf("consumer ok (ABI %u)\n", packinfer_abi_version());
  return 0;
}
