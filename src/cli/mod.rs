//! Command-line parsing, logging and exit codes. Each subcommand has its own module; clap types
//! stay in this module tree and never reach library code.

pub mod bench;
mod calibrate;
mod eval;
mod export;
mod features;
mod import_reference;
mod info;
mod init_random;
mod peclip_args;
mod predict;
mod pretrain;
mod progress;
mod run;
mod summarize;
mod synth;
mod table;
mod train;
mod zero_shot;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status: success.
pub const EXIT_OK: u8 = 0;
/// Exit status: the command failed (bad input, missing or corrupt files, ...).
pub const EXIT_FAILURE: u8 = 1;
/// Exit status: the command line itself is wrong (clap's convention).
pub const EXIT_USAGE: u8 = 2;
/// Exit status: some inputs failed while others produced results.
pub const EXIT_PARTIAL: u8 = 3;

const AFTER_HELP: &str = "\
Results go to stdout, logs to stderr.
Exit codes: 0 success, 1 failure, 2 usage error, 3 some inputs failed (the others were processed).";

/// pe-clip: driver facial-expression recognition with PE-CLIP.
#[derive(Debug, Parser)]
#[command(name = "pe-clip", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    /// More log output on stderr (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Less log output on stderr (-q errors only, -qq nothing).
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "verbose")]
    quiet: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Zero-shot expression recognition of clips with a plain CLIP model and the action-unit texts.
    ZeroShot(zero_shot::Args),
    /// Write an HF-layout CLIP directory with random weights (and optionally a fresh PE-CLIP run).
    InitRandom(init_random::Args),
    /// Print the trainable-parameter breakdown of a PE-CLIP configuration.
    Info(info::Args),
    /// Convert a checkpoint of the PE-CLIP authors' code into a pe-clip run directory.
    ImportReference(import_reference::Args),
    /// Recognise the expression in clips with a PE-CLIP run directory.
    Predict(predict::Args),
    /// Write a synthetic face-clip dataset (DFEW layout) driven by the classes' action units.
    Synth(synth::Args),
    /// Pre-train a small CLIP-shaped backbone on synthetic frames and AU captions (no CLIP needed).
    Pretrain(pretrain::Args),
    /// Train PE-CLIP on a dataset (per-epoch evaluation, resumable checkpoints).
    Train(train::Args),
    /// UAR, WAR, per-class recall and confusion matrix of a run on a dataset split.
    Eval(eval::Args),
    /// Mean and spread of UAR/WAR over several `eval --json` reports (e.g. 5 DFEW folds).
    Summarize(summarize::Args),
    /// Fold a trained run into a per-frame ONNX step model (optionally int8) and package it.
    Export(export::Args),
    /// Per-frame features and clip logits of clips through a model package (JSON lines).
    Features(features::Args),
    /// On-device calibration with local clips: int8 ranges for this camera, driver profiles.
    Calibrate(calibrate::Args),
    /// Benchmarks: training throughput, step latency of model packages.
    Bench(bench::Args),
    /// The device loop: frames from a camera, file, folder or synthetic stream through a model
    /// package, frame by frame, with sliding windows and smoothed expression events. Without
    /// --source and no camera: the demo.
    Run(run::Args),
    /// The built-in demo package on a generated synthetic stream: events, a text timeline and a
    /// plot (pe-clip-demo.svg).
    Demo(run::Args),
}

/// The log level for `-v`/`-q` counts.
pub fn log_level(verbose: u8, quiet: u8) -> log::LevelFilter {
    match (verbose, quiet) {
        (_, 1) => log::LevelFilter::Error,
        (_, q) if q >= 2 => log::LevelFilter::Off,
        (0, _) => log::LevelFilter::Warn,
        (1, _) => log::LevelFilter::Info,
        (2, _) => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

/// Keep a training step's large blocks in the heap. glibc's malloc serves blocks above a
/// threshold (128 KiB, adapting up to 32 MiB) with mmap and unmaps them on free, so every
/// activation of every step is a fresh mapping: faulted and zeroed page by page, and unmapped
/// with TLB shootdowns across the matmul threads. A step allocates the same sizes each time;
/// with the threshold at glibc's maximum and no trimming, ViT-B/16 `bench train --recompute
/// blocks` went from 24.5 to 21.8 s/step on the 2-core EPYC (docs/benchmarks.md).
#[cfg(feature = "train")]
#[allow(unsafe_code)]
pub(crate) fn keep_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's parameters; called before the model's threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Parse the command line, run the subcommand and map the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { EXIT_OK });
        }
    };
    env_logger::Builder::new()
        .filter_level(log_level(cli.verbose, cli.quiet))
        .format_timestamp(None)
        .target(env_logger::Target::Stderr)
        .init();
    let result = match cli.command {
        Command::ZeroShot(a) => zero_shot::run(a),
        Command::InitRandom(a) => init_random::run(a),
        Command::Info(a) => info::run(a),
        Command::ImportReference(a) => import_reference::run(a),
        Command::Predict(a) => predict::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Pretrain(a) => pretrain::run(a),
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Summarize(a) => summarize::run(a),
        Command::Export(a) => export::run(a),
        Command::Features(a) => features::run(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Run(a) => run::run(a),
        Command::Demo(a) => run::demo(a),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// The serde name of a config enum value, e.g. `post_up` -> `post-up`.
#[cfg(feature = "train")]
pub(crate) fn serde_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(|s| s.replace('_', "-")))
        .unwrap_or_default()
}

/// The error for subcommands that need the `train` feature in a build without it.
#[cfg(not(feature = "train"))]
pub(crate) fn built_without_train(cmd: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "`pe-clip {cmd}` needs the host model code: this binary was built without `train` \
         (rebuild with `--features train`)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn verbosity_maps_to_levels() {
        assert_eq!(log_level(0, 0), log::LevelFilter::Warn);
        assert_eq!(log_level(1, 0), log::LevelFilter::Info);
        assert_eq!(log_level(0, 1), log::LevelFilter::Error);
        assert_eq!(log_level(0, 2), log::LevelFilter::Off);
        assert_eq!(log_level(5, 0), log::LevelFilter::Trace);
    }
}
