//! The face region of a frame before it is resized to the model size: the whole frame, a centre
//! square, a fixed rectangle, or the face found by the SeetaFace detector (`rustface`), held and
//! smoothed between detections and falling back to the centre square when no face is seen.
//! Resizing is the package's one preprocessing ([`PreprocessSpec::frame_to_rgb_bytes`]), the same
//! code training and export use.

use image::RgbImage;
use pe_clip_models::PreprocessSpec;

use crate::error::{Error, Result};

/// The SeetaFace frontal model (BSD-2, see `models/face-detector/`).
const SEETA_MODEL: &[u8] = include_bytes!("../../models/face-detector/seeta_fd_frontal_v1.0.bin");

/// A rectangle in frame pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    pub x: f32,
    pub y: f32,
    pub w: f32,
    pub h: f32,
}

impl Rect {
    /// The rectangle clamped into a `width` x `height` frame (at least one pixel).
    pub fn clamp_to(&self, width: u32, height: u32) -> (u32, u32, u32, u32) {
        let (fw, fh) = (width as f32, height as f32);
        let x0 = self.x.clamp(0.0, fw - 1.0);
        let y0 = self.y.clamp(0.0, fh - 1.0);
        let x1 = (self.x + self.w).clamp(x0 + 1.0, fw);
        let y1 = (self.y + self.h).clamp(y0 + 1.0, fh);
        let (x0, y0) = (x0.round() as u32, y0.round() as u32);
        let (x1, y1) = (x1.round() as u32, y1.round() as u32);
        (x0, y0, (x1 - x0).max(1), (y1 - y0).max(1))
    }

    fn centre_square(width: u32, height: u32) -> Self {
        let s = width.min(height) as f32;
        Rect {
            x: (width as f32 - s) / 2.0,
            y: (height as f32 - s) / 2.0,
            w: s,
            h: s,
        }
    }
}

/// How the region is chosen (`--roi`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RoiPolicy {
    /// The whole frame, resized to the model's square (what training clips are: face crops).
    Full,
    /// The largest centred square.
    Centre,
    /// A fixed rectangle in frame pixels.
    Fixed(Rect),
    /// The detected face, expanded to a square like DFEW's crops; detection every k frames.
    Auto,
}

impl std::str::FromStr for RoiPolicy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "full" => RoiPolicy::Full,
            "centre" | "center" => RoiPolicy::Centre,
            "auto" => RoiPolicy::Auto,
            _ => {
                let v: Vec<f32> = s
                    .split(',')
                    .map(|p| p.trim().parse::<f32>())
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|_| bad_roi(s))?;
                match v[..] {
                    [x, y, w, h] if x >= 0.0 && y >= 0.0 && w >= 1.0 && h >= 1.0 => {
                        RoiPolicy::Fixed(Rect { x, y, w, h })
                    }
                    _ => return Err(bad_roi(s)),
                }
            }
        })
    }
}

fn bad_roi(s: &str) -> Error {
    Error::usage(format!(
        "--roi {s}: expected full, centre, auto or x,y,w,h (pixels, w and h at least 1)"
    ))
}

/// Finds faces in a grey frame: `(rect, score)` of each.
pub trait FaceDetect {
    fn detect(&mut self, gray: &[u8], width: u32, height: u32) -> Vec<(Rect, f64)>;
}

/// SeetaFace through `rustface`, with the model embedded in the binary.
pub struct SeetaDetector {
    inner: Box<dyn rustface::Detector>,
}

impl SeetaDetector {
    /// Minimum face side in pixels; `score` threshold (about 5 drops false boxes).
    pub fn new(min_face: u32, score: f64) -> Result<Self> {
        let model = rustface::read_model(SEETA_MODEL)
            .map_err(|e| Error::device("embedded face-detector model", e))?;
        let mut inner = rustface::create_detector_with_model(model);
        inner.set_min_face_size(min_face.max(20));
        inner.set_score_thresh(score);
        inner.set_pyramid_scale_factor(0.8);
        inner.set_slide_window_step(4, 4);
        Ok(Self { inner })
    }
}

impl FaceDetect for SeetaDetector {
    fn detect(&mut self, gray: &[u8], width: u32, height: u32) -> Vec<(Rect, f64)> {
        let image = rustface::ImageData::new(gray, width, height);
        self.inner
            .detect(&image)
            .into_iter()
            .map(|f| {
                let b = f.bbox();
                (
                    Rect {
                        x: b.x() as f32,
                        y: b.y() as f32,
                        w: b.width() as f32,
                        h: b.height() as f32,
                    },
                    f.score(),
                )
            })
            .collect()
    }
}

/// Tuning of `--roi auto`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoRoiOptions {
    /// Run the detector on every k-th frame that reaches preprocessing; hold the box between.
    pub detect_every: usize,
    /// Weight of a new detection in the held box (1: jump to it).
    pub smoothing: f32,
    /// The square crop's side relative to the detected box's larger side.
    pub expand: f32,
    /// Detections in a row without a face before falling back to the centre square.
    pub misses_before_fallback: usize,
}

impl Default for AutoRoiOptions {
    fn default() -> Self {
        Self {
            detect_every: 5,
            smoothing: 0.5,
            expand: 1.4,
            misses_before_fallback: 3,
        }
    }
}

/// Chooses each frame's region under a policy, keeping the face track for `Auto`.
pub struct RoiTracker {
    policy: RoiPolicy,
    opts: AutoRoiOptions,
    detector: Option<Box<dyn FaceDetect>>,
    held: Option<Rect>,
    frames: usize,
    misses: usize,
    /// Detections run and detections that found a face (for the summary).
    pub detections: usize,
    pub found: usize,
}

impl RoiTracker {
    /// A tracker for `policy`; `Auto` loads the embedded SeetaFace model.
    pub fn new(policy: RoiPolicy, opts: AutoRoiOptions) -> Result<Self> {
        let detector: Option<Box<dyn FaceDetect>> = match policy {
            RoiPolicy::Auto => Some(Box::new(SeetaDetector::new(40, 5.0)?)),
            _ => None,
        };
        Ok(Self::with_detector(policy, opts, detector))
    }

    /// A tracker with a given detector (tests inject one).
    pub fn with_detector(
        policy: RoiPolicy,
        opts: AutoRoiOptions,
        detector: Option<Box<dyn FaceDetect>>,
    ) -> Self {
        Self {
            policy,
            opts,
            detector,
            held: None,
            frames: 0,
            misses: 0,
            detections: 0,
            found: 0,
        }
    }

    /// The region of `frame`.
    pub fn region(&mut self, frame: &RgbImage) -> Rect {
        let (w, h) = frame.dimensions();
        match self.policy {
            RoiPolicy::Full => Rect {
                x: 0.0,
                y: 0.0,
                w: w as f32,
                h: h as f32,
            },
            RoiPolicy::Centre => Rect::centre_square(w, h),
            RoiPolicy::Fixed(r) => r,
            RoiPolicy::Auto => self.auto_region(frame),
        }
    }

    fn auto_region(&mut self, frame: &RgbImage) -> Rect {
        let (w, h) = frame.dimensions();
        let due = self.frames.is_multiple_of(self.opts.detect_every.max(1));
        self.frames += 1;
        if due {
            if let Some(det) = self.detector.as_mut() {
                let gray = image::imageops::grayscale(frame);
                self.detections += 1;
                let best = det
                    .detect(gray.as_raw(), w, h)
                    .into_iter()
                    .max_by(|a, b| (a.0.w * a.0.h).total_cmp(&(b.0.w * b.0.h)));
                match best {
                    Some((face, _)) => {
                        self.found += 1;
                        self.misses = 0;
                        let side = face.w.max(face.h) * self.opts.expand;
                        let target = Rect {
                            x: face.x + face.w / 2.0 - side / 2.0,
                            y: face.y + face.h / 2.0 - side / 2.0,
                            w: side,
                            h: side,
                        };
                        let k = self.opts.smoothing.clamp(0.0, 1.0);
                        self.held = Some(match self.held {
                            Some(p) => Rect {
                                x: p.x + k * (target.x - p.x),
                                y: p.y + k * (target.y - p.y),
                                w: p.w + k * (target.w - p.w),
                                h: p.h + k * (target.h - p.h),
                            },
                            None => target,
                        });
                    }
                    None => {
                        self.misses += 1;
                        if self.misses >= self.opts.misses_before_fallback {
                            self.held = None;
                        }
                    }
                }
            }
        }
        self.held.unwrap_or_else(|| Rect::centre_square(w, h))
    }
}

/// Crop `frame` to `region` and resize it to the model input (RGB bytes, row-major).
pub fn model_input(spec: &PreprocessSpec, frame: &RgbImage, region: Rect) -> Vec<u8> {
    let (w, h) = frame.dimensions();
    let (x, y, cw, ch) = region.clamp_to(w, h);
    if (x, y, cw, ch) == (0, 0, w, h) {
        spec.frame_to_rgb_bytes(frame)
    } else {
        let crop = image::imageops::crop_imm(frame, x, y, cw, ch).to_image();
        spec.frame_to_rgb_bytes(&crop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pe_clip_models::PixelNorm;

    #[test]
    fn policies_parse_and_bad_ones_are_named() {
        assert_eq!("full".parse::<RoiPolicy>().unwrap(), RoiPolicy::Full);
        assert_eq!("auto".parse::<RoiPolicy>().unwrap(), RoiPolicy::Auto);
        assert_eq!(
            "10,20,30,40".parse::<RoiPolicy>().unwrap(),
            RoiPolicy::Fixed(Rect {
                x: 10.0,
                y: 20.0,
                w: 30.0,
                h: 40.0
            })
        );
        for bad in ["10,20,30", "a,b,c,d", "0,0,0,5", "-1,0,5,5"] {
            let e = bad.parse::<RoiPolicy>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn full_region_is_the_same_preprocessing_as_training() {
        let spec = PreprocessSpec {
            image_size: 16,
            pixel_norm: PixelNorm::None,
        };
        let frame = RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut t = RoiTracker::new(RoiPolicy::Full, AutoRoiOptions::default()).unwrap();
        let r = t.region(&frame);
        assert_eq!(
            model_input(&spec, &frame, r),
            spec.frame_to_rgb_bytes(&frame)
        );
        let mut c = RoiTracker::new(RoiPolicy::Centre, AutoRoiOptions::default()).unwrap();
        assert_eq!(c.region(&frame).clamp_to(40, 30), (5, 0, 30, 30));
        // A rectangle reaching outside the frame is clamped, not a panic.
        let far = Rect {
            x: 35.0,
            y: 25.0,
            w: 100.0,
            h: 100.0,
        };
        assert_eq!(model_input(&spec, &frame, far).len(), 16 * 16 * 3);
    }

    struct Scripted(Vec<Option<Rect>>, usize);

    impl FaceDetect for Scripted {
        fn detect(&mut self, _: &[u8], _: u32, _: u32) -> Vec<(Rect, f64)> {
            let r = self.0.get(self.1).copied().flatten();
            self.1 += 1;
            r.into_iter().map(|r| (r, 10.0)).collect()
        }
    }

    #[test]
    fn auto_region_holds_smooths_and_falls_back() {
        let face = |x: f32| Rect {
            x,
            y: 10.0,
            w: 20.0,
            h: 20.0,
        };
        let script = vec![Some(face(10.0)), Some(face(30.0)), None, None, None];
        let opts = AutoRoiOptions {
            detect_every: 2,
            smoothing: 0.5,
            expand: 1.0,
            misses_before_fallback: 2,
        };
        let mut t =
            RoiTracker::with_detector(RoiPolicy::Auto, opts, Some(Box::new(Scripted(script, 0))));
        let frame = RgbImage::new(100, 60);
        let xs: Vec<f32> = (0..10).map(|_| t.region(&frame).x).collect();
        // Frame 0 detects at 10; frame 1 holds; frame 2 moves half-way to 30; two misses later
        // (frames 4 and 6) the centre square (x = 20) takes over.
        assert_eq!(
            xs,
            [10.0, 10.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 20.0]
        );
        assert_eq!(t.region(&frame).w, 60.0);
        assert_eq!((t.detections, t.found), (6, 2));
    }

    /// The real detector finds a synthetic face placed off-centre in a larger frame, and the held
    /// box is centred on it (not the centre-square fallback).
    #[test]
    fn auto_region_follows_a_synthetic_face() {
        use pe_clip_models::rng::SeededRng;
        use pe_clip_models::synth::{ClipSpec, Identity, SynthOptions};
        let mut rng = SeededRng::new(4);
        let spec = ClipSpec::random(
            Identity::random(&mut rng),
            2,
            &SynthOptions::default(),
            &mut rng,
        );
        let mut t = RoiTracker::new(RoiPolicy::Auto, AutoRoiOptions::default()).unwrap();
        let (fx, fy, side) = (300u32, 60u32, 192u32);
        let mut last = None;
        for i in 0..20 {
            let mut frame = RgbImage::from_pixel(640, 360, image::Rgb([90, 90, 90]));
            image::imageops::overlay(&mut frame, &spec.render(i, side), fx as i64, fy as i64);
            last = Some(t.region(&frame));
        }
        let r = last.unwrap();
        assert!(t.found >= 1, "no face found in {} detections", t.detections);
        let (cx, cy) = (r.x + r.w / 2.0, r.y + r.h / 2.0);
        let (want_x, want_y) = ((fx + side / 2) as f32, (fy + side / 2) as f32);
        assert!(
            (cx - want_x).abs() < 40.0 && (cy - want_y).abs() < 40.0,
            "box {r:?} centre ({cx}, {cy}), face at ({want_x}, {want_y})"
        );
    }

    #[test]
    fn embedded_face_model_loads_and_finds_nothing_in_a_blank_frame() {
        let mut d = SeetaDetector::new(40, 5.0).unwrap();
        let gray = vec![128u8; 160 * 120];
        assert!(d.detect(&gray, 160, 120).is_empty());
    }
}
