//! One person's clips: a random identity whose resting face a text shift moves (a driver with
//! lowered brows at rest), class by class, for driver-profile tests and demos.

use std::path::{Path, PathBuf};

use super::write::write_clips;
use super::{ClipSpec, Identity, SynthOptions, AU15, AU4, AU_NAMES};
use crate::error::Result;
use crate::rng::SeededRng;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
