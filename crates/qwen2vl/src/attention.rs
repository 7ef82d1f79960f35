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
    let (heads, kv_heads) = (q.dims()[1], k.dims()[1]);
    let bias = masked.map(|m| score_bias(m, heads, kv_heads));
    scaled_dot_product_biased(q, k, v, bias.as_ref())
}

/// A mask made additive, once for every layer of a forward: [`MASKED_SCORE`] where `masked`
/// (`[b, 1, l, s]`) is true, 0 elsewhere, laid out as [`scaled_dot_product_biased`] holds its
/// scores (`[b, kv_heads, rep * l, s]`, `rep = heads / kv_heads`) so that adding it is one
/// same-shape pass per layer instead of a broadcast mask expanded and copied per layer (and
/// again in the backward pass). Adding -1e30 to a score gives exactly -1e30 in f32 and bf16,
/// what filling with it gave.
pub fn score_bias<B: Backend>(
    masked: Tensor<B, 4, Bool>,
    heads: usize,
    kv_heads: usize,
) -> Tensor<B, 4> {
    let [b, _, l, s] = masked.dims();
    let rep = heads / kv_heads;
    masked
        .float()
        .mul_scalar(MASKED_SCORE)
        .unsqueeze_dim::<5>(1)
        .expand([b, kv_heads, rep, l, s])
        .reshape([b, kv_heads, rep * l, s])
}

/// [`scaled_dot_product`] with the mask given as a [`score_bias`].
pub fn scaled_dot_product_biased<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<&Tensor<B, 4>>,
) -> Tensor<B, 4> {
    let [b, heads, l, d] = q.dims();
    let kv_heads = k.dims()[1];
    let scale = 1.0 / (d as f64).sqrt();
    // Grouped-query attention without repeating K/V: query head h uses kv head h / rep (as
    // transformers' repeat_kv), so the rep query heads of one kv head are stacked along the
    // query axis and attend to that kv head's keys in one matmul. Only the queries (one row
    // per new token) are rearranged, never the cache.
    let rep = heads / kv_heads;
    let q = if rep > 1 {
        q.reshape([b, kv_heads, rep * l, d])
    } else {
        q
    };
    let scores = q.matmul(k.swap_dims(2, 3)) * scale;
    let scores = match bias {
        Some(bias) => scores + bias.clone(),
        None => scores,
    };
    let o = softmax(scores, 3).matmul(v);
    if rep > 1 {
        o.reshape([b, heads, l, d])
    } else {
        o
    }
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
