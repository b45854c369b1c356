//! A queue of deadlines, soonest first: how the hub's clock-driven upkeep finds its work.
//!
//! Two things in the hub happen by the clock rather than by a message: history entries older
//! than `history.max_age_secs` are evicted, and a channel nobody has read for
//! `history.linger_secs` is freed. Checking every channel on every sweep would cost time in
//! proportion to all the channels held, holding the channel map's lock all along, even when
//! nothing is due; with per-user channels that is most of an otherwise idle gateway's work and a
//! pause for every publish. Instead each channel keeps at most one ticket per kind of upkeep in
//! a [`Deadlines`] queue, and a sweep touches only the channels whose ticket is due.
//!
//! Tickets may be early (the work they stand for was postponed or done meanwhile): whoever takes
//! a due ticket checks the channel's state and schedules a new ticket if work remains.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use tokio::time::Instant;

/// Targets with a due time, taken soonest first.
#[derive(Debug)]
pub(super) struct Deadlines<T> {
    heap: BinaryHeap<Reverse<Ticket<T>>>,
}

#[derive(Debug)]
struct Ticket<T> {
    due: Instant,
    target: T,
}

// Tickets are ordered by due time alone: targets need no order of their own.
impl<T> PartialEq for Ticket<T> {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due
    }
}

impl<T> Eq for Ticket<T> {}

impl<T> PartialOrd for Ticket<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Ticket<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.due.cmp(&other.due)
    }
}

impl<T> Default for Deadlines<T> {
    fn default() -> Self {
        Deadlines {
            heap: BinaryHeap::new(),
        }
    }
}

impl<T> Deadlines<T> {
    /// Adds a ticket for `target`, due at `due`.
    pub(super) fn schedule(&mut self, due: Instant, target: T) {
        self.heap.push(Reverse(Ticket { due, target }));
    }

    /// Removes and returns every target due at or before `now`, soonest first. Tickets
    /// scheduled by the caller while it handles them wait for the next call, so one call is
    /// bounded even when a ticket is rescheduled for a time that has already come.
    pub(super) fn take_due(&mut self, now: Instant) -> Vec<T> {
        let mut due = Vec::new();
        while self.heap.peek().is_some_and(|Reverse(t)| t.due <= now) {
            if let Some(Reverse(ticket)) = self.heap.pop() {
                due.push(ticket.target);
            }
        }
        due
    }

    /// Removes and returns the soonest ticket, due or not, as `(due, target)`.
    pub(super) fn pop_soonest(&mut self) -> Option<(Instant, T)> {
        self.heap
            .pop()
            .map(|Reverse(ticket)| (ticket.due, ticket.target))
    }

    /// Gives back the queue's spare room once it holds a small part of what it once held, so a
    /// burst of tickets does not keep its memory after the burst.
    pub(super) fn shrink_if_sparse(&mut self) {
        if super::is_sparse(self.heap.len(), self.heap.capacity()) {
            self.heap.shrink_to(2 * self.heap.len());
        }
    }

    /// Number of tickets held.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn takes_only_due_targets_soonest_first() {
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let mut deadlines = Deadlines::default();
        deadlines.schedule(at(5), "five");
        deadlines.schedule(at(1), "one");
        deadlines.schedule(at(3), "three");
        deadlines.schedule(at(3), "three again");
        assert!(deadlines.take_due(start).is_empty());
        assert_eq!(deadlines.take_due(at(1)), vec!["one"]);
        let mut at_three = deadlines.take_due(at(4));
        at_three.sort_unstable();
        assert_eq!(at_three, vec!["three", "three again"]);
        assert_eq!(deadlines.len(), 1);
        assert_eq!(deadlines.take_due(at(60)), vec!["five"]);
        assert_eq!(deadlines.len(), 0);
    }

    #[test]
    fn pop_soonest_takes_tickets_before_they_are_due() {
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let mut deadlines = Deadlines::default();
        deadlines.schedule(at(9), "nine");
        deadlines.schedule(at(2), "two");
        assert_eq!(deadlines.pop_soonest(), Some((at(2), "two")));
        assert_eq!(deadlines.pop_soonest(), Some((at(9), "nine")));
        assert_eq!(deadlines.pop_soonest(), None);
    }
}
