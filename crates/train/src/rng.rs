//! A small seeded random number generator whose whole state is one `u64`, so it can be written
//! into a checkpoint manifest and restored exactly (SplitMix64: passes BigCrush, one add per draw).

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// Restores a generator from a state previously read with [`Rng::state`].
    pub fn from_state(state: u64) -> Self {
        Rng { state }
    }

    pub fn state(&self) -> u64 {
        self.state
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n). Uses the multiply-shift map; bias is below 2^-32 for n < 2^32.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Standard normal draw (Box-Muller; one of the pair is discarded to keep the state a `u64`).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // in (0, 1]: ln stays finite
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Fills `out` with N(0, std²) draws, using both values of each Box-Muller pair (half the
    /// logarithms and square roots of calling [`Rng::normal`] per element).
    pub fn fill_normal(&mut self, out: &mut [f32], std: f64) {
        for pair in out.chunks_mut(2) {
            let u1 = 1.0 - self.next_f64();
            let u2 = self.next_f64();
            let r = (-2.0 * u1.ln()).sqrt() * std;
            let (sin, cos) = (2.0 * std::f64::consts::PI * u2).sin_cos();
            pair[0] = (r * cos) as f32;
            if let Some(second) = pair.get_mut(1) {
                *second = (r * sin) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip_continues_the_same_stream() {
        let mut a = Rng::new(7);
        for _ in 0..10 {
            a.next_u64();
        }
        let mut b = Rng::from_state(a.state());
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }

    #[test]
    fn fill_normal_has_the_requested_variance() {
        let mut out = vec![0f32; 200_001];
        Rng::new(3).fill_normal(&mut out, 0.5);
        let n = out.len() as f64;
        let mean = out.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = out.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.005, "mean {mean}");
        assert!((var - 0.25).abs() < 0.005, "var {var}");
    }

    #[test]
    fn normal_has_unit_variance() {
        let mut r = Rng::new(1);
        let n = 200_000;
        let (mut s, mut s2) = (0.0, 0.0);
        for _ in 0..n {
            let x = r.normal();
            s += x;
            s2 += x * x;
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }
}
