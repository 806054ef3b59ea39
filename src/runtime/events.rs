//! Expression events: one JSON object per line.

use std::io::Write;

use serde::{Deserialize, Serialize};

use super::stream::Prediction;

/// One prediction as reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Source frame index of the window's last frame.
    pub frame: u64,
    /// Its timestamp (ms since the source started).
    pub t_ms: f64,
    /// Source frame index of the window's first frame.
    pub first_frame: u64,
    /// Sampled frames in the window (`window`, fewer when partial).
    pub frames: usize,
    /// Made before the first full window.
    pub partial: bool,
    /// The window's class logits (`logit_scale · cos`), in the package's class order.
    pub logits: Vec<f32>,
    /// Their softmax.
    pub probs: Vec<f32>,
    /// Probabilities after smoothing.
    pub smoothed: Vec<f32>,
    /// The class reported (after smoothing) and its smoothed probability.
    pub label: String,
    pub confidence: f32,
    /// From the arrival of the window's last frame to this event (ms).
    pub latency_ms: f64,
    /// The class actually shown, when the source knows it (synthetic stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truth: Option<String>,
}

impl Event {
    pub fn new(
        p: &Prediction,
        smoothed: Vec<f32>,
        label: usize,
        classes: &[String],
        latency_ms: f64,
        truth: Option<usize>,
    ) -> Self {
        let name = |i: usize| classes.get(i).cloned().unwrap_or_else(|| i.to_string());
        Self {
            frame: p.frame,
            t_ms: p.t_ms,
            first_frame: p.first_frame,
            frames: p.frames,
            partial: p.partial,
            logits: p.logits.clone(),
            probs: p.probs.clone(),
            confidence: smoothed.get(label).copied().unwrap_or(0.0),
            smoothed,
            label: name(label),
            latency_ms,
            truth: truth.map(name),
        }
    }
}

/// Writes events as JSON lines, flushing each so that a reader of the pipe or file sees it at
/// once.
pub struct JsonLines<W: Write> {
    out: W,
}

impl<W: Write> JsonLines<W> {
    pub fn new(out: W) -> Self {
        Self { out }
    }

    pub fn write(&mut self, event: &Event) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, event)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}
