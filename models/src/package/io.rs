//! The step model's interface: the names of its inputs and outputs, written by the exporter's
//! graph builder and looked up by the device engine.
//!
//! Inputs: [`FRAME_INPUT`] (`u8 [1, S, S, 3]`), then one [`state_input`] per recurrent block in
//! block order. Outputs: [`FEATURE_OUTPUT`] (`f32 [1, D]`), then the matching [`state_output`]s;
//! any further outputs (calibration taps) come after.

/// Name of the frame input.
pub const FRAME_INPUT: &str = "frame";
/// Name of the feature output.
pub const FEATURE_OUTPUT: &str = "feature";

const STATE_IN: &str = "state_in.";
const STATE_OUT: &str = "state_out.";

/// The state input of vision block `block`.
pub fn state_input(block: usize) -> String {
    format!("{STATE_IN}{block}")
}

/// The state output of vision block `block`.
pub fn state_output(block: usize) -> String {
    format!("{STATE_OUT}{block}")
}

/// The block a state input's name stands for (`state_in.3` → 3).
pub fn state_input_block(name: &str) -> Option<usize> {
    let digits = name.strip_prefix(STATE_IN)?;
    // Only the canonical spelling: no sign, no leading zeros (so the name round-trips).
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_round_trip_and_reject_other_spellings() {
        for b in [0, 7, 11, 123] {
            assert_eq!(state_input_block(&state_input(b)), Some(b));
        }
        for bad in [
            "state_in.",
            "state_in.+1",
            "state_in.01",
            "state_out.1",
            "frame",
            "state_in.x",
        ] {
            assert_eq!(state_input_block(bad), None, "{bad}");
        }
    }
}
