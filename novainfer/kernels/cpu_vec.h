/* Shared by the CPU kernels: eight floats in a vector register (GCC/Clang vector
   extension: -march=native makes it AVX on x86 and NEON pairs on Arm), with unaligned loads
   and stores through memcpy (which compiles to one vector move and breaks no aliasing rule),
   a horizontal sum, and an exp that the compiler can vectorize. */

#ifndef NOVAINFER_CPU_VEC_H
#define NOVAINFER_CPU_VEC_H

#include <stdint.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32)));

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

static inline float hsum(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* e^x in plain arithmetic, so that GCC vectorizes the loops calling it: glibc declares its
   vector expf only under -ffast-math, which this library must not use (its start-up code
   would switch the whole process to flush-to-zero). Cephes' expf: n = round(x / ln 2),
   e^x = 2^n * e^r with |r| <= ln(2) / 2 by a degree-7 polynomial, about 1 ulp from expf.
   Below -87.3 (so -inf too) the result is 0, NaN stays NaN; above 88.37, 2.4e38. */
static inline float exp_f32(float x) {
    const float lo = -87.3365448f, hi = 88.3762626f; /* keeps n in [-126, 127] */
    const float c = x > hi ? hi : (x < lo ? lo : x);
    /* Adding 1.5 * 2^23 rounds to an integer and leaves it in the low mantissa bits. */
    const float shifted = c * 1.44269504088896341f + 12582912.0f;
    const float n = shifted - 12582912.0f;
    const float r = (c - n * 0.693359375f) + n * 2.12194440e-4f; /* ln 2 in two parts */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    bits = (bits - 0x4B400000u + 127u) << 23; /* the float 2^n */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < lo ? 0.0f : p * scale;
}

#endif
