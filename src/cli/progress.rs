//! Whether and how long-running commands show a live progress bar.
//!
//! A bar is drawn only for a person watching: stderr is a terminal, the terminal can redraw, no
//! CI system is running the command, and `-q` was not given. Everywhere else (logs, pipes, CI)
//! the commands print one plain line per epoch instead.

// Used by subcommands that need the `train` feature.
#![cfg_attr(not(feature = "train"), allow(dead_code))]

use std::io::IsTerminal;

/// The decision, from everything it depends on (pure, so it is tested directly).
///
/// `ci` is the `CI` environment variable (set by GitHub Actions, GitLab, Buildkite, …: any value
/// but empty, `0` or `false` counts), `term` is `TERM` (`dumb` cannot redraw).
pub fn want_bar(
    stderr_is_terminal: bool,
    ci: Option<&str>,
    term: Option<&str>,
    quiet: bool,
) -> bool {
    let under_ci = ci.is_some_and(|v| {
        let v = v.trim();
        !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false"))
    });
    stderr_is_terminal && !under_ci && term != Some("dumb") && !quiet
}

/// [`want_bar`] for this process.
pub fn want_bar_here(quiet: bool) -> bool {
    want_bar(
        std::io::stderr().is_terminal(),
        std::env::var("CI").ok().as_deref(),
        std::env::var("TERM").ok().as_deref(),
        quiet,
    )
}

/// A bar over `len` steps on stderr.
pub fn bar(len: u64, prefix: String) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed} < {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix);
    bar
}

#[cfg(test)]
mod tests {
    use super::want_bar;

    #[test]
    fn a_bar_only_for_a_person_at_a_terminal() {
        assert!(want_bar(true, None, Some("xterm-256color"), false));
        assert!(want_bar(true, None, None, false));
        // Not a terminal: a log file or a pipe.
        assert!(!want_bar(false, None, Some("xterm"), false));
        // Under CI, even with a pseudo-terminal.
        assert!(!want_bar(true, Some("true"), Some("xterm"), false));
        assert!(!want_bar(true, Some("1"), None, false));
        assert!(!want_bar(true, Some("yes"), None, false));
        // CI explicitly off.
        assert!(want_bar(true, Some("false"), None, false));
        assert!(want_bar(true, Some("0"), None, false));
        assert!(want_bar(true, Some(""), None, false));
        // A terminal that cannot redraw, or -q.
        assert!(!want_bar(true, None, Some("dumb"), false));
        assert!(!want_bar(true, None, None, true));
    }
}
