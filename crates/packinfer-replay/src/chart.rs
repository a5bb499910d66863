//! The per-step chart as a PNG: every step's whole cost, one line per schedule, and the
//! schedules' cumulative time against the first's. Drawn
//! directly into an RGB buffer (lines, an 8×8 bitmap font) so the tool needs no system fonts.

use std::io::Write;

type Rgb = [u8; 3];

pub const COLORS: [Rgb; 8] =
    [[31, 119, 180], [230, 120, 20], [44, 160, 44], [200, 40, 40], [148, 103, 189], [140, 86, 75], [227, 119, 194], [120, 120, 120]];
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

/// A plot area of the canvas: pixel bounds and the value range drawn in it.
struct Panel {
    left: i64,
    right: i64,
    top: i64,
    bottom: i64,
    steps: usize,
    /// The y range; on a log scale, its base-10 logarithms.
    y_lo: f64,
    y_hi: f64,
    log: bool,
}

impl Panel {
    fn px(&self, i: f64) -> i64 {
        self.left + ((i / (self.steps - 1) as f64) * (self.right - self.left) as f64).round() as i64
    }
    fn py(&self, v: f64) -> i64 {
        let v = if self.log { v.log10() } else { v };
        let f = ((v - self.y_lo) / (self.y_hi - self.y_lo)).clamp(0.0, 1.0);
        self.bottom - (f * (self.bottom - self.top) as f64).round() as i64
    }

    /// Horizontal grid lines with their labels at `ticks`, the axes and the y label.
    fn frame(&self, c: &mut Canvas, ticks: &[f64], y_label: &str) {
        for &v in ticks {
            let y = self.py(v);
            c.line((self.left, y), (self.right, y), 1, GRID);
            let l = label(v);
            c.text(self.left - 10 - Canvas::text_width(&l, 1), y - 4, &l, 1, INK);
        }
        c.line((self.left, self.top), (self.left, self.bottom), 1, INK);
        c.line((self.left, self.bottom), (self.right, self.bottom), 1, INK);
        c.text(self.left, self.top - 14, y_label, 1, INK);
    }

    /// Step ticks under the panel, with the x label.
    fn step_axis(&self, c: &mut Canvas) {
        let x_step = tick_step((self.steps - 1) as f64, 10.0).max(1.0);
        let mut i = 0.0;
        while i <= (self.steps - 1) as f64 {
            let x = self.px(i);
            c.line((x, self.bottom), (x, self.bottom + 5), 1, INK);
            let l = label(i);
            c.text(x - Canvas::text_width(&l, 1) / 2, self.bottom + 10, &l, 1, INK);
            i += x_step;
        }
        let x_label = "engine step";
        c.text((self.left + self.right) / 2 - Canvas::text_width(x_label, 1) / 2, self.bottom + 26, x_label, 1, INK);
    }

    /// One line through the finite values (a square where there is only one).
    fn series(&self, c: &mut Canvas, values: &[f64], color: Rgb) {
        let ok = |v: f64| v.is_finite() && (!self.log || v > 0.0);
        let pts: Vec<(i64, i64)> =
            values.iter().enumerate().filter(|(_, v)| ok(**v)).map(|(i, &v)| (self.px(i as f64), self.py(v))).collect();
        for pair in pts.windows(2) {
            c.line(pair[0], pair[1], 1, color);
        }
        if let [only] = pts[..] {
            c.rect(only.0 - 2, only.1 - 2, only.0 + 2, only.1 + 2, color);
        }
    }
}

/// Powers of ten and their 2× and 5× multiples within `[lo, hi]` (both > 0).
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut p = 10f64.powf(lo.log10().floor());
    while p <= hi * (1.0 + 1e-9) {
        for m in [1.0, 2.0, 5.0] {
            let v = m * p;
            if v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9) {
                out.push(v);
            }
        }
        p *= 10.0;
    }
    out
}

/// The replay's chart: each step's whole cost per schedule on a log scale (so decode-only steps,
/// a hundred times cheaper than prefill steps, stay visible), and under it each other
/// schedule's cumulative time over the first's (above 1: the first is ahead so far).
/// `title` and `subtitle` name the totals, the trace and the device. Returns PNG bytes.
pub fn step_chart(title: &str, subtitle: &str, y_label: &str, series: &[(&str, Vec<f64>)]) -> Vec<u8> {
    let (w, h) = (1200usize, 800usize);
    let mut c = Canvas::new(w, h);
    let steps = series.iter().map(|s| s.1.len()).max().unwrap_or(0).max(2);
    let positive = || series.iter().flat_map(|s| s.1.iter().copied()).filter(|v| v.is_finite() && *v > 0.0);
    let (lo, hi) = positive().fold((f64::INFINITY, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if hi > 0.0 { (lo, hi) } else { (1.0, 1.0) };
    // Whole decades (or at least one), so every line lies between two labelled ticks.
    let (lo_dec, hi_dec) = (lo.log10().floor(), hi.log10().ceil().max(lo.log10().floor() + 1.0));
    let top = Panel { left: 90, right: w as i64 - 30, top: 90, bottom: 480, steps, y_lo: lo_dec, y_hi: hi_dec, log: true };
    top.frame(&mut c, &log_ticks(10f64.powf(lo_dec), 10f64.powf(hi_dec)), y_label);
    for (k, (_, values)) in series.iter().enumerate().rev() {
        top.series(&mut c, values, COLORS[k % COLORS.len()]);
    }

    // Cumulative ratios against the first schedule.
    let cumulative = |v: &[f64]| {
        let mut sum = 0.0;
        v.iter()
            .map(|x| {
                sum += if x.is_finite() { *x } else { 0.0 };
                sum
            })
            .collect::<Vec<f64>>()
    };
    let first = series.first().map(|s| cumulative(&s.1)).unwrap_or_default();
    let ratios: Vec<Vec<f64>> = series
        .iter()
        .skip(1)
        .map(|s| cumulative(&s.1).iter().zip(&first).map(|(o, f)| if *f > 0.0 { o / f } else { f64::NAN }).collect())
        .collect();
    let finite = || ratios.iter().flatten().copied().filter(|v| v.is_finite());
    let (r_lo, r_hi) = finite().fold((1.0f64, 1.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let r_step = tick_step((r_hi - r_lo).max(0.02), 4.0);
    let (r_lo, r_hi) = ((r_lo / r_step).floor() * r_step, ((r_hi / r_step).ceil() * r_step).max(r_lo + r_step));
    let bottom = Panel { left: 90, right: w as i64 - 30, top: 540, bottom: h as i64 - 60, steps, y_lo: r_lo, y_hi: r_hi, log: false };
    let mut ticks = Vec::new();
    let mut v = r_lo;
    while v <= r_hi + r_step * 1e-9 {
        ticks.push((v / r_step).round() * r_step);
        v += r_step;
    }
    bottom.frame(&mut c, &ticks, "cumulative time over the first schedule's (above 1: the first is ahead so far)");
    let one = bottom.py(1.0);
    c.line((bottom.left, one), (bottom.right, one), 1, INK);
    for (k, values) in ratios.iter().enumerate().rev() {
        bottom.series(&mut c, values, COLORS[(k + 1) % COLORS.len()]);
    }
    bottom.step_axis(&mut c);

    let scale = if Canvas::text_width(title, 2) <= w as i64 - 120 { 2 } else { 1 };
    c.text(90, 16, title, scale, INK);
    c.text(90, 40, subtitle, 1, INK);
    let mut ly = top.top + 8;
    for (k, (name, _)) in series.iter().enumerate() {
        let lx = top.right - 20 - Canvas::text_width(name, 1) - 30;
        c.rect(lx - 6, ly - 4, top.right - 12, ly + 11, [255, 255, 255]);
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
    fn log_ticks_cover_decades() {
        assert_eq!(log_ticks(0.1, 10.0), vec![0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]);
        assert_eq!(log_ticks(1.0, 1.0), vec![1.0]);
    }

    #[test]
    fn draws_both_panels() {
        // The second schedule is twice as slow: its ratio line sits at 2 in the lower panel.
        let png = step_chart("t", "s", "ms", &[("a", vec![1.0, 100.0, 0.5]), ("b", vec![2.0, 200.0, 1.0])]);
        assert_eq!(&png[1..4], b"PNG");
        let decoder = png::Decoder::new(std::io::Cursor::new(png));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (1200, 800));
        let rows = |color: Rgb, y0: usize, y1: usize| {
            (y0..y1).filter(|&y| buf[y * 1200 * 3..(y + 1) * 1200 * 3].chunks(3).any(|p| p == color)).count()
        };
        assert!(rows(COLORS[0], 90, 481) > 0, "the first series in the upper panel");
        assert!(rows(COLORS[1], 90, 481) > 0, "the second series in the upper panel");
        assert!(rows(COLORS[1], 540, 741) > 0, "the ratio in the lower panel");
        assert_eq!(rows(COLORS[0], 540, 741), 0, "no ratio line for the first schedule itself");
    }
}
