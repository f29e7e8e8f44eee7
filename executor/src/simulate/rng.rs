//! A small seeded random source (SplitMix64) and the launch-to-ready distributions.
//! Self-contained so a seed means the same draws whatever crate versions are in use.

use std::fmt;

#[derive(Debug, Clone)]
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(super) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub(super) fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(f64::MIN_POSITIVE);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Exponential with the given mean.
    pub(super) fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }
}

/// A distribution of durations in seconds, written `fixed:60`, `uniform:40:90`,
/// `normal:65:10` (mean, standard deviation) or `lognormal:60:0.3` (median, sigma).
/// Draws are clamped to at least one second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Dist {
    Fixed(f64),
    Uniform(f64, f64),
    Normal(f64, f64),
    LogNormal(f64, f64),
}

impl Dist {
    pub(super) fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split(':').map(str::trim).collect();
        let num = |s: &str| -> Result<f64, String> {
            let v: f64 = s
                .trim_end_matches('s')
                .parse()
                .map_err(|_| format!("{text:?}: {s:?} is not a number"))?;
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(format!("{text:?}: {s:?} must be a finite number >= 0"))
            }
        };
        let d = match parts.as_slice() {
            ["fixed", a] => Self::Fixed(num(a)?),
            ["uniform", a, b] => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("{text:?}: the lower bound is above the upper bound"));
                }
                Self::Uniform(a, b)
            }
            ["normal", m, s] => Self::Normal(num(m)?, num(s)?),
            ["lognormal", m, s] => Self::LogNormal(num(m)?, num(s)?),
            _ => {
                return Err(format!(
                    "{text:?}: expected fixed:SECS, uniform:MIN:MAX, normal:MEAN:SD or lognormal:MEDIAN:SIGMA"
                ))
            }
        };
        Ok(d)
    }

    pub(super) fn sample(&self, rng: &mut Rng) -> f64 {
        let v = match *self {
            Self::Fixed(v) => v,
            Self::Uniform(a, b) => a + (b - a) * rng.unit(),
            Self::Normal(m, s) => m + s * rng.normal(),
            Self::LogNormal(m, s) => m * (s * rng.normal()).exp(),
        };
        v.max(1.0)
    }
}

impl fmt::Display for Dist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(v) => write!(f, "fixed:{v}"),
            Self::Uniform(a, b) => write!(f, "uniform:{a}:{b}"),
            Self::Normal(m, s) => write!(f, "normal:{m}:{s}"),
            Self::LogNormal(m, s) => write!(f, "lognormal:{m}:{s}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_draws() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
    }

    #[test]
    fn uniform_stays_in_bounds_with_the_right_mean() {
        let d = Dist::parse("uniform:40:90").unwrap();
        let mut rng = Rng::new(1);
        let draws: Vec<f64> = (0..20_000).map(|_| d.sample(&mut rng)).collect();
        assert!(draws.iter().all(|v| (40.0..90.0).contains(v)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 65.0).abs() < 0.5, "{mean}");
    }

    #[test]
    fn parse_rejects_nonsense_naming_the_input() {
        assert_eq!(Dist::parse("fixed:60s").unwrap(), Dist::Fixed(60.0));
        assert!(Dist::parse("uniform:90:40")
            .unwrap_err()
            .contains("uniform:90:40"));
        assert!(Dist::parse("gamma:1:2").is_err());
        assert!(Dist::parse("fixed:-1").is_err());
    }
}
