//! Y4M clips: a bounded streaming reader (header and frame sizes checked before anything is
//! allocated), 4:2:0 / 4:2:2 / 4:4:4 in limited or full range to RGB, and a 4:4:4 writer.

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use image::RgbImage;

use super::{SampledClip, SkippedFrame};
use crate::error::{Error, Result};

/// How a y4m file's samples map to RGB.
#[derive(Debug, Clone, Copy)]
struct YuvLayout {
    width: usize,
    height: usize,
    /// Chroma subsampling shifts (x, y); `None` for grayscale.
    chroma_shift: Option<(usize, usize)>,
    full_range: bool,
}

/// The byte source a decoder reads: the header line already read and checked, then the rest.
type Source = std::io::Chain<std::io::Cursor<Vec<u8>>, BufReader<std::fs::File>>;

/// The longest stream header accepted (the y4m crate itself reads at most 1 kB of parameters).
const MAX_HEADER_BYTES: usize = 4096;

/// Open a `.y4m` file (a regular file only: a FIFO or device is refused), check the frame size
/// its header asks for against [`super::MAX_FRAME_PIXELS`] with checked arithmetic *before* the
/// y4m crate sees it (it multiplies W x H unchecked), and return the decoder, the layout and the
/// file length.
fn open_decoder(path: &Path) -> Result<(y4m::Decoder<Source>, YuvLayout, u64)> {
    let (file, file_len) = crate::io::open_regular(path, false)?;
    let mut reader = BufReader::new(file);
    let mut header = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match reader.read(&mut byte) {
            Ok(1) => {
                header.push(byte[0]);
                if byte[0] == b'\n' {
                    break;
                }
                if header.len() > MAX_HEADER_BYTES {
                    return Err(Error::invalid(
                        path,
                        format!("y4m stream header longer than {MAX_HEADER_BYTES} bytes"),
                    ));
                }
            }
            Ok(_) => return Err(Error::invalid(path, "not a y4m stream: no header line")),
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    let (w, h) = header_size(path, &header)?;
    let frame_bytes = check_frame_size(path, w, h)? * 3;
    let limits = y4m::Limits {
        bytes: frame_bytes as usize,
    };
    let dec = y4m::Decoder::new_with_limits(std::io::Cursor::new(header).chain(reader), limits)
        .map_err(|e| Error::invalid(path, format!("not a y4m stream: {e}")))?;
    let layout = y4m_layout(path, &dec)?;
    Ok((dec, layout, file_len))
}

/// The `W` and `H` of a y4m header line, parsed without overflow.
fn header_size(path: &Path, header: &[u8]) -> Result<(u64, u64)> {
    let text = String::from_utf8_lossy(header);
    if !text.starts_with("YUV4MPEG2") {
        return Err(Error::invalid(path, "not a y4m stream: no YUV4MPEG2 magic"));
    }
    let field = |key: char| -> Result<u64> {
        let v = text
            .split_ascii_whitespace()
            .skip(1)
            .find_map(|t| t.strip_prefix(key))
            .ok_or_else(|| Error::invalid(path, format!("y4m header has no {key} (frame size)")))?;
        v.parse::<u64>()
            .map_err(|_| Error::invalid(path, format!("y4m header {key}{v}: not a frame size")))
    };
    Ok((field('W')?, field('H')?))
}

/// Refuse a frame of `w` x `h` outside the limits; returns its pixel count.
pub(crate) fn check_frame_size(path: &Path, w: u64, h: u64) -> Result<u64> {
    let (side, max) = (super::MAX_FRAME_SIDE, super::MAX_FRAME_PIXELS);
    let px = w.saturating_mul(h);
    if w == 0 || h == 0 || w > side || h > side || px > max {
        return Err(Error::invalid(
            path,
            format!(
                "frame size {w}x{h} is outside the limits (1..={side} per side, at most {max} \
                 pixels)"
            ),
        ));
    }
    Ok(px)
}

/// One raw frame's planes (Y, then U, then V) as stored.
fn raw_planes(frame: &y4m::Frame) -> Vec<u8> {
    let mut raw = frame.get_y_plane().to_vec();
    raw.extend_from_slice(frame.get_u_plane());
    raw.extend_from_slice(frame.get_v_plane());
    raw
}

/// What [`scan_y4m`] found: the kept frames with their indices, the number of readable frames,
/// and the unreadable one that ended the stream.
type Scan = (Vec<(usize, RgbImage)>, usize, Vec<SkippedFrame>);

/// Read a `.y4m` file's frames (8-bit 4:2:0, 4:2:2, 4:4:4 or mono), converting to RGB only those
/// `keep` accepts (by index) and counting the rest: memory holds the kept frames only. A frame
/// that cannot be read (bad frame header, cut short by the end of the file) ends the stream and
/// is reported.
fn scan_y4m(path: &Path, mut keep: impl FnMut(usize) -> bool) -> Result<Scan> {
    let (mut dec, layout, file_len) = open_decoder(path)?;
    let mut kept = Vec::new();
    let mut count = 0usize;
    let mut skipped = Vec::new();
    let mut skip = |index: usize, reason: String| {
        log::warn!(
            "skipping unreadable frame {}#{index}: {reason}",
            path.display()
        );
        skipped.push(SkippedFrame {
            frame: format!("{}#{index}", path.display()),
            reason,
        });
    };
    loop {
        match dec.read_frame() {
            Ok(frame) => {
                if keep(count) {
                    kept.push((count, yuv_to_rgb(&raw_planes(&frame), layout)));
                }
                count += 1;
            }
            Err(y4m::Error::EOF) => {
                // The decoder reports a frame cut short by the end of the file as a clean end:
                // compare the file length with what the frames read account for.
                let expected = y4m_stream_len(path, &layout, count)?;
                if expected < file_len {
                    let extra = file_len - expected;
                    skip(count, format!("truncated frame ({extra} trailing bytes)"));
                }
                break;
            }
            Err(e) => {
                skip(count, format!("{e}; the rest of the stream is unreadable"));
                break;
            }
        }
    }
    Ok((kept, count, skipped))
}

/// Read every frame of a `.y4m` file as RGB, with the frames that could not be read.
pub fn read_y4m(path: &Path) -> Result<(Vec<RgbImage>, Vec<SkippedFrame>)> {
    let (kept, _, skipped) = scan_y4m(path, |_| true)?;
    Ok((kept.into_iter().map(|(_, f)| f).collect(), skipped))
}

/// Bytes taken by the header and the first `n` frames (each with a bare `FRAME\n` header).
fn y4m_stream_len(path: &Path, layout: &YuvLayout, n: usize) -> Result<u64> {
    let mut head = Vec::new();
    let mut f = BufReader::new(std::fs::File::open(path).map_err(|e| Error::io(path, e))?);
    let mut byte = [0u8; 1];
    loop {
        match f.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => head.push(byte[0]),
            _ => return Ok(0),
        }
    }
    // The sizes were checked against the frame limits when the file was opened.
    let (w, h) = (layout.width as u64, layout.height as u64);
    let chroma = match layout.chroma_shift {
        Some((sx, sy)) => 2 * w.div_ceil(1 << sx) * h.div_ceil(1 << sy),
        None => 0,
    };
    Ok((head.len() as u64 + 1).saturating_add((n as u64).saturating_mul(6 + w * h + chroma)))
}

fn yuv_to_rgb(raw: &[u8], l: YuvLayout) -> RgbImage {
    let (w, h) = (l.width, l.height);
    let chroma = match l.chroma_shift {
        Some((sx, sy)) => w.div_ceil(1 << sx) * h.div_ceil(1 << sy),
        None => 0,
    };
    let (yp, rest) = raw.split_at(w * h);
    let (up, vp) = rest.split_at(chroma);
    let mut out = RgbImage::new(w as u32, h as u32);
    for y in 0..h {
        for x in 0..w {
            let (cb, cr) = match l.chroma_shift {
                Some((sx, sy)) => {
                    let cw = w.div_ceil(1 << sx);
                    let i = (y >> sy) * cw + (x >> sx);
                    (up[i], vp[i])
                }
                None => (128, 128),
            };
            // Limited range unless the stream says XCOLORRANGE=FULL.
            out.put_pixel(
                x as u32,
                y as u32,
                image::Rgb(ycbcr_to_rgb(yp[y * w + x], cb, cr, l.full_range)),
            );
        }
    }
    out
}

/// One BT.601 Y'CbCr sample as RGB: limited range (Y 16..235) unless `full_range`. Shared by the
/// y4m reader and the camera's YUYV frames.
pub fn ycbcr_to_rgb(y: u8, cb: u8, cr: u8, full_range: bool) -> [u8; 3] {
    let luma = f32::from(y);
    let (cb, cr) = (f32::from(cb) - 128.0, f32::from(cr) - 128.0);
    let (yy, k) = if full_range {
        (luma, 1.0)
    } else {
        (1.164_383_6 * (luma - 16.0), 1.138_393)
    };
    let r = yy + k * 1.402 * cr;
    let g = yy - k * (0.344_136 * cb + 0.714_136 * cr);
    let b = yy + k * 1.772 * cb;
    [to_u8(r), to_u8(g), to_u8(b)]
}

fn to_u8(v: f32) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

/// Sample a `.y4m` clip in two passes: count the readable frames, then convert only the sampled
/// ones (each once, however often the sampler repeats it), so memory holds the sampled frames
/// and nothing else whatever the clip's length.
pub(super) fn load_sampled_y4m(
    path: &Path,
    mut pick: impl FnMut(usize) -> Vec<usize>,
) -> Result<SampledClip> {
    let (_, count, skipped) = scan_y4m(path, |_| false)?;
    let idx = if count == 0 { Vec::new() } else { pick(count) };
    if idx.is_empty() {
        return Err(Error::NoReadableFrames {
            path: path.to_path_buf(),
            unreadable: skipped.into_iter().map(|s| s.frame).collect(),
        });
    }
    let wanted: std::collections::BTreeSet<usize> = idx.iter().copied().collect();
    let (kept, recount, _) = scan_y4m(path, |i| wanted.contains(&i))?;
    let by_index: std::collections::HashMap<usize, RgbImage> = kept.into_iter().collect();
    let frames = idx
        .iter()
        .map(|i| {
            by_index.get(i).cloned().ok_or_else(|| {
                Error::invalid(
                    path,
                    format!("frame {i} vanished between two reads ({recount} frames now)"),
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(SampledClip {
        path: path.to_path_buf(),
        frames,
        readable_frames: count,
        skipped,
    })
}

/// Write RGB frames as an 8-bit 4:4:4 full-range `.y4m` (lossless up to YUV rounding); used by
/// tests and tools.
pub fn write_y4m_444(path: &Path, frames: &[RgbImage], fps: usize) -> Result<()> {
    let first = frames
        .first()
        .ok_or_else(|| Error::invalid(path, "no frames to write"))?;
    let (w, h) = (first.width() as usize, first.height() as usize);
    crate::io::write_atomic_with(path, |out| {
        let mut enc = y4m::encode(w, h, y4m::Ratio::new(fps, 1))
            .with_colorspace(y4m::Colorspace::C444)
            .append_vendor_extension(
                y4m::VendorExtensionString::new(b"COLORRANGE=FULL".to_vec())
                    .map_err(|e| std::io::Error::other(e.to_string()))?,
            )
            .write_header(out)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        for f in frames {
            let mut planes = [vec![0u8; w * h], vec![0u8; w * h], vec![0u8; w * h]];
            for (i, p) in f.pixels().enumerate() {
                let [r, g, b] = p.0.map(f32::from);
                let y = 0.299 * r + 0.587 * g + 0.114 * b;
                planes[0][i] = to_u8(y);
                planes[1][i] = to_u8((b - y) / 1.772 + 128.0);
                planes[2][i] = to_u8((r - y) / 1.402 + 128.0);
            }
            let frame = y4m::Frame::new([&planes[0], &planes[1], &planes[2]], None);
            enc.write_frame(&frame)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        Ok(())
    })
}

/// A `.y4m` file read one frame at a time (the runtime's file source): constant memory however
/// long the file is. A frame that cannot be read (bad frame header, cut short) ends the stream and
/// is reported as a [`SkippedFrame`].
pub struct Y4mStream {
    path: PathBuf,
    dec: y4m::Decoder<Source>,
    layout: YuvLayout,
    fps: Option<f64>,
    next_index: usize,
    file_len: u64,
    done: bool,
}

impl Y4mStream {
    /// Open `path` and read its stream header.
    pub fn open(path: &Path) -> Result<Self> {
        let (dec, layout, file_len) = open_decoder(path)?;
        let rate = dec.get_framerate();
        let fps = (rate.num > 0 && rate.den > 0).then(|| rate.num as f64 / rate.den as f64);
        Ok(Self {
            path: path.to_path_buf(),
            dec,
            layout,
            fps,
            next_index: 0,
            file_len,
            done: false,
        })
    }

    /// Frames per second from the stream header, when it gives one.
    pub fn fps(&self) -> Option<f64> {
        self.fps
    }

    /// Frame size (width, height).
    pub fn size(&self) -> (usize, usize) {
        (self.layout.width, self.layout.height)
    }

    /// The next frame as RGB; `None` at the end; `Some(Err)` for an unreadable frame (which
    /// ends the stream).
    pub fn next_frame(&mut self) -> Option<std::result::Result<RgbImage, SkippedFrame>> {
        if self.done {
            return None;
        }
        let index = self.next_index;
        let skipped = |reason: String| SkippedFrame {
            frame: format!("{}#{index}", self.path.display()),
            reason,
        };
        match self.dec.read_frame() {
            Ok(frame) => {
                self.next_index += 1;
                Some(Ok(yuv_to_rgb(&raw_planes(&frame), self.layout)))
            }
            Err(y4m::Error::EOF) => {
                self.done = true;
                let expected = y4m_stream_len(&self.path, &self.layout, index).ok()?;
                (expected < self.file_len).then(|| {
                    Err(skipped(format!(
                        "truncated frame ({} trailing bytes)",
                        self.file_len - expected
                    )))
                })
            }
            Err(e) => {
                self.done = true;
                Some(Err(skipped(format!(
                    "{e}; the rest of the stream is unreadable"
                ))))
            }
        }
    }
}

fn y4m_layout<R: Read>(path: &Path, dec: &y4m::Decoder<R>) -> Result<YuvLayout> {
    use y4m::Colorspace as C;
    let chroma_shift = match dec.get_colorspace() {
        C::C420 | C::C420jpeg | C::C420paldv | C::C420mpeg2 => Some((1, 1)),
        C::C422 => Some((1, 0)),
        C::C444 => Some((0, 0)),
        C::Cmono => None,
        other => {
            return Err(Error::invalid(
                path,
                format!("unsupported y4m colorspace {other:?} (8-bit only)"),
            ))
        }
    };
    let params = String::from_utf8_lossy(dec.get_raw_params()).to_string();
    Ok(YuvLayout {
        width: dec.get_width(),
        height: dec.get_height(),
        chroma_shift,
        full_range: params.contains("XCOLORRANGE=FULL"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::video::load_sampled_clip;

    fn frame(v: u8) -> RgbImage {
        RgbImage::from_fn(8, 6, |x, y| image::Rgb([v, (x * 20) as u8, (y * 30) as u8]))
    }

    /// 4:2:0 limited-range BT.601 with odd sizes: Y=81, Cb=90, Cr=240 is pure red.
    #[test]
    fn y4m_420_limited_range_red() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("red.y4m");
        let (w, h) = (5usize, 3usize);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let (y, u, v) = (vec![81u8; w * h], vec![90u8; cw * ch], vec![240u8; cw * ch]);
        let mut bytes = Vec::new();
        {
            let mut enc = y4m::encode(w, h, y4m::Ratio::new(30, 1))
                .with_colorspace(y4m::Colorspace::C420jpeg)
                .write_header(&mut bytes)
                .unwrap();
            for _ in 0..3 {
                enc.write_frame(&y4m::Frame::new([&y, &u, &v], None))
                    .unwrap();
            }
        }
        std::fs::write(&p, &bytes).unwrap();
        let (frames, skipped) = read_y4m(&p).unwrap();
        assert!(skipped.is_empty());
        assert_eq!(frames.len(), 3);
        assert_eq!((frames[0].width(), frames[0].height()), (5, 3));
        for px in frames[2].pixels() {
            let [r, g, b] = px.0;
            assert!(r >= 252 && g <= 3 && b <= 3, "{:?}", px.0);
        }
    }

    #[test]
    fn y4m_round_trip_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.y4m");
        let frames: Vec<RgbImage> = (0..5).map(|i| frame(40 * i)).collect();
        write_y4m_444(&p, &frames, 25).unwrap();
        let (back, skipped) = read_y4m(&p).unwrap();
        assert!(skipped.is_empty());
        assert_eq!(back.len(), 5);
        for (a, b) in frames.iter().zip(&back) {
            for (pa, pb) in a.pixels().zip(b.pixels()) {
                for c in 0..3 {
                    assert!((i16::from(pa.0[c]) - i16::from(pb.0[c])).abs() <= 2);
                }
            }
        }
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let (back, skipped) = read_y4m(&p).unwrap();
        assert_eq!(back.len(), 4);
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].frame.ends_with("c.y4m#4"), "{:?}", skipped);
        let clip = load_sampled_clip(&p, 16).unwrap();
        assert_eq!(clip.frames.len(), 16);
        std::fs::write(&p, b"not y4m").unwrap();
        assert!(load_sampled_clip(&p, 16).is_err());
    }

    /// Reproduction 1 of issue 19: a header whose W x H overflows, and sizes over the limits,
    /// are refused by name before anything is allocated.
    #[test]
    fn y4m_headers_asking_for_huge_frames_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bomb.y4m");
        for (header, what) in [
            (
                "YUV4MPEG2 W4294967296 H4294967296 F25:1 Cmono\nFRAME\n",
                "4294967296x4294967296",
            ),
            ("YUV4MPEG2 W100000 H10 F25:1\nFRAME\n", "100000x10"),
            ("YUV4MPEG2 W8000 H8000 F25:1\nFRAME\n", "8000x8000"),
            ("YUV4MPEG2 W0 H10 F25:1\nFRAME\n", "0x10"),
            (
                "YUV4MPEG2 W18446744073709551616 H1\n",
                "W18446744073709551616",
            ),
            ("YUV4MPEG2 H10\n", "no W"),
        ] {
            std::fs::write(&p, header).unwrap();
            for e in [
                load_sampled_clip(&p, 16).unwrap_err().to_string(),
                Y4mStream::open(&p).err().unwrap().to_string(),
            ] {
                assert!(e.contains("bomb.y4m") && e.contains(what), "{header}: {e}");
            }
        }
        std::fs::write(&p, vec![b'Y'; MAX_HEADER_BYTES + 10]).unwrap();
        let e = load_sampled_clip(&p, 16).unwrap_err().to_string();
        assert!(e.contains("header longer"), "{e}");
    }

    /// Sampling a long clip converts each sampled frame once and keeps no other frame.
    #[test]
    fn y4m_sampling_converts_only_the_sampled_frames() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("one.y4m");
        write_y4m_444(&p, &[frame(7)], 25).unwrap();
        let clip = load_sampled_clip(&p, 16).unwrap();
        assert_eq!((clip.frames.len(), clip.readable_frames), (16, 1));
        let (kept, count, _) = scan_y4m(&p, |_| false).unwrap();
        assert_eq!((kept.len(), count), (0, 1));
    }
}
