//! The frame sources `pe-clip run` opens from `--source`: the synthetic stream, a .y4m file,
//! a frame folder, or a V4L2 camera (with the `camera` feature).

use std::path::Path;
#[cfg(feature = "camera")]
use std::time::Duration;

#[cfg(feature = "camera")]
use anyhow::Context;

use super::Args;
use crate::frames::source::{
    FolderSource, FrameSource, SourceSpec, SynthSource, SynthStreamOptions, Y4mSource,
};

/// The demo's length when `--frames` is not given (40 s of 30 fps video).
const DEMO_FRAMES: u64 = 1200;

pub(super) fn open_source(
    spec: &SourceSpec,
    args: &Args,
    image_size: usize,
) -> anyhow::Result<Box<dyn FrameSource>> {
    Ok(match spec {
        SourceSpec::Synth => Box::new(SynthSource::new(SynthStreamOptions {
            seed: args.seed,
            size: args.synth_size.unwrap_or(image_size as u32),
            frames: args.frames.or(Some(DEMO_FRAMES)),
            fps: args.source_fps.unwrap_or(30.0),
            infrared: args.infrared,
            realtime: args.realtime,
            ..Default::default()
        })?),
        SourceSpec::Y4m(p) => Box::new(Y4mSource::open(p, args.source_fps)?),
        SourceSpec::Folder(p) => Box::new(FolderSource::open(p, args.source_fps)?),
        SourceSpec::Camera(p) => camera_source(p, args)?,
    })
}

#[cfg(not(feature = "camera"))]
pub(super) fn camera_source(p: &Path, _args: &Args) -> anyhow::Result<Box<dyn FrameSource>> {
    anyhow::bail!(
        "{}: this pe-clip was built without the `camera` feature (V4L2 capture); rebuild with \
         `--features camera`, or give a .y4m file, a frame folder or `synth` as --source",
        p.display()
    )
}

#[cfg(feature = "camera")]
pub(super) fn camera_source(p: &Path, args: &Args) -> anyhow::Result<Box<dyn FrameSource>> {
    use crate::frames::camera::v4l2::{CameraOptions, V4l2Camera};
    use crate::frames::camera::{Backoff, CameraSource, PixelFormat};
    let (width, height) = args
        .camera_size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
        .with_context(|| format!("--camera-size {}: expected WxH", args.camera_size))?;
    let format = match args.camera_format.as_str() {
        "auto" => None,
        "mjpeg" => Some(PixelFormat::Mjpeg),
        "yuyv" => Some(PixelFormat::Yuyv),
        other => anyhow::bail!("--camera-format {other}: expected auto, mjpeg or yuyv"),
    };
    let want = CameraOptions {
        width,
        height,
        fps: args.camera_fps,
        format,
    };
    let backoff = Backoff {
        give_up: Duration::from_secs_f64(args.camera_retry_secs.max(0.0)),
        ..Default::default()
    };
    let cam = V4l2Camera::new(p.to_path_buf(), want);
    Ok(Box::new(CameraSource::open(cam, backoff)?))
}

/// Whether a camera is present (for the default source).
pub(super) fn camera_present() -> bool {
    cfg!(feature = "camera") && Path::new("/dev/video0").exists()
}
