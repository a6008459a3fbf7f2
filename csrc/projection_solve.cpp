// Batched ridge-regularised projection solve: P = (A_sym + λI)⁻¹ (B + λI), λ = ridge·tr(A)/d.
//
// Reference: gradmap.ops.projection_solve_reference (this must equal it; fp64 to 1e-10 relative).
// The preparation (symmetrise, cast, ridge on both sides) is one pass per item (a fused CUDA kernel
// on GPU, a tiled parallel loop on CPU). The factorisation and triangular solves go through ATen
// (LAPACK on CPU, cuSOLVER/MAGMA on CUDA). Items whose Cholesky factorisation fails (A + λI not
// positive definite) are solved again through an eigen-decomposition with a pseudo-inverse, and
// counted in the returned status (1) rather than silently replaced.
#include "projection_solve.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace gradmap {
namespace {

template <typename T>
void prepare_cpu_typed(const at::Tensor& a, const at::Tensor& b, double ridge, at::Tensor& lhs, at::Tensor& rhs) {
  const int64_t n = a.size(0), d = a.size(1);
  const T* A = a.data_ptr<T>();
  const T* B = b.data_ptr<T>();
  T* L = lhs.data_ptr<T>();
  T* R = rhs.data_ptr<T>();
  std::vector<T> lam(n);
  for (int64_t i = 0; i < n; ++i) {
    double trace = 0.0;
    for (int64_t k = 0; k < d; ++k) trace += static_cast<double>(A[i * d * d + k * (d + 1)]);
    lam[i] = static_cast<T>(ridge * trace / static_cast<double>(d));
  }
  // tiles of 32 rows x 32 columns keep both A[r, c] and A[c, r] in cache
  constexpr int64_t kTile = 32;
  const int64_t tiles = (d + kTile - 1) / kTile;
  at::parallel_for(0, n * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t item = job / tiles;
      const int64_t r0 = (job % tiles) * kTile, r1 = std::min(r0 + kTile, d);
      const T* Ai = A + item * d * d;
      const T* Bi = B + item * d * d;
      T* Li = L + item * d * d;
      T* Ri = R + item * d * d;
      const T l = lam[item];
      for (int64_t c0 = 0; c0 < d; c0 += kTile) {
        const int64_t c1 = std::min(c0 + kTile, d);
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t c = c0; c < c1; ++c) {
            T v = T(0.5) * (Ai[r * d + c] + Ai[c * d + r]);
            T w = Bi[r * d + c];
            if (r == c) {
              v += l;
              w += l;
            }
            Li[r * d + c] = v;
            Ri[r * d + c] = w;
          }
        }
      }
    }
  });
}

// Pseudo-inverse solve through eigh for the items whose Cholesky factorisation failed.
at::Tensor eigen_solve(const at::Tensor& lhs, const at::Tensor& rhs) {
  const int64_t d = lhs.size(-1);
  auto eig = at::linalg_eigh(lhs);
  const at::Tensor& evals = std::get<0>(eig);
  const at::Tensor& evecs = std::get<1>(eig);
  const double eps = lhs.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                                      : static_cast<double>(std::numeric_limits<float>::epsilon());
  auto tol = evals.abs().amax(-1, /*keepdim=*/true) * (static_cast<double>(d) * eps);
  auto inv = at::where(evals.abs() > tol, evals.reciprocal(), at::zeros_like(evals));
  return at::matmul(evecs, inv.unsqueeze(-1) * at::matmul(evecs.transpose(-1, -2), rhs));
}

}  // namespace

void prepare_cpu(const at::Tensor& a, const at::Tensor& b, double ridge, at::Tensor& lhs, at::Tensor& rhs) {
  const auto dtype = lhs.scalar_type();
  const at::Tensor a_ = a.to(dtype).contiguous();
  const at::Tensor b_ = b.to(dtype).contiguous();
  if (dtype == at::kDouble) {
    prepare_cpu_typed<double>(a_, b_, ridge, lhs, rhs);
  } else {
    prepare_cpu_typed<float>(a_, b_, ridge, lhs, rhs);
  }
}

std::tuple<at::Tensor, at::Tensor> projection_solve(const at::Tensor& a, const at::Tensor& b, double ridge,
                                                    bool fp64) {
  TORCH_CHECK(a.dim() == 2 || a.dim() == 3, "projection_solve: A must be [d, d] or [n, d, d], got ", a.sizes());
  TORCH_CHECK(a.size(-1) == a.size(-2), "projection_solve: A must be square, got ", a.sizes());
  TORCH_CHECK(b.sizes() == a.sizes(), "projection_solve: B must have A's shape ", a.sizes(), ", got ", b.sizes());
  TORCH_CHECK(a.device() == b.device(), "projection_solve: A and B must be on one device");
  TORCH_CHECK(at::isFloatingType(a.scalar_type()) && at::isFloatingType(b.scalar_type()),
              "projection_solve: A and B must be floating point");
  const bool squeeze = a.dim() == 2;
  const at::Tensor a3 = (squeeze ? a.unsqueeze(0) : a).contiguous();
  const at::Tensor b3 = (squeeze ? b.unsqueeze(0) : b).contiguous();
  const auto dtype = fp64 ? at::kDouble : at::kFloat;
  auto lhs = at::empty(a3.sizes(), a3.options().dtype(dtype));
  auto rhs = at::empty(a3.sizes(), a3.options().dtype(dtype));
  if (a3.numel() == 0) {
    auto status = at::zeros({a3.size(0)}, a3.options().dtype(at::kInt));
    return squeeze ? std::make_tuple(lhs[0], status[0]) : std::make_tuple(lhs, status);
  }
  if (a3.is_cuda()) {
#ifdef GRADMAP_WITH_CUDA
    prepare_cuda(a3, b3, ridge, lhs, rhs);
#else
    TORCH_CHECK(false, "projection_solve: gradmap._C was built without CUDA; rebuild with nvcc available "
                       "or use the torch reference (GRADMAP_FORCE_REFERENCE=1)");
#endif
  } else {
    TORCH_CHECK(a3.device().is_cpu(), "projection_solve: unsupported device ", a3.device());
    prepare_cpu(a3, b3, ridge, lhs, rhs);
  }
  auto chol = at::linalg_cholesky_ex(lhs, /*upper=*/false, /*check_errors=*/false);
  const at::Tensor& factor = std::get<0>(chol);
  auto status = std::get<1>(chol).ne(0).to(at::kInt);
  auto p = at::cholesky_solve(rhs, factor, /*upper=*/false);
  auto failed = at::nonzero(status).flatten();  // one host sync on CUDA
  if (failed.numel() > 0) {
    p.index_copy_(0, failed, eigen_solve(lhs.index_select(0, failed), rhs.index_select(0, failed)));
  }
  if (squeeze) return std::make_tuple(p[0], status[0]);
  return std::make_tuple(p, status);
}

}  // namespace gradmap

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gradmap C++/CUDA extension: batched projection solve";
  m.def("projection_solve", &gradmap::projection_solve, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "P = (A_sym + lambda I)^-1 (B + lambda I), lambda = ridge tr(A)/d, batched; returns (P, status)",
        pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("ridge"), pybind11::arg("fp64") = true);
  m.def("cuda_built", []() {
#ifdef GRADMAP_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build includes the CUDA implementation");
}
