//! The reports: [`Comparison`] (herald ÷ bare, two sides: per-round
//! figures, the median ratio, peak memory and the optional ceiling) and
//! [`SideComparison`] (any number of named sides, each as a ratio to one
//! baseline side); each prints as a table plus one summary line, or as JSON.
//! Benchmarks with other figures (latencies) implement [`Report`] themselves.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::child::SideResult;
use super::stats::{median, mib, peak_by, per_second, ratio, rotation, round_order, Side};

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

/// Ends a table as every report ends it: its notes, indented, then its
/// summary line.
pub fn finish_table(out: &mut String, notes: &[String], summary_line: &str) {
    for note in notes {
        out.push_str(&format!("  {note}\n"));
    }
    out.push_str(summary_line);
    out.push('\n');
}

/// `1 round`, `3 rounds`.
pub fn rounds(n: usize) -> String {
    format!("{n} round{}", if n == 1 { "" } else { "s" })
}

/// Whether a goal is met, as the summary lines say it.
pub fn met(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

/// The sides a benchmark runs each round: a small enum.
pub trait Sides: Copy + 'static {
    /// Every side, in report order; [`rotation`] turns it each round.
    const ALL: &'static [Self];
    /// The side's name in reports.
    fn name(self) -> &'static str;
}

/// Runs round `round` (0-based) of a two-sided benchmark: `run` runs a
/// side, in [`round_order`]. The results: herald's, then bare's.
pub async fn both_sides<T>(
    round: usize,
    mut run: impl AsyncFnMut(Side) -> anyhow::Result<T>,
) -> anyhow::Result<[T; 2]> {
    let [first, second] = round_order(round);
    let (a, b) = (run(first).await?, run(second).await?);
    Ok(if first == Side::Herald {
        [a, b]
    } else {
        [b, a]
    })
}

/// Reports a side's rate in round `round` (0-based) on stderr.
fn report_rate(bench: &str, round: usize, side: &str, result: &SideResult) {
    crate::shared::progress(format!(
        "{bench} round {} {side}: {} rec/s",
        round + 1,
        per_second(result.rate())
    ));
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

impl Round {
    /// A round from its two results.
    pub fn new(round: usize, order: Vec<Side>, herald: SideResult, bare: SideResult) -> Self {
        Self {
            round,
            order,
            ratio: ratio(herald.rate(), bare.rate()),
            herald,
            bare,
            ceiling_rate: None,
        }
    }

    /// Runs round `round` (0-based) of a two-sided benchmark ([`both_sides`]),
    /// reporting each side's rate on stderr as it finishes.
    pub async fn run(
        bench: &str,
        round: usize,
        mut run: impl AsyncFnMut(Side) -> anyhow::Result<SideResult>,
    ) -> anyhow::Result<Self> {
        let [herald, bare] = both_sides(round, async |side| {
            let result = run(side).await?;
            report_rate(bench, round, side.name(), &result);
            Ok(result)
        })
        .await?;
        Ok(Round::new(
            round + 1,
            round_order(round).to_vec(),
            herald,
            bare,
        ))
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
            herald_peak_rss_kib: peak_by(&self.rounds, |r| r.herald.peak_rss_kib),
            bare_peak_rss_kib: peak_by(&self.rounds, |r| r.bare.peak_rss_kib),
            ceiling_rate: median(&ceilings),
        }
    }

    /// The final line, e.g. `publisher: herald 412,000 rec/s, bare 430,000
    /// rec/s, ratio 0.96 (median of 3 rounds, goal ≥ 0.90: met); peak RSS
    /// herald 95 MiB, bare 80 MiB; kafka ProducerPerformance 520,000 rec/s`.
    pub fn summary_line(&self) -> String {
        let s = self.summary();
        let mut line = format!(
            "{}: herald {} rec/s, bare {} rec/s, ratio {:.2} (median of {}, goal ≥ {:.2}: {}); peak RSS herald {}, bare {}",
            self.bench,
            per_second(s.herald_rate),
            per_second(s.bare_rate),
            s.ratio,
            rounds(s.rounds),
            self.goal,
            met(s.goal_met),
            mib(s.herald_peak_rss_kib),
            mib(s.bare_peak_rss_kib),
        );
        if let (Some(name), Some(rate)) = (&self.ceiling, s.ceiling_rate) {
            line.push_str(&format!("; {name} {} rec/s", per_second(rate)));
        }
        line
    }
}

impl Report for Comparison {
    /// The human-readable report: setup, a table of rounds, the summary line.
    fn table(&self) -> String {
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
        finish_table(&mut out, &self.notes, &self.summary_line());
        out
    }

    /// The machine-readable report.
    fn json(&self) -> Value {
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
    /// A comparison of every side of `S` (`describe` says what each runs)
    /// with `baseline`, before any round ran.
    pub fn new<S: Sides>(
        bench: &'static str,
        baseline: S,
        describe: impl Fn(S) -> String,
        setup: serde_json::Map<String, Value>,
        notes: Vec<String>,
    ) -> Self {
        Self {
            bench,
            sides: S::ALL
                .iter()
                .map(|side| SideInfo {
                    name: side.name().to_owned(),
                    description: describe(*side),
                })
                .collect(),
            baseline: baseline.name().to_owned(),
            goal: None,
            setup,
            rounds: Vec::new(),
            notes,
        }
    }

    /// Runs `rounds` rounds, each running every side once (`run(round,
    /// side)`, round 0-based) in the order [`rotation`] gives, so drift on a
    /// noisy machine favors none; each side's rate is reported on stderr as
    /// it finishes.
    pub async fn run_rounds<S: Sides>(
        &mut self,
        rounds: usize,
        mut run: impl AsyncFnMut(usize, S) -> anyhow::Result<SideResult>,
    ) -> anyhow::Result<()> {
        for round in 0..rounds {
            let order = rotation(S::ALL.len(), round).into_iter().map(|i| S::ALL[i]);
            let mut this = SidesRound {
                round: round + 1,
                order: Vec::new(),
                results: BTreeMap::new(),
            };
            for side in order {
                let result = run(round, side).await?;
                report_rate(self.bench, round, side.name(), &result);
                this.order.push(side.name().to_owned());
                this.results.insert(side.name().to_owned(), result);
            }
            self.rounds.push(this);
        }
        Ok(())
    }

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
                    peak_rss_kib: peak_by(&results, |r| r.peak_rss_kib),
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
                        Some((side, goal)) if *side == s.name => {
                            format!(" (goal ≥ {goal:.2}: {})", met(s.ratio >= *goal))
                        }
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
        format!(
            "{}: {} (medians of {}); peak RSS {}",
            self.bench,
            figures.join(", "),
            rounds(self.rounds.len()),
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
        finish_table(&mut out, &self.notes, &self.summary_line());
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
                vec![Side::Bare, Side::Herald],
                side(1000, 1.0, 2048),
                side(1000, 0.5, 1024),
            ),
            Round::new(
                2,
                vec![Side::Herald, Side::Bare],
                side(1000, 0.5, 3072),
                side(1000, 0.5, 1024),
            ),
            Round::new(
                3,
                vec![Side::Bare, Side::Herald],
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
