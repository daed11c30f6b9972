// Compiled after common.cuh (the backend concatenates them), so it includes nothing itself.
//
// LayerNorm over the last dimension, eps 1e-5 (ops.rs's `layernorm_fwd` / `layernorm_bwd`), and
// the column sum the matmul backward uses for its bias gradient.

#define LAYERNORM_EPS 1e-5f

// Launch ROW(256): one block per row. Mean first, then the variance as the mean of squared
// deviations (two passes, as ops.rs: E[x^2] - mean^2 cancels badly). Saves `mean` and `rstd`.
template <typename T>
__device__ void layernorm_fwd(T* out, float* mean, float* rstd, const T* inp, const T* weight,
                              const T* bias, int rows, int c) {
    const int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const T* x = inp + static_cast<long>(row) * c;
    float sum = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        sum += ld(x, j);
    }
    const float mu = block_sum(sum) / c;
    float squares = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        const float d = ld(x, j) - mu;
        squares += d * d;
    }
    const float var = block_sum(squares) / c;
    const float s = 1.0f / sqrtf(var + LAYERNORM_EPS);
    T* y = out + static_cast<long>(row) * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        const float xhat = (ld(x, j) - mu) * s;
        st(y, j, xhat * ld(weight, j) + ld(bias, j));
    }
    if (threadIdx.x == 0) {
        mean[row] = mu;
        rstd[row] = s;
    }
}
TESSERA_EXPORT(256, layernorm_fwd,
               (T * out, float* mean, float* rstd, const T* inp, const T* weight, const T* bias,
                int rows, int c),
               (out, mean, rstd, inp, weight, bias, rows, c))

// Launch ROW(256): `dinp += rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))` with
// `dxhat = dout * weight` (adds: dinp is the residual stream's gradient).
template <typename T>
__device__ void layernorm_bwd_dinp(T* dinp, const T* dout, const T* inp, const T* weight,
                                   const float* mean, const float* rstd, int rows, int c) {
    const int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const long offset = static_cast<long>(row) * c;
    const T* x = inp + offset;
    const T* dy = dout + offset;
    T* dx = dinp + offset;
    const float mu = mean[row], s = rstd[row];
    float dnorm_sum = 0.0f, dnorm_norm_sum = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        const float xhat = (ld(x, j) - mu) * s;
        const float dxhat = ld(dy, j) * ld(weight, j);
        dnorm_sum += dxhat;
        dnorm_norm_sum += dxhat * xhat;
    }
    const float dnorm_mean = block_sum(dnorm_sum) / c;
    const float dnorm_norm_mean = block_sum(dnorm_norm_sum) / c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        const float xhat = (ld(x, j) - mu) * s;
        const float dxhat = ld(dy, j) * ld(weight, j);
        st(dx, j, ld(dx, j) + (dxhat - dnorm_mean - xhat * dnorm_norm_mean) * s);
    }
}
TESSERA_EXPORT(256, layernorm_bwd_dinp,
               (T * dinp, const T* dout, const T* inp, const T* weight, const float* mean,
                const float* rstd, int rows, int c),
               (dinp, dout, inp, weight, mean, rstd, rows, c))

// Launch COLUMNS (common.cuh): `dweight += sum over rows of dout * xhat`, `dbias += sum over rows
// of dout`.
template <typename T>
__device__ void layernorm_bwd_params(T* dweight, T* dbias, const T* dout, const T* inp,
                                     const float* mean, const float* rstd, int rows, int c) {
    __shared__ float dw_partial[COLUMN_SPLIT][COLUMN_TILE];
    __shared__ float db_partial[COLUMN_SPLIT][COLUMN_TILE];
    const int col = blockIdx.x * COLUMN_TILE + threadIdx.x;
    float dw = 0.0f, db = 0.0f;
    if (col < c) {
        for (int row = threadIdx.y; row < rows; row += COLUMN_SPLIT) {
            const long i = static_cast<long>(row) * c + col;
            const float g = ld(dout, i);
            const float xhat = (ld(inp, i) - mean[row]) * rstd[row];
            dw += g * xhat;
            db += g;
        }
    }
    const float dw_total = column_total(dw_partial, dw);
    const float db_total = column_total(db_partial, db);
    if (threadIdx.y == 0 && col < c) {
        st(dweight, col, ld(dweight, col) + dw_total);
        st(dbias, col, ld(dbias, col) + db_total);
    }
}
TESSERA_EXPORT(COLUMN_TILE * COLUMN_SPLIT, layernorm_bwd_params,
               (T * dweight, T* dbias, const T* dout, const T* inp, const float* mean,
                const float* rstd, int rows, int c),
               (dweight, dbias, dout, inp, mean, rstd, rows, c))

// `acc[j] += sum over rows of x[row, j]`: the matmul's bias gradient. Same launch as
// layernorm_bwd_params.
template <typename T>
__device__ void colsum_add(T* acc, const T* x, int rows, int cols) {
    __shared__ float partial[COLUMN_SPLIT][COLUMN_TILE];
    const int col = blockIdx.x * COLUMN_TILE + threadIdx.x;
    float sum = 0.0f;
    if (col < cols) {
        for (int row = threadIdx.y; row < rows; row += COLUMN_SPLIT) {
            sum += ld(x, static_cast<long>(row) * cols + col);
        }
    }
    const float total = column_total(partial, sum);
    if (threadIdx.y == 0 && col < cols) {
        st(acc, col, ld(acc, col) + total);
    }
}
TESSERA_EXPORT(COLUMN_TILE * COLUMN_SPLIT, colsum_add, (T * acc, const T* x, int rows, int cols),
               (acc, x, rows, cols))
