use std::collections::{hash_map, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// `TransactionTracker` tracks the state of transactions to detect retransmissions.
pub struct TransactionTracker {
    retention_period: Duration,
    transactions: Mutex<HashMap<(u32, String), TransactionState>>,
    // GrapeVine addition: when expired transactions are next swept. Sweeping on every request
    // walked every transaction of the last minute per request (tens of µs at a few thousand
    // requests a minute); once a second bounds the table all the same.
    next_housekeeping: Mutex<SystemTime>,
}

/// GrapeVine addition: how often expired transactions are swept.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

impl TransactionTracker {
    pub fn new(retention_period: Duration) -> Self {
        Self {
            retention_period,
            transactions: Mutex::new(HashMap::new()),
            next_housekeeping: Mutex::new(SystemTime::UNIX_EPOCH),
        }
    }

    /// Checks if the transaction is a retransmission.
    /// If it's a new transaction, it is marked as `InProgress`.
    ///
    /// Returns `true` if the transaction is a retransmission, `false` otherwise.
    pub fn is_retransmission(&self, xid: u32, client_addr: &str) -> bool {
        let key = (xid, client_addr.to_string());
        let mut transactions = self.transactions.lock().expect("unable to unlock transactions mutex");
        // GrapeVine addition: swept at most once per HOUSEKEEPING_INTERVAL.
        let now = SystemTime::now();
        let mut next = self.next_housekeeping.lock().expect("unable to unlock housekeeping mutex");
        if now >= *next {
            housekeeping(&mut transactions, self.retention_period);
            *next = now + HOUSEKEEPING_INTERVAL;
        }
        drop(next);
        if let hash_map::Entry::Vacant(e) = transactions.entry(key) {
            e.insert(TransactionState::InProgress);
            false
        } else {
            true
        }
    }

    /// Marks the transaction as processed.
    pub fn mark_processed(&self, xid: u32, client_addr: &str) {
        let key = (xid, client_addr.to_string());
        let completion_time = SystemTime::now();
        let mut transactions = self.transactions.lock().expect("unable to unlock transactions mutex");
        if let Some(tx) = transactions.get_mut(&key) {
            *tx = TransactionState::Completed(completion_time);
        }
    }
}

fn housekeeping(transactions: &mut HashMap<(u32, String), TransactionState>, max_age: Duration) {
    let mut cutoff = SystemTime::now() - max_age;
    transactions.retain(|_, v| match v {
        TransactionState::InProgress => true,
        TransactionState::Completed(completion_time) => completion_time >= &mut cutoff,
    });
}

pub enum TransactionState {
    InProgress,
    Completed(SystemTime),
}
