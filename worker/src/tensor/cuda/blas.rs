//! Matrix products through cuBLASLt, on raw device pointers of the arena.
//!
//! cuBLAS is column-major and our tensors are row-major: a row-major `(r, c)` matrix is a
//! column-major `(c, r)` one, so every product is written for the transposes (see
//! [`Gemm`]'s callers in `super`). Storage is f32, bf16 or f16 with f32 accumulation
//! (`CUBLAS_COMPUTE_32F`: full fp32 for f32 storage, so the CUDA backend agrees with the CPU
//! one). Descriptors, layouts and the heuristic's algorithm are made once per shape and kept:
//! cudarc's safe wrapper rebuilds them and reruns the heuristic on every call.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::CudaStream;
use tessera_plan::memory::{CUBLASLT_WORKSPACE_BYTES, Dtype};

use super::DeviceMemory;
use crate::error::{Error, Result};

/// `d (m, n) = alpha op(a) op(b) + beta d (+ bias (m) per row)`, column-major, with `op(a)`
/// `(m, k)` and `op(b)` `(k, n)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Gemm {
    pub transa: bool,
    pub transb: bool,
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub lda: i64,
    pub ldb: i64,
    pub ldd: i64,
    pub dtype: Dtype,
    pub bias: bool,
    /// Accumulate into `d` (beta 1) instead of overwriting it (beta 0).
    pub accumulate: bool,
}

/// The cached plan of one shape: descriptor, layouts and algorithm.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

pub struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: DeviceMemory,
    /// Keyed by shape and the pointers' alignment (the heuristic picks by both).
    plans: HashMap<(Gemm, [u32; 3]), Plan>,
    /// Last: it may hold the last reference to the context the rest lives in.
    stream: Arc<CudaStream>,
}

fn blas_error(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda {
        what: format!("cuBLASLt {what} failed: {e:?}"),
        help: "a CUDA error poisons the process; the lines before this one may say why (out of \
               memory, a bad kernel)"
            .into(),
    }
}

fn data_type(dtype: Dtype) -> Result<sys::cudaDataType> {
    Ok(match dtype {
        Dtype::F32 => sys::cudaDataType::CUDA_R_32F,
        Dtype::Bf16 => sys::cudaDataType::CUDA_R_16BF,
        Dtype::F16 => sys::cudaDataType::CUDA_R_16F,
        other => {
            return Err(Error::Unsupported {
                what: format!("matmul on {} tensors", other.name()),
                help: "this is a bug in tessera; please report it with your config".into(),
            });
        }
    })
}

/// The largest power of two up to 256 that divides `addr`: cuBLASLt picks kernels by it.
fn alignment(addr: u64) -> u32 {
    let bits = addr.trailing_zeros().min(8);
    1 << bits
}

impl Blas {
    /// Creates the handle and its workspace (the plan's `runtime.cublaslt_workspace` row).
    pub fn new(stream: Arc<CudaStream>) -> Result<Blas> {
        // SAFETY: only dlopens candidate names.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Cuda {
                what: format!(
                    "the cuBLASLt library could not be loaded; tried {}",
                    cudarc::get_lib_name_candidates("cublasLt").join(", ")
                ),
                help: "install cuBLAS for CUDA 13 (the CUDA toolkit, or `pip install \
                       nvidia-cublas` and put its nvidia/cu13/lib folder on LD_LIBRARY_PATH)"
                    .into(),
            });
        }
        let handle = lt::create_handle().map_err(|e| blas_error("cublasLtCreate", e))?;
        let workspace = DeviceMemory::new(stream.context(), CUBLASLT_WORKSPACE_BYTES as usize)?;
        Ok(Blas {
            handle,
            stream,
            workspace,
            plans: HashMap::new(),
        })
    }

    /// Runs `g` on device pointers `a`, `b`, `d` and `bias` (0 when `g.bias` is false).
    ///
    /// # Safety
    /// The pointers address arena memory of the sizes `g` implies, and `d` overlaps neither
    /// `a` nor `b`.
    pub unsafe fn gemm(&mut self, g: Gemm, a: u64, b: u64, d: u64, bias: u64) -> Result<()> {
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        let aligned = [alignment(a), alignment(b), alignment(d)];
        let key = (g, aligned);
        if !self.plans.contains_key(&key) {
            let plan = self.plan(g, aligned)?;
            self.plans.insert(key, plan);
        }
        let plan = &self.plans[&key];
        if g.bias {
            // SAFETY: the descriptor is live; the attribute is a device pointer's value.
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &bias as *const u64 as *const c_void,
                    size_of::<u64>(),
                )
            }
            .map_err(|e| blas_error("setting the bias pointer", e))?;
        }
        let (alpha, beta) = (1.0f32, if g.accumulate { 1.0f32 } else { 0.0 });
        // SAFETY: the plan's objects are live; the pointers are the caller's contract; C and D
        // are the same matrix (in-place accumulation is allowed).
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                a as *const c_void,
                plan.a,
                b as *const c_void,
                plan.b,
                d as *const c_void,
                plan.d,
                d as *mut c_void,
                plan.d,
                &plan.algo,
                self.workspace.ptr as *mut c_void,
                self.workspace.bytes,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| blas_error("cublasLtMatmul", e))
    }

    fn plan(&self, g: Gemm, aligned: [u32; 3]) -> Result<Plan> {
        let ty = data_type(g.dtype)?;
        // cublasOperation_t as an int32: 1 is CUBLAS_OP_T, 0 CUBLAS_OP_N.
        let op = |t: bool| t as i32;
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| blas_error("cublasLtMatmulDescCreate", e))?;
        let set = |attr, value: *const c_void, size| {
            // SAFETY: `desc` is live; `value` points at `size` bytes.
            unsafe { lt::set_matmul_desc_attribute(desc, attr, value, size) }
                .map_err(|e| blas_error("cublasLtMatmulDescSetAttribute", e))
        };
        use sys::cublasLtMatmulDescAttributes_t as A;
        let (ta, tb) = (op(g.transa), op(g.transb));
        set(
            A::CUBLASLT_MATMUL_DESC_TRANSA,
            &ta as *const _ as _,
            size_of_val(&ta),
        )?;
        set(
            A::CUBLASLT_MATMUL_DESC_TRANSB,
            &tb as *const _ as _,
            size_of_val(&tb),
        )?;
        if g.bias {
            let epilogue = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
            set(
                A::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epilogue as *const _ as _,
                size_of_val(&epilogue),
            )?;
        }
        // Stored shapes: op(a) is (m, k), so a is (k, m) when transposed; likewise b.
        let (a_rows, a_cols) = if g.transa { (g.k, g.m) } else { (g.m, g.k) };
        let (b_rows, b_cols) = if g.transb { (g.n, g.k) } else { (g.k, g.n) };
        let layout = |rows, cols, ld| {
            lt::create_matrix_layout(ty, rows, cols, ld)
                .map_err(|e| blas_error("cublasLtMatrixLayoutCreate", e))
        };
        let a = layout(a_rows, a_cols, g.lda)?;
        let b = layout(b_rows, b_cols, g.ldb)?;
        let d = layout(g.m, g.n, g.ldd)?;
        let pref = lt::create_matmul_pref().map_err(|e| blas_error("preference", e))?;
        let pref_set = |attr, value: u64| {
            // SAFETY: `pref` is live; the value is the uint64 the attribute takes.
            unsafe {
                lt::set_matmul_pref_attribute(
                    pref,
                    attr,
                    &value as *const u64 as *const c_void,
                    size_of::<u64>(),
                )
            }
            .map_err(|e| blas_error("cublasLtMatmulPreferenceSetAttribute", e))
        };
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        pref_set(
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            self.workspace.bytes as u64,
        )?;
        for (attr, align) in [
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, aligned[0]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, aligned[1]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, aligned[2]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, aligned[2]),
        ] {
            // The alignment attributes are uint32.
            let value = align;
            // SAFETY: as above, with a u32.
            unsafe {
                lt::set_matmul_pref_attribute(
                    pref,
                    attr,
                    &value as *const u32 as *const c_void,
                    size_of::<u32>(),
                )
            }
            .map_err(|e| blas_error("cublasLtMatmulPreferenceSetAttribute", e))?;
        }
        // SAFETY: every object is live.
        let heuristic =
            unsafe { lt::get_matmul_algo_heuristic(self.handle, desc, a, b, d, d, pref) };
        // SAFETY: created above, not used again.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        let heuristic = heuristic.map_err(|e| {
            // SAFETY: created above, used by nothing else.
            unsafe {
                let _ = lt::destroy_matrix_layout(a);
                let _ = lt::destroy_matrix_layout(b);
                let _ = lt::destroy_matrix_layout(d);
                let _ = lt::destroy_matmul_desc(desc);
            }
            blas_error(
                &format!(
                    "finding an algorithm for a {}x{}x{} {} product",
                    g.m,
                    g.n,
                    g.k,
                    g.dtype.name()
                ),
                e,
            )
        })?;
        Ok(Plan {
            desc,
            a,
            b,
            d,
            algo: heuristic.algo,
        })
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        for plan in self.plans.values() {
            // SAFETY: each object was created for this plan and is destroyed once.
            unsafe {
                let _ = lt::destroy_matrix_layout(plan.a);
                let _ = lt::destroy_matrix_layout(plan.b);
                let _ = lt::destroy_matrix_layout(plan.d);
                let _ = lt::destroy_matmul_desc(plan.desc);
            }
        }
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0x1040), 64);
        assert_eq!(alignment(0x1001), 1);
    }
}
