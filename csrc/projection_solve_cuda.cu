// CUDA preparation for the projection solve: one fused pass builds both sides of the system.
//
// lhs[i] = (A[i] + A[i]ᵀ)/2 + λ_i I and rhs[i] = B[i] + λ_i I, λ_i = ridge·tr(A[i])/d, cast to the
// solve dtype on the fly. A tiny kernel first reduces the n traces (n·d reads, in fp64); the fused
// kernel then reads A, Aᵀ (through a shared-memory tile so both reads are coalesced) and B once and
// writes lhs and rhs once. The factorisation itself is ATen's batched cuSOLVER/MAGMA path.
#include "projection_solve.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace gradmap {
namespace {

constexpr int kTile = 32;
constexpr int kRows = 8;
constexpr int kTraceThreads = 256;

template <typename in_t, typename out_t>
__global__ void ridge_kernel(const in_t* __restrict__ a, int64_t d, double ridge, out_t* __restrict__ lam) {
  __shared__ double partial[kTraceThreads];
  const in_t* ai = a + static_cast<int64_t>(blockIdx.x) * d * d;
  double s = 0.0;
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) s += static_cast<double>(ai[k * (d + 1)]);
  partial[threadIdx.x] = s;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) lam[blockIdx.x] = static_cast<out_t>(ridge * partial[0] / static_cast<double>(d));
}

template <typename in_t, typename out_t>
__global__ void prepare_kernel(const in_t* __restrict__ a, const in_t* __restrict__ b,
                               const out_t* __restrict__ lam, int64_t d,
                               out_t* __restrict__ lhs, out_t* __restrict__ rhs) {
  __shared__ out_t transposed[kTile][kTile + 1];  // +1 column: no shared-memory bank conflicts
  const int64_t offset = static_cast<int64_t>(blockIdx.z) * d * d;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  // transposed[y][x] = A[c0 + y, r0 + x], read along rows (coalesced)
  for (int k = 0; k < kTile; k += kRows) {
    const int64_t row = c0 + ty + k, col = r0 + tx;
    if (row < d && col < d) transposed[ty + k][tx] = static_cast<out_t>(a[offset + row * d + col]);
  }
  __syncthreads();
  const out_t l = lam[blockIdx.z];
  for (int k = 0; k < kTile; k += kRows) {
    const int64_t r = r0 + ty + k, c = c0 + tx;
    if (r < d && c < d) {
      const int64_t idx = offset + r * d + c;
      // A[c, r] = transposed[c - c0][r - r0]
      out_t v = static_cast<out_t>(0.5) * (static_cast<out_t>(a[idx]) + transposed[tx][ty + k]);
      out_t w = static_cast<out_t>(b[idx]);
      if (r == c) {
        v += l;
        w += l;
      }
      lhs[idx] = v;
      rhs[idx] = w;
    }
  }
}

template <typename in_t, typename out_t>
void launch(const at::Tensor& a, const at::Tensor& b, double ridge, at::Tensor& lhs, at::Tensor& rhs) {
  const int64_t n = a.size(0), d = a.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto lam = at::empty({n}, lhs.options());
  ridge_kernel<in_t, out_t><<<static_cast<unsigned>(n), kTraceThreads, 0, stream>>>(
      a.data_ptr<in_t>(), d, ridge, lam.data_ptr<out_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const unsigned tiles = static_cast<unsigned>((d + kTile - 1) / kTile);
  const dim3 grid(tiles, tiles, static_cast<unsigned>(n));
  const dim3 block(kTile, kRows);
  prepare_kernel<in_t, out_t><<<grid, block, 0, stream>>>(a.data_ptr<in_t>(), b.data_ptr<in_t>(),
                                                          lam.data_ptr<out_t>(), d, lhs.data_ptr<out_t>(),
                                                          rhs.data_ptr<out_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void prepare_cuda(const at::Tensor& a, const at::Tensor& b, double ridge, at::Tensor& lhs, at::Tensor& rhs) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda() && lhs.is_cuda() && rhs.is_cuda(), "prepare_cuda: tensors must be CUDA");
  TORCH_CHECK(a.size(0) <= 65535, "projection_solve: at most 65535 items per CUDA batch, got ", a.size(0),
              "; split the batch");
  TORCH_CHECK(a.size(1) <= 65535L * kTile, "projection_solve: d too large for the CUDA preparation grid");
  const c10::cuda::CUDAGuard guard(a.device());
  // one dtype for both inputs; half inputs are widened to fp32 first (exact)
  auto in_dtype = at::promote_types(a.scalar_type(), b.scalar_type());
  if (in_dtype != at::kDouble) in_dtype = at::kFloat;
  const at::Tensor a_ = a.to(in_dtype).contiguous();
  const at::Tensor b_ = b.to(in_dtype).contiguous();
  const bool out_double = lhs.scalar_type() == at::kDouble;
  if (in_dtype == at::kDouble) {
    if (out_double) launch<double, double>(a_, b_, ridge, lhs, rhs);
    else launch<double, float>(a_, b_, ridge, lhs, rhs);
  } else {
    if (out_double) launch<float, double>(a_, b_, ridge, lhs, rhs);
    else launch<float, float>(a_, b_, ridge, lhs, rhs);
  }
}

}  // namespace gradmap
