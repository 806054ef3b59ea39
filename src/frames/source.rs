//! Frame sources behind one trait: a `.y4m` file, a folder of frames, the built-in synthetic
//! stream, and (feature `camera`) a V4L2 camera. Every frame carries its index in the source and
//! a timestamp; a frame that cannot be decoded is reported as [`Item::Corrupt`] so the caller can
//! skip and count it.

use std::path::{Path, PathBuf};

use image::RgbImage;
use pe_clip_models::rng::SeededRng;
use pe_clip_models::synth::{ClipSpec, Identity, SynthOptions, SYNTH_CLASSES};
use pe_clip_models::video::{decode_frame_file, list_frame_files, Y4mStream};

use crate::error::{Error, Result};

/// Frame rate assumed for sources that carry no timing (frame folders), unless told otherwise.
pub const DEFAULT_FPS: f64 = 30.0;

/// One decoded frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Position in the source, counting unreadable frames too (0-based).
    pub index: u64,
    /// Time since the start of the source, in milliseconds.
    pub t_ms: f64,
    pub image: RgbImage,
    /// The class shown, when the source knows it (the synthetic stream).
    pub truth: Option<usize>,
}

impl Frame {
    /// Frame `index` of a source running at `fps`, with no known class.
    fn at(index: u64, fps: f64, image: RgbImage) -> Self {
        Self {
            index,
            t_ms: index as f64 * 1000.0 / fps,
            image,
            truth: None,
        }
    }
}

/// What a source yields.
#[derive(Debug, Clone)]
pub enum Item {
    Frame(Frame),
    /// A frame that could not be read: skipped and counted by the runtime.
    Corrupt {
        index: u64,
        frame: String,
        reason: String,
    },
}

/// A stream of frames. `Ok(None)` ends it; an `Err` is a fault of the whole source (a camera
/// that stays away after its retries), not of one frame.
pub trait FrameSource: Send {
    /// What the source is, for logs and the summary.
    fn describe(&self) -> String;
    /// Frames per second of the source, when known.
    fn fps(&self) -> Option<f64>;
    /// A live source (a camera) produces frames whether or not they are consumed: the runtime
    /// drops frames rather than queue them when inference falls behind. File sources wait.
    fn is_live(&self) -> bool {
        false
    }
    /// The next frame or corrupt-frame report.
    fn next_item(&mut self) -> Result<Option<Item>>;
}

/// A `.y4m` file read frame by frame.
pub struct Y4mSource {
    path: PathBuf,
    stream: Y4mStream,
    fps: f64,
    index: u64,
}

impl Y4mSource {
    /// Open `path`; `fps` overrides the header's frame rate.
    pub fn open(path: &Path, fps: Option<f64>) -> Result<Self> {
        let stream = Y4mStream::open(path).map_err(|e| Error::invalid(path, e.to_string()))?;
        let fps = fps.or(stream.fps()).unwrap_or(DEFAULT_FPS);
        Ok(Self {
            path: path.to_path_buf(),
            stream,
            fps,
            index: 0,
        })
    }
}

impl FrameSource for Y4mSource {
    fn describe(&self) -> String {
        let (w, h) = self.stream.size();
        format!("{} ({w}x{h}, {} fps)", self.path.display(), self.fps)
    }

    fn fps(&self) -> Option<f64> {
        Some(self.fps)
    }

    fn next_item(&mut self) -> Result<Option<Item>> {
        let index = self.index;
        self.index += 1;
        Ok(self.stream.next_frame().map(|r| match r {
            Ok(image) => Item::Frame(Frame::at(index, self.fps, image)),
            Err(s) => Item::Corrupt {
                index,
                frame: s.frame,
                reason: s.reason,
            },
        }))
    }
}

/// A folder of JPEG/PNG frames in file-name order.
#[derive(Debug)]
pub struct FolderSource {
    dir: PathBuf,
    files: Vec<PathBuf>,
    fps: f64,
    index: usize,
}

impl FolderSource {
    /// List the frames of `dir`; frames are `1000 / fps` ms apart.
    pub fn open(dir: &Path, fps: Option<f64>) -> Result<Self> {
        let files = list_frame_files(dir).map_err(|e| Error::invalid(dir, e.to_string()))?;
        if files.is_empty() {
            return Err(Error::invalid(
                dir,
                "no frames (.jpg, .jpeg, .png) in this folder",
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            fps: fps.unwrap_or(DEFAULT_FPS),
            index: 0,
        })
    }
}

impl FrameSource for FolderSource {
    fn describe(&self) -> String {
        format!(
            "{} ({} frames, {} fps)",
            self.dir.display(),
            self.files.len(),
            self.fps
        )
    }

    fn fps(&self) -> Option<f64> {
        Some(self.fps)
    }

    fn next_item(&mut self) -> Result<Option<Item>> {
        let Some(path) = self.files.get(self.index) else {
            return Ok(None);
        };
        let index = self.index as u64;
        self.index += 1;
        Ok(Some(match decode_frame_file(path) {
            Ok(image) => Item::Frame(Frame::at(index, self.fps, image)),
            Err(reason) => Item::Corrupt {
                index,
                frame: path.display().to_string(),
                reason,
            },
        }))
    }
}

/// Options of the synthetic stream.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthStreamOptions {
    pub seed: u64,
    /// Frame size in pixels (square).
    pub size: u32,
    /// Total frames; `None` runs until stopped.
    pub frames: Option<u64>,
    pub fps: f64,
    /// Frames per expression segment (each segment is one synthetic clip of one class).
    pub segment_frames: (usize, usize),
    /// Near-infrared look (grey, as in-car cameras at night).
    pub infrared: bool,
    /// Pace frames at `fps` like a camera (and let the runtime drop frames when it falls behind).
    pub realtime: bool,
}

impl Default for SynthStreamOptions {
    fn default() -> Self {
        Self {
            seed: 7,
            size: 64,
            frames: Some(1200),
            fps: 30.0,
            segment_frames: (48, 96),
            infrared: false,
            realtime: false,
        }
    }
}

/// The synthetic face generator as a live stream: one driver (identity), a sequence of
/// expression segments of random classes, head pose continuous across segments.
pub struct SynthSource {
    opts: SynthStreamOptions,
    rng: SeededRng,
    identity: Identity,
    segment: ClipSpec,
    segment_start: u64,
    index: u64,
    started: Option<std::time::Instant>,
}

impl SynthSource {
    pub fn new(opts: SynthStreamOptions) -> Result<Self> {
        if opts.size < 16
            || opts.segment_frames.0 == 0
            || opts.segment_frames.1 < opts.segment_frames.0
        {
            return Err(Error::usage(format!(
                "synthetic stream: size {} (at least 16) and segment lengths {:?} (min <= max, \
                 min >= 1) are invalid",
                opts.size, opts.segment_frames
            )));
        }
        if opts.fps.is_nan() || opts.fps <= 0.0 {
            return Err(Error::usage(format!(
                "synthetic stream: fps {} must be positive",
                opts.fps
            )));
        }
        let mut rng = SeededRng::new(opts.seed);
        let identity = Identity::random(&mut rng);
        let segment = Self::next_segment(&opts, &mut rng, &identity, None, 2);
        Ok(Self {
            opts,
            rng,
            identity,
            segment,
            segment_start: 0,
            index: 0,
            started: None,
        })
    }

    fn next_segment(
        opts: &SynthStreamOptions,
        rng: &mut SeededRng,
        identity: &Identity,
        previous: Option<&ClipSpec>,
        label: usize,
    ) -> ClipSpec {
        let synth = SynthOptions {
            min_frames: opts.segment_frames.0,
            max_frames: opts.segment_frames.1,
            infrared: opts.infrared,
            distractors: true,
        };
        let mut spec = ClipSpec::random(identity.clone(), label, &synth, rng);
        if let Some(prev) = previous {
            // One car, one camera: lighting and background stay, the head moves on smoothly.
            spec.pose[0] = prev.pose[1];
            spec.light = prev.light;
            spec.background = prev.background;
            spec.noise = prev.noise;
        }
        spec
    }
}

impl FrameSource for SynthSource {
    fn describe(&self) -> String {
        format!(
            "synthetic stream (seed {}, {} px, {} fps{})",
            self.opts.seed,
            self.opts.size,
            self.opts.fps,
            if self.opts.infrared { ", infrared" } else { "" }
        )
    }

    fn fps(&self) -> Option<f64> {
        Some(self.opts.fps)
    }

    fn is_live(&self) -> bool {
        self.opts.realtime
    }

    fn next_item(&mut self) -> Result<Option<Item>> {
        if self.opts.frames.is_some_and(|n| self.index >= n) {
            return Ok(None);
        }
        let mut t = (self.index - self.segment_start) as usize;
        if t >= self.segment.frames {
            // Alternate expressions with neutral stretches, as a drive would.
            let label = if self.segment.label != 2 && self.rng.uniform() < 0.5 {
                2
            } else {
                let mut l = self.rng.below(SYNTH_CLASSES);
                if l == self.segment.label {
                    l = (l + 1) % SYNTH_CLASSES;
                }
                l
            };
            self.segment = Self::next_segment(
                &self.opts,
                &mut self.rng,
                &self.identity,
                Some(&self.segment),
                label,
            );
            self.segment_start = self.index;
            t = 0;
        }
        let t_ms = self.index as f64 * 1000.0 / self.opts.fps;
        if self.opts.realtime {
            let start = *self.started.get_or_insert_with(std::time::Instant::now);
            let due = std::time::Duration::from_secs_f64(t_ms / 1000.0);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let frame = Frame {
            index: self.index,
            t_ms,
            image: self.segment.render(t, self.opts.size),
            truth: Some(self.segment.label),
        };
        self.index += 1;
        Ok(Some(Item::Frame(frame)))
    }
}

/// Where frames come from, as given on the command line.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceSpec {
    /// The synthetic stream.
    Synth,
    /// A V4L2 device (`camera` is `/dev/video0`).
    Camera(PathBuf),
    Y4m(PathBuf),
    Folder(PathBuf),
}

impl SourceSpec {
    /// `synth`, `camera`, `/dev/videoN`, a `.y4m` file or a folder of frames.
    pub fn parse(s: &str) -> Result<Self> {
        let path = Path::new(s);
        Ok(match s {
            "synth" | "synthetic" => SourceSpec::Synth,
            "camera" => SourceSpec::Camera(PathBuf::from("/dev/video0")),
            _ if s.starts_with("/dev/video") => SourceSpec::Camera(path.to_path_buf()),
            _ if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("y4m")) =>
            {
                SourceSpec::Y4m(path.to_path_buf())
            }
            _ if path.is_dir() => SourceSpec::Folder(path.to_path_buf()),
            _ if !path.exists() => {
                return Err(Error::usage(format!(
                    "source {s}: no such file or folder (use synth, camera, /dev/videoN, a .y4m \
                     file or a folder of frames)"
                )))
            }
            _ => {
                return Err(Error::usage(format!(
                    "source {s}: not a .y4m file or a folder of frames (convert other videos \
                     with `ffmpeg -i in.mp4 -pix_fmt yuv420p out.y4m`)"
                )))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_stream_is_deterministic_and_labelled() {
        let opts = SynthStreamOptions {
            frames: Some(300),
            size: 32,
            ..Default::default()
        };
        let collect = |opts: &SynthStreamOptions| {
            let mut s = SynthSource::new(opts.clone()).unwrap();
            let mut out = Vec::new();
            while let Some(Item::Frame(f)) = s.next_item().unwrap() {
                out.push(f);
            }
            out
        };
        let a = collect(&opts);
        let b = collect(&opts);
        assert_eq!(a.len(), 300);
        assert!(a
            .iter()
            .zip(&b)
            .all(|(x, y)| x.image == y.image && x.truth == y.truth));
        assert_eq!(a[0].truth, Some(2), "a drive starts neutral");
        let labels: std::collections::BTreeSet<_> = a.iter().filter_map(|f| f.truth).collect();
        assert!(labels.len() >= 3, "{labels:?}");
        assert!((a[30].t_ms - 1000.0).abs() < 1e-9);
        let c = collect(&SynthStreamOptions { seed: 8, ..opts });
        assert!(a.iter().zip(&c).any(|(x, y)| x.image != y.image));
    }

    #[test]
    fn source_specs_parse_and_name_bad_paths() {
        assert_eq!(SourceSpec::parse("synth").unwrap(), SourceSpec::Synth);
        assert_eq!(
            SourceSpec::parse("camera").unwrap(),
            SourceSpec::Camera("/dev/video0".into())
        );
        let err = SourceSpec::parse("/no/such/clip.mp4")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/no/such/clip.mp4"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            SourceSpec::parse(dir.path().to_str().unwrap()).unwrap(),
            SourceSpec::Folder(dir.path().to_path_buf())
        );
        let empty = FolderSource::open(dir.path(), None)
            .unwrap_err()
            .to_string();
        assert!(empty.contains("no frames"), "{empty}");
    }

    #[test]
    fn folder_source_reports_corrupt_frames_and_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let img = RgbImage::from_pixel(8, 8, image::Rgb([10, 20, 30]));
        img.save(dir.path().join("000.png")).unwrap();
        std::fs::write(dir.path().join("001.png"), b"not a png").unwrap();
        img.save(dir.path().join("002.png")).unwrap();
        let mut s = FolderSource::open(dir.path(), Some(10.0)).unwrap();
        let mut kinds = Vec::new();
        while let Some(item) = s.next_item().unwrap() {
            kinds.push(match item {
                Item::Frame(f) => format!("frame {} {}", f.index, f.t_ms),
                Item::Corrupt { index, frame, .. } => {
                    assert!(frame.ends_with("001.png"));
                    format!("corrupt {index}")
                }
            });
        }
        assert_eq!(kinds, ["frame 0 0", "corrupt 1", "frame 2 200"]);
    }
}
