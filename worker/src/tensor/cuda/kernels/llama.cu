// Compiled after common.cuh (the backend concatenates them), so it includes nothing itself.
//
// Llama's kernels besides attention (grouped-query attention is in attention.cu): RMSNorm,
// rotary position embeddings and SwiGLU, checked against the CPU's cpu/llama.rs. Each output
// element is computed by one thread with the operations of llama.rs, and every sum runs in a
// fixed order, so results are deterministic.

// --- RMSNorm ---

// Launch ROW(256): one block per row. `rstd = 1 / sqrt(mean(x^2) + eps)`, `out = x * rstd *
// weight` (Hugging Face's LlamaRMSNorm in f32). Saves `rstd`.
template <typename T>
__device__ void rmsnorm_fwd(T* out, float* rstd, const T* inp, const T* weight, int rows, int c,
                            float eps) {
    const int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const T* x = inp + static_cast<long>(row) * c;
    float squares = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        const float v = ld(x, j);
        squares += v * v;
    }
    const float s = 1.0f / sqrtf(block_sum(squares) / c + eps);
    T* y = out + static_cast<long>(row) * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        st(y, j, ld(x, j) * s * ld(weight, j));
    }
    if (threadIdx.x == 0) {
        rstd[row] = s;
    }
}
TESSERA_EXPORT(256, rmsnorm_fwd,
               (T * out, float* rstd, const T* inp, const T* weight, int rows, int c, float eps),
               (out, rstd, inp, weight, rows, c, eps))

// Launch ROW(256): `dinp += rstd * (dxhat - xhat * mean(dxhat * xhat))` with `xhat = x * rstd`,
// `dxhat = dout * weight` (adds: dinp is the residual stream's gradient).
template <typename T>
__device__ void rmsnorm_bwd_dinp(T* dinp, const T* dout, const T* inp, const T* weight,
                                 const float* rstd, int rows, int c) {
    const int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const long offset = static_cast<long>(row) * c;
    const T* x = inp + offset;
    const T* dy = dout + offset;
    T* dx = dinp + offset;
    const float s = rstd[row];
    float dnorm_norm_sum = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        dnorm_norm_sum += ld(dy, j) * ld(weight, j) * (ld(x, j) * s);
    }
    const float dnorm_norm_mean = block_sum(dnorm_norm_sum) / c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        const float xhat = ld(x, j) * s;
        const float dxhat = ld(dy, j) * ld(weight, j);
        st(dx, j, ld(dx, j) + (dxhat - xhat * dnorm_norm_mean) * s);
    }
}
TESSERA_EXPORT(256, rmsnorm_bwd_dinp,
               (T * dinp, const T* dout, const T* inp, const T* weight, const float* rstd, int rows,
                int c),
               (dinp, dout, inp, weight, rstd, rows, c))

// Launch COLUMNS (common.cuh): `dweight += sum over rows of dout * (x * rstd)`.
template <typename T>
__device__ void rmsnorm_bwd_weight(T* dweight, const T* dout, const T* inp, const float* rstd,
                                   int rows, int c) {
    __shared__ float partial[COLUMN_SPLIT][COLUMN_TILE];
    const int col = blockIdx.x * COLUMN_TILE + threadIdx.x;
    float dw = 0.0f;
    if (col < c) {
        for (int row = threadIdx.y; row < rows; row += COLUMN_SPLIT) {
            const long i = static_cast<long>(row) * c + col;
            dw += ld(dout, i) * (ld(inp, i) * rstd[row]);
        }
    }
    const float total = column_total(partial, dw);
    if (threadIdx.y == 0 && col < c) {
        st(dweight, col, ld(dweight, col) + total);
    }
}
TESSERA_EXPORT(COLUMN_TILE * COLUMN_SPLIT, rmsnorm_bwd_weight,
               (T * dweight, const T* dout, const T* inp, const float* rstd, int rows, int c),
               (dweight, dout, inp, rstd, rows, c))

// --- rotary position embeddings (Hugging Face's rotate-half layout) ---
//
// `qkv (rows, (nh + 2 nkv) hs)` as attention.cu lays it out; the nh query heads and the nkv key
// heads after them are rotated in place, the value heads are not touched. A row's position is
// its index mod t; `table (t_max, hs)` f32 holds each position's cos (first hs / 2) and sin
// (last hs / 2). Launch E over rows * (nh + nkv) * hs / 2 pairs, one thread per pair
// (x[j], x[j + hs/2]). The products and sums are explicitly rounded (no fused multiply-add), so
// the rotation has the bits of the CPU's and of PyTorch's `q * cos + rotate_half(q) * sin`.
// `sign` is 1 for the forward, -1 for the backward's transposed rotation.
template <typename T>
__device__ __forceinline__ void rope_rotate(T* qkv, const float* table, int rows, int t, int nh,
                                            int nkv, int hs, float sign) {
    const int half = hs / 2;
    const long pairs_per_row = static_cast<long>(nh + nkv) * half;
    const long stride = static_cast<long>(nh + 2 * nkv) * hs;
    const long n = rows * pairs_per_row;
    for (long k = grid_start(); k < n; k += grid_stride()) {
        const long row = k / pairs_per_row;
        const int in_row = static_cast<int>(k % pairs_per_row);
        const int head = in_row / half, j = in_row % half;
        const float* angles = table + (row % t) * hs;
        const float cosine = angles[j];
        const float sine = sign * angles[half + j];
        T* x = qkv + row * stride + static_cast<long>(head) * hs;
        const float a = ld(x, j), b = ld(x, j + half);
        st(x, j, __fsub_rn(__fmul_rn(a, cosine), __fmul_rn(b, sine)));
        st(x, j + half, __fadd_rn(__fmul_rn(b, cosine), __fmul_rn(a, sine)));
    }
}

template <typename T>
__device__ void rope_fwd(T* qkv, const float* table, int rows, int t, int nh, int nkv, int hs) {
    rope_rotate(qkv, table, rows, t, nh, nkv, hs, 1.0f);
}
TESSERA_EXPORT(256, rope_fwd,
               (T * qkv, const float* table, int rows, int t, int nh, int nkv, int hs),
               (qkv, table, rows, t, nh, nkv, hs))

template <typename T>
__device__ void rope_bwd(T* dqkv, const float* table, int rows, int t, int nh, int nkv, int hs) {
    rope_rotate(dqkv, table, rows, t, nh, nkv, hs, -1.0f);
}
TESSERA_EXPORT(256, rope_bwd,
               (T * dqkv, const float* table, int rows, int t, int nh, int nkv, int hs),
               (dqkv, table, rows, t, nh, nkv, hs))

// --- SwiGLU ---
//
// Each row of `inp (rows, 2f)` is [gate (f) | up (f)]. Launch E over the n = rows * f outputs.

__device__ __forceinline__ float swiglu_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// PyTorch's SiLU formula, x / (1 + e^-x).
__device__ __forceinline__ float swiglu_silu(float x) { return x / (1.0f + expf(-x)); }

// `out = silu(gate) * up`.
template <typename T>
__device__ void swiglu_fwd(T* out, const T* inp, long n, int f) {
    for (long k = grid_start(); k < n; k += grid_stride()) {
        const long at = (k / f) * 2 * f + k % f;
        st(out, k, swiglu_silu(ld(inp, at)) * ld(inp, at + f));
    }
}
TESSERA_EXPORT(256, swiglu_fwd, (T * out, const T* inp, long n, int f), (out, inp, n, f))

// Overwrites `dinp = [dgate | dup]`: `dgate = dout * up * s (1 + g (1 - s))` with `s =
// sigmoid(g)`, `dup = dout * silu(g)`.
template <typename T>
__device__ void swiglu_bwd(T* dinp, const T* dout, const T* inp, long n, int f) {
    for (long k = grid_start(); k < n; k += grid_stride()) {
        const long at = (k / f) * 2 * f + k % f;
        const float g = ld(inp, at), u = ld(inp, at + f), dy = ld(dout, k);
        const float s = swiglu_sigmoid(g);
        st(dinp, at, dy * u * (s * (1.0f + g * (1.0f - s))));
        st(dinp, at + f, dy * swiglu_silu(g));
    }
}
TESSERA_EXPORT(256, swiglu_bwd, (T * dinp, const T* dout, const T* inp, long n, int f),
               (dinp, dout, inp, n, f))
