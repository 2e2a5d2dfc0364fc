/* Fused element-wise ops of the decoder for the CPU (float32): RMSNorm (with the residual
   add), rotary embedding in place, SiLU-and-mul, and the KV-cache write.

   In PyTorch each of these is four to eight small ops, each a pass over memory plus
   dispatch overhead; at decode batch sizes the overhead is most of the cost. One loop per
   op instead. PyTorch twins (the references in tests): layers/norm.py, layers/rotary.py,
   layers/activation.py, layers/attention/torch_ref.py:write_kv. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_vec.h"

/* Below this many elements a parallel region costs more than it saves. */
#define PARALLEL_MIN 32768

static void norm_row(const float *x, const float *w, float *out, int64_t n, float eps) {
    /* Four vector accumulators: with one, the sum waits on each add's latency. */
    v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const v8f x0 = load8(x + i), x1 = load8(x + i + 8), x2 = load8(x + i + 16),
                  x3 = load8(x + i + 24);
        a0 += x0 * x0;
        a1 += x1 * x1;
        a2 += x2 * x2;
        a3 += x3 * x3;
    }
    for (; i + 8 <= n; i += 8) {
        const v8f v = load8(x + i);
        a0 += v * v;
    }
    float ss = hsum((a0 + a1) + (a2 + a3));
    for (; i < n; ++i) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t j = 0; j < n; ++j) out[j] = w[j] * (x[j] * inv);
}

/* out = w * x / rms(x), per row of n. */
void rms_norm_f32(const float *x, const float *w, float *out, int64_t rows, int64_t n, float eps) {
#pragma omp parallel for if (rows * n >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; ++r) norm_row(x + r * n, w, out + r * n, n, eps);
}

/* sum = x + residual; out = w * sum / rms(sum). */
void add_rms_norm_f32(const float *x, const float *residual, const float *w, float *out,
                      float *sum, int64_t rows, int64_t n, float eps) {
#pragma omp parallel for if (rows * n >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; ++r) {
        const float *a = x + r * n, *b = residual + r * n;
        float *s = sum + r * n;
        for (int64_t i = 0; i < n; ++i) s[i] = a[i] + b[i];
        norm_row(s, w, out + r * n, n, eps);
    }
}

static void rotate_heads(float *x, int64_t heads, int64_t head_dim, const float *cos,
                         const float *sin) {
    const int64_t half = head_dim / 2;
    for (int64_t h = 0; h < heads; ++h, x += head_dim)
        for (int64_t i = 0; i < half; ++i) {
            const float a = x[i], b = x[i + half];
            x[i] = a * cos[i] - b * sin[i];
            x[i + half] = b * cos[i + half] + a * sin[i + half];
        }
}

/* Rotary embedding of q [tokens, q_heads, head_dim] and k [tokens, k_heads, head_dim] in
   place (rows q_stride / k_stride floats apart: they may be views into the fused qkv
   output), with cos/sin tables [table_len, head_dim] looked up at positions[t]. Returns 0,
   or -1, before touching anything, when a position is outside the tables. */
int rope_f32(float *q, int64_t q_stride, int64_t q_heads, float *k, int64_t k_stride,
             int64_t k_heads, const int64_t *positions, const float *cos, const float *sin,
             int64_t table_len, int64_t tokens, int64_t head_dim) {
    for (int64_t t = 0; t < tokens; ++t)
        if (positions[t] < 0 || positions[t] >= table_len) return -1;
#pragma omp parallel for if (tokens * (q_heads + k_heads) * head_dim >= PARALLEL_MIN)
    for (int64_t t = 0; t < tokens; ++t) {
        const float *c = cos + positions[t] * head_dim, *s = sin + positions[t] * head_dim;
        rotate_heads(q + t * q_stride, q_heads, head_dim, c, s);
        rotate_heads(k + t * k_stride, k_heads, head_dim, c, s);
    }
    return 0;
}

/* out[r] = silu(gate_up[r, :n]) * gate_up[r, n:] */
void silu_and_mul_f32(const float *gate_up, float *out, int64_t rows, int64_t n) {
#pragma omp parallel for if (rows * n >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; ++r) {
        const float *g = gate_up + r * 2 * n, *u = g + n;
        float *o = out + r * n;
        for (int64_t i = 0; i < n; ++i) o[i] = g[i] / (1.0f + exp_f32(-g[i])) * u[i];
    }
}

/* Copy row t of k and v (row_len floats each) into cache slot slots[t]; slots < 0 are
   padding and skipped. k_cache/v_cache: [num_slots, row_len]. Returns 0, or -1, before
   writing anything, when a slot is past the cache. */
int store_kv_f32(const float *k, const float *v, float *k_cache, float *v_cache,
                 const int64_t *slots, int64_t tokens, int64_t row_len, int64_t num_slots) {
    for (int64_t t = 0; t < tokens; ++t)
        if (slots[t] >= num_slots) return -1;
    for (int64_t t = 0; t < tokens; ++t) {
        if (slots[t] < 0) continue;
        memcpy(k_cache + slots[t] * row_len, k + t * row_len, sizeof(float) * row_len);
        memcpy(v_cache + slots[t] * row_len, v + t * row_len, sizeof(float) * row_len);
    }
    return 0;
}
