// The CPU band kernel: a bounded band's stacked chunks (attnkit/kernels/flash/torch_stack.py),
// fp32, forward. Built on first use by attnkit/kernels/cpu_ext.py; optional.
//
// Chunk c of head h is n query rows starting at r0 + c * n over its L = n + width keys
// starting at k0 + c * n; row a sees key offsets [a, a + width]. Per (h, c) task:
//   S^T [L, n] = scale * K Q^T        one BLAS sgemm into a per-thread buffer (L * n floats,
//                                     37 KiB at n = 32, L = 287: it stays in L2)
//   softmax over the keys, in place   vectorised over 16 query rows; the edge masks only on
//                                     the first and last n keys (the middle is all visible)
//   O [n, D] = P V / rowsum           one sgemm, then a row scale
//   LSE = max + log(rowsum)           when asked for
// Why not batched ATen ops (the matmul executor): each op there is one pass over a slab's
// scores in memory and one parallel region; here the scores of a chunk never leave the cache.
// Measured (benchmarks/NOTES.md, N = 4096, width 255, 8 heads, D = 64, 2 threads): 8.2-8.4 ms
// for the stack rows alone; the window's whole forward 9.5-10.1 ms against 11.4-11.6 ms on the
// matmul executor, side by side.
//
// Threads: the H * m tasks go through at::parallel_for, so they run on ATen's OpenMP pool. A
// first version split them over std::threads (with MKL set to one thread in each): alone it ran
// as fast, but right after an ATen op the pool's workers still spin-wait for more work and took
// a core from it: 12.6 ms in the window's forward against 8.4-9.4 ms alone (2 cores, measured).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

extern "C" {
// Fortran BLAS (LP64), exported by libtorch_cpu when torch is built with MKL. Weak: a torch
// without them still loads this module, and ready() says why it cannot run.
__attribute__((weak)) void sgemm_(const char* ta, const char* tb, const int* m, const int* n,
                                  const int* k, const float* alpha, const float* a,
                                  const int* lda, const float* b, const int* ldb,
                                  const float* beta, float* c, const int* ldc);
}

namespace {

using Vec = at::vec::Vectorized<float>;

// Column-major GEMM helper: C = alpha * op(A) op(B) (beta = 0).
inline void gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float* c, int ldc) {
  const float beta = 0.0f;
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

struct Band {
  const float *q, *k, *v;
  float *o, *lse;
  int64_t sqh, sqn, skh, skn, svh, svn, soh, son, slh, sln;
  int64_t r0, k0, m, n, width, group, dim;
  float scale;
};

// Softmax of one chunk's transposed scores s [L][n] over the keys (the L axis), in place,
// for query rows [a0, a0 + Vec::size()); writes each row's max and sum.
inline void softmax_block(float* s, const Band& b, int64_t a0, float* mx_out, float* sum_out) {
  const int64_t n = b.n, L = b.n + b.width, W = b.width;
  const Vec ninf(-std::numeric_limits<float>::infinity()), zero(0.0f);
  const Vec rows = Vec::arange(static_cast<float>(a0), 1.0f);  // row index per lane
  const Vec rows_w = rows + Vec(static_cast<float>(W));
  // keys every lane sees: j >= a0 + V - 1 and j <= a0 + W
  const int64_t mid0 = a0 + Vec::size() - 1, mid1 = a0 + W;
  Vec mx = ninf;
  for (int64_t j = 0; j < L; ++j) {
    Vec x = Vec::loadu(s + j * n + a0);
    if (j < mid0 || j > mid1) {
      const Vec jv(static_cast<float>(j));
      x = Vec::blendv(ninf, x, (jv >= rows) & (jv <= rows_w));
    }
    mx = at::vec::maximum(mx, x);
  }
  Vec sum = zero;
  for (int64_t j = 0; j < L; ++j) {
    Vec e = (Vec::loadu(s + j * n + a0) - mx).exp_u20();
    if (j < mid0 || j > mid1) {  // hidden pairs: exactly 0 (their exp may overflow: blendv)
      const Vec jv(static_cast<float>(j));
      e = Vec::blendv(zero, e, (jv >= rows) & (jv <= rows_w));
    }
    e.store(s + j * n + a0);
    sum = sum + e;
  }
  mx.store(mx_out);
  sum.store(sum_out);
}

void run_task(const Band& b, int64_t task, float* s, float* mx, float* sum) {
  const int64_t h = task / b.m, c = task % b.m;
  const int64_t n = b.n, L = b.n + b.width, D = b.dim;
  const float* qc = b.q + h * b.sqh + (b.r0 + c * n) * b.sqn;
  const float* kw = b.k + (h / b.group) * b.skh + (b.k0 + c * n) * b.skn;
  const float* vw = b.v + (h / b.group) * b.svh + (b.k0 + c * n) * b.svn;
  float* oc = b.o + h * b.soh + (b.r0 + c * n) * b.son;
  // column-major n x L with ld n is row-major [L][n]: s[j * n + a] = scale * q_a . k_j
  gemm('T', 'N', n, L, D, b.scale, qc, b.sqn, kw, b.skn, s, n);
  for (int64_t a0 = 0; a0 < n; a0 += Vec::size()) softmax_block(s, b, a0, mx + a0, sum + a0);
  // O^T [D, n] (column-major, ld son) = V^T [D, L] * P^T [L, n]
  gemm('N', 'T', D, n, L, 1.0f, vw, b.svn, s, n, oc, b.son);
  for (int64_t a = 0; a < n; ++a) {
    const float inv = 1.0f / sum[a];
    float* row = oc + a * b.son;
    int64_t d = 0;
    for (; d + Vec::size() <= D; d += Vec::size()) (Vec::loadu(row + d) * Vec(inv)).store(row + d);
    for (; d < D; ++d) row[d] *= inv;
  }
  if (b.lse != nullptr) {
    float* lc = b.lse + h * b.slh + (b.r0 + c * n) * b.sln;
    for (int64_t a = 0; a < n; ++a) lc[a * b.sln] = mx[a] + std::log(sum[a]);
  }
}

void run_range(const Band& b, int64_t t0, int64_t t1) {
  const int64_t n = b.n, L = b.n + b.width;
  std::vector<float> s(static_cast<size_t>(L * n)), mx(n), sum(n);
  for (int64_t t = t0; t < t1; ++t) run_task(b, t, s.data(), mx.data(), sum.data());
}

void check(const at::Tensor& x, const char* name, int64_t heads, int64_t dim) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(x.dim() == 3 && x.size(0) == heads && x.size(2) == dim && x.stride(2) == 1, name,
              " must be [H, N, D] with unit stride on D, got sizes ", x.sizes(), " strides ",
              x.strides());
}

}  // namespace

// q [Hq, Nq, D], k/v [Hkv, Nk, D], out [Hq, Nq, D] (one batch row; views of any layout with
// unit stride on D), lse [Hq, Nq] or None. Writes rows [r0, r0 + m * n) of out (and lse).
void band_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                  const c10::optional<at::Tensor>& lse, int64_t r0, int64_t k0, int64_t m,
                  int64_t n, int64_t width, double scale) {
  TORCH_CHECK(sgemm_ != nullptr, "this torch build exports no sgemm_ (BLAS)");
  const int64_t H = q.size(0), Hkv = k.size(0), D = q.size(2);
  check(q, "q", H, D);
  check(k, "k", Hkv, D);
  check(v, "v", Hkv, D);
  check(out, "out", H, D);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "q's heads (", H, ") must be a multiple of k's (", Hkv, ")");
  TORCH_CHECK(n > 0 && n % 16 == 0 && width >= 0 && m >= 0, "bad chunking: n = ", n,
              ", width = ", width, ", m = ", m);
  TORCH_CHECK(r0 >= 0 && r0 + m * n <= q.size(1) && out.size(1) == q.size(1), "rows out of range");
  TORCH_CHECK(k0 >= 0 && k0 + (m - 1) * n + n + width <= k.size(1) && v.size(1) == k.size(1),
              "keys out of range");
  Band b{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(),
         nullptr, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
         out.stride(0), out.stride(1), 0, 0, r0, k0, m, n, width, H / Hkv, D,
         static_cast<float>(scale)};
  if (lse.has_value()) {
    const at::Tensor& l = *lse;
    TORCH_CHECK(l.scalar_type() == at::kFloat && l.dim() == 2 && l.size(0) == H &&
                    l.size(1) == q.size(1), "lse must be float32 [H, Nq], got ", l.sizes());
    b.lse = l.data_ptr<float>();
    b.slh = l.stride(0);
    b.sln = l.stride(1);
  }
  const int64_t tasks = H * m;
  if (tasks == 0) return;
  // at::parallel_for runs the tasks on ATen's own OpenMP pool (this file is built with
  // -fopenmp and binds to the libgomp torch already loaded); MKL sees it is inside a parallel
  // region and runs each sgemm on the calling thread.
  at::parallel_for(0, tasks, 1, [&b](int64_t t0, int64_t t1) { run_range(b, t0, t1); });
}

bool ready() { return sgemm_ != nullptr; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "attnkit's CPU band kernel (see attnkit/kernels/cpu_ext.py)";
  mod.def("band_forward", &band_forward, "a bounded band's stacked chunks, fp32 forward",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
          py::arg("r0"), py::arg("k0"), py::arg("m"), py::arg("n"), py::arg("width"),
          py::arg("scale"), py::call_guard<py::gil_scoped_release>());
  mod.def("ready", &ready, "whether the BLAS entry point this kernel calls exists");
}
