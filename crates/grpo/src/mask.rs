//! Which completion tokens count: up to and including the first EOS.

/// `mask[t]` is true for tokens up to and including the first EOS (all tokens when there is
/// none). With `mask_truncated`, a completion that never emitted EOS counts for nothing (TRL's
/// `mask_truncated_completions`).
pub fn completion_mask(tokens: &[u32], eos_ids: &[u32], mask_truncated: bool) -> Vec<bool> {
    match tokens.iter().position(|t| eos_ids.contains(t)) {
        Some(first) => (0..tokens.len()).map(|t| t <= first).collect(),
        None => vec![!mask_truncated; tokens.len()],
    }
}

/// Masks of a batch, padded with false to `width`.
pub fn batch_mask(
    completions: &[Vec<u32>],
    eos_ids: &[u32],
    mask_truncated: bool,
    width: usize,
) -> Vec<Vec<bool>> {
    completions
        .iter()
        .map(|c| {
            let mut m = completion_mask(c, eos_ids, mask_truncated);
            m.resize(width, false);
            m
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_stops_after_the_first_eos() {
        assert_eq!(
            completion_mask(&[5, 6, 9, 7, 9], &[9], false),
            [true, true, true, false, false]
        );
        assert_eq!(completion_mask(&[5, 6], &[9], false), [true, true]);
        assert_eq!(completion_mask(&[5, 6], &[9], true), [false, false]);
        assert_eq!(completion_mask(&[8, 1], &[9, 8], true), [true, false]);
        assert_eq!(
            batch_mask(&[vec![1, 9], vec![9]], &[9], false, 3),
            [vec![true, true, false], vec![true, false, false]]
        );
    }
}
