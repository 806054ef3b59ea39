//! # pe-clip-firmware
//!
//! The alert side of pe-clip, `#![no_std]`: the wire protocol the camera loop speaks over a
//! serial link ([`protocol`]: postcard messages, CRC-32, COBS framing).
#![no_std]
#![forbid(unsafe_code)]

pub mod protocol;
