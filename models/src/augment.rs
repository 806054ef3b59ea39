//! Training augmentation as the reference (sections 6 and 7): one random-resized crop, flip and
//! colour jitter (DFEW) or small rotation (FERV39K) per clip, applied identically to every frame;
//! and per batch Mixup (p < 0.4) or FMix (0.4 <= p < 0.7) or nothing.

use image::{Rgb, RgbImage};

use crate::preprocess::resize_bilinear;
use crate::rng::SeededRng;

/// The clip-level photometric/geometric jitter of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// ColorJitter(brightness = 0.5): one factor in [0.5, 1.5] per clip.
    Brightness,
    /// RandomRotation(4): one angle in [-4°, 4°] per clip.
    Rotation,
    None,
}

/// The random choices for one clip (drawn once, applied to all its frames).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipAugment {
    /// Crop box `(x, y, w, h)` in source pixels.
    pub crop: (u32, u32, u32, u32),
    pub flip: bool,
    pub brightness: f32,
    pub rotation_deg: f32,
}

/// The reference's smallest crop area (torchvision's RandomResizedCrop default).
pub const REFERENCE_MIN_CROP_AREA: f64 = 0.08;

impl ClipAugment {
    /// Draw the choices for frames of `w` x `h` pixels: GroupRandomSizedCrop (area 0.08..1,
    /// aspect 3/4..4/3, 10 tries then the whole frame), flip with p 0.5, then the jitter.
    pub fn draw(w: u32, h: u32, jitter: Jitter, rng: &mut SeededRng) -> Self {
        Self::draw_with_min_area(w, h, REFERENCE_MIN_CROP_AREA, jitter, rng)
    }

    /// [`draw`](Self::draw) with crops of at least `min_area` (0..1] of the frame.
    pub fn draw_with_min_area(
        w: u32,
        h: u32,
        min_area: f64,
        jitter: Jitter,
        rng: &mut SeededRng,
    ) -> Self {
        let area = f64::from(w) * f64::from(h);
        let mut crop = (0, 0, w, h);
        for _ in 0..10 {
            let target = area * (min_area + (1.0 - min_area) * rng.uniform());
            let aspect = 0.75 + (4.0 / 3.0 - 0.75) * rng.uniform();
            let mut cw = (target * aspect).sqrt().round() as u32;
            let mut ch = (target / aspect).sqrt().round() as u32;
            if rng.uniform() < 0.5 {
                std::mem::swap(&mut cw, &mut ch);
            }
            if cw >= 1 && ch >= 1 && cw <= w && ch <= h {
                let x = rng.below((w - cw + 1) as usize) as u32;
                let y = rng.below((h - ch + 1) as usize) as u32;
                crop = (x, y, cw, ch);
                break;
            }
        }
        let flip = rng.uniform() < 0.5;
        let (brightness, rotation_deg) = match jitter {
            Jitter::Brightness => ((0.5 + rng.uniform()) as f32, 0.0),
            Jitter::Rotation => (1.0, (rng.uniform() * 8.0 - 4.0) as f32),
            Jitter::None => (1.0, 0.0),
        };
        Self {
            crop,
            flip,
            brightness,
            rotation_deg,
        }
    }

    /// Apply to one frame and resize to `size` x `size` (bilinear).
    pub fn apply(&self, frame: &RgbImage, size: u32) -> RgbImage {
        let mut img = frame.clone();
        if self.brightness != 1.0 {
            for p in img.pixels_mut() {
                for c in 0..3 {
                    p.0[c] = (f32::from(p.0[c]) * self.brightness)
                        .round()
                        .clamp(0.0, 255.0) as u8;
                }
            }
        }
        if self.rotation_deg != 0.0 {
            img = rotate_nearest(&img, self.rotation_deg);
        }
        let (x, y, w, h) = self.crop;
        let cropped = image::imageops::crop_imm(&img, x, y, w, h).to_image();
        let mut out = resize_bilinear(&cropped, size, size);
        if self.flip {
            image::imageops::flip_horizontal_in_place(&mut out);
        }
        out
    }
}

/// Rotate about the centre by `deg` degrees (counter-clockwise), nearest neighbour, black fill.
pub fn rotate_nearest(img: &RgbImage, deg: f32) -> RgbImage {
    let (w, h) = img.dimensions();
    let (s, c) = deg.to_radians().sin_cos();
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    RgbImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
        let sx = c * dx - s * dy + cx;
        let sy = s * dx + c * dy + cy;
        if sx >= 0.0 && sy >= 0.0 && (sx as u32) < w && (sy as u32) < h {
            *img.get_pixel(sx as u32, sy as u32)
        } else {
            Rgb([0, 0, 0])
        }
    })
}

/// Gamma(shape, 1) by Marsaglia-Tsang (with the shape < 1 boost).
pub fn gamma(shape: f64, rng: &mut SeededRng) -> f64 {
    if shape < 1.0 {
        return gamma(shape + 1.0, rng) * rng.uniform().powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = f64::from(rng.normal());
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = rng.uniform();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// Beta(a, b).
pub fn beta(a: f64, b: f64, rng: &mut SeededRng) -> f64 {
    let x = gamma(a, rng);
    let y = gamma(b, rng);
    x / (x + y)
}

/// What mixes a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Mix {
    /// No mixing.
    None,
    /// `λ·x + (1-λ)·x[perm]` with λ from Beta(0.4, 0.4) clipped to 0.3..0.7.
    Mixup { lambda: f64 },
    /// FMix: `mask·x + (1-mask)·x[perm]` with a low-frequency binary mask `[size·size]` whose mean
    /// is λ (λ from Beta(1, 1), decay power 3), the same for every frame and channel.
    Fmix { lambda: f64, mask: Vec<f32> },
}

/// The reference's per-batch choice: p < 0.4 Mixup, 0.4 <= p < 0.7 FMix, else none.
pub fn draw_mix(size: u32, rng: &mut SeededRng) -> Mix {
    let p = rng.uniform();
    if p < 0.4 {
        Mix::Mixup {
            lambda: beta(0.4, 0.4, rng).clamp(0.3, 0.7),
        }
    } else if p < 0.7 {
        let lambda = beta(1.0, 1.0, rng);
        let mask = fmix_mask(size, lambda, 3.0, rng);
        let mean = mask.iter().map(|&m| f64::from(m)).sum::<f64>() / mask.len() as f64;
        Mix::Fmix { lambda: mean, mask }
    } else {
        Mix::None
    }
}

/// A binary mask of `size·size` whose top `round(λ·N)` values of a random low-frequency field
/// (Fourier amplitudes `1/f^decay`, frequencies up to 8 cycles) are 1.
pub fn fmix_mask(size: u32, lambda: f64, decay: f64, rng: &mut SeededRng) -> Vec<f32> {
    const K: i32 = 8;
    let n = size as usize;
    let mut terms = Vec::new();
    for fy in 0..=K {
        for fx in -K..=K {
            if fy == 0 && fx <= 0 {
                continue;
            }
            let f = (f64::from(fx * fx + fy * fy)).sqrt() / f64::from(size);
            let amp = 1.0 / f.max(1.0 / f64::from(size)).powf(decay);
            let (a, b) = (f64::from(rng.normal()) * amp, f64::from(rng.normal()) * amp);
            terms.push((f64::from(fx), f64::from(fy), a, b));
        }
    }
    let mut field = vec![0.0f64; n * n];
    let tau = std::f64::consts::TAU;
    for (y, row) in field.chunks_mut(n).enumerate() {
        for (x, v) in row.iter_mut().enumerate() {
            *v = terms
                .iter()
                .map(|&(fx, fy, a, b)| {
                    let ph = tau * (fx * x as f64 + fy * y as f64) / n as f64;
                    a * ph.cos() + b * ph.sin()
                })
                .sum();
        }
    }
    let ones = (lambda * (n * n) as f64).round() as usize;
    let mut order: Vec<usize> = (0..n * n).collect();
    order.sort_by(|&i, &j| field[j].total_cmp(&field[i]));
    let mut mask = vec![0.0f32; n * n];
    for &i in order.iter().take(ones) {
        mask[i] = 1.0;
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crops_fit_and_cover_the_reference_ranges() {
        let mut rng = SeededRng::new(3);
        let mut areas = Vec::new();
        for _ in 0..500 {
            let a = ClipAugment::draw(224, 224, Jitter::Brightness, &mut rng);
            let (x, y, w, h) = a.crop;
            assert!(x + w <= 224 && y + h <= 224 && w > 0 && h > 0);
            areas.push(f64::from(w * h) / (224.0 * 224.0));
            assert!((0.5..=1.5).contains(&a.brightness));
        }
        let min = areas.iter().copied().fold(1.0, f64::min);
        assert!((0.07..0.15).contains(&min), "{min}");
        let rot = ClipAugment::draw(64, 64, Jitter::Rotation, &mut rng);
        assert!(rot.rotation_deg.abs() <= 4.0 && rot.brightness == 1.0);
    }

    #[test]
    fn the_same_choice_applies_to_every_frame() {
        let mut rng = SeededRng::new(9);
        let a = ClipAugment::draw(40, 30, Jitter::Brightness, &mut rng);
        let f = RgbImage::from_fn(40, 30, |x, y| Rgb([(x * 6) as u8, (y * 8) as u8, 90]));
        assert_eq!(a.apply(&f, 32), a.apply(&f, 32));
        assert_eq!(a.apply(&f, 32).dimensions(), (32, 32));
    }

    #[test]
    fn beta_and_mix_choices_follow_the_reference() {
        let mut rng = SeededRng::new(1);
        let n = 4000;
        let mean: f64 = (0..n).map(|_| beta(0.4, 0.4, &mut rng)).sum::<f64>() / f64::from(n);
        assert!((mean - 0.5).abs() < 0.03, "{mean}");
        let (mut mixup, mut fmix, mut none) = (0, 0, 0);
        for _ in 0..600 {
            match draw_mix(16, &mut rng) {
                Mix::Mixup { lambda } => {
                    assert!((0.3..=0.7).contains(&lambda));
                    mixup += 1;
                }
                Mix::Fmix { lambda, mask } => {
                    assert_eq!(mask.len(), 256);
                    let m = mask.iter().map(|&v| f64::from(v)).sum::<f64>() / 256.0;
                    assert!((m - lambda).abs() < 1e-9);
                    fmix += 1;
                }
                Mix::None => none += 1,
            }
        }
        // Expected 240 / 180 / 180.
        assert!(
            (200..280).contains(&mixup) && (140..220).contains(&fmix) && (140..220).contains(&none)
        );
    }

    #[test]
    fn fmix_masks_are_low_frequency_blobs() {
        let mut rng = SeededRng::new(2);
        let mask = fmix_mask(32, 0.5, 3.0, &mut rng);
        assert_eq!(mask.iter().filter(|&&m| m == 1.0).count(), 512);
        // Few horizontal 0/1 changes: connected regions, not salt and pepper.
        let changes: usize = mask
            .chunks(32)
            .map(|r| r.windows(2).filter(|w| w[0] != w[1]).count())
            .sum();
        assert!(changes < 32 * 4, "{changes}");
    }
}
