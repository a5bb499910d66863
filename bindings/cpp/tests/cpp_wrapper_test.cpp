// Tests of the C++ wrapper (packinfer.hpp) on the CPU backend: whole steps compared against a
// naive double-precision attention written here (f32, f16, bf16; NHD and HND; GQA; a shared
// prefix), the managed KV pool's flow (packinfer::Pool), RAII ownership, and every error the
// wrapper maps to packinfer::Error.
#include <gtest/gtest.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <type_traits>
#include <unistd.h>
#include <thread>
#include <vector>

#include "packinfer.hpp"

namespace {

using packinfer::Backend;
using packinfer::DType;
using packinfer::Status;

static_assert(!std::is_copy_constructible_v<packinfer::Context>, "handles are move-only");
static_assert(!std::is_copy_assignable_v<packinfer::Plan>, "handles are move-only");
static_assert(std::is_nothrow_move_constructible_v<packinfer::Launch>, "moves cannot fail");
static_assert(std::is_nothrow_move_assignable_v<packinfer::Context>, "moves cannot fail");
static_assert(sizeof(packinfer::RunArgs) == sizeof(PackinferRunArgs), "RunArgs passes straight to C");

// ---- element types: the value a dtype stores for x, and its bits (round to nearest even) ----

uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

uint16_t to_bf16(float f) { uint32_t u = bits_of(f); return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16); }
float from_bf16(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

// Finite values well inside f16's range (|x| <= 2 here), normal or subnormal.
uint16_t to_f16(float f) {
  const uint32_t u = bits_of(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (a < 6.103515625e-05f) return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::lrint(a * 16777216.0f)));
  uint32_t h = ((((u >> 23) & 0xFFu) - 112u) << 10) | ((u & 0x7FFFFFu) >> 13);
  const uint32_t rest = u & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
  return static_cast<uint16_t>(sign | h);
}
float from_f16(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0) return (sign ? -1.0f : 1.0f) * static_cast<float>(mant) / 16777216.0f;
  if (exp == 31) return float_of(sign | 0x7F800000u | (mant << 13));
  return float_of(sign | ((exp + 112u) << 23) | (mant << 13));
}

// fp8 e4m3 by its definition: sign, 4 exponent bits of bias 7, 3 mantissa bits, subnormals at
// exponent 0, NaN at S.1111.111, no infinities.
float from_e4m3(uint8_t c) {
  const int e = (c >> 3) & 0xF, m = c & 7;
  if (e == 15 && m == 7) return NAN;
  const float mag = e == 0 ? std::ldexp(float(m) / 8.0f, -6) : std::ldexp(1.0f + float(m) / 8.0f, e - 7);
  return (c & 0x80) ? -mag : mag;
}
// The nearest e4m3 code (ties to the even code), saturated to ±448: by search over the codes.
uint8_t to_e4m3(float x) {
  const float a = std::min(std::fabs(x), 448.0f);
  uint8_t best = 0;
  for (int c = 1; c < 0x7F; c++) {
    const float d = std::fabs(from_e4m3(uint8_t(c)) - a), bd = std::fabs(from_e4m3(best) - a);
    if (d < bd || (d == bd && (c & 1) == 0)) best = uint8_t(c);
  }
  return uint8_t(best | (std::signbit(x) ? 0x80 : 0));
}

// A host tensor in one dtype; set() returns the value actually stored.
struct Tensor {
  DType dtype;
  std::vector<uint8_t> bytes;
  Tensor(DType t, std::size_t n) : dtype(t), bytes(n * elem_size(t)) {}
  static std::size_t elem_size(DType t) { return t == DType::F32 ? 4 : t == DType::FP8_E4M3 ? 1 : 2; }
  std::size_t size() const { return bytes.size() / elem_size(dtype); }
  void* data() { return bytes.data(); }
  const void* data() const { return bytes.data(); }
  float set(std::size_t i, float x) {
    if (dtype == DType::F32) { std::memcpy(&bytes[i * 4], &x, 4); return x; }
    if (dtype == DType::FP8_E4M3) { bytes[i] = to_e4m3(x); return get(i); }
    const uint16_t h = dtype == DType::F16 ? to_f16(x) : to_bf16(x);
    std::memcpy(&bytes[i * 2], &h, 2);
    return get(i);
  }
  float get(std::size_t i) const {
    if (dtype == DType::F32) { float x; std::memcpy(&x, &bytes[i * 4], 4); return x; }
    if (dtype == DType::FP8_E4M3) return from_e4m3(bytes[i]);
    uint16_t h; std::memcpy(&h, &bytes[i * 2], 2);
    return dtype == DType::F16 ? from_f16(h) : from_bf16(h);
  }
};

struct Request { int q_len, kv_len; };

// A step's batch in a paged cache with scattered pages and random contents.
struct Case {
  packinfer::AttentionShape shape;
  uint32_t page_size;
  bool hnd;
  std::vector<Request> requests;
  std::vector<int32_t> qo_indptr{0}, kv_indptr{0}, pages, last;
  uint32_t num_pages = 0;
  std::vector<int32_t> shared_members;  // they share the first shared_len keys (whole pages)
  int shared_len = 0;
  std::vector<packinfer::PrefixGroup> groups;
  Tensor q, k, v;
  int64_t window_left = -1;  // the sliding window the case is planned with; -1 = none
  float soft_cap = 0.0f;     // the soft-cap its runs use; 0 = none
  std::vector<uint8_t> mask;           // custom masks, bit-packed; none when mask_indptr is empty
  std::vector<int32_t> mask_indptr;
  // An fp8 cache's scales (shape.kv_dtype = FP8_E4M3): per tensor, and per KV head (empty = 1).
  float k_scale = 1.0f, v_scale = 1.0f;
  std::vector<float> k_heads, v_heads;
  double scale_of(bool v_side, std::size_t kvh) const {
    const std::vector<float>& heads = v_side ? v_heads : k_heads;
    return double(v_side ? v_scale : k_scale) * (heads.empty() ? 1.0 : double(heads[kvh]));
  }

  // Whether request r's query i sees key j under the custom mask (bit i*kv_len + j, LSB first).
  bool shows(std::size_t r, int i, int j) const {
    if (mask_indptr.empty()) return true;
    const std::size_t bit = std::size_t(i) * std::size_t(requests[r].kv_len) + std::size_t(j);
    return (mask[std::size_t(mask_indptr[r]) + bit / 8] >> (bit % 8)) & 1;
  }
  // A random mask of the given density; query 0 of request 0 sees nothing.
  void random_mask(double density, unsigned seed) {
    std::mt19937 rng(seed);
    std::bernoulli_distribution on(density);
    mask.clear();
    mask_indptr.assign(1, 0);
    for (std::size_t r = 0; r < requests.size(); r++) {
      const std::size_t bits = std::size_t(requests[r].q_len) * std::size_t(requests[r].kv_len);
      std::vector<uint8_t> bytes((bits + 7) / 8, 0);
      for (std::size_t b = 0; b < bits; b++) {
        if ((r > 0 || b >= std::size_t(requests[r].kv_len)) && on(rng)) bytes[b / 8] |= uint8_t(1u << (b % 8));
      }
      mask.insert(mask.end(), bytes.begin(), bytes.end());
      mask_indptr.push_back(static_cast<int32_t>(mask.size()));
    }
  }

  std::optional<DType> kv_dtype;  // none = shape.dtype

  Case(packinfer::AttentionShape s, uint32_t ps, std::vector<Request> reqs, bool hnd_layout = false,
       std::vector<int32_t> members = {}, int prefix = 0, unsigned seed = 1, std::optional<DType> kv = std::nullopt)
      : shape(s), page_size(ps), hnd(hnd_layout), requests(std::move(reqs)), shared_members(std::move(members)),
        shared_len(prefix), q(s.dtype, 0), k(s.dtype, 0), v(s.dtype, 0), kv_dtype(kv) {
    const DType kv_type = kv.value_or(s.dtype);
    // fp8 codes of up to ±16, which the scales bring back to about ±1.
    const float kv_range = kv_type == DType::FP8_E4M3 ? 16.0f : 1.0f;
    std::mt19937 rng(seed);
    for (auto& r : requests) num_pages += (r.kv_len + ps - 1) / ps;
    num_pages += 3;
    std::vector<int32_t> order(num_pages);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    std::size_t next = 0;
    for (std::size_t r = 0; r < requests.size(); r++) {
      qo_indptr.push_back(qo_indptr.back() + requests[r].q_len);
      const int np = (requests[r].kv_len + static_cast<int>(ps) - 1) / static_cast<int>(ps);
      const bool shares = std::find(shared_members.begin() + (shared_members.empty() ? 0 : 1), shared_members.end(),
                                    static_cast<int32_t>(r)) != shared_members.end();
      for (int p = 0; p < np; p++) {
        if (shares && (p + 1) * static_cast<int>(ps) <= shared_len) {
          pages.push_back(pages[kv_indptr[shared_members[0]] + p]);
        } else {
          pages.push_back(order[next++]);
        }
      }
      kv_indptr.push_back(static_cast<int32_t>(pages.size()));
      last.push_back(requests[r].kv_len == 0 ? 0 : (requests[r].kv_len - 1) % static_cast<int>(ps) + 1);
    }
    if (!shared_members.empty()) groups.push_back({static_cast<uint32_t>(shared_len), shared_members});
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    const std::size_t kv_elems = std::size_t{num_pages} * ps * s.num_kv_heads * s.head_dim;
    k = Tensor(kv_type, kv_elems);
    v = Tensor(kv_type, kv_elems);
    q = Tensor(s.dtype, std::size_t(qo_indptr.back()) * s.num_qo_heads * s.head_dim);
    for (std::size_t i = 0; i < kv_elems; i++) k.set(i, kv_range * u(rng));
    for (std::size_t i = 0; i < kv_elems; i++) v.set(i, kv_range * u(rng));
    for (std::size_t i = 0; i < q.size(); i++) q.set(i, 2.0f * u(rng));
  }

  packinfer::BatchDesc desc() const {
    packinfer::BatchDesc d;
    d.shape = shape;
    d.qo_indptr = qo_indptr;
    d.kv_indptr = kv_indptr;
    d.kv_page_indices = pages;
    d.kv_last_page_len = last;
    d.page_size = page_size;
    d.num_pages = num_pages;
    d.prefix_groups = groups;
    d.custom_mask = mask;
    d.mask_indptr = mask_indptr;
    d.kv_dtype = kv_dtype;
    return d;
  }
  packinfer::KvLayout layout() const {
    return hnd ? packinfer::kv_layout_hnd(k.data(), v.data(), page_size, shape.num_kv_heads, shape.head_dim)
               : packinfer::kv_layout_nhd(k.data(), v.data(), page_size, shape.num_kv_heads, shape.head_dim);
  }
  std::size_t total_q() const { return static_cast<std::size_t>(qo_indptr.back()); }

  // Naive attention in double over the stored values (indices from this test's own layout math).
  void reference(std::vector<double>& out, std::vector<double>& lse) const {
    const std::size_t hq = shape.num_qo_heads, hk = shape.num_kv_heads, d = shape.head_dim, ps = page_size;
    const std::size_t group = hq / hk;
    const double scale = shape.sm_scale != 0.0f ? shape.sm_scale : 1.0 / std::sqrt(double(d));
    out.assign(total_q() * hq * d, 0.0);
    lse.assign(total_q() * hq, 0.0);
    auto at = [&](int32_t page, std::size_t t, std::size_t h) {
      return hnd ? ((std::size_t(page) * hk + h) * ps + t) * d : ((std::size_t(page) * ps + t) * hk + h) * d;
    };
    for (std::size_t r = 0; r < requests.size(); r++) {
      const int ql = requests[r].q_len, kl = requests[r].kv_len;
      for (int i = 0; i < ql; i++) {
        const std::size_t tok = std::size_t(qo_indptr[r] + i);
        // A custom mask replaces the causal mask.
        const int visible = shape.causal && mask_indptr.empty() ? kl - ql + i + 1 : kl;
        // The window counts back from the query's position kl - ql + i.
        const int first = window_left < 0 ? 0 : std::max(0, int(kl - ql + i - window_left));
        for (std::size_t h = 0; h < hq; h++) {
          std::vector<double> s(static_cast<std::size_t>(visible));
          double m = -INFINITY, z = 0.0;
          for (int j = first; j < visible; j++) {
            if (!shows(r, i, j)) continue;
            const std::size_t base = at(pages[std::size_t(kv_indptr[r] + j / int(ps))], std::size_t(j) % ps, h / group);
            double dot = 0.0;
            for (std::size_t e = 0; e < d; e++) dot += double(q.get((tok * hq + h) * d + e)) * k.get(base + e) * scale_of(false, h / group);
            s[std::size_t(j)] = soft_cap > 0 ? soft_cap * std::tanh(dot * scale / soft_cap) : dot * scale;
            m = std::max(m, s[std::size_t(j)]);
          }
          for (int j = first; j < visible; j++) z += shows(r, i, j) ? std::exp(s[std::size_t(j)] - m) : 0.0;
          for (int j = first; j < visible; j++) {
            if (!shows(r, i, j)) continue;
            const std::size_t base = at(pages[std::size_t(kv_indptr[r] + j / int(ps))], std::size_t(j) % ps, h / group);
            const double p = std::exp(s[std::size_t(j)] - m) / z;
            for (std::size_t e = 0; e < d; e++) out[(tok * hq + h) * d + e] += p * v.get(base + e) * scale_of(true, h / group);
          }
          lse[tok * hq + h] = z > 0 ? m + std::log(z) : -INFINITY;
        }
      }
    }
  }
};

packinfer::Context cpu_context() { return packinfer::Context(packinfer::ContextOptions{Backend::Cpu, 0, 2, ""}); }

// Runs one layer of the case through a launch and checks O and LSE against the reference.
void run_and_compare(const Case& c, const packinfer::Launch& launch) {
  const std::size_t n_out = c.total_q() * c.shape.num_qo_heads * c.shape.head_dim;
  Tensor o(c.shape.dtype, n_out);
  for (std::size_t i = 0; i < n_out; i++) o.set(i, NAN);  // an unwritten element shows
  std::vector<float> lse(c.total_q() * c.shape.num_qo_heads, NAN);
  launch.run(packinfer::RunArgs(c.q.data(), c.layout(), o.data(), lse.data())
                 .with_soft_cap(c.soft_cap)
                 .with_kv_scales(c.k_scale, c.v_scale)
                 .with_kv_head_scales(c.k_heads.empty() ? nullptr : c.k_heads.data(), c.v_heads.empty() ? nullptr : c.v_heads.data()));

  std::vector<double> ref_o, ref_lse;
  c.reference(ref_o, ref_lse);
  const double tol = c.shape.dtype == DType::F32 ? 1e-4 : c.shape.dtype == DType::F16 ? 2e-3 : 1.6e-2;
  int bad = 0;
  for (std::size_t i = 0; i < n_out && bad < 5; i++) {
    if (!(std::fabs(o.get(i) - ref_o[i]) <= tol * (1.0 + std::fabs(ref_o[i])))) {
      ADD_FAILURE() << "O[token " << i / (c.shape.num_qo_heads * c.shape.head_dim) << ", head "
                    << (i / c.shape.head_dim) % c.shape.num_qo_heads << ", dim " << i % c.shape.head_dim
                    << "] = " << o.get(i) << ", reference " << ref_o[i];
      bad++;
    }
  }
  for (std::size_t i = 0; i < lse.size() && bad < 5; i++) {
    const bool both_empty = std::isinf(ref_lse[i]) && ref_lse[i] < 0 && lse[i] == -INFINITY;
    if (!both_empty && !(std::fabs(lse[i] - ref_lse[i]) <= 1e-4 * (1.0 + std::fabs(ref_lse[i])))) {
      ADD_FAILURE() << "LSE[" << i << "] = " << lse[i] << ", reference " << ref_lse[i];
      bad++;
    }
  }
}

void full_step(const Case& c, const packinfer::PlanOptions& options = {}) {
  packinfer::Context ctx = cpu_context();
  packinfer::Plan plan = ctx.plan(c.desc(), options);
  const packinfer::PlanStats stats = plan.stats();
  EXPECT_EQ(stats.num_requests, c.requests.size());
  EXPECT_GE(stats.num_work_items, 1u);
  EXPECT_GT(stats.tile_utilization, 0.0);
  EXPECT_LE(stats.tile_utilization, 1.0);
  packinfer::Launch launch = ctx.launch(plan);
  EXPECT_TRUE(launch.ready());
  launch.wait();
  run_and_compare(c, launch);
}

const std::vector<Request> kMixed = {{1, 70}, {37, 37}, {1, 130}, {5, 40}, {1, 1}};

// Every dtype, both page layouts, GQA.
TEST(Flow, F32CausalMixedBatchNhd) { full_step(Case({8, 2, 64, DType::F32, true, 0.0f}, 16, kMixed)); }
TEST(Flow, F16CausalMixedBatchHnd) { full_step(Case({8, 2, 64, DType::F16, true, 0.0f}, 16, kMixed, true)); }
TEST(Flow, Bf16NonCausalHeadDim128) { full_step(Case({4, 4, 128, DType::BF16, false, 0.0f}, 8, kMixed)); }
TEST(Flow, F16PageSizeOneExplicitScale) { full_step(Case({2, 1, 64, DType::F16, true, 0.05f}, 1, {{3, 20}, {1, 9}})); }
TEST(Flow, Bf16SharedPrefixGroup) {
  full_step(Case({8, 1, 64, DType::BF16, true, 0.0f}, 4, {{1, 41}, {2, 50}, {1, 33}, {4, 12}}, false, {0, 1, 2}, 32));
}
TEST(Flow, AblationFlags) {
  const Case c({8, 2, 64, DType::F32, true, 0.0f}, 16, kMixed);
  full_step(c, {packinfer::PlanFlags::NoPacking | packinfer::PlanFlags::NoBalancing | packinfer::PlanFlags::NoSplitKv, 0, 0.0});
  full_step(c, {packinfer::PlanFlags::Deterministic, 64, 0.0});
}

TEST(Flow, SlidingWindowAndSoftCap) {
  // The window is a plan option; the soft-cap comes with each run (one launch, three caps).
  Case c({8, 2, 64, DType::F32, true, 0.0f}, 16, {{1, 70}, {37, 60}, {1, 130}, {5, 40}});
  c.window_left = 9;
  packinfer::PlanOptions options;
  options.window_left = c.window_left;
  packinfer::Context ctx = cpu_context();
  packinfer::Plan plan = ctx.plan(c.desc(), options);
  packinfer::Launch launch = ctx.launch(plan);
  for (float cap : {0.0f, 3.0f, 30.0f}) {
    c.soft_cap = cap;
    run_and_compare(c, launch);
  }
  // A non-causal window, with splits.
  Case nc({4, 4, 128, DType::BF16, false, 0.0f}, 8, kMixed);
  nc.window_left = 20;
  nc.soft_cap = 5.0f;
  full_step(nc, {packinfer::PlanFlags::Deterministic, 16, 0.0, nc.window_left});
}

TEST(Flow, CustomMask) {
  // Causal shape, but the mask replaces causal; with a window and soft-cap, and with splits.
  Case c({8, 2, 64, DType::F32, true, 0.0f}, 16, {{4, 70}, {37, 60}, {1, 130}, {5, 40}});
  c.random_mask(0.4, 7);
  c.window_left = 30;
  c.soft_cap = 5.0f;
  full_step(c, {packinfer::PlanFlags::None, 0, 0.0, c.window_left});
  full_step(c, {packinfer::PlanFlags::Deterministic, 16, 0.0, c.window_left});
  // Query 0 of request 0 sees nothing: O = 0 and LSE = -inf (checked by the comparison).
  // The mask matters: without it the reference differs.
  Case plain = c;
  plain.mask_indptr.clear();
  std::vector<double> a, la, b, lb;
  c.reference(a, la);
  plain.reference(b, lb);
  EXPECT_NE(a, b);
  // A mask_indptr of the wrong length is refused by name.
  packinfer::Context ctx = cpu_context();
  packinfer::BatchDesc d = c.desc();
  std::vector<int32_t> short_indptr(c.mask_indptr.begin(), c.mask_indptr.end() - 1);
  d.mask_indptr = short_indptr;
  try {
    (void)ctx.plan(d);
    ADD_FAILURE() << "a short mask_indptr was accepted";
  } catch (const packinfer::Error& e) {
    EXPECT_NE(std::string(e.what()).find("batch.mask_indptr"), std::string::npos) << e.what();
  }
  // Offsets that do not match the bits are refused by the library, by name.
  std::vector<int32_t> bad = c.mask_indptr;
  bad[1] += 1;
  d.mask_indptr = bad;
  std::vector<uint8_t> longer = c.mask;
  longer.push_back(0);
  d.custom_mask = longer;
  try {
    (void)ctx.plan(d);
    ADD_FAILURE() << "bad mask offsets were accepted";
  } catch (const packinfer::Error& e) {
    EXPECT_NE(std::string(e.what()).find("mask_indptr[1] - mask_indptr[0]"), std::string::npos) << e.what();
  }
}

TEST(Flow, Fp8CacheWithScales) {
  // An fp8 e4m3 cache (kv_dtype, plan time) read with per-tensor and per-head scales (per run):
  // one launch, several scales, against the reference over the dequantized cache.
  const packinfer::AttentionShape shape{8, 2, 64, DType::BF16, true, 0.0f};
  Case c(shape, 16, kMixed, /*hnd=*/true, {}, 0, 1, DType::FP8_E4M3);
  c.window_left = 40;
  c.soft_cap = 20.0f;
  packinfer::PlanOptions options;
  options.window_left = c.window_left;
  packinfer::Context ctx = cpu_context();
  packinfer::Plan plan = ctx.plan(c.desc(), options);
  packinfer::Launch launch = ctx.launch(plan);
  c.k_scale = 0.07f;
  c.v_scale = 0.05f;
  run_and_compare(c, launch);
  c.k_heads = {0.5f, 2.0f};
  c.v_heads = {1.5f, 0.25f};
  run_and_compare(c, launch);
  c.k_scale = c.v_scale = 1.0f;
  run_and_compare(c, launch);
  // With a prefix group and splits, f16 queries, per-tensor scales.
  packinfer::AttentionShape f16 = shape;
  f16.dtype = DType::F16;
  Case g(f16, 8, {{1, 40}, {1, 50}, {2, 45}}, false, {0, 1, 2}, 32, 3, DType::FP8_E4M3);
  g.k_scale = 0.1f;
  g.v_scale = 0.08f;
  full_step(g, {packinfer::PlanFlags::Deterministic, 16, 0.0});
  // Scales for a bf16 cache are refused by name.
  Case plain({8, 2, 64, DType::BF16, true, 0.0f}, 16, kMixed);
  packinfer::Plan p2 = ctx.plan(plain.desc());
  packinfer::Launch l2 = ctx.launch(p2);
  plain.k_scale = 0.5f;
  try {
    run_and_compare(plain, l2);
    ADD_FAILURE() << "a scale for a bf16 cache was accepted";
  } catch (const packinfer::Error& e) {
    EXPECT_EQ(e.status(), Status::InvalidArgument);
    EXPECT_NE(std::string(e.what()).find("k_scale = 0.5"), std::string::npos) << e.what();
  }
}

TEST(Flow, ManyLayersThroughOneLaunchAndCallerScratch) {
  Case c({8, 2, 64, DType::F32, true, 0.0f}, 16, kMixed);
  packinfer::Context ctx = cpu_context();
  packinfer::Plan plan = ctx.plan(c.desc());
  const auto stats = plan.stats();
  std::vector<float> scratch(stats.scratch_bytes / sizeof(float) + 1);
  packinfer::Launch launch = ctx.launch(plan, nullptr, {scratch.data(), scratch.size() * sizeof(float)});
  plan.reset();  // a launch outlives its plan
  ctx.reset();   // and its context
  for (int layer = 0; layer < 3; layer++) {
    for (std::size_t i = 0; i < c.q.size(); i++) c.q.set(i, c.q.get(i) * -0.5f + 0.1f * float(layer));
    run_and_compare(c, launch);
  }
}

TEST(Context, InfoAndVersion) {
  packinfer::Context ctx = cpu_context();
  const packinfer::ContextInfo info = ctx.info();
  EXPECT_EQ(info.backend, Backend::Cpu);
  EXPECT_EQ(info.device_name, "cpu");
  EXPECT_EQ(info.num_workers, 2u);
  EXPECT_TRUE(packinfer::abi_matches());
  EXPECT_STRNE(packinfer::version(), "");
  // AUTO on a machine without CUDA is the CPU; with CUDA, CUDA.
  packinfer::Context any(Backend::Auto);
  EXPECT_NE(any.info().backend, Backend::Auto);
}

// ---- RAII ----

TEST(Raii, DestructorDestroysTheHandle) {
  packinfer::Context ctx = cpu_context();
  const Case c({8, 2, 64, DType::F32, true, 0.0f}, 16, kMixed);
  PackinferPlan raw{};
  {
    packinfer::Plan plan = ctx.plan(c.desc());
    raw = plan.handle();
    PackinferPlanStats s{};
    s.struct_size = sizeof s;
    ASSERT_EQ(packinfer_plan_stats(raw, &s), PACKINFER_STATUS_OK);
  }
  EXPECT_EQ(packinfer_plan_destroy(raw), PACKINFER_STATUS_INVALID_HANDLE) << "the destructor left the plan alive";
}

TEST(Raii, MovedFromAndResetHandlesAreEmpty) {
  packinfer::Context a = cpu_context();
  const PackinferContext raw = a.handle();
  packinfer::Context b = std::move(a);
  EXPECT_FALSE(a);  // NOLINT(bugprone-use-after-move): checking the moved-from state
  EXPECT_TRUE(b);
  EXPECT_EQ(b.handle().bits, raw.bits);
  try {
    (void)a.info();  // NOLINT(bugprone-use-after-move)
    FAIL() << "a moved-from context worked";
  } catch (const packinfer::Error& e) {
    EXPECT_EQ(e.status(), Status::InvalidHandle);
    EXPECT_NE(e.message().find("is null"), std::string::npos) << e.message();
  }
  packinfer::Context c = cpu_context();
  c = std::move(b);  // c's own context is destroyed by the assignment
  EXPECT_EQ(c.handle().bits, raw.bits);
  c.reset();
  EXPECT_FALSE(c);
  c.reset();  // no-op on an empty handle
  EXPECT_EQ(packinfer_context_destroy(raw), PACKINFER_STATUS_INVALID_HANDLE);
}

TEST(Raii, ReleaseHandsOwnershipToTheCaller) {
  packinfer::Context ctx = cpu_context();
  const PackinferContext raw = ctx.release();
  EXPECT_FALSE(ctx);
  EXPECT_EQ(packinfer_context_destroy(raw), PACKINFER_STATUS_OK);
}

// ---- errors: every status the wrapper maps, with the library's message ----

template <typename F>
packinfer::Error expect_error(F&& f, Status want, const std::string& needle) {
  try {
    f();
  } catch (const packinfer::Error& e) {
    EXPECT_EQ(e.status(), want) << e.what();
    EXPECT_NE(e.message().find(needle), std::string::npos) << "message \"" << e.message() << "\" lacks \"" << needle << "\"";
    EXPECT_EQ(std::string(e.what()), std::string(packinfer::status_name(want)) + ": " + e.message());
    return e;
  }
  ADD_FAILURE() << "no packinfer::Error (wanted " << packinfer::status_name(want) << ")";
  return packinfer::Error(Status::Ok, "");
}

TEST(Errors, InvalidArgumentNamesTheValue) {
  packinfer::Context ctx = cpu_context();
  const Case c({8, 2, 64, DType::F32, true, 0.0f}, 16, kMixed);
  auto last = c.last;
  last[1] = 99;
  auto d = c.desc();
  d.kv_last_page_len = last;
  expect_error([&] { ctx.plan(d); }, Status::InvalidArgument, "kv_last_page_len[1] = 99");
  d = c.desc();
  d.shape.num_qo_heads = 7;
  expect_error([&] { ctx.plan(d); }, Status::InvalidArgument, "num_qo_heads = 7");
  d = c.desc();
  d.shape.sm_scale = -1.0f;
  expect_error([&] { ctx.plan(d); }, Status::InvalidArgument, "sm_scale = -1");
  const std::vector<int32_t> too_few_members{2};
  packinfer::PrefixGroup lonely{8, too_few_members};
  d = c.desc();
  d.prefix_groups = packinfer::ArrayView<packinfer::PrefixGroup>(&lonely, 1);
  expect_error([&] { ctx.plan(d); }, Status::InvalidArgument, "prefix_groups[0] has 1 member");
}

TEST(Errors, WrapperChecksArrayLengths) {
  packinfer::Context ctx = cpu_context();
  const Case c({8, 2, 64, DType::F32, true, 0.0f}, 16, kMixed);
  auto d = c.desc();
  d.qo_indptr = packinfer::ArrayView<int32_t>(c.qo_indptr.data(), 3);
  expect_error([&] { ctx.plan(d); }, Status::InvalidArgument, "batch.qo_indptr has 3 entries; it needs 6");
  d = c.desc();
  d.kv_indptr = packinfer::ArrayView<int32_t>(c.kv_indptr.data(), 7);
  expect_error([&] { ctx.plan(d); }, Status::InvalidArgument, "batch.kv_indptr has 7 entries; it needs 6");
  d = c.desc();
  d.kv_page_indices = packinfer::ArrayView<int32_t>(c.pages.data(), 2);
  expect_error([&] { ctx.plan(d); }, Status::InvalidArgument,
               "batch.kv_page_indices has 2 entries but kv_indptr[5] = " + std::to_string(c.kv_indptr.back()));
}

TEST(Errors, Unsupported) {
  packinfer::Context ctx = cpu_context();
  Case c({8, 2, 64, DType::F32, true, 0.0f}, 16, kMixed);
  auto d = c.desc();
  d.shape.head_dim = 100;
  expect_error([&] { ctx.plan(d); }, Status::Unsupported, "head_dim = 100");
}

TEST(Errors, InvalidHandleAfterDestroy) {
  packinfer::Context ctx = cpu_context();
  const Case c({8, 2, 64, DType::F32, true, 0.0f}, 16, kMixed);
  packinfer::Plan plan = ctx.plan(c.desc());
  packinfer::Launch launch = ctx.launch(plan);
  // Destroyed behind the wrapper's back: its calls and its reset() report it.
  ASSERT_EQ(packinfer_plan_destroy(plan.handle()), PACKINFER_STATUS_OK);
  expect_error([&] { plan.stats(); }, Status::InvalidHandle, "was destroyed");
  expect_error([&] { ctx.launch(plan); }, Status::InvalidHandle, "plan handle");
  expect_error([&] { plan.reset(); }, Status::InvalidHandle, "was destroyed");
  ASSERT_EQ(packinfer_launch_destroy(launch.handle()), PACKINFER_STATUS_OK);
  const std::size_t n_out = c.total_q() * 8 * 64;
  std::vector<float> o(n_out);
  expect_error([&] { launch.run(packinfer::RunArgs(c.q.data(), c.layout(), o.data())); }, Status::InvalidHandle, "launch handle");
  expect_error([&] { (void)launch.ready(); }, Status::InvalidHandle, "was destroyed");
  expect_error([&] { launch.wait(); }, Status::InvalidHandle, "was destroyed");
  (void)launch.release();  // nothing left to destroy
  ctx.reset();
  expect_error([&] { ctx.plan(c.desc()); }, Status::InvalidHandle, "is null");
}

TEST(Errors, RunArguments) {
  packinfer::Context ctx = cpu_context();
  const Case c({8, 2, 64, DType::F32, true, 0.0f}, 16, kMixed);
  packinfer::Plan plan = ctx.plan(c.desc());
  packinfer::Launch launch = ctx.launch(plan);
  std::vector<float> o(c.total_q() * 8 * 64);
  expect_error([&] { launch.run(packinfer::RunArgs(nullptr, c.layout(), o.data())); }, Status::InvalidArgument, "q is a null pointer");
  packinfer::RunArgs args(c.q.data(), c.layout(), o.data());
  args.q_stride_token = -5;
  expect_error([&] { launch.run(args); }, Status::InvalidArgument, "q strides (-5, 0)");
  const auto stats = plan.stats();
  if (stats.scratch_bytes == 0) {
    std::vector<float> tiny(1);
    // A plan without split partials accepts any scratch; one with them must refuse a small one.
    EXPECT_NO_THROW(ctx.launch(plan, nullptr, {tiny.data(), 0}));
  } else {
    std::vector<float> tiny(1);
    expect_error([&] { ctx.launch(plan, nullptr, {tiny.data(), 4}); }, Status::InvalidArgument, "scratch_bytes = 4");
  }
}

TEST(Errors, NoDeviceForCudaWithoutGpu) {
  if (access("/dev/nvidia0", F_OK) == 0) GTEST_SKIP() << "/dev/nvidia0 exists: this machine may have a GPU";
  const packinfer::Error e = expect_error([] { packinfer::Context ctx(Backend::Cuda); }, Status::NoDevice, "packinfer_context_create: ");
  const std::string& m = e.message();
  EXPECT_TRUE(m.find("CUDA") != std::string::npos || m.find("NVRTC") != std::string::npos || m.find("cuInit") != std::string::npos)
      << "NO_DEVICE gives no reason: " << m;
}

// GPU only: a CUDA context where one is usable, its info, and a plan and a launch for a bf16
// batch (the launch compiles and loads the kernels). Without a usable device it is skipped
// (GTEST_SKIP, so ctest and gtest show it as skipped, not passed); PACKINFER_REQUIRE_GPU=1 makes
// that a failure.
TEST(Gpu, CudaContextPlansAndLaunches) {
  std::unique_ptr<packinfer::Context> ctx;
  try {
    ctx = std::make_unique<packinfer::Context>(Backend::Cuda);
  } catch (const packinfer::Error& e) {
    if (e.status() != Status::NoDevice && e.status() != Status::Unsupported) throw;
    const char* required = std::getenv("PACKINFER_REQUIRE_GPU");
    if (required != nullptr && std::string(required) == "1") FAIL() << "PACKINFER_REQUIRE_GPU=1 but CUDA is unusable here: " << e.what();
    GTEST_SKIP() << "no usable CUDA device here: " << e.what();
  }
  const packinfer::ContextInfo info = ctx->info();
  EXPECT_EQ(info.backend, Backend::Cuda);
  EXPECT_FALSE(info.device_name.empty());
  const Case c({8, 2, 128, DType::BF16, true, 0.0f}, 16, kMixed);
  packinfer::Plan plan = ctx->plan(c.desc());
  packinfer::Launch launch = ctx->launch(plan);
  EXPECT_GT(plan.stats().num_work_items, 0u);
}

TEST(Errors, StatusNames) {
  EXPECT_STREQ(packinfer::status_name(Status::Ok), "PACKINFER_STATUS_OK");
  EXPECT_STREQ(packinfer::status_name(Status::NoDevice), "PACKINFER_STATUS_NO_DEVICE");
  EXPECT_STREQ(packinfer::status_name(Status::PoolExhausted), "PACKINFER_STATUS_POOL_EXHAUSTED");
  EXPECT_STREQ(packinfer::status_name(Status::Internal), "PACKINFER_STATUS_INTERNAL");
  const packinfer::Error e(Status::CompileError, "log");
  EXPECT_STREQ(e.what(), "PACKINFER_STATUS_COMPILE_ERROR: log");
}

// ---- the calls the CUDA backend added (precompile, calibrate, capacity launches, update) on the CPU backend ----

TEST(GpuCallsOnCpu, PrecompileIsANoOpAndCalibrateIsUnsupported) {
  packinfer::Context ctx = cpu_context();
  EXPECT_NO_THROW(ctx.precompile());
  EXPECT_NO_THROW(ctx.precompile());
  expect_error([&] { ctx.calibrate(); }, Status::Unsupported,
               "packinfer_context_calibrate: only the CUDA backend calibrates its cost model");
  // Planning still works after the failed calibration.
  const Case c({8, 2, 64, DType::F32, true, 0.0f}, 16, kMixed);
  packinfer::Plan plan = ctx.plan(c.desc());
  run_and_compare(c, ctx.launch(plan));
}

// The engine loop of docs/design.md ("Threads"): a planner thread re-plans step N+1 into one of
// two plans (Context::replan) while this thread runs step N's layers; then the launch is updated
// to it. Every layer of every step is checked against the reference.
TEST(Replan, NextStepPlannedOnAnotherThreadWhileThisOneRuns) {
  packinfer::Context ctx = cpu_context();
  const std::vector<std::vector<Request>> batches = {
      kMixed, {{1, 60}, {30, 30}, {1, 100}}, {{1, 9}, {1, 33}, {12, 50}, {1, 77}}, {{64, 64}}, kMixed};
  std::vector<Case> steps;
  for (const auto& b : batches) steps.emplace_back(packinfer::AttentionShape{8, 2, 64, DType::BF16, true, 0.0f}, 16, b);
  packinfer::Plan plans[2] = {ctx.plan(steps[0].desc()), ctx.plan(steps[1].desc())};
  packinfer::LaunchCapacity roomy;
  roomy.max_work_items = roomy.max_row_segments = roomy.max_kv_chunks = roomy.max_requests = 512;
  roomy.max_pages = roomy.max_merge_rows = roomy.max_merge_slots = roomy.max_groups = roomy.max_partial_slots = 4096;
  packinfer::Launch launch = ctx.launch_with_capacity(plans[0], roomy);
  for (std::size_t n = 0; n < steps.size(); n++) {
    if (n > 0) launch.update(plans[n % 2]);
    std::thread planner;
    if (n > 0 && n + 1 < steps.size()) {
      planner = std::thread([&, n] { ctx.replan(plans[(n + 1) % 2], steps[n + 1].desc()); });
    }
    for (int layer = 0; layer < 2; layer++) run_and_compare(steps[n], launch);
    if (planner.joinable()) planner.join();
  }
  // The re-planned plan is what Context::plan makes.
  const auto a = plans[(steps.size() - 1) % 2].stats();
  const auto b = ctx.plan(steps.back().desc()).stats();
  EXPECT_EQ(a.num_work_items, b.num_work_items);
  EXPECT_EQ(a.num_groups, b.num_groups);
  EXPECT_EQ(a.num_merge_rows, b.num_merge_rows);
  // A bad batch: the exception names the value; the plan is planned again afterwards.
  auto last = steps[1].last;
  last[0] = 99;
  auto bad = steps[1].desc();
  bad.kv_last_page_len = last;
  expect_error([&] { ctx.replan(plans[0], bad); }, Status::InvalidArgument, "packinfer_plan_update: ");
  ctx.replan(plans[0], steps[2].desc());
  EXPECT_EQ(plans[0].stats().num_requests, steps[2].requests.size());
}

TEST(GpuCallsOnCpu, CapacityLaunchRunsAndUpdates) {
  packinfer::Context ctx = cpu_context();
  Case c({8, 2, 64, DType::BF16, true, 0.0f}, 16, kMixed);
  packinfer::Plan plan = ctx.plan(c.desc());
  // The next step's batch: same shape, fewer and shorter requests, so it fits every launch below.
  const Case d({8, 2, 64, DType::BF16, true, 0.0f}, 16, {{1, 60}, {30, 30}, {1, 100}});
  packinfer::Plan next = ctx.plan(d.desc());
  packinfer::LaunchCapacity roomy;
  roomy.max_work_items = roomy.max_row_segments = roomy.max_kv_chunks = roomy.max_requests = 512;
  roomy.max_pages = roomy.max_merge_rows = roomy.max_merge_slots = roomy.max_groups = roomy.max_partial_slots = 512;
  packinfer::LaunchCapacity tight;  // below the plan's counts: grown to them, not an error
  tight.max_work_items = tight.max_requests = tight.max_pages = 1;
  for (const packinfer::LaunchCapacity& cap : {packinfer::LaunchCapacity{}, roomy, tight}) {
    packinfer::Launch launch = ctx.launch_with_capacity(plan, cap);
    ASSERT_TRUE(launch);
    EXPECT_TRUE(launch.ready());
    launch.wait();
    run_and_compare(c, launch);
    launch.update(next);
    EXPECT_TRUE(launch.ready());
    run_and_compare(d, launch);
    // Back to the first batch: a second layer.
    launch.update(plan);
    for (std::size_t i = 0; i < c.q.size(); i++) c.q.set(i, -c.q.get(i));
    run_and_compare(c, launch);
  }
  // A plan bigger than the launch's capacity is refused, naming the count; the launch keeps its plan.
  const Case big({8, 2, 64, DType::BF16, true, 0.0f}, 16, {{1, 70}, {37, 37}, {1, 130}, {5, 40}, {1, 1}, {9, 300}, {1, 500}});
  packinfer::Plan bigger = ctx.plan(big.desc());
  packinfer::Launch launch = ctx.launch_with_capacity(plan, {}, nullptr, {});
  EXPECT_TRUE(launch.suits(plan));
  EXPECT_FALSE(launch.suits(bigger));
  expect_error([&] { launch.update(bigger); }, Status::InvalidArgument,
               "but the launch was created with capacity for");
  run_and_compare(c, launch);
  // So is a plan of another shape.
  const Case wide({8, 2, 128, DType::BF16, true, 0.0f}, 16, {{1, 10}});
  packinfer::Plan other = ctx.plan(wide.desc());
  EXPECT_FALSE(launch.suits(other));
  expect_error([&] { launch.update(other); }, Status::InvalidArgument, "differs from the launch's");
  run_and_compare(c, launch);
  // An ordinary launch takes plans within its own plan's counts.
  packinfer::Launch plain = ctx.launch(plan);
  plain.update(next);
  run_and_compare(d, plain);
}

TEST(GpuCallsOnCpu, CallerScratchThroughACapacityLaunch) {
  const Case c({8, 2, 64, DType::F32, true, 0.0f}, 16, kMixed);
  packinfer::Context ctx = cpu_context();
  // Deterministic 64-key splits: the plan has split partials, so it needs scratch.
  packinfer::Plan plan = ctx.plan(c.desc(), {packinfer::PlanFlags::Deterministic, 64, 0.0});
  const auto stats = plan.stats();
  ASSERT_GT(stats.scratch_bytes, 0u);
  ASSERT_GT(stats.num_split_requests, 0u);
  std::vector<float> scratch(stats.scratch_bytes / sizeof(float) + 1);
  run_and_compare(c, ctx.launch_with_capacity(plan, {}, nullptr, {scratch.data(), scratch.size() * sizeof(float)}));
  expect_error([&] { ctx.launch_with_capacity(plan, {}, nullptr, {scratch.data(), 4}); }, Status::InvalidArgument,
               "scratch_bytes = 4 is smaller than");
}

TEST(GpuCallsOnCpu, InvalidHandles) {
  packinfer::Context ctx = cpu_context();
  const Case c({8, 2, 64, DType::F32, true, 0.0f}, 16, kMixed);
  packinfer::Plan plan = ctx.plan(c.desc());
  packinfer::Launch launch = ctx.launch_with_capacity(plan, {});
  packinfer::Plan empty_plan;
  expect_error([&] { ctx.launch_with_capacity(empty_plan, {}); }, Status::InvalidHandle, "is null");
  expect_error([&] { launch.update(empty_plan); }, Status::InvalidHandle, "packinfer_launch_update: ");
  packinfer::Launch empty_launch;
  expect_error([&] { empty_launch.update(plan); }, Status::InvalidHandle, "is null");
  // Destroyed behind the wrapper's back.
  ASSERT_EQ(packinfer_plan_destroy(plan.handle()), PACKINFER_STATUS_OK);
  expect_error([&] { ctx.launch_with_capacity(plan, {}); }, Status::InvalidHandle, "was destroyed");
  expect_error([&] { launch.update(plan); }, Status::InvalidHandle, "was destroyed");
  (void)plan.release();
  ASSERT_EQ(packinfer_launch_destroy(launch.handle()), PACKINFER_STATUS_OK);
  packinfer::Plan fresh = ctx.plan(c.desc());
  expect_error([&] { launch.update(fresh); }, Status::InvalidHandle, "was destroyed");
  (void)launch.release();
  ASSERT_EQ(packinfer_context_destroy(ctx.handle()), PACKINFER_STATUS_OK);
  expect_error([&] { ctx.precompile(); }, Status::InvalidHandle, "was destroyed");
  expect_error([&] { ctx.calibrate(); }, Status::InvalidHandle, "was destroyed");
  expect_error([&] { ctx.launch_with_capacity(fresh, {}); }, Status::InvalidHandle, "was destroyed");
  (void)ctx.release();
  packinfer::Context empty_ctx;
  expect_error([&] { empty_ctx.precompile(); }, Status::InvalidHandle, "is null");
  expect_error([&] { empty_ctx.calibrate(); }, Status::InvalidHandle, "is null");
}

TEST(ArrayView, ConvertsFromContainers) {
  const std::vector<int32_t> v{1, 2, 3};
  const std::array<int32_t, 2> a{4, 5};
  const int32_t c[4] = {6, 7, 8, 9};
  EXPECT_EQ(packinfer::ArrayView<int32_t>(v).size(), 3u);
  EXPECT_EQ(packinfer::ArrayView<int32_t>(a)[1], 5);
  EXPECT_EQ(packinfer::ArrayView<int32_t>(c).size(), 4u);
  EXPECT_TRUE(packinfer::ArrayView<int32_t>().empty());
}

// ---- the managed KV pool (packinfer::Pool): the library owns the cache ----

static_assert(!std::is_copy_constructible_v<packinfer::Pool>, "handles are move-only");
static_assert(std::is_nothrow_move_assignable_v<packinfer::Pool>, "moves cannot fail");

constexpr uint32_t kPoolLayers = 2, kPoolQoHeads = 4, kPoolKvHeads = 2, kPoolHeadDim = 32, kPoolPage = 4, kPoolPages = 40;
constexpr std::size_t kPoolRow = std::size_t{kPoolKvHeads} * kPoolHeadDim;
constexpr DType kPoolDtype = DType::F16;

packinfer::PoolOptions pool_options() {
  packinfer::PoolOptions o;
  EXPECT_EQ(o.page_size, 16u) << "the C API's default";
  EXPECT_EQ(o.headroom_pages, 2u) << "the C API's default";
  o.num_layers = kPoolLayers;
  o.shape = {kPoolQoHeads, kPoolKvHeads, kPoolHeadDim, kPoolDtype, true, 0.0f};
  o.page_size = kPoolPage;
  o.num_pages = kPoolPages;
  o.headroom_pages = 1;
  return o;
}

// A sequence of the pool and the test's own copy of its K/V (every layer, token order, the
// values the dtype stores): what the reference attends over.
struct Seq {
  packinfer::SequenceId id = 0;
  std::size_t len = 0;
  std::vector<float> k[kPoolLayers], v[kPoolLayers];
};

// Sequence `id` holding the first `len` tokens of `parent` (a fork, a prefix match).
Seq with_prefix(packinfer::SequenceId id, const Seq& parent, std::size_t len) {
  Seq s;
  s.id = id;
  s.len = len;
  for (uint32_t l = 0; l < kPoolLayers; l++) {
    s.k[l].assign(parent.k[l].begin(), parent.k[l].begin() + static_cast<std::ptrdiff_t>(len * kPoolRow));
    s.v[l].assign(parent.v[l].begin(), parent.v[l].begin() + static_cast<std::ptrdiff_t>(len * kPoolRow));
  }
  return s;
}

std::vector<int64_t> append(packinfer::Pool& pool, Seq& s, uint32_t n) {
  std::vector<int64_t> slots = pool.append(s.id, n);
  EXPECT_EQ(slots.size(), n);
  for (std::size_t i = 0; i < slots.size(); i++) {
    EXPECT_GE(slots[i], 0);
    EXPECT_LT(slots[i], int64_t{kPoolPages} * kPoolPage);
    if (i > 0 && (s.len + i) % kPoolPage != 0) {
      EXPECT_EQ(slots[i], slots[i - 1] + 1) << "tokens of one page have consecutive slots";
    }
  }
  s.len += n;
  for (uint32_t l = 0; l < kPoolLayers; l++) {
    s.k[l].resize(s.len * kPoolRow, NAN);
    s.v[l].resize(s.len * kPoolRow, NAN);
  }
  EXPECT_EQ(pool.sequence_length(s.id), s.len);
  return slots;
}

// Random K/V of every layer for the last counts[i] tokens of seqs[i], one write_kv per layer.
// With `scales` ([layer][K, V][kv head], an fp8 pool's) the test records what the pool
// documents it stores: e4m3(x / scale), read back times the scale.
void write(packinfer::Pool& pool, const std::vector<Seq*>& seqs, const std::vector<uint32_t>& counts, std::mt19937& rng,
           const std::vector<float>& scales = {}) {
  auto stored = [&](uint32_t l, bool v_side, std::size_t e, float x) {
    if (scales.empty()) return x;
    const float scale = scales[(std::size_t{l} * 2 + (v_side ? 1 : 0)) * kPoolKvHeads + e / kPoolHeadDim];
    return from_e4m3(to_e4m3(x / scale)) * scale;
  };
  std::vector<packinfer::SequenceId> ids;
  uint32_t rows = 0;
  for (std::size_t i = 0; i < seqs.size(); i++) {
    ids.push_back(seqs[i]->id);
    rows += counts[i];
  }
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (uint32_t l = 0; l < kPoolLayers; l++) {
    Tensor k(kPoolDtype, rows * kPoolRow), v(kPoolDtype, rows * kPoolRow);
    std::size_t at = 0;
    for (std::size_t i = 0; i < seqs.size(); i++) {
      for (std::size_t t = seqs[i]->len - counts[i]; t < seqs[i]->len; t++) {
        for (std::size_t e = 0; e < kPoolRow; e++, at++) {
          seqs[i]->k[l][t * kPoolRow + e] = stored(l, false, e, k.set(at, u(rng)));
          seqs[i]->v[l][t * kPoolRow + e] = stored(l, true, e, v.set(at, u(rng)));
        }
      }
    }
    pool.write_kv(l, ids, counts, packinfer::KvSource{k.data(), v.data(), rows, kPoolKvHeads, kPoolHeadDim, kPoolDtype, 0});
  }
}

// Plans a step from the pool, optionally relays it out (and plans again), runs every layer with
// the pool's layout and compares with attention over the K/V the test wrote.
packinfer::RelayoutReport step(const packinfer::Context& ctx, packinfer::Pool& pool, const std::vector<Seq*>& seqs,
                               const std::vector<uint32_t>& q_lens, bool relayout, std::mt19937& rng) {
  std::vector<packinfer::SequenceId> ids;
  std::size_t total_q = 0;
  for (std::size_t i = 0; i < seqs.size(); i++) {
    ids.push_back(seqs[i]->id);
    total_q += q_lens[i];
  }
  packinfer::Plan plan = pool.plan(ctx, ids, q_lens);
  EXPECT_EQ(plan.stats().num_requests, seqs.size());
  packinfer::RelayoutReport report{};
  if (relayout) {
    const packinfer::PoolStats before = pool.stats();
    report = pool.relayout(plan, ids, /*regroup=*/true);
    EXPECT_EQ(report.groups, report.groups_in_place + report.groups_rebuilt + report.groups_no_room);
    EXPECT_EQ(pool.stats().relayout_pages_moved, before.relayout_pages_moved + report.pages_moved);
    pool.replan(ctx, plan, ids, q_lens);  // the old step is stale if pages moved
  }
  packinfer::Launch launch = ctx.launch(plan);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  const std::size_t n_out = total_q * kPoolQoHeads * kPoolHeadDim;
  const double scale = 1.0 / std::sqrt(double(kPoolHeadDim));
  for (uint32_t l = 0; l < kPoolLayers; l++) {
    Tensor q(kPoolDtype, n_out), o(kPoolDtype, n_out);
    for (std::size_t i = 0; i < n_out; i++) {
      q.set(i, u(rng));
      o.set(i, NAN);
    }
    std::vector<float> lse(total_q * kPoolQoHeads, NAN);
    launch.run(pool.run_args(l, q.data(), o.data(), lse.data()));
    int bad = 0;
    std::size_t tok = 0;
    for (std::size_t r = 0; r < seqs.size(); r++) {
      const Seq& s = *seqs[r];
      for (std::size_t i = 0; i < q_lens[r]; i++, tok++) {
        const std::size_t visible = s.len - q_lens[r] + i + 1;  // causal, bottom-right aligned
        for (std::size_t h = 0; h < kPoolQoHeads; h++) {
          const std::size_t kvh = h / (kPoolQoHeads / kPoolKvHeads);
          std::vector<double> p(visible);
          double m = -INFINITY, z = 0.0;
          for (std::size_t j = 0; j < visible; j++) {
            double dot = 0.0;
            for (std::size_t e = 0; e < kPoolHeadDim; e++)
              dot += double(q.get((tok * kPoolQoHeads + h) * kPoolHeadDim + e)) * s.k[l][j * kPoolRow + kvh * kPoolHeadDim + e];
            p[j] = dot * scale;
            m = std::max(m, p[j]);
          }
          for (double x : p) z += std::exp(x - m);
          for (std::size_t e = 0; e < kPoolHeadDim; e++) {
            double want = 0.0;
            for (std::size_t j = 0; j < visible; j++) want += std::exp(p[j] - m) / z * s.v[l][j * kPoolRow + kvh * kPoolHeadDim + e];
            const double got = o.get((tok * kPoolQoHeads + h) * kPoolHeadDim + e);
            if (!(std::fabs(got - want) <= 2e-3 * (1.0 + std::fabs(want))) && bad++ < 5)
              ADD_FAILURE() << "layer " << l << ", request " << r << " (sequence " << s.id << "), query " << i << ", head " << h
                            << ", dim " << e << ": O = " << got << ", reference " << want;
          }
          const double want_lse = m + std::log(z);
          if (!(std::fabs(lse[tok * kPoolQoHeads + h] - want_lse) <= 1e-3 * (1.0 + std::fabs(want_lse))) && bad++ < 5)
            ADD_FAILURE() << "layer " << l << ", request " << r << ": LSE = " << lse[tok * kPoolQoHeads + h] << ", reference " << want_lse;
        }
      }
    }
  }
  return report;
}

void expect_same_stats(const packinfer::PoolStats& a, const packinfer::PoolStats& b) {
  EXPECT_EQ(a.num_pages, b.num_pages);
  EXPECT_EQ(a.pages_used, b.pages_used);
  EXPECT_EQ(a.pages_free, b.pages_free);
  EXPECT_EQ(a.num_sequences, b.num_sequences);
  EXPECT_EQ(a.tokens_logical, b.tokens_logical);
  EXPECT_EQ(a.tokens_stored, b.tokens_stored);
  EXPECT_EQ(a.slots_reserved_unused, b.slots_reserved_unused);
  EXPECT_EQ(a.step_read_bytes_shared, b.step_read_bytes_shared);
  EXPECT_EQ(a.step_read_bytes_unshared, b.step_read_bytes_unshared);
  EXPECT_EQ(a.relayouts, b.relayouts);
  EXPECT_EQ(a.relayout_pages_moved, b.relayout_pages_moved);
  EXPECT_EQ(a.relayout_bytes_moved, b.relayout_bytes_moved);
  EXPECT_EQ(a.cow_page_copies, b.cow_page_copies);
}

TEST(Pool, ManagedFlowAgainstTheReference) {
  std::mt19937 rng(5);
  packinfer::Context ctx = cpu_context();
  packinfer::Pool pool(ctx, pool_options());
  const packinfer::KvLayout l0 = pool.kv_layout(0), l1 = pool.kv_layout(1);
  EXPECT_EQ(l0.stride_token, static_cast<int64_t>(kPoolRow));
  EXPECT_EQ(l0.stride_page, static_cast<int64_t>(kPoolPage * kPoolRow));
  EXPECT_NE(l0.k, l1.k);

  // Step 1: two prompts, appended in turns so that A's pages are scattered.
  Seq a, b;
  a.id = pool.create_sequence();
  b.id = pool.create_sequence();
  EXPECT_NE(a.id, b.id);
  append(pool, a, 4);
  const int64_t first_slot_b = append(pool, b, 4)[0];
  append(pool, a, 9);
  append(pool, b, 3);
  write(pool, {&a, &b}, {13, 7}, rng);
  // B's first token is in the slot append gave it (layer 1's V; f16 elements).
  const auto* stored = static_cast<const uint16_t*>(l1.v) + first_slot_b * l1.stride_token;
  for (std::size_t e = 0; e < kPoolRow; e++) ASSERT_EQ(from_f16(stored[e]), b.v[1][e]) << "element " << e;
  step(ctx, pool, {&a, &b}, {13, 7}, false, rng);
  packinfer::PoolStats st = pool.stats();
  EXPECT_EQ(st.num_sequences, 2u);
  EXPECT_EQ(st.tokens_logical, 20u);
  EXPECT_EQ(st.pages_used + st.pages_free, kPoolPages);

  // Step 2: C shares A's first two pages; D's fork copies A's partly covered third page.
  Seq c = with_prefix(pool.fork(a.id, 8), a, 8), d = with_prefix(pool.fork(a.id, 10), a, 10);
  st = pool.stats();
  EXPECT_EQ(st.tokens_logical, 38u);
  EXPECT_EQ(st.tokens_stored, 22u);
  EXPECT_EQ(st.cow_page_copies, 1u);
  append(pool, a, 1);
  append(pool, b, 1);
  append(pool, c, 3);
  append(pool, d, 2);
  write(pool, {&a, &b, &c, &d}, {1, 1, 3, 2}, rng);
  const packinfer::RelayoutReport r = step(ctx, pool, {&a, &b, &c, &d}, {1, 1, 3, 2}, true, rng);
  EXPECT_GE(r.groups_rebuilt, 1u) << "A's pages are scattered; a regroup relayout must rebuild its group";
  EXPECT_GE(r.pages_moved, 1u);
  EXPECT_GE(pool.stats().relayouts, 1u);

  // Content hashes: E finds A's first two pages.
  const std::vector<uint64_t> hashes{0x1111, 0x2222, 0x3333};
  pool.register_page_hashes(a.id, packinfer::ArrayView<uint64_t>(hashes.data(), 2));
  const packinfer::SequenceId e_id = pool.create_sequence();
  ASSERT_EQ(pool.match_prefix(e_id, hashes), 8u);
  Seq e = with_prefix(e_id, a, 8);

  // Step 3: B is done; D goes back a token and takes another path; E continues A's prefix.
  pool.release(b.id);
  pool.truncate(d.id, 9);
  d = with_prefix(d.id, d, 9);
  append(pool, a, 1);
  append(pool, d, 1);
  append(pool, e, 2);
  write(pool, {&a, &d, &e}, {1, 1, 2}, rng);
  step(ctx, pool, {&a, &d, &e, &c}, {1, 1, 2, 1}, true, rng);
  st = pool.stats();
  EXPECT_EQ(st.num_sequences, 4u);
  EXPECT_EQ(st.tokens_logical, a.len + c.len + d.len + e.len);
  EXPECT_LT(st.tokens_stored, st.tokens_logical) << "C, D and E share A's first pages";
}

TEST(Pool, Fp8PoolAgainstTheReference) {
  // A pool that stores K/V as fp8 e4m3 with per-layer, per-head scales: written from f16 rows,
  // read by runs through pool.run_args (layout and scales), through a fork and a relayout.
  std::mt19937 rng(8);
  packinfer::Context ctx = cpu_context();
  packinfer::PoolOptions o = pool_options();
  o.kv_dtype = DType::FP8_E4M3;
  const std::vector<float> scales{0.01f, 0.02f, 0.004f, 0.008f, 0.03f, 0.005f, 0.015f, 0.002f};  // saturates some
  o.kv_head_scales = scales;
  packinfer::Pool pool(ctx, o);
  const auto s0 = pool.kv_head_scales(0), s1 = pool.kv_head_scales(1);
  ASSERT_NE(s0.first, nullptr);
  EXPECT_EQ(s0.first[1], 0.02f);
  EXPECT_EQ(s0.second[0], 0.004f);
  EXPECT_EQ(s1.second[1], 0.002f);
  Seq a, b;
  a.id = pool.create_sequence();
  b.id = pool.create_sequence();
  append(pool, a, 6);
  append(pool, b, 5);
  append(pool, a, 7);
  write(pool, {&a, &b}, {13, 5}, rng, scales);
  step(ctx, pool, {&a, &b}, {13, 5}, false, rng);
  EXPECT_EQ(pool.stats().step_read_bytes_unshared, 18u * kPoolLayers * 2 * kPoolRow) << "one byte per element";
  Seq c = with_prefix(pool.fork(a.id, 8), a, 8);
  append(pool, a, 1);
  append(pool, c, 2);
  write(pool, {&a, &c}, {1, 2}, rng, scales);
  step(ctx, pool, {&a, &b, &c}, {1, 1, 2}, true, rng);
  // The scales' count is checked by the wrapper; a pool of Q's dtype has none.
  o.kv_head_scales = packinfer::ArrayView<float>(scales.data(), 7);
  try {
    packinfer::Pool bad(ctx, o);
    ADD_FAILURE() << "7 scales were accepted";
  } catch (const packinfer::Error& e) {
    EXPECT_NE(std::string(e.what()).find("kv_head_scales has 7 entries"), std::string::npos) << e.what();
  }
  packinfer::Pool plain(ctx, pool_options());
  EXPECT_EQ(plain.kv_head_scales(0).first, nullptr);
}

TEST(Pool, ExhaustedAppendLeavesThePoolUnchangedAndUsable) {
  std::mt19937 rng(6);
  packinfer::Context ctx = cpu_context();
  packinfer::Pool pool(ctx, pool_options());
  Seq a;
  a.id = pool.create_sequence();
  append(pool, a, 10);
  write(pool, {&a}, {10}, rng);
  const packinfer::PoolStats before = pool.stats();
  expect_error([&] { pool.append(a.id, kPoolPages * kPoolPage); }, Status::PoolExhausted, "nothing was changed");
  expect_same_stats(before, pool.stats());
  // Far more than the pool holds: refused the same way, without allocating 2^30 slots first.
  expect_error([&] { pool.append(a.id, 1u << 30); }, Status::PoolExhausted, "appending n = 1073741824 tokens");
  expect_same_stats(before, pool.stats());
  EXPECT_EQ(pool.sequence_length(a.id), 10u);
  // A fork whose partly covered page finds no free page is refused the same way.
  std::vector<Seq> fillers;
  while (pool.stats().pages_free > 0) {
    fillers.emplace_back();
    fillers.back().id = pool.create_sequence();
    append(pool, fillers.back(), kPoolPage);
  }
  const packinfer::PoolStats full = pool.stats();
  expect_error([&] { pool.fork(a.id, 5); }, Status::PoolExhausted, "nothing was changed");
  expect_error([&] { pool.append(a.id, 3); }, Status::PoolExhausted, "appending n = 3 tokens");
  expect_same_stats(full, pool.stats());
  // Still usable: two tokens fit in A's last page, and a step runs.
  append(pool, a, 2);
  write(pool, {&a}, {2}, rng);
  step(ctx, pool, {&a}, {2}, false, rng);
  for (const Seq& f : fillers) pool.release(f.id);
  EXPECT_EQ(pool.stats().num_sequences, 1u);
}

TEST(Pool, BadSequenceIdsAndArguments) {
  packinfer::Context ctx = cpu_context();
  packinfer::Pool pool(ctx, pool_options());
  const packinfer::SequenceId a = pool.create_sequence(), b = pool.create_sequence();
  pool.append(a, 3);
  pool.release(b);
  expect_error([&] { (void)pool.sequence_length(9999); }, Status::InvalidArgument, "sequence id 9999 is not a live sequence");
  expect_error([&] { pool.append(b, 1); }, Status::InvalidArgument, "sequence id " + std::to_string(b));
  expect_error([&] { pool.release(b); }, Status::InvalidArgument, "is not a live sequence");
  expect_error([&] { pool.fork(b, 0); }, Status::InvalidArgument, "is not a live sequence");
  expect_error([&] { pool.truncate(a, 5); }, Status::InvalidArgument, "len = 5 is longer");
  expect_error([&] { pool.plan(ctx, std::vector<packinfer::SequenceId>{a, b}, std::vector<uint32_t>{1, 1}); },
               Status::InvalidArgument, "is not a live sequence");
  std::vector<uint16_t> rows(4 * kPoolRow);
  packinfer::KvSource src{rows.data(), rows.data(), 1, kPoolKvHeads, kPoolHeadDim, kPoolDtype, 0};
  expect_error([&] { pool.write_kv(0, std::vector<packinfer::SequenceId>{b}, std::vector<uint32_t>{1}, src); },
               Status::InvalidArgument, "is not a live sequence");
  packinfer::KvSource four = src;
  four.num_rows = 4;
  expect_error([&] { pool.write_kv(0, std::vector<packinfer::SequenceId>{a}, std::vector<uint32_t>{4}, four); },
               Status::InvalidArgument, "num_tokens[0] = 4 but sequence");
  src.dtype = DType::BF16;
  expect_error([&] { pool.write_kv(0, std::vector<packinfer::SequenceId>{a}, std::vector<uint32_t>{1}, src); },
               Status::InvalidArgument, "src->dtype");
  expect_error([&] { (void)pool.kv_layout(kPoolLayers); }, Status::InvalidArgument, "layer = 2");
  // Arrays that pair up: the wrapper checks their lengths (the C API takes one count).
  expect_error([&] { pool.write_kv(0, std::vector<packinfer::SequenceId>{a, a}, std::vector<uint32_t>{1}, src); },
               Status::InvalidArgument, "packinfer::Pool::write_kv: num_tokens has 1 entries but seq_ids has 2");
  expect_error([&] { pool.plan(ctx, std::vector<packinfer::SequenceId>{a}, std::vector<uint32_t>{}); },
               Status::InvalidArgument, "packinfer::Pool::plan: num_new_tokens has 0 entries but seq_ids has 1");
  packinfer::Plan plan = pool.plan(ctx, std::vector<packinfer::SequenceId>{a}, std::vector<uint32_t>{3});
  expect_error([&] { pool.relayout(plan, std::vector<packinfer::SequenceId>{a, a}, true); }, Status::InvalidArgument, "2 seq_ids");
  expect_error([&] { pool.replan(ctx, plan, std::vector<packinfer::SequenceId>{a}, std::vector<uint32_t>{}); },
               Status::InvalidArgument, "packinfer::Pool::replan: num_new_tokens has 0 entries but seq_ids has 1");
  expect_error([&] { pool.replan(ctx, plan, std::vector<packinfer::SequenceId>{a, a}, std::vector<uint32_t>{1, 1}); },
               Status::InvalidArgument, "repeats");
  EXPECT_EQ(plan.stats().num_requests, 0u);  // a planning error leaves no work
  pool.replan(ctx, plan, std::vector<packinfer::SequenceId>{a}, std::vector<uint32_t>{3});
  EXPECT_EQ(plan.stats().num_requests, 1u);
  // Options.
  packinfer::PoolOptions o = pool_options();
  o.num_layers = 0;
  expect_error([&] { packinfer::Pool p(ctx, o); }, Status::InvalidArgument, "num_layers = 0");
  o = pool_options();
  o.shape.num_qo_heads = 3;
  expect_error([&] { packinfer::Pool p(ctx, o); }, Status::InvalidArgument, "num_qo_heads = 3");
}

TEST(Pool, RaiiAndUseAfterDestroy) {
  packinfer::Context ctx = cpu_context();
  PackinferPool raw{};
  {
    packinfer::Pool pool(ctx, pool_options());
    raw = pool.handle();
    (void)pool.create_sequence();
  }
  EXPECT_EQ(packinfer_pool_destroy(raw), PACKINFER_STATUS_INVALID_HANDLE) << "the destructor left the pool alive";

  packinfer::Pool a(ctx, pool_options());
  const PackinferPool a_raw = a.handle();
  packinfer::Pool b = std::move(a);
  EXPECT_FALSE(a);  // NOLINT(bugprone-use-after-move): checking the moved-from state
  EXPECT_EQ(b.handle().bits, a_raw.bits);
  expect_error([&] { a.create_sequence(); }, Status::InvalidHandle, "is null");  // NOLINT(bugprone-use-after-move)
  const packinfer::SequenceId s = b.create_sequence();
  b.reset();
  EXPECT_FALSE(b);
  expect_error([&] { (void)b.stats(); }, Status::InvalidHandle, "is null");
  // Destroyed behind the wrapper's back: every call and reset() report it.
  packinfer::Pool c(ctx, pool_options());
  const packinfer::SequenceId cs = c.create_sequence();
  ASSERT_EQ(packinfer_pool_destroy(c.handle()), PACKINFER_STATUS_OK);
  expect_error([&] { (void)c.stats(); }, Status::InvalidHandle, "was destroyed");
  expect_error([&] { c.append(cs, 1); }, Status::InvalidHandle, "was destroyed");
  expect_error([&] { (void)c.sequence_length(s); }, Status::InvalidHandle, "was destroyed");
  expect_error([&] { (void)c.kv_layout(0); }, Status::InvalidHandle, "was destroyed");
  expect_error([&] { c.plan(ctx, std::vector<packinfer::SequenceId>{cs}, std::vector<uint32_t>{1}); }, Status::InvalidHandle, "pool handle");
  expect_error([&] { c.reset(); }, Status::InvalidHandle, "was destroyed");
  // A pool on a context that is gone.
  packinfer::Context gone = cpu_context();
  gone.reset();
  expect_error([&] { packinfer::Pool p(gone, pool_options()); }, Status::InvalidHandle, "context handle");
}

// ---- the scheduler (packinfer::Scheduler): capacity, regroup and relayout per step ----

static_assert(!std::is_copy_constructible_v<packinfer::Scheduler>, "handles are move-only");

// A serving loop: every step planned by the scheduler, run on every layer, its time recorded.
// With `kept`, every step after the first re-plans the first step's plan (Scheduler::replan).
packinfer::SchedulerStats serve(const packinfer::Context& ctx, packinfer::Pool& pool, packinfer::Scheduler& sched,
                                std::vector<packinfer::SequenceId>& ids, const std::vector<uint32_t>& first, int decodes,
                                std::vector<packinfer::SchedulerStep>* steps, packinfer::Plan* kept = nullptr) {
  for (int t = 0; t <= decodes; t++) {
    std::vector<uint32_t> q = t == 0 ? first : std::vector<uint32_t>(ids.size(), 1);
    std::size_t total_q = 0;
    for (std::size_t i = 0; i < ids.size(); i++) {
      pool.append(ids[i], q[i]);
      total_q += q[i];
    }
    packinfer::SchedulerStep step{};
    packinfer::Plan fresh;
    if (kept != nullptr && *kept) {
      sched.replan(ctx, *kept, ids, q, {}, nullptr, &step);
    } else {
      fresh = sched.plan(ctx, ids, q, {}, nullptr, &step);
      if (kept != nullptr) *kept = std::move(fresh);
    }
    const packinfer::Plan& plan = kept != nullptr ? *kept : fresh;
    EXPECT_GT(step.capacity, 0.0);
    if (steps != nullptr) steps->push_back(step);
    packinfer::Launch launch = ctx.launch(plan);
    const std::size_t n = total_q * kPoolQoHeads * kPoolHeadDim;
    Tensor qt(kPoolDtype, n), o(kPoolDtype, n);
    for (std::size_t i = 0; i < n; i++) {
      qt.set(i, 0.5f);
      o.set(i, NAN);
    }
    const auto start = std::chrono::steady_clock::now();
    for (uint32_t l = 0; l < kPoolLayers; l++) launch.run(packinfer::RunArgs(qt.data(), pool.kv_layout(l), o.data(), nullptr));
    sched.record(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    for (std::size_t i = 0; i < n; i++) EXPECT_FALSE(std::isnan(o.get(i))) << "output " << i << " of step " << t;
  }
  return sched.stats();
}

TEST(Scheduler, ServingLoopOnTheCpu) {
  packinfer::Context ctx = cpu_context();
  packinfer::PoolOptions po = pool_options();
  po.num_pages = 400;
  packinfer::Pool pool(ctx, po);
  // The defaults are the C library's.
  PackinferSchedulerOptions c{};
  c.struct_size = sizeof(c);
  ASSERT_EQ(packinfer_scheduler_options_default(&c), PACKINFER_STATUS_OK);
  const packinfer::SchedulerOptions d;
  EXPECT_EQ(c.horizon_steps, d.horizon_steps);
  EXPECT_EQ(c.capacity_factor, d.capacity_factor);
  EXPECT_EQ(c.copy_bytes_per_second, d.copy_bytes_per_second);
  EXPECT_EQ(c.contiguous_gain, d.contiguous_gain);
  EXPECT_EQ(c.explore_fraction, d.explore_fraction);

  packinfer::Scheduler sched(pool);
  std::vector<packinfer::SequenceId> ids;
  for (int i = 0; i < 5; i++) ids.push_back(pool.create_sequence());
  std::vector<packinfer::SchedulerStep> steps;
  const packinfer::SchedulerStats st = serve(ctx, pool, sched, ids, {3, 17, 9, 30, 5}, 20, &steps);
  EXPECT_EQ(st.steps, 21u);
  EXPECT_GE(st.regroups, 1u);
  EXPECT_TRUE(steps[0].regrouped) << "the first step makes the first grouping";
  EXPECT_EQ(st.relayouts, st.probes) << "nothing measured a gain: every relayout was a probe";
  EXPECT_EQ(st.capacity_searches, 1u);
  EXPECT_GT(st.attention_seconds, 0.0);

  // Relayout always: pages move, and the plan returned after the move runs (not stale).
  packinfer::Pool pool2(ctx, po);
  packinfer::Scheduler always(pool2, {packinfer::SchedulerFlags::RelayoutAlways});
  std::vector<packinfer::SequenceId> ids2;
  for (int i = 0; i < 4; i++) ids2.push_back(pool2.create_sequence());
  for (int r = 0; r < 3; r++)
    for (packinfer::SequenceId id : ids2) pool2.append(id, 5);  // interleaved pages
  const packinfer::SchedulerStats st2 = serve(ctx, pool2, always, ids2, {1, 1, 1, 1}, 3, nullptr);
  EXPECT_GE(st2.relayouts, 1u);
  EXPECT_GT(st2.bytes_moved, 0u);
}

TEST(Scheduler, ReplanDecidesAsPlanAndKeepsOneHandle) {
  packinfer::Context ctx = cpu_context();
  packinfer::PoolOptions po = pool_options();
  po.num_pages = 400;
  // Decisions that do not depend on measured times: a fixed factor, no relayouts.
  packinfer::SchedulerOptions so{packinfer::SchedulerFlags::NoTuning | packinfer::SchedulerFlags::NoRelayout};
  so.capacity_factor = 0.4;
  std::vector<packinfer::SchedulerStep> by_plan, by_replan;
  packinfer::Plan kept;
  PackinferPlan first{};
  for (int replan = 0; replan < 2; replan++) {
    packinfer::Pool pool(ctx, po);
    packinfer::Scheduler sched(pool, so);
    std::vector<packinfer::SequenceId> ids;
    for (int i = 0; i < 5; i++) ids.push_back(pool.create_sequence());
    serve(ctx, pool, sched, ids, {3, 17, 9, 30, 5}, 1, replan ? &by_replan : &by_plan, replan ? &kept : nullptr);
    first = kept.handle();
    serve(ctx, pool, sched, ids, {1, 1, 1, 1, 1}, 10, replan ? &by_replan : &by_plan, replan ? &kept : nullptr);
  }
  EXPECT_EQ(kept.handle().bits, first.bits) << "every step re-planned the first step's plan";
  ASSERT_EQ(by_plan.size(), by_replan.size());
  for (std::size_t i = 0; i < by_plan.size(); i++) {
    EXPECT_EQ(by_plan[i].capacity, by_replan[i].capacity) << "step " << i;
    EXPECT_EQ(by_plan[i].capacity_factor, 0.4);
    EXPECT_EQ(by_plan[i].regrouped, by_replan[i].regrouped) << "step " << i;
    EXPECT_EQ(by_plan[i].imbalance, by_replan[i].imbalance) << "step " << i;
  }
}

TEST(Scheduler, BadArgumentsAndHandles) {
  packinfer::Context ctx = cpu_context();
  packinfer::Pool pool(ctx, pool_options());
  packinfer::SchedulerOptions o;
  o.horizon_steps = 0;
  expect_error([&] { packinfer::Scheduler s(pool, o); }, Status::InvalidArgument, "horizon_steps = 0");
  o = {};
  o.flags = packinfer::SchedulerFlags::NoRelayout | packinfer::SchedulerFlags::RelayoutAlways;
  expect_error([&] { packinfer::Scheduler s(pool, o); }, Status::InvalidArgument, "NO_RELAYOUT and RELAYOUT_ALWAYS");
  packinfer::Scheduler sched(pool);
  expect_error([&] { sched.record(1e-3); }, Status::InvalidArgument, "record without a step");
  const packinfer::SequenceId id = pool.create_sequence();
  pool.append(id, 3);
  expect_error([&] { sched.plan(ctx, std::vector<packinfer::SequenceId>{id}, std::vector<uint32_t>{}); }, Status::InvalidArgument,
               "num_new_tokens has 0 entries");
  packinfer::Plan plan = sched.plan(ctx, std::vector<packinfer::SequenceId>{id}, std::vector<uint32_t>{3});
  expect_error([&] { sched.record(-1.0); }, Status::InvalidArgument, "attention_seconds = -1");
  sched.record(1e-3);
  packinfer::Scheduler moved = std::move(sched);
  EXPECT_FALSE(sched);  // NOLINT(bugprone-use-after-move): checking the moved-from state
  expect_error([&] { (void)sched.stats(); }, Status::InvalidHandle, "is null");  // NOLINT(bugprone-use-after-move)
  EXPECT_EQ(moved.stats().steps, 1u);
  moved.reset();
  expect_error([&] { (void)moved.stats(); }, Status::InvalidHandle, "is null");
}

}  // namespace
