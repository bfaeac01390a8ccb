//! AdamW on flat f32 buffers (master weights and both moments in f32), PyTorch semantics:
//!
//! ```text
//! p  *= 1 - lr * weight_decay                 (decoupled weight decay)
//! m  += (1 - beta1) * (g - m)                 (torch's lerp)
//! v   = beta2 * v + (1 - beta2) * g * g
//! p  -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//!
//! [`adamw_step`] does it in one parallel pass; [`adamw_step_reference`] one statement per pass.

use rayon::prelude::*;

/// AdamW hyper-parameters. `Default` is PyTorch's (`lr` 1e-3, betas 0.9/0.999, `eps` 1e-8,
/// `weight_decay` 0.01).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// The per-step scalars, computed once in f64 and used in f32.
pub(crate) struct Scalars {
    pub(crate) decay: f32,
    pub(crate) one_minus_beta1: f32,
    pub(crate) beta2: f32,
    pub(crate) one_minus_beta2: f32,
    pub(crate) step_size: f32,
    pub(crate) bias_correction2_sqrt: f32,
    pub(crate) eps: f32,
}

impl Scalars {
    pub(crate) fn new(cfg: &AdamW, step: u64) -> Self {
        assert!(step >= 1, "adamw: step is 1-based, got 0");
        let t = step as f64;
        let bias_correction1 = 1.0 - cfg.beta1.powf(t);
        let bias_correction2 = 1.0 - cfg.beta2.powf(t);
        Self {
            decay: (1.0 - cfg.lr * cfg.weight_decay) as f32,
            one_minus_beta1: (1.0 - cfg.beta1) as f32,
            beta2: cfg.beta2 as f32,
            one_minus_beta2: (1.0 - cfg.beta2) as f32,
            step_size: (cfg.lr / bias_correction1) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            eps: cfg.eps as f32,
        }
    }
}

fn check_lens(params: &[f32], grads: &[f32], m: &[f32], v: &[f32]) {
    let n = params.len();
    assert!(
        grads.len() == n && m.len() == n && v.len() == n,
        "adamw: buffers differ in length: params {n}, grads {}, m {}, v {}",
        grads.len(),
        m.len(),
        v.len()
    );
}

/// Elements per parallel task.
const GRAIN: usize = 32 * 1024;

/// One AdamW step (`step` is 1-based) over `params` in place, updating the moments `m` and `v`.
///
/// # Panics
/// If `step` is 0 or the four buffers differ in length.
pub fn adamw_step(cfg: &AdamW, step: u64, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32]) {
    check_lens(params, grads, m, v);
    let k = Scalars::new(cfg, step);
    let kernel = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            *m += k.one_minus_beta1 * (g - *m);
            *v = k.beta2 * *v + k.one_minus_beta2 * g * g;
            let denom = v.sqrt() / k.bias_correction2_sqrt + k.eps;
            *p = *p * k.decay - k.step_size * (*m / denom);
        }
    };
    if params.len() <= GRAIN {
        kernel(params, grads, m, v);
        return;
    }
    params
        .par_chunks_mut(GRAIN)
        .zip(grads.par_chunks(GRAIN))
        .zip(m.par_chunks_mut(GRAIN))
        .zip(v.par_chunks_mut(GRAIN))
        .for_each(|(((p, g), m), v)| kernel(p, g, m, v));
}

/// The same step as [`adamw_step`], one operation per pass, for tests.
///
/// # Panics
/// If `step` is 0 or the four buffers differ in length.
pub fn adamw_step_reference(cfg: &AdamW, step: u64, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32]) {
    check_lens(params, grads, m, v);
    let k = Scalars::new(cfg, step);
    for p in params.iter_mut() {
        *p *= k.decay;
    }
    for (m, &g) in m.iter_mut().zip(grads) {
        *m += k.one_minus_beta1 * (g - *m);
    }
    for (v, &g) in v.iter_mut().zip(grads) {
        *v = k.beta2 * *v + k.one_minus_beta2 * g * g;
    }
    let denom: Vec<f32> = v.iter().map(|&v| v.sqrt() / k.bias_correction2_sqrt + k.eps).collect();
    for ((p, &m), &d) in params.iter_mut().zip(m.iter()).zip(&denom) {
        *p -= k.step_size * (m / d);
    }
}
