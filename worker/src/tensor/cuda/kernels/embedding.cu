// Compiled after common.cuh (the backend concatenates them), so it includes nothing itself.
//
// Token and position embeddings (ops.rs's `embedding_fwd` / `embedding_bwd`). `wte (vp, c)` is
// this rank's shard of the vocabulary, ids `vocab_start .. vocab_start + vp`; `wpe (t_max, c)`.

// Launch ROW(256): one block per token row. `out[row] = wte[token - vocab_start] + wpe[row % t]`,
// where a token outside the shard contributes 0 and is never read.
template <typename T>
__device__ void embedding_fwd(T* out, const int* tokens, const T* wte, const T* wpe, int rows,
                              int t, int c, int vocab_start, int vp) {
    const int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    // In long, so that no id (even a negative one) can wrap into the shard.
    const long local = static_cast<long>(tokens[row]) - vocab_start;
    const bool in_shard = local >= 0 && local < vp;
    const long position = row % t;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        const float a = in_shard ? ld(wte, local * c + j) : 0.0f;
        const float b = wpe ? ld(wpe, position * c + j) : 0.0f;
        st(out, static_cast<long>(row) * c + j, a + b);
    }
}
TESSERA_EXPORT(256, embedding_fwd,
               (T * out, const int* tokens, const T* wte, const T* wpe, int rows, int t, int c,
                int vocab_start, int vp),
               (out, tokens, wte, wpe, rows, t, c, vocab_start, vp))

// Entries of `order` staged in shared memory at a time: a segment this long or shorter is read
// from (possibly host-mapped) memory once, whatever `c` is.
#define EMBEDDING_ORDER_CHUNK 1024

// Grid = segments, block 256. The host sorted the token rows by embedding row: segment `s` is the
// rows `order[seg_start[s] .. seg_start[s + 1]]` (ascending), all of local row `seg_row[s]`. Its
// block alone owns that row of `dwte`, so `dwte[seg_row[s], j] += dout[row, j]` over the
// segment's rows in order needs no atomics and always adds in the same order. Summing in f32 from
// the old value, in row order, gives the CPU's bits for f32 (bf16 and f16 round once at the end).
template <typename T>
__device__ void embedding_bwd_wte(T* dwte, const T* dout, const int* order, const int* seg_start,
                                  const int* seg_row, int segments, int c) {
    __shared__ int rows[EMBEDDING_ORDER_CHUNK];
    __shared__ int segment[3];  // begin, end, embedding row
    const int s = blockIdx.x;
    if (s >= segments) {
        return;
    }
    // The segment bounds may be host-mapped: one thread reads each once.
    if (threadIdx.x == 0) {
        segment[0] = seg_start[s];
        segment[1] = seg_start[s + 1];
        segment[2] = seg_row[s];
    }
    __syncthreads();
    const int begin = segment[0], end = segment[1];
    const long erow = segment[2];
    // The chunk of `order` now in `rows` (block-uniform, like every loop bound here, so the
    // barriers below are reached by every thread).
    int resident = -1;
    for (int j0 = 0; j0 < c; j0 += blockDim.x) {
        const int j = j0 + threadIdx.x;
        float acc = j < c ? ld(dwte, erow * c + j) : 0.0f;
        for (int k0 = begin; k0 < end; k0 += EMBEDDING_ORDER_CHUNK) {
            const int len = min(EMBEDDING_ORDER_CHUNK, end - k0);
            if (k0 != resident) {
                __syncthreads();  // every thread is done with the previous chunk
                for (int k = threadIdx.x; k < len; k += blockDim.x) {
                    rows[k] = order[k0 + k];
                }
                __syncthreads();
                resident = k0;
            }
            if (j < c) {
                for (int k = 0; k < len; ++k) {
                    acc += ld(dout, static_cast<long>(rows[k]) * c + j);
                }
            }
        }
        if (j < c) {
            st(dwte, erow * c + j, acc);
        }
    }
}
TESSERA_EXPORT(256, embedding_bwd_wte,
               (T * dwte, const T* dout, const int* order, const int* seg_start, const int* seg_row,
                int segments, int c),
               (dwte, dout, order, seg_start, seg_row, segments, c))

// Launch E over n = t * c: `dwpe[p, j] += dout[s * t + p, j]` for the sequences s = 0 .. b in
// order, summed in f32 from the old value (the CPU's order and, for f32, its bits).
template <typename T>
__device__ void embedding_bwd_wpe(T* dwpe, const T* dout, int b, int t, int c) {
    const long n = static_cast<long>(t) * c;
    for (long i = grid_start(); i < n; i += grid_stride()) {
        // Element i of position p, column j is element s * n + i of dout's sequence s.
        float acc = ld(dwpe, i);
        for (int s = 0; s < b; ++s) {
            acc += ld(dout, s * n + i);
        }
        st(dwpe, i, acc);
    }
}
TESSERA_EXPORT(256, embedding_bwd_wpe, (T * dwpe, const T* dout, int b, int t, int c),
               (dwpe, dout, b, t, c))
