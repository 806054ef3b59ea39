//! Drawing a frame: the face's geometry from the AU intensities, then per pixel the inverse pose
//! and anti-aliased signed-distance shapes painted back to front (hair, face, cheeks, eyes and
//! brows, furrows and nose, mouth), lighting, the infrared look and sensor noise.

use image::{Rgb, RgbImage};

use super::{
    AuState, ClipSpec, Identity, AU1, AU12, AU15, AU16, AU2, AU20, AU23_LIPS, AU26, AU4, AU5, AU6,
    AU7, AU9,
};
use crate::rng::SeededRng;

/// A frame's face geometry in face units (radius 1), from its AU state.
struct Geometry {
    au: [f32; 13],
    eye_open: f32,
    brow_in: f32,
    brow_out: f32,
    brow_in_x: f32,
    corner_y: f32,
    mouth_w: f32,
    lip: f32,
    /// Mouth opening and jaw drop.
    open: f32,
    jaw: f32,
    upper_mid: f32,
    lower_mid: f32,
    /// Skip each feature where [`far_outside`] its box (the same frame, faster); off only to
    /// test that.
    cull: bool,
}

impl Geometry {
    fn new(s: &AuState, id: &Identity) -> Self {
        let a = |i: usize| s.au[i];
        let open = 0.22 * a(AU26) + 0.08 * a(AU16) + 0.15 * s.speech;
        Self {
            au: s.au,
            eye_open: (1.0 + 0.7 * a(AU5) - 0.45 * a(AU7) - 0.35 * a(AU6)) * (1.0 - s.blink),
            brow_in: id.brow_y - 0.13 * a(AU1) + 0.10 * a(AU4),
            brow_out: id.brow_y - 0.12 * a(AU2) + 0.03 * a(AU4) + 0.02 * a(AU1),
            brow_in_x: 0.12 - 0.05 * a(AU4),
            corner_y: id.mouth_y - 0.10 * a(AU12) + 0.10 * a(AU15) + 0.03 * a(AU20),
            mouth_w: id.mouth_w * (1.0 + 0.25 * a(AU12) + 0.35 * a(AU20) - 0.2 * a(AU23_LIPS)),
            lip: id.lip * (1.0 - 0.6 * a(AU23_LIPS)),
            open,
            jaw: 0.12 * a(AU26) + 0.5 * 0.15 * s.speech,
            upper_mid: id.mouth_y - 0.01 - 0.02 * a(AU9),
            lower_mid: id.mouth_y + open + 0.04 * a(AU16),
            cull: true,
        }
    }

    fn a(&self, i: usize) -> f32 {
        self.au[i]
    }
}

impl ClipSpec {
    /// Draw frame `t` at `size` x `size` pixels.
    pub fn render(&self, t: usize, size: u32) -> RgbImage {
        self.render_culled(t, size, true)
    }

    fn render_culled(&self, t: usize, size: u32, cull: bool) -> RgbImage {
        let g = Geometry {
            cull,
            ..Geometry::new(&self.aus_at(t), &self.identity)
        };
        let k = if self.frames > 1 {
            t as f32 / (self.frames - 1) as f32
        } else {
            0.0
        };
        let mut pose = [0.0f32; 5];
        for (i, p) in pose.iter_mut().enumerate() {
            *p = self.pose[0][i] + (self.pose[1][i] - self.pose[0][i]) * k;
        }
        let [roll, yaw, scale, sx, sy] = pose;
        let radius = size as f32 * 0.36 * scale;
        let (cx, cy) = (
            size as f32 * (0.5 + sx * 0.36),
            size as f32 * (0.52 + sy * 0.36),
        );
        let (sr, cr) = roll.sin_cos();
        let px = 1.0 / radius; // one pixel in face units
        let mut noise = SeededRng::new(self.seed ^ (t as u64).wrapping_mul(0x9E37_79B9));
        let mut img = RgbImage::new(size, size);
        for y in 0..size {
            for x in 0..size {
                let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                // Inverse pose: un-roll, then undo the yaw squeeze.
                let u0 = (cr * dx + sr * dy) / radius;
                let v = (-sr * dx + cr * dy) / radius;
                let u = u0 / (1.0 - 0.25 * yaw.abs()) - yaw * 0.25;
                let c = self.paint(&g, u, v, px);
                // Light, noise, clamp.
                let mut rgb = c.map(|ch| ch * self.light[2]);
                if self.infrared {
                    let g = 0.2 * rgb[0] + 0.6 * rgb[1] + 0.2 * rgb[2];
                    let vignette = 1.0 - 0.35 * ((dx * dx + dy * dy) / (size * size) as f32 * 2.0);
                    rgb = [(g * 1.25 + 0.08) * vignette; 3];
                }
                let n = noise.normal() * self.noise;
                img.put_pixel(
                    x,
                    y,
                    Rgb(rgb.map(|ch| ((ch + n).clamp(0.0, 1.0) * 255.0).round() as u8)),
                );
            }
        }
        img
    }

    /// The unlit colour at face point (u, v), `px` = one pixel in face units.
    fn paint(&self, g: &Geometry, u: f32, v: f32, px: f32) -> [f32; 3] {
        let id = &self.identity;
        let mut c = self.background;
        let skin = self.paint_head(&mut c, g, u, v, px);
        for side in [-1.0f32, 1.0] {
            paint_eye_and_brow(&mut c, id, g, side, u, v, px);
        }
        paint_furrows_and_nose(&mut c, id, g, skin, u, v, px);
        paint_mouth(&mut c, id, g, u, v, px);
        c
    }

    /// Hair cap, face (with the jaw moving down) and cheeks; returns the shaded skin colour.
    fn paint_head(&self, c: &mut [f32; 3], g: &Geometry, u: f32, v: f32, px: f32) -> [f32; 3] {
        let id = &self.identity;
        let hair = coverage(
            ellipse(u, v + 0.12, 0.0, id.face_w * 1.08, id.face_h * 0.95),
            px,
        );
        blend(c, id.hair, hair * smooth_above(v, -0.1));
        let face = coverage(
            ellipse(
                u,
                v - g.jaw * 0.5 * smooth_above(v, 0.2),
                0.0,
                id.face_w,
                id.face_h + g.jaw * 0.3,
            ),
            px,
        );
        let light_dir = (self.light[0].cos(), self.light[0].sin());
        let shade = 1.0 + self.light[1] * (u * light_dir.0 + v * light_dir.1) * 0.6;
        let skin = id.skin.map(|ch| ch * shade);
        blend(c, skin, face);
        // Cheeks (AU6): raised, rosier.
        for side in [-1.0f32, 1.0] {
            let ch = coverage(
                ellipse(u - side * 0.42, v - 0.18 + 0.05 * g.a(AU6), 0.0, 0.17, 0.11),
                px * 4.0,
            );
            blend(
                c,
                [skin[0] * 1.05, skin[1] * 0.8, skin[2] * 0.8],
                ch * (0.15 + 0.5 * g.a(AU6)),
            );
        }
        skin
    }
}

/// One eye (sclera, iris, pupil, upper lid line) and its brow, whose inner and outer ends move
/// separately; `side` is -1 (image left) or 1.
fn paint_eye_and_brow(
    c: &mut [f32; 3],
    id: &Identity,
    g: &Geometry,
    side: f32,
    u: f32,
    v: f32,
    px: f32,
) {
    let ex = side * id.eye_dx;
    let eh = id.eye_h * g.eye_open.max(0.02);
    // The eye paints nothing outside the sclera's box (iris and pupil are masked by it, the lid
    // runs along its top): skip it there. The ellipse distance is scaled by the shorter axis,
    // hence the margin.
    let (ea, eb) = (id.eye_w.max(1e-4), eh.max(1e-4));
    let eye_margin = (px * ea.max(eb) / ea.min(eb)).max(0.012 + px);
    if !(g.cull
        && far_outside(
            u,
            v,
            [ex - ea, id.eye_y - eb, ex + ea, id.eye_y + eb],
            eye_margin,
        ))
    {
        paint_eye(c, id, ex, eh, u, v, px);
    }
    let (bx0, bx1) = (side * g.brow_in_x, side * 0.48);
    let brow_box = [
        bx0.min(bx1),
        g.brow_in.min(g.brow_out),
        bx0.max(bx1),
        g.brow_in.max(g.brow_out),
    ];
    if g.cull && far_outside(u, v, brow_box, id.brow_thick.max(0.0) + px) {
        return;
    }
    let brow = coverage(
        capsule(
            u,
            v,
            side * g.brow_in_x,
            g.brow_in,
            side * 0.48,
            g.brow_out,
            id.brow_thick,
        ),
        px,
    );
    blend(c, id.hair.map(|h| h * 0.8), brow);
}

/// Sclera, iris, pupil and upper lid line of the eye centred at (`ex`, `id.eye_y`), `eh` high.
fn paint_eye(c: &mut [f32; 3], id: &Identity, ex: f32, eh: f32, u: f32, v: f32, px: f32) {
    let sclera = coverage(ellipse(u - ex, v - id.eye_y, 0.0, id.eye_w, eh), px);
    blend(c, [0.93, 0.93, 0.9], sclera);
    let iris = coverage(
        ellipse(u - ex, v - id.eye_y, 0.0, id.eye_h * 0.95, id.eye_h * 0.95),
        px,
    ) * sclera;
    blend(c, id.iris, iris);
    let pupil = coverage(
        ellipse(u - ex, v - id.eye_y, 0.0, id.eye_h * 0.4, id.eye_h * 0.4),
        px,
    ) * sclera;
    blend(c, [0.02, 0.02, 0.02], pupil);
    let lid = coverage(
        capsule(
            u,
            v,
            ex - id.eye_w,
            id.eye_y,
            ex + id.eye_w,
            id.eye_y - eh * 0.9,
            0.012,
        )
        .min(capsule(
            u,
            v,
            ex - id.eye_w,
            id.eye_y,
            ex,
            id.eye_y - eh,
            0.012,
        )),
        px,
    );
    blend(c, [0.1, 0.07, 0.06], lid * 0.8);
}

/// Brow-lowerer furrows (AU4), the nose, and its wrinkles (AU9).
fn paint_furrows_and_nose(
    c: &mut [f32; 3],
    id: &Identity,
    g: &Geometry,
    skin: [f32; 3],
    u: f32,
    v: f32,
    px: f32,
) {
    let nose_top = id.eye_y + 0.05;
    let nose_tip = nose_top + id.nose_len - 0.03 * g.a(AU9);
    // Every shape below lies in this box, the thickest 0.018 wide.
    let lo = (g.brow_in + 0.02).min(nose_top).min(nose_tip);
    let hi = (g.brow_in + 0.12).max(nose_top + 0.09).max(nose_tip);
    if g.cull && far_outside(u, v, [-0.11, lo, 0.11, hi], 0.018 + px) {
        return;
    }
    let furrow = coverage(
        capsule(
            u,
            v,
            -0.04,
            g.brow_in + 0.02,
            -0.02,
            g.brow_in + 0.12,
            0.008,
        ),
        px,
    )
    .max(coverage(
        capsule(u, v, 0.04, g.brow_in + 0.02, 0.02, g.brow_in + 0.12, 0.008),
        px,
    ));
    blend(c, skin.map(|ch| ch * 0.6), furrow * g.a(AU4));
    let nose = coverage(capsule(u, v, 0.0, nose_top, 0.03, nose_tip, 0.012), px).max(coverage(
        capsule(u, v, -0.07, nose_tip, 0.07, nose_tip, 0.018),
        px,
    ));
    blend(c, skin.map(|ch| ch * 0.72), nose);
    for (i, w) in [-0.06f32, 0.06].iter().enumerate() {
        let wr = coverage(
            capsule(
                u,
                v,
                w - 0.05,
                nose_top + 0.04 + 0.03 * i as f32,
                w + 0.05,
                nose_top + 0.06,
                0.007,
            ),
            px,
        );
        blend(c, skin.map(|ch| ch * 0.55), wr * g.a(AU9));
    }
}

/// The mouth: the open interior, then the lips as curves through the corners.
fn paint_mouth(c: &mut [f32; 3], id: &Identity, g: &Geometry, u: f32, v: f32, px: f32) {
    let mouth_in = coverage(
        ellipse(
            u,
            v - (g.upper_mid + g.lower_mid) * 0.5,
            0.0,
            g.mouth_w * 0.8,
            ((g.lower_mid - g.upper_mid) * 0.5).max(0.0),
        ),
        px,
    );
    blend(c, [0.25, 0.05, 0.06], mouth_in * (g.open * 8.0).min(1.0));
    // Both lip curves lie in their control points' box (a quadratic curve stays in the hull of
    // its control points, and so do the chords between its points).
    let (y_lo, y_hi) = (
        g.corner_y.min(g.upper_mid - 0.02).min(g.lower_mid + 0.03),
        g.corner_y.max(g.upper_mid - 0.02).max(g.lower_mid + 0.03),
    );
    let w = g.mouth_w.abs();
    if g.cull
        && far_outside(
            u,
            v,
            [-w, y_lo, w, y_hi],
            (g.lip * 1.2).max(g.lip).max(0.0) + px,
        )
    {
        return;
    }
    let lip_col = [
        id.skin[0] * 0.75 + 0.15,
        id.skin[1] * 0.45,
        id.skin[2] * 0.45,
    ];
    let upper = curve(
        u,
        v,
        (-g.mouth_w, g.corner_y),
        (0.0, g.upper_mid - 0.02),
        (g.mouth_w, g.corner_y),
        g.lip,
    );
    let lower = curve(
        u,
        v,
        (-g.mouth_w, g.corner_y),
        (0.0, g.lower_mid + 0.03),
        (g.mouth_w, g.corner_y),
        g.lip * 1.2,
    );
    blend(c, lip_col, coverage(upper.min(lower), px));
}

/// Signed distance (approximate, in face units) to an axis-aligned ellipse at the origin.
fn ellipse(u: f32, v: f32, _rot: f32, a: f32, b: f32) -> f32 {
    let (a, b) = (a.max(1e-4), b.max(1e-4));
    let k = ((u / a).powi(2) + (v / b).powi(2)).sqrt();
    (k - 1.0) * a.min(b)
}

/// Signed distance to a segment of half-thickness `r`.
fn capsule(u: f32, v: f32, x0: f32, y0: f32, x1: f32, y1: f32, r: f32) -> f32 {
    let (dx, dy) = (x1 - x0, y1 - y0);
    let len2 = (dx * dx + dy * dy).max(1e-12);
    let h = (((u - x0) * dx + (v - y0) * dy) / len2).clamp(0.0, 1.0);
    let (ex, ey) = (u - x0 - h * dx, v - y0 - h * dy);
    (ex * ex + ey * ey).sqrt() - r
}

/// Signed distance to a quadratic curve (8 segments) of half-thickness `r`.
fn curve(u: f32, v: f32, p0: (f32, f32), p1: (f32, f32), p2: (f32, f32), r: f32) -> f32 {
    let at = |t: f32| {
        let m = 1.0 - t;
        (
            m * m * p0.0 + 2.0 * m * t * p1.0 + t * t * p2.0,
            m * m * p0.1 + 2.0 * m * t * p1.1 + t * t * p2.1,
        )
    };
    let mut d = f32::INFINITY;
    let mut prev = at(0.0);
    for i in 1..=8 {
        let next = at(i as f32 / 8.0);
        d = d.min(capsule(u, v, prev.0, prev.1, next.0, next.1, r));
        prev = next;
    }
    d
}

/// Whether (u, v) is at least `margin` outside the box `[u0, v0, u1, v1]`: then a shape inside
/// the box at distance `d >= margin - its half-thickness`, and with `margin` a pixel more than
/// that thickness its [`coverage`] is exactly 0 and its blend changes nothing, so skipping it
/// draws the same frame.
fn far_outside(u: f32, v: f32, [u0, v0, u1, v1]: [f32; 4], margin: f32) -> bool {
    u < u0 - margin || u > u1 + margin || v < v0 - margin || v > v1 + margin
}

/// Anti-aliased coverage of a shape with signed distance `d`, `px` = one pixel.
fn coverage(d: f32, px: f32) -> f32 {
    (0.5 - d / px).clamp(0.0, 1.0)
}

fn smooth_above(v: f32, edge: f32) -> f32 {
    ((v - edge) * 8.0 + 0.5).clamp(0.0, 1.0)
}

fn blend(c: &mut [f32; 3], col: [f32; 3], alpha: f32) {
    for i in 0..3 {
        c[i] += (col[i] - c[i]) * alpha;
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ClipSpec, Identity, SynthOptions, SYNTH_CLASSES};
    use crate::rng::SeededRng;

    /// Skipping the features outside their boxes draws the very frames drawing every feature
    /// everywhere does: every class, blinks and speech, small and large frames, visible and IR.
    #[test]
    fn culled_frames_equal_the_full_drawing() {
        let mut rng = SeededRng::new(21);
        for k in 0..2 * SYNTH_CLASSES {
            let opts = SynthOptions {
                min_frames: 12,
                max_frames: 16,
                infrared: k % 3 == 0,
                distractors: true,
            };
            let spec = ClipSpec::random(
                Identity::random(&mut rng),
                k % SYNTH_CLASSES,
                &opts,
                &mut rng,
            );
            for t in (0..spec.frames).step_by(3) {
                for size in [32, 97] {
                    assert!(
                        spec.render_culled(t, size, true) == spec.render_culled(t, size, false),
                        "clip {k}, frame {t}, {size} px"
                    );
                }
            }
        }
    }
}
