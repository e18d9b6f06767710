//! Counter-based random numbers: value `i` of a stream is a pure function of `(seed, i)`.
//!
//! Parameter initialisation and dropout masks must be identical across runs, thread counts and
//! backends (the simulator must draw the same dropout mask as the CPU reference), so nothing
//! here carries state: every draw hashes its own counter with SplitMix64's finaliser.

/// SplitMix64's output function (Steele, Lea, Flood: "Fast splittable pseudorandom number
/// generators", OOPSLA 2014): a bijective 64-bit mixer with good avalanche.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A stream key derived from a seed and further words (a name hash, a step number, ...).
#[inline]
pub fn derive(seed: u64, word: u64) -> u64 {
    mix64(seed ^ mix64(word))
}

/// FNV-1a hash of a string: stable across platforms and Rust versions (unlike `DefaultHasher`).
pub fn hash_str(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Uniform in [0, 1) with 24 random bits (every value exactly representable in f32).
#[inline]
pub fn uniform(key: u64, counter: u64) -> f32 {
    (derive(key, counter) >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// Inverted-dropout scale of element `i` in the stream `key`: 0 with probability `rate`, else
/// `1 / (1 - rate)`. The CPU reference and the simulated VPU both call this.
#[inline]
pub fn dropout_scale(rate: f32, key: u64, i: u64) -> f32 {
    if uniform(key, i) < rate { 0.0 } else { 1.0 / (1.0 - rate) }
}

/// 32-bit vector-lane operations to draw one [`dropout_scale`] on a VPU without 64-bit lanes,
/// counted from the code above: a SplitMix64 finaliser is an add, three xor-shifts and two
/// multiplies on 64-bit values, which 32-bit lanes do in 3 (add with carry), 5 (shift across
/// the halves and xor) and 6 (three partial products and two adds) operations: 3 + 3·5 + 2·6 =
/// 30. [`derive`] is two finalisers and an xor (62); the uniform is a shift, a conversion and
/// a scale (3); the compare, select and multiply by the scale 3 more.
pub const DROPOUT_LANE_OPS: u64 = 68;

/// Standard normal by Box–Muller from two uniforms of the counter pair `(2c, 2c+1)`.
#[inline]
pub fn normal(key: u64, counter: u64) -> f32 {
    let u1 = ((derive(key, 2 * counter) >> 11) as f64 + 1.0) * (1.0 / (1u64 << 53) as f64);
    let u2 = (derive(key, 2 * counter + 1) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Standard normal truncated to [-2, 2] by redrawing, as TensorFlow's `truncated_normal`.
#[inline]
pub fn truncated_normal(key: u64, counter: u64) -> f32 {
    let mut attempt = 0u64;
    loop {
        let v = normal(derive(key, attempt), counter);
        if v.abs() <= 2.0 {
            return v;
        }
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_in_range_and_roughly_flat() {
        let n = 100_000;
        let mut buckets = [0usize; 10];
        for i in 0..n {
            let u = uniform(42, i);
            assert!((0.0..1.0).contains(&u));
            buckets[(u * 10.0) as usize] += 1;
        }
        for b in buckets {
            assert!((b as f64 - n as f64 / 10.0).abs() < n as f64 * 0.01, "{buckets:?}");
        }
    }

    #[test]
    fn normal_has_unit_moments() {
        let n = 200_000u64;
        let (mut s, mut s2) = (0f64, 0f64);
        for i in 0..n {
            let v = normal(7, i) as f64;
            s += v;
            s2 += v * v;
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }

    #[test]
    fn truncated_normal_stays_within_two_sigma() {
        // The truncated standard normal on [-2, 2] has variance 0.7737.
        let n = 100_000u64;
        let mut s2 = 0f64;
        for i in 0..n {
            let v = truncated_normal(3, i);
            assert!(v.abs() <= 2.0);
            s2 += (v as f64).powi(2);
        }
        assert!((s2 / n as f64 - 0.7737).abs() < 0.01);
    }

    #[test]
    fn string_hash_is_stable() {
        // FNV-1a test vectors.
        assert_eq!(hash_str(""), 0xcbf29ce484222325);
        assert_eq!(hash_str("a"), 0xaf63dc4c8601ec8c);
    }
}
