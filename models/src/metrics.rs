//! Classification metrics as the reference reports them (DFER-CLIP's code): WAR = accuracy,
//! UAR = mean per-class recall, from the confusion matrix.

use serde::Serialize;

/// A confusion matrix: `counts[true][predicted]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Confusion {
    pub counts: Vec<Vec<u64>>,
}

/// The metrics of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    /// Unweighted average recall over the classes that occur, in 0..1.
    pub uar: f64,
    /// Weighted average recall (accuracy), in 0..1.
    pub war: f64,
    /// Recall per class (`None` for a class with no sample).
    pub per_class_recall: Vec<Option<f64>>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<u64>>,
    /// Samples evaluated.
    pub samples: u64,
}

impl Confusion {
    /// An empty matrix for `classes` classes.
    pub fn new(classes: usize) -> Self {
        Self {
            counts: vec![vec![0; classes]; classes],
        }
    }

    /// Count one prediction. Out-of-range indices are ignored.
    pub fn add(&mut self, truth: usize, predicted: usize) {
        let n = self.counts.len();
        if truth < n && predicted < n {
            self.counts[truth][predicted] += 1;
        }
    }

    /// UAR, WAR and per-class recall. A class without samples has no recall and does not enter
    /// the UAR (the reference's code would produce NaN there).
    pub fn metrics(&self) -> Metrics {
        let total: u64 = self.counts.iter().flatten().sum();
        let correct: u64 = (0..self.counts.len()).map(|i| self.counts[i][i]).sum();
        let per_class_recall: Vec<Option<f64>> = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let support: u64 = row.iter().sum();
                (support > 0).then(|| row[i] as f64 / support as f64)
            })
            .collect();
        let present: Vec<f64> = per_class_recall.iter().flatten().copied().collect();
        Metrics {
            uar: if present.is_empty() {
                0.0
            } else {
                present.iter().sum::<f64>() / present.len() as f64
            },
            war: if total == 0 {
                0.0
            } else {
                correct as f64 / total as f64
            },
            per_class_recall,
            confusion: self.counts.clone(),
            samples: total,
        }
    }
}

/// Top-1 agreement and logit cosine of two models' clip logits, accumulated clip by clip.
#[derive(Debug, Clone)]
pub struct AgreementTally {
    agree: usize,
    cos_sum: f64,
    cos_min: f64,
    clips: usize,
}

impl Default for AgreementTally {
    fn default() -> Self {
        Self {
            agree: 0,
            cos_sum: 0.0,
            cos_min: f64::INFINITY,
            clips: 0,
        }
    }
}

impl AgreementTally {
    /// Add one clip's logits from the reference (`a`) and the candidate (`b`).
    pub fn add(&mut self, a: &[f32], b: &[f32]) {
        use crate::prediction::argmax;
        self.agree += (argmax(a) == argmax(b)) as usize;
        let cs = pe_clip_calibrate::quant::cosine(a, b);
        self.cos_sum += cs;
        self.cos_min = self.cos_min.min(cs);
        self.clips += 1;
    }

    pub fn clips(&self) -> usize {
        self.clips
    }

    pub fn finish(&self) -> crate::package::Agreement {
        let n = self.clips.max(1) as f64;
        crate::package::Agreement {
            clips: self.clips,
            top1_agreement: self.agree as f64 / n,
            logit_cosine_mean: self.cos_sum / n,
            logit_cosine_min: if self.clips == 0 { 0.0 } else { self.cos_min },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uar_and_war_on_an_imbalanced_set() {
        let mut c = Confusion::new(3);
        // class 0: 8 samples, 6 right; class 1: 2 samples, 1 right; class 2: none.
        for _ in 0..6 {
            c.add(0, 0);
        }
        c.add(0, 1);
        c.add(0, 2);
        c.add(1, 1);
        c.add(1, 0);
        let m = c.metrics();
        assert_eq!(m.samples, 10);
        assert!((m.war - 0.7).abs() < 1e-12);
        assert!((m.uar - (0.75 + 0.5) / 2.0).abs() < 1e-12);
        assert_eq!(m.per_class_recall, vec![Some(0.75), Some(0.5), None]);
        assert_eq!(m.confusion[0], vec![6, 1, 1]);
    }
}
