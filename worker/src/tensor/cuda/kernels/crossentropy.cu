// Compiled after common.cuh (the backend concatenates them), so it includes nothing itself.
//
// Softmax cross-entropy over rows of `vp` logits (ops.rs's `crossentropy_*`), all launched
// ROW(1024): one block per row, threads striding over the columns (vp can be 50304 or more), each
// thread summing its columns in order, then a fixed-shape block reduction.

// The row's largest logit among columns [0, n), to every thread. fmaxf ignores NaN like f32::max.
template <typename T>
__device__ __forceinline__ float row_max(const T* row, int n) {
    float m = NEG_INF;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        m = fmaxf(m, ld(row, j));
    }
    return block_max(m);
}

// The row's sum of exp(l - m) over columns [0, n), to every thread.
template <typename T>
__device__ __forceinline__ float row_sumexp(const T* row, int n, float m) {
    float sum = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        sum += expf(ld(row, j) - m);
    }
    return block_sum(sum);
}

// Logits become `(softmax - onehot(target)) * dloss` over columns [0, real) and 0 over
// [real, vp). `target` is the column of the target, or -1 when this row has none. Each thread
// reads and writes only its own columns.
template <typename T>
__device__ __forceinline__ void row_dlogits(T* row, int vp, int real, int target, float m,
                                            float sum, float dloss) {
    for (int j = threadIdx.x; j < vp; j += blockDim.x) {
        float g = 0.0f;
        if (j < real) {
            const float p = expf(ld(row, j) - m) / sum;
            const float onehot = j == target ? 1.0f : 0.0f;
            g = (p - onehot) * dloss;
        }
        st(row, j, g);
    }
}

// The whole vocabulary on this rank: `v` real columns of `vp`. `loss = max + log(sumexp) -
// logit[target]`; saves `max` and `sumexp`; the logits become the gradient (in place). A target
// outside [0, v) (which the CPU would reject) gives a NaN loss rather than a read out of bounds.
template <typename T>
__device__ void crossentropy_fwd_bwd(T* logits, float* losses, float* max, float* sumexp,
                                     const int* targets, float dloss, int rows, int v, int vp) {
    const int r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    T* row = logits + static_cast<long>(r) * vp;
    const int target = targets[r];
    const bool target_ok = target >= 0 && target < v;
    const float m = row_max(row, v);
    // Read before the barrier inside row_sumexp: after it, other threads overwrite the logits.
    const float picked = target_ok ? ld(row, target) : __int_as_float(0x7fc00000);
    const float sum = row_sumexp(row, v, m);
    if (threadIdx.x == 0) {
        losses[r] = m + logf(sum) - picked;
        max[r] = m;
        sumexp[r] = sum;
    }
    row_dlogits(row, vp, v, target_ok ? target : -1, m, sum, dloss);
}
TESSERA_EXPORT(1024, crossentropy_fwd_bwd,
               (T * logits, float* losses, float* max, float* sumexp, const int* targets,
                float dloss, int rows, int v, int vp),
               (logits, losses, max, sumexp, targets, dloss, rows, v, vp))

// The vocabulary split over tensor-parallel ranks: this rank holds ids `vocab_start ..
// vocab_start + vp`, of which the first `real` columns are real tokens (Dims::real_vocab).

// The target's column on this rank, or -1 when another rank holds it (or it is padding).
__device__ __forceinline__ int local_target(int target, int vocab_start, int real) {
    const long local = static_cast<long>(target) - vocab_start;
    return local >= 0 && local < real ? static_cast<int>(local) : -1;
}

// Step 1: `max[row]` = the largest logit among this rank's real columns (-inf if it has none).
template <typename T>
__device__ void crossentropy_max(const T* logits, float* max, int rows, int vp, int real) {
    const int r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    const float m = row_max(logits + static_cast<long>(r) * vp, real);
    if (threadIdx.x == 0) {
        max[r] = m;
    }
}
TESSERA_EXPORT(1024, crossentropy_max, (const T* logits, float* max, int rows, int vp, int real),
               (logits, max, rows, vp, real))

// Step 2, `max` being the maximum over all ranks: `sumexp[row]` = sum of exp(l - max) over this
// rank's real columns; `picked[row]` = the target's logit if this rank holds it, else 0.
template <typename T>
__device__ void crossentropy_sumexp(const T* logits, float* picked, const float* max,
                                    float* sumexp, const int* targets, int rows, int vp, int real,
                                    int vocab_start) {
    const int r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    const T* row = logits + static_cast<long>(r) * vp;
    const float sum = row_sumexp(row, real, max[r]);
    if (threadIdx.x == 0) {
        const int target = local_target(targets[r], vocab_start, real);
        sumexp[r] = sum;
        picked[r] = target >= 0 ? ld(row, target) : 0.0f;
    }
}
TESSERA_EXPORT(1024, crossentropy_sumexp,
               (const T* logits, float* picked, const float* max, float* sumexp,
                const int* targets, int rows, int vp, int real, int vocab_start),
               (logits, picked, max, sumexp, targets, rows, vp, real, vocab_start))

// Step 3, `sumexp` and `losses` (the picked logits) summed over all ranks: `losses = max +
// log(sumexp) - losses` in place, and the logits become the gradient, 0 in the padding.
template <typename T>
__device__ void crossentropy_finish(T* logits, float* losses, const float* max,
                                    const float* sumexp, const int* targets, float dloss, int rows,
                                    int vp, int real, int vocab_start) {
    const int r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    const float m = max[r], sum = sumexp[r];
    if (threadIdx.x == 0) {
        losses[r] = m + logf(sum) - losses[r];
    }
    row_dlogits(logits + static_cast<long>(r) * vp, vp, real,
                local_target(targets[r], vocab_start, real), m, sum, dloss);
}
TESSERA_EXPORT(1024, crossentropy_finish,
               (T * logits, float* losses, const float* max, const float* sumexp,
                const int* targets, float dloss, int rows, int vp, int real, int vocab_start),
               (logits, losses, max, sumexp, targets, dloss, rows, vp, real, vocab_start))
