// Smallest real use of an installed PackInfer: with one key per request, attention returns that
// key's V row exactly, whatever Q is.
#include <cstdio>
#include <vector>

#include <packinfer.hpp>

int main() {
  try {
    packinfer::Context ctx(packinfer::Backend::Cpu);
    const std::vector<int32_t> qo_indptr{0, 1, 2}, kv_indptr{0, 1, 2}, pages{1, 0}, last{1, 1};
    packinfer::BatchDesc batch;
    batch.shape = {2, 1, 8, packinfer::DType::F32, true, 0.0f};
    batch.qo_indptr = qo_indptr;
    batch.kv_indptr = kv_indptr;
    batch.kv_page_indices = pages;
    batch.kv_last_page_len = last;
    batch.page_size = 1;
    batch.num_pages = 2;
    packinfer::Plan plan = ctx.plan(batch);
    packinfer::Launch launch = ctx.launch(plan);
    std::vector<float> q(2 * 2 * 8, 0.5f), k(2 * 8, 0.25f), v(2 * 8), o(2 * 2 * 8, -1.0f);
    for (int i = 0; i < 16; i++) v[i] = float(i);
    launch.run(packinfer::RunArgs(q.data(), packinfer::kv_layout_nhd(k.data(), v.data(), 1, 1, 8), o.data()));
    for (int r = 0; r < 2; r++)
      for (int h = 0; h < 2; h++)
        for (int d = 0; d < 8; d++)
          if (o[(r * 2 + h) * 8 + d] != v[pages[r] * 8 + d]) {
            std::printf("wrong output at request %d head %d dim %d\n", r, h, d);
            return 1;
          }
    std::printf("consumer ok (packinfer %s, %u work items)\n", packinfer::version(), plan.stats().num_work_items);
    return 0;
  } catch (const packinfer::Error& e) {
    std::printf("%s\n", e.what());
    return 1;
  }
}
