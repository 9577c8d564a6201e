//! The reports: [`Comparison`] (herald ÷ bare, two sides: per-round
//! figures, the median ratio, peak memory and the optional ceiling) and
//! [`SideComparison`] (any number of named sides, each as a ratio to one
//! baseline side); each prints as a table plus one summary line, or as JSON.
//! Benchmarks with other figures (latencies) implement [`Report`] themselves.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::child::SideResult;
use super::stats::{median, mib, per_second, ratio, Side};

/// What a benchmark hands back to be printed.
pub trait Report {
    /// The human-readable report.
    fn table(&self) -> String;
    /// The machine-readable report.
    fn json(&self) -> Value;
}

/// The `key=value ...` line of a setup map.
pub fn setup_line(setup: &serde_json::Map<String, Value>) -> String {
    let items: Vec<String> = setup
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect();
    items.join(" ")
}

/// One round: both sides, in the order they ran.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    /// 1-based.
    pub round: usize,
    /// The sides in the order they ran.
    pub order: Vec<Side>,
    /// herald's side.
    pub herald: SideResult,
    /// The bare baseline.
    pub bare: SideResult,
    /// herald's throughput ÷ the baseline's.
    pub ratio: f64,
    /// The ceiling's throughput this round (records/s), when measured.
    pub ceiling_rate: Option<f64>,
}

/// The two sides' results of one round, as its sides finish.
#[derive(Debug, Default)]
pub struct RoundResults {
    herald: Option<SideResult>,
    bare: Option<SideResult>,
}

/// Reports a side's rate in round `round` (1-based) on stderr.
fn report_side(bench: &str, round: usize, side: &str, result: &SideResult) {
    crate::shared::progress(format!(
        "{bench} round {round} {side}: {} rec/s",
        crate::shared::stats::per_second(result.rate())
    ));
}

impl RoundResults {
    /// Keeps `result` as `side`'s and reports its rate on stderr.
    pub fn add(&mut self, bench: &str, round: usize, side: Side, result: SideResult) {
        report_side(bench, round + 1, side.name(), &result);
        match side {
            Side::Herald => self.herald = Some(result),
            Side::Bare => self.bare = Some(result),
        }
    }

    /// Round `round` (0-based), once both sides ran in `order`.
    pub fn finish(self, round: usize, order: [Side; 2]) -> anyhow::Result<Round> {
        let (Some(herald), Some(bare)) = (self.herald, self.bare) else {
            anyhow::bail!("round {} is missing a side", round + 1);
        };
        Ok(Round::new(round + 1, order, herald, bare))
    }
}

impl Round {
    /// A round from its two results.
    pub fn new(round: usize, order: [Side; 2], herald: SideResult, bare: SideResult) -> Self {
        Self {
            round,
            order: order.to_vec(),
            ratio: ratio(herald.rate(), bare.rate()),
            herald,
            bare,
            ceiling_rate: None,
        }
    }
}

/// The figures of the summary line.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Median herald throughput (records/s).
    pub herald_rate: f64,
    /// Median baseline throughput (records/s).
    pub bare_rate: f64,
    /// Median of the per-round ratios.
    pub ratio: f64,
    /// Rounds measured.
    pub rounds: usize,
    /// Whether the median ratio reaches the goal.
    pub goal_met: bool,
    /// Highest peak RSS of herald's side over the rounds (KiB).
    pub herald_peak_rss_kib: u64,
    /// Highest peak RSS of the baseline over the rounds (KiB).
    pub bare_peak_rss_kib: u64,
    /// Median ceiling throughput (records/s), when measured.
    pub ceiling_rate: Option<f64>,
}

/// One benchmark's comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The benchmark (`publisher`, `consumer`).
    pub bench: &'static str,
    /// What herald's side runs.
    pub herald_side: String,
    /// What the bare side runs.
    pub bare_side: String,
    /// The ratio this benchmark should reach.
    pub goal: f64,
    /// The ceiling's name, when there is one.
    pub ceiling: Option<String>,
    /// Records, sizes, partitions and the benchmark's own settings.
    pub setup: serde_json::Map<String, Value>,
    /// Every round.
    pub rounds: Vec<Round>,
    /// Lines printed under the table (e.g. the database's durability).
    pub notes: Vec<String>,
}

impl Report for Comparison {
    fn table(&self) -> String {
        Comparison::table(self)
    }

    fn json(&self) -> Value {
        Comparison::json(self)
    }
}

impl Comparison {
    /// The medians and peaks over the rounds.
    pub fn summary(&self) -> Summary {
        let pick = |f: fn(&Round) -> f64| -> Vec<f64> { self.rounds.iter().map(f).collect() };
        let ratio = median(&pick(|r| r.ratio)).unwrap_or(f64::NAN);
        let ceilings: Vec<f64> = self.rounds.iter().filter_map(|r| r.ceiling_rate).collect();
        Summary {
            herald_rate: median(&pick(|r| r.herald.rate())).unwrap_or(0.0),
            bare_rate: median(&pick(|r| r.bare.rate())).unwrap_or(0.0),
            ratio,
            rounds: self.rounds.len(),
            goal_met: ratio >= self.goal,
            herald_peak_rss_kib: self
                .rounds
                .iter()
                .map(|r| r.herald.peak_rss_kib)
                .max()
                .unwrap_or(0),
            bare_peak_rss_kib: self
                .rounds
                .iter()
                .map(|r| r.bare.peak_rss_kib)
                .max()
                .unwrap_or(0),
            ceiling_rate: median(&ceilings),
        }
    }

    /// The final line, e.g. `publisher: herald 412,000 rec/s, bare 430,000
    /// rec/s, ratio 0.96 (median of 3 rounds, goal ≥ 0.90: met); peak RSS
    /// herald 95 MiB, bare 80 MiB; kafka ProducerPerformance 520,000 rec/s`.
    pub fn summary_line(&self) -> String {
        let s = self.summary();
        let mut line = format!(
            "{}: herald {} rec/s, bare {} rec/s, ratio {:.2} (median of {} round{}, goal ≥ {:.2}: {}); peak RSS herald {}, bare {}",
            self.bench,
            per_second(s.herald_rate),
            per_second(s.bare_rate),
            s.ratio,
            s.rounds,
            if s.rounds == 1 { "" } else { "s" },
            self.goal,
            if s.goal_met { "met" } else { "NOT met" },
            mib(s.herald_peak_rss_kib),
            mib(s.bare_peak_rss_kib),
        );
        if let (Some(name), Some(rate)) = (&self.ceiling, s.ceiling_rate) {
            line.push_str(&format!("; {name} {} rec/s", per_second(rate)));
        }
        line
    }

    /// The human-readable report: setup, a table of rounds, the summary line.
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("{}: {}\n", self.bench, setup_line(&self.setup)));
        out.push_str(&format!(
            "  herald: {}\n  bare:   {}\n",
            self.herald_side, self.bare_side
        ));
        let ceiling = self.ceiling.as_deref();
        out.push_str(&format!(
            "{:>5}  {:<13} {:>14} {:>14} {:>6} {:>11} {:>11}",
            "round", "order", "herald rec/s", "bare rec/s", "ratio", "herald RSS", "bare RSS"
        ));
        if ceiling.is_some() {
            out.push_str(&format!(" {:>14}", "ceiling rec/s"));
        }
        out.push('\n');
        for r in &self.rounds {
            let order: Vec<&str> = r.order.iter().map(|s| s.name()).collect();
            out.push_str(&format!(
                "{:>5}  {:<13} {:>14} {:>14} {:>6.2} {:>11} {:>11}",
                r.round,
                order.join(","),
                per_second(r.herald.rate()),
                per_second(r.bare.rate()),
                r.ratio,
                mib(r.herald.peak_rss_kib),
                mib(r.bare.peak_rss_kib),
            ));
            if ceiling.is_some() {
                let rate = r.ceiling_rate.map_or_else(|| "-".to_owned(), per_second);
                out.push_str(&format!(" {rate:>14}"));
            }
            out.push('\n');
        }
        if let Some(name) = ceiling {
            out.push_str(&format!("  ceiling: {name}\n"));
        }
        for note in &self.notes {
            out.push_str(&format!("  {note}\n"));
        }
        out.push_str(&self.summary_line());
        out.push('\n');
        out
    }

    /// The machine-readable report.
    pub fn json(&self) -> Value {
        serde_json::json!({
            "bench": self.bench,
            "herald_side": self.herald_side,
            "bare_side": self.bare_side,
            "goal": self.goal,
            "ceiling": self.ceiling,
            "setup": self.setup,
            "rounds": self.rounds,
            "notes": self.notes,
            "summary": self.summary(),
            "summary_line": self.summary_line(),
        })
    }
}

/// One measured side of a [`SideComparison`].
#[derive(Debug, Clone, Serialize)]
pub struct SideInfo {
    /// Its short name (`inbox-batched`).
    pub name: String,
    /// What it runs.
    pub description: String,
}

/// One round of a [`SideComparison`]: every side once.
#[derive(Debug, Clone, Serialize)]
pub struct SidesRound {
    /// 1-based.
    pub round: usize,
    /// Side names in the order they ran.
    pub order: Vec<String>,
    /// Each side's result, by name.
    pub results: BTreeMap<String, SideResult>,
}

impl SidesRound {
    /// Round `round` (0-based), whose sides run in `order`, before any ran.
    pub fn start<'a>(round: usize, order: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            round: round + 1,
            order: order.into_iter().map(str::to_owned).collect(),
            results: BTreeMap::new(),
        }
    }

    /// Keeps `result` as side `name`'s and reports its rate on stderr.
    pub fn add(&mut self, bench: &str, name: &str, result: SideResult) {
        report_side(bench, self.round, name, &result);
        self.results.insert(name.to_owned(), result);
    }

    /// `side`'s throughput ÷ the baseline's this round.
    pub fn ratio(&self, side: &str, baseline: &str) -> f64 {
        match (self.results.get(side), self.results.get(baseline)) {
            (Some(s), Some(b)) => ratio(s.rate(), b.rate()),
            _ => f64::NAN,
        }
    }
}

/// The summary figures of one side.
#[derive(Debug, Clone, Serialize)]
pub struct SideSummary {
    /// The side.
    pub name: String,
    /// Median throughput (records/s).
    pub rate: f64,
    /// Median of the per-round ratios to the baseline.
    pub ratio: f64,
    /// Highest peak RSS over the rounds (KiB).
    pub peak_rss_kib: u64,
}

/// Several sides, each compared with one baseline side, run in rotating
/// order round after round; the summary takes medians.
#[derive(Debug, Clone, Serialize)]
pub struct SideComparison {
    /// The benchmark (`inbox`).
    pub bench: &'static str,
    /// The sides, in report order.
    pub sides: Vec<SideInfo>,
    /// The name of the side every ratio divides by.
    pub baseline: String,
    /// The side with a goal and the ratio it should reach, if any.
    pub goal: Option<(String, f64)>,
    /// Records, sizes and the benchmark's own settings.
    pub setup: serde_json::Map<String, Value>,
    /// Every round.
    pub rounds: Vec<SidesRound>,
    /// Lines printed under the table.
    pub notes: Vec<String>,
}

impl SideComparison {
    /// Medians and peaks per side, in report order.
    pub fn summary(&self) -> Vec<SideSummary> {
        self.sides
            .iter()
            .map(|side| {
                let results: Vec<&SideResult> = self
                    .rounds
                    .iter()
                    .filter_map(|r| r.results.get(&side.name))
                    .collect();
                let rates: Vec<f64> = results.iter().map(|r| r.rate()).collect();
                let ratios: Vec<f64> = self
                    .rounds
                    .iter()
                    .map(|r| r.ratio(&side.name, &self.baseline))
                    .collect();
                SideSummary {
                    name: side.name.clone(),
                    rate: median(&rates).unwrap_or(0.0),
                    ratio: median(&ratios).unwrap_or(f64::NAN),
                    peak_rss_kib: results.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0),
                }
            })
            .collect()
    }

    /// The final line, e.g. `inbox: inbox-batched 4,100 rec/s = 0.87 ×
    /// no-inbox, inbox-unbatched 1,900 rec/s = 0.40 × no-inbox, no-inbox 4,700
    /// rec/s (medians of 3 rounds); peak RSS ...`.
    pub fn summary_line(&self) -> String {
        let summary = self.summary();
        let figures: Vec<String> = summary
            .iter()
            .map(|s| {
                if s.name == self.baseline {
                    format!("{} {} rec/s", s.name, per_second(s.rate))
                } else {
                    let goal = match &self.goal {
                        Some((side, goal)) if *side == s.name => format!(
                            " (goal ≥ {goal:.2}: {})",
                            if s.ratio >= *goal { "met" } else { "NOT met" }
                        ),
                        _ => String::new(),
                    };
                    format!(
                        "{} {} rec/s = {:.2} × {}{goal}",
                        s.name,
                        per_second(s.rate),
                        s.ratio,
                        self.baseline
                    )
                }
            })
            .collect();
        let rss: Vec<String> = summary
            .iter()
            .map(|s| format!("{} {}", s.name, mib(s.peak_rss_kib)))
            .collect();
        let n = self.rounds.len();
        format!(
            "{}: {} (medians of {n} round{}); peak RSS {}",
            self.bench,
            figures.join(", "),
            if n == 1 { "" } else { "s" },
            rss.join(", ")
        )
    }
}

impl Report for SideComparison {
    fn table(&self) -> String {
        let mut out = format!("{}: {}\n", self.bench, setup_line(&self.setup));
        let width = self.sides.iter().map(|s| s.name.len()).max().unwrap_or(0);
        for side in &self.sides {
            out.push_str(&format!("  {:<width$}  {}\n", side.name, side.description));
        }
        out.push_str(&format!(
            "{:>5}  {:<width$} {:>12} {:>8} {:>9}  order\n",
            "round", "side", "rec/s", "ratio", "RSS"
        ));
        for round in &self.rounds {
            for side in &self.sides {
                let Some(result) = round.results.get(&side.name) else {
                    continue;
                };
                out.push_str(&format!(
                    "{:>5}  {:<width$} {:>12} {:>8.2} {:>9}  {}\n",
                    round.round,
                    side.name,
                    per_second(result.rate()),
                    round.ratio(&side.name, &self.baseline),
                    mib(result.peak_rss_kib),
                    round.order.join(","),
                ));
            }
        }
        for note in &self.notes {
            out.push_str(&format!("  {note}\n"));
        }
        out.push_str(&self.summary_line());
        out.push('\n');
        out
    }

    fn json(&self) -> Value {
        serde_json::json!({
            "bench": self.bench,
            "sides": self.sides,
            "baseline": self.baseline,
            "goal": self.goal,
            "setup": self.setup,
            "rounds": self.rounds,
            "notes": self.notes,
            "summary": self.summary(),
            "summary_line": self.summary_line(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn side(records: u64, seconds: f64, rss_kib: u64) -> SideResult {
        SideResult {
            records,
            seconds,
            peak_rss_kib: rss_kib,
            extra: BTreeMap::new(),
        }
    }

    #[test]
    fn summary_takes_medians_and_peaks() {
        let mut rounds = vec![
            Round::new(
                1,
                [Side::Bare, Side::Herald],
                side(1000, 1.0, 2048),
                side(1000, 0.5, 1024),
            ),
            Round::new(
                2,
                [Side::Herald, Side::Bare],
                side(1000, 0.5, 3072),
                side(1000, 0.5, 1024),
            ),
            Round::new(
                3,
                [Side::Bare, Side::Herald],
                side(1000, 0.625, 2048),
                side(1000, 0.5, 1024),
            ),
        ];
        rounds[0].ceiling_rate = Some(5000.0);
        let c = Comparison {
            bench: "publisher",
            herald_side: "h".into(),
            bare_side: "b".into(),
            goal: 0.9,
            ceiling: Some("kafka ProducerPerformance".into()),
            setup: serde_json::Map::new(),
            rounds,
            notes: Vec::new(),
        };
        let s = c.summary();
        assert_eq!(s.ratio, 0.8);
        assert!(!s.goal_met);
        assert_eq!(s.herald_peak_rss_kib, 3072);
        assert_eq!(
            c.summary_line(),
            "publisher: herald 1,600 rec/s, bare 2,000 rec/s, ratio 0.80 (median of 3 rounds, goal ≥ 0.90: NOT met); peak RSS herald 3 MiB, bare 1 MiB; kafka ProducerPerformance 5,000 rec/s"
        );
        assert!(c.table().contains("bare,herald"));
        assert_eq!(c.json()["summary"]["ratio"], 0.8);
    }

    #[test]
    fn sides_are_compared_with_the_baseline() {
        let round = |n: usize, a: f64, b: f64, base: f64| SidesRound {
            round: n,
            order: vec!["a".into(), "b".into(), "base".into()],
            results: [
                ("a".to_owned(), side(1000, a, 1024)),
                ("b".to_owned(), side(1000, b, 2048)),
                ("base".to_owned(), side(1000, base, 1024)),
            ]
            .into_iter()
            .collect(),
        };
        let c = SideComparison {
            bench: "inbox",
            sides: ["a", "b", "base"]
                .iter()
                .map(|n| SideInfo {
                    name: (*n).to_owned(),
                    description: format!("side {n}"),
                })
                .collect(),
            baseline: "base".into(),
            goal: Some(("a".into(), 0.5)),
            setup: serde_json::Map::new(),
            rounds: vec![
                round(1, 2.0, 4.0, 1.0),
                round(2, 1.0, 4.0, 1.0),
                round(3, 1.25, 5.0, 1.0),
            ],
            notes: vec!["durable".into()],
        };
        let s = c.summary();
        assert_eq!(s[0].ratio, 0.8);
        assert_eq!(s[1].ratio, 0.25);
        assert_eq!(s[2].ratio, 1.0);
        assert_eq!(
            c.summary_line(),
            "inbox: a 800 rec/s = 0.80 × base (goal ≥ 0.50: met), b 250 rec/s = 0.25 × base, base 1,000 rec/s (medians of 3 rounds); peak RSS a 1 MiB, b 2 MiB, base 1 MiB"
        );
        assert!(c.table().contains("durable"));
        assert_eq!(c.json()["summary"][1]["name"], "b");
    }
}
