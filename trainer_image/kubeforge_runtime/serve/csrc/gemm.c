/* C (M, N) = A (M, K) @ W for the projections of a step on the CPU, W packed once.
 *
 * W (K, N) is packed as panels of 16 columns, each a (K, 16) row-major block (N padded with
 * zero columns to a multiple of 16): a panel is one sequential stream, read from memory once
 * per tile of rows while the tile's rows accumulate against it in registers (one 16-float
 * accumulator per row): 16 rows per tile with AVX-512 (16 of its 32 zmm registers), 6
 * without; a second tile re-reads the panel from cache. A decode step's matmul has
 * few rows and a weight that does not stay in cache from one step to the next, so streaming
 * the weight once, with no per-call re-packing (what BLAS does with an unpacked operand) and
 * no per-call set-up, is what it costs.
 *
 * Sums over K run in order, one accumulator per output (fused multiply-adds).
 */
#include <stdint.h>
#include <string.h>

#define PANEL 16 /* columns per packed panel */
#ifdef __AVX512F__
#define MR 16 /* rows of A per register tile: one zmm accumulator each, 16 of 32 registers */
#else
#define MR 6 /* two ymm (or four xmm) accumulators each */
#endif
#define PREFETCH_ROWS 64 /* rows of the panel ahead (4 KB): the weight streams from memory */

typedef float vec __attribute__((vector_size(PANEL * sizeof(float))));

int kf_gemm_panel(void) { return PANEL; }

static inline vec loadv(const float *p) {
    vec r;
    memcpy(&r, p, sizeof r);
    return r;
}

static inline __attribute__((always_inline)) void tile(const float *A, int64_t lda, const int mr, int64_t K,
                                                       const float *bp, float *C, int64_t ldc, int64_t cols) {
    vec acc[MR];
    for (int m = 0; m < mr; m++) acc[m] = (vec){0};
    for (int64_t k = 0; k < K; k++) {
        __builtin_prefetch(bp + (k + PREFETCH_ROWS) * PANEL, 0, 3);
        const vec b = loadv(bp + k * PANEL);
        for (int m = 0; m < mr; m++) acc[m] += A[m * lda + k] * b;
    }
    for (int m = 0; m < mr; m++) {
        if (cols == PANEL) memcpy(C + m * ldc, &acc[m], sizeof(vec));
        else memcpy(C + m * ldc, &acc[m], sizeof(float) * (size_t)cols);
    }
}

#define TILE_CASE(n) \
    case n: tile(Am, lda, n, K, bp, C, ldc, cols); break;

/* Panels [p_begin, p_end) of C (M, N) = A (M, K) @ W: rows of A are lda floats apart, rows of C
 * ldc floats apart; Wp holds ceil(N / 16) panels of K x 16 floats. */
void kf_gemm_packed(const float *A, int64_t lda, int64_t M, int64_t K, const float *Wp, int64_t N, float *C0,
                    int64_t ldc, int64_t p_begin, int64_t p_end) {
    for (int64_t p = p_begin; p < p_end; p++) {
        const float *bp = Wp + p * K * PANEL;
        const int64_t cols = N - p * PANEL < PANEL ? N - p * PANEL : PANEL;
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int64_t mr = M - m0 < MR ? M - m0 : MR;
            const float *Am = A + m0 * lda;
            float *C = C0 + m0 * ldc + p * PANEL;
            /* a constant row count per case: the tile's loops unroll and its accumulators stay
             * in registers */
            switch (mr) {
                TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5) TILE_CASE(6)
#if MR > 6
                TILE_CASE(7) TILE_CASE(8) TILE_CASE(9) TILE_CASE(10) TILE_CASE(11) TILE_CASE(12)
                TILE_CASE(13) TILE_CASE(14) TILE_CASE(15) TILE_CASE(16)
#endif
            }
        }
    }
}
