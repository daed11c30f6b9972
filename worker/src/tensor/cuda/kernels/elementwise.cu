// Compiled after common.cuh (the backend concatenates them), so it includes nothing itself.
//
// Element-wise kernels over flat buffers, all launched `E` (blocks of 256, grid-stride loop over
// `long` indices). Each element is computed by one thread with the operations of ops.rs.

// --- fill and conversion ---

template <typename T>
__device__ void fill(T* dst, float value, long n) {
    const T v = from_f32<T>(value);
    for (long i = grid_start(); i < n; i += grid_stride()) {
        dst[i] = v;
    }
}
TESSERA_EXPORT(256, fill, (T * dst, float value, long n), (dst, value, n))

extern "C" __global__ void __launch_bounds__(256) fill_i32(int* dst, int value, long n) {
    for (long i = grid_start(); i < n; i += grid_stride()) {
        dst[i] = value;
    }
}

// `dst = src`, through f32 (exact when widening; round to nearest even when narrowing).
template <typename D, typename S>
__device__ void convert(D* dst, const S* src, long n) {
    for (long i = grid_start(); i < n; i += grid_stride()) {
        st(dst, i, ld(src, i));
    }
}

#define TESSERA_CONVERT(s_name, S, d_name, D)                                                 \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        convert_##s_name##_to_##d_name(D* dst, const S* src, long n) {                         \
        convert<D, S>(dst, src, n);                                                            \
    }

TESSERA_CONVERT(f32, float, f32, float)
TESSERA_CONVERT(f32, float, bf16, bf16)
TESSERA_CONVERT(f32, float, f16, f16)
TESSERA_CONVERT(bf16, bf16, f32, float)
TESSERA_CONVERT(bf16, bf16, bf16, bf16)
TESSERA_CONVERT(bf16, bf16, f16, f16)
TESSERA_CONVERT(f16, f16, f32, float)
TESSERA_CONVERT(f16, f16, bf16, bf16)
TESSERA_CONVERT(f16, f16, f16, f16)

// --- arithmetic ---

// `dst *= factor`.
template <typename T>
__device__ void scale(T* dst, float factor, long n) {
    for (long i = grid_start(); i < n; i += grid_stride()) {
        st(dst, i, ld(dst, i) * factor);
    }
}
TESSERA_EXPORT(256, scale, (T * dst, float factor, long n), (dst, factor, n))

// `dst += src`.
template <typename T>
__device__ void add(T* dst, const T* src, long n) {
    for (long i = grid_start(); i < n; i += grid_stride()) {
        st(dst, i, ld(dst, i) + ld(src, i));
    }
}
TESSERA_EXPORT(256, add, (T * dst, const T* src, long n), (dst, src, n))

// `out = a + b`: the residual connection.
template <typename T>
__device__ void residual(T* out, const T* a, const T* b, long n) {
    for (long i = grid_start(); i < n; i += grid_stride()) {
        st(out, i, ld(a, i) + ld(b, i));
    }
}
TESSERA_EXPORT(256, residual, (T * out, const T* a, const T* b, long n), (out, a, b, n))

// --- GELU, tanh approximation (ops.rs's `gelu` and `gelu_grad`, with tanhf) ---

#define GELU_SCALE 0.7978846f  // sqrt(2 / pi)
#define GELU_CUBIC 0.044715f

__device__ __forceinline__ float gelu_value(float x) {
    return 0.5f * x * (1.0f + tanhf(GELU_SCALE * (x + GELU_CUBIC * x * x * x)));
}

__device__ __forceinline__ float gelu_grad(float x) {
    const float u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
    const float tanh_u = tanhf(u);
    const float sech2 = 1.0f - tanh_u * tanh_u;
    return 0.5f * (1.0f + tanh_u) +
           0.5f * x * sech2 * GELU_SCALE * (1.0f + 3.0f * GELU_CUBIC * x * x);
}

// `out = gelu(inp)`.
template <typename T>
__device__ void gelu_fwd(T* out, const T* inp, long n) {
    for (long i = grid_start(); i < n; i += grid_stride()) {
        st(out, i, gelu_value(ld(inp, i)));
    }
}
TESSERA_EXPORT(256, gelu_fwd, (T * out, const T* inp, long n), (out, inp, n))

// In place: `dinout *= gelu'(inp)`.
template <typename T>
__device__ void gelu_bwd(T* dinout, const T* inp, long n) {
    for (long i = grid_start(); i < n; i += grid_stride()) {
        st(dinout, i, ld(dinout, i) * gelu_grad(ld(inp, i)));
    }
}
TESSERA_EXPORT(256, gelu_bwd, (T * dinout, const T* inp, long n), (dinout, inp, n))
