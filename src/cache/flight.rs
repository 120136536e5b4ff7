//! Single-flight: concurrent misses on one key share one upstream call.

use crate::key::Fingerprint;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

type Cell<T> = Arc<OnceCell<T>>;

/// Calls in flight, by key digest.
pub(crate) struct Flights<T> {
    calls: Mutex<HashMap<Fingerprint, Cell<T>>>,
}

impl<T: Clone> Flights<T> {
    pub(crate) fn new() -> Self {
        Self { calls: Mutex::new(HashMap::new()) }
    }

    /// Runs `call` unless a call for `digest` is already in flight, in which case its answer is
    /// shared. If the caller running the call is cancelled, the next waiter runs its own `call`
    /// (tokio's `OnceCell` is cancel-safe), so nobody hangs.
    pub(crate) async fn run<F: Future<Output = T>>(&self, digest: Fingerprint, call: impl FnOnce() -> F) -> T {
        let cell = match self.lock().entry(digest) {
            std::collections::hash_map::Entry::Occupied(call) => {
                crate::observe::single_flight_join();
                call.get().clone()
            }
            std::collections::hash_map::Entry::Vacant(none) => none.insert(Cell::default()).clone(),
        };
        let _leave = Leave { flights: self, digest, cell: &cell };
        cell.get_or_init(call).await.clone()
    }

    /// Detaches the call in flight for `digest`, if any: its callers still get its answer, later
    /// callers start a new call.
    pub(crate) fn forget(&self, digest: &Fingerprint) {
        self.lock().remove(digest);
    }

    /// How many keys have a call in flight.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Fingerprint, Cell<T>>> {
        crate::lock::lock(&self.calls)
    }
}

/// Removes the flight when its last caller leaves, finished or cancelled, so the map never keeps
/// keys nobody waits for.
struct Leave<'a, T: Clone> {
    flights: &'a Flights<T>,
    digest: Fingerprint,
    cell: &'a Cell<T>,
}

impl<T: Clone> Drop for Leave<'_, T> {
    fn drop(&mut self) {
        let mut calls = self.flights.lock();
        let ours = calls.get(&self.digest).is_some_and(|c| Arc::ptr_eq(c, self.cell));
        // Two references left: the map's and this caller's.
        if ours && (self.cell.initialized() || Arc::strong_count(self.cell) <= 2) {
            calls.remove(&self.digest);
        }
    }
}
