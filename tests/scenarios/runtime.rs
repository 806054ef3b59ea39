//! The device loop against offline evaluation: exact windows, continuous mode, corrupt frames,
//! stopping, and a live source that outruns the model.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pe_clip::engine::StepModel;
use pe_clip::error::Result;
use pe_clip::frames::clip_features;
use pe_clip::frames::source::{
    self, FolderSource, FrameSource, Item, SynthSource, SynthStreamOptions,
};
use pe_clip::package::Package;
use pe_clip::runtime::events::Event;
use pe_clip::runtime::smooth::Smoothing;
use pe_clip::runtime::stream::Windowing;
use pe_clip::runtime::{run, RunConfig, RunSummary};

fn synth(size: u32, frames: u64) -> SynthStreamOptions {
    SynthStreamOptions {
        seed: 11,
        size,
        frames: Some(frames),
        ..Default::default()
    }
}

fn collect(
    package: &Package,
    model: &mut StepModel,
    source: Box<dyn FrameSource>,
    cfg: &RunConfig,
) -> (Vec<Event>, RunSummary) {
    let mut events = Vec::new();
    let mut sink = |e: &Event| {
        events.push(e.clone());
        Ok(())
    };
    let summary = run(
        package,
        model,
        source,
        cfg,
        &mut sink,
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap();
    (events, summary)
}

/// Every window the runtime reports equals the offline model on exactly those sampled frames
/// (zero state, mean of features, the package head), for several window/hop geometries, in
/// exact mode; partial predictions equal the offline model on the frames so far.
fn exact_windows_match_offline(package: &Package) {
    let mut model = package.step_model().unwrap();
    let size = package.manifest.preprocess.image_size as u32;
    let head = &package.manifest.head;
    let spec = package.preprocess_spec();
    let stride = 2u64;
    let total = 88u64;
    // The sampled frames, independently of the runtime: every 2nd frame, whole frame.
    let mut src = SynthSource::new(synth(size, total)).unwrap();
    let mut sampled = Vec::new();
    while let Some(Item::Frame(f)) = src.next_item().unwrap() {
        if f.index % stride == 0 {
            sampled.push((f.index, spec.frame_to_rgb_bytes(&f.image)));
        }
    }
    for (window, hop) in [(16, 16), (16, 8), (16, 6), (5, 3), (4, 7)] {
        let mut cfg = RunConfig::for_package(package);
        cfg.stride = stride as usize;
        cfg.windowing = Windowing {
            window,
            hop,
            continuous: false,
            partial_every: 2,
        };
        cfg.smoothing = Smoothing::None;
        let source = Box::new(SynthSource::new(synth(size, total)).unwrap());
        let (events, summary) = collect(package, &mut model, source, &cfg);
        let n = sampled.len();
        let full: Vec<&Event> = events.iter().filter(|e| !e.partial).collect();
        assert_eq!(full.len(), (n - window) / hop + 1, "W {window} H {hop}");
        assert_eq!(summary.stats.counts.processed as usize, n);
        let mut worst = 0f32;
        for e in &events {
            let last = sampled.iter().position(|(i, _)| *i == e.frame).unwrap();
            let first = last + 1 - e.frames;
            assert_eq!(sampled[first].0, e.first_frame);
            if e.partial {
                assert_eq!(first, 0);
                assert!(e.frames < window);
            } else {
                assert_eq!(e.frames, window);
                assert_eq!(first % hop, 0, "windows start every hop");
            }
            let frames: Vec<Vec<u8>> = sampled[first..=last]
                .iter()
                .map(|(_, b)| b.clone())
                .collect();
            let feats = clip_features(&mut model, &frames).unwrap();
            let want = head.logits_of_features(feats.iter().map(Vec::as_slice));
            for (a, b) in e.logits.iter().zip(&want) {
                worst = worst.max((a - b).abs());
            }
        }
        assert!(worst < 1e-4, "W {window} H {hop}: logits differ by {worst}");
        // Steps: each sampled frame once per chain covering it.
        let chains = window.div_ceil(hop);
        assert!(summary.stats.counts.steps as usize <= n * chains);
        assert!(summary.stats.counts.steps as usize >= full.len() * window);
    }
}

#[test]
fn exact_windows_match_offline_int8_demo_package() {
    exact_windows_match_offline(&Package::embedded_demo().unwrap());
}

#[cfg(feature = "train")]
#[test]
fn exact_windows_match_offline_f32_package() {
    let dir = tempfile::tempdir().unwrap();
    let package = super::export::tiny_f32_package(&dir.path().join("pkg"), 3);
    assert_eq!(package.manifest.precision, pe_clip::package::Precision::F32);
    exact_windows_match_offline(&package);
}

#[test]
fn continuous_mode_steps_once_per_frame_and_predicts_every_hop() {
    let package = Package::embedded_demo().unwrap();
    let mut model = package.step_model().unwrap();
    let mut cfg = RunConfig::for_package(&package);
    cfg.windowing.hop = 8;
    cfg.windowing.continuous = true;
    let source = Box::new(SynthSource::new(synth(64, 100)).unwrap());
    let (events, summary) = collect(&package, &mut model, source, &cfg);
    assert_eq!(summary.stats.counts.steps, 50);
    let full: Vec<&Event> = events.iter().filter(|e| !e.partial).collect();
    assert_eq!(full.len(), (50 - 16) / 8 + 1);
    assert!(full.iter().all(|e| e.frames == 16));
    assert_eq!(events.iter().filter(|e| e.partial).count(), 3); // after 4, 8, 12 frames
}

#[test]
fn corrupt_frames_are_skipped_and_counted() {
    let package = Package::embedded_demo().unwrap();
    let mut model = package.step_model().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut src = SynthSource::new(synth(64, 40)).unwrap();
    while let Some(Item::Frame(f)) = src.next_item().unwrap() {
        f.image
            .save(dir.path().join(format!("{:03}.png", f.index)))
            .unwrap();
    }
    std::fs::write(dir.path().join("007.png"), b"broken").unwrap();
    std::fs::write(dir.path().join("010.png"), b"").unwrap();
    let mut cfg = RunConfig::for_package(&package);
    cfg.stride = 1;
    let source = Box::new(FolderSource::open(dir.path(), None).unwrap());
    let (events, summary) = collect(&package, &mut model, source, &cfg);
    assert_eq!(summary.stats.counts.corrupt, 2);
    assert_eq!(summary.stats.counts.frames, 38);
    assert_eq!(summary.stats.counts.processed, 38);
    assert_eq!(events.iter().filter(|e| !e.partial).count(), 2);
}

#[test]
fn stop_flag_ends_the_run_cleanly_with_statistics() {
    let package = Package::embedded_demo().unwrap();
    let mut model = package.step_model().unwrap();
    let cfg = RunConfig::for_package(&package);
    let stop = Arc::new(AtomicBool::new(false));
    let mut seen = 0;
    let flag = stop.clone();
    let mut sink = |_: &Event| {
        seen += 1;
        if seen == 5 {
            flag.store(true, Ordering::Relaxed);
        }
        Ok(())
    };
    let endless = SynthStreamOptions {
        frames: None,
        ..synth(64, 0)
    };
    let source = Box::new(SynthSource::new(endless).unwrap());
    let summary = run(&package, &mut model, source, &cfg, &mut sink, stop).unwrap();
    assert!(summary.interrupted);
    assert!(summary.stats.counts.predictions >= 5);
    assert!(summary.stats.frame_latency.count > 0);
}

#[test]
fn a_live_source_drops_frames_when_the_model_falls_behind() {
    struct Burst(u64);
    impl FrameSource for Burst {
        fn describe(&self) -> String {
            "burst".into()
        }
        fn fps(&self) -> Option<f64> {
            Some(1000.0)
        }
        fn is_live(&self) -> bool {
            true
        }
        fn next_item(&mut self) -> Result<Option<Item>> {
            self.0 += 1;
            Ok((self.0 <= 400).then(|| {
                Item::Frame(source::Frame {
                    index: self.0 - 1,
                    t_ms: self.0 as f64,
                    image: image::RgbImage::new(64, 64),
                    truth: None,
                })
            }))
        }
    }
    let package = Package::embedded_demo().unwrap();
    let mut model = package.step_model().unwrap();
    let mut cfg = RunConfig::for_package(&package);
    cfg.stride = 1;
    // A sink slower than the source: 2 ms per event.
    let mut sink = |_: &Event| {
        std::thread::sleep(Duration::from_millis(2));
        Ok(())
    };
    cfg.windowing.hop = 1;
    let summary = run(
        &package,
        &mut model,
        Box::new(Burst(0)),
        &cfg,
        &mut sink,
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap();
    let s = &summary.stats.counts;
    assert_eq!(s.frames, 400);
    assert!(s.dropped > 0, "{s:?}");
    assert_eq!(s.processed + s.dropped, s.sampled);
}
