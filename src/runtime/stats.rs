//! Run statistics in constant memory: a log-bucketed latency histogram (1 % resolution) for
//! p50/p95/p99, and frame counters.

use serde::Serialize;

const BUCKETS_PER_DECADE: f64 = 230.0; // 10^(1/230) ≈ 1.01
const MIN_MS: f64 = 1e-3;
const DECADES: usize = 8; // 1 µs .. 100 s

/// Latencies in milliseconds, bucketed.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
    total: u64,
    sum_ms: f64,
    max_ms: f64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            counts: vec![0; (BUCKETS_PER_DECADE as usize) * DECADES + 1],
            total: 0,
            sum_ms: 0.0,
            max_ms: 0.0,
        }
    }
}

impl LatencyHistogram {
    pub fn record(&mut self, ms: f64) {
        let ms = if ms.is_finite() { ms.max(0.0) } else { 0.0 };
        let b = if ms <= MIN_MS {
            0
        } else {
            (((ms / MIN_MS).log10() * BUCKETS_PER_DECADE) as usize).min(self.counts.len() - 1)
        };
        self.counts[b] += 1;
        self.total += 1;
        self.sum_ms += ms;
        self.max_ms = self.max_ms.max(ms);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum_ms / self.total as f64
        }
    }

    pub fn max(&self) -> f64 {
        self.max_ms
    }

    /// The `q` quantile (0..1), at the bucket's upper edge; 0 when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let upper = MIN_MS * 10f64.powf((b + 1) as f64 / BUCKETS_PER_DECADE);
                return upper.min(self.max_ms);
            }
        }
        self.max_ms
    }

    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.total,
            mean_ms: self.mean(),
            p50_ms: self.quantile(0.5),
            p95_ms: self.quantile(0.95),
            p99_ms: self.quantile(0.99),
            max_ms: self.max_ms,
        }
    }
}

/// Percentiles of a histogram.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Frame and prediction counts of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Frames read from the source (good ones).
    pub frames: u64,
    /// Frames chosen by the stride.
    pub sampled: u64,
    /// Sampled frames the model ran on.
    pub processed: u64,
    /// Sampled frames dropped because inference fell behind (live sources).
    pub dropped: u64,
    /// Unreadable frames, skipped.
    pub corrupt: u64,
    /// Predictions emitted (partial ones included).
    pub predictions: u64,
    /// Model steps (all chains).
    pub steps: u64,
}

/// Counters and latencies of a run (or of one `--stats` interval).
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    pub counts: Counts,
    /// Per processed frame: preprocessing (in the reader) + all model steps + head.
    pub frame_latency: LatencyHistogram,
    /// Per prediction: from the frame's arrival to the event being written.
    pub event_latency: LatencyHistogram,
}

/// What `--stats` and the end of a run report (JSON-friendly).
#[derive(Debug, Clone, Serialize)]
pub struct StatsReport {
    pub elapsed_s: f64,
    #[serde(flatten)]
    pub counts: Counts,
    /// Source frames per second of wall time.
    pub frames_per_s: f64,
    /// Model-processed frames per second of wall time.
    pub processed_per_s: f64,
    pub frame_latency: LatencySummary,
    pub event_latency: LatencySummary,
    /// Resident memory at the time of the report (Linux), MB.
    pub rss_mb: Option<f64>,
}

impl RunStats {
    pub fn report(&self, elapsed_s: f64) -> StatsReport {
        let per_s = |n: u64| {
            if elapsed_s > 0.0 {
                n as f64 / elapsed_s
            } else {
                0.0
            }
        };
        StatsReport {
            elapsed_s,
            counts: self.counts,
            frames_per_s: per_s(self.counts.frames),
            processed_per_s: per_s(self.counts.processed),
            frame_latency: self.frame_latency.summary(),
            event_latency: self.event_latency.summary(),
            rss_mb: rss_mb(),
        }
    }
}

impl StatsReport {
    /// One human line for stderr.
    pub fn line(&self) -> String {
        format!(
            "{:.1} s: {} frames ({:.1}/s), {} processed ({:.1}/s), {} dropped, {} corrupt, \
             {} predictions; step p50 {:.2} ms p95 {:.2} ms p99 {:.2} ms{}",
            self.elapsed_s,
            self.counts.frames,
            self.frames_per_s,
            self.counts.processed,
            self.processed_per_s,
            self.counts.dropped,
            self.counts.corrupt,
            self.counts.predictions,
            self.frame_latency.p50_ms,
            self.frame_latency.p95_ms,
            self.frame_latency.p99_ms,
            self.rss_mb
                .map(|m| format!(", RSS {m:.0} MB"))
                .unwrap_or_default()
        )
    }
}

/// Resident set size of this process in MB (Linux `/proc`), `None` elsewhere.
pub fn rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_one_percent() {
        let mut h = LatencyHistogram::default();
        for i in 1..=1000 {
            h.record(i as f64 * 0.01); // 0.01 .. 10 ms
        }
        for (q, want) in [(0.5, 5.0), (0.95, 9.5), (0.99, 9.9)] {
            let got = h.quantile(q);
            assert!((got - want).abs() / want < 0.011, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.count(), 1000);
        assert!((h.mean() - 5.005).abs() < 1e-9);
        assert_eq!(h.quantile(1.0), 10.0);
        let empty = LatencyHistogram::default();
        assert_eq!(empty.quantile(0.5), 0.0);
        let mut odd = LatencyHistogram::default();
        odd.record(f64::NAN);
        odd.record(1e9);
        assert_eq!(odd.count(), 2);
    }
}
