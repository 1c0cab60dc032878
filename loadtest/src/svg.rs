//! Line charts as plain SVG text: axes with round ticks, a grid, one polyline per
//! series and a legend. Enough for the report's plots, with no dependency.

use std::fmt::Write as _;

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 55.0;

/// Colours of successive series.
const PALETTE: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.into(),
            points,
        }
    }
}

/// How the x axis is labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XAxis {
    /// Plain numbers.
    Linear,
    /// x is "nines" (`-log10(1 - q)`): ticks read 0%, 90%, 99%, 99.9%, ...
    Nines,
}

/// A chart.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_axis: XAxis,
    pub series: Vec<Series>,
    /// Vertical markers (x, label), e.g. phase boundaries.
    pub markers: Vec<(f64, String)>,
}

/// A round step near `span / 6`: 1, 2 or 5 times a power of ten.
fn nice_step(span: f64) -> f64 {
    if !(span.is_finite() && span > 0.0) {
        return 1.0;
    }
    let raw = span / 6.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let fraction = raw / magnitude;
    let nice = if fraction <= 1.0 {
        1.0
    } else if fraction <= 2.0 {
        2.0
    } else if fraction <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn number(value: f64) -> String {
    if value == 0.0 {
        "0".into()
    } else if value.abs() >= 100.0 || value.fract() == 0.0 {
        format!("{value:.0}")
    } else if value.abs() >= 1.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_owned()
    }
}

fn nines_label(x: f64) -> String {
    if x <= 0.0 {
        return "0%".into();
    }
    let q = 100.0 * (1.0 - 10f64.powf(-x));
    let digits = (x - 2.0).ceil().max(0.0) as usize;
    format!("{q:.digits$}%")
}

impl Chart {
    /// The chart as an SVG document.
    pub fn render(&self) -> String {
        let points = self.series.iter().flat_map(|s| s.points.iter());
        let (mut x_min, mut x_max, mut y_max) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
        for &(x, y) in points {
            if x.is_finite() && y.is_finite() {
                x_min = x_min.min(x);
                x_max = x_max.max(x);
                y_max = y_max.max(y);
            }
        }
        if !x_min.is_finite() {
            (x_min, x_max) = (0.0, 1.0);
        }
        if self.x_axis == XAxis::Nines {
            x_min = 0.0;
            x_max = x_max.ceil().max(1.0);
        }
        if x_max <= x_min {
            x_max = x_min + 1.0;
        }
        let y_step = nice_step(y_max.max(f64::MIN_POSITIVE));
        let y_top = if y_max > 0.0 {
            (y_max / y_step).ceil() * y_step
        } else {
            1.0
        };
        let plot_w = WIDTH - LEFT - RIGHT;
        let plot_h = HEIGHT - TOP - BOTTOM;
        let px = |x: f64| LEFT + (x - x_min) / (x_max - x_min) * plot_w;
        let py = |y: f64| TOP + plot_h - (y / y_top).min(1.0) * plot_h;

        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            out,
            r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
            LEFT + plot_w / 2.0,
            escape(&self.title)
        );
        // Horizontal grid and y ticks.
        let mut y = 0.0;
        while y <= y_top + y_step / 2.0 {
            let _ = writeln!(
                out,
                r##"<line x1="{LEFT}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#ddd"/><text x="{2:.1}" y="{3:.1}" text-anchor="end">{4}</text>"##,
                py(y),
                LEFT + plot_w,
                LEFT - 6.0,
                py(y) + 4.0,
                number(y)
            );
            y += y_step;
        }
        // Vertical grid and x ticks.
        let x_ticks: Vec<f64> = match self.x_axis {
            XAxis::Nines => (0..=x_max as usize).map(|n| n as f64).collect(),
            XAxis::Linear => {
                let step = nice_step(x_max - x_min);
                let mut ticks = Vec::new();
                let mut x = (x_min / step).ceil() * step;
                while x <= x_max + step * 1e-9 {
                    ticks.push(x);
                    x += step;
                }
                ticks
            }
        };
        for x in x_ticks {
            let label = match self.x_axis {
                XAxis::Nines => nines_label(x),
                XAxis::Linear => number(x),
            };
            let _ = writeln!(
                out,
                r##"<line x1="{0:.1}" y1="{TOP}" x2="{0:.1}" y2="{1:.1}" stroke="#eee"/><text x="{0:.1}" y="{2:.1}" text-anchor="middle">{3}</text>"##,
                px(x),
                TOP + plot_h,
                TOP + plot_h + 18.0,
                label
            );
        }
        for (x, label) in &self.markers {
            if *x >= x_min && *x <= x_max {
                let _ = writeln!(
                    out,
                    r##"<line x1="{0:.1}" y1="{TOP}" x2="{0:.1}" y2="{1:.1}" stroke="#999" stroke-dasharray="4 3"/><text x="{2:.1}" y="{3:.1}" fill="#666" font-size="10">{4}</text>"##,
                    px(*x),
                    TOP + plot_h,
                    px(*x) + 3.0,
                    TOP + 10.0,
                    escape(label)
                );
            }
        }
        // Axes and labels.
        let _ = writeln!(
            out,
            r#"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>"#
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + plot_w / 2.0,
            HEIGHT - 12.0,
            escape(&self.x_label)
        );
        let _ = writeln!(
            out,
            r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            TOP + plot_h / 2.0,
            escape(&self.y_label)
        );
        for (i, series) in self.series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let path: Vec<String> = series
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            if !path.is_empty() {
                let _ = writeln!(
                    out,
                    r#"<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{}"/>"#,
                    path.join(" ")
                );
            }
            let ly = TOP + 14.0 + i as f64 * 18.0;
            let lx = LEFT + plot_w + 14.0;
            let _ = writeln!(
                out,
                r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
                lx + 22.0,
                lx + 28.0,
                ly + 4.0,
                escape(&series.name)
            );
        }
        out.push_str("</svg>\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_round() {
        assert_eq!(nice_step(60.0), 10.0);
        assert_eq!(nice_step(7.0), 2.0);
        assert_eq!(nice_step(0.3), 0.05);
        assert_eq!(nice_step(0.0), 1.0);
    }

    #[test]
    fn nines_read_as_percentiles() {
        assert_eq!(nines_label(0.0), "0%");
        assert_eq!(nines_label(1.0), "90%");
        assert_eq!(nines_label(2.0), "99%");
        assert_eq!(nines_label(3.0), "99.9%");
        assert_eq!(nines_label(4.0), "99.99%");
    }

    #[test]
    fn a_chart_has_one_polyline_per_series_and_escapes_text() {
        let chart = Chart {
            title: "latency <ms> & more".into(),
            x_label: "time (s)".into(),
            y_label: "ms".into(),
            x_axis: XAxis::Linear,
            series: vec![
                Series::new("p50", vec![(0.0, 1.0), (1.0, 2.0), (2.0, 1.5)]),
                Series::new("p99", vec![(0.0, 5.0), (1.0, 9.0), (2.0, f64::NAN)]),
                Series::new("empty", vec![]),
            ],
            markers: vec![(1.0, "measure".into())],
        };
        let svg = chart.render();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("latency &lt;ms&gt; &amp; more"));
        assert!(svg.contains(">measure<"));
        assert!(!svg.contains("NaN"));
    }
}
