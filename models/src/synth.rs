//! Procedural face clips for the 7 classes, driven by the action units (AUs) of the class texts.
//!
//! A face is drawn with anti-aliased signed-distance shapes whose geometry follows AU intensities
//! over time: inner/outer brow raise (AU1/AU2), brow lower (AU4), upper-lid raise (AU5), cheek
//! raise (AU6), lid tighten (AU7), nose wrinkle (AU9), lip-corner pull (AU12) and depress (AU15),
//! lower-lip depress (AU16), lip stretch (AU20), lip tighten (AU23) and jaw drop (AU26). The
//! label's expression has an onset, an apex and an offset. Identities vary (face shape, skin tone,
//! feature geometry) and each has a resting baseline; pose, scale, lighting and noise vary; an
//! optional near-infrared grayscale look; distractors (blinks, speech, a brief expression that is
//! not the label) make temporal modelling matter. Everything is deterministic for a seed.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use rayon::prelude::*;
use serde::Serialize;

use crate::dataset::Split;
use crate::error::{Error, Result};
use crate::rng::SeededRng;

/// The action units pe-clip draws, in the order of [`AuState`]'s array.
pub const AUS: [&str; 12] = [
    "AU1 inner brow raiser",
    "AU2 outer brow raiser",
    "AU4 brow lowerer",
    "AU5 upper lid raiser",
    "AU6 cheek raiser",
    "AU7 lid tightener",
    "AU9 nose wrinkler",
    "AU12 lip corner puller",
    "AU15 lip corner depressor",
    "AU16 lower lip depressor",
    "AU20 lip stretcher",
    "AU26 jaw drop",
];
const AU1: usize = 0;
const AU2: usize = 1;
const AU4: usize = 2;
const AU5: usize = 3;
const AU6: usize = 4;
const AU7: usize = 5;
const AU9: usize = 6;
const AU12: usize = 7;
const AU15: usize = 8;
const AU16: usize = 9;
const AU20: usize = 10;
const AU26: usize = 11;
/// AU23 (lip tightener) is drawn as a negative lip stretch/opening on the lips' thickness.
const AU23_LIPS: usize = 12;

/// Intensities (0..1) of the drawn AUs plus AU23, and the blink and speech openings.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AuState {
    pub au: [f32; 13],
    pub blink: f32,
    pub speech: f32,
}

/// The AUs of each class, in pe-clip's class order (from the class descriptors).
pub fn class_aus(label: usize) -> &'static [usize] {
    match label {
        0 => &[AU6, AU12],                           // happiness
        1 => &[AU1, AU4, AU15],                      // sadness
        2 => &[],                                    // neutral
        3 => &[AU4, AU5, AU7, AU23_LIPS],            // anger
        4 => &[AU1, AU2, AU5, AU26],                 // surprise
        5 => &[AU9, AU15, AU16],                     // disgust
        _ => &[AU1, AU2, AU4, AU5, AU7, AU20, AU26], // fear
    }
}

/// The FACS names of the 13 AUs of [`AuState`], as the class descriptors spell them.
pub const AU_NAMES: [&str; 13] = [
    "Inner Brow Raiser",
    "Outer Brow Raiser",
    "Brow Lowerer",
    "Upper Lid Raiser",
    "Cheek Raiser",
    "Lid Tightener",
    "Nose Wrinkler",
    "Lip Corner Puller",
    "Lip Corner Depressor",
    "Lower Lip Depressor",
    "Lip Stretcher",
    "Jaw Drop",
    "Lip Tightener",
];

/// A frame-level caption of what the face shows: the AUs at or above 0.25 in FACS order, those
/// below 0.55 marked "Slight"; a face with none gets a resting-face caption. Blinks and speech are
/// not described. This is the text side of `pe-clip pretrain` (a stand-in for CLIP's web captions).
pub fn caption(s: &AuState) -> String {
    let parts: Vec<String> =
        s.au.iter()
            .zip(AU_NAMES)
            .filter(|(&a, _)| a >= 0.25)
            .map(|(&a, name)| {
                if a < 0.55 {
                    format!("Slight {name}")
                } else {
                    name.to_string()
                }
            })
            .collect();
    if parts.is_empty() {
        "Relaxed Muscles, Even Eyebrows, Closed Lips, Calm Eyes, Smooth Forehead.".to_string()
    } else {
        format!("{}.", parts.join(", "))
    }
}

/// One random frame of a random clip of a new identity (class, clip and time uniform), with its
/// AU state: the image side of `pe-clip pretrain`.
pub fn random_frame(rng: &mut SeededRng, opts: &SynthOptions, size: u32) -> (RgbImage, AuState) {
    let identity = Identity::random(rng);
    let label = rng.below(SYNTH_CLASSES);
    let spec = ClipSpec::random(identity, label, opts, rng);
    let t = rng.below(spec.frames);
    (spec.render(t, size), spec.aus_at(t))
}

/// Number of classes the generator knows.
pub const SYNTH_CLASSES: usize = 7;

/// One person: geometry, colours and resting AU baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub face_w: f32,
    pub face_h: f32,
    pub skin: [f32; 3],
    pub hair: [f32; 3],
    pub eye_dx: f32,
    pub eye_y: f32,
    pub eye_w: f32,
    pub eye_h: f32,
    pub iris: [f32; 3],
    pub brow_y: f32,
    pub brow_thick: f32,
    pub nose_len: f32,
    pub mouth_y: f32,
    pub mouth_w: f32,
    pub lip: f32,
    /// Resting AU offsets (e.g. a slightly lowered brow), added to every frame.
    pub baseline: [f32; 13],
}

fn range(rng: &mut SeededRng, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.uniform() as f32
}

impl Identity {
    /// A random identity.
    pub fn random(rng: &mut SeededRng) -> Self {
        let tone = range(rng, 0.25, 0.95);
        let skin = [
            (0.35 + 0.6 * tone).min(1.0),
            (0.22 + 0.55 * tone).min(1.0),
            (0.15 + 0.45 * tone).min(1.0),
        ];
        let h = range(rng, 0.02, 0.35);
        let hair = [h, h * range(rng, 0.6, 0.9), h * range(rng, 0.4, 0.8)];
        let mut baseline = [0.0; 13];
        for b in baseline.iter_mut() {
            if rng.uniform() < 0.25 {
                *b = range(rng, 0.0, 0.2);
            }
        }
        Self {
            face_w: range(rng, 0.78, 0.95),
            face_h: range(rng, 0.98, 1.15),
            skin,
            hair,
            eye_dx: range(rng, 0.30, 0.40),
            eye_y: range(rng, -0.22, -0.12),
            eye_w: range(rng, 0.13, 0.17),
            eye_h: range(rng, 0.055, 0.075),
            iris: [
                range(rng, 0.1, 0.4),
                range(rng, 0.1, 0.35),
                range(rng, 0.05, 0.3),
            ],
            brow_y: range(rng, -0.40, -0.34),
            brow_thick: range(rng, 0.025, 0.045),
            nose_len: range(rng, 0.22, 0.32),
            mouth_y: range(rng, 0.44, 0.52),
            mouth_w: range(rng, 0.22, 0.30),
            lip: range(rng, 0.025, 0.04),
            baseline,
        }
    }
}

/// An AU activation over time: onset, apex and offset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Event {
    pub start: f32,
    pub onset: f32,
    pub apex: f32,
    pub offset: f32,
    pub peak: f32,
    /// The class whose AUs it activates.
    pub class: usize,
}

impl Event {
    /// Intensity at frame `t`.
    pub fn at(&self, t: f32) -> f32 {
        let x = t - self.start;
        let ramp = |v: f32| v * v * (3.0 - 2.0 * v); // smoothstep
        let w = if x < 0.0 {
            0.0
        } else if x < self.onset {
            ramp(x / self.onset)
        } else if x < self.onset + self.apex {
            1.0
        } else if x < self.onset + self.apex + self.offset {
            1.0 - ramp((x - self.onset - self.apex) / self.offset)
        } else {
            0.0
        };
        w * self.peak
    }
}

/// Everything that decides a clip's frames.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipSpec {
    pub identity: Identity,
    pub label: usize,
    pub frames: usize,
    pub events: Vec<Event>,
    pub blinks: Vec<f32>,
    /// Speech: (start, end, rate) in frames.
    pub speech: Option<(f32, f32, f32)>,
    /// Pose at the start and end: roll (rad), yaw (-1..1), scale, x and y shift (in face radii).
    pub pose: [[f32; 5]; 2],
    /// Lighting: direction angle, strength, brightness.
    pub light: [f32; 3],
    pub background: [f32; 3],
    pub noise: f32,
    pub infrared: bool,
    pub seed: u64,
}

/// Options of the generator.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthOptions {
    pub min_frames: usize,
    pub max_frames: usize,
    pub infrared: bool,
    pub distractors: bool,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            min_frames: 24,
            max_frames: 48,
            infrared: false,
            distractors: true,
        }
    }
}

impl ClipSpec {
    /// A random clip of `label` for `identity`.
    pub fn random(
        identity: Identity,
        label: usize,
        opts: &SynthOptions,
        rng: &mut SeededRng,
    ) -> Self {
        let frames = opts.min_frames + rng.below(opts.max_frames - opts.min_frames + 1);
        let n = frames as f32;
        let mut events = Vec::new();
        if label != 2 {
            let onset = range(rng, 0.12, 0.25) * n;
            let apex = range(rng, 0.25, 0.45) * n;
            let offset = range(rng, 0.1, 0.2) * n;
            let start = range(rng, 0.0, (n - onset - apex - offset).max(0.0) * 0.8);
            events.push(Event {
                start,
                onset,
                apex,
                offset,
                peak: range(rng, 0.6, 1.0),
                class: label,
            });
        }
        let mut blinks = Vec::new();
        let mut speech = None;
        if opts.distractors {
            let mut t = range(rng, 0.0, 20.0);
            while t < n {
                blinks.push(t);
                t += range(rng, 18.0, 45.0);
            }
            if rng.uniform() < 0.3 {
                let s = range(rng, 0.0, n * 0.6);
                speech = Some((s, s + range(rng, 0.2, 0.4) * n, range(rng, 0.5, 0.9)));
            }
            if rng.uniform() < 0.35 {
                // A brief, weaker expression of another class.
                let mut other = rng.below(SYNTH_CLASSES);
                if other == label || other == 2 {
                    other = (label + 1 + rng.below(SYNTH_CLASSES - 1)) % SYNTH_CLASSES;
                }
                if other != 2 && other != label {
                    events.push(Event {
                        start: range(rng, 0.0, n * 0.8),
                        onset: range(rng, 1.5, 3.0),
                        apex: range(rng, 0.5, 2.5),
                        offset: range(rng, 1.5, 3.0),
                        peak: range(rng, 0.35, 0.6),
                        class: other,
                    });
                }
            }
        }
        let mut pose = || {
            [
                range(rng, -0.15, 0.15),
                range(rng, -0.25, 0.25),
                range(rng, 0.85, 1.1),
                range(rng, -0.08, 0.08),
                range(rng, -0.06, 0.06),
            ]
        };
        let pose = [pose(), pose()];
        let bg = range(rng, 0.1, 0.8);
        Self {
            identity,
            label,
            frames,
            events,
            blinks,
            speech,
            pose,
            light: [
                range(rng, 0.0, std::f32::consts::TAU),
                range(rng, 0.0, 0.35),
                range(rng, 0.75, 1.15),
            ],
            background: [bg * range(rng, 0.7, 1.0), bg * range(rng, 0.7, 1.0), bg],
            noise: range(rng, 0.005, 0.03),
            infrared: opts.infrared,
            seed: rng.next_u64(),
        }
    }

    /// AU intensities at frame `t` (baseline + events, clamped to 0..1) and blink/speech.
    pub fn aus_at(&self, t: usize) -> AuState {
        let tf = t as f32;
        let mut s = AuState {
            au: self.identity.baseline,
            ..AuState::default()
        };
        for e in &self.events {
            let w = e.at(tf);
            for &au in class_aus(e.class) {
                s.au[au] += w;
            }
        }
        for a in s.au.iter_mut() {
            *a = a.clamp(0.0, 1.0);
        }
        for &b in &self.blinks {
            let d = (tf - b).abs();
            if d < 2.0 {
                s.blink = s.blink.max(1.0 - d / 2.0);
            }
        }
        if let Some((a, b, rate)) = self.speech {
            if tf >= a && tf <= b {
                s.speech = 0.5 * (1.0 - (tf * rate * 2.0).cos()) * 0.6;
            }
        }
        s
    }

    /// Draw frame `t` at `size` x `size` pixels.
    pub fn render(&self, t: usize, size: u32) -> RgbImage {
        let s = self.aus_at(t);
        let a = |i: usize| s.au[i];
        let id = &self.identity;
        let k = if self.frames > 1 {
            t as f32 / (self.frames - 1) as f32
        } else {
            0.0
        };
        let mut pose = [0.0f32; 5];
        for (i, p) in pose.iter_mut().enumerate() {
            *p = self.pose[0][i] + (self.pose[1][i] - self.pose[0][i]) * k;
        }
        let [roll, yaw, scale, sx, sy] = pose;
        let radius = size as f32 * 0.36 * scale;
        let (cx, cy) = (
            size as f32 * (0.5 + sx * 0.36),
            size as f32 * (0.52 + sy * 0.36),
        );
        let (sr, cr) = roll.sin_cos();
        let px = 1.0 / radius; // one pixel in face units

        // Geometry from the AUs.
        let eye_open = (1.0 + 0.7 * a(AU5) - 0.45 * a(AU7) - 0.35 * a(AU6)) * (1.0 - s.blink);
        let brow_in = id.brow_y - 0.13 * a(AU1) + 0.10 * a(AU4);
        let brow_out = id.brow_y - 0.12 * a(AU2) + 0.03 * a(AU4) + 0.02 * a(AU1);
        let brow_in_x = 0.12 - 0.05 * a(AU4);
        let corner_y = id.mouth_y - 0.10 * a(AU12) + 0.10 * a(AU15) + 0.03 * a(AU20);
        let mouth_w = id.mouth_w * (1.0 + 0.25 * a(AU12) + 0.35 * a(AU20) - 0.2 * a(AU23_LIPS));
        let lip = id.lip * (1.0 - 0.6 * a(AU23_LIPS));
        let open = 0.22 * a(AU26) + 0.08 * a(AU16) + 0.15 * s.speech;
        let jaw = 0.12 * a(AU26) + 0.5 * 0.15 * s.speech;
        let upper_mid = id.mouth_y - 0.01 - 0.02 * a(AU9);
        let lower_mid = id.mouth_y + open + 0.04 * a(AU16);

        let light_dir = (self.light[0].cos(), self.light[0].sin());
        let mut noise = SeededRng::new(self.seed ^ (t as u64).wrapping_mul(0x9E37_79B9));
        let mut img = RgbImage::new(size, size);
        for y in 0..size {
            for x in 0..size {
                let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                // Inverse pose: un-roll, then undo the yaw squeeze.
                let u0 = (cr * dx + sr * dy) / radius;
                let v = (-sr * dx + cr * dy) / radius;
                let u = u0 / (1.0 - 0.25 * yaw.abs()) - yaw * 0.25;
                let mut c = self.background;
                // Hair cap behind the face.
                let hair = coverage(
                    ellipse(u, v + 0.12, 0.0, id.face_w * 1.08, id.face_h * 0.95),
                    px,
                );
                blend(&mut c, id.hair, hair * smooth_above(v, -0.1));
                // Face with the jaw moving down.
                let face = coverage(
                    ellipse(
                        u,
                        v - jaw * 0.5 * smooth_above(v, 0.2),
                        0.0,
                        id.face_w,
                        id.face_h + jaw * 0.3,
                    ),
                    px,
                );
                let shade = 1.0 + self.light[1] * (u * light_dir.0 + v * light_dir.1) * 0.6;
                let skin = id.skin.map(|ch| ch * shade);
                blend(&mut c, skin, face);
                // Cheeks (AU6): raised, rosier.
                for side in [-1.0f32, 1.0] {
                    let ch = coverage(
                        ellipse(u - side * 0.42, v - 0.18 + 0.05 * a(AU6), 0.0, 0.17, 0.11),
                        px * 4.0,
                    );
                    blend(
                        &mut c,
                        [skin[0] * 1.05, skin[1] * 0.8, skin[2] * 0.8],
                        ch * (0.15 + 0.5 * a(AU6)),
                    );
                }
                for side in [-1.0f32, 1.0] {
                    let ex = side * id.eye_dx;
                    let eh = id.eye_h * eye_open.max(0.02);
                    // Sclera, iris, upper lid line.
                    let sclera = coverage(ellipse(u - ex, v - id.eye_y, 0.0, id.eye_w, eh), px);
                    blend(&mut c, [0.93, 0.93, 0.9], sclera);
                    let iris = coverage(
                        ellipse(u - ex, v - id.eye_y, 0.0, id.eye_h * 0.95, id.eye_h * 0.95),
                        px,
                    ) * sclera;
                    blend(&mut c, id.iris, iris);
                    let pupil = coverage(
                        ellipse(u - ex, v - id.eye_y, 0.0, id.eye_h * 0.4, id.eye_h * 0.4),
                        px,
                    ) * sclera;
                    blend(&mut c, [0.02, 0.02, 0.02], pupil);
                    let lid = coverage(
                        capsule(
                            u,
                            v,
                            ex - id.eye_w,
                            id.eye_y,
                            ex + id.eye_w,
                            id.eye_y - eh * 0.9,
                            0.012,
                        )
                        .min(capsule(
                            u,
                            v,
                            ex - id.eye_w,
                            id.eye_y,
                            ex,
                            id.eye_y - eh,
                            0.012,
                        )),
                        px,
                    );
                    blend(&mut c, [0.1, 0.07, 0.06], lid * 0.8);
                    // Brow: inner and outer ends move separately.
                    let brow = coverage(
                        capsule(
                            u,
                            v,
                            side * brow_in_x,
                            brow_in,
                            side * 0.48,
                            brow_out,
                            id.brow_thick,
                        ),
                        px,
                    );
                    blend(&mut c, id.hair.map(|h| h * 0.8), brow);
                }
                // Brow-lowerer furrows and nose wrinkles.
                let furrow = coverage(
                    capsule(u, v, -0.04, brow_in + 0.02, -0.02, brow_in + 0.12, 0.008),
                    px,
                )
                .max(coverage(
                    capsule(u, v, 0.04, brow_in + 0.02, 0.02, brow_in + 0.12, 0.008),
                    px,
                ));
                blend(&mut c, skin.map(|ch| ch * 0.6), furrow * a(AU4));
                let nose_top = id.eye_y + 0.05;
                let nose_tip = nose_top + id.nose_len - 0.03 * a(AU9);
                let nose = coverage(capsule(u, v, 0.0, nose_top, 0.03, nose_tip, 0.012), px).max(
                    coverage(capsule(u, v, -0.07, nose_tip, 0.07, nose_tip, 0.018), px),
                );
                blend(&mut c, skin.map(|ch| ch * 0.72), nose);
                for (i, w) in [-0.06f32, 0.06].iter().enumerate() {
                    let wr = coverage(
                        capsule(
                            u,
                            v,
                            w - 0.05,
                            nose_top + 0.04 + 0.03 * i as f32,
                            w + 0.05,
                            nose_top + 0.06,
                            0.007,
                        ),
                        px,
                    );
                    blend(&mut c, skin.map(|ch| ch * 0.55), wr * a(AU9));
                }
                // Mouth: open interior, then the lips as curves through the corners.
                let mouth_in = coverage(
                    ellipse(
                        u,
                        v - (upper_mid + lower_mid) * 0.5,
                        0.0,
                        mouth_w * 0.8,
                        ((lower_mid - upper_mid) * 0.5).max(0.0),
                    ),
                    px,
                );
                blend(&mut c, [0.25, 0.05, 0.06], mouth_in * (open * 8.0).min(1.0));
                let lip_col = [
                    id.skin[0] * 0.75 + 0.15,
                    id.skin[1] * 0.45,
                    id.skin[2] * 0.45,
                ];
                let upper = curve(
                    u,
                    v,
                    (-mouth_w, corner_y),
                    (0.0, upper_mid - 0.02),
                    (mouth_w, corner_y),
                    lip,
                );
                let lower = curve(
                    u,
                    v,
                    (-mouth_w, corner_y),
                    (0.0, lower_mid + 0.03),
                    (mouth_w, corner_y),
                    lip * 1.2,
                );
                blend(&mut c, lip_col, coverage(upper.min(lower), px));
                // Light, noise, clamp.
                let mut rgb = c.map(|ch| ch * self.light[2]);
                if self.infrared {
                    let g = 0.2 * rgb[0] + 0.6 * rgb[1] + 0.2 * rgb[2];
                    let vignette = 1.0 - 0.35 * ((dx * dx + dy * dy) / (size * size) as f32 * 2.0);
                    rgb = [(g * 1.25 + 0.08) * vignette; 3];
                }
                let n = noise.normal() * self.noise;
                img.put_pixel(
                    x,
                    y,
                    Rgb(rgb.map(|ch| ((ch + n).clamp(0.0, 1.0) * 255.0).round() as u8)),
                );
            }
        }
        img
    }
}

/// What `write_dataset` produced.
#[derive(Debug, Clone, Serialize)]
pub struct SynthReport {
    pub train_clips: usize,
    pub test_clips: usize,
    pub train_identities: usize,
    pub test_identities: usize,
    pub frames: usize,
    pub seconds: f64,
    pub clips_per_second: f64,
}

/// Dataset options.
#[derive(Debug, Clone)]
pub struct DatasetOptions {
    pub train: usize,
    pub test: usize,
    pub seed: u64,
    pub size: u32,
    pub clip: SynthOptions,
}

/// Write a synthetic dataset in DFEW's official layout under `out`:
/// `Clip/clip_224x224/NNNNN/NNNNN.jpg` frame folders and
/// `EmoLabel_DataSplit/{train,test}(single-labeled)/set_1.csv`, classes balanced, identities
/// disjoint between train and test (`identities.csv` records them). Also `synth.json` (options
/// and report). Each clip folder is written under a temporary name and renamed when complete.
pub fn write_dataset(out: &Path, opts: &DatasetOptions) -> Result<SynthReport> {
    let start = std::time::Instant::now();
    let clips_dir = out.join("Clip").join("clip_224x224");
    std::fs::create_dir_all(&clips_dir).map_err(|e| Error::io(&clips_dir, e))?;
    let mut rng = SeededRng::new(opts.seed);
    // Identities: about 5 clips each, disjoint pools; numbered train first, then test.
    let pool = |n: usize, rng: &mut SeededRng| -> Vec<Identity> {
        (0..n.div_ceil(5).max(1))
            .map(|_| Identity::random(rng))
            .collect()
    };
    let train_ids = pool(opts.train, &mut rng);
    let test_ids = pool(opts.test, &mut rng);
    // (split, global identity number, clip)
    let mut specs: Vec<(Split, usize, ClipSpec)> = Vec::new();
    for (split, n, ids, first) in [
        (Split::Train, opts.train, &train_ids, 0),
        (Split::Test, opts.test, &test_ids, train_ids.len()),
    ] {
        for i in 0..n {
            let label = i % SYNTH_CLASSES;
            let who = rng.below(ids.len());
            let mut clip_rng = SeededRng::new(rng.next_u64());
            let spec = ClipSpec::random(ids[who].clone(), label, &opts.clip, &mut clip_rng);
            specs.push((split, first + who, spec));
        }
    }
    let results: Vec<Result<usize>> = specs
        .par_iter()
        .enumerate()
        .map(|(i, (_, _, spec))| write_clip(&clips_dir, i + 1, spec, opts.size))
        .collect();
    let mut frames = 0;
    for r in results {
        frames += r?;
    }
    let mut who_csv = String::from("video_name,split,identity\n");
    for (i, (split, identity, _)) in specs.iter().enumerate() {
        who_csv.push_str(&format!("{},{},{identity}\n", i + 1, split.name()));
    }
    crate::io::write_atomic(&out.join("identities.csv"), who_csv.as_bytes())?;
    for split in [Split::Train, Split::Test] {
        let mut csv = String::from("video_name,label\n");
        for (i, (s, _, spec)) in specs.iter().enumerate() {
            if *s == split {
                csv.push_str(&format!("{},{}\n", i + 1, spec.label + 1));
            }
        }
        let dir = out
            .join("EmoLabel_DataSplit")
            .join(format!("{}(single-labeled)", split.name()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        crate::io::write_atomic(&dir.join("set_1.csv"), csv.as_bytes())?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let report = SynthReport {
        train_clips: opts.train,
        test_clips: opts.test,
        train_identities: train_ids.len(),
        test_identities: test_ids.len(),
        frames,
        seconds,
        clips_per_second: (opts.train + opts.test) as f64 / seconds.max(1e-9),
    };
    let meta = serde_json::json!({
        "generator": "pe-clip synth",
        "format_version": 1,
        "seed": opts.seed,
        "size": opts.size,
        "infrared": opts.clip.infrared,
        "distractors": opts.clip.distractors,
        "frames_per_clip": [opts.clip.min_frames, opts.clip.max_frames],
        "classes": CLASS_NAMES,
        "aus": AUS,
        "report": report,
    });
    crate::io::write_atomic(
        &out.join("synth.json"),
        serde_json::to_string_pretty(&meta)
            .expect("json")
            .as_bytes(),
    )?;
    Ok(report)
}

/// The class names of the generator, in its label order.
pub const CLASS_NAMES: [&str; SYNTH_CLASSES] = [
    "happiness",
    "sadness",
    "neutral",
    "anger",
    "surprise",
    "disgust",
    "fear",
];

/// A resting-face shift from text: `name=value` pairs separated by commas, where a name is an
/// AU's FACS name in lower case with `-` for spaces (`brow-lowerer`) or its number (`au4`), and
/// the value (0..1) is added to the person's resting intensity. `droopy` is short for
/// `brow-lowerer=0.45,lip-corner-depressor=0.5` (lowered brows, down-turned mouth).
pub fn parse_shift(text: &str) -> std::result::Result<[f32; 13], String> {
    const NUMBERS: [&str; 13] = [
        "au1", "au2", "au4", "au5", "au6", "au7", "au9", "au12", "au15", "au16", "au20", "au26",
        "au23",
    ];
    let mut shift = [0f32; 13];
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part == "droopy" {
            shift[AU4] += 0.45;
            shift[AU15] += 0.5;
            continue;
        }
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected NAME=VALUE or droopy"))?;
        let name = name.trim().to_ascii_lowercase();
        let k = AU_NAMES
            .iter()
            .position(|n| n.to_ascii_lowercase().replace(' ', "-") == name)
            .or_else(|| NUMBERS.iter().position(|n| *n == name))
            .ok_or_else(|| {
                format!(
                    "{name:?}: not an action unit (e.g. brow-lowerer, lip-corner-depressor, au4)"
                )
            })?;
        let v: f32 = value
            .trim()
            .parse()
            .map_err(|_| format!("{part:?}: the value is not a number"))?;
        if !(0.0..=1.0).contains(&v) {
            return Err(format!("{part:?}: the value must be between 0 and 1"));
        }
        shift[k] += v;
    }
    Ok(shift)
}

/// One person's clips: a random identity whose resting face is moved by `shift`.
#[derive(Debug, Clone)]
pub struct PersonOptions {
    pub seed: u64,
    pub size: u32,
    pub clip: SynthOptions,
    /// Added to the identity's resting AU intensities (see [`parse_shift`]).
    pub shift: [f32; 13],
    /// Clips of each class in `classes`.
    pub clips_per_class: usize,
    pub classes: Vec<usize>,
}

/// The identity and clip specs of one person, class by class (`clips_per_class` of each).
pub fn person_clips(opts: &PersonOptions) -> (Identity, Vec<ClipSpec>) {
    let mut rng = SeededRng::new(opts.seed);
    let mut identity = Identity::random(&mut rng);
    for (b, s) in identity.baseline.iter_mut().zip(opts.shift) {
        *b = (*b + s).clamp(0.0, 1.0);
    }
    let mut specs = Vec::new();
    for &label in &opts.classes {
        for _ in 0..opts.clips_per_class {
            let mut clip_rng = SeededRng::new(rng.next_u64());
            specs.push(ClipSpec::random(
                identity.clone(),
                label,
                &opts.clip,
                &mut clip_rng,
            ));
        }
    }
    (identity, specs)
}

/// Write one person's clips as `out/<class>/<class>-NN.y4m` (25 fps, each written atomically);
/// returns the paths with their labels.
pub fn write_person(out: &Path, opts: &PersonOptions) -> Result<Vec<(PathBuf, usize)>> {
    write_clips(out, &person_clips(opts).1, opts.size)
}

/// Write clips as `out/<class>/<class>-NN.y4m` (25 fps, each written atomically); returns the
/// paths with their labels.
pub fn write_clips(out: &Path, specs: &[ClipSpec], size: u32) -> Result<Vec<(PathBuf, usize)>> {
    let mut counts = [0usize; SYNTH_CLASSES];
    let mut jobs = Vec::new();
    for spec in specs {
        let name = CLASS_NAMES[spec.label];
        counts[spec.label] += 1;
        let dir = out.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        jobs.push((
            dir.join(format!("{name}-{:02}.y4m", counts[spec.label])),
            spec,
        ));
    }
    jobs.par_iter()
        .map(|(path, spec)| {
            let frames: Vec<RgbImage> = (0..spec.frames).map(|t| spec.render(t, size)).collect();
            crate::video::write_y4m_444(path, &frames, 25)
        })
        .collect::<Result<Vec<()>>>()?;
    Ok(jobs.into_iter().map(|(p, s)| (p, s.label)).collect())
}

/// Render one clip into `dir/NNNNN/`; returns its frame count.
fn write_clip(dir: &Path, index: usize, spec: &ClipSpec, size: u32) -> Result<usize> {
    let name = format!("{index:05}");
    let final_dir = dir.join(&name);
    let tmp: PathBuf = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    for t in 0..spec.frames {
        let path = tmp.join(format!("{:05}.jpg", t + 1));
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = std::io::BufWriter::new(file);
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut w, 92)
            .encode_image(&spec.render(t, size))
            .map_err(|e| Error::invalid(&path, e.to_string()))?;
    }
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    Ok(spec.frames)
}

/// Signed distance (approximate, in face units) to an axis-aligned ellipse at the origin.
fn ellipse(u: f32, v: f32, _rot: f32, a: f32, b: f32) -> f32 {
    let (a, b) = (a.max(1e-4), b.max(1e-4));
    let k = ((u / a).powi(2) + (v / b).powi(2)).sqrt();
    (k - 1.0) * a.min(b)
}

/// Signed distance to a segment of half-thickness `r`.
fn capsule(u: f32, v: f32, x0: f32, y0: f32, x1: f32, y1: f32, r: f32) -> f32 {
    let (dx, dy) = (x1 - x0, y1 - y0);
    let len2 = (dx * dx + dy * dy).max(1e-12);
    let h = (((u - x0) * dx + (v - y0) * dy) / len2).clamp(0.0, 1.0);
    let (ex, ey) = (u - x0 - h * dx, v - y0 - h * dy);
    (ex * ex + ey * ey).sqrt() - r
}

/// Signed distance to a quadratic curve (8 segments) of half-thickness `r`.
fn curve(u: f32, v: f32, p0: (f32, f32), p1: (f32, f32), p2: (f32, f32), r: f32) -> f32 {
    let at = |t: f32| {
        let m = 1.0 - t;
        (
            m * m * p0.0 + 2.0 * m * t * p1.0 + t * t * p2.0,
            m * m * p0.1 + 2.0 * m * t * p1.1 + t * t * p2.1,
        )
    };
    let mut d = f32::INFINITY;
    let mut prev = at(0.0);
    for i in 1..=8 {
        let next = at(i as f32 / 8.0);
        d = d.min(capsule(u, v, prev.0, prev.1, next.0, next.1, r));
        prev = next;
    }
    d
}

/// Anti-aliased coverage of a shape with signed distance `d`, `px` = one pixel.
fn coverage(d: f32, px: f32) -> f32 {
    (0.5 - d / px).clamp(0.0, 1.0)
}

fn smooth_above(v: f32, edge: f32) -> f32 {
    ((v - edge) * 8.0 + 0.5).clamp(0.0, 1.0)
}

fn blend(c: &mut [f32; 3], col: [f32; 3], alpha: f32) {
    for i in 0..3 {
        c[i] += (col[i] - c[i]) * alpha;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(label: usize, seed: u64) -> ClipSpec {
        let mut rng = SeededRng::new(seed);
        let id = Identity::random(&mut rng);
        ClipSpec::random(id, label, &SynthOptions::default(), &mut rng)
    }

    #[test]
    fn the_generator_classes_are_the_default_class_list() {
        assert_eq!(crate::ClassSet::default().names(), CLASS_NAMES);
    }

    #[test]
    fn shifts_parse_and_move_the_resting_face() {
        let s = parse_shift("brow-lowerer=0.4, au15=0.3").unwrap();
        assert_eq!(s[AU4], 0.4);
        assert_eq!(s[AU15], 0.3);
        assert_eq!(parse_shift("droopy").unwrap()[AU15], 0.5);
        assert!(parse_shift("smile=1")
            .unwrap_err()
            .contains("not an action unit"));
        assert!(parse_shift("au4=2")
            .unwrap_err()
            .contains("between 0 and 1"));
        assert!(parse_shift("au4").unwrap_err().contains("NAME=VALUE"));
        let opts = |shift| PersonOptions {
            seed: 3,
            size: 32,
            clip: SynthOptions::default(),
            shift,
            clips_per_class: 2,
            classes: vec![2, 0],
        };
        let (plain, a) = person_clips(&opts([0.0; 13]));
        let (moved, b) = person_clips(&opts(s));
        assert_eq!(a.len(), 4);
        assert_eq!(a.iter().map(|c| c.label).collect::<Vec<_>>(), [2, 2, 0, 0]);
        assert!((moved.baseline[AU4] - (plain.baseline[AU4] + 0.4).min(1.0)).abs() < 1e-6);
        // Same person and clips otherwise; the neutral clip's resting AUs carry the shift.
        assert_eq!(a[0].frames, b[0].frames);
        assert!(b[0].aus_at(0).au[AU15] >= 0.3);
        let dir = tempfile::tempdir().unwrap();
        let written = write_person(dir.path(), &opts(s)).unwrap();
        assert_eq!(written.len(), 4);
        assert!(dir.path().join("neutral/neutral-02.y4m").is_file());
        assert!(dir.path().join("happiness/happiness-01.y4m").is_file());
    }

    #[test]
    fn deterministic_for_a_seed() {
        let (a, b) = (spec(0, 5), spec(0, 5));
        assert_eq!(a, b);
        assert_eq!(a.render(3, 48), b.render(3, 48));
        assert_ne!(spec(0, 6).render(3, 48), a.render(3, 48));
    }

    #[test]
    fn expression_aus_peak_inside_the_clip() {
        for label in 0..SYNTH_CLASSES {
            let s = spec(label, 10 + label as u64);
            let max_of = |au: usize| {
                (0..s.frames)
                    .map(|t| s.aus_at(t).au[au])
                    .fold(0.0, f32::max)
            };
            for &au in class_aus(label) {
                assert!(max_of(au) >= 0.5, "class {label} AU index {au}");
            }
        }
    }

    #[test]
    fn the_label_changes_the_face() {
        // Same identity and seed, different class: the apex frames differ.
        let mut rng = SeededRng::new(3);
        let id = Identity::random(&mut rng);
        let opts = SynthOptions {
            distractors: false,
            ..SynthOptions::default()
        };
        let happy = ClipSpec::random(id.clone(), 0, &opts, &mut SeededRng::new(9));
        let surprise = ClipSpec::random(id, 4, &opts, &mut SeededRng::new(9));
        let t = (happy.events[0].start + happy.events[0].onset + 1.0) as usize;
        let diff: u64 = happy
            .render(t, 64)
            .pixels()
            .zip(surprise.render(t, 64).pixels())
            .map(|(a, b)| {
                (0..3)
                    .map(|c| u64::from(a.0[c].abs_diff(b.0[c])))
                    .sum::<u64>()
            })
            .sum();
        assert!(diff > 64 * 64 * 3, "diff {diff}");
    }

    #[test]
    fn dataset_reads_back_as_dfew() {
        let d = tempfile::tempdir().unwrap();
        let opts = DatasetOptions {
            train: 14,
            test: 7,
            seed: 1,
            size: 32,
            clip: SynthOptions {
                min_frames: 4,
                max_frames: 6,
                ..SynthOptions::default()
            },
        };
        let report = write_dataset(d.path(), &opts).unwrap();
        assert_eq!((report.train_clips, report.test_clips), (14, 7));
        let classes = crate::ClassSet::default();
        let train =
            crate::dataset::load(d.path(), crate::dataset::Split::Train, 1, &classes).unwrap();
        let test =
            crate::dataset::load(d.path(), crate::dataset::Split::Test, 1, &classes).unwrap();
        assert_eq!((train.samples.len(), test.samples.len()), (14, 7));
        // Balanced classes.
        for c in 0..7 {
            assert_eq!(train.samples.iter().filter(|s| s.label == c).count(), 2);
        }
        let clip = crate::video::load_sampled_clip(&test.samples[0].clip, 16).unwrap();
        assert_eq!(clip.frames[0].dimensions(), (32, 32));
        assert!((4..=6).contains(&clip.readable_frames));
        // Identities are disjoint between the splits.
        let who = std::fs::read_to_string(d.path().join("identities.csv")).unwrap();
        let ids = |split: &str| -> std::collections::BTreeSet<String> {
            who.lines()
                .skip(1)
                .filter(|l| l.split(',').nth(1) == Some(split))
                .map(|l| l.split(',').nth(2).unwrap().to_string())
                .collect()
        };
        assert!(ids("train").is_disjoint(&ids("test")));
        assert!(!ids("test").is_empty());
    }

    #[test]
    fn captions_name_the_active_aus() {
        let mut s = AuState::default();
        assert!(caption(&s).starts_with("Relaxed Muscles"));
        s.au[AU6] = 0.9;
        s.au[AU12] = 0.4;
        s.au[AU4] = 0.1;
        assert_eq!(caption(&s), "Cheek Raiser, Slight Lip Corner Puller.");
        // The apex of every class but neutral reads as its descriptor's AUs.
        for label in [0, 1, 3, 4, 5, 6] {
            let mut s = AuState::default();
            for &au in class_aus(label) {
                s.au[au] = 1.0;
            }
            let want: Vec<&str> = class_aus(label).iter().map(|&a| AU_NAMES[a]).collect();
            let got = caption(&s);
            for w in want {
                assert!(got.contains(w), "{got} lacks {w}");
            }
        }
    }

    #[test]
    fn random_frames_are_deterministic() {
        let opts = SynthOptions::default();
        let (a, sa) = random_frame(&mut SeededRng::new(4), &opts, 32);
        let (b, sb) = random_frame(&mut SeededRng::new(4), &opts, 32);
        assert_eq!((a, sa), (b, sb));
    }

    #[test]
    fn infrared_is_gray() {
        let mut rng = SeededRng::new(1);
        let id = Identity::random(&mut rng);
        let opts = SynthOptions {
            infrared: true,
            ..SynthOptions::default()
        };
        let s = ClipSpec::random(id, 3, &opts, &mut rng);
        assert!(s
            .render(0, 32)
            .pixels()
            .all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
    }
}
