//! Numbers: throughput, ratios, medians, the side order of a round, and how
//! figures are printed.

use std::time::Instant;

/// The two sides of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// What is measured: herald's component.
    Herald,
    /// What it is compared with: the bare rdkafka loop.
    Bare,
}

impl Side {
    /// The side's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Side::Herald => "herald",
            Side::Bare => "bare",
        }
    }
}

/// The order of the sides in `round` (0-based): bare first in even rounds,
/// herald first in odd ones (bare, herald | herald, bare | bare, herald ...),
/// so a machine that speeds up or slows down over the run favors neither.
pub fn round_order(round: usize) -> [Side; 2] {
    if round % 2 == 0 {
        [Side::Bare, Side::Herald]
    } else {
        [Side::Herald, Side::Bare]
    }
}

/// The order of `n` sides in `round` (0-based): the list rotated by one
/// place per round, so every side runs first, middle and last in turn.
pub fn rotation(n: usize, round: usize) -> Vec<usize> {
    (0..n).map(|i| (i + round) % n.max(1)).collect()
}

/// Measures a span of wall-clock time from the first to the last event seen.
#[derive(Debug, Default, Clone, Copy)]
pub struct Span {
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Span {
    /// Marks an event now: the first one starts the span, every one ends it.
    pub fn mark(&mut self) {
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// When the first mark was made.
    pub fn first(&self) -> Option<Instant> {
        self.first
    }

    /// Seconds from the first to the last mark (0 before two marks).
    pub fn seconds(&self) -> f64 {
        match (self.first, self.last) {
            (Some(first), Some(last)) => last.duration_since(first).as_secs_f64(),
            _ => 0.0,
        }
    }
}

/// Records per second (0 when no time passed).
pub fn rate(records: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        records as f64 / seconds
    } else {
        0.0
    }
}

/// `subject / baseline`, or NaN when the baseline is 0.
pub fn ratio(subject: f64, baseline: f64) -> f64 {
    if baseline > 0.0 {
        subject / baseline
    } else {
        f64::NAN
    }
}

/// The median (mean of the two middle values for an even count); `None`
/// for no values.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The median of `f` over `items`; NaN for none.
pub fn median_by<T>(items: &[T], f: impl Fn(&T) -> f64) -> f64 {
    median(&items.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN)
}

/// The highest of `f` over `items`; 0 for none (the peak of peak RSSes).
pub fn peak_by<T>(items: &[T], f: impl Fn(&T) -> u64) -> u64 {
    items.iter().map(f).max().unwrap_or(0)
}

/// The nearest-rank percentile `p` (0–100) of `sorted` (ascending); `None`
/// for no values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// An integer with thousands separators: `412,000`.
pub fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate rounded to a whole number of records per second: `412,000`.
pub fn per_second(rate: f64) -> String {
    thousands(rate.round().max(0.0) as u64)
}

/// KiB as whole MiB: `95 MiB`.
pub fn mib(kib: u64) -> String {
    format!("{} MiB", (kib as f64 / 1024.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn ratios_and_rates() {
        assert_eq!(ratio(90.0, 100.0), 0.9);
        assert!(ratio(1.0, 0.0).is_nan());
        assert_eq!(rate(1000, 0.5), 2000.0);
        assert_eq!(rate(1000, 0.0), 0.0);
    }

    #[test]
    fn formatting() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(412_000), "412,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(per_second(411_999.6), "412,000");
        assert_eq!(mib(95 * 1024 + 100), "95 MiB");
    }

    #[test]
    fn sides_alternate() {
        assert_eq!(round_order(0), [Side::Bare, Side::Herald]);
        assert_eq!(round_order(1), [Side::Herald, Side::Bare]);
        assert_eq!(round_order(2), [Side::Bare, Side::Herald]);
        assert_eq!(rotation(3, 0), vec![0, 1, 2]);
        assert_eq!(rotation(3, 1), vec![1, 2, 0]);
        assert_eq!(rotation(3, 5), vec![2, 0, 1]);
    }
}
