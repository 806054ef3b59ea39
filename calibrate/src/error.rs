//! The one error type of `pe-clip-calibrate`: every message is lower-case and says which value is
//! wrong; callers add the file or clip it came from.

use crate::profile::PROFILE_VERSION;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("unknown observer {0:?} (minmax, mse, percentile:99.99)")]
    UnknownObserver(String),
    #[error("bad percentile in {0:?}")]
    BadPercentile(String),
    #[error("percentile {0} is outside 50..100")]
    PercentileRange(f64),
    #[error(
        "a clip of class {label} with {features} features does not fit a head of {classes} \
         classes and {dim} features"
    )]
    ClipShape {
        label: usize,
        features: usize,
        classes: usize,
        dim: usize,
    },
    #[error("shrinkage must be finite and >= 0, is {0}")]
    Shrinkage(f32),
    #[error("the bias penalty must be finite and > 0, is {0}")]
    BiasPenalty(f32),
    #[error("no clip of the neutral class: a driver profile needs at least one")]
    NoNeutralClip,
    #[error("not a driver profile (format {0:?})")]
    ProfileFormat(String),
    #[error("profile version {0}, this pe-clip reads version {PROFILE_VERSION}: fit it again")]
    ProfileVersion(u32),
    /// The profile's model binding differs from the package's (both described).
    #[error("fitted for another model ({profile}; this package: {package}): fit it again with this package")]
    OtherModel { profile: String, package: String },
    #[error(
        "offset of {offset} values and bias of {bias} for {features} features and {classes} classes"
    )]
    ProfileShape {
        offset: usize,
        bias: usize,
        features: usize,
        classes: usize,
    },
    #[error("offset or bias has a value that is not finite")]
    NonFinite,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
