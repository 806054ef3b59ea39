//! Which frames of a clip the model sees (reference section 7, DFER-CLIP's sampler).

/// The number of frames PE-CLIP samples from a clip.
pub const NUM_SEGMENTS: usize = 16;

/// Test-time indices of `segments` frames out of `n`: for `n > segments`,
/// `tick = n / segments` and index `x` is `int(tick/2 + tick*x)`; otherwise all frames, then the
/// last one repeated. Empty for `n == 0`.
pub fn test_indices(n: usize, segments: usize) -> Vec<usize> {
    if n == 0 || segments == 0 {
        return Vec::new();
    }
    if n > segments {
        let tick = n as f64 / segments as f64;
        (0..segments)
            .map(|x| (tick / 2.0 + tick * x as f64) as usize)
            .collect()
    } else {
        (0..segments).map(|x| x.min(n - 1)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_clips_use_ticks() {
        // DFER-CLIP with N = 144: tick 9, indices 4, 13, ..., 139.
        let idx = test_indices(144, 16);
        assert_eq!(idx, (0..16).map(|x| 4 + 9 * x).collect::<Vec<_>>());
        // N = 70: tick 4.375.
        assert_eq!(
            test_indices(70, 16),
            [2, 6, 10, 15, 19, 24, 28, 32, 37, 41, 45, 50, 54, 59, 63, 67]
        );
        assert_eq!(test_indices(17, 16)[15], 16);
    }

    #[test]
    fn short_clips_repeat_the_last_frame() {
        assert_eq!(test_indices(16, 16), (0..16).collect::<Vec<_>>());
        let idx = test_indices(5, 16);
        assert_eq!(&idx[..5], &[0, 1, 2, 3, 4]);
        assert!(idx[5..].iter().all(|&i| i == 4));
        assert!(test_indices(0, 16).is_empty());
    }
}

/// Training-time indices of `segments` frames out of `n` (reference section 7): with
/// `avg = n / segments > 0`, index `x` is `x·avg + randint(avg)`; else, when `n > segments`,
/// `segments` sorted random indices (with repetition, as the reference); else all frames then the
/// last one repeated.
pub fn train_indices(n: usize, segments: usize, rng: &mut crate::rng::SeededRng) -> Vec<usize> {
    if n == 0 || segments == 0 {
        return Vec::new();
    }
    let avg = n / segments;
    if avg > 0 {
        (0..segments).map(|x| x * avg + rng.below(avg)).collect()
    } else if n > segments {
        let mut idx: Vec<usize> = (0..segments).map(|_| rng.below(n)).collect();
        idx.sort_unstable();
        idx
    } else {
        test_indices(n, segments)
    }
}

#[cfg(test)]
mod train_tests {
    use super::*;
    use crate::rng::SeededRng;

    #[test]
    fn train_indices_stay_in_their_segments() {
        let mut rng = SeededRng::new(1);
        for _ in 0..200 {
            let idx = train_indices(70, 16, &mut rng); // avg 4
            for (x, &i) in idx.iter().enumerate() {
                assert!((4 * x..4 * x + 4).contains(&i), "{idx:?}");
            }
        }
        let idx = train_indices(16, 16, &mut rng);
        assert_eq!(idx, (0..16).collect::<Vec<_>>());
        assert_eq!(train_indices(5, 16, &mut rng), test_indices(5, 16));
        // 24 frames: avg 1, so each segment x is frame x exactly.
        assert_eq!(train_indices(24, 16, &mut rng), (0..16).collect::<Vec<_>>());
        // Different seeds, different draws.
        let a = train_indices(200, 16, &mut SeededRng::new(1));
        let b = train_indices(200, 16, &mut SeededRng::new(2));
        assert_ne!(a, b);
    }
}
