//! The statistics every benchmark reports with: the median of rounds,
//! nearest-rank percentiles of samples, the spread of rounds, and ratios
//! between figures. One definition of each, so that the three binaries'
//! "median" and "p99" mean the same thing.

/// Which way a figure is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    /// More is better (throughput, rates).
    Higher,
    /// Less is better (CPU, latency, memory).
    Lower,
}

/// The lowest and the highest of a set of figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// The lowest value.
    pub min: f64,
    /// The highest value.
    pub max: f64,
}

/// The median of the finite values: the middle one, or the mean of the two
/// middle ones for an even count; `None` when there is none. NaN and
/// infinities (a figure that could not be computed) are left out.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// The nearest-rank percentile `p` (0 to 100) of samples sorted in ascending
/// order: the smallest sample with at least `p` % of the samples at or below
/// it (`p` = 100 is the maximum); `None` without samples.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    // The float is small and positive; `as` saturates anyway.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The lowest and highest of the finite values; `None` when there is none.
pub fn spread(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
    values
        .into_iter()
        .filter(|x| x.is_finite())
        .fold(None, |acc: Option<Spread>, x| {
            Some(match acc {
                None => Spread { min: x, max: x },
                Some(s) => Spread {
                    min: s.min.min(x),
                    max: s.max.max(x),
                },
            })
        })
}

/// `value / reference`, when the reference is above zero.
pub fn ratio(value: f64, reference: f64) -> Option<f64> {
    (reference > 0.0).then(|| value / reference)
}

// === impl Better ===

impl Better {
    /// Whether `a` is strictly better than `b`.
    pub fn is_better(self, a: f64, b: f64) -> bool {
        match self {
            Self::Higher => a > b,
            Self::Lower => a < b,
        }
    }
}

// === impl Spread ===

impl Spread {
    /// The worst end: the lowest when higher is better, else the highest.
    pub fn worst(&self, better: Better) -> f64 {
        match better {
            Better::Higher => self.min,
            Better::Lower => self.max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_an_odd_count_is_the_middle_value() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([5.0]), Some(5.0));
    }

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median([1.0, 2.0]), Some(1.5));
    }

    #[test]
    fn median_leaves_out_what_could_not_be_computed() {
        assert_eq!(median([f64::NAN, 1.0, f64::INFINITY, 3.0]), Some(2.0));
        assert_eq!(median([f64::NAN]), None);
        assert_eq!(median(Vec::new()), None);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let samples: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&samples, 50.0), Some(50));
        assert_eq!(percentile(&samples, 99.0), Some(99));
        assert_eq!(percentile(&samples, 99.5), Some(100));
        assert_eq!(percentile(&samples, 100.0), Some(100));
        assert_eq!(percentile(&samples, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        // Of 10 samples, p99 is the largest: rank ceil(9.9) = 10.
        let ten: Vec<u64> = (1..=10).collect();
        assert_eq!(percentile(&ten, 99.0), Some(10));
        assert_eq!(percentile(&ten, 90.0), Some(9));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn spread_and_its_worst_end() {
        let s = spread([2.0, f64::NAN, 5.0, 1.0]).expect("finite values");
        assert_eq!(s, Spread { min: 1.0, max: 5.0 });
        assert_eq!(s.worst(Better::Higher), 1.0);
        assert_eq!(s.worst(Better::Lower), 5.0);
        assert_eq!(spread([f64::NAN]), None);
    }

    #[test]
    fn ratio_needs_a_reference_above_zero() {
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(3.0, 0.0), None);
        assert_eq!(ratio(3.0, -1.0), None);
    }

    #[test]
    fn better_compares_strictly() {
        assert!(Better::Higher.is_better(2.0, 1.0));
        assert!(!Better::Higher.is_better(1.0, 1.0));
        assert!(Better::Lower.is_better(1.0, 2.0));
        assert!(!Better::Lower.is_better(2.0, 1.0));
    }
}
