//! `pe-clip bench cores`: frames/s and per-frame latency of a stream of exact windows on one
//! core and on two, each way pe-clip can use the second: tract's matmul threads, the window's
//! independent chains on two threads (H < W), or the block pipeline (H = W: the model cut in
//! two stages on two threads, `engine::BlockPipeline`).

use crate::engine::{set_threads, BlockPipeline, StepModel};
use crate::runtime::stream::{Streamer, Windowing};

#[derive(Debug, clap::Args)]
pub(super) struct CoresArgs {
    /// The package (default: the built-in demo package).
    #[arg(long = "package", value_name = "PACKAGE_DIR")]
    package: Option<std::path::PathBuf>,
    /// Sampled frames of the stream (after 4 warm-up frames).
    #[arg(long, default_value_t = 48)]
    frames: usize,
    /// Window (sampled frames; default: the package's).
    #[arg(long)]
    window: Option<usize>,
    /// Hop between windows (default: the window).
    #[arg(long)]
    hop: Option<usize>,
    /// Block the pipeline cuts after (default: half the blocks).
    #[arg(long)]
    cut: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// One way of running the stream.
#[derive(Debug, Clone, serde::Serialize)]
struct CoresRow {
    option: String,
    threads: usize,
    frames_per_s: f64,
    /// From a frame handed in to the end of its last step (ms).
    latency_median_ms: f64,
    latency_p90_ms: f64,
}

fn row(option: &str, threads: usize, elapsed_s: f64, mut lat: Vec<f64>) -> CoresRow {
    lat.sort_by(f64::total_cmp);
    CoresRow {
        option: option.into(),
        threads,
        frames_per_s: lat.len() as f64 / elapsed_s,
        latency_median_ms: lat[lat.len() / 2],
        latency_p90_ms: lat[(lat.len() * 9 / 10).min(lat.len() - 1)],
    }
}

fn frame(s: usize, t: usize) -> Vec<u8> {
    (0..s * s * 3)
        .map(|i| ((i * 37 + i / 7 + t * 101) % 251) as u8)
        .collect()
}

/// The stream through a [`Streamer`] on `chain_threads` threads, tract on `matmul_threads`.
fn streamed(
    pkg: &crate::package::Package,
    geometry: Windowing,
    frames: usize,
    matmul_threads: usize,
    chain_threads: usize,
) -> anyhow::Result<(f64, Vec<f64>)> {
    set_threads(matmul_threads);
    let mut model: StepModel = pkg.step_model()?;
    let s = model.image_size();
    let mut streamer = Streamer::new(&model, pkg.manifest.head.clone(), geometry)?;
    if chain_threads > 1 {
        streamer = streamer.with_chain_threads(&model, chain_threads)?;
    }
    for t in 0..4 {
        streamer.push(&mut model, &frame(s, t), t as u64, 0.0)?;
    }
    let inputs: Vec<Vec<u8>> = (0..frames).map(|t| frame(s, t + 4)).collect();
    let mut lat = Vec::with_capacity(frames);
    let start = std::time::Instant::now();
    for (t, f) in inputs.iter().enumerate() {
        let t0 = std::time::Instant::now();
        streamer.push(&mut model, f, t as u64, 0.0)?;
        lat.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok((start.elapsed().as_secs_f64(), lat))
}

/// The stream through the block pipeline, two frames in flight; also the features, to check.
fn pipelined(
    pkg: &crate::package::Package,
    window: usize,
    frames: usize,
    cut: Option<usize>,
) -> anyhow::Result<(f64, Vec<f64>, usize)> {
    set_threads(1);
    let bytes = pkg.model_bytes()?;
    let p = BlockPipeline::new(&bytes, &pkg.model_path().display().to_string(), cut)?;
    let s = p.image_size();
    for t in 0..4 {
        p.submit(frame(s, t), t == 0)?;
        p.next_feature()?;
    }
    let inputs: Vec<Vec<u8>> = (0..frames).map(|t| frame(s, t + 4)).collect();
    let mut handed = Vec::with_capacity(frames);
    let mut lat = Vec::with_capacity(frames);
    let start = std::time::Instant::now();
    for (t, f) in inputs.into_iter().enumerate() {
        handed.push(std::time::Instant::now());
        p.submit(f, t % window == 0)?;
        if t >= 1 {
            p.next_feature()?;
            lat.push(handed[t - 1].elapsed().as_secs_f64() * 1e3);
        }
    }
    p.next_feature()?;
    lat.push(handed[frames - 1].elapsed().as_secs_f64() * 1e3);
    Ok((start.elapsed().as_secs_f64(), lat, p.cut()))
}

pub(super) fn run_cores(a: CoresArgs) -> anyhow::Result<u8> {
    let pkg = super::package_or_demo(&a.package)?;
    let window = a.window.unwrap_or(pkg.manifest.temporal.window);
    let hop = a.hop.unwrap_or(window);
    if a.frames < 2 || window == 0 || hop == 0 || hop > window {
        anyhow::bail!("--frames must be at least 2, and 1 <= --hop <= --window");
    }
    let geometry = Windowing {
        window,
        hop,
        continuous: false,
        partial_every: 0,
    };
    let machine = crate::engine::machine();
    let name = a
        .package
        .as_ref()
        .map_or("the demo package".to_string(), |p| p.display().to_string());
    if !a.json {
        println!("machine: {machine}");
        println!(
            "{name}: {} sampled frames, window {window}, hop {hop} ({} chains)",
            a.frames,
            geometry.chains()
        );
    }
    let mut rows = Vec::new();
    let (e, l) = streamed(&pkg, geometry, a.frames, 1, 1)?;
    rows.push(row("one thread", 1, e, l));
    let (e, l) = streamed(&pkg, geometry, a.frames, 2, 1)?;
    rows.push(row("tract matmul threads", 2, e, l));
    let mut cut = None;
    if geometry.chains() > 1 {
        let (e, l) = streamed(&pkg, geometry, a.frames, 1, 2)?;
        rows.push(row("chains on threads", 2, e, l));
    } else {
        let (e, l, c) = pipelined(&pkg, window, a.frames, a.cut)?;
        cut = Some(c);
        rows.push(row(
            &format!("block pipeline (cut after block {c})"),
            2,
            e,
            l,
        ));
    }
    set_threads(1);
    let base = rows[0].frames_per_s;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"bench": "cores", "machine": machine, "package": name,
                "window": window, "hop": hop, "frames": a.frames, "cut": cut, "rows": rows})
        );
    } else {
        for r in &rows {
            println!(
                "  {:<40} {} thread(s): {:8.2} frames/s ({:.2}x), latency median {:.2} ms, \
                 p90 {:.2} ms",
                r.option,
                r.threads,
                r.frames_per_s,
                r.frames_per_s / base,
                r.latency_median_ms,
                r.latency_p90_ms
            );
        }
    }
    Ok(crate::cli::EXIT_OK)
}
