//! Gradients collected into one flat buffer while the backward pass runs, in buckets.
//!
//! Candle's backward pass (patched, `Tensor::backward_with`) hands over each parameter's
//! gradient the moment it is final. It is copied straight into its range of a persistent flat
//! buffer (one strided copy; no per-step allocation, no concatenation afterwards). Consecutive
//! parameters form buckets of about `bucket_elems` values; when every gradient of a bucket has
//! arrived, the bucket is handed to the caller (a data-parallel group starts its all-reduce
//! there, overlapping the rest of the backward pass). Buckets are handed over from the last to
//! the first, each only after all later ones, so every rank issues its collectives in the same
//! order whatever order the graph finishes them in.

use crate::model::Llama;
use anyhow::bail;
use candle_core::{Tensor, TensorId, Var};
use std::collections::HashMap;
use std::ops::Range;

pub struct FlatGrads {
    /// The gradients in `param_shapes` order, then zero padding, in the model's dtype.
    pub flat: Tensor,
    /// Each parameter's range of `flat`, as a variable so that `set` can copy into it.
    views: Vec<Var>,
    index: HashMap<TensorId, usize>,
    names: Vec<String>,
    /// Parameter indices of each bucket, ascending and covering all parameters.
    buckets: Vec<Range<usize>>,
    bucket_of: Vec<usize>,
    /// Element range of each bucket in `flat`.
    elems: Vec<Range<usize>>,
}

impl FlatGrads {
    /// A buffer of `len` elements (at least the model's parameter count) for `model`'s
    /// gradients, cut into buckets of at least `bucket_elems` values (the last may be smaller).
    pub fn new(model: &Llama, len: usize, bucket_elems: usize) -> anyhow::Result<Self> {
        if len < model.num_params() {
            bail!("FlatGrads: a buffer of {len} elements cannot hold {} gradients", model.num_params());
        }
        let flat = Tensor::zeros(len, model.dtype(), model.device())?;
        let (mut views, mut index, mut names) = (Vec::new(), HashMap::new(), Vec::new());
        let (mut buckets, mut bucket_of, mut elems) = (Vec::new(), Vec::new(), Vec::new());
        let (mut off, mut b_first, mut b_off) = (0, 0, 0);
        for (i, p) in model.params.iter().enumerate() {
            let n = p.var.elem_count();
            views.push(Var::from_view(&flat.narrow(0, off, n)?.reshape(p.var.shape())?)?);
            index.insert(p.var.id(), i);
            names.push(p.name.clone());
            bucket_of.push(buckets.len());
            off += n;
            if off - b_off >= bucket_elems || i + 1 == model.params.len() {
                buckets.push(b_first..i + 1);
                elems.push(b_off..off);
                (b_first, b_off) = (i + 1, off);
            }
        }
        Ok(FlatGrads { flat, views, index, names, buckets, bucket_of, elems })
    }

    pub fn num_buckets(&self) -> usize {
        self.buckets.len()
    }

    /// Runs the backward pass of `loss`, copying every parameter's gradient into `flat` (adding
    /// it to what `flat` holds when `accumulate`: later micro-batches of a step) and calling
    /// `on_bucket(elements)` for each complete bucket, last bucket first. A parameter that no
    /// gradient reaches is an error that names it (never a silent zero).
    pub fn backward(
        &self,
        loss: &Tensor,
        accumulate: bool,
        on_bucket: &mut dyn FnMut(Range<usize>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        self.backward_to_input(loss, accumulate, on_bucket, None).map(|_| ())
    }

    /// [`FlatGrads::backward`], also returning the gradient of `input`, a variable that is not
    /// a parameter (a pipeline stage's input activations). Asking for an input that no gradient
    /// reaches is an error.
    pub fn backward_to_input(
        &self,
        loss: &Tensor,
        accumulate: bool,
        on_bucket: &mut dyn FnMut(Range<usize>) -> anyhow::Result<()>,
        input: Option<&Var>,
    ) -> anyhow::Result<Option<Tensor>> {
        let input_id = input.map(|x| x.as_tensor().id());
        let mut input_grad = None;
        let mut missing: Vec<usize> = self.buckets.iter().map(|b| b.len()).collect();
        let mut seen = vec![false; self.views.len()];
        let mut next = self.buckets.len();
        let mut failed: Option<anyhow::Error> = None;
        let mut hook = |var: &Tensor, grad: &Tensor| -> candle_core::Result<()> {
            // A variable that is not one of the model's parameters has no place in the buffer:
            // its gradient is kept if it is the input asked for, else dropped.
            let Some(&i) = self.index.get(&var.id()) else {
                if Some(var.id()) == input_id {
                    input_grad = Some(grad.clone());
                }
                return Ok(());
            };
            if accumulate {
                swarm_kernels::add_into(self.views[i].as_tensor(), grad)?;
            } else {
                self.views[i].set(grad)?;
            }
            if std::mem::replace(&mut seen[i], true) {
                return Ok(());
            }
            let b = self.bucket_of[i];
            missing[b] -= 1;
            while next > 0 && missing[next - 1] == 0 {
                next -= 1;
                if let Err(e) = on_bucket(self.elems[next].clone()) {
                    let msg = format!("{e:#}");
                    failed = Some(e);
                    return Err(candle_core::Error::Msg(msg));
                }
            }
            Ok(())
        };
        let result = loss.backward_with(&mut hook);
        if let Some(e) = failed {
            return Err(e);
        }
        result?;
        if let Some(i) = seen.iter().position(|s| !s) {
            bail!("no gradient reached {}: an op without a backward pass is in the model", self.names[i]);
        }
        if input.is_some() && input_grad.is_none() {
            bail!("no gradient reached the stage's input activations");
        }
        Ok(input_grad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use swarm_sharding::ModelSpec;

    fn spec() -> ModelSpec {
        ModelSpec {
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            vocab_size: 64,
            max_position_embeddings: 64,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            // Tied: the embedding's gradient comes from two places and is final only at the end.
            tie_word_embeddings: true,
            attention_bias: false,
            rope_scaling: None,
        }
    }

    fn windows() -> Tensor {
        let ids: Vec<u32> = (0..2 * 17).map(|i| (i * 7 + 3) % 64).collect();
        Tensor::from_vec(ids, (2, 17), &Device::Cpu).unwrap()
    }

    /// The reference: candle's plain backward pass, gradients concatenated in parameter order.
    fn plain_grads(model: &Llama) -> Vec<f32> {
        let grads = model.loss(&windows()).unwrap().backward().unwrap();
        let mut out = Vec::new();
        for p in &model.params {
            out.extend(grads.get(p.var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        out
    }

    #[test]
    fn packed_model_and_bucketed_gradients_equal_the_plain_backward_pass() {
        let dev = Device::Cpu;
        let plain = Llama::init(&spec(), 7, &dev).unwrap();
        let want = plain_grads(&plain);
        let want_loss = plain.loss(&windows()).unwrap().to_scalar::<f32>().unwrap();

        let mut model = Llama::init(&spec(), 7, &dev).unwrap();
        let n = model.num_params();
        let packed = model.pack(n + 5).unwrap();
        assert_eq!(model.loss(&windows()).unwrap().to_scalar::<f32>().unwrap(), want_loss);
        let grads = FlatGrads::new(&model, n + 5, 3_000).unwrap();
        assert!(grads.num_buckets() > 2, "the test needs several buckets");
        let mut handed = Vec::new();
        let loss = model.loss(&windows()).unwrap();
        grads
            .backward(&loss, false, &mut |r| {
                handed.push(r);
                Ok(())
            })
            .unwrap();
        let got = grads.flat.to_vec1::<f32>().unwrap();
        assert_eq!(&got[..n], &want[..], "bucketed gradients differ from candle's plain backward");
        assert!(got[n..].iter().all(|x| *x == 0.0), "the padding must stay zero");
        // Every element handed over exactly once, last bucket first, in adjacent ranges.
        assert_eq!(handed.len(), grads.num_buckets());
        assert_eq!(handed.last().unwrap().start, 0);
        assert_eq!(handed[0].end, n);
        for w in handed.windows(2) {
            assert_eq!(w[1].end, w[0].start, "buckets out of order: {handed:?}");
        }

        // Writing the packed buffer writes the model's parameters.
        let doubled = (&packed * 2.0).unwrap();
        let p0 = model.params[1].var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let var = Var::from_view(&packed).unwrap();
        var.set(&doubled).unwrap();
        let p1 = model.params[1].var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(p0.iter().zip(&p1).all(|(a, b)| *b == 2.0 * a));
        assert_eq!(model.dtype(), DType::F32);
    }

    /// Two micro-batches accumulated: the sum of their plain gradients (each copied, then added).
    #[test]
    fn accumulated_micro_batches_sum_their_gradients() {
        let dev = Device::Cpu;
        let mut model = Llama::init(&spec(), 7, &dev).unwrap();
        let n = model.num_params();
        model.pack(n).unwrap();
        let w = windows();
        let (a, b) = (w.narrow(0, 0, 1).unwrap(), w.narrow(0, 1, 1).unwrap());
        let plain = |x: &Tensor| -> Vec<f32> {
            let g = model.loss(x).unwrap().backward().unwrap();
            model
                .params
                .iter()
                .flat_map(|p| g.get(p.var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect()
        };
        let want: Vec<f32> = plain(&a).iter().zip(plain(&b)).map(|(x, y)| x + y).collect();
        let grads = FlatGrads::new(&model, n, 3_000).unwrap();
        grads.backward(&model.loss(&a).unwrap(), false, &mut |_| Ok(())).unwrap();
        grads.backward(&model.loss(&b).unwrap(), true, &mut |_| Ok(())).unwrap();
        assert_eq!(grads.flat.to_vec1::<f32>().unwrap(), want);
        // Without `accumulate` a backward pass starts over.
        grads.backward(&model.loss(&b).unwrap(), false, &mut |_| Ok(())).unwrap();
        assert_eq!(grads.flat.to_vec1::<f32>().unwrap(), plain(&b));
    }

    /// A pipeline stage's backward pass: the parameters' gradients land in the buffer and the
    /// input activations' gradient comes back, each equal to candle's plain backward pass.
    #[test]
    fn the_gradient_of_a_stage_input_is_returned() {
        let dev = Device::Cpu;
        let mut model = Llama::init(&spec(), 7, &dev).unwrap();
        let n = model.num_params();
        model.pack(n).unwrap();
        let (inputs, targets) = crate::model::split_windows(&windows()).unwrap();
        let x = Var::from_tensor(&model.embed(&inputs).unwrap()).unwrap();
        let loss = || model.head_loss(&model.layers(x.as_tensor().clone(), 0..2).unwrap(), &targets).unwrap();
        let plain = loss().backward().unwrap();
        let want_x = plain.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let grads = FlatGrads::new(&model, n, 3_000).unwrap();
        let got_x = grads.backward_to_input(&loss(), false, &mut |_| Ok(()), Some(&x)).unwrap();
        assert_eq!(got_x.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), want_x);
        // The embedding is tied to the head: only the head's share reached it here.
        let want_w: Vec<f32> = model
            .params
            .iter()
            .flat_map(|p| plain.get(p.var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        assert_eq!(grads.flat.to_vec1::<f32>().unwrap(), want_w);
        // An input the loss does not depend on is an error, not a silent zero.
        let unused = Var::from_tensor(&x.as_tensor().zeros_like().unwrap()).unwrap();
        let err = grads.backward_to_input(&loss(), false, &mut |_| Ok(()), Some(&unused)).unwrap_err();
        assert!(err.to_string().contains("stage's input"), "{err}");
    }

    #[test]
    fn a_buffer_too_small_is_refused() {
        let mut model = Llama::init(&spec(), 7, &Device::Cpu).unwrap();
        let n = model.num_params();
        assert!(model.pack(n - 1).unwrap_err().to_string().contains("cannot hold"));
        assert!(FlatGrads::new(&model, n - 1, 100).is_err());
    }
}

#[cfg(test)]
mod layout_tests {
    use candle_core::{Device, Tensor, Var};

    /// The vendored candle computes a transposed weight's gradient so that it reaches the
    /// weight contiguous, in the weight's layout (no transposing copy), with unchanged values.
    #[test]
    fn a_linear_weight_gets_a_contiguous_gradient_equal_to_g_transpose_x() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (5, 3), &dev).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3), &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap();
        let y = x.matmul(&w.as_tensor().t().unwrap()).unwrap();
        let mut got = None;
        (&y * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward_with(&mut |_, grad| {
                got = Some(grad.clone());
                Ok(())
            })
            .unwrap();
        let got = got.expect("the weight's gradient");
        assert!(got.is_contiguous(), "the weight's gradient arrived as a strided view");
        let want = g.t().unwrap().matmul(&x).unwrap();
        let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "gradient differs from g^T x by {diff}");
    }
}
