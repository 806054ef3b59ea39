//! Plain-text tables of class probabilities for terminals.
// Used by subcommands that need the `train` feature.
#![cfg_attr(not(feature = "train"), allow(dead_code))]

fn col_width(names: &[&str]) -> usize {
    names.iter().map(|n| n.len()).max().unwrap_or(0).max(6)
}

/// The table's header line: clip, label, then one probability column per class.
pub(crate) fn header(names: &[&str], clip_width: usize) -> String {
    let w = col_width(names);
    let cw = clip_width.max(4);
    let mut s = format!("{:<cw$} {:<w$}", "clip", "label");
    for n in names {
        s.push_str(&format!(" {n:>w$}"));
    }
    s
}

/// One table row with probabilities to three decimals.
pub(crate) fn row(
    clip: &str,
    label: &str,
    probs: &[f32],
    names: &[&str],
    clip_width: usize,
) -> String {
    let w = col_width(names);
    let cw = clip_width.max(4);
    let mut s = format!("{clip:<cw$} {label:<w$}");
    for p in probs {
        s.push_str(&format!(" {p:>w$.3}"));
    }
    s
}

/// `9399564` -> `9,399,564`.
pub(crate) fn group_digits(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let names = ["happiness", "sadness"];
        let h = header(&names, 7);
        let r = row("clips/a", "sadness", &[0.25, 0.75], &names, 7);
        assert_eq!(h.len(), r.len());
        assert!(r.ends_with("    0.250     0.750"));
    }

    #[test]
    fn digits_are_grouped() {
        assert_eq!(group_digits(9_399_564), "9,399,564");
        assert_eq!(group_digits(512), "512");
        assert_eq!(group_digits(1_000), "1,000");
    }
}
