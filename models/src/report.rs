//! Images a person would rather look at than read: the confusion matrix as SVG.

use crate::metrics::Metrics;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A labelled confusion-matrix heat map (rows: true class, columns: predicted), each cell showing
/// its count and row percentage, with UAR and WAR in the title.
pub fn confusion_svg(m: &Metrics, names: &[&str], title: &str) -> String {
    let n = m.confusion.len();
    let (cell, left, top) = (64.0, 110.0, 90.0);
    let (w, h) = (left + cell * n as f64 + 20.0, top + cell * n as f64 + 40.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"22\" font-size=\"15\">{} - UAR {:.1} %, WAR {:.1} % ({} clips)</text>\n\
         <text x=\"{left}\" y=\"{}\" font-size=\"11\">predicted</text>\n\
         <text x=\"12\" y=\"{}\" font-size=\"11\">true</text>\n",
        escape(title),
        100.0 * m.uar,
        100.0 * m.war,
        m.samples,
        top - 30.0,
        top + 12.0
    );
    for (j, name) in names.iter().enumerate().take(n) {
        let x = left + cell * (j as f64 + 0.5);
        s.push_str(&format!(
            "<text x=\"{x}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\">{}</text>\n",
            top - 8.0,
            escape(name)
        ));
    }
    for (i, row) in m.confusion.iter().enumerate() {
        let support: u64 = row.iter().sum();
        let y = top + cell * i as f64;
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" font-size=\"11\">{}</text>\n",
            left - 8.0,
            y + cell / 2.0 + 4.0,
            escape(names.get(i).copied().unwrap_or("?"))
        ));
        for (j, &count) in row.iter().enumerate() {
            let frac = if support > 0 {
                count as f64 / support as f64
            } else {
                0.0
            };
            // White to deep blue by row fraction; the diagonal in green tones.
            let (r, g, b) = if i == j {
                (
                    255.0 - 200.0 * frac,
                    255.0 - 90.0 * frac,
                    255.0 - 200.0 * frac,
                )
            } else {
                (
                    255.0 - 60.0 * frac,
                    255.0 - 200.0 * frac,
                    255.0 - 200.0 * frac,
                )
            };
            let x = left + cell * j as f64;
            let ink = if frac > 0.55 { "white" } else { "black" };
            s.push_str(&format!(
                "<rect x=\"{x}\" y=\"{y}\" width=\"{cell}\" height=\"{cell}\" fill=\"rgb({},{},{})\" stroke=\"#ccc\"/>\n\
                 <text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"{ink}\">{count}</text>\n\
                 <text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"{ink}\" font-size=\"10\">{:.0} %</text>\n",
                r as u8,
                g as u8,
                b as u8,
                x + cell / 2.0,
                y + cell / 2.0 - 2.0,
                x + cell / 2.0,
                y + cell / 2.0 + 13.0,
                100.0 * frac
            ));
        }
    }
    s.push_str("</svg>\n");
    s
}

/// Training curves: train loss (left axis) and test UAR / WAR in % (right axis) per epoch.
pub fn curves_svg(epochs: &[usize], loss: &[f64], uar: &[f64], war: &[f64], title: &str) -> String {
    let (w, h, left, right, top, bottom) = (640.0, 360.0, 60.0, 60.0, 40.0, 40.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let n = epochs.len().max(1);
    let last = *epochs.last().unwrap_or(&1) as f64;
    let first = *epochs.first().unwrap_or(&1) as f64;
    let x = |e: usize| {
        left + if n > 1 {
            (e as f64 - first) / (last - first).max(1.0) * pw
        } else {
            pw / 2.0
        }
    };
    let max_loss = loss.iter().copied().fold(1e-9, f64::max) * 1.05;
    let yl = |v: f64| top + ph * (1.0 - v / max_loss);
    let yp = |v: f64| top + ph * (1.0 - v);
    let line = |ys: Vec<f64>, color: &str| -> String {
        let pts: Vec<String> = epochs
            .iter()
            .zip(ys)
            .map(|(&e, y)| format!("{:.1},{:.1}", x(e), y))
            .collect();
        let dots: String = pts
            .iter()
            .map(|p| {
                let (cx, cy) = p.split_once(',').unwrap_or(("0", "0"));
                format!("<circle cx=\"{cx}\" cy=\"{cy}\" r=\"3\" fill=\"{color}\"/>")
            })
            .collect();
        format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>{dots}\n",
            pts.join(" ")
        )
    };
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"22\" font-size=\"15\">{}</text>\n\
         <rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#999\"/>\n",
        escape(title)
    );
    for k in 0..=4 {
        let f = f64::from(k) / 4.0;
        s.push_str(&format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/>\n\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#c0392b\">{:.2}</text>\n\
             <text x=\"{}\" y=\"{:.1}\" fill=\"#2471a3\">{:.0} %</text>\n",
            left + pw,
            left - 6.0,
            yl(f * max_loss) + 4.0,
            f * max_loss,
            left + pw + 6.0,
            yp(f) + 4.0,
            100.0 * f,
            y = yp(f)
        ));
    }
    for &e in epochs {
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{e}</text>\n",
            x(e),
            top + ph + 16.0
        ));
    }
    s.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">epoch</text>\n",
        left + pw / 2.0,
        h - 6.0
    ));
    s.push_str(&line(loss.iter().map(|&v| yl(v)).collect(), "#c0392b"));
    s.push_str(&line(uar.iter().map(|&v| yp(v)).collect(), "#2471a3"));
    s.push_str(&line(war.iter().map(|&v| yp(v)).collect(), "#76b7e5"));
    s.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" fill=\"#c0392b\">train loss</text>\n\
         <text x=\"{}\" y=\"{}\" fill=\"#2471a3\">test UAR</text>\n\
         <text x=\"{}\" y=\"{}\" fill=\"#76b7e5\">test WAR</text>\n</svg>\n",
        left + 10.0,
        top + 16.0,
        left + 110.0,
        top + 16.0,
        left + 200.0,
        top + 16.0
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Confusion;

    #[test]
    fn svg_has_labels_counts_and_scores() {
        let mut c = Confusion::new(2);
        c.add(0, 0);
        c.add(1, 0);
        c.add(1, 1);
        let svg = confusion_svg(&c.metrics(), &["happy <1>", "sad"], "test");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("happy &lt;1&gt;") && svg.contains(">sad<"));
        assert!(svg.contains("UAR 75.0 %") && svg.contains("WAR 66.7 %"));
        assert_eq!(svg.matches("<rect x=").count(), 4);
    }

    #[test]
    fn curves_have_one_point_per_epoch_per_series() {
        let svg = curves_svg(
            &[1, 2, 3],
            &[1.9, 1.5, 1.2],
            &[0.2, 0.4, 0.5],
            &[0.3, 0.45, 0.55],
            "run",
        );
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert_eq!(svg.matches("<circle").count(), 9);
        assert!(svg.contains("test UAR") && svg.contains(">run<"));
    }
}
