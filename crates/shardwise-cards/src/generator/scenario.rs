//! A labelled evaluation set: weeks of traffic of cards with habits, with fraud incidents of
//! each pattern mixed in, every transaction labelled with what it is.
//!
//! Unlike [`super::TransactionGenerator`] (traffic at the caller's clock, cards picked at
//! random), every card here lives a timeline: a home city, a usual amount and spread, favourite
//! merchants, a share of online purchases, waking hours in its own time zone. Ordinary variety
//! that a detector must *not* alert on is part of it: paydays (bigger baskets for two days),
//! monthly rent (a large payment to the same payee), trips (a flight to another city, days of
//! card-present spending there, a flight back, all at possible speeds), cards that start during
//! the set (their first transactions), the odd night-time purchase. The fraud incidents:
//!
//! | pattern | what happens |
//! |---|---|
//! | card testing | 8–16 purchases of 0.50–4.99 online at as many merchants, 10–40 s apart |
//! | account takeover | one purchase of 10–60× the card's usual at a merchant the card never used, mostly online (a new channel for a card that pays in person) |
//! | impossible travel | a card-present purchase or withdrawal 3,000+ km from the card's last one, 10–120 min later |
//! | blocklisted | a purchase at the blocklisted merchant, or 1–3 purchases of a card in the blocklisted range |
//! | unusual merchant | an online purchase in a category the card never used and the shard rarely sees (betting, crypto, money transfer, direct marketing), in a country the card never used |
//!
//! The first `warmup_days` give every card its history (a month, so each rent payer has paid
//! rent once); incidents happen after it, and an evaluation measures only what follows.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use shardwise::producer::ProducerRecord;

use super::{Label, Labelled, Normal, Pattern};

/// What [`scenario`] generates.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioOptions {
    pub seed: u64,
    pub cards: u32,
    /// Days of history before incidents start (not measured).
    pub warmup_days: u32,
    /// Days measured after the warm-up.
    pub days: u32,
    /// Incidents of each fraud pattern within the measured days.
    pub incidents_per_pattern: u32,
    pub blocked_merchant: String,
    /// Digits the blocklisted card range starts with.
    pub blocked_card_prefix: String,
    /// Epoch ms the set starts at (midnight UTC).
    pub start_ms: i64,
}

impl Default for ScenarioOptions {
    /// About 120,000 measured transactions (and as many of warm-up).
    fn default() -> Self {
        Self {
            seed: 1,
            cards: 1_000,
            warmup_days: 31,
            days: 35,
            incidents_per_pattern: 250,
            blocked_merchant: "m-blocked-0001".to_owned(),
            blocked_card_prefix: "999999".to_owned(),
            // 2026-10-01T00:00:00Z
            start_ms: 1_790_812_800_000,
        }
    }
}

impl ScenarioOptions {
    /// Epoch ms where the measured days begin.
    pub fn measured_from_ms(&self) -> i64 {
        self.start_ms + i64::from(self.warmup_days) * DAY_MS
    }

    fn end_ms(&self) -> i64 {
        self.measured_from_ms() + i64::from(self.days) * DAY_MS
    }
}

const DAY_MS: i64 = 86_400_000;
const HOUR_MS: i64 = 3_600_000;

/// (city, country, lat, lon)
const CITIES: [(&str, &str, f64, f64); 14] = [
    ("nyc", "US", 40.71, -74.00),
    ("chi", "US", 41.88, -87.63),
    ("sfo", "US", 37.77, -122.42),
    ("lon", "GB", 51.50, -0.12),
    ("man", "GB", 53.48, -2.24),
    ("ber", "DE", 52.52, 13.40),
    ("muc", "DE", 48.14, 11.58),
    ("par", "FR", 48.86, 2.35),
    ("mad", "ES", 40.42, -3.70),
    ("tyo", "JP", 35.68, 139.69),
    ("osa", "JP", 34.69, 135.50),
    ("syd", "AU", -33.86, 151.20),
    ("sao", "BR", -23.55, -46.63),
    ("tor", "CA", 43.65, -79.38),
];

/// Everyday merchant categories and their weights.
const EVERYDAY: [(&str, u32); 15] = [
    ("5411", 25),
    ("5812", 15),
    ("5814", 10),
    ("5541", 8),
    ("5999", 8),
    ("4111", 6),
    ("5912", 5),
    ("5311", 5),
    ("5651", 5),
    ("4121", 4),
    ("5732", 3),
    ("7832", 2),
    ("5942", 2),
    ("7011", 1),
    ("4511", 1),
];
const TRAVEL: [&str; 5] = ["7011", "5812", "4121", "5814", "5411"];
const UNUSUAL: [&str; 4] = ["7995", "6051", "4829", "5967"];
/// (country, lat, lon) of the unusual-merchant incidents.
const FAR_COUNTRIES: [(&str, f64, f64); 5] = [
    ("NG", 6.52, 3.38),
    ("KY", 19.29, -81.37),
    ("PA", 8.98, -79.52),
    ("CY", 35.17, 33.36),
    ("MT", 35.90, 14.51),
];

/// One card's habits.
#[derive(Debug, Clone)]
struct Card {
    id: String,
    home: usize,
    usual: f64,
    spread: f64,
    per_day: f64,
    online: f64,
    merchants: Vec<(String, &'static str)>,
    shops: Vec<(String, &'static str, &'static str)>,
    payday: u32,
    rent: Option<(u32, f64)>,
    starts_day: u32,
}

struct Builder {
    rng: StdRng,
    options: ScenarioOptions,
    out: Vec<Labelled>,
    next_id: u64,
    incident: u64,
}

/// The labelled set, in event-time order.
pub fn scenario(options: &ScenarioOptions) -> Vec<Labelled> {
    let mut b = Builder {
        rng: StdRng::seed_from_u64(options.seed),
        options: options.clone(),
        out: Vec::new(),
        next_id: 0,
        incident: 0,
    };
    let cards: Vec<Card> = (0..options.cards).map(|n| b.card(n)).collect();
    for card in &cards {
        b.everyday(card);
    }
    for pattern in Pattern::ALL {
        for _ in 0..options.incidents_per_pattern {
            let card = &cards[b.rng.random_range(0..cards.len())];
            b.incident(pattern, card);
        }
    }
    let mut out = b.out;
    out.sort_by_key(|l| l.at_ms);
    out
}

fn category(rng: &mut StdRng) -> &'static str {
    let total: u32 = EVERYDAY.iter().map(|(_, w)| w).sum();
    let mut r = rng.random_range(0..total);
    for (mcc, w) in EVERYDAY {
        if r < w {
            return mcc;
        }
        r -= w;
    }
    "5411"
}

fn km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (p1, p2) = (a.0.to_radians(), b.0.to_radians());
    let dp = (b.0 - a.0).to_radians();
    let dl = (b.1 - a.1).to_radians();
    let h = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().min(1.0).asin()
}

impl Builder {
    fn card(&mut self, n: u32) -> Card {
        let rng = &mut self.rng;
        let home = rng.random_range(0..CITIES.len());
        let city = CITIES[home].0;
        let normal = |rng: &mut StdRng| -> f64 {
            let (u, v): (f64, f64) = (rng.random_range(1e-9..1.0), rng.random());
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        };
        let usual = (25f64.ln() + 0.6 * normal(rng)).exp().clamp(3.0, 400.0);
        let merchants = (0..12)
            .map(|_| {
                (
                    format!("m-{city}-{:04}", rng.random_range(0..400)),
                    category(rng),
                )
            })
            .collect();
        let home_country = CITIES[home].1;
        let shops = (0..6)
            .map(|_| {
                let country = match rng.random_range(0..20) {
                    0..12 => home_country,
                    12..17 => "US",
                    _ => "IE",
                };
                (
                    format!("w-{:04}", rng.random_range(0..300)),
                    category(rng),
                    country,
                )
            })
            .collect();
        let new_card = rng.random_range(0..100) < 8;
        let warmup = self.options.warmup_days;
        Card {
            id: format!("4{:015}", 100_000_000_000 + u64::from(n) * 7919),
            home,
            usual,
            spread: rng.random_range(0.25..0.6),
            per_day: rng.random_range(1.5..5.0),
            online: rng.random_range(0.05..0.4),
            merchants,
            shops,
            payday: rng.random_range(0..30),
            rent: (rng.random_range(0..2) == 0).then(|| {
                (
                    rng.random_range(0..30),
                    usual * rng.random_range(12.0..30.0),
                )
            }),
            starts_day: if new_card {
                warmup + rng.random_range(0..self.options.days.max(1))
            } else {
                0
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        card: &str,
        at_ms: i64,
        merchant: &str,
        mcc: &str,
        amount: f64,
        country: &str,
        (lat, lon): (f64, f64),
        channel: &str,
        label: Label,
    ) {
        self.next_id += 1;
        let body = json!({
            "transaction_id": format!("tx-{}-{:010}", self.options.seed, self.next_id),
            "card_id": card,
            "merchant_id": merchant,
            "merchant_category": mcc,
            "amount": (amount.max(0.01) * 100.0).round() / 100.0,
            "currency": "USD",
            "country": country,
            "lat": lat + self.rng.random_range(-0.05..0.05),
            "lon": lon + self.rng.random_range(-0.05..0.05),
            "timestamp": shardwise::time::Timestamp::from_epoch_millis(at_ms).to_rfc3339(),
            "channel": channel,
        });
        self.out.push(Labelled {
            record: ProducerRecord::new(card, body.to_string().into_bytes()),
            at_ms,
            label,
        });
    }

    /// A time on `day` in the card's waking hours (local solar time), in epoch ms.
    fn waking(&mut self, day: i64, lon: f64) -> i64 {
        let local_hour = if self.rng.random_range(0..100) < 2 {
            self.rng.random_range(0.0..6.0)
        } else {
            self.rng.random_range(7.0..23.0)
        };
        let utc_hour = local_hour - lon / 15.0;
        self.options.start_ms + day * DAY_MS + (utc_hour * HOUR_MS as f64) as i64
    }

    fn amount(&mut self, card: &Card) -> f64 {
        let (u, v): (f64, f64) = (self.rng.random_range(1e-9..1.0), self.rng.random());
        let z = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
        card.usual * (card.spread * z.clamp(-3.0, 3.0)).exp()
    }

    /// One everyday purchase of the card at `at`, at home or in `city`.
    fn purchase(&mut self, card: &Card, at: i64, city: usize, kind: Normal, scale: f64) {
        let (name, country, lat, lon) = CITIES[city];
        let amount = self.amount(card) * scale;
        if city == card.home && self.rng.random::<f64>() < card.online {
            let (merchant, mcc, shop_country) =
                card.shops[self.rng.random_range(0..card.shops.len())].clone();
            let place = CITIES
                .iter()
                .find(|c| c.1 == shop_country)
                .map_or((lat, lon), |c| (c.2, c.3));
            let label = Label::Normal(kind);
            self.push(
                &card.id,
                at,
                &merchant,
                mcc,
                amount,
                shop_country,
                place,
                "ecom",
                label,
            );
            return;
        }
        if self.rng.random_range(0..100) < 3 {
            let cash =
                ((card.usual * self.rng.random_range(1.0..4.0) / 20.0).ceil() * 20.0).max(20.0);
            let merchant = format!("atm-{name}-{:03}", self.rng.random_range(0..50));
            self.push(
                &card.id,
                at,
                &merchant,
                "6011",
                cash,
                country,
                (lat, lon),
                "atm",
                Label::Normal(kind),
            );
            return;
        }
        let (merchant, mcc) = if city == card.home {
            if self.rng.random_range(0..10) < 7 {
                card.merchants[self.rng.random_range(0..card.merchants.len())].clone()
            } else {
                (
                    format!("m-{name}-{:04}", self.rng.random_range(0..400)),
                    category(&mut self.rng),
                )
            }
        } else {
            (
                format!("m-{name}-{:04}", self.rng.random_range(0..400)),
                TRAVEL[self.rng.random_range(0..TRAVEL.len())],
            )
        };
        self.push(
            &card.id,
            at,
            &merchant,
            mcc,
            amount,
            country,
            (lat, lon),
            "pos",
            Label::Normal(kind),
        );
    }

    /// The card's ordinary life over the whole set: purchases, paydays, rent, a trip.
    fn everyday(&mut self, card: &Card) {
        let total_days = i64::from(self.options.warmup_days + self.options.days);
        let home_lon = CITIES[card.home].3;
        // A trip for one card in seven, within the measured days.
        let trip = (self.rng.random_range(0..7) == 0 && self.options.days > 8).then(|| {
            let mut dest = self.rng.random_range(0..CITIES.len());
            if dest == card.home {
                dest = (dest + 1 + self.rng.random_range(0..CITIES.len() - 1)) % CITIES.len();
            }
            let first = i64::from(self.options.warmup_days)
                + self.rng.random_range(0..i64::from(self.options.days) - 7);
            (dest, first, first + self.rng.random_range(2..7))
        });
        // The trip's times: out on its first day, back on its last (8:00 UTC departures).
        let legs = trip.map(|(dest, from, to)| {
            let distance = km(
                (CITIES[card.home].2, CITIES[card.home].3),
                (CITIES[dest].2, CITIES[dest].3),
            );
            let flight_ms = ((distance / 750.0 + 2.0) * HOUR_MS as f64) as i64;
            let out = self.options.start_ms + from * DAY_MS + 8 * HOUR_MS;
            let back = self.options.start_ms + to * DAY_MS + 8 * HOUR_MS;
            (dest, out, out + flight_ms, back, back + flight_ms)
        });
        for day in i64::from(card.starts_day)..total_days {
            let (city, kind) = match trip {
                Some((dest, from, to)) if day >= from && day <= to => (dest, Normal::Travel),
                _ => (card.home, Normal::Everyday),
            };
            let month_day = (day % 30) as u32;
            let payday = month_day == card.payday || month_day == (card.payday + 1) % 30;
            let (kind, scale) = match kind {
                Normal::Everyday if payday => (Normal::Payday, self.rng.random_range(1.3..2.5)),
                Normal::Everyday if day < i64::from(card.starts_day) + 3 && card.starts_day > 0 => {
                    (Normal::NewCard, 1.0)
                }
                other => (other, 1.0),
            };
            let n = card.per_day.floor() as u32
                + u32::from(self.rng.random::<f64>() < card.per_day.fract());
            for _ in 0..n {
                // Local time at home, or at the destination once there (nothing in the air).
                let (city, kind, at) = match legs {
                    Some((dest, out, landed, back, home_again)) => {
                        let at = self.waking(day, CITIES[city].3);
                        if at >= landed + HOUR_MS && at < back - 3 * HOUR_MS {
                            (dest, kind, at)
                        } else if at < out - 3 * HOUR_MS || at >= home_again + HOUR_MS {
                            (card.home, Normal::Everyday, at)
                        } else {
                            continue;
                        }
                    }
                    None => (city, kind, self.waking(day, CITIES[city].3)),
                };
                let kind = if city == card.home && kind == Normal::Travel {
                    Normal::Everyday
                } else {
                    kind
                };
                self.purchase(card, at, city, kind, scale);
            }
            if let Some((rent_day, amount)) = card.rent
                && month_day == rent_day
                && city == card.home
            {
                let at = self.waking(day, home_lon);
                let (country, lat, lon) = (CITIES[card.home].1, CITIES[card.home].2, home_lon);
                let payee = format!("rent-{}", card.id);
                self.push(
                    &card.id,
                    at,
                    &payee,
                    "6513",
                    amount,
                    country,
                    (lat, lon),
                    "ecom",
                    Label::Normal(Normal::Rent),
                );
            }
        }
        if let Some((dest, out, landed, back, _)) = legs {
            // The flights, with airline and taxi purchases at possible speeds.
            let flight_ms = landed - out;
            for (leg, depart, (a, b)) in [(0, out, (card.home, dest)), (1, back, (dest, card.home))]
            {
                let (name, country, lat, lon) = CITIES[a];
                let airline = format!("m-{name}-air");
                let fare = card.usual * self.rng.random_range(0.5..2.0);
                self.push(
                    &card.id,
                    depart - 2 * HOUR_MS,
                    &airline,
                    "4511",
                    fare,
                    country,
                    (lat, lon),
                    "pos",
                    Label::Normal(Normal::Travel),
                );
                let (name, country, lat, lon) = CITIES[b];
                let taxi = format!("m-{name}-taxi{leg}");
                let amount = self.amount(card);
                self.push(
                    &card.id,
                    depart + flight_ms + HOUR_MS,
                    &taxi,
                    "4121",
                    amount,
                    country,
                    (lat, lon),
                    "pos",
                    Label::Normal(Normal::Travel),
                );
            }
        }
    }

    /// One fraud incident of `pattern` against `card`, within the measured days.
    fn incident(&mut self, pattern: Pattern, card: &Card) {
        self.incident += 1;
        let label = Label::Fraud {
            pattern,
            incident: self.incident,
        };
        let from = self
            .options
            .measured_from_ms()
            .max(self.options.start_ms + i64::from(card.starts_day + 3) * DAY_MS);
        let to = self.options.end_ms() - HOUR_MS;
        let at = if from < to {
            self.rng.random_range(from..to)
        } else {
            to
        };
        let (_, home_country, lat, lon) = CITIES[card.home];
        match pattern {
            Pattern::CardTesting => {
                let mut t = at;
                for _ in 0..self.rng.random_range(8..17) {
                    let merchant = format!("w-t{:05}", self.rng.random_range(0..20_000));
                    let amount = self.rng.random_range(0.5..4.99);
                    let country = CITIES[self.rng.random_range(0..CITIES.len())];
                    let mcc = ["5999", "5816", "5815"][self.rng.random_range(0..3)];
                    self.push(
                        &card.id,
                        t,
                        &merchant,
                        mcc,
                        amount,
                        country.1,
                        (country.2, country.3),
                        "ecom",
                        label,
                    );
                    t += self.rng.random_range(10_000..40_000);
                }
            }
            Pattern::AccountTakeover => {
                let merchant = format!("w-x{:05}", self.rng.random_range(0..20_000));
                let mcc = ["5732", "5944", "5311", "5651"][self.rng.random_range(0..4)];
                let amount = (card.usual * self.rng.random_range(10.0..60.0)).max(150.0);
                let channel = if self.rng.random_range(0..10) < 8 {
                    "ecom"
                } else {
                    "pos"
                };
                self.push(
                    &card.id,
                    at,
                    &merchant,
                    mcc,
                    amount,
                    home_country,
                    (lat, lon),
                    channel,
                    label,
                );
            }
            Pattern::ImpossibleTravel => {
                // The cardholder at home, then the card far away soon after.
                let merchant = card.merchants[0].clone();
                let amount = self.amount(card);
                self.push(
                    &card.id,
                    at,
                    &merchant.0,
                    merchant.1,
                    amount,
                    home_country,
                    (lat, lon),
                    "pos",
                    Label::Normal(Normal::Everyday),
                );
                let far: Vec<usize> = (0..CITIES.len())
                    .filter(|&c| km((lat, lon), (CITIES[c].2, CITIES[c].3)) > 3000.0)
                    .collect();
                let city = far[self.rng.random_range(0..far.len())];
                let (name, country, flat, flon) = CITIES[city];
                let later = at + self.rng.random_range(10..120) * 60_000;
                let (merchant, mcc, channel, amount) = if self.rng.random_range(0..2) == 0 {
                    (
                        format!("atm-{name}-{:03}", self.rng.random_range(0..50)),
                        "6011",
                        "atm",
                        f64::from(self.rng.random_range(10..26u32) * 20),
                    )
                } else {
                    (
                        format!("m-{name}-{:04}", self.rng.random_range(0..400)),
                        "5732",
                        "pos",
                        card.usual * self.rng.random_range(1.0..4.0),
                    )
                };
                self.push(
                    &card.id,
                    later,
                    &merchant,
                    mcc,
                    amount,
                    country,
                    (flat, flon),
                    channel,
                    label,
                );
            }
            Pattern::Blocklisted => {
                if self.rng.random_range(0..2) == 0 {
                    let merchant = self.options.blocked_merchant.clone();
                    let amount = self.amount(card);
                    self.push(
                        &card.id,
                        at,
                        &merchant,
                        "5999",
                        amount,
                        home_country,
                        (lat, lon),
                        "ecom",
                        label,
                    );
                } else {
                    let digits = 16usize.saturating_sub(self.options.blocked_card_prefix.len());
                    let number = self.rng.random_range(0..10u64.pow(digits.min(18) as u32));
                    let stolen = format!("{}{number:0digits$}", self.options.blocked_card_prefix);
                    let mut t = at;
                    for _ in 0..self.rng.random_range(1..4) {
                        let merchant = format!("w-x{:05}", self.rng.random_range(0..20_000));
                        let amount = self.rng.random_range(20.0..400.0);
                        self.push(
                            &stolen,
                            t,
                            &merchant,
                            "5732",
                            amount,
                            home_country,
                            (lat, lon),
                            "ecom",
                            label,
                        );
                        t += self.rng.random_range(60_000..1_800_000);
                    }
                }
            }
            Pattern::UnusualMerchant => {
                let (country, clat, clon) =
                    FAR_COUNTRIES[self.rng.random_range(0..FAR_COUNTRIES.len())];
                let mcc = UNUSUAL[self.rng.random_range(0..UNUSUAL.len())];
                let merchant = format!("w-u{:05}", self.rng.random_range(0..20_000));
                let amount = card.usual * self.rng.random_range(1.0..6.0);
                self.push(
                    &card.id,
                    at,
                    &merchant,
                    mcc,
                    amount,
                    country,
                    (clat, clon),
                    "ecom",
                    label,
                );
            }
        }
    }
}
