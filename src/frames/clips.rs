//! Labelled clips on disk and their model input: one clip type for export (calibration and
//! fidelity sets), on-device calibration and the benchmarks, and one loader that prepares the
//! test-time sampled frames exactly as `pe-clip run` prepares camera frames (face region, then
//! the package's resize).

use std::path::{Path, PathBuf};

use pe_clip_models::video::load_sampled_clip;
use pe_clip_models::PreprocessSpec;

use super::roi::{self, AutoRoiOptions, RoiPolicy, RoiTracker};
use crate::error::{Error, Result};
use crate::package::sha256_hex;

/// A clip (frame folder or `.y4m`) and, when known, its class.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledClip {
    pub path: PathBuf,
    pub label: Option<usize>,
}

impl LabelledClip {
    /// The labelled clips of one split of a dataset (any layout `dataset::load` reads).
    pub fn from_dataset(
        root: &Path,
        split: pe_clip_models::dataset::Split,
        fold: usize,
        classes: &pe_clip_models::ClassSet,
    ) -> Result<Vec<Self>> {
        let data = pe_clip_models::dataset::load(root, split, fold, classes)?;
        Ok(data
            .samples
            .into_iter()
            .map(|s| Self {
                path: s.clip,
                label: Some(s.label),
            })
            .collect())
    }
}

const FRAME_EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "bmp", "ppm", "pgm"];

fn has_ext(p: &Path, exts: &[&str]) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

fn is_frame_folder(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.flatten()
            .any(|e| e.path().is_file() && has_ext(&e.path(), &FRAME_EXTENSIONS))
    })
}

fn is_clip(p: &Path) -> bool {
    (p.is_file() && has_ext(p, &["y4m"])) || (p.is_dir() && is_frame_folder(p))
}

/// The class a name stands for: the whole name, or its first word (up to `-`, `_`, `.` or a
/// space), compared without case.
fn class_of_name(name: &str, classes: &[String]) -> Option<usize> {
    let first = name.split(['-', '_', '.', ' ']).next().unwrap_or(name);
    classes
        .iter()
        .position(|c| c.eq_ignore_ascii_case(name) || c.eq_ignore_ascii_case(first))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|err| Error::io(dir, err)))
        .collect::<Result<_>>()?;
    v.retain(|p| {
        !p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
    });
    v.sort();
    Ok(v)
}

/// The clips under `dir`: `.y4m` files and frame folders, directly or one level down in a
/// folder named after a class. A clip's class is that folder's, else its own name's when that
/// starts with a class name (`neutral-1.y4m`, `happiness_02/`), else unknown.
pub fn discover(dir: &Path, classes: &[String]) -> Result<Vec<LabelledClip>> {
    if !dir.is_dir() {
        return Err(Error::invalid(dir, "clip directory not found"));
    }
    let mut out = Vec::new();
    for p in sorted_entries(dir)? {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if is_clip(&p) {
            out.push(LabelledClip {
                label: class_of_name(&name, classes),
                path: p,
            });
        } else if p.is_dir() {
            match classes.iter().position(|c| c.eq_ignore_ascii_case(&name)) {
                Some(label) => {
                    for q in sorted_entries(&p)? {
                        if is_clip(&q) {
                            out.push(LabelledClip {
                                path: q,
                                label: Some(label),
                            });
                        } else {
                            log::warn!(
                                "{}: not a clip (.y4m or frame folder), ignored",
                                q.display()
                            );
                        }
                    }
                }
                None => log::warn!(
                    "{}: neither a clip nor a class folder ({}), ignored",
                    p.display(),
                    classes.join(", ")
                ),
            }
        } else {
            log::warn!(
                "{}: not a clip (.y4m or frame folder), ignored",
                p.display()
            );
        }
    }
    Ok(out)
}

/// A clip's sampled model inputs.
#[derive(Debug, Clone)]
pub struct LoadedClip {
    pub clip: LabelledClip,
    /// The `window` test-time sampled frames as model input (RGB bytes at the model size).
    pub frames: Vec<Vec<u8>>,
    /// Readable frames of the whole clip.
    pub length: usize,
}

/// Clips read, and those that could not be (path and why).
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub clips: Vec<LoadedClip>,
    pub skipped: Vec<(PathBuf, String)>,
}

impl Loaded {
    pub fn frames(&self) -> usize {
        self.clips.iter().map(|c| c.frames.len()).sum()
    }

    /// `path: why` of each skipped clip.
    pub fn skipped_text(&self) -> Vec<String> {
        self.skipped
            .iter()
            .map(|(p, why)| format!("{}: {why}", p.display()))
            .collect()
    }

    /// SHA-256 over the sorted paths of the clips read (which clips, not their bytes).
    pub fn clip_list_sha256(&self) -> String {
        clip_list_sha256(self.clips.iter().map(|c| c.clip.path.as_path()))
    }
}

/// SHA-256 over the sorted clip paths, one per line.
pub fn clip_list_sha256<'a>(paths: impl IntoIterator<Item = &'a Path>) -> String {
    let mut paths: Vec<String> = paths.into_iter().map(|p| p.display().to_string()).collect();
    paths.sort();
    sha256_hex(paths.join("\n").as_bytes())
}

/// Read the `window` test-time frames of `clip` and prepare them as the runtime does: the face
/// region under `roi` (a fresh track per clip), then `spec`'s resize. `Err` says why the clip
/// is unusable (unreadable, or no readable frame); skipped frames are logged.
pub fn load_clip(
    spec: &PreprocessSpec,
    clip: &LabelledClip,
    window: usize,
    roi: RoiPolicy,
) -> Result<std::result::Result<LoadedClip, String>> {
    let sampled = match load_sampled_clip(&clip.path, window) {
        Ok(s) if !s.frames.is_empty() => s,
        Ok(_) => return Ok(Err("no readable frame".to_string())),
        Err(e) => return Ok(Err(e.to_string())),
    };
    for s in &sampled.skipped {
        log::warn!(
            "{}: skipped frame {}: {}",
            clip.path.display(),
            s.frame,
            s.reason
        );
    }
    let mut tracker = RoiTracker::new(roi, AutoRoiOptions::default())?;
    let frames = sampled
        .frames
        .iter()
        .map(|f| {
            let region = tracker.region(f);
            roi::model_input(spec, f, region)
        })
        .collect();
    Ok(Ok(LoadedClip {
        clip: clip.clone(),
        frames,
        length: sampled.readable_frames,
    }))
}

/// [`load_clip`] for each of `clips`; unusable clips are skipped, named in the log and in
/// [`Loaded::skipped`].
pub fn load_clips(
    spec: &PreprocessSpec,
    clips: &[LabelledClip],
    window: usize,
    roi: RoiPolicy,
) -> Result<Loaded> {
    let mut out = Loaded::default();
    for c in clips {
        match load_clip(spec, c, window, roi)? {
            Ok(loaded) => out.clips.push(loaded),
            Err(why) => {
                log::warn!("{}: {why}; skipped", c.path.display());
                out.skipped.push((c.path.clone(), why));
            }
        }
    }
    Ok(out)
}
