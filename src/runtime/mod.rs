//! The device runtime: frames from a source, the package's preprocessing, the int8 (or f32) step
//! model frame by frame with its recurrent state carried, exact sliding windows, smoothing, and
//! expression events.
//!
//! Two threads: the reader pulls frames from the source, keeps every `stride`-th, crops and
//! resizes it, and hands it over through a bounded queue; the model thread steps the model and
//! emits events. A live source (camera) never waits for the model: when the queue is full the
//! sampled frame is dropped and counted. File sources wait, so every frame is used.

pub mod events;
pub mod gpio;
pub mod link;
pub mod plot;
pub mod smooth;
pub mod stats;
pub mod stream;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pe_clip_models::PreprocessSpec;

use crate::engine::StepModel;
use crate::error::{Error, Result};
use crate::frames::roi::{self, AutoRoiOptions, RoiPolicy, RoiTracker};
use crate::frames::source::{FrameSource, Item};
use crate::package::Package;
use events::Event;
use smooth::{Smoother, Smoothing};
use stats::{RunStats, StatsReport};
use stream::{Streamer, Windowing};

/// How a run samples, windows, smooths and reports.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Source frames per sampled frame (1: every frame).
    pub stride: usize,
    pub windowing: Windowing,
    pub smoothing: Smoothing,
    pub roi: RoiPolicy,
    pub auto_roi: AutoRoiOptions,
    /// Sampled frames the reader may queue ahead of the model.
    pub queue: usize,
    /// Stop after this many source frames.
    pub max_frames: Option<u64>,
    /// Report statistics this often (to the sink) while running.
    pub stats_every: Option<Duration>,
    /// A driver profile (`--driver`), checked against the package.
    pub driver: Option<pe_clip_calibrate::profile::DriverProfile>,
    /// Threads stepping the exact windows' chains side by side (at most the number of chains).
    pub chain_threads: usize,
    /// Step the model as two stages on two threads (`engine::BlockPipeline`; one chain only).
    pub block_pipeline: bool,
}

impl RunConfig {
    /// Defaults for `package`: its window and stride, hop = window.
    pub fn for_package(package: &Package) -> Self {
        let t = &package.manifest.temporal;
        Self {
            stride: t.stride.max(1),
            windowing: Windowing {
                window: t.window,
                hop: t.window,
                continuous: false,
                partial_every: 4,
            },
            smoothing: Smoothing::default(),
            roi: RoiPolicy::Full,
            auto_roi: AutoRoiOptions::default(),
            queue: 2,
            max_frames: None,
            stats_every: None,
            driver: None,
            chain_threads: 1,
            block_pipeline: false,
        }
    }
}

/// Where events and periodic statistics go.
pub trait Sink {
    fn event(&mut self, event: &Event) -> Result<()>;
    fn stats(&mut self, _report: &StatsReport) -> Result<()> {
        Ok(())
    }
}

impl<F: FnMut(&Event) -> Result<()>> Sink for F {
    fn event(&mut self, event: &Event) -> Result<()> {
        self(event)
    }
}

/// The end of a run.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub source: String,
    pub stats: StatsReport,
    /// The run ended because `stop` was set (Ctrl-C), not at the end of the source.
    pub interrupted: bool,
    /// `--roi auto`: detections run and faces found.
    pub face_detections: (usize, usize),
}

/// A sampled, preprocessed frame on its way to the model.
struct Sampled {
    index: u64,
    t_ms: f64,
    bytes: Vec<u8>,
    truth: Option<usize>,
    arrived: Instant,
    prep_ms: f64,
}

enum Msg {
    Frame(Sampled),
    End(Result<(usize, usize)>),
}

#[derive(Default)]
struct Counters {
    frames: AtomicU64,
    sampled: AtomicU64,
    dropped: AtomicU64,
    corrupt: AtomicU64,
}

fn reader(
    mut source: Box<dyn FrameSource>,
    cfg: RunConfig,
    spec: PreprocessSpec,
    tx: mpsc::SyncSender<Msg>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) {
    let live = source.is_live();
    let result = (|| -> Result<(usize, usize)> {
        let mut tracker = RoiTracker::new(cfg.roi, cfg.auto_roi)?;
        let stride = cfg.stride.max(1) as u64;
        while !stop.load(Ordering::Relaxed) {
            if cfg
                .max_frames
                .is_some_and(|n| counters.frames.load(Ordering::Relaxed) >= n)
            {
                break;
            }
            let item = match source.next_item()? {
                Some(item) => item,
                None => break,
            };
            let frame = match item {
                Item::Frame(f) => f,
                Item::Corrupt {
                    index,
                    frame,
                    reason,
                } => {
                    log::warn!("frame {index} ({frame}) skipped: {reason}");
                    counters.corrupt.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            counters.frames.fetch_add(1, Ordering::Relaxed);
            if frame.index % stride != 0 {
                continue;
            }
            counters.sampled.fetch_add(1, Ordering::Relaxed);
            let arrived = Instant::now();
            let region = tracker.region(&frame.image);
            let bytes = roi::model_input(&spec, &frame.image, region);
            let msg = Msg::Frame(Sampled {
                index: frame.index,
                t_ms: frame.t_ms,
                bytes,
                truth: frame.truth,
                arrived,
                prep_ms: arrived.elapsed().as_secs_f64() * 1e3,
            });
            if live {
                match tx.try_send(msg) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        counters.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(TrySendError::Disconnected(_)) => break,
                }
            } else if tx.send(msg).is_err() {
                break;
            }
        }
        Ok((tracker.detections, tracker.found))
    })();
    let _ = tx.send(Msg::End(result));
}

impl Counters {
    /// Copy the reader's counts into `s`.
    fn snapshot(&self, s: &mut RunStats) {
        s.counts.frames = self.frames.load(Ordering::Relaxed);
        s.counts.sampled = self.sampled.load(Ordering::Relaxed);
        s.counts.dropped = self.dropped.load(Ordering::Relaxed);
        s.counts.corrupt = self.corrupt.load(Ordering::Relaxed);
    }
}

/// The model side of the run loop, for one sampled frame.
struct Frame<'a> {
    model: &'a mut StepModel,
    streamer: &'a mut Streamer,
    smoother: &'a mut Smoother,
    classes: &'a [String],
    /// Frames in the block pipeline: what their events need, and when they were submitted.
    pending: &'a mut std::collections::VecDeque<(Sampled, Instant)>,
}

impl Frame<'_> {
    /// Step the model on `s`; on a prediction, smooth it and hand the event to `sink`. Records
    /// the latencies in every one of `stats` (the whole run's, the interval's). With the block
    /// pipeline, `s` is submitted and accounted for by a later [`Frame::complete`]; this waits
    /// only while two frames are in flight.
    fn process(
        &mut self,
        mut s: Sampled,
        sink: &mut dyn Sink,
        stats: [&mut RunStats; 2],
    ) -> Result<()> {
        let t0 = Instant::now();
        if self.streamer.pipelined() {
            self.streamer
                .submit(std::mem::take(&mut s.bytes), s.index, s.t_ms)?;
            self.pending.push_back((s, t0));
            let [run, interval] = stats;
            while self.streamer.in_flight() >= 2 {
                self.complete(sink, [&mut *run, &mut *interval])?;
            }
            return Ok(());
        }
        let steps_before = self.streamer.steps;
        let pred = self.streamer.push(self.model, &s.bytes, s.index, s.t_ms)?;
        self.account(pred, &s, t0, steps_before, sink, stats)
    }

    /// Wait for the oldest frame in the block pipeline and account for it (nothing to do when
    /// none is in flight).
    fn complete(&mut self, sink: &mut dyn Sink, stats: [&mut RunStats; 2]) -> Result<()> {
        let Some((s, t0)) = self.pending.pop_front() else {
            return Ok(());
        };
        let steps_before = self.streamer.steps;
        let pred = self.streamer.complete()?;
        self.account(pred, &s, t0, steps_before, sink, stats)
    }

    fn account(
        &mut self,
        pred: Option<stream::Prediction>,
        s: &Sampled,
        t0: Instant,
        steps_before: u64,
        sink: &mut dyn Sink,
        stats: [&mut RunStats; 2],
    ) -> Result<()> {
        let frame_ms = s.prep_ms + t0.elapsed().as_secs_f64() * 1e3;
        let [run, interval] = stats;
        run.counts.processed += 1;
        run.counts.steps += self.streamer.steps - steps_before;
        run.frame_latency.record(frame_ms);
        interval.frame_latency.record(frame_ms);
        if let Some(p) = pred {
            let (smoothed, label) = self.smoother.update(&p.probs);
            let latency_ms = s.arrived.elapsed().as_secs_f64() * 1e3;
            let event = Event::new(&p, smoothed, label, self.classes, latency_ms, s.truth);
            sink.event(&event)?;
            run.counts.predictions += 1;
            run.event_latency.record(latency_ms);
            interval.event_latency.record(latency_ms);
        }
        Ok(())
    }
}

/// Run `model` (loaded from `package`) over `source` until it ends or `stop` is set.
pub fn run(
    package: &Package,
    model: &mut StepModel,
    source: Box<dyn FrameSource>,
    cfg: &RunConfig,
    sink: &mut dyn Sink,
    stop: Arc<AtomicBool>,
) -> Result<RunSummary> {
    if cfg.stride == 0 {
        return Err(Error::usage("stride must be at least 1"));
    }
    let classes = package.class_names();
    let mut streamer = Streamer::new(model, package.manifest.head.clone(), cfg.windowing)?;
    if let Some(p) = &cfg.driver {
        p.validate(&package.model_binding())
            .map_err(|e| Error::calibrate(format!("driver profile {}", p.name), e))?;
        log::info!("driver profile {} ({})", p.name, p.method);
        streamer = streamer.with_correction(p.correction());
    }
    if cfg.chain_threads > 1 {
        streamer = streamer.with_chain_threads(model, cfg.chain_threads)?;
    }
    if cfg.block_pipeline {
        let context = package.model_path().display().to_string();
        let pipeline = crate::engine::BlockPipeline::new(&package.model_bytes()?, &context, None)?;
        log::info!(
            "block pipeline: blocks 0..{} on one thread, the rest on another",
            pipeline.cut()
        );
        streamer = streamer.with_block_pipeline(pipeline)?;
    }
    let mut pending = std::collections::VecDeque::with_capacity(2);
    let mut smoother = Smoother::new(cfg.smoothing);
    let description = source.describe();
    log::info!(
        "running {} on {description}: stride {}, window {}, hop {}{}, roi {:?}, smoothing {}",
        package.dir.display(),
        cfg.stride,
        cfg.windowing.window,
        cfg.windowing.hop,
        if cfg.windowing.continuous {
            " (continuous)"
        } else {
            ""
        },
        cfg.roi,
        cfg.smoothing
    );
    let counters = Arc::new(Counters::default());
    let (tx, rx) = mpsc::sync_channel(cfg.queue.max(1));
    let spec = package.preprocess_spec();
    let reader_handle = {
        let (cfg, counters, stop) = (cfg.clone(), counters.clone(), stop.clone());
        std::thread::Builder::new()
            .name("pe-clip-reader".into())
            .spawn(move || reader(source, cfg, spec, tx, counters, stop))
            .map_err(|source| Error::Thread {
                name: "reader",
                source,
            })?
    };
    let started = Instant::now();
    let mut stats = RunStats::default();
    let mut interval = RunStats::default();
    let mut last_report = Instant::now();
    let outcome = loop {
        if let Some(every) = cfg.stats_every {
            if last_report.elapsed() >= every {
                counters.snapshot(&mut stats);
                let mut r = stats.report(started.elapsed().as_secs_f64());
                // Percentiles of this interval; counters since the start.
                r.frame_latency = interval.frame_latency.summary();
                r.event_latency = interval.event_latency.summary();
                sink.stats(&r)?;
                interval = RunStats::default();
                last_report = Instant::now();
            }
        }
        let mut frame = Frame {
            model: &mut *model,
            streamer: &mut streamer,
            smoother: &mut smoother,
            classes: &classes,
            pending: &mut pending,
        };
        // A frame in the block pipeline is finished as soon as no next frame is waiting, so
        // the pipeline adds no latency to a source slower than the model.
        if frame.streamer.in_flight() > 0 {
            match rx.try_recv() {
                Ok(Msg::Frame(s)) => {
                    frame.process(s, sink, [&mut stats, &mut interval])?;
                    continue;
                }
                Ok(Msg::End(r)) => {
                    while frame.streamer.in_flight() > 0 {
                        frame.complete(sink, [&mut stats, &mut interval])?;
                    }
                    break r;
                }
                Err(mpsc::TryRecvError::Empty) => {
                    frame.complete(sink, [&mut stats, &mut interval])?;
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    break Err(Error::Stopped("the frame reader stopped unexpectedly"))
                }
            }
        }
        let msg = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => {
                break Err(Error::Stopped("the frame reader stopped unexpectedly"))
            }
        };
        match msg {
            Msg::Frame(s) => frame.process(s, sink, [&mut stats, &mut interval])?,
            Msg::End(r) => break r,
        }
    };
    // The reader has sent End (or the loop failed): make it stop and wait for it.
    let interrupted = stop.swap(true, Ordering::Relaxed);
    drop(rx);
    let _ = reader_handle.join();
    let face_detections = outcome?;
    counters.snapshot(&mut stats);
    Ok(RunSummary {
        source: description,
        stats: stats.report(started.elapsed().as_secs_f64()),
        interrupted,
        face_detections,
    })
}
