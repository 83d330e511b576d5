//! The fraud rules: pure functions of a card's profile and one transaction.
//!
//! Each rule that fires contributes a [`Reason`] with its score; a transaction whose scores sum to
//! the threshold or more raises an alert. Scoring reads the profile as it was *before* the
//! transaction; [`apply`] then folds the transaction into it. Nothing here does I/O or reads the
//! clock, so every rule is tested on its own.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use shardwise_cards::transaction::{Channel, Transaction};

/// Which rule fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    Velocity,
    ImpossibleTravel,
    AmountAnomaly,
    BlockedMerchant,
    BlockedCardRange,
    /// A merchant category the card never used and the shard rarely sees, in a country the card
    /// never used.
    UnusualMerchant,
    /// The streaming anomaly model's score reached its threshold ([`crate::model`]).
    Anomaly,
}

/// One rule's contribution to a transaction's score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    pub rule: Rule,
    pub score: u32,
    /// What the rule saw, for the analyst reading the alert.
    pub detail: String,
}

/// Velocity: more than `max_transactions` of one card within `window_ms`.
#[derive(Debug, Clone, PartialEq)]
pub struct VelocityRule {
    pub max_transactions: u32,
    pub window_ms: i64,
    pub score: u32,
}

/// Impossible travel: two consecutive card-present transactions further apart than `min_km`
/// and faster than `max_kmh` to travel between.
#[derive(Debug, Clone, PartialEq)]
pub struct TravelRule {
    pub max_kmh: f64,
    pub min_km: f64,
    pub score: u32,
}

/// Amount anomaly: `amount` far above the card's usual amounts, on a log scale.
///
/// Robust to a short history three ways: nothing fires before `min_history` transactions; the
/// spread is never taken below `log_std_floor` (one or two similar amounts would otherwise make
/// any change look extreme); and amounts under `min_amount` never fire.
#[derive(Debug, Clone, PartialEq)]
pub struct AmountRule {
    pub min_history: u32,
    /// Standard deviations (of `ln(1 + amount)`) above the mean that fire.
    pub z_threshold: f64,
    pub log_std_floor: f64,
    pub min_amount: f64,
    pub score: u32,
}

/// Unusual merchant: once the card has `min_history` transactions, a purchase in a category the
/// card never used whose share of the shard's recent transactions is under `max_category_share`,
/// in a country the card never used.
#[derive(Debug, Clone, PartialEq)]
pub struct UnusualMerchantRule {
    pub min_history: u32,
    pub max_category_share: f64,
    pub score: u32,
}

/// Anomaly: the shard's Random Cut Forest scores the transaction's features at `threshold` or
/// more (an inlier scores about 1). The model's size and memory are here too.
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyRule {
    pub threshold: f64,
    pub score: u32,
    pub trees: usize,
    pub sample_size: usize,
    /// Transactions a shard's model must have seen before its scores count.
    pub warmup: u64,
    /// A shard's model is snapshotted at most this often (ms); 0 after every batch.
    pub snapshot_interval_ms: i64,
}

/// Known fraud signatures: blocklisted merchants and card number ranges.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Blocklist {
    pub merchants: HashSet<String>,
    pub card_ranges: Vec<CardRange>,
    pub merchant_score: u32,
    pub card_score: u32,
}

/// A range of card numbers by their leading digits: `412345` (a BIN) or `400000-400099`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardRange {
    low: String,
    high: String,
}

impl CardRange {
    /// Parse `PREFIX` or `LOW-HIGH` (digits, both ends of one length).
    pub fn parse(text: &str) -> Option<Self> {
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let (low, high) = match text.split_once('-') {
            Some((low, high)) => (low.trim(), high.trim()),
            None => (text.trim(), text.trim()),
        };
        (digits(low) && digits(high) && low.len() == high.len() && low <= high).then(|| Self {
            low: low.to_owned(),
            high: high.to_owned(),
        })
    }

    /// Whether the card number's leading digits fall in the range (digits of equal length
    /// compare as numbers when compared as text).
    pub fn contains(&self, card_id: &str) -> bool {
        card_id
            .get(..self.low.len())
            .is_some_and(|lead| lead >= self.low.as_str() && lead <= self.high.as_str())
    }
}

/// Every rule's parameters and the alert threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleSet {
    pub threshold: u32,
    pub velocity: VelocityRule,
    pub travel: TravelRule,
    pub amount: AmountRule,
    pub blocklist: Blocklist,
    pub unusual_merchant: UnusualMerchantRule,
    pub anomaly: AnomalyRule,
}

impl Default for RuleSet {
    /// The documented defaults (functions/fraud/README.md).
    fn default() -> Self {
        Self {
            threshold: 60,
            // Each rule alone reaches the threshold: a card-testing burst or a single purchase
            // many times the card's norm is an alert on its own.
            velocity: VelocityRule {
                max_transactions: 5,
                window_ms: 300_000,
                score: 60,
            },
            travel: TravelRule {
                max_kmh: 900.0,
                min_km: 100.0,
                score: 70,
            },
            amount: AmountRule {
                min_history: 5,
                z_threshold: 3.0,
                log_std_floor: 0.5,
                min_amount: 100.0,
                score: 60,
            },
            blocklist: Blocklist {
                merchant_score: 100,
                card_score: 100,
                ..Blocklist::default()
            },
            unusual_merchant: UnusualMerchantRule {
                min_history: 5,
                max_category_share: 0.002,
                score: 60,
            },
            anomaly: AnomalyRule {
                threshold: 2.5,
                score: 60,
                trees: 40,
                sample_size: 128,
                warmup: 1000,
                snapshot_interval_ms: 60_000,
            },
        }
    }
}

/// Where a card was last used in person.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sighting {
    /// Epoch ms of the transaction.
    pub at: i64,
    pub lat: f64,
    pub lon: f64,
}

/// Running mean and variance of `ln(1 + amount)` (Welford), with the count capped so that old
/// amounts fade and the profile follows a card whose spending changes.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RunningStats {
    pub n: u32,
    pub mean: f64,
    pub m2: f64,
}

/// Amounts beyond this count weigh like this many: the newest counts for 1/200th.
const STATS_COUNT_CAP: u32 = 200;

impl RunningStats {
    pub fn push(&mut self, x: f64) {
        if self.n >= STATS_COUNT_CAP {
            // Scale back to cap-1 samples, keeping the variance, then add this one.
            let keep = f64::from(STATS_COUNT_CAP - 1) / f64::from(self.n);
            self.m2 *= keep;
            self.n = STATS_COUNT_CAP - 1;
        }
        self.n += 1;
        let delta = x - self.mean;
        self.mean += delta / f64::from(self.n);
        self.m2 += delta * (x - self.mean);
    }

    /// Sample standard deviation (0 below two samples).
    pub fn std_dev(&self) -> f64 {
        if self.n < 2 {
            0.0
        } else {
            (self.m2 / f64::from(self.n - 1)).max(0.0).sqrt()
        }
    }
}

/// What the rules remember about a card between transactions.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CardProfile {
    /// Event times (epoch ms) of the card's recent transactions, oldest first, within the
    /// velocity window of the newest.
    #[serde(default)]
    pub recent: Vec<i64>,
    #[serde(default)]
    pub last_seen: Option<Sighting>,
    #[serde(default)]
    pub amounts: RunningStats,
    /// Ids of the card's latest transactions, oldest first: a producer that retries a
    /// `PutRecords` writes the same transaction twice, as two records with different sequence
    /// numbers, and the second must not be scored (or alerted) again.
    #[serde(default)]
    pub seen: Vec<String>,
    /// Epoch ms of the card's latest transaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_at: Option<i64>,
    /// Where the card is usually used in person: the mean of its card-present transactions
    /// near the first one (travel does not move it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<Home>,
    /// The card's latest merchant categories, merchants and countries, newest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merchants: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub countries: Vec<String>,
    /// Channels used, one bit each ([`crate::model::features::channel_bit`]).
    #[serde(default)]
    pub channels: u8,
    /// Merchants the card paid a large amount (rent, insurance, school fees): paying one of them
    /// about as much again is the card's norm, not an anomaly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub payees: Vec<Payee>,
}

/// The usual area of a card.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Home {
    pub lat: f64,
    pub lon: f64,
    pub n: u32,
}

/// A merchant the card paid a large amount, and `ln(1 + amount)` of the largest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payee {
    pub merchant: String,
    pub log_amount: f64,
}

impl CardProfile {
    /// Whether the transaction was applied already (as another record).
    pub fn has_seen(&self, transaction_id: &str) -> bool {
        self.seen.iter().any(|id| id == transaction_id)
    }

    /// `ln(1 + amount)` of the largest payment to `merchant`, if it is a payee of the card.
    pub fn payee(&self, merchant: &str) -> Option<f64> {
        self.payees
            .iter()
            .find(|p| p.merchant == merchant)
            .map(|p| p.log_amount)
    }
}

/// How far from home a card-present transaction may be and still count as home (the area).
const HOME_RADIUS_KM: f64 = 300.0;
/// Latest categories, merchants, countries and payees a profile keeps.
const MAX_CATEGORIES: usize = 12;
const MAX_MERCHANTS: usize = 16;
const MAX_COUNTRIES: usize = 6;
const MAX_PAYEES: usize = 6;

/// Keep `value` in a most-recent-last list of at most `max`.
fn remember(list: &mut Vec<String>, value: &str, max: usize) {
    if let Some(i) = list.iter().position(|v| v == value) {
        let v = list.remove(i);
        list.push(v);
    } else {
        list.push(value.to_owned());
        if list.len() > max {
            list.remove(0);
        }
    }
}

/// The most transaction times a profile keeps, whatever the window.
const MAX_RECENT: usize = 256;

/// Transaction ids a profile remembers. Producer retries repeat a record within seconds, so the
/// last few dozen transactions of a card are plenty.
const MAX_SEEN: usize = 32;

/// The score of a transaction: every rule that fired, in a fixed order.
pub fn score(rules: &RuleSet, profile: &CardProfile, tx: &Transaction<'_>) -> Vec<Reason> {
    let mut reasons = Vec::new();
    reasons.extend(velocity(&rules.velocity, profile, tx));
    reasons.extend(travel(&rules.travel, profile, tx));
    reasons.extend(amount(&rules.amount, profile, tx));
    reasons.extend(blocklist(&rules.blocklist, tx));
    reasons
}

/// The sum of the reasons' scores.
pub fn total(reasons: &[Reason]) -> u32 {
    reasons.iter().map(|r| r.score).sum()
}

fn velocity(rule: &VelocityRule, profile: &CardProfile, tx: &Transaction<'_>) -> Option<Reason> {
    let at = tx.timestamp.epoch_millis();
    // Transactions may arrive slightly out of order: count those within the window either side.
    let within = profile
        .recent
        .iter()
        .filter(|&&t| (t - at).abs() < rule.window_ms)
        .count();
    let count = within as u64 + 1;
    (count > u64::from(rule.max_transactions)).then(|| Reason {
        rule: Rule::Velocity,
        score: rule.score,
        detail: format!(
            "{count} transactions within {} s (more than {})",
            rule.window_ms / 1000,
            rule.max_transactions
        ),
    })
}

/// Only transactions with the card present say where the card is: an online purchase's
/// coordinates are the merchant's or the network's, not the cardholder's.
fn card_present(tx: &Transaction<'_>) -> bool {
    matches!(tx.channel, Channel::Pos | Channel::Atm)
}

fn travel(rule: &TravelRule, profile: &CardProfile, tx: &Transaction<'_>) -> Option<Reason> {
    let last = profile.last_seen?;
    if !card_present(tx) {
        return None;
    }
    let km = haversine_km(last.lat, last.lon, tx.lat, tx.lon);
    if km <= rule.min_km {
        return None;
    }
    let hours = (tx.timestamp.epoch_millis() - last.at).abs() as f64 / 3_600_000.0;
    let kmh = if hours > 0.0 {
        km / hours
    } else {
        f64::INFINITY
    };
    (kmh > rule.max_kmh).then(|| Reason {
        rule: Rule::ImpossibleTravel,
        score: rule.score,
        detail: if kmh.is_finite() {
            format!(
                "{km:.0} km from the previous transaction in {:.0} min ({kmh:.0} km/h)",
                hours * 60.0
            )
        } else {
            format!("{km:.0} km from the previous transaction at the same time")
        },
    })
}

fn amount(rule: &AmountRule, profile: &CardProfile, tx: &Transaction<'_>) -> Option<Reason> {
    let stats = &profile.amounts;
    if stats.n < rule.min_history || tx.amount < rule.min_amount {
        return None;
    }
    let spread = stats.std_dev().max(rule.log_std_floor);
    let x = log_amount(tx.amount);
    if profile
        .payee(&tx.merchant_id)
        .is_some_and(|usual| x <= usual + spread)
    {
        // A payee of the card, paid about as much as before (the rent).
        return None;
    }
    let z = (x - stats.mean) / spread;
    (z >= rule.z_threshold).then(|| Reason {
        rule: Rule::AmountAnomaly,
        score: rule.score,
        detail: format!(
            "amount {:.2} is {z:.1} standard deviations above this card's usual ({:.2}, {} transactions)",
            tx.amount,
            stats.mean.exp() - 1.0,
            stats.n
        ),
    })
}

/// The unusual-merchant rule, given the category's share of the shard's recent transactions
/// (from its model; `None` while the model warms up).
pub fn unusual_merchant(
    rule: &UnusualMerchantRule,
    profile: &CardProfile,
    tx: &Transaction<'_>,
    category_share: Option<f64>,
) -> Option<Reason> {
    let share = category_share?;
    let category = tx.merchant_category.as_ref();
    let fires = profile.amounts.n >= rule.min_history
        && share < rule.max_category_share
        && !profile.categories.iter().any(|c| c == category)
        && !profile.countries.iter().any(|c| c == tx.country.as_ref());
    fires.then(|| Reason {
        rule: Rule::UnusualMerchant,
        score: rule.score,
        detail: format!(
            "category {category} ({:.2} % of the shard's transactions) and country {} are new for this card",
            share * 100.0,
            tx.country
        ),
    })
}

fn blocklist(list: &Blocklist, tx: &Transaction<'_>) -> Vec<Reason> {
    let mut reasons = Vec::new();
    if list.merchants.contains(tx.merchant_id.as_ref()) {
        reasons.push(Reason {
            rule: Rule::BlockedMerchant,
            score: list.merchant_score,
            detail: format!("merchant {} is blocklisted", tx.merchant_id),
        });
    }
    if let Some(range) = list.card_ranges.iter().find(|r| r.contains(&tx.card_id)) {
        reasons.push(Reason {
            rule: Rule::BlockedCardRange,
            score: list.card_score,
            detail: if range.low == range.high {
                format!("card number starts with blocklisted {}", range.low)
            } else {
                format!(
                    "card number in blocklisted range {}-{}",
                    range.low, range.high
                )
            },
        });
    }
    reasons
}

/// Fold the transaction into the profile (after scoring it).
pub fn apply(rules: &RuleSet, profile: &mut CardProfile, tx: &Transaction<'_>) {
    let at = tx.timestamp.epoch_millis();
    let position = profile.recent.partition_point(|&t| t <= at);
    profile.recent.insert(position, at);
    let newest = profile.recent.last().copied().unwrap_or(at);
    profile
        .recent
        .retain(|&t| newest - t < rules.velocity.window_ms);
    if profile.recent.len() > MAX_RECENT {
        let excess = profile.recent.len() - MAX_RECENT;
        profile.recent.drain(..excess);
    }

    // A sighting that was impossible to reach does not move the card: the card is still where
    // its holder last used it (else the holder's next purchase at home would look impossible).
    if card_present(tx)
        && profile.last_seen.is_none_or(|last| at >= last.at)
        && travel(&rules.travel, profile, tx).is_none()
    {
        profile.last_seen = Some(Sighting {
            at,
            lat: tx.lat,
            lon: tx.lon,
        });
    }

    let x = log_amount(tx.amount);
    let spread = profile.amounts.std_dev().max(rules.amount.log_std_floor);
    if tx.amount >= rules.amount.min_amount
        && (profile.amounts.n < rules.amount.min_history || x > profile.amounts.mean + 2.0 * spread)
    {
        match profile
            .payees
            .iter_mut()
            .find(|p| p.merchant == tx.merchant_id.as_ref())
        {
            Some(payee) => payee.log_amount = payee.log_amount.max(x),
            None => {
                profile.payees.push(Payee {
                    merchant: tx.merchant_id.to_string(),
                    log_amount: x,
                });
                // The largest payees stay: a monthly rent outweighs a one-off big basket.
                if profile.payees.len() > MAX_PAYEES
                    && let Some(smallest) = (0..profile.payees.len()).min_by(|&a, &b| {
                        profile.payees[a]
                            .log_amount
                            .total_cmp(&profile.payees[b].log_amount)
                    })
                {
                    profile.payees.remove(smallest);
                }
            }
        }
    }
    profile.amounts.push(x);
    profile.last_at = Some(profile.last_at.map_or(at, |last| last.max(at)));
    if card_present(tx) {
        match &mut profile.home {
            None => {
                profile.home = Some(Home {
                    lat: tx.lat,
                    lon: tx.lon,
                    n: 1,
                });
            }
            Some(home) if haversine_km(home.lat, home.lon, tx.lat, tx.lon) <= HOME_RADIUS_KM => {
                home.n = (home.n + 1).min(50);
                let w = 1.0 / f64::from(home.n);
                home.lat += (tx.lat - home.lat) * w;
                home.lon += (tx.lon - home.lon) * w;
            }
            Some(_) => {}
        }
    }
    remember(
        &mut profile.categories,
        &tx.merchant_category,
        MAX_CATEGORIES,
    );
    remember(&mut profile.merchants, &tx.merchant_id, MAX_MERCHANTS);
    remember(&mut profile.countries, &tx.country, MAX_COUNTRIES);
    profile.channels |= crate::model::features::channel_bit(tx.channel);

    profile.seen.push(tx.transaction_id.to_string());
    if profile.seen.len() > MAX_SEEN {
        let excess = profile.seen.len() - MAX_SEEN;
        profile.seen.drain(..excess);
    }
}

pub(crate) fn log_amount(amount: f64) -> f64 {
    amount.max(0.0).ln_1p()
}

/// Great-circle distance on a sphere of the Earth's mean radius.
pub fn haversine_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    const EARTH_RADIUS_KM: f64 = 6371.0088;
    let (phi1, phi2) = (lat1.to_radians(), lat2.to_radians());
    let d_phi = (lat2 - lat1).to_radians();
    let d_lambda = (lon2 - lon1).to_radians();
    let a = (d_phi / 2.0).sin().powi(2) + phi1.cos() * phi2.cos() * (d_lambda / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * a.sqrt().min(1.0).asin()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use shardwise::time::Timestamp;

    fn tx(at_s: i64, amount: f64, lat: f64, lon: f64, channel: Channel) -> Transaction<'static> {
        Transaction {
            transaction_id: format!("t-{at_s}").into(),
            card_id: "4000001234567899".into(),
            merchant_id: "m-1".into(),
            merchant_category: "5411".into(),
            amount,
            currency: "EUR".into(),
            country: "DE".into(),
            lat,
            lon,
            timestamp: Timestamp::from_epoch_millis(1_700_000_000_000 + at_s * 1000),
            channel,
        }
    }

    const BERLIN: (f64, f64) = (52.52, 13.405);
    const PARIS: (f64, f64) = (48.8566, 2.3522);
    const NEW_YORK: (f64, f64) = (40.7128, -74.006);

    fn run(rules: &RuleSet, txs: &[Transaction<'_>]) -> Vec<Vec<Rule>> {
        let mut profile = CardProfile::default();
        txs.iter()
            .map(|t| {
                let reasons = score(rules, &profile, t);
                apply(rules, &mut profile, t);
                reasons.into_iter().map(|r| r.rule).collect()
            })
            .collect()
    }

    #[test]
    fn haversine_matches_known_distances() {
        let km = haversine_km(BERLIN.0, BERLIN.1, PARIS.0, PARIS.1);
        assert!((km - 878.0).abs() < 5.0, "{km}");
        let km = haversine_km(BERLIN.0, BERLIN.1, NEW_YORK.0, NEW_YORK.1);
        assert!((km - 6385.0).abs() < 10.0, "{km}");
        assert_eq!(haversine_km(1.0, 2.0, 1.0, 2.0), 0.0);
        // Antipodes: no NaN from rounding past 1.
        let km = haversine_km(0.0, 0.0, 0.0, 180.0);
        assert!((km - 20015.0).abs() < 5.0, "{km}");
    }

    #[test]
    fn velocity_fires_above_the_count_within_the_window() {
        let rules = RuleSet::default();
        // Six within five minutes: the sixth fires (more than 5).
        let txs: Vec<_> = (0..6)
            .map(|i| tx(i * 30, 10.0, BERLIN.0, BERLIN.1, Channel::Pos))
            .collect();
        let fired = run(&rules, &txs);
        assert!(fired[..5].iter().all(|r| !r.contains(&Rule::Velocity)));
        assert!(fired[5].contains(&Rule::Velocity));

        // Six spread over an hour: never.
        let txs: Vec<_> = (0..6)
            .map(|i| tx(i * 600, 10.0, BERLIN.0, BERLIN.1, Channel::Pos))
            .collect();
        assert!(run(&rules, &txs).iter().all(Vec::is_empty));
    }

    #[test]
    fn velocity_counts_late_arrivals_and_forgets_old_ones() {
        let rules = RuleSet::default();
        let mut profile = CardProfile::default();
        for at in [100, 50, 0, 200, 150] {
            apply(&rules, &mut profile, &tx(at, 5.0, 0.0, 0.0, Channel::Ecom));
        }
        assert_eq!(profile.recent.len(), 5);
        assert!(profile.recent.windows(2).all(|w| w[0] <= w[1]));
        let reasons = score(&rules, &profile, &tx(120, 5.0, 0.0, 0.0, Channel::Ecom));
        assert_eq!(reasons[0].rule, Rule::Velocity);
        assert_eq!(
            reasons[0].detail,
            "6 transactions within 300 s (more than 5)"
        );
        // An hour later the window has moved on, and the old times are dropped.
        apply(
            &rules,
            &mut profile,
            &tx(3600, 5.0, 0.0, 0.0, Channel::Ecom),
        );
        assert_eq!(profile.recent, vec![1_700_000_000_000 + 3_600_000]);
    }

    #[test]
    fn impossible_travel_needs_distance_and_speed() {
        let rules = RuleSet::default();
        // Berlin, then New York half an hour later: ~12,800 km/h.
        let fired = run(
            &rules,
            &[
                tx(0, 10.0, BERLIN.0, BERLIN.1, Channel::Pos),
                tx(1800, 10.0, NEW_YORK.0, NEW_YORK.1, Channel::Atm),
            ],
        );
        assert_eq!(fired[1], vec![Rule::ImpossibleTravel]);
        // Berlin, then Paris two hours later: ~440 km/h, a flight.
        let fired = run(
            &rules,
            &[
                tx(0, 10.0, BERLIN.0, BERLIN.1, Channel::Pos),
                tx(7200, 10.0, PARIS.0, PARIS.1, Channel::Pos),
            ],
        );
        assert!(fired[1].is_empty());
        // 50 km in one minute is fast but under the 100 km floor (GPS noise, neighbouring towns).
        let fired = run(
            &rules,
            &[
                tx(0, 10.0, 52.0, 13.0, Channel::Pos),
                tx(60, 10.0, 52.45, 13.0, Channel::Pos),
            ],
        );
        assert!(fired[1].is_empty());
        // Same instant, far apart: infinite speed fires.
        let fired = run(
            &rules,
            &[
                tx(0, 10.0, BERLIN.0, BERLIN.1, Channel::Pos),
                tx(0, 10.0, PARIS.0, PARIS.1, Channel::Pos),
            ],
        );
        assert_eq!(fired[1], vec![Rule::ImpossibleTravel]);
    }

    #[test]
    fn online_transactions_neither_trigger_nor_move_the_card() {
        let rules = RuleSet::default();
        let fired = run(
            &rules,
            &[
                tx(0, 10.0, BERLIN.0, BERLIN.1, Channel::Pos),
                tx(60, 10.0, NEW_YORK.0, NEW_YORK.1, Channel::Ecom),
                tx(120, 10.0, BERLIN.0, BERLIN.1, Channel::Pos),
            ],
        );
        assert!(fired.iter().all(Vec::is_empty), "{fired:?}");
    }

    #[test]
    fn amount_anomaly_is_robust_to_a_short_history() {
        let rules = RuleSet::default();
        // A big first purchase: no history, nothing fires.
        let fired = run(&rules, &[tx(0, 5000.0, 0.0, 0.0, Channel::Ecom)]);
        assert!(fired[0].is_empty());

        // Five identical small amounts (zero spread): the floor keeps 60.00 from firing...
        let mut txs: Vec<_> = (0..5)
            .map(|i| tx(i * 3600, 20.0, 0.0, 0.0, Channel::Ecom))
            .collect();
        txs.push(tx(6 * 3600, 60.0, 0.0, 0.0, Channel::Ecom));
        assert!(run(&rules, &txs).iter().all(Vec::is_empty));
        // ...and the absolute minimum keeps a small amount from firing at all.
        txs.pop();
        txs.push(tx(6 * 3600, 99.0, 0.0, 0.0, Channel::Ecom));
        assert!(run(&rules, &txs).iter().all(Vec::is_empty));
        // A purchase ~50 times the usual fires.
        txs.pop();
        txs.push(tx(6 * 3600, 1000.0, 0.0, 0.0, Channel::Ecom));
        let fired = run(&rules, &txs);
        assert_eq!(fired[5], vec![Rule::AmountAnomaly]);

        // Four of history is not enough.
        let mut short: Vec<_> = (0..4)
            .map(|i| tx(i * 3600, 20.0, 0.0, 0.0, Channel::Ecom))
            .collect();
        short.push(tx(5 * 3600, 1000.0, 0.0, 0.0, Channel::Ecom));
        assert!(run(&rules, &short).iter().all(Vec::is_empty));
    }

    #[test]
    fn a_card_that_always_spends_a_lot_is_not_anomalous() {
        let rules = RuleSet::default();
        let txs: Vec<_> = (0..20)
            .map(|i| {
                let amount = if i % 2 == 0 { 800.0 } else { 1500.0 };
                tx(i * 3600, amount, 0.0, 0.0, Channel::Ecom)
            })
            .collect();
        assert!(run(&rules, &txs).iter().all(Vec::is_empty));
    }

    #[test]
    fn running_stats_match_the_two_pass_formula_and_cap() {
        let xs = [1.0, 2.0, 4.0, 8.0, 3.5];
        let mut stats = RunningStats::default();
        xs.iter().for_each(|&x| stats.push(x));
        let mean = xs.iter().sum::<f64>() / 5.0;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 4.0;
        assert!((stats.mean - mean).abs() < 1e-12);
        assert!((stats.std_dev() - var.sqrt()).abs() < 1e-12);

        let mut stats = RunningStats::default();
        for _ in 0..1000 {
            stats.push(1.0);
        }
        assert_eq!(stats.n, STATS_COUNT_CAP);
        // Old values fade: after the cap, new ones move the mean at 1/200 each.
        for _ in 0..200 {
            stats.push(2.0);
        }
        assert!(stats.mean > 1.6, "{}", stats.mean);
    }

    #[test]
    fn blocklists_match_merchants_prefixes_and_ranges() {
        let mut rules = RuleSet::default();
        rules.blocklist.merchants.insert("m-1".into());
        rules.blocklist.card_ranges = vec![
            CardRange::parse("400000-400099").unwrap(),
            CardRange::parse("5555").unwrap(),
        ];
        let reasons = score(
            &rules,
            &CardProfile::default(),
            &tx(0, 1.0, 0.0, 0.0, Channel::Pos),
        );
        assert_eq!(
            reasons.iter().map(|r| r.rule).collect::<Vec<_>>(),
            vec![Rule::BlockedMerchant, Rule::BlockedCardRange]
        );
        assert_eq!(total(&reasons), 200);

        let range = CardRange::parse("400000-400099").unwrap();
        assert!(range.contains("4000991111111111"));
        assert!(!range.contains("4001001111111111"));
        assert!(!range.contains("40001"));
        assert!(
            CardRange::parse("5555")
                .unwrap()
                .contains("5555444433332222")
        );
        for bad in ["", "12a", "400099-400000", "4000-40000", "-"] {
            assert!(CardRange::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn profiles_remember_the_latest_transaction_ids() {
        let rules = RuleSet::default();
        let mut profile = CardProfile::default();
        for i in 0..40 {
            apply(
                &rules,
                &mut profile,
                &tx(i * 600, 5.0, 0.0, 0.0, Channel::Ecom),
            );
        }
        assert_eq!(profile.seen.len(), MAX_SEEN);
        assert!(profile.has_seen("t-23400"));
        assert!(!profile.has_seen("t-0"));
    }

    #[test]
    fn scores_add_up_against_the_threshold() {
        let rules = RuleSet::default();
        // Each rule alone reaches the threshold by default (a card-testing burst is an alert on
        // its own); scores still add up, and a threshold above one rule needs two.
        let mut profile = CardProfile::default();
        for i in 0..5 {
            apply(
                &rules,
                &mut profile,
                &tx(i * 10, 20.0, 0.0, 0.0, Channel::Ecom),
            );
        }
        let small = score(&rules, &profile, &tx(60, 20.0, 0.0, 0.0, Channel::Ecom));
        assert_eq!(total(&small), 60);
        assert!(total(&small) >= rules.threshold);
        let big = score(&rules, &profile, &tx(60, 2000.0, 0.0, 0.0, Channel::Ecom));
        assert_eq!(total(&big), 120);
        let stricter = RuleSet {
            threshold: 100,
            ..rules.clone()
        };
        assert!(
            total(&score(
                &stricter,
                &profile,
                &tx(60, 20.0, 0.0, 0.0, Channel::Ecom)
            )) < 100
        );
    }

    #[test]
    fn a_payee_paid_as_much_before_is_not_an_amount_anomaly() {
        let rules = RuleSet::default();
        let mut profile = CardProfile::default();
        let mut rent = tx(0, 900.0, 0.0, 0.0, Channel::Ecom);
        rent.merchant_id = "landlord".into();
        apply(&rules, &mut profile, &rent);
        for i in 1..20 {
            apply(
                &rules,
                &mut profile,
                &tx(i * 3600, 30.0, 0.0, 0.0, Channel::Pos),
            );
        }
        // Next month's rent: the card's norm for that payee.
        let mut again = tx(30 * 86_400, 950.0, 0.0, 0.0, Channel::Ecom);
        again.merchant_id = "landlord".into();
        assert!(score(&rules, &profile, &again).is_empty());
        // The same amount anywhere else is thirty times the card's usual.
        let elsewhere = tx(30 * 86_400, 950.0, 0.0, 0.0, Channel::Ecom);
        assert_eq!(
            score(&rules, &profile, &elsewhere)
                .iter()
                .map(|r| r.rule)
                .collect::<Vec<_>>(),
            vec![Rule::AmountAnomaly]
        );
    }

    #[test]
    fn an_impossible_sighting_does_not_move_the_card() {
        let rules = RuleSet::default();
        let fired = run(
            &rules,
            &[
                tx(0, 10.0, BERLIN.0, BERLIN.1, Channel::Pos),
                tx(1800, 10.0, NEW_YORK.0, NEW_YORK.1, Channel::Atm),
                // The holder, still in Berlin an hour later: not impossible from Berlin.
                tx(3600, 10.0, BERLIN.0, BERLIN.1, Channel::Pos),
            ],
        );
        assert_eq!(fired[1], vec![Rule::ImpossibleTravel]);
        assert!(fired[2].is_empty(), "{fired:?}");
    }

    #[test]
    fn unusual_merchants_need_a_rare_category_and_a_new_country() {
        let rules = RuleSet::default();
        let rule = &rules.unusual_merchant;
        let mut profile = CardProfile::default();
        for i in 0..10 {
            apply(
                &rules,
                &mut profile,
                &tx(i * 3600, 20.0, 0.0, 0.0, Channel::Pos),
            );
        }
        let mut betting = tx(11 * 3600, 40.0, 0.0, 0.0, Channel::Ecom);
        betting.merchant_category = "7995".into();
        betting.country = "KY".into();
        let reason = unusual_merchant(rule, &profile, &betting, Some(0.0001)).unwrap();
        assert_eq!(reason.rule, Rule::UnusualMerchant);
        // A common category, a country the card used, or a cold model: nothing.
        assert!(unusual_merchant(rule, &profile, &betting, Some(0.05)).is_none());
        assert!(unusual_merchant(rule, &profile, &betting, None).is_none());
        betting.country = "DE".into();
        assert!(unusual_merchant(rule, &profile, &betting, Some(0.0001)).is_none());
    }
}
