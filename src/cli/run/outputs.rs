//! Where `pe-clip run` sends what it recognises: JSON lines, the demo's human lines and
//! timeline, the serial link and the GPIO alert.

use std::io::Write;

use anyhow::Context;

use super::Args;
use crate::package::Package;
use crate::runtime::events::{Event, JsonLines};
use crate::runtime::gpio::{output_pin, GpioLine, LocalAlert, NoBuzzer, PinDuty};
use crate::runtime::link::{controller_config, expression, serial_opener, Link, LinkOptions};
use crate::runtime::stats::StatsReport;
use crate::runtime::Sink;

/// One-letter symbols for the timeline, unique per class.
fn class_symbols(classes: &[String]) -> Vec<char> {
    let mut used = Vec::new();
    for name in classes {
        let c = name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_lowercase())
            .find(|c| !used.contains(c))
            .or_else(|| ('a'..='z').find(|c| !used.contains(c)))
            .unwrap_or('?');
        used.push(c);
    }
    used
}

/// The demo's text timeline: one column per full-window prediction.
pub fn timeline_text(classes: &[String], events: &[Event]) -> String {
    let sym = class_symbols(classes);
    let full: Vec<&Event> = events.iter().filter(|e| !e.partial).collect();
    let symbol = |name: &str| {
        classes
            .iter()
            .position(|c| c == name)
            .map(|i| sym[i])
            .unwrap_or('?')
    };
    let mut out = String::new();
    let span = match full.as_slice() {
        [a, b, ..] => (b.t_ms - a.t_ms) / 1000.0,
        _ => 0.0,
    };
    out.push_str(&format!(
        "timeline: one column per window ({span:.2} s apart), {} windows\n",
        full.len()
    ));
    let line: String = full.iter().map(|e| symbol(&e.label)).collect();
    out.push_str(&format!("  label  {line}\n"));
    if full.iter().any(|e| e.truth.is_some()) {
        let truth: String = full
            .iter()
            .map(|e| e.truth.as_deref().map(symbol).unwrap_or(' '))
            .collect();
        out.push_str(&format!("  truth  {truth}\n"));
        let agree = full
            .iter()
            .filter(|e| e.truth.as_deref() == Some(e.label.as_str()))
            .count();
        out.push_str(&format!(
            "  windows whose label is the class shown at their last frame: {agree} of {} \
             ({:.1} %)\n",
            full.len(),
            100.0 * agree as f64 / full.len().max(1) as f64
        ));
    }
    let legend: Vec<String> = classes
        .iter()
        .zip(&sym)
        .map(|(c, s)| format!("{s} {c}"))
        .collect();
    out.push_str(&format!("  {}\n", legend.join("  ")));
    out
}

pub(super) struct CliSink {
    pub(super) json: Option<JsonLines<Box<dyn Write>>>,
    /// Demo: human lines on label changes.
    pub(super) human: bool,
    pub(super) last_label: Option<String>,
    pub(super) keep: bool,
    pub(super) events: Vec<Event>,
    pub(super) stats: bool,
    /// `--link`: the alert controller's serial line, and the class names to index events.
    pub(super) link: Option<Link>,
    /// `--gpio`: the alert controller in-process on the board's GPIO.
    pub(super) alert: Option<LocalAlert>,
    pub(super) classes: Vec<String>,
}

impl Sink for CliSink {
    fn event(&mut self, e: &Event) -> crate::error::Result<()> {
        if let Some(j) = self.json.as_mut() {
            j.write(e)
                .map_err(|err| crate::error::Error::io("events", err))?;
        }
        if self.human && self.last_label.as_deref() != Some(e.label.as_str()) {
            println!(
                "{:>7.2} s  frame {:>5}  {:<10} {:.2}{}{}",
                e.t_ms / 1000.0,
                e.frame,
                e.label,
                e.confidence,
                e.truth
                    .as_deref()
                    .map(|t| format!("   (shown: {t})"))
                    .unwrap_or_default(),
                if e.partial { "   [partial window]" } else { "" }
            );
            self.last_label = Some(e.label.clone());
        }
        if let (false, Some(class)) = (e.partial, self.classes.iter().position(|c| *c == e.label)) {
            let msg = expression(class, e.confidence, e.t_ms);
            if let Some(link) = self.link.as_mut() {
                link.send(msg);
            }
            if let Some(alert) = &self.alert {
                alert.send(msg);
            }
        }
        if self.keep {
            self.events.push(e.clone());
        }
        Ok(())
    }

    fn stats(&mut self, r: &StatsReport) -> crate::error::Result<()> {
        if self.stats {
            eprintln!("stats: {}", r.line());
        }
        Ok(())
    }
}

/// Where events go as JSON lines: `--events FILE`, else stdout (the demo prints a human
/// summary instead).
pub(super) fn event_writer(
    args: &Args,
    demo: bool,
) -> anyhow::Result<Option<JsonLines<Box<dyn Write>>>> {
    Ok(match (&args.events, demo) {
        (Some(path), _) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(args.append_events)
                .truncate(!args.append_events)
                .open(path)
                .with_context(|| format!("cannot open the events file {}", path.display()))?;
            Some(JsonLines::new(Box::new(std::io::BufWriter::new(f))))
        }
        (None, false) => Some(JsonLines::new(Box::new(std::io::stdout()))),
        (None, true) => None,
    })
}

/// The serial link to the alert controller (`--link`), configured for the package's classes.
pub(super) fn open_link(args: &Args, package: &Package) -> anyhow::Result<Option<Link>> {
    let Some(path) = &args.link else {
        return Ok(None);
    };
    Ok(Some(Link::start(
        path,
        serial_opener(path.clone(), args.baud),
        LinkOptions {
            config: controller_config(&package.class_names())?,
            ..LinkOptions::default()
        },
    )?))
}

/// The in-process alert controller on GPIO lines (`--gpio`, `--gpio-buzzer`).
pub(super) fn open_alert(args: &Args, package: &Package) -> anyhow::Result<Option<LocalAlert>> {
    let Some(led) = &args.gpio else {
        return Ok(None);
    };
    let led = output_pin(&led.parse::<GpioLine>()?)?;
    let config = controller_config(&package.class_names())?;
    Ok(Some(match &args.gpio_buzzer {
        Some(b) => {
            let buzzer = PinDuty(output_pin(&b.parse::<GpioLine>()?)?);
            LocalAlert::start(led, buzzer, config)?
        }
        None => LocalAlert::start(led, NoBuzzer, config)?,
    }))
}

/// Stop the link and the GPIO alert, reporting what they could not deliver.
pub(super) fn close_outputs(args: &Args, sink: &mut CliSink) {
    if let Some(link) = sink.link.take() {
        let s = link.finish();
        eprintln!(
            "link {}: {} frames ({} expressions, {} heartbeats), {} events not sent, {} \
             connections, {} write errors",
            args.link.as_deref().unwrap_or_default(),
            s.frames,
            s.expressions,
            s.heartbeats,
            s.dropped,
            s.connects,
            s.write_errors
        );
    }
    if let Some(alert) = sink.alert.take() {
        let errors = alert.finish();
        if errors > 0 {
            eprintln!("alert GPIO: {errors} output writes failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_are_unique_per_class() {
        let names: Vec<String> = pe_clip_models::ClassSet::default()
            .classes
            .iter()
            .map(|c| c.name.clone())
            .collect();
        let s = class_symbols(&names);
        let mut u = s.clone();
        u.sort();
        u.dedup();
        assert_eq!(u.len(), names.len(), "{s:?}");
    }
}
