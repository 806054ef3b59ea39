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
}
