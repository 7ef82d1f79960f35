//! Qwen2VLImageProcessor (Pillow backend) as transformers 5 runs it: RGB conversion (alpha
//! composited on white), smart_resize, Pillow bicubic, rescale 1/255, CLIP normalisation and
//! the merge-block-major patch order of `pixel_values`.

use std::path::Path;

use image::{DynamicImage, GenericImageView};
use serde_json::Value;

use super::resize::{pil_bicubic_resize, Rgb8};
use super::ProcessorError;

/// Settings of `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl Default for ImageProcessorConfig {
    /// Qwen2-VL-Instruct's `preprocessor_config.json`. The CLIP constants are written as
    /// published; they round to f32 exactly as NumPy's `float32(...)` does.
    #[allow(clippy::excessive_precision)]
    fn default() -> Self {
        Self {
            min_pixels: 3136,
            max_pixels: 12_845_056,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_54, 0.261_302_58, 0.275_777_11],
        }
    }
}

impl ImageProcessorConfig {
    /// Reads `preprocessor_config.json`; absent fields keep Qwen2-VL's values. `min_pixels` /
    /// `max_pixels` may also come as `size.shortest_edge` / `size.longest_edge`.
    pub fn from_file(path: &Path) -> Result<Self, ProcessorError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ProcessorError::Io(path.to_path_buf(), e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| ProcessorError::Config {
            file: path.display().to_string(),
            message: format!("invalid JSON: {e}"),
        })?;
        let bad = |message: String| ProcessorError::Config {
            file: path.display().to_string(),
            message,
        };
        // Qwen2.5-VL names no processor of its own: transformers maps `qwen2_5_vl` to
        // Qwen2VLImageProcessor (`image_processing_auto.py`), and its published file names that
        // class; `Qwen2_5_VLImageProcessor` is the name some forks saved.
        if let Some(kind) = v.get("image_processor_type").and_then(Value::as_str) {
            const KNOWN: [&str; 4] = [
                "Qwen2VLImageProcessor",
                "Qwen2VLImageProcessorFast",
                "Qwen2VLImageProcessorPil",
                "Qwen2_5_VLImageProcessor",
            ];
            if !KNOWN.contains(&kind) {
                return Err(bad(format!(
                    "`image_processor_type` is {kind:?}; medr1 runs Qwen2-VL's image processor \
                     ({})",
                    KNOWN.join(", ")
                )));
            }
        }
        // Steps medr1 always takes: a file that turns one off, or changes its constant, asks
        // for preprocessing medr1 does not do.
        for key in ["do_resize", "do_rescale", "do_normalize", "do_convert_rgb"] {
            if v.get(key).and_then(Value::as_bool) == Some(false) {
                return Err(bad(format!(
                    "`{key}` is false; medr1 always takes this step"
                )));
            }
        }
        if let Some(f) = v.get("rescale_factor").and_then(Value::as_f64) {
            if (f - 1.0 / 255.0).abs() > 1e-12 {
                return Err(bad(format!(
                    "`rescale_factor` is {f}; medr1 rescales by 1/255 only"
                )));
            }
        }
        if let Some(r) = v.get("resample").and_then(Value::as_u64) {
            if r != 3 {
                return Err(bad(format!(
                    "`resample` is {r}; medr1 resizes with Pillow's bicubic filter (3) only"
                )));
            }
        }
        let c = Self::from_json(&v);
        for (key, n) in [
            ("patch_size", c.patch_size),
            ("temporal_patch_size", c.temporal_patch_size),
            ("merge_size", c.merge_size),
            ("max_pixels", c.max_pixels),
        ] {
            if n == 0 {
                return Err(ProcessorError::Config {
                    file: path.display().to_string(),
                    message: format!("`{key}` is 0; it must be at least 1"),
                });
            }
        }
        if c.min_pixels > c.max_pixels {
            return Err(ProcessorError::Config {
                file: path.display().to_string(),
                message: format!(
                    "`min_pixels` ({}) is above `max_pixels` ({})",
                    c.min_pixels, c.max_pixels
                ),
            });
        }
        Ok(c)
    }

    /// Settings from a `preprocessor_config.json`-shaped object; absent fields keep Qwen2-VL's.
    pub fn from_json(v: &Value) -> Self {
        let mut c = Self::default();
        let num = |key: &str| v.get(key).and_then(Value::as_u64).map(|n| n as usize);
        let size = |key: &str| {
            v.get("size")
                .and_then(|s| s.get(key))
                .and_then(Value::as_u64)
                .map(|n| n as usize)
        };
        if let Some(n) = num("min_pixels").or(size("shortest_edge")) {
            c.min_pixels = n;
        }
        if let Some(n) = num("max_pixels").or(size("longest_edge")) {
            c.max_pixels = n;
        }
        if let Some(n) = num("patch_size") {
            c.patch_size = n;
        }
        if let Some(n) = num("temporal_patch_size") {
            c.temporal_patch_size = n;
        }
        if let Some(n) = num("merge_size") {
            c.merge_size = n;
        }
        let triple = |key: &str| -> Option<[f32; 3]> {
            let a = v.get(key)?.as_array()?;
            if a.len() != 3 {
                return None;
            }
            Some([
                a[0].as_f64()? as f32,
                a[1].as_f64()? as f32,
                a[2].as_f64()? as f32,
            ])
        };
        if let Some(m) = triple("image_mean") {
            c.image_mean = m;
        }
        if let Some(s) = triple("image_std") {
            c.image_std = s;
        }
        c
    }

    /// Values per `pixel_values` row: 3 x temporal x patch x patch.
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

/// transformers' `smart_resize`: the nearest multiple of `factor` on each side (Python
/// round, ties to even), scaled down to `max_pixels` or up to `min_pixels` keeping the aspect.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize), ProcessorError> {
    if height == 0 || width == 0 {
        return Err(ProcessorError::Image(format!(
            "image of {width}x{height} pixels is empty"
        )));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        return Err(ProcessorError::Image(format!(
            "absolute aspect ratio must be smaller than 200, got {ratio:.1} ({width}x{height})"
        )));
    }
    let mut hb = (h / f).round_ties_even() * f;
    let mut wb = (w / f).round_ties_even() * f;
    if hb * wb > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        hb = f.max((h / beta / f).floor() * f);
        wb = f.max((w / beta / f).floor() * f);
    } else if hb * wb < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        hb = (h * beta / f).ceil() * f;
        wb = (w * beta / f).ceil() * f;
    }
    Ok((hb as usize, wb as usize))
}

/// Pillow's alpha composite of `(r, g, b, a)` over opaque white (`AlphaComposite.c`, 7-bit
/// fixed point with its division by 255 by shifts).
fn over_white(c: u8, a: u8) -> u8 {
    const PRECISION_BITS: u32 = 7;
    let (c, a) = (c as u32, a as u32);
    // With an opaque destination the output alpha is 255, so coef1 = a << 7.
    let coef1 = a << PRECISION_BITS;
    let coef2 = (255 << PRECISION_BITS) - coef1;
    let tmp = c * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    let div255 = ((tmp >> 8) + tmp) >> 8;
    (div255 >> PRECISION_BITS) as u8
}

/// RGB as transformers 5 converts it: images with an alpha channel are composited on white;
/// grayscale is replicated; paletted images arrive expanded from the decoder.
pub fn to_rgb(img: &DynamicImage) -> Rgb8 {
    let (width, height) = img.dimensions();
    let data = if img.color().has_alpha() {
        img.to_rgba8()
            .pixels()
            .flat_map(|p| {
                let [r, g, b, a] = p.0;
                [over_white(r, a), over_white(g, a), over_white(b, a)]
            })
            .collect()
    } else {
        img.to_rgb8().into_raw()
    };
    Rgb8 {
        width: width as usize,
        height: height as usize,
        data,
    }
}

/// Decodes a PNG or JPEG file.
pub fn load_image(path: &Path) -> Result<DynamicImage, ProcessorError> {
    let bytes = std::fs::read(path).map_err(|e| ProcessorError::Io(path.to_path_buf(), e))?;
    image::load_from_memory(&bytes)
        .map_err(|e| ProcessorError::Image(format!("{}: cannot decode image: {e}", path.display())))
}

/// One preprocessed image: what the vision tower reads.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    /// `[t * h * w, patch_dim]` row-major.
    pub pixel_values: Vec<f32>,
    /// `(t, h, w)` in patches.
    pub grid: [usize; 3],
    /// Values per patch row (`channels * temporal_patch_size * patch_size^2`).
    pub patch_dim: usize,
}

impl ProcessedImage {
    /// Patch rows made elsewhere (a fixture, another processor); their count must match the
    /// grid.
    pub fn new(
        pixel_values: Vec<f32>,
        grid: [usize; 3],
        patch_dim: usize,
    ) -> Result<Self, ProcessorError> {
        let rows = grid.iter().product::<usize>();
        if patch_dim == 0 || pixel_values.len() != rows * patch_dim {
            return Err(ProcessorError::Image(format!(
                "{} pixel values do not make {rows} patch rows (grid {grid:?}) of {patch_dim}",
                pixel_values.len()
            )));
        }
        Ok(Self {
            pixel_values,
            grid,
            patch_dim,
        })
    }

    /// Patch rows of the image (`t * h * w`).
    pub fn rows(&self) -> usize {
        self.grid.iter().product()
    }

    /// Placeholder tokens this image expands to in the prompt.
    pub fn num_tokens(&self, merge: usize) -> usize {
        self.grid.iter().product::<usize>() / (merge * merge)
    }
}

/// Resize, normalise and patchify an RGB image.
pub fn preprocess_rgb(
    img: &Rgb8,
    cfg: &ImageProcessorConfig,
) -> Result<ProcessedImage, ProcessorError> {
    Ok(patchify(&resize_for_model(img, cfg)?, cfg))
}

/// The image resized to the patch grid the processor chooses (`smart_resize`, Pillow's
/// bicubic filter): the first half of [`preprocess_rgb`].
pub fn resize_for_model(img: &Rgb8, cfg: &ImageProcessorConfig) -> Result<Rgb8, ProcessorError> {
    let factor = cfg.patch_size * cfg.merge_size;
    let (rh, rw) = smart_resize(
        img.height,
        img.width,
        factor,
        cfg.min_pixels,
        cfg.max_pixels,
    )?;
    Ok(pil_bicubic_resize(img, rw, rh))
}

/// Normalise and cut an image already resized by [`resize_for_model`] into patch rows: the
/// second half of [`preprocess_rgb`].
pub fn patchify(resized: &Rgb8, cfg: &ImageProcessorConfig) -> ProcessedImage {
    let (rh, rw) = (resized.height, resized.width);
    let p = cfg.patch_size;
    let m = cfg.merge_size;
    let tps = cfg.temporal_patch_size;
    let (gh, gw) = (rh / p, rw / p);
    // Rescale in f64 then round to f32, normalise in f32: transformers' exact float recipe.
    let scale = 1.0f64 / 255.0;
    let mut norm = vec![0f32; 3 * rh * rw]; // CHW
    for y in 0..rh {
        for x in 0..rw {
            for c in 0..3 {
                let v = (resized.data[(y * rw + x) * 3 + c] as f64 * scale) as f32;
                norm[(c * rh + y) * rw + x] = (v - cfg.image_mean[c]) / cfg.image_std[c];
            }
        }
    }
    let dim = cfg.patch_dim();
    let mut pixel_values = Vec::with_capacity(gh * gw * dim);
    for bi in 0..gh / m {
        for bj in 0..gw / m {
            for i in 0..m {
                for j in 0..m {
                    let (py0, px0) = ((bi * m + i) * p, (bj * m + j) * p);
                    for c in 0..3 {
                        for _ in 0..tps {
                            for py in 0..p {
                                let start = (c * rh + py0 + py) * rw + px0;
                                pixel_values.extend_from_slice(&norm[start..start + p]);
                            }
                        }
                    }
                }
            }
        }
    }
    ProcessedImage {
        pixel_values,
        grid: [1, gh, gw],
        patch_dim: dim,
    }
}

/// Decoded image -> model inputs.
pub fn preprocess(
    img: &DynamicImage,
    cfg: &ImageProcessorConfig,
) -> Result<ProcessedImage, ProcessorError> {
    preprocess_rgb(&to_rgb(img), cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_config_file_is_an_error_naming_file_and_key() {
        let dir = std::env::temp_dir().join(format!("qwen2vl-pp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("preprocessor_config.json");
        std::fs::write(&path, r#"{"patch_size": 0}"#).unwrap();
        let e = ImageProcessorConfig::from_file(&path)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("preprocessor_config.json") && e.contains("patch_size"),
            "{e}"
        );
        std::fs::write(&path, r#"{"min_pixels": 9000, "max_pixels": 3136}"#).unwrap();
        let e = ImageProcessorConfig::from_file(&path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("min_pixels"), "{e}");
        std::fs::write(&path, r#"{"patch_size": 14}"#).unwrap();
        assert!(ImageProcessorConfig::from_file(&path).is_ok());
        for (text, key) in [
            (
                r#"{"image_processor_type": "CLIPImageProcessor"}"#,
                "image_processor_type",
            ),
            (r#"{"do_normalize": false}"#, "do_normalize"),
            (r#"{"rescale_factor": 1.0}"#, "rescale_factor"),
            (r#"{"resample": 2}"#, "resample"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = ImageProcessorConfig::from_file(&path)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("preprocessor_config.json") && e.contains(key),
                "{e}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Qwen2.5-VL-3B-Instruct's `preprocessor_config.json` as published (the Hub's file, and
    /// the processor transformers prints for it): Qwen2-VL's class and values.
    #[test]
    fn qwen25vls_published_processor_file_gives_its_values() {
        let dir = std::env::temp_dir().join(format!("qwen2vl-pp25-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("preprocessor_config.json");
        let published = r#"{
  "min_pixels": 3136,
  "max_pixels": 12845056,
  "patch_size": 14,
  "temporal_patch_size": 2,
  "merge_size": 2,
  "image_mean": [0.48145466, 0.4578275, 0.40821073],
  "image_std": [0.26862954, 0.26130258, 0.27577711],
  "image_processor_type": "Qwen2VLImageProcessor",
  "processor_class": "Qwen2_5_VLProcessor"
}"#;
        std::fs::write(&path, published).unwrap();
        let c = ImageProcessorConfig::from_file(&path).unwrap();
        assert_eq!(c, ImageProcessorConfig::default());
        // Values other than the defaults are read, including `size`'s spelling.
        std::fs::write(
            &path,
            r#"{"image_processor_type": "Qwen2_5_VLImageProcessor", "patch_size": 16,
                "size": {"shortest_edge": 6272, "longest_edge": 401408}, "resample": 3,
                "rescale_factor": 0.00392156862745098, "do_normalize": true}"#,
        )
        .unwrap();
        let c = ImageProcessorConfig::from_file(&path).unwrap();
        assert_eq!(
            (c.patch_size, c.min_pixels, c.max_pixels),
            (16, 6272, 401_408)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn patch_rows_that_do_not_fit_their_grid_or_width_are_refused() {
        use crate::model::Images;
        use burn::backend::Flex;
        let e = ProcessedImage::new(vec![0.0; 10], [1, 2, 2], 3)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("10 pixel values") && e.contains("[1, 2, 2]"),
            "{e}"
        );
        let a = ProcessedImage::new(vec![0.5; 12], [1, 2, 2], 3).unwrap();
        let b = ProcessedImage::new(vec![0.5; 16], [1, 2, 2], 4).unwrap();
        let device = Default::default();
        let e = Images::<Flex>::from_processed([&a, &b], &device)
            .unwrap_err()
            .to_string();
        assert!(e.contains("patch widths 3 and 4"), "{e}");
        let both = Images::<Flex>::from_processed([&a, &a], &device)
            .unwrap()
            .unwrap();
        assert_eq!(both.pixel_values.dims(), [8, 3]);
        assert_eq!(both.grids, vec![[1, 2, 2]; 2]);
        assert!(Images::<Flex>::from_processed([], &device)
            .unwrap()
            .is_none());
    }

    #[test]
    fn smart_resize_rounds_half_to_even() {
        // 70 / 28 = 2.5 -> 2
        assert_eq!(smart_resize(70, 70, 28, 3136, 12544).unwrap(), (56, 56));
        assert!(smart_resize(1, 300, 28, 3136, 12544)
            .unwrap_err()
            .to_string()
            .contains("200"));
    }

    #[test]
    fn alpha_composite_matches_pillow_corners() {
        assert_eq!(over_white(10, 255), 10);
        assert_eq!(over_white(10, 0), 255);
        // Pillow 13: alpha_composite(white, (0,0,0,128)) -> 127; (255,128,1,77) -> (255,217,178)
        assert_eq!(over_white(0, 128), 127);
        assert_eq!(
            [over_white(255, 77), over_white(128, 77), over_white(1, 77)],
            [255, 217, 178]
        );
    }
}
