// LoRA shrink and expand for a batch whose tokens use different adapters (CUDA C++), the
// twins of kernels/lora.py's Triton kernels: same arguments, same grouping of tokens.
//
//   shrink:  out[t, n]              = x[t] . A[slot, n]                      (out float32)
//   expand:  y[t, y0 + n]          += s[t, c + r] . B[slot, y0 + n, r]  over r < rank
//            with c = s0 + slot * slot_stride; s float32 or B's dtype, rounded to B's dtype
//            first, as the PyTorch twin does
//
// LoRA's matmuls are skinny (a shrink has a few dozen outputs over K = the hidden size, an
// expand thousands of outputs over K = the rank), so both are written like batched GEMVs:
// a warp takes TOKENS tokens of one segment (all of one slot) and
//   shrink: 8 outputs; each lane reads 8 consecutive k of x and of A's rows per 256-wide
//           slice (16-byte loads; a ragged end element by element), keeps TOKENS x 8
//           partial sums, and the warp adds them up with shuffles at the end; the warps
//           of a block split K and meet in shared memory;
//   expand: 256 consecutive outputs, 8 per lane; each lane reads its rows of B, 8 ranks at
//           a time, and the (broadcast) shrunk values of its tokens; it then updates its 8
//           outputs of each token with one 16-byte read-modify-write.
// Grid: (token groups of the longest segment, output groups [of every part], segments);
// a group past its segment's end returns at once. All loads of a slice are issued before
// their arithmetic (ncu: the interleaved version stalled on every load). Unaligned rows take scalar
// loads (VEC = false). Everything runs on the current stream (CUDA-graph capturable).

#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int TOKENS = 4;                      // tokens per warp
constexpr int SHRINK_N = 8, SHRINK_WARPS = 4;  // shrink: outputs per block, warps splitting K
constexpr int EXPAND_N = 32 * 8, EXPAND_WARPS = 8;  // expand: outputs per warp, warps per block
static_assert(TOKENS * SHRINK_N == 32, "the shrink's reduction gives each lane one output");

// Up to three parts (q, k, v) of an expand in one launch: part p reads s columns
// in0[p] + slot * slot_stride, B rows / y columns from row0[p], n_out[p] of them; its output
// groups follow the previous parts' along the grid's y axis.
struct Parts {
  int64_t in0[3], row0[3];
  int n_out[3], groups[3], count;
};

template <typename T>
__device__ __forceinline__ T pick(const T (&field)[3], int p) {
  return p == 0 ? field[0] : p == 1 ? field[1] : field[2];
}

// 8 consecutive elements as floats (16-byte loads when VEC, else one at a time).
template <typename T, bool VEC>
__device__ __forceinline__ void load8(const T* src, float (&dst)[8]) {
  if constexpr (VEC) {
    constexpr int PER = 16 / sizeof(T);  // elements per 16-byte load
#pragma unroll
    for (int h = 0; h < 8 / PER; ++h) {
      const uint4 raw = *reinterpret_cast<const uint4*>(src + h * PER);
      const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < PER; ++i) dst[h * PER + i] = static_cast<float>(v[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

// The first `count` (<= 8) elements, zeros after them.
template <typename T, bool VEC>
__device__ __forceinline__ void load_n(const T* src, float (&dst)[8], int count) {
  if (VEC && count == 8) {
    load8<T, true>(src, dst);
    return;
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) dst[e] = e < count ? static_cast<float>(src[e]) : 0.f;
}

template <typename T, bool VEC>
__device__ __forceinline__ void store8(T* dst, const float (&src)[8]) {
  if constexpr (VEC) {
    constexpr int PER = 16 / sizeof(T);
#pragma unroll
    for (int h = 0; h < 8 / PER; ++h) {
      uint4 raw;
      T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < PER; ++i) v[i] = static_cast<T>(src[h * PER + i]);
      *reinterpret_cast<uint4*>(dst + h * PER) = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// The first token row of this thread's group (TOKENS rows from `first` of this block's
// segment) and its token ids (-1: none); false when the group is past the segment's end.
__device__ __forceinline__ bool group_tokens(const int64_t* tokens, const int64_t* seg_start,
                                             int64_t group, int64_t (&tok)[TOKENS]) {
  const int64_t start = seg_start[blockIdx.z], end = seg_start[blockIdx.z + 1];
  const int64_t first = start + group * TOKENS;
  if (first >= end) return false;
#pragma unroll
  for (int i = 0; i < TOKENS; ++i) tok[i] = first + i < end ? tokens[first + i] : -1;
  return true;
}

// 32 values per lane in, lane l out with the warp's sum of value l: each of five steps
// sends half of what a lane holds to its partner and keeps the other half (31 shuffles).
template <int OFF>
__device__ __forceinline__ void reduce_step(float (&v)[32], int lane) {
  const bool upper = lane & OFF;
#pragma unroll
  for (int i = 0; i < OFF; ++i) {
    const float keep = upper ? v[i + OFF] : v[i];
    const float send = upper ? v[i] : v[i + OFF];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
  }
}

__device__ __forceinline__ float warp_transpose_sum(float (&v)[32], int lane) {
  reduce_step<16>(v, lane);
  reduce_step<8>(v, lane);
  reduce_step<4>(v, lane);
  reduce_step<2>(v, lane);
  reduce_step<1>(v, lane);
  return v[0];
}

// x [tokens, k] (rows x_stride apart), a [slots, n, k] -> out [tokens, n] float32. A block:
// TOKENS tokens x SHRINK_N outputs; its SHRINK_WARPS warps split K (warp w: the 256-wide
// slices w, w + SHRINK_WARPS, ...), and their partial sums meet in shared memory, added
// in a fixed order (deterministic).
template <typename scalar_t, bool VEC>
__global__ void __launch_bounds__(SHRINK_WARPS * 32) shrink_kernel(
    const scalar_t* __restrict__ x, int64_t x_stride, const scalar_t* __restrict__ a,
    int64_t a_slot_stride, int64_t a_row_stride, float* __restrict__ out, int64_t out_stride,
    const int64_t* __restrict__ tokens, const int64_t* __restrict__ seg_start,
    const int64_t* __restrict__ seg_slot, int n_out, int k_len) {
  int64_t tok[TOKENS];
  if (!group_tokens(tokens, seg_start, blockIdx.x, tok)) return;  // the whole block
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int n_first = blockIdx.y * SHRINK_N;
  const scalar_t* a_rows = a + seg_slot[blockIdx.z] * a_slot_stride + n_first * a_row_stride;
  float acc[TOKENS * SHRINK_N] = {};  // [token i][output j] at i * SHRINK_N + j
  for (int k = warp * 256 + lane * 8; k < k_len; k += SHRINK_WARPS * 256) {
    const int count = min(8, k_len - k);
    // Every load of the slice first, then the arithmetic: their latencies overlap.
    float xs[TOKENS][8], as[SHRINK_N][8];
#pragma unroll
    for (int i = 0; i < TOKENS; ++i)
      load_n<scalar_t, VEC>(x + (tok[i] >= 0 ? tok[i] : 0) * x_stride + k, xs[i],
                            tok[i] >= 0 ? count : 0);
#pragma unroll
    for (int j = 0; j < SHRINK_N; ++j)
      load_n<scalar_t, VEC>(a_rows + j * a_row_stride + k, as[j],
                            n_first + j < n_out ? count : 0);
#pragma unroll
    for (int i = 0; i < TOKENS; ++i)
#pragma unroll
      for (int j = 0; j < SHRINK_N; ++j)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i * SHRINK_N + j] += xs[i][e] * as[j][e];
  }
  __shared__ float partial[SHRINK_WARPS][32];
  partial[warp][lane] = warp_transpose_sum(acc, lane);  // lane l: token l / 8, output l % 8
  __syncthreads();
  if (warp) return;
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < SHRINK_WARPS; ++w) total += partial[w][lane];
  const int i = lane / SHRINK_N, j = lane % SHRINK_N;
  int64_t t = tok[0];
#pragma unroll
  for (int q = 1; q < TOKENS; ++q)
    if (i == q) t = tok[q];
  if (t >= 0 && n_first + j < n_out) out[t * out_stride + n_first + j] = total;
}

// s [tokens, ...] (float32 or B's dtype), b [slots, out, R], y [tokens, out] += s . b. A
// warp: TOKENS tokens x EXPAND_N outputs (8 per lane); a block: EXPAND_WARPS token groups.
template <typename in_t, typename scalar_t, bool VEC>
__global__ void __launch_bounds__(EXPAND_WARPS * 32) expand_kernel(
    const in_t* __restrict__ s, int64_t s_stride, int64_t slot_stride,
    const scalar_t* __restrict__ b, int64_t b_slot_stride, int64_t b_row_stride,
    scalar_t* __restrict__ y, int64_t y_stride, Parts parts,
    const int64_t* __restrict__ tokens, const int64_t* __restrict__ seg_start,
    const int64_t* __restrict__ seg_slot, int rank) {
  int64_t tok[TOKENS];
  const int64_t group_id = static_cast<int64_t>(blockIdx.x) * EXPAND_WARPS + threadIdx.x / 32;
  if (!group_tokens(tokens, seg_start, group_id, tok)) return;  // this warp
  int p = 0, group = blockIdx.y;
  if (parts.count > 1 && group >= parts.groups[0]) {
    group -= parts.groups[0];
    p = 1;
    if (parts.count > 2 && group >= parts.groups[1]) {
      group -= parts.groups[1];
      p = 2;
    }
  }
  const int lane = threadIdx.x % 32;
  const int n0 = group * EXPAND_N + lane * 8;  // this lane's 8 outputs of the part
  const int n_out = pick(parts.n_out, p);
  const int64_t slot = seg_slot[blockIdx.z], row0 = pick(parts.row0, p);
  const in_t* s_cols = s + pick(parts.in0, p) + slot * slot_stride;
  const int rows = n0 < n_out ? min(8, n_out - n0) : 0;
  const scalar_t* b_rows = b + slot * b_slot_stride + (row0 + (rows ? n0 : 0)) * b_row_stride;
  float acc[TOKENS][8] = {};
  for (int r0 = 0; r0 < rank; r0 += 8) {
    const int width = min(8, rank - r0);
    float sv[TOKENS][8], bv[8][8];
#pragma unroll
    for (int i = 0; i < TOKENS; ++i)
#pragma unroll
      for (int e = 0; e < 8; ++e)
        sv[i][e] = tok[i] >= 0 && e < width
                       ? static_cast<float>(static_cast<scalar_t>(
                             static_cast<float>(s_cols[tok[i] * s_stride + r0 + e])))
                       : 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j)
      load_n<scalar_t, VEC>(b_rows + (j < rows ? j : 0) * b_row_stride + r0, bv[j],
                            j < rows ? width : 0);
#pragma unroll
    for (int i = 0; i < TOKENS; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i][j] += sv[i][e] * bv[j][e];
  }
  if (!rows) return;
#pragma unroll
  for (int i = 0; i < TOKENS; ++i) {
    if (tok[i] < 0) continue;
    scalar_t* dst = y + tok[i] * y_stride + row0 + n0;
    if (VEC && rows == 8) {
      float yv[8];
      load8<scalar_t, true>(dst, yv);
#pragma unroll
      for (int e = 0; e < 8; ++e) yv[e] += acc[i][e];
      store8<scalar_t, true>(dst, yv);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e)
        if (e < rows) dst[e] = static_cast<scalar_t>(static_cast<float>(dst[e]) + acc[i][e]);
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

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// (token groups of the longest segment / groups_per_block, output groups, segments)
dim3 grid(int64_t max_rows, int64_t groups_per_block, int64_t groups, int64_t segments) {
  const int64_t token_groups = (max_rows + TOKENS - 1) / TOKENS;
  return dim3(static_cast<unsigned>((token_groups + groups_per_block - 1) / groups_per_block),
              static_cast<unsigned>(groups), static_cast<unsigned>(segments));
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
  const dim3 blocks = grid(max_rows, 1, (n + SHRINK_N - 1) / SHRINK_N, segments);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_shrink", [&] {
    const int per = 16 / sizeof(scalar_t);
    const bool vec = aligned16(x.data_ptr()) && aligned16(a.data_ptr()) &&
                     x.stride(0) % per == 0 && a.stride(0) % per == 0 && a.stride(1) % per == 0;
    const auto launch = [&](auto v) {
      shrink_kernel<scalar_t, decltype(v)::value><<<blocks, SHRINK_WARPS * 32, 0, stream>>>(
          x.data_ptr<scalar_t>(), x.stride(0), a.data_ptr<scalar_t>(), a.stride(0),
          a.stride(1), out.data_ptr<float>(), out.stride(0), tokens.data_ptr<int64_t>(),
          seg_start.data_ptr<int64_t>(), seg_slot.data_ptr<int64_t>(), static_cast<int>(n),
          static_cast<int>(k));
    };
    if (vec) {
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
  int64_t groups = 0;
  bool columns_aligned = true;
  for (size_t i = 0; i < size.size(); ++i) {
    TORCH_CHECK(y0[i] >= 0 && size[i] >= 0 && s0[i] >= 0 && slot_stride >= 0,
                "part offsets must not be negative");
    TORCH_CHECK(y0[i] + size[i] <= b.size(1) && y0[i] + size[i] <= y.size(1),
                "output columns out of range");
    TORCH_CHECK(s0[i] + (b.size(0) - 1) * slot_stride + rank <= shrunk.size(1),
                "shrunk columns out of range");
    if (!size[i]) continue;
    const int p = parts.count++;
    parts.in0[p] = s0[i];
    parts.row0[p] = y0[i];
    parts.n_out[p] = static_cast<int>(size[i]);
    parts.groups[p] = static_cast<int>((size[i] + EXPAND_N - 1) / EXPAND_N);
    groups += parts.groups[p];
    columns_aligned = columns_aligned && y0[i] % 8 == 0;
  }
  const int64_t segments = seg_slot.numel();
  if (!segments || !max_rows || !groups || !rank) return;
  const c10::cuda::CUDAGuard guard(y.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 blocks = grid(max_rows, EXPAND_WARPS, groups, segments);
  const bool float_in = shrunk.scalar_type() == torch::kFloat32;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "lora_expand", [&] {
    const int per = 16 / sizeof(scalar_t);
    const bool vec = columns_aligned && aligned16(b.data_ptr()) && aligned16(y.data_ptr()) &&
                     b.stride(0) % per == 0 && b.stride(1) % per == 0 && y.stride(0) % per == 0;
    const auto launch = [&](auto* in, auto v) {
      using in_t = std::remove_const_t<std::remove_pointer_t<decltype(in)>>;
      expand_kernel<in_t, scalar_t, decltype(v)::value><<<blocks, EXPAND_WARPS * 32, 0, stream>>>(
          in, shrunk.stride(0), slot_stride, b.data_ptr<scalar_t>(), b.stride(0), b.stride(1),
          y.data_ptr<scalar_t>(), y.stride(0), parts, tokens.data_ptr<int64_t>(),
          seg_start.data_ptr<int64_t>(), seg_slot.data_ptr<int64_t>(), static_cast<int>(rank));
    };
    if (float_in && vec) {
      launch(shrunk.data_ptr<float>(), std::true_type{});
    } else if (float_in) {
      launch(shrunk.data_ptr<float>(), std::false_type{});
    } else if (vec) {
      launch(shrunk.data_ptr<scalar_t>(), std::true_type{});
    } else {
      launch(shrunk.data_ptr<scalar_t>(), std::false_type{});
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_shrink", &lora_shrink, "LoRA shrink over slot segments (CUDA)");
  m.def("lora_expand", &lora_expand, "LoRA expand over slot segments (CUDA)");
}
