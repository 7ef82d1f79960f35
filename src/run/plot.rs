//! `curves.png`: line charts of a run's metrics against the step, drawn with the `image`
//! crate and a built-in 3x5 pixel font (no system fonts needed).

use image::{Rgb, RgbImage};

const W: u32 = 480;
const H: u32 = 300;
const MARGIN_L: u32 = 56;
const MARGIN_B: u32 = 28;
const MARGIN_T: u32 = 24;
const MARGIN_R: u32 = 12;
const SCALE: u32 = 2;

/// One panel: a title and named series of (step, value).
pub struct Panel {
    pub title: String,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

const COLORS: [[u8; 3]; 4] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [148, 103, 189],
];

fn glyph(c: char) -> [&'static str; 5] {
    match c.to_ascii_lowercase() {
        '0' => ["111", "101", "101", "101", "111"],
        '1' => ["010", "110", "010", "010", "111"],
        '2' => ["111", "001", "111", "100", "111"],
        '3' => ["111", "001", "111", "001", "111"],
        '4' => ["101", "101", "111", "001", "001"],
        '5' => ["111", "100", "111", "001", "111"],
        '6' => ["111", "100", "111", "101", "111"],
        '7' => ["111", "001", "010", "010", "010"],
        '8' => ["111", "101", "111", "101", "111"],
        '9' => ["111", "101", "111", "001", "111"],
        '.' => ["000", "000", "000", "000", "010"],
        '-' => ["000", "000", "111", "000", "000"],
        '+' => ["000", "010", "111", "010", "000"],
        '/' => ["001", "001", "010", "100", "100"],
        '(' => ["010", "100", "100", "100", "010"],
        ')' => ["010", "001", "001", "001", "010"],
        'a' => ["010", "101", "111", "101", "101"],
        'b' => ["110", "101", "110", "101", "110"],
        'c' => ["011", "100", "100", "100", "011"],
        'd' => ["110", "101", "101", "101", "110"],
        'e' => ["111", "100", "110", "100", "111"],
        'f' => ["111", "100", "110", "100", "100"],
        'g' => ["011", "100", "101", "101", "011"],
        'h' => ["101", "101", "111", "101", "101"],
        'i' => ["111", "010", "010", "010", "111"],
        'j' => ["001", "001", "001", "101", "010"],
        'k' => ["101", "101", "110", "101", "101"],
        'l' => ["100", "100", "100", "100", "111"],
        'm' => ["101", "111", "111", "101", "101"],
        'n' => ["110", "101", "101", "101", "101"],
        'o' => ["010", "101", "101", "101", "010"],
        'p' => ["110", "101", "110", "100", "100"],
        'q' => ["010", "101", "101", "110", "011"],
        'r' => ["110", "101", "110", "101", "101"],
        's' => ["011", "100", "010", "001", "110"],
        't' => ["111", "010", "010", "010", "010"],
        'u' => ["101", "101", "101", "101", "111"],
        'v' => ["101", "101", "101", "101", "010"],
        'w' => ["101", "101", "111", "111", "101"],
        'x' => ["101", "101", "010", "101", "101"],
        'y' => ["101", "101", "010", "010", "010"],
        'z' => ["111", "001", "010", "100", "111"],
        _ => ["000", "000", "000", "000", "000"],
    }
}

fn text(img: &mut RgbImage, x: u32, y: u32, s: &str, color: [u8; 3]) {
    for (i, c) in s.chars().enumerate() {
        let g = glyph(c);
        for (row, bits) in g.iter().enumerate() {
            for (col, b) in bits.bytes().enumerate() {
                if b != b'1' {
                    continue;
                }
                for dy in 0..SCALE {
                    for dx in 0..SCALE {
                        let px = x + (i as u32 * 4 + col as u32) * SCALE + dx;
                        let py = y + row as u32 * SCALE + dy;
                        if px < img.width() && py < img.height() {
                            img.put_pixel(px, py, Rgb(color));
                        }
                    }
                }
            }
        }
    }
}

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), color: [u8; 3]) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()) as usize).max(1);
    for k in 0..=n {
        let t = k as f64 / n as f64;
        let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
        for (dx, dy) in [(0.0, 0.0), (0.0, 1.0)] {
            let (px, py) = ((x + dx) as i64, (y + dy) as i64);
            if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, Rgb(color));
            }
        }
    }
}

fn label(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-2..1e4).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn panel(p: &Panel) -> RgbImage {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    text(&mut img, MARGIN_L, 6, &p.title, [0, 0, 0]);
    let points: Vec<(f64, f64)> = p
        .series
        .iter()
        .flat_map(|(_, s)| s.iter().copied())
        .filter(|(_, y)| y.is_finite())
        .collect();
    let (x0, x1) = (MARGIN_L as f64, (W - MARGIN_R) as f64);
    let (y0, y1) = ((H - MARGIN_B) as f64, MARGIN_T as f64);
    line(&mut img, (x0, y0), (x1, y0), [0, 0, 0]);
    line(&mut img, (x0, y0), (x0, y1), [0, 0, 0]);
    if points.is_empty() {
        text(&mut img, MARGIN_L + 20, H / 2, "no data", [120, 120, 120]);
        return img;
    }
    let (mut xmin, mut xmax) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut ymin, mut ymax) = (f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in &points {
        xmin = xmin.min(x);
        xmax = xmax.max(x);
        ymin = ymin.min(y);
        ymax = ymax.max(y);
    }
    if xmax <= xmin {
        xmax = xmin + 1.0;
    }
    if ymax - ymin < 1e-12 {
        ymin -= 0.5;
        ymax += 0.5;
    }
    let pad = (ymax - ymin) * 0.05;
    let (ymin, ymax) = (ymin - pad, ymax + pad);
    let sx = |x: f64| x0 + (x - xmin) / (xmax - xmin) * (x1 - x0);
    let sy = |y: f64| y0 + (y - ymin) / (ymax - ymin) * (y1 - y0);
    for k in 0..=4 {
        let v = ymin + (ymax - ymin) * k as f64 / 4.0;
        let py = sy(v);
        line(&mut img, (x0 - 4.0, py), (x0, py), [0, 0, 0]);
        line(&mut img, (x0 + 1.0, py), (x1, py), [235, 235, 235]);
        text(&mut img, 2, py as u32 - 4, &label(v), [60, 60, 60]);
        let s = xmin + (xmax - xmin) * k as f64 / 4.0;
        let px = sx(s);
        line(&mut img, (px, y0), (px, y0 + 4.0), [0, 0, 0]);
        text(
            &mut img,
            (px as u32).saturating_sub(8),
            H - 20,
            &format!("{s:.0}"),
            [60, 60, 60],
        );
    }
    text(&mut img, W - 44, H - 10, "step", [60, 60, 60]);
    for (i, (name, s)) in p.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = s.iter().copied().filter(|(_, y)| y.is_finite()).collect();
        for w in pts.windows(2) {
            line(
                &mut img,
                (sx(w[0].0), sy(w[0].1)),
                (sx(w[1].0), sy(w[1].1)),
                color,
            );
        }
        if pts.len() == 1 {
            let (px, py) = (sx(pts[0].0), sy(pts[0].1));
            line(&mut img, (px - 2.0, py), (px + 2.0, py), color);
        }
        if p.series.len() > 1 {
            text(&mut img, W - 150, MARGIN_T + 4 + i as u32 * 14, name, color);
        }
    }
    img
}

/// Panels laid out two per row.
pub fn render(panels: &[Panel]) -> RgbImage {
    let rows = panels.len().div_ceil(2) as u32;
    let mut out = RgbImage::from_pixel(W * 2, H * rows.max(1), Rgb([255, 255, 255]));
    for (i, p) in panels.iter().enumerate() {
        let img = panel(p);
        let (ox, oy) = ((i as u32 % 2) * W, (i as u32 / 2) * H);
        image::imageops::overlay(&mut out, &img, ox as i64, oy as i64);
    }
    out
}

/// Moving average over `window` points (the raw per-step rewards are noisy).
pub fn smooth(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let w = window.max(1);
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, _))| {
            let lo = i.saturating_sub(w - 1);
            let slice = &points[lo..=i];
            (
                x,
                slice.iter().map(|p| p.1).sum::<f64>() / slice.len() as f64,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_series_inside_the_frame() {
        let p = Panel {
            title: "mean reward".into(),
            series: vec![("r".into(), vec![(1.0, 0.0), (2.0, 1.0), (3.0, 0.5)])],
        };
        let img = render(&[p]);
        assert_eq!(img.dimensions(), (W * 2, H));
        let blue = img.pixels().filter(|p| p.0 == COLORS[0]).count();
        assert!(blue > 100, "{blue} series pixels");
        assert_eq!(smooth(&[(0.0, 1.0), (1.0, 3.0)], 2)[1], (1.0, 2.0));
    }
}
