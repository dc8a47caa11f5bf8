/* Paged attention on the CPU: queries attend to keys and values that live in a pool of
 * fixed-size blocks, read in place through each sequence's block table (no gather copy).
 *
 * Built at first use by kubeforge_runtime/serve/paged_attention.py with the host's C compiler
 * (-O3 -march=native) and called through ctypes, which releases the GIL during the call.
 *
 * Layout (fp32):
 *   q, out   (T, H, E) contiguous; T = the step's query tokens, sequence s owns rows
 *            q_start[s] .. q_start[s]+q_len[s]-1
 *   k, v     element (block b, slot j, kv head h, dim e) at b*sb + j*sj + h*sh + e
 *   block_tables (S, max_blocks) int64, ctx_len (S) int64: tokens in the cache for s, this
 *            step's included; query i of the n of s sits at position ctx_len[s]-n+i and
 *            attends to positions 0..that (causal).
 * Query heads h*G..h*G+G-1 share kv head h (grouped-query attention).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_GROUP 16
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 2 /* blocks */
#endif

/* Ask for the next block while this one is computed on: blocks are scattered, so the
 * hardware prefetcher cannot guess where the next run starts. Into L2 (locality 1), not past
 * the caches (0): the other query heads read the block again (measured: 10% slower with 0
 * or 3 on a decode step). */
static inline void prefetch_block(const float *base, int64_t extent) {
    if (extent > 16384) return; /* a layout whose block is not one run: leave it to the hardware */
    for (int64_t off = 0; off < extent; off += 16) __builtin_prefetch(base + off, 0, 1);
}

/* One query token (row) of a sequence against its first len cached tokens, all kv heads: the
 * portable path, for head sizes without a vectorised one. Keys and values are read block by
 * block, all heads of a block together, so each block is one long sequential run in memory
 * (blocks themselves are scattered across the pool). */
static inline void attend_row(const float *qr, const float *k, const float *v, const int64_t *bt, int64_t len,
                              float *o, int64_t H, int64_t K, const int64_t E, int64_t bs, int64_t sb, int64_t sj,
                              int64_t sh, float scale, float *scores /* K*G*len */) {
    const int64_t G = H / K;
    float mx[MAX_GROUP * MAX_GROUP], inv[MAX_GROUP * MAX_GROUP];
    for (int64_t x = 0; x < H; x++) mx[x] = -FLT_MAX;
    const int64_t nblocks = (len + bs - 1) / bs;
    const int64_t extent = (bs - 1) * sj + (K - 1) * sh + E; /* floats one block's keys span */
    for (int64_t b = 0; b < nblocks && b < PREFETCH_AHEAD; b++) prefetch_block(k + bt[b] * sb, extent);
    for (int64_t b = 0; b < nblocks; b++) {
        const float *kb = k + bt[b] * sb;
        const int64_t t0 = b * bs, n = (len - t0 < bs) ? len - t0 : bs;
        const int64_t ahead = b + PREFETCH_AHEAD; /* the keys' blocks, then the values' first ones */
        if (ahead < nblocks) prefetch_block(k + bt[ahead] * sb, extent);
        else if (ahead - nblocks < nblocks) prefetch_block(v + bt[ahead - nblocks] * sb, extent);
        for (int64_t kh = 0; kh < K; kh++) {
            for (int64_t j = 0; j < n; j++) {
                const float *kr = kb + j * sj + kh * sh;
                for (int64_t g = 0; g < G; g++) {
                    const int64_t x = kh * G + g;
                    const float *qg = qr + x * E;
                    float sc = 0.f;
                    for (int64_t e = 0; e < E; e++) sc += qg[e] * kr[e];
                    sc *= scale;
                    scores[x * len + t0 + j] = sc;
                    if (sc > mx[x]) mx[x] = sc;
                }
            }
        }
    }
    for (int64_t x = 0; x < H; x++) {
        float sum = 0.f, *sx = scores + x * len;
        for (int64_t t = 0; t < len; t++) {
            const float p = expf(sx[t] - mx[x]);
            sx[t] = p;
            sum += p;
        }
        inv[x] = 1.f / sum;
    }
    memset(o, 0, sizeof(float) * (size_t)(H * E));
    for (int64_t b = 0; b < nblocks; b++) {
        const float *vb = v + bt[b] * sb;
        const int64_t t0 = b * bs, n = (len - t0 < bs) ? len - t0 : bs;
        if (b + PREFETCH_AHEAD < nblocks) prefetch_block(v + bt[b + PREFETCH_AHEAD] * sb, extent);
        for (int64_t kh = 0; kh < K; kh++) {
            for (int64_t j = 0; j < n; j++) {
                const float *vr = vb + j * sj + kh * sh;
                for (int64_t g = 0; g < G; g++) {
                    const int64_t x = kh * G + g;
                    const float p = scores[x * len + t0 + j] * inv[x];
                    float *ox = o + x * E;
                    for (int64_t e = 0; e < E; e++) ox[e] += p * vr[e];
                }
            }
        }
    }
}

/* -- the vectorised path: head sizes of 32, 64 and 128 ------------------------------------------
 * VW keys at a time (VW = the build's vector width: 16 floats with AVX-512, else 8): each
 * key's dot product with the query is accumulated as one VW-wide vector, and the VW vectors
 * are summed across their lanes together (a transpose-and-add, log2(VW) rounds of pairwise
 * adds) instead of one horizontal sum per key. Values are added into E/VW vector accumulators
 * that stay in registers for the whole context. Per query head, so a kv head's keys (a few KB
 * per block) are re-read from L1/L2 by the other heads of its group, never from memory.
 * Written with GCC vector extensions: the compiler picks SSE, AVX2 or AVX-512 for the build's
 * -march. */
#ifdef __AVX512F__
#define VW 16
#else
#define VW 8
#endif
typedef float vec __attribute__((vector_size(VW * sizeof(float))));

static inline vec loadv(const float *p) {
    vec r;
    memcpy(&r, p, sizeof r);
    return r;
}

static inline void storev(float *p, vec x) { memcpy(p, &x, sizeof x); }

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define KF_HAVE_SHUFFLEVECTOR 1
#endif
#endif

/* r[j] = the sum of a[j]'s VW lanes. Each round adds even and odd lanes of two vectors, so
 * their partial sums end up side by side: after log2(VW) rounds lane j holds all of a[j]. */
static inline vec sum_lanes(vec *a) {
#ifdef KF_HAVE_SHUFFLEVECTOR
#if VW == 16
#define EVEN 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define ODD 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
#else
#define EVEN 0, 2, 4, 6, 8, 10, 12, 14
#define ODD 1, 3, 5, 7, 9, 11, 13, 15
#endif
    for (int n = VW; n > 1; n /= 2)
        for (int i = 0; i < n / 2; i++)
            a[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], EVEN) +
                   __builtin_shufflevector(a[2 * i], a[2 * i + 1], ODD);
#undef EVEN
#undef ODD
    return a[0];
#else
    vec r;
    for (int j = 0; j < VW; j++) {
        float s = 0.f;
        for (int l = 0; l < VW; l++) s += a[j][l];
        r[j] = s;
    }
    return r;
#endif
}

static inline __attribute__((always_inline)) void attend_row_vec(
    const float *qr, const float *k, const float *v, const int64_t *bt, int64_t len, float *o, int64_t H, int64_t K,
    const int64_t E, int64_t bs, int64_t sb, int64_t sj, int64_t sh, float scale, float *scores /* len */) {
    const int64_t G = H / K, EV = E / VW, nblocks = (len + bs - 1) / bs;
    const int64_t extent = (bs - 1) * sj + (K - 1) * sh + E;
    for (int64_t b = 0; b < nblocks && b < PREFETCH_AHEAD; b++) prefetch_block(k + bt[b] * sb, extent);
    for (int64_t x = 0; x < H; x++) {
        const int64_t kh = x / G;
        const int first = x == 0; /* the first pass over the blocks brings them in: prefetch */
        vec qv[128 / VW];
        for (int64_t c = 0; c < EV; c++) qv[c] = loadv(qr + x * E + c * VW);
        float mx = -FLT_MAX;
        for (int64_t b = 0; b < nblocks; b++) {
            if (first) {
                const int64_t ahead = b + PREFETCH_AHEAD;
                if (ahead < nblocks) prefetch_block(k + bt[ahead] * sb, extent);
                else if (ahead - nblocks < nblocks) prefetch_block(v + bt[ahead - nblocks] * sb, extent);
            }
            const float *kb = k + bt[b] * sb + kh * sh;
            const int64_t t0 = b * bs, n = (len - t0 < bs) ? len - t0 : bs;
            int64_t j = 0;
            for (; j + VW <= n; j += VW) {
                vec acc[VW];
                for (int jj = 0; jj < VW; jj++) {
                    const float *kr = kb + (j + jj) * sj;
                    vec a = qv[0] * loadv(kr);
                    for (int64_t c = 1; c < EV; c++) a += qv[c] * loadv(kr + c * VW);
                    acc[jj] = a;
                }
                storev(scores + t0 + j, sum_lanes(acc) * scale);
            }
            for (; j < n; j++) {
                const float *kr = kb + j * sj;
                vec a = qv[0] * loadv(kr);
                for (int64_t c = 1; c < EV; c++) a += qv[c] * loadv(kr + c * VW);
                float sc = 0.f;
                for (int l = 0; l < VW; l++) sc += a[l];
                scores[t0 + j] = sc * scale;
            }
        }
        for (int64_t t = 0; t < len; t++) mx = fmaxf(mx, scores[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < len; t++) {
            const float p = expf(scores[t] - mx);
            scores[t] = p;
            sum += p;
        }
        /* NS independent sets of accumulators, so consecutive keys' multiply-adds do not wait
         * for each other (a multiply-add's latency is several of its issue slots) */
        const int64_t NS = EV >= 8 ? 1 : 8 / EV;
        vec ov[8 * 128 / VW];
        for (int64_t c = 0; c < NS * EV; c++) ov[c] = (vec){0};
        for (int64_t b = 0; b < nblocks; b++) {
            if (first && b + PREFETCH_AHEAD < nblocks) prefetch_block(v + bt[b + PREFETCH_AHEAD] * sb, extent);
            const float *vb = v + bt[b] * sb + kh * sh;
            const int64_t t0 = b * bs, n = (len - t0 < bs) ? len - t0 : bs;
            int64_t j = 0;
            for (; j + NS <= n; j += NS)
                for (int64_t a = 0; a < NS; a++) {
                    const float *vr = vb + (j + a) * sj;
                    const float p = scores[t0 + j + a];
                    for (int64_t c = 0; c < EV; c++) ov[a * EV + c] += p * loadv(vr + c * VW);
                }
            for (; j < n; j++) {
                const float *vr = vb + j * sj;
                const float p = scores[t0 + j];
                for (int64_t c = 0; c < EV; c++) ov[c] += p * loadv(vr + c * VW);
            }
        }
        for (int64_t a = 1; a < NS; a++)
            for (int64_t c = 0; c < EV; c++) ov[c] += ov[a * EV + c];
        const float inv = 1.f / sum;
        for (int64_t c = 0; c < EV; c++) storev(o + x * E + c * VW, ov[c] * inv);
    }
}

/* Sequences [s_begin, s_end); scratch holds H * (longest context) floats. 0, or -1 when the
 * group is wider than MAX_GROUP. */
int kf_paged_attention(const float *q, const float *k, const float *v, const int64_t *block_tables,
                       int64_t max_blocks, const int64_t *q_start, const int64_t *q_len, const int64_t *ctx_len,
                       int64_t s_begin,
                       int64_t s_end, float *out, int64_t H, int64_t K, int64_t E, int64_t bs, int64_t sb,
                       int64_t sj, int64_t sh, float scale, float *scratch) {
    if (K <= 0 || H % K != 0 || H / K > MAX_GROUP || H > MAX_GROUP * MAX_GROUP) return -1;
    for (int64_t s = s_begin; s < s_end; s++) {
        const int64_t n = q_len[s];
        const int64_t *bt = block_tables + s * max_blocks;
        /* constant head sizes let the compiler unroll and vectorise the inner loops */
        const int64_t ctx = ctx_len[s], row0 = q_start[s];
        for (int64_t i = 0; i < n; i++) {
            const int64_t row = row0 + i, len = ctx - n + i + 1;
            const float *qr = q + row * H * E;
            float *o = out + row * H * E;
            switch (E) {
            case 32: attend_row_vec(qr, k, v, bt, len, o, H, K, 32, bs, sb, sj, sh, scale, scratch); break;
            case 64: attend_row_vec(qr, k, v, bt, len, o, H, K, 64, bs, sb, sj, sh, scale, scratch); break;
            case 128: attend_row_vec(qr, k, v, bt, len, o, H, K, 128, bs, sb, sj, sh, scale, scratch); break;
            default: attend_row(qr, k, v, bt, len, o, H, K, E, bs, sb, sj, sh, scale, scratch);
            }
        }
    }
    return 0;
}
