//! # pe-clip-firmware
//!
//! The alert side of pe-clip, `#![no_std]`: the wire protocol the camera loop speaks over a
//! serial link ([`protocol`]: postcard messages, CRC-32, COBS framing), and the alert
//! controller that turns those messages into an LED and buzzer pattern ([`controller`]).
#![no_std]
#![forbid(unsafe_code)]

pub mod controller;
pub mod protocol;
