// What every kernel file needs: the storage types, their conversions, launch helpers and
// deterministic reductions. The backend compiles this file and one `.cu` file concatenated with
// NVRTC, with no include path, so nothing here (or there) may #include anything.
//
// Conventions (see worker/src/tensor/mod.rs): storage is f32, bf16 or f16, arithmetic is f32;
// every kernel is a template over the storage type `T` with `extern "C"` entry points
// `<kernel>_f32`, `<kernel>_bf16`, `<kernel>_f16` (stamped out by `TESSERA_EXPORT`); results are
// deterministic: no float atomics, and every sum runs in a fixed order.

// --- storage types ---

// Raw 16-bit patterns. Plain structs rather than cuda_fp16.h / cuda_bf16.h, which would need an
// include path; all arithmetic goes through f32 anyway.
struct bf16 {
    unsigned short bits;
};
struct f16 {
    unsigned short bits;
};

__device__ __forceinline__ float to_f32(float x) { return x; }

// bf16 is the top half of an f32: widening is exact.
__device__ __forceinline__ float to_f32(bf16 x) {
    return __uint_as_float(static_cast<unsigned int>(x.bits) << 16);
}

__device__ __forceinline__ float to_f32(f16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

// Narrowing rounds to nearest even, as the `half` crate does on the CPU.
template <typename T>
__device__ __forceinline__ T from_f32(float x);

template <>
__device__ __forceinline__ float from_f32<float>(float x) {
    return x;
}

template <>
__device__ __forceinline__ bf16 from_f32<bf16>(float x) {
    bf16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}

template <>
__device__ __forceinline__ f16 from_f32<f16>(float x) {
    f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}

// Element `i` of a storage buffer as f32, and the store back.
template <typename T>
__device__ __forceinline__ float ld(const T* p, long i) {
    return to_f32(p[i]);
}

template <typename T>
__device__ __forceinline__ void st(T* p, long i, float x) {
    p[i] = from_f32<T>(x);
}

// --- entry points ---

// One `extern "C"` entry point (an unmangled name for cuModuleGetFunction) that runs the template
// `name<type>`. `params` is the parameter list written in terms of `T`: each entry point lives in
// its own namespace, where `T` names its storage type. `threads` is the block size the backend
// launches with, so the compiler never uses more registers than such a block can have.
#define TESSERA_EXPORT_ONE(threads, name, suffix, type, params, args)                  \
    namespace name##_##suffix##_entry {                                                \
    using T = type;                                                                    \
    extern "C" __global__ void __launch_bounds__(threads) name##_##suffix params {     \
        ::name<T> args;                                                                \
    }                                                                                  \
    }

// `name_f32`, `name_bf16` and `name_f16`.
#define TESSERA_EXPORT(threads, name, params, args)                \
    TESSERA_EXPORT_ONE(threads, name, f32, float, params, args)    \
    TESSERA_EXPORT_ONE(threads, name, bf16, bf16, params, args)    \
    TESSERA_EXPORT_ONE(threads, name, f16, f16, params, args)

// --- launch shapes ---

// The elementwise launch `E`: blocks of 256 and a grid capped at 65535 * 8 blocks, so every kernel
// launched that way walks its `long` range with a grid-stride loop.
__device__ __forceinline__ long grid_start() {
    return static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long grid_stride() {
    return static_cast<long>(gridDim.x) * blockDim.x;
}

// --- deterministic reductions ---

#define FULL_WARP 0xffffffffu

// -infinity, the identity of max (f32::NEG_INFINITY on the CPU).
#define NEG_INF (-__int_as_float(0x7f800000))

struct Sum {
    template <typename V>
    __device__ __forceinline__ V operator()(V a, V b) const {
        return a + b;
    }
};

struct Max {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// A butterfly over the 32 lanes of a warp: a fixed tree, so the same inputs give the same bits.
// Every lane of the warp must call it.
template <typename V, typename Op>
__device__ __forceinline__ V warp_reduce(V v, Op op) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
        v = op(v, __shfl_xor_sync(FULL_WARP, v, offset));
    }
    return v;
}

// Reduces one value per thread of a one-dimensional block whose size is a multiple of 32 (at most
// 1024), and returns the result to every thread. Each warp reduces its lanes with the butterfly,
// then every thread folds the warps' results in warp order: a fixed shape, so deterministic.
// Every thread of the block must call it (it synchronises); consecutive calls may share the
// scratch array, because the leading barrier waits for the previous call's readers.
template <typename V, typename Op>
__device__ V block_reduce(V v, Op op, V identity) {
    __shared__ V partials[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int warps = blockDim.x / 32;
    v = warp_reduce(v, op);
    __syncthreads();
    if (lane == 0) {
        partials[warp] = v;
    }
    __syncthreads();
    V result = identity;
    for (int w = 0; w < warps; ++w) {
        result = op(result, partials[w]);
    }
    return result;
}

__device__ __forceinline__ float block_sum(float v) { return block_reduce(v, Sum(), 0.0f); }

__device__ __forceinline__ double block_sum(double v) { return block_reduce(v, Sum(), 0.0); }

__device__ __forceinline__ float block_max(float v) { return block_reduce(v, Max(), NEG_INF); }

// Sums over rows, per column (launch COLUMNS): grid = ceil(cols / 32), block (32, 16). A block
// owns 32 columns; thread (x, y) sums rows y, y + 16, ... of column x in order (a warp reads 32
// adjacent columns of one row), then the 16 partial sums of each column are added in y order.
#define COLUMN_TILE 32
#define COLUMN_SPLIT 16

// Adds the block's 16 partial sums of column `col` (`partial[y][x]`, one per thread) in y order
// and returns the total to the threads with y = 0. Every thread must call it.
__device__ __forceinline__ float column_total(float (*partial)[COLUMN_TILE], float mine) {
    partial[threadIdx.y][threadIdx.x] = mine;
    __syncthreads();
    float total = 0.0f;
    if (threadIdx.y == 0) {
        for (int y = 0; y < COLUMN_SPLIT; ++y) {
            total += partial[y][threadIdx.x];
        }
    }
    return total;
}
