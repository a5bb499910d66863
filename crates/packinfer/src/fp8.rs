//! fp8 e4m3 ("E4M3FN", the OCP 8-bit float that vLLM, SGLang, FlashInfer and CUDA's
//! `__nv_fp8_e4m3` store KV caches in): 1 sign bit, 4 exponent bits with bias 7, 3 mantissa bits,
//! no infinities, one NaN per sign (S.1111.111), largest finite value ±448, subnormals
//! m·2⁻⁹ for exponent 0. Every code converts to f16, bf16 and f32 exactly.
//!
//! Decoding is a table of the 256 values; encoding rounds to nearest, ties to even, and
//! saturates finite values and infinities to ±448 (what engines do when they quantize a cache,
//! CUDA's `__NV_SATFINITE`); NaN stays NaN.

/// The largest finite e4m3 value.
pub const E4M3_MAX: f32 = 448.0;

/// The value of an e4m3 code, from its bits.
const fn decode(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((code >> 3) & 0xF) as i32;
    let man = (code & 0x7) as u32;
    if exp == 0xF && man == 0x7 {
        // The NaN of the code's sign (a product with NaN need not keep a sign).
        return f32::from_bits(if code & 0x80 != 0 { 0xFFC0_0000 } else { 0x7FC0_0000 });
    }
    let magnitude = if exp == 0 {
        // Subnormal: 2^(1 - 7) · m/8, exact in f32.
        man as f32 / 512.0
    } else {
        // Normal: 2^(exp - 7) · (1 + m/8): f32 exponent field exp - 7 + 127, mantissa m at its top.
        f32::from_bits(((exp + 120) as u32) << 23 | man << 20)
    };
    sign * magnitude
}

/// [`decode`] of every code.
const TABLE: [f32; 256] = {
    let mut t = [0.0f32; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = decode(c as u8);
        c += 1;
    }
    t
};

/// The value of e4m3 code `code` as f32 (exact).
#[inline]
pub fn e4m3_to_f32(code: u8) -> f32 {
    TABLE[code as usize]
}

/// The e4m3 code nearest to `x`, ties to even; beyond ±448 (infinities included) ±448; NaN the
/// NaN code of its sign.
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    if a.is_nan() {
        return sign | 0x7F;
    }
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    // The binade of `a`, at least the lowest normal one (2^-6), whose quantum then also spaces
    // the subnormals: 8 steps of 2^(e - 3) per binade.
    let e = (((a.to_bits() >> 23) & 0xFF) as i32 - 127).max(-6);
    let quantum = f32::from_bits(((e - 3 + 127) as u32) << 23);
    // Division by a power of two is exact, so the only rounding is this one.
    let steps = (a / quantum).round_ties_even() as u32;
    let code = if e == -6 && steps < 8 {
        steps // subnormal (or zero): exponent field 0, mantissa = steps
    } else {
        // steps in 8..=16; 16 is the next binade's first value (its mantissa 0).
        let (e, steps) = if steps == 16 { (e + 1, 8) } else { (e, steps) };
        (((e + 7) as u32) << 3) | (steps - 8)
    };
    // a < 448 rounds at most to 448 (0x7E): 0x7F (NaN) is never reached.
    sign | code as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The e4m3 definition, in f64 and written without the bit tricks above.
    fn definition(code: u8) -> Option<f64> {
        let s = if code >> 7 == 1 { -1.0 } else { 1.0 };
        let e = ((code >> 3) & 0xF) as i32;
        let m = (code & 7) as f64;
        match (e, code & 7) {
            (15, 7) => None,
            (0, _) => Some(s * 2f64.powi(1 - 7) * (m / 8.0)),
            _ => Some(s * 2f64.powi(e - 7) * (1.0 + m / 8.0)),
        }
    }

    #[test]
    fn every_code_decodes_to_its_definition() {
        let mut nans = 0;
        for c in 0..=255u8 {
            let got = e4m3_to_f32(c);
            match definition(c) {
                None => {
                    assert!(got.is_nan(), "code 0x{c:02x} = {got}, want NaN");
                    nans += 1;
                }
                Some(want) => {
                    assert_eq!(got as f64, want, "code 0x{c:02x}");
                    assert_eq!(got.is_sign_negative(), c & 0x80 != 0, "code 0x{c:02x}'s sign");
                }
            }
        }
        assert_eq!(nans, 2, "S.1111.111 only");
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0xFE), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9), "the smallest subnormal");
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6), "the smallest normal");
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        // No infinity anywhere, and the largest finite magnitude is 448.
        let max = (0..=255u8).map(e4m3_to_f32).filter(|x| !x.is_nan()).fold(0.0f32, |m, x| m.max(x.abs()));
        assert_eq!(max, E4M3_MAX);
    }

    #[test]
    fn every_code_round_trips() {
        for c in 0..=255u8 {
            let x = e4m3_to_f32(c);
            let back = f32_to_e4m3(x);
            if x.is_nan() {
                assert_eq!(back, c, "NaN 0x{c:02x} keeps its sign");
            } else {
                assert_eq!(back, c, "0x{c:02x} = {x}");
            }
        }
    }

    /// The nearest code by brute force over the 254 finite codes, ties to the even mantissa
    /// (the code's lowest bit), beyond 448 saturated.
    fn nearest(x: f32) -> u8 {
        let x = (x as f64).clamp(-448.0, 448.0);
        let mut best: Option<(f64, u8)> = None;
        for c in 0..=255u8 {
            let Some(v) = definition(c) else { continue };
            if v == 0.0 && (c & 0x80 != 0) != x.is_sign_negative() {
                continue; // zero takes x's sign
            }
            let d = (v - x).abs();
            best = match best {
                Some((bd, bc)) if bd < d || (bd == d && bc & 1 == 0) => Some((bd, bc)),
                _ => Some((d, c)),
            };
        }
        best.unwrap().1
    }

    #[test]
    fn encode_rounds_to_nearest_even_at_every_midpoint() {
        // Between each pair of neighbouring finite codes of one sign: the midpoint goes to the
        // even code, a hair either side to the nearer one.
        for sign in [0u8, 0x80] {
            for c in 0..0x7Eu8 {
                let (lo, hi) = (e4m3_to_f32(sign | c) as f64, e4m3_to_f32(sign | (c + 1)) as f64);
                let mid = ((lo + hi) / 2.0) as f32;
                assert_eq!(mid as f64, (lo + hi) / 2.0, "midpoints are exact in f32");
                let even = if c & 1 == 0 { c } else { c + 1 };
                assert_eq!(f32_to_e4m3(mid), sign | even, "midpoint of 0x{:02x}, 0x{:02x}: {mid}", sign | c, sign | (c + 1));
                // One f32 ulp less or more magnitude (the bit patterns order magnitudes).
                let toward_lo = f32::from_bits(mid.to_bits() - 1);
                let toward_hi = f32::from_bits(mid.to_bits() + 1);
                assert_eq!(f32_to_e4m3(toward_lo), sign | c, "just inside 0x{:02x}: {toward_lo}", sign | c);
                assert_eq!(f32_to_e4m3(toward_hi), sign | (c + 1), "just inside 0x{:02x}: {toward_hi}", sign | (c + 1));
            }
        }
    }

    #[test]
    fn encode_saturates_and_keeps_nan() {
        for (x, want) in [
            (448.0, 0x7E),
            (448.1, 0x7E),
            (464.0, 0x7E), // the midpoint to 480, which e4m3 lacks
            (480.0, 0x7E),
            (1e30, 0x7E),
            (f32::INFINITY, 0x7E),
            (f32::MAX, 0x7E),
            (-449.0, 0xFE),
            (f32::NEG_INFINITY, 0xFE),
            (0.0, 0x00),
            (-0.0, 0x80),
            (2f32.powi(-10), 0x00),                               // half the smallest subnormal: tie to 0
            (f32::from_bits(2f32.powi(-10).to_bits() + 1), 0x01), // just above it
            (3.0 * 2f32.powi(-10), 0x02),                         // 1.5 × 2^-9: tie to the even 2 × 2^-9
            (1e-30, 0x00),
            (f32::from_bits(1), 0x00), // the smallest f32 subnormal
            (-1e-30, 0x80),
            (2f32.powi(-6) * (1.0 - 1.0 / 32.0), 0x08), // between 7·2^-9 and 2^-6, above the midpoint
        ] {
            assert_eq!(f32_to_e4m3(x), want, "{x}");
        }
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7F);
        assert_eq!(f32_to_e4m3(-f32::NAN), 0xFF);
    }

    #[test]
    fn encode_matches_brute_force_on_a_spread_of_values() {
        // Every f32 whose top 20 bits vary (all exponents, both signs, 3 leading mantissa bits
        // plus 9 more), with varied low bits: covers each binade's codes and what lies between.
        let mut n = 0;
        for hi in 0..(1u32 << 20) {
            let bits = hi << 12 | (hi.wrapping_mul(2654435761) >> 20);
            let x = f32::from_bits(bits);
            if x.is_nan() {
                continue;
            }
            let a = x.abs();
            if !(a == 0.0 || (1e-4..=1e4).contains(&a) || a.is_infinite()) && hi % 64 != 0 {
                continue; // far outside e4m3's range: sample only
            }
            assert_eq!(f32_to_e4m3(x), nearest(x), "{x:e} (bits 0x{bits:08x})");
            n += 1;
        }
        assert!(n > 100_000, "{n} values checked");
    }
}
