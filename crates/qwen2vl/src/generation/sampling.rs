//! Choosing the next token from logits: the repetition penalty, then greedy, or temperature
//! -> top-k -> top-p -> min-p (the order of transformers' logits processors and warpers,
//! `generation/utils.py` `_get_logits_processor`), from a seeded generator so that a run
//! reproduces.

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Drop the tokens less likely than `min_p` times the most likely one, after temperature,
    /// top-k and top-p (transformers' `MinPLogitsWarper`); 0 keeps all.
    pub min_p: f32,
    /// Every token already in the row (its prompt's tokens, padding aside, and what it has
    /// generated) has its logit divided by this when positive and multiplied when negative,
    /// before anything else, greedy included (transformers' `RepetitionPenaltyLogitsProcessor`);
    /// 1 changes nothing.
    pub repetition_penalty: f32,
}

impl Sampling {
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repetition_penalty: 1.0,
    };

    /// Sampling from the whole distribution at `temperature`: no top-k, top-p, min-p or
    /// repetition penalty.
    pub const fn full(temperature: f32) -> Self {
        Self {
            temperature,
            ..Self::GREEDY
        }
    }

    /// Whether a repetition penalty applies.
    pub fn penalizes(&self) -> bool {
        self.repetition_penalty != 1.0
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }
}

/// SplitMix64: small, fast, and identical on every platform.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best
}

/// Natural log of the softmax of `logits` at `index`, in f64.
pub fn log_softmax_at(logits: &[f32], index: usize) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    logits[index] as f64 - max - sum.ln()
}

/// Picks the next token on the host (the device-side [`super::pick`] reads back only what it
/// needs; this is the same choice from a whole row of logits).
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut Rng) -> usize {
    if s.is_greedy() {
        return argmax(logits);
    }
    // Most likely first, ties by index (what a stable sort gives). With top-k only the k
    // largest are found (linear time) and sorted, the same tokens in the same order as a
    // full sort.
    let before = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let mut order: Vec<usize> = (0..logits.len()).collect();
    if s.top_k > 0 && s.top_k < order.len() {
        order.select_nth_unstable_by(s.top_k - 1, before);
        order.truncate(s.top_k);
    }
    order.sort_unstable_by(before);
    let sorted: Vec<f32> = order.iter().map(|&i| logits[i]).collect();
    order[super::pick::sample_sorted(&sorted, s, rng)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_temperature_is_greedy() {
        let logits = [0.1, 2.0, 1.994, -3.0];
        let s = Sampling::full(1e-4);
        let mut rng = Rng::new(7);
        for _ in 0..100 {
            assert_eq!(sample(&logits, &s, &mut rng), 1);
        }
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [3.0, 2.9, 0.0, -1.0, -2.0];
        let mut rng = Rng::new(1);
        let k2 = Sampling {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
        };
        let p = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            min_p: 0.0,
            repetition_penalty: 1.0,
        };
        for _ in 0..200 {
            assert!(sample(&logits, &k2, &mut rng) < 2);
            // p(token 0) = 0.48 < 0.5, so tokens 0 and 1 stay.
            assert!(sample(&logits, &p, &mut rng) < 2);
        }
    }

    /// The top-k selection draws exactly what a full stable sort drew (ties included).
    #[test]
    fn top_k_selection_draws_as_a_full_sort_did() {
        fn by_full_sort(logits: &[f32], s: &Sampling, rng: &mut Rng) -> usize {
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            order.truncate(s.top_k);
            let t = s.temperature as f64;
            let max = logits[order[0]] as f64 / t;
            let probs: Vec<f64> = order
                .iter()
                .map(|&i| (logits[i] as f64 / t - max).exp())
                .collect();
            let total: f64 = probs.iter().sum();
            let mut u = rng.next_f64();
            for (i, p) in probs.iter().enumerate() {
                if u < p / total {
                    return order[i];
                }
                u -= p / total;
            }
            *order.last().unwrap()
        }
        let mut gen = Rng::new(9);
        // Coarse values: many ties, also across the k-th place.
        let logits: Vec<f32> = (0..5000)
            .map(|_| (gen.next_f64() * 40.0).floor() as f32 / 4.0)
            .collect();
        for k in [1, 7, 50, 400] {
            let s = Sampling {
                temperature: 0.9,
                top_k: k,
                top_p: 1.0,
                min_p: 0.0,
                repetition_penalty: 1.0,
            };
            let (mut a, mut b) = (Rng::new(k as u64), Rng::new(k as u64));
            for _ in 0..300 {
                assert_eq!(
                    sample(&logits, &s, &mut a),
                    by_full_sort(&logits, &s, &mut b)
                );
            }
        }
    }

    #[test]
    fn sampling_frequencies_follow_the_softmax() {
        let logits = [0.0f32, (3.0f32).ln()];
        let s = Sampling::full(1.0);
        let mut rng = Rng::new(42);
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| sample(&logits, &s, &mut rng) == 1)
            .count();
        let f = ones as f64 / n as f64;
        assert!((f - 0.75).abs() < 0.015, "{f}");
    }

    #[test]
    fn same_seed_same_draws() {
        let a: Vec<u64> = (0..5)
            .scan(Rng::new(3), |r, _| Some(r.next_u64()))
            .collect();
        let b: Vec<u64> = (0..5)
            .scan(Rng::new(3), |r, _| Some(r.next_u64()))
            .collect();
        assert_eq!(a, b);
    }
}
