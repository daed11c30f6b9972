// Compiled after common.cuh (the backend concatenates them), so it includes nothing itself.
//
// Causal self-attention with FlashAttention's algorithm (attention.rs's, which these kernels are
// checked against): no (t, t) matrix exists anywhere; the forward keeps only each query row's
// log-sum-exp, and the backward recomputes the probabilities from it.
//
// Layout (as attention.rs): `qkv (b t, (nh + 2 nkv) hs)` with each row laid out [q: nh heads | k:
// nkv heads | v: nkv heads] (grouped-query attention: query head h reads key/value head h / (nh /
// nkv); GPT-2 has nkv = nh); `out`, `dout (b t, nh hs)`; `lse`, `delta (b t, nh)` f32. Scale 1 /
// sqrt(hs), hs one of 32, 64, 80, 96, 128 (the backend refuses others; any other value makes the
// kernels do nothing).
//
// Work split: grid (ceil(t / 64), nh, b) (nkv instead of nh in the dk/dv pass), blocks of 256
// threads. A block owns 64 rows (queries, or keys in the dk/dv pass) of one head of one sequence
// (a key/value head's keys sum over the query heads of its group), and 4 adjacent threads (a
// quad) share a
// row: lane u of the quad holds the row's float4 groups u, u + 4, u + 8, ... of its hs values in
// registers (hs / 16 groups each). Interleaving the 16-byte groups makes a quad read 64 contiguous
// bytes of a shared-memory row, and the warp's 8 quads, all reading the same row of a tile, are
// served by broadcast: no bank conflicts. A dot product over hs is each lane's partial sum (fixed
// order) and two shuffles within the quad; float addition being commutative, all four lanes get
// the same bits, so they agree on every probability. Other rows come through shared memory as f32
// tiles of 64 x hs, loaded cooperatively (coalesced along hs); rows at or past t load as zeros.
//
// Arithmetic is plain f32 FMA on those tiles. A tensor-core version (mma.sync m16n8k16 bf16, for
// T = bf16 only) would keep the tiles in bf16 in shared memory and read them with ldmatrix, give
// each warp 16 query rows and compute S = Q K^T, O += P V (and dS, dQ, dK, dV in the backward)
// as MMAs with f32 accumulators; the online softmax would work on the accumulator fragments (each
// thread holds parts of two rows; row max and sum through shuffles within a quad), and P and dS
// would be rounded to bf16 before their products, as FlashAttention does: results change within
// bf16 tolerance, determinism does not (the MMA order is fixed).

// Queries or keys per tile, and threads per row: 64 rows x 4 lanes = the block's 256 threads.
#define ATTENTION_TILE 64
#define ATTENTION_LANES 4
// Keys per step of the forward's online softmax (scores held in registers).
#define ATTENTION_CHUNK 16

// Dynamic shared memory (the backend passes the byte counts of the SHARED lines below), float4
// for 16-byte alignment.
extern __shared__ float4 attention_smem[];

// The sum over a quad (4 adjacent lanes), to all four, with the same bits. Every lane of the warp
// must call it.
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(FULL_WARP, x, 1);
    x += __shfl_xor_sync(FULL_WARP, x, 2);
    return x;
}

// This lane's share of a row: float4 group g holds dims 4 * (u + 4 g) .. + 3.
__device__ __forceinline__ int group_dim(int u, int g) { return 4 * (u + ATTENTION_LANES * g); }

// Loads this lane's share of a global row (zeros when `row` is null: a row past t).
template <typename T, int G>
__device__ __forceinline__ void load_row(float4 (&x)[G], const T* row, int u) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const int d = group_dim(u, g);
        x[g] = row ? make_float4(ld(row, d), ld(row, d + 1), ld(row, d + 2), ld(row, d + 3))
                   : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
}

// Stores this lane's share of a row, times `factor`.
template <typename T, int G>
__device__ __forceinline__ void store_row(T* row, const float4 (&x)[G], float factor, int u) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const int d = group_dim(u, g);
        st(row, d, x[g].x * factor);
        st(row, d + 1, x[g].y * factor);
        st(row, d + 2, x[g].z * factor);
        st(row, d + 3, x[g].w * factor);
    }
}

// This lane's part of the dot product of its share `x` with a shared-memory tile row.
template <int G>
__device__ __forceinline__ float partial_dot(const float4 (&x)[G], const float* tile_row, int u) {
    const float4* y = reinterpret_cast<const float4*>(tile_row);
    float sum = 0.0f;
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const float4 b = y[u + ATTENTION_LANES * g];
        sum += x[g].x * b.x + x[g].y * b.y + x[g].z * b.z + x[g].w * b.w;
    }
    return sum;
}

// `acc += w * (this lane's share of a shared-memory tile row)`.
template <int G>
__device__ __forceinline__ void add_scaled(float4 (&acc)[G], float w, const float* tile_row,
                                           int u) {
    const float4* y = reinterpret_cast<const float4*>(tile_row);
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const float4 b = y[u + ATTENTION_LANES * g];
        acc[g].x += w * b.x;
        acc[g].y += w * b.y;
        acc[g].z += w * b.z;
        acc[g].w += w * b.w;
    }
}

template <int G>
__device__ __forceinline__ void scale_all(float4 (&acc)[G], float factor) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
        acc[g].x *= factor;
        acc[g].y *= factor;
        acc[g].z *= factor;
        acc[g].w *= factor;
    }
}

template <int G>
__device__ __forceinline__ void zero_all(float4 (&acc)[G]) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
        acc[g] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
}

// Rows `first .. first + 64` of one head (row i at `rows + i * stride`, HS values) into `tile`,
// f32 row-major 64 x HS; rows at or past t become zeros. Every thread of the block takes part.
template <typename T, int HS>
__device__ __forceinline__ void load_tile(float* tile, const T* rows, long stride, int first,
                                          int t) {
    for (int k = threadIdx.x; k < ATTENTION_TILE * HS; k += blockDim.x) {
        const int r = k / HS, d = k % HS;
        const int i = first + r;
        tile[k] = i < t ? ld(rows, i * stride + d) : 0.0f;
    }
}

// Where the rows of query head `h` of one block's sequence live (blockIdx.z is the sequence),
// and those of its key/value head.
template <typename T>
struct HeadRows {
    long width;   // nh * hs: the q part of a qkv row; a row of out / dout
    long stride;  // (nh + 2 nkv) * hs: a row of qkv (and dqkv)
    long qkv_at;  // offset of the head's q in the sequence's row 0 of qkv (and dqkv)
    long kv_at;   // offset of its key/value head's k there; its v is nkv * hs further
    long v_from_k; // nkv * hs
    long x_at;    // offset of the head in the sequence's row 0 of out / dout
    long per_row; // offset in lse / delta, whose row i is at per_row + i * nh
    const T* q;   // the head's q of the sequence's row i is q[i * stride + d]; k, v likewise
    const T* k;
    const T* v;

    __device__ HeadRows(const T* qkv, int t, int nh, int nkv, int hs, int head) {
        const long h = head, s = blockIdx.z;
        const long kv = h / (nh / nkv);
        width = static_cast<long>(nh) * hs;
        stride = static_cast<long>(nh + 2 * nkv) * hs;
        v_from_k = static_cast<long>(nkv) * hs;
        qkv_at = s * t * stride + h * hs;
        kv_at = s * t * stride + width + kv * hs;
        x_at = s * t * width + h * hs;
        per_row = s * t * nh + h;
        q = qkv + qkv_at;
        k = qkv + kv_at;
        v = k + v_from_k;
    }
};

// Whether the launch's head counts are ones the kernels can index (the backend checks them).
__device__ __forceinline__ bool heads_ok(int nh, int nkv) { return nkv > 0 && nh % nkv == 0; }

// Calls `body<T, hs / 16>(args...)` for the supported head sizes.
#define ATTENTION_DISPATCH(body, hs, ...)        \
    switch (hs) {                                \
        case 32: body<T, 2>(__VA_ARGS__); break; \
        case 64: body<T, 4>(__VA_ARGS__); break; \
        case 80: body<T, 5>(__VA_ARGS__); break; \
        case 96: body<T, 6>(__VA_ARGS__); break; \
        case 128: body<T, 8>(__VA_ARGS__); break; \
        default: break;                          \
    }

// --- forward ---

// SHARED attention_fwd: 512 * hs
// (bytes: a K and a V tile, 64 x hs f32 each; 64 KiB at hs = 128)
//
// A block's 64 queries against the key tiles 0 .. up to its last query (causal), with an online
// softmax: per row a running max `m`, a running sum `total` of exp(score - m), and `acc` = the
// exp-weighted sum of v, all rescaled whenever the max grows. `out = acc / total`, `lse = m +
// log(total)`.
template <typename T, int G>
__device__ void attention_fwd_rows(T* out, float* lse, const T* qkv, int t, int nh, int nkv) {
    constexpr int HS = 16 * G;
    const HeadRows<T> head(qkv, t, nh, nkv, HS, blockIdx.y);
    const long stride = head.stride;
    float* k_tile = reinterpret_cast<float*>(attention_smem);
    float* v_tile = k_tile + ATTENTION_TILE * HS;
    const int q0 = blockIdx.x * ATTENTION_TILE;
    const int u = threadIdx.x % ATTENTION_LANES;
    const int i = q0 + threadIdx.x / ATTENTION_LANES;  // this quad's query
    // Rows past t still compute (on zeros) so that every lane takes part in the shuffles; they
    // never store.
    const bool valid = i < t;
    const float scale = 1.0f / sqrtf(static_cast<float>(HS));

    float4 q[G], acc[G];
    load_row<T, G>(q, valid ? head.q + i * stride : nullptr, u);
    zero_all(acc);
    float m = NEG_INF, total = 0.0f;
    const int end = min(t, q0 + ATTENTION_TILE);  // keys past the last query are never seen
    for (int k0 = 0; k0 < end; k0 += ATTENTION_TILE) {
        __syncthreads();  // everyone is done with the previous tiles
        load_tile<T, HS>(k_tile, head.k, stride, k0, t);
        load_tile<T, HS>(v_tile, head.v, stride, k0, t);
        __syncthreads();
        // The tile's keys in chunks, each a step of the online softmax: the chunk's scores live
        // in registers (a fully unrolled loop), and the rescaling costs one expf per chunk.
        // Chunks past the block's last query hold no visible key: skipped (block-uniform).
#pragma unroll 1
        for (int c0 = 0; c0 < ATTENTION_TILE && k0 + c0 < end; c0 += ATTENTION_CHUNK) {
            // Scaled scores of the visible keys (key <= query), -inf for the others.
            float score[ATTENTION_CHUNK];
            float chunk_max = NEG_INF;
#pragma unroll
            for (int c = 0; c < ATTENTION_CHUNK; ++c) {
                const int j = c0 + c;
                const float dot = quad_sum(partial_dot(q, k_tile + j * HS, u));
                score[c] = k0 + j <= i ? dot * scale : NEG_INF;
                chunk_max = fmaxf(chunk_max, score[c]);
            }
            // Every real query sees key 0 in its first chunk, so `m` is finite from then on; this
            // guard only keeps -inf - -inf (NaN) out of rows past t.
            const float new_max = fmaxf(m, chunk_max);
            if (new_max == NEG_INF) {
                continue;
            }
            const float correction = expf(m - new_max);  // 0 on the first chunk (m = -inf)
            scale_all(acc, correction);
            total *= correction;
            m = new_max;
            float chunk_sum = 0.0f;
#pragma unroll
            for (int c = 0; c < ATTENTION_CHUNK; ++c) {
                const float p = expf(score[c] - m);  // 0 for the hidden keys
                chunk_sum += p;
                add_scaled(acc, p, v_tile + (c0 + c) * HS, u);
            }
            total += chunk_sum;
        }
    }
    if (valid) {
        store_row<T, G>(out + head.x_at + i * head.width, acc, 1.0f / total, u);
        if (u == 0) {
            lse[head.per_row + static_cast<long>(i) * nh] = m + logf(total);
        }
    }
}

template <typename T>
__device__ void attention_fwd(T* out, float* lse, const T* qkv, int b, int t, int nh, int nkv,
                              int hs) {
    if (static_cast<int>(blockIdx.z) >= b || !heads_ok(nh, nkv)) {
        return;
    }
    ATTENTION_DISPATCH(attention_fwd_rows, hs, out, lse, qkv, t, nh, nkv)
}
TESSERA_EXPORT(256, attention_fwd,
               (T * out, float* lse, const T* qkv, int b, int t, int nh, int nkv, int hs),
               (out, lse, qkv, b, t, nh, nkv, hs))

// --- backward ---
//
// From p_ij = exp(q_i . k_j * scale - lse_i) and ds_ij = p_ij (dout_i . v_j - delta_i) scale,
// with delta_i = dout_i . out_i: dv_j = sum_i p_ij dout_i and dk_j = sum_i ds_ij q_i (one pass,
// blocks owning keys), then dq_i = sum_j ds_ij k_j (another, blocks owning queries). Each block
// writes only its own rows, so no atomics are needed, and every sum runs in index order.

// Launch E over n = rows * nh: `delta[row, h] = dout[row, h] . out[row, h]`, summed in order.
template <typename T>
__device__ void attention_bwd_delta(float* delta, const T* dout, const T* out, int rows, int nh,
                                    int hs) {
    const long n = static_cast<long>(rows) * nh;
    for (long k = grid_start(); k < n; k += grid_stride()) {
        // Head h of row `row` starts at (row * nh + h) * hs = k * hs.
        const long first = k * hs;
        float sum = 0.0f;
        for (int d = 0; d < hs; ++d) {
            sum += ld(dout, first + d) * ld(out, first + d);
        }
        delta[k] = sum;
    }
}
TESSERA_EXPORT(256, attention_bwd_delta,
               (float* delta, const T* dout, const T* out, int rows, int nh, int hs),
               (delta, dout, out, rows, nh, hs))

// SHARED attention_bwd_dkv: 512 * hs + 512
// (bytes: a Q and a dout tile, 64 x hs f32 each, and 64 f32 each of lse and delta; 64.5 KiB at
// hs = 128)
//
// A block's 64 keys of key/value head blockIdx.y (k, v and the dk, dv sums in registers)
// against, for each query head of its group in order, the query tiles from its first key to t;
// the queries of a tile are visited in order. Overwrites dk and dv in dqkv.
template <typename T, int G>
__device__ void attention_bwd_dkv_rows(T* dqkv, const T* qkv, const T* dout, const float* lse,
                                       const float* delta, int t, int nh, int nkv) {
    constexpr int HS = 16 * G;
    const int group = nh / nkv;
    const int first_head = blockIdx.y * group;
    // The group's first query head names the key/value rows (and strides) every head shares.
    const HeadRows<T> kv_rows(qkv, t, nh, nkv, HS, first_head);
    const long stride = kv_rows.stride;
    float* q_tile = reinterpret_cast<float*>(attention_smem);
    float* g_tile = q_tile + ATTENTION_TILE * HS;
    float* lse_tile = g_tile + ATTENTION_TILE * HS;
    float* delta_tile = lse_tile + ATTENTION_TILE;
    const int k0 = blockIdx.x * ATTENTION_TILE;
    const int u = threadIdx.x % ATTENTION_LANES;
    const int j = k0 + threadIdx.x / ATTENTION_LANES;  // this quad's key
    const bool valid = j < t;                           // rows past t compute but never store
    const float scale = 1.0f / sqrtf(static_cast<float>(HS));

    float4 k[G], v[G], dk[G], dv[G];
    load_row<T, G>(k, valid ? kv_rows.k + j * stride : nullptr, u);
    load_row<T, G>(v, valid ? kv_rows.v + j * stride : nullptr, u);
    zero_all(dk);
    zero_all(dv);
    for (int h = first_head; h < first_head + group; ++h) {
        const HeadRows<T> head(qkv, t, nh, nkv, HS, h);
        const T* douts = dout + head.x_at;
        // Queries before the block's first key see none of its keys.
        for (int first = k0; first < t; first += ATTENTION_TILE) {
            __syncthreads();  // everyone is done with the previous tiles
            load_tile<T, HS>(q_tile, head.q, stride, first, t);
            load_tile<T, HS>(g_tile, douts, head.width, first, t);
            if (threadIdx.x < ATTENTION_TILE) {
                const int i = first + threadIdx.x;
                const long at = head.per_row + static_cast<long>(i) * nh;
                lse_tile[threadIdx.x] = i < t ? lse[at] : 0.0f;
                delta_tile[threadIdx.x] = i < t ? delta[at] : 0.0f;
            }
            __syncthreads();
            // Query rows past t are skipped (block-uniform, so the shuffles stay whole).
            for (int r = 0; r < ATTENTION_TILE && first + r < t; ++r) {
                const int i = first + r;
                const float* q_row = q_tile + r * HS;
                const float* g_row = g_tile + r * HS;
                const float score = quad_sum(partial_dot(k, q_row, u));
                const float dp = quad_sum(partial_dot(v, g_row, u));
                if (j <= i) {  // the query sees the key (so the key is real too)
                    const float p = expf(score * scale - lse_tile[r]);
                    const float ds = p * (dp - delta_tile[r]) * scale;
                    add_scaled(dv, p, g_row, u);
                    add_scaled(dk, ds, q_row, u);
                }
            }
        }
    }
    if (valid) {
        T* row = dqkv + kv_rows.kv_at + j * stride;  // dqkv has qkv's layout
        store_row<T, G>(row, dk, 1.0f, u);
        store_row<T, G>(row + kv_rows.v_from_k, dv, 1.0f, u);
    }
}

template <typename T>
__device__ void attention_bwd_dkv(T* dqkv, const T* qkv, const T* dout, const float* lse,
                                  const float* delta, int b, int t, int nh, int nkv, int hs) {
    if (static_cast<int>(blockIdx.z) >= b || !heads_ok(nh, nkv)) {
        return;
    }
    ATTENTION_DISPATCH(attention_bwd_dkv_rows, hs, dqkv, qkv, dout, lse, delta, t, nh, nkv)
}
TESSERA_EXPORT(256, attention_bwd_dkv,
               (T * dqkv, const T* qkv, const T* dout, const float* lse, const float* delta, int b,
                int t, int nh, int nkv, int hs),
               (dqkv, qkv, dout, lse, delta, b, t, nh, nkv, hs))

// SHARED attention_bwd_dq: 512 * hs
// (bytes: a K and a V tile, 64 x hs f32 each; 64 KiB at hs = 128)
//
// A block's 64 queries (q, dout, lse, delta and the dq sum in registers) against the key tiles
// 0 .. up to its last query, keys in order. Overwrites dq in dqkv.
template <typename T, int G>
__device__ void attention_bwd_dq_rows(T* dqkv, const T* qkv, const T* dout, const float* lse,
                                      const float* delta, int t, int nh, int nkv) {
    constexpr int HS = 16 * G;
    const HeadRows<T> head(qkv, t, nh, nkv, HS, blockIdx.y);
    const long stride = head.stride;
    float* k_tile = reinterpret_cast<float*>(attention_smem);
    float* v_tile = k_tile + ATTENTION_TILE * HS;
    const int q0 = blockIdx.x * ATTENTION_TILE;
    const int u = threadIdx.x % ATTENTION_LANES;
    const int i = q0 + threadIdx.x / ATTENTION_LANES;  // this quad's query
    const bool valid = i < t;                           // rows past t compute but never store
    const float scale = 1.0f / sqrtf(static_cast<float>(HS));

    float4 q[G], g[G], dq[G];
    load_row<T, G>(q, valid ? head.q + i * stride : nullptr, u);
    load_row<T, G>(g, valid ? dout + head.x_at + i * head.width : nullptr, u);
    zero_all(dq);
    const long at = head.per_row + static_cast<long>(i) * nh;
    const float lse_i = valid ? lse[at] : 0.0f;
    const float delta_i = valid ? delta[at] : 0.0f;
    const int end = min(t, q0 + ATTENTION_TILE);  // keys past the last query are never seen
    for (int k0 = 0; k0 < end; k0 += ATTENTION_TILE) {
        __syncthreads();  // everyone is done with the previous tiles
        load_tile<T, HS>(k_tile, head.k, stride, k0, t);
        load_tile<T, HS>(v_tile, head.v, stride, k0, t);
        __syncthreads();
        // Keys past the block's last query are hidden from all its rows: skipped
        // (block-uniform, so the shuffles stay whole).
        for (int r = 0; r < ATTENTION_TILE && k0 + r < end; ++r) {
            const int j = k0 + r;
            const float* k_row = k_tile + r * HS;
            const float score = quad_sum(partial_dot(q, k_row, u));
            const float dp = quad_sum(partial_dot(g, v_tile + r * HS, u));
            if (j <= i && valid) {  // the query sees the key (so the key is real too)
                const float p = expf(score * scale - lse_i);
                const float ds = p * (dp - delta_i) * scale;
                add_scaled(dq, ds, k_row, u);
            }
        }
    }
    if (valid) {
        store_row<T, G>(dqkv + head.qkv_at + i * stride, dq, 1.0f, u);
    }
}

template <typename T>
__device__ void attention_bwd_dq(T* dqkv, const T* qkv, const T* dout, const float* lse,
                                 const float* delta, int b, int t, int nh, int nkv, int hs) {
    if (static_cast<int>(blockIdx.z) >= b || !heads_ok(nh, nkv)) {
        return;
    }
    ATTENTION_DISPATCH(attention_bwd_dq_rows, hs, dqkv, qkv, dout, lse, delta, t, nh, nkv)
}
TESSERA_EXPORT(256, attention_bwd_dq,
               (T * dqkv, const T* qkv, const T* dout, const float* lse, const float* delta, int b,
                int t, int nh, int nkv, int hs),
               (dqkv, qkv, dout, lse, delta, b, t, nh, nkv, hs))

// --- decoding: one new query row per sequence against the kept q|k|v ---

// One block per (sequence, query head), a thread per output channel (strided): each thread
// runs the online softmax over keys 0..=pos on its own, recomputing the scores (a decoding
// step of one sequence is small; this keeps the kernel free of shared memory and barriers).
template <typename T>
__device__ void decode_attention(T* out, const T* qkv, int t, int nh, int nkv, int hs, int pos) {
    const int b = blockIdx.x / nh, h = blockIdx.x % nh;
    const int g = h / (nh / nkv);
    const long stride = static_cast<long>(nh + 2 * nkv) * hs;
    const long base = static_cast<long>(b) * t;
    const T* q = qkv + (base + pos) * stride + static_cast<long>(h) * hs;
    const float scale = 1.0f / sqrtf(static_cast<float>(hs));
    for (int d = threadIdx.x; d < hs; d += blockDim.x) {
        float m = -3.0e38f, l = 0.0f, acc = 0.0f;
        for (int j = 0; j <= pos; ++j) {
            const T* row = qkv + (base + j) * stride;
            const T* k = row + static_cast<long>(nh + g) * hs;
            float s = 0.0f;
            for (int e = 0; e < hs; ++e) s += ld(q, e) * ld(k, e);
            s *= scale;
            const float m2 = fmaxf(m, s);
            const float c = expf(m - m2), p = expf(s - m2);
            l = l * c + p;
            acc = acc * c + p * ld(row + static_cast<long>(nh + nkv + g) * hs, d);
            m = m2;
        }
        st(out, (base / t * nh + h) * hs + d, acc / l);
    }
}
TESSERA_EXPORT(128, decode_attention,
               (T * out, const T* qkv, int t, int nh, int nkv, int hs, int pos),
               (out, qkv, t, nh, nkv, hs, pos))
