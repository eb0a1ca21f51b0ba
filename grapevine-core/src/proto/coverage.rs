//! Where a snapshot cycle has been seen: positions in the key space and disjoint spans of them.
//!
//! A subscriber rebuilding from a snapshot cycle learns, leaf by leaf, which stretches of the
//! key space the cycle has covered (to know when the whole state is verified) and as of which
//! read each stretch was seen without a leaf (to refuse deltas older than that absence).
//! Spans are closed intervals of [`Pos`]; the spans painted begin at `Start`, a key, or just
//! above a key, and end just below a key, at a key, or at `End`, so each has an exact
//! neighbour position on either side and what is left of a span cut by another never overlaps
//! it.

use std::collections::BTreeMap;

/// Which side of a key a position is on.
#[derive(Clone, Copy, Debug, Eq, Ord, PartialEq, PartialOrd)]
pub(super) enum Side {
    Below,
    At,
    Above,
}

/// A position in the key space: before every key, just below / at / just above a key, or after
/// every key. Keys are totally ordered, and cycles walk them in that order.
#[derive(Clone, Debug, Eq, Ord, PartialEq, PartialOrd)]
pub(super) enum Pos<K> {
    Start,
    Key(K, Side),
    End,
}

impl<K: Clone> Pos<K> {
    /// The position right after this one, when there is one with nothing in between (there is
    /// none after `End`, nor after `Key(k, Above)`: another key may come next).
    fn successor(&self) -> Option<Self> {
        match self {
            Self::Key(key, Side::Below) => Some(Self::Key(key.clone(), Side::At)),
            Self::Key(key, Side::At) => Some(Self::Key(key.clone(), Side::Above)),
            _ => None,
        }
    }

    /// The position right before this one, when there is one with nothing in between.
    fn predecessor(&self) -> Option<Self> {
        match self {
            Self::Key(key, Side::Above) => Some(Self::Key(key.clone(), Side::At)),
            Self::Key(key, Side::At) => Some(Self::Key(key.clone(), Side::Below)),
            _ => None,
        }
    }
}

impl<K: Eq> Pos<K> {
    /// Whether `next` immediately follows `self`, with no position in between.
    pub(super) fn touches(&self, next: &Self) -> bool {
        match (self, next) {
            (Self::Key(a, Side::Below), Self::Key(b, Side::At))
            | (Self::Key(a, Side::At), Self::Key(b, Side::Above)) => a == b,
            _ => false,
        }
    }
}

/// Disjoint closed spans of positions, start → (end, value), merged when they touch.
#[derive(Debug)]
pub(super) struct SpanMap<K, V> {
    spans: BTreeMap<Pos<K>, (Pos<K>, V)>,
}

impl<K: Clone + Ord, V: Copy> SpanMap<K, V> {
    pub(super) fn new() -> Self {
        Self {
            spans: BTreeMap::new(),
        }
    }

    /// Records [`low`, `high`] with `value`, replacing what was recorded there.
    pub(super) fn paint(&mut self, low: Pos<K>, high: Pos<K>, value: V) {
        let overlapping: Vec<Pos<K>> = self
            .spans
            .range(..=high.clone())
            .rev()
            .take_while(|(_, (end, _))| *end >= low)
            .map(|(start, _)| start.clone())
            .collect();
        for start in overlapping {
            let Some((end, old)) = self.spans.remove(&start) else {
                continue;
            };
            // What is left on either side ends right before `low` and starts right after
            // `high`: sharing a boundary position with the new span would let the old value
            // win there, or (starting at `low`) be overwritten along with the rest of it.
            if start < low {
                let left_end = low.predecessor().unwrap_or_else(|| low.clone());
                self.spans.insert(start, (left_end, old));
            }
            if end > high {
                let right_start = high.successor().unwrap_or_else(|| high.clone());
                self.spans.insert(right_start, (end, old));
            }
        }
        self.spans.insert(low, (high, value));
    }

    /// The value recorded at `point`.
    pub(super) fn at(&self, point: &Pos<K>) -> Option<V> {
        let (_, (end, value)) = self.spans.range(..=point.clone()).next_back()?;
        (end >= point).then_some(*value)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }
}

impl<K: Clone + Ord> SpanMap<K, ()> {
    /// Adds [`low`, `high`] and merges it with the spans it overlaps or touches.
    pub(super) fn cover(&mut self, mut low: Pos<K>, mut high: Pos<K>) {
        loop {
            let before = self
                .spans
                .range(..=low.clone())
                .next_back()
                .filter(|(_, (end, _))| *end >= low || end.touches(&low))
                .map(|(start, _)| start.clone());
            let after = self
                .spans
                .range(low.clone()..)
                .find(|(start, _)| **start != low || before.is_none())
                .filter(|(start, _)| **start <= high || high.touches(start))
                .map(|(start, _)| start.clone());
            let Some(start) = before.or(after) else {
                break;
            };
            if let Some((end, ())) = self.spans.remove(&start) {
                low = low.min(start);
                high = high.max(end);
            }
        }
        self.spans.insert(low, (high, ()));
    }

    pub(super) fn is_full(&self) -> bool {
        self.spans
            .get(&Pos::Start)
            .is_some_and(|(end, ())| *end == Pos::End)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// Every position of keys 0..=16: ops use even keys only, so odd keys stand for the keys a
    /// span covers without naming them.
    fn universe() -> Vec<Pos<u8>> {
        let mut all = vec![Pos::Start, Pos::End];
        for key in 0..=16 {
            for side in [Side::Below, Side::At, Side::Above] {
                all.push(Pos::Key(key, side));
            }
        }
        all.sort();
        all
    }

    /// A span as the subscriber paints them: it starts at `Start`, a key or just above one, and
    /// ends just below a key, at a key or at `End`.
    fn span() -> impl Strategy<Value = (Pos<u8>, Pos<u8>)> {
        let low = prop_oneof![
            Just(Pos::Start),
            (0..=8u8).prop_map(|k| Pos::Key(k * 2, Side::At)),
            (0..=8u8).prop_map(|k| Pos::Key(k * 2, Side::Above)),
        ];
        let high = prop_oneof![
            Just(Pos::End),
            (0..=8u8).prop_map(|k| Pos::Key(k * 2, Side::Below)),
            (0..=8u8).prop_map(|k| Pos::Key(k * 2, Side::At)),
        ];
        (low, high).prop_filter("low <= high", |(low, high)| low <= high)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// `paint` and `at` agree with a map of every position to its last painted value.
        #[test]
        fn paint_matches_a_naive_model(ops in prop::collection::vec((span(), 0..100u64), 1..30)) {
            let mut spans = SpanMap::new();
            let mut model: BTreeMap<Pos<u8>, u64> = BTreeMap::new();
            for ((low, high), value) in ops {
                spans.paint(low.clone(), high.clone(), value);
                for point in universe() {
                    if low <= point && point <= high {
                        model.insert(point, value);
                    }
                }
                for point in universe() {
                    prop_assert_eq!(spans.at(&point), model.get(&point).copied(), "at {:?}", point);
                }
            }
        }

        /// `cover` makes the map full exactly when the union of the spans covers every position.
        #[test]
        fn cover_matches_a_naive_model(ops in prop::collection::vec(span(), 1..30)) {
            let mut spans = SpanMap::new();
            let mut covered = std::collections::BTreeSet::new();
            for (low, high) in ops {
                spans.cover(low.clone(), high.clone());
                for point in universe() {
                    if low <= point && point <= high {
                        covered.insert(point);
                    }
                }
                prop_assert_eq!(spans.is_full(), covered.len() == universe().len());
            }
        }
    }

    #[test]
    fn painting_one_key_inside_a_span_keeps_the_rest() {
        let mut spans = SpanMap::new();
        spans.paint(Pos::Key(2, Side::Above), Pos::End, 5);
        spans.paint(Pos::Key(6, Side::At), Pos::Key(6, Side::At), 7);
        assert_eq!(spans.at(&Pos::Key(6, Side::At)), Some(7));
        assert_eq!(
            spans.at(&Pos::Key(9, Side::At)),
            Some(5),
            "the span after the key"
        );
        assert_eq!(
            spans.at(&Pos::Key(4, Side::At)),
            Some(5),
            "the span before it"
        );
        assert_eq!(spans.at(&Pos::Key(2, Side::At)), None);
    }
}
