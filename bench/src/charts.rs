//! Charts of a run, as SVG and PNG: bars like the paper's Figures 2 and 3 (rates
//! relative to physical, sharing among N Violins) and a latency CDF. Text is set in the
//! system's sans-serif font through fontconfig (scripts/setup.sh installs
//! fonts-dejavu-core).

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

const SIZE: (u32, u32) = (900, 520);

/// One series of bars: a name and one value per category.
pub struct Series {
    pub name: String,
    pub values: Vec<f64>,
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(0x44, 0x77, 0xaa),
    RGBColor(0xee, 0x66, 0x77),
    RGBColor(0x22, 0x88, 0x33),
    RGBColor(0xcc, 0xbb, 0x44),
    RGBColor(0x66, 0xcc, 0xee),
    RGBColor(0xaa, 0x33, 0x77),
];

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart: {e:?}")
}

fn draw_bars<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[Series],
) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let max = series
        .iter()
        .flat_map(|s| &s.values)
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.15;
    let n = categories.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, 0f64..max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    let k = series.len().max(1) as f64;
    let w = 0.8 / k;
    for (si, s) in series.iter().enumerate() {
        let colour = COLOURS[si % COLOURS.len()];
        chart
            .draw_series(
                s.values
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(i, v)| {
                        let x0 = i as f64 + 0.1 + si as f64 * w;
                        Rectangle::new([(x0, 0.0), (x0 + w * 0.95, *v)], colour.filled())
                    }),
            )
            .map_err(err)?
            .label(s.name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
    }
    for (i, c) in categories.iter().enumerate() {
        chart
            .draw_series(std::iter::once(Text::new(
                c.clone(),
                (i as f64 + 0.1, 0.0),
                ("sans-serif", 14).into_font(),
            )))
            .map_err(err)?;
    }
    if series.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn draw_cdf<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    lines: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let max_x = lines
        .iter()
        .flat_map(|(_, p)| p)
        .map(|(_, us)| *us)
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_x, 0f64..1f64)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("round trip, µs")
        .y_desc("fraction")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for (i, (name, pts)) in lines.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|(q, us)| (*us, *q)),
                colour.stroke_width(2),
            ))
            .map_err(err)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// A chart to draw in both formats.
pub enum Chart<'a> {
    Bars {
        title: &'a str,
        y_label: &'a str,
        categories: &'a [String],
        series: &'a [Series],
    },
    Cdf {
        title: &'a str,
        lines: &'a [(String, Vec<(f64, f64)>)],
    },
}

/// Writes `DIR/STEM.svg` and `DIR/STEM.png`.
pub fn draw(dir: &Path, stem: &str, chart: &Chart) -> Result<Vec<PathBuf>> {
    let svg = dir.join(format!("{stem}.svg"));
    let png = dir.join(format!("{stem}.png"));
    {
        let s = SVGBackend::new(&svg, SIZE).into_drawing_area();
        let b = BitMapBackend::new(&png, SIZE).into_drawing_area();
        match chart {
            Chart::Bars {
                title,
                y_label,
                categories,
                series,
            } => {
                draw_bars(s, title, y_label, categories, series)?;
                draw_bars(b, title, y_label, categories, series)?;
            }
            Chart::Cdf { title, lines } => {
                draw_cdf(s, title, lines)?;
                draw_cdf(b, title, lines)?;
            }
        }
    }
    for p in [&svg, &png] {
        let len = std::fs::metadata(p)
            .with_context(|| format!("{} was not written", p.display()))?
            .len();
        anyhow::ensure!(len > 0, "{} is empty", p.display());
    }
    Ok(vec![svg, png])
}
