//! Reports: the summary table, HdrHistogram `.hgrm` percentile distributions, interval logs,
//! an SVG plot of the distribution, and `summary.json`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder;
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::Histogram;
use serde::Serialize;

/// Every latency histogram records microseconds, from 1 µs to 10 minutes, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

/// Summary figures of one histogram (µs).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stats {
    /// Unit of every value.
    pub unit: &'static str,
    /// Samples.
    pub count: u64,
    /// Minimum.
    pub min: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// 99.99th percentile.
    pub p9999: u64,
    /// Maximum.
    pub max: u64,
}

/// Figures of a histogram.
pub fn stats(h: &Histogram<u64>) -> Stats {
    let q = |x| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(x)
        }
    };
    Stats {
        unit: "us",
        count: h.len(),
        min: if h.is_empty() { 0 } else { h.min() },
        mean: if h.is_empty() { 0.0 } else { h.mean() },
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
        p999: q(0.999),
        p9999: q(0.9999),
        max: if h.is_empty() { 0 } else { h.max() },
    }
}

fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

/// The stdout table: one row per histogram, with units.
pub fn table(rows: &[(&str, &Histogram<u64>)]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<22} {:>10} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}",
        "histogram", "count", "min", "p50", "p90", "p99", "p99.9", "p99.99", "max"
    );
    for (name, h) in rows {
        let s = stats(h);
        let _ = writeln!(
            o,
            "{:<22} {:>10} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}",
            name,
            s.count,
            ms(s.min),
            ms(s.p50),
            ms(s.p90),
            ms(s.p99),
            ms(s.p999),
            ms(s.p9999),
            ms(s.max)
        );
    }
    o
}

/// HdrHistogram's standard percentile distribution text, values in milliseconds.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let scale = 1000.0;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    if !h.is_empty() {
        for v in h.iter_quantiles(5) {
            let q = v.quantile_iterated_to();
            let value = v.value_iterated_to() as f64 / scale;
            let count = (q * h.len() as f64).round() as u64;
            if q < 1.0 {
                let _ = writeln!(
                    o,
                    "{value:12.3} {q:2.12} {count:10} {:14.2}",
                    1.0 / (1.0 - q)
                );
            } else {
                let _ = writeln!(o, "{value:12.3} {q:2.12} {count:10}");
            }
        }
    }
    let (mean, sd, max) = if h.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (h.mean() / scale, h.stdev() / scale, h.max() as f64 / scale)
    };
    let _ = writeln!(o, "#[Mean    = {mean:12.3}, StdDeviation   = {sd:12.3}]");
    let _ = writeln!(
        o,
        "#[Max     = {max:12.3}, Total count    = {:12}]",
        h.len()
    );
    let _ = writeln!(
        o,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        h.distinct_values()
    );
    o
}

/// Parses a `.hgrm` back into (value ms, percentile) rows; errors on malformed lines.
pub fn parse_hgrm(text: &str) -> Result<Vec<(f64, f64)>, String> {
    let mut rows = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with("Value") {
            continue;
        }
        let mut f = t.split_whitespace();
        let v: f64 = f
            .next()
            .and_then(|x| x.parse().ok())
            .ok_or(format!("bad line {line:?}"))?;
        let p: f64 = f
            .next()
            .and_then(|x| x.parse().ok())
            .ok_or(format!("bad line {line:?}"))?;
        rows.push((v, p));
    }
    Ok(rows)
}

/// An SVG line chart of the percentile distribution of each histogram (log scale of
/// 1/(1-percentile), as HdrHistogram's plotter draws it).
pub fn svg(title: &str, series: &[(&str, &Histogram<u64>)]) -> String {
    let (w, h, left, bottom, top, right) = (900.0, 500.0, 70.0, 50.0, 40.0, 160.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let xmax = 6.0f64; // up to 99.9999 %
    let ymax_us = series
        .iter()
        .filter(|(_, h)| !h.is_empty())
        .map(|(_, h)| h.max())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let x_of = |q: f64| left + pw * ((1.0 / (1.0 - q.min(0.999_999))).log10() / xmax).min(1.0);
    let y_of = |us: f64| top + ph * (1.0 - us / ymax_us);
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        o,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{left}" y="22" font-size="15">{}</text>"#,
        xml(title)
    );
    let _ = writeln!(
        o,
        r#"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
        top + ph,
        left + pw,
        top + ph
    );
    let _ = writeln!(
        o,
        r#"<line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>"#,
        top + ph
    );
    for (i, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%"]
        .iter()
        .enumerate()
    {
        let x = left + pw * (i as f64 / xmax);
        let _ = writeln!(
            o,
            r##"<line x1="{x}" y1="{top}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{label}</text>"##,
            top + ph,
            top + ph + 18.0
        );
    }
    for i in 0..=4 {
        let us = ymax_us * i as f64 / 4.0;
        let y = y_of(us);
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" text-anchor="end">{:.2} ms</text>"#,
            left - 6.0,
            y + 4.0,
            us / 1000.0
        );
    }
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#,
        left + pw / 2.0,
        h - 8.0
    );
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"];
    for (i, (name, hist)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        let mut pts = String::new();
        if !hist.is_empty() {
            for v in hist.iter_quantiles(5) {
                let q = v.quantile_iterated_to();
                let _ = write!(
                    pts,
                    "{:.1},{:.1} ",
                    x_of(q),
                    y_of(v.value_iterated_to() as f64)
                );
            }
        }
        let _ = writeln!(
            o,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>"#
        );
        let ly = top + 20.0 * i as f64 + 10.0;
        let _ = writeln!(
            o,
            r#"<rect x="{}" y="{}" width="12" height="12" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
            w - right + 10.0,
            ly - 10.0,
            w - right + 28.0,
            ly,
            xml(name)
        );
    }
    o.push_str("</svg>\n");
    o
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Writes `NAME.hgrm` and `NAME.svg` for each histogram.
pub fn write_histograms(
    dir: &Path,
    title: &str,
    hists: &[(&str, &Histogram<u64>)],
) -> std::io::Result<()> {
    for (name, h) in hists {
        std::fs::write(dir.join(format!("{name}.hgrm")), hgrm(h))?;
    }
    std::fs::write(dir.join("latency.svg"), svg(title, hists))
}

/// Writes an HdrHistogram interval log: one compressed histogram per interval.
pub fn write_interval_log(
    path: &Path,
    start: std::time::SystemTime,
    intervals: &[(f64, f64, Histogram<u64>)],
) -> std::io::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut ser = V2DeflateSerializer::new();
    let mut log = IntervalLogWriterBuilder::new()
        .add_comment("switchboard loadgen interval log; values in microseconds")
        .with_start_time(start)
        .with_base_time(start)
        .with_max_value_divisor(1000.0)
        .begin_log_with(&mut file, &mut ser)?;
    for (start_s, dur_s, h) in intervals {
        log.write_histogram(
            h,
            std::time::Duration::from_secs_f64(*start_s),
            std::time::Duration::from_secs_f64(*dur_s),
            None,
        )
        .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    }
    drop(log);
    file.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Histogram<u64> {
        let mut h = new_histogram();
        for v in 1..=10_000u64 {
            h.record(v * 10).unwrap();
        }
        h
    }

    #[test]
    fn merge_adds_counts_and_keeps_extremes() {
        let mut a = new_histogram();
        let mut b = new_histogram();
        a.record(100).unwrap();
        b.record(5).unwrap();
        b.record(900_000).unwrap();
        a.add(&b).unwrap();
        assert_eq!((a.len(), a.min(), a.max() >= 899_000), (3, 5, true));
    }

    #[test]
    fn hgrm_is_monotonic_and_parses() {
        let h = sample();
        let text = hgrm(&h);
        let rows = parse_hgrm(&text).unwrap();
        assert!(rows.len() > 20);
        assert!(rows
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        assert_eq!(rows.last().unwrap().1, 1.0);
        assert!((rows.last().unwrap().0 - 100.0).abs() < 0.2, "max 100 ms");
        assert!(text.contains("#[Max     ="));
        assert!(text.contains("Total count    =        10000"));
    }

    #[test]
    fn table_has_units_and_percentiles() {
        let h = sample();
        let t = table(&[("dm_latency", &h)]);
        assert!(t.starts_with("histogram"));
        assert!(t.contains("p99.99"));
        let row = t.lines().nth(1).unwrap();
        assert!(row.contains("dm_latency") && row.contains("10000") && row.contains(" ms"));
        let s = stats(&h);
        assert!(s.p50 >= 49_900 && s.p50 <= 50_100, "{}", s.p50);
        assert_eq!(s.unit, "us");
    }

    #[test]
    fn svg_and_interval_log() {
        let h = sample();
        let s = svg("t<1>", &[("a", &h)]);
        assert!(s.starts_with("<svg") && s.contains("polyline") && s.contains("t&lt;1&gt;"));
        let dir = std::env::temp_dir().join(format!("lg-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.hlog");
        write_interval_log(
            &p,
            std::time::SystemTime::now(),
            &[(0.0, 1.0, h.clone()), (1.0, 1.0, h)],
        )
        .unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("#[StartTime:"));
        assert_eq!(
            text.lines()
                .filter(|l| !l.starts_with('#') && !l.starts_with('"'))
                .count(),
            2
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
