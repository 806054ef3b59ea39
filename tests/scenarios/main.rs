//! Scenario and round-trip tests of the `pe-clip` library, in one test binary (each binary
//! links tract and candle again). Unit tests live beside the code; tests of the command line
//! are in `tests/cli.rs`.

mod calibration;
#[cfg(feature = "train")]
mod export;
mod link;
mod runtime;
