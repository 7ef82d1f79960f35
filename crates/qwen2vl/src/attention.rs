//! Scaled dot-product attention shared by both towers.

use burn::tensor::{activation::softmax, backend::Backend, Bool, Tensor};

/// Added in place of masked scores. Finite (as transformers' `finfo.min`), so a row whose keys
/// are all masked still gives finite values instead of NaN.
pub const MASKED_SCORE: f32 = -1e30;

/// `softmax(q kᵀ / sqrt(d) + mask) v` with grouped-query attention: `q` is `[b, heads, l, d]`,
/// `k`/`v` are `[b, kv_heads, s, d]` and each kv head serves `heads / kv_heads` query heads.
/// `masked` is true where a query must not see a key, `[b, 1, l, s]`.
pub fn scaled_dot_product<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    masked: Option<Tensor<B, 4, Bool>>,
) -> Tensor<B, 4> {
    let [b, heads, l, d] = q.dims();
    let kv_heads = k.dims()[1];
    let s = k.dims()[2];
    let scale = 1.0 / (d as f64).sqrt();
    if kv_heads == heads {
        let scores = q.matmul(k.swap_dims(2, 3)) * scale;
        let scores = match masked {
            Some(m) => scores.mask_fill(m.expand([b, heads, l, s]), MASKED_SCORE),
            None => scores,
        };
        return softmax(scores, 3).matmul(v);
    }
    // Grouped-query attention without repeating K/V: query head h uses kv head h / rep (as
    // transformers' repeat_kv), so the rep query heads of one kv head are stacked along the
    // query axis and attend to that kv head's keys in one matmul. Only the queries (one row
    // per new token) are rearranged, never the cache.
    let rep = heads / kv_heads;
    let q = q.reshape([b, kv_heads, rep * l, d]);
    let scores = q.matmul(k.swap_dims(2, 3)) * scale;
    let scores = match masked {
        Some(m) => scores
            .reshape([b, kv_heads, rep, l, s])
            .mask_fill(
                m.unsqueeze_dim::<5>(1).expand([b, kv_heads, rep, l, s]),
                MASKED_SCORE,
            )
            .reshape([b, kv_heads, rep * l, s]),
        None => scores,
    };
    softmax(scores, 3).matmul(v).reshape([b, heads, l, d])
}

/// `[-x2 | x1]` for `x = [x1 | x2]` split at the middle of the last axis.
pub fn rotate_half<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let d = x.dims()[D - 1];
    let x1 = x.clone().narrow(D - 1, 0, d / 2);
    let x2 = x.narrow(D - 1, d / 2, d - d / 2);
    Tensor::cat(vec![x2.neg(), x1], D - 1)
}

/// Rotary position embedding, rotate-half form: `x cos + rotate_half(x) sin`.
pub fn apply_rotary<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    cos: Tensor<B, D>,
    sin: Tensor<B, D>,
) -> Tensor<B, D> {
    x.clone() * cos + rotate_half(x) * sin
}
