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
// round differently). OpenMP (at::parallel_for) splits the tensor into ranges of whole blocks.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <cstring>
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

// The per-program scalars of tied_adamw_cpu.scalars(), in its order.
struct Scalars {
  float decay, omb, beta, coef, step_size, bc_sqrt, eps, inv_scale, inv_bc_sqrt, clip, bound;
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
                       const Flags& f) {
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
    Vec q;
    if constexpr (std::is_same_v<M, int8_t>) {
      q = mf / (vf.sqrt() * Vec(s.inv_bc_sqrt) + Vec(s.eps));
    } else {
      q = mf / (vf.sqrt() / Vec(s.bc_sqrt) + Vec(s.eps));
    }
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
      IVec r1 = random_bits(base + h * VS, f.k0, f.k1, true) & IVec(0xFFFF);
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
               const Flags& f) {
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
  step_block<P, M, V>(pb, gb, mb, vb, wb, base, s, f);
  std::memcpy(p, pb, n * sizeof(P));
  std::memcpy(m, mb, n * sizeof(M));
  std::memcpy(v, vb, n * sizeof(V));
  if (f.master) std::memcpy(w, wb, n * sizeof(float));
  if (f.has_scale) std::memcpy(g, gb, n * sizeof(P));
}

template <typename P, typename M, typename V>
void step_typed(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m,
                const at::Tensor& v, const c10::optional<at::Tensor>& w, const Scalars& s,
                const Flags& f) {
  const int64_t n = p.numel();
  P* pp = p.data_ptr<P>();
  P* gp = g.data_ptr<P>();
  M* mp = m.data_ptr<M>();
  V* vp = v.data_ptr<V>();
  float* wp = f.master ? w->data_ptr<float>() : nullptr;
  const int64_t blocks = n / BLOCK;
  // ranges of at least 2048 blocks per thread: below that a thread costs more than it saves
  at::parallel_for(0, blocks, 2048, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i = b * BLOCK;
      step_block<P, M, V>(pp + i, gp + i, mp + i, vp + i, wp ? wp + i : nullptr, i, s, f);
    }
  });
  const int64_t i = blocks * BLOCK;
  if (i < n) {
    step_tail<P, M, V>(pp + i, gp + i, mp + i, vp + i, wp ? wp + i : nullptr, i, n - i, s, f);
  }
}

template <typename P>
void step_param(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m,
                const at::Tensor& v, const c10::optional<at::Tensor>& w, const Scalars& s,
                const Flags& f) {
  switch (m.scalar_type()) {
    case at::kFloat:
      return step_typed<P, float, float>(p, g, m, v, w, s, f);
    case at::kBFloat16:
      return step_typed<P, at::BFloat16, at::BFloat16>(p, g, m, v, w, s, f);
    case at::kChar:
      return step_typed<P, int8_t, at::BFloat16>(p, g, m, v, w, s, f);
    default:
      TORCH_CHECK(false, "tiedadam native CPU step: exp_avg dtype ", m.scalar_type());
  }
}

}  // namespace

// One step of one flat, contiguous CPU tensor, in place (the caller has verified layouts and
// dtypes: optim/verify.py). ``s``: fp32 [11] = tied_adamw_cpu.scalars(); ``keys``: the
// rounding key (k_lo, k_hi) as int32 [2].
void step(at::Tensor p, at::Tensor g, at::Tensor m, at::Tensor v, c10::optional<at::Tensor> w,
          at::Tensor s, at::Tensor keys, bool has_scale, bool state_sr, bool param_sr) {
  const float* sp = s.data_ptr<float>();
  Scalars sc{sp[0], sp[1], sp[2], sp[3], sp[4], sp[5], sp[6], sp[7], sp[8], sp[9], sp[10]};
  const int32_t* kp = keys.data_ptr<int32_t>();
  Flags f{w.has_value(), has_scale, state_sr, param_sr, kp[0], kp[1]};
  switch (p.scalar_type()) {
    case at::kFloat:
      return step_param<float>(p, g, m, v, w, sc, f);
    case at::kBFloat16:
      return step_param<at::BFloat16>(p, g, m, v, w, sc, f);
    case at::kHalf:
      return step_param<at::Half>(p, g, m, v, w, sc, f);
    default:
      TORCH_CHECK(false, "tiedadam native CPU step: param dtype ", p.scalar_type());
  }
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
  mod.def("vector_floats", &vector_floats);
  mod.def("bits", &bits, "the random bits of a window of element indices (tests)");
}
