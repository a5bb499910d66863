// The managed level in a few lines: PackInfer owns the KV cache (packinfer::Pool), so the engine
// keeps sequence ids instead of page tables. A prompt is prefilled, two continuations fork from
// it (sharing its pages), then decode steps run: append, plan from the pool, relayout, and per
// layer write the new K/V and run attention over the pool.
//
// CPU backend and f32 so it runs anywhere; on CUDA the pointers are device memory and every call
// takes the layer's stream. Build: cmake --build build --target packinfer_example_managed_step
#include <cstdio>
#include <vector>

#include "packinfer.hpp"

int main() {
  try {
    packinfer::Context ctx(packinfer::Backend::Cpu);
    packinfer::PoolOptions options;  // page_size 16, headroom 2 pages
    options.num_layers = 2;
    options.shape = {8, 2, 64, packinfer::DType::F32, /*causal=*/true, /*sm_scale=*/0.0f};
    options.num_pages = 64;
    packinfer::Pool pool(ctx, options);
    const std::size_t row = 2 * 64, q_row = 8 * 64;  // one token's K (or V), one token's Q
    // One engine step: sequences seqs[i] get new[i] tokens; per layer their K/V are stored, then
    // attention runs (an engine's Q/K/V come from the model; here, constants).
    auto step = [&](const std::vector<packinfer::SequenceId>& seqs, const std::vector<uint32_t>& fresh) {
      uint32_t rows = 0;
      for (std::size_t i = 0; i < seqs.size(); i++) {
        pool.append(seqs[i], fresh[i]);
        rows += fresh[i];
      }
      packinfer::Plan plan = pool.plan(ctx, seqs, fresh);
      if (pool.relayout(plan, seqs, /*regroup=*/true).pages_moved > 0) plan = pool.plan(ctx, seqs, fresh);
      packinfer::Launch launch = ctx.launch(plan);
      std::vector<float> k(rows * row, 0.5f), v(rows * row, 1.0f), q(rows * q_row, 0.1f), o(rows * q_row);
      for (uint32_t layer = 0; layer < options.num_layers; layer++) {
        pool.write_kv(layer, seqs, fresh, packinfer::KvSource{k.data(), v.data(), rows, 2, 64, packinfer::DType::F32, 0});
        launch.run(packinfer::RunArgs(q.data(), pool.kv_layout(layer), o.data()));
      }
    };
    const packinfer::SequenceId prompt = pool.create_sequence();
    step({prompt}, {40});                                                // prefill
    const packinfer::SequenceId a = pool.fork(prompt, 40), b = pool.fork(prompt, 40);
    pool.release(prompt);                                                // a and b keep its pages
    for (int i = 0; i < 4; i++) step({a, b}, {1, 1});                   // decode
    const packinfer::PoolStats s = pool.stats();
    std::printf("pool: %u of %u pages used, %llu tokens in %u sequences (%llu stored), %llu copy-on-write copies\n",
                s.pages_used, s.num_pages, static_cast<unsigned long long>(s.tokens_logical), s.num_sequences,
                static_cast<unsigned long long>(s.tokens_stored), static_cast<unsigned long long>(s.cow_page_copies));
    std::printf("last step reads %llu KV bytes with the shared prompt read once (%llu without)\n",
                static_cast<unsigned long long>(s.step_read_bytes_shared), static_cast<unsigned long long>(s.step_read_bytes_unshared));
    return 0;
  } catch (const packinfer::Error& e) {
    std::fprintf(stderr, "packinfer error: %s\n", e.what());
    return 1;
  }
}
