//! Clip input: a folder of frames (JPEG/PNG, name order) or a `.y4m` file, sampled to the
//! model's frame count. Unreadable frames are skipped with a warning naming them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use image::RgbImage;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::sampling::test_indices;

mod y4m;

use y4m::load_sampled_y4m;
pub use y4m::{read_y4m, write_y4m_444, ycbcr_to_rgb, Y4mStream};

/// The most pixels a frame may have, from any source (8.4 MP: 4K UHD fits). A file asking for
/// more is refused before its frame is allocated.
pub const MAX_FRAME_PIXELS: u64 = 1 << 23;
/// The longest frame side accepted.
pub const MAX_FRAME_SIDE: u64 = 8192;

/// File extensions read as frames (case-insensitive).
pub const FRAME_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// A frame that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedFrame {
    /// The file (frame folders) or `file#frame-index` (y4m).
    pub frame: String,
    /// The decoder's message.
    pub reason: String,
}

/// The frames of a clip chosen by the test-time sampler.
#[derive(Debug, Clone)]
pub struct SampledClip {
    /// The clip path as given.
    pub path: PathBuf,
    /// The sampled frames, in temporal order (length = segments).
    pub frames: Vec<RgbImage>,
    /// Readable frames in the clip (what the sampler saw as N).
    pub readable_frames: usize,
    /// Frames that could not be decoded.
    pub skipped: Vec<SkippedFrame>,
}

/// Whether `path` is a clip pe-clip can read: a directory, or a file ending in `.y4m`.
pub fn is_clip_path(path: &Path) -> bool {
    path.is_dir() || has_extension(path, &["y4m"])
}

fn has_extension(path: &Path, exts: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// The frame files of a folder, sorted by file name.
pub fn list_frame_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && has_extension(p, &FRAME_EXTENSIONS))
        .collect();
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// Decode one image file to RGB. Its size is checked against [`MAX_FRAME_PIXELS`] and
/// [`MAX_FRAME_SIDE`] from the image header, before the pixels are decoded.
pub fn decode_frame_file(path: &Path) -> std::result::Result<RgbImage, String> {
    let (file, _) = crate::io::open_regular(path, false).map_err(|e| match e {
        Error::Invalid { reason, .. } => reason,
        other => other.to_string(),
    })?;
    let mut reader = image::ImageReader::new(std::io::BufReader::new(file))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_FRAME_SIDE as u32);
    limits.max_image_height = Some(MAX_FRAME_SIDE as u32);
    // The decoded image (up to 4 bytes a pixel, 16-bit PNGs 8) and the RGB copy.
    limits.max_alloc = Some(MAX_FRAME_PIXELS * 12);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| e.to_string())?;
    y4m::check_frame_size(path, u64::from(img.width()), u64::from(img.height())).map_err(|e| {
        match e {
            Error::Invalid { reason, .. } => reason,
            other => other.to_string(),
        }
    })?;
    Ok(img.into_rgb8())
}

/// Load a clip and sample `segments` frames with the test-time sampler.
pub fn load_sampled_clip(path: &Path, segments: usize) -> Result<SampledClip> {
    load_clip_sampled_by(path, |n| test_indices(n, segments))
}

/// Load a clip with any sampler: `pick(n)` gives the frame indices for `n` readable frames (it is
/// called again if a picked frame turns out unreadable).
pub fn load_clip_sampled_by(
    path: &Path,
    pick: impl FnMut(usize) -> Vec<usize>,
) -> Result<SampledClip> {
    if path.is_dir() {
        load_sampled_folder(path, pick)
    } else if path.is_file() && has_extension(path, &["y4m"]) {
        load_sampled_y4m(path, pick)
    } else if !path.exists() {
        Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ))
    } else {
        Err(Error::NotAClip {
            path: path.to_path_buf(),
        })
    }
}

/// Sample over the readable frames of a folder. Only the sampled files are decoded (in
/// parallel); when one turns out unreadable it is dropped and the sampler runs again over the
/// remaining files, so the result equals sampling over the readable frames.
fn load_sampled_folder(
    dir: &Path,
    mut pick: impl FnMut(usize) -> Vec<usize>,
) -> Result<SampledClip> {
    let mut files = list_frame_files(dir)?;
    let mut decoded: HashMap<PathBuf, RgbImage> = HashMap::new();
    let mut skipped: Vec<SkippedFrame> = Vec::new();
    loop {
        let idx = if files.is_empty() {
            Vec::new()
        } else {
            pick(files.len())
        };
        if idx.is_empty() {
            return Err(Error::NoReadableFrames {
                path: dir.to_path_buf(),
                unreadable: skipped.into_iter().map(|s| s.frame).collect(),
            });
        }
        let mut todo: Vec<&PathBuf> = idx
            .iter()
            .map(|&i| &files[i])
            .filter(|p| !decoded.contains_key(*p))
            .collect();
        todo.dedup();
        let results: Vec<(PathBuf, std::result::Result<RgbImage, String>)> = todo
            .par_iter()
            .map(|p| ((*p).clone(), decode_frame_file(p)))
            .collect();
        let mut bad = Vec::new();
        for (p, r) in results {
            match r {
                Ok(img) => {
                    decoded.insert(p, img);
                }
                Err(reason) => {
                    log::warn!("skipping unreadable frame {}: {reason}", p.display());
                    skipped.push(SkippedFrame {
                        frame: p.display().to_string(),
                        reason,
                    });
                    bad.push(p);
                }
            }
        }
        if bad.is_empty() {
            let frames = idx.iter().map(|&i| decoded[&files[i]].clone()).collect();
            return Ok(SampledClip {
                path: dir.to_path_buf(),
                frames,
                readable_frames: files.len(),
                skipped,
            });
        }
        files.retain(|f| !bad.contains(f));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(v: u8) -> RgbImage {
        RgbImage::from_fn(8, 6, |x, y| image::Rgb([v, (x * 20) as u8, (y * 30) as u8]))
    }

    #[test]
    fn folder_sorted_and_corrupt_skipped() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..20u8 {
            frame(i * 10)
                .save(dir.path().join(format!("{i:03}.png")))
                .unwrap();
        }
        std::fs::write(dir.path().join("005.png"), b"not a png").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"ignored").unwrap();
        let clip = load_sampled_clip(dir.path(), 16).unwrap();
        assert_eq!(clip.readable_frames, 19);
        assert_eq!(clip.skipped.len(), 1);
        assert!(clip.skipped[0].frame.ends_with("005.png"));
        // 19 readable frames -> tick 19/16; frame values identify the source file.
        let readable: Vec<u8> = (0..20u8).filter(|&i| i != 5).map(|i| i * 10).collect();
        let want: Vec<u8> = test_indices(19, 16).iter().map(|&i| readable[i]).collect();
        let got: Vec<u8> = clip.frames.iter().map(|f| f.get_pixel(0, 0).0[0]).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn folder_without_readable_frames_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.jpg"), b"garbage").unwrap();
        let err = load_sampled_clip(dir.path(), 16).unwrap_err();
        assert!(
            matches!(&err, Error::NoReadableFrames { unreadable, .. } if unreadable.len() == 1),
            "{err}"
        );
        assert!(
            err.to_string()
                .ends_with("no readable frame (unreadable: a.jpg)"),
            "{err}"
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(load_sampled_clip(empty.path(), 16).is_err());
    }
}
