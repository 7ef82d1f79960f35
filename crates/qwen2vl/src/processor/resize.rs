//! Pillow's `Image.resize(size, BICUBIC)` for 8-bit RGB, reproduced to the byte
//! (Pillow 13 `libImaging/Resample.c`): separable passes, a = -0.5 cubic kernel widened by the
//! scale when shrinking (antialias), weights in 22-bit fixed point rounded half away from zero,
//! accumulation from 2^21, clamp to 0..255, 8-bit storage between passes. Crates such as
//! `image` resize differently, and the model would see other pixels than transformers feeds it.

const PRECISION_BITS: u32 = 32 - 8 - 2;
const SUPPORT: f64 = 2.0;

/// An 8-bit RGB image, row-major `[height][width][3]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output index: the first input index and the fixed-point weights.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = SUPPORT * filter_scale;
    let ss = 1.0 / filter_scale;
    (0..out_size)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            // C casts truncate toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
            let mut w: Vec<f64> = (0..xmax)
                .map(|x| cubic((x as f64 + xmin as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            let one = (1u32 << PRECISION_BITS) as f64;
            let k = w
                .iter()
                .map(|&v| {
                    if v < 0.0 {
                        (-0.5 + v * one) as i32
                    } else {
                        (0.5 + v * one) as i32
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

fn horizontal(img: &Rgb8, out_w: usize) -> Rgb8 {
    let coeffs = coefficients(img.width, out_w);
    let mut data = vec![0u8; img.height * out_w * 3];
    for y in 0..img.height {
        let row = &img.data[y * img.width * 3..(y + 1) * img.width * 3];
        for (xo, (xmin, k)) in coeffs.iter().enumerate() {
            for c in 0..3 {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (i, &kk) in k.iter().enumerate() {
                    acc += row[(xmin + i) * 3 + c] as i64 * kk as i64;
                }
                data[(y * out_w + xo) * 3 + c] = clip8(acc);
            }
        }
    }
    Rgb8 {
        width: out_w,
        height: img.height,
        data,
    }
}

fn vertical(img: &Rgb8, out_h: usize) -> Rgb8 {
    let coeffs = coefficients(img.height, out_h);
    let stride = img.width * 3;
    let mut data = vec![0u8; out_h * stride];
    for (yo, (ymin, k)) in coeffs.iter().enumerate() {
        for x in 0..stride {
            let mut acc: i64 = 1 << (PRECISION_BITS - 1);
            for (i, &kk) in k.iter().enumerate() {
                acc += img.data[(ymin + i) * stride + x] as i64 * kk as i64;
            }
            data[yo * stride + x] = clip8(acc);
        }
    }
    Rgb8 {
        width: img.width,
        height: out_h,
        data,
    }
}

/// `Image.resize((out_w, out_h), Image.BICUBIC)` of Pillow 13. The pass order follows Pillow:
/// vertical first only when the height shrinks by more than twice as much as the width.
pub fn pil_bicubic_resize(img: &Rgb8, out_w: usize, out_h: usize) -> Rgb8 {
    if (img.width, img.height) == (out_w, out_h) {
        return img.clone();
    }
    let dh = img.height as i64 - out_h as i64;
    let dw = img.width as i64 - out_w as i64;
    let vertical_first = dh > 0 && dh > 2 * dw;
    let mut x = img.clone();
    if vertical_first {
        if out_h != x.height {
            x = vertical(&x, out_h);
        }
        if out_w != x.width {
            x = horizontal(&x, out_w);
        }
    } else {
        if out_w != x.width {
            x = horizontal(&x, out_w);
        }
        if out_h != x.height {
            x = vertical(&x, out_h);
        }
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_images_stay_constant() {
        let img = Rgb8 {
            width: 7,
            height: 5,
            data: vec![200; 7 * 5 * 3],
        };
        for (w, h) in [(3, 2), (14, 10), (7, 9)] {
            let r = pil_bicubic_resize(&img, w, h);
            assert_eq!((r.width, r.height), (w, h));
            assert!(r.data.iter().all(|&v| v == 200));
        }
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(45, 56), (150, 84), (100, 112), (3, 1)] {
            for (_, k) in coefficients(i, o) {
                let s: i64 = k.iter().map(|&v| v as i64).sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{i}->{o}: {s}"
                );
            }
        }
    }
}
