// The tied-beta AdamW step for one flat CPU tensor, as a native loop on ATen's vector types
// (at::vec::Vectorized), built at first use by torch.utils.cpp_extension (native_cpu.py), as
// DeepSpeed builds its CPU Adam. One function per storage combination (param dtype, moment
// format); the flags (master weights, AMP scale, stochastic rounding) are loop-invariant
// branches. The math is tied_adamw_cpu.py's ``tied_adamw_step`` operation for operation, in
// fp32, without contraction (built with -ffp-contract=off), so rounding to nearest gives the
// Triton kernel's bits (its interpreter) and stochastic rounding the compiled step's bits (the
// same counter-based hash, Note [cpu rng] in tied_adamw_cpu.py).
//
// Note [native blocks]
// --------------------
// Elements go in blocks of two float vectors (2 x Vectorized<float>::size(): 32 with AVX-512,
// 16 with AVX2), the width of one Vectorized<BFloat16> load or store. The last partial block is
// copied into zero-padded local buffers, stepped by the same code and copied back, so every
// element of every size goes through one sequence of operations (no scalar tail that could
// round differently). OpenMP (at::parallel_for) splits the work into ranges of whole blocks.
//
// Note [native many]
// ------------------
// ``step_many`` takes a param group's tensors in one call (a CPU multi-tensor apply, the way
// torch's fused op takes lists): every tensor is cut into chunks of kChunkBlocks blocks (its
// last partial block in its last chunk), and OpenMP runs over the chunks of all tensors, so
// 2,000 small tensors cost one call and one parallel region, and one large tensor splits as
// before. Each tensor brings its own scalars row (its step count may differ from its
// neighbours') and rounding key. With telemetry, each chunk reduces its own partial row
// (Note [native telemetry]) and the rows are summed per tensor in chunk order afterwards, so
// the result does not depend on the thread count's split.
//
// Note [native telemetry]
// -----------------------
// TiedAdamW(telemetry=True)'s five fields (optim/telemetry.py) from the values the update just
// used, in registers: g the unscaled, clipped grad; u = q / c (q the step's m / (sqrt(v) /
// sqrt(c) + eps), c = 1 - beta^t); |m| / (sqrt(v) sqrt(c)) > threshold, with sqrt(v) = 0
// counted as |m| > threshold (as torch_rows divides by 1 there); max |u| skips a NaN u (a NaN
// grad's), as the kernel's max does, the grad's NaN showing in its count. Sums run in fp32 lanes for
// kFlushBlocks blocks and are then added into fp64, so a 1e8-element tensor's sums keep fp32's
// relative precision; counts are exact.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <array>
#include <cstring>
#include <vector>
#include <limits>

namespace {

using at::vec::Vectorized;
using Vec = Vectorized<float>;
using IVec = Vectorized<int32_t>;
constexpr int64_t VS = Vec::size();
constexpr int64_t BLOCK = 2 * VS;

constexpr int32_t kQNaN = 0x7FC00000;
constexpr int32_t kHigh16 = static_cast<int32_t>(0xFFFF0000u);
constexpr int32_t kLowbiasA = 0x7FEB352D;
constexpr int32_t kLowbiasB = static_cast<int32_t>(0x846CA68Bu);
constexpr int32_t kStream1 = 0x632BE5AB;
constexpr float kLevels = 127.0f;
constexpr float kNoiseScale = 1.0f / 65536.0f;

// The per-program scalars of tied_adamw_cpu.scalars(), in its order (and c = 1 - beta^t, the
// telemetry's, in step_many's twelfth column).
struct Scalars {
  float decay, omb, beta, coef, step_size, bc_sqrt, eps, inv_scale, inv_bc_sqrt, clip, bound, c;
};

constexpr int64_t kChunkBlocks = 2048;  // Note [native many]
constexpr int64_t kFlushBlocks = 64;    // Note [native telemetry]

// One chunk's telemetry: fp32 lanes, flushed into the fp64 totals every kFlushBlocks blocks.
struct Tel {
  bool on = false;
  float inv_c = 1.0f, sqrt_c = 1.0f, thr = 0.0f;
  Vec gsq{0.0f}, usq{0.0f}, umax{0.0f}, bad{0.0f}, snr{0.0f};
  double total[5] = {0.0, 0.0, 0.0, 0.0, 0.0};  // the TELEMETRY_FIELDS order
  void add(const Vec& gu, const Vec& m, const Vec& sv, const Vec& q) {
    gsq = gsq + gu * gu;
    Vec u = q * Vec(inv_c);
    usq = usq + u * u;
    Vec au = u.abs();
    umax = Vec::blendv(umax, au, au > umax);  // a NaN u is skipped, as the kernel's max does
    Vec d = gu - gu;  // NaN exactly where gu is not finite
    bad = bad + Vec::blendv(Vec(0.0f), Vec(1.0f), d != d);
    Vec lim = Vec::blendv(Vec(thr), sv * Vec(sqrt_c) * Vec(thr), sv > Vec(0.0f));
    snr = snr + Vec::blendv(Vec(0.0f), Vec(1.0f), m.abs() > lim);
  }
  void flush() {
    auto sum = [](const Vec& x) {
      return static_cast<double>(at::vec::vec_reduce_all<float>(
          [](Vec& a, Vec& b) { return a + b; }, x));
    };
    total[0] += sum(gsq);
    total[1] += sum(usq);
    total[2] = std::max(total[2], static_cast<double>(at::vec::vec_reduce_all<float>(
        [](Vec& a, Vec& b) { return Vec::blendv(a, b, b > a); }, umax)));
    total[3] += sum(bad);
    total[4] += sum(snr);
    gsq = usq = umax = bad = snr = Vec(0.0f);
  }
};

inline IVec shr(const IVec& x, int k) {  // logical shift right of int32 lanes
  return (x >> IVec(k)) & IVec(static_cast<int32_t>((1u << (32 - k)) - 1u));
}

inline IVec lowbias32(IVec x) {
  x = x ^ shr(x, 16);
  x = x * IVec(kLowbiasA);
  x = x ^ shr(x, 15);
  x = x * IVec(kLowbiasB);
  return x ^ shr(x, 16);
}

// 32 random bits for the elements base + [0, VS) (Note [cpu rng]): h = H(H(i ^ k_lo) ^ k_hi),
// i the element index (xor-ed with its high word: Note [cpu index]), one more round for stream 1.
inline IVec random_bits(int64_t base, int32_t k0, int32_t k1, bool stream1) {
  IVec idx;
  if (base + VS <= (int64_t{1} << 31)) {  // below 2**31 the index is its own low word
    idx = IVec::arange(static_cast<int32_t>(base), 1);
  } else {
    alignas(64) int32_t lo[VS];
    for (int64_t j = 0; j < VS; ++j) {
      int64_t i = base + j;
      lo[j] = static_cast<int32_t>(i ^ (i >> 32));
    }
    idx = IVec::loadu(lo);
  }
  IVec h = lowbias32(idx ^ IVec(k0));
  h = lowbias32(h ^ IVec(k1));
  if (stream1) h = lowbias32(h ^ IVec(kStream1));
  return h;
}

inline IVec bits_of(const Vec& x) { return at::vec::cast<int32_t>(x); }
inline Vec float_of(const IVec& x) { return at::vec::cast<float>(x); }

// fp32 -> a bf16 value held in fp32: to nearest even (add 0x7FFF plus the lowest kept bit) or
// stochastically (add 16 random bits), every NaN made 0x7FC00000 first; keep the high half.
// (bf16_round.py's round_bf16 / rounded_bf16_value, the kernel's _rne_bf16 / _round_to_bf16.)
inline Vec round_bf16(const Vec& x, const IVec* r16) {
  IVec nan_mask = at::vec::cast<int32_t>(x != x);
  IVec bits = IVec::blendv(bits_of(x), IVec(kQNaN), nan_mask);
  bits = bits + (r16 ? *r16 : IVec(0x7FFF) + (shr(bits, 16) & IVec(1)));
  return float_of(bits & IVec(kHigh16));
}

// x clamped to [-b, b], NaN to -b (ratio8._clamp).
inline Vec clamp_nan_low(const Vec& x, const Vec& b) {
  Vec lo = Vec(0.0f) - b;
  Vec y = Vec::blendv(x, lo, x != x);
  y = Vec::blendv(y, lo, y < lo);
  return Vec::blendv(y, b, y > b);
}

// ---- loads and stores of one block (2 vectors) in each storage type
template <typename T>
struct Io;

template <>
struct Io<float> {
  static void load(const float* p, Vec& a, Vec& b) { a = Vec::loadu(p); b = Vec::loadu(p + VS); }
  static void store(float* p, const Vec& a, const Vec& b) { a.store(p); b.store(p + VS); }
};

template <>
struct Io<at::BFloat16> {
  static void load(const at::BFloat16* p, Vec& a, Vec& b) { at::vec::load_to_float(p, a, b); }
  // values already rounded to bf16 (exact), or rounded here to nearest even as torch rounds
  static void store(at::BFloat16* p, const Vec& a, const Vec& b) {
    at::vec::convert_float_bfloat16(a, b).store(p);
  }
};

template <>
struct Io<at::Half> {
  static void load(const at::Half* p, Vec& a, Vec& b) { at::vec::load_to_float(p, a, b); }
  static void store(at::Half* p, const Vec& a, const Vec& b) {
    at::vec::convert_float_half(a, b).store(p);  // to nearest even, as torch's .to(half)
  }
};

template <>
struct Io<int8_t> {  // ratio8 codes: whole numbers in [-127, 127], exact in every conversion
  static void load(const int8_t* p, Vec& a, Vec& b) {
    a = at::vec::convert<float>(at::vec::convert<int32_t>(Vectorized<int8_t>::loadu(p, VS)));
    b = at::vec::convert<float>(at::vec::convert<int32_t>(Vectorized<int8_t>::loadu(p + VS, VS)));
  }
  static void store(int8_t* p, const Vec& a, const Vec& b) {
    at::vec::convert<int8_t>(a).store(p, VS);
    at::vec::convert<int8_t>(b).store(p + VS, VS);
  }
};

struct Flags {
  bool master, has_scale, state_sr, param_sr;
  int32_t k0, k1;
};

// One block: elements [base, base + BLOCK) of the tensor, at these pointers.
template <typename P, typename M, typename V>
inline void step_block(P* p, P* g, M* m, V* v, float* w, int64_t base, const Scalars& s,
                       const Flags& f, Tel& tel) {
  Vec ga[2], pa[2], ma[2], va[2];
  Io<P>::load(g, ga[0], ga[1]);
  if (f.master) {
    Io<float>::load(w, pa[0], pa[1]);
  } else {
    Io<P>::load(p, pa[0], pa[1]);
  }
  Io<M>::load(m, ma[0], ma[1]);
  Io<V>::load(v, va[0], va[1]);
  Vec gf[2], pn[2], mn[2], vn[2];
  for (int h = 0; h < 2; ++h) {
    Vec gv = ga[h];
    if (f.has_scale) gv = gv * Vec(s.inv_scale);
    gf[h] = gv;
    Vec gu = gv * Vec(s.clip);  // Note [clipping] (1.0 without clipping: exact)
    Vec vf = va[h];
    Vec mf = ma[h];
    if constexpr (std::is_same_v<M, int8_t>) {
      // ratio8 decode: (q / 127) * min(sqrt(v), FP32_MAX), NaN kept (Note [ratio8])
      Vec sv = vf.sqrt();
      sv = Vec::blendv(sv, Vec(std::numeric_limits<float>::max()),
                       sv > Vec(std::numeric_limits<float>::max()));
      mf = (mf * Vec(1.0f / kLevels)) * sv;
    }
    Vec pf = pa[h] * Vec(s.decay);
    Vec d = gu - mf;
    mf = (s.omb < 0.5f ? mf : gu) + Vec(s.coef) * d;  // torch's lerp_, as the kernel writes it
    vf = vf * Vec(s.beta) + (Vec(s.omb) * gu) * gu;
    Vec sv = vf.sqrt();
    Vec q;
    if constexpr (std::is_same_v<M, int8_t>) {
      q = mf / (sv * Vec(s.inv_bc_sqrt) + Vec(s.eps));
    } else {
      q = mf / (sv / Vec(s.bc_sqrt) + Vec(s.eps));
    }
    if (tel.on) tel.add(gu, mf, sv, q);
    pf = pf - Vec(s.step_size) * q;
    IVec r(0);
    if (f.state_sr || f.param_sr) r = random_bits(base + h * VS, f.k0, f.k1, false);
    if constexpr (std::is_same_v<M, float>) {
      mn[h] = mf;
      vn[h] = vf;
    } else if constexpr (std::is_same_v<M, at::BFloat16>) {
      IVec lo16 = r & IVec(0xFFFF), hi16 = shr(r, 16);
      mn[h] = round_bf16(mf, f.state_sr ? &lo16 : nullptr);
      vn[h] = round_bf16(vf, f.state_sr ? &hi16 : nullptr);
    } else {  // ratio8: v first, m encoded against the stored v (Note [ratio8 arithmetic])
      IVec lo16 = r & IVec(0xFFFF), hi16 = shr(r, 16);
      Vec vs = round_bf16(vf, f.state_sr ? &hi16 : nullptr);
      vn[h] = vs;
      Vec rr = mf * (Vec(1.0f) /
                     at::vec::clamp_min(vs, Vec(std::numeric_limits<float>::min())).sqrt());
      Vec x = clamp_nan_low(rr * Vec(kLevels), Vec(s.bound));
      if (f.state_sr) {
        x = (x + at::vec::convert_to_fp_of_same_size<float>(lo16) * Vec(kNoiseScale)).floor();
      } else {
        x = x.round();  // half to even
      }
      mn[h] = x;
    }
    if (f.param_sr) {  // pure bf16: the param's own 16 bits (stream 1)
      // random_bits(..., stream1): one more round over the bits r already holds
      IVec r1 = lowbias32(r ^ IVec(kStream1)) & IVec(0xFFFF);
      pn[h] = round_bf16(pf, &r1);
    } else if constexpr (std::is_same_v<P, at::BFloat16>) {
      pn[h] = round_bf16(pf, nullptr);  // to nearest even, torch's bits
    } else {
      pn[h] = pf;
    }
    pa[h] = pf;
  }
  Io<P>::store(p, pn[0], pn[1]);
  Io<M>::store(m, mn[0], mn[1]);
  Io<V>::store(v, vn[0], vn[1]);
  if (f.master) Io<float>::store(w, pa[0], pa[1]);
  if (f.has_scale) Io<P>::store(g, gf[0], gf[1]);  // Note [amp]: the unscaled grad, kept
}

// The last partial block (Note [native blocks]): through zero-padded copies.
template <typename P, typename M, typename V>
void step_tail(P* p, P* g, M* m, V* v, float* w, int64_t base, int64_t n, const Scalars& s,
               const Flags& f, Tel& tel) {
  P pb[BLOCK], gb[BLOCK];
  M mb[BLOCK];
  V vb[BLOCK];
  float wb[BLOCK];
  std::memset(static_cast<void*>(pb), 0, sizeof(pb));
  std::memset(static_cast<void*>(gb), 0, sizeof(gb));
  std::memset(static_cast<void*>(mb), 0, sizeof(mb));
  std::memset(static_cast<void*>(vb), 0, sizeof(vb));
  std::memset(static_cast<void*>(wb), 0, sizeof(wb));
  std::memcpy(pb, p, n * sizeof(P));
  std::memcpy(gb, g, n * sizeof(P));
  std::memcpy(mb, m, n * sizeof(M));
  std::memcpy(vb, v, n * sizeof(V));
  if (f.master) std::memcpy(wb, w, n * sizeof(float));
  step_block<P, M, V>(pb, gb, mb, vb, wb, base, s, f, tel);  // padding adds 0 to every field
  std::memcpy(p, pb, n * sizeof(P));
  std::memcpy(m, mb, n * sizeof(M));
  std::memcpy(v, vb, n * sizeof(V));
  if (f.master) std::memcpy(w, wb, n * sizeof(float));
  if (f.has_scale) std::memcpy(g, gb, n * sizeof(P));
}

// One tensor of a step: its storage, scalars, rounding key and where its telemetry goes.
struct Job {
  void *p, *g, *m, *v;
  float* w;
  bool master;
  int64_t n;
  Scalars s;
  int32_t k0, k1;
  void (*run)(const Job&, int64_t, int64_t, const Flags&, Tel&);  // blocks [b0, b1)
};

// Blocks [b0, b1) of one tensor; block n / BLOCK, when n is not a multiple of BLOCK, is the
// zero-padded tail (Note [native blocks]).
template <typename P, typename M, typename V>
void run_blocks(const Job& j, int64_t b0, int64_t b1, const Flags& flags, Tel& tel) {
  P* pp = static_cast<P*>(j.p);
  P* gp = static_cast<P*>(j.g);
  M* mp = static_cast<M*>(j.m);
  V* vp = static_cast<V*>(j.v);
  Flags f = flags;
  f.master = j.master;
  f.k0 = j.k0;
  f.k1 = j.k1;
  const int64_t full = j.n / BLOCK;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t i = b * BLOCK;
    float* w = j.w ? j.w + i : nullptr;
    if (b < full) {
      step_block<P, M, V>(pp + i, gp + i, mp + i, vp + i, w, i, j.s, f, tel);
    } else {
      step_tail<P, M, V>(pp + i, gp + i, mp + i, vp + i, w, i, j.n - i, j.s, f, tel);
    }
    if (tel.on && (b - b0) % kFlushBlocks == kFlushBlocks - 1) tel.flush();
  }
  if (tel.on) tel.flush();
}

template <typename P>
auto pick_moments(at::ScalarType m) -> void (*)(const Job&, int64_t, int64_t, const Flags&, Tel&) {
  switch (m) {
    case at::kFloat:
      return &run_blocks<P, float, float>;
    case at::kBFloat16:
      return &run_blocks<P, at::BFloat16, at::BFloat16>;
    case at::kChar:
      return &run_blocks<P, int8_t, at::BFloat16>;
    default:
      TORCH_CHECK(false, "tiedadam native CPU step: exp_avg dtype ", m);
  }
}

// The loop for this tensor set's storage, or nullptr where it walks none (the caller's
// next route takes the tensor): contiguous CPU tensors, the grad in the param's dtype, moments
// fp32/fp32, bf16/bf16 or int8/bf16 (ratio8), an fp32 master.
auto pick(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
          const c10::optional<at::Tensor>& w)
    -> void (*)(const Job&, int64_t, int64_t, const Flags&, Tel&) {
  const bool master = w.has_value() && w->defined();
  for (const at::Tensor* t : {&p, &g, &m, &v}) {
    if (!t->device().is_cpu() || !t->is_contiguous()) return nullptr;
  }
  if (master && (!w->device().is_cpu() || !w->is_contiguous() ||
                 w->scalar_type() != at::kFloat)) {
    return nullptr;
  }
  const auto md = m.scalar_type();
  if (g.scalar_type() != p.scalar_type() ||
      v.scalar_type() != (md == at::kChar ? at::kBFloat16 : md)) {
    return nullptr;
  }
  switch (p.scalar_type()) {
    case at::kFloat:
      return pick_moments<float>(md);
    case at::kBFloat16:
      return pick_moments<at::BFloat16>(md);
    case at::kHalf:
      return pick_moments<at::Half>(md);
    default:
      return nullptr;
  }
}

// Every tensor the loop walks must hold the param's element count: a mismatch is a caller's
// bug, an error before anything is written (Note [native many]), never a stray write.
void check_size(const at::Tensor& t, const at::Tensor& p, const char* role) {
  TORCH_CHECK(t.numel() == p.numel(), "tiedadam native CPU step: ", role, " has ", t.numel(),
              " elements, its param ", p.numel());
}

}  // namespace

// One step of a param group's CPU tensors, in place (Note [native many]). Lists of equal
// length: params, grads, exp_avgs, exp_avg_sqs, masters (None where a tensor has none); ``s``:
// fp32 [N, 12] = tied_adamw_cpu.scalars() per tensor plus c = 1 - beta^t; ``keys``: int32
// [N, 2], each tensor's rounding key (k_lo, k_hi); ``tel``: fp32 [N, 5] rows to overwrite with
// the telemetry fields of the tensors stepped (None: none computed). Returns a bool [N]: the
// tensors stepped; the others (a layout or dtype set the loop does not walk) are untouched,
// for the caller's next route. Everything is checked before the first write.
at::Tensor step_many(std::vector<at::Tensor> p, std::vector<at::Tensor> g,
                     std::vector<at::Tensor> m, std::vector<at::Tensor> v,
                     std::vector<c10::optional<at::Tensor>> w, at::Tensor s, at::Tensor keys,
                     bool has_scale, bool state_sr, bool param_sr,
                     c10::optional<at::Tensor> tel, double snr_threshold) {
  const int64_t n = static_cast<int64_t>(p.size());
  TORCH_CHECK(g.size() == p.size() && m.size() == p.size() && v.size() == p.size() &&
                  w.size() == p.size(),
              "tiedadam native CPU step: lists of different lengths");
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 2 &&
                  s.size(0) == n && s.size(1) == 12,
              "tiedadam native CPU step: scalars must be fp32 [", n, ", 12]");
  TORCH_CHECK(keys.scalar_type() == at::kInt && keys.is_contiguous() && keys.dim() == 2 &&
                  keys.size(0) == n && keys.size(1) == 2,
              "tiedadam native CPU step: keys must be int32 [", n, ", 2]");
  const bool telemetry = tel.has_value() && tel->defined();
  if (telemetry) {
    TORCH_CHECK(tel->scalar_type() == at::kFloat && tel->is_contiguous() && tel->dim() == 2 &&
                    tel->size(0) == n && tel->size(1) == 5,
                "tiedadam native CPU step: tel must be fp32 [", n, ", 5]");
  }
  const float* sp = s.data_ptr<float>();
  const int32_t* kp = keys.data_ptr<int32_t>();
  at::Tensor taken = at::zeros({n}, at::kBool);
  bool* tk = taken.data_ptr<bool>();
  std::vector<Job> jobs;
  std::vector<int64_t> job_of;  // the input index of each job
  std::vector<std::array<int64_t, 3>> chunks;  // (job, first block, end block)
  jobs.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& pi = p[i];
    auto run = pick(pi, g[i], m[i], v[i], w[i]);
    if (run == nullptr) continue;
    const bool master = w[i].has_value() && w[i]->defined();
    check_size(g[i], pi, "grad");
    check_size(m[i], pi, "exp_avg");
    check_size(v[i], pi, "exp_avg_sq");
    if (master) check_size(*w[i], pi, "master");
    const float* r = sp + 12 * i;
    const int64_t j = static_cast<int64_t>(jobs.size());
    jobs.push_back(Job{pi.data_ptr(), g[i].data_ptr(), m[i].data_ptr(), v[i].data_ptr(),
                       master ? w[i]->data_ptr<float>() : nullptr, master, pi.numel(),
                       Scalars{r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9],
                               r[10], r[11]},
                       kp[2 * i], kp[2 * i + 1], run});
    job_of.push_back(i);
    tk[i] = true;
    const int64_t blocks = (pi.numel() + BLOCK - 1) / BLOCK;
    for (int64_t b = 0; b < blocks; b += kChunkBlocks) {
      chunks.push_back({j, b, std::min(blocks, b + kChunkBlocks)});
    }
  }
  const Flags flags{false, has_scale, state_sr, param_sr, 0, 0};
  const int64_t nc = static_cast<int64_t>(chunks.size());
  std::vector<std::array<double, 5>> partial(telemetry ? nc : 0);
  // one chunk per task: a chunk is at least 2048 blocks' work, or a whole small tensor
  at::parallel_for(0, nc, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Job& j = jobs[chunks[c][0]];
      Tel t;
      if (telemetry) {
        t.on = true;
        t.inv_c = 1.0f / j.s.c;
        t.sqrt_c = std::sqrt(j.s.c);
        t.thr = static_cast<float>(snr_threshold);
      }
      j.run(j, chunks[c][1], chunks[c][2], flags, t);
      if (telemetry) std::copy(t.total, t.total + 5, partial[c].begin());
    }
  });
  if (telemetry) {  // per tensor, in chunk order (Note [native many])
    std::vector<std::array<double, 5>> rows(jobs.size(), {0.0, 0.0, 0.0, 0.0, 0.0});
    for (int64_t c = 0; c < nc; ++c) {
      auto& r = rows[chunks[c][0]];
      const auto& q = partial[c];
      r[0] += q[0];
      r[1] += q[1];
      r[2] = std::max(r[2], q[2]);
      r[3] += q[3];
      r[4] += q[4];
    }
    float* out = tel->data_ptr<float>();
    for (size_t j = 0; j < jobs.size(); ++j) {
      for (int k = 0; k < 5; ++k) out[5 * job_of[j] + k] = static_cast<float>(rows[j][k]);
    }
  }
  return taken;
}

// One step of one flat, contiguous CPU tensor, in place: step_many of one tensor. ``s``: fp32
// [11] = tied_adamw_cpu.scalars(); ``keys``: the rounding key (k_lo, k_hi) as int32 [2].
void step(at::Tensor p, at::Tensor g, at::Tensor m, at::Tensor v, c10::optional<at::Tensor> w,
          at::Tensor s, at::Tensor keys, bool has_scale, bool state_sr, bool param_sr) {
  at::Tensor s12 = at::cat({s.reshape({1, 11}), at::ones({1, 1}, s.options())}, 1);
  at::Tensor taken = step_many({p}, {g}, {m}, {v}, {w}, s12,
                               keys.reshape({1, 2}).contiguous(), has_scale, state_sr,
                               param_sr, c10::nullopt, 0.0);
  TORCH_CHECK(taken.item<bool>(), "tiedadam native CPU step: a layout or dtype set it does not ",
              "walk (", p.scalar_type(), " param, ", m.scalar_type(), " exp_avg)");
}

// The random bits of elements [base, base + n) (tests: the index path past 2**31, Note [cpu
// index], checked on a window of indices without a tensor of that size).
at::Tensor bits(int64_t base, int64_t n, int64_t k0, int64_t k1, bool stream1) {
  at::Tensor out = at::empty({(n + VS - 1) / VS * VS}, at::kInt);
  int32_t* o = out.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; i += VS) {
    random_bits(base + i, static_cast<int32_t>(k0), static_cast<int32_t>(k1), stream1)
        .store(o + i);
  }
  return out.narrow(0, 0, n);
}

// The vector width this build uses, in floats (16: AVX-512, 8: AVX2).
int64_t vector_floats() { return VS; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("step", &step, "one tied-AdamW step of a flat CPU tensor, in place");
  mod.def("step_many", &step_many, "one tied-AdamW step of a param group's CPU tensors");
  mod.def("vector_floats", &vector_floats);
  mod.def("bits", &bits, "the random bits of a window of element indices (tests)");
}
