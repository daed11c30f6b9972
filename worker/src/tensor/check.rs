//! What every backend checks before it runs an op: each handle's dtype and length for the op's
//! sizes, that it lies inside its arena, and that no output overlaps another argument. Written
//! once here so that the CPU and CUDA backends refuse the same calls with the same errors.

use tessera_plan::memory::{Dtype, Place};

use crate::error::{Error, Result};
use crate::tensor::{Dims, Linear, Tensor};

const F32: Dtype = Dtype::F32;

/// The sizes of a backend's two arenas, against which handles are checked.
#[derive(Debug, Clone, Copy)]
pub struct Checks {
    pub device: usize,
    pub host: usize,
}

/// Fails when an output overlaps any other argument of the same call.
pub fn disjoint(
    op: &'static str,
    outputs: &[(&'static str, Tensor)],
    inputs: &[(&'static str, Tensor)],
) -> Result<()> {
    for (i, &(name, out)) in outputs.iter().enumerate() {
        for &(other, t) in outputs[i + 1..].iter().chain(inputs) {
            if out.overlaps(t) {
                return Err(Error::Overlap {
                    op,
                    output: name,
                    other,
                });
            }
        }
    }
    Ok(())
}

/// Fails unless the key/value heads divide the query heads (a query head's key/value head is
/// `h / (nh / nkv)`): a zero or non-dividing `nkv` would index past the `qkv` row.
pub fn kv_heads(op: &'static str, dims: Dims) -> Result<()> {
    if dims.nkv == 0 || !dims.nh.is_multiple_of(dims.nkv) {
        return Err(Error::Unsupported {
            what: format!(
                "{op}: {} query heads cannot share {} key/value heads evenly",
                dims.nh, dims.nkv
            ),
            help: "model.heads must be a multiple of model.kv_heads, and model.kv_heads of \
                   parallel.tensor; the config's validation checks both, so this is a bug in \
                   tessera"
                .into(),
        });
    }
    Ok(())
}

/// Fails when the head size is above what a backend's attention kernels hold.
pub fn head_size(op: &'static str, dims: Dims, max: usize, backend: &str) -> Result<()> {
    if dims.hs > max {
        return Err(Error::Unsupported {
            what: format!(
                "{op}: head size {} is larger than the {backend} kernels' {max}",
                dims.hs
            ),
            help: "use more attention heads (model.heads) for this hidden size".into(),
        });
    }
    Ok(())
}

impl Checks {
    fn arena(&self, place: Place) -> usize {
        match place {
            Place::Device => self.device,
            Place::Host => self.host,
        }
    }

    /// Checks a handle against its arena, its expected dtype and length.
    pub fn tensor(
        &self,
        op: &'static str,
        name: &'static str,
        t: Tensor,
        dtype: Dtype,
        len: usize,
    ) -> Result<()> {
        if t.dtype != dtype {
            return Err(Error::Dtype {
                op,
                tensor: name,
                expected: dtype,
                got: t.dtype,
            });
        }
        if t.len != len {
            return Err(Error::Shape {
                op,
                tensor: name,
                expected: len,
                got: t.len,
                dtype,
            });
        }
        assert!(
            t.offset + t.bytes() <= self.arena(t.place)
                && t.offset.is_multiple_of(dtype.size() as usize),
            "invariant: handles come from this backend's arena layout"
        );
        Ok(())
    }

    /// A raw copy of `bytes` bytes to or from `t`: exactly its size.
    pub fn bytes(
        &self,
        op: &'static str,
        name: &'static str,
        t: Tensor,
        bytes: usize,
    ) -> Result<()> {
        let size = t.dtype.size() as usize;
        if !bytes.is_multiple_of(size) {
            return Err(Error::Shape {
                op,
                tensor: name,
                expected: t.len,
                got: bytes / size,
                dtype: t.dtype,
            });
        }
        self.tensor(op, name, t, t.dtype, bytes / size)
    }

    pub fn copy(&self, dst: Tensor, src: Tensor) -> Result<()> {
        self.tensor("copy", "src", src, src.dtype, dst.len)?;
        self.tensor("copy", "dst", dst, dst.dtype, dst.len)?;
        disjoint("copy", &[("dst", dst)], &[("src", src)])
    }

    pub fn add(&self, dst: Tensor, src: Tensor) -> Result<()> {
        let (op, dt, n) = ("add", dst.dtype, dst.len);
        self.tensor(op, "dst", dst, dt, n)?;
        self.tensor(op, "src", src, dt, n)?;
        disjoint(op, &[("dst", dst)], &[("src", src)])
    }

    pub fn residual_fwd(&self, out: Tensor, a: Tensor, b: Tensor) -> Result<()> {
        let (op, dt, n) = ("residual_fwd", out.dtype, out.len);
        self.tensor(op, "out", out, dt, n)?;
        self.tensor(op, "a", a, dt, n)?;
        self.tensor(op, "b", b, dt, n)?;
        disjoint(op, &[("out", out)], &[("a", a), ("b", b)])
    }

    pub fn embedding_fwd(
        &self,
        out: Tensor,
        tokens: Tensor,
        wte: Tensor,
        wpe: Option<Tensor>,
        dims: Dims,
    ) -> Result<()> {
        let (op, dt, n) = ("embedding_fwd", out.dtype, dims.tokens());
        self.tensor(op, "out", out, dt, n * dims.c)?;
        self.tensor(op, "tokens", tokens, Dtype::I32, n)?;
        self.tensor(op, "wte", wte, dt, dims.vp * dims.c)?;
        let mut inputs = vec![("tokens", tokens), ("wte", wte)];
        if let Some(wpe) = wpe {
            self.tensor(op, "wpe", wpe, dt, dims.t * dims.c)?;
            inputs.push(("wpe", wpe));
        }
        disjoint(op, &[("out", out)], &inputs)
    }

    pub fn embedding_bwd(
        &self,
        dwte: Tensor,
        dwpe: Option<Tensor>,
        dout: Tensor,
        tokens: Tensor,
        dims: Dims,
    ) -> Result<()> {
        let (op, dt, n) = ("embedding_bwd", dout.dtype, dims.tokens());
        self.tensor(op, "dwte", dwte, dt, dims.vp * dims.c)?;
        let mut outputs = vec![("dwte", dwte)];
        if let Some(dwpe) = dwpe {
            self.tensor(op, "dwpe", dwpe, dt, dims.t * dims.c)?;
            outputs.push(("dwpe", dwpe));
        }
        self.tensor(op, "dout", dout, dt, n * dims.c)?;
        self.tensor(op, "tokens", tokens, Dtype::I32, n)?;
        disjoint(op, &outputs, &[("dout", dout), ("tokens", tokens)])
    }

    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_fwd(
        &self,
        out: Tensor,
        mean: Tensor,
        rstd: Tensor,
        inp: Tensor,
        weight: Tensor,
        bias: Tensor,
        rows: usize,
        c: usize,
    ) -> Result<()> {
        let (op, dt) = ("layernorm_fwd", out.dtype);
        self.tensor(op, "out", out, dt, rows * c)?;
        self.tensor(op, "mean", mean, F32, rows)?;
        self.tensor(op, "rstd", rstd, F32, rows)?;
        self.tensor(op, "inp", inp, dt, rows * c)?;
        self.tensor(op, "weight", weight, dt, c)?;
        self.tensor(op, "bias", bias, dt, c)?;
        disjoint(
            op,
            &[("out", out), ("mean", mean), ("rstd", rstd)],
            &[("inp", inp), ("weight", weight), ("bias", bias)],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_bwd(
        &self,
        dinp: Tensor,
        dweight: Tensor,
        dbias: Tensor,
        dout: Tensor,
        inp: Tensor,
        weight: Tensor,
        mean: Tensor,
        rstd: Tensor,
        rows: usize,
        c: usize,
    ) -> Result<()> {
        let (op, dt) = ("layernorm_bwd", dout.dtype);
        self.tensor(op, "dinp", dinp, dt, rows * c)?;
        self.tensor(op, "dweight", dweight, dt, c)?;
        self.tensor(op, "dbias", dbias, dt, c)?;
        self.tensor(op, "dout", dout, dt, rows * c)?;
        self.tensor(op, "inp", inp, dt, rows * c)?;
        self.tensor(op, "weight", weight, dt, c)?;
        self.tensor(op, "mean", mean, F32, rows)?;
        self.tensor(op, "rstd", rstd, F32, rows)?;
        disjoint(
            op,
            &[("dinp", dinp), ("dweight", dweight), ("dbias", dbias)],
            &[
                ("dout", dout),
                ("inp", inp),
                ("weight", weight),
                ("mean", mean),
                ("rstd", rstd),
            ],
        )
    }

    pub fn matmul_fwd(
        &self,
        out: Tensor,
        inp: Tensor,
        weight: Tensor,
        bias: Option<Tensor>,
        shape: Linear,
    ) -> Result<()> {
        let (op, dt) = ("matmul_fwd", out.dtype);
        self.tensor(op, "out", out, dt, shape.rows * shape.out)?;
        self.tensor(op, "inp", inp, dt, shape.rows * shape.inp)?;
        self.tensor(op, "weight", weight, dt, shape.out * shape.inp)?;
        let mut inputs = vec![("inp", inp), ("weight", weight)];
        if let Some(bias) = bias {
            self.tensor(op, "bias", bias, dt, shape.out)?;
            inputs.push(("bias", bias));
        }
        disjoint(op, &[("out", out)], &inputs)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn matmul_bwd(
        &self,
        dinp: Option<Tensor>,
        dweight: Tensor,
        dbias: Option<Tensor>,
        dout: Tensor,
        inp: Tensor,
        weight: Tensor,
        shape: Linear,
    ) -> Result<()> {
        let (op, dt) = ("matmul_bwd", dout.dtype);
        self.tensor(op, "dweight", dweight, dt, shape.out * shape.inp)?;
        self.tensor(op, "dout", dout, dt, shape.rows * shape.out)?;
        self.tensor(op, "inp", inp, dt, shape.rows * shape.inp)?;
        self.tensor(op, "weight", weight, dt, shape.out * shape.inp)?;
        let mut outputs = vec![("dweight", dweight)];
        if let Some(dinp) = dinp {
            self.tensor(op, "dinp", dinp, dt, shape.rows * shape.inp)?;
            outputs.push(("dinp", dinp));
        }
        if let Some(dbias) = dbias {
            self.tensor(op, "dbias", dbias, dt, shape.out)?;
            outputs.push(("dbias", dbias));
        }
        disjoint(
            op,
            &outputs,
            &[("dout", dout), ("inp", inp), ("weight", weight)],
        )
    }

    pub fn attention_fwd(&self, out: Tensor, lse: Tensor, qkv: Tensor, dims: Dims) -> Result<()> {
        let (op, dt, n) = ("attention_fwd", out.dtype, dims.tokens());
        kv_heads(op, dims)?;
        let width = dims.nh * dims.hs;
        self.tensor(op, "out", out, dt, n * width)?;
        self.tensor(op, "lse", lse, F32, n * dims.nh)?;
        self.tensor(op, "qkv", qkv, dt, n * dims.qkv_width())?;
        disjoint(op, &[("out", out), ("lse", lse)], &[("qkv", qkv)])
    }

    pub fn attention_decode(&self, out: Tensor, qkv: Tensor, pos: usize, dims: Dims) -> Result<()> {
        let (op, dt) = ("attention_decode", out.dtype);
        kv_heads(op, dims)?;
        if pos >= dims.t {
            return Err(Error::Unsupported {
                what: format!(
                    "{op}: position {pos} is past the sequence length {}",
                    dims.t
                ),
                help: "decode at most seq_len tokens".into(),
            });
        }
        self.tensor(op, "out", out, dt, dims.b * dims.nh * dims.hs)?;
        self.tensor(op, "qkv", qkv, dt, dims.tokens() * dims.qkv_width())?;
        disjoint(op, &[("out", out)], &[("qkv", qkv)])
    }

    #[allow(clippy::too_many_arguments)]
    pub fn attention_bwd(
        &self,
        dqkv: Tensor,
        delta: Tensor,
        dout: Tensor,
        qkv: Tensor,
        out: Tensor,
        lse: Tensor,
        dims: Dims,
    ) -> Result<()> {
        let (op, dt, n) = ("attention_bwd", dout.dtype, dims.tokens());
        kv_heads(op, dims)?;
        let width = dims.nh * dims.hs;
        self.tensor(op, "dqkv", dqkv, dt, n * dims.qkv_width())?;
        self.tensor(op, "delta", delta, F32, n * dims.nh)?;
        self.tensor(op, "dout", dout, dt, n * width)?;
        self.tensor(op, "qkv", qkv, dt, n * dims.qkv_width())?;
        self.tensor(op, "out", out, dt, n * width)?;
        self.tensor(op, "lse", lse, F32, n * dims.nh)?;
        disjoint(
            op,
            &[("dqkv", dqkv), ("delta", delta)],
            &[("dout", dout), ("qkv", qkv), ("out", out), ("lse", lse)],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_fwd(
        &self,
        out: Tensor,
        rstd: Tensor,
        inp: Tensor,
        weight: Tensor,
        rows: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        let (op, dt) = ("rmsnorm_fwd", out.dtype);
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(Error::Unsupported {
                what: format!("{op}: epsilon {eps} is not a finite number >= 0"),
                help: "set model.norm_eps to a small positive number such as 1e-5".into(),
            });
        }
        self.tensor(op, "out", out, dt, rows * c)?;
        self.tensor(op, "rstd", rstd, F32, rows)?;
        self.tensor(op, "inp", inp, dt, rows * c)?;
        self.tensor(op, "weight", weight, dt, c)?;
        disjoint(
            op,
            &[("out", out), ("rstd", rstd)],
            &[("inp", inp), ("weight", weight)],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_bwd(
        &self,
        dinp: Tensor,
        dweight: Tensor,
        dout: Tensor,
        inp: Tensor,
        weight: Tensor,
        rstd: Tensor,
        rows: usize,
        c: usize,
    ) -> Result<()> {
        let (op, dt) = ("rmsnorm_bwd", dout.dtype);
        self.tensor(op, "dinp", dinp, dt, rows * c)?;
        self.tensor(op, "dweight", dweight, dt, c)?;
        self.tensor(op, "dout", dout, dt, rows * c)?;
        self.tensor(op, "inp", inp, dt, rows * c)?;
        self.tensor(op, "weight", weight, dt, c)?;
        self.tensor(op, "rstd", rstd, F32, rows)?;
        disjoint(
            op,
            &[("dinp", dinp), ("dweight", dweight)],
            &[
                ("dout", dout),
                ("inp", inp),
                ("weight", weight),
                ("rstd", rstd),
            ],
        )
    }

    /// `rope_fwd` (`qkv`) and `rope_bwd` (`dqkv`): the rotated tensor in attention's layout and
    /// a table of at least `t` rows of `hs` f32, for an even head size.
    pub fn rope(
        &self,
        op: &'static str,
        rotated: (&'static str, Tensor),
        table: Tensor,
        dims: Dims,
    ) -> Result<()> {
        let (name, x) = rotated;
        kv_heads(op, dims)?;
        if dims.hs == 0 || !dims.hs.is_multiple_of(2) {
            return Err(Error::Unsupported {
                what: format!(
                    "{op}: head size {} is not a positive even number; rotary embeddings \
                     rotate pairs of dims",
                    dims.hs
                ),
                help: "choose model.head_dim (or hidden / heads) even".into(),
            });
        }
        self.tensor(op, name, x, x.dtype, dims.tokens() * dims.qkv_width())?;
        if table.dtype != F32 {
            return Err(Error::Dtype {
                op,
                tensor: "table",
                expected: F32,
                got: table.dtype,
            });
        }
        let rows = table.len.checked_div(dims.hs).unwrap_or(0);
        if !table.len.is_multiple_of(dims.hs.max(1)) || rows < dims.t {
            return Err(Error::Unsupported {
                what: format!(
                    "{op}: the rotary table holds {} values, not rows of head size {} for {} \
                     positions",
                    table.len, dims.hs, dims.t
                ),
                help: "this is a bug in tessera: the table must be (t_max >= seq_len, hs)".into(),
            });
        }
        self.tensor(op, "table", table, F32, table.len)?;
        disjoint(op, &[(name, x)], &[("table", table)])
    }

    pub fn swiglu_fwd(&self, out: Tensor, inp: Tensor, f: usize) -> Result<()> {
        let (op, dt) = ("swiglu_fwd", out.dtype);
        let rows = swiglu_rows(op, out.len, f)?;
        self.tensor(op, "out", out, dt, rows * f)?;
        self.tensor(op, "inp", inp, dt, rows * 2 * f)?;
        disjoint(op, &[("out", out)], &[("inp", inp)])
    }

    pub fn swiglu_bwd(&self, dinp: Tensor, dout: Tensor, inp: Tensor, f: usize) -> Result<()> {
        let (op, dt) = ("swiglu_bwd", dout.dtype);
        let rows = swiglu_rows(op, dout.len, f)?;
        self.tensor(op, "dinp", dinp, dt, rows * 2 * f)?;
        self.tensor(op, "dout", dout, dt, rows * f)?;
        self.tensor(op, "inp", inp, dt, rows * 2 * f)?;
        disjoint(op, &[("dinp", dinp)], &[("dout", dout), ("inp", inp)])
    }

    /// `gelu_fwd` (`out`, `inp`) and `gelu_bwd` (`dinout`, `inp`).
    pub fn gelu(&self, op: &'static str, out: (&'static str, Tensor), inp: Tensor) -> Result<()> {
        let (name, out) = out;
        self.tensor(op, name, out, out.dtype, inp.len)?;
        self.tensor(op, "inp", inp, out.dtype, inp.len)?;
        disjoint(op, &[(name, out)], &[("inp", inp)])
    }

    /// The buffers of a cross-entropy over one chunk of `losses.len` rows.
    #[allow(clippy::too_many_arguments)]
    pub fn crossentropy(
        &self,
        op: &'static str,
        logits: Tensor,
        losses: Tensor,
        max: Tensor,
        sumexp: Tensor,
        targets: Tensor,
        dims: Dims,
    ) -> Result<()> {
        let rows = losses.len;
        self.tensor(op, "logits", logits, logits.dtype, rows * dims.vp)?;
        self.tensor(op, "losses", losses, F32, rows)?;
        self.tensor(op, "max", max, F32, rows)?;
        self.tensor(op, "sumexp", sumexp, F32, rows)?;
        self.tensor(op, "targets", targets, Dtype::I32, rows)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn crossentropy_fwd_bwd(
        &self,
        logits: Tensor,
        losses: Tensor,
        max: Tensor,
        sumexp: Tensor,
        targets: Tensor,
        dims: Dims,
    ) -> Result<()> {
        let op = "crossentropy_fwd_bwd";
        if dims.vocab_start != 0 || dims.vp < dims.v {
            return Err(Error::Unsupported {
                what: format!("{op}: the logits hold a shard of the vocabulary"),
                help: "use crossentropy_max, crossentropy_sumexp and crossentropy_finish".into(),
            });
        }
        self.crossentropy(op, logits, losses, max, sumexp, targets, dims)?;
        disjoint(
            op,
            &[
                ("logits", logits),
                ("losses", losses),
                ("max", max),
                ("sumexp", sumexp),
            ],
            &[("targets", targets)],
        )
    }

    pub fn crossentropy_max(&self, logits: Tensor, max: Tensor, dims: Dims) -> Result<()> {
        let op = "crossentropy_max";
        let rows = max.len;
        self.tensor(op, "logits", logits, logits.dtype, rows * dims.vp)?;
        self.tensor(op, "max", max, F32, rows)?;
        disjoint(op, &[("max", max)], &[("logits", logits)])
    }

    pub fn crossentropy_sumexp(
        &self,
        logits: Tensor,
        losses: Tensor,
        max: Tensor,
        sumexp: Tensor,
        targets: Tensor,
        dims: Dims,
    ) -> Result<()> {
        let op = "crossentropy_sumexp";
        self.crossentropy(op, logits, losses, max, sumexp, targets, dims)?;
        disjoint(
            op,
            &[("losses", losses), ("sumexp", sumexp)],
            &[("logits", logits), ("max", max), ("targets", targets)],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn crossentropy_finish(
        &self,
        logits: Tensor,
        losses: Tensor,
        max: Tensor,
        sumexp: Tensor,
        targets: Tensor,
        dims: Dims,
    ) -> Result<()> {
        let op = "crossentropy_finish";
        self.crossentropy(op, logits, losses, max, sumexp, targets, dims)?;
        disjoint(
            op,
            &[("logits", logits), ("losses", losses)],
            &[("max", max), ("sumexp", sumexp), ("targets", targets)],
        )
    }

    pub fn sum_squares(&self, grads: Tensor, partials: Tensor) -> Result<()> {
        let op = "sum_squares";
        self.tensor(op, "grads", grads, grads.dtype, grads.len)?;
        self.tensor(op, "partials", partials, F32, partials.len)?;
        disjoint(op, &[("partials", partials)], &[("grads", grads)])
    }

    pub fn adamw(
        &self,
        param: Tensor,
        master: Option<Tensor>,
        m: Tensor,
        v: Tensor,
        grad: Option<Tensor>,
    ) -> Result<()> {
        let (op, dt, n) = ("adamw", param.dtype, param.len);
        self.tensor(op, "param", param, dt, n)?;
        self.tensor(op, "m", m, F32, n)?;
        self.tensor(op, "v", v, F32, n)?;
        let mut outputs = vec![("param", param), ("m", m), ("v", v)];
        if let Some(master) = master {
            self.tensor(op, "master", master, F32, n)?;
            outputs.push(("master", master));
        } else if grad.is_none() {
            return Err(Error::Unsupported {
                what: "adamw: a gradient read from the parameters needs master weights".into(),
                help: "this is a bug in tessera; please report it with your config".into(),
            });
        }
        let mut inputs = Vec::new();
        if let Some(grad) = grad {
            self.tensor(op, "grad", grad, dt, n)?;
            inputs.push(("grad", grad));
        }
        disjoint(op, &outputs, &inputs)
    }
}

/// The rows of a SwiGLU whose `(rows, f)` tensor has `len` elements.
fn swiglu_rows(op: &'static str, len: usize, f: usize) -> Result<usize> {
    if f == 0 || !len.is_multiple_of(f) {
        return Err(Error::Unsupported {
            what: format!("{op}: {len} values are not rows of the ffn width {f}"),
            help: "this is a bug in tessera; please report it with your config".into(),
        });
    }
    Ok(len / f)
}
