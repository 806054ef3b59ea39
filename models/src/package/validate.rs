//! Reading a manifest: the format and version first (so that a foreign or newer file is named
//! as such), then the schema, then [`Manifest::validate`]: every size within [`limits`], names
//! unique, the state layout in block order, the head finite and of the declared shape.

use super::io::{state_input, state_output};
use super::manifest::*;

/// The largest values a manifest may ask for: far above any real model (ViT-B/16: 224 px, 512
/// features, window 16), low enough that nothing sized from them exhausts a device's memory.
pub mod limits {
    pub const IMAGE_SIZE: usize = 2048;
    pub const FEATURE_DIM: usize = 16_384;
    pub const CLASSES: usize = 1024;
    pub const WINDOW: usize = 4096;
    pub const STRIDE: usize = 1000;
    /// Recurrent-state floats over all blocks.
    pub const STATE_FLOATS: usize = 64 << 20;
}

/// What a manifest gets wrong. Messages name the key.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("not valid JSON: {0}")]
    Json(serde_json::Error),
    #[error("not a pe-clip package manifest (format {0:?})")]
    Format(Option<String>),
    #[error(
        "package version {found}, this pe-clip reads version {PACKAGE_VERSION}: re-export the \
         model with this pe-clip or use a matching pe-clip"
    )]
    Version { found: u64 },
    #[error("invalid manifest: {0}")]
    Schema(serde_json::Error),
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

impl Manifest {
    /// Parse manifest bytes: the format and version first (so that another version is named as
    /// such, not as a schema error), then the schema, then [`Manifest::validate`].
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(ManifestError::Json)?;
        match value.get("format").and_then(|v| v.as_str()) {
            Some(PACKAGE_FORMAT) => {}
            other => return Err(ManifestError::Format(other.map(str::to_string))),
        }
        let found = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if found != PACKAGE_VERSION as u64 {
            return Err(ManifestError::Version { found });
        }
        let manifest: Manifest = serde_json::from_value(value).map_err(ManifestError::Schema)?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Everything that can be checked without the model file: sizes within [`limits`], a
    /// window and stride of at least 1, one finite head row of `feature_dim` values per class,
    /// unique class names, the state entries named as the step model names them in increasing
    /// block order, an int8 package's quantization record, a neutral reference of the feature
    /// width, plain checksum file names including the model's.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let within = |key: &str, v: usize, max: usize| {
            if v == 0 || v > max {
                Err(invalid(key, format!("{v} is outside 1 to {max}")))
            } else {
                Ok(())
            }
        };
        within(
            "preprocess.image_size",
            self.preprocess.image_size,
            limits::IMAGE_SIZE,
        )?;
        within("temporal.window", self.temporal.window, limits::WINDOW)?;
        within("temporal.stride", self.temporal.stride, limits::STRIDE)?;
        self.validate_classes_and_head()?;
        self.validate_state()?;
        if self.precision == Precision::Int8 && self.quantization.is_none() {
            return Err(invalid(
                "quantization",
                "an int8 package must say how it was quantized",
            ));
        }
        if self.precision == Precision::F16 && self.half.is_none() {
            return Err(invalid(
                "half",
                "an f16 package must say which products are f16",
            ));
        }
        if let Some(r) = &self.neutral_reference {
            if r.feature.len() != self.head.feature_dim {
                return Err(invalid(
                    "neutral_reference.feature",
                    format!(
                        "{} values for {} features",
                        r.feature.len(),
                        self.head.feature_dim
                    ),
                ));
            }
            if r.feature.iter().any(|v| !v.is_finite()) {
                return Err(invalid(
                    "neutral_reference.feature",
                    "holds a non-finite value",
                ));
            }
        }
        for c in &self.checksums {
            if c.file.is_empty() || c.file.contains(['/', '\\']) || c.file.contains("..") {
                return Err(invalid("checksums", format!("bad file name {:?}", c.file)));
            }
        }
        if !self.checksums.iter().any(|c| c.file == self.model) {
            return Err(invalid(
                "checksums",
                format!("no checksum for {}", self.model),
            ));
        }
        Ok(())
    }

    fn validate_classes_and_head(&self) -> Result<(), ManifestError> {
        let n = self.classes.len();
        if n == 0 || n > limits::CLASSES {
            return Err(invalid(
                "classes",
                format!("{n} classes; a package has 1 to {}", limits::CLASSES),
            ));
        }
        for (i, c) in self.classes.iter().enumerate() {
            if c.name.trim().is_empty() {
                return Err(invalid(format!("classes[{i}].name"), "is empty"));
            }
            if self.classes[..i].iter().any(|o| o.name == c.name) {
                return Err(invalid(
                    format!("classes[{i}].name"),
                    format!("{:?} appears twice", c.name),
                ));
            }
        }
        let h = &self.head;
        if h.feature_dim == 0 || h.feature_dim > limits::FEATURE_DIM {
            return Err(invalid(
                "head.feature_dim",
                format!("{} is outside 1 to {}", h.feature_dim, limits::FEATURE_DIM),
            ));
        }
        if h.text_features.len() != n || h.text_features.iter().any(|r| r.len() != h.feature_dim) {
            return Err(invalid(
                "head.text_features",
                "must have one row of feature_dim values per class",
            ));
        }
        if !(h.logit_scale.is_finite() && h.logit_scale > 0.0) {
            return Err(invalid(
                "head.logit_scale",
                format!("{} is not a positive number", h.logit_scale),
            ));
        }
        if let Some(i) = h
            .text_features
            .iter()
            .position(|r| r.iter().any(|v| !v.is_finite()))
        {
            return Err(invalid(
                format!("head.text_features[{i}]"),
                "holds a non-finite value",
            ));
        }
        Ok(())
    }

    fn validate_state(&self) -> Result<(), ManifestError> {
        let mut floats = 0usize;
        for (i, s) in self.state.iter().enumerate() {
            let key = format!("state[{i}]");
            if i > 0 && s.block <= self.state[i - 1].block {
                return Err(invalid(key, "blocks must increase"));
            }
            if s.input != state_input(s.block) || s.output != state_output(s.block) {
                return Err(invalid(
                    key,
                    format!(
                        "block {} must be read from {} and written to {} (found {} and {})",
                        s.block,
                        state_input(s.block),
                        state_output(s.block),
                        s.input,
                        s.output
                    ),
                ));
            }
            floats = s
                .rows
                .checked_mul(s.width)
                .filter(|_| s.rows > 0 && s.width > 0)
                .and_then(|f| floats.checked_add(f))
                .filter(|&f| f <= limits::STATE_FLOATS)
                .ok_or_else(|| {
                    invalid(
                        key,
                        format!(
                            "{} x {} state: every state needs rows and width, {} floats at most \
                             in all",
                            s.rows,
                            s.width,
                            limits::STATE_FLOATS
                        ),
                    )
                })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO: &[u8] = include_bytes!("../../demo/manifest.json");

    fn demo_value() -> serde_json::Value {
        serde_json::from_slice(DEMO).unwrap()
    }

    fn parse(v: &serde_json::Value) -> Result<Manifest, ManifestError> {
        Manifest::parse(&serde_json::to_vec(v).unwrap())
    }

    /// Each edit of the demo manifest is refused, naming the key at fault.
    #[test]
    fn a_manifest_that_asks_for_the_wrong_thing_is_refused_by_key() {
        type Edit = fn(&mut serde_json::Value);
        let cases: [(Edit, &str); 12] = [
            (|v| v["extra"] = 1.into(), "unknown field `extra`"),
            (
                |v| v["preprocess"]["colour"] = "rgb".into(),
                "unknown field `colour`",
            ),
            (|v| v["precision"] = "int4".into(), "unknown variant `int4`"),
            (
                |v| v["state"][0]["cell"] = "gru2".into(),
                "unknown variant `gru2`",
            ),
            (
                |v| v["preprocess"]["layout"] = "nchw".into(),
                "unknown variant `nchw`",
            ),
            (|v| v["temporal"]["window"] = 0.into(), "temporal.window"),
            (|v| v["temporal"]["stride"] = 5000.into(), "temporal.stride"),
            (
                |v| v["preprocess"]["image_size"] = 1_000_000.into(),
                "preprocess.image_size",
            ),
            (
                |v| v["classes"][1]["name"] = "happiness".into(),
                "classes[1].name",
            ),
            (
                |v| v["head"]["text_features"][3] = serde_json::json!([0.5]),
                "head.text_features",
            ),
            (|v| v["state"][1]["input"] = "state_in.0".into(), "state[1]"),
            (|v| v["state"][0]["rows"] = 0.into(), "state[0]"),
        ];
        for (edit, needle) in cases {
            let mut v = demo_value();
            edit(&mut v);
            let e = parse(&v).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} (wanted {needle})");
        }
        let mut v = demo_value();
        v["classes"] = serde_json::json!([]);
        v["head"]["text_features"] = serde_json::json!([]);
        assert!(parse(&v).unwrap_err().to_string().contains("0 classes"));
        let mut v = demo_value();
        v["quantization"] = serde_json::Value::Null;
        assert!(parse(&v).unwrap_err().to_string().contains("quantization"));
        let mut v = demo_value();
        v["checksums"][0]["file"] = "../model.onnx".into();
        assert!(parse(&v).unwrap_err().to_string().contains("bad file name"));
        let mut v = demo_value();
        v["version"] = 2.into();
        assert!(matches!(
            parse(&v),
            Err(ManifestError::Version { found: 2 })
        ));
    }

    #[test]
    fn non_finite_head_values_are_refused() {
        let mut m = Manifest::parse(DEMO).unwrap();
        m.head.text_features[4][7] = f32::NAN;
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("head.text_features[4]"));
        let mut m = Manifest::parse(DEMO).unwrap();
        m.head.logit_scale = f32::INFINITY;
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("head.logit_scale"));
    }
}
