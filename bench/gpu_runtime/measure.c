/* Device memory the CUDA runtime pieces take outside tessera's arena: the CUDA context,
 * cuBLASLt and cuBLAS handles, and a single-rank NCCL communicator. Measured with NVML
 * (device-wide used bytes) before and after each step, on an otherwise idle GPU.
 * Built with plain gcc: the libraries are opened with dlopen, so no CUDA headers are needed.
 *   gcc -O2 -o measure measure.c -ldl
 * Prints one JSON object. Memory is reported in bytes. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct { unsigned long long total, free, used; } nvml_memory;
typedef struct { char internal[128]; } nccl_id;

static void *open_lib(const char *const *names) {
    for (int i = 0; names[i]; i++) {
        void *h = dlopen(names[i], RTLD_NOW | RTLD_GLOBAL);
        if (h) return h;
    }
    return NULL;
}

static void *sym(void *lib, const char *name) {
    void *f = lib ? dlsym(lib, name) : NULL;
    if (!f) { fprintf(stderr, "missing symbol %s\n", name); exit(1); }
    return f;
}

static int (*nvml_memory_info)(void *, nvml_memory *);
static void *device;

static unsigned long long used(void) {
    nvml_memory m;
    if (nvml_memory_info(device, &m)) { fprintf(stderr, "nvmlDeviceGetMemoryInfo failed\n"); exit(1); }
    return m.used;
}

int main(void) {
    const char *nvml_names[] = {"libnvidia-ml.so.1", NULL};
    const char *cuda_names[] = {"libcuda.so.1", NULL};
    const char *lt_names[] = {"libcublasLt.so.13", "/usr/local/cuda-13.0/lib64/libcublasLt.so.13", NULL};
    const char *blas_names[] = {"libcublas.so.13", "/usr/local/cuda-13.0/lib64/libcublas.so.13", NULL};
    const char *nccl_names[] = {"libnccl.so.2", "libnccl.so", NULL};
    void *nvml = open_lib(nvml_names), *cuda = open_lib(cuda_names);
    if (!nvml || !cuda) { fprintf(stderr, "no NVML or CUDA driver\n"); return 1; }
    ((int (*)(void))sym(nvml, "nvmlInit_v2"))();
    ((int (*)(unsigned, void **))sym(nvml, "nvmlDeviceGetHandleByIndex_v2"))(0, &device);
    nvml_memory_info = (int (*)(void *, nvml_memory *))sym(nvml, "nvmlDeviceGetMemoryInfo");

    unsigned long long base = used();
    int dev = 0;
    void *ctx = NULL;
    ((int (*)(unsigned))sym(cuda, "cuInit"))(0);
    ((int (*)(int *, int))sym(cuda, "cuDeviceGet"))(&dev, 0);
    if (((int (*)(void **, int))sym(cuda, "cuDevicePrimaryCtxRetain"))(&ctx, dev)) return 1;
    ((int (*)(void *))sym(cuda, "cuCtxSetCurrent"))(ctx);
    unsigned long long after_ctx = used();

    unsigned long long ptr = 0;
    ((int (*)(unsigned long long *, size_t))sym(cuda, "cuMemAlloc_v2"))(&ptr, 32u << 20);
    unsigned long long after_alloc = used();

    void *lt = NULL, *blas = NULL, *lt_lib = open_lib(lt_names), *blas_lib = open_lib(blas_names);
    long long lt_bytes = -1, blas_bytes = -1, nccl_bytes = -1, nccl_second = -1;
    if (lt_lib) {
        unsigned long long before = used();
        ((int (*)(void **))sym(lt_lib, "cublasLtCreate"))(&lt);
        lt_bytes = (long long)(used() - before);
    }
    if (blas_lib) {
        unsigned long long before = used();
        ((int (*)(void **))sym(blas_lib, "cublasCreate_v2"))(&blas);
        blas_bytes = (long long)(used() - before);
    }
    void *nccl = open_lib(nccl_names);
    if (nccl) {
        nccl_id id;
        void *comm = NULL;
        unsigned long long before = used();
        ((int (*)(nccl_id *))sym(nccl, "ncclGetUniqueId"))(&id);
        int (*init)(void **, int, nccl_id, int) = (int (*)(void **, int, nccl_id, int))sym(nccl, "ncclCommInitRank");
        if (init(&comm, 1, id, 0) == 0) nccl_bytes = (long long)(used() - before);
        /* A second communicator: what each one more costs once NCCL is loaded. */
        void *comm2 = NULL;
        before = used();
        ((int (*)(nccl_id *))sym(nccl, "ncclGetUniqueId"))(&id);
        if (init(&comm2, 1, id, 0) == 0) nccl_second = (long long)(used() - before);
    }
    printf("{\"baseline_used\": %llu, \"cuda_context\": %llu, \"alloc_32MiB\": %llu, "
           "\"cublaslt_create\": %lld, \"cublas_create\": %lld, \"nccl_first_comm_1rank\": %lld, "
           "\"nccl_second_comm_1rank\": %lld}\n",
           base, after_ctx - base, after_alloc - after_ctx, lt_bytes, blas_bytes, nccl_bytes, nccl_second);
    return 0;
}
