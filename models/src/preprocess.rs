//! The one preprocessing implementation: resize a frame to the model's size and turn it into
//! normalised CHW floats. Training, export calibration and the device runtime all call this.

use image::RgbImage;
use serde::{Deserialize, Serialize};

/// CLIP's per-channel pixel mean (RGB, on the 0..1 scale).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel pixel standard deviation.
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// How pixels are normalised after `/ 255`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PixelNorm {
    /// `(x/255 - mean) / std` with CLIP's constants (what CLIP itself was trained with).
    #[default]
    Clip,
    /// `x/255` only (what the PE-CLIP reference trains and evaluates with).
    None,
}

impl std::str::FromStr for PixelNorm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "clip" => Ok(PixelNorm::Clip),
            "none" => Ok(PixelNorm::None),
            other => Err(format!(
                "unknown pixel normalisation {other:?} (expected clip or none)"
            )),
        }
    }
}

impl std::fmt::Display for PixelNorm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PixelNorm::Clip => "clip",
            PixelNorm::None => "none",
        })
    }
}

/// The preprocessing parameters of a model (written into model packages later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessSpec {
    /// Square input size in pixels (224 for ViT-B/16).
    pub image_size: usize,
    /// Pixel normalisation.
    pub pixel_norm: PixelNorm,
}

impl PreprocessSpec {
    /// Resize `frame` to the model size (bilinear, PIL-exact) and return CHW floats.
    pub fn frame_to_chw(&self, frame: &RgbImage) -> Vec<f32> {
        let size = self.image_size as u32;
        let resized;
        let img = if frame.width() == size && frame.height() == size {
            frame
        } else {
            resized = resize_bilinear(frame, size, size);
            &resized
        };
        to_chw(img, self.pixel_norm)
    }

    /// Resize `frame` to the model size (the same bilinear resize) and return its RGB bytes,
    /// row-major: the input of an exported step model, which scales and normalises inside.
    pub fn frame_to_rgb_bytes(&self, frame: &RgbImage) -> Vec<u8> {
        let size = self.image_size as u32;
        if frame.width() == size && frame.height() == size {
            frame.as_raw().clone()
        } else {
            resize_bilinear(frame, size, size).into_raw()
        }
    }
}

/// Convert an RGB image to CHW floats: `x / 255`, then the chosen normalisation.
pub fn to_chw(img: &RgbImage, norm: PixelNorm) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let plane = w * h;
    let mut out = vec![0f32; 3 * plane];
    let (mean, std) = match norm {
        PixelNorm::Clip => (CLIP_MEAN, CLIP_STD),
        PixelNorm::None => ([0.0; 3], [1.0; 3]),
    };
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            let v = f32::from(px.0[c]) / 255.0;
            out[c * plane + i] = match norm {
                PixelNorm::Clip => (v - mean[c]) / std[c],
                PixelNorm::None => v,
            };
        }
    }
    out
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: first input index, tap count, and fixed-point weights (Pillow's
/// `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear filter).
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

fn precompute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // bilinear support is 1.0
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero; negatives clamp to 0 anyway.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let t = ((x + xmin) as f64 - center + 0.5) * ss;
            let t = t.abs();
            let w = if t < 1.0 { 1.0 - t } else { 0.0 };
            *kx = w;
            ww += w;
        }
        for x in 0..n {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            weights[xx * ksize + x] = if w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs {
        bounds,
        ksize,
        weights,
    }
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Bilinear resize giving the same bytes as Pillow's `Image.resize(size, Image.BILINEAR)`
/// (anti-aliased when shrinking: the filter support grows with the scale factor). A frame that
/// already has the target size is returned unchanged.
pub fn resize_bilinear(img: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (ow, oh) = (out_w as usize, out_h as usize);
    if (in_w, in_h) == (ow, oh) {
        return img.clone();
    }
    let src = img.as_raw();
    // Horizontal pass (skipped when the width already matches, as Pillow does).
    let horizontal: std::borrow::Cow<'_, [u8]> = if in_w != ow {
        let c = precompute_coeffs(in_w, ow);
        let mut out = vec![0u8; ow * in_h * 3];
        for y in 0..in_h {
            let row = &src[y * in_w * 3..(y + 1) * in_w * 3];
            for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
                let k = &c.weights[xx * c.ksize..xx * c.ksize + n];
                for ch in 0..3 {
                    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                    for (x, &w) in k.iter().enumerate() {
                        acc += i64::from(row[(x + xmin) * 3 + ch]) * i64::from(w);
                    }
                    out[(y * ow + xx) * 3 + ch] = clip8(acc);
                }
            }
        }
        out.into()
    } else {
        src.as_slice().into()
    };
    let result = if in_h != oh {
        let c = precompute_coeffs(in_h, oh);
        let mut out = vec![0u8; ow * oh * 3];
        for (yy, &(ymin, n)) in c.bounds.iter().enumerate() {
            let k = &c.weights[yy * c.ksize..yy * c.ksize + n];
            for xx in 0..ow * 3 {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (y, &w) in k.iter().enumerate() {
                    acc += i64::from(horizontal[(y + ymin) * ow * 3 + xx]) * i64::from(w);
                }
                out[yy * ow * 3 + xx] = clip8(acc);
            }
        }
        out
    } else {
        horizontal.into_owned()
    };
    RgbImage::from_raw(out_w, out_h, result).expect("buffer has the computed size")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7 + y) as u8, (y * 5) as u8, ((x ^ y) * 3) as u8])
        })
    }

    #[test]
    fn same_size_passes_through() {
        let img = ramp(32, 32);
        assert_eq!(resize_bilinear(&img, 32, 32), img);
        let spec = PreprocessSpec {
            image_size: 32,
            pixel_norm: PixelNorm::None,
        };
        let chw = spec.frame_to_chw(&img);
        assert_eq!(chw[0], f32::from(img.get_pixel(0, 0).0[0]) / 255.0);
        assert_eq!(
            chw[32 * 32 + 1],
            f32::from(img.get_pixel(1, 0).0[1]) / 255.0
        );
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(50, 37, image::Rgb([200, 10, 128]));
        for (w, h) in [(32, 32), (224, 224), (7, 90)] {
            let r = resize_bilinear(&img, w, h);
            assert!(r.pixels().all(|p| p.0 == [200, 10, 128]), "{w}x{h}");
        }
    }

    #[test]
    fn clip_norm_uses_clip_constants() {
        let img = RgbImage::from_pixel(2, 2, image::Rgb([255, 0, 255]));
        let chw = to_chw(&img, PixelNorm::Clip);
        assert!((chw[0] - (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]).abs() < 1e-6);
        assert!((chw[4] - (0.0 - CLIP_MEAN[1]) / CLIP_STD[1]).abs() < 1e-6);
    }
}
