/* The OPIR inverse operator on the CPU: forward and backward in fp32 (inverse_operator.py has
 * the maths, Eq. 11 and 16-19, and the PyTorch reference these are tested against).
 *
 * Why native code: inductor compiles the reference into one fused loop, but that loop keeps
 * the 36 shifted reads and their weights of all channels live at once, spills registers and
 * moves the op's bytes at a quarter of this machine's copy bandwidth. Here each row is cut into
 * blocks of NB pixels. A block's per-pixel quantities (K~, alpha, UM) are computed once into
 * small arrays that stay in L1; then, one SIMD vector of pixels at a time, the 9 taps K~_i stay
 * in registers while every channel and dilation streams past them. The backward keeps the 9
 * gradient accumulators dL/dK~_i in registers the same way, across all channels and dilations,
 * and its image-gradient gather forms each tap's weight alpha_s K~_i once for all channels.
 *
 * Layout: contiguous (B, N, H, W) fp32 planes. Taps outside the image read zero: a tap row
 * outside the image points at a zero row, and the few vectors of a row whose taps cross its left
 * or right edge (or that run past its end) load with a column mask instead (masked lanes read 0
 * and touch no memory), so every pixel takes the vector code. Functions work on rows
 * [row_begin, row_end) of the B*H rows, so the caller can split the rows across threads
 * (native.py does, one ctypes call per thread).
 *
 * SIMD through GCC/Clang vector extensions, so the same source builds for AVX-512, AVX2 or NEON.
 * Compiled at first use by native.py with the system C compiler (-O3 -march=native).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#define VL 16 /* 32 vector registers: the 9 taps and 9 accumulators fit */
#else
#define VL 8
#endif
#define NB 128   /* pixels per block, a multiple of VL */
#define MAX_S 16 /* native.py uses the reference for more scales */

typedef float vf __attribute__((vector_size(VL * sizeof(float))));

static inline vf ld(const float *p) { /* unaligned load */
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void st(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf splat(float x) { return (vf){0} + x; }

/* Output planes are written once and not read again here: where the address is aligned, a
 * non-temporal store skips reading each line in first (a third of the backward's traffic).
 * fence_out() orders them before the function returns. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define STREAM(p, v) _mm512_stream_ps((p), (__m512)(v))
#elif defined(__AVX__)
#include <immintrin.h>
#define STREAM(p, v) _mm256_stream_ps((p), (__m256)(v))
#endif
static inline void st_out(float *p, vf v) {
#ifdef STREAM
    if (((uintptr_t)p & (sizeof(vf) - 1)) == 0) {
        STREAM(p, v);
        return;
    }
#endif
    st(p, v);
}
static inline void fence_out(void) {
#ifdef STREAM
    _mm_sfence();
#endif
}
/* n floats from a block array to an output plane. */
static inline void write_out(float *dst, const float *src, int64_t n) {
    int64_t x = 0;
    for (; x + VL <= n; x += VL) st_out(dst + x, ld(src + x));
    for (; x < n; x++) dst[x] = src[x];
}

/* Software prefetch of every input plane, PF_AHEAD blocks ahead, into L2 (prefetcht1): the
 * ~30 planes a kernel streams at once are more than the hardware prefetchers keep ahead of, and
 * the tap loops stalled on those misses. Into L1 (prefetcht0) evicted the block arrays; on the
 * AMD EPYC of bench/results this took the 1920x1080 forward from 34 to 27 ms and the backward
 * from 80 to 71 ms. Addresses run on linearly, so the last blocks of a row fetch the next
 * row's first ones. */
#ifndef PF_AHEAD
#define PF_AHEAD 2
#endif
#ifndef PF_LEVEL
#define PF_LEVEL 2
#endif
/* Requests the NB floats PF_AHEAD blocks ahead of p. */
static inline void prefetch_ahead(const float *p) {
    for (int64_t x = PF_AHEAD * NB; x < (PF_AHEAD + 1) * NB; x += 64 / sizeof(float))
        __builtin_prefetch(p + x, 0, PF_LEVEL);
}

static const int TAP_DY[9] = {-1, -1, -1, 0, 0, 0, 1, 1, 1};
static const int TAP_DX[9] = {-1, 0, 1, -1, 0, 1, -1, 0, 1};

/* exp(x) for -87 <= x <= 0 (softmax after subtracting the max; the caller clamps), written so
 * that it vectorises: the libm call does not, and neither does a branch or clamp in here.
 * x = n ln2 + r with |r| <= ln2 / 2; e^r from its degree-7 Taylor polynomial (relative error
 * < 1e-7), times 2^n built in the exponent bits. The clamp makes e^x for x < -87 come out as
 * e^-87 ~ 1.6e-38 rather than smaller: nothing at fp32 precision beside the max's e^0 = 1. */
static inline float exp_nonpositive(float x) {
    const int32_t ni = (int32_t)(x * 1.44269504088896341f - 0.5f); /* round(x / ln2), x <= 0 */
    const float n = (float)ni;
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f; /* ln2 split hi + lo */
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = (ni + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* K~ = K * m (Eq. 19) and alpha = softmax(logits) (Eq. 18) for the n pixels of one block. */
static void block_taps_and_alpha(const float *kernel_px, const float *mod_px, const float *logit_px,
                                 int64_t hw, int64_t S, int64_t n, float kt[9][NB],
                                 float alpha[MAX_S][NB]) {
    for (int i = 0; i < 9; i++) {
        prefetch_ahead(kernel_px + i * hw);
        if (mod_px) prefetch_ahead(mod_px + i * hw);
    }
    for (int64_t s = 0; s < S; s++) prefetch_ahead(logit_px + s * hw);
    for (int i = 0; i < 9; i++) {
        const float *k = kernel_px + i * hw;
        if (mod_px) {
            const float *m = mod_px + i * hw;
            for (int64_t x = 0; x < n; x++) kt[i][x] = k[x] * m[x];
        } else {
            for (int64_t x = 0; x < n; x++) kt[i][x] = k[x];
        }
    }
    float top[NB], total[NB];
    for (int64_t x = 0; x < n; x++) top[x] = logit_px[x];
    for (int64_t s = 1; s < S; s++) {
        const float *l = logit_px + s * hw;
        for (int64_t x = 0; x < n; x++) top[x] = l[x] > top[x] ? l[x] : top[x];
    }
    for (int64_t x = 0; x < n; x++) total[x] = 0.0f;
    for (int64_t s = 0; s < S; s++) {
        const float *l = logit_px + s * hw;
        float *a = alpha[s];
        for (int64_t x = 0; x < n; x++) {
            const float v = l[x] - top[x];
            a[x] = v > -87.0f ? v : -87.0f; /* a loop of its own, or neither vectorises */
        }
        for (int64_t x = 0; x < n; x++) {
            const float e = exp_nonpositive(a[x]);
            a[x] = e;
            total[x] += e;
        }
    }
    for (int64_t x = 0; x < n; x++) total[x] = 1.0f / total[x];
    for (int64_t s = 0; s < S; s++)
        for (int64_t x = 0; x < n; x++) alpha[s][x] *= total[x];
}

/* The rows y - d, y, y + d of a plane (sign -1: y + d, y, y - d, the sources of a gather),
 * each pointing at its column 0, or at the zero row (`zero` holds at least W + 2 max(d) zeros
 * and points max(d) in) where the row is outside the image. Tap i = (dy, dx) of pixel x then
 * reads r[dy + 1][x + sign d dx]. */
static inline void row_pointers(const float *plane, const float *zero, int64_t y, int64_t d,
                                int64_t H, int64_t W, int sign, const float *r[3]) {
    for (int m = 0; m < 3; m++) {
        const int64_t yy = y + sign * d * (m - 1);
        r[m] = yy >= 0 && yy < H ? plane + yy * W : zero;
    }
}

/* The VL floats at p, which hold columns col .. col + VL - 1 of a row; lanes whose column is
 * outside [0, W) read 0 and their memory is not touched (it may lie outside the tensor). */
static inline vf ld_cols(const float *p, int64_t col, int64_t W) {
    int64_t lo = -col, hi = W - col; /* the lanes [lo, hi) are inside the row */
    lo = lo < 0 ? 0 : (lo > VL ? VL : lo);
    hi = hi < lo ? lo : (hi > VL ? VL : hi);
#if defined(__AVX512F__)
    const __mmask16 m = (__mmask16)(((1u << hi) - 1u) & ~((1u << lo) - 1u));
    return (vf)_mm512_maskz_loadu_ps(m, p);
#else
    vf v = splat(0.0f);
    for (int64_t l = lo; l < hi; l++) v[l] = p[l];
    return v;
#endif
}

/* Loads of tap data in the vector loops: plain, or column-masked in an edge vector. */
#define LD(p, col) (edge ? ld_cols((p), (col), W) : ld(p))

/* Whether the vector of columns xc .. xc + VL - 1 needs masked loads: a tap up to dmax columns
 * away leaves the row, or the vector runs past its end. */
static inline int edge_vector(int64_t xc, int64_t dmax, int64_t W) {
    return xc - dmax < 0 || xc + VL + dmax > W;
}

/* Stores the first `count` lanes (all VL: st_out). */
static inline void st_part(float *p, vf v, int64_t count) {
    if (count >= VL) {
        st_out(p, v);
        return;
    }
    for (int64_t l = 0; l < count; l++) p[l] = v[l];
}

static int64_t max_dilation(const int64_t *dil, int64_t S) {
    int64_t m = 0;
    for (int64_t s = 0; s < S; s++) m = dil[s] > m ? dil[s] : m;
    return m;
}

/* One vector of output pixels, channel `plane` (Eq. 16-18): the 9 taps K~_i stay in registers
 * while the S dilations stream past them. `edge` is a constant at each call, so the compiler
 * makes a plain and a masked copy of the loop body. */
static inline __attribute__((always_inline)) vf
forward_vector(const float kt[9][NB], const float alpha[MAX_S][NB], const float *bc,
               const float *const rows[MAX_S][3], const int64_t *dil, int64_t S, int64_t W, int64_t x,
               int64_t xc, const int edge) {
    const vf k0 = ld(kt[0] + x), k1 = ld(kt[1] + x), k2 = ld(kt[2] + x), k3 = ld(kt[3] + x),
             k4 = ld(kt[4] + x), k5 = ld(kt[5] + x), k6 = ld(kt[6] + x), k7 = ld(kt[7] + x),
             k8 = ld(kt[8] + x);
    vf acc = bc ? LD(bc + xc, xc) : splat(0.0f);
    for (int64_t s = 0; s < S; s++) {
        const int64_t d = dil[s], xl = xc - d, xr = xc + d;
        const float *r0 = rows[s][0], *r1 = rows[s][1], *r2 = rows[s][2];
        const vf j = k0 * LD(r0 + xl, xl) + k1 * LD(r0 + xc, xc) + k2 * LD(r0 + xr, xr)
                   + k3 * LD(r1 + xl, xl) + k4 * LD(r1 + xc, xc) + k5 * LD(r1 + xr, xr)
                   + k6 * LD(r2 + xl, xl) + k7 * LD(r2 + xc, xc) + k8 * LD(r2 + xr, xr);
        acc += ld(alpha[s] + x) * j;
    }
    return acc;
}

void opir_inverse_operator_forward(const float *image, const float *kernel, const float *mod,
                                   const float *logits, const float *bias, const int64_t *dil,
                                   int64_t S, int64_t C, int64_t H, int64_t W, const float *zero,
                                   float *out, float *um, int64_t row_begin, int64_t row_end) {
    const int64_t hw = H * W, dmax = max_dilation(dil, S);
    float kt[9][NB], alpha[MAX_S][NB];
    const float *rows[MAX_S][3];
    for (int64_t row = row_begin; row < row_end; row++) {
        const int64_t b = row / H, y = row % H;
        for (int64_t xb = 0; xb < W; xb += NB) {
            const int64_t n = W - xb < NB ? W - xb : NB, px = y * W + xb;
            block_taps_and_alpha(kernel + b * 9 * hw + px, mod ? mod + b * 9 * hw + px : 0,
                                 logits + b * S * hw + px, hw, S, n, kt, alpha);
            float u[NB]; /* Eq. 11 */
            for (int64_t x = 0; x < n; x++) {
                float a = 0.0f;
                for (int i = 0; i < 9; i++) a += kt[i][x] < 0.0f ? -kt[i][x] : kt[i][x];
                u[x] = a / 9.0f;
            }
            write_out(um + b * hw + px, u, n);
            for (int64_t c = 0; c < C; c++) {
                const float *bc = bias ? bias + (b * C + c) * hw + y * W : 0; /* column 0 */
                if (bc) prefetch_ahead(bc + xb);
                if (y + dmax < H) prefetch_ahead(image + (b * C + c) * hw + (y + dmax) * W + xb);
                float *oc = out + (b * C + c) * hw + px;
                for (int64_t s = 0; s < S; s++)
                    row_pointers(image + (b * C + c) * hw, zero, y, dil[s], H, W, 1, rows[s]);
                for (int64_t x = 0; x < n; x += VL) {
                    const int64_t xc = xb + x;
                    if (edge_vector(xc, dmax, W))
                        st_part(oc + x,
                                forward_vector(kt, alpha, bc, rows, dil, S, W, x, xc, 1), n - x);
                    else
                        st_out(oc + x, forward_vector(kt, alpha, bc, rows, dil, S, W, x, xc, 0));
                }
            }
        }
    }
    fence_out();
}

/* ---- Backward ----------------------------------------------------------------------------
 * One pass over the rows. For output pixel p (g = dL/d out, gu = dL/d UM):
 *   dK~_i = sum_c g_c sum_s alpha_s I_c(p + d_s delta_i) + gu sign(K~_i) / 9
 *   dalpha_s = sum_c g_c J_s,c;  dlogit_s = alpha_s (dalpha_s - sum_t alpha_t dalpha_t)
 *   dK = dK~ m, dm = dK~ K
 * and the image gradient as a gather (no atomics): pixel q receives alpha_s(p) K~_i(p) g_c(p)
 * from every p = q - d_s delta_i inside the image. The gather for row q reads K~ and alpha of
 * rows q - dmax .. q + dmax, so those are kept in a ring of 2 dmax + 1 rows rather than written
 * out as planes: row r's K~ and alpha are computed once, used for its own gradients, and the
 * gather of row r - dmax runs as soon as row r is in the ring. */

typedef struct {
    int64_t rows, stride, S; /* ring rows, floats per line (W), scales */
    float *data;             /* rows x (9 + S) lines; line 0..8 K~_i, 9.. alpha_s */
    /* Scratch allocated with the ring, C entries each: column-0 row pointers (row_pointers)
     * of the image around the row being differentiated, and of g around the row gathered. */
    const float *(*image_rows)[MAX_S][3], *(*g_rows)[MAX_S][3];
} ring_t;

static inline float *ring_line(const ring_t *ring, int64_t y, int64_t line) {
    return ring->data + ((y % ring->rows) * (9 + ring->S) + line) * ring->stride;
}

/* One vector of pixels' dK~_i and dalpha_s. The 9 dK~_i accumulate in registers over every
 * channel and dilation (started from the UM term in dkt, stored back at the end); J_s is
 * rebuilt tap by tap from the same loads (cheaper than storing it in the forward). */
static inline __attribute__((always_inline)) void
backward_vector(const float kt[9][NB], const float alpha[MAX_S][NB], float dkt[9][NB],
                float dal[MAX_S][NB], const float *g_row, int64_t hw,
                const float *const rows[][MAX_S][3], const int64_t *dil, int64_t S, int64_t C,
                int64_t W, int64_t x, int64_t xc, const int edge) {
    const vf k0 = ld(kt[0] + x), k1 = ld(kt[1] + x), k2 = ld(kt[2] + x), k3 = ld(kt[3] + x),
             k4 = ld(kt[4] + x), k5 = ld(kt[5] + x), k6 = ld(kt[6] + x), k7 = ld(kt[7] + x),
             k8 = ld(kt[8] + x);
    vf d0 = ld(dkt[0] + x), d1 = ld(dkt[1] + x), d2 = ld(dkt[2] + x), d3 = ld(dkt[3] + x),
       d4 = ld(dkt[4] + x), d5 = ld(dkt[5] + x), d6 = ld(dkt[6] + x), d7 = ld(dkt[7] + x),
       d8 = ld(dkt[8] + x);
    for (int64_t s = 0; s < S; s++) {
        const int64_t d = dil[s], xl = xc - d, xr = xc + d;
        const vf a = ld(alpha[s] + x);
        vf da = splat(0.0f);
        for (int64_t c = 0; c < C; c++) {
            const float *r0 = rows[c][s][0], *r1 = rows[c][s][1], *r2 = rows[c][s][2];
            const vf gv = LD(g_row + c * hw + xc, xc), ga = gv * a;
            vf v, j;
            v = LD(r0 + xl, xl); j = k0 * v; d0 += ga * v;
            v = LD(r0 + xc, xc); j += k1 * v; d1 += ga * v;
            v = LD(r0 + xr, xr); j += k2 * v; d2 += ga * v;
            v = LD(r1 + xl, xl); j += k3 * v; d3 += ga * v;
            v = LD(r1 + xc, xc); j += k4 * v; d4 += ga * v;
            v = LD(r1 + xr, xr); j += k5 * v; d5 += ga * v;
            v = LD(r2 + xl, xl); j += k6 * v; d6 += ga * v;
            v = LD(r2 + xc, xc); j += k7 * v; d7 += ga * v;
            v = LD(r2 + xr, xr); j += k8 * v; d8 += ga * v;
            da += gv * j;
        }
        st(dal[s] + x, da);
    }
    st(dkt[0] + x, d0); st(dkt[1] + x, d1); st(dkt[2] + x, d2);
    st(dkt[3] + x, d3); st(dkt[4] + x, d4); st(dkt[5] + x, d5);
    st(dkt[6] + x, d6); st(dkt[7] + x, d7); st(dkt[8] + x, d8);
}

/* Row y of image b: K~ and alpha into the ring; with `grads`, also dK, dm and dlogits. */
static void backward_row(const float *g, const float *gu, const float *image, const float *kernel,
                         const float *mod, const float *logits, const int64_t *dil, int64_t S,
                         int64_t C, int64_t H, int64_t W, int64_t dmax, const float *zero,
                         float *g_kernel, float *g_mod, float *g_logits, const ring_t *ring,
                         int64_t b, int64_t y, int grads) {
    const int64_t hw = H * W;
    float kt[9][NB], alpha[MAX_S][NB], dkt[9][NB], dal[MAX_S][NB];
    const float *(*rows)[MAX_S][3] = ring->image_rows;
    for (int64_t c = 0; c < C; c++)
        for (int64_t s = 0; s < S; s++)
            row_pointers(image + (b * C + c) * hw, zero, y, dil[s], H, W, 1, rows[c][s]);
    const float *g_row = g + b * C * hw + y * W; /* channel 0, column 0 */
    for (int64_t xb = 0; xb < W; xb += NB) {
        const int64_t n = W - xb < NB ? W - xb : NB, px = y * W + xb;
        block_taps_and_alpha(kernel + b * 9 * hw + px, mod ? mod + b * 9 * hw + px : 0,
                             logits + b * S * hw + px, hw, S, n, kt, alpha);
        for (int i = 0; i < 9; i++) memcpy(ring_line(ring, y, i) + xb, kt[i], n * sizeof(float));
        for (int64_t s = 0; s < S; s++)
            memcpy(ring_line(ring, y, 9 + s) + xb, alpha[s], n * sizeof(float));
        if (!grads) continue;
        const float *gu_px = gu + b * hw + px;
        prefetch_ahead(gu_px);
        for (int64_t c = 0; c < C; c++) { /* image row y + dmax enters the taps here */
            prefetch_ahead(g_row + c * hw + xb);
            if (y + dmax < H) prefetch_ahead(image + (b * C + c) * hw + (y + dmax) * W + xb);
        }
        float gu9[NB]; /* gu sign / 9 == sign (gu / 9) exactly: one division per pixel */
        for (int64_t x = 0; x < n; x++) gu9[x] = gu_px[x] / 9.0f;
        for (int i = 0; i < 9; i++)
            for (int64_t x = 0; x < n; x++) {
                const float k = kt[i][x];
                dkt[i][x] = (float)((k > 0.0f) - (k < 0.0f)) * gu9[x];
            }
        for (int64_t x = 0; x < n; x += VL) {
            const int64_t xc = xb + x;
            if (edge_vector(xc, dmax, W))
                backward_vector(kt, alpha, dkt, dal, g_row, hw, rows, dil, S, C, W, x, xc, 1);
            else
                backward_vector(kt, alpha, dkt, dal, g_row, hw, rows, dil, S, C, W, x, xc, 0);
        }
        float dot[NB];
        memset(dot, 0, n * sizeof(float));
        for (int64_t s = 0; s < S; s++)
            for (int64_t x = 0; x < n; x++) dot[x] += alpha[s][x] * dal[s][x];
        float t1[NB], t2[NB];
        for (int64_t s = 0; s < S; s++) {
            for (int64_t x = 0; x < n; x++) t1[x] = alpha[s][x] * (dal[s][x] - dot[x]);
            write_out(g_logits + (b * S + s) * hw + px, t1, n);
        }
        for (int i = 0; i < 9; i++) {
            if (mod) {
                const float *m = mod + (b * 9 + i) * hw + px;
                const float *k = kernel + (b * 9 + i) * hw + px;
                for (int64_t x = 0; x < n; x++) {
                    t1[x] = dkt[i][x] * m[x];
                    t2[x] = dkt[i][x] * k[x];
                }
                write_out(g_kernel + (b * 9 + i) * hw + px, t1, n);
                write_out(g_mod + (b * 9 + i) * hw + px, t2, n);
            } else {
                write_out(g_kernel + (b * 9 + i) * hw + px, dkt[i], n);
            }
        }
    }
}

/* One vector of the image gradient of channels c0 .. c0 + nc - 1 (nc <= 4): each tap's weight
 * alpha_s K~_i at its source pixel is formed once and serves every channel of the group. */
static inline __attribute__((always_inline)) void
gather_vector(const float *const pk[MAX_S][9], const float *const pa[MAX_S][9],
              const float *const g_rows[][MAX_S][3], const int64_t *dil, int64_t S, int64_t W,
              int64_t c0, int64_t nc, int64_t xc, vf acc[4], const int edge) {
    acc[0] = acc[1] = acc[2] = acc[3] = splat(0.0f);
    for (int64_t s = 0; s < S; s++) {
        const int64_t d = dil[s];
#pragma GCC unroll 9
        for (int i = 0; i < 9; i++) {
            const int64_t col = xc - d * TAP_DX[i], m = TAP_DY[i] + 1;
            const vf w = LD(pa[s][i] + col, col) * LD(pk[s][i] + col, col);
            acc[0] += w * LD(g_rows[c0][s][m] + col, col);
            if (nc > 1) acc[1] += w * LD(g_rows[c0 + 1][s][m] + col, col);
            if (nc > 2) acc[2] += w * LD(g_rows[c0 + 2][s][m] + col, col);
            if (nc > 3) acc[3] += w * LD(g_rows[c0 + 3][s][m] + col, col);
        }
    }
}

/* Row q of image b's image gradient, gathered from the ring (rows q - dmax .. q + dmax). */
static void gather_row(const float *g, const int64_t *dil, int64_t S, int64_t C, int64_t H,
                       int64_t W, int64_t dmax, const float *zero, float *g_image,
                       const ring_t *ring, int64_t b, int64_t q) {
    const int64_t hw = H * W;
    /* Column-0 pointers of the source rows q - d_s dy: K~_i and alpha_s in the ring, g per
     * channel; the zero row (where w = 0) for a source row outside the image. */
    const float *pk[MAX_S][9], *pa[MAX_S][9], *(*g_rows)[MAX_S][3] = ring->g_rows;
    for (int64_t s = 0; s < S; s++) {
        for (int i = 0; i < 9; i++) {
            const int64_t yy = q - dil[s] * TAP_DY[i];
            const int valid = yy >= 0 && yy < H;
            pk[s][i] = valid ? ring_line(ring, yy, i) : zero;
            pa[s][i] = valid ? ring_line(ring, yy, 9 + s) : zero;
        }
        for (int64_t c = 0; c < C; c++)
            row_pointers(g + (b * C + c) * hw, zero, q, dil[s], H, W, -1, g_rows[c][s]);
    }
    for (int64_t c0 = 0; c0 < C; c0 += 4) {
        const int64_t nc = C - c0 < 4 ? C - c0 : 4;
        for (int64_t xc = 0; xc < W; xc += VL) {
            vf acc[4];
            const int edge = edge_vector(xc, dmax, W);
            if (edge)
                gather_vector(pk, pa, g_rows, dil, S, W, c0, nc, xc, acc, 1);
            else
                gather_vector(pk, pa, g_rows, dil, S, W, c0, nc, xc, acc, 0);
            for (int64_t c = 0; c < nc; c++) {
                float *gi = g_image + (b * C + c0 + c) * hw + q * W + xc;
                if (edge)
                    st_part(gi, acc[c], W - xc);
                else
                    st_out(gi, acc[c]);
            }
        }
    }
}

/* Returns 0, or -1 when the ring could not be allocated (nothing is then written). */
int opir_inverse_operator_backward(const float *g, const float *gu, const float *image,
                                   const float *kernel, const float *mod, const float *logits,
                                   const int64_t *dil, int64_t S, int64_t C, int64_t H, int64_t W,
                                   const float *zero, float *g_image, float *g_kernel,
                                   float *g_mod, float *g_logits, int64_t row_begin,
                                   int64_t row_end) {
    const int64_t dmax = max_dilation(dil, S);
    ring_t ring = {2 * dmax + 1, W, S, 0, 0, 0};
    ring.data = malloc(sizeof(float) * ring.rows * (9 + S) * ring.stride);
    ring.image_rows = malloc(sizeof(*ring.image_rows) * C);
    ring.g_rows = malloc(sizeof(*ring.g_rows) * C);
    if (!ring.data || !ring.image_rows || !ring.g_rows) {
        free(ring.data);
        free(ring.image_rows);
        free(ring.g_rows);
        return -1;
    }
    for (int64_t first = row_begin; first < row_end;) {
        /* the rows of one image in [row_begin, row_end): output rows [y0, y1) of image b */
        const int64_t b = first / H, y0 = first % H;
        const int64_t y1 = (b + 1) * H < row_end ? H : row_end - b * H;
        const int64_t r0 = y0 - dmax > 0 ? y0 - dmax : 0, r1 = y1 + dmax < H ? y1 + dmax : H;
        for (int64_t r = r0; r < r1; r++) {
            backward_row(g, gu, image, kernel, mod, logits, dil, S, C, H, W, dmax, zero,
                         g_kernel, g_mod, g_logits, &ring, b, r, r >= y0 && r < y1);
            const int64_t q = r - dmax; /* its sources q - dmax .. r are all in the ring */
            if (q >= y0 && q < y1)
                gather_row(g, dil, S, C, H, W, dmax, zero, g_image, &ring, b, q);
        }
        /* rows whose sources end at the image's last row */
        for (int64_t q = (r1 - dmax > y0 ? r1 - dmax : y0); q < y1; q++)
            gather_row(g, dil, S, C, H, W, dmax, zero, g_image, &ring, b, q);
        first = b * H + y1;
    }
    free(ring.data);
    free(ring.image_rows);
    free(ring.g_rows);
    fence_out();
    return 0;
}
