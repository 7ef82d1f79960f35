//! Token batches and multimodal RoPE positions (transformers' `get_rope_index`), on the host.

use crate::error::Qwen2VLError;

/// Token ids of a (left-)padded batch, row-major `[batch, len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    pub ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u8>,
    pub batch: usize,
    pub len: usize,
}

impl TokenBatch {
    /// One unpadded sequence.
    pub fn single(ids: Vec<u32>) -> Self {
        let len = ids.len();
        Self {
            attention_mask: vec![1; len],
            ids,
            batch: 1,
            len,
        }
    }

    /// Left-pads sequences of different lengths with `pad_id` to the longest.
    pub fn left_padded(rows: &[Vec<u32>], pad_id: u32) -> Self {
        let len = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * len);
        let mut attention_mask = Vec::with_capacity(rows.len() * len);
        for row in rows {
            let pad = len - row.len();
            ids.extend(std::iter::repeat_n(pad_id, pad));
            ids.extend_from_slice(row);
            attention_mask.extend(std::iter::repeat_n(0, pad));
            attention_mask.extend(std::iter::repeat_n(1, row.len()));
        }
        Self {
            ids,
            attention_mask,
            batch: rows.len(),
            len,
        }
    }

    /// The same rows, each left-padded (masked) with `pad_id` to `len >= self.len` tokens.
    pub fn left_padded_to(&self, len: usize, pad_id: u32) -> Self {
        let extra = len - self.len;
        let mut ids = Vec::with_capacity(self.batch * len);
        let mut attention_mask = Vec::with_capacity(self.batch * len);
        for r in 0..self.batch {
            ids.extend(std::iter::repeat_n(pad_id, extra));
            ids.extend_from_slice(self.row(r));
            attention_mask.extend(std::iter::repeat_n(0, extra));
            attention_mask.extend_from_slice(self.mask_row(r));
        }
        Self {
            ids,
            attention_mask,
            batch: self.batch,
            len,
        }
    }

    pub fn row(&self, b: usize) -> &[u32] {
        &self.ids[b * self.len..(b + 1) * self.len]
    }

    pub fn mask_row(&self, b: usize) -> &[u8] {
        &self.attention_mask[b * self.len..(b + 1) * self.len]
    }

    pub fn validate(&self) -> Result<(), Qwen2VLError> {
        if self.ids.len() != self.batch * self.len || self.attention_mask.len() != self.ids.len() {
            return Err(Qwen2VLError::Input(format!(
                "token batch of {}x{} holds {} ids and {} mask values",
                self.batch,
                self.len,
                self.ids.len(),
                self.attention_mask.len()
            )));
        }
        Ok(())
    }
}

/// M-RoPE positions, laid out `[3][batch * len]` (temporal, height, width), with one
/// `rope_delta` per row: the offset that continues positions during decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RopePositions {
    pub axes: [Vec<i64>; 3],
    pub rope_deltas: Vec<i64>,
}

/// Which ids are image/video placeholders, and how many merged tokens each grid yields.
#[derive(Debug, Clone, Copy)]
pub struct VisionTokens {
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub spatial_merge_size: usize,
}

/// transformers' `get_rope_index`: text tokens advance all three axes together; the tokens of
/// an image of grid (t, h, w) take `cur + (ti, hi, wi)` over the merged grid and then advance
/// `cur` by `max(h, w) / merge`. Images are consumed in order across the rows of the batch.
/// Padded slots get position 0.
pub fn rope_index(
    batch: &TokenBatch,
    grids: &[[usize; 3]],
    vt: VisionTokens,
) -> Result<RopePositions, Qwen2VLError> {
    batch.validate()?;
    let n = batch.batch * batch.len;
    let mut axes = [vec![0i64; n], vec![0i64; n], vec![0i64; n]];
    let mut deltas = Vec::with_capacity(batch.batch);
    let mut next_grid = 0;
    let m = vt.spatial_merge_size;
    for b in 0..batch.batch {
        let ids = batch.row(b);
        let mask = batch.mask_row(b);
        let valid: Vec<usize> = (0..batch.len).filter(|&i| mask[i] != 0).collect();
        let mut cur: i64 = 0;
        let mut max_pos: i64 = -1;
        let mut k = 0;
        while k < valid.len() {
            let i = valid[k];
            let id = ids[i];
            if id == vt.image_token_id || id == vt.video_token_id {
                let Some(&[t, h, w]) = grids.get(next_grid) else {
                    return Err(Qwen2VLError::Input(format!(
                        "row {b}: more image placeholder runs than the {} image grids given",
                        grids.len()
                    )));
                };
                next_grid += 1;
                let (lh, lw) = (h / m, w / m);
                let count = t * lh * lw;
                if k + count > valid.len() || valid[k..k + count].iter().any(|&j| ids[j] != id) {
                    return Err(Qwen2VLError::Input(format!(
                        "row {b}: image {} (grid {t}x{h}x{w}) needs {count} consecutive placeholder tokens",
                        next_grid - 1
                    )));
                }
                let mut j = k;
                for ti in 0..t {
                    for hi in 0..lh {
                        for wi in 0..lw {
                            let slot = b * batch.len + valid[j];
                            axes[0][slot] = cur + ti as i64;
                            axes[1][slot] = cur + hi as i64;
                            axes[2][slot] = cur + wi as i64;
                            j += 1;
                        }
                    }
                }
                let top = cur + (t.max(1) as i64 - 1).max(lh.max(lw) as i64 - 1);
                max_pos = max_pos.max(top);
                cur += lh.max(lw) as i64;
                k += count;
            } else {
                let slot = b * batch.len + i;
                for axis in axes.iter_mut() {
                    axis[slot] = cur;
                }
                max_pos = max_pos.max(cur);
                cur += 1;
                k += 1;
            }
        }
        deltas.push(max_pos + 1 - valid.len() as i64);
    }
    if next_grid != grids.len() {
        return Err(Qwen2VLError::Input(format!(
            "{} image grids given but the token ids hold {} image placeholder runs",
            grids.len(),
            next_grid
        )));
    }
    Ok(RopePositions {
        axes,
        rope_deltas: deltas,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VT: VisionTokens = VisionTokens {
        image_token_id: 9,
        video_token_id: 10,
        spatial_merge_size: 2,
    };

    #[test]
    fn image_positions_follow_the_spec_example() {
        // text x2, one 4x6-patch image (2x3 merged), text x1
        let ids = vec![1, 2, 9, 9, 9, 9, 9, 9, 3];
        let p = rope_index(&TokenBatch::single(ids), &[[1, 4, 6]], VT).unwrap();
        assert_eq!(p.axes[0], [0, 1, 2, 2, 2, 2, 2, 2, 5]);
        assert_eq!(p.axes[1], [0, 1, 2, 2, 2, 3, 3, 3, 5]);
        assert_eq!(p.axes[2], [0, 1, 2, 3, 4, 2, 3, 4, 5]);
        // max position 5, 9 tokens
        assert_eq!(p.rope_deltas, [-3]);
    }

    #[test]
    fn left_padding_keeps_row_positions_and_zero_pads() {
        let b = TokenBatch::left_padded(&[vec![1, 2], vec![1, 2, 3]], 0);
        let p = rope_index(&b, &[], VT).unwrap();
        assert_eq!(p.axes[0], [0, 0, 1, 0, 1, 2]);
        assert_eq!(p.rope_deltas, [0, 0]);
    }

    #[test]
    fn grid_and_placeholder_mismatch_is_an_error() {
        let err = rope_index(&TokenBatch::single(vec![1, 9, 9]), &[[1, 4, 6]], VT).unwrap_err();
        assert!(err.to_string().contains("6 consecutive"), "{err}");
        let err = rope_index(&TokenBatch::single(vec![1, 2]), &[[1, 2, 2]], VT).unwrap_err();
        assert!(err.to_string().contains("1 image grids given"), "{err}");
    }
}
