//! Image preprocessing (resize with PIL's bicubic filter, rescale, normalise, patchify), the
//! CPU work done for every prompt: `cargo bench --bench preprocess`.

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qwen2vl::processor::{preprocess_rgb, ImageProcessorConfig, Rgb8};
use std::hint::black_box;

/// A deterministic test card: smooth gradients plus a checker, so resizing has edges to do.
fn test_image(width: usize, height: usize) -> Rgb8 {
    let mut data = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            let check = if (x / 16 + y / 16) % 2 == 0 { 40 } else { 0 };
            data.push(((x * 255 / width) as u8).saturating_add(check));
            data.push(((y * 255 / height) as u8).saturating_add(check));
            data.push((((x + y) * 127 / (width + height)) as u8).saturating_add(check));
        }
    }
    Rgb8 {
        width,
        height,
        data,
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("preprocess");
    group.throughput(Throughput::Elements(1));
    // Med-R1's setting (max_pixels 401408) on a typical 512x512 scan, and a large photograph
    // that must be scaled down; then the tiny demo's 56x56 images.
    let med_r1 = ImageProcessorConfig {
        max_pixels: 401_408,
        ..Default::default()
    };
    let tiny = ImageProcessorConfig {
        min_pixels: 3136,
        max_pixels: 3136,
        ..Default::default()
    };
    for (name, img, cfg) in [
        ("512x512 med-r1", test_image(512, 512), &med_r1),
        ("1024x768 med-r1", test_image(1024, 768), &med_r1),
        ("56x56 tiny", test_image(56, 56), &tiny),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| preprocess_rgb(black_box(&img), cfg).expect("preprocess"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
