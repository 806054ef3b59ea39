//! The camera source: raw frames (MJPEG or YUYV) from a capture device, converted to RGB, with
//! reconnection after the device disappears (a loose USB cable, a camera reset): the device is
//! reopened with exponential back-off, and only after `give_up` without success does the source
//! fail. The V4L2 device itself (feature `camera`) is [`v4l2::V4l2Camera`]; everything else here is
//! device-independent and tested with a scripted camera.

use std::time::{Duration, Instant};

use image::RgbImage;
use pe_clip_models::video::ycbcr_to_rgb;

use super::source::{Frame, FrameSource, Item};
use crate::error::{Error, Result};

/// Pixel formats pe-clip reads from a camera.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// Motion JPEG: each frame a JPEG image (most USB cameras at 640x480 and above).
    Mjpeg,
    /// YUYV 4:2:2 packed (Y0 U Y1 V), limited range.
    Yuyv,
}

/// One captured frame as the device delivered it.
#[derive(Debug, Clone)]
pub struct RawFrame {
    pub format: PixelFormat,
    pub width: u32,
    pub height: u32,
    /// Bytes per row (YUYV).
    pub stride: u32,
    pub bytes: Vec<u8>,
}

/// YUYV 4:2:2 (limited-range BT.601) to RGB; `None` if the buffer is too short.
pub fn yuyv_to_rgb(bytes: &[u8], width: u32, height: u32, stride: u32) -> Option<RgbImage> {
    let (w, h, stride) = (width as usize, height as usize, stride as usize);
    let stride = stride.max(w * 2);
    if w == 0 || h == 0 || bytes.len() < stride * (h - 1) + w * 2 {
        return None;
    }
    let mut out = RgbImage::new(width, height);
    for y in 0..h {
        let row = &bytes[y * stride..y * stride + w * 2];
        for x in 0..w {
            let pair = &row[(x / 2) * 4..(x / 2) * 4 + 4];
            let luma = if x % 2 == 0 { pair[0] } else { pair[2] };
            let rgb = ycbcr_to_rgb(luma, pair[1], pair[3], false);
            out.put_pixel(x as u32, y as u32, image::Rgb(rgb));
        }
    }
    Some(out)
}

/// Decode one raw frame to RGB; the message says why it could not be.
pub fn to_rgb(raw: &RawFrame) -> std::result::Result<RgbImage, String> {
    match raw.format {
        PixelFormat::Mjpeg => {
            image::load_from_memory_with_format(&raw.bytes, image::ImageFormat::Jpeg)
                .map(|i| i.into_rgb8())
                .map_err(|e| format!("bad MJPEG frame ({} bytes): {e}", raw.bytes.len()))
        }
        PixelFormat::Yuyv => {
            yuyv_to_rgb(&raw.bytes, raw.width, raw.height, raw.stride).ok_or_else(|| {
                format!(
                    "short YUYV frame: {} bytes for {}x{}",
                    raw.bytes.len(),
                    raw.width,
                    raw.height
                )
            })
        }
    }
}

/// The mode a camera settled on.
#[derive(Debug, Clone, PartialEq)]
pub struct CameraMode {
    /// For logs, e.g. `Mjpeg 640x480 at 30.0 fps`.
    pub description: String,
    /// The frame rate the device reports, when it does.
    pub fps: Option<f64>,
}

/// A capture device that can be (re)opened.
pub trait Camera: Send {
    /// Open (or reopen) the device and start streaming.
    fn open(&mut self) -> std::io::Result<CameraMode>;
    /// The next frame (blocking, with the device's own timeout).
    fn grab(&mut self) -> std::io::Result<RawFrame>;
    /// Stop streaming and release the device.
    fn close(&mut self);
    /// The device's name (its path).
    fn name(&self) -> String;
}

/// Waits between reconnection attempts: `first`, doubling up to `max`; the source gives up once
/// `give_up` has passed since the device was lost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    pub give_up: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            first: Duration::from_millis(100),
            max: Duration::from_secs(2),
            give_up: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The wait before attempt `n` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let f = 2u32.saturating_pow(attempt.min(20));
        self.first.saturating_mul(f).min(self.max)
    }
}

/// A camera as a [`FrameSource`]: frames are timestamped on arrival, undecodable frames are
/// reported as corrupt, and a lost device is reopened with back-off.
pub struct CameraSource<C: Camera> {
    camera: C,
    backoff: Backoff,
    started: Instant,
    index: u64,
    mode: CameraMode,
    /// Times the device was lost and came back.
    pub reconnects: u64,
    sleep: fn(Duration),
}

impl<C: Camera> CameraSource<C> {
    /// Open `camera` once (a camera that is not there at start is an error at once).
    pub fn open(mut camera: C, backoff: Backoff) -> Result<Self> {
        let mode = camera
            .open()
            .map_err(|e| Error::device(format!("camera {}", camera.name()), e))?;
        log::info!("camera {}: {}", camera.name(), mode.description);
        Ok(Self {
            camera,
            backoff,
            started: Instant::now(),
            index: 0,
            mode,
            reconnects: 0,
            sleep: std::thread::sleep,
        })
    }

    /// Use another sleep (tests).
    pub fn with_sleep(mut self, sleep: fn(Duration)) -> Self {
        self.sleep = sleep;
        self
    }

    fn reconnect(&mut self, cause: std::io::Error) -> Result<()> {
        let name = self.camera.name();
        log::warn!(
            "camera {name} lost at frame {}: {cause}; reconnecting",
            self.index
        );
        self.camera.close();
        let lost = Instant::now();
        let mut waited = Duration::ZERO;
        let mut last = cause;
        for attempt in 0.. {
            let d = self.backoff.delay(attempt);
            if waited + d > self.backoff.give_up {
                break;
            }
            (self.sleep)(d);
            waited += d;
            match self.camera.open() {
                Ok(mode) => {
                    self.reconnects += 1;
                    log::warn!(
                        "camera {name} back after {:.1} s ({})",
                        lost.elapsed().as_secs_f64(),
                        mode.description
                    );
                    self.mode = mode;
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        Err(Error::device(
            format!("camera {name}"),
            format!(
                "lost at frame {} and did not come back within {:.0} s: {last}",
                self.index,
                self.backoff.give_up.as_secs_f64()
            ),
        ))
    }
}

impl<C: Camera> FrameSource for CameraSource<C> {
    fn describe(&self) -> String {
        format!("camera {} ({})", self.camera.name(), self.mode.description)
    }

    fn fps(&self) -> Option<f64> {
        self.mode.fps
    }

    fn is_live(&self) -> bool {
        true
    }

    fn next_item(&mut self) -> Result<Option<Item>> {
        let raw = loop {
            match self.camera.grab() {
                Ok(raw) => break raw,
                Err(e) => self.reconnect(e)?,
            }
        };
        let index = self.index;
        self.index += 1;
        let t_ms = self.started.elapsed().as_secs_f64() * 1e3;
        Ok(Some(match to_rgb(&raw) {
            Ok(image) => Item::Frame(Frame {
                index,
                t_ms,
                image,
                truth: None,
            }),
            Err(reason) => Item::Corrupt {
                index,
                frame: format!("{}#{index}", self.camera.name()),
                reason,
            },
        }))
    }
}

/// The V4L2 device (feature `camera`).
#[cfg(feature = "camera")]
pub mod v4l2 {
    use std::path::PathBuf;
    use std::time::Duration;

    use v4l::buffer::Type;
    use v4l::io::traits::CaptureStream;
    use v4l::prelude::*;
    use v4l::video::Capture;
    use v4l::FourCC;

    use super::{Camera, CameraMode, PixelFormat, RawFrame};

    /// What to ask the camera for; it may give the nearest mode it has.
    #[derive(Debug, Clone, PartialEq)]
    pub struct CameraOptions {
        pub width: u32,
        pub height: u32,
        pub fps: u32,
        /// `None`: MJPEG if offered, else YUYV.
        pub format: Option<PixelFormat>,
    }

    impl Default for CameraOptions {
        fn default() -> Self {
            Self {
                width: 640,
                height: 480,
                fps: 30,
                format: None,
            }
        }
    }

    fn fourcc(f: PixelFormat) -> FourCC {
        match f {
            PixelFormat::Mjpeg => FourCC::new(b"MJPG"),
            PixelFormat::Yuyv => FourCC::new(b"YUYV"),
        }
    }

    /// A V4L2 capture device streaming through memory-mapped buffers.
    pub struct V4l2Camera {
        path: PathBuf,
        want: CameraOptions,
        // The stream is declared first so that it is dropped before the device.
        stream: Option<MmapStream<'static>>,
        dev: Option<Device>,
        mode: Option<(PixelFormat, u32, u32, u32)>,
    }

    impl V4l2Camera {
        pub fn new(path: PathBuf, want: CameraOptions) -> Self {
            Self {
                path,
                want,
                stream: None,
                dev: None,
                mode: None,
            }
        }
    }

    fn other(msg: String) -> std::io::Error {
        std::io::Error::other(msg)
    }

    impl Camera for V4l2Camera {
        fn open(&mut self) -> std::io::Result<CameraMode> {
            self.close();
            let dev = Device::with_path(&self.path)?;
            let offered: Vec<FourCC> = dev.enum_formats()?.iter().map(|f| f.fourcc).collect();
            let pick = match self.want.format {
                Some(f) => f,
                None if offered.contains(&fourcc(PixelFormat::Mjpeg)) => PixelFormat::Mjpeg,
                None => PixelFormat::Yuyv,
            };
            if !offered.contains(&fourcc(pick)) {
                return Err(other(format!(
                    "does not offer {pick:?} (it offers {})",
                    offered
                        .iter()
                        .map(|f| f.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            let mut fmt = dev.format()?;
            fmt.width = self.want.width;
            fmt.height = self.want.height;
            fmt.fourcc = fourcc(pick);
            let fmt = dev.set_format(&fmt)?;
            if fmt.fourcc != fourcc(pick) {
                return Err(other(format!(
                    "refused {pick:?}, set {} instead",
                    fmt.fourcc
                )));
            }
            let params = dev.set_params(&v4l::video::capture::Parameters::with_fps(
                self.want.fps.max(1),
            ))?;
            let fps = params.interval.denominator as f64 / params.interval.numerator.max(1) as f64;
            let mut stream = MmapStream::with_buffers(&dev, Type::VideoCapture, 4)?;
            stream.set_timeout(Duration::from_secs(2));
            self.mode = Some((pick, fmt.width, fmt.height, fmt.stride));
            self.stream = Some(stream);
            self.dev = Some(dev);
            Ok(CameraMode {
                description: format!("{pick:?} {}x{} at {fps:.1} fps", fmt.width, fmt.height),
                fps: (fps > 0.0).then_some(fps),
            })
        }

        fn grab(&mut self) -> std::io::Result<RawFrame> {
            let (stream, (format, width, height, stride)) = match (&mut self.stream, self.mode) {
                (Some(s), Some(m)) => (s, m),
                _ => return Err(other("not streaming".into())),
            };
            let (buf, meta) = stream.next()?;
            let used = (meta.bytesused as usize).min(buf.len());
            let used = if used == 0 { buf.len() } else { used };
            Ok(RawFrame {
                format,
                width,
                height,
                stride,
                bytes: buf[..used].to_vec(),
            })
        }

        fn close(&mut self) {
            self.stream = None;
            self.dev = None;
            self.mode = None;
        }

        fn name(&self) -> String {
            self.path.display().to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::io;

    #[test]
    fn yuyv_converts_like_the_y4m_path_and_rejects_short_buffers() {
        // Two pixels: Y0=16 (black), Y1=235 (white), neutral chroma.
        let img = yuyv_to_rgb(&[16, 128, 235, 128], 2, 1, 4).unwrap();
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(img.get_pixel(1, 0).0, [255, 255, 255]);
        // Red in BT.601 limited range: Y 81, Cb 90, Cr 240.
        let red = yuyv_to_rgb(&[81, 90, 81, 240, 0, 0], 2, 1, 6).unwrap();
        let p = red.get_pixel(1, 0).0;
        assert!(p[0] > 250 && p[1] < 5 && p[2] < 5, "{p:?}");
        assert!(yuyv_to_rgb(&[0; 7], 2, 2, 4).is_none());
    }

    #[test]
    fn mjpeg_frames_decode_and_garbage_is_a_reason() {
        let img = RgbImage::from_pixel(16, 8, image::Rgb([200, 30, 30]));
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
            .encode_image(&img)
            .unwrap();
        let raw = |bytes| RawFrame {
            format: PixelFormat::Mjpeg,
            width: 16,
            height: 8,
            stride: 0,
            bytes,
        };
        let got = to_rgb(&raw(jpeg)).unwrap();
        assert_eq!(got.dimensions(), (16, 8));
        assert!(got.get_pixel(8, 4).0[0] > 180);
        let err = to_rgb(&raw(vec![0xff, 0xd8, 1, 2, 3])).unwrap_err();
        assert!(err.contains("MJPEG"), "{err}");
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let b = Backoff::default();
        let ms: Vec<u128> = (0..7).map(|i| b.delay(i).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(2));
    }

    /// A camera that plays a script of grab and open outcomes.
    struct Scripted {
        grabs: VecDeque<io::Result<RawFrame>>,
        opens: VecDeque<io::Result<CameraMode>>,
        closes: usize,
    }

    impl Camera for Scripted {
        fn open(&mut self) -> io::Result<CameraMode> {
            self.opens.pop_front().unwrap_or_else(|| Ok(mode("mode")))
        }
        fn grab(&mut self) -> io::Result<RawFrame> {
            self.grabs
                .pop_front()
                .unwrap_or_else(|| Err(io::Error::other("unplugged")))
        }
        fn close(&mut self) {
            self.closes += 1;
        }
        fn name(&self) -> String {
            "/dev/video9".into()
        }
    }

    fn yuyv_frame() -> io::Result<RawFrame> {
        Ok(RawFrame {
            format: PixelFormat::Yuyv,
            width: 2,
            height: 1,
            stride: 4,
            bytes: vec![16, 128, 235, 128],
        })
    }

    fn gone() -> io::Result<RawFrame> {
        Err(io::Error::from_raw_os_error(19)) // ENODEV
    }

    fn no_sleep(_: Duration) {}

    fn mode(d: &str) -> CameraMode {
        CameraMode {
            description: d.into(),
            fps: Some(15.0),
        }
    }

    #[test]
    fn a_vanished_camera_is_reopened_then_reported() {
        let short_frame = Ok(RawFrame {
            bytes: vec![1, 2],
            ..yuyv_frame().unwrap()
        });
        let cam = Scripted {
            grabs: VecDeque::from([yuyv_frame(), gone(), yuyv_frame(), short_frame]),
            opens: VecDeque::from([
                Ok(mode("first")),
                Err(io::Error::other("no device")),
                Err(io::Error::other("no device")),
                Ok(mode("again")),
            ]),
            closes: 0,
        };
        let mut src = CameraSource::open(cam, Backoff::default())
            .unwrap()
            .with_sleep(no_sleep);
        assert!(src.is_live());
        assert_eq!(src.fps(), Some(15.0));
        assert!(matches!(src.next_item().unwrap(), Some(Item::Frame(f)) if f.index == 0));
        // Lost, two failed reopens, back: the next frame still comes.
        assert!(matches!(src.next_item().unwrap(), Some(Item::Frame(f)) if f.index == 1));
        assert_eq!(src.reconnects, 1);
        assert!(src.describe().contains("again"));
        assert!(matches!(
            src.next_item().unwrap(),
            Some(Item::Corrupt { index: 2, .. })
        ));
        // Now it stays away: every reopen fails until the give-up time.
        src.camera.opens = (0..100)
            .map(|_| Err(io::Error::other("no device")))
            .collect();
        let err = src.next_item().unwrap_err().to_string();
        assert!(
            err.contains("/dev/video9") && err.contains("did not come back within 30 s"),
            "{err}"
        );
        assert!(src.camera.closes >= 2);
    }

    #[test]
    fn a_camera_missing_at_start_is_an_error_at_once() {
        let cam = Scripted {
            grabs: VecDeque::new(),
            opens: VecDeque::from([Err(io::Error::from_raw_os_error(2))]),
            closes: 0,
        };
        let err = CameraSource::open(cam, Backoff::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("camera /dev/video9"), "{err}");
    }
}
