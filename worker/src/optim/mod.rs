//! AdamW over this rank's units: learning-rate schedule, global-norm clipping, fp16 loss
//! scaling, and the update itself (a backend kernel per parameter).
//!
//! The update follows PyTorch's `AdamW`: decoupled weight decay `p -= lr wd p` (matrices only,
//! per `ParamSpec::decay`), then Adam with bias-corrected moments. With mixed precision the
//! fp32 master copy is updated and rounded into the compute-dtype parameters.

use tessera_plan::config::{Optimizer as Hyper, Precision};
use tessera_plan::model::Placed;

use crate::error::Result;
use crate::tensor::{AdamW, Backend, Tensor};
use crate::units::Unit;

/// The learning rate of 0-based step `step`: linear warmup over `warmup` steps (step `s` gets
/// `lr (s+1)/warmup`), then cosine decay from `lr` to `min_lr` at step `steps`.
pub fn learning_rate(hyper: &Hyper, step: u64, steps: u64) -> f64 {
    if step < hyper.warmup {
        return hyper.lr * (step + 1) as f64 / hyper.warmup as f64;
    }
    let span = steps.saturating_sub(hyper.warmup).max(1);
    let ratio = ((step - hyper.warmup) as f64 / span as f64).min(1.0);
    let coefficient = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
    hyper.min_lr + coefficient * (hyper.lr - hyper.min_lr)
}

/// Dynamic loss scaling for fp16: gradients are computed for `loss * scale`; a step whose
/// gradients overflow is skipped and halves the scale, and every `GROWTH_INTERVAL` clean steps
/// double it. Other precisions use a fixed scale of 1.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScale {
    pub scale: f32,
    pub clean_steps: u32,
    pub dynamic: bool,
}

impl LossScale {
    /// 2^16, PyTorch's `GradScaler` default.
    const INITIAL: f32 = 65536.0;
    const GROWTH_INTERVAL: u32 = 2000;

    pub fn new(precision: Precision) -> LossScale {
        let dynamic = precision == Precision::Fp16;
        LossScale {
            scale: if dynamic { Self::INITIAL } else { 1.0 },
            clean_steps: 0,
            dynamic,
        }
    }

    /// Records a step's outcome; returns whether to apply it.
    fn update(&mut self, finite: bool) -> bool {
        if !self.dynamic {
            return finite;
        }
        if finite {
            self.clean_steps += 1;
            if self.clean_steps == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.clean_steps = 0;
            }
        } else {
            self.scale = (self.scale / 2.0).max(1.0);
            self.clean_steps = 0;
        }
        finite
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    pub lr: f64,
    /// Global gradient norm before clipping (of the unscaled loss).
    pub grad_norm: f64,
    /// Whether the update was applied (fp16 skips steps whose gradients overflowed).
    pub applied: bool,
}

/// AdamW's state outside the arena: hyperparameters and the loss scale.
#[derive(Debug, Clone)]
pub struct Optimizer {
    pub hyper: Hyper,
    pub steps: u64,
    pub loss_scale: LossScale,
}

impl Optimizer {
    pub fn new(hyper: Hyper, steps: u64, precision: Precision) -> Optimizer {
        Optimizer {
            hyper,
            steps,
            loss_scale: LossScale::new(precision),
        }
    }

    /// The sum of squares of the gradients (of the scaled loss) this rank counts: of each
    /// parameter `counts(unit, param)` accepts, the part in this rank's shard. The global norm
    /// is the square root of the sum over every rank, each element counted by one of them.
    pub fn sum_squares<B: Backend>(
        &self,
        backend: &mut B,
        units: &[Unit],
        partials: Tensor,
        counts: impl Fn(&Unit, &Placed) -> bool,
    ) -> Result<f64> {
        let mut sum = 0.0f64;
        for unit in units {
            for placed in unit.layout.params.iter().filter(|p| counts(unit, p)) {
                if let Some(range) = unit.shard_of(placed.spec.name) {
                    sum += backend.sum_squares(unit.grads_at(&range), partials)?;
                }
            }
        }
        Ok(sum)
    }

    /// Applies AdamW step `step` (0-based) to this rank's shard of every parameter of `units`
    /// given the global gradient norm of the scaled loss, then zeroes the gradients for the
    /// next step. Under ZeRO the other shards' parameters arrive by all-gather afterwards.
    pub fn step<B: Backend>(
        &mut self,
        backend: &mut B,
        units: &[Unit],
        step: u64,
        scaled_norm: f64,
    ) -> Result<StepReport> {
        let lr = learning_rate(&self.hyper, step, self.steps);
        let scale = self.loss_scale.scale as f64;
        let grad_norm = scaled_norm / scale;
        let applied = self.loss_scale.update(grad_norm.is_finite());
        if applied {
            let clip = if self.hyper.grad_clip > 0.0 {
                (self.hyper.grad_clip / (grad_norm + 1e-6)).min(1.0)
            } else {
                1.0
            };
            let t = (step + 1) as i32;
            for unit in units {
                for placed in &unit.layout.params {
                    let Some(range) = unit.shard_of(placed.spec.name) else {
                        continue;
                    };
                    let hyper = AdamW {
                        lr: lr as f32,
                        beta1: self.hyper.beta1 as f32,
                        beta2: self.hyper.beta2 as f32,
                        eps: self.hyper.eps as f32,
                        weight_decay: if placed.spec.decay {
                            self.hyper.weight_decay as f32
                        } else {
                            0.0
                        },
                        bias_correction1: (1.0 - self.hyper.beta1.powi(t)) as f32,
                        bias_correction2: (1.0 - self.hyper.beta2.powi(t)) as f32,
                        grad_scale: (clip / scale) as f32,
                    };
                    let (params, grads) = (unit.params_at(&range), unit.grads_at(&range));
                    let master = unit.master.map(|m| unit.state_view(m, &range));
                    let (m, v) = (
                        unit.state_view(unit.adam_m, &range),
                        unit.state_view(unit.adam_v, &range),
                    );
                    match unit.staging {
                        // Offload: gradients down to the host, the step there, weights back.
                        Some(staging) => {
                            let staged = unit.state_view(staging, &range);
                            backend.copy(staged, grads)?;
                            backend.adamw(staged, master, m, v, None, hyper)?;
                            backend.copy(params, staged)?;
                        }
                        None => backend.adamw(params, master, m, v, Some(grads), hyper)?,
                    }
                }
            }
        }
        for unit in units {
            backend.fill(unit.flat_grads, 0.0)?;
        }
        Ok(StepReport {
            lr,
            grad_norm,
            applied,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hyper() -> Hyper {
        Hyper {
            lr: 1e-2,
            min_lr: 1e-3,
            warmup: 2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
        }
    }

    #[test]
    fn warmup_is_linear_then_cosine_reaches_min_lr() {
        let h = hyper();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(learning_rate(&h, 0, 10), 0.005));
        assert!(close(learning_rate(&h, 1, 10), 0.01));
        assert!(close(learning_rate(&h, 2, 10), 0.01), "cosine starts at lr");
        let middle = learning_rate(&h, 6, 10);
        assert!((middle - 0.0055).abs() < 1e-12, "{middle}");
        assert!((learning_rate(&h, 10, 10) - 0.001).abs() < 1e-12);
        assert!(
            (learning_rate(&h, 50, 10) - 0.001).abs() < 1e-12,
            "stays at min_lr"
        );
    }

    #[test]
    fn fp16_loss_scale_halves_on_overflow_and_grows_after_clean_steps() {
        let mut scale = LossScale::new(Precision::Fp16);
        assert_eq!(scale.scale, 65536.0);
        assert!(!scale.update(false));
        assert_eq!(scale.scale, 32768.0);
        for _ in 0..LossScale::GROWTH_INTERVAL {
            assert!(scale.update(true));
        }
        assert_eq!(scale.scale, 65536.0);
        let mut fixed = LossScale::new(Precision::Bf16);
        assert!(!fixed.update(false), "a non-finite step is never applied");
        assert_eq!(fixed.scale, 1.0);
    }
}
