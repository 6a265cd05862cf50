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

static inline float ln_hsum(lnv v) {
    float s = 0.0f;
    for (int l = 0; l < LN_VL; ++l) s += v[l];
    return s;
}

/* v = x + y * scale (y NULL: v = x), n = (v - mean) rstd weight + bias; out_v written only when
 * y is given (v is x otherwise); mean and rstd per pixel, for the backward. */
static void forward_range(const float *x, const float *y, const float *scale,
                          const float *weight, const float *bias, float eps, int64_t C,
                          float *out_v, float *out_n, float *mean, float *rstd, int64_t begin,
                          int64_t end) {
    const float inv_c = 1.0f / (float)C;
    if (C % LN_VL == 0 && C <= 512) {
        const int64_t nv = C / LN_VL;
        lnv v[512 / LN_VL];
        for (int64_t p = begin; p < end; ++p) {
            const int64_t o = p * C;
            lnv acc = {0};
            for (int64_t k = 0; k < nv; ++k) {
                lnv t = ln_ld(x + o + k * LN_VL);
                if (y) t += ln_ld(y + o + k * LN_VL) * ln_ld(scale + k * LN_VL);
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
            for (int64_t k = 0; k < nv; ++k) {
                if (y) ln_st(out_v + o + k * LN_VL, v[k]);
                ln_st(out_n + o + k * LN_VL, (v[k] - mv) * rv * ln_ld(weight + k * LN_VL) +
                                                 ln_ld(bias + k * LN_VL));
            }
            mean[p] = m;
            rstd[p] = r;
        }
        return;
    }
    for (int64_t p = begin; p < end; ++p) {
        const int64_t o = p * C;
        float s = 0.0f;
        for (int64_t k = 0; k < C; ++k) {
            const float t = y ? x[o + k] + y[o + k] * scale[k] : x[o + k];
            if (y) out_v[o + k] = t;
            s += t;
        }
        const float *v = y ? out_v + o : x + o;
        const float m = s * inv_c;
        float q = 0.0f;
        for (int64_t k = 0; k < C; ++k) q += (v[k] - m) * (v[k] - m);
        const float r = 1.0f / sqrtf(q * inv_c + eps);
        for (int64_t k = 0; k < C; ++k) out_n[o + k] = (v[k] - m) * r * weight[k] + bias[k];
        mean[p] = m;
        rstd[p] = r;
    }
}

/* Gradients of the forward: g_n (and g_v, the gradient reaching v directly, or NULL) in;
 * g_x = dL/dv; g_y = dL/dv scale when y is given; the weight, bias and scale gradients of
 * pixels [begin, end) added into part_w, part_b, part_scale (C each). v is out_v (or x). */
static void backward_range(const float *g_n, const float *g_v, const float *v,
                           const float *mean, const float *rstd, const float *weight,
                           const float *y, const float *scale, int64_t C, float *g_x, float *g_y,
                           float *part_w, float *part_b, float *part_scale, int64_t begin,
                           int64_t end) {
    const float inv_c = 1.0f / (float)C;
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
                const lnv gn = ln_ld(g_n + o + k * LN_VL);
                xh[k] = (ln_ld(v + o + k * LN_VL) - mv) * rv;
                gh[k] = gn * ln_ld(weight + k * LN_VL);
                sa += gh[k];
                sb += gh[k] * xh[k];
                acc_w[k] += gn * xh[k];
                acc_b[k] += gn;
            }
            const lnv a = ln_splat(ln_hsum(sa) * inv_c), b = ln_splat(ln_hsum(sb) * inv_c);
            for (int64_t k = 0; k < nv; ++k) {
                lnv d = rv * (gh[k] - a - xh[k] * b);
                if (g_v) d += ln_ld(g_v + o + k * LN_VL);
                ln_st(g_x + o + k * LN_VL, d);
                if (y) {
                    ln_st(g_y + o + k * LN_VL, d * ln_ld(scale + k * LN_VL));
                    acc_s[k] += d * ln_ld(y + o + k * LN_VL);
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
            const float xh = (v[o + k] - m) * r, gh = g_n[o + k] * weight[k];
            sa += gh;
            sb += gh * xh;
            part_w[k] += g_n[o + k] * xh;
            part_b[k] += g_n[o + k];
        }
        sa *= inv_c;
        sb *= inv_c;
        for (int64_t k = 0; k < C; ++k) {
            const float xh = (v[o + k] - m) * r;
            float d = r * (g_n[o + k] * weight[k] - sa - xh * sb);
            if (g_v) d += g_v[o + k];
            g_x[o + k] = d;
            if (y) {
                g_y[o + k] = d * scale[k];
                part_scale[k] += d * y[o + k];
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

/* Pixels [0, P) over at most `parts` threads. */
void opir_layer_norm_forward(const float *x, const float *y, const float *scale,
                             const float *weight, const float *bias, float eps, int64_t C,
                             float *out_v, float *out_n, float *mean, float *rstd, int64_t P,
                             int parts) {
    const int nt = threads_for(P, parts);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t begin, end;
        thread_share(P, &begin, &end);
        forward_range(x, y, scale, weight, bias, eps, C, out_v, out_n, mean, rstd, begin, end);
    }
}

/* Pixels [0, P) over at most `parts` threads; thread t adds its parameter gradients into row t
 * of part_w, part_b, part_scale ((parts, C) each, zeroed by the caller). */
void opir_layer_norm_backward(const float *g_n, const float *g_v, const float *v,
                              const float *mean, const float *rstd, const float *weight,
                              const float *y, const float *scale, int64_t C, float *g_x,
                              float *g_y, float *part_w, float *part_b, float *part_scale,
                              int64_t P, int parts) {
    const int nt = threads_for(P, parts);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t begin, end;
        const int64_t t = thread_share(P, &begin, &end);
        backward_range(g_n, g_v, v, mean, rstd, weight, y, scale, C, g_x, g_y, part_w + t * C,
                       part_b + t * C, part_scale ? part_scale + t * C : NULL, begin, end);
    }
}

/* ---- the gate ---------------------------------------------------------------------------- */

static void gate_forward_range(const float *u, int64_t C, int64_t HW, float *y, float *sums,
                               int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
        const float *a = u + p * 2 * C, *b = a + C;
        float *o = y + p * C;
        for (int64_t k = 0; k < C; ++k) o[k] = a[k] * b[k];
        if (sums) {
            float *s = sums + (p / HW) * C;
            for (int64_t k = 0; k < C; ++k) s[k] += o[k];
        }
    }
}

static void gate_backward_range(const float *g_y, const float *g_mean, const float *u,
                                int64_t C, int64_t HW, float *g_u, int64_t begin, int64_t end) {
    const float inv_hw = 1.0f / (float)HW;
    for (int64_t p = begin; p < end; ++p) {
        const float *a = u + p * 2 * C, *b = a + C, *g = g_y + p * C;
        const float *gm = g_mean ? g_mean + (p / HW) * C : NULL;
        float *ga = g_u + p * 2 * C, *gb = ga + C;
        for (int64_t k = 0; k < C; ++k) {
            const float d = gm ? g[k] + gm[k] * inv_hw : g[k];
            ga[k] = d * b[k];
            gb[k] = d * a[k];
        }
    }
}

/* y (P, C) = a * b of u (P, 2C); with `sums` ((parts, P / HW, C), zeroed by the caller), thread
 * t adds the channel sums of each image's y into its block t. */
void opir_gate_forward(const float *u, int64_t C, int64_t HW, float *y, float *sums, int64_t P,
                       int parts) {
    const int nt = threads_for(P, parts);
    const int64_t B = P / HW;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t begin, end;
        const int64_t t = thread_share(P, &begin, &end);
        gate_forward_range(u, C, HW, y, sums ? sums + t * B * C : NULL, begin, end);
    }
}

/* du (P, 2C) from dy (P, C) and, when given, the gradient of the per-image channel means
 * (P / HW, C). */
void opir_gate_backward(const float *g_y, const float *g_mean, const float *u, int64_t C,
                        int64_t HW, float *g_u, int64_t P, int parts) {
    const int nt = threads_for(P, parts);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t begin, end;
        thread_share(P, &begin, &end);
        gate_backward_range(g_y, g_mean, u, C, HW, g_u, begin, end);
    }
}
