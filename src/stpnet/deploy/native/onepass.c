/* One pass over each image of a factorized 2-D convolution in its plain form
 *     1x1 (W_in) -> k x k (W_mid; stride, zero padding) -> 1x1 (W_out) + bias,
 * float32, NCHW, each image's intermediate planes kept in a per-thread scratch buffer (a few tens of
 * KB: they stay in cache) instead of two full intermediate tensors written and read by three
 * library convolutions. Each stage is stored by output channel (CSR), so the zeros of the plain
 * form (the identity blocks of U (x) I_t, a kernel shared by groups, CP's diagonal) cost nothing.
 * Built and loaded by stpnet/deploy/native/build.py; called through stpnet/deploy/native/onepass.py, which checks
 * every argument. Vectors of 8 floats (GCC/Clang vector extensions): AVX2/AVX-512 on x86-64, NEON
 * pairs on AArch64. Threads (OpenMP): over images when a batch has at least as many, else the
 * threads share each image by output channel.
 */
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* unaligned loads and stores that may alias the float arrays they read and write */
typedef float v8 __attribute__((vector_size(32), aligned(4), may_alias));

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

/* out[o][pixel] = bias[o] + sum_k w_k * src[idx_k][pixel] over flat planes of `size` pixels. Pixel
   vector v (8 pixels, when the rows are whole vectors: `vectors` > 0) goes to d + off[v] (off NULL:
   d + 8 v, a compact plane); the other pixels (no whole vectors) to d + (p / width) * dstride +
   p % width. MIX_TILE vectors accumulate side by side. */
#define MIX_TILE 8
static void mix(const stage_t *s, const float *src, int size, int width, int vectors, const int *off,
                float *dst, int dplane, int dstride, int o0, int o1, const float *bias)
{
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
            for (int u = 0; u < MIX_TILE; u++) st(d + (off ? off[v + u] : 8 * (v + u)), acc[u]);
        }
        for (; v < vectors; v++) {
            v8 acc = splat(b0);
            for (int k = a; k < b; k++) acc += splat(s->w[k]) * ld(src + (size_t)s->idx[k] * size + 8 * v);
            st(d + (off ? off[v] : 8 * v), acc);
        }
        for (int p = 8 * vectors; p < size; p++) {
            float acc = b0;
            for (int k = a; k < b; k++) acc += s->w[k] * src[(size_t)s->idx[k] * size + p];
            d[(p / width) * dstride + p % width] = acc;
        }
    }
}

/* How many outputs of the k x k stage share one pass over their inputs (3 x 8 accumulators need the
   32 vector registers of AVX-512; with 16 they would spill to memory). */
#if defined(__AVX512VL__)
#define MAX_OUTS 3
#else
#define MAX_OUTS 2
#endif

/* Output planes o .. o + outs - 1 of the k x k stage (outs 1 to 3; outputs together read the same
   input channels, as the outputs of one group do), stride 1 or 2, whole 8-output vectors: tiles of
   `rows` rows x `per_row` vectors per output (constants where inlined), accumulated side by side,
   each loaded input vector used by every output together. */
static inline __attribute__((always_inline)) void
spatial_tiles(const stage_t *s, int o, const float *src, size_t plane, int wp, int wo, int ho, int kh, int kw,
              int sh, int sw, float *d, const int rows, const int per_row, const int outs)
{
    const int a = s->ptr[o], b = s->ptr[o + 1], kk = kh * kw, next = b - a;
    const size_t out_plane = (size_t)ho * wo;
    for (int r = 0; r < ho; r += rows) {
        const int live = ho - r < rows ? ho - r : rows;  /* a short last tile recomputes row r */
        for (int c = 0; c < wo; c += 8 * per_row) {
            v8 acc[3][8];  /* fixed sizes (outs <= 3, rows x per_row = 8): GCC kept a variable-length */
                           /* array in memory, a load and a store per multiply-add */
            int base[8];
            for (int i = 0; i < rows; i++) base[i] = (r + (i < live ? i : 0)) * sh * wp + c * sw;
            for (int e = 0; e < outs; e++)
                for (int u = 0; u < rows * per_row; u++) acc[e][u] = splat(0.0f);
            for (int k = a; k < b; k++) {
                const float *x = src + s->idx[k] * plane;
                const float *w = s->w + (size_t)k * kk;
                for (int i = 0; i < kh; i++)
                    for (int j = 0; j < kw; j++) {
                        v8 cc[3];
                        for (int e = 0; e < outs; e++) cc[e] = splat(w[(size_t)e * next * kk + i * kw + j]);
                        const float *xi = x + i * wp + j;
                        for (int y = 0; y < rows; y++)
                            for (int q = 0; q < per_row; q++) {
                                const float *p = xi + base[y] + 8 * q * sw;
                                const v8 in = sw == 1 ? ld(p) : (v8)__builtin_shufflevector(ld(p), ld(p + 8), 0, 2, 4, 6,
                                                                                         8, 10, 12, 14);
                                for (int e = 0; e < outs; e++) acc[e][y * per_row + q] += cc[e] * in;
                            }
                    }
            }
            for (int e = 0; e < outs; e++)
                for (int y = 0; y < live; y++)
                    for (int q = 0; q < per_row; q++)
                        st(d + e * out_plane + (r + y) * wo + c + 8 * q, acc[e][y * per_row + q]);
        }
    }
}

/* Whether outputs o and o + 1 of a stage read the same input channels in the same order. */
static int same_inputs(const stage_t *s, int o)
{
    const int a = s->ptr[o], n = s->ptr[o + 1] - a, a1 = s->ptr[o + 1];
    if (s->ptr[o + 2] - a1 != n) return 0;
    for (int k = 0; k < n; k++)
        if (s->idx[a + k] != s->idx[a1 + k]) return 0;
    return 1;
}

#define SPATIAL_BY_ROW_LENGTH(SW, OUTS)                                                                      \
    do {                                                                                                     \
        if (wo % 64 == 0) spatial_tiles(s, o, src, plane, wp, wo, ho, kh, kw, sh, SW, d, 1, 8, OUTS);        \
        else if (wo % 32 == 0) spatial_tiles(s, o, src, plane, wp, wo, ho, kh, kw, sh, SW, d, 2, 4, OUTS);   \
        else if (wo % 16 == 0) spatial_tiles(s, o, src, plane, wp, wo, ho, kh, kw, sh, SW, d, 4, 2, OUTS);   \
        else spatial_tiles(s, o, src, plane, wp, wo, ho, kh, kw, sh, SW, d, 8, 1, OUTS);                     \
    } while (0)

/* The k x k stage on zero-padded planes (hp x wp): out[o] is a compact ho x wo plane. With stride 1
   or 2 and rows of whole 8-output vectors, tiles of 8 vectors (1 row of 8, 2 of 4, 4 of 2, 8 of 1,
   by the row length) accumulate side by side, two or three outputs at a time where they read the
   same inputs (three where 32 vector registers hold their accumulators); other shapes run a
   scalar loop. */
static void spatial(const plan_t *P, const float *src, int hp, int wp, int ho, int wo, float *dst, int o0, int o1)
{
    const stage_t *s = &P->mid;
    const int kh = P->kh, kw = P->kw, kk = kh * kw, sh = P->sh, sw = P->sw;
    const size_t plane = (size_t)hp * wp;
    const int vector_rows = wo % 8 == 0 && (sw == 1 || sw == 2);
    for (int o = o0; o < o1; o++) {
        float *d = dst + (size_t)o * ho * wo;
        if (vector_rows) {
            const int pair = o + 1 < o1 && same_inputs(s, o);
            const int triple = MAX_OUTS >= 3 && pair && o + 2 < o1 && same_inputs(s, o + 1);
            if (sw == 1 && triple) SPATIAL_BY_ROW_LENGTH(1, 3);
            else if (sw == 1 && pair) SPATIAL_BY_ROW_LENGTH(1, 2);
            else if (sw == 1) SPATIAL_BY_ROW_LENGTH(1, 1);
            else if (triple) SPATIAL_BY_ROW_LENGTH(2, 3);
            else if (pair) SPATIAL_BY_ROW_LENGTH(2, 2);
            else SPATIAL_BY_ROW_LENGTH(2, 1);
            o += pair + triple;
            continue;
        }
        const int a = s->ptr[o], b = s->ptr[o + 1];
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

/* The planes of one call: sizes and the vector offset tables (shared by all images). */
typedef struct {
    int h, w, hp, wp, ho, wo;
    int in_vectors;  /* whole 8-pixel vectors of the input plane (0: its rows are not whole vectors) */
    int *in_off;     /* in_off[v]: where vector v of the input goes in the padded plane */
} geometry_t;

/* One image; `part` of `parts` threads of a team share it (stages split by output channel). */
static void image(const plan_t *P, const geometry_t *G, const float *x, float *y, float *t1, float *t2, int part,
                  int parts)
{
    const int hp = G->hp, wp = G->wp;
    int o0, o1;
    split(P->in.m, part, parts, &o0, &o1);
    if (P->ph || P->pw) memset(t1 + (size_t)o0 * hp * wp, 0, sizeof(float) * (size_t)(o1 - o0) * hp * wp);
    mix(&P->in, x, G->h * G->w, G->w, G->in_vectors, G->in_off, t1 + (size_t)P->ph * wp + P->pw, hp * wp, wp,
        o0, o1, NULL);
#ifdef _OPENMP
    if (parts > 1) {
#pragma omp barrier
    }
#endif
    split(P->mid.m, part, parts, &o0, &o1);
    spatial(P, t1, hp, wp, G->ho, G->wo, t2, o0, o1);
#ifdef _OPENMP
    if (parts > 1) {
#pragma omp barrier
    }
#endif
    split(P->cout, part, parts, &o0, &o1);
    mix(&P->out, t2, G->ho * G->wo, G->wo, G->wo % 8 == 0 ? G->ho * G->wo / 8 : 0, NULL, y, G->ho * G->wo, G->wo,
        o0, o1, P->bias);
}

static int geometry(const plan_t *P, int h, int w, geometry_t *G)
{
    G->h = h; G->w = w; G->hp = h + 2 * P->ph; G->wp = w + 2 * P->pw;
    G->ho = (G->hp - P->kh) / P->sh + 1; G->wo = (G->wp - P->kw) / P->sw + 1;
    G->in_vectors = w % 8 == 0 ? h * w / 8 : 0;
    G->in_off = malloc(sizeof(int) * (size_t)(G->in_vectors + 1));
    if (!G->in_off) return 1;
    for (int v = 0; v < G->in_vectors; v++) G->in_off[v] = (8 * v / w) * G->wp + 8 * v % w;
    return 0;
}

/* y (n, cout, ho, wo) from x (n, cin, h, w); 0 on success, 1 if scratch memory could not be had. */
int stp_onepass_conv2d(const plan_t *P, const float *x, float *y, int n, int h, int w, int threads)
{
    geometry_t G;
    if (geometry(P, h, w, &G)) return 1;
    const size_t s1 = (size_t)P->in.m * G.hp * G.wp + 16, s2 = (size_t)P->mid.m * G.ho * G.wo + 8;
    const size_t xs = (size_t)P->cin * h * w, ys = (size_t)P->cout * G.ho * G.wo;
    int failed = 0;
    if (threads < 1) threads = 1;
    if (n >= threads || threads == 1) {
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
        {
            float *t1 = malloc(sizeof(float) * (s1 + s2));  /* every thread reaches the loop, even without it */
#pragma omp for schedule(static)
            for (int i = 0; i < n; i++) {
                if (t1) image(P, &G, x + i * xs, y + i * ys, t1, t1 + s1, 0, 1);
                else failed = 1;
            }
            free(t1);
        }
    } else {
        float *t1 = malloc(sizeof(float) * (s1 + s2));
        failed = !t1;
        for (int i = 0; i < n && t1; i++) {
#pragma omp parallel num_threads(threads)
            {
#ifdef _OPENMP
                image(P, &G, x + i * xs, y + i * ys, t1, t1 + s1, omp_get_thread_num(), omp_get_num_threads());
#else
                image(P, &G, x + i * xs, y + i * ys, t1, t1 + s1, 0, 1);
#endif
            }
        }
        free(t1);
    }
    free(G.in_off);
    return failed;
}
