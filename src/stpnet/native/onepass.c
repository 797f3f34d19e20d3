/* One pass over each image of a factorized 2-D convolution in its plain form
 *     1x1 (W_in) -> k x k (W_mid; stride, zero padding) -> 1x1 (W_out) + bias,
 * float32, NCHW, each image's intermediate planes kept in a per-thread scratch buffer (a few tens of
 * KB: they stay in cache) instead of two full intermediate tensors written and read by three
 * library convolutions. Each stage is stored by output channel (CSR), so the zeros of the plain
 * form (the identity blocks of U (x) I_t, a kernel shared by groups, CP's diagonal) cost nothing.
 * Built and loaded by stpnet/native/build.py; called through stpnet/native/onepass.py, which checks
 * every argument. Vectors of 8 floats (GCC/Clang vector extensions): AVX2/AVX-512 on x86-64, NEON
 * pairs on AArch64. Threads (OpenMP): over images when a batch has at least as many, else the
 * threads share each image by output channel.
 */
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v8 __attribute__((vector_size(32), aligned(4)));  /* unaligned loads and stores */

typedef struct {
    int m;            /* output channels of the stage */
    const int *ptr;   /* m + 1 offsets into idx / weight (CSR by output channel) */
    const int *idx;   /* input channel of each nonzero */
    const float *w;   /* kh * kw weights per nonzero (1 for a 1x1 stage) */
} stage_t;

typedef struct {
    int cin, cout, kh, kw, sh, sw, ph, pw;
    stage_t in, mid, out;
    const float *bias;  /* cout or NULL */
} plan_t;

static inline v8 ld(const float *p) { return *(const v8 *)p; }
static inline void st(float *p, v8 v) { *(v8 *)p = v; }
static inline v8 splat(float c) { return (v8){c, c, c, c, c, c, c, c}; }

/* out[o][pixel] = bias[o] + sum_k w_k * src[idx_k][pixel] over a flat plane of `size` pixels; the
   result of pixel p goes to dst[o * dplane + (p / width) * dstride + p % width] (a padded or compact
   plane). With width a multiple of 8, MIX_TILE vectors of 8 pixels accumulate side by side. */
#define MIX_TILE 8
static void mix(const stage_t *s, const float *src, int size, int width, float *dst, int dplane, int dstride,
                int o0, int o1, const float *bias)
{
    const int vectors = width % 8 == 0 ? size / 8 : 0;
    for (int o = o0; o < o1; o++) {
        const int a = s->ptr[o], b = s->ptr[o + 1];
        const float b0 = bias ? bias[o] : 0.0f;
        float *d = dst + (size_t)o * dplane;
        int v = 0;
        for (; v + MIX_TILE <= vectors; v += MIX_TILE) {
            v8 acc[MIX_TILE];
            for (int u = 0; u < MIX_TILE; u++) acc[u] = splat(b0);
            for (int k = a; k < b; k++) {
                const float *x = src + (size_t)s->idx[k] * size + 8 * v;
                const v8 c = splat(s->w[k]);
                for (int u = 0; u < MIX_TILE; u++) acc[u] += c * ld(x + 8 * u);
            }
            for (int u = 0; u < MIX_TILE; u++) {
                const int q = 8 * (v + u);
                st(d + (q / width) * dstride + q % width, acc[u]);
            }
        }
        for (; v < vectors; v++) {
            v8 acc = splat(b0);
            for (int k = a; k < b; k++) acc += splat(s->w[k]) * ld(src + (size_t)s->idx[k] * size + 8 * v);
            const int q = 8 * v;
            st(d + (q / width) * dstride + q % width, acc);
        }
        for (int p = 8 * vectors; p < size; p++) {
            float acc = b0;
            for (int k = a; k < b; k++) acc += s->w[k] * src[(size_t)s->idx[k] * size + p];
            d[(p / width) * dstride + p % width] = acc;
        }
    }
}

/* The k x k stage on zero-padded planes (hp x wp): out[o] is a compact ho x wo plane. With wo a
   multiple of 8, TILE vectors of 8 outputs (row-major over the plane) accumulate side by side. */
#define TILE 8
static void spatial(const plan_t *P, const float *src, int hp, int wp, int ho, int wo, float *dst, int o0, int o1)
{
    const stage_t *s = &P->mid;
    const int kh = P->kh, kw = P->kw, kk = kh * kw, sh = P->sh, sw = P->sw;
    const size_t plane = (size_t)hp * wp;
    const int vectors = (wo % 8 == 0 && (sw == 1 || sw == 2)) ? ho * (wo / 8) : 0, per_row = wo / 8;
    for (int o = o0; o < o1; o++) {
        const int a = s->ptr[o], b = s->ptr[o + 1];
        float *d = dst + (size_t)o * ho * wo;
        int v = 0;
        for (; v < vectors; v += TILE) {
            const int count = vectors - v < TILE ? vectors - v : TILE;
            int base[TILE];
            v8 acc[TILE];
            for (int u = 0; u < TILE; u++) {
                const int vv = v + (u < count ? u : 0), r = vv / per_row, c = (vv % per_row) * 8;
                base[u] = r * sh * wp + c * sw;
                acc[u] = splat(0.0f);
            }
            for (int k = a; k < b; k++) {
                const float *x = src + s->idx[k] * plane;
                const float *c = s->w + (size_t)k * kk;
                for (int i = 0; i < kh; i++)
                    for (int j = 0; j < kw; j++) {
                        const v8 cc = splat(c[i * kw + j]);
                        const float *xi = x + i * wp + j;
                        if (sw == 1) {
                            for (int u = 0; u < TILE; u++) acc[u] += cc * ld(xi + base[u]);
                        } else {
                            for (int u = 0; u < TILE; u++) {
                                const v8 lo = ld(xi + base[u]), hi = ld(xi + base[u] + 8);
                                acc[u] += cc * __builtin_shufflevector(lo, hi, 0, 2, 4, 6, 8, 10, 12, 14);
                            }
                        }
                    }
            }
            for (int u = 0; u < count; u++) {
                const int vv = v + u;
                st(d + (vv / per_row) * wo + (vv % per_row) * 8, acc[u]);
            }
        }
        if (vectors) continue;
        for (int r = 0; r < ho; r++)
            for (int q = 0; q < wo; q++) {
                float acc = 0.0f;
                for (int k = a; k < b; k++) {
                    const float *x = src + s->idx[k] * plane + (size_t)(r * sh) * wp + (size_t)q * sw;
                    const float *c = s->w + (size_t)k * kk;
                    for (int i = 0; i < kh; i++)
                        for (int j = 0; j < kw; j++) acc += c[i * kw + j] * x[i * wp + j];
                }
                d[r * wo + q] = acc;
            }
    }
}

static void split(int m, int part, int parts, int *o0, int *o1)
{
    *o0 = (int)((long)m * part / parts);
    *o1 = (int)((long)m * (part + 1) / parts);
}

/* One image; `part` of `parts` threads of a team share it (stages split by output channel). */
static void image(const plan_t *P, const float *x, float *y, int h, int w, float *t1, float *t2, int part, int parts)
{
    const int hp = h + 2 * P->ph, wp = w + 2 * P->pw;
    const int ho = (hp - P->kh) / P->sh + 1, wo = (wp - P->kw) / P->sw + 1;
    int o0, o1;
    split(P->in.m, part, parts, &o0, &o1);
    if (P->ph || P->pw) memset(t1 + (size_t)o0 * hp * wp, 0, sizeof(float) * (size_t)(o1 - o0) * hp * wp);
    mix(&P->in, x, h * w, w, t1 + (size_t)P->ph * wp + P->pw, hp * wp, wp, o0, o1, NULL);
#ifdef _OPENMP
    if (parts > 1) {
#pragma omp barrier
    }
#endif
    split(P->mid.m, part, parts, &o0, &o1);
    spatial(P, t1, hp, wp, ho, wo, t2, o0, o1);
#ifdef _OPENMP
    if (parts > 1) {
#pragma omp barrier
    }
#endif
    split(P->cout, part, parts, &o0, &o1);
    mix(&P->out, t2, ho * wo, wo, y, ho * wo, wo, o0, o1, P->bias);
}

/* y (n, cout, ho, wo) from x (n, cin, h, w); 0 on success, 1 if scratch memory could not be had. */
int stp_onepass_conv2d(const plan_t *P, const float *x, float *y, int n, int h, int w, int threads)
{
    const int hp = h + 2 * P->ph, wp = w + 2 * P->pw;
    const int ho = (hp - P->kh) / P->sh + 1, wo = (wp - P->kw) / P->sw + 1;
    const size_t s1 = (size_t)P->in.m * hp * wp + 16, s2 = (size_t)P->mid.m * ho * wo + 8;
    const size_t xs = (size_t)P->cin * h * w, ys = (size_t)P->cout * ho * wo;
    int failed = 0;
    if (threads < 1) threads = 1;
    if (n >= threads || threads == 1) {
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
        {
            float *t1 = malloc(sizeof(float) * (s1 + s2));  /* every thread reaches the loop, even without it */
#pragma omp for schedule(static)
            for (int i = 0; i < n; i++) {
                if (t1) image(P, x + i * xs, y + i * ys, h, w, t1, t1 + s1, 0, 1);
                else failed = 1;
            }
            free(t1);
        }
        return failed;
    }
    float *t1 = malloc(sizeof(float) * (s1 + s2));
    if (!t1) return 1;
    for (int i = 0; i < n; i++) {
#pragma omp parallel num_threads(threads)
        {
#ifdef _OPENMP
            image(P, x + i * xs, y + i * ys, h, w, t1, t1 + s1, omp_get_thread_num(), omp_get_num_threads());
#else
            image(P, x + i * xs, y + i * ys, h, w, t1, t1 + s1, 0, 1);
#endif
        }
    }
    free(t1);
    return 0;
}
