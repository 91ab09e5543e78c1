//! What a finished run leaves to look at: `plots/` (its loss and eval curves, PNG and SVG) and
//! `report.html`, one self-contained page (no scripts, no links out): the summary, the metrics,
//! the curves as inline SVG, a confusion matrix for a classifier, samples for a language model,
//! and the recipe. Both are rebuilt from the run's files alone (`kiln report RUN`).

use crate::history::History;
use crate::plot::{self, PlotOptions};
use crate::progress::{duration, metric, thousands};
use crate::runs::RunInfo;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub const REPORT_FILE: &str = "report.html";
pub const PLOTS_DIR: &str = "plots";
/// A classifier's confusion matrices from its final evaluation.
pub const CONFUSION_FILE: &str = "confusion.json";
/// A language model's samples, drawn after its final evaluation.
pub const SAMPLES_FILE: &str = "samples.json";

/// One split's confusion matrix: `matrix[target][prediction]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Confusion {
    /// `eval` (the validation split) or `test`.
    pub split: String,
    pub labels: Vec<String>,
    pub matrix: Vec<Vec<u64>>,
}

/// A prompt from the validation split and the model's continuation of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub prompt: String,
    pub continuation: String,
}

/// Writes `plots/<metric>.png` and `.svg` for the run's loss and eval curves.
pub fn write_plots(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let runs = [History::read(run_dir)?];
    let dir = run_dir.join(PLOTS_DIR);
    std::fs::create_dir_all(&dir).map_err(kiln_core::fs::at(&dir))?;
    let mut written = Vec::new();
    for m in plot::default_metrics(&runs) {
        let opts = PlotOptions {
            metrics: vec![m.clone()],
            ..PlotOptions::default()
        };
        let charts = plot::charts(&runs, &opts)?;
        for ext in ["png", "svg"] {
            let file = dir.join(format!("{}.{ext}", m.replace('/', "_")));
            plot::write(&charts, &opts, &file)?;
            written.push(file);
        }
    }
    Ok(written)
}

/// Writes `report.html` from the run's files; returns its path.
pub fn write_report(run_dir: &Path) -> Result<PathBuf> {
    let html = render(run_dir)?;
    let file = run_dir.join(REPORT_FILE);
    kiln_core::fs::write_atomic(&file, html.as_bytes())
        .with_context(|| format!("writing {}", file.display()))?;
    Ok(file)
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str =
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;\
max-width:1320px;padding:0 1rem;color:#222}h1{margin-bottom:.2rem}.sub{color:#666;margin-top:0}\
h2{border-bottom:1px solid #ddd;padding-bottom:.3rem;margin-top:2rem}\
table{border-collapse:collapse;font-size:.92rem}td,th{padding:.25rem .7rem;text-align:left;\
border-bottom:1px solid #eee}th{background:#f6f6f6}td.n{text-align:right;font-variant-numeric:\
tabular-nums}pre{background:#f6f8fa;padding:1rem;overflow-x:auto;font-size:.85rem}\
.status{display:inline-block;padding:.1rem .6rem;border-radius:1rem;background:#e8f0fe}\
.cm td{text-align:right;padding:.15rem .35rem;font-size:.78rem;border:1px solid #f0f0f0}\
.cm th{font-size:.72rem;padding:.15rem .35rem}.sample{margin-bottom:1rem}\
.sample b{color:#1f77b4}svg{max-width:100%;height:auto}code{font-size:.85rem}";

fn render(run_dir: &Path) -> Result<String> {
    let info = RunInfo::read(run_dir)?;
    let history = History::read_lenient(run_dir)?;
    let recipe_text = std::fs::read_to_string(run_dir.join("recipe.toml"))
        .with_context(|| format!("cannot read {}/recipe.toml", run_dir.display()))?;
    let summary = info.summary.clone().unwrap_or(serde_json::Value::Null);
    let record = crate::run::RunRecord::read(run_dir)?;
    let mut h = String::new();
    let w = &mut h;
    writeln!(
        w,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} — kiln run \
         report</title><style>{STYLE}</style></head><body>",
        escape(&info.name)
    )?;
    writeln!(
        w,
        "<h1>{}</h1><p class=\"sub\">recipe <b>{}</b> · <span class=\"status\">{}</span></p>",
        escape(&info.name),
        escape(&info.recipe),
        info.status.word()
    )?;

    // Summary.
    let mut rows: Vec<(&str, String)> = Vec::new();
    let step = match (info.step, info.total) {
        (Some(s), Some(t)) => format!("{s} of {t}"),
        (Some(s), None) => s.to_string(),
        _ => "-".into(),
    };
    rows.push(("steps", step));
    if let Some(s) = info.wall_seconds {
        rows.push(("wall time", duration(s)));
    }
    if let Some(s) = summary["train_seconds"].as_f64() {
        rows.push(("training time", duration(s)));
    }
    if let Some(t) = info.throughput {
        rows.push((
            "throughput",
            metric("throughput", t, info.items)
                .trim_start_matches("throughput ")
                .into(),
        ));
    }
    if let Some(d) = &info.device {
        rows.push(("device", d.clone()));
    }
    if let Some(p) = summary["parameters"].as_f64() {
        let trainable = summary["trainable_parameters"].as_f64().unwrap_or(p);
        let mut s = thousands(p);
        if trainable != p {
            s += &format!(" ({} trainable)", thousands(trainable));
        }
        rows.push(("parameters", s));
    }
    if let Some(e) = summary["epochs"].as_f64() {
        rows.push(("epochs", format!("{e:.2}")));
    }
    let rec = |k: &str| -> Option<String> {
        summary[k].as_str().map(String::from).or_else(|| match k {
            "git_commit" => record.as_ref().map(|r| r.git_commit.clone()),
            "kiln_version" => record.as_ref().map(|r| r.kiln_version.clone()),
            _ => None,
        })
    };
    if let Some(v) = rec("kiln_version") {
        rows.push(("kiln", v));
    }
    if let Some(v) = rec("git_commit") {
        rows.push(("git commit", v));
    }
    if let Some(seed) = summary["seed"].as_u64().or(record.as_ref().map(|r| r.seed)) {
        rows.push(("seed", seed.to_string()));
    }
    rows.push(("run directory", run_dir.display().to_string()));
    writeln!(w, "<h2>Summary</h2><table>")?;
    for (k, v) in rows {
        writeln!(w, "<tr><th>{k}</th><td>{}</td></tr>", escape(&v))?;
    }
    writeln!(w, "</table>")?;

    // Metrics: final and best of everything evaluated, and the last training loss.
    let shown: Vec<&String> = info
        .last
        .keys()
        .filter(|k| k.starts_with("eval/") || k.starts_with("test/") || *k == "train/loss")
        .collect();
    if !shown.is_empty() {
        writeln!(
            w,
            "<h2>Metrics</h2><table><tr><th>metric</th><th>final</th><th>best</th><th>best at \
             step</th></tr>"
        )?;
        for k in shown {
            let show = |v: Option<&f64>| v.map_or("-".into(), |v| metric(k, *v, info.items));
            let strip = |s: String| s.trim_start_matches(&format!("{k} ")).to_string();
            let best_step = summary["best_step"][k.as_str()]
                .as_u64()
                .map_or("-".into(), |s| s.to_string());
            writeln!(
                w,
                "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td \
                 class=\"n\">{}</td></tr>",
                escape(k),
                strip(show(info.last.get(k))),
                strip(show(info.best.get(k))),
                best_step
            )?;
        }
        writeln!(w, "</table>")?;
    }

    // Curves.
    if !history.rows.is_empty() {
        let runs = [history];
        let opts = PlotOptions::default();
        let charts = plot::charts(&runs, &opts)?;
        writeln!(w, "<h2>Curves</h2>{}", plot::svg(&charts, &opts)?)?;
    }

    // A classifier's confusion matrices.
    let confusion: Option<Vec<Confusion>> = read_optional(&run_dir.join(CONFUSION_FILE))?;
    for c in confusion.iter().flatten() {
        confusion_table(w, c)?;
    }

    // A language model's samples.
    let samples: Option<Vec<Sample>> = read_optional(&run_dir.join(SAMPLES_FILE))?;
    if let Some(samples) = samples.filter(|s| !s.is_empty()) {
        writeln!(
            w,
            "<h2>Samples</h2><p class=\"sub\">prompts from the validation split (<b>bold</b>), \
             continued by the final model</p>"
        )?;
        for s in samples {
            writeln!(
                w,
                "<pre class=\"sample\"><b>{}</b>{}</pre>",
                escape(&s.prompt),
                escape(&s.continuation)
            )?;
        }
    }

    // Data and recipe.
    if let Some(files) = summary["data_files"]
        .as_array()
        .filter(|f| !f.is_empty())
        .cloned()
        .or_else(|| {
            record.as_ref().map(|r| {
                r.data_files
                    .iter()
                    .map(|f| serde_json::json!({"path": f.path, "sha256": f.sha256}))
                    .collect()
            })
        })
    {
        writeln!(
            w,
            "<h2>Data</h2><table><tr><th>file</th><th>sha256</th></tr>"
        )?;
        for f in files {
            writeln!(
                w,
                "<tr><td>{}</td><td><code>{}</code></td></tr>",
                escape(f["path"].as_str().unwrap_or("?")),
                escape(f["sha256"].as_str().unwrap_or("?"))
            )?;
        }
        writeln!(w, "</table>")?;
    }
    writeln!(
        w,
        "<h2>Recipe</h2><pre>{}</pre></body></html>",
        escape(&recipe_text)
    )?;
    Ok(h)
}

fn read_optional<T: serde::de::DeserializeOwned>(p: &Path) -> Result<Option<T>> {
    match std::fs::read_to_string(p) {
        Ok(t) => Ok(Some(
            serde_json::from_str(&t).with_context(|| format!("{} is corrupt", p.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
    }
}

/// Above this many classes the page lists the most frequent confusions instead of the matrix
/// (whose n² cells would make the page megabytes).
const MATRIX_CLASSES: usize = 100;
/// How many confusions that list shows.
const TOP_CONFUSIONS: usize = 25;

/// Rows are the true classes, columns the predictions; a cell's shade is its share of the row.
fn confusion_table(w: &mut String, c: &Confusion) -> Result<()> {
    let n = c.matrix.len();
    if let Some((i, row)) = c.matrix.iter().enumerate().find(|(_, r)| r.len() != n) {
        bail!(
            "{CONFUSION_FILE} is damaged: the {} matrix has {n} rows, but row {i} has {} \
             entries; `kiln eval RUN` recomputes the metrics",
            c.split,
            row.len()
        );
    }
    let label = |i: usize| c.labels.get(i).cloned().unwrap_or_else(|| i.to_string());
    let total: u64 = c.matrix.iter().flatten().sum();
    let correct: u64 = (0..n).map(|i| c.matrix[i][i]).sum();
    writeln!(
        w,
        "<h2>Confusion matrix ({} split)</h2><p class=\"sub\">rows: true class, columns: \
         predicted; {correct} of {total} correct</p>",
        escape(&c.split)
    )?;
    if n > MATRIX_CLASSES {
        let mut pairs: Vec<(u64, usize, usize)> = (c.matrix.iter().enumerate())
            .flat_map(|(i, row)| row.iter().enumerate().map(move |(j, &v)| (v, i, j)))
            .filter(|&(v, i, j)| i != j && v > 0)
            .collect();
        pairs.sort_by(|a, b| b.0.cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
        writeln!(
            w,
            "<p>{n} classes: the {TOP_CONFUSIONS} most frequent confusions</p>\
             <table class=\"cm\"><tr><th>true class</th><th>predicted</th><th>count</th></tr>"
        )?;
        for (v, i, j) in pairs.into_iter().take(TOP_CONFUSIONS) {
            writeln!(
                w,
                "<tr><td>{}</td><td>{}</td><td>{v}</td></tr>",
                escape(&label(i)),
                escape(&label(j))
            )?;
        }
        writeln!(w, "</table>")?;
        return Ok(());
    }
    writeln!(w, "<table class=\"cm\"><tr><th></th>")?;
    // Many classes: number the columns, name the rows.
    let wide = n > 12;
    for j in 0..n {
        let head = if wide { j.to_string() } else { label(j) };
        writeln!(
            w,
            "<th title=\"{}\">{}</th>",
            escape(&label(j)),
            escape(&head)
        )?;
    }
    writeln!(w, "</tr>")?;
    for (i, row) in c.matrix.iter().enumerate() {
        let sum: u64 = row.iter().sum::<u64>().max(1);
        let name = if wide {
            format!("{i} {}", label(i))
        } else {
            label(i)
        };
        write!(w, "<tr><th>{}</th>", escape(&name))?;
        for (j, &v) in row.iter().enumerate() {
            let share = v as f64 / sum as f64;
            let (r, g, b) = if i == j { (44, 160, 44) } else { (214, 39, 40) };
            let bg = match v {
                0 => String::new(),
                _ => format!(
                    " style=\"background:rgba({r},{g},{b},{:.2})\"",
                    0.1 + 0.8 * share
                ),
            };
            write!(
                w,
                "<td{bg}>{}</td>",
                if v == 0 { String::new() } else { v.to_string() }
            )?;
        }
        writeln!(w, "</tr>")?;
    }
    writeln!(w, "</table>")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn report_of_a_classifier_has_every_part() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("recipe.toml"),
            "name = \"clf\"\ntask = \"classification\"\n[trainer]\nmax_steps = 4\n",
        )
        .unwrap();
        std::fs::write(
            d.join("metrics.jsonl"),
            "{\"step\":2,\"train/loss\":1.5,\"examples\":64,\"seconds\":0.5}\n\
             {\"step\":4,\"train/loss\":1.0,\"examples\":128,\"seconds\":1.0}\n\
             {\"step\":4,\"eval/loss\":1.1,\"eval/accuracy\":0.75}\n",
        )
        .unwrap();
        std::fs::write(
            d.join("summary.json"),
            r#"{"device":"cpu","wall_seconds":3.0,"parameters":1000,"trainable_parameters":1000,
                "samples_per_second":128.0,"best_step":{"eval/loss":4},"data_files":[{"path":"a<b>.csv","sha256":"ff"}]}"#,
        )
        .unwrap();
        let cm = vec![Confusion {
            split: "eval".into(),
            labels: vec!["cat".into(), "dog".into()],
            matrix: vec![vec![3, 1], vec![0, 4]],
        }];
        std::fs::write(d.join(CONFUSION_FILE), serde_json::to_string(&cm).unwrap()).unwrap();
        let html = std::fs::read_to_string(write_report(d).unwrap()).unwrap();
        for part in [
            "<h1>",
            "finished",
            "eval/accuracy",
            "75.00%",
            "<svg",
            "Confusion matrix (eval split)",
            "7 of 8 correct",
            ">dog</th>",
            "a&lt;b&gt;.csv",
            "name = &quot;clf&quot;",
            "128 ex/s",
        ] {
            assert!(html.contains(part), "missing {part}");
        }
        assert!(!html.contains("<script"), "self-contained, no scripts");
        let plots = write_plots(d).unwrap();
        assert_eq!(
            plots.len(),
            6,
            "train/loss, eval/loss, eval/accuracy × png, svg"
        );
        let png = std::fs::read(d.join("plots/eval_accuracy.png")).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }

    #[test]
    fn confusion_of_many_classes_lists_the_top_ones_and_a_damaged_one_is_named() {
        let n = MATRIX_CLASSES + 1;
        let mut matrix = vec![vec![0u64; n]; n];
        for (i, row) in matrix.iter_mut().enumerate() {
            row[i] = 5;
        }
        matrix[7][3] = 9;
        matrix[2][50] = 4;
        let c = Confusion {
            split: "test".into(),
            labels: (0..n).map(|i| format!("class{i}")).collect(),
            matrix,
        };
        let mut html = String::new();
        confusion_table(&mut html, &c).unwrap();
        assert!(html.len() < 10_000, "{} bytes", html.len());
        let first = html
            .find("<td>class7</td><td>class3</td><td>9</td>")
            .unwrap();
        let second = html
            .find("<td>class2</td><td>class50</td><td>4</td>")
            .unwrap();
        assert!(first < second, "most frequent first");
        let damaged = Confusion {
            split: "eval".into(),
            labels: vec![],
            matrix: vec![vec![1, 2], vec![3]],
        };
        let err = confusion_table(&mut String::new(), &damaged).unwrap_err();
        assert!(err.to_string().contains("row 1 has 1 entries"), "{err}");
    }
}
