//! Processor checks: from each case's original pixels, the resized image (byte-identical),
//! `pixel_values` and grids; and the fixture's PNG files decode to those original pixels.

use serde_json::Value;

use super::{compare, Check, Checker};
use crate::error::Qwen2VLError;
use crate::processor::{
    load_image, patchify, resize_for_model, to_rgb, ImageProcessorConfig, Rgb8,
};

/// Pixel values are bit-exact in practice; 1e-6 allows a last-bit difference.
pub const PIXEL_TOLERANCE: f64 = 1e-6;

/// The image processor settings the fixture was made with (`manifest.image_processor`).
pub fn processor_config(manifest: &Value) -> ImageProcessorConfig {
    ImageProcessorConfig::from_json(&manifest["image_processor"])
}

impl Checker<'_> {
    pub(super) fn processor_case(
        &mut self,
        case: &str,
        cfg: &ImageProcessorConfig,
    ) -> Result<(), Qwen2VLError> {
        let fx = self.fixture;
        let mut pixels = Vec::new();
        let mut grids = Vec::new();
        let mut k = 0;
        while fx.has(&format!("{case}.image{k}.original_u8")) {
            let orig = fx.get(&format!("{case}.image{k}.original_u8"))?;
            let img = Rgb8 {
                height: orig.shape[0],
                width: orig.shape[1],
                data: orig.values.iter().map(|&v| v as u8).collect(),
            };
            let resized = resize_for_model(&img, cfg)
                .map_err(|e| Qwen2VLError::Input(format!("{case} image {k}: {e}")))?;
            let p = patchify(&resized, cfg);
            let shape = [resized.height, resized.width, 3];
            let resized: Vec<f64> = resized.data.iter().map(|&v| v as f64).collect();
            let key = format!("{case}.image{k}.resized_u8");
            if fx.has(&key) {
                let want = fx.get(&key)?;
                let mut check = compare(&key, &resized, &shape, &want, 0.0);
                if want.shape != shape {
                    check.max_abs_err = f64::INFINITY;
                    check.note = Some(format!("resized to {shape:?}, reference {:?}", want.shape));
                }
                self.checks.push(check);
            }
            pixels.extend(p.pixel_values.iter().map(|&v| v as f64));
            grids.extend(p.grid.iter().map(|&v| v as f64));
            k += 1;
        }
        if k == 0 {
            return Ok(());
        }
        self.host(
            &format!("{case}.processor.pixel_values"),
            &format!("{case}.pixel_values"),
            &pixels,
            PIXEL_TOLERANCE,
        )?;
        self.host(
            &format!("{case}.processor.image_grid_thw"),
            &format!("{case}.image_grid_thw"),
            &grids,
            0.0,
        )
    }

    /// Every PNG/JPEG in `images/` must decode to the original pixels of some case image of its
    /// size.
    pub(super) fn decoded_images(&mut self, cases: &[String]) -> Result<(), Qwen2VLError> {
        let fx = self.fixture;
        let dir = fx.dir.join("images");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        let mut originals = Vec::new();
        for case in cases {
            let mut k = 0;
            while fx.has(&format!("{case}.image{k}.original_u8")) {
                originals.push(fx.get(&format!("{case}.image{k}.original_u8"))?);
                k += 1;
            }
        }
        let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or("")
                .to_ascii_lowercase();
            if !["png", "jpg", "jpeg"].contains(&ext.as_str()) {
                continue;
            }
            let name = format!(
                "decode.{}",
                path.file_name().unwrap_or_default().to_string_lossy()
            );
            let img = to_rgb(&load_image(&path).map_err(|e| Qwen2VLError::Input(e.to_string()))?);
            let shape = [img.height, img.width, 3];
            let got: Vec<f64> = img.data.iter().map(|&v| v as f64).collect();
            let best = originals
                .iter()
                .filter(|o| o.shape == shape)
                .map(|o| compare(&name, &got, &shape, o, 0.0))
                .min_by(|a, b| a.max_abs_err.total_cmp(&b.max_abs_err));
            self.checks.push(best.unwrap_or(Check {
                name,
                max_abs_err: f64::INFINITY,
                tolerance: 0.0,
                note: Some(format!("no case image of shape {shape:?}")),
            }));
        }
        Ok(())
    }
}
