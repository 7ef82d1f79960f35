//! LoRA adapters on the model's linear layers, with PEFT's semantics (`peft.LoraConfig`,
//! `peft.tuners.lora.layer.Linear`): `y = base(x) + scale · B(A(dropout(x)))`, `scale =
//! alpha / r` (`alpha / sqrt(r)` with rsLoRA), A initialised Kaiming-uniform and B zero so a
//! fresh adapter changes nothing. The base stays frozen; the frozen reference of a GRPO run is
//! the same model with the adapters bypassed ([`Qwen2VL::without_adapters`]), sharing the base
//! weights instead of copying them.
//!
//! Modules are named as PEFT names them on transformers' Qwen2-VL (5.x layout):
//! `model.language_model.layers.{i}.self_attn.q_proj`, `model.language_model.layers.{i}.mlp.
//! gate_proj`, `model.visual.blocks.{i}.attn.qkv`, `model.visual.blocks.{i}.mlp.fc1`,
//! `model.visual.merger.mlp.0`, ... `target_modules` selects among them as PEFT does
//! (`peft.tuners.tuners_utils.check_target_module_exists`): a list matches a module whose name
//! is an entry or ends with `.` + an entry; a single string is a regular expression the whole
//! name must match.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::{backend::Backend, Distribution, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::Qwen2VLConfig;
use crate::error::Qwen2VLError;
use crate::model::Qwen2VL;
use crate::params::Dense;

/// The text decoder's projections: the default targets (PEFT's default for Qwen2 models).
pub const DEFAULT_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Which linear layers get an adapter: names (suffix match) or one regular expression (full
/// match), as PEFT's `target_modules`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    Pattern(String),
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::Names(DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect())
    }
}

/// A compiled [`TargetModules`].
pub struct TargetMatcher {
    names: Vec<String>,
    pattern: Option<regex::Regex>,
}

impl TargetMatcher {
    pub fn new(targets: &TargetModules) -> Result<Self, Qwen2VLError> {
        Ok(match targets {
            TargetModules::Names(names) => Self {
                names: names.clone(),
                pattern: None,
            },
            TargetModules::Pattern(p) => Self {
                names: Vec::new(),
                pattern: Some(regex::Regex::new(&format!("^(?:{p})$")).map_err(|e| {
                    Qwen2VLError::Lora(format!(
                        "lora.target_modules: bad regular expression {p:?}: {e}"
                    ))
                })?),
            },
        })
    }

    /// Whether the module named `name` (PEFT naming) is a target.
    pub fn matches(&self, name: &str) -> bool {
        match &self.pattern {
            Some(re) => re.is_match(name),
            None => self.names.iter().any(|t| {
                name == t
                    || name
                        .strip_suffix(t.as_str())
                        .is_some_and(|p| p.ends_with('.'))
            }),
        }
    }
}

/// Every adaptable projection of a model of this architecture: its PEFT module name and
/// `[in, out]`, in [`Qwen2VL::projections`]'s order (a test holds the two together).
pub fn projection_shapes(c: &Qwen2VLConfig) -> Vec<(String, [usize; 2])> {
    let v = &c.vision;
    let e = v.embed_dim;
    let mlp = v.mlp_dim();
    let merged = e * v.spatial_merge_size * v.spatial_merge_size;
    let mut out = Vec::new();
    for i in 0..v.depth {
        let p = format!("model.visual.blocks.{i}");
        out.push((format!("{p}.attn.qkv"), [e, 3 * e]));
        out.push((format!("{p}.attn.proj"), [e, e]));
        match v.kind {
            crate::config::VisionKind::Qwen2VL => {
                out.push((format!("{p}.mlp.fc1"), [e, mlp]));
                out.push((format!("{p}.mlp.fc2"), [mlp, e]));
            }
            crate::config::VisionKind::Qwen25VL { .. } => {
                out.push((format!("{p}.mlp.gate_proj"), [e, mlp]));
                out.push((format!("{p}.mlp.up_proj"), [e, mlp]));
                out.push((format!("{p}.mlp.down_proj"), [mlp, e]));
            }
        }
    }
    out.push(("model.visual.merger.mlp.0".into(), [merged, merged]));
    out.push(("model.visual.merger.mlp.2".into(), [merged, v.hidden_size]));
    let t = &c.text;
    let (h, q, kv, i) = (
        t.hidden_size,
        t.num_attention_heads * t.head_dim,
        t.num_key_value_heads * t.head_dim,
        t.intermediate_size,
    );
    for l in 0..t.num_hidden_layers {
        let p = format!("model.language_model.layers.{l}");
        out.push((format!("{p}.self_attn.q_proj"), [h, q]));
        out.push((format!("{p}.self_attn.k_proj"), [h, kv]));
        out.push((format!("{p}.self_attn.v_proj"), [h, kv]));
        out.push((format!("{p}.self_attn.o_proj"), [q, h]));
        out.push((format!("{p}.mlp.gate_proj"), [h, i]));
        out.push((format!("{p}.mlp.up_proj"), [h, i]));
        out.push((format!("{p}.mlp.down_proj"), [i, h]));
    }
    out
}

/// LoRA settings, PEFT's `LoraConfig` names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank of each adapter.
    pub r: usize,
    /// `lora_alpha`: the adapter's output is scaled by `alpha / r`.
    pub alpha: f64,
    /// `lora_dropout`: dropout on the adapter's input, applied only when gradients are tracked
    /// (the policy's training forward), as PyTorch's train mode.
    pub dropout: f64,
    pub target_modules: TargetModules,
    /// rsLoRA: scale by `alpha / sqrt(r)` instead.
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: TargetModules::default(),
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    /// The factor on the adapter's output.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// The values the adapters of a model of this architecture hold (what LoRA trains).
    pub fn trainable_params(&self, c: &Qwen2VLConfig) -> Result<usize, Qwen2VLError> {
        let m = TargetMatcher::new(&self.target_modules)?;
        Ok(projection_shapes(c)
            .iter()
            .filter(|(name, _)| m.matches(name))
            .map(|(_, [i, o])| self.r * (i + o))
            .sum())
    }

    pub fn validate(&self) -> Result<(), Qwen2VLError> {
        let bad = |m: String| Err(Qwen2VLError::Lora(m));
        if self.r == 0 {
            return bad("lora.r must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("lora.alpha must be positive, got {}", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!(
                "lora.dropout must be in [0, 1), got {}",
                self.dropout
            ));
        }
        if let TargetModules::Names(n) = &self.target_modules {
            if n.is_empty() {
                return bad("lora.target_modules is empty".into());
            }
        }
        TargetMatcher::new(&self.target_modules).map(|_| ())
    }
}

/// One adapter: `A` `[in, r]` and `B` `[r, out]` (PEFT stores their transposes, `lora_A.weight`
/// `[r, in]` and `lora_B.weight` `[out, r]`).
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    pub a: Param<Tensor<B, 2>>,
    pub b: Param<Tensor<B, 2>>,
    pub dropout: Dropout,
    pub scale: f64,
}

impl<B: Backend> LoraAdapter<B> {
    /// A fresh adapter as PEFT initialises one: A Kaiming-uniform (`a = sqrt(5)`, i.e.
    /// uniform in ±1/sqrt(in)), B zero. Seeded through the backend's seed.
    pub fn init(d_in: usize, d_out: usize, cfg: &LoraConfig, device: &B::Device) -> Self {
        let bound = 1.0 / (d_in as f64).sqrt();
        let a = Tensor::random([d_in, cfg.r], Distribution::Uniform(-bound, bound), device);
        let b = Tensor::zeros([cfg.r, d_out], device);
        Self::from_tensors(a, b, cfg)
    }

    /// `a` `[in, r]`, `b` `[r, out]`.
    pub fn from_tensors(a: Tensor<B, 2>, b: Tensor<B, 2>, cfg: &LoraConfig) -> Self {
        Self {
            a: Param::from_tensor(a),
            b: Param::from_tensor(b),
            dropout: DropoutConfig::new(cfg.dropout).init(),
            scale: cfg.scale(),
        }
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }

    /// `scale · A B` `[in, out]`: what the adapter adds to the base weight (`[in, out]`).
    pub fn delta(&self) -> Tensor<B, 2> {
        self.a.val().matmul(self.b.val()).mul_scalar(self.scale)
    }
}

impl<B: Backend> Dense<B> for LoraAdapter<B> {
    fn apply<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mut dims = x.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let b = self.b.val();
        dims[D - 1] = b.dims()[1];
        let x = self.dropout.forward(x);
        let d_in = x.dims()[D - 1];
        x.reshape([rows, d_in])
            .matmul(self.a.val())
            .matmul(b)
            .mul_scalar(self.scale)
            .reshape(dims)
    }
}

/// A linear layer that may carry an adapter.
#[derive(Module, Debug)]
pub struct Proj<B: Backend> {
    pub base: Linear<B>,
    pub lora: Option<LoraAdapter<B>>,
}

impl<B: Backend> Proj<B> {
    pub fn new(base: Linear<B>) -> Self {
        Self { base, lora: None }
    }

    /// `[in, out]` of the base weight.
    pub fn dims(&self) -> [usize; 2] {
        self.base.weight.dims()
    }

    /// The base weight with the adapter folded in (`[in, out]`), what the layer computes.
    pub fn merged_weight(&self) -> Tensor<B, 2> {
        let w = self.base.weight.val();
        match &self.lora {
            Some(l) => w + l.delta(),
            None => w,
        }
    }
}

impl<B: Backend> Dense<B> for Proj<B> {
    fn apply<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match &self.lora {
            None => self.base.apply(x),
            Some(l) => self.base.apply(x.clone()) + l.apply(x),
        }
    }
}

impl<B: Backend> Qwen2VL<B> {
    /// Every adaptable projection under its PEFT module name, in checkpoint order.
    pub fn projections(&self) -> Vec<(String, &Proj<B>)> {
        let mut out = Vec::new();
        for (i, b) in self.visual.blocks.iter().enumerate() {
            let p = format!("model.visual.blocks.{i}");
            for (name, proj) in b.projections() {
                out.push((format!("{p}.{name}"), proj));
            }
        }
        out.push(("model.visual.merger.mlp.0".into(), &self.visual.merger.fc1));
        out.push(("model.visual.merger.mlp.2".into(), &self.visual.merger.fc2));
        for (i, l) in self.text.layers.iter().enumerate() {
            let p = format!("model.language_model.layers.{i}");
            out.push((format!("{p}.self_attn.q_proj"), &l.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &l.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &l.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &l.o_proj));
            out.push((format!("{p}.mlp.gate_proj"), &l.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &l.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &l.down_proj));
        }
        out
    }

    /// [`Self::projections`], mutable.
    pub fn projections_mut(&mut self) -> Vec<(String, &mut Proj<B>)> {
        let mut out = Vec::new();
        for (i, b) in self.visual.blocks.iter_mut().enumerate() {
            let p = format!("model.visual.blocks.{i}");
            for (name, proj) in b.projections_mut() {
                out.push((format!("{p}.{name}"), proj));
            }
        }
        let merger = &mut self.visual.merger;
        out.push(("model.visual.merger.mlp.0".into(), &mut merger.fc1));
        out.push(("model.visual.merger.mlp.2".into(), &mut merger.fc2));
        for (i, l) in self.text.layers.iter_mut().enumerate() {
            let p = format!("model.language_model.layers.{i}");
            out.push((format!("{p}.self_attn.q_proj"), &mut l.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut l.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut l.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &mut l.o_proj));
            out.push((format!("{p}.mlp.gate_proj"), &mut l.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &mut l.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &mut l.down_proj));
        }
        out
    }

    /// How many values the adapters hold (what LoRA trains).
    pub fn adapter_params(&self) -> usize {
        self.projections()
            .iter()
            .filter_map(|(_, p)| p.lora.as_ref())
            .map(|l| l.a.shape().num_elements() + l.b.shape().num_elements())
            .sum()
    }

    /// The largest dropout probability of any adapter's input (0 without adapters).
    pub fn adapter_dropout(&self) -> f64 {
        self.projections()
            .iter()
            .filter_map(|(_, p)| p.lora.as_ref())
            .map(|l| l.dropout.prob)
            .fold(0.0, f64::max)
    }

    /// Whether any projection carries an adapter.
    pub fn has_adapters(&self) -> bool {
        self.projections().iter().any(|(_, p)| p.lora.is_some())
    }

    /// The base frozen (no gradients, no optimizer state) and a fresh adapter on every target
    /// (see [`LoraAdapter::init`]). Fails when a target names no module, or names `lm_head` or
    /// the patch embedding (not adaptable here), or the model already has adapters.
    pub fn with_lora(self, cfg: &LoraConfig) -> Result<Self, Qwen2VLError> {
        cfg.validate()?;
        if self.has_adapters() {
            return Err(Qwen2VLError::Lora(
                "the model already carries LoRA adapters".into(),
            ));
        }
        let device = self.text.embed_tokens.weight.device();
        let mut model = self.no_grad();
        let names = model.attach(cfg, |_, [d_in, d_out]| {
            Ok(LoraAdapter::init(d_in, d_out, cfg, &device))
        })?;
        if names == 0 {
            return Err(Qwen2VLError::Lora(format!(
                "lora.target_modules {:?} match no linear layer of the model (PEFT names, e.g. \
                 model.language_model.layers.0.self_attn.q_proj, model.visual.blocks.0.attn.qkv)",
                cfg.target_modules
            )));
        }
        Ok(model)
    }

    /// Puts `make(name, [in, out])`'s adapter on every projection `cfg` targets; returns how
    /// many. Refuses targets this model cannot adapt.
    pub(crate) fn attach<F>(&mut self, cfg: &LoraConfig, mut make: F) -> Result<usize, Qwen2VLError>
    where
        F: FnMut(&str, [usize; 2]) -> Result<LoraAdapter<B>, Qwen2VLError>,
    {
        let matcher = TargetMatcher::new(&cfg.target_modules)?;
        for fixed in ["lm_head", "model.visual.patch_embed.proj"] {
            if matcher.matches(fixed) {
                return Err(Qwen2VLError::Lora(format!(
                    "lora.target_modules selects {fixed}, which medr1 does not adapt (only the \
                     decoder's, vision blocks' and merger's linear layers)"
                )));
            }
        }
        let mut count = 0;
        for (name, proj) in self.projections_mut() {
            if matcher.matches(&name) {
                proj.lora = Some(make(&name, proj.dims())?);
                count += 1;
            }
        }
        Ok(count)
    }

    /// The same model with every adapter bypassed: the frozen base, sharing its weights (no
    /// copy). The reference model of a LoRA run.
    pub fn without_adapters(mut self) -> Self {
        for (_, proj) in self.projections_mut() {
            proj.lora = None;
        }
        self
    }

    /// Every adapter folded into its base weight (`W + scale A B`) and removed: the plain model
    /// that computes what the adapted one does.
    pub fn merge_adapters(mut self) -> Self {
        for (_, proj) in self.projections_mut() {
            if proj.lora.is_some() {
                let merged = proj.merged_weight();
                proj.base.weight = Param::from_tensor(merged);
                proj.lora = None;
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> TargetModules {
        TargetModules::Names(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn targets_match_as_peft_matches_them() {
        let m = TargetMatcher::new(&names(&["q_proj", "merger.mlp.0", "proj"])).unwrap();
        assert!(m.matches("model.language_model.layers.3.self_attn.q_proj"));
        assert!(m.matches("model.visual.merger.mlp.0"));
        // Suffix after a dot only: "proj" is the vision attention's output, not "q_proj".
        assert!(m.matches("model.visual.blocks.0.attn.proj"));
        assert!(!m.matches("model.language_model.layers.0.self_attn.o_proj"));
        assert!(!m.matches("model.visual.merger.mlp.2"));
        assert!(m.matches("proj"));

        let re = TargetMatcher::new(&TargetModules::Pattern(
            r"model\.language_model\.layers\.[01]\..*_proj".into(),
        ))
        .unwrap();
        assert!(re.matches("model.language_model.layers.1.mlp.up_proj"));
        assert!(!re.matches("model.language_model.layers.2.mlp.up_proj"));
        // A full match, not a search.
        assert!(!re.matches("x.model.language_model.layers.1.mlp.up_proj"));
        assert!(TargetMatcher::new(&TargetModules::Pattern("(".into())).is_err());
    }

    #[test]
    fn projection_shapes_are_the_models_projections() {
        use burn::backend::Flex;
        let c = Qwen2VLConfig::from_file(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/qwen2vl-tiny-seed0/hf_model/config.json"
        )))
        .unwrap();
        let model = Qwen2VL::<Flex>::random(&c, &Default::default());
        let from_model: Vec<(String, [usize; 2])> = model
            .projections()
            .into_iter()
            .map(|(n, p)| (n, p.dims()))
            .collect();
        assert_eq!(projection_shapes(&c), from_model);
        let cfg = LoraConfig {
            r: 3,
            target_modules: names(&["qkv", "down_proj"]),
            ..LoraConfig::default()
        };
        let counted = cfg.trainable_params(&c).unwrap();
        let adapted = model.with_lora(&cfg).unwrap();
        assert_eq!(counted, adapted.adapter_params());
    }

    #[test]
    fn scale_follows_lora_and_rslora() {
        let mut c = LoraConfig {
            r: 16,
            alpha: 32.0,
            ..LoraConfig::default()
        };
        assert_eq!(c.scale(), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scale(), 8.0);
        c.r = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn targets_deserialize_from_a_list_or_a_pattern() {
        let l: TargetModules = serde_json::from_str(r#"["q_proj","v_proj"]"#).unwrap();
        assert_eq!(l, names(&["q_proj", "v_proj"]));
        let p: TargetModules = serde_json::from_str(r#"".*q_proj""#).unwrap();
        assert_eq!(p, TargetModules::Pattern(".*q_proj".into()));
    }
}
