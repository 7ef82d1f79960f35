//! The reference model pulled towards the policy (TRL's `sync_ref_model`, after TR-DPO,
//! arXiv 2404.09656): `reference = alpha * policy + (1 - alpha) * reference`, parameter by
//! parameter (`trl/trainer/callbacks.py` `SyncRefModelCallback.sync_target_model`).

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, Tensor};
use qwen2vl::Qwen2VL;

/// Every float parameter of a model, flattened, in the module's order.
struct Flatten<B: Backend> {
    out: Vec<Tensor<B, 1>>,
}

impl<B: Backend> ModuleVisitor<B> for Flatten<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.out.push(param.val().flatten(0, D - 1));
    }
}

/// Mixes each float parameter with the policy's at the same place.
struct Mix<B: Backend> {
    policy: std::vec::IntoIter<Tensor<B, 1>>,
    alpha: f32,
}

impl<B: Backend> ModuleMapper<B> for Mix<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let p = self.policy.next().expect("the same architecture");
        param.map(|r| {
            let shape = r.shape();
            r.mul_scalar(1.0 - self.alpha) + p.reshape(shape).mul_scalar(self.alpha)
        })
    }
}

/// `alpha * policy + (1 - alpha) * reference` for every parameter; the two models have one
/// architecture (the reference is the policy's starting point).
pub fn mix_into_reference<B: Backend>(
    reference: Qwen2VL<B>,
    policy: &Qwen2VL<B>,
    alpha: f32,
) -> Qwen2VL<B> {
    let mut flat = Flatten { out: Vec::new() };
    policy.visit(&mut flat);
    let mut mix = Mix {
        policy: flat.out.into_iter(),
        alpha,
    };
    reference.map(&mut mix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn each_parameter_is_mixed_by_hand() {
        let text =
            include_str!("../../../../tests/fixtures/qwen2vl-tiny-seed0/hf_model/config.json");
        let config = qwen2vl::Qwen2VLConfig::from_json_str(text, "tiny").unwrap();
        let device = Default::default();
        let reference = Qwen2VL::<Flex>::random(&config, &device);
        let policy = Qwen2VL::<Flex>::random(&config, &device);
        let first = |m: &Qwen2VL<Flex>| -> Vec<f32> {
            let mut f = Flatten { out: Vec::new() };
            m.visit(&mut f);
            f.out
                .into_iter()
                .flat_map(|t| t.into_data().to_vec::<f32>().unwrap())
                .collect()
        };
        let (r, p) = (first(&reference), first(&policy));
        let mixed = first(&mix_into_reference(reference, &policy, 0.6));
        assert_eq!(mixed.len(), r.len());
        for ((m, r), p) in mixed.iter().zip(&r).zip(&p) {
            assert!((m - (0.6 * p + 0.4 * r)).abs() < 1e-6, "{m} vs {r} {p}");
        }
    }
}
