// LoRA shrink and expand for a batch whose tokens use different adapters (CUDA C++), the
// twins of kernels/lora.py's Triton kernels: same arguments, same grouping of tokens.
//
// Both ops are one segmented matmul: for the tokens of segment s (all of slot seg_slot[s]),
//
//     out[t, col0 + n] (+)= sum_k in[t, in0 + slot * in_slot_stride + k] * W[slot, row0 + n, k]
//
//   shrink:  in = x,           W = A [slots, n, k],   out = float32, written
//   expand:  in = the shrunk (float32, or B's dtype from the fused QKV matmul), W = B
//            [slots, out, R], out = y, added to (in rounded to B's dtype first, as the
//            PyTorch twin does)
//
// A block computes BM tokens x BN outputs of one segment, accumulating in fp32 through
// BK-wide tiles of `in` and W in shared memory. Grid: (row blocks of the longest segment,
// output blocks of every part, segments); a block past its segment's end returns at once. Everything runs
// on the current stream, so the ops can be captured in a CUDA graph.

#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

// A block: BM tokens x BN outputs of one segment, through BK-wide slices of K, 16 threads
// per token row, each with BN / 16 outputs. LoRA's matmuls are skinny, so the two ops get
// different tiles: the shrink (a few dozen outputs, K = the hidden size) BN = 32 and long
// slices (BK = 256 for 2-byte weights, 128 for float32: few iterations, many loads in
// flight each); the expand (thousands of outputs, K = the rank) BN = 128, BK = 32.
constexpr int BM = 16, THREADS = 256, COL_THREADS = THREADS / BM;
constexpr int SHRINK_BN = 32, EXPAND_BN = 128, EXPAND_BK = 32;
template <typename w_t>
constexpr int shrink_bk() { return sizeof(w_t) == 2 ? 256 : 128; }

// Up to three parts (q, k, v) of an expand in one launch: part p writes out columns
// [col0[p], col0[p] + n_out[p]) from in columns in0[p] + slot * in_slot_stride, W rows
// row0[p] + n; its blocks follow the previous parts' along the grid's y axis.
struct Parts {
  int64_t in0[3], row0[3], col0[3];
  int n_out[3], blocks[3], count;
};

// A part's field by a runtime index, without indexing the parameter struct dynamically
// (which would copy it to local memory).
template <typename T>
__device__ __forceinline__ T pick(const T (&field)[3], int p) {
  return p == 0 ? field[0] : p == 1 ? field[1] : field[2];
}

// ADD: out += the product (expand), else out = it (shrink). SPLIT: the grid's y axis also
// splits K (k_split wide each) and the blocks add their partial sums into a zeroed `out`
// atomically (float32 only): a decode step's shrink has too few blocks to fill the GPU.
template <typename in_t, typename w_t, typename out_t, bool ADD, bool SPLIT, int BN, int BK>
__global__ void __launch_bounds__(THREADS) segmented_matmul(
    const in_t* __restrict__ in, int64_t in_stride, int64_t in_slot_stride,
    const w_t* __restrict__ w, int64_t w_slot_stride, int64_t w_row_stride,
    out_t* __restrict__ out, int64_t out_stride, Parts parts,
    const int64_t* __restrict__ tokens, const int64_t* __restrict__ seg_start,
    const int64_t* __restrict__ seg_slot, int k_len, int k_split) {
  constexpr int COLS = BN / COL_THREADS;
  constexpr int IN_LOADS = BM * BK / THREADS, W_LOADS = BN * BK / THREADS;
  const int64_t start = seg_start[blockIdx.z], end = seg_start[blockIdx.z + 1];
  const int64_t first = start + static_cast<int64_t>(blockIdx.x) * BM;
  if (first >= end) return;
  int p = 0, yblock = blockIdx.y, k_begin = 0, k_end = k_len;
  if (SPLIT) {  // y = split * blocks of the (single) part + output block
    const int split = yblock / parts.blocks[0];
    yblock -= split * parts.blocks[0];
    k_begin = split * k_split;
    k_end = min(k_len, k_begin + k_split);
  }
  if (parts.count > 1 && yblock >= parts.blocks[0]) {
    yblock -= parts.blocks[0];
    p = 1;
    if (parts.count > 2 && yblock >= parts.blocks[1]) {
      yblock -= parts.blocks[1];
      p = 2;
    }
  }
  const int n_out = pick(parts.n_out, p), n_first = yblock * BN;
  const int64_t slot = seg_slot[blockIdx.z];

  __shared__ int64_t tok[BM];
  __shared__ float in_tile[BM][BK + 1];
  __shared__ w_t w_tile[BN][BK + 2];
  const int tid = threadIdx.x;
  if (tid < BM) tok[tid] = first + tid < end ? tokens[first + tid] : -1;
  __syncthreads();

  const in_t* in_base = in + pick(parts.in0, p) + slot * in_slot_stride;
  const w_t* w_part = w + slot * w_slot_stride + (pick(parts.row0, p) + n_first) * w_row_stride;
  const int my_row = tid / COL_THREADS, my_col = tid % COL_THREADS;
  float acc[COLS] = {};
  for (int k0 = k_begin; k0 < k_end; k0 += BK) {
    const int width = min(BK, k_end - k0);
    // Every load of the slice first (predicated, unrolled: their latencies overlap), then
    // the stores to shared memory.
    float in_regs[IN_LOADS];
    w_t w_regs[W_LOADS];
#pragma unroll
    for (int j = 0; j < IN_LOADS; ++j) {
      const int i = tid + j * THREADS, m = i / BK, k = i % BK;
      const int64_t t = tok[m];
      in_regs[j] = t >= 0 && k < width ? static_cast<float>(in_base[t * in_stride + k0 + k])
                                       : 0.f;
    }
#pragma unroll
    for (int j = 0; j < W_LOADS; ++j) {
      const int i = tid + j * THREADS, n = i / BK, k = i % BK;
      w_regs[j] = n_first + n < n_out && k < width ? w_part[n * w_row_stride + k0 + k]
                                                   : static_cast<w_t>(0.f);
    }
#pragma unroll
    for (int j = 0; j < IN_LOADS; ++j) {
      const int i = tid + j * THREADS;
      // expand: the twin rounds the shrunk values to B's dtype first
      in_tile[i / BK][i % BK] = ADD ? static_cast<float>(static_cast<w_t>(in_regs[j]))
                                    : in_regs[j];
    }
#pragma unroll
    for (int j = 0; j < W_LOADS; ++j) {
      const int i = tid + j * THREADS;
      w_tile[i / BK][i % BK] = w_regs[j];
    }
    __syncthreads();
#pragma unroll 8
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
  out_t* dst = out + t * out_stride + pick(parts.col0, p);
#pragma unroll
  for (int j = 0; j < COLS; ++j) {
    const int n = n_first + my_col + j * COL_THREADS;
    if (n >= n_out) continue;
    if constexpr (SPLIT) {
      atomicAdd(reinterpret_cast<float*>(dst + n), acc[j]);
    } else {
      dst[n] = static_cast<out_t>(ADD ? static_cast<float>(dst[n]) + acc[j] : acc[j]);
    }
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

int add_part(Parts& parts, int64_t in0, int64_t row0, int64_t col0, int64_t n_out, int bn) {
  const int p = parts.count++;
  parts.in0[p] = in0;
  parts.row0[p] = row0;
  parts.col0[p] = col0;
  parts.n_out[p] = static_cast<int>(n_out);
  parts.blocks[p] = static_cast<int>((n_out + bn - 1) / bn);
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
  const int y_blocks = add_part(parts, 0, 0, 0, n, SHRINK_BN);
  // Split K over more blocks until the grid covers the GPU about twice (a decode step's
  // few tokens make few blocks, each with a long K loop); a split is a multiple of 256.
  const int64_t blocks = (max_rows + BM - 1) / BM * y_blocks * segments;
  const int64_t target = 2 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t slices = (k + 255) / 256;
  const int64_t splits = std::max<int64_t>(1, std::min(slices, (target + blocks - 1) / blocks));
  const int k_split = static_cast<int>((slices + splits - 1) / splits * 256);
  const int used = static_cast<int>((k + k_split - 1) / k_split);
  if (used > 1) out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_shrink", [&] {
    const auto launch = [&](auto split) {
      segmented_matmul<scalar_t, scalar_t, float, false, decltype(split)::value, SHRINK_BN,
                       shrink_bk<scalar_t>()>
          <<<grid(max_rows, y_blocks * used, segments), THREADS, 0, stream>>>(
              x.data_ptr<scalar_t>(), x.stride(0), 0,
              a.data_ptr<scalar_t>(), a.stride(0), a.stride(1),
              out.data_ptr<float>(), out.stride(0), parts,
              tokens.data_ptr<int64_t>(), seg_start.data_ptr<int64_t>(),
              seg_slot.data_ptr<int64_t>(), static_cast<int>(k), k_split);
    };
    if (used > 1) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
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
  TORCH_CHECK(shrunk.scalar_type() == torch::kFloat32 || shrunk.scalar_type() == b.scalar_type(),
              "shrunk must be float32 or b's dtype");
  TORCH_CHECK(y.scalar_type() == b.scalar_type(), "y must have b's dtype");
  TORCH_CHECK(y0.size() == size.size() && s0.size() == size.size() && size.size() >= 1 &&
              size.size() <= 3, "expand takes one to three parts (y0, size, s0)");
  TORCH_CHECK(rank <= b.size(2), "rank out of range");
  Parts parts{};
  int y_blocks = 0;
  for (size_t i = 0; i < size.size(); ++i) {
    TORCH_CHECK(y0[i] + size[i] <= b.size(1) && y0[i] + size[i] <= y.size(1),
                "output columns out of range");
    if (size[i]) y_blocks += add_part(parts, s0[i], y0[i], y0[i], size[i], EXPAND_BN);
  }
  const int64_t segments = seg_slot.numel();
  if (!segments || !max_rows || !y_blocks || !rank) return;
  const c10::cuda::CUDAGuard guard(y.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool float_in = shrunk.scalar_type() == torch::kFloat32;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "lora_expand", [&] {
    const auto launch = [&](auto* in) {
      using in_t = std::remove_const_t<std::remove_pointer_t<decltype(in)>>;
      segmented_matmul<in_t, scalar_t, scalar_t, true, false, EXPAND_BN, EXPAND_BK>
          <<<grid(max_rows, y_blocks, segments), THREADS, 0, stream>>>(
              in, shrunk.stride(0), slot_stride,
              b.data_ptr<scalar_t>(), b.stride(0), b.stride(1),
              y.data_ptr<scalar_t>(), y.stride(0), parts,
              tokens.data_ptr<int64_t>(), seg_start.data_ptr<int64_t>(),
              seg_slot.data_ptr<int64_t>(), static_cast<int>(rank), static_cast<int>(rank));
    };
    if (float_in) {
      launch(shrunk.data_ptr<float>());
    } else {
      launch(shrunk.data_ptr<scalar_t>());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_shrink", &lora_shrink, "LoRA shrink over slot segments (CUDA)");
  m.def("lora_expand", &lora_expand, "LoRA expand over slot segments (CUDA)");
}
