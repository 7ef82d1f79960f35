//! The processor against transformers: smart_resize's table, image modes (RGBA, LA, L, paletted
//! with transparency, JPEG) through `Qwen2VLImageProcessorPil`, and every chat/tokenizer case.

use std::path::PathBuf;

use crate::common::fixture_dir;
use qwen2vl::processor::{load_image, preprocess, smart_resize, ImageProcessorConfig};
use qwen2vl::verify::{verify_chat_cases, Fixture};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn smart_resize_matches_the_reference_table() {
    let fx = Fixture::open(&fixture_dir()).unwrap();
    let cases = fx.manifest["smart_resize_cases"].as_array().unwrap();
    assert!(cases.len() >= 48);
    for c in cases {
        let n = |k: &str| c[k].as_u64().unwrap() as usize;
        let got = smart_resize(n("h"), n("w"), 28, n("min_pixels"), n("max_pixels"));
        match c.get("error") {
            Some(_) => assert!(got.is_err(), "{c}"),
            None => assert_eq!(got.unwrap(), (n("resized_h"), n("resized_w")), "{c}"),
        }
    }
}

#[test]
fn image_modes_match_transformers() {
    let dir = fixtures().join("images");
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let cfg = ImageProcessorConfig {
        min_pixels: 56 * 56,
        max_pixels: 28 * 28 * 16,
        ..Default::default()
    };
    let names = [
        "rgba_50x70.png",
        "la_33x90.png",
        "gray_64x48.png",
        "palette_transparent_40x40.png",
    ];
    for name in names {
        let img = load_image(&dir.join(name)).unwrap();
        let p = preprocess(&img, &cfg).unwrap();
        let grid: Vec<i64> = st
            .tensor(&format!("{name}.image_grid_thw"))
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(grid, p.grid.map(|g| g as i64), "{name}");
        let want: Vec<f32> = st
            .tensor(&format!("{name}.pixel_values"))
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(want.len(), p.pixel_values.len(), "{name}");
        let err = want
            .iter()
            .zip(&p.pixel_values)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err <= 1e-6, "{name}: pixel_values differ by {err}");
    }
}

/// JPEG decoders differ: the `image` crate's chroma upsampling is not libjpeg-turbo's, so a
/// 4:2:0 JPEG decodes up to a few levels away from Pillow (measured: max 4, mean 0.61 on this
/// image). Everything after decoding is exact (the PNG cases). This test pins the size of the gap.
#[test]
fn jpeg_decoding_is_within_a_few_levels_of_pillow() {
    let dir = fixtures().join("images");
    let ours = load_image(&dir.join("photo_90x120.jpg")).unwrap().to_rgb8();
    let pillow = load_image(&dir.join("photo_90x120.pillow_decoded.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(ours.dimensions(), pillow.dimensions());
    let diffs: Vec<i32> = ours
        .as_raw()
        .iter()
        .zip(pillow.as_raw())
        .map(|(a, b)| (*a as i32 - *b as i32).abs())
        .collect();
    let max = *diffs.iter().max().unwrap();
    let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
    assert!(max <= 4 && mean < 1.0, "max {max}, mean {mean}");
}

#[test]
fn unreadable_images_are_clear_errors() {
    let missing = load_image(&fixtures().join("images/nope.png"))
        .unwrap_err()
        .to_string();
    assert!(missing.contains("nope.png"), "{missing}");
    let not_image = load_image(&fixtures().join("images/manifest.json"))
        .unwrap_err()
        .to_string();
    assert!(not_image.contains("cannot decode"), "{not_image}");
}

#[test]
fn chat_template_and_tokenizer_match_every_reference_case() {
    let dir = fixtures().join("qwen-chat");
    let checks = verify_chat_cases(&dir.join("cases.json"), &dir.join("tokenizer.json")).unwrap();
    // 96 prompt cases x (rendered text, grid, ids) + 10 completion cases x (ids, 2 decodings).
    assert_eq!(checks.len(), 96 * 3 + 10 * 3);
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.ok())
        .map(|c| format!("{}: {}", c.name, c.note.clone().unwrap_or_default()))
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
}
