//! AdamW with f32 master weights: what makes bf16 training learn at Med-R1's learning rate.
//!
//! In bf16 a weight near 0.02 has a spacing of 2^-13 ≈ 1.2e-4 to its neighbours, and an Adam
//! step moves it by about the learning rate, 1e-6: written back in bf16, every step rounds to
//! no change at all, so a model trained in pure bf16 at lr 1e-6 never moves. Med-R1 trains with
//! DeepSpeed's bf16 mode, which keeps an f32 copy of every weight (the "master weights") and the
//! two moments in f32, updates the copy, and hands the model a bf16 rounding of it.
//! [`MasterAdamW`] does the same for any parameter that is not f32; on f32 parameters it does
//! exactly what Burn's AdamW does (the same operations in the same order, checked bit for bit).
//!
//! The state (master copy and moments) is saved in f32 whatever the record's precision
//! settings, so a resumed bf16 run continues from the same f32 values.

use burn::module::AutodiffModule;
use burn::optim::{adaptor::OptimizerAdaptor, LearningRate, SimpleOptimizer};
use burn::record::{PrecisionSettings, Record};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, FloatDType, Tensor, TensorCreationOptions, TensorData};
use rayon::prelude::*;

/// A tensor kept, saved and loaded in f32 on any backend (Burn's own tensor records convert to
/// the backend's float type on load, which would round an f32 master copy to bf16).
#[derive(Debug, Clone)]
pub struct F32Tensor<B: Backend, const D: usize>(pub Tensor<B, D>);

impl<B: Backend, const D: usize> F32Tensor<B, D> {
    pub fn new(t: Tensor<B, D>) -> Self {
        Self(t.cast(FloatDType::F32))
    }
}

impl<B: Backend, const D: usize> Record<B> for F32Tensor<B, D> {
    type Item<S: PrecisionSettings> = TensorData;

    fn into_item<S: PrecisionSettings>(self) -> TensorData {
        self.0.into_data().convert::<f32>()
    }

    fn from_item<S: PrecisionSettings>(item: TensorData, device: &B::Device) -> Self {
        let options = TensorCreationOptions::new(device.clone()).with_dtype(DType::F32);
        Self(Tensor::from_data(item.convert::<f32>(), options))
    }
}

/// One parameter's state: step count, f32 moments and, for a non-f32 parameter, its f32 master
/// copy.
#[derive(Record, Clone)]
pub struct MasterAdamWState<B: Backend, const D: usize> {
    pub time: usize,
    pub moment_1: F32Tensor<B, D>,
    pub moment_2: F32Tensor<B, D>,
    pub master: Option<F32Tensor<B, D>>,
}

/// AdamW (decoupled weight decay, bias-corrected moments) with f32 master weights for
/// parameters stored in a narrower float type.
#[derive(Debug, Clone)]
pub struct MasterAdamW {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
}

impl MasterAdamW {
    /// Wrapped for modules, as Burn's optimizers are.
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(
        self,
    ) -> OptimizerAdaptor<MasterAdamW, M, B> {
        OptimizerAdaptor::from(self)
    }
}

/// Whether `B` keeps its tensors in host memory, where reading a tensor's values is no
/// transfer (the Flex CPU backend).
fn on_host<B: Backend>() -> bool {
    #[cfg(feature = "flex")]
    {
        std::any::TypeId::of::<B>() == std::any::TypeId::of::<burn::backend::Flex>()
    }
    #[cfg(not(feature = "flex"))]
    {
        false
    }
}

/// Elements per parallel chunk of [`MasterAdamW::host_step`].
const HOST_CHUNK: usize = 1 << 16;

impl MasterAdamW {
    /// The f32 step of [`SimpleOptimizer::step`] in one pass over the parameter, its gradient
    /// and both moments, updated in place, for a backend whose tensors live in host memory.
    /// The tensor form runs about fifteen whole-tensor passes (at 107M parameters, ~10% of a
    /// GRPO step on the CPU); this computes every element with the same f32 operations in the
    /// same order, so the result is the tensor form's bit for bit (tested against Burn's
    /// AdamW). Buffers are taken without a copy when nothing else holds them.
    fn host_step<B: Backend, const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<MasterAdamWState<B, D>>,
    ) -> (Tensor<B, D>, Option<MasterAdamWState<B, D>>) {
        let device = tensor.device();
        let f32_data = |t: Tensor<B, D>| t.cast(FloatDType::F32).into_data();
        let mut w = f32_data(tensor);
        let g = f32_data(grad);
        let (time, mut m, mut v) = match state {
            Some(s) => (
                s.time + 1,
                s.moment_1.0.into_data(),
                s.moment_2.0.into_data(),
            ),
            None => {
                let zeros = || TensorData::zeros::<f32, _>(g.shape.clone());
                (1, zeros(), zeros())
            }
        };
        let first = time == 1;
        let (b1, b2, eps) = (self.beta_1, self.beta_2, self.epsilon);
        let (f1, f2) = (1.0 - b1, 1.0 - b2);
        let t = time as i32;
        let (c1, c2) = (1f32 - b1.powi(t), 1f32 - b2.powi(t));
        let decay = lr * self.weight_decay as f64;
        // The scalars as the tensor ops see them: f64 arguments become f32 elements.
        let keep = (1.0 - decay) as f32;
        let lr32 = lr as f32;
        let slice = "an f32 tensor's values";
        let gs = g.as_slice::<f32>().expect(slice);
        let ws = w.as_mut_slice::<f32>().expect(slice);
        let ms = m.as_mut_slice::<f32>().expect(slice);
        let vs = v.as_mut_slice::<f32>().expect(slice);
        ws.par_chunks_mut(HOST_CHUNK)
            .zip(ms.par_chunks_mut(HOST_CHUNK))
            .zip(vs.par_chunks_mut(HOST_CHUNK))
            .zip(gs.par_chunks(HOST_CHUNK))
            .for_each(|(((w, m), v), g)| {
                for i in 0..w.len() {
                    let gi = g[i];
                    // First step: the moments start from the scaled gradient (no zero term).
                    let (mi, vi) = if first {
                        (gi * f1, (gi * gi) * f2)
                    } else {
                        (m[i] * b1 + gi * f1, v[i] * b2 + (gi * gi) * f2)
                    };
                    m[i] = mi;
                    v[i] = vi;
                    let delta = (mi / c1) / ((vi / c2).sqrt() + eps);
                    let decayed = if decay == 0.0 { w[i] } else { w[i] * keep };
                    w[i] = decayed - delta * lr32;
                }
            });
        let back = |d: TensorData| Tensor::<B, D>::from_data(d, &device);
        let state = MasterAdamWState {
            time,
            moment_1: F32Tensor(back(m)),
            moment_2: F32Tensor(back(v)),
            master: None,
        };
        (back(w), Some(state))
    }

    /// The step in whole-tensor operations, for any backend and dtype.
    fn tensor_step<B: Backend, const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<MasterAdamWState<B, D>>,
    ) -> (Tensor<B, D>, Option<MasterAdamWState<B, D>>) {
        let dtype = tensor.dtype();
        let narrow = dtype != DType::F32;
        let grad = grad.cast(FloatDType::F32);
        let (f1, f2) = (1.0 - self.beta_1, 1.0 - self.beta_2);
        let (time, m, v, weights) = match state {
            Some(s) => {
                let m = s
                    .moment_1
                    .0
                    .mul_scalar(self.beta_1)
                    .add(grad.clone().mul_scalar(f1));
                let v = s
                    .moment_2
                    .0
                    .mul_scalar(self.beta_2)
                    .add(grad.square().mul_scalar(f2));
                let weights = match s.master {
                    Some(master) if narrow => master.0,
                    _ => tensor.cast(FloatDType::F32),
                };
                (s.time + 1, m, v, weights)
            }
            None => (
                1,
                grad.clone().mul_scalar(f1),
                grad.square().mul_scalar(f2),
                tensor.cast(FloatDType::F32),
            ),
        };
        let t = time as i32;
        let m_hat = m.clone().div_scalar(1f32 - self.beta_1.powi(t));
        let v_hat = v.clone().div_scalar(1f32 - self.beta_2.powi(t));
        let delta = m_hat.div(v_hat.sqrt().add_scalar(self.epsilon));
        let decay = lr * self.weight_decay as f64;
        let decayed = if decay == 0.0 {
            weights
        } else {
            weights.mul_scalar(1.0 - decay)
        };
        let updated = decayed - delta.mul_scalar(lr);
        let (param, master) = if narrow {
            (
                updated.clone().cast(FloatDType::from(dtype)),
                Some(F32Tensor(updated)),
            )
        } else {
            (updated, None)
        };
        let state = MasterAdamWState {
            time,
            moment_1: F32Tensor(m),
            moment_2: F32Tensor(v),
            master,
        };
        (param, Some(state))
    }
}

impl<B: Backend> SimpleOptimizer<B> for MasterAdamW {
    type State<const D: usize> = MasterAdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        if tensor.dtype() == DType::F32 && on_host::<B>() {
            self.host_step(lr, tensor, grad, state)
        } else {
            self.tensor_step(lr, tensor, grad, state)
        }
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        let move_to = |t: F32Tensor<B, D>| F32Tensor(t.0.to_device(device));
        MasterAdamWState {
            time: state.time,
            moment_1: move_to(state.moment_1),
            moment_2: move_to(state.moment_2),
            master: state.master.map(move_to),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::optim::AdamWConfig;

    type B = Flex;

    fn values(t: Tensor<B, 1>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
    }

    fn adamw() -> MasterAdamW {
        MasterAdamW {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.01,
        }
    }

    fn grads(step: usize) -> Tensor<B, 1> {
        let g: Vec<f32> = (0..6)
            .map(|i| ((i as f32 + 1.0) * (step as f32 + 0.5)).sin())
            .collect();
        Tensor::from_floats(g.as_slice(), &Default::default())
    }

    #[test]
    fn on_f32_parameters_it_is_burns_adamw_bit_for_bit() {
        let burn_adamw = AdamWConfig::new()
            .with_beta_1(0.9)
            .with_beta_2(0.999)
            .with_epsilon(1e-8)
            .with_weight_decay(0.01)
            .build();
        let ours = adamw();
        let start =
            Tensor::<B, 1>::from_floats([0.02, -0.5, 1.0, 3.0, -0.01, 0.0], &Default::default());
        let (mut a, mut b) = (start.clone(), start);
        let (mut sa, mut sb) = (None, None);
        for step in 0..5 {
            let (na, s) = SimpleOptimizer::<B>::step(&burn_adamw, 1e-2, a, grads(step), sa);
            (a, sa) = (na, s);
            let (nb, s) = ours.step(1e-2, b, grads(step), sb);
            (b, sb) = (nb, s);
        }
        let state = sb.unwrap();
        assert_eq!(state.time, 5);
        assert!(
            state.master.is_none(),
            "an f32 parameter needs no master copy"
        );
        assert_eq!(values(a), values(b));
    }

    #[test]
    fn the_host_step_is_the_tensor_step_bit_for_bit() {
        // Enough elements for several parallel chunks and a partial last one; both with and
        // without weight decay; the first step and later ones.
        let n = 2 * HOST_CHUNK + 123;
        let device = Default::default();
        let wave =
            |k: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * 0.37 + k).sin() * 0.05).collect() };
        for weight_decay in [0.0, 0.01] {
            let ours = MasterAdamW {
                weight_decay,
                ..adamw()
            };
            let start = Tensor::<B, 1>::from_floats(wave(0.0).as_slice(), &device);
            let (mut a, mut b) = (start.clone(), start);
            let (mut sa, mut sb) = (None, None);
            for step in 0..4 {
                let g = || Tensor::<B, 1>::from_floats(wave(step as f32 + 1.0).as_slice(), &device);
                let (na, s) = ours.host_step(3e-3, a, g(), sa);
                (a, sa) = (na, s);
                let (nb, s) = ours.tensor_step(3e-3, b, g(), sb);
                (b, sb) = (nb, s);
            }
            let (sa, sb) = (sa.unwrap(), sb.unwrap());
            assert_eq!(sa.time, sb.time);
            assert!(sa.master.is_none());
            assert_eq!(values(a), values(b), "weights, decay {weight_decay}");
            assert_eq!(values(sa.moment_1.0), values(sb.moment_1.0));
            assert_eq!(values(sa.moment_2.0), values(sb.moment_2.0));
        }
    }

    #[test]
    fn bf16_parameters_learn_at_lr_1e_6_through_their_master_copy() {
        // Weights near 0.02 (bf16 spacing there: 2^-13), a steady gradient, Med-R1's lr.
        let device = Default::default();
        let start = Tensor::<B, 1>::from_floats([0.02, 0.021, -0.019, 0.5, -0.7, 0.03], &device)
            .cast(FloatDType::BF16);
        let before = values(start.clone());
        let ones = || Tensor::<B, 1>::ones([6], &device).cast(FloatDType::BF16);
        let ours = MasterAdamW {
            weight_decay: 0.0,
            ..adamw()
        };
        let (mut w, mut state) = (start, None);
        for _ in 0..100 {
            let (nw, s) = ours.step(1e-6, w, ones(), state);
            (w, state) = (nw, s);
        }
        assert_eq!(w.dtype(), DType::BF16, "the parameter stays bf16");
        let master = values(state.unwrap().master.unwrap().0);
        for (m, b) in master.iter().zip(&before) {
            // 100 Adam steps of ~lr each against a constant gradient: -1e-4, up to f32
            // rounding of each step's sum (at most half a unit in the last place of |w|).
            let rounding = 100.0 * b.abs() * f32::EPSILON + 1e-8;
            assert!(
                ((m - b) + 1e-4).abs() < rounding,
                "master of {b} moved {} (want -1e-4 within {rounding})",
                m - b
            );
        }
        let after = values(w);
        let moved = after.iter().zip(&before).filter(|(a, b)| a != b).count();
        assert!(
            moved >= 3,
            "bf16 weights near 0.02 must move by now: {before:?} -> {after:?}"
        );

        // Without a master copy the same steps are lost to rounding: the reason this exists.
        let plain = AdamWConfig::new()
            .with_epsilon(1e-8)
            .with_weight_decay(0.0)
            .build();
        let (mut w, mut state) = (
            Tensor::<B, 1>::from_floats(before.as_slice(), &device).cast(FloatDType::BF16),
            None,
        );
        for _ in 0..100 {
            let (nw, s) = SimpleOptimizer::<B>::step(&plain, 1e-6, w, ones(), state);
            (w, state) = (nw, s);
        }
        assert_eq!(
            values(w),
            before,
            "pure bf16 AdamW at lr 1e-6 does not move"
        );
    }

    #[test]
    fn the_state_round_trips_in_f32_through_a_record() {
        use burn::record::{BinBytesRecorder, HalfPrecisionSettings, Recorder};
        let device = Default::default();
        let w = Tensor::<B, 1>::from_floats([0.02, 0.5, -0.25], &device).cast(FloatDType::BF16);
        let g = Tensor::<B, 1>::from_floats([0.3, -0.1, 0.2], &device).cast(FloatDType::BF16);
        let (_, state) = adamw().step(1e-3, w, g, None);
        let state = state.unwrap();
        let master = values(state.master.clone().unwrap().0);
        // Even a half-precision recorder keeps the master copy and moments exact.
        let recorder = BinBytesRecorder::<HalfPrecisionSettings>::default();
        let bytes = Recorder::<B>::record(&recorder, state.clone(), ()).unwrap();
        let back: MasterAdamWState<B, 1> = recorder.load(bytes, &device).unwrap();
        assert_eq!(back.time, 1);
        let restored = back.master.unwrap().0;
        assert_eq!(restored.dtype(), DType::F32);
        assert_eq!(values(restored), master);
        assert_eq!(values(back.moment_2.0), values(state.moment_2.0));
    }
}
