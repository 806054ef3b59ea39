//! Smoothing of class probabilities between predictions, so that one odd window does not flip
//! the reported expression: an exponential moving average, or hysteresis on the label.

use crate::error::{Error, Result};

/// `--smooth none | ema:ALPHA | hysteresis:MARGIN,HOLD`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Smoothing {
    /// Report each window as it is.
    None,
    /// `s = alpha · p + (1 - alpha) · s`; the label is the arg-max of `s`.
    Ema { alpha: f32 },
    /// The label changes only after another class beats it by `margin` (probability) in `hold`
    /// consecutive predictions; probabilities are reported as they are.
    Hysteresis { margin: f32, hold: usize },
}

impl Default for Smoothing {
    fn default() -> Self {
        Smoothing::Ema { alpha: 0.5 }
    }
}

impl std::str::FromStr for Smoothing {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::usage(format!(
                "--smooth {s}: expected none, ema:ALPHA (0 < ALPHA <= 1) or \
                 hysteresis:MARGIN,HOLD (0 <= MARGIN < 1, HOLD >= 1)"
            ))
        };
        let (kind, args) = s.split_once(':').unwrap_or((s, ""));
        match kind {
            "none" if args.is_empty() => Ok(Smoothing::None),
            "ema" => {
                let alpha: f32 = args.parse().map_err(|_| bad())?;
                if alpha > 0.0 && alpha <= 1.0 {
                    Ok(Smoothing::Ema { alpha })
                } else {
                    Err(bad())
                }
            }
            "hysteresis" => {
                let (m, h) = args.split_once(',').ok_or_else(bad)?;
                let margin: f32 = m.trim().parse().map_err(|_| bad())?;
                let hold: usize = h.trim().parse().map_err(|_| bad())?;
                if (0.0..1.0).contains(&margin) && hold >= 1 {
                    Ok(Smoothing::Hysteresis { margin, hold })
                } else {
                    Err(bad())
                }
            }
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Smoothing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Smoothing::None => write!(f, "none"),
            Smoothing::Ema { alpha } => write!(f, "ema:{alpha}"),
            Smoothing::Hysteresis { margin, hold } => write!(f, "hysteresis:{margin},{hold}"),
        }
    }
}

/// The smoother's state.
#[derive(Debug, Clone)]
pub struct Smoother {
    mode: Smoothing,
    state: Option<Vec<f32>>,
    label: Option<usize>,
    pending: Option<(usize, usize)>,
}

fn argmax(v: &[f32]) -> usize {
    pe_clip_models::prediction::argmax(v)
}

impl Smoother {
    pub fn new(mode: Smoothing) -> Self {
        Self {
            mode,
            state: None,
            label: None,
            pending: None,
        }
    }

    /// Take one prediction's probabilities; return the smoothed probabilities and the label.
    pub fn update(&mut self, probs: &[f32]) -> (Vec<f32>, usize) {
        match self.mode {
            Smoothing::None => (probs.to_vec(), argmax(probs)),
            Smoothing::Ema { alpha } => {
                let s = match self.state.take() {
                    Some(prev) => prev
                        .iter()
                        .zip(probs)
                        .map(|(s, p)| alpha * p + (1.0 - alpha) * s)
                        .collect(),
                    None => probs.to_vec(),
                };
                let label = argmax(&s);
                self.state = Some(s.clone());
                (s, label)
            }
            Smoothing::Hysteresis { margin, hold } => {
                let best = argmax(probs);
                let label = match self.label {
                    None => best,
                    Some(cur) if best == cur => {
                        self.pending = None;
                        cur
                    }
                    Some(cur) if probs[best] - probs[cur] > margin => {
                        let n = match self.pending {
                            Some((c, n)) if c == best => n + 1,
                            _ => 1,
                        };
                        if n >= hold {
                            self.pending = None;
                            best
                        } else {
                            self.pending = Some((best, n));
                            cur
                        }
                    }
                    Some(cur) => {
                        self.pending = None;
                        cur
                    }
                };
                self.label = Some(label);
                (probs.to_vec(), label)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print() {
        for s in ["none", "ema:0.3", "hysteresis:0.1,3"] {
            assert_eq!(s.parse::<Smoothing>().unwrap().to_string(), s);
        }
        for bad in [
            "ema",
            "ema:0",
            "ema:1.5",
            "hysteresis:0.1",
            "hysteresis:2,1",
            "median:3",
        ] {
            let e = bad.parse::<Smoothing>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn ema_averages_and_lags() {
        let mut s = Smoother::new(Smoothing::Ema { alpha: 0.5 });
        assert_eq!(s.update(&[0.8, 0.2]), (vec![0.8, 0.2], 0));
        let (p, l) = s.update(&[0.0, 1.0]);
        assert_eq!((p, l), (vec![0.4, 0.6], 1));
        let mut s = Smoother::new(Smoothing::Ema { alpha: 0.2 });
        s.update(&[0.9, 0.1]);
        assert_eq!(
            s.update(&[0.3, 0.7]).1,
            0,
            "one window does not flip a slow EMA"
        );
    }

    #[test]
    fn hysteresis_needs_a_margin_held_for_hold_predictions() {
        let mut s = Smoother::new(Smoothing::Hysteresis {
            margin: 0.2,
            hold: 2,
        });
        let labels: Vec<usize> = [
            [0.9, 0.1],
            [0.45, 0.55], // beats by 0.1 < margin: stays
            [0.3, 0.7],   // 1st beat
            [0.6, 0.4],   // back: pending cleared
            [0.3, 0.7],   // 1st
            [0.2, 0.8],   // 2nd: switch
            [0.55, 0.45], // not by the margin: stays 1
        ]
        .iter()
        .map(|p| s.update(p).1)
        .collect();
        assert_eq!(labels, [0, 0, 0, 0, 0, 1, 1]);
    }
}
