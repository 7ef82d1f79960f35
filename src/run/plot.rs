//! `curves.png`: line charts of a run's metrics against the step, drawn with plotters on its
//! bitmap backend; text in the embedded DejaVu Sans (`assets/fonts`, Bitstream Vera licence),
//! so no system font is needed.

use std::sync::Once;

use image::RgbImage;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// One panel's size in pixels.
const W: u32 = 640;
const H: u32 = 400;

/// One panel: a title, the y axis's label and named series of (step, value).
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

/// Series colours (matplotlib's first four).
pub const COLORS: [[u8; 3]; 4] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [148, 103, 189],
];

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded font as plotters' sans-serif; a failure leaves plotters without text,
        // which the caller sees as a drawing error.
        let _ = register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// The range of `values` with a margin, never empty.
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
            (l.min(v), h.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-6 * hi.abs().max(1.0));
    (lo - pad, hi + pad)
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    p: &Panel,
) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let xs = || p.series.iter().flat_map(|(_, s)| s.iter().map(|q| q.0));
    let ys = || p.series.iter().flat_map(|(_, s)| s.iter().map(|q| q.1));
    let (x0, x1) = span(xs());
    let (y0, y1) = span(ys());
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc(&p.y_label)
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|x| e(&x))?;
    for (i, (name, points)) in p.series.iter().enumerate() {
        let [r, g, b] = COLORS[i % COLORS.len()];
        let color = RGBColor(r, g, b);
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|x| e(&x))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.8))
        .border_style(RGBColor(200, 200, 200))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|x| e(&x))?;
    Ok(())
}

/// Panels laid out two per row.
pub fn render(panels: &[Panel]) -> Result<RgbImage, String> {
    register();
    let rows = panels.len().div_ceil(2).max(1) as u32;
    let (w, h) = (W * 2, H * rows);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let areas = root.split_evenly((rows as usize, 2));
        for (p, area) in panels.iter().zip(areas.iter()) {
            draw_panel(area, p)?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    RgbImage::from_raw(w, h, buf)
        .ok_or_else(|| "the chart's pixel buffer has the wrong size".into())
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

    /// The series is drawn in its colour and the labels in dark text (the embedded font
    /// works: without it there would be no text pixels outside the frame and the legend).
    #[test]
    fn draws_series_and_labelled_axes() {
        let p = Panel {
            title: "mean reward".into(),
            y_label: "reward".into(),
            series: vec![("r".into(), vec![(1.0, 0.0), (2.0, 1.0), (3.0, 0.5)])],
        };
        let img = render(&[p]).unwrap();
        assert_eq!(img.dimensions(), (W * 2, H));
        let blue = img.pixels().filter(|p| p.0 == COLORS[0]).count();
        assert!(blue > 100, "{blue} series pixels");
        // The y axis's description is written sideways left of the axis: dark pixels there.
        let left_text = (0..H)
            .flat_map(|y| (0..24).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 100))
            .count();
        assert!(left_text > 20, "{left_text} text pixels left of the axis");
        assert_eq!(smooth(&[(0.0, 1.0), (1.0, 3.0)], 2)[1], (1.0, 2.0));
    }
}
