//! Curves of runs' metrics: `kiln plot`, every finished run's `plots/`, and the report's inline
//! SVG. One chart per metric, the runs overlaid with a legend. The font is compiled in (Ubuntu
//! Light, from `epaint_default_fonts`), so text renders on a machine with no system fonts.

use crate::history::{History, XAxis};
use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// What to draw.
#[derive(Debug, Clone)]
pub struct PlotOptions {
    /// Metric names (`train/loss`, `eval/accuracy`, …); empty: [`default_metrics`].
    pub metrics: Vec<String>,
    /// TensorBoard's smoothing: an exponential moving average with this weight (0 = raw), drawn
    /// over the faded raw curve.
    pub smooth: f64,
    pub x: XAxis,
    pub log_y: bool,
}

impl Default for PlotOptions {
    fn default() -> Self {
        PlotOptions {
            metrics: Vec::new(),
            smooth: 0.0,
            x: XAxis::Step,
            log_y: false,
        }
    }
}

/// One chart: a metric's curve for each run that logged it.
pub struct Chart {
    pub metric: String,
    pub curves: Vec<(String, Vec<(f64, f64)>)>,
    x_label: String,
    y_label: String,
}

/// `train/loss` and every `eval/*` metric (loss first) the runs logged.
pub fn default_metrics(runs: &[History]) -> Vec<String> {
    let keys: std::collections::BTreeSet<String> = runs.iter().flat_map(|h| h.keys()).collect();
    let mut out: Vec<String> = ["train/loss", "eval/loss"]
        .into_iter()
        .filter(|k| keys.contains(*k))
        .map(String::from)
        .collect();
    out.extend(
        keys.iter()
            .filter(|k| k.starts_with("eval/") && *k != "eval/loss")
            .cloned(),
    );
    out
}

/// The charts `opts` asks for; an unknown metric is refused with the ones the runs have.
pub fn charts(runs: &[History], opts: &PlotOptions) -> Result<Vec<Chart>> {
    anyhow::ensure!(!runs.is_empty(), "no run to plot");
    anyhow::ensure!(
        (0.0..1.0).contains(&opts.smooth),
        "--smooth must be in [0, 1) (0 = raw, 0.9 = heavy), got {}",
        opts.smooth
    );
    let metrics = match opts.metrics.is_empty() {
        true => default_metrics(runs),
        false => opts.metrics.clone(),
    };
    let known: std::collections::BTreeSet<String> = runs.iter().flat_map(|h| h.keys()).collect();
    for m in &metrics {
        if !known.contains(m) {
            let names: Vec<&str> = known.iter().map(String::as_str).collect();
            bail!(
                "no run logged the metric `{m}`; {} logged: {}",
                match runs.len() {
                    1 => "it",
                    _ => "they",
                },
                names.join(", ")
            );
        }
    }
    anyhow::ensure!(
        !metrics.is_empty(),
        "the runs logged no train/loss or eval metric yet; name one with --metric"
    );
    let items = runs.iter().find_map(History::item_key).unwrap_or("tokens");
    let mut out = Vec::new();
    for metric in metrics {
        let mut curves = Vec::new();
        for run in runs.iter().filter(|h| h.keys().contains(&metric)) {
            let mut points = run.series(&metric, opts.x)?;
            points.retain(|p| p.1.is_finite());
            if opts.log_y {
                if let Some(p) = points.iter().find(|p| p.1 <= 0.0) {
                    bail!(
                        "--log-y: {metric} of {} is {} at x = {}; a log axis needs values above 0",
                        run.name,
                        p.1,
                        p.0
                    );
                }
            }
            curves.push((run.name.clone(), points));
        }
        out.push(Chart {
            x_label: x_label(opts.x, items).into(),
            y_label: y_label(&metric, items, opts.log_y),
            metric,
            curves,
        });
    }
    Ok(out)
}

fn x_label(x: XAxis, items: &str) -> &'static str {
    match (x, items) {
        (XAxis::Step, _) => "optimizer step",
        (XAxis::Items, "examples") => "examples trained on",
        (XAxis::Items, _) => "tokens trained on",
        (XAxis::Seconds, _) => "training time (s)",
    }
}

fn y_label(metric: &str, items: &str, log: bool) -> String {
    let unit = match metric.rsplit('/').next().unwrap_or(metric) {
        "loss" => " (nats)",
        "accuracy" => " (fraction)",
        "throughput" if items == "examples" => " (examples/s)",
        "throughput" => " (tokens/s)",
        "seconds" => " (s)",
        "grad_norm" => " (L2)",
        _ => "",
    };
    let scale = if log { ", log scale" } else { "" };
    format!("{metric}{unit}{scale}")
}

/// Writes the charts to `out`, PNG or SVG by its extension.
pub fn write(charts: &[Chart], opts: &PlotOptions, out: &Path) -> Result<()> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = parent.filter(|p| !p.is_dir()) {
        bail!(
            "cannot write {}: the folder {} does not exist; create it or pick another --out",
            out.display(),
            dir.display()
        );
    }
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let size = canvas(charts.len());
    match ext.as_str() {
        "svg" => {
            let svg = svg(charts, opts)?;
            std::fs::write(out, svg).map_err(kiln_core::fs::at(out))?;
        }
        "png" => {
            let mut rgb = vec![0u8; size.0 as usize * size.1 as usize * 3];
            {
                let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
                draw(&root, charts, opts)?;
                root.present()
                    .map_err(|e| anyhow!("drawing the plot: {e}"))?;
            }
            image::save_buffer(out, &rgb, size.0, size.1, image::ExtendedColorType::Rgb8)
                .with_context(|| format!("cannot write {}", out.display()))?;
        }
        _ => bail!("--out {}: write a .png or a .svg file", out.display()),
    }
    Ok(())
}

/// The charts as one SVG document (the report inlines it).
pub fn svg(charts: &[Chart], opts: &PlotOptions) -> Result<String> {
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, canvas(charts.len())).into_drawing_area();
        draw(&root, charts, opts)?;
        root.present()
            .map_err(|e| anyhow!("drawing the plot: {e}"))?;
    }
    Ok(text)
}

const CHART: (u32, u32) = (640, 400);

/// Charts side by side in two columns (one chart alone in one).
fn grid(n: usize) -> (usize, usize) {
    let cols = n.clamp(1, 2);
    (n.div_ceil(cols).max(1), cols)
}

fn canvas(n: usize) -> (u32, u32) {
    let (rows, cols) = grid(n);
    (CHART.0 * cols as u32, CHART.1 * rows as u32)
}

/// Tableau's ten colours: distinct, and legible on white.
const COLORS: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

fn register_font() -> Result<()> {
    static FONT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *FONT.get_or_init(|| {
        let font = epaint_default_fonts::UBUNTU_LIGHT;
        ["sans-serif", "serif", "monospace"].iter().all(|family| {
            plotters::style::register_font(family, FontStyle::Normal, font).is_ok()
                && plotters::style::register_font(family, FontStyle::Bold, font).is_ok()
        })
    });
    anyhow::ensure!(ok, "the compiled-in font did not load");
    Ok(())
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    charts: &[Chart],
    opts: &PlotOptions,
) -> Result<()> {
    register_font()?;
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the plot: {e}");
    root.fill(&WHITE).map_err(err)?;
    let (rows, cols) = grid(charts.len());
    for (area, chart) in root.split_evenly((rows, cols)).iter().zip(charts) {
        draw_chart(area, chart, opts).map_err(err)?;
    }
    Ok(())
}

/// The y value drawn: log10 of it on a log axis, whose tick labels then show 10^y.
fn y_of(v: f64, log: bool) -> f64 {
    if log {
        v.log10()
    } else {
        v
    }
}

fn draw_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    chart: &Chart,
    opts: &PlotOptions,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let log = opts.log_y;
    let points = chart.curves.iter().flat_map(|c| c.1.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        let y = y_of(y, log);
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    // Every chart starts at the origin (step 0, no tokens, no time): charts line up, and a
    // single evaluation sits where it happened.
    x0 = x0.min(0.0);
    if x1 - x0 < 1e-12 {
        (x0, x1) = (x0 - 1.0, x1 + 1.0);
    }
    let pad = match y1 - y0 {
        d if d < 1e-12 => y0.abs().max(1.0) * 0.05,
        d => d * 0.05,
    };
    let (y0, y1) = (y0 - pad, y1 + pad);

    let mut cc = ChartBuilder::on(area)
        .caption(&chart.metric, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    let y_fmt = |v: &f64| match log {
        true => short(10f64.powf(*v)),
        false => short(*v),
    };
    cc.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .x_label_formatter(&|v| short(*v))
        .y_label_formatter(&y_fmt)
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .light_line_style(RGBColor(238, 238, 238))
        .draw()?;

    for (i, (run, curve)) in chart.curves.iter().enumerate() {
        let (r, g, b) = COLORS[i % COLORS.len()];
        let color = RGBColor(r, g, b);
        let pts: Vec<(f64, f64)> = curve.iter().map(|&(x, y)| (x, y_of(y, log))).collect();
        // Sparse curves (evaluations) get a marker at each point.
        let sparse = pts.len() <= 40;
        let smoothed = match opts.smooth > 0.0 && pts.len() > 2 {
            true => {
                cc.draw_series(LineSeries::new(
                    pts.clone(),
                    color.mix(0.25).stroke_width(1),
                ))?;
                ema(&pts, opts.smooth)
            }
            false => pts.clone(),
        };
        cc.draw_series(LineSeries::new(smoothed, color.stroke_width(2)))?
            .label(run.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        if sparse {
            cc.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    cc.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .draw()?;
    Ok(())
}

/// TensorBoard's smoothing: an exponential moving average, debiased at the start.
pub fn ema(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let mut avg = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            avg = avg * weight + (1.0 - weight) * y;
            (x, avg / (1.0 - weight.powi(i as i32 + 1)))
        })
        .collect()
}

/// A tick label: `1.2k`, `3.5M` for large numbers, up to 4 significant digits otherwise.
fn short(v: f64) -> String {
    let a = v.abs();
    let trim = |s: String| -> String {
        match s.contains('.') {
            true => s.trim_end_matches('0').trim_end_matches('.').to_string(),
            false => s,
        }
    };
    match a {
        _ if a == 0.0 => "0".into(),
        _ if a >= 1e9 => format!("{}G", trim(format!("{:.2}", v / 1e9))),
        _ if a >= 1e6 => format!("{}M", trim(format!("{:.2}", v / 1e6))),
        _ if a >= 1e4 => format!("{}k", trim(format!("{:.1}", v / 1e3))),
        _ if a >= 1.0 => trim(format!("{v:.2}")),
        _ if a >= 1e-3 => trim(format!("{v:.4}")),
        _ => format!("{v:.1e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_is_debiased_and_keeps_a_constant() {
        let flat: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, 2.0)).collect();
        for (_, y) in ema(&flat, 0.9) {
            assert!((y - 2.0).abs() < 1e-12, "{y}");
        }
        let s = ema(&[(0.0, 0.0), (1.0, 10.0)], 0.5);
        // avg: 0, then 5; debiased: 0 / 0.5, 5 / 0.75.
        assert_eq!(s[0].1, 0.0);
        assert!((s[1].1 - 5.0 / 0.75).abs() < 1e-12);
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(short(12_500.0), "12.5k");
        assert_eq!(short(3_000_000.0), "3M");
        assert_eq!(short(1.25), "1.25");
        assert_eq!(short(0.000_3), "3.0e-4");
        assert_eq!(short(0.0), "0");
    }

    #[test]
    fn grid_of_charts() {
        assert_eq!(grid(1), (1, 1));
        assert_eq!(grid(3), (2, 2));
        assert_eq!(canvas(4), (1280, 800));
    }
}
