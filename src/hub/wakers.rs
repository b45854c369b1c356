//! Wake-up lists: which stream tasks to wake when a channel changes or draining begins.
//!
//! A publish must wake every stream on the channel, and a stream must never miss a change that
//! happened after it last looked. tokio's `watch` channels give that, but each receiver keeps a
//! boxed future that is rebuilt after every change; profiles of a 10,000-client fan-out put
//! that bookkeeping at about a tenth of the server's CPU. A [`WakerSet`] is the minimum instead:
//! a slab of task wakers, emptied by every notification, with a generation number that tells a
//! stream whether its entry is still there.
//!
//! The protocol that keeps wake-ups from being lost: a stream registers *before* it looks for
//! news (reads the rings, checks the drain flag), and a notifier publishes the news *before* it
//! calls [`WakerSet::wake_all`]. Either the stream's look sees the news, or its registration was
//! in the set that the notifier emptied.

use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Waker;

use parking_lot::Mutex;
use slab::Slab;

/// The tasks to wake at the next notification.
#[derive(Debug, Default)]
pub(crate) struct WakerSet {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    wakers: Slab<Waker>,
    /// Counts notifications; a registration from an earlier generation has been woken already.
    generation: u64,
}

/// One stream's entry in one [`WakerSet`].
#[derive(Debug, Default)]
pub(crate) struct Registration {
    /// `(generation, slab key)` of the entry, if it may still be there.
    slot: Option<(u64, usize)>,
}

impl WakerSet {
    /// Makes sure `waker` is woken at the next notification. Cheap when already registered.
    pub(crate) fn register(&self, registration: &mut Registration, waker: &Waker) {
        let mut inner = self.inner.lock();
        if let Some((generation, key)) = registration.slot {
            if generation == inner.generation {
                if let Some(registered) = inner.wakers.get_mut(key) {
                    if !registered.will_wake(waker) {
                        registered.clone_from(waker);
                    }
                    return;
                }
            }
        }
        let key = inner.wakers.insert(waker.clone());
        registration.slot = Some((inner.generation, key));
    }

    /// Removes a registration (a stream that ends), so the set does not grow with streams that
    /// came and went while nothing was published.
    pub(crate) fn deregister(&self, registration: &mut Registration) {
        if let Some((generation, key)) = registration.slot.take() {
            let mut inner = self.inner.lock();
            if generation == inner.generation {
                inner.wakers.try_remove(key);
            }
        }
    }

    /// Wakes every registered task and empties the set. Call after the change is visible.
    pub(crate) fn wake_all(&self) {
        let woken = {
            let mut inner = self.inner.lock();
            inner.generation += 1;
            let capacity = inner.wakers.len();
            std::mem::replace(&mut inner.wakers, Slab::with_capacity(capacity))
        };
        // Outside the lock: waking schedules tasks, which may register again right away.
        for (_, waker) in woken {
            waker.wake();
        }
    }

    /// Registered tasks (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().wakers.len()
    }
}

/// The gateway-wide "draining has begun" signal that every open stream watches.
#[derive(Debug, Default)]
pub struct Drain {
    started: AtomicBool,
    wakers: WakerSet,
}

impl Drain {
    /// Begins draining: every stream is woken and ends after its final `retry:`.
    pub fn start(&self) {
        self.started.store(true, Ordering::SeqCst);
        self.wakers.wake_all();
    }

    /// Whether draining has begun. The stream's task is registered first (only when it was not
    /// yet, or its waker changed: every stream checks on every poll, and this set is shared by
    /// all of them), so a start right after the check still wakes it.
    pub(crate) fn check(&self, watch: &mut DrainWatch, waker: &Waker) -> bool {
        if !watch.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            self.wakers.register(&mut watch.registration, waker);
            watch.waker = Some(waker.clone());
        }
        self.started.load(Ordering::SeqCst)
    }

    /// Forgets a stream that ends.
    pub(crate) fn deregister(&self, watch: &mut DrainWatch) {
        self.wakers.deregister(&mut watch.registration);
    }
}

/// One stream's watch on the [`Drain`].
#[derive(Debug, Default)]
pub(crate) struct DrainWatch {
    registration: Registration,
    /// The waker registered, to skip the shared lock while it stays the same.
    waker: Option<Waker>,
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::task::Wake;

    use super::*;

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting() -> (Arc<CountingWaker>, Waker) {
        let counter = Arc::new(CountingWaker::default());
        (counter.clone(), Waker::from(counter))
    }

    #[test]
    fn each_registration_is_woken_once_per_notification() {
        let set = WakerSet::default();
        let (count, waker) = counting();
        let mut registration = Registration::default();
        set.register(&mut registration, &waker);
        set.register(&mut registration, &waker); // still registered: no second entry
        assert_eq!(set.len(), 1);
        set.wake_all();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        set.wake_all(); // not registered again: not woken again
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        set.register(&mut registration, &waker);
        set.wake_all();
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn deregistered_streams_leave_the_set() {
        let set = WakerSet::default();
        let (count, waker) = counting();
        let mut registrations: Vec<Registration> =
            (0..3).map(|_| Registration::default()).collect();
        for registration in &mut registrations {
            set.register(registration, &waker);
        }
        set.deregister(&mut registrations[1]);
        assert_eq!(set.len(), 2);
        set.wake_all();
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        // A stale registration (already woken) deregisters without touching newer entries.
        let (_, other) = counting();
        let mut newer = Registration::default();
        set.register(&mut newer, &other);
        set.deregister(&mut registrations[0]);
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn drain_started_before_the_check_is_seen_and_after_it_wakes() {
        let drain = Drain::default();
        let (count, waker) = counting();
        let mut watch = DrainWatch::default();
        assert!(!drain.check(&mut watch, &waker));
        assert!(!drain.check(&mut watch, &waker)); // same waker: registered once
        assert_eq!(drain.wakers.len(), 1);
        drain.start();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        let mut late = DrainWatch::default();
        assert!(drain.check(&mut late, &waker));
    }
}
