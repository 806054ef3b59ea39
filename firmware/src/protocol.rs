//! The wire protocol between the camera loop (`pe-clip run --link`) and the alert controller.
//!
//! A frame on the wire is `COBS(version ‖ postcard(message) ‖ CRC-32(version ‖ postcard))`
//! followed by one `0x00` delimiter; CRC-32 is ISO-HDLC (the zip/Ethernet one), little-endian.
//! Frames are at most [`MAX_FRAME`] bytes with the delimiter. The [`Decoder`] takes bytes one at
//! a time, never panics, drops anything that fails COBS, the length limit, the CRC, the version
//! or postcard, and starts afresh at the next delimiter. `firmware/PROTOCOL.md` documents the
//! bytes; the golden tests below pin them.

use serde::{Deserialize, Serialize};

/// Protocol version carried in every frame's first byte.
pub const PROTOCOL_VERSION: u8 = 1;
/// Longest frame on the wire, delimiter included.
pub const MAX_FRAME: usize = 64;
/// Longest decoded body (version + message + CRC).
const MAX_BODY: usize = MAX_FRAME - 2;

const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// What kind of alert the controller raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AlertKind {
    /// Sustained negative expression (the configured classes above the threshold).
    NegativeExpression,
    /// No heartbeat from the camera loop within the timeout.
    LinkLost,
}

/// The controller's settings, sent by the camera loop after `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Bit `i` set: class `i` (package order) counts as negative.
    pub negative_classes: u16,
    /// Confidence (per mille) at or above which a negative expression counts.
    pub threshold_permille: u16,
    /// How long a negative expression must last before the alert rises one level (ms).
    pub hold_ms: u32,
    /// Silence after which the link counts as lost (ms).
    pub heartbeat_timeout_ms: u32,
}

impl Default for Config {
    /// [`NEGATIVE_CLASSES`] at their places in the reference class order (happiness, sadness,
    /// neutral, anger, surprise, disgust, fear: bits 1, 3, 5, 6) at 60 %, held 2 s; link lost
    /// after 3 s of silence. A camera loop whose model orders its classes otherwise sends
    /// [`Config::for_classes`] instead.
    fn default() -> Self {
        Self {
            negative_classes: (1 << 1) | (1 << 3) | (1 << 5) | (1 << 6),
            threshold_permille: 600,
            hold_ms: 2000,
            heartbeat_timeout_ms: 3000,
        }
    }
}

/// The class names that count as negative expressions (compared without case).
pub const NEGATIVE_CLASSES: [&str; 4] = ["sadness", "anger", "disgust", "fear"];

/// A negative class the 16-bit class mask cannot hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassOutOfMask {
    /// Its index in the model's class order.
    pub index: usize,
}

impl Config {
    /// The default settings with `negative_classes` taken from the model's class names, in the
    /// order of its logits: bit `i` is set when class `i` is one of [`NEGATIVE_CLASSES`].
    pub fn for_classes<'a>(
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, ClassOutOfMask> {
        let mut mask = 0u16;
        for (index, name) in names.into_iter().enumerate() {
            if NEGATIVE_CLASSES
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name))
            {
                if index >= 16 {
                    return Err(ClassOutOfMask { index });
                }
                mask |= 1 << index;
            }
        }
        Ok(Self {
            negative_classes: mask,
            ..Self::default()
        })
    }
}

/// Every message of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message of a session: who is talking and which protocol.
    Hello {
        protocol: u8,
        sender: Sender,
    },
    /// Sent at least every second; `seq` counts up.
    Heartbeat {
        seq: u32,
    },
    /// One (smoothed) prediction of the camera loop.
    Expression {
        class: u8,
        confidence_permille: u16,
        /// Stream time of the prediction (ms, wraps after 49 days).
        time_ms: u32,
    },
    /// The controller's alert state (controller to camera loop, for logs).
    Alert {
        kind: AlertKind,
        level: u8,
    },
    Config(Config),
}

/// Which end sent a `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Sender {
    CameraLoop,
    Controller,
}

/// Why a frame could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// The output buffer is shorter than the frame.
    BufferTooSmall,
}

/// Why a frame was dropped by the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// More than [`MAX_FRAME`] bytes before a delimiter.
    TooLong,
    /// Not valid COBS, or too short to hold a version and a CRC.
    Framing,
    /// The CRC does not match.
    Crc,
    /// Another protocol version.
    Version(u8),
    /// The body is not a message.
    Message,
}

/// Encode `msg` as one frame (delimiter included) into `out`; returns its length.
pub fn encode(msg: &Message, out: &mut [u8]) -> Result<usize, EncodeError> {
    let mut body = [0u8; MAX_BODY];
    body[0] = PROTOCOL_VERSION;
    let n = postcard::to_slice(msg, &mut body[1..MAX_BODY - 4])
        .map_err(|_| EncodeError::BufferTooSmall)?
        .len();
    let crc = CRC.checksum(&body[..1 + n]);
    body[1 + n..1 + n + 4].copy_from_slice(&crc.to_le_bytes());
    let len = 1 + n + 4;
    let written = cobs::try_encode(&body[..len], out).map_err(|_| EncodeError::BufferTooSmall)?;
    if written >= out.len() || written + 1 > MAX_FRAME {
        return Err(EncodeError::BufferTooSmall);
    }
    out[written] = 0;
    Ok(written + 1)
}

/// [`encode`] preceded by a delimiter, as senders write frames: line noise before the frame then
/// spoils nothing but itself. `out` needs [`MAX_FRAME`] + 1 bytes at most.
pub fn encode_delimited(msg: &Message, out: &mut [u8]) -> Result<usize, EncodeError> {
    let (first, rest) = out.split_first_mut().ok_or(EncodeError::BufferTooSmall)?;
    *first = 0;
    Ok(1 + encode(msg, rest)?)
}

/// Decode one frame's bytes (without the delimiter). Never panics.
pub fn decode_frame(frame: &[u8]) -> Result<Message, DecodeError> {
    if frame.len() > MAX_FRAME - 1 {
        return Err(DecodeError::TooLong);
    }
    let mut buf = [0u8; MAX_FRAME];
    buf[..frame.len()].copy_from_slice(frame);
    let n = cobs::decode_in_place(&mut buf[..frame.len()]).map_err(|_| DecodeError::Framing)?;
    if n < 1 + 1 + 4 || n > frame.len() {
        return Err(DecodeError::Framing);
    }
    let (body, crc) = buf[..n].split_at(n - 4);
    let want = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if CRC.checksum(body) != want {
        return Err(DecodeError::Crc);
    }
    if body[0] != PROTOCOL_VERSION {
        return Err(DecodeError::Version(body[0]));
    }
    match postcard::take_from_bytes::<Message>(&body[1..]) {
        Ok((msg, [])) => Ok(msg),
        _ => Err(DecodeError::Message),
    }
}

/// A streaming decoder: feed bytes as they arrive; each delimiter ends a frame.
#[derive(Debug, Clone)]
pub struct Decoder {
    buf: [u8; MAX_FRAME],
    len: usize,
    /// The current frame ran over [`MAX_FRAME`]: skip to the next delimiter.
    overflow: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    pub const fn new() -> Self {
        Self {
            buf: [0; MAX_FRAME],
            len: 0,
            overflow: false,
        }
    }

    /// Take one byte; at a delimiter, the frame's message or why it was dropped (`None` for an
    /// empty frame, e.g. two delimiters in a row, and between delimiters).
    pub fn push(&mut self, byte: u8) -> Option<Result<Message, DecodeError>> {
        if byte != 0 {
            if self.len < self.buf.len() {
                self.buf[self.len] = byte;
                self.len += 1;
            } else {
                self.overflow = true;
            }
            return None;
        }
        let (len, overflow) = (self.len, self.overflow);
        self.len = 0;
        self.overflow = false;
        if overflow || len > MAX_FRAME - 1 {
            return Some(Err(DecodeError::TooLong));
        }
        if len == 0 {
            return None;
        }
        Some(decode_frame(&self.buf[..len]))
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn frame(msg: &Message) -> Vec<u8> {
        let mut out = [0u8; MAX_FRAME];
        let n = encode(msg, &mut out).unwrap();
        out[..n].to_vec()
    }

    /// One of each message, as sent by the camera loop or the controller.
    pub(crate) fn samples() -> [Message; 6] {
        [
            Message::Hello {
                protocol: PROTOCOL_VERSION,
                sender: Sender::CameraLoop,
            },
            Message::Heartbeat { seq: 300 },
            Message::Expression {
                class: 3,
                confidence_permille: 875,
                time_ms: 123_456,
            },
            Message::Alert {
                kind: AlertKind::NegativeExpression,
                level: 2,
            },
            Message::Alert {
                kind: AlertKind::LinkLost,
                level: 1,
            },
            Message::Config(Config::default()),
        ]
    }

    fn hex(b: &[u8]) -> std::string::String {
        b.iter()
            .map(|x| std::format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The bytes of every message, as documented in PROTOCOL.md (which this test also reads).
    #[test]
    fn the_negative_mask_follows_the_class_names_not_their_positions() {
        let reference = [
            "happiness",
            "sadness",
            "neutral",
            "anger",
            "surprise",
            "disgust",
            "fear",
        ];
        assert_eq!(Config::for_classes(reference), Ok(Config::default()));
        // The same classes in another order: the bits move with the names.
        let permuted = [
            "Fear",
            "neutral",
            "happiness",
            "surprise",
            "anger",
            "sadness",
            "disgust",
        ];
        let c = Config::for_classes(permuted).unwrap();
        assert_eq!(
            c.negative_classes,
            (1 << 0) | (1 << 4) | (1 << 5) | (1 << 6)
        );
        assert_eq!(c.threshold_permille, Config::default().threshold_permille);
        // No negative class at all: nothing ever alerts.
        assert_eq!(
            Config::for_classes(["calm", "happy"])
                .unwrap()
                .negative_classes,
            0
        );
        // A negative class beyond the 16-bit mask is refused, not silently dropped.
        let many: Vec<&str> = core::iter::repeat_n("other", 16).chain(["anger"]).collect();
        assert_eq!(
            Config::for_classes(many.iter().copied()),
            Err(ClassOutOfMask { index: 16 })
        );
    }

    #[test]
    fn golden_bytes() {
        // From firmware/tools/protocol_golden.py (postcard by hand, zlib CRC-32, COBS by hand).
        let want = [
            "02 01 02 01 05 38 89 e3 80 00",
            "09 01 01 ac 02 87 40 86 74 00",
            "0d 01 02 03 eb 06 c0 c4 07 cb 04 b1 62 00",
            "03 01 03 06 02 0c 67 b0 75 00",
            "09 01 03 01 01 f7 07 a2 f5 00",
            "0e 01 04 6a d8 04 d0 0f b8 17 ed 7a d4 d3 00",
        ];
        let doc = include_str!("../PROTOCOL.md");
        for (msg, want) in samples().iter().zip(want) {
            let bytes = frame(msg);
            assert_eq!(hex(&bytes), want, "{msg:?}");
            assert!(doc.contains(want), "PROTOCOL.md lacks {want} ({msg:?})");
            assert_eq!(decode_frame(&bytes[..bytes.len() - 1]), Ok(*msg));
        }
    }

    #[test]
    fn every_message_fits_and_no_frame_body_holds_a_zero() {
        for msg in samples() {
            let f = frame(&msg);
            assert!(f.len() <= MAX_FRAME);
            assert_eq!(f.iter().filter(|b| **b == 0).count(), 1);
            assert_eq!(*f.last().unwrap(), 0);
        }
        let mut tiny = [0u8; 4];
        assert_eq!(
            encode(&samples()[5], &mut tiny),
            Err(EncodeError::BufferTooSmall)
        );
        let mut out = [0u8; MAX_FRAME + 1];
        let n = encode_delimited(&samples()[2], &mut out).unwrap();
        assert_eq!(out[0], 0);
        assert_eq!(&out[1..n], frame(&samples()[2]).as_slice());
        assert_eq!(
            encode_delimited(&samples()[2], &mut []),
            Err(EncodeError::BufferTooSmall)
        );
    }

    /// xorshift64*: deterministic pseudo-random bytes for the property tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn feed(dec: &mut Decoder, bytes: &[u8]) -> Vec<Result<Message, DecodeError>> {
        bytes.iter().filter_map(|b| dec.push(*b)).collect()
    }

    /// Arbitrary byte streams never panic the decoder, and whatever garbage came before, a valid
    /// frame after a delimiter is decoded.
    #[test]
    fn garbage_never_panics_and_the_decoder_resynchronises() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let msgs = samples();
        for case in 0..20_000 {
            let mut dec = Decoder::new();
            let n = rng.below(200);
            let garbage: Vec<u8> = (0..n)
                .map(|_| {
                    // Zeros are frequent enough to exercise short frames.
                    if rng.below(8) == 0 {
                        0
                    } else {
                        rng.next() as u8
                    }
                })
                .collect();
            // Random bytes passing COBS, CRC-32, the version and postcard: possible in principle
            // (about 2^-32 per frame), never seen with this seed.
            if let Some(m) = feed(&mut dec, &garbage).into_iter().flatten().next() {
                panic!("case {case}: garbage accepted as {m:?}");
            }
            let msg = msgs[case % msgs.len()];
            let mut stream = std::vec![0u8]; // the sender's resync delimiter
            stream.extend(frame(&msg));
            let out = feed(&mut dec, &stream);
            assert_eq!(out.last(), Some(&Ok(msg)), "case {case}");
        }
    }

    /// Bit flips and truncations of valid frames are rejected, never accepted as another
    /// message.
    #[test]
    fn flipped_bits_and_truncations_are_rejected() {
        let mut rng = Rng(7);
        for msg in samples() {
            let f = frame(&msg);
            let body = &f[..f.len() - 1];
            for _ in 0..2000 {
                let mut bad = body.to_vec();
                let flips = 1 + rng.below(3);
                for _ in 0..flips {
                    let i = rng.below(bad.len());
                    bad[i] ^= 1 << rng.below(8);
                }
                if bad == body {
                    continue;
                }
                // A flip may create a zero (a delimiter): decode each piece.
                for piece in bad.split(|b| *b == 0).filter(|p| !p.is_empty()) {
                    assert!(decode_frame(piece).is_err(), "{msg:?}: {bad:?} accepted");
                }
            }
            for cut in 1..body.len() {
                assert!(decode_frame(&body[..cut]).is_err());
            }
        }
        let mut dec = Decoder::new();
        let long = std::vec![5u8; 3 * MAX_FRAME];
        assert_eq!(feed(&mut dec, &long), []);
        assert_eq!(dec.push(0), Some(Err(DecodeError::TooLong)));
        let ok = frame(&Message::Heartbeat { seq: 1 });
        assert_eq!(feed(&mut dec, &ok), [Ok(Message::Heartbeat { seq: 1 })]);
    }

    #[test]
    fn another_version_is_named() {
        let mut body = [0u8; 16];
        body[0] = 9;
        let n = postcard::to_slice(&Message::Heartbeat { seq: 1 }, &mut body[1..])
            .unwrap()
            .len();
        let crc = CRC.checksum(&body[..1 + n]).to_le_bytes();
        body[1 + n..5 + n].copy_from_slice(&crc);
        let mut enc = [0u8; 32];
        let k = cobs::try_encode(&body[..5 + n], &mut enc).unwrap();
        assert_eq!(decode_frame(&enc[..k]), Err(DecodeError::Version(9)));
    }
}
