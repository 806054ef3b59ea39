//! `pe-clip run` (the device loop) and `pe-clip demo` (the same loop on the built-in demo package
//! and a generated synthetic stream).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::frames::roi::RoiPolicy;
use crate::frames::source::{
    FolderSource, FrameSource, SourceSpec, SynthSource, SynthStreamOptions, Y4mSource,
};
use crate::package::Package;
use crate::runtime::events::{Event, JsonLines};
use crate::runtime::gpio::{output_pin, GpioLine, LocalAlert, NoBuzzer, PinDuty};
use crate::runtime::link::{controller_config, expression, serial_opener, Link, LinkOptions};
use crate::runtime::smooth::Smoothing;
use crate::runtime::stats::StatsReport;
use crate::runtime::{self, RunConfig, RunSummary, Sink};

/// Default plot of the demo.
pub const DEMO_PLOT: &str = "pe-clip-demo.svg";

/// Arguments of `pe-clip run` and `pe-clip demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Model package directory (default: the demo package built into pe-clip).
    #[arg(long, value_name = "DIR")]
    package: Option<PathBuf>,
    /// Apply a driver profile: NAME (fitted with `pe-clip calibrate --driver NAME`, stored in the
    /// package's drivers/) or a profile file.
    #[arg(long, value_name = "NAME")]
    driver: Option<String>,
    /// Frames: `camera` (/dev/video0), /dev/videoN, a .y4m file, a folder of frames, or `synth`.
    /// Without it: the camera if there is one, else the demo on a synthetic stream.
    #[arg(long, value_name = "SOURCE")]
    source: Option<String>,
    /// Face region: `full` frame, `centre` square, `auto` (face detector), or x,y,w,h in pixels.
    /// Default: auto for a camera, full otherwise (files and the synthetic stream are face crops).
    #[arg(long, value_name = "ROI")]
    roi: Option<String>,
    /// Run the model on every S-th source frame (default: the package's stride).
    #[arg(long, value_name = "S", conflicts_with = "fps")]
    stride: Option<usize>,
    /// Run the model at about F frames per second of source time (sets the stride from the
    /// source's frame rate).
    #[arg(long, value_name = "F")]
    fps: Option<f64>,
    /// Sampled frames per prediction (default: the package's window, 16).
    #[arg(long, value_name = "W")]
    window: Option<usize>,
    /// Sampled frames between predictions (default: the window).
    #[arg(long, value_name = "H")]
    hop: Option<usize>,
    /// One recurrent chain never reset; each prediction averages the last W features (one model
    /// step per sampled frame, approximate).
    #[arg(long)]
    continuous: bool,
    /// Before the first full window, a partial prediction every N sampled frames (0: none).
    #[arg(long, value_name = "N", default_value_t = 4)]
    partial_every: usize,
    /// Smoothing of probabilities: none, ema:ALPHA, hysteresis:MARGIN,HOLD.
    #[arg(long, value_name = "SPEC", default_value = "ema:0.5")]
    smooth: String,
    /// Write events (JSON lines) to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    /// Append to the events file instead of replacing it (a service that restarts).
    #[arg(long, requires = "events")]
    append_events: bool,
    /// Write a timeline of class probabilities (SVG).
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Print statistics to stderr every `--stats-every` seconds while running.
    #[arg(long)]
    stats: bool,
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
    stats_every: f64,
    /// Print the final statistics as JSON on stderr.
    #[arg(long)]
    stats_json: bool,
    /// Stop after N source frames.
    #[arg(long, value_name = "N")]
    frames: Option<u64>,
    /// Frame rate of sources without timing (frame folders), and of the synthetic stream.
    #[arg(long, value_name = "F")]
    source_fps: Option<f64>,
    /// Synthetic stream: seed, frame size (default: the model's), near-infrared look, and pacing
    /// at its frame rate like a camera.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    #[arg(long, value_name = "PX")]
    synth_size: Option<u32>,
    #[arg(long)]
    infrared: bool,
    #[arg(long)]
    realtime: bool,
    /// Camera: requested size, frame rate and pixel format (auto: MJPEG if offered, else YUYV),
    /// and how long to keep reopening a camera that disappeared before giving up.
    #[arg(long, value_name = "WxH", default_value = "640x480")]
    camera_size: String,
    #[arg(long, value_name = "FPS", default_value_t = 30)]
    camera_fps: u32,
    #[arg(long, value_name = "FORMAT", default_value = "auto")]
    camera_format: String,
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    camera_retry_secs: f64,
    /// Send expression events and heartbeats to the alert controller on this serial port
    /// (protocol: firmware/PROTOCOL.md). A port that is missing or fails is retried in the
    /// background; it never stops the loop.
    #[arg(long, value_name = "/dev/ttyXXX")]
    link: Option<String>,
    #[arg(long, default_value_t = 115_200)]
    baud: u32,
    /// Run the alert controller in-process with its LED on this GPIO line
    /// (/dev/gpiochipN:LINE), and optionally a buzzer or motor (on/off) on another.
    #[arg(long, value_name = "CHIP:LINE")]
    gpio: Option<String>,
    #[arg(long, value_name = "CHIP:LINE", requires = "gpio")]
    gpio_buzzer: Option<String>,
    /// Threads for tract's matmuls (the frame reader has its own thread).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Sampled frames queued ahead of the model; beyond it a live source drops frames.
    #[arg(long, default_value_t = 2)]
    queue: usize,
}

/// The demo's length when `--frames` is not given (40 s of 30 fps video).
const DEMO_FRAMES: u64 = 1200;

fn open_source(
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
fn camera_source(p: &Path, _args: &Args) -> anyhow::Result<Box<dyn FrameSource>> {
    anyhow::bail!(
        "{}: this pe-clip was built without the `camera` feature (V4L2 capture); rebuild with \
         `--features camera`, or give a .y4m file, a frame folder or `synth` as --source",
        p.display()
    )
}

#[cfg(feature = "camera")]
fn camera_source(p: &Path, args: &Args) -> anyhow::Result<Box<dyn FrameSource>> {
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
fn camera_present() -> bool {
    cfg!(feature = "camera") && Path::new("/dev/video0").exists()
}

/// One-letter symbols for the timeline, unique per class.
fn class_symbols(classes: &[String]) -> Vec<char> {
    let mut used = Vec::new();
    for name in classes {
        let c = name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_lowercase())
            .find(|c| !used.contains(c))
            .or_else(|| ('a'..='z').find(|c| !used.contains(c)))
            .unwrap_or('?');
        used.push(c);
    }
    used
}

/// The demo's text timeline: one column per full-window prediction.
pub fn timeline_text(classes: &[String], events: &[Event]) -> String {
    let sym = class_symbols(classes);
    let full: Vec<&Event> = events.iter().filter(|e| !e.partial).collect();
    let symbol = |name: &str| {
        classes
            .iter()
            .position(|c| c == name)
            .map(|i| sym[i])
            .unwrap_or('?')
    };
    let mut out = String::new();
    let span = match full.as_slice() {
        [a, b, ..] => (b.t_ms - a.t_ms) / 1000.0,
        _ => 0.0,
    };
    out.push_str(&format!(
        "timeline: one column per window ({span:.2} s apart), {} windows\n",
        full.len()
    ));
    let line: String = full.iter().map(|e| symbol(&e.label)).collect();
    out.push_str(&format!("  label  {line}\n"));
    if full.iter().any(|e| e.truth.is_some()) {
        let truth: String = full
            .iter()
            .map(|e| e.truth.as_deref().map(symbol).unwrap_or(' '))
            .collect();
        out.push_str(&format!("  truth  {truth}\n"));
        let agree = full
            .iter()
            .filter(|e| e.truth.as_deref() == Some(e.label.as_str()))
            .count();
        out.push_str(&format!(
            "  windows whose label is the class shown at their last frame: {agree} of {} \
             ({:.1} %)\n",
            full.len(),
            100.0 * agree as f64 / full.len().max(1) as f64
        ));
    }
    let legend: Vec<String> = classes
        .iter()
        .zip(&sym)
        .map(|(c, s)| format!("{s} {c}"))
        .collect();
    out.push_str(&format!("  {}\n", legend.join("  ")));
    out
}

struct CliSink {
    json: Option<JsonLines<Box<dyn Write>>>,
    /// Demo: human lines on label changes.
    human: bool,
    last_label: Option<String>,
    keep: bool,
    events: Vec<Event>,
    stats: bool,
    /// `--link`: the alert controller's serial line, and the class names to index events.
    link: Option<Link>,
    /// `--gpio`: the alert controller in-process on the board's GPIO.
    alert: Option<LocalAlert>,
    classes: Vec<String>,
}

impl Sink for CliSink {
    fn event(&mut self, e: &Event) -> crate::error::Result<()> {
        if let Some(j) = self.json.as_mut() {
            j.write(e)
                .map_err(|err| crate::error::Error::io("events", err))?;
        }
        if self.human && self.last_label.as_deref() != Some(e.label.as_str()) {
            println!(
                "{:>7.2} s  frame {:>5}  {:<10} {:.2}{}{}",
                e.t_ms / 1000.0,
                e.frame,
                e.label,
                e.confidence,
                e.truth
                    .as_deref()
                    .map(|t| format!("   (shown: {t})"))
                    .unwrap_or_default(),
                if e.partial { "   [partial window]" } else { "" }
            );
            self.last_label = Some(e.label.clone());
        }
        if let (false, Some(class)) = (e.partial, self.classes.iter().position(|c| *c == e.label)) {
            let msg = expression(class, e.confidence, e.t_ms);
            if let Some(link) = self.link.as_mut() {
                link.send(msg);
            }
            if let Some(alert) = &self.alert {
                alert.send(msg);
            }
        }
        if self.keep {
            self.events.push(e.clone());
        }
        Ok(())
    }

    fn stats(&mut self, r: &StatsReport) -> crate::error::Result<()> {
        if self.stats {
            eprintln!("stats: {}", r.line());
        }
        Ok(())
    }
}

/// `pe-clip run`.
pub fn run(args: Args) -> anyhow::Result<u8> {
    let demo = args.source.is_none() && !camera_present();
    run_with(args, demo)
}

/// `pe-clip demo`.
pub fn demo(args: Args) -> anyhow::Result<u8> {
    run_with(args, true)
}

fn run_with(mut args: Args, demo: bool) -> anyhow::Result<u8> {
    crate::engine::set_threads(args.threads);
    let package = match &args.package {
        Some(dir) => Package::open(dir)?,
        None => Package::embedded_demo()?,
    };
    let source_spec = match (&args.source, demo) {
        (Some(s), _) => SourceSpec::parse(s)?,
        (None, true) => SourceSpec::Synth,
        (None, false) => SourceSpec::Camera(PathBuf::from("/dev/video0")),
    };
    if demo && args.plot.is_none() {
        args.plot = Some(PathBuf::from(DEMO_PLOT));
    }
    let mut model = package.step_model()?;
    let source = open_source(&source_spec, &args, package.manifest.preprocess.image_size)?;
    let mut cfg = RunConfig::for_package(&package);
    if let Some(s) = args.stride {
        cfg.stride = s;
    } else if let Some(f) = args.fps {
        let src = source.fps().unwrap_or(crate::frames::source::DEFAULT_FPS);
        anyhow::ensure!(f > 0.0, "--fps {f}: must be positive");
        cfg.stride = ((src / f).round() as usize).max(1);
    }
    if let Some(w) = args.window {
        cfg.windowing.window = w;
        cfg.windowing.hop = w;
    }
    if let Some(h) = args.hop {
        cfg.windowing.hop = h;
    }
    cfg.windowing.continuous = args.continuous;
    cfg.windowing.partial_every = args.partial_every;
    cfg.smoothing = args.smooth.parse::<Smoothing>()?;
    cfg.roi = match &args.roi {
        Some(r) => r.parse::<RoiPolicy>()?,
        None if matches!(source_spec, SourceSpec::Camera(_)) => RoiPolicy::Auto,
        None => RoiPolicy::Full,
    };
    cfg.queue = args.queue;
    if let Some(name) = &args.driver {
        cfg.driver = Some(crate::calibration::load_profile(&package, name)?);
    }
    cfg.max_frames = args.frames;
    cfg.stats_every = args
        .stats
        .then(|| Duration::from_secs_f64(args.stats_every.max(0.1)));
    if let Some(p) = &args.plot {
        runtime::plot::check_path(p)?;
    }
    let json: Option<JsonLines<Box<dyn Write>>> = match (&args.events, demo) {
        (Some(path), _) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(args.append_events)
                .truncate(!args.append_events)
                .open(path)
                .with_context(|| format!("cannot open the events file {}", path.display()))?;
            Some(JsonLines::new(Box::new(std::io::BufWriter::new(f))))
        }
        (None, false) => Some(JsonLines::new(Box::new(std::io::stdout()))),
        (None, true) => None,
    };
    let mut sink = CliSink {
        json,
        human: demo,
        last_label: None,
        keep: demo || args.plot.is_some(),
        events: Vec::new(),
        stats: args.stats,
        link: match &args.link {
            Some(path) => Some(Link::start(
                path,
                serial_opener(path.clone(), args.baud),
                LinkOptions {
                    config: controller_config(&package.class_names())?,
                    ..LinkOptions::default()
                },
            )?),
            None => None,
        },
        alert: match &args.gpio {
            Some(led) => {
                let led = output_pin(&led.parse::<GpioLine>()?)?;
                let config = controller_config(&package.class_names())?;
                Some(match &args.gpio_buzzer {
                    Some(b) => {
                        let buzzer = PinDuty(output_pin(&b.parse::<GpioLine>()?)?);
                        LocalAlert::start(led, buzzer, config)?
                    }
                    None => LocalAlert::start(led, NoBuzzer, config)?,
                })
            }
            None => None,
        },
        classes: package.class_names(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second handler cannot be installed (tests call this twice): then Ctrl-C keeps the
        // default behaviour.
        let _ = ctrlc::set_handler(move || {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }
    let m = &package.manifest;
    if demo {
        println!(
            "pe-clip demo: {} ({}, {} px, window {}, stride {}) on {}",
            package.dir.display(),
            m.precision,
            m.preprocess.image_size,
            cfg.windowing.window,
            cfg.stride,
            source.describe()
        );
    }
    let summary = runtime::run(&package, &mut model, source, &cfg, &mut sink, stop)?;
    if let Some(link) = sink.link.take() {
        let s = link.finish();
        eprintln!(
            "link {}: {} frames ({} expressions, {} heartbeats), {} events not sent, {} \
             connections, {} write errors",
            args.link.as_deref().unwrap_or_default(),
            s.frames,
            s.expressions,
            s.heartbeats,
            s.dropped,
            s.connects,
            s.write_errors
        );
    }
    if let Some(alert) = sink.alert.take() {
        let errors = alert.finish();
        if errors > 0 {
            eprintln!("alert GPIO: {errors} output writes failed");
        }
    }
    finish(&args, &package, &sink, &summary, demo)?;
    Ok(super::EXIT_OK)
}

fn finish(
    args: &Args,
    package: &Package,
    sink: &CliSink,
    summary: &RunSummary,
    demo: bool,
) -> anyhow::Result<()> {
    let classes = package.class_names();
    if demo {
        print!("{}", timeline_text(&classes, &sink.events));
    }
    if let Some(p) = &args.plot {
        let title = format!("pe-clip: {} on {}", package.dir.display(), summary.source);
        runtime::plot::write_timeline(p, &classes, &sink.events, &title)?;
        if demo {
            println!("plot: {}", p.display());
        } else {
            log::info!("wrote the timeline to {}", p.display());
        }
    }
    let s = &summary.stats;
    if args.stats_json {
        eprintln!("{}", serde_json::to_string(s)?);
    }
    eprintln!(
        "{}{}",
        if summary.interrupted {
            "interrupted: "
        } else {
            ""
        },
        s.line()
    );
    if summary.face_detections.0 > 0 {
        eprintln!(
            "face detector: {} of {} detections found a face",
            summary.face_detections.1, summary.face_detections.0
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_are_unique_per_class() {
        let names: Vec<String> = pe_clip_models::ClassSet::default()
            .classes
            .iter()
            .map(|c| c.name.clone())
            .collect();
        let s = class_symbols(&names);
        let mut u = s.clone();
        u.sort();
        u.dedup();
        assert_eq!(u.len(), names.len(), "{s:?}");
    }
}
