//! The agent's resumable tunnels (PROTOCOL.md §2e): the tunnels it holds, so that a
//! `resume` on any later link finds its tunnel, and the tombstones of those that ended
//! cleanly, so that a resume for one whose last ack was lost still completes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::link::{Answer, LinkShare, Resuming};
use crate::link::LinkRecv;
use crate::resume::Offsets;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps hold plain values; a panic elsewhere cannot leave one half-written.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A `resume` for a tunnel the agent holds: the new stream, where the relay stands, and
/// the link it came on.
pub struct Rebind {
    /// Where to answer `resumed`.
    pub answer: Answer,
    /// The new stream's receiving half.
    pub recv: LinkRecv,
    /// The relay's `written` and whether it has passed the service's FIN on.
    pub relay: (u64, bool),
    /// The credit limit in force (PROTOCOL.md §2d).
    pub credit: Option<u64>,
    /// The link the resume came on.
    pub link: Arc<LinkShare>,
}

/// Every resumable tunnel the agent holds, on any link, and the tombstones of those that
/// ended cleanly within the resume window.
pub struct Held {
    live: Mutex<HashMap<String, mpsc::Sender<Rebind>>>,
    tombstones: Mutex<HashMap<String, (Instant, Offsets)>>,
    /// Whether tunnels are resumable, and the relay's acks of every held tunnel, raised by
    /// whichever link's control stream they arrive on.
    pub links: Resuming,
    /// How long a tunnel waits for a resume (`tunnel_resume_secs`); zero: tunnels are not
    /// resumable.
    pub wait: Duration,
}

impl Held {
    /// Nothing held; tunnels wait `wait` for a resume.
    pub fn new(wait: Duration) -> Held {
        Held {
            live: Mutex::default(),
            tombstones: Mutex::default(),
            links: Resuming {
                enabled: !wait.is_zero(),
                acks: Arc::default(),
            },
            wait,
        }
    }

    /// Whether the agent announces `resume`.
    pub fn enabled(&self) -> bool {
        !self.wait.is_zero()
    }

    /// Holds tunnel `id` until the returned entry is dropped; resumes for it arrive on
    /// the receiver.
    pub fn hold(self: &Arc<Self>, id: &str) -> (HeldEntry, mpsc::Receiver<Rebind>) {
        let (tx, rx) = mpsc::channel(1);
        lock(&self.live).insert(id.to_owned(), tx.clone());
        let entry = HeldEntry {
            held: self.clone(),
            id: id.to_owned(),
            tx,
        };
        (entry, rx)
    }

    /// Where to send a resume for `id`, if the agent holds it.
    pub fn find(&self, id: &str) -> Option<mpsc::Sender<Rebind>> {
        lock(&self.live).get(id).cloned()
    }

    /// Remembers the final offsets of tunnel `id`, which ended cleanly, for the resume
    /// window.
    pub fn bury(&self, id: &str, offsets: (u64, bool)) {
        let now = Instant::now();
        let mut tombstones = lock(&self.tombstones);
        tombstones.retain(|_, (until, _)| *until > now);
        tombstones.insert(id.to_owned(), (now + self.wait, offsets));
    }

    /// The final offsets of tunnel `id`, if it ended cleanly within the resume window.
    pub fn tombstone(&self, id: &str) -> Option<(u64, bool)> {
        let tombstones = lock(&self.tombstones);
        tombstones
            .get(id)
            .filter(|(until, _)| *until > Instant::now())
            .map(|(_, offsets)| *offsets)
    }

    /// Resumable tunnels held now, running or waiting.
    pub fn count(&self) -> usize {
        lock(&self.live).len()
    }
}

/// One tunnel's place in [`Held`].
pub struct HeldEntry {
    held: Arc<Held>,
    id: String,
    tx: mpsc::Sender<Rebind>,
}

impl Drop for HeldEntry {
    fn drop(&mut self) {
        let mut live = lock(&self.held.live);
        if live
            .get(&self.id)
            .is_some_and(|tx| tx.same_channel(&self.tx))
        {
            live.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_tunnel_is_found_until_it_ends_and_then_only_its_tombstone() {
        let held = Arc::new(Held::new(Duration::from_secs(60)));
        let (entry, _rx) = held.hold("t");
        assert!(held.find("t").is_some());
        assert!(held.find("other").is_none());
        assert_eq!(held.count(), 1, "a held tunnel keeps the agent dialing");
        drop(entry);
        assert!(held.find("t").is_none());
        assert_eq!(held.count(), 0);
        assert_eq!(held.tombstone("t"), None);
        held.bury("t", (10, true));
        assert_eq!(held.tombstone("t"), Some((10, true)));
    }

    #[test]
    fn a_tombstone_lasts_the_resume_window() {
        let held = Arc::new(Held::new(Duration::ZERO));
        held.bury("t", (1, true));
        assert_eq!(held.tombstone("t"), None);
    }
}
