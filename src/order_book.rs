//! A price-level order book as a replicated state, and a generator of realistic updates.
//!
//! Each leaf is one price level of one side of one instrument. Deltas set a level, reduce it
//! by a traded quantity (an incremental change: applying it to the wrong base would give a
//! wrong book, which the protocol's per-leaf chains prevent) or remove it.

use std::collections::BTreeMap;

use grapevine_core::state::ReplicatedState;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Side of the book.
#[derive(Clone, Copy, Debug, Deserialize, Eq, Hash, Ord, PartialEq, PartialOrd, Serialize)]
pub enum Side {
    /// Buy orders.
    Bid,
    /// Sell orders.
    Ask,
}

/// Identity of a price level.
#[derive(Clone, Copy, Debug, Deserialize, Eq, Hash, Ord, PartialEq, PartialOrd, Serialize)]
pub struct LevelKey {
    /// Instrument number.
    pub instrument: u16,
    /// Side.
    pub side: Side,
    /// Price in ticks.
    pub price: i64,
}

/// A price level.
#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct Level {
    /// Total quantity.
    pub quantity: u64,
    /// Number of orders.
    pub orders: u32,
}

/// A change to one level.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub enum BookDelta {
    /// Set the level (new orders, amendments).
    Set(LevelKey, Level),
    /// A trade took `quantity` from the level; the level is removed when emptied.
    Trade(LevelKey, u64),
    /// Remove the level.
    Remove(LevelKey),
}

/// Price levels of several instruments.
#[derive(Clone, Debug, Default, Deserialize, Eq, PartialEq, Serialize)]
pub struct OrderBook {
    levels: BTreeMap<LevelKey, Level>,
}

impl OrderBook {
    /// Best bid of `instrument`: highest bid price and its level.
    pub fn best_bid(&self, instrument: u16) -> Option<(i64, Level)> {
        self.side(instrument, Side::Bid).next_back()
    }

    /// Best ask of `instrument`: lowest ask price and its level.
    pub fn best_ask(&self, instrument: u16) -> Option<(i64, Level)> {
        self.side(instrument, Side::Ask).next()
    }

    /// Levels of one side, by increasing price.
    pub fn side(
        &self,
        instrument: u16,
        side: Side,
    ) -> impl DoubleEndedIterator<Item = (i64, Level)> + '_ {
        let low = LevelKey {
            instrument,
            side,
            price: i64::MIN,
        };
        let high = LevelKey {
            instrument,
            side,
            price: i64::MAX,
        };
        self.levels.range(low..=high).map(|(k, l)| (k.price, *l))
    }

    /// Top of book of the first instruments, on one line.
    pub fn summary(&self) -> String {
        let instruments = self.instruments();
        let mut parts: Vec<String> = instruments
            .iter()
            .take(4)
            .map(|i| {
                let price = |p: Option<(i64, Level)>| {
                    p.map_or_else(|| "-".to_string(), |(p, _)| p.to_string())
                };
                format!(
                    "#{i} {} x {}",
                    price(self.best_bid(*i)),
                    price(self.best_ask(*i))
                )
            })
            .collect();
        if instruments.len() > 4 {
            parts.push(format!("and {} more", instruments.len() - 4));
        }
        format!("{} instruments: {}", instruments.len(), parts.join(", "))
    }

    /// Instruments with at least one level.
    pub fn instruments(&self) -> Vec<u16> {
        let mut out: Vec<u16> = self.levels.keys().map(|k| k.instrument).collect();
        out.dedup();
        out
    }
}

impl ReplicatedState for OrderBook {
    type Key = LevelKey;
    type Leaf = Level;
    type Delta = BookDelta;

    fn delta_key(delta: &BookDelta) -> &LevelKey {
        match delta {
            BookDelta::Set(key, _) | BookDelta::Trade(key, _) | BookDelta::Remove(key) => key,
        }
    }

    fn apply(&mut self, delta: &BookDelta) {
        match delta {
            BookDelta::Set(key, level) => {
                self.levels.insert(*key, *level);
            }
            BookDelta::Trade(key, quantity) => {
                if let Some(level) = self.levels.get_mut(key) {
                    level.quantity = level.quantity.saturating_sub(*quantity);
                    level.orders = level.orders.saturating_sub(1);
                    if level.quantity == 0 {
                        self.levels.remove(key);
                    }
                }
            }
            BookDelta::Remove(key) => {
                self.levels.remove(key);
            }
        }
    }

    fn leaf(&self, key: &LevelKey) -> Option<&Level> {
        self.levels.get(key)
    }

    fn leaves(&self) -> Box<dyn Iterator<Item = (&LevelKey, &Level)> + '_> {
        Box::new(self.levels.iter())
    }

    fn put_leaf(&mut self, key: LevelKey, leaf: Level) {
        self.levels.insert(key, leaf);
    }

    fn remove_leaf(&mut self, key: &LevelKey) -> Option<Level> {
        self.levels.remove(key)
    }

    fn len(&self) -> usize {
        self.levels.len()
    }
}

/// Generates a realistic stream of level updates: each instrument's mid price walks randomly;
/// updates cluster near the touch; trades hit the best levels; far levels are pulled.
#[derive(Debug)]
pub struct MarketGenerator {
    rng: SmallRng,
    mids: Vec<i64>,
    depth: i64,
}

impl MarketGenerator {
    /// `instruments` instruments, `depth` price levels per side, seeded.
    pub fn new(instruments: u16, depth: u16, seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mids = (0..instruments.max(1))
            .map(|_| rng.gen_range(1_000..100_000))
            .collect();
        Self {
            rng,
            mids,
            depth: i64::from(depth.max(1)),
        }
    }

    /// The next update, given the current book.
    pub fn next_delta(&mut self, book: &OrderBook) -> BookDelta {
        let index = self.rng.gen_range(0..self.mids.len());
        let instrument = index as u16;
        if self.rng.gen_ratio(1, 50) {
            if let Some(mid) = self.mids.get_mut(index) {
                *mid += self.rng.gen_range(-2..=2);
            }
        }
        let mid = self.mids.get(index).copied().unwrap_or(10_000);
        let side = if self.rng.gen() { Side::Bid } else { Side::Ask };
        // Distance from the mid, skewed toward the touch.
        let distance = 1 + (self.rng.gen::<f64>().powi(2) * self.depth as f64) as i64;
        let price = match side {
            Side::Bid => mid - distance,
            Side::Ask => mid + distance,
        };
        let key = LevelKey {
            instrument,
            side,
            price,
        };
        match self.rng.gen_range(0..10) {
            0..=1 => {
                let best = match side {
                    Side::Bid => book.best_bid(instrument),
                    Side::Ask => book.best_ask(instrument),
                };
                match best {
                    Some((price, level)) => BookDelta::Trade(
                        LevelKey {
                            instrument,
                            side,
                            price,
                        },
                        self.rng.gen_range(1..=level.quantity.max(1)),
                    ),
                    None => BookDelta::Remove(key),
                }
            }
            2 if distance > self.depth / 2 => BookDelta::Remove(key),
            _ => BookDelta::Set(
                key,
                Level {
                    quantity: self.rng.gen_range(1..100) * 100,
                    orders: self.rng.gen_range(1..20),
                },
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_of_book_and_trades() {
        let mut book = OrderBook::default();
        let bid = |price| LevelKey {
            instrument: 1,
            side: Side::Bid,
            price,
        };
        book.apply(&BookDelta::Set(
            bid(99),
            Level {
                quantity: 500,
                orders: 2,
            },
        ));
        book.apply(&BookDelta::Set(
            bid(100),
            Level {
                quantity: 300,
                orders: 1,
            },
        ));
        assert_eq!(book.best_bid(1).map(|b| b.0), Some(100));
        book.apply(&BookDelta::Trade(bid(100), 300));
        assert_eq!(
            book.best_bid(1).map(|b| b.0),
            Some(99),
            "emptied level removed"
        );
        assert_eq!(book.best_ask(1), None);
    }

    #[test]
    fn generator_keeps_books_bounded_and_crossing_free_per_side() {
        let mut book = OrderBook::default();
        let mut market = MarketGenerator::new(4, 10, 7);
        for _ in 0..20_000 {
            let delta = market.next_delta(&book);
            book.apply(&delta);
        }
        assert!(book.len() > 10);
        assert!(
            book.len() < 4 * 2 * 40,
            "levels stay near the mid: {}",
            book.len()
        );
    }
}
