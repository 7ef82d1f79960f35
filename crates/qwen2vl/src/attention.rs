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

/// `[x2 | x1]` for `x = [x1 | x2]` split at the middle of the last axis.
pub fn swap_halves<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let d = x.dims()[D - 1];
    let x1 = x.clone().narrow(D - 1, 0, d / 2);
    let x2 = x.narrow(D - 1, d / 2, d - d / 2);
    Tensor::cat(vec![x2, x1], D - 1)
}

/// Rotary position embedding, `x cos + swap_halves(x) sin'` with `sin' = [-s1 | s2]` folded
/// ([`spread_over_heads`](crate::rope::spread_over_heads) makes the tables, of `x`'s shape).
/// Bit for bit transformers' rotate-half form `x cos + [-x2 | x1] sin`: `x2 (-s) = (-x2) s`
/// exactly in IEEE arithmetic, and the negation moves to the table, made once per forward.
pub fn apply_rotary<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    cos: Tensor<B, D>,
    folded_sin: Tensor<B, D>,
) -> Tensor<B, D> {
    x.clone() * cos + swap_halves(x) * folded_sin
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rope::{mrope_tables, spread_over_heads};
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    /// transformers' form, `x cos + [-x2 | x1] sin`, with the tables broadcast over the heads.
    fn rotate_half_form(
        x: Tensor<Flex, 4>,
        cos: Tensor<Flex, 4>,
        sin: Tensor<Flex, 4>,
    ) -> Tensor<Flex, 4> {
        let d = x.dims()[3];
        let x1 = x.clone().narrow(3, 0, d / 2);
        let x2 = x.clone().narrow(3, d / 2, d / 2);
        x * cos + Tensor::cat(vec![x2.neg(), x1], 3) * sin
    }

    #[test]
    fn folded_rotary_is_the_rotate_half_form_bit_for_bit() {
        let device = Default::default();
        let (b, l, heads, d) = (2, 5, 3, 8);
        let t: Vec<i64> = (0..(b * l) as i64).map(|p| p * 7 % 11).collect();
        let h: Vec<i64> = (0..(b * l) as i64).map(|p| p % 4).collect();
        let w: Vec<i64> = (0..(b * l) as i64).map(|p| p % 3).collect();
        let (cos, sin) = mrope_tables([&t, &h, &w], d, 10000.0, [1, 1, 2]);
        let x =
            Tensor::<Flex, 4>::random([b, l, heads, d], Distribution::Normal(0.0, 3.0), &device);

        let plain = |v: &[f32]| {
            Tensor::<Flex, 4>::from_data(TensorData::new(v.to_vec(), [b, l, 1, d]), &device)
        };
        let expected = rotate_half_form(x.clone(), plain(&cos), plain(&sin));

        let (cos_s, sin_s) = spread_over_heads(&cos, &sin, d, heads, 0);
        let spread = |v: Vec<f32>| {
            Tensor::<Flex, 4>::from_data(TensorData::new(v, [b, l, heads, d]), &device)
        };
        let got = apply_rotary(x, spread(cos_s), spread(sin_s));
        assert_eq!(
            got.into_data().to_vec::<f32>().unwrap(),
            expected.into_data().to_vec::<f32>().unwrap()
        );
    }

    #[test]
    fn plain_slots_pass_through_unchanged() {
        let device = Default::default();
        let (n, d) = (4, 6);
        let cos: Vec<f32> = (0..n * d).map(|i| (i as f32 * 0.3).cos()).collect();
        let sin: Vec<f32> = (0..n * d).map(|i| (i as f32 * 0.3).sin()).collect();
        let (cos_s, sin_s) = spread_over_heads(&cos, &sin, d, 2, 1);
        assert_eq!(cos_s.len(), n * 3 * d);
        // Slot layout per row: two rotated copies (sin folded), then the identity.
        assert_eq!(&cos_s[..d], &cos[..d]);
        assert_eq!(&cos_s[d..2 * d], &cos[..d]);
        assert_eq!(sin_s[0], -sin[0]);
        assert_eq!(sin_s[d / 2], sin[d / 2]);
        assert!(cos_s[2 * d..3 * d].iter().all(|&c| c == 1.0));
        assert!(sin_s[2 * d..3 * d].iter().all(|&s| s == 0.0));

        let x = Tensor::<Flex, 3>::random([n, 3, d], Distribution::Normal(0.0, 1.0), &device);
        let table =
            |v: Vec<f32>| Tensor::<Flex, 3>::from_data(TensorData::new(v, [n, 3, d]), &device);
        let out = apply_rotary(x.clone(), table(cos_s), table(sin_s));
        assert_eq!(
            out.narrow(1, 2, 1).into_data().to_vec::<f32>().unwrap(),
            x.narrow(1, 2, 1).into_data().to_vec::<f32>().unwrap()
        );
    }
}
