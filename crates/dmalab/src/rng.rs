//! The lab's generator: xorshift64*, small and deterministic per seed. The benchmarks and the
//! soak need repeatable sequences (every run asks the same questions), not statistical quality.

/// A xorshift64* generator. The state must not be 0 (it would stay 0).
pub struct Rng(pub u64);

impl Rng {
    /// A generator whose state is spread from `seed` (never 0).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next 64 bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n > 0`; the slight modulo bias does not matter here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A page count in `1..=16`, from the top bits.
    pub fn pages(&mut self) -> u64 {
        (self.next() >> 60) + 1
    }
}
