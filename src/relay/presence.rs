//! Presence: where each device's session is. This module is its one owner. It keeps the
//! sessions this relay holds, writes and clears the store's presence rows for them, caches
//! where devices on other relays are, and watches the cluster's changes (PROTOCOL.md §2) to
//! supersede a session whose device connected again, here or elsewhere. The store only
//! keeps the rows ([`crate::store::Presence`]); nothing else reads or writes them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::authcache::TtlCache;
use super::metrics::Metrics;
use crate::link::device::DeviceLink;
use crate::proto::messages::{codes, RelayControl};
use crate::store::{PresenceState, Store, StoreError};

/// One device's live session on this relay (on either transport).
pub struct DeviceSession {
    /// Device uuid.
    pub uuid: String,
    /// This session's id (also in the store's presence row); a newer session replaces an
    /// older one.
    pub session: String,
    /// The device link, on which tunnel streams are opened.
    pub link: DeviceLink,
    /// Messages for the agent's control stream (`drain`, `replaced`).
    pub control: mpsc::Sender<RelayControl>,
    /// The account its sshd logs users in as, from the hello; `None`: each user's own
    /// cloud username.
    pub ssh_login: Option<String>,
    /// What the agent announced it can do (PROTOCOL.md §2, "Features"); empty for an
    /// older agent. Requests that need a feature go only to sessions that have it.
    pub features: Vec<String>,
    /// New credit limits for the agent (PROTOCOL.md §2d), sent on the control stream by
    /// the session's loop; used only when the agent announced `credit`.
    pub credit: Arc<crate::credit::Outbox>,
    /// Tunnels open on this session; a superseded session closes when it reaches zero.
    pub tunnels: std::sync::atomic::AtomicUsize,
    /// Of those, the ones that cannot move to another session (not resumable).
    pub fixed: std::sync::atomic::AtomicUsize,
    /// Woken whenever a tunnel of this session ends.
    pub tunnel_ended: tokio::sync::Notify,
    /// Whether both ends announced `resume`: its tunnels outlive it (PROTOCOL.md §2e).
    pub resume: bool,
    /// This relay's acks of its resumable tunnels, sent on the control stream by the
    /// session's loop.
    pub acks: Arc<crate::resume::Acks>,
    /// Fires when the session has ended (its resumable tunnels then wait for the next).
    pub lost: CancellationToken,
    /// Fires when a newer session of the device took this one's place (a drain moved the
    /// device, or it came back elsewhere first): tunnels that entered at another relay
    /// move on (PROTOCOL.md §2e, "Through another relay").
    pub superseded: CancellationToken,
    /// The longest the agent stays silent on the link, from its hello; a link silent
    /// longer (plus [`SILENCE_GRACE`]) has its device reported `reconnecting`.
    pub keep_alive: Option<std::time::Duration>,
    /// Whether this session's device is reported `reconnecting` (by this relay's gauge).
    pub reconnecting: std::sync::atomic::AtomicBool,
    /// When the session was registered.
    pub since: std::time::Instant,
}

/// How much longer than the agent's keep-alive a link may be silent before its device is
/// reported `reconnecting` (PROTOCOL.md §2e, "Presence").
pub const SILENCE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// At most this many presence rows are read per statement of a reconciliation, and at
/// most this many devices are looked up one by one per round (PROTOCOL.md §3).
const RECONCILE_PAGE: i64 = 500;
const RECONCILE_LOOKUPS: usize = 100;

/// A session younger than this is left out of a reconciliation: its own row may still be
/// on its way to the store.
const RECONCILE_SETTLE: std::time::Duration = std::time::Duration::from_secs(10);

impl DeviceSession {
    /// Counts a tunnel on this session until the returned guard is dropped; one that is
    /// not `resumable` also among those that hold the session open when it is replaced.
    pub fn tunnel(self: &Arc<Self>, resumable: bool) -> SessionTunnel {
        self.tunnels
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if !resumable {
            self.fixed.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        SessionTunnel(self.clone(), !resumable)
    }

    /// Whether the agent obeys tunnel credit (PROTOCOL.md §2d).
    pub fn takes_credit(&self) -> bool {
        crate::proto::messages::features::has(
            &self.features,
            crate::proto::messages::features::CREDIT,
        )
    }

    /// How long the link may be silent before its device is reported `reconnecting`; `None`
    /// when the agent did not say (its relay's idle timeout alone decides).
    pub fn silent_after(&self) -> Option<std::time::Duration> {
        self.keep_alive.map(|k| k + SILENCE_GRACE)
    }

    /// Waits until no tunnel is open on this session.
    pub async fn tunnels_done(&self) {
        loop {
            let ended = self.tunnel_ended.notified();
            if self.tunnels.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            ended.await;
        }
    }
}

/// One open tunnel's place on its device session (and whether it is a fixed one).
pub struct SessionTunnel(Arc<DeviceSession>, bool);

impl SessionTunnel {
    /// The session.
    pub fn session(&self) -> &Arc<DeviceSession> {
        &self.0
    }
}

impl Drop for SessionTunnel {
    fn drop(&mut self) {
        if self.1 {
            self.0
                .fixed
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
        self.0
            .tunnels
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.tunnel_ended.notify_waiters();
    }
}

/// Where a device is, as far as this relay can tell.
pub enum Where {
    /// On this relay.
    Here(Arc<DeviceSession>),
    /// On another live relay of the cluster (cached for the auth cache's lifetime).
    Elsewhere(crate::store::Presence),
    /// Nowhere this relay can reach.
    Offline,
}

/// Where a device came back to, for a tunnel waiting for it.
pub enum Next {
    /// A session on this relay.
    Here(Arc<DeviceSession>),
    /// A session on another live relay of the cluster.
    Elsewhere(crate::store::Presence),
}

/// How often a tunnel waiting for its device looks for it in the store, besides on every
/// presence change (PROTOCOL.md §2e: at most once a second).
pub const LOOK_AGAIN: std::time::Duration = std::time::Duration::from_secs(1);

/// The device sessions on this relay and what it knows of the others'.
pub struct Presence {
    store: Arc<dyn Store>,
    /// This relay's id, as its presence rows name it.
    relay_id: String,
    /// Whether other relays may hold devices (cluster mode); a single relay never asks the
    /// store where a device is.
    cluster: bool,
    /// The sessions this relay holds, by device.
    here: Mutex<HashMap<String, Arc<DeviceSession>>>,
    /// Woken whenever a session is claimed here or a presence change arrives (resumable
    /// tunnels wait for their device).
    claimed: tokio::sync::Notify,
    /// Sessions that ended while tunnels waited for their device: their rows stay, as
    /// `reconnecting`, until the tunnels resumed or gave up (device → session id).
    held: Mutex<HashMap<String, String>>,
    /// Where recently forwarded devices are: a CONNECT through a peer hop then costs no
    /// store round trip. Dropped on any presence change of the device and when the owner
    /// cannot be reached.
    elsewhere: TtlCache<String, crate::store::Presence>,
    /// The store's latest answers for devices that tunnels wait for, found or not.
    looked: TtlCache<String, Option<crate::store::Presence>>,
    connected: IntGaugeVec,
    conflicts: IntCounter,
    write_failures: IntCounterVec,
    reconnecting: prometheus::IntGauge,
    repairs: IntCounterVec,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the map half-updated in a way that
    // matters more than refusing service, so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Presence {
    /// Presence for the relay `relay_id`; other relays' answers are cached for `ttl`.
    pub fn new(
        store: Arc<dyn Store>,
        relay_id: String,
        cluster: bool,
        ttl: std::time::Duration,
        metrics: &Metrics,
    ) -> Presence {
        Presence {
            store,
            relay_id,
            cluster,
            here: Mutex::new(HashMap::new()),
            claimed: tokio::sync::Notify::new(),
            held: Mutex::new(HashMap::new()),
            elsewhere: TtlCache::new(ttl),
            looked: TtlCache::new(LOOK_AGAIN),
            connected: metrics.devices_connected.clone(),
            conflicts: metrics.presence_conflicts.clone(),
            write_failures: metrics.store_write_failures.clone(),
            reconnecting: metrics.devices_reconnecting.clone(),
            repairs: {
                for action in ["superseded", "rewritten", "removed"] {
                    metrics.presence_repairs.with_label_values(&[action]);
                }
                metrics.presence_repairs.clone()
            },
        }
    }

    fn connected(&self, session: &DeviceSession) -> prometheus::IntGauge {
        self.connected
            .with_label_values(&[session.link.transport().as_str()])
    }

    /// Makes `session` its device's session: here at once (before the agent hears that it
    /// is connected, so that "connected" means reachable), then in the store, which tells
    /// every relay. An older session of the device on this relay is superseded. A store
    /// that cannot take the row is logged and counted: the device is reachable here anyway.
    pub async fn claim(&self, session: Arc<DeviceSession>) {
        self.connected(&session).inc();
        let old = lock(&self.here).insert(session.uuid.clone(), session.clone());
        if let Some(old) = old {
            self.connected(&old).dec();
            let fixed = old.fixed.load(std::sync::atomic::Ordering::Acquire);
            if old.resume && session.resume && fixed == 0 {
                // Its tunnels move to the new session (PROTOCOL.md §2e): the old link is
                // closed at once, and they resume as for any lost link. The agent dialed
                // again because it has given that link up.
                self.conflicts.inc();
                tracing::info!(device = %old.uuid, session = %old.session, "session replaced; its tunnels move to the new one");
                // Not `lost` by hand: a tunnel that hears of the loss before the link is
                // really gone resets its stream (RST_STREAM still crosses a TLS/TCP link
                // that is winding down), which the agent would take for the tunnel's end.
                // The streams fail with the link, and the session's end cancels `lost`.
                old.link
                    .close(codes::REPLACED, "replaced by a newer session");
            } else {
                self.supersede(&old);
            }
        }
        self.claimed.notify_waiters();
        if let Err(e) = self.write_row(&session).await {
            tracing::warn!(device = %session.uuid, error = %e, "cannot record presence; the device is reachable here anyway");
            self.write_failures.with_label_values(&["presence"]).inc();
        }
    }

    /// Writes `session`'s presence row (`online`), replacing the device's older one.
    async fn write_row(&self, session: &DeviceSession) -> Result<(), StoreError> {
        self.store
            .set_presence(
                &session.uuid,
                &self.relay_id,
                &session.session,
                session.link.transport().as_str(),
                session.ssh_login.as_deref(),
            )
            .await
    }

    /// Ends `session`'s presence: here, and in the store unless `whole_relay` (at shutdown
    /// the relay removes all its rows in one statement; one write per device would only hold
    /// up the exit). A newer session of the device stays. While resumable tunnels of the
    /// session wait for the device, its row stays as `reconnecting`, and goes once they
    /// have all resumed or given up.
    pub async fn release(self: &Arc<Self>, session: &Arc<DeviceSession>, whole_relay: bool) {
        let removed = self.take_current(session);
        if removed {
            self.connected(session).dec();
        }
        if whole_relay {
            self.set_reconnecting(session, false);
            return;
        }
        let waiting = session.tunnels.load(std::sync::atomic::Ordering::Acquire) > 0;
        if removed && session.resume && waiting {
            lock(&self.held).insert(session.uuid.clone(), session.session.clone());
            self.mark(session, PresenceState::Reconnecting).await;
            let (presence, session) = (self.clone(), session.clone());
            tokio::spawn(async move {
                session.tunnels_done().await;
                {
                    let mut held = lock(&presence.held);
                    if held.get(&session.uuid) == Some(&session.session) {
                        held.remove(&session.uuid);
                    }
                }
                presence.set_reconnecting(&session, false);
                presence.clear(&session).await;
            });
            return;
        }
        self.set_reconnecting(session, false);
        self.clear(session).await;
    }

    /// Takes `session` out of the sessions here if it is still its device's; whether it
    /// was (a newer session of the device stays).
    fn take_current(&self, session: &DeviceSession) -> bool {
        let mut here = lock(&self.here);
        let current = here
            .get(&session.uuid)
            .is_some_and(|s| s.session == session.session);
        current && here.remove(&session.uuid).is_some()
    }

    /// Removes `session`'s row (if it still names it).
    async fn clear(&self, session: &DeviceSession) {
        if let Err(e) = self
            .store
            .clear_presence(&session.uuid, &session.session)
            .await
        {
            tracing::warn!(device = %session.uuid, error = %e, "cannot clear presence");
            self.write_failures.with_label_values(&["presence"]).inc();
        }
    }

    /// Counts `session`'s device as reconnecting here, or no longer.
    fn set_reconnecting(&self, session: &DeviceSession, on: bool) -> bool {
        let was = session
            .reconnecting
            .swap(on, std::sync::atomic::Ordering::AcqRel);
        match (was, on) {
            (false, true) => self.reconnecting.inc(),
            (true, false) => self.reconnecting.dec(),
            _ => return false,
        }
        true
    }

    /// Reports `session`'s device `online` or `reconnecting` (its link went silent or is
    /// gone while tunnels wait): in this relay's gauge, and in the store's row if that
    /// still names the session.
    pub async fn mark(&self, session: &DeviceSession, state: PresenceState) {
        if !self.set_reconnecting(session, state == PresenceState::Reconnecting) {
            return;
        }
        tracing::info!(device = %session.uuid, state = state.as_str(), "device presence");
        if let Err(e) = self
            .store
            .set_presence_state(&session.uuid, &session.session, state)
            .await
        {
            tracing::warn!(device = %session.uuid, error = %e, "cannot record presence state");
            self.write_failures.with_label_values(&["presence"]).inc();
        }
    }

    /// Takes a device's session out of service whatever it is (the device was deleted)
    /// and closes its link with `code`.
    pub fn evict(&self, uuid: &str, code: u32, reason: &str) {
        let session = lock(&self.here).remove(uuid);
        if let Some(session) = session {
            self.connected(&session).dec();
            session.link.close(code, reason);
        }
    }

    /// The device's session on this relay.
    pub fn here(&self, uuid: &str) -> Option<Arc<DeviceSession>> {
        lock(&self.here).get(uuid).cloned()
    }

    /// Waits until the device has a session other than `not` (one that is gone): here, or
    /// on another live relay of the cluster (PROTOCOL.md §2e, "Through another relay").
    /// Looks again on every presence change, and at least every [`LOOK_AGAIN`] (a change
    /// whose notice was lost). A store that cannot answer is asked again the same way.
    pub async fn next_session(&self, uuid: &str, not: &str) -> Next {
        loop {
            let changed = self.claimed.notified();
            if let Some(session) = self
                .here(uuid)
                .filter(|s| s.session != not && !s.lost.is_cancelled())
            {
                return Next::Here(session);
            }
            if self.cluster {
                if let Some(p) = self.looked_up(uuid).await {
                    if p.relay_id != self.relay_id && p.session != not {
                        return Next::Elsewhere(p);
                    }
                }
            }
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep(LOOK_AGAIN), if self.cluster => {}
            }
        }
    }

    /// The device's presence row, asked of the store at most once per [`LOOK_AGAIN`] for
    /// all the tunnels that wait for the device (a relay's death can leave hundreds).
    async fn looked_up(&self, uuid: &str) -> Option<crate::store::Presence> {
        let key = uuid.to_owned();
        if let Some(answer) = self.looked.get(&key) {
            return answer;
        }
        match self.store.presence(uuid).await {
            Ok(answer) => {
                self.looked.put(key, answer.clone());
                answer
            }
            Err(e) => {
                tracing::debug!(device = %uuid, error = %e, "cannot look up where a device is");
                None
            }
        }
    }

    /// How many devices are connected here.
    pub fn count(&self) -> usize {
        lock(&self.here).len()
    }

    /// Every session here (for drain).
    pub fn sessions(&self) -> Vec<Arc<DeviceSession>> {
        lock(&self.here).values().cloned().collect()
    }

    /// Where `uuid` is: here, on another relay (from the cache, else the store), or
    /// nowhere. A row that names this relay without a session here is stale: offline.
    pub async fn locate(&self, uuid: &str) -> Result<Where, StoreError> {
        if let Some(session) = self.here(uuid) {
            return Ok(Where::Here(session));
        }
        if !self.cluster {
            return Ok(Where::Offline);
        }
        if let Some(p) = self.elsewhere.get(&uuid.to_owned()) {
            return Ok(Where::Elsewhere(p));
        }
        match self.store.presence(uuid).await? {
            Some(p) if p.relay_id != self.relay_id => {
                self.elsewhere.put(uuid.to_owned(), p.clone());
                Ok(Where::Elsewhere(p))
            }
            _ => Ok(Where::Offline),
        }
    }

    /// Drops what is cached about `uuid` on another relay (that relay could not be reached
    /// or no longer holds it): the next tunnel asks the store.
    pub fn forget(&self, uuid: &str) {
        self.elsewhere.remove(&uuid.to_owned());
        self.looked.remove(&uuid.to_owned());
    }

    /// Follows presence changes from every relay through the store (Postgres
    /// `LISTEN/NOTIFY`) until `stop`: drops the cached answer for the device, and
    /// supersedes a session here whose device has connected in another session since.
    pub async fn watch(&self, stop: CancellationToken) {
        let mut changes = self.store.presence_changes();
        loop {
            let change = tokio::select! {
                change = changes.recv() => change,
                _ = stop.cancelled() => return,
            };
            match change {
                Ok(change) => {
                    self.forget(&change.device_uuid);
                    self.claimed.notify_waiters();
                    let old = {
                        let mut here = lock(&self.here);
                        let moved = here
                            .get(&change.device_uuid)
                            .is_some_and(|s| s.session != change.session);
                        if moved {
                            here.remove(&change.device_uuid)
                        } else {
                            None
                        }
                    };
                    if let Some(old) = old {
                        self.connected(&old).dec();
                        self.supersede(&old);
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "presence changes came faster than handled");
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    /// Repairs, every `every` until `stop`, what presence changes missed (PROTOCOL.md §3,
    /// "Reconciliation"): a NOTIFY sent while this relay's LISTEN connection was down is
    /// lost, and with it the news that a device it holds connected elsewhere since.
    pub async fn reconcile_every(&self, every: std::time::Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return,
            }
            if let Err(e) = self.reconcile().await {
                tracing::warn!(error = %e, "presence reconciliation failed; trying again next round");
            }
        }
    }

    /// One round of reconciliation, bounded: this relay's own rows, read in pages of
    /// [`RECONCILE_PAGE`], against the sessions it holds. A row for a session it no
    /// longer holds is removed; a session whose row is missing is looked up (at most
    /// [`RECONCILE_LOOKUPS`] a round, the rest next round): superseded when its device has
    /// a newer session elsewhere, its row written again when there is none.
    pub async fn reconcile(&self) -> Result<(), StoreError> {
        let mut rows: HashMap<String, String> = HashMap::new();
        let mut after = String::new();
        loop {
            let page = self
                .store
                .relay_presence(&self.relay_id, &after, RECONCILE_PAGE)
                .await?;
            let full = page.len() as i64 == RECONCILE_PAGE;
            if let Some((last, _)) = page.last() {
                after = last.clone();
            }
            rows.extend(page);
            if !full {
                break;
            }
        }
        for (uuid, session) in &rows {
            let here = self.here(uuid).is_some_and(|s| &s.session == session);
            let held = lock(&self.held).get(uuid) == Some(session);
            if !here && !held {
                self.store.clear_presence(uuid, session).await?;
                self.repairs.with_label_values(&["removed"]).inc();
                tracing::info!(device = %uuid, %session, "reconciliation: removed a presence row of a session that is gone");
            }
        }
        let missing = self.sessions().into_iter().filter(|s| {
            rows.get(&s.uuid) != Some(&s.session)
                && s.since.elapsed() >= RECONCILE_SETTLE
                && !s.lost.is_cancelled()
        });
        for session in missing.take(RECONCILE_LOOKUPS) {
            match self.store.presence(&session.uuid).await? {
                Some(p) if p.session != session.session => {
                    if self.take_current(&session) {
                        self.connected(&session).dec();
                        self.repairs.with_label_values(&["superseded"]).inc();
                        tracing::info!(device = %session.uuid, relay = %p.relay_id, "reconciliation: the device has a newer session; superseding this one");
                        self.supersede(&session);
                    }
                }
                Some(_) => {}
                None => {
                    self.write_row(&session).await?;
                    if session
                        .reconnecting
                        .load(std::sync::atomic::Ordering::Acquire)
                    {
                        self.store
                            .set_presence_state(
                                &session.uuid,
                                &session.session,
                                PresenceState::Reconnecting,
                            )
                            .await?;
                    }
                    self.repairs.with_label_values(&["rewritten"]).inc();
                    tracing::info!(device = %session.uuid, "reconciliation: wrote a lost presence row again");
                }
            }
        }
        Ok(())
    }

    /// Takes `old` out of service because a newer session of its device exists: it already
    /// gets no new tunnels; it hears `replaced` and closes once its open tunnels have ended
    /// (or the grace period passed).
    fn supersede(&self, old: &DeviceSession) {
        old.superseded.cancel();
        self.conflicts.inc();
        tracing::info!(device = %old.uuid, session = %old.session, "session superseded by a newer one");
        if old.control.try_send(RelayControl::Replaced).is_err() {
            // Its loop is gone or stuck: nothing left to wait for.
            old.link
                .close(codes::REPLACED, "replaced by a newer session");
        }
    }
}
