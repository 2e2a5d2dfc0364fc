// LoRA shrink and expand for a batch whose tokens use different adapters (CUDA C++), the
// twins of kernels/lora.py's Triton kernels: same arguments, same grouping of tokens.
//
// Both ops are one segmented matmul: for the tokens of segment s (all of slot seg_slot[s]),
//
//     out[t, col0 + n] (+)= sum_k in[t, in0 + slot * in_slot_stride + k] * W[slot, row0 + n, k]
//
//   shrink:  in = x,           W = A [slots, n, k],   out = float32, written
//   expand:  in = the shrunk,  W = B [slots, out, R], out = y, added to (in rounded to B's
//            dtype first, as the PyTorch twin does)
//
// A block computes BM tokens x BN outputs of one segment, accumulating in fp32 through
// BK-wide tiles of `in` and W in shared memory. Grid: (row blocks of the longest segment,
// output blocks, segments); a block past its segment's end returns at once. Everything runs
// on the current stream, so the ops can be captured in a CUDA graph.

#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace {

constexpr int BM = 16, BN = 64, BK = 32, THREADS = 256;
constexpr int COLS = BN / (THREADS / BM);  // outputs per thread: 4

template <typename in_t, typename w_t, typename out_t, bool ADD>
__global__ void segmented_matmul(
    const in_t* __restrict__ in, int64_t in_stride, int64_t in0, int64_t in_slot_stride,
    const w_t* __restrict__ w, int64_t w_slot_stride, int64_t w_row_stride, int64_t row0,
    out_t* __restrict__ out, int64_t out_stride, int64_t col0,
    const int64_t* __restrict__ tokens, const int64_t* __restrict__ seg_start,
    const int64_t* __restrict__ seg_slot, int n_out, int k_len) {
  const int64_t start = seg_start[blockIdx.z], end = seg_start[blockIdx.z + 1];
  const int64_t first = start + static_cast<int64_t>(blockIdx.x) * BM;
  if (first >= end) return;
  const int64_t slot = seg_slot[blockIdx.z];
  const int n_first = blockIdx.y * BN;

  __shared__ int64_t tok[BM];
  __shared__ float in_tile[BM][BK + 1];
  __shared__ float w_tile[BN][BK + 1];
  const int tid = threadIdx.x;
  if (tid < BM) tok[tid] = first + tid < end ? tokens[first + tid] : -1;
  __syncthreads();

  const int64_t in_col = in0 + slot * in_slot_stride;
  const w_t* w_slot = w + slot * w_slot_stride + row0 * w_row_stride;
  const int my_row = tid / (THREADS / BM), my_col = tid % (THREADS / BM);
  float acc[COLS] = {};
  for (int k0 = 0; k0 < k_len; k0 += BK) {
    for (int i = tid; i < BM * BK; i += THREADS) {
      const int m = i / BK, k = i % BK;
      float v = 0.f;
      if (tok[m] >= 0 && k0 + k < k_len) {
        v = static_cast<float>(in[tok[m] * in_stride + in_col + k0 + k]);
        if (ADD) v = static_cast<float>(static_cast<w_t>(v));  // the twin's rounding
      }
      in_tile[m][k] = v;
    }
    for (int i = tid; i < BN * BK; i += THREADS) {
      const int n = i / BK, k = i % BK;
      w_tile[n][k] = n_first + n < n_out && k0 + k < k_len
                         ? static_cast<float>(w_slot[(n_first + n) * w_row_stride + k0 + k])
                         : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < BK; ++k) {
      const float v = in_tile[my_row][k];
#pragma unroll
      for (int j = 0; j < COLS; ++j) acc[j] += v * w_tile[my_col + j * (THREADS / BM)][k];
    }
    __syncthreads();
  }
  const int64_t t = tok[my_row];
  if (t < 0) return;
#pragma unroll
  for (int j = 0; j < COLS; ++j) {
    const int n = n_first + my_col + j * (THREADS / BM);
    if (n >= n_out) continue;
    out_t* dst = out + t * out_stride + col0 + n;
    *dst = static_cast<out_t>(ADD ? static_cast<float>(*dst) + acc[j] : acc[j]);
  }
}

void check(const torch::Tensor& t, const char* name, int dims) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dimensions, not ", t.dim());
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

void check_segments(const torch::Tensor& tokens, const torch::Tensor& seg_start,
                    const torch::Tensor& seg_slot) {
  for (auto* t : {&tokens, &seg_start, &seg_slot}) {
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == torch::kInt64 && t->is_contiguous(),
                "tokens, seg_start and seg_slot must be contiguous int64 CUDA tensors");
  }
  TORCH_CHECK(seg_start.numel() == seg_slot.numel() + 1,
              "seg_start must have one entry more than seg_slot");
}

dim3 grid(int64_t max_rows, int64_t n_out, int64_t segments) {
  return dim3((max_rows + BM - 1) / BM, (n_out + BN - 1) / BN, segments);
}

}  // namespace

// out[t, :n] = x[t] @ a[slot(t)].T for the segments' tokens (out float32).
void lora_shrink(torch::Tensor x, torch::Tensor a, torch::Tensor out, torch::Tensor tokens,
                 torch::Tensor seg_start, torch::Tensor seg_slot, int64_t max_rows) {
  check(x, "x", 2);
  check(a, "a", 3);
  check(out, "out", 2);
  check_segments(tokens, seg_start, seg_slot);
  TORCH_CHECK(a.scalar_type() == x.scalar_type(), "a must have x's dtype");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32, "out must be float32");
  TORCH_CHECK(a.size(2) == x.size(1), "a's last dimension must be x's");
  TORCH_CHECK(out.size(1) >= a.size(1), "out must have a.size(1) columns");
  const int64_t segments = seg_slot.numel(), n = a.size(1), k = a.size(2);
  if (!segments || !max_rows || !n) return;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_shrink", [&] {
    segmented_matmul<scalar_t, scalar_t, float, false>
        <<<grid(max_rows, n, segments), THREADS, 0, stream>>>(
            x.data_ptr<scalar_t>(), x.stride(0), 0, 0,
            a.data_ptr<scalar_t>(), a.stride(0), a.stride(1), 0,
            out.data_ptr<float>(), out.stride(0), 0,
            tokens.data_ptr<int64_t>(), seg_start.data_ptr<int64_t>(),
            seg_slot.data_ptr<int64_t>(), static_cast<int>(n), static_cast<int>(k));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// y[t, y0:y0 + size] += shrunk[t, c:c + rank] @ b[slot(t), y0:y0 + size, :rank].T with
// c = s0 + slot(t) * slot_stride, for the segments' tokens (one part of the layer).
void lora_expand(torch::Tensor shrunk, torch::Tensor b, torch::Tensor y, torch::Tensor tokens,
                 torch::Tensor seg_start, torch::Tensor seg_slot, int64_t max_rows, int64_t y0,
                 int64_t size, int64_t s0, int64_t slot_stride, int64_t rank) {
  check(shrunk, "shrunk", 2);
  check(b, "b", 3);
  check(y, "y", 2);
  check_segments(tokens, seg_start, seg_slot);
  TORCH_CHECK(shrunk.scalar_type() == torch::kFloat32, "shrunk must be float32");
  TORCH_CHECK(y.scalar_type() == b.scalar_type(), "y must have b's dtype");
  TORCH_CHECK(rank <= b.size(2) && y0 + size <= b.size(1) && y0 + size <= y.size(1),
              "rank or output columns out of range");
  const int64_t segments = seg_slot.numel();
  if (!segments || !max_rows || !size || !rank) return;
  const c10::cuda::CUDAGuard guard(y.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "lora_expand", [&] {
    segmented_matmul<float, scalar_t, scalar_t, true>
        <<<grid(max_rows, size, segments), THREADS, 0, stream>>>(
            shrunk.data_ptr<float>(), shrunk.stride(0), s0, slot_stride,
            b.data_ptr<scalar_t>(), b.stride(0), b.stride(1), y0,
            y.data_ptr<scalar_t>(), y.stride(0), y0,
            tokens.data_ptr<int64_t>(), seg_start.data_ptr<int64_t>(),
            seg_slot.data_ptr<int64_t>(), static_cast<int>(size), static_cast<int>(rank));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_shrink", &lora_shrink, "LoRA shrink over slot segments (CUDA)");
  m.def("lora_expand", &lora_expand, "LoRA expand over slot segments (CUDA)");
}
