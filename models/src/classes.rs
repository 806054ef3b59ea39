//! The expression classes and the action-unit texts that describe them.
//!
//! The list lives in `models/data/classes.json` (embedded as the default) so that a user can edit
//! it; every load is validated.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The format version of `classes.json` this build reads.
pub const CLASSES_FORMAT_VERSION: u32 = 1;

/// The shipped class list (PE-CLIP `class_descriptor_7`, reference order).
pub const DEFAULT_CLASSES_JSON: &str = include_str!("../data/classes.json");

/// One class: its name and the action-unit descriptor used as its text prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassText {
    /// Short label, e.g. `happiness`.
    pub name: String,
    /// Action-unit description, e.g. `Cheek Raiser, Lip Corner Puller.`.
    pub descriptor: String,
}

/// An ordered list of classes; index = label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassSet {
    /// Must equal [`CLASSES_FORMAT_VERSION`].
    pub format_version: u32,
    /// Free text for humans.
    #[serde(default)]
    pub description: String,
    /// The classes in label order.
    pub classes: Vec<ClassText>,
}

impl Default for ClassSet {
    fn default() -> Self {
        Self::from_json_str(DEFAULT_CLASSES_JSON, "built-in classes.json")
            .expect("the embedded classes.json is validated by a unit test")
    }
}

impl ClassSet {
    /// Parse and validate a class list; `origin` names it in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        let set: ClassSet = serde_json::from_str(text).map_err(|e| Error::Classes {
            origin: origin.to_string(),
            reason: e.to_string(),
        })?;
        set.validate(origin)?;
        Ok(set)
    }

    /// Read and validate a class list from a JSON file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Check the version, that there are at least two classes, and that names are unique,
    /// non-empty identifiers and descriptors are non-empty.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let fail = |reason: String| Error::Classes {
            origin: origin.to_string(),
            reason,
        };
        if self.format_version != CLASSES_FORMAT_VERSION {
            return Err(fail(format!(
                "format_version {} is not supported (expected {CLASSES_FORMAT_VERSION})",
                self.format_version
            )));
        }
        if self.classes.len() < 2 {
            return Err(fail(format!(
                "needs at least 2 classes, found {}",
                self.classes.len()
            )));
        }
        for (i, c) in self.classes.iter().enumerate() {
            let name = c.name.trim();
            if name.is_empty() || name != c.name || name.contains(char::is_whitespace) {
                return Err(fail(format!(
                    "class {i}: name {:?} must be a non-empty word without spaces",
                    c.name
                )));
            }
            if c.descriptor.trim().is_empty() {
                return Err(fail(format!("class {i} ({}): empty descriptor", c.name)));
            }
            if self.classes[..i].iter().any(|o| o.name == c.name) {
                return Err(fail(format!("class {i}: duplicate name {:?}", c.name)));
            }
        }
        Ok(())
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.classes.len()
    }

    /// Always false for a validated set.
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }

    /// Class names in label order.
    pub fn names(&self) -> Vec<&str> {
        self.classes.iter().map(|c| c.name.as_str()).collect()
    }

    /// The descriptors in label order (the zero-shot texts).
    pub fn descriptors(&self) -> Vec<&str> {
        self.classes.iter().map(|c| c.descriptor.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_the_reference_list() {
        let set = ClassSet::default();
        assert_eq!(
            set.names(),
            [
                "happiness",
                "sadness",
                "neutral",
                "anger",
                "surprise",
                "disgust",
                "fear"
            ]
        );
        assert_eq!(
            set.classes[6].descriptor,
            "Inner Brow Raiser, Outer Brow Raiser, Brow Lowerer, Upper Lid Raiser, Lid Tightener, Lip Stretcher, Jaw Drop."
        );
        assert_eq!(
            set.classes[0].descriptor,
            "Cheek Raiser, Lip Corner Puller."
        );
    }

    #[test]
    fn rejects_bad_lists() {
        let bad = [
            (r#"{"format_version":2,"classes":[]}"#, "format_version"),
            (
                r#"{"format_version":1,"classes":[{"name":"a","descriptor":"x"}]}"#,
                "at least 2",
            ),
            (
                r#"{"format_version":1,"classes":[{"name":"a","descriptor":"x"},{"name":"a","descriptor":"y"}]}"#,
                "duplicate",
            ),
            (
                r#"{"format_version":1,"classes":[{"name":"a","descriptor":" "},{"name":"b","descriptor":"y"}]}"#,
                "empty descriptor",
            ),
            (
                r#"{"format_version":1,"classes":[{"name":"a b","descriptor":"x"},{"name":"b","descriptor":"y"}]}"#,
                "name",
            ),
            (
                r#"{"format_version":1,"classes":[],"extra":1}"#,
                "unknown field",
            ),
        ];
        for (text, needle) in bad {
            let err = ClassSet::from_json_str(text, "t.json")
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle) && err.contains("t.json"), "{err}");
        }
    }
}
