// A tiny single-threaded CUDA emulator for checking the kernels' logic on the CPU (used by
// tests/kernel_emulator.rs; it is not a general CUDA emulator, only what our kernels use): every CUDA
// thread of a block is a fiber (ucontext); __syncthreads and shuffles are sync points where the
// scheduler runs every other fiber of the block up to the same point. A sync point reached by
// only some threads, or by threads at different kinds of sync, aborts (stricter than CUDA for
// shuffles: all block threads must shuffle together, which these kernels do).
#pragma once
#include <ucontext.h>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <vector>
#include <algorithm>
#include <functional>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(x)

template <typename A, typename B>
inline auto min(A a, B b) { return a < b ? a : b; }

inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }

inline unsigned short sim_f32_to_bf16(float x) {
    unsigned u; memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline unsigned short sim_f32_to_f16(float x) {
    _Float16 h = (_Float16)x; unsigned short b; memcpy(&b, &h, 2); return b;
}
inline float sim_f16_to_f32(unsigned short b) { _Float16 h; memcpy(&h, &b, 2); return (float)h; }

// --- the fiber scheduler ---
enum SyncKind { SYNC_NONE, SYNC_BLOCK, SYNC_SHUFFLE, SYNC_DONE };
struct Fiber { ucontext_t ctx; dim3 idx; SyncKind at; std::vector<char> stack; };
inline std::vector<Fiber> g_fibers;
inline ucontext_t g_sched;
inline int g_current;
inline std::vector<double> g_shfl;  // one slot per thread

inline void sim_yield(SyncKind kind) {
    g_fibers[g_current].at = kind;
    swapcontext(&g_fibers[g_current].ctx, &g_sched);
}
inline void __syncthreads() { sim_yield(SYNC_BLOCK); }

template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int offset) {
    int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    g_shfl[tid] = (double)v;  // exact for float and double
    sim_yield(SYNC_SHUFFLE);
    int lane = tid % 32, partner = (tid - lane) + (lane ^ offset);
    V r = (V)g_shfl[partner];
    sim_yield(SYNC_SHUFFLE);
    return r;
}

inline std::function<void()>* g_body;
inline void fiber_entry() {
    (*g_body)();
    g_fibers[g_current].at = SYNC_DONE;
    swapcontext(&g_fibers[g_current].ctx, &g_sched);
}

template <typename F, typename... Args>
void launch(F kernel, dim3 grid, dim3 block, Args... args) {
    gridDim = grid; blockDim = block;
    int n = block.x * block.y * block.z;
    std::function<void()> body = [&]() { kernel(args...); };
    g_body = &body;
    g_shfl.assign(n, 0.0);
    for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        g_fibers.assign(n, Fiber{});
        for (int t = 0; t < n; ++t) {
            Fiber& f = g_fibers[t];
            f.idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            f.stack.resize(128 * 1024);
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack.data();
            f.ctx.uc_stack.ss_size = f.stack.size();
            f.ctx.uc_link = nullptr;
            makecontext(&f.ctx, fiber_entry, 0);
            f.at = SYNC_NONE;
        }
        while (true) {
            for (int t = 0; t < n; ++t) {
                if (g_fibers[t].at == SYNC_DONE) continue;
                g_current = t;
                threadIdx = g_fibers[t].idx;
                swapcontext(&g_sched, &g_fibers[t].ctx);
            }
            SyncKind k = g_fibers[0].at;
            for (int t = 1; t < n; ++t) {
                if (g_fibers[t].at != k) {
                    fprintf(stderr, "divergent sync in block (%u,%u,%u): thread 0 at %d, thread %d at %d\n",
                            bx, by, bz, k, t, g_fibers[t].at);
                    abort();
                }
            }
            if (k == SYNC_DONE) break;
        }
    }
}
