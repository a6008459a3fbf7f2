// Shared declarations of the projection solve (CPU in projection_solve.cpp, CUDA in projection_solve_cuda.cu).
#pragma once
#include <torch/extension.h>

namespace gradmap {

// lhs = (A + Aᵀ)/2 + λI and rhs = B + λI with λ = ridge·tr(A)/d, per item of a [n, d, d] batch.
// a and b are contiguous [n, d, d] of one floating dtype; lhs and rhs are preallocated, contiguous,
// of the solve dtype (float or double) on the same device.
void prepare_cpu(const at::Tensor& a, const at::Tensor& b, double ridge, at::Tensor& lhs, at::Tensor& rhs);
#ifdef GRADMAP_WITH_CUDA
void prepare_cuda(const at::Tensor& a, const at::Tensor& b, double ridge, at::Tensor& lhs, at::Tensor& rhs);
#endif

// (P, status) with P = (A_sym + λI)⁻¹ (B + λI); status 0 = Cholesky, 1 = eigen-decomposition fallback.
std::tuple<at::Tensor, at::Tensor> projection_solve(const at::Tensor& a, const at::Tensor& b, double ridge,
                                                    bool fp64);

}  // namespace gradmap
