//! `pe-clip bench`: device and host timings as JSON or a line of text, one file per benchmark.

mod calibrate;
mod cores;
pub mod driver;
mod loader;
mod step;
mod train;

use calibrate::CalibrateArgs;
use cores::CoresArgs;
use driver::DriverArgs;
use loader::LoaderArgs;
use step::StepArgs;
use train::TrainArgs;

/// Arguments of `pe-clip bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// Training steps per second and peak memory (one 16-frame clip per step, random weights).
    Train(TrainArgs),
    /// Clips/s of the training data path (decode, sample, augment, batch) per loader thread
    /// count, against the clip rate a GPU trains at.
    Loader(LoaderArgs),
    /// Per-frame step latency of model packages in tract, at each thread count.
    Step(StepArgs),
    /// Frames/s and latency of a stream on one core and on two: tract's matmul threads, a
    /// window's chains on threads (H < W), or the block pipeline (H = W).
    Cores(CoresArgs),
    /// Time of `pe-clip calibrate` (ranges) on a few clips against running the same clips.
    Calibrate(CalibrateArgs),
    /// UAR of synthetic drivers with a shifted resting face, without and with a driver profile.
    Driver(DriverArgs),
}

fn package_or_demo(dir: &Option<std::path::PathBuf>) -> anyhow::Result<crate::package::Package> {
    Ok(match dir {
        Some(d) => crate::package::Package::open(d)?,
        None => crate::package::Package::embedded_demo()?,
    })
}

/// Copy a package's manifest and files into `to`.
pub(super) fn copy_package(
    p: &crate::package::Package,
    to: &std::path::Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    std::fs::write(
        to.join(crate::package::MANIFEST_FILE),
        serde_json::to_vec_pretty(&p.manifest)?,
    )?;
    std::fs::write(to.join(&p.manifest.model), p.model_bytes()?)?;
    Ok(())
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`), if known.
#[cfg(feature = "train")]
pub(crate) fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    match args.what {
        What::Train(a) => train::run_train(a),
        What::Loader(a) => loader::run_loader(a),
        What::Step(a) => step::run_step(a),
        What::Cores(a) => cores::run_cores(a),
        What::Calibrate(a) => calibrate::run_calibrate(a),
        What::Driver(a) => driver::run_driver(a),
    }
}
