//! The names of an int8 linear layer's constants and values in a step graph: written by
//! [`crate::int8::quantize`], found again by the device (`pe-clip calibrate`) when it re-reads a
//! package's model. One layer `L` (e.g. `block3/fc1`) becomes
//!
//! ```text
//! x ─ QuantizeLinear(L.x_scale) → L.x_q ─ MatMulInteger(L.weight_q) → L.acc
//!   ─ [Add(L.bias_q) → L.acc_bias] ─ Cast → L.acc_f32 ─ Mul(L.rescale) ─ y
//! ```

/// The constant and value names of int8 layer `layer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteNames {
    layer: String,
}

const X_SCALE: &str = ".x_scale";

impl SiteNames {
    pub fn new(layer: impl Into<String>) -> Self {
        Self {
            layer: layer.into(),
        }
    }

    /// The layer a `QuantizeLinear` scale constant belongs to (`L.x_scale` → `L`).
    pub fn of_x_scale(constant: &str) -> Option<Self> {
        constant
            .strip_suffix(X_SCALE)
            .filter(|l| !l.is_empty())
            .map(Self::new)
    }

    pub fn layer(&self) -> &str {
        &self.layer
    }

    fn with(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.layer)
    }

    /// The input scale `s_x` (f32 scalar).
    pub fn x_scale(&self) -> String {
        self.with(X_SCALE)
    }

    /// The quantized input (int8 value).
    pub fn x_q(&self) -> String {
        self.with(".x_q")
    }

    /// The int8 weight `[in, out]`.
    pub fn weight_q(&self) -> String {
        self.with(".weight_q")
    }

    /// The bias in accumulator units (i32 `[out]`), when folded.
    pub fn bias_q(&self) -> String {
        self.with(".bias_q")
    }

    /// The output rescale `s_x·s_w` (f32 scalar, or `[out]` per column).
    pub fn rescale(&self) -> String {
        self.with(".rescale")
    }

    /// The i32 accumulator.
    pub fn acc(&self) -> String {
        self.with(".acc")
    }

    /// The accumulator plus bias.
    pub fn acc_bias(&self) -> String {
        self.with(".acc_bias")
    }

    /// The accumulator cast to f32.
    pub fn acc_f32(&self) -> String {
        self.with(".acc_f32")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layer_is_found_from_its_scale_name() {
        let s = SiteNames::new("block3/fc1");
        assert_eq!(s.x_scale(), "block3/fc1.x_scale");
        assert_eq!(SiteNames::of_x_scale(&s.x_scale()), Some(s));
        assert_eq!(SiteNames::of_x_scale("block3/fc1.rescale"), None);
        assert_eq!(SiteNames::of_x_scale(".x_scale"), None);
    }
}
