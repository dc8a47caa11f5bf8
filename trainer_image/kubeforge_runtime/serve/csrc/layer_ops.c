/* The elementwise work of a decoder layer on the CPU, fused: what runs between the matmuls.
 *
 * On a decode step each of these is a handful of tiny torch ops (RMSNorm alone is five:
 * pow, mean, add, rsqrt, two muls), and on a small batch the cost of an op is its dispatch,
 * not its arithmetic. Here each is one pass over the rows.
 *
 * Built with -ffp-contract=off and without -ffast-math, so every product and sum rounds as
 * torch's elementwise ops round them (RoPE and the KV write are bit-identical to the torch
 * path; the RMSNorm sum of squares is added in 16 lanes, an order of our own, as torch's
 * reduction is an order of its own).
 *
 * Layouts (fp32, row-major):
 *   x, h        (T, D)
 *   qkv         (T, (H + 2K) * E): q heads, then k heads, then v heads
 *   cos, sin    (max positions, E); sin with its first half negated (rotate-half RoPE as
 *               x * cos + swap_halves(x) * sin)
 *   kv          one layer of the pool, (blocks, 2, K, bs, E): keys then values per block
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 16

static float sum_squares(const float *x, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += x[i + l] * x[i + l];
    for (int l = 0; i < n; i++, l++) acc[l] += x[i] * x[i];
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0];
}

/* h[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w, for rows t of (T, D); Llama's RMSNorm in fp32
 * (the order of Hugging Face's: normalise, then scale by the weight). When delta is given, x
 * first becomes x + delta, in place: the residual add before a norm. */
void kf_rms_norm(float *x, const float *delta, const float *w, float eps, int64_t T, int64_t D, float *h) {
    for (int64_t t = 0; t < T; t++) {
        float *xr = x + t * D, *hr = h + t * D;
        if (delta) {
            const float *dr = delta + t * D;
            for (int64_t i = 0; i < D; i++) xr[i] = xr[i] + dr[i];
        }
        const float r = 1.0f / sqrtf(sum_squares(xr, D) / (float)D + eps);
        for (int64_t i = 0; i < D; i++) hr[i] = (xr[i] * r) * w[i];
    }
}

static inline void rope(const float *src, const float *c, const float *s, int64_t E, float *dst) {
    const int64_t half = E / 2;
    for (int64_t i = 0; i < half; i++) dst[i] = src[i] * c[i] + src[i + half] * s[i];
    for (int64_t i = half; i < E; i++) dst[i] = src[i] * c[i] + src[i - half] * s[i];
}

/* RoPE on the q and k heads of each token at its position, and the token's key and value
 * written to its slot of the pool. q_out (T, H, E) receives the rotated queries; k_out (T,
 * K, E), when given, the rotated keys (attention over a whole prompt reads them from there
 * rather than from the pool). */
void kf_rope_kv_write(const float *qkv, int64_t T, int64_t H, int64_t K, int64_t E, const int64_t *positions,
                      const float *cos, const float *sin, const int64_t *slots, float *kv, int64_t bs,
                      float *q_out, float *k_out) {
    const int64_t row = (H + 2 * K) * E;
    for (int64_t t = 0; t < T; t++) {
        const float *src = qkv + t * row, *c = cos + positions[t] * E, *s = sin + positions[t] * E;
        const int64_t block = slots[t] / bs, j = slots[t] % bs;
        for (int64_t x = 0; x < H; x++) rope(src + x * E, c, s, E, q_out + (t * H + x) * E);
        for (int64_t x = 0; x < K; x++) {
            float *kdst = kv + (((block * 2 + 0) * K + x) * bs + j) * E;
            rope(src + (H + x) * E, c, s, E, kdst);
            if (k_out) memcpy(k_out + (t * K + x) * E, kdst, sizeof(float) * (size_t)E);
            memcpy(kv + (((block * 2 + 1) * K + x) * bs + j) * E, src + (H + K + x) * E, sizeof(float) * (size_t)E);
        }
    }
}
