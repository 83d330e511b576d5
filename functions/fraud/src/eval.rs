//! The fraud function measured: a labelled set from the shared generator
//! ([`shardwise_cards::generator::scenario`]) replayed through the real [`FraudHandler`] (the
//! processor `main.rs` runs, with in-memory card state, alerts and model snapshots), and how
//! often it is right, per pattern.
//!
//! # How the replay models Lambda
//! Records go to `shards` shards by card; each shard is polled every `poll_ms` (Lambda's
//! Kinesis poller reads a shard about once a second when `MaximumBatchingWindowInSeconds` is 0,
//! the template's default for fraud) and a poll takes up to `batch_size` records that arrived
//! by then (arrival = event time: producer latency is not modelled); a shard with more waiting
//! is invoked again as soon as the previous batch is done. The handler's clock is the poll
//! time. An alert's time is the invocation's start plus the CPU time the replay measured for
//! that batch, so time to alert = batching delay + processing.
//!
//! # What is counted
//! Only the measured days (after the warm-up that gives cards their history). A transaction is
//! a true positive when it is alerted and labelled fraud, a false positive when alerted and
//! labelled normal. An incident is caught when any of its transactions is alerted; its time to
//! alert runs from its first transaction's event time to its first alert. Recall per pattern is
//! incidents caught / incidents; precision is over alerted transactions; the false-positive rate
//! is alerted normal transactions / normal transactions.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::time::{Duration, Instant};

use shardwise::clock::ManualClock;
use shardwise::config::{CommonSettings, ConfigError, Env};
use shardwise::testing::{TestRecord, event_json, plain, sequence_number};
use shardwise::{InMemoryDeadLetterSink, Invocation};
use shardwise_cards::canary::InMemoryCanaryAckStore;
use shardwise_cards::generator::{Label, Labelled, Normal, Pattern, ScenarioOptions, scenario};

use crate::alert::InMemoryAlertSink;
use crate::rules::{CardRange, Rule, RuleSet};
use crate::state::InMemoryCardStateStore;
use crate::{FraudHandler, Scored};

/// What to replay and how.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalOptions {
    pub scenario: ScenarioOptions,
    pub shards: u32,
    pub batch_size: usize,
    pub poll_ms: i64,
    /// The rules; the scenario's blocklisted merchant and card range are added to them.
    pub rules: RuleSet,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            scenario: ScenarioOptions::default(),
            shards: 4,
            batch_size: 100,
            poll_ms: 1000,
            rules: RuleSet::default(),
        }
    }
}

/// Recall, precision and time to alert of one pattern (or of all).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PatternRow {
    pub incidents: u64,
    pub caught: u64,
    pub transactions: u64,
    pub alerted: u64,
    /// Ms from each caught incident's first transaction to its first alert, sorted.
    pub delays_ms: Vec<i64>,
}

impl PatternRow {
    pub fn recall(&self) -> f64 {
        ratio(self.caught, self.incidents)
    }

    pub fn transaction_recall(&self) -> f64 {
        ratio(self.alerted, self.transactions)
    }

    fn delay(&self, q: f64) -> Option<i64> {
        percentile(&self.delays_ms, q)
    }
}

/// The evaluation's result.
#[derive(Debug, Clone, Default)]
pub struct EvalReport {
    pub seed: u64,
    pub replayed: u64,
    pub measured: u64,
    pub patterns: BTreeMap<Pattern, PatternRow>,
    pub normal: u64,
    pub false_positives: u64,
    pub false_positives_by_kind: BTreeMap<Normal, (u64, u64)>,
    pub alerts: u64,
    pub true_positive_alerts: u64,
    /// Which rules fired in alerts of each pattern (and of normal traffic, `None`).
    pub rules_fired: BTreeMap<(Option<Pattern>, Rule), u64>,
    /// Ms from an alerted transaction's event time to its alert, sorted.
    pub alert_latency_ms: Vec<i64>,
    /// Anomaly scores of measured transactions once the models were warm: normal, fraud.
    pub normal_scores: Vec<f64>,
    pub fraud_scores: Vec<f64>,
    pub pattern_scores: BTreeMap<Pattern, Vec<f64>>,
    /// CPU time of the processor over the whole replay.
    pub cpu: Duration,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

fn percentile(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    Some(sorted[i.min(sorted.len() - 1)])
}

impl EvalReport {
    pub fn overall(&self) -> PatternRow {
        let mut all = PatternRow::default();
        for row in self.patterns.values() {
            all.incidents += row.incidents;
            all.caught += row.caught;
            all.transactions += row.transactions;
            all.alerted += row.alerted;
            all.delays_ms.extend(&row.delays_ms);
        }
        all.delays_ms.sort_unstable();
        all
    }

    pub fn precision(&self) -> f64 {
        ratio(self.true_positive_alerts, self.alerts)
    }

    pub fn false_positive_rate(&self) -> f64 {
        ratio(self.false_positives, self.normal)
    }

    /// The targets: every pattern's recall ≥ 95 %, false positives ≤ 0.5 % of normal
    /// transactions, precision ≥ 90 %. The misses, in words.
    pub fn misses(&self) -> Vec<String> {
        let mut misses = Vec::new();
        for (pattern, row) in &self.patterns {
            if row.recall() < 0.95 {
                misses.push(format!(
                    "{} recall {:.1} % < 95 %",
                    pattern.name(),
                    100.0 * row.recall()
                ));
            }
        }
        if self.false_positive_rate() > 0.005 {
            misses.push(format!(
                "false-positive rate {:.2} % > 0.5 %",
                100.0 * self.false_positive_rate()
            ));
        }
        if self.precision() < 0.90 {
            misses.push(format!(
                "precision {:.1} % < 90 %",
                100.0 * self.precision()
            ));
        }
        misses
    }

    /// The report as a Markdown table and notes.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let ms =
            |v: Option<i64>| v.map_or("–".to_owned(), |v| format!("{:.1} s", v as f64 / 1000.0));
        let _ = writeln!(
            out,
            "seed {}: {} transactions replayed, {} measured ({} normal); CPU {:.1} µs/record\n",
            self.seed,
            self.replayed,
            self.measured,
            self.normal,
            self.cpu.as_secs_f64() * 1e6 / self.replayed.max(1) as f64
        );
        let _ = writeln!(
            out,
            "| pattern | incidents | recall | transactions alerted | time to alert p50 / p95 | rules in its alerts |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|");
        let rules_of = |pattern: Option<Pattern>| {
            let mut fired: Vec<(Rule, u64)> = self
                .rules_fired
                .iter()
                .filter(|((p, _), _)| *p == pattern)
                .map(|((_, r), n)| (*r, *n))
                .collect();
            fired.sort_by_key(|f| std::cmp::Reverse(f.1));
            fired
                .iter()
                .map(|(r, n)| format!("{} {n}", rule_name(*r)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (pattern, row) in &self.patterns {
            let _ = writeln!(
                out,
                "| {} | {} | {:.1} % | {:.1} % | {} / {} | {} |",
                pattern.name(),
                row.incidents,
                100.0 * row.recall(),
                100.0 * row.transaction_recall(),
                ms(row.delay(0.5)),
                ms(row.delay(0.95)),
                rules_of(Some(*pattern))
            );
        }
        let all = self.overall();
        let _ = writeln!(
            out,
            "| **all** | {} | {:.1} % | {:.1} % | {} / {} | |",
            all.incidents,
            100.0 * all.recall(),
            100.0 * all.transaction_recall(),
            ms(all.delay(0.5)),
            ms(all.delay(0.95)),
        );
        let _ = writeln!(
            out,
            "\nprecision {:.1} % ({} of {} alerts); false-positive rate {:.3} % ({} of {} normal transactions; rules: {})",
            100.0 * self.precision(),
            self.true_positive_alerts,
            self.alerts,
            100.0 * self.false_positive_rate(),
            self.false_positives,
            self.normal,
            rules_of(None)
        );
        let kinds: Vec<String> = self
            .false_positives_by_kind
            .iter()
            .map(|(kind, (fp, n))| format!("{} {fp}/{n}", kind.name()))
            .collect();
        let _ = writeln!(
            out,
            "false positives by kind of traffic: {}",
            kinds.join(", ")
        );
        let quantiles = |scores: &[f64]| {
            let mut sorted = scores.to_vec();
            sorted.sort_by(f64::total_cmp);
            let q = |q: f64| {
                sorted
                    .get(((sorted.len().max(1) - 1) as f64 * q) as usize)
                    .copied()
                    .unwrap_or(0.0)
            };
            format!(
                "p50 {:.2}, p99 {:.2}, p99.9 {:.2}",
                q(0.5),
                q(0.99),
                q(0.999)
            )
        };
        let _ = writeln!(
            out,
            "anomaly scores: normal {}",
            quantiles(&self.normal_scores)
        );
        for (pattern, scores) in &self.pattern_scores {
            let _ = writeln!(
                out,
                "anomaly scores: {} {}",
                pattern.name(),
                quantiles(scores)
            );
        }
        let _ = writeln!(
            out,
            "time from transaction to alert: p50 {}, p95 {}, max {}",
            ms(percentile(&self.alert_latency_ms, 0.5)),
            ms(percentile(&self.alert_latency_ms, 0.95)),
            ms(self.alert_latency_ms.last().copied())
        );
        out
    }

    /// Histograms of the anomaly score, normal against fraud, as an SVG (log-scaled counts).
    pub fn score_plot_svg(&self, threshold: f64) -> String {
        const BINS: usize = 40;
        let max_score = 5.0f64;
        let bin = |s: f64| ((s / max_score * BINS as f64) as usize).min(BINS - 1);
        let mut normal = [0u64; BINS];
        let mut fraud = [0u64; BINS];
        self.normal_scores.iter().for_each(|&s| normal[bin(s)] += 1);
        self.fraud_scores.iter().for_each(|&s| fraud[bin(s)] += 1);
        let shares = |h: &[u64; BINS]| {
            let total = h.iter().sum::<u64>().max(1) as f64;
            h.map(|c| c as f64 / total)
        };
        let (normal, fraud) = (shares(&normal), shares(&fraud));
        let (w, h, left, bottom) = (720.0, 360.0, 60.0, 40.0);
        let plot_w = w - left - 20.0;
        let plot_h = h - bottom - 40.0;
        // Shares from 1e-5 to 1 on a log scale.
        let y = |share: f64| {
            let l = share.max(1e-5).log10();
            40.0 + plot_h * (-l / 5.0)
        };
        let x = |i: usize| left + plot_w * i as f64 / BINS as f64;
        let mut svg = String::new();
        let _ = write!(
            svg,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{left}" y="20">Anomaly score of measured transactions, seed {} (share of each class, log scale)</text>"##,
            self.seed
        );
        for (series, colour) in [(&normal, "#3a7bd5"), (&fraud, "#d53a3a")] {
            let mut path = String::new();
            for (i, &share) in series.iter().enumerate() {
                let _ = write!(
                    path,
                    "{}{:.1},{:.1} L{:.1},{:.1} ",
                    if i == 0 { "M" } else { "L" },
                    x(i),
                    y(share),
                    x(i + 1),
                    y(share)
                );
            }
            let _ = write!(
                svg,
                r#"<path d="{path}" fill="none" stroke="{colour}" stroke-width="2"/>"#
            );
        }
        let tx = left + plot_w * (threshold / max_score).min(1.0);
        let _ = write!(
            svg,
            r##"<line x1="{tx:.1}" y1="40" x2="{tx:.1}" y2="{:.1}" stroke="#444" stroke-dasharray="4 3"/><text x="{:.1}" y="52">threshold {threshold}</text>"##,
            40.0 + plot_h,
            tx + 4.0
        );
        for tick in 0..=5 {
            let s = tick as f64;
            let px = left + plot_w * s / max_score;
            let _ = write!(
                svg,
                r#"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{tick}</text>"#,
                h - bottom + 16.0
            );
        }
        for e in 0..=5 {
            let py = 40.0 + plot_h * e as f64 / 5.0;
            let _ = write!(
                svg,
                r##"<text x="{:.1}" y="{py:.1}" text-anchor="end">1e-{e}</text><line x1="{left}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#eee"/>"##,
                left - 4.0,
                left + plot_w
            );
        }
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" fill="#3a7bd5">normal ({})</text><text x="{:.1}" y="{:.1}" fill="#d53a3a">fraud ({})</text></svg>"##,
            left + plot_w - 200.0,
            70.0,
            self.normal_scores.len(),
            left + plot_w - 200.0,
            88.0,
            self.fraud_scores.len()
        );
        svg
    }
}

fn rule_name(rule: Rule) -> &'static str {
    match rule {
        Rule::Velocity => "velocity",
        Rule::ImpossibleTravel => "impossible_travel",
        Rule::AmountAnomaly => "amount_anomaly",
        Rule::BlockedMerchant => "blocked_merchant",
        Rule::BlockedCardRange => "blocked_card_range",
        Rule::UnusualMerchant => "unusual_merchant",
        Rule::Anomaly => "anomaly",
    }
}

/// Shard of a card: FNV-1a of the partition key (Kinesis uses MD5; any even spread will do).
fn shard_of(key: &str, shards: u32) -> usize {
    (crate::model::shard_seed(key) % u64::from(shards.max(1))) as usize
}

/// Replay the set and measure.
pub async fn evaluate(options: &EvalOptions) -> Result<EvalReport, ConfigError> {
    let set = scenario(&options.scenario);
    let mut rules = options.rules.clone();
    rules
        .blocklist
        .merchants
        .insert(options.scenario.blocked_merchant.clone());
    if let Some(range) = CardRange::parse(&options.scenario.blocked_card_prefix) {
        rules.blocklist.card_ranges.push(range);
    }
    let threshold = rules.threshold;
    let clock = ManualClock::new(options.scenario.start_ms);
    let handler = FraudHandler::new(
        InMemoryCardStateStore::new(),
        InMemoryAlertSink::new(),
        InMemoryCanaryAckStore::new(),
        clock,
        rules,
    )
    .recording_scores();
    let common =
        CommonSettings::from_env(&Env(HashMap::from([("DEAD_LETTER_QUEUE_URL", "memory")])))?;
    let processor = crate::processor(handler, InMemoryDeadLetterSink::new(), &common);

    // Per shard: its records in event-time order.
    let shards = options.shards.max(1) as usize;
    let mut queues: Vec<Vec<usize>> = vec![Vec::new(); shards];
    for (i, l) in set.iter().enumerate() {
        queues[shard_of(&l.record.partition_key, options.shards)].push(i);
    }
    let id_of = |l: &Labelled| -> String {
        serde_json::from_slice::<serde_json::Value>(&l.record.data)
            .ok()
            .and_then(|v| v["transaction_id"].as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    let by_id: HashMap<String, usize> =
        set.iter().enumerate().map(|(i, l)| (id_of(l), i)).collect();

    // Invocations in time order across shards: (start ms, shard).
    let mut next_at: Vec<i64> = vec![options.scenario.start_ms; shards];
    let mut cursor = vec![0usize; shards];
    let mut sequence = vec![0u64; shards];
    let mut alert_at: HashMap<usize, i64> = HashMap::new();
    let mut alert_rules: HashMap<usize, Vec<Rule>> = HashMap::new();
    let mut scores: HashMap<usize, Scored> = HashMap::new();
    let mut cpu = Duration::ZERO;
    let poll = options.poll_ms.max(1);
    // The shard whose next invocation comes first.
    while let Some(shard) = (0..shards)
        .filter(|&s| cursor[s] < queues[s].len())
        .min_by_key(|&s| next_at[s].max(first_poll(set[queues[s][cursor[s]]].at_ms, poll)))
    {
        let first = set[queues[shard][cursor[shard]]].at_ms;
        let start = next_at[shard].max(first_poll(first, poll));
        let mut batch = Vec::new();
        while cursor[shard] < queues[shard].len()
            && batch.len() < options.batch_size
            && set[queues[shard][cursor[shard]]].at_ms <= start
        {
            batch.push(queues[shard][cursor[shard]]);
            cursor[shard] += 1;
        }
        let records: Vec<TestRecord> = batch
            .iter()
            .map(|&i| {
                sequence[shard] += 1;
                let l = &set[i];
                let mut r = plain(
                    &l.record.partition_key,
                    &sequence_number(sequence[shard]),
                    &l.record.data,
                );
                r.shard_id = format!("shardId-{shard:012}");
                r.arrival_seconds = l.at_ms as f64 / 1000.0;
                r
            })
            .collect();
        let event = event_json(&records);
        processor.handler().0.clock.set(start);
        let began = Instant::now();
        let _ = processor
            .process(event.as_bytes(), &Invocation::unbounded("eval"))
            .await;
        let took = began.elapsed();
        cpu += took;
        let done = start + took.as_millis() as i64;
        next_at[shard] = if cursor[shard] < queues[shard].len()
            && set[queues[shard][cursor[shard]]].at_ms <= done
        {
            done
        } else {
            start + poll
        };
        let handler = &processor.handler().0;
        for body in handler.alerts().take() {
            if let Ok(alert) = serde_json::from_str::<crate::alert::Alert>(&body)
                && let Some(&i) = by_id.get(&alert.transaction_id)
            {
                alert_at.entry(i).or_insert(done);
                alert_rules.insert(i, alert.reasons.iter().map(|r| r.rule).collect());
            }
        }
        for scored in handler.take_scores() {
            if let Some(&i) = by_id.get(&scored.transaction_id) {
                scores.insert(i, scored);
            }
        }
    }

    let measured_from = options.scenario.measured_from_ms();
    let mut report = EvalReport {
        seed: options.scenario.seed,
        replayed: set.len() as u64,
        cpu,
        ..EvalReport::default()
    };
    let mut first_of: HashMap<u64, (Pattern, i64, Option<i64>)> = HashMap::new();
    for (i, l) in set.iter().enumerate() {
        if l.at_ms < measured_from {
            continue;
        }
        report.measured += 1;
        let alerted = alert_at.get(&i).copied();
        let score = scores.get(&i);
        if let Some(at) = alerted {
            report.alerts += 1;
            report.alert_latency_ms.push(at - l.at_ms);
            for rule in alert_rules.get(&i).into_iter().flatten() {
                *report
                    .rules_fired
                    .entry((l.label.pattern(), *rule))
                    .or_default() += 1;
            }
        }
        if let Some(anomaly) = score.and_then(|s| s.anomaly) {
            match l.label {
                Label::Fraud { pattern, .. } => {
                    report.fraud_scores.push(anomaly);
                    report
                        .pattern_scores
                        .entry(pattern)
                        .or_default()
                        .push(anomaly);
                }
                _ => report.normal_scores.push(anomaly),
            }
        }
        debug_assert!(alerted.is_none() || score.is_none_or(|s| s.total >= threshold));
        match l.label {
            Label::Normal(kind) => {
                report.normal += 1;
                let entry = report.false_positives_by_kind.entry(kind).or_default();
                entry.1 += 1;
                if alerted.is_some() {
                    report.false_positives += 1;
                    entry.0 += 1;
                }
            }
            Label::Fraud { pattern, incident } => {
                let row = report.patterns.entry(pattern).or_default();
                row.transactions += 1;
                if alerted.is_some() {
                    row.alerted += 1;
                    report.true_positive_alerts += 1;
                }
                let entry = first_of.entry(incident).or_insert((pattern, l.at_ms, None));
                entry.1 = entry.1.min(l.at_ms);
                if let Some(at) = alerted {
                    entry.2 = Some(entry.2.map_or(at, |a: i64| a.min(at)));
                }
            }
            Label::Poison => {}
        }
    }
    for (pattern, first, alert) in first_of.into_values() {
        let row = report.patterns.entry(pattern).or_default();
        row.incidents += 1;
        if let Some(at) = alert {
            row.caught += 1;
            row.delays_ms.push(at - first);
        }
    }
    for row in report.patterns.values_mut() {
        row.delays_ms.sort_unstable();
    }
    report.alert_latency_ms.sort_unstable();
    Ok(report)
}

/// The first poll at or after `at_ms`.
fn first_poll(at_ms: i64, poll: i64) -> i64 {
    at_ms.div_euclid(poll) * poll + if at_ms.rem_euclid(poll) == 0 { 0 } else { poll }
}
