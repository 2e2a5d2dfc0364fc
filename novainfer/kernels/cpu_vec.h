/* Eight floats in a vector register for the CPU kernels (GCC/Clang vector extension:
   -march=native makes it AVX on x86 and NEON pairs on Arm), with unaligned loads and
   stores through memcpy (which compiles to one vector move and breaks no aliasing rule). */

#ifndef NOVAINFER_CPU_VEC_H
#define NOVAINFER_CPU_VEC_H

#include <string.h>

typedef float v8f __attribute__((vector_size(32)));

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

#endif
