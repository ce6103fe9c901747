//! SVG bar charts of result rows (plotters' SVG backend: no fonts or native libraries needed).

use std::path::Path;

use plotters::prelude::*;

/// One bar group: a label and up to two values (drawn side by side).
pub struct Bar {
    /// Label on the category axis.
    pub label: String,
    /// First value (e.g. ns per packet).
    pub a: f64,
    /// Second value (e.g. mapping ns per packet).
    pub b: f64,
}

/// Draws horizontal bars, log-scaled, to an SVG file; `names` name the two series.
pub fn bars(path: &Path, title: &str, unit: &str, names: (&str, &str), data: &[Bar]) -> Result<(), String> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("svg") => {}
        _ => return Err(format!("{}: only .svg plots are supported", path.display())),
    }
    if data.is_empty() {
        return Err("nothing to plot".into());
    }
    let height = 120 + 44 * data.len() as u32;
    let root = SVGBackend::new(path, (960, height)).into_drawing_area();
    let e = |e: &dyn std::fmt::Display| format!("plot {}: {e}", path.display());
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let lo = data.iter().flat_map(|d| [d.a, d.b]).filter(|v| *v > 0.0).fold(f64::INFINITY, f64::min);
    let hi = data.iter().flat_map(|d| [d.a, d.b]).fold(0.0, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > 0.0 { (lo / 2.0, hi * 2.0) } else { (0.1, 10.0) };
    let n = data.len() as i32;
    let labels: Vec<String> = data.iter().map(|d| d.label.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(260)
        .build_cartesian_2d((lo..hi).log_scale(), (0..n).into_segmented())
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc(unit)
        .x_labels(6)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_labels(data.len() + 1)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(|x| e(&x))?;
    let series = [(names.0, RGBColor(31, 119, 180), 0u8), (names.1, RGBColor(255, 127, 14), 1u8)];
    for (name, color, which) in series {
        let rects = data.iter().enumerate().filter_map(move |(i, d)| {
            let v = if which == 0 { d.a } else { d.b };
            (v > 0.0).then(|| {
                let i = i as i32;
                // Two thin bars per category; integer y cells, so draw in the cell's lower and
                // upper halves by shrinking with a margin in pixels.
                let mut r = Rectangle::new(
                    [(lo, SegmentValue::Exact(i)), (v, SegmentValue::Exact(i + 1))],
                    color.filled(),
                );
                r.set_margin(if which == 0 { 4 } else { 22 }, if which == 0 { 22 } else { 4 }, 0, 0);
                r
            })
        });
        chart
            .draw_series(rects)
            .map_err(|x| e(&x))?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
