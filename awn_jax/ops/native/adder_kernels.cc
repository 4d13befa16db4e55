// Adder convolution kernels for XLA:CPU, called from JAX through the typed XLA FFI.
//
//   forward:     y[p, co] = -sum_{tap, ci} |x[p + tap, ci] - w[tap, ci, co]|
//   input grad:  dx[q, ci] = sum_{(p, tap) reading q} sum_co g[p, co] *
//                            clip(w[tap, ci, co] - x[q, ci], -1, 1)
//   weight grad: pw[tap, ci, co] = sum_p x[p + tap, ci] g[p, co]  (caller subtracts w * sum g)
//
// (p: output pixel, q: input pixel; taps reading outside the input see zeros.) All three are
// register-blocked loops over 32-byte vectors written with GCC/Clang vector extensions (AVX
// intrinsics only where the generic code compiles badly; other targets get the generic
// code, untested): a block of accumulators stays in registers while the reduction streams
// through the data. The forward and the weight gradient vectorize over output channels
// (contiguous in HWIO weights and in g), the input gradient over input channels (weights
// passed as (tap, cout, cin)), gathering over the taps that read each input pixel so that
// no two threads write the same output.
//
// Channel counts on the vector axis must be multiples of the vector width; the Python side
// pads them with zeros (exact: a zero channel adds |0 - 0| = 0, clip(0) = 0 and 0 * g = 0).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

template <typename T>
struct Vec;

template <>
struct Vec<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t Bits __attribute__((vector_size(32)));
  static constexpr int kLanes = 8;
};

template <>
struct Vec<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t Bits __attribute__((vector_size(32)));
  static constexpr int kLanes = 4;
};

template <typename T>
using V = typename Vec<T>::V;

template <typename T>
inline V<T> Load(const T* p) {
  V<T> v;
  std::memcpy(&v, p, sizeof v);  // unaligned vector load
  return v;
}

template <typename T>
inline void Store(T* p, V<T> v) {
  std::memcpy(p, &v, sizeof v);
}

// Broadcast. GCC compiles the generic forms (a lane loop, or `V{} + s`, which has to
// compute 0 + s) into several instructions, so AVX's one-instruction broadcast is spelled out.
inline V<float> Splat(float s) {
#if defined(__AVX__)
  return reinterpret_cast<V<float>>(_mm256_set1_ps(s));
#else
  return V<float>{s, s, s, s, s, s, s, s};
#endif
}

inline V<double> Splat(double s) {
#if defined(__AVX__)
  return reinterpret_cast<V<double>>(_mm256_set1_pd(s));
#else
  return V<double>{s, s, s, s};
#endif
}

// |d| as one bitwise and (clears the sign bit), not a compare and blend.
template <typename T>
inline V<T> Abs(V<T> d) {
  using Bits = typename Vec<T>::Bits;
  using Int = std::remove_reference_t<decltype(Bits{}[0])>;
  const Bits mask = Bits{} + static_cast<Int>(~(Int(1) << (8 * sizeof(T) - 1)));
  return reinterpret_cast<V<T>>(reinterpret_cast<Bits>(d) & mask);
}

// w - x computed as -(x * 1) + w (exact: the product is exact) on the fused multiply-add
// units, which leaves the adders free for the reduction: on AMD Zen the adders (two) and the
// FMA units (two) are separate pipes.
inline V<float> Diff(V<float> w, V<float> x) {
#if defined(__FMA__)
  return reinterpret_cast<V<float>>(_mm256_fnmadd_ps(
      reinterpret_cast<__m256>(x), _mm256_set1_ps(1.f), reinterpret_cast<__m256>(w)));
#else
  return w - x;
#endif
}

inline V<double> Diff(V<double> w, V<double> x) {
#if defined(__FMA__)
  return reinterpret_cast<V<double>>(_mm256_fnmadd_pd(
      reinterpret_cast<__m256d>(x), _mm256_set1_pd(1.), reinterpret_cast<__m256d>(w)));
#else
  return w - x;
#endif
}

// clip(d, -1, 1). GCC turns the generic vector selects into compare + blend (two ops for
// each bound), so on AVX the single-instruction min and max are spelled out.
inline V<float> Clip1(V<float> d) {
#if defined(__AVX__)
  return reinterpret_cast<V<float>>(_mm256_max_ps(
      _mm256_min_ps(reinterpret_cast<__m256>(d), _mm256_set1_ps(1.f)), _mm256_set1_ps(-1.f)));
#else
  d = d < 1.f ? d : Splat(1.f);
  return d > -1.f ? d : Splat(-1.f);
#endif
}

inline V<double> Clip1(V<double> d) {
#if defined(__AVX__)
  return reinterpret_cast<V<double>>(_mm256_max_pd(
      _mm256_min_pd(reinterpret_cast<__m256d>(d), _mm256_set1_pd(1.)), _mm256_set1_pd(-1.)));
#else
  d = d < 1. ? d : Splat(1.);
  return d > -1. ? d : Splat(-1.);
#endif
}

// ---------------------------------------------------------------------------------------
// Parallel loop on XLA's intra-op thread pool. Chunks are claimed from an atomic counter by
// the calling thread and by helper tasks; the caller waits only for chunks that were
// claimed, so a helper that starts late (or never, while the pool is busy with other work)
// cannot block it. Helpers keep the shared state alive and never touch `body` once all
// chunks are claimed.

struct LoopState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0;
  const void* body = nullptr;
  void (*run)(const void*, int64_t) = nullptr;
  std::mutex mu;
  std::condition_variable finished;
};

inline void Drain(LoopState& s) {
  for (int64_t i; (i = s.next.fetch_add(1)) < s.total;) {
    s.run(s.body, i);
    if (s.done.fetch_add(1) + 1 == s.total) {
      std::lock_guard<std::mutex> lock(s.mu);
      s.finished.notify_all();
    }
  }
}

// Pool: ffi::ThreadPool, or anything with num_threads() and Schedule(task).
template <typename Pool, typename F>
void ParallelFor(Pool& pool, int64_t total, const F& body) {
  // The caller works too: num_threads - 1 helpers keep one thread per pool thread.
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, total - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < total; ++i) body(i);
    return;
  }
  auto state = std::make_shared<LoopState>();
  state->total = total;
  state->body = &body;
  state->run = [](const void* f, int64_t i) { (*static_cast<const F*>(f))(i); };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([state] { Drain(*state); });
  Drain(*state);
  std::unique_lock<std::mutex> lock(state->mu);
  state->finished.wait(lock, [&] { return state->done.load() == total; });
}

// Chunks of `blocks` work items: enough per thread to balance, few enough to be cheap.
template <typename Pool>
inline int64_t ChunkSize(Pool& pool, int64_t blocks) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads() + 1);
  return std::max<int64_t>(1, blocks / (8 * threads));
}

struct Geometry {
  int64_t n, h, w, cin, k, cout, ho, wo, stride, padding;
};

// Coordinates (a, b, c) over dims (*, d1, d2) of the flat indices first, first + 1, ...:
// one division per block, not three per pixel. A short last block (count < R) repeats its
// last pixel, computed but not stored.
template <int R>
inline void Unflatten(int64_t first, int64_t count, int64_t d1, int64_t d2, int64_t* a,
                      int64_t* b, int64_t* c) {
  const int64_t q = first / d2;
  a[0] = q / d1;
  b[0] = q - a[0] * d1;
  c[0] = first - q * d2;
  for (int r = 1; r < R; ++r) {
    a[r] = a[r - 1], b[r] = b[r - 1], c[r] = c[r - 1];
    if (r >= count) continue;
    if (++c[r] == d2) {
      c[r] = 0;
      if (++b[r] == d1) b[r] = 0, ++a[r];
    }
  }
}

// ---------------------------------------------------------------------------------------
// Forward. Output pixels are flattened over (n, oh, ow) and taken R at a time; for each
// block of CV output-channel vectors, every (tap, ci) step loads CV weight vectors and
// broadcasts one input value per pixel: R*CV x (subtract, and, add)
// with the accumulators in registers.

template <typename T, int CV, int R>
void ForwardBlock(const Geometry& g, const T* x, const T* w, const T* zeros, T* y,
                  int64_t first, int64_t count) {
  constexpr int L = Vec<T>::kLanes;
  int64_t pn[R], poh[R], pow_[R];
  Unflatten<R>(first, count, g.ho, g.wo, pn, poh, pow_);
  for (int64_t co = 0; co < g.cout; co += CV * L) {
    V<T> acc[R][CV] = {};
    for (int64_t i = 0; i < g.k; ++i) {
      for (int64_t j = 0; j < g.k; ++j) {
        const T* xs[R];
        for (int r = 0; r < R; ++r) {
          const int64_t iy = poh[r] * g.stride - g.padding + i;
          const int64_t ix = pow_[r] * g.stride - g.padding + j;
          const bool inside = iy >= 0 && iy < g.h && ix >= 0 && ix < g.w;
          xs[r] = inside ? x + ((pn[r] * g.h + iy) * g.w + ix) * g.cin : zeros;
        }
        const T* wt = w + (i * g.k + j) * g.cin * g.cout + co;
        for (int64_t ci = 0; ci < g.cin; ++ci, wt += g.cout) {
          V<T> wv[CV];
          for (int v = 0; v < CV; ++v) wv[v] = Load(wt + v * L);
          for (int r = 0; r < R; ++r) {
            const V<T> xb = Splat(xs[r][ci]);
            for (int v = 0; v < CV; ++v) acc[r][v] += Abs<T>(Diff(wv[v], xb));
          }
        }
      }
    }
    for (int r = 0; r < count && r < R; ++r) {
      T* out = y + (first + r) * g.cout + co;
      for (int v = 0; v < CV; ++v) Store(out + v * L, -acc[r][v]);
    }
  }
}

template <typename T, int CV, int R, typename Pool>
void Forward(Pool& pool, const Geometry& g, const T* x, const T* w, T* y) {
  const std::vector<T> zeros(g.cin, T(0));
  const int64_t pixels = g.n * g.ho * g.wo;
  const int64_t blocks = (pixels + R - 1) / R;
  const int64_t chunk = ChunkSize(pool, blocks);
  ParallelFor(pool, (blocks + chunk - 1) / chunk, [&](int64_t c) {
    const int64_t end = std::min(blocks, (c + 1) * chunk);
    for (int64_t b = c * chunk; b < end; ++b) {
      ForwardBlock<T, CV, R>(g, x, w, zeros.data(), y, b * R,
                             std::min<int64_t>(R, pixels - b * R));
    }
  });
}

// ---------------------------------------------------------------------------------------
// Input gradient. Input pixels are split into stride x stride parity classes: the pixels of
// one class are read by the same kernel taps, so a block of R of them (flattened over the
// class) loops over just those taps and, per tap, over output channels: CV weight vectors
// (over ci) and one upstream gradient per pixel, R*CV x (subtract, min, max, fused
// multiply-add) with x kept in registers. Taps whose output pixel falls outside the output
// read a zero gradient row.

template <typename T, int CV, int R>
void InputGradBlock(const Geometry& g, const T* x, const T* wt, const T* dy, const T* zeros,
                    T* dx, int64_t py, int64_t px, int64_t hc, int64_t wc,
                    const std::vector<std::pair<int64_t, int64_t>>& taps, int64_t first,
                    int64_t count) {
  constexpr int L = Vec<T>::kLanes;
  int64_t qn[R], qy[R], qx[R];
  Unflatten<R>(first, count, hc, wc, qn, qy, qx);
  for (int r = 0; r < R; ++r) {
    qy[r] = py + g.stride * qy[r];
    qx[r] = px + g.stride * qx[r];
  }
  for (int64_t ci = 0; ci < g.cin; ci += CV * L) {
    V<T> acc[R][CV] = {};
    V<T> xv[R][CV];
    for (int r = 0; r < R; ++r) {
      const T* xq = x + ((qn[r] * g.h + qy[r]) * g.w + qx[r]) * g.cin + ci;
      for (int v = 0; v < CV; ++v) xv[r][v] = Load(xq + v * L);
    }
    for (const auto& [i, j] : taps) {
      const T* gs[R];
      bool any = false;
      for (int r = 0; r < R; ++r) {
        // Exact division: the class fixes (qy + padding - i) mod stride to zero.
        const int64_t oy = (qy[r] + g.padding - i) / g.stride;
        const int64_t ox = (qx[r] + g.padding - j) / g.stride;
        const bool inside = qy[r] + g.padding >= i && oy < g.ho && qx[r] + g.padding >= j &&
                            ox < g.wo;
        gs[r] = inside ? dy + ((qn[r] * g.ho + oy) * g.wo + ox) * g.cout : zeros;
        any |= inside;
      }
      if (!any) continue;
      const T* wp = wt + (i * g.k + j) * g.cout * g.cin + ci;
      for (int64_t co = 0; co < g.cout; ++co, wp += g.cin) {
        V<T> wv[CV];
        for (int v = 0; v < CV; ++v) wv[v] = Load(wp + v * L);
        for (int r = 0; r < R; ++r) {
          const V<T> gb = Splat(gs[r][co]);
          for (int v = 0; v < CV; ++v) {
            acc[r][v] += gb * Clip1(Diff(wv[v], xv[r][v]));
          }
        }
      }
    }
    for (int r = 0; r < count && r < R; ++r) {
      T* out = dx + ((qn[r] * g.h + qy[r]) * g.w + qx[r]) * g.cin + ci;
      for (int v = 0; v < CV; ++v) Store(out + v * L, acc[r][v]);
    }
  }
}

template <typename T, int CV, int R, typename Pool>
void InputGrad(Pool& pool, const Geometry& g, const T* x, const T* wt, const T* dy,
               T* dx) {
  const std::vector<T> zeros(g.cout, T(0));
  struct Class {
    int64_t py, px, hc, wc, blocks;
    std::vector<std::pair<int64_t, int64_t>> taps;
  };
  std::vector<Class> classes;
  std::vector<int64_t> starts{0};  // first block of each class in one global numbering
  for (int64_t py = 0; py < std::min(g.stride, g.h); ++py) {
    for (int64_t px = 0; px < std::min(g.stride, g.w); ++px) {
      Class c{py, px, (g.h - py + g.stride - 1) / g.stride, (g.w - px + g.stride - 1) / g.stride,
              0, {}};
      for (int64_t i = 0; i < g.k; ++i) {
        for (int64_t j = 0; j < g.k; ++j) {
          // (py + padding - i) mod stride, written for a possibly negative left side.
          if (((py + g.padding - i) % g.stride + g.stride) % g.stride == 0 &&
              ((px + g.padding - j) % g.stride + g.stride) % g.stride == 0) {
            c.taps.emplace_back(i, j);
          }
        }
      }
      c.blocks = (g.n * c.hc * c.wc + R - 1) / R;
      starts.push_back(starts.back() + c.blocks);
      classes.push_back(std::move(c));
    }
  }
  const int64_t blocks = starts.back();
  const int64_t chunk = ChunkSize(pool, blocks);
  ParallelFor(pool, (blocks + chunk - 1) / chunk, [&](int64_t c) {
    const int64_t end = std::min(blocks, (c + 1) * chunk);
    for (int64_t b = c * chunk; b < end; ++b) {
      const size_t k = std::upper_bound(starts.begin(), starts.end(), b) - starts.begin() - 1;
      const Class& cl = classes[k];
      const int64_t first = (b - starts[k]) * R;
      InputGradBlock<T, CV, R>(g, x, wt, dy, zeros.data(), dx, cl.py, cl.px, cl.hc, cl.wc,
                               cl.taps, first,
                               std::min<int64_t>(R, g.n * cl.hc * cl.wc - first));
    }
  });
}

// ---------------------------------------------------------------------------------------
// Weight gradient, the patch term of the full-precision rule: pw[tap, ci, co] =
// sum_p x[p + tap, ci] g[p, co] (the caller subtracts w * sum_p g). An outer-product
// accumulation: per output pixel, RI input values times CV vectors of g into RI*CV
// accumulators (fused multiply-adds). Output rows (n, oh) are split into parts, each summed
// into its own buffer so that no two threads write the same memory, and the parts are
// added at the end. Within a part, rows go in cache-sized chunks and every
// (tap, ci block, co block) tile streams over the chunk: x and g come from cache.

inline int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

template <typename T, int RI, int CV>
void WeightGradTile(const Geometry& g, const T* x, const T* dy, T* part, int64_t i, int64_t j,
                    int64_t ci, int64_t co, int64_t row0, int64_t rows) {
  constexpr int L = Vec<T>::kLanes;
  T* out = part + ((i * g.k + j) * g.cin + ci) * g.cout + co;
  V<T> acc[RI][CV];
  for (int r = 0; r < RI; ++r) {
    for (int v = 0; v < CV; ++v) acc[r][v] = Load(out + r * g.cout + v * L);
  }
  // Output columns whose tap reads inside the input: 0 <= ow * stride - padding + j < w.
  const int64_t lo = std::max<int64_t>(0, -FloorDiv(j - g.padding, g.stride));
  const int64_t hi = std::min<int64_t>(g.wo, FloorDiv(g.w - 1 + g.padding - j, g.stride) + 1);
  int64_t n = row0 / g.ho, oh = row0 % g.ho;
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t iy = oh * g.stride - g.padding + i;
    if (iy >= 0 && iy < g.h && lo < hi) {
      const T* xp = x + ((n * g.h + iy) * g.w + lo * g.stride - g.padding + j) * g.cin + ci;
      const T* gp = dy + ((n * g.ho + oh) * g.wo + lo) * g.cout + co;
      for (int64_t ow = lo; ow < hi; ++ow, xp += g.stride * g.cin, gp += g.cout) {
        V<T> gv[CV];
        for (int v = 0; v < CV; ++v) gv[v] = Load(gp + v * L);
        for (int r = 0; r < RI; ++r) {
          const V<T> xb = Splat(xp[r]);
          for (int v = 0; v < CV; ++v) acc[r][v] += xb * gv[v];
        }
      }
    }
    if (++oh == g.ho) oh = 0, ++n;
  }
  for (int r = 0; r < RI; ++r) {
    for (int v = 0; v < CV; ++v) Store(out + r * g.cout + v * L, acc[r][v]);
  }
}

// The last ci block of a cin that RI does not divide takes the tile with `count` rows.
template <typename T, int RI, int CV>
void WeightGradTiles(const Geometry& g, const T* x, const T* dy, T* part, int64_t i,
                     int64_t j, int64_t ci, int64_t count, int64_t co, int64_t row0,
                     int64_t rows) {
  if constexpr (RI > 1) {
    if (count < RI) {
      return WeightGradTiles<T, RI - 1, CV>(g, x, dy, part, i, j, ci, count, co, row0, rows);
    }
  }
  WeightGradTile<T, RI, CV>(g, x, dy, part, i, j, ci, co, row0, rows);
}

template <typename T, int RI, int CV, typename Pool>
void WeightGrad(Pool& pool, const Geometry& g, const T* x, const T* dy, T* pw) {
  constexpr int L = Vec<T>::kLanes;
  const int64_t rows = g.n * g.ho;
  const int64_t size = g.k * g.k * g.cin * g.cout;
  const int64_t parts =
      std::min<int64_t>(rows, 4 * std::max<int64_t>(1, pool.num_threads()));
  std::vector<T> sums(parts * size, T(0));
  // About 256 output pixels per chunk: their g rows and the x rows they read stay in L2
  // while all the tiles pass over them.
  const int64_t chunk_rows = std::max<int64_t>(1, 256 / g.wo);
  ParallelFor(pool, parts, [&](int64_t part) {
    const int64_t begin = rows * part / parts, end = rows * (part + 1) / parts;
    T* acc = sums.data() + part * size;
    for (int64_t row0 = begin; row0 < end; row0 += chunk_rows) {
      const int64_t count = std::min(chunk_rows, end - row0);
      for (int64_t i = 0; i < g.k; ++i) {
        for (int64_t j = 0; j < g.k; ++j) {
          for (int64_t ci = 0; ci < g.cin; ci += RI) {
            for (int64_t co = 0; co < g.cout; co += CV * L) {
              WeightGradTiles<T, RI, CV>(g, x, dy, acc, i, j, ci,
                                         std::min<int64_t>(RI, g.cin - ci), co, row0, count);
            }
          }
        }
      }
    }
  });
  std::copy(sums.begin(), sums.begin() + size, pw);
  for (int64_t part = 1; part < parts; ++part) {
    const T* s = sums.data() + part * size;
    for (int64_t e = 0; e < size; ++e) pw[e] += s[e];
  }
}

// ---------------------------------------------------------------------------------------
// FFI handlers.

// Aliases without commas, which the handler macros would split.
template <ffi::DataType DT>
using Buffer3 = ffi::Buffer<DT, 3>;
template <ffi::DataType DT>
using Buffer4 = ffi::Buffer<DT, 4>;

template <typename T>
ffi::Error CheckGeometry(const Geometry& g, int64_t vector_channels) {
  if (g.stride < 1 || g.padding < 0 || g.ho < 1 || g.wo < 1) {
    return ffi::Error::InvalidArgument("adder kernels: bad stride, padding or output size");
  }
  if (vector_channels % Vec<T>::kLanes != 0) {
    return ffi::Error::InvalidArgument("adder kernels: vectorized channel count " +
                                       std::to_string(vector_channels) +
                                       " is not a multiple of " +
                                       std::to_string(Vec<T>::kLanes));
  }
  return ffi::Error::Success();
}

// x (N, H, W, Cin), w (k, k, Cin, Cout) -> y (N, Ho, Wo, Cout); Cout % lanes == 0.
template <typename T, ffi::DataType DT>
ffi::Error ForwardHandler(ffi::ThreadPool pool, Buffer4<DT> x, Buffer4<DT> w,
                          ffi::ResultBuffer<DT, 4> y, int64_t stride, int64_t padding) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  const Geometry g{xd[0], xd[1], xd[2], xd[3], wd[0], wd[3], yd[1], yd[2], stride, padding};
  if (wd[1] != g.k || wd[2] != g.cin || yd[0] != g.n || yd[3] != g.cout ||
      g.ho != (g.h + 2 * padding - g.k) / stride + 1 ||
      g.wo != (g.w + 2 * padding - g.k) / stride + 1) {
    return ffi::Error::InvalidArgument("adder forward: inconsistent shapes");
  }
  if (ffi::Error e = CheckGeometry<T>(g, g.cout); e.failure()) return e;
  const T* xp = x.typed_data();
  const T* wp = w.typed_data();
  T* yp = y->typed_data();
  // 10 accumulators in the 16 vector registers; the others hold the weights, the broadcast
  // input value and the constants (abs mask, 1).
  constexpr int L = Vec<T>::kLanes;
  if (g.cout % (2 * L) == 0) {
    Forward<T, 2, 5>(pool, g, xp, wp, yp);
  } else {
    Forward<T, 1, 10>(pool, g, xp, wp, yp);
  }
  return ffi::Error::Success();
}

// x (N, H, W, Cin), wt (k*k, Cout, Cin), dy (N, Ho, Wo, Cout) -> dx (N, H, W, Cin);
// Cin % lanes == 0.
template <typename T, ffi::DataType DT>
ffi::Error InputGradHandler(ffi::ThreadPool pool, Buffer4<DT> x, Buffer3<DT> wt,
                            Buffer4<DT> dy, ffi::ResultBuffer<DT, 4> dx, int64_t stride,
                            int64_t padding, int64_t kernel_size) {
  const auto xd = x.dimensions(), wd = wt.dimensions(), gd = dy.dimensions();
  const Geometry g{xd[0], xd[1], xd[2], xd[3], kernel_size, gd[3], gd[1], gd[2], stride,
                   padding};
  const auto od = dx->dimensions();
  if (wd[0] != g.k * g.k || wd[1] != g.cout || wd[2] != g.cin || gd[0] != g.n ||
      g.ho != (g.h + 2 * padding - g.k) / stride + 1 ||
      g.wo != (g.w + 2 * padding - g.k) / stride + 1 || od[0] != g.n || od[1] != g.h ||
      od[2] != g.w || od[3] != g.cin) {
    return ffi::Error::InvalidArgument("adder input gradient: inconsistent shapes");
  }
  if (ffi::Error e = CheckGeometry<T>(g, g.cin); e.failure()) return e;
  const T* xp = x.typed_data();
  const T* wp = wt.typed_data();
  const T* gp = dy.typed_data();
  T* dxp = dx->typed_data();
  // R*CV = 4 accumulators plus 4 registers of x: the fused multiply-add chain of each
  // accumulator has one link per output channel, 4 of them cover its latency.
  constexpr int L = Vec<T>::kLanes;
  if (g.cin % (2 * L) == 0) {
    InputGrad<T, 2, 2>(pool, g, xp, wp, gp, dxp);
  } else {
    InputGrad<T, 1, 4>(pool, g, xp, wp, gp, dxp);
  }
  return ffi::Error::Success();
}

// x (N, H, W, Cin), dy (N, Ho, Wo, Cout) -> pw (k, k, Cin, Cout) = sum_p patch^T g;
// Cout % lanes == 0.
template <typename T, ffi::DataType DT>
ffi::Error WeightGradHandler(ffi::ThreadPool pool, Buffer4<DT> x, Buffer4<DT> dy,
                             ffi::ResultBuffer<DT, 4> pw, int64_t stride, int64_t padding) {
  const auto xd = x.dimensions(), gd = dy.dimensions(), wd = pw->dimensions();
  const Geometry g{xd[0], xd[1], xd[2], xd[3], wd[0], gd[3], gd[1], gd[2], stride, padding};
  if (wd[1] != g.k || wd[2] != g.cin || wd[3] != g.cout || gd[0] != g.n ||
      g.ho != (g.h + 2 * padding - g.k) / stride + 1 ||
      g.wo != (g.w + 2 * padding - g.k) / stride + 1) {
    return ffi::Error::InvalidArgument("adder weight gradient: inconsistent shapes");
  }
  if (ffi::Error e = CheckGeometry<T>(g, g.cout); e.failure()) return e;
  // 12 accumulators, CV vectors of g and one broadcast input value in 16 registers.
  constexpr int L = Vec<T>::kLanes;
  if (g.cout % (2 * L) == 0) {
    WeightGrad<T, 6, 2>(pool, g, x.typed_data(), dy.typed_data(), pw->typed_data());
  } else {
    WeightGrad<T, 12, 1>(pool, g, x.typed_data(), dy.typed_data(), pw->typed_data());
  }
  return ffi::Error::Success();
}

}  // namespace

#define AWN_FORWARD(NAME, T, DT)                                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, (ForwardHandler<T, DT>),                    \
                                ffi::Ffi::Bind()                                  \
                                    .Ctx<ffi::ThreadPool>()                       \
                                    .Arg<Buffer4<DT>>()                           \
                                    .Arg<Buffer4<DT>>()                           \
                                    .Ret<Buffer4<DT>>()                           \
                                    .Attr<int64_t>("stride")                      \
                                    .Attr<int64_t>("padding"));

#define AWN_INPUT_GRAD(NAME, T, DT)                                               \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, (InputGradHandler<T, DT>),                  \
                                ffi::Ffi::Bind()                                  \
                                    .Ctx<ffi::ThreadPool>()                       \
                                    .Arg<Buffer4<DT>>()                           \
                                    .Arg<Buffer3<DT>>()                          \
                                    .Arg<Buffer4<DT>>()                           \
                                    .Ret<Buffer4<DT>>()                           \
                                    .Attr<int64_t>("stride")                      \
                                    .Attr<int64_t>("padding")                     \
                                    .Attr<int64_t>("kernel_size"));

#define AWN_WEIGHT_GRAD(NAME, T, DT)                                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, (WeightGradHandler<T, DT>),                 \
                                ffi::Ffi::Bind()                                  \
                                    .Ctx<ffi::ThreadPool>()                       \
                                    .Arg<Buffer4<DT>>()                           \
                                    .Arg<Buffer4<DT>>()                           \
                                    .Ret<Buffer4<DT>>()                           \
                                    .Attr<int64_t>("stride")                      \
                                    .Attr<int64_t>("padding"));

AWN_FORWARD(AwnAdderForwardF32, float, ffi::F32)
AWN_FORWARD(AwnAdderForwardF64, double, ffi::F64)
AWN_INPUT_GRAD(AwnAdderInputGradF32, float, ffi::F32)
AWN_INPUT_GRAD(AwnAdderInputGradF64, double, ffi::F64)
AWN_WEIGHT_GRAD(AwnAdderWeightGradF32, float, ffi::F32)
AWN_WEIGHT_GRAD(AwnAdderWeightGradF64, double, ffi::F64)
