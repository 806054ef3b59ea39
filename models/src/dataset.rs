//! Labelled clips from the datasets' real on-disk layouts.
//!
//! | layout | how it is recognised | split files | labels |
//! |---|---|---|---|
//! | DFEW (official) | `EmoLabel_DataSplit/` | `{train,test}(single-labeled)/set_N.csv`: `video_name,label` with a header | 1..7 = happiness, sadness, neutral, anger, surprise, disgust, fear (minus 1 gives pe-clip's index) |
//! | DFEW (reference annotation) | `annotation/DFEW_set_N_{train,test}.txt` | `path num_frames label`, space separated | 1..7 as above |
//! | FERV39K | `4_setups/All_scenes/` | `{train,test}_All.csv`: `path LabelName`, space separated | Happy, Sad, Neutral, Angry, Surprise, Disgust, Fear |
//! | manifest | a `.csv` file, or a folder with `train.csv` / `test.csv` | `path,label` (header optional) | a class name or a 0-based index |
//!
//! DFEW clips are `Clip/clip_224x224/NNNNN/` frame folders (the CSV's `video_name` zero-padded
//! to 5 digits); FERV39K clips are under `2_ClipsforFaceCrop/`; manifest and annotation paths are
//! relative to the file's folder (or the dataset root) unless absolute. A line naming a missing
//! clip or an unknown label is an error naming the file and line.

use std::path::{Path, PathBuf};

use crate::classes::ClassSet;
use crate::error::{Error, Result};

/// Which part of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    /// `train` or `test`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            o => Err(format!("unknown split {o:?} (expected train or test)")),
        }
    }
}

/// The layouts pe-clip reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    DfewOfficial,
    DfewAnnotation,
    Ferv39k,
    Manifest,
}

/// One labelled clip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// A frame folder or a `.y4m` file.
    pub clip: PathBuf,
    /// Class index (pe-clip order).
    pub label: usize,
}

/// The labelled clips of one split.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub layout: Layout,
    pub split: Split,
    pub samples: Vec<Sample>,
}

/// FERV39K's label names in pe-clip's class order.
const FERV39K_NAMES: [&str; 7] = [
    "happy", "sad", "neutral", "angry", "surprise", "disgust", "fear",
];

/// Recognise the layout of `root`.
pub fn detect_layout(root: &Path) -> Result<Layout> {
    if root.is_file() {
        return Ok(Layout::Manifest);
    }
    if !root.is_dir() {
        return Err(Error::io(
            root,
            std::io::Error::new(std::io::ErrorKind::NotFound, "dataset not found"),
        ));
    }
    if root.join("EmoLabel_DataSplit").is_dir() {
        Ok(Layout::DfewOfficial)
    } else if root.join("annotation").is_dir() {
        Ok(Layout::DfewAnnotation)
    } else if root.join("4_setups").is_dir() {
        Ok(Layout::Ferv39k)
    } else if root.join("train.csv").is_file() || root.join("test.csv").is_file() {
        Ok(Layout::Manifest)
    } else {
        Err(Error::invalid(
            root,
            "not a dataset pe-clip knows (expected DFEW's EmoLabel_DataSplit/ or annotation/, \
             FERV39K's 4_setups/, or train.csv / test.csv manifests)",
        ))
    }
}

/// Load one split. `fold` (1..5) applies to DFEW; `classes` gives the names a manifest may use.
pub fn load(root: &Path, split: Split, fold: usize, classes: &ClassSet) -> Result<Dataset> {
    let layout = detect_layout(root)?;
    if matches!(layout, Layout::DfewOfficial | Layout::DfewAnnotation) && !(1..=5).contains(&fold) {
        return Err(Error::Config(format!(
            "DFEW fold {fold} does not exist (1..5)"
        )));
    }
    let samples = match layout {
        Layout::DfewOfficial => {
            let dir = format!("{}(single-labeled)", split.name());
            let file = root
                .join("EmoLabel_DataSplit")
                .join(dir)
                .join(format!("set_{fold}.csv"));
            read_dfew_csv(&file, &root.join("Clip").join("clip_224x224"))?
        }
        Layout::DfewAnnotation => {
            let file = root
                .join("annotation")
                .join(format!("DFEW_set_{fold}_{}.txt", split.name()));
            read_annotation(&file, root, classes.len())?
        }
        Layout::Ferv39k => {
            let file = root
                .join("4_setups")
                .join("All_scenes")
                .join(format!("{}_All.csv", split.name()));
            read_ferv39k(&file, &root.join("2_ClipsforFaceCrop"))?
        }
        Layout::Manifest => {
            let file = if root.is_file() {
                root.to_path_buf()
            } else {
                root.join(format!("{}.csv", split.name()))
            };
            read_manifest(&file, classes)?
        }
    };
    Ok(Dataset {
        layout,
        split,
        samples,
    })
}

fn read_lines(file: &Path) -> Result<Vec<(usize, String)>> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    Ok(text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim().to_string()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .collect())
}

fn bad(file: &Path, line: usize, reason: impl Into<String>) -> Error {
    Error::Annotation {
        file: file.to_path_buf(),
        line,
        reason: reason.into(),
    }
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn check_clip(file: &Path, line: usize, clip: PathBuf) -> Result<PathBuf> {
    if clip.is_dir() || clip.is_file() {
        Ok(clip)
    } else {
        Err(bad(
            file,
            line,
            format!("clip {} not found", clip.display()),
        ))
    }
}

/// DFEW labels 1..7 to pe-clip's 0..6.
fn dfew_label(file: &Path, line: usize, s: &str, classes: usize) -> Result<usize> {
    match s.parse::<usize>() {
        Ok(v) if (1..=classes).contains(&v) => Ok(v - 1),
        _ => Err(bad(
            file,
            line,
            format!("unknown label {s:?} (expected 1..{classes})"),
        )),
    }
}

fn read_dfew_csv(file: &Path, clips: &Path) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (line, text) in read_lines(file)? {
        if text.to_ascii_lowercase().starts_with("video_name") {
            continue;
        }
        let mut parts = text.split(',').map(str::trim);
        let (Some(name), Some(label)) = (parts.next(), parts.next()) else {
            return Err(bad(file, line, "expected `video_name,label`"));
        };
        let label = dfew_label(file, line, label, 7)?;
        let direct = clips.join(name);
        let clip = match name.parse::<u64>() {
            Ok(n) if !direct.exists() => clips.join(format!("{n:05}")),
            _ => direct,
        };
        out.push(Sample {
            clip: check_clip(file, line, clip)?,
            label,
        });
    }
    Ok(out)
}

fn read_annotation(file: &Path, root: &Path, classes: usize) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (line, text) in read_lines(file)? {
        let parts: Vec<&str> = text.split_whitespace().collect();
        let [path, frames, label] = parts[..] else {
            return Err(bad(file, line, "expected `path num_frames label`"));
        };
        if frames.parse::<usize>().is_err() {
            return Err(bad(
                file,
                line,
                format!("num_frames {frames:?} is not a number"),
            ));
        }
        let label = dfew_label(file, line, label, classes)?;
        out.push(Sample {
            clip: check_clip(file, line, resolve(root, path))?,
            label,
        });
    }
    Ok(out)
}

fn read_ferv39k(file: &Path, clips: &Path) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (line, text) in read_lines(file)? {
        let parts: Vec<&str> = text.split_whitespace().collect();
        let [path, label] = parts[..] else {
            return Err(bad(file, line, "expected `path LabelName`"));
        };
        let label = FERV39K_NAMES
            .iter()
            .position(|n| n.eq_ignore_ascii_case(label))
            .ok_or_else(|| bad(file, line, format!("unknown label {label:?}")))?;
        out.push(Sample {
            clip: check_clip(file, line, resolve(clips, path))?,
            label,
        });
    }
    Ok(out)
}

fn read_manifest(file: &Path, classes: &ClassSet) -> Result<Vec<Sample>> {
    let base = file.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (line, text) in read_lines(file)? {
        let Some((path, label)) = text.rsplit_once(',') else {
            return Err(bad(file, line, "expected `path,label`"));
        };
        let (path, label) = (path.trim(), label.trim());
        if line == 1 && path.eq_ignore_ascii_case("path") {
            continue;
        }
        let index = match label.parse::<usize>() {
            Ok(i) if i < classes.len() => Some(i),
            Ok(_) => None,
            Err(_) => classes
                .names()
                .iter()
                .position(|n| n.eq_ignore_ascii_case(label)),
        };
        let label = index.ok_or_else(|| {
            bad(
                file,
                line,
                format!(
                    "unknown label {label:?} (expected one of {} or 0..{})",
                    classes.names().join(", "),
                    classes.len() - 1
                ),
            )
        })?;
        out.push(Sample {
            clip: check_clip(file, line, resolve(base, path))?,
            label,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkclip(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        image::RgbImage::new(4, 4)
            .save(dir.join("000.png"))
            .unwrap();
    }

    fn write(p: &Path, text: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn dfew_official_layout() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        mkclip(&r.join("Clip/clip_224x224/00001"));
        mkclip(&r.join("Clip/clip_224x224/00012"));
        write(
            &r.join("EmoLabel_DataSplit/train(single-labeled)/set_2.csv"),
            "video_name,label\n1,1\n12,7\n",
        );
        let ds = load(r, Split::Train, 2, &ClassSet::default()).unwrap();
        assert_eq!(ds.layout, Layout::DfewOfficial);
        assert_eq!(ds.samples.len(), 2);
        assert_eq!(ds.samples[1].label, 6);
        assert!(ds.samples[1].clip.ends_with("00012"));
        write(
            &r.join("EmoLabel_DataSplit/train(single-labeled)/set_2.csv"),
            "video_name,label\n1,1\n\n13,2\n",
        );
        let err = load(r, Split::Train, 2, &ClassSet::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("set_2.csv:4:") && err.contains("00013") && err.contains("not found"),
            "{err}"
        );
        write(
            &r.join("EmoLabel_DataSplit/train(single-labeled)/set_2.csv"),
            "video_name,label\n1,8\n",
        );
        let err = load(r, Split::Train, 2, &ClassSet::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("set_2.csv:2:") && err.contains("unknown label \"8\""),
            "{err}"
        );
        assert!(load(r, Split::Train, 6, &ClassSet::default()).is_err());
    }

    #[test]
    fn dfew_annotation_ferv39k_and_manifest_layouts() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().join("dfew");
        mkclip(&r.join("clips/a"));
        write(&r.join("annotation/DFEW_set_1_test.txt"), "clips/a 16 3\n");
        let ds = load(&r, Split::Test, 1, &ClassSet::default()).unwrap();
        assert_eq!(
            (ds.layout, ds.samples[0].label),
            (Layout::DfewAnnotation, 2)
        );

        let f = d.path().join("ferv");
        mkclip(&f.join("2_ClipsforFaceCrop/Scene/x/0001"));
        write(
            &f.join("4_setups/All_scenes/train_All.csv"),
            "Scene/x/0001 Angry\n",
        );
        let ds = load(&f, Split::Train, 1, &ClassSet::default()).unwrap();
        assert_eq!((ds.layout, ds.samples[0].label), (Layout::Ferv39k, 3));
        write(
            &f.join("4_setups/All_scenes/train_All.csv"),
            "Scene/x/0001 Bored\n",
        );
        let err = load(&f, Split::Train, 1, &ClassSet::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train_All.csv:1:") && err.contains("Bored"),
            "{err}"
        );

        let m = d.path().join("m");
        mkclip(&m.join("c1"));
        mkclip(&m.join("c2"));
        write(&m.join("train.csv"), "path,label\nc1,fear\nc2,0\n");
        let ds = load(&m, Split::Train, 1, &ClassSet::default()).unwrap();
        assert_eq!(
            ds.samples.iter().map(|s| s.label).collect::<Vec<_>>(),
            [6, 0]
        );
        let ds = load(&m.join("train.csv"), Split::Test, 1, &ClassSet::default()).unwrap();
        assert_eq!(ds.samples.len(), 2);
        write(&m.join("train.csv"), "c1,fear\nc2,joy\n");
        let err = load(&m, Split::Train, 1, &ClassSet::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("train.csv:2:") && err.contains("joy"), "{err}");
        assert!(detect_layout(d.path()).is_err());
    }
}
