//! Rotary tables, computed on the host from integer positions (exactly as transformers builds
//! them in float32) and uploaded once per forward.

/// Inverse frequencies `1 / theta^(2k / dim)` for `k < dim / 2`.
pub fn inverse_frequencies(dim: usize, theta: f64) -> Vec<f32> {
    (0..dim / 2)
        .map(|k| {
            let exponent = (2 * k) as f32 / dim as f32;
            1.0 / (theta as f32).powf(exponent)
        })
        .collect()
}

/// cos and sin tables, each `[rows, 2 * freqs]` flattened, from per-row angle lists
/// (`emb = [f | f]`).
fn cos_sin(angles: &[f32], freqs: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = angles.len() / freqs;
    let mut cos = Vec::with_capacity(rows * freqs * 2);
    let mut sin = Vec::with_capacity(rows * freqs * 2);
    for row in angles.chunks(freqs) {
        for _ in 0..2 {
            cos.extend(row.iter().map(|a| a.cos()));
            sin.extend(row.iter().map(|a| a.sin()));
        }
    }
    (cos, sin)
}

/// Multimodal RoPE tables for the text decoder: `positions` is `[3][n]` (temporal, height, width
/// rows for n tokens); frequency k takes its position from the axis whose `mrope_section`
/// covers k. Returns cos and sin, each `[n, head_dim]` flattened.
pub fn mrope_tables(
    positions: [&[i64]; 3],
    head_dim: usize,
    theta: f64,
    mrope_section: [usize; 3],
) -> (Vec<f32>, Vec<f32>) {
    let inv = inverse_frequencies(head_dim, theta);
    let axis_of: Vec<usize> = (0..inv.len())
        .map(|k| {
            if k < mrope_section[0] {
                0
            } else if k < mrope_section[0] + mrope_section[1] {
                1
            } else {
                2
            }
        })
        .collect();
    let n = positions[0].len();
    let mut angles = Vec::with_capacity(n * inv.len());
    let rows = positions[0].iter().zip(positions[1]).zip(positions[2]);
    for ((&t, &h), &w) in rows {
        let p = [t, h, w];
        angles.extend(inv.iter().zip(&axis_of).map(|(f, &a)| p[a] as f32 * f));
    }
    cos_sin(&angles, inv.len())
}

/// cos and sin tables (`[rows, head_dim]` flattened, as [`mrope_tables`] and [`vision_tables`]
/// return them) spread over a `[rows, slots, head_dim]` layout, the one the attention
/// projections give: each of the first `rotated` slots of a row gets the row's tables, each of
/// the following `plain` slots the identity (cos 1, sin 0). sin comes folded for
/// [`apply_rotary`](crate::attention::apply_rotary): its first half negated.
///
/// Full-size tables keep every rotary product an elementwise pass over contiguous tensors of
/// one shape; broadcasting `[rows, 1, head_dim]` tables over strided heads made Flex walk
/// them element by element on one thread (about 6% of a GRPO step on the 107M config).
pub fn spread_over_heads(
    cos: &[f32],
    sin: &[f32],
    head_dim: usize,
    rotated: usize,
    plain: usize,
) -> (Vec<f32>, Vec<f32>) {
    let rows = cos.len() / head_dim;
    let slots = rotated + plain;
    let half = head_dim / 2;
    let mut cos_out = Vec::with_capacity(rows * slots * head_dim);
    let mut sin_out = Vec::with_capacity(rows * slots * head_dim);
    for (c, s) in cos.chunks(head_dim).zip(sin.chunks(head_dim)) {
        for _ in 0..rotated {
            cos_out.extend_from_slice(c);
            sin_out.extend(s[..half].iter().map(|v| -v));
            sin_out.extend_from_slice(&s[half..]);
        }
        for _ in 0..plain {
            cos_out.extend(std::iter::repeat_n(1.0f32, head_dim));
            sin_out.extend(std::iter::repeat_n(0.0f32, head_dim));
        }
    }
    (cos_out, sin_out)
}

/// Row and column of every patch, in the merge-block-major order of `pixel_values`
/// (`[n_patches][2]`, rows `(h, w)`).
pub fn vision_patch_positions(grids: &[[usize; 3]], merge: usize) -> Vec<[i64; 2]> {
    let mut out = Vec::new();
    for &[t, h, w] in grids {
        for _ in 0..t {
            for bi in 0..h / merge {
                for bj in 0..w / merge {
                    for i in 0..merge {
                        for j in 0..merge {
                            out.push([(bi * merge + i) as i64, (bj * merge + j) as i64]);
                        }
                    }
                }
            }
        }
    }
    out
}

/// 2-D rotary tables of the vision tower: the first half of the frequencies rotate by the patch
/// row, the second half by its column. Returns cos and sin, each `[n_patches, head_dim]`.
pub fn vision_tables(positions: &[[i64; 2]], head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let inv = inverse_frequencies(head_dim / 2, theta);
    let mut angles = Vec::with_capacity(positions.len() * inv.len() * 2);
    for [h, w] in positions {
        angles.extend(inv.iter().map(|f| *h as f32 * f));
        angles.extend(inv.iter().map(|f| *w as f32 * f));
    }
    cos_sin(&angles, inv.len() * 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_positions_follow_merge_blocks() {
        let p = vision_patch_positions(&[[1, 2, 4]], 2);
        let expected = [
            [0, 0],
            [0, 1],
            [1, 0],
            [1, 1],
            [0, 2],
            [0, 3],
            [1, 2],
            [1, 3],
        ];
        assert_eq!(p, expected);
    }

    #[test]
    fn pure_text_mrope_is_plain_rope() {
        let pos: Vec<i64> = (0..5).collect();
        let (cos, _) = mrope_tables([&pos, &pos, &pos], 8, 10000.0, [1, 1, 2]);
        // position 3, frequency 1: 3 / 10000^(2/8)
        let expected = (3.0f32 / 10000f32.powf(0.25)).cos();
        assert!((cos[3 * 8 + 1] - expected).abs() < 1e-6);
        assert_eq!(cos[3 * 8 + 1], cos[3 * 8 + 5]);
    }
}
