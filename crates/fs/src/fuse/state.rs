//! The two things other threads wait for on a served layer: the INIT that sets the session,
//! and the end of the reads in flight. Both are a mutex-guarded value with a condvar, so a
//! waiter sleeps until told (with a deadline), instead of polling in a sleep loop.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::kernel::Session;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values are plain data, consistent even if a holder panicked.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits on `cv` until `done` holds or `timeout` passes; whether it holds.
fn wait_until<T>(m: &Mutex<T>, cv: &Condvar, timeout: Duration, done: impl Fn(&T) -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut g = lock(m);
    while !done(&g) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        g = cv
            .wait_timeout(g, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    true
}

/// The negotiated protocol state of a connection (minor 0 until INIT).
#[derive(Debug, Default)]
pub(crate) struct SessionState {
    session: Mutex<Session>,
    changed: Condvar,
}

impl SessionState {
    pub(crate) fn new(s: Session) -> SessionState {
        SessionState {
            session: Mutex::new(s),
            changed: Condvar::new(),
        }
    }

    pub(crate) fn get(&self) -> Session {
        *lock(&self.session)
    }

    pub(crate) fn set(&self, s: Session) {
        *lock(&self.session) = s;
        self.changed.notify_all();
    }

    /// Waits at most `timeout` for INIT; whether it came.
    pub(crate) fn wait_init(&self, timeout: Duration) -> bool {
        wait_until(&self.session, &self.changed, timeout, |s| s.minor != 0)
    }
}

/// Reads handed to tasks and not answered yet.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
}

impl InFlight {
    /// Counts one read until the returned guard drops (however its task ends).
    pub(crate) fn enter(self: &Arc<Self>) -> InFlightGuard {
        *lock(&self.count) += 1;
        InFlightGuard(self.clone())
    }

    /// Reads in flight now.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn count(&self) -> usize {
        *lock(&self.count)
    }

    /// Waits at most `timeout` for no read to be in flight; whether that happened.
    pub(crate) fn wait_idle(&self, timeout: Duration) -> bool {
        wait_until(&self.count, &self.idle, timeout, |&n| n == 0)
    }
}

/// One read in flight.
pub(crate) struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut n = lock(&self.0.count);
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.0.idle.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_end_when_told_or_at_the_deadline() {
        let s = Arc::new(SessionState::default());
        assert!(
            !s.wait_init(Duration::from_millis(20)),
            "no INIT: times out"
        );
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            s2.set(Session {
                minor: 40,
                resend: true,
            })
        });
        assert!(s.wait_init(Duration::from_secs(5)));
        t.join().unwrap();

        let f = Arc::new(InFlight::default());
        assert!(f.wait_idle(Duration::ZERO));
        let g = f.enter();
        assert_eq!(f.count(), 1);
        let started = Instant::now();
        assert!(!f.wait_idle(Duration::from_millis(20)));
        assert!(started.elapsed() >= Duration::from_millis(20));
        let t = std::thread::spawn(move || drop(g));
        assert!(f.wait_idle(Duration::from_secs(5)));
        t.join().unwrap();
        assert_eq!(f.count(), 0);
    }
}
