/* Paged decode attention for the CPU (float32), read in place from the KV cache.

   The PyTorch reference first gathers each sequence's cached K/V into a contiguous copy and
   then runs SDPA over it, so every decode step moves the whole context through DRAM three
   times. Here each (sequence, KV head) walks its block table once: pass 1 reads K and scores
   all query heads of the group, pass 2 reads V and accumulates the softmax-weighted rows.

   Built at first use by novainfer/kernels/cpu_native.py and called through ctypes (which
   releases the GIL). Threads come from the same libgomp that torch uses.

   Layouts: q, out [num_seqs, num_heads, head_dim]; k_cache, v_cache [num_blocks, block_size,
   num_kv_heads, head_dim]; block_tables [num_seqs, table_stride] int32; seq_lens int32. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Eight floats in a vector register (GCC/Clang vector extension: AVX on x86, NEON on Arm).
   head_dim must be a multiple of 8; the Python side checks it. */
typedef float v8f __attribute__((vector_size(32)));

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v); /* an unaligned load */
    return v;
}

static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

static inline float hsum(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* q . k with two independent accumulators (one would chain every FMA on the previous). */
static inline float dot(const float *q, const float *k, int64_t n) {
    v8f a0 = {0}, a1 = {0};
    int64_t d = 0;
    for (; d + 16 <= n; d += 16) {
        a0 += load8(q + d) * load8(k + d);
        a1 += load8(q + d + 8) * load8(k + d + 8);
    }
    if (d < n) a0 += load8(q + d) * load8(k + d);
    return hsum(a0 + a1);
}

/* out[0:n] += sum_t p[t] * rows[t][0:n] over `count` rows `stride` floats apart. The
   accumulators stay in registers across the rows; four columns of 8 at a time. */
static inline void weighted_rows(float *out, const float *p, const float *rows, int64_t count,
                                 int64_t stride, int64_t n) {
    int64_t d = 0;
    for (; d + 32 <= n; d += 32) {
        v8f a0 = load8(out + d), a1 = load8(out + d + 8);
        v8f a2 = load8(out + d + 16), a3 = load8(out + d + 24);
        const float *r = rows + d;
        for (int64_t t = 0; t < count; ++t, r += stride) {
            const float w = p[t];
            a0 += w * load8(r);
            a1 += w * load8(r + 8);
            a2 += w * load8(r + 16);
            a3 += w * load8(r + 24);
        }
        store8(out + d, a0);
        store8(out + d + 8, a1);
        store8(out + d + 16, a2);
        store8(out + d + 24, a3);
    }
    for (; d < n; d += 8) {
        v8f a0 = load8(out + d);
        const float *r = rows + d;
        for (int64_t t = 0; t < count; ++t, r += stride) a0 += p[t] * load8(r);
        store8(out + d, a0);
    }
}

/* Attention of one sequence for KV heads [h0, h1). Both passes walk the block table in
   order and finish a whole block (a few KB, cache-resident) before the next one. */
static void attend_one(const float *q, const float *k_cache, const float *v_cache,
                       const int32_t *table, int64_t len, int64_t h0, int64_t h1, int64_t group,
                       int64_t head_dim, int64_t block_size, int64_t token_stride, float scale,
                       float *scores, float *out) {
    const int64_t block_stride = block_size * token_stride;
    const int64_t heads = (h1 - h0) * group; /* query heads handled here, j = h * group + g */
    /* Pass 1: scores[j * len + t] = scale * q_j . k_t */
    for (int64_t start = 0, i = 0; start < len; start += block_size, ++i) {
        const float *block = k_cache + table[i] * block_stride + h0 * head_dim;
        const int64_t n = len - start < block_size ? len - start : block_size;
        for (int64_t h = 0, j = 0; h < h1 - h0; ++h)
            for (int64_t g = 0; g < group; ++g, ++j) {
                const float *k = block + h * head_dim, *qj = q + j * head_dim;
                float *s = scores + j * len + start;
                for (int64_t t = 0; t < n; ++t, k += token_stride) s[t] = scale * dot(qj, k, head_dim);
            }
    }
    /* Softmax per query head; the normaliser is folded into the weights. */
    for (int64_t j = 0; j < heads; ++j) {
        float *s = scores + j * len;
        float m = s[0];
        for (int64_t t = 1; t < len; ++t) m = s[t] > m ? s[t] : m;
        float sum = 0.0f;
        for (int64_t t = 0; t < len; ++t) {
            s[t] = expf(s[t] - m);
            sum += s[t];
        }
        const float inv = 1.0f / sum;
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
    }
    /* Pass 2: out_j = sum_t p_jt v_t */
    memset(out, 0, sizeof(float) * heads * head_dim);
    for (int64_t start = 0, i = 0; start < len; start += block_size, ++i) {
        const float *block = v_cache + table[i] * block_stride + h0 * head_dim;
        const int64_t n = len - start < block_size ? len - start : block_size;
        for (int64_t h = 0, j = 0; h < h1 - h0; ++h)
            for (int64_t g = 0; g < group; ++g, ++j)
                weighted_rows(out + j * head_dim, scores + j * len + start, block + h * head_dim,
                              n, token_stride, head_dim);
    }
}

/* Returns 0, or -1 when scratch memory could not be allocated. */
int paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                               const int32_t *block_tables, int64_t table_stride,
                               const int32_t *seq_lens, float *out, int64_t num_seqs,
                               int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                               int64_t block_size, float scale, int num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t token_stride = num_kv_heads * head_dim;
    /* A work item is a whole sequence, unless there are too few to keep the threads busy:
       then each KV head is its own item. */
    const int64_t slices = num_seqs >= 2 * num_threads ? 1 : num_kv_heads;
    const int64_t per_slice = num_kv_heads / slices;
    int64_t longest = 1;
    for (int64_t b = 0; b < num_seqs; ++b) longest = seq_lens[b] > longest ? seq_lens[b] : longest;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *scores = (float *)malloc(sizeof(float) * per_slice * group * longest);
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < num_seqs * slices; ++w) {
            if (scores == NULL) continue;
            const int64_t b = w / slices, h0 = (w % slices) * per_slice;
            const int64_t head = b * num_heads + h0 * group;
            attend_one(q + head * head_dim, k_cache, v_cache, block_tables + b * table_stride,
                       seq_lens[b], h0, h0 + per_slice, group, head_dim, block_size,
                       token_stride, scale, scores, out + head * head_dim);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
