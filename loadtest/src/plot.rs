//! Time-series plots as SVG (plotters' SVG backend: text is left to the viewer, so no
//! font or native library is needed on this machine).

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

/// One line of a panel: label, colour, points (x seconds, y).
pub struct Line {
    pub label: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
}

/// A horizontal reference line (a target).
pub struct HLine {
    pub label: String,
    pub y: f64,
}

pub struct Panel {
    pub title: String,
    pub y_desc: String,
    pub lines: Vec<Line>,
    pub hlines: Vec<HLine>,
    /// Upper bound of the y axis; the data's maximum (plus 10 %) when `None`.
    pub y_max: Option<f64>,
}

/// A phase of the run, shaded behind every panel.
pub struct Phase {
    pub name: String,
    pub from_s: f64,
    pub to_s: f64,
}

const SHADES: [RGBColor; 5] = [
    RGBColor(230, 230, 230),
    RGBColor(210, 235, 210),
    RGBColor(250, 235, 200),
    RGBColor(250, 210, 210),
    RGBColor(205, 225, 250),
];

pub const BLUE_: RGBColor = RGBColor(31, 119, 180);
pub const ORANGE_: RGBColor = RGBColor(230, 120, 20);
pub const GREEN_: RGBColor = RGBColor(44, 160, 44);
pub const RED_: RGBColor = RGBColor(200, 30, 30);
pub const PURPLE_: RGBColor = RGBColor(148, 103, 189);

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

/// Writes `panels` stacked in one SVG at `path`, phases shaded behind each.
pub fn timeline(path: &Path, title: &str, phases: &[Phase], panels: &[Panel]) -> Result<()> {
    let height = 60 + 280 * panels.len() as u32;
    let root = SVGBackend::new(path, (1300, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (head, body) = root.split_vertically(60);
    head.draw_text(
        title,
        &("sans-serif", 24).into_font().color(&BLACK),
        (20, 18),
    )
    .map_err(err)?;
    let x_max = phases
        .iter()
        .map(|p| p.to_s)
        .fold(1.0_f64, f64::max)
        .max(1.0);
    for (area, p) in body
        .split_evenly((panels.len().max(1), 1))
        .iter()
        .zip(panels)
    {
        let data_max = p
            .lines
            .iter()
            .flat_map(|l| l.points.iter().map(|q| q.1))
            .chain(p.hlines.iter().map(|h| h.y))
            .filter(|v| v.is_finite())
            .fold(0.0_f64, f64::max);
        let y_max = p.y_max.unwrap_or(data_max * 1.1).max(1e-6);
        let mut chart = ChartBuilder::on(area)
            .caption(&p.title, ("sans-serif", 18))
            .margin(8)
            .margin_right(30)
            .x_label_area_size(34)
            .y_label_area_size(80)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the baseline began")
            .y_desc(&p.y_desc)
            .label_style(("sans-serif", 13))
            .light_line_style(RGBColor(240, 240, 240))
            .draw()
            .map_err(err)?;
        for (i, ph) in phases.iter().enumerate() {
            let shade = SHADES[i % SHADES.len()];
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(ph.from_s, 0.0), (ph.to_s, y_max)],
                    shade.mix(0.5).filled(),
                )))
                .map_err(err)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    ph.name.clone(),
                    (ph.from_s + x_max * 0.004, y_max * 0.97),
                    ("sans-serif", 13).into_font().color(&RGBColor(90, 90, 90)),
                )))
                .map_err(err)?;
        }
        for h in &p.hlines {
            chart
                .draw_series(LineSeries::new(
                    vec![(0.0, h.y), (x_max, h.y)],
                    BLACK.stroke_width(1),
                ))
                .map_err(err)?
                .label(h.label.clone())
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        }
        for l in &p.lines {
            let c = l.color;
            chart
                .draw_series(LineSeries::new(
                    l.points
                        .iter()
                        .copied()
                        .filter(|q| q.1.is_finite())
                        .map(|(x, y)| (x, y.min(y_max))),
                    c.stroke_width(2),
                ))
                .map_err(err)?
                .label(l.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(150, 150, 150))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}
