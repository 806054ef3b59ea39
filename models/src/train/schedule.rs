//! The reference's learning-rate schedule: timm's `CosineLRScheduler(t_initial = epochs,
//! warmup_t = 3, warmup_lr_init = 2e-5)`, stepped once per epoch.

/// Per-epoch learning rate of one parameter group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineSchedule {
    pub base_lr: f64,
    pub epochs: usize,
    pub warmup_epochs: usize,
    pub warmup_lr_init: f64,
    pub min_lr: f64,
}

impl CosineSchedule {
    /// The reference's schedule for `base_lr` over `epochs` epochs.
    pub fn reference(base_lr: f64, epochs: usize) -> Self {
        Self {
            base_lr,
            epochs,
            warmup_epochs: 3,
            warmup_lr_init: 2e-5,
            min_lr: 0.0,
        }
    }

    /// The learning rate used during epoch `epoch` (0-based): linear warm-up from
    /// `warmup_lr_init`, then `min + (base - min)·(1 + cos(π·epoch / epochs)) / 2` (timm without
    /// a warm-up prefix: the cosine counts from epoch 0).
    pub fn lr(&self, epoch: usize) -> f64 {
        if epoch < self.warmup_epochs {
            let step = (self.base_lr - self.warmup_lr_init) / self.warmup_epochs as f64;
            return self.warmup_lr_init + epoch as f64 * step;
        }
        let t = epoch as f64 / self.epochs.max(1) as f64;
        if t >= 1.0 {
            return self.min_lr;
        }
        self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = CosineSchedule::reference(2e-4, 30);
        assert!((s.lr(0) - 2e-5).abs() < 1e-12);
        assert!((s.lr(1) - (2e-5 + 6e-5)).abs() < 1e-12);
        assert!((s.lr(2) - (2e-5 + 1.2e-4)).abs() < 1e-12);
        let cos3 = 0.5 * 2e-4 * (1.0 + (std::f64::consts::PI * 3.0 / 30.0).cos());
        assert!((s.lr(3) - cos3).abs() < 1e-12);
        assert!(s.lr(15) < s.lr(10) && s.lr(29) < s.lr(15));
        assert_eq!(s.lr(30), 0.0);
    }
}
