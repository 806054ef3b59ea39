//! Activation observers: statistics of a tensor's values over calibration data, and the
//! symmetric int8 scale each kind of observer picks from them.
//!
//! Every observer keeps the same bounded summary, a histogram of `|x|` with [`BINS`] bins over
//! `[0, range]`; when a value beyond `range` arrives the range doubles and bins merge pairwise, so
//! memory stays fixed however much data is observed and the result does not depend on batch
//! boundaries beyond bin resolution.

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::quant::{scale_for, QMAX};

/// Histogram bins.
pub const BINS: usize = 2048;

/// How a scale is chosen from the observed values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum ObserverKind {
    /// The largest magnitude seen (no clipping).
    MinMax,
    /// The given percentile of `|x|` (e.g. 99.99): rare outliers are clipped.
    Percentile { percentile: f64 },
    /// The clipping threshold that minimises the expected squared error (rounding noise inside,
    /// clipping error outside) over the observed distribution.
    Mse,
}

impl std::str::FromStr for ObserverKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "minmax" | "min-max" => Ok(Self::MinMax),
            "mse" => Ok(Self::Mse),
            other => {
                let p = other
                    .strip_prefix("percentile")
                    .map(|r| r.trim_start_matches([':', '=']))
                    .ok_or_else(|| Error::UnknownObserver(other.to_string()))?;
                let percentile: f64 = if p.is_empty() {
                    99.99
                } else {
                    p.parse()
                        .map_err(|_| Error::BadPercentile(other.to_string()))?
                };
                if !(50.0..=100.0).contains(&percentile) {
                    return Err(Error::PercentileRange(percentile));
                }
                Ok(Self::Percentile { percentile })
            }
        }
    }
}

impl std::fmt::Display for ObserverKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MinMax => f.write_str("minmax"),
            Self::Mse => f.write_str("mse"),
            Self::Percentile { percentile } => write!(f, "percentile:{percentile}"),
        }
    }
}

/// A running summary of one tensor's values.
#[derive(Debug, Clone, PartialEq)]
pub struct Observer {
    pub kind: ObserverKind,
    hist: Vec<u64>,
    /// The histogram covers `[0, range]`.
    range: f32,
    absmax: f32,
    count: u64,
}

impl Observer {
    pub fn new(kind: ObserverKind) -> Self {
        Self {
            kind,
            hist: vec![0; BINS],
            range: 0.0,
            absmax: 0.0,
            count: 0,
        }
    }

    /// Values observed so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The largest magnitude observed.
    pub fn absmax(&self) -> f32 {
        self.absmax
    }

    /// Add values (non-finite ones are ignored).
    pub fn observe(&mut self, xs: &[f32]) {
        let m = xs
            .iter()
            .filter(|v| v.is_finite())
            .fold(0f32, |m, v| m.max(v.abs()));
        if m > self.range {
            self.grow(m);
        }
        self.absmax = self.absmax.max(m);
        let per_bin = self.range / BINS as f32;
        for &v in xs.iter().filter(|v| v.is_finite()) {
            let b = if per_bin > 0.0 {
                ((v.abs() / per_bin) as usize).min(BINS - 1)
            } else {
                0
            };
            self.hist[b] += 1;
            self.count += 1;
        }
    }

    fn grow(&mut self, needed: f32) {
        if self.range == 0.0 {
            // First data: a power-of-two range just above the maximum.
            self.range = 2f32
                .powi(needed.log2().ceil() as i32)
                .max(f32::MIN_POSITIVE);
            if self.range < needed {
                self.range *= 2.0;
            }
            return;
        }
        while self.range < needed {
            let mut merged = vec![0u64; BINS];
            for (i, c) in self.hist.iter().enumerate() {
                merged[i / 2] += c;
            }
            self.hist = merged;
            self.range *= 2.0;
        }
    }

    /// The upper edge of the bin holding the `p`-th percentile of `|x|`.
    fn percentile(&self, p: f64) -> f32 {
        if self.count == 0 {
            return 0.0;
        }
        let target = (p / 100.0 * self.count as f64).ceil() as u64;
        let per_bin = self.range / BINS as f32;
        let mut seen = 0;
        for (i, c) in self.hist.iter().enumerate() {
            seen += c;
            if seen >= target.max(1) {
                return ((i + 1) as f32 * per_bin).min(self.absmax);
            }
        }
        self.absmax
    }

    /// Expected squared error of clipping at `t` with 255 levels, from the histogram.
    fn clip_error(&self, t: f32) -> f64 {
        let per_bin = self.range / BINS as f32;
        let step = f64::from(t) / f64::from(QMAX);
        let noise = step * step / 12.0;
        self.hist
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| {
                let centre = (i as f64 + 0.5) * f64::from(per_bin);
                let e = if centre > f64::from(t) {
                    (centre - f64::from(t)).powi(2)
                } else {
                    noise
                };
                e * c as f64
            })
            .sum()
    }

    /// The clipping threshold this observer picks.
    pub fn threshold(&self) -> f32 {
        match self.kind {
            ObserverKind::MinMax => self.absmax,
            ObserverKind::Percentile { percentile } => self.percentile(percentile),
            ObserverKind::Mse => {
                if self.count == 0 {
                    return 0.0;
                }
                // Candidates from 1 % to 100 % of the maximum.
                (1..=200)
                    .map(|k| self.absmax * k as f32 / 200.0)
                    .map(|t| (t, self.clip_error(t)))
                    .fold((self.absmax, f64::INFINITY), |best, c| {
                        if c.1 < best.1 {
                            c
                        } else {
                            best
                        }
                    })
                    .0
            }
        }
    }

    /// The int8 scale (zero point 0).
    pub fn scale(&self) -> f32 {
        scale_for(self.threshold())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> Vec<f32> {
        // A Gaussian-like bulk (sum of uniforms) with a few large outliers.
        let mut s = 1u64;
        let mut next = || {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let mut v: Vec<f32> = (0..100_000)
            .map(|_| (0..6).map(|_| next()).sum::<f32>())
            .collect();
        v[10] = 40.0;
        v[20] = -35.0;
        v
    }

    #[test]
    fn minmax_keeps_the_extreme() {
        let mut o = Observer::new(ObserverKind::MinMax);
        o.observe(&data());
        assert_eq!(o.threshold(), 40.0);
        assert!((o.scale() - 40.0 / 127.0).abs() < 1e-6);
        assert_eq!(o.count(), 100_000);
    }

    #[test]
    fn percentile_and_mse_clip_outliers() {
        let d = data();
        let mut p = Observer::new("percentile:99.9".parse().unwrap());
        let mut m = Observer::new(ObserverKind::Mse);
        p.observe(&d);
        m.observe(&d);
        let (tp, tm) = (p.threshold(), m.threshold());
        // The bulk reaches about ±3; two outliers must not set the percentile's range.
        assert!(tp > 1.0 && tp < 5.0, "percentile {tp}");
        // MSE weighs the two outliers' clipping error against 100,000 values' rounding noise:
        // it clips, but not down to the bulk.
        assert!(tm > 5.0 && tm < 40.0, "mse {tm}");
        // MSE's threshold has a lower expected error than min/max on this data.
        assert!(m.clip_error(tm) < m.clip_error(40.0));
    }

    #[test]
    fn batching_does_not_change_the_result() {
        let d = data();
        let mut one = Observer::new(ObserverKind::Mse);
        one.observe(&d);
        let mut many = Observer::new(ObserverKind::Mse);
        for c in d.chunks(999) {
            many.observe(c);
        }
        // The range grows by doubling from the first chunk's maximum, so bins can differ in
        // width; thresholds agree to within a bin of the final range.
        let bin = 64.0 / BINS as f32;
        assert!((one.threshold() - many.threshold()).abs() <= 2.0 * bin);
        assert_eq!(one.count(), many.count());
    }

    #[test]
    fn parses_names() {
        assert_eq!("minmax".parse::<ObserverKind>(), Ok(ObserverKind::MinMax));
        assert_eq!(
            "percentile".parse::<ObserverKind>(),
            Ok(ObserverKind::Percentile { percentile: 99.99 })
        );
        assert!("percentile:20".parse::<ObserverKind>().is_err());
        assert!("kl".parse::<ObserverKind>().is_err());
        assert_eq!(ObserverKind::Mse.to_string(), "mse");
    }
}
