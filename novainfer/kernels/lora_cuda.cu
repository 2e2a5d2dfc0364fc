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
// output blocks of every part, segments); a block past its segment's end returns at once. Everything runs
// on the current stream, so the ops can be captured in a CUDA graph.

#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace {

// A block: BM tokens x BN outputs of one segment, through BK-wide slices of K (BK = 256
// for 2-byte weights, 128 for float32, to stay within 48 KiB of shared memory): few,
// long iterations with many independent loads each, since LoRA's matmuls are skinny (the
// shrink has a few dozen outputs, the expand a rank of 16-128) and latency-bound.
constexpr int BM = 16, BN = 32, THREADS = 256;
constexpr int COL_THREADS = THREADS / BM, COLS = BN / COL_THREADS;  // 16 threads x 2 outputs

// Up to three parts (q, k, v) of an expand in one launch: part p writes out columns
// [col0[p], col0[p] + n_out[p]) from in columns in0[p] + slot * in_slot_stride, W rows
// row0[p] + n; its blocks follow the previous parts' along the grid's y axis.
struct Parts {
  int64_t in0[3], row0[3], col0[3];
  int n_out[3], blocks[3], count;
};

template <typename in_t, typename w_t, typename out_t, bool ADD>
__global__ void __launch_bounds__(THREADS) segmented_matmul(
    const in_t* __restrict__ in, int64_t in_stride, int64_t in_slot_stride,
    const w_t* __restrict__ w, int64_t w_slot_stride, int64_t w_row_stride,
    out_t* __restrict__ out, int64_t out_stride, Parts parts,
    const int64_t* __restrict__ tokens, const int64_t* __restrict__ seg_start,
    const int64_t* __restrict__ seg_slot, int k_len) {
  constexpr int BK = sizeof(w_t) == 2 ? 256 : 128;
  const int64_t start = seg_start[blockIdx.z], end = seg_start[blockIdx.z + 1];
  const int64_t first = start + static_cast<int64_t>(blockIdx.x) * BM;
  if (first >= end) return;
  int p = 0, yblock = blockIdx.y;
  while (p + 1 < parts.count && yblock >= parts.blocks[p]) yblock -= parts.blocks[p++];
  const int n_out = parts.n_out[p], n_first = yblock * BN;
  const int64_t slot = seg_slot[blockIdx.z];

  __shared__ int64_t tok[BM];
  __shared__ float in_tile[BM][BK + 1];
  __shared__ w_t w_tile[BN][BK + 2];
  const int tid = threadIdx.x;
  if (tid < BM) tok[tid] = first + tid < end ? tokens[first + tid] : -1;
  __syncthreads();

  const int64_t in_col = parts.in0[p] + slot * in_slot_stride;
  const w_t* w_part = w + slot * w_slot_stride + (parts.row0[p] + n_first) * w_row_stride;
  const int my_row = tid / COL_THREADS, my_col = tid % COL_THREADS;
  float acc[COLS] = {};
  for (int k0 = 0; k0 < k_len; k0 += BK) {
    const int width = min(BK, k_len - k0);
    for (int i = tid; i < BM * BK; i += THREADS) {
      const int m = i / BK, k = i % BK;
      if (k >= width) continue;
      float v = 0.f;
      if (tok[m] >= 0) {
        v = static_cast<float>(in[tok[m] * in_stride + in_col + k0 + k]);
        if (ADD) v = static_cast<float>(static_cast<w_t>(v));  // the twin's rounding
      }
      in_tile[m][k] = v;
    }
    for (int i = tid; i < BN * BK; i += THREADS) {
      const int n = i / BK, k = i % BK;
      if (k >= width) continue;
      w_tile[n][k] = n_first + n < n_out ? w_part[n * w_row_stride + k0 + k]
                                         : static_cast<w_t>(0.f);
    }
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < width; ++k) {
      const float v = in_tile[my_row][k];
#pragma unroll
      for (int j = 0; j < COLS; ++j)
        acc[j] += v * static_cast<float>(w_tile[my_col + j * COL_THREADS][k]);
    }
    __syncthreads();
  }
  const int64_t t = tok[my_row];
  if (t < 0) return;
#pragma unroll
  for (int j = 0; j < COLS; ++j) {
    const int n = n_first + my_col + j * COL_THREADS;
    if (n >= n_out) continue;
    out_t* dst = out + t * out_stride + parts.col0[p] + n;
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

int add_part(Parts& parts, int64_t in0, int64_t row0, int64_t col0, int64_t n_out) {
  const int p = parts.count++;
  parts.in0[p] = in0;
  parts.row0[p] = row0;
  parts.col0[p] = col0;
  parts.n_out[p] = static_cast<int>(n_out);
  parts.blocks[p] = static_cast<int>((n_out + BN - 1) / BN);
  return parts.blocks[p];
}

dim3 grid(int64_t max_rows, int y_blocks, int64_t segments) {
  return dim3((max_rows + BM - 1) / BM, y_blocks, segments);
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
  Parts parts{};
  const int y_blocks = add_part(parts, 0, 0, 0, n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_shrink", [&] {
    segmented_matmul<scalar_t, scalar_t, float, false>
        <<<grid(max_rows, y_blocks, segments), THREADS, 0, stream>>>(
            x.data_ptr<scalar_t>(), x.stride(0), 0,
            a.data_ptr<scalar_t>(), a.stride(0), a.stride(1),
            out.data_ptr<float>(), out.stride(0), parts,
            tokens.data_ptr<int64_t>(), seg_start.data_ptr<int64_t>(),
            seg_slot.data_ptr<int64_t>(), static_cast<int>(k));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// y[t, y0:y0 + size] += shrunk[t, c:c + rank] @ b[slot(t), y0:y0 + size, :rank].T with
// c = s0 + slot(t) * slot_stride, for the segments' tokens and every part (y0, size, s0) of
// the layer (at most three), in one launch.
void lora_expand(torch::Tensor shrunk, torch::Tensor b, torch::Tensor y, torch::Tensor tokens,
                 torch::Tensor seg_start, torch::Tensor seg_slot, int64_t max_rows,
                 std::vector<int64_t> y0, std::vector<int64_t> size, std::vector<int64_t> s0,
                 int64_t slot_stride, int64_t rank) {
  check(shrunk, "shrunk", 2);
  check(b, "b", 3);
  check(y, "y", 2);
  check_segments(tokens, seg_start, seg_slot);
  TORCH_CHECK(shrunk.scalar_type() == torch::kFloat32, "shrunk must be float32");
  TORCH_CHECK(y.scalar_type() == b.scalar_type(), "y must have b's dtype");
  TORCH_CHECK(y0.size() == size.size() && s0.size() == size.size() && size.size() >= 1 &&
              size.size() <= 3, "expand takes one to three parts (y0, size, s0)");
  TORCH_CHECK(rank <= b.size(2), "rank out of range");
  Parts parts{};
  int y_blocks = 0;
  for (size_t i = 0; i < size.size(); ++i) {
    TORCH_CHECK(y0[i] + size[i] <= b.size(1) && y0[i] + size[i] <= y.size(1),
                "output columns out of range");
    if (size[i]) y_blocks += add_part(parts, s0[i], y0[i], y0[i], size[i]);
  }
  const int64_t segments = seg_slot.numel();
  if (!segments || !max_rows || !y_blocks || !rank) return;
  const c10::cuda::CUDAGuard guard(y.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "lora_expand", [&] {
    segmented_matmul<float, scalar_t, scalar_t, true>
        <<<grid(max_rows, y_blocks, segments), THREADS, 0, stream>>>(
            shrunk.data_ptr<float>(), shrunk.stride(0), slot_stride,
            b.data_ptr<scalar_t>(), b.stride(0), b.stride(1),
            y.data_ptr<scalar_t>(), y.stride(0), parts,
            tokens.data_ptr<int64_t>(), seg_start.data_ptr<int64_t>(),
            seg_slot.data_ptr<int64_t>(), static_cast<int>(rank));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_shrink", &lora_shrink, "LoRA shrink over slot segments (CUDA)");
  m.def("lora_expand", &lora_expand, "LoRA expand over slot segments (CUDA)");
}
