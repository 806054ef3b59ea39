//! On-device calibration (`pe-clip calibrate`), all in the device build (no candle; the
//! package's own step model is the only model):
//!
//! - [`ranges`]: new int8 activation ranges for this car's camera;
//! - [`profiles`]: driver profiles fitted to one driver's clips;
//! - [`reference`]: the population's neutral reference the profiles are measured from.
//!
//! Packages and profiles are written atomically; the replaced package stays under `previous/`
//! (`crate::package::store`, which also rolls back).

pub mod profiles;
pub mod ranges;
pub mod reference;

pub use profiles::{
    check_profile_name, fit_driver, labelled_features, load_profile, profile_path, DriverOptions,
    DriverReport,
};
pub use ranges::{
    agreement, observe, recalibrate, Observation, RangeOptions, RangeReport, Timing,
    AUTO_F32_ABOVE, MIN_RANGE_CLIPS,
};
pub use reference::{neutral_mean, set_reference, ReferenceReport};

fn l2(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
