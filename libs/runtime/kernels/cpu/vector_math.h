/* What the CPU kernels of this folder share: GCC vector extensions of 16 floats (one AVX-512
 * register; elsewhere GCC splits them), a lane select, and the polynomial of their exp2.
 * build.py hashes this header with every source, so changing it rebuilds them all. */

#ifndef DUET_VECTOR_MATH_H
#define DUET_VECTOR_MATH_H

#include <stdint.h>

#define LANES 16 /* floats per vector */

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

/* Lane by lane: yes where mask is all ones, no where it is zero. */
static inline vf select_vec(vi mask, vf yes, vf no) {
    return (vf)((mask & (vi)yes) | (~mask & (vi)no));
}

/* 2^f for f in [-0.5, 0.5]: Cephes exp2f's degree-6 polynomial, relative error ~2e-7. */
static inline vf exp2_poly(vf f) {
    vf poly = f * 1.535336188319500e-4f + 1.339887440266574e-3f;
    poly = poly * f + 9.618437357674640e-3f;
    poly = poly * f + 5.550332471162809e-2f;
    poly = poly * f + 2.402264791363012e-1f;
    poly = poly * f + 6.931472028550421e-1f;
    return poly * f + 1.0f;
}

#endif
