/* The NAFBlock's element-wise work on the CPU, forward and backward in fp32: its LayerNorm over
 * channels with the residual before it (layer_norm.py has the maths and the PyTorch reference
 * these are tested against), and its SimpleGate with the channel attention's mean
 * (gate.py likewise).
 *
 * Why native code for the norm: on a channels-last map each pixel's C channels (16 to 256 in
 * the KPN) are one short contiguous row, and PyTorch's LayerNorm pays a row's overhead for every
 * pixel (about a sixth of copy bandwidth at C = 16), then `addcmul` reads the map again for the
 * residual. Here one pass per pixel forms the residual v = x + y * scale, its mean and variance,
 * and the normalised output, with the channels in SIMD vectors; the backward is one pass as
 * well, with the weight, bias and scale gradients summed per call into the caller's partial
 * rows.
 *
 * The gate y = a * b (a, b the two channel halves of the 2C-channel map u) reads u's halves
 * strided and writes y in one pass, adding y's channel sums per image on the way (the channel
 * attention's mean, which PyTorch reads in a second pass). Its backward writes both halves of
 * du in one pass, the mean's gradient folded in, where PyTorch multiplies twice, adds the
 * mean's broadcast gradient, then concatenates the halves.
 *
 * Layout: (P, C) fp32 rows, P = B*H*W pixels, C contiguous (a channels-last map). The pixels are
 * split across threads with OpenMP. native.py builds with -fopenmp where the compiler has it,
 * and the library then shares the OpenMP runtime PyTorch has loaded (same soname): its threads
 * are the ones PyTorch's operators use, already awake between them. Python threads here (as the
 * op's kernels use) measured slower than PyTorch's own LayerNorm inside the model, because each
 * call's second half ran on a core where PyTorch's OpenMP thread was still spinning after the
 * convolution before it. Without OpenMP the pragmas are ignored and one thread does it all.
 * The parameter gradients are summed per thread into the caller's rows (parts x C), then by
 * the caller in a fixed order, so they do not depend on scheduling.
 *
 * Maps may be bfloat16 (bit i of each entry point's `half` says which argument is): what bf16
 * autocast hands the kernels, its convolutions' outputs and the gradients that flow back into
 * them. They are widened to fp32 on load and rounded to nearest even on store, as PyTorch
 * rounds; all arithmetic, the statistics and the parameter gradients stay fp32. Reading and
 * writing half the bytes is the point: the kernels are bound by memory, not arithmetic.
 *
 * SIMD through GCC/Clang vector extensions, so the same source builds for AVX-512, AVX2 or NEON;
 * C a multiple of the vector length takes the vector code, any other C a scalar loop. Sums over
 * channels add lane by lane, then the lanes in a fixed order: results do not depend on threads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define LN_MIN_PIXELS 4096 /* per thread: below this a second thread costs more than it saves */

#if defined(__AVX512F__)
#define LN_VL 16
#else
#define LN_VL 8
#endif

typedef float lnv __attribute__((vector_size(LN_VL * sizeof(float))));

static inline lnv ln_ld(const float *p) {
    lnv v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void ln_st(float *p, lnv v) { memcpy(p, &v, sizeof v); }

static inline lnv ln_splat(float x) { return (lnv){0} + x; }

typedef uint16_t lnh __attribute__((vector_size(LN_VL * sizeof(uint16_t))));
typedef uint32_t lnu __attribute__((vector_size(LN_VL * sizeof(uint32_t))));

/* bf16 is the top half of an fp32: widening is a shift */
static inline float bf_get(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as c10::BFloat16 does; a NaN stays a NaN (0x7FC0) */
static inline uint16_t bf_put(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* Element i of a map that is fp32, or bf16 where `half` */
static inline float map_get(const void *p, int64_t i, int half) {
    return half ? bf_get(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void map_put(void *p, int64_t i, int half, float f) {
    if (half)
        ((uint16_t *)p)[i] = bf_put(f);
    else
        ((float *)p)[i] = f;
}

/* LN_VL elements of a map from element i */
static inline lnv map_ld(const void *p, int64_t i, int half) {
    if (!half) return ln_ld((const float *)p + i);
    lnh h;
    memcpy(&h, (const uint16_t *)p + i, sizeof h);
    const lnu u = __builtin_convertvector(h, lnu) << 16;
    lnv v;
    memcpy(&v, &u, sizeof v);
    return v;
}

static inline void map_st(void *p, int64_t i, int half, lnv v) {
    if (!half) {
        ln_st((float *)p + i, v);
        return;
    }
    lnu u;
    memcpy(&u, &v, sizeof u);
    const lnu nan = (lnu)((u & 0x7FFFFFFFu) > 0x7F800000u); /* all ones where NaN */
    const lnu rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const lnh h = __builtin_convertvector((nan & 0x7FC0u) | (~nan & rounded), lnh);
    memcpy((uint16_t *)p + i, &h, sizeof h);
}

static inline float ln_hsum(lnv v) {
    float s = 0.0f;
    for (int l = 0; l < LN_VL; ++l) s += v[l];
    return s;
}

/* Which maps are bf16: bits of `half`, in the order of each entry point's map arguments */
#define HALF(bit) ((half >> (bit)) & 1)

/* The range functions are inlined into each caller twice, once with `half` the constant 0: the
 * fp32 code then has no dtype branches left, so the compiler forms (and fuses) its arithmetic
 * exactly as it did before bf16 maps existed, and fp32 results stay bit for bit the same. */
#define SPECIALISED static inline __attribute__((always_inline))
#define BY_HALF(call)                                                                      \
    do {                                                                                   \
        if (half) {                                                                        \
            call;                                                                          \
        } else {                                                                           \
            int half = 0; /* shadows the argument: the call below sees a constant */       \
            call;                                                                          \
        }                                                                                  \
    } while (0)

/* v at element i: x + y scale, rounded to bf16 where v is stored so (hv), so that the norm and
 * its backward read the same v */
static inline float v_at(const void *x, const void *y, const float *scale, int64_t i, int64_t k,
                         int hx, int hy, int hv) {
    if (!y) return map_get(x, i, hx);
    const float t = map_get(x, i, hx) + map_get(y, i, hy) * scale[k];
    return hv ? bf_get(bf_put(t)) : t;
}

/* v = x + y * scale (y NULL: v = x), n = (v - mean) rstd weight + bias; out_v written only when
 * y is given (v is x otherwise); mean and rstd per pixel, for the backward. half: x, y, out_v,
 * out_n. */
SPECIALISED void forward_range(const void *x, const void *y, const float *scale,
                               const float *weight, const float *bias, float eps, int64_t C,
                               void *out_v, void *out_n, float *mean, float *rstd, int half,
                               int64_t begin, int64_t end) {
    const float inv_c = 1.0f / (float)C;
    const int hx = HALF(0), hy = HALF(1), hv = HALF(2), hn = HALF(3);
    if (C % LN_VL == 0 && C <= 512) {
        const int64_t nv = C / LN_VL;
        lnv v[512 / LN_VL];
        for (int64_t p = begin; p < end; ++p) {
            const int64_t o = p * C;
            lnv acc = {0};
            for (int64_t k = 0; k < nv; ++k) {
                lnv t = map_ld(x, o + k * LN_VL, hx);
                if (y) {
                    t += map_ld(y, o + k * LN_VL, hy) * ln_ld(scale + k * LN_VL);
                    map_st(out_v, o + k * LN_VL, hv, t);
                    if (hv) t = map_ld(out_v, o + k * LN_VL, hv); /* as stored */
                }
                v[k] = t;
                acc += t;
            }
            const float m = ln_hsum(acc) * inv_c;
            const lnv mv = ln_splat(m);
            lnv sq = {0};
            for (int64_t k = 0; k < nv; ++k) {
                const lnv d = v[k] - mv;
                sq += d * d;
            }
            const float r = 1.0f / sqrtf(ln_hsum(sq) * inv_c + eps);
            const lnv rv = ln_splat(r);
            for (int64_t k = 0; k < nv; ++k)
                map_st(out_n, o + k * LN_VL, hn,
                       (v[k] - mv) * rv * ln_ld(weight + k * LN_VL) + ln_ld(bias + k * LN_VL));
            mean[p] = m;
            rstd[p] = r;
        }
        return;
    }
    for (int64_t p = begin; p < end; ++p) {
        const int64_t o = p * C;
        float s = 0.0f;
        for (int64_t k = 0; k < C; ++k) {
            const float t = v_at(x, y, scale, o + k, k, hx, hy, hv);
            if (y) map_put(out_v, o + k, hv, t);
            s += t;
        }
        const float m = s * inv_c;
        float q = 0.0f;
        for (int64_t k = 0; k < C; ++k) {
            const float t = v_at(x, y, scale, o + k, k, hx, hy, hv);
            q += (t - m) * (t - m);
        }
        const float r = 1.0f / sqrtf(q * inv_c + eps);
        for (int64_t k = 0; k < C; ++k)
            map_put(out_n, o + k, hn, (v_at(x, y, scale, o + k, k, hx, hy, hv) - m) * r * weight[k] +
                                          bias[k]);
        mean[p] = m;
        rstd[p] = r;
    }
}

/* Gradients of the forward: g_n (and g_v, the gradient reaching v directly, or NULL) in;
 * g_x = dL/dv; g_y = dL/dv scale when y is given; the weight, bias and scale gradients of
 * pixels [begin, end) added into part_w, part_b, part_scale (C each). v is out_v (or x).
 * half: g_n, g_v, v, y, g_x, g_y. */
SPECIALISED void backward_range(const void *g_n, const void *g_v, const void *v,
                                const float *mean, const float *rstd, const float *weight,
                                const void *y, const float *scale, int64_t C, void *g_x,
                                void *g_y, float *part_w, float *part_b, float *part_scale,
                                int half, int64_t begin, int64_t end) {
    const float inv_c = 1.0f / (float)C;
    const int hgn = HALF(0), hgv = HALF(1), hv = HALF(2), hy = HALF(3), hgx = HALF(4),
              hgy = HALF(5);
    if (C % LN_VL == 0 && C <= 512) {
        const int64_t nv = C / LN_VL;
        lnv acc_w[512 / LN_VL], acc_b[512 / LN_VL], acc_s[512 / LN_VL];
        lnv xh[512 / LN_VL], gh[512 / LN_VL];
        for (int64_t k = 0; k < nv; ++k) acc_w[k] = acc_b[k] = acc_s[k] = (lnv){0};
        for (int64_t p = begin; p < end; ++p) {
            const int64_t o = p * C;
            const lnv mv = ln_splat(mean[p]), rv = ln_splat(rstd[p]);
            lnv sa = {0}, sb = {0};
            for (int64_t k = 0; k < nv; ++k) {
                const lnv gn = map_ld(g_n, o + k * LN_VL, hgn);
                xh[k] = (map_ld(v, o + k * LN_VL, hv) - mv) * rv;
                gh[k] = gn * ln_ld(weight + k * LN_VL);
                sa += gh[k];
                sb += gh[k] * xh[k];
                acc_w[k] += gn * xh[k];
                acc_b[k] += gn;
            }
            const lnv a = ln_splat(ln_hsum(sa) * inv_c), b = ln_splat(ln_hsum(sb) * inv_c);
            for (int64_t k = 0; k < nv; ++k) {
                lnv d = rv * (gh[k] - a - xh[k] * b);
                if (g_v) d += map_ld(g_v, o + k * LN_VL, hgv);
                map_st(g_x, o + k * LN_VL, hgx, d);
                if (y) {
                    map_st(g_y, o + k * LN_VL, hgy, d * ln_ld(scale + k * LN_VL));
                    acc_s[k] += d * map_ld(y, o + k * LN_VL, hy);
                }
            }
        }
        for (int64_t k = 0; k < nv; ++k) {
            ln_st(part_w + k * LN_VL, ln_ld(part_w + k * LN_VL) + acc_w[k]);
            ln_st(part_b + k * LN_VL, ln_ld(part_b + k * LN_VL) + acc_b[k]);
            if (y) ln_st(part_scale + k * LN_VL, ln_ld(part_scale + k * LN_VL) + acc_s[k]);
        }
        return;
    }
    for (int64_t p = begin; p < end; ++p) {
        const int64_t o = p * C;
        const float m = mean[p], r = rstd[p];
        float sa = 0.0f, sb = 0.0f;
        for (int64_t k = 0; k < C; ++k) {
            const float gn = map_get(g_n, o + k, hgn);
            const float xh = (map_get(v, o + k, hv) - m) * r, gh = gn * weight[k];
            sa += gh;
            sb += gh * xh;
            part_w[k] += gn * xh;
            part_b[k] += gn;
        }
        sa *= inv_c;
        sb *= inv_c;
        for (int64_t k = 0; k < C; ++k) {
            const float xh = (map_get(v, o + k, hv) - m) * r;
            float d = r * (map_get(g_n, o + k, hgn) * weight[k] - sa - xh * sb);
            if (g_v) d += map_get(g_v, o + k, hgv);
            map_put(g_x, o + k, hgx, d);
            if (y) {
                map_put(g_y, o + k, hgy, d * scale[k]);
                part_scale[k] += d * map_get(y, o + k, hy);
            }
        }
    }
}
static int threads_for(int64_t pixels, int parts) {
    int64_t n = pixels / LN_MIN_PIXELS;
    if (n > parts) n = parts;
    return n < 1 ? 1 : (int)n;
}

/* This thread's share [*begin, *end) of pixels [0, P), inside a parallel region; returns the
 * thread's number. */
static int thread_share(int64_t P, int64_t *begin, int64_t *end) {
    int t = 0, n = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    n = omp_get_num_threads();
#endif
    *begin = P * t / n;
    *end = P * (t + 1) / n;
    return t;
}

/* Pixels [0, P) over at most `parts` threads; half: x, y, out_v, out_n. */
void opir_layer_norm_forward(const void *x, const void *y, const float *scale, const float *weight,
                             const float *bias, float eps, int64_t C, void *out_v, void *out_n,
                             float *mean, float *rstd, int64_t P, int parts, int half) {
    const int nt = threads_for(P, parts);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t begin, end;
        thread_share(P, &begin, &end);
        BY_HALF(forward_range(x, y, scale, weight, bias, eps, C, out_v, out_n, mean, rstd, half,
                              begin, end));
    }
}

/* Pixels [0, P) over at most `parts` threads; thread t adds its parameter gradients into row t
 * of part_w, part_b, part_scale ((parts, C) each, zeroed by the caller). half: g_n, g_v, v, y,
 * g_x, g_y. */
void opir_layer_norm_backward(const void *g_n, const void *g_v, const void *v, const float *mean,
                              const float *rstd, const float *weight, const void *y,
                              const float *scale, int64_t C, void *g_x, void *g_y, float *part_w,
                              float *part_b, float *part_scale, int64_t P, int parts, int half) {
    const int nt = threads_for(P, parts);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t begin, end;
        const int64_t t = thread_share(P, &begin, &end);
        BY_HALF(backward_range(g_n, g_v, v, mean, rstd, weight, y, scale, C, g_x, g_y,
                               part_w + t * C, part_b + t * C,
                               part_scale ? part_scale + t * C : NULL, half, begin, end));
    }
}

/* ---- the gate ---------------------------------------------------------------------------- */

/* half: u, y */
SPECIALISED void gate_forward_range(const void *u, int64_t C, int64_t HW, void *y,
                                    float *sums, int half, int64_t begin, int64_t end) {
    const int hu = HALF(0), hy = HALF(1);
    const int vec = C % LN_VL == 0;
    for (int64_t p = begin; p < end; ++p) {
        const int64_t a = p * 2 * C, b = a + C, o = p * C;
        float *s = sums ? sums + (p / HW) * C : NULL;
        if (vec) {
            for (int64_t k = 0; k < C; k += LN_VL) {
                lnv t = map_ld(u, a + k, hu) * map_ld(u, b + k, hu);
                map_st(y, o + k, hy, t);
                if (hy) t = map_ld(y, o + k, hy); /* the mean of y as stored */
                if (s) ln_st(s + k, ln_ld(s + k) + t);
            }
            continue;
        }
        for (int64_t k = 0; k < C; ++k) {
            float t = map_get(u, a + k, hu) * map_get(u, b + k, hu);
            if (hy) t = bf_get(bf_put(t));
            map_put(y, o + k, hy, t);
            if (s) s[k] += t;
        }
    }
}

/* half: g_y, u, g_u */
SPECIALISED void gate_backward_range(const void *g_y, const float *g_mean, const void *u,
                                     int64_t C, int64_t HW, void *g_u, int half, int64_t begin,
                                     int64_t end) {
    const float inv_hw = 1.0f / (float)HW;
    const int hg = HALF(0), hu = HALF(1), hgu = HALF(2);
    const int vec = C % LN_VL == 0;
    for (int64_t p = begin; p < end; ++p) {
        const int64_t a = p * 2 * C, b = a + C, o = p * C;
        const float *gm = g_mean ? g_mean + (p / HW) * C : NULL;
        if (vec) {
            const lnv scale = ln_splat(inv_hw);
            for (int64_t k = 0; k < C; k += LN_VL) {
                lnv d = map_ld(g_y, o + k, hg);
                if (gm) d += ln_ld(gm + k) * scale;
                map_st(g_u, a + k, hgu, d * map_ld(u, b + k, hu));
                map_st(g_u, b + k, hgu, d * map_ld(u, a + k, hu));
            }
            continue;
        }
        for (int64_t k = 0; k < C; ++k) {
            const float g = map_get(g_y, o + k, hg);
            const float d = gm ? g + gm[k] * inv_hw : g;
            map_put(g_u, a + k, hgu, d * map_get(u, b + k, hu));
            map_put(g_u, b + k, hgu, d * map_get(u, a + k, hu));
        }
    }
}

/* y (P, C) = a * b of u (P, 2C); with `sums` ((parts, P / HW, C), zeroed by the caller), thread
 * t adds the channel sums of each image's y into its block t. half: u, y. */
void opir_gate_forward(const void *u, int64_t C, int64_t HW, void *y, float *sums, int64_t P,
                       int parts, int half) {
    const int nt = threads_for(P, parts);
    const int64_t B = P / HW;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t begin, end;
        const int64_t t = thread_share(P, &begin, &end);
        BY_HALF(gate_forward_range(u, C, HW, y, sums ? sums + t * B * C : NULL, half, begin, end));
    }
}

/* du (P, 2C) from dy (P, C) and, when given, the gradient of the per-image channel means
 * (P / HW, C). half: g_y, u, g_u. */
void opir_gate_backward(const void *g_y, const float *g_mean, const void *u, int64_t C,
                        int64_t HW, void *g_u, int64_t P, int parts, int half) {
    const int nt = threads_for(P, parts);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t begin, end;
        thread_share(P, &begin, &end);
        BY_HALF(gate_backward_range(g_y, g_mean, u, C, HW, g_u, half, begin, end));
    }
}
