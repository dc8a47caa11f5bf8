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

/* One query token (row) of a sequence against its first len cached tokens, all kv heads.
 * Keys and values are read block by block, all heads of a block together, so each block is
 * one long sequential run in memory (blocks themselves are scattered across the pool). */
/* Ask for the next block while this one is computed on: blocks are scattered, so the
 * hardware prefetcher cannot guess where the next run starts. */
static inline void prefetch_block(const float *base, int64_t extent) {
    if (extent > 16384) return; /* a layout whose block is not one run: leave it to the hardware */
    for (int64_t off = 0; off < extent; off += 16) __builtin_prefetch(base + off, 0, 0);
}

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

static inline void attend(const float *q, const float *k, const float *v, const int64_t *bt, int64_t n,
                          int64_t ctx, int64_t row0, float *out, int64_t H, int64_t K, const int64_t E,
                          int64_t bs, int64_t sb, int64_t sj, int64_t sh, float scale, float *scratch) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t row = row0 + i;
        attend_row(q + row * H * E, k, v, bt, ctx - n + i + 1, out + row * H * E, H, K, E, bs, sb, sj, sh, scale,
                   scratch);
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
        switch (E) {
        case 32: attend(q, k, v, bt, n, ctx_len[s], q_start[s], out, H, K, 32, bs, sb, sj, sh, scale, scratch); break;
        case 64: attend(q, k, v, bt, n, ctx_len[s], q_start[s], out, H, K, 64, bs, sb, sj, sh, scale, scratch); break;
        case 128: attend(q, k, v, bt, n, ctx_len[s], q_start[s], out, H, K, 128, bs, sb, sj, sh, scale, scratch); break;
        default: attend(q, k, v, bt, n, ctx_len[s], q_start[s], out, H, K, E, bs, sb, sj, sh, scale, scratch);
        }
    }
    return 0;
}
