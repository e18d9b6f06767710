//! The MXU numerics contract (see `docs/numerics.md`).
//!
//! - Inputs are f32 values rounded to bfloat16 with round-to-nearest-even ([`bf16`]).
//! - Each product of two bf16 values is exact in f32 (8-bit significands multiply into at most 16
//!   bits), and each partial sum is `round_f32(sum + product)`: one rounding per step, which is
//!   exactly an f32 fused multiply-add.
//! - An output element is summed in k order over one K-chunk (the array's rows, 128 by default)
//!   starting from +0.0; chunk sums are added to the accumulator in chunk order.
//! - HIGH and HIGHEST precision split each f32 input into 2 or 3 bf16 parts and run 3 or 6
//!   bf16 passes, smallest terms first, each costing a full pass of MXU time.

use serde::{Deserialize, Serialize};

/// Rounds an f32 to the nearest bfloat16 (ties to even), returned as an f32 whose low 16 bits
/// are zero. NaN stays NaN (quieted); overflow rounds to infinity as IEEE rounding does.
#[inline]
pub fn bf16(x: f32) -> f32 {
    // Branch-free so that packing loops vectorise.
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) & 0xFFFF_0000;
    let quiet_nan = (bits | 0x0040_0000) & 0xFFFF_0000;
    f32::from_bits(if x.is_nan() { quiet_nan } else { rounded })
}

/// The bf16 bit pattern of `x` (its upper 16 bits after rounding).
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    (bf16(x).to_bits() >> 16) as u16
}

/// Part `part` of the bf16 split of `x`: 0 is `bf16(x)`, 1 the rounded remainder, 2 the rounded
/// remainder of that. `x ≈ part0 + part1 + part2` with about 24 significant bits.
#[inline]
pub fn split(x: f32, part: u8) -> f32 {
    let hi = bf16(x);
    if part == 0 {
        return hi;
    }
    let rest = x - hi;
    let mid = bf16(rest);
    if part == 1 { mid } else { bf16(rest - mid) }
}

/// MXU precision: how many bf16 passes approximate an f32 product.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Precision {
    /// One pass of bf16 inputs.
    #[default]
    Default,
    /// Three passes over a two-way split: lo·hi, hi·lo, hi·hi.
    High,
    /// Six passes over a three-way split, smallest first.
    Highest,
}

impl Precision {
    /// The (lhs part, rhs part) of each pass, in the order they accumulate.
    pub fn passes(self) -> &'static [(u8, u8)] {
        match self {
            Precision::Default => &[(0, 0)],
            Precision::High => &[(1, 0), (0, 1), (0, 0)],
            Precision::Highest => &[(2, 0), (1, 1), (0, 2), (1, 0), (0, 1), (0, 0)],
        }
    }

    pub fn parse(s: &str) -> Option<Precision> {
        match s.to_ascii_lowercase().as_str() {
            "default" => Some(Precision::Default),
            "high" => Some(Precision::High),
            "highest" => Some(Precision::Highest),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Default => "default",
            Precision::High => "high",
            Precision::Highest => "highest",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_matches_the_half_crate_on_tricky_values() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            1.0 + f32::EPSILON,
            f32::from_bits(0x3F80_8000), // exactly halfway, even below: rounds down
            f32::from_bits(0x3F81_8000), // exactly halfway, odd below: rounds up
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::from_bits(1), // smallest subnormal
            f32::INFINITY,
            f32::NEG_INFINITY,
            -2.718_281_7,
            65504.0,
        ];
        for x in specials {
            assert_eq!(bf16(x).to_bits(), half::bf16::from_f32(x).to_f32().to_bits(), "{x:e}");
        }
        assert!(bf16(f32::NAN).is_nan());
        assert!(bf16(f32::from_bits(0x7F80_0001)).is_nan(), "a signalling NaN must not round to infinity");
        for i in 0..200_000u32 {
            let x = f32::from_bits(i.wrapping_mul(2_654_435_761));
            if !x.is_nan() {
                assert_eq!(bf16(x).to_bits(), half::bf16::from_f32(x).to_f32().to_bits(), "{x:e}");
            }
        }
    }

    #[test]
    fn splits_recover_the_value() {
        for &x in &[1.0f32 / 3.0, -7.123_456_7, 1e-20, 12345.678] {
            let two = split(x, 0) + split(x, 1);
            let three = split(x, 0) as f64 + split(x, 1) as f64 + split(x, 2) as f64;
            assert!(((two - x) / x).abs() < 2f32.powi(-15), "{x}");
            assert!(((three - x as f64) / x as f64).abs() < 2f64.powi(-23), "{x}");
        }
    }
}
