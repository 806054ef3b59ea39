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

use image::RgbImage;

use crate::rng::SeededRng;

mod face;
mod person;
mod write;

pub use person::{parse_shift, person_clips, write_person, PersonOptions};
pub use write::{write_clips, write_dataset, DatasetOptions, SynthReport};

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
