// One engine step with PackInfer, the way a C++ serving engine uses it:
//
//   1. once at start-up:  a Context (the backend on one device)
//   2. once per step:     describe the batch (CSR page tables into the engine's paged KV cache),
//                         Plan it (the schedule, pure host work), Launch it (bind to the device)
//   3. once per layer:    Launch::run with that layer's Q, K/V cache and output pointers
//
// This program runs on the CPU backend with host buffers so it works anywhere; with
// Backend::Cuda the same calls take device pointers and a CUDA stream.
//
// Build: cmake -S . -B build && cmake --build build --target packinfer_example_engine_step
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "packinfer.hpp"

namespace {

// bf16 is the upper half of an f32 (rounded to nearest even).
uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace

int main() {
  try {
    // --- start-up -------------------------------------------------------------------------
    packinfer::ContextOptions options;
    options.backend = packinfer::Backend::Cpu;  // Backend::Auto picks CUDA where it works
    packinfer::Context ctx(options);
    const packinfer::ContextInfo info = ctx.info();
    std::printf("packinfer %s on %s (%u workers)\n", packinfer::version(), info.device_name.c_str(), info.num_workers);

    // The model: 8 query heads sharing 2 KV heads (GQA), head_dim 64, bf16; the engine's cache
    // has pages of 16 tokens, stored NHD: [num_pages, 16, kv_heads, head_dim] for K and for V.
    const packinfer::AttentionShape shape{8, 2, 64, packinfer::DType::BF16, /*causal=*/true, /*sm_scale=*/0.0f};
    const uint32_t page_size = 16, num_pages = 64;

    // --- one step: three decodes, one 48-token prefill chunk ---------------------------------
    // Requests 0 and 1 share a 32-token system prompt: the same two pages (7, 3) start both page
    // lists, and a prefix group says so, so PackInfer reads those keys once for both.
    //   request:            0 (decode)   1 (decode)    2 (decode)  3 (prefill chunk)
    //   queries this step:  1            1             1           48
    //   keys in the cache:  40           35            100         48
    const std::vector<int32_t> qo_indptr{0, 1, 2, 3, 51};
    const std::vector<int32_t> kv_indptr{0, 3, 6, 13, 16};
    const std::vector<int32_t> kv_page_indices{7, 3, 12,  7, 3, 20,  1, 2, 4, 5, 6, 8, 9,  30, 31, 32};
    const std::vector<int32_t> kv_last_page_len{8, 3, 4, 16};
    const std::vector<int32_t> shared_prompt_members{0, 1};
    const packinfer::PrefixGroup shared_prompt{32, shared_prompt_members};

    packinfer::BatchDesc batch;
    batch.shape = shape;
    batch.qo_indptr = qo_indptr;
    batch.kv_indptr = kv_indptr;
    batch.kv_page_indices = kv_page_indices;
    batch.kv_last_page_len = kv_last_page_len;
    batch.page_size = page_size;
    batch.num_pages = num_pages;
    batch.prefix_groups = packinfer::ArrayView<packinfer::PrefixGroup>(&shared_prompt, 1);

    packinfer::Plan plan = ctx.plan(batch);  // all arrays are copied here
    const packinfer::PlanStats s = plan.stats();
    std::printf("plan: %u requests -> %u groups, %u work items, %u split requests (%u merge rows)\n",
                s.num_requests, s.num_groups, s.num_work_items, s.num_split_requests, s.num_merge_rows);
    std::printf("      tile utilization %.1f%%, group cost max %.0f / mean %.0f (capacity %.0f), "
                "scratch %llu bytes, planned in %.1f us\n",
                100.0 * s.tile_utilization, s.max_group_cost, s.mean_group_cost, s.capacity,
                static_cast<unsigned long long>(s.scratch_bytes), s.planning_time_us);

    packinfer::Launch launch = ctx.launch(plan, /*stream=*/nullptr);

    // --- every layer: run ----------------------------------------------------------------------
    const std::size_t total_q = static_cast<std::size_t>(qo_indptr.back());
    const std::size_t q_elems = total_q * shape.num_qo_heads * shape.head_dim;
    const std::size_t kv_elems = std::size_t{num_pages} * page_size * shape.num_kv_heads * shape.head_dim;
    std::vector<uint16_t> q(q_elems), k(kv_elems), v(kv_elems), o(q_elems);
    std::vector<float> lse(total_q * shape.num_qo_heads);
    const int num_layers = 2;
    for (int layer = 0; layer < num_layers; layer++) {
      // (an engine's Q and KV cache come from the model; here: something deterministic)
      for (std::size_t i = 0; i < q_elems; i++) q[i] = to_bf16(std::sin(0.37f * float(i) + float(layer)));
      for (std::size_t i = 0; i < kv_elems; i++) k[i] = to_bf16(std::cos(0.11f * float(i) - float(layer)));
      for (std::size_t i = 0; i < kv_elems; i++) v[i] = to_bf16(std::sin(0.05f * float(i) * float(layer + 1)));

      packinfer::RunArgs args(q.data(), packinfer::kv_layout_nhd(k.data(), v.data(), page_size, shape.num_kv_heads, shape.head_dim),
                              o.data(), lse.data());
      launch.run(args);  // on CUDA: args.stream = the layer's stream; nothing is allocated or waited for
      std::printf("layer %d done: O[token 0, head 0, dim 0..3] = %.4f %.4f %.4f %.4f, LSE[token 50, head 7] = %.4f\n",
                  layer, from_bf16(o[0]), from_bf16(o[1]), from_bf16(o[2]), from_bf16(o[3]),
                  lse[50 * shape.num_qo_heads + 7]);
    }
    // Launch, Plan and Context are destroyed here, in reverse order (any order is allowed).
    return 0;
  } catch (const packinfer::Error& e) {
    // e.status() is the PackinferStatus; e.what() has its name and the library's message.
    std::fprintf(stderr, "packinfer error: %s\n", e.what());
    return 1;
  }
}
