//! `--plot FILE.svg`: a timeline of class probabilities over time, with the reported label (and
//! the true class, when the source knows it) as coloured bands above.

use std::fmt::Write as _;
use std::path::Path;

use super::events::Event;
use crate::error::{Error, Result};

/// Colours per class (cycled beyond seven).
const COLOURS: [&str; 7] = [
    "#e6a100", "#1f77b4", "#7f7f7f", "#d62728", "#9467bd", "#2ca02c", "#17becf",
];

fn colour(i: usize) -> &'static str {
    COLOURS[i % COLOURS.len()]
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The plot area in SVG units and the time it spans.
struct Area {
    left: f64,
    top: f64,
    pw: f64,
    ph: f64,
    t_end: f64,
}

impl Area {
    fn x(&self, t: f64) -> f64 {
        self.left + self.pw * t / self.t_end
    }

    fn y(&self, p: f64) -> f64 {
        self.top + self.ph * (1.0 - p)
    }
}

/// The SVG document for `events` (smoothed probabilities; partial windows drawn dashed).
pub fn timeline_svg(classes: &[String], events: &[Event], title: &str) -> String {
    let (w, h) = (1000.0f64, 420.0f64);
    let (left, right, top, bottom) = (50.0, 150.0, 70.0, 40.0);
    let area = Area {
        left,
        top,
        pw: w - left - right,
        ph: h - top - bottom,
        t_end: events.last().map(|e| e.t_ms).unwrap_or(1.0).max(1.0),
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="16" font-size="14">{}</text>"#,
        esc(title)
    );
    label_bands(&mut s, &area, classes, events);
    axes(&mut s, &area);
    curves(&mut s, &area, classes, events);
    s.push_str("</svg>\n");
    s
}

/// Label bands above the plot: the reported label, then the truth (each only when known).
fn label_bands(s: &mut String, area: &Area, classes: &[String], events: &[Event]) {
    let class_index = |name: &str| classes.iter().position(|c| c == name);
    type Pick<'a> = Box<dyn Fn(&Event) -> Option<usize> + 'a>;
    let bands: [(&str, f64, Pick); 2] = [
        ("label", 28.0, Box::new(|e: &Event| class_index(&e.label))),
        (
            "truth",
            46.0,
            Box::new(|e: &Event| e.truth.as_deref().and_then(class_index)),
        ),
    ];
    for (name, by, pick) in bands.iter() {
        if events.iter().all(|e| pick(e).is_none()) {
            continue;
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{name}</text>"#,
            area.left - 4.0,
            by + 11.0
        );
        let mut prev_t = 0.0;
        for e in events {
            if let Some(c) = pick(e) {
                let _ = writeln!(
                    s,
                    r#"<rect x="{:.1}" y="{by}" width="{:.1}" height="14" fill="{}"/>"#,
                    area.x(prev_t),
                    (area.x(e.t_ms) - area.x(prev_t)).max(0.5),
                    colour(c)
                );
            }
            prev_t = e.t_ms;
        }
    }
}

/// Probability grid lines, time ticks at a round step, and the frame.
fn axes(s: &mut String, area: &Area) {
    let Area {
        left, top, pw, ph, ..
    } = *area;
    for i in 0..=4 {
        let p = i as f64 / 4.0;
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{p:.2}</text>"##,
            left + pw,
            area.y(p),
            area.y(p),
            left - 4.0,
            area.y(p) + 4.0
        );
    }
    let secs = area.t_end / 1000.0;
    let step = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0]
        .into_iter()
        .find(|s| secs / s <= 12.0)
        .unwrap_or(1200.0);
    let mut t = 0.0;
    while t <= secs + 1e-9 {
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" x2="{0:.1}" y1="{top}" y2="{1:.1}" stroke="#eee"/><text x="{0:.1}" y="{2:.1}" text-anchor="middle">{t}s</text>"##,
            area.x(t * 1000.0),
            top + ph,
            top + ph + 16.0
        );
        t += step;
    }
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##
    );
}

/// One polyline per class (partial windows dashed) and the legend.
fn curves(s: &mut String, area: &Area, classes: &[String], events: &[Event]) {
    for (c, name) in classes.iter().enumerate() {
        for partial in [true, false] {
            let pts: Vec<String> = events
                .iter()
                .filter(|e| e.partial == partial)
                .filter_map(|e| {
                    e.smoothed
                        .get(c)
                        .map(|p| format!("{:.1},{:.1}", area.x(e.t_ms), area.y(*p as f64)))
                })
                .collect();
            if pts.is_empty() {
                continue;
            }
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.6"{} points="{}"/>"#,
                colour(c),
                if partial {
                    r#" stroke-dasharray="3,3""#
                } else {
                    ""
                },
                pts.join(" ")
            );
        }
        let ly = area.top + 14.0 + 18.0 * c as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{}" y="{:.1}">{}</text>"#,
            area.left + area.pw + 12.0,
            ly - 10.0,
            colour(c),
            area.left + area.pw + 30.0,
            ly,
            esc(name)
        );
    }
}

/// Check that `path` names an SVG file (before a run, so that a long run is not wasted).
pub fn check_path(path: &Path) -> Result<()> {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("svg"))
    {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "--plot {}: the timeline is written as SVG; give a file ending in .svg",
            path.display()
        )))
    }
}

/// Write the timeline to `path` (`.svg`) atomically.
pub fn write_timeline(
    path: &Path,
    classes: &[String],
    events: &[Event],
    title: &str,
) -> Result<()> {
    check_path(path)?;
    pe_clip_models::io::write_atomic(path, timeline_svg(classes, events, title).as_bytes())?;
    Ok(())
}
