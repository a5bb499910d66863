//! The per-step chart as a PNG: attention time of every step, one line per schedule. Drawn
//! directly into an RGB buffer (lines, an 8×8 bitmap font) so the tool needs no system fonts.

use std::io::Write;

type Rgb = [u8; 3];

pub const COLORS: [Rgb; 4] = [[31, 119, 180], [230, 120, 20], [44, 160, 44], [200, 40, 40]];
const INK: Rgb = [40, 40, 40];
const GRID: Rgb = [225, 225, 225];

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Canvas { w, h, px: vec![255; w * h * 3] }
    }
    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }
    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.set(x, y, c);
            }
        }
    }
    /// A line `width` pixels wide (Bresenham, stamping a square).
    fn line(&mut self, (mut x0, mut y0): (i64, i64), (x1, y1): (i64, i64), width: i64, c: Rgb) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let mut err = dx + dy;
        let (lo, hi) = (-(width - 1) / 2, width / 2);
        loop {
            self.rect(x0 + lo, y0 + lo, x0 + hi, y0 + hi, c);
            if x0 == x1 && y0 == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x0 += sx;
            }
            if e2 <= dx {
                err += dx;
                y0 += sy;
            }
        }
    }
    /// Text with its top-left corner at (x, y), each font pixel `scale`×`scale`.
    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: Rgb) {
        for (i, ch) in s.chars().enumerate() {
            let glyph = font8x8::legacy::BASIC_LEGACY.get(ch as usize).copied().unwrap_or([0; 8]);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        let (px, py) = (x + (i as i64 * 8 + col) * scale, y + row as i64 * scale);
                        self.rect(px, py, px + scale - 1, py + scale - 1, c);
                    }
                }
            }
        }
    }
    fn text_width(s: &str, scale: i64) -> i64 {
        s.chars().count() as i64 * 8 * scale
    }
}

/// Round tick spacing (1, 2 or 5 times a power of ten) giving about `n` ticks up to `max`.
fn tick_step(max: f64, n: f64) -> f64 {
    let raw = (max / n).max(f64::MIN_POSITIVE);
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * p).find(|&s| s >= raw).unwrap_or(10.0 * p)
}

fn label(x: f64) -> String {
    if x == x.trunc() {
        format!("{x:.0}")
    } else if x >= 1.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}").trim_end_matches('0').to_string()
    }
}

/// Draws `series` (name, value per step) against the step index and returns the PNG bytes.
pub fn line_chart(title: &str, y_label: &str, series: &[(&str, Vec<f64>)]) -> Vec<u8> {
    let (w, h) = (1200usize, 600usize);
    let (left, right, top, bottom) = (90i64, w as i64 - 30, 70i64, h as i64 - 60);
    let mut c = Canvas::new(w, h);
    let n = series.iter().map(|s| s.1.len()).max().unwrap_or(0).max(2);
    let y_max = series.iter().flat_map(|s| s.1.iter().copied()).filter(|v| v.is_finite()).fold(0.0, f64::max);
    let y_step = tick_step(if y_max > 0.0 { y_max } else { 1.0 }, 6.0);
    let y_top = (y_max / y_step).ceil().max(1.0) * y_step;
    let x_step = tick_step((n - 1) as f64, 10.0).max(1.0);
    let px = |i: f64| left + ((i / (n - 1) as f64) * (right - left) as f64).round() as i64;
    let py = |v: f64| bottom - ((v / y_top) * (bottom - top) as f64).round() as i64;

    // Grid, axes and tick labels.
    let mut v = 0.0;
    while v <= y_top + y_step * 1e-9 {
        let y = py(v);
        c.line((left, y), (right, y), 1, GRID);
        let l = label(v);
        c.text(left - 10 - Canvas::text_width(&l, 1), y - 4, &l, 1, INK);
        v += y_step;
    }
    let mut i = 0.0;
    while i <= (n - 1) as f64 {
        let x = px(i);
        c.line((x, bottom), (x, bottom + 5), 1, INK);
        let l = label(i);
        c.text(x - Canvas::text_width(&l, 1) / 2, bottom + 10, &l, 1, INK);
        i += x_step;
    }
    c.line((left, top), (left, bottom), 1, INK);
    c.line((left, bottom), (right, bottom), 1, INK);
    c.text(left, 20, title, 2, INK);
    c.text(left, top - 16, y_label, 1, INK);
    let x_label = "engine step";
    c.text((left + right) / 2 - Canvas::text_width(x_label, 1) / 2, bottom + 30, x_label, 1, INK);

    // Series (the first drawn last, on top), then the legend in the top right corner.
    for (k, (_, values)) in series.iter().enumerate().rev() {
        let color = COLORS[k % COLORS.len()];
        let pts: Vec<(i64, i64)> = values.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| (px(i as f64), py(v))).collect();
        for pair in pts.windows(2) {
            c.line(pair[0], pair[1], 2, color);
        }
        if let [only] = pts[..] {
            c.rect(only.0 - 2, only.1 - 2, only.0 + 2, only.1 + 2, color);
        }
    }
    let mut ly = top + 8;
    for (k, (name, _)) in series.iter().enumerate() {
        let lx = right - 20 - Canvas::text_width(name, 1) - 30;
        c.rect(lx - 6, ly - 4, right - 12, ly + 11, [255, 255, 255]);
        c.line((lx, ly + 4), (lx + 22, ly + 4), 3, COLORS[k % COLORS.len()]);
        c.text(lx + 30, ly, name, 1, INK);
        ly += 18;
    }
    encode_png(w, h, &c.px)
}

fn encode_png(w: usize, h: usize, rgb: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().expect("PNG header to memory");
        writer.write_image_data(rgb).expect("PNG data to memory");
        writer.finish().expect("PNG end to memory");
    }
    out.flush().ok();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(10.0, 5.0), 2.0);
        assert_eq!(tick_step(0.7, 6.0), 0.2);
        assert_eq!(tick_step(1234.0, 10.0), 200.0);
    }

    #[test]
    fn draws_a_png_with_both_series() {
        let png = line_chart("t", "ms", &[("a", vec![1.0, 3.0, 2.0]), ("b", vec![2.0, 2.0, 5.0])]);
        assert_eq!(&png[1..4], b"PNG");
        let decoder = png::Decoder::new(std::io::Cursor::new(png));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (1200, 600));
        for color in &COLORS[..2] {
            assert!(buf.chunks(3).any(|p| p == color), "series color {color:?} drawn");
        }
    }
}
