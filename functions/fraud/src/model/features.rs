//! What the anomaly model sees of a transaction: eight numbers, each scaled so ordinary traffic
//! spans roughly 0..1 (a random cut picks a dimension by its range, so a feature with a larger
//! natural scale would get most of the cuts).

use shardwise_cards::transaction::{Channel, Transaction};

use super::forest::{DIMS, Point};
use crate::rules::{CardProfile, RuleSet, haversine_km, log_amount};

/// The features, in the order of a [`Point`]'s coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    /// `ln(1 + amount)` against the card's history, in (floored) standard deviations / 2; a
    /// recurring payee's usual amount counts as the card's norm for that payee.
    Amount,
    /// How far from mid-afternoon the local solar time is (0 at 14:00, 1 at 02:00).
    HourOfDay,
    /// Card present: `ln(1 + km)` from the card's usual area, / `ln(20,000)`.
    Distance,
    /// How rare the merchant category is on the shard (`-ln(share)` / 2).
    CategoryRarity,
    /// The category, merchant or country is new for the card (one third each).
    Novelty,
    /// Time since the card's previous transaction, `ln(1 + s)` / `ln(30 days)`.
    TimeSincePrevious,
    /// The card's transactions within the velocity window, / the velocity limit.
    Velocity,
    /// The channel (`pos`, `ecom`, `atm`) is new for the card.
    NewChannel,
}

impl Feature {
    pub const ALL: [Feature; DIMS] = [
        Feature::Amount,
        Feature::HourOfDay,
        Feature::Distance,
        Feature::CategoryRarity,
        Feature::Novelty,
        Feature::TimeSincePrevious,
        Feature::Velocity,
        Feature::NewChannel,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Feature::Amount => "amount",
            Feature::HourOfDay => "hour_of_day",
            Feature::Distance => "distance",
            Feature::CategoryRarity => "category_rarity",
            Feature::Novelty => "novelty",
            Feature::TimeSincePrevious => "time_since_previous",
            Feature::Velocity => "velocity",
            Feature::NewChannel => "new_channel",
        }
    }
}

const LN_20000_KM: f32 = 9.903_538;
const LN_30_DAYS_S: f32 = 14.768_493;

/// The transaction as a point, from the card's profile as its earlier transactions left it and
/// the shard's category frequencies (`category_share`, 0..1).
pub fn features(
    rules: &RuleSet,
    profile: &CardProfile,
    tx: &Transaction<'_>,
    category_share: f64,
) -> Point {
    let mut p = [0.0f32; DIMS];
    let known = profile.amounts.n >= rules.amount.min_history;
    let at = tx.timestamp.epoch_millis();

    if known {
        let floor = rules.amount.log_std_floor;
        let spread = profile.amounts.std_dev().max(floor);
        let x = log_amount(tx.amount);
        let mean = match profile.payee(&tx.merchant_id) {
            Some(usual) if x <= usual + spread => usual,
            _ => profile.amounts.mean,
        };
        p[0] = (((x - mean) / spread) as f32 / 2.0).clamp(-2.0, 6.0);
    }

    let local_hours =
        (at.rem_euclid(86_400_000) as f64 / 3_600_000.0 + tx.lon / 15.0).rem_euclid(24.0) as f32;
    let from_afternoon = (local_hours - 14.0).abs();
    p[1] = from_afternoon.min(24.0 - from_afternoon) / 12.0;

    if matches!(tx.channel, Channel::Pos | Channel::Atm)
        && let Some(home) = profile.home
    {
        let km = haversine_km(home.lat, home.lon, tx.lat, tx.lon);
        p[2] = (km as f32).ln_1p() / LN_20000_KM;
    }

    p[3] = ((-category_share.max(1e-6).ln()) as f32 / 2.0).clamp(0.0, 6.0);

    if known {
        let mut novelty = 0.0;
        if !profile
            .categories
            .iter()
            .any(|c| c == tx.merchant_category.as_ref())
        {
            novelty += 1.0 / 3.0;
        }
        if !profile
            .merchants
            .iter()
            .any(|m| m == tx.merchant_id.as_ref())
        {
            novelty += 1.0 / 3.0;
        }
        if !profile.countries.iter().any(|c| c == tx.country.as_ref()) {
            novelty += 1.0 / 3.0;
        }
        p[4] = novelty;
        if profile.channels & channel_bit(tx.channel) == 0 {
            p[7] = 1.0;
        }
    }

    p[5] = match profile.last_at {
        Some(last) => ((at - last).max(0) as f32 / 1000.0).ln_1p() / LN_30_DAYS_S,
        None => 1.0,
    }
    .min(1.2);

    let window = rules.velocity.window_ms;
    let within = profile
        .recent
        .iter()
        .filter(|&&t| (t - at).abs() < window)
        .count();
    p[6] = ((within + 1) as f32 / rules.velocity.max_transactions.max(1) as f32).min(4.0);
    p
}

/// The card profile's bit for a channel.
pub fn channel_bit(channel: Channel) -> u8 {
    match channel {
        Channel::Pos => 1,
        Channel::Ecom => 2,
        Channel::Atm => 4,
    }
}
