//! Eight visual styles standing for the eight modalities, and lesion shapes drawn into them.

use image::{Rgb, RgbImage};

use crate::rng::Rng;
use crate::taxonomy::Modality;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Round,
    Square,
    Triangle,
    Cross,
}

impl Shape {
    pub const ALL: [Shape; 4] = [Shape::Round, Shape::Square, Shape::Triangle, Shape::Cross];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Round => "round",
            Shape::Square => "square",
            Shape::Triangle => "triangular",
            Shape::Cross => "cross-shaped",
        }
    }

    /// Whether the point (dx, dy), relative to the centre, lies inside a shape of radius r.
    fn contains(self, dx: f64, dy: f64, r: f64) -> bool {
        match self {
            Shape::Round => dx * dx + dy * dy <= r * r,
            Shape::Square => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
            Shape::Triangle => {
                // Apex up, base at dy = r * 0.8.
                let top = -r;
                let base = r * 0.8;
                dy >= top && dy <= base && dx.abs() <= (dy - top) / (base - top) * r
            }
            Shape::Cross => {
                (dx.abs() <= r * 0.3 && dy.abs() <= r) || (dy.abs() <= r * 0.3 && dx.abs() <= r)
            }
        }
    }
}

/// A lesion to draw.
#[derive(Debug, Clone, Copy)]
pub struct Lesion {
    pub shape: Shape,
    pub cx: f64,
    pub cy: f64,
    pub radius: f64,
}

fn clamp8(v: f64) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

fn gray(v: f64) -> Rgb<u8> {
    let g = clamp8(v);
    Rgb([g, g, g])
}

/// The style's background, with the anatomy a viewer would expect of it.
pub fn background(style: Modality, size: u32, rng: &mut Rng) -> RgbImage {
    let s = size as f64;
    let c = s / 2.0;
    let mut img = RgbImage::new(size, size);
    let phase = rng.range(0.0, std::f64::consts::TAU);
    for y in 0..size {
        for x in 0..size {
            let (fx, fy) = (x as f64 + 0.5, y as f64 + 0.5);
            let (dx, dy) = (fx - c, fy - c);
            let d = (dx * dx + dy * dy).sqrt() / s;
            let n = rng.range(-1.0, 1.0);
            let px = match style {
                Modality::Ct => {
                    if d < 0.46 {
                        gray(105.0 + 12.0 * n)
                    } else {
                        gray(8.0 + 4.0 * n)
                    }
                }
                Modality::Mri => {
                    let e = ((dx / (0.44 * s)).powi(2) + (dy / (0.38 * s)).powi(2)).sqrt();
                    if e < 1.0 {
                        gray(60.0 + 50.0 * (1.0 - e) + 8.0 * n)
                    } else {
                        gray(12.0 + 5.0 * n)
                    }
                }
                Modality::XRay => {
                    let rib = ((fy / s * 18.0 + phase).sin() * 0.5 + 0.5)
                        * (1.0 - (dx.abs() / c).powi(2)).max(0.0);
                    gray(35.0 + 90.0 * rib + 10.0 * n)
                }
                Modality::Ultrasound => {
                    let angle = dx.atan2(fy);
                    let r = (dx * dx + fy * fy).sqrt() / s;
                    if angle.abs() < 0.7 && r < 0.95 {
                        gray(70.0 + 55.0 * rng.unit() * rng.unit() + 10.0 * n)
                    } else {
                        gray(4.0)
                    }
                }
                Modality::Dermoscopy => Rgb([
                    clamp8(212.0 + 10.0 * n),
                    clamp8(160.0 + 8.0 * n),
                    clamp8(130.0 + 8.0 * n),
                ]),
                Modality::Fundus => {
                    if d < 0.47 {
                        Rgb([
                            clamp8(190.0 - 60.0 * d + 10.0 * n),
                            clamp8(75.0 + 6.0 * n),
                            clamp8(30.0 + 4.0 * n),
                        ])
                    } else {
                        gray(5.0)
                    }
                }
                Modality::Oct => {
                    let band = ((fy / s * 9.0 + phase).sin() * 0.5 + 0.5).powi(2);
                    gray(30.0 + 110.0 * band + 12.0 * n)
                }
                Modality::Microscopy => {
                    let dot = ((fx * 0.9 + phase).sin() * (fy * 0.9).cos()).max(0.0);
                    Rgb([
                        clamp8(228.0 - 40.0 * dot + 6.0 * n),
                        clamp8(172.0 - 70.0 * dot + 6.0 * n),
                        clamp8(205.0 - 20.0 * dot + 6.0 * n),
                    ])
                }
            };
            img.put_pixel(x, y, px);
        }
    }
    img
}

/// The colour lesions take in a style: always far from its background.
pub fn lesion_color(style: Modality) -> Rgb<u8> {
    match style {
        Modality::Ct => Rgb([235, 235, 235]),
        Modality::Mri => Rgb([250, 250, 250]),
        Modality::XRay => Rgb([252, 252, 252]),
        Modality::Ultrasound => Rgb([240, 240, 240]),
        Modality::Dermoscopy => Rgb([70, 40, 25]),
        Modality::Fundus => Rgb([255, 230, 90]),
        Modality::Oct => Rgb([255, 255, 255]),
        Modality::Microscopy => Rgb([70, 20, 110]),
    }
}

pub fn draw_lesion(img: &mut RgbImage, lesion: &Lesion, color: Rgb<u8>) {
    let (w, h) = img.dimensions();
    let r = lesion.radius;
    let x0 = (lesion.cx - r - 1.0).floor().max(0.0) as u32;
    let y0 = (lesion.cy - r - 1.0).floor().max(0.0) as u32;
    let x1 = ((lesion.cx + r + 1.0).ceil() as u32).min(w);
    let y1 = ((lesion.cy + r + 1.0).ceil() as u32).min(h);
    for y in y0..y1 {
        for x in x0..x1 {
            let (dx, dy) = (x as f64 + 0.5 - lesion.cx, y as f64 + 0.5 - lesion.cy);
            if lesion.shape.contains(dx, dy, r) {
                img.put_pixel(x, y, color);
            }
        }
    }
}
