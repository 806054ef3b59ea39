//! `pe-clip run` (the device loop) and `pe-clip demo` (the same loop on the built-in demo package
//! and a generated synthetic stream).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::frames::roi::RoiPolicy;
use crate::frames::source::SourceSpec;
use crate::package::Package;
use crate::runtime::smooth::Smoothing;
use crate::runtime::{self, RunConfig, RunSummary};

mod outputs;
mod sources;

use outputs::{close_outputs, event_writer, open_alert, open_link, timeline_text, CliSink};
use sources::{camera_present, open_source};

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
    /// Threads stepping the exact windows' chains side by side (`--hop` below the window gives
    /// ceil(W/H) chains; at most that many threads are used; each has its own tract state).
    #[arg(long, default_value_t = 1)]
    chain_threads: usize,
    /// Step the model as two stages on two threads (blocks 0..B/2 beside the rest, each with
    /// its blocks' states; the same events): for one chain (hop = window, or --continuous),
    /// on the CPU. Faster than --threads 2 where a step is short (docs/device.md).
    #[arg(long, conflicts_with = "chain_threads")]
    block_pipeline: bool,
    /// Where the step model runs: cpu, gpu (tract's CUDA runtime: a build with `--features
    /// gpu` and CUDA on the machine) or auto (the GPU when both are there).
    #[arg(long, default_value = "auto")]
    device: crate::engine::Device,
    /// Sampled frames queued ahead of the model; beyond it a live source drops frames.
    #[arg(long, default_value_t = 2)]
    queue: usize,
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
    let device = match (args.block_pipeline, args.device) {
        (true, crate::engine::Device::Gpu) => {
            anyhow::bail!("--block-pipeline runs on the CPU; leave out --device gpu")
        }
        (true, _) => crate::engine::Device::Cpu,
        (false, d) => d,
    };
    let mut model = package.step_model_on(device)?;
    let source = open_source(&source_spec, &args, package.manifest.preprocess.image_size)?;
    let cfg = run_config(&args, &package, &source_spec, source.fps())?;
    if let Some(p) = &args.plot {
        runtime::plot::check_path(p)?;
    }
    let mut sink = CliSink {
        json: event_writer(&args, demo)?,
        human: demo,
        last_label: None,
        keep: demo || args.plot.is_some(),
        events: Vec::new(),
        stats: args.stats,
        link: open_link(&args, &package)?,
        alert: open_alert(&args, &package)?,
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
    close_outputs(&args, &mut sink);
    finish(&args, &package, &sink, &summary, demo)?;
    Ok(super::EXIT_OK)
}

/// The run's configuration: the package's defaults, then the command line's overrides.
fn run_config(
    args: &Args,
    package: &Package,
    source_spec: &SourceSpec,
    source_fps: Option<f64>,
) -> anyhow::Result<RunConfig> {
    let mut cfg = RunConfig::for_package(package);
    if let Some(s) = args.stride {
        cfg.stride = s;
    } else if let Some(f) = args.fps {
        let src = source_fps.unwrap_or(crate::frames::source::DEFAULT_FPS);
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
    cfg.chain_threads = args.chain_threads;
    cfg.block_pipeline = args.block_pipeline;
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
        cfg.driver = Some(crate::calibration::load_profile(package, name)?);
    }
    cfg.max_frames = args.frames;
    cfg.stats_every = args
        .stats
        .then(|| Duration::from_secs_f64(args.stats_every.max(0.1)));
    Ok(cfg)
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
