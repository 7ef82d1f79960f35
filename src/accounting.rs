//! What a GRPO step holds in memory, accounted from the architecture, the step's shapes, the
//! training mode (full or LoRA) and the memory options: the estimate `medr1 bench` prints
//! beside the peak it measures, and what the book's memory tables come from.
//!
//! Activations count what the backward pass keeps per token: in a decoder layer the norms'
//! inputs and outputs, the projections' inputs and outputs, the attention probabilities and
//! the MLP's three intermediate products; in a vision block the same with the block's own
//! widths, attention within one image (Qwen2-VL, and Qwen2.5-VL's full-attention blocks) or
//! within one window (Qwen2.5-VL's other blocks).

use grpo::learner::MemoryOptions;
use qwen2vl::Qwen2VLConfig;

/// The shapes of one GRPO step.
#[derive(Debug, Clone, Copy)]
pub struct StepShape {
    pub prompts: usize,
    pub num_generations: usize,
    /// Tokens per prompt, its image tokens included.
    pub prompt_tokens: usize,
    /// Vision patches per prompt (before merging; 0 without images).
    pub patches: usize,
    pub completion_tokens: usize,
    /// Each prompt (and image) run once per group, not once per completion.
    pub share_prompt: bool,
}

/// What is trained, and in which precision.
#[derive(Debug, Clone, Copy)]
pub struct Training {
    /// Parameters with gradients and optimizer state (all of them, or the adapters').
    pub trained: usize,
    /// LoRA: the frozen base is also the reference.
    pub lora: bool,
    /// A KL term (`beta > 0`) needs the reference model.
    pub reference: bool,
    /// Some parameter of the vision tower or the merger is trained. When none is (LoRA on the
    /// decoder only), the scoring pass keeps nothing of the vision forward for the backward
    /// pass: the tower runs outside the graph, one block's activations at a time.
    pub vision_trains: bool,
    /// Bytes per weight and activation value (4: f32, 2: bf16).
    pub bytes: usize,
}

/// One line of the account.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub what: &'static str,
    /// Its name in `medr1 bench --json`'s `accounted_gib`.
    pub key: &'static str,
    pub bytes: f64,
}

/// The account of one step: what lives through the step (weights, optimizer state) and the
/// scoring pass's peak on top (activations of one micro-batch and its logits).
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub lines: Vec<Line>,
}

impl Account {
    pub fn total(&self) -> f64 {
        self.lines.iter().map(|l| l.bytes).sum()
    }

    pub fn gib(bytes: f64) -> f64 {
        bytes / (1u64 << 30) as f64
    }

    /// `what: x.xx GiB` lines and the total.
    pub fn lines_text(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .lines
            .iter()
            .map(|l| format!("  {:<44} {:>8.3} GiB", l.what, Self::gib(l.bytes)))
            .collect();
        out.push(format!(
            "  {:<44} {:>8.3} GiB",
            "total",
            Self::gib(self.total())
        ));
        out
    }

    pub fn json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for l in &self.lines {
            map.insert(l.key.into(), Self::gib(l.bytes).into());
        }
        map.insert("total".into(), Self::gib(self.total()).into());
        serde_json::Value::Object(map)
    }
}

/// The account of a step of `config` on `shape`, trained as `training`, with `memory`.
pub fn account(
    config: &Qwen2VLConfig,
    shape: StepShape,
    training: Training,
    memory: MemoryOptions,
) -> Account {
    let params = config.parameter_counts().total() as f64;
    let trained = training.trained as f64;
    let b = training.bytes as f64;
    let t = &config.text;
    let v = &config.vision;
    let rows = shape.prompts * shape.num_generations;
    // Rows per scoring pass, and the prompts they hold.
    let pass_rows = match memory.micro_batch {
        0 => rows,
        m => m.min(rows),
    };
    let pass_prompts = pass_rows.div_ceil(shape.num_generations);
    // Decoder tokens of one pass and the keys each attends to.
    let (prompt_rows, patch_rows) = if shape.share_prompt {
        (pass_prompts, pass_prompts)
    } else {
        (pass_rows, pass_rows)
    };
    let prompt_tok = (prompt_rows * shape.prompt_tokens) as f64;
    let comp_tok = (pass_rows * shape.completion_tokens) as f64;
    let keys = (shape.prompt_tokens + shape.completion_tokens) as f64;
    let (d, kv) = (
        t.hidden_size as f64,
        (t.num_key_value_heads * t.head_dim) as f64,
    );
    let inter = t.intermediate_size as f64;
    let heads = t.num_attention_heads as f64;
    // Per token of one layer; attention probabilities (and scores) per key.
    let layer_per_token = 8.0 * d + 3.0 * kv + 4.0 * inter;
    let layer_bytes = b
        * ((prompt_tok + comp_tok) * layer_per_token
            + (prompt_tok * shape.prompt_tokens as f64 / 2.0 + comp_tok * keys) * 2.0 * heads);
    let layers = t.num_hidden_layers as f64;
    let decoder = if memory.recompute.decoder {
        // Each layer's input, and one layer's activations at a time.
        b * (prompt_tok + comp_tok) * d * layers + layer_bytes
    } else {
        layer_bytes * layers
    };
    let (e, mlp) = (v.embed_dim as f64, v.mlp_dim() as f64);
    // Qwen2-VL's MLP keeps fc1's output and its GELU; Qwen2.5-VL's gated one the gate, the up
    // projection and their product.
    let mlp_products = match v.window_tokens() {
        None => 2.0,
        Some(_) => 3.0,
    };
    let patches = (patch_rows * shape.patches) as f64;
    // Keys per patch: the whole image, or in Qwen2.5-VL's windowed blocks one window of
    // (window_tokens x merge)² patches (fewer at the image's edges: an upper bound).
    let window_keys = v
        .window_tokens()
        .map(|w| (w * v.spatial_merge_size).pow(2).min(shape.patches));
    let block_bytes = |i: usize| {
        let keys = match window_keys {
            Some(k) if !v.full_attention(i) => k,
            _ => shape.patches,
        } as f64;
        b * patches * (6.0 * e + 3.0 * e + mlp_products * mlp + 2.0 * v.num_heads as f64 * keys)
    };
    let blocks = (0..v.depth).map(block_bytes);
    let vision = if !training.vision_trains {
        0.0
    } else if memory.recompute.vision {
        b * patches * e * v.depth as f64 + blocks.fold(0.0, f64::max)
    } else {
        blocks.sum()
    };
    // Logits, their log-softmax and its gradient, for the tokens of one head chunk.
    let head_tokens = match memory.head_chunk {
        0 => comp_tok,
        c => (c as f64).min(comp_tok),
    };
    let logits = 3.0 * 4.0 * head_tokens * t.vocab_size as f64;
    let mut lines = vec![
        Line {
            what: "policy weights",
            key: "weights",
            bytes: params * b,
        },
        Line {
            what: "gradients",
            key: "gradients",
            bytes: trained * b,
        },
        Line {
            what: "AdamW moments (f32)",
            key: "adamw_moments",
            bytes: 2.0 * 4.0 * trained,
        },
    ];
    if training.bytes < 4 {
        lines.push(Line {
            what: "AdamW master weights (f32)",
            key: "adamw_master",
            bytes: 4.0 * trained,
        });
    }
    if training.reference && !training.lora {
        lines.push(Line {
            what: "reference model",
            key: "reference",
            bytes: params * b,
        });
    }
    lines.push(Line {
        what: "decoder activations (one scoring pass)",
        key: "decoder_activations",
        bytes: decoder,
    });
    if shape.patches > 0 {
        lines.push(Line {
            what: if training.vision_trains {
                "vision activations (one scoring pass)"
            } else {
                "vision activations (frozen: none kept)"
            },
            key: "vision_activations",
            bytes: vision,
        });
    }
    lines.push(Line {
        what: "LM-head logits (one chunk, f32)",
        key: "head_logits",
        bytes: logits,
    });
    Account { lines }
}

/// The matrix work of one GRPO step, in floating-point operations (a multiply-add counts
/// two): the linear layers, the attention products (causal: each token against the keys up to
/// it; a vision patch against its image's or its window's) and the LM head (one logits row per
/// completion token). Elementwise work (norms, activations, softmax, the optimizer) is left
/// out. What sharing the prompt can gain is bounded by the ratio of two such counts: the
/// completion tokens' work, the LM head's above all, is the same either way.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Work {
    /// Prefill and decoding (vision included).
    pub rollout: f64,
    /// One forward scoring pass: the reference's, or the policy's.
    pub scoring_forward: f64,
    /// The policy's backward pass.
    pub backward: f64,
    /// A reference model scores the completions (`beta > 0`).
    pub reference: bool,
}

impl Work {
    pub fn step(&self) -> f64 {
        let forwards = if self.reference { 2.0 } else { 1.0 };
        self.rollout + forwards * self.scoring_forward + self.backward
    }
}

/// The work of a step of `config` on `shape`, trained as `training`.
pub fn work(config: &Qwen2VLConfig, shape: StepShape, training: Training) -> Work {
    let t = &config.text;
    let rows = (shape.prompts * shape.num_generations) as f64;
    let prompt_rows = if shape.share_prompt {
        shape.prompts as f64
    } else {
        rows
    };
    let (p, c) = (shape.prompt_tokens as f64, shape.completion_tokens as f64);
    let (d, q, kv) = (
        t.hidden_size as f64,
        (t.num_attention_heads * t.head_dim) as f64,
        (t.num_key_value_heads * t.head_dim) as f64,
    );
    let layers = t.num_hidden_layers as f64;
    let linear = 2.0 * layers * (2.0 * d * q + 2.0 * d * kv + 3.0 * d * t.intermediate_size as f64);
    // Scores and the weighted sum of values: 4 q flops per key, in every layer.
    let attention = |keys: f64| 4.0 * q * layers * keys;
    let head = 2.0 * d * t.vocab_size as f64;
    // Keys summed over n tokens that follow `before` keys: n before + n (n + 1) / 2.
    let keys = |before: f64, n: f64| n * before + n * (n + 1.0) / 2.0;

    let v = &config.vision;
    let n = shape.patches as f64;
    let (e, mlp) = (v.embed_dim as f64, v.mlp_dim() as f64);
    let mlp_in = match v.window_tokens() {
        None => 1.0,
        Some(_) => 2.0,
    };
    let merge = (v.spatial_merge_size * v.spatial_merge_size) as f64;
    let merged = e * merge;
    let window_keys = v
        .window_tokens()
        .map(|w| ((w * v.spatial_merge_size).pow(2) as f64).min(n));
    let vision_attention: f64 = (0..v.depth)
        .map(|i| match window_keys {
            Some(k) if !v.full_attention(i) => 4.0 * e * n * k,
            _ => 4.0 * e * n * n,
        })
        .sum();
    let vision_linear = n
        * 2.0
        * (config.patch_dim() as f64 * e
            + v.depth as f64 * (4.0 * e * e + (mlp_in + 1.0) * e * mlp))
        + n / merge * 2.0 * (merged * merged + v.hidden_size as f64 * merged);
    let images = prompt_rows * (shape.patches > 0) as u8 as f64;

    // Scoring: the prompt rows' tokens, then every row's completion after its prompt.
    let score_linear = (prompt_rows * p + rows * c) * linear;
    let score_attention = attention(prompt_rows * keys(0.0, p) + rows * keys(p, c));
    let score_head = rows * c * head;
    let score_vision = images * (vision_linear + vision_attention);
    let scoring_forward = score_linear + score_attention + score_head + score_vision;
    // Backward: the inputs' gradients everywhere, the weights' where they train.
    let (decoder_grads, head_grads) = if training.lora {
        (1.0, 1.0)
    } else {
        (2.0, 2.0)
    };
    let vision_grads = if training.vision_trains { 2.0 } else { 0.0 };
    let backward = decoder_grads * score_linear
        + 2.0 * score_attention
        + head_grads * score_head
        + vision_grads * images * (vision_linear + vision_attention);
    // Rollout: the prompt rows prefilled, the first token's logits from the prompt's last
    // position, then c - 1 decoding steps per row.
    let decode = (c - 1.0).max(0.0);
    let rollout = prompt_rows * p * linear
        + attention(prompt_rows * keys(0.0, p) + rows * keys(p, decode))
        + rows * decode * linear
        + rows * c * head
        + images * (vision_linear + vision_attention);
    Work {
        rollout,
        scoring_forward,
        backward,
        reference: training.reference,
    }
}

/// A data-parallel step over `devices` devices (`medr1 train --devices`): the main device's
/// account and another's. Each scores its share of the prompts (`shape.prompts / devices`,
/// whole groups); the main one alone holds the optimizer state and, besides its own
/// gradients, one set brought from another device at a time; another holds its copy of the
/// policy (and reference), its gradients and its share's activations.
pub fn per_device(
    config: &Qwen2VLConfig,
    shape: StepShape,
    training: Training,
    memory: MemoryOptions,
    devices: usize,
) -> (Account, Option<Account>) {
    let devices = devices.max(1);
    let share = StepShape {
        prompts: shape.prompts.div_ceil(devices),
        ..shape
    };
    let mut main = account(config, share, training, memory);
    if devices == 1 {
        return (main, None);
    }
    let received = Line {
        what: "gradients brought from another device",
        key: "gradients_received",
        bytes: main
            .lines
            .iter()
            .find(|l| l.key == "gradients")
            .map_or(0.0, |l| l.bytes),
    };
    main.lines.insert(2, received);
    let mut other = account(config, share, training, memory);
    other.lines.retain(|l| !l.key.starts_with("adamw_"));
    (main, Some(other))
}

#[cfg(test)]
mod tests {
    use super::*;
    use qwen2vl::generation::Recompute;

    const QWEN2VL_2B: &str = include_str!("../tests/fixtures/qwen2_vl_2b_instruct_config.json");

    fn med_r1() -> StepShape {
        StepShape {
            prompts: 2,
            num_generations: 4,
            prompt_tokens: 262,
            patches: 784,
            completion_tokens: 16,
            share_prompt: true,
        }
    }

    fn line(a: &Account, what: &str) -> f64 {
        Account::gib(a.lines.iter().find(|l| l.what == what).unwrap().bytes)
    }

    /// The weights and optimizer state of the 2B model as the CUDA chapter's table has them:
    /// bf16 full fine-tuning 4.1 + 4.1 + 16.5 + 8.2 + 4.1 = 37.0 GiB; LoRA r 8 on the
    /// decoder's projections (9,232,384 values) keeps one copy of the weights.
    #[test]
    fn the_2b_weights_and_optimizer_state_match_the_hand_count() {
        let config = Qwen2VLConfig::from_json_str(QWEN2VL_2B, "2b").unwrap();
        let params = 2_208_985_600usize;
        let full = account(
            &config,
            med_r1(),
            Training {
                trained: params,
                lora: false,
                reference: true,
                vision_trains: true,
                bytes: 2,
            },
            MemoryOptions::default(),
        );
        let fixed: f64 = [
            "policy weights",
            "gradients",
            "AdamW moments (f32)",
            "AdamW master weights (f32)",
            "reference model",
        ]
        .iter()
        .map(|w| line(&full, w))
        .sum();
        // 2 (weights) + 2 (gradients) + 8 (moments) + 4 (master) + 2 (reference) bytes.
        let expected = params as f64 * 18.0 / (1u64 << 30) as f64;
        assert!((fixed - expected).abs() < 1e-9, "{fixed} vs {expected}");
        assert!((fixed - 37.0).abs() < 0.05, "{fixed}");
        let lora = account(
            &config,
            med_r1(),
            Training {
                trained: 9_232_384,
                lora: true,
                reference: true,
                vision_trains: false,
                bytes: 2,
            },
            MemoryOptions::default(),
        );
        assert!(!lora.lines.iter().any(|l| l.what == "reference model"));
        assert!((line(&lora, "policy weights") - 4.114).abs() < 0.001);
        assert!((line(&lora, "AdamW moments (f32)") - 0.0688).abs() < 0.001);
    }

    /// Qwen2.5-VL-3B's vision tower at Med-R1's shapes (2 shared prompts x 784 patches, bf16):
    /// per patch, a windowed block keeps 9 x 1280 (norms, projections) plus 3 x 3420 (gated
    /// MLP) plus 2 x 16 heads x 64 keys (one 112-pixel window: 4 x 4 merged tokens) values, a
    /// full-attention block (7, 15, 23, 31) the same with all 784 keys.
    #[test]
    fn qwen25vl_vision_attends_within_windows_but_in_its_full_blocks() {
        let config = Qwen2VLConfig::from_json_str(
            include_str!("../tests/fixtures/qwen2_5_vl_3b_instruct_config.json"),
            "3b",
        )
        .unwrap();
        let training = Training {
            trained: 1,
            lora: true,
            reference: true,
            vision_trains: true,
            bytes: 2,
        };
        let plain = account(&config, med_r1(), training, MemoryOptions::default());
        let per_patch = |keys: f64| 9.0 * 1280.0 + 3.0 * 3420.0 + 2.0 * 16.0 * keys;
        let patches = 2.0 * 784.0;
        let gib = (1u64 << 30) as f64;
        let expected = 2.0 * patches * (28.0 * per_patch(64.0) + 4.0 * per_patch(784.0)) / gib;
        let got = line(&plain, "vision activations (one scoring pass)");
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
        // Recomputed: every block's input, and the largest block (a full-attention one).
        let mut memory = MemoryOptions::default();
        memory.recompute.vision = true;
        let recomputed = account(&config, med_r1(), training, memory);
        let expected = 2.0 * patches * (32.0 * 1280.0 + per_patch(784.0)) / gib;
        let got = line(&recomputed, "vision activations (one scoring pass)");
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
    }

    /// Each option shrinks its own line and no other; the logits of 8 x 16 tokens over the
    /// 151,936-entry vocabulary are 3 x 4 bytes each, a 64-token chunk half of that.
    /// Two devices: each holds half the activations; the optimizer state only on the main
    /// one, which also receives the other's gradients.
    #[test]
    fn two_devices_split_the_activations_and_keep_one_optimizer() {
        let config = Qwen2VLConfig::from_json_str(QWEN2VL_2B, "2B").unwrap();
        let shape = StepShape {
            prompts: 4,
            ..med_r1()
        };
        let training = Training {
            trained: config.parameter_counts().total(),
            lora: false,
            reference: true,
            vision_trains: true,
            bytes: 4,
        };
        let memory = MemoryOptions::default();
        let by_key = |a: &Account, k: &str| a.lines.iter().find(|l| l.key == k).unwrap().bytes;
        let one = account(&config, shape, training, memory);
        let (main, other) = per_device(&config, shape, training, memory, 2);
        let other = other.expect("a second device");
        let half = account(
            &config,
            StepShape {
                prompts: 2,
                ..shape
            },
            training,
            memory,
        );
        for k in ["decoder_activations", "vision_activations", "head_logits"] {
            assert_eq!(by_key(&main, k), by_key(&half, k), "{k}");
            assert_eq!(by_key(&other, k), by_key(&half, k), "{k}");
            assert!(by_key(&main, k) < by_key(&one, k), "{k}");
        }
        assert_eq!(
            by_key(&main, "adamw_moments"),
            by_key(&one, "adamw_moments")
        );
        assert!(other.lines.iter().all(|l| !l.key.starts_with("adamw")));
        assert_eq!(
            by_key(&main, "gradients_received"),
            by_key(&one, "gradients")
        );
        assert_eq!(by_key(&other, "weights"), by_key(&one, "weights"));
        assert_eq!(by_key(&other, "reference"), by_key(&one, "reference"));
        assert!(per_device(&config, shape, training, memory, 1).1.is_none());
    }

    #[test]
    fn each_memory_option_shrinks_its_own_line() {
        let config = Qwen2VLConfig::from_json_str(QWEN2VL_2B, "2b").unwrap();
        // LoRA with adapters in the vision tower too (its activations are kept).
        let training = Training {
            trained: 9_232_384,
            lora: true,
            reference: true,
            vision_trains: true,
            bytes: 4,
        };
        let plain = account(&config, med_r1(), training, MemoryOptions::default());
        let logits = 3.0 * 4.0 * 128.0 * 151_936.0 / (1u64 << 30) as f64;
        assert!((line(&plain, "LM-head logits (one chunk, f32)") - logits).abs() < 1e-9);
        let chunked = account(
            &config,
            med_r1(),
            training,
            MemoryOptions {
                head_chunk: 64,
                ..Default::default()
            },
        );
        assert!((line(&chunked, "LM-head logits (one chunk, f32)") - logits / 2.0).abs() < 1e-9);
        let dec = "decoder activations (one scoring pass)";
        let vis = "vision activations (one scoring pass)";
        let checkpointed = account(
            &config,
            med_r1(),
            training,
            MemoryOptions {
                recompute: Recompute {
                    decoder: true,
                    vision: false,
                },
                ..Default::default()
            },
        );
        assert!(line(&checkpointed, dec) < line(&plain, dec) / 5.0);
        assert_eq!(line(&checkpointed, vis), line(&plain, vis));
        let halves = account(
            &config,
            med_r1(),
            training,
            MemoryOptions {
                micro_batch: 4,
                ..Default::default()
            },
        );
        assert!((line(&halves, dec) - line(&plain, dec) / 2.0).abs() < 1e-9);
        assert!((line(&halves, vis) - line(&plain, vis) / 2.0).abs() < 1e-9);
        assert_eq!(
            line(&halves, "policy weights"),
            line(&plain, "policy weights")
        );
        // A frozen vision tower keeps nothing, whatever the options.
        let frozen = account(
            &config,
            med_r1(),
            Training {
                vision_trains: false,
                ..training
            },
            MemoryOptions::default(),
        );
        assert!(!frozen.lines.iter().any(|l| l.what == vis));
        assert_eq!(line(&frozen, "vision activations (frozen: none kept)"), 0.0);
        assert_eq!(line(&frozen, dec), line(&plain, dec));
    }

    /// Full f32 fine-tuning of the 2B model with a reference.
    fn full_2b() -> Training {
        Training {
            trained: 2_208_985_600,
            lora: false,
            reference: true,
            vision_trains: true,
            bytes: 4,
        }
    }

    /// The 2B model's matrix work counted by hand: per decoder token two flops per weight of
    /// the 28 layers' projections (1536 wide, 256 for k and v, MLP 8960), per completion token
    /// the tied head's 151,936 x 1536 on top; per vision patch the patch embedding (1176 x
    /// 1280) and 32 blocks (4 x 1280² + 2 x 1280 x 5120), the merger once per 4 patches
    /// (5120² + 1536 x 5120), attention 4 x 1280 flops per key.
    #[test]
    fn the_2b_work_matches_the_hand_count() {
        let config = Qwen2VLConfig::from_json_str(QWEN2VL_2B, "2b").unwrap();
        let training = full_2b();
        let one = StepShape {
            prompts: 1,
            num_generations: 1,
            prompt_tokens: 1,
            patches: 0,
            completion_tokens: 1,
            share_prompt: true,
        };
        let w = work(&config, one, training);
        let linear =
            2.0 * 28.0 * (2.0 * 1536.0 * 1536.0 + 2.0 * 1536.0 * 256.0 + 3.0 * 1536.0 * 8960.0);
        let head = 2.0 * 1536.0 * 151_936.0;
        // Two tokens, the second attending to both: three keys.
        let attention = 4.0 * 1536.0 * 28.0 * 3.0;
        assert_eq!(w.scoring_forward, 2.0 * linear + attention + head);
        assert_eq!(w.backward, 2.0 * w.scoring_forward);
        // The prompt's token prefilled, the completion's token from its logits.
        assert_eq!(w.rollout, linear + 4.0 * 1536.0 * 28.0 + head);
        assert_eq!(w.step(), w.rollout + 4.0 * w.scoring_forward);

        let image = StepShape {
            patches: 784,
            ..one
        };
        let patch = 2.0
            * (1176.0 * 1280.0 + 32.0 * (4.0 * 1280.0 * 1280.0 + 2.0 * 1280.0 * 5120.0))
            + 2.0 * (5120.0 * 5120.0 + 1536.0 * 5120.0) / 4.0;
        let vision = 784.0 * patch + 32.0 * 4.0 * 1280.0 * 784.0 * 784.0;
        let with = work(&config, image, training);
        assert!((with.scoring_forward - w.scoring_forward - vision).abs() < 1.0);
        assert!((with.rollout - w.rollout - vision).abs() < 1.0);
        // LoRA on the decoder: the inputs' gradients only, none through the vision tower.
        let lora = work(
            &config,
            image,
            Training {
                lora: true,
                vision_trains: false,
                ..training
            },
        );
        assert_eq!(lora.backward, linear * 2.0 + 2.0 * attention + head);
    }

    /// Sharing removes the repeated prompts' work and nothing else: with one generation it
    /// gains nothing, never the number of repeats, and the longer the completions the less.
    #[test]
    fn sharing_gains_only_the_repeated_prompts_work() {
        let config = Qwen2VLConfig::from_json_str(QWEN2VL_2B, "2b").unwrap();
        let training = full_2b();
        let ratio = |shape: StepShape| {
            let unshared = StepShape {
                share_prompt: false,
                ..shape
            };
            work(&config, unshared, training).step() / work(&config, shape, training).step()
        };
        let single = StepShape {
            num_generations: 1,
            ..med_r1()
        };
        assert_eq!(ratio(single), 1.0);
        let no_think = ratio(med_r1());
        let think = ratio(StepShape {
            completion_tokens: 128,
            ..med_r1()
        });
        assert!(no_think > think && think > 1.0, "{no_think} {think}");
        // Never the number of repeats: the completions' work is the same either way.
        assert!(no_think < 4.0);
    }
}
