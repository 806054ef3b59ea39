//! Writing synthetic clips: a DFEW-layout dataset of frame folders, or one person's clips as
//! Y4M files; every clip is written whole or not at all.

use std::path::{Path, PathBuf};

use image::RgbImage;
use rayon::prelude::*;
use serde::Serialize;

use super::{ClipSpec, Identity, SynthOptions, AUS, CLASS_NAMES, SYNTH_CLASSES};
use crate::dataset::Split;
use crate::error::{Error, Result};
use crate::rng::SeededRng;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
