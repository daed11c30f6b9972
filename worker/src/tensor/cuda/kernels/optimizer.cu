// Compiled after common.cuh (the backend concatenates them), so it includes nothing itself.
//
// The optimizer's kernels: the gradient norm's sums of squares and AdamW (ops.rs's
// `sum_squares` and `adamw`).

// Grid = used, block 256: `partials[i]` = sum of g * g over grads[i * block_len .. min(n, (i + 1)
// * block_len)], accumulated in f64 (each thread over its strided elements in order, then the
// fixed block tree) and stored as f32. ops.rs's blocking: the host adds the partials in order.
template <typename T>
__device__ void sum_squares(const T* grads, float* partials, long n, long block_len, int used) {
    const int i = blockIdx.x;
    if (i >= used) {
        return;
    }
    const long begin = i * block_len;
    const long end = min(n, begin + block_len);
    double sum = 0.0;
    for (long k = begin + threadIdx.x; k < end; k += blockDim.x) {
        const double g = ld(grads, k);
        sum += g * g;
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) {
        partials[i] = static_cast<float>(sum);
    }
}
TESSERA_EXPORT(256, sum_squares,
               (const T* grads, float* partials, long n, long block_len, int used),
               (grads, partials, n, block_len, used))

// Launch E: one AdamW step per element, with ops.rs's operations in ops.rs's order. All arithmetic
// goes through the correctly rounded `_rn` intrinsics, which the compiler never fuses into FMAs
// whatever its flags, so f32 results are bit-identical to the CPU's (Rust does not contract
// either).
//
// With `master` the f32 master weight is updated and rounded into `param`; otherwise `param`
// itself. With `grad` null the gradient is `param`'s value, read before the new weight overwrites
// it (optimizer offload; the backend passes `master` then).
template <typename T>
__device__ void adamw(T* param, float* master, float* m, float* v, const T* grad, long n,
                      float lr, float beta1, float beta2, float eps, float weight_decay,
                      float bias_correction1, float bias_correction2, float grad_scale) {
    const float one_minus_beta1 = __fsub_rn(1.0f, beta1);
    const float one_minus_beta2 = __fsub_rn(1.0f, beta2);
    const float lr_decay = __fmul_rn(lr, weight_decay);
    for (long i = grid_start(); i < n; i += grid_stride()) {
        const float g = __fmul_rn(grad ? ld(grad, i) : ld(param, i), grad_scale);
        const float mi = __fadd_rn(__fmul_rn(beta1, m[i]), __fmul_rn(one_minus_beta1, g));
        const float vi =
            __fadd_rn(__fmul_rn(beta2, v[i]), __fmul_rn(__fmul_rn(one_minus_beta2, g), g));
        m[i] = mi;
        v[i] = vi;
        const float m_hat = __fdiv_rn(mi, bias_correction1);
        const float v_hat = __fdiv_rn(vi, bias_correction2);
        float p = master ? master[i] : ld(param, i);
        p = __fsub_rn(p, __fmul_rn(lr_decay, p));
        p = __fsub_rn(p, __fdiv_rn(__fmul_rn(lr, m_hat), __fadd_rn(__fsqrt_rn(v_hat), eps)));
        if (master) {
            master[i] = p;
        }
        st(param, i, p);
    }
}
TESSERA_EXPORT(256, adamw,
               (T * param, float* master, float* m, float* v, const T* grad, long n, float lr,
                float beta1, float beta2, float eps, float weight_decay, float bias_correction1,
                float bias_correction2, float grad_scale),
               (param, master, m, v, grad, n, lr, beta1, beta2, eps, weight_decay,
                bias_correction1, bias_correction2, grad_scale))
