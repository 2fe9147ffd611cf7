// precision_cast, fused for the CPU: amax, the non-finite count, scaling, rounding and the store in one
// read pass per phase (scaling="amax" needs a statistics pass before the cast pass), OpenMP across the
// cores, each core walking its share in L1-sized chunks (a source large enough to come from memory: in
// four lanes side by side, see pass).
//
// Rounding is integer arithmetic on the bits of the value (float32, or float64 for a float64 x; one
// float addition places the target's subnormals), with no branch, so that GCC vectorizes every loop
// (checked with -fopt-info-vec): see nearest_bits and stochastic_bits. The stochastic draws are
// SplitMix64 outputs for (seed, element index) (Steele, Lea and Flood, "Fast splittable pseudorandom
// number generators", OOPSLA 2014), so a seed gives the same result on any number of threads.
//
// On 2 cores the rounding, not memory, bounds a cast to float8 or float16 (about 0.2 ns an element a
// core), so the loops are kept lean: the statistics skip the non-finite bookkeeping on chunks that
// have none (gather), the rounding drops its NaN rule on chunks without NaN (nearest_bits<..., false>),
// and the output comes from a reuse pool (OutputPool) and is written with streaming stores when it
// is too large for the caches (stream_copy).
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>
#include <torch/csrc/utils/pybind.h>
#include <omp.h>
#include <sys/mman.h>

// Asks for the cache lines of [p, p + bytes) into L2 ahead of their loads (a large source's prefetch).
inline void fetch_lines(const char* p, int64_t bytes) {
  for (int64_t j = 0; j < bytes; j += 64) __builtin_prefetch(p + j, 0, 2);
}
#if defined(__SSE2__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>

namespace {

// Below this many elements one thread does it all (a few microseconds of work on the vector paths).
// From there on the cores share it, as torch's own cast does from 32768 elements: on a machine where
// another process holds the other core both wait a scheduler slice for the second thread alike.
constexpr int64_t kParallelGrain = 1 << 16;

template <class C> struct Wide;
template <> struct Wide<float> {
  using U = uint32_t;
  static constexpr int man = 23, bias = 127, width = 32;
  static constexpr U inf = 0x7F800000u;
};
template <> struct Wide<double> {
  using U = uint64_t;
  static constexpr int man = 52, bias = 1023, width = 64;
  static constexpr U inf = 0x7FF0000000000000ull;
};

// A target format; IEEE reserves the top exponent for inf and NaN, e4m3fn ("fn") only the all-ones NaN.
template <int Bits, int Exp, int Man, bool Ieee> struct Target {
  using Out = std::conditional_t<Bits == 8, uint8_t, uint16_t>;
  static constexpr int bits = Bits, man = Man;
  static constexpr int bias = (1 << (Exp - 1)) - 1;
  static constexpr int emin = 1 - bias;
  static constexpr uint32_t top = (1u << Exp) - 1;
  static constexpr uint32_t max_bits =
      Ieee ? (((top - 1) << Man) | ((1u << Man) - 1)) : ((top << Man) | ((1u << Man) - 2));
  static constexpr uint32_t nan_bits = Ieee ? ((top << Man) | (1u << (Man - 1))) : ((1u << (Bits - 1)) - 1);
  static constexpr uint32_t overflow_bits = Ieee ? (top << Man) : nan_bits;  // inf, or NaN without inf
  static constexpr int top_exp() { return int(max_bits >> Man) - bias; }  // the exponent of max finite
  static double max_finite_d() {
    return std::ldexp(1.0 + double(max_bits & ((1u << Man) - 1)) / double(1u << Man), top_exp());
  }
  static float max_finite() { return float(max_finite_d()); }
};
using F16 = Target<16, 5, 10, true>;
using BF16 = Target<16, 8, 7, true>;
using E4M3 = Target<8, 4, 3, false>;
using E5M2 = Target<8, 5, 2, true>;

template <class S> using compute_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

template <class C> inline typename Wide<C>::U bits_of(C v) {
  typename Wide<C>::U u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}

template <class C> inline C from_bits(typename Wide<C>::U u) {
  C v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

inline float float_of(uint32_t u) { return from_bits<float>(u); }

inline float load(const float* p, int64_t i) { return p[i]; }
inline double load(const double* p, int64_t i) { return p[i]; }
inline float load(const at::BFloat16* p, int64_t i) {
  uint16_t b;
  std::memcpy(&b, p + i, sizeof b);
  return float_of(uint32_t(b) << 16);
}

// float16 -> float32, exact, with integer masks rather than branches so that GCC vectorizes it (it
// vectorizes neither c10's conversion nor one written with nested selects).
inline float load(const at::Half* p, int64_t i) {
  uint16_t h;
  std::memcpy(&h, p + i, sizeof h);
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, em = h & 0x7FFFu;
  const uint32_t special = (em << 13) | 0x7F800000u;                 // inf and NaN
  const uint32_t normal = (em << 13) + (112u << 23);                 // rebias: 127 - 15
  const uint32_t subnormal = bits_of(float(int32_t(em))) - (24u << 23);  // em * 2**-24, em < 2**10
  const uint32_t is_special = 0u - uint32_t(em >= 0x7C00u);
  const uint32_t is_normal = (0u - uint32_t(em >= 0x400u)) & ~is_special;
  const uint32_t is_subnormal = (0u - uint32_t(em != 0u)) & ~is_normal & ~is_special;
  return float_of(sign | (special & is_special) | (normal & is_normal) | (subnormal & is_subnormal));
}

inline uint32_t draw32(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return uint32_t((z ^ (z >> 31)) >> 32);
}

// Overflow, inf, NaN and the sign, given the rounded magnitude bits (any size) of a = |v|'s bits.
template <class T, class C>
inline uint32_t finish(typename Wide<C>::U out, typename Wide<C>::U a, typename Wide<C>::U negative, uint32_t over) {
  using W = Wide<C>;
  using U = typename W::U;
  out = out > T::max_bits ? U(over) : out;
  const U nonfinite = U(a < W::inf ? 0 : 1) * ~U(0);  // all ones for inf and NaN
  const U special = a == W::inf ? U(over) : U(T::nan_bits);
  out = (out & ~nonfinite) | (special & nonfinite);
  return uint32_t(out | (negative << (T::bits - 1)));
}

// The significand of |v| (implicit bit included) and the exponent of the target's spacing at |v| (its
// own exponent, or emin below the target's normal range), as (sig, texp, drop): the spacing is the
// value of sig's bit number `drop`. Integer arithmetic in one width, no bool arithmetic and no shifts
// of a constant by a variable count: the forms GCC if-converts and vectorizes (also in 64 bits).
template <class T, class C>
struct Split {
  using W = Wide<C>;
  using U = typename W::U;
  using I = std::make_signed_t<U>;
  U a, negative, sig;
  I texp, drop;
  explicit Split(C v) {
    const U u = bits_of(v);
    a = u & ~(U(1) << (W::width - 1));
    negative = u >> (W::width - 1);
    const I field = I(a >> W::man);
    sig = field ? (a & ((U(1) << W::man) - 1)) | (U(1) << W::man) : a;
    const I exp = (field > 1 ? field : I(1)) - W::bias;
    texp = exp > T::emin ? exp : I(T::emin);
    drop = W::man - T::man + texp - exp;
  }
  // ((texp - emin) << man) + count: the IEEE layout for normals and subnormals alike, a carry of the
  // count into the next binade included; then overflow, inf, NaN and the sign.
  uint32_t bits(U count, uint32_t over) const {
    return finish<T, C>((U(texp - T::emin) << T::man) + count, a, negative, over);
  }
};

// Round to nearest, ties to even.
//
// float32, the fast path: in the target's normal range the spacing is a fixed number of low bits of
// the pattern, rounded off by the classic add-and-shift (add just under half, plus the kept lowest
// bit), then the exponent is rebiased. Where the target's subnormals are float32 normals (float16,
// float8), the spacing there is fixed in absolute terms, so adding 2**(emin - man + 23) makes the FPU
// itself round |v| at that spacing and the sum's low bits count the spacings (float32 subnormals all
// round to zero there, so denormals-are-zero cannot change the answer). bfloat16 shares float32's
// exponent range: the first rule covers every value. Overflow is |v| past the last value that rounds
// to max finite (inf included), so the threshold is compared before rounding.
//
// The rebias is folded in before the shift: below the target's normal range the sum wraps, and the
// subnormal rule replaces it there. With Nan false the NaN rule is left out (inf is still handled, by
// the overflow rule): the caller knows the chunk has no NaN, and the loop runs about a quarter faster.
//
// float64: the general split (below), which GCC vectorizes in 64 bits where it does not the float
// addition.
template <class T, class C, bool Nan = true>
inline uint32_t nearest_bits(C v, uint32_t over) {
  using W = Wide<C>;
  using U = typename W::U;
  if constexpr (std::is_same_v<C, double>) {
    using S = Split<T, C>;
    using I = typename S::I;
    const S s(v);
    const I d = s.drop < W::man + 2 ? s.drop : I(W::man + 2);  // from there on: below half a spacing
    const U t = s.sig >> (d - 1);                               // the count of spacings and the round bit
    const U sticky = (t << (d - 1)) != s.sig ? U(1) : U(0);
    return s.bits((t >> 1) + ((t & 1) & (sticky | ((t >> 1) & 1))), over);
  } else {
    constexpr int d = W::man - T::man;
    const U u = bits_of(v);
    const U a = u & ~(U(1) << (W::width - 1));
    U out = (a + (((U(1) << (d - 1)) - 1) - (U(W::bias - T::bias) << (T::man + d))) + ((a >> d) & 1)) >> d;
    if constexpr (T::emin > 1 - W::bias) {
      const C magic = std::ldexp(C(1), T::emin - T::man + W::man);
      const U subnormal = bits_of(from_bits<C>(a) + magic) - bits_of(magic);
      out = a < bits_of(std::ldexp(C(1), T::emin)) ? subnormal : out;
    }
    // the last pattern that rounds to max finite: max + half the top spacing is a tie, which goes to
    // max when max is even (e4m3fn) and up otherwise
    const U last = bits_of(C(T::max_finite_d() + std::ldexp(0.5, T::top_exp() - T::man))) - U(T::max_bits & 1);
    out = a > last ? U(over) : out;
    if constexpr (Nan) out = a > W::inf ? U(T::nan_bits) : out;
    return uint32_t(out | ((u >> (W::width - 1)) << (T::bits - 1)));
  }
}

// Stochastic rounding: keep the count of spacings, and add one when the draw is below the remainder
// taken as a 32-bit fraction of the spacing (so with probability remainder / spacing, to 2**-32).
template <class T, class C>
inline uint32_t stochastic_bits(C v, uint32_t draw, uint32_t over) {
  using S = Split<T, C>;
  using U = typename S::U;
  using I = typename S::I;
  constexpr I top = S::W::width - 1;
  const S s(v);
  const I d = s.drop < top ? s.drop : top;
  const U keep = s.sig >> d;
  const U rem = s.sig - (keep << d);
  const I left = s.drop <= 32 ? 32 - s.drop : I(0);
  const I right = s.drop <= 32 ? I(0) : (s.drop - 32 < top ? s.drop - 32 : top);
  const U frac = (rem << left) >> right;
  return s.bits(keep + (U(draw) < frac ? U(1) : U(0)), over);
}

// A chunk of float16 or bfloat16 as float32 (exact), into w (64-byte aligned). float16 by the hardware
// conversion where the level has it (it quiets a signalling NaN, which stays a NaN: the rounding gives
// every NaN the target's one NaN pattern); bfloat16 is a shift, which GCC vectorizes at every level.
inline void widen(const at::BFloat16* x, float* __restrict w, int64_t m) {
  for (int64_t i = 0; i < m; ++i) w[i] = load(x, i);
}
inline void widen(const at::Half* x, float* __restrict w, int64_t m) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= m; i += 16)
    _mm512_store_ps(w + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))));
#elif defined(__F16C__)
  for (; i + 8 <= m; i += 8)
    _mm256_store_ps(w + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
#endif
  for (; i < m; ++i) w[i] = load(x, i);
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// 64-bit lanes holding |x|'s bits (the sign cleared, so none negative): AVX2 has no 64-bit max, but a
// signed compare orders them. The larger of each pair of lanes, and the largest lane.
inline __m256i max_magnitude(__m256i a, __m256i b) { return _mm256_blendv_epi8(b, a, _mm256_cmpgt_epi64(a, b)); }
inline uint64_t largest_lane(__m256i v) {
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
  return std::max(std::max(lanes[0], lanes[1]), std::max(lanes[2], lanes[3]));
}
#endif

// float64 -> float32 rounded to odd: toward zero, with the last bit set when inexact (Boldo and Melquiond,
// "When double rounding is odd", 2005). Rounding that float32 to nearest even then rounds the float64
// value once, for every target here (float32 keeps at least two more bits than each, down to its
// subnormals; past its range the value narrows to max finite or inf, past every target's). NaN stays NaN.
// This is the scalar rule: round to nearest, one step back toward zero where that went away from it.
inline float odd_float(double v) {
  const float f = static_cast<float>(v);
  const double back = static_cast<double>(f);
  uint32_t u = bits_of(f);
  u -= uint32_t(std::fabs(back) > std::fabs(v));
  return float_of(u | uint32_t(back != v));
}

// The same over [x, x + m) into w, each value scaled in float64 first when `scaled`.
// With kStats, mx also becomes the max of |x|'s bits (the unscaled x: a pass over the chunk saved).
// The vector loops read "inexact" off the float64's 29 bits below float32's last place (kLow) with one
// integer test, where a conversion back and a compare took several operations (float64 sources on Zen 4:
// 0.65-0.94x the time on AVX2, 0.77-0.97x on AVX-512). That is exact from float32's smallest normal up.
// Below it the conversion drops more bits than those 29. The targets other than bfloat16 (kSubnormals
// false) round every value there to zero whatever float32's last bit, so it does not matter; bfloat16
// shares float32's exponent range and must not lose them.
// - AVX-512 truncates by the conversion's own round-toward-zero, and ORs the bit in; for bfloat16 it
//   compares the conversion back instead (one branch per vector cost more).
// - AVX2 has no rounding in the instruction. The test's bit goes into float32's last place, with the 29
//   bits cleared: the float64 is then a float32 value up to 2^128 (from there it converts to inf, past
//   every target's range as max finite is), so the conversion is exact in any rounding mode. A vector
//   holding a bfloat16 target's float32 subnormal (rare) takes the scalar rule.
template <bool kStats, bool kSubnormals>
inline void narrow_to_odd(const double* x, float* __restrict w, int64_t m, bool scaled, double scale, uint64_t& mx) {
  constexpr int64_t kLow = (int64_t(1) << 29) - 1;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512d by = _mm512_set1_pd(scale);
  const __m256i one = _mm256_set1_epi32(1);
  const __m512i magnitude = _mm512_set1_epi64(0x7FFFFFFFFFFFFFFFll), low = _mm512_set1_epi64(kLow);
  __m512i vmx = _mm512_setzero_si512();
  for (; i + 8 <= m; i += 8) {
    __m512d v = _mm512_loadu_pd(x + i);
    if constexpr (kStats) vmx = _mm512_max_epu64(vmx, _mm512_and_si512(_mm512_castpd_si512(v), magnitude));
    if (scaled) v = _mm512_mul_pd(v, by);
    const __m256i f = _mm256_castps_si256(_mm512_cvt_roundpd_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC));
    const __mmask8 inexact = kSubnormals
                                 ? _mm512_cmp_pd_mask(_mm512_cvtps_pd(_mm256_castsi256_ps(f)), v, _CMP_NEQ_UQ)
                                 : _mm512_test_epi64_mask(_mm512_castpd_si512(v), low);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + i), _mm256_mask_or_epi32(f, inexact, f, one));
  }
  if constexpr (kStats) mx = std::max(mx, uint64_t(_mm512_reduce_max_epu64(vmx)));
#elif defined(__AVX2__)
  const __m256d by = _mm256_set1_pd(scale);
  const __m256i magnitude = _mm256_set1_epi64x(0x7FFFFFFFFFFFFFFFll), low = _mm256_set1_epi64x(kLow);
  // 0 < |v| < 2^-126 is |v| - 1 < 2^-126's bits - 1 unsigned, a signed compare with the top bits flipped
  const __m256i flip = _mm256_set1_epi64x(0x7FFFFFFFFFFFFFFFll);  // - 1, then the top bit flipped
  const __m256i below = _mm256_set1_epi64x(int64_t((uint64_t(1023 - 126) << 52) - 1 + (uint64_t(1) << 63)));
  __m256i mx0 = _mm256_setzero_si256(), mx1 = mx0;
  auto track = [&](__m256i& acc, __m256d v) {
    if constexpr (kStats) acc = max_magnitude(_mm256_and_si256(_mm256_castpd_si256(v), magnitude), acc);
  };
  auto odd = [&](__m256d v) {  // bit 29 set when any bit below it is, then those bits cleared
    const __m256i u = _mm256_castpd_si256(v);
    const __m256i sticky = _mm256_add_epi64(_mm256_and_si256(u, low), low);
    return _mm256_cvtpd_ps(_mm256_castsi256_pd(_mm256_andnot_si256(low, _mm256_or_si256(u, sticky))));
  };
  auto subnormal = [&](__m256d v) {
    const __m256i a = _mm256_and_si256(_mm256_castpd_si256(v), magnitude);
    return _mm256_cmpgt_epi64(below, _mm256_add_epi64(a, flip));
  };
  for (; i + 8 <= m; i += 8) {
    __m256d v0 = _mm256_loadu_pd(x + i), v1 = _mm256_loadu_pd(x + i + 4);
    track(mx0, v0), track(mx1, v1);
    if (scaled) v0 = _mm256_mul_pd(v0, by), v1 = _mm256_mul_pd(v1, by);
    if constexpr (kSubnormals) {
      const __m256i t = _mm256_or_si256(subnormal(v0), subnormal(v1));
      if (!_mm256_testz_si256(t, t)) {
        for (int k = 0; k < 8; ++k) w[i + k] = odd_float(scaled ? x[i + k] * scale : x[i + k]);
        continue;
      }
    }
    _mm256_storeu_ps(w + i, _mm256_insertf128_ps(_mm256_castps128_ps256(odd(v0)), odd(v1), 1));
  }
  if constexpr (kStats) mx = std::max(mx, largest_lane(max_magnitude(mx0, mx1)));
#endif
  for (; i < m; ++i) {
    if constexpr (kStats) mx = std::max(mx, uint64_t(bits_of(x[i]) & 0x7FFFFFFFFFFFFFFFull));
    w[i] = odd_float(scaled ? x[i] * scale : x[i]);
  }
}

// One vector of float64 values for narrow_nearest and f64_to_f16: scaled when asked (by holds the
// scale), narrowed to nearest float32; with kStats, vmx takes the lanes' |f| bits. On AVX-512,
// `midpoint` says whether a lane, zero aside, has its bits under kLow zero (it may be a midpoint of the
// target); the AVX2 loops ask that once per 4 vectors (narrow8 and midpoint8 below).
#if defined(__AVX512F__)
template <bool kStats>
inline __m512 nearest16(const double* x, bool scaled, __m512d by, __m512i low, __m512i& vmx, bool& midpoint) {
  __m512d v0 = _mm512_loadu_pd(x), v1 = _mm512_loadu_pd(x + 8);
  if (scaled) v0 = _mm512_mul_pd(v0, by), v1 = _mm512_mul_pd(v1, by);
  const __m512 f = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(v0)), _mm512_cvtpd_ps(v1), 1);
  const __m512i a = _mm512_and_si512(_mm512_castps_si512(f), _mm512_set1_epi32(0x7FFFFFFF));
  if constexpr (kStats) vmx = _mm512_max_epu32(vmx, a);
  const __mmask16 maybe = _mm512_testn_epi32_mask(a, low);
  midpoint = __builtin_expect(maybe != 0, 0) && _mm512_mask_test_epi32_mask(maybe, a, a) != 0;
  return f;
}
inline uint32_t largest_lane32(__m512i v) { return uint32_t(_mm512_reduce_max_epu32(v)); }
#elif defined(__AVX2__)
// The AVX2 loops store each vector at once and OR its candidate lanes (bits under low all zero, zero
// lanes among them) into `maybe`; once every 4 vectors they ask whether any lane was a candidate, and
// only then redo those vectors with the exact test (zero lanes exempt). A test and branch per vector
// cost the float64 -> float16 loop about a fifth of its time here.
template <bool kStats>
inline __m256 narrow8(const double* x, bool scaled, __m256d by, __m256i low, __m256i& vmx, __m256i& maybe) {
  __m256d v0 = _mm256_loadu_pd(x), v1 = _mm256_loadu_pd(x + 4);
  if (scaled) v0 = _mm256_mul_pd(v0, by), v1 = _mm256_mul_pd(v1, by);
  const __m256 f = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm256_cvtpd_ps(v0)), _mm256_cvtpd_ps(v1), 1);
  const __m256i a = _mm256_and_si256(_mm256_castps_si256(f), _mm256_set1_epi32(0x7FFFFFFF));
  if constexpr (kStats) vmx = _mm256_max_epu32(vmx, a);
  maybe = _mm256_or_si256(maybe, _mm256_cmpeq_epi32(_mm256_and_si256(a, low), _mm256_setzero_si256()));
  return f;
}
// The exact question for the 8 values at x: a lane, zero aside, with its float32 bits under low zero.
inline bool midpoint8(const double* x, bool scaled, __m256d by, __m256i low) {
  __m256i unused = _mm256_setzero_si256(), maybe = _mm256_setzero_si256();
  const __m256i a = _mm256_castps_si256(narrow8<false>(x, scaled, by, low, unused, maybe));
  const __m256i hazard = _mm256_andnot_si256(
      _mm256_cmpeq_epi32(_mm256_and_si256(a, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_setzero_si256()), maybe);
  return !_mm256_testz_si256(hazard, hazard);
}
inline uint32_t largest_lane32(__m256i v) {
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
  return *std::max_element(lanes, lanes + 8);
}
#endif

// float64 -> float32 for a round-to-nearest target T: the float32 written rounds to T as the float64 does
// (one rounding), as narrow_to_odd's does, at nearly the cost of the conversion alone (Zen 4, float64 ->
// float16 from L2, one thread: 0.74x narrow_to_odd's time on AVX-512; the loop ran 1.5x the time of torch's
// cast, which rounds twice). Each vector is narrowed to nearest, f = RN(v). Rounding f to T then gives
// RN_T(v) unless f is a midpoint between two neighbours in T: those midpoints (the overflow threshold
// among them) are float32 values, and RN is monotone and fixes them, so v and f lie on the same side
// of every one but the f equal to it. A midpoint of T has its float32 bits below T's half place zero:
// at least kLow's (22 - man bits; more in T's subnormal range). A vector with such a lane, 0 apart (its
// rounding is 0 from any v), takes narrow_to_odd; random data does that for about 1 vector in 500 for
// float16 (1 in 4000 for bfloat16, fewer for float8). With kStats, mx becomes the max of |f|'s bits:
// RN is monotone, so its float is RN(max |x|), the float32 amax; a NaN gives more than inf's bits, and
// inf's bits (an inf, or a finite x past float32's range) send the caller to the exact statistics.
template <bool kStats, class T>
inline void narrow_nearest(const double* x, float* __restrict w, int64_t m, bool scaled, double scale, uint32_t& mx) {
  constexpr bool kSubnormals = std::is_same_v<T, BF16>;
  constexpr uint32_t kLow = (1u << (22 - T::man)) - 1;
  int64_t i = 0;
  uint64_t unused = 0;
#if defined(__AVX512F__)
  bool midpoint = false;
  const __m512d by = _mm512_set1_pd(scale);
  const __m512i low = _mm512_set1_epi32(int32_t(kLow));
  __m512i vmx = _mm512_setzero_si512();
  for (; i + 16 <= m; i += 16) {
    const __m512 f = nearest16<kStats>(x + i, scaled, by, low, vmx, midpoint);
    if (midpoint) {
      narrow_to_odd<false, kSubnormals>(x + i, w + i, 16, scaled, scale, unused);
    } else {
      _mm512_storeu_ps(w + i, f);
    }
  }
  if constexpr (kStats) mx = std::max(mx, largest_lane32(vmx));
#elif defined(__AVX2__)
  const __m256d by = _mm256_set1_pd(scale);
  const __m256i low = _mm256_set1_epi32(int32_t(kLow));
  __m256i vmx = _mm256_setzero_si256();
  for (; i + 8 <= m;) {
    const int64_t block = i;
    __m256i maybe = _mm256_setzero_si256();
    for (int k = 0; k < 4 && i + 8 <= m; ++k, i += 8)
      _mm256_storeu_ps(w + i, narrow8<kStats>(x + i, scaled, by, low, vmx, maybe));
    if (__builtin_expect(!_mm256_testz_si256(maybe, maybe), 0)) {
      for (int64_t j = block; j < i; j += 8)
        if (midpoint8(x + j, scaled, by, low)) narrow_to_odd<false, kSubnormals>(x + j, w + j, 8, scaled, scale, unused);
    }
  }
  if constexpr (kStats) mx = std::max(mx, largest_lane32(vmx));
#endif
  for (; i < m; ++i) {
    const double v = scaled ? x[i] * scale : x[i];
    if constexpr (kStats) mx = std::max(mx, bits_of(static_cast<float>(v)) & 0x7FFFFFFFu);
    w[i] = odd_float(v);
  }
  (void)unused;
}

// float64 -> float16, round to nearest, in one pass: narrow_nearest's rule, with F16C's conversion (round
// to nearest even, NaN kept quiet) in the register, so no float32 buffer is written and read back (float64
// -> float16 from L2, Zen 4: about 0.9x the time of narrow_nearest then the float32 loop). kSat clamps to
// max finite first, as the float32 loop does. Returns where the vector loop stopped; the caller casts the
// rest. With kStats, mx as narrow_nearest's.
template <bool kStats, bool kSat>
inline int64_t f64_to_f16(const double* x, uint16_t* __restrict y, int64_t m, bool scaled, double scale, uint32_t& mx) {
  constexpr uint32_t kLow = (1u << (22 - F16::man)) - 1;
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  int64_t i = 0;
  uint64_t unused = 0;
#if defined(__AVX512F__)
  bool midpoint = false;
  const __m512d by = _mm512_set1_pd(scale);
  const __m512 hi = _mm512_set1_ps(F16::max_finite()), lo = _mm512_set1_ps(-F16::max_finite());
  const __m512i low = _mm512_set1_epi32(int32_t(kLow));
  __m512i vmx = _mm512_setzero_si512();
  for (; i + 16 <= m; i += 16) {
    __m512 f = nearest16<kStats>(x + i, scaled, by, low, vmx, midpoint);
    if (midpoint) {
      alignas(64) float odd[16];
      narrow_to_odd<false, false>(x + i, odd, 16, scaled, scale, unused);
      f = _mm512_load_ps(odd);
    }
    if constexpr (kSat) f = _mm512_max_ps(lo, _mm512_min_ps(hi, f));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), _mm512_cvtps_ph(f, kRound));
  }
  if constexpr (kStats) mx = std::max(mx, largest_lane32(vmx));
#elif defined(__AVX2__) && defined(__F16C__)
  const __m256d by = _mm256_set1_pd(scale);
  const __m256 hi = _mm256_set1_ps(F16::max_finite()), lo = _mm256_set1_ps(-F16::max_finite());
  const __m256i low = _mm256_set1_epi32(int32_t(kLow));
  __m256i vmx = _mm256_setzero_si256();
  auto store = [&](__m256 f, int64_t at) {  // eight float32 values as float16 at y + at, saturated if asked
    if constexpr (kSat) f = _mm256_max_ps(lo, _mm256_min_ps(hi, f));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + at), _mm256_cvtps_ph(f, kRound));
  };
  for (; i + 8 <= m;) {
    const int64_t block = i;
    __m256i maybe = _mm256_setzero_si256();
    for (int k = 0; k < 4 && i + 8 <= m; ++k, i += 8) store(narrow8<kStats>(x + i, scaled, by, low, vmx, maybe), i);
    if (__builtin_expect(!_mm256_testz_si256(maybe, maybe), 0)) {
      for (int64_t j = block; j < i; j += 8) {
        if (!midpoint8(x + j, scaled, by, low)) continue;
        alignas(32) float odd[8];
        narrow_to_odd<false, false>(x + j, odd, 8, scaled, scale, unused);
        store(_mm256_load_ps(odd), j);
      }
    }
  }
  if constexpr (kStats) mx = std::max(mx, largest_lane32(vmx));
#else
  (void)x, (void)y, (void)m, (void)scaled, (void)scale, (void)mx;
#endif
  (void)unused;
  return i;
}

// The max of |x|'s bits over [x, x + n), as far as the level's vector loop goes; returns where it stopped.
// Four accumulators: one would chain every compare to the one before.
inline int64_t max_abs_bits(const double* x, int64_t n, uint64_t& out) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512i magnitude = _mm512_set1_epi64(0x7FFFFFFFFFFFFFFFll);
  __m512i mx[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
  for (; i + 32 <= n; i += 32)
    for (int k = 0; k < 4; ++k)
      mx[k] = _mm512_max_epu64(mx[k], _mm512_and_si512(_mm512_loadu_si512(x + i + 8 * k), magnitude));
  const __m512i all = _mm512_max_epu64(_mm512_max_epu64(mx[0], mx[1]), _mm512_max_epu64(mx[2], mx[3]));
  out = std::max(out, uint64_t(_mm512_reduce_max_epu64(all)));
#elif defined(__AVX2__)
  const __m256i magnitude = _mm256_set1_epi64x(0x7FFFFFFFFFFFFFFFll);
  __m256i mx[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 4; ++k)
      mx[k] = max_magnitude(_mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 4 * k)), magnitude),
                            mx[k]);
  out = std::max(out, largest_lane(max_magnitude(max_magnitude(mx[0], mx[1]), max_magnitude(mx[2], mx[3]))));
#endif
  return i;
}

// Statistics as signed integers with -1 for "none yet": the bits of a finite |x| order like the
// magnitudes, and this form of the max reduction is one GCC vectorizes.
template <class C> struct Stats {
  using I = std::make_signed_t<typename Wide<C>::U>;
  I amax = -1;
  int64_t nonfinite = 0;
  void merge(const Stats& o) {
    amax = std::max(amax, o.amax);
    nonfinite += o.nonfinite;
  }
  float amax_float() const {
    const typename Wide<C>::U u = amax < 0 ? 0 : amax;
    C v;
    std::memcpy(&v, &u, sizeof v);
    return static_cast<float>(v);  // rounding is monotone, so this is the float32 max
  }
};

// The exact statistics of a chunk: the max over the finite |x| and the count of inf and NaN.
template <class S> void gather_exact(const S* __restrict x, int64_t n, Stats<compute_t<S>>& st) {
  using C = compute_t<S>;
  using W = Wide<C>;
  using I = typename Stats<C>::I;
  constexpr I inf = I(W::inf);
  I amax = st.amax;
  I nonfinite = 0;
  for (int64_t i = 0; i < n; ++i) {
    const I a = I(bits_of(load(x, i)) & ~(typename W::U(1) << (W::width - 1)));
    amax = std::max(amax, a < inf ? a : I(-1));
    nonfinite += a >= inf ? I(1) : I(0);
  }
  st.amax = amax;
  st.nonfinite += nonfinite;
}

// The statistics of a chunk, fast: the max of every |x|'s bits (2 operations an element) is the amax
// unless it is inf or NaN (bits at or above inf's), in which case the chunk, still in L1, is gathered
// again exactly. Finite data, the common case, never pays for the exclusion and the count. Returns
// whether the chunk holds a NaN.
template <class S> bool gather(const S* __restrict x, int64_t n, Stats<compute_t<S>>& st) {
  using C = compute_t<S>;
  using W = Wide<C>;
  using U = typename W::U;
  U m = 0;
  int64_t i = 0;
  if constexpr (std::is_same_v<S, double>) i = max_abs_bits(x, n, m);  // GCC leaves 64-bit max scalar on AVX2
  for (; i < n; ++i) m = std::max(m, U(bits_of(load(x, i)) & ~(U(1) << (W::width - 1))));
  if (m < W::inf) {
    st.amax = std::max(st.amax, typename Stats<C>::I(m));
  } else {
    gather_exact(x, n, st);
  }
  return m > W::inf;
}

template <class S, class T, bool Stochastic, bool Scaled, bool Nan = true>
void cast(const S* __restrict x, typename T::Out* __restrict y, int64_t n, int64_t offset, compute_t<S> scale,
          uint32_t over, uint64_t seed) {
  using C = compute_t<S>;
  for (int64_t i = 0; i < n; ++i) {
    C v = load(x, i);
    if constexpr (Scaled) v = v * scale;
    if constexpr (Stochastic) {
      y[i] = typename T::Out(stochastic_bits<T, C>(v, draw32(seed, uint64_t(offset + i)), over));
    } else {
      y[i] = typename T::Out(nearest_bits<T, C, Nan>(v, over));
    }
  }
}

// -- explicit vector paths, one per instruction-set level ---------------------------------------------
//
// float32 -> any target, round to nearest, with or without the scale: the case every training step
// takes. GCC vectorizes the scalar loops above, but on AVX2 it packs the 32-bit results into bytes
// badly and cannot use F16C, so each level has its own loop here. float16 goes through the hardware
// conversion (vcvtps2ph, IEEE round to nearest even, subnormals and inf included; saturation is a
// clamp before it, which keeps NaN: min/max return their second operand when either is NaN); the
// other targets use the add-and-shift rule of nearest_bits on 8 or 16 lanes. The statistics ride in
// the same loop (a max over |x|'s bits). The scalar build (no AVX2) keeps the loops above.
#if defined(__AVX512F__)
#define SWITCHYARD_PC_SIMD 1
struct Simd {
  static constexpr int lanes = 16;
  using F = __m512;
  using I = __m512i;
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F addf(F a, F b) { return _mm512_add_ps(a, b); }
  static F set1f(float v) { return _mm512_set1_ps(v); }
  static I set1(uint32_t v) { return _mm512_set1_epi32(int32_t(v)); }
  static I bits(F v) { return _mm512_castps_si512(v); }
  static F flt(I v) { return _mm512_castsi512_ps(v); }
  static I band(I a, I b) { return _mm512_and_si512(a, b); }
  static I bor(I a, I b) { return _mm512_or_si512(a, b); }
  static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  template <int k> static I shr(I a) { return _mm512_srli_epi32(a, k); }
  template <int k> static I shl(I a) { return _mm512_slli_epi32(a, k); }
  static I max(I a, I b) { return _mm512_max_epi32(a, b); }
  static I gt_sel(I x, I y, I a, I b) { return _mm512_mask_blend_epi32(_mm512_cmpgt_epi32_mask(x, y), b, a); }
  static I min(I a, I b) { return _mm512_min_epi32(a, b); }
  static F clamp(F v, F lo, F hi) { return _mm512_max_ps(lo, _mm512_min_ps(hi, v)); }
  static int32_t hmax(I a) { return _mm512_reduce_max_epi32(a); }
  static void store_half(uint16_t* y, F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static void store4(uint16_t* y, const I* r) {
    for (int k = 0; k < 4; ++k) _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + k * lanes), _mm512_cvtepi32_epi16(r[k]));
  }
  static void store4(uint8_t* y, const I* r) {
    for (int k = 0; k < 4; ++k) _mm_storeu_si128(reinterpret_cast<__m128i*>(y + k * lanes), _mm512_cvtepi32_epi8(r[k]));
  }
};

// float32 -> bfloat16 by the CPU's own conversion where it has one: AVX512_BF16's vcvtneps2bf16 (Zen 4,
// Cooper Lake, Sapphire Rapids; not part of x86-64-v4, so chosen at run time). It rounds to nearest even
// and makes a NaN quiet keeping its top bits, as the integer rule does, in one instruction for 16 lanes
// where the integer rule takes about ten. It flushes subnormal inputs to zero, which the contract does
// not: a vector holding one (0 < |v| < 2^-126) has those lanes redone by the integer rule, which is exact
// there (their rounding cannot carry past the exponent field). Saturation is a clamp before it (NaN kept).
// Compilers from GCC 10 and Clang 11 on know the instruction; older ones build the integer rule alone.
#if (defined(__clang__) && __clang_major__ >= 11) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10)
#define SWITCHYARD_PC_BF16 1
#endif
std::atomic<bool> bf16_instruction_allowed{true};  // tests switch it off to check the integer loop here

bool bf16_instruction() {
#if defined(SWITCHYARD_PC_BF16)
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has && bf16_instruction_allowed.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

#if defined(SWITCHYARD_PC_BF16)
template <bool Scaled, bool WithStats, bool Saturate>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
int64_t bf16_by_instruction(const float* __restrict x, uint16_t* __restrict y, int64_t n, float scale, int32_t& mx,
                            const char* fetch) {
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 hi = _mm512_set1_ps(BF16::max_finite()), lo = _mm512_set1_ps(-BF16::max_finite());
  const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF), one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF);
  const __m512i below_normal = _mm512_set1_epi32(0x007FFFFF);  // |v| - 1 below it: a subnormal (not zero)
  __m512i vmax = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    if (fetch != nullptr) fetch_lines(fetch + i * 4, 256);
    for (int k = 0; k < 4; ++k) {
      __m512 v = _mm512_loadu_ps(x + i + 16 * k);
      if constexpr (Scaled) v = _mm512_mul_ps(v, vscale);
      const __m512i u = _mm512_castps_si512(v);
      const __m512i a = _mm512_and_si512(u, absmask);
      if constexpr (WithStats) vmax = _mm512_max_epi32(vmax, a);
      if constexpr (Saturate) v = _mm512_max_ps(lo, _mm512_min_ps(hi, v));
      __m256i r = (__m256i)_mm512_cvtneps_pbh(v);
      const __mmask16 sub = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(a, one), below_normal);
      if (sub) {  // rare: the integer rule for the subnormal lanes (sign included in u)
        const __m512i t = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, half),
                                                             _mm512_and_si512(_mm512_srli_epi32(u, 16), one)), 16);
        r = _mm256_mask_blend_epi16(sub, r, _mm512_cvtepi32_epi16(t));
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i + 16 * k), r);
    }
  }
  if constexpr (WithStats) mx = std::max(mx, _mm512_reduce_max_epi32(vmax));
  return i;
}
#endif  // SWITCHYARD_PC_BF16
#elif defined(__AVX2__) && defined(__F16C__)
#define SWITCHYARD_PC_SIMD 1
struct Simd {
  static constexpr int lanes = 8;
  using F = __m256;
  using I = __m256i;
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F addf(F a, F b) { return _mm256_add_ps(a, b); }
  static F set1f(float v) { return _mm256_set1_ps(v); }
  static I set1(uint32_t v) { return _mm256_set1_epi32(int32_t(v)); }
  static I bits(F v) { return _mm256_castps_si256(v); }
  static F flt(I v) { return _mm256_castsi256_ps(v); }
  static I band(I a, I b) { return _mm256_and_si256(a, b); }
  static I bor(I a, I b) { return _mm256_or_si256(a, b); }
  static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  template <int k> static I shr(I a) { return _mm256_srli_epi32(a, k); }
  template <int k> static I shl(I a) { return _mm256_slli_epi32(a, k); }
  static I max(I a, I b) { return _mm256_max_epi32(a, b); }
  static I gt_sel(I x, I y, I a, I b) { return _mm256_blendv_epi8(b, a, _mm256_cmpgt_epi32(x, y)); }
  static I min(I a, I b) { return _mm256_min_epi32(a, b); }
  static F clamp(F v, F lo, F hi) { return _mm256_max_ps(lo, _mm256_min_ps(hi, v)); }
  static int32_t hmax(I a) {
    __m128i m = _mm_max_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4E));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xB1));
    return _mm_cvtsi128_si32(m);
  }
  static void store_half(uint16_t* y, F v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // packus works within 128-bit halves: the permutes put the lanes back in order (all values fit).
  static void store4(uint16_t* y, const I* r) {
    for (int k = 0; k < 4; k += 2) {
      const I p = _mm256_permute4x64_epi64(_mm256_packus_epi32(r[k], r[k + 1]), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + k * lanes), p);
    }
  }
  static void store4(uint8_t* y, const I* r) {
    const I b = _mm256_packus_epi16(_mm256_packus_epi32(r[0], r[1]), _mm256_packus_epi32(r[2], r[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y),
                        _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
};
#endif

#if defined(SWITCHYARD_PC_SIMD)
// Rounds and stores the longest prefix of x that is a whole number of 4-vector blocks; returns its
// length (the caller does the rest with the scalar loop). With Stats, mx becomes the max of mx and of
// |x|'s bits over the prefix. The integer rule is nearest_bits' float32 one, lane by lane. Without Nan
// the integer rules leave out their NaN lanes' fix (a NaN may come out as inf or a number): the caller
// takes that form only for a block it knows to hold no NaN, and redoes one that does. Never inlined: with
// the NaN forms beside each other, inlining into pass() cost the float32 -> bfloat16 amax cast on AVX2
// 1.12x the time on data with NaN, through the same loop; out of line, each loop's code is its own.
template <class T, bool Scaled, bool WithStats, bool Saturate, bool Nan>
__attribute__((noinline)) int64_t simd_cast(const float* __restrict x, typename T::Out* __restrict y, int64_t n,
                                            float scale, int32_t& mx, const char* fetch = nullptr) {
  static_assert(!(Scaled && WithStats), "the statistics are of x, taken in the unscaled pass");
  using V = Simd;
  using VI = typename V::I;
  using VF = typename V::F;
  constexpr int L = V::lanes, B = 4 * L;
  const VF vscale = V::set1f(scale);
  const VI absmask = V::set1(0x7FFFFFFFu);
  VI vmax = V::set1(0);
  int64_t i = 0;
#if defined(__AVX512F__) && defined(SWITCHYARD_PC_BF16)
  if constexpr (std::is_same_v<T, BF16>) {
    if (bf16_instruction())
      return bf16_by_instruction<Scaled, WithStats, Saturate>(x, reinterpret_cast<uint16_t*>(y), n, scale, mx, fetch);
  }
#endif
  if constexpr (std::is_same_v<T, F16>) {
    const VF hi = V::set1f(T::max_finite()), lo = V::set1f(-T::max_finite());
    for (; i + B <= n; i += B) {
      if (fetch != nullptr) fetch_lines(fetch + i * 4, B * 4);  // kFetchAhead bytes on, a block's worth
      for (int k = 0; k < 4; ++k) {
        VF v = V::load(x + i + k * L);
        if constexpr (Scaled) v = V::mul(v, vscale);
        if constexpr (WithStats) vmax = V::max(vmax, V::band(V::bits(v), absmask));
        if constexpr (Saturate) v = V::clamp(v, lo, hi);
        V::store_half(reinterpret_cast<uint16_t*>(y) + i + k * L, v);
      }
    }
  } else if constexpr (std::is_same_v<T, BF16> && !Saturate) {
    // bfloat16 shares float32's exponent range: round the top half of the pattern, sign included (the
    // carry of the largest finite values makes inf, as it should); a NaN keeps its top bits and is
    // made quiet, so that rounding cannot carry it into inf.
    const VI half = V::set1(0x7FFFu), one = V::set1(1u), quiet = V::set1(0x40u), inf = V::set1(Wide<float>::inf);
    for (; i + B <= n; i += B) {
      if (fetch != nullptr) fetch_lines(fetch + i * 4, B * 4);  // kFetchAhead bytes on, a block's worth
      VI r[4];
      for (int k = 0; k < 4; ++k) {
        VF v = V::load(x + i + k * L);
        if constexpr (Scaled) v = V::mul(v, vscale);
        const VI u = V::bits(v);
        const VI a = V::band(u, absmask);
        if constexpr (WithStats) vmax = V::max(vmax, a);
        const VI top = V::template shr<16>(u);
        const VI out = V::template shr<16>(V::add(V::add(u, half), V::band(top, one)));
        r[k] = Nan ? V::gt_sel(a, inf, V::bor(top, quiet), out) : out;
      }
      V::store4(y + i, r);
    }
  } else {
    using W = Wide<float>;
    constexpr int d = W::man - T::man;
    const VI addc = V::set1(((1u << (d - 1)) - 1) - (uint32_t(W::bias - T::bias) << (T::man + d)));
    const VI one = V::set1(1u);
    const VI normal = V::set1(bits_of(std::ldexp(1.0f, T::emin)));
    const float magic = std::ldexp(1.0f, T::emin - T::man + W::man);
    const VF vmagic = V::set1f(magic);
    const VI magic_bits = V::set1(bits_of(magic));
    const VI over = V::set1(Saturate ? T::max_bits : T::overflow_bits);
    const VI inf = V::set1(W::inf), nan = V::set1(T::nan_bits);
    for (; i + B <= n; i += B) {
      if (fetch != nullptr) fetch_lines(fetch + i * 4, B * 4);  // kFetchAhead bytes on, a block's worth
      VI r[4];
      for (int k = 0; k < 4; ++k) {
        VF v = V::load(x + i + k * L);
        if constexpr (Scaled) v = V::mul(v, vscale);
        const VI u = V::bits(v);
        const VI a = V::band(u, absmask);
        if constexpr (WithStats) vmax = V::max(vmax, a);
        VI out = V::template shr<d>(V::add(V::add(a, addc), V::band(V::template shr<d>(a), one)));
        if constexpr (T::emin > 1 - W::bias) {
          const VI subnormal = V::sub(V::bits(V::addf(V::flt(a), vmagic)), magic_bits);
          out = V::gt_sel(normal, a, subnormal, out);
        }
        // Past the last value that rounds to max finite the add-and-shift count is above max_bits (inf
        // and NaN included: nothing carries out of 32 bits), below it at most max_bits, so a min puts
        // the overflow pattern in; a NaN then takes the NaN bits (for e4m3fn without saturation the
        // overflow pattern is the NaN already). Selected, not ORed in: max_bits | nan_bits is a NaN
        // too, but not the reference's (bfloat16 0x7FFF for 0x7FC0, float8_e5m2 0x7F for 0x7E).
        out = V::min(out, over);
        if constexpr (Nan && (Saturate || T::overflow_bits != T::nan_bits)) out = V::gt_sel(a, inf, nan, out);
        r[k] = V::bor(out, V::template shl<T::bits - 1>(V::template shr<31>(u)));
      }
      V::store4(y + i, r);
    }
  }
  if constexpr (WithStats) mx = std::max(mx, V::hmax(vmax));
  return i;
}
#endif

enum class Phase { Stats, Cast, CastAndStats };

// Outputs larger than this are written with non-temporal (streaming) stores: they cannot stay in the
// caches anyway, and a streaming store skips reading each output line in before overwriting it.
constexpr int64_t kStreamBytes = int64_t(64) << 20;
constexpr int64_t kFetchAhead = 2048;  // bytes: how far ahead of its loads a vector loop fetches a large source
constexpr int64_t kLanesBytes = int64_t(16) << 20;  // a source this large is walked in lanes (see pass)

// Copies `bytes` from src (a chunk in L1) to dst, with streaming stores for dst's 64-byte-aligned
// middle where the CPU has them; the caller fences once after its last call.
inline void stream_copy(void* dst, const void* src, int64_t bytes) {
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE2__)
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  const int64_t head = std::min<int64_t>(bytes, (64 - int64_t(reinterpret_cast<uintptr_t>(d) & 63)) & 63);
  std::memcpy(d, s, size_t(head));
  int64_t i = head;
  for (; i + 64 <= bytes; i += 64) {
#if defined(__AVX512F__)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i), _mm512_loadu_si512(s + i));
#elif defined(__AVX2__)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 32),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 32)));
#else
    for (int k = 0; k < 64; k += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + k), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + k)));
#endif
  }
  std::memcpy(d + i, s + i, size_t(bytes - i));
#else
  std::memcpy(dst, src, size_t(bytes));
#endif
}

// One pass over x, split into contiguous shares, one per OpenMP thread, each walked in chunks that stay
// in L1: the cast and the statistics of a chunk read it from memory once. A chunk without NaN (known
// from the statistics, or from `may_nan` false in the Cast phase) takes a rounding loop without the NaN
// rule. The scalar loops take the statistics first, in a loop of their own (GCC does not vectorize the
// max reduction inside the rounding loop); the vector loops take them while rounding, and redo a chunk
// the max shows to hold a NaN.
template <Phase P, class S, class T, bool Stochastic, bool Scaled>
Stats<compute_t<S>> pass(const S* x, typename T::Out* y, int64_t n, compute_t<S> scale, uint32_t over,
                         uint64_t seed, bool may_nan = true) {
  using C = compute_t<S>;
  using Out = typename T::Out;
  constexpr int64_t kChunk = 2048;
  const bool streaming = P != Phase::Stats && n * int64_t(sizeof(Out)) >= kStreamBytes;
  // A source of kLanesBytes or more comes from memory (or from a last-level cache it fills), and two
  // things keep more of its lines in flight there:
  // - Lanes. Each thread walks its share as kLanes equal parts side by side, 512 bytes of each in turn
  //   (then the rest, in chunks). One core reading one stream is bounded by the misses it keeps in
  //   flight: a max over 2^26 float32 read about 21 GB/s on the Xeon VM with one stream a core, 31-33 GB/s
  //   with four streams of 512 bytes each in turn (8 KiB each in turn: no gain).
  // - Fetches ahead of use, so that the loads overlap the rounding: a float32 source kFetchAhead bytes on
  //   in its lane, a block's lines each iteration of the vector loops; other sources and the statistics
  //   pass the next piece's lines at each piece's start.
  // 2^26 float32 -> float8_e4m3fn on that Xeon, against the build with neither (one stream, fetches past
  // 128 MiB): AVX2 build with torch held to AVX2, "none" 72% -> 113% of a copy's bandwidth, "amax"
  // 43% -> 65%; AVX-512 91% -> 128%, 51% -> 69%. At 2^22 and 2^23 elements (16 and 32 MiB, which its
  // caches hold) the two changed nothing; at 2^24 and 2^25 they were 1.2-1.5x faster.
  const bool from_memory = n * int64_t(sizeof(S)) >= kLanesBytes;  // walked in lanes, fetched ahead
  constexpr int64_t kLanes = 4, kPiece = 512 / int64_t(sizeof(S));
#if defined(SWITCHYARD_PC_SIMD)
  // float32 values [b, b + m) at src rounded to nearest into dst by the level's vector loop, the rest by
  // the scalar one (`by` multiplies them first when scaled). The rule for NaN took 3 of the bfloat16
  // integer loop's 11 operations a vector, and that loop is bound by its operations (AVX2, or AVX-512
  // without AVX512_BF16), so it is left out where src holds no NaN:
  // - without with_stats, `nan` says whether src may hold one (known from the statistics pass);
  // - with with_stats, mx becomes the max of |src|'s bits, taken in the same loop. Where `nan` is false
  //   the loop leaves the rule out, and a max above inf's bits (a NaN) sends the prefix, still in L1,
  //   through the loop again with it. Where `nan` is true (an earlier chunk held inf or NaN, which come
  //   in runs) the rule is in from the start, so data full of NaN is not cast twice.
  auto round_floats = [&](auto scaled, auto with_stats, const float* src, Out* dst, int64_t b, int64_t m,
                          float by, int32_t& mx, bool nan) {
    constexpr bool kScaled = decltype(scaled)::value, kStats = decltype(with_stats)::value;
    // a float32 source read in place: its lines ahead are fetched inside the vector loop
    const char* fetch = from_memory && static_cast<const void*>(src) == static_cast<const void*>(x + b)
                            ? reinterpret_cast<const char*>(src) + kFetchAhead : nullptr;
    auto vector = [&](auto stats, auto nan_rule) {
      constexpr bool kS = decltype(stats)::value, kN = decltype(nan_rule)::value;
      return over == T::max_bits ? simd_cast<T, kScaled, kS, true, kN>(src, dst, m, by, mx, fetch)
                                 : simd_cast<T, kScaled, kS, false, kN>(src, dst, m, by, mx, fetch);
    };
    int64_t done;
    if constexpr (kStats) {
      if (nan) {
        done = vector(std::true_type{}, std::true_type{});
      } else {
        done = vector(std::true_type{}, std::false_type{});
        if (mx > int32_t(Wide<float>::inf)) done = vector(std::false_type{}, std::true_type{});
      }
    } else {
      done = nan ? vector(std::false_type{}, std::true_type{}) : vector(std::false_type{}, std::false_type{});
    }
    if (done < m) {
      if constexpr (kStats)
        for (int64_t i = done; i < m; ++i) mx = std::max(mx, int32_t(bits_of(src[i]) & 0x7FFFFFFFu));
      cast<float, T, false, kScaled, true>(src + done, dst + done, m - done, b + done, by, over, seed);
    }
  };
#endif
  // One chunk [b, b + m) of the source, at src (x + b, or its float32 widening).
  auto chunk = [&](const auto* src, int64_t b, int64_t m, Stats<C>& mine, Out* staged) {
    using SS = std::remove_cv_t<std::remove_pointer_t<decltype(src)>>;
    Out* dst = streaming ? staged : y + b;
#if defined(SWITCHYARD_PC_SIMD)
    if constexpr (P != Phase::Stats && std::is_same_v<SS, float> && !Stochastic) {
      constexpr bool with_stats = P == Phase::CastAndStats;
      using I = typename Stats<C>::I;
      int32_t mx = 0;
      const bool nan = with_stats ? mine.nonfinite > 0 : may_nan;  // with stats: an earlier chunk's inf or NaN
      round_floats(std::bool_constant<Scaled>{}, std::bool_constant<with_stats>{}, src, dst, b, m, scale, mx, nan);
      if constexpr (with_stats) {
        if (mx < int32_t(Wide<float>::inf)) {
          mine.amax = std::max(mine.amax, I(mx));
        } else {
          gather_exact(src, m, mine);  // the chunk holds inf or NaN: the exact statistics, still in L1
        }
      }
      if (streaming) stream_copy(y + b, staged, m * int64_t(sizeof(Out)));
      return;
    }
#endif
    bool nan = may_nan;
    if constexpr (P != Phase::Cast) nan = gather(src, m, mine);
    if constexpr (P != Phase::Stats) {
      if constexpr (std::is_same_v<C, float> && !Stochastic) {
        if (nan) {
          cast<SS, T, Stochastic, Scaled, true>(src, dst, m, b, scale, over, seed);
        } else {
          cast<SS, T, Stochastic, Scaled, false>(src, dst, m, b, scale, over, seed);
        }
      } else {
        cast<SS, T, Stochastic, Scaled>(src, dst, m, b, scale, over, seed);
      }
      if (streaming) stream_copy(y + b, staged, m * int64_t(sizeof(Out)));
    }
  };
  // One thread's share [begin, end); below the grain the caller's thread does it all, outside any
  // parallel region (an OpenMP region of one thread still costs a team start-up on every call).
  // float16 and bfloat16 sources are widened to float32 a chunk at a time first (exact, and a loop GCC
  // vectorizes), so they take the float32 loops and their vector paths: converting inside the rounding
  // loop kept it scalar on AVX2 (2 ns an element, 2.5x torch's own cast).
  auto share = [&](int64_t begin, int64_t end) {
    alignas(64) Out staged[kChunk];
    Stats<C> mine;
    // Elements [b, b + m); `next` starts the piece that follows in the walk.
    auto piece = [&](int64_t b, int64_t m, int64_t next) {
      // the next piece's source lines, on their way while this one is read or rounded (a float32 source
      // being rounded fetches them inside the vector loops instead: a burst of 128 lines a chunk did less)
      if (from_memory && (P == Phase::Stats || !std::is_same_v<S, float>)) {
        fetch_lines(reinterpret_cast<const char*>(x + next), std::min(m, end - next) * int64_t(sizeof(S)));
      }
      if constexpr (std::is_same_v<S, at::Half> || std::is_same_v<S, at::BFloat16>) {
        alignas(64) float wide[kChunk];
        widen(x + b, wide, m);
        chunk(static_cast<const float*>(wide), b, m, mine, staged);
#if defined(SWITCHYARD_PC_SIMD)
      } else if constexpr (std::is_same_v<S, double> && !Stochastic && P != Phase::Stats) {
        // float64, round to nearest: narrowed to odd float32 (scaled in float64 first), the statistics of
        // the float64 values taken in the same loop (a finite value past float32's range makes amax inf),
        // then rounded by the float32 vector loops: the same bits as the float64 scalar loops, 3-4x faster
        alignas(64) float wide[kChunk];
        constexpr bool kStats = P == Phase::CastAndStats;
        bool nan = may_nan;  // a NaN narrows to a NaN, and nothing else does
        Out* dst = streaming ? staged : y + b;
        uint32_t mx = 0;  // with kStats, the max of |RN(x)|'s float32 bits: RN(max |x|)
        int64_t done = 0;  // float16: the vector body in one pass, the rest through the float32 loops
        if constexpr (std::is_same_v<T, F16>) {
          done = over == T::max_bits ? f64_to_f16<kStats, true>(x + b, dst, m, Scaled, double(scale), mx)
                                     : f64_to_f16<kStats, false>(x + b, dst, m, Scaled, double(scale), mx);
        }
        narrow_nearest<kStats, T>(x + b + done, wide, m - done, Scaled, double(scale), mx);
        if constexpr (kStats) {
          nan = mx > Wide<float>::inf;
          if (mx < Wide<float>::inf) {
            mine.amax = std::max(mine.amax, typename Stats<C>::I(bits_of(double(float_of(mx)))));
          } else {  // inf or NaN, or a finite x past float32's range: the exact statistics, still in L1
            gather_exact(x + b, m, mine);
          }
        }
        int32_t unused = 0;
        if (done < m) round_floats(std::false_type{}, std::false_type{}, wide, dst + done, b + done, m - done, 1.0f, unused, nan);
        if (streaming) stream_copy(y + b, staged, m * int64_t(sizeof(Out)));
#endif
      } else {
        chunk(x + b, b, m, mine, staged);
      }
    };
    if (from_memory) {  // kLanes parts of `span` elements side by side, then the rest
      const int64_t span = (end - begin) / (kLanes * kPiece) * kPiece;
      for (int64_t c = 0; c < span; c += kPiece)
        for (int64_t l = 0; l < kLanes; ++l)  // a lane's last piece fetches nothing ahead (`next` = end)
          piece(begin + l * span + c, kPiece, c + kPiece < span ? begin + l * span + c + kPiece : end);
      begin += kLanes * span;
    }
    for (int64_t b = begin; b < end; b += kChunk) piece(b, std::min(kChunk, end - b), b + kChunk);
#if defined(__SSE2__)
    if (streaming) _mm_sfence();  // the streaming stores are visible before the region ends
#endif
    return mine;
  };
  if (n < kParallelGrain) return share(0, n);
  Stats<C> total;
#pragma omp parallel
  {
    // shares start on whole 64-element blocks: a share starting mid-line (n = 2^20 + 7 split in two) split
    // every vector load and store of its thread across two cache lines (1.4x the time of 2^20)
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t blocks = (n + 63) / 64;
    const Stats<C> mine = share(std::min(n, blocks * t / threads * 64), std::min(n, blocks * (t + 1) / threads * 64));
#pragma omp critical
    total.merge(mine);
  }
  return total;
}

float amax_scale(float amax, float max_finite, int64_t margin) {
  if (!(amax > 0.0f) || !std::isfinite(amax)) return 1.0f;
  float s = max_finite / amax;
  s = s / std::ldexp(1.0f, int(margin));
  return std::isinf(s) ? std::numeric_limits<float>::max() : s;
}

// Where outputs come from: a reuse pool, the CPU counterpart of the CUDA caching allocator. A cast
// runs at memory speed, and paging in a fresh 64-128 MiB output costs as much as the cast itself
// (large blocks come straight from mmap and go back to the OS when freed, so every call faults in
// every page again). Blocks of at least kPoolMin bytes are rounded up to 64 KiB (under 2 MiB) or to
// 2 MiB and asked for transparent huge pages; when their tensor dies they wait, idle, for the next output of the same
// rounded size (the newest such block first), up to a cap on idle bytes (1 GiB unless set, see
// precision_cast.py; 0 turns the pool off), oldest given back first. A tensor from the pool is an
// ordinary resizable CPU tensor: its storage carries this allocator, so resize_ also goes through it.
// Smaller blocks go to torch's CPU allocator.
class OutputPool final : public c10::Allocator {
 public:
  static OutputPool& get() {
    static OutputPool* pool = new OutputPool();  // never destroyed: tensors may die after static teardown
    return *pool;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kPoolMin || limit_ == 0) return c10::GetCPUAllocator()->allocate(n);
    const size_t grain = n < kHuge ? kGrain : kHuge;
    const size_t bytes = (n + grain - 1) & ~(grain - 1);
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = idle_.rbegin(); it != idle_.rend(); ++it) {
        if (it->bytes == bytes) {
          ptr = it->ptr;
          idle_bytes_ -= bytes;
          idle_.erase(std::next(it).base());
          ++hits_;
          break;
        }
      }
      if (ptr == nullptr) ++misses_;
    }
    if (ptr == nullptr) {
      ptr = std::aligned_alloc(grain, bytes);
      if (ptr == nullptr) {  // give the idle blocks back and try once more before giving up
        clear();
        ptr = std::aligned_alloc(grain, bytes);
      }
      TORCH_CHECK(ptr != nullptr, "precision_cast_cpu: out of memory allocating ", bytes, " bytes");
      if (grain == kHuge) madvise(ptr, bytes, MADV_HUGEPAGE);  // a hint: without THP it changes nothing
    }
    return {ptr, new Block{ptr, bytes}, &OutputPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // (idle bytes, idle blocks, hits, misses, limit in bytes)
  std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {int64_t(idle_bytes_), int64_t(idle_.size()), hits_, misses_, int64_t(limit_.load())};
  }

  // Frees every idle block; returns the bytes given back.
  int64_t clear() {
    std::deque<Block> idle;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      idle.swap(idle_);
      idle_bytes_ = 0;
    }
    int64_t freed = 0;
    for (const Block& b : idle) {
      std::free(b.ptr);
      freed += int64_t(b.bytes);
    }
    return freed;
  }

  // Sets the cap on idle bytes (0 turns the pool off), freeing what is over it; returns the old cap.
  int64_t set_limit(int64_t limit) {
    TORCH_CHECK(limit >= 0, "precision_cast_pool_limit: the limit must be >= 0 bytes, got ", limit);
    int64_t old;
    std::deque<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      old = int64_t(limit_.load());
      limit_ = size_t(limit);
      trim_locked(0, evicted);
    }
    for (const Block& b : evicted) std::free(b.ptr);
    return old;
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };
  static constexpr size_t kHuge = size_t(1) << 21;
  // From glibc's default mmap threshold on: a fresh output of that size may come from mmap and fault in
  // every page (x.to(float16) of 2^18 elements took 17 us, the same copy into a resident output 12 us).
  static constexpr size_t kPoolMin = size_t(128) << 10;
  static constexpr size_t kGrain = size_t(64) << 10;  // blocks under 2 MiB round up to this

  OutputPool() = default;

  // Evicts the oldest idle blocks until `incoming` more bytes fit under the cap (caller holds mutex_).
  void trim_locked(size_t incoming, std::deque<Block>& evicted) {
    while (!idle_.empty() && idle_bytes_ + incoming > limit_) {
      evicted.push_back(idle_.front());
      idle_bytes_ -= idle_.front().bytes;
      idle_.pop_front();
    }
  }

  static void release(void* ctx) {
    std::unique_ptr<Block> block(static_cast<Block*>(ctx));
    OutputPool& pool = get();
    std::deque<Block> evicted;
    bool kept = false;
    {
      std::lock_guard<std::mutex> lock(pool.mutex_);
      if (block->bytes <= pool.limit_) {
        pool.trim_locked(block->bytes, evicted);
        pool.idle_.push_back(*block);
        pool.idle_bytes_ += block->bytes;
        kept = true;
      }
    }
    for (const Block& b : evicted) std::free(b.ptr);
    if (!kept) std::free(block->ptr);
  }

  std::mutex mutex_;
  std::deque<Block> idle_;  // oldest first
  size_t idle_bytes_ = 0;
  std::atomic<size_t> limit_{size_t(1) << 30};  // read without the lock on the allocation path
  int64_t hits_ = 0, misses_ = 0;
};

at::Tensor fresh_output(const at::Tensor& x, at::ScalarType dtype) {
  return at::detail::empty_generic(x.sizes(), &OutputPool::get(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t> precision_cast_pool_stats() {
  return OutputPool::get().stats();
}
int64_t precision_cast_pool_clear() { return OutputPool::get().clear(); }

// Asks for the float32 -> bfloat16 loops on AVX512_BF16's conversion (on = true, the default) or on the
// integer rule; returns whether the conversion is in use (false on CPUs without it and on other levels).
bool precision_cast_bf16_instruction(bool on) {
#if defined(__AVX512F__)
  bf16_instruction_allowed.store(on);
  return bf16_instruction();
#else
  return false;
#endif
}
int64_t precision_cast_pool_limit(int64_t limit) { return OutputPool::get().set_limit(limit); }

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // (y, scale, amax, nonfinite)

// A 0-d CPU tensor holding v, made without a trip through the dispatcher (at::scalar_tensor is an
// empty and a fill_, each dispatched: about a microsecond of a small call's few).
template <class V> at::Tensor scalar_out(V v) {
  at::Tensor t = at::detail::empty_cpu({}, c10::CppTypeToScalarType<V>::value);
  *static_cast<V*>(t.data_ptr()) = v;
  return t;
}

// scale and amax as two 0-d float32 tensors over one 8-byte storage (one allocation fewer a call),
// each over its own bytes. nonfinite keeps a storage of its own: torch.save refuses tensors of two
// dtypes over one storage.
std::pair<at::Tensor, at::Tensor> scale_and_amax_out(float scale, float amax) {
  const at::Tensor both = at::detail::empty_cpu({2}, at::kFloat);
  float* p = static_cast<float*>(both.data_ptr());
  p[0] = scale;
  p[1] = amax;
  auto scalar = [&](int64_t offset) {
    at::Tensor t = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(both.storage()),
                                                            c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                            caffe2::TypeMeta::Make<float>());
    t.unsafeGetTensorImpl()->set_sizes_contiguous({});
    t.unsafeGetTensorImpl()->set_storage_offset(offset);
    return t;
  };
  return {scalar(0), scalar(1)};
}

template <class S, class T>
Result run(const at::Tensor& x, at::Tensor y, bool stochastic, bool amax_scaling, bool saturate, int64_t margin,
           uint64_t seed) {
  using C = compute_t<S>;
  const S* xp = x.data_ptr<S>();
  auto* yp = static_cast<typename T::Out*>(y.data_ptr());
  const int64_t n = x.numel();
  const uint32_t over = saturate ? T::max_bits : T::overflow_bits;
  Stats<C> st;
  float scale = 1.0f;
  if (amax_scaling) {
    st = pass<Phase::Stats, S, T, false, false>(xp, yp, n, C(1), over, seed);
    scale = amax_scale(st.amax_float(), T::max_finite(), margin);
    if (stochastic) pass<Phase::Cast, S, T, true, true>(xp, yp, n, C(scale), over, seed);
    else pass<Phase::Cast, S, T, false, true>(xp, yp, n, C(scale), over, seed, st.nonfinite > 0);
  } else {
    st = stochastic ? pass<Phase::CastAndStats, S, T, true, false>(xp, yp, n, C(1), over, seed)
                    : pass<Phase::CastAndStats, S, T, false, false>(xp, yp, n, C(1), over, seed);
  }
  auto [scale_t, amax_t] = scale_and_amax_out(scale, st.amax_float());
  return {y, scale_t, amax_t, scalar_out(st.nonfinite)};
}

template <class S>
Result run_source(const at::Tensor& x, const at::Tensor& y, bool stochastic, bool amax_scaling, bool saturate,
                  int64_t margin, uint64_t seed) {
  switch (y.scalar_type()) {
    case at::kHalf: return run<S, F16>(x, y, stochastic, amax_scaling, saturate, margin, seed);
    case at::kBFloat16: return run<S, BF16>(x, y, stochastic, amax_scaling, saturate, margin, seed);
    case at::kFloat8_e4m3fn: return run<S, E4M3>(x, y, stochastic, amax_scaling, saturate, margin, seed);
    case at::kFloat8_e5m2: return run<S, E5M2>(x, y, stochastic, amax_scaling, saturate, margin, seed);
    default: TORCH_CHECK(false, "precision_cast_cpu: unsupported target dtype ", y.scalar_type());
  }
}

// The call's options in one int (a small call spends microseconds converting each argument):
// bits 0-1 the target (float16, bfloat16, float8_e4m3fn, float8_e5m2), bit 2 stochastic, bit 3
// scaling="amax", bit 4 saturate, bits 8 and up the margin. plugins/fused/precision_cast.py packs it.
constexpr at::ScalarType kTargets[] = {at::kHalf, at::kBFloat16, at::kFloat8_e4m3fn, at::kFloat8_e5m2};

// x and y hold their n elements at data_ptr() on, in the same order (contiguous, or both of the same
// dense strides); the caller has checked that.
Result cast_flat(const at::Tensor& x, const at::Tensor& y, int64_t flags, int64_t seed) {
  const bool stochastic = flags & 4, amax_scaling = flags & 8, saturate = flags & 16;
  const int64_t margin = flags >> 8;
  const uint64_t s = uint64_t(seed);
  switch (x.scalar_type()) {
    case at::kFloat: return run_source<float>(x, y, stochastic, amax_scaling, saturate, margin, s);
    case at::kDouble: return run_source<double>(x, y, stochastic, amax_scaling, saturate, margin, s);
    case at::kBFloat16: return run_source<at::BFloat16>(x, y, stochastic, amax_scaling, saturate, margin, s);
    case at::kHalf: return run_source<at::Half>(x, y, stochastic, amax_scaling, saturate, margin, s);
    default: TORCH_CHECK(false, "precision_cast_cpu: unsupported source dtype ", x.scalar_type());
  }
}

Result cast_into(const at::Tensor& x, const at::Tensor& y, int64_t flags, int64_t seed) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "precision_cast_cpu: x must be a contiguous CPU tensor");
  const at::ScalarType dtype = kTargets[flags & 3];
  TORCH_CHECK(y.scalar_type() == dtype && y.sizes() == x.sizes() && y.is_contiguous() && y.device().is_cpu(),
              "precision_cast_cpu: out must be a contiguous CPU tensor of x's shape and dtype ", dtype);
  return cast_flat(x, y, flags, seed);
}

// (y, scale, amax, nonfinite) for a CPU x, y from the output pool. A permuted dense x (a transpose) with
// round-to-nearest is cast as its memory lies, and y gets its strides, as x.to(dtype) does (a row-major
// copy first cost 15x the cast); stochastic rounding draws by the logical index, so the caller hands it
// a contiguous x (a seed then gives one y whatever the layout). Any other layout is copied first.
Result precision_cast_cpu(const at::Tensor& x, int64_t flags, int64_t seed) {
  TORCH_CHECK(flags >= 0 && (flags >> 8) <= 127, "precision_cast_cpu: bad flags ", flags);
  const at::ScalarType dtype = kTargets[flags & 3];
  if (x.is_contiguous()) return cast_into(x, fresh_output(x, dtype), flags, seed);
  if (!(flags & 4) && x.device().is_cpu() && x.is_non_overlapping_and_dense()) {
    // all strides positive: the elements fill [data_ptr, data_ptr + n) of x, and the same places of y
    const at::Tensor y = at::detail::empty_strided_generic(x.sizes(), x.strides(), &OutputPool::get(),
                                                           c10::DispatchKeySet(c10::DispatchKey::CPU), dtype);
    return cast_flat(x, y, flags, seed);
  }
  const at::Tensor xc = x.contiguous();
  return cast_into(xc, fresh_output(xc, dtype), flags, seed);
}

// The same into a given contiguous tensor of x's shape and the target dtype (the benchmark times the
// kernel apart from the allocation of its output with it).
Result precision_cast_cpu_out(const at::Tensor& x, int64_t flags, int64_t seed, const at::Tensor& out) {
  TORCH_CHECK(flags >= 0 && (flags >> 8) <= 127, "precision_cast_cpu_out: bad flags ", flags);
  return cast_into(x, out, flags, seed);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(SWITCHYARD_NS, m) {
  m.def("precision_cast_cpu", &precision_cast_cpu);
  m.def("precision_cast_cpu_out", &precision_cast_cpu_out);
  m.def("precision_cast_pool_stats", &precision_cast_pool_stats);
  m.def("precision_cast_pool_clear", &precision_cast_pool_clear);
  m.def("precision_cast_pool_limit", &precision_cast_pool_limit);
  m.def("precision_cast_bf16_instruction", &precision_cast_bf16_instruction);
}

// The cast as a plain Python function as well (plugins/fused/precision_cast.py's eager call): through
// torch.ops a call costs about 1.8 us more (its arguments parsed into IValues, the dispatcher), a third
// of a small cast's time. The GIL is released while a cast of kReleaseGil elements or more runs; a
// smaller one (a few microseconds at most) keeps it, as letting it go and taking it back cost about
// 0.1 us a call.
constexpr int64_t kReleaseGil = int64_t(1) << 15;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("precision_cast_cpu", [](const at::Tensor& x, int64_t flags, int64_t seed) {
    if (x.numel() < kReleaseGil) return precision_cast_cpu(x, flags, seed);
    pybind11::gil_scoped_release released;
    return precision_cast_cpu(x, flags, seed);
  });
}
