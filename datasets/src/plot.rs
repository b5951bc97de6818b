//! PNG charts (plotters, bitmap backend, with an embedded DejaVu Sans font so no
//! system fonts are needed). Generic bar, line and heatmap charts that every stage
//! uses, and the charts of `moecast trace stats`.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{Result, TraceError};
use crate::stats::TraceStats;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();
const SIZE: (u32, u32) = (900, 520);
/// Pixels around a chart, and left of it for the y axis's labels.
const MARGIN_PX: u32 = 12;
const Y_LABELS_PX: u32 = 56;

fn register_font() {
    REGISTER.call_once(|| {
        // The font is compiled in, so registration cannot fail at run time.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> TraceError {
    TraceError::Plot {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// Renders into a temporary PNG beside `path`, then renames it into place.
fn render(path: &Path, draw: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    register_font();
    let tmp = crate::store::temp_beside(path)?;
    draw(tmp.path())?;
    tmp.persist(path)
        .map_err(|e| TraceError::io(path, e.error))?;
    Ok(())
}

/// One named series of (x, y) points.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// A line chart of several series; a horizontal reference line may be added.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
    reference: Option<(&str, f64)>,
) -> Result<()> {
    render(path, |tmp| {
        let root = BitMapBackend::new(tmp, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
        let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
        let (x0, x1) = bounds(xs);
        let (_, y1) = bounds(ys.chain(reference.map(|r| r.1)));
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(MARGIN_PX)
            .x_label_area_size(40)
            .y_label_area_size(Y_LABELS_PX)
            .build_cartesian_2d(x0..x1, 0f64..(y1 * 1.08).max(1e-9))
            .map_err(|e| plot_err(path, e))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(|e| plot_err(path, e))?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| plot_err(path, e))?
                .label(s.name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        if let Some((name, y)) = reference {
            chart
                .draw_series(LineSeries::new(
                    vec![(x0, y), (x1, y)],
                    BLACK.stroke_width(1),
                ))
                .map_err(|e| plot_err(path, e))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(|e| plot_err(path, e))?;
        root.present().map_err(|e| plot_err(path, e))
    })
}

/// A bar chart with one bar per label; a horizontal reference line may be added.
pub fn bar_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    bars: &[(String, f64)],
    reference: Option<(&str, f64)>,
) -> Result<()> {
    render(path, |tmp| {
        let root = BitMapBackend::new(tmp, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        let (_, y1) = bounds(bars.iter().map(|b| b.1).chain(reference.map(|r| r.1)));
        let n = bars.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(MARGIN_PX)
            .x_label_area_size(48)
            .y_label_area_size(Y_LABELS_PX)
            // A segmented range over 0..m holds m + 1 segments.
            .build_cartesian_2d((0..n - 1).into_segmented(), 0f64..(y1 * 1.08).max(1e-9))
            .map_err(|e| plot_err(path, e))?;
        // One label under each bar's centre (every other one past 24 bars).
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .x_labels(n.min(24))
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => bars.get(*i).map(|b| b.0.clone()).unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .map_err(|e| plot_err(path, e))?;
        let color = Palette99::pick(0).to_rgba();
        // A tenth of each bar's slot on either side, in pixels (slots narrow with many bars).
        let slot_px = (SIZE.0 - Y_LABELS_PX - 2 * MARGIN_PX) as f64 / n as f64;
        chart
            .draw_series(
                Histogram::vertical(&chart)
                    .margin((slot_px * 0.1).round() as u32)
                    .style(color.filled())
                    .data(bars.iter().enumerate().map(|(i, b)| (i, b.1))),
            )
            .map_err(|e| plot_err(path, e))?;
        if let Some((name, y)) = reference {
            chart
                .draw_series(LineSeries::new(
                    vec![(SegmentValue::Exact(0), y), (SegmentValue::Last, y)],
                    BLACK.stroke_width(2),
                ))
                .map_err(|e| plot_err(path, e))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK));
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| plot_err(path, e))?;
        }
        root.present().map_err(|e| plot_err(path, e))
    })
}

/// A heatmap of an `n x n` row-major matrix with values in [0, max].
pub fn heatmap(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    n: usize,
    values: &[f64],
) -> Result<()> {
    render(path, |tmp| {
        let root = BitMapBackend::new(tmp, (720, 720)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        let max = values.iter().copied().fold(0.0, f64::max).max(1e-12);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(MARGIN_PX)
            .x_label_area_size(40)
            .y_label_area_size(48)
            .build_cartesian_2d(0..n, 0..n)
            .map_err(|e| plot_err(path, e))?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(|e| plot_err(path, e))?;
        chart
            .draw_series((0..n * n).map(|idx| {
                let (i, j) = (idx / n, idx % n);
                let v = (values[idx] / max).clamp(0.0, 1.0);
                let shade = (255.0 * (1.0 - v)) as u8;
                Rectangle::new(
                    [(j, i), (j + 1, i + 1)],
                    RGBColor(shade, shade, 255).filled(),
                )
            }))
            .map_err(|e| plot_err(path, e))?;
        root.present().map_err(|e| plot_err(path, e))
    })
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if lo.is_finite() && hi > lo {
        (lo, hi)
    } else if lo.is_finite() {
        (lo, lo + 1.0)
    } else {
        (0.0, 1.0)
    }
}

/// Writes the charts of a trace's statistics into `dir`; returns the files written.
pub fn plot_stats(stats: &TraceStats, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| TraceError::io(dir, e))?;
    let mut written = Vec::new();
    let layer_bars = |f: &dyn Fn(&crate::stats::LayerStats) -> Option<f64>| -> Vec<(String, f64)> {
        stats
            .layers
            .iter()
            .map(|l| (l.layer.to_string(), f(l).unwrap_or(0.0)))
            .collect()
    };
    let p = dir.join("overlap_per_layer.png");
    bar_chart(
        &p,
        &format!("{}: adjacent-token overlap per layer", stats.model),
        "MoE layer",
        "|E_t ∩ E_t-1| / k",
        &layer_bars(&|l| l.overlap),
        Some(("random k/E", stats.random_overlap)),
    )?;
    written.push(p);
    let p = dir.join("popularity.png");
    let uniform = 1.0 / stats.n_experts as f64;
    bar_chart(
        &p,
        &format!("{}: share of the most used expert per layer", stats.model),
        "MoE layer",
        "share of accesses",
        &layer_bars(&|l| Some(l.top_share)),
        Some(("uniform 1/E", uniform)),
    )?;
    written.push(p);
    let p = dir.join("reuse_distance.png");
    let mut bars: Vec<(String, f64)> = stats
        .reuse_distance
        .iter()
        .map(|b| {
            let label = if b.lo == b.hi {
                b.lo.to_string()
            } else {
                format!("{}-{}", b.lo, b.hi)
            };
            (label, b.count as f64)
        })
        .collect();
    bars.push(("cold".into(), stats.cold_accesses as f64));
    bar_chart(
        &p,
        &format!(
            "{}: reuse distance (distinct experts in between)",
            stats.model
        ),
        "reuse distance",
        "accesses",
        &bars,
        None,
    )?;
    written.push(p);
    let p = dir.join("lru_hit_rate.png");
    let curve: Vec<(f64, f64)> = stats
        .lru_curve
        .iter()
        .map(|&(c, h)| (c as f64, h))
        .collect();
    line_chart(
        &p,
        &format!("{}: per-layer LRU hit rate vs capacity", stats.model),
        "capacity (experts per layer)",
        "hit rate",
        &[Series {
            name: "LRU, cold start per sequence",
            points: curve,
        }],
        None,
    )?;
    written.push(p);
    if let (Some(m), Some(c)) = (&stats.first_coactivation_matrix, stats.coactivation.first()) {
        let p = dir.join("coactivation.png");
        heatmap(
            &p,
            &format!(
                "P(expert j at layer {} | expert i at layer {})",
                c.to_layer, c.from_layer
            ),
            &format!("j (layer {})", c.to_layer),
            &format!("i (layer {})", c.from_layer),
            stats.n_experts as usize,
            m,
        )?;
        written.push(p);
    }
    Ok(written)
}
