//! One conformance suite, run against both store backends.

use crate::common;

use std::sync::Arc;

use cloudlink::proto::api::Role;
use cloudlink::store::{self, Device, DeviceFilter, Store, StoreError, TunnelSession};
use common::pg::TempPg;

const D1: &str = "0123456789abcdef0123456789abcdef";
const D2: &str = "fedcba9876543210fedcba9876543210";

async fn conformance(s: Arc<dyn Store>) {
    s.ping().await.unwrap();

    // Users.
    assert_eq!(s.count_users().await.unwrap(), 0);
    let alice = s.create_user("alice", true).await.unwrap();
    let bob = s.create_user("bob", false).await.unwrap();
    assert!(alice.is_admin && !bob.is_admin);
    assert!(matches!(
        s.create_user("alice", false).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(s.count_users().await.unwrap(), 2);
    assert_eq!(s.user_by_id(bob.id).await.unwrap(), Some(bob.clone()));
    assert_eq!(s.user_by_name("bob").await.unwrap(), Some(bob.clone()));
    assert_eq!(s.user_by_name("carol").await.unwrap(), None);
    let names: Vec<_> = s
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.username)
        .collect();
    assert_eq!(names, ["alice", "bob"]);

    // API keys.
    let k1 = s
        .create_api_key(bob.id, "laptop", "hash1", "clk_1", None)
        .await
        .unwrap();
    assert!(matches!(
        s.create_api_key(alice.id, "dup", "hash1", "clk_1", None)
            .await,
        Err(StoreError::Conflict)
    ));
    let (found, owner) = s.api_key_by_hash("hash1").await.unwrap().unwrap();
    assert_eq!((found.id, owner.id), (k1.id, bob.id));
    assert_eq!(found.last_used_at, None);
    s.touch_api_key(k1.id, 1_000_000).await.unwrap();
    s.touch_api_key(k1.id, 1_000_001).await.unwrap(); // within a minute: not rewritten
    let listed = s.list_api_keys(bob.id).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].last_used_at, Some(1_000_000));
    assert!(
        !s.revoke_api_key(alice.id, k1.id).await.unwrap(),
        "not alice's key"
    );
    assert!(s.revoke_api_key(bob.id, k1.id).await.unwrap());
    assert!(
        !s.revoke_api_key(bob.id, k1.id).await.unwrap(),
        "already revoked"
    );
    assert_eq!(s.api_key_by_hash("hash1").await.unwrap(), None);
    assert!(s.list_api_keys(bob.id).await.unwrap()[0]
        .revoked_at
        .is_some());
    let revoked = s.api_key_by_id(k1.id).await.unwrap().unwrap();
    assert!(
        !revoked.is_active(store::now_ms()),
        "revoked keys are inactive"
    );
    assert_eq!(s.api_key_by_id(9_999_999).await.unwrap(), None);
    // Expiry is stored and read back; whether the key is active is the caller's check.
    let at = store::now_ms() + 5_000;
    let k2 = s
        .create_api_key(bob.id, "ci", "hash-exp", "clk_2", Some(at))
        .await
        .unwrap();
    assert_eq!(k2.expires_at, Some(at));
    let (found, _) = s.api_key_by_hash("hash-exp").await.unwrap().unwrap();
    assert!(found.is_active(at - 1) && !found.is_active(at));
    assert_eq!(
        s.api_key_by_id(k2.id).await.unwrap().unwrap().expires_at,
        Some(at)
    );

    // SSH keys.
    let sk = s
        .add_ssh_key(bob.id, "laptop", "ssh-ed25519 AAAA bob", "SHA256:x")
        .await
        .unwrap();
    assert!(matches!(
        s.add_ssh_key(bob.id, "again", "ssh-ed25519 AAAA bob", "SHA256:x")
            .await,
        Err(StoreError::Conflict)
    ));
    s.add_ssh_key(
        alice.id,
        "same key, other user",
        "ssh-ed25519 AAAA bob",
        "SHA256:x",
    )
    .await
    .unwrap();
    assert_eq!(s.list_ssh_keys(bob.id).await.unwrap(), vec![sk.clone()]);
    assert!(!s.delete_ssh_key(alice.id, sk.id).await.unwrap());
    assert!(s.delete_ssh_key(bob.id, sk.id).await.unwrap());
    assert!(s.list_ssh_keys(bob.id).await.unwrap().is_empty());

    // Fleets and members.
    let pis = s
        .create_fleet("pis", &[22222, 80], Some(bob.id))
        .await
        .unwrap();
    assert_eq!(pis.allowed_ports, vec![22222, 80]);
    let gw = s.create_fleet("gateways", &[], None).await.unwrap();
    assert!(matches!(
        s.create_fleet("pis", &[], None).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        s.member_role(pis.id, bob.id).await.unwrap(),
        Some(Role::Owner)
    );
    assert_eq!(s.member_role(gw.id, bob.id).await.unwrap(), None);
    assert_eq!(s.list_fleets(None).await.unwrap().len(), 2);
    let bobs: Vec<_> = s
        .list_fleets(Some(bob.id))
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(bobs, ["pis"]);
    s.set_fleet_ports(pis.id, &[]).await.unwrap();
    assert!(s
        .fleet_by_name("pis")
        .await
        .unwrap()
        .unwrap()
        .allowed_ports
        .is_empty());
    s.set_member(pis.id, alice.id, Role::Member).await.unwrap();
    s.set_member(pis.id, alice.id, Role::Owner).await.unwrap(); // role change, no conflict
    let members = s.list_members(pis.id).await.unwrap();
    assert_eq!(members.len(), 2);
    assert_eq!(
        (members[0].username.as_str(), members[0].role),
        ("alice", Role::Owner)
    );
    assert!(s.remove_member(pis.id, alice.id).await.unwrap());
    assert!(!s.remove_member(pis.id, alice.id).await.unwrap());

    // Devices.
    let d1 = s.create_device(D1, pis.id, "pi1", "dh1").await.unwrap();
    assert_eq!(
        (d1.fleet.as_str(), d1.online(), d1.last_seen),
        ("pis", false, None)
    );
    s.create_device(D2, gw.id, "gw1", "dh2").await.unwrap();
    assert!(matches!(
        s.create_device(D1, gw.id, "again", "dh3").await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(s.device(D1).await.unwrap().unwrap().name, "pi1");
    assert_eq!(s.device_by_key_hash("dh2").await.unwrap().unwrap().uuid, D2);
    assert_eq!(
        s.list_devices(None, &Default::default())
            .await
            .unwrap()
            .len(),
        2
    );
    let visible: Vec<_> = s
        .list_devices(Some(bob.id), &Default::default())
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.uuid)
        .collect();
    assert_eq!(visible, [D1]);
    // Short uuids and names narrow the listing, still within the member's fleets.
    let by = |prefix: Option<&str>, name: Option<&str>| DeviceFilter {
        uuid_prefix: prefix.map(str::to_owned),
        name: name.map(str::to_owned),
    };
    let uuids = |devices: Vec<Device>| devices.into_iter().map(|d| d.uuid).collect::<Vec<_>>();
    assert_eq!(
        uuids(
            s.list_devices(None, &by(Some(&D2[..7]), None))
                .await
                .unwrap()
        ),
        [D2]
    );
    assert_eq!(
        uuids(s.list_devices(None, &by(None, Some("gw1"))).await.unwrap()),
        [D2]
    );
    assert!(s
        .list_devices(Some(bob.id), &by(Some(&D2[..7]), None))
        .await
        .unwrap()
        .is_empty());
    assert!(s
        .list_devices(None, &by(Some(&D1[..7]), Some("gw1")))
        .await
        .unwrap()
        .is_empty());
    let access = s.device_access(bob.id, D1).await.unwrap().unwrap();
    assert_eq!(access.role, Some(Role::Owner));
    assert!(access.allowed_ports.is_empty());
    let access = s.device_access(bob.id, D2).await.unwrap().unwrap();
    assert_eq!(access.role, None);
    assert_eq!(s.device_access(bob.id, "nope").await.unwrap(), None);

    // Key rotation: the old key stays valid until its deadline or until forgotten.
    let now = store::now_ms();
    assert!(s
        .rotate_device_key(D1, "dh1-new", now + 60_000)
        .await
        .unwrap());
    assert!(!s.rotate_device_key("nope", "x", now).await.unwrap());
    let d = s
        .device_by_key_hash("dh1")
        .await
        .unwrap()
        .expect("old key in grace");
    assert_eq!(d.uuid, D1);
    use cloudlink::auth::{device_key_matches, KeyMatch};
    assert_eq!(device_key_matches(&d, "dh1", now), Some(KeyMatch::Previous));
    assert_eq!(
        device_key_matches(&d, "dh1-new", now),
        Some(KeyMatch::Current)
    );
    assert_eq!(
        device_key_matches(&d, "dh1", now + 60_001),
        None,
        "grace over"
    );
    assert_eq!(
        s.device_by_key_hash("dh1-new").await.unwrap().unwrap().uuid,
        D1
    );
    s.forget_previous_device_key(D1).await.unwrap();
    assert_eq!(s.device_by_key_hash("dh1").await.unwrap(), None);
    let d = s.device(D1).await.unwrap().unwrap();
    assert_eq!((d.prev_key_hash, d.prev_key_until), (None, None));
    assert!(s.rotate_device_key(D2, "dh2-new", now - 1).await.unwrap());
    assert_eq!(
        s.device_by_key_hash("dh2").await.unwrap(),
        None,
        "a grace period in the past accepts nothing"
    );

    // Relays and presence.
    s.register_relay("r1", "127.0.0.1:7000").await.unwrap();
    s.set_presence(D1, "r1", "sess-1", "quic", Some("root"))
        .await
        .unwrap();
    let p = s.presence(D1).await.unwrap().unwrap();
    assert_eq!(p.ssh_login.as_deref(), Some("root"));
    assert_eq!((p.relay_id.as_str(), p.session.as_str()), ("r1", "sess-1"));
    assert_eq!(p.peer_addr, "127.0.0.1:7000");
    let d1 = s.device(D1).await.unwrap().unwrap();
    assert!(d1.online() && d1.last_seen.is_some());
    assert_eq!(d1.relay.as_deref(), Some("r1"));
    assert_eq!(d1.transport.as_deref(), Some("quic"));
    let status = store::RelayStatus {
        draining: true,
        devices: 3,
        tunnels: 4,
    };
    s.heartbeat("r1", status).await.unwrap();
    let relays = s.list_relays().await.unwrap();
    assert_eq!(relays.len(), 1);
    let r1 = &relays[0];
    assert_eq!(
        (r1.id.as_str(), r1.draining, r1.devices, r1.tunnels),
        ("r1", true, 3, 4)
    );
    assert!(r1.alive(store::now_ms()));
    assert!(!r1.alive(store::now_ms() + store::RELAY_DEAD_AFTER_MS + 1));
    // A newer session replaces; clearing the older one then changes nothing.
    s.set_presence(D1, "r1", "sess-2", "quic", None)
        .await
        .unwrap();
    // Reconnecting (tunnels held, link gone): only for the session the row names, and a
    // newer session's row is online again.
    use store::PresenceState::{Online, Reconnecting};
    assert!(!s
        .set_presence_state(D1, "sess-1", Reconnecting)
        .await
        .unwrap());
    assert_eq!(s.device(D1).await.unwrap().unwrap().state(), "online");
    assert!(s
        .set_presence_state(D1, "sess-2", Reconnecting)
        .await
        .unwrap());
    let d1 = s.device(D1).await.unwrap().unwrap();
    assert_eq!((d1.state(), d1.online()), ("reconnecting", false));
    assert!(s.set_presence_state(D1, "sess-2", Online).await.unwrap());
    assert!(s.device(D1).await.unwrap().unwrap().online());
    s.set_presence_state(D1, "sess-2", Reconnecting)
        .await
        .unwrap();
    s.set_presence(D1, "r1", "sess-2", "quic", None)
        .await
        .unwrap();
    assert_eq!(s.device(D1).await.unwrap().unwrap().state(), "online");
    // A relay pages through its own rows.
    s.set_presence(D2, "r1", "sess-9", "tcp", None)
        .await
        .unwrap();
    let mine = s.relay_presence("r1", "", 1).await.unwrap();
    assert_eq!(mine, [(D1.to_owned(), "sess-2".to_owned())]);
    let rest = s.relay_presence("r1", D1, 10).await.unwrap();
    assert_eq!(rest, [(D2.to_owned(), "sess-9".to_owned())]);
    assert!(s.relay_presence("r2", "", 10).await.unwrap().is_empty());
    s.clear_presence(D2, "sess-9").await.unwrap();
    s.clear_presence(D1, "sess-1").await.unwrap();
    assert_eq!(s.presence(D1).await.unwrap().unwrap().session, "sess-2");
    s.clear_presence(D1, "sess-2").await.unwrap();
    assert_eq!(s.presence(D1).await.unwrap(), None);
    assert!(!s.device(D1).await.unwrap().unwrap().online());
    s.set_presence(D2, "r1", "sess-3", "quic", None)
        .await
        .unwrap();
    s.clear_relay_presence("r1").await.unwrap();
    assert_eq!(s.presence(D2).await.unwrap(), None);

    // Every presence change reaches subscribers (NOTIFY on Postgres), promptly.
    let mut changes = s.presence_changes();
    // The Postgres listener connects in the background: repeat until one arrives.
    let mut heard = None;
    for _ in 0..50 {
        s.set_presence(D2, "r1", "sess-4", "quic", None)
            .await
            .unwrap();
        if let Ok(Ok(change)) =
            tokio::time::timeout(std::time::Duration::from_millis(200), changes.recv()).await
        {
            heard = Some(change);
            break;
        }
    }
    assert_eq!(
        heard,
        Some(store::PresenceChange {
            device_uuid: D2.into(),
            relay_id: "r1".into(),
            session: "sess-4".into(),
        })
    );
    s.clear_relay_presence("r1").await.unwrap();

    // Dead relays are pruned with their presence; a clean stop removes a relay's rows.
    s.register_relay("r2", "127.0.0.1:7001").await.unwrap();
    s.set_presence(D2, "r2", "sess-5", "tcp", None)
        .await
        .unwrap();
    assert_eq!(
        s.device(D2).await.unwrap().unwrap().transport.as_deref(),
        Some("tcp")
    );
    assert_eq!(s.prune_relays(store::now_ms() - 60_000).await.unwrap(), 0);
    assert_eq!(s.prune_relays(store::now_ms() + 1).await.unwrap(), 2);
    assert_eq!(s.list_relays().await.unwrap(), vec![]);
    s.register_relay("r1", "127.0.0.1:7000").await.unwrap();
    s.set_presence(D2, "r1", "sess-6", "quic", None)
        .await
        .unwrap();
    s.remove_relay("r1").await.unwrap();
    assert_eq!(s.list_relays().await.unwrap(), vec![]);
    assert_eq!(s.presence(D2).await.unwrap(), None);
    s.register_relay("r1", "127.0.0.1:7000").await.unwrap();

    // Shared secrets: the first value stored wins.
    assert_eq!(s.shared_secret("k", "first").await.unwrap(), "first");
    assert_eq!(s.shared_secret("k", "second").await.unwrap(), "first");
    let lock = s.startup_lock().await.unwrap();
    lock.release().await;

    // Tunnel audit.
    let t = TunnelSession {
        port: 22222,
        ..common::tunnel_row("t1", bob.id, "bob", D1, store::now_ms())
    };
    s.open_tunnel(&t).await.unwrap();
    s.open_tunnel(&TunnelSession {
        id: "t2".into(),
        user_id: alice.id,
        username: "alice".into(),
        opened_at: t.opened_at + 1,
        device_relay: Some("r9".into()),
        device_uuid: D2.into(),
        kind: "terminal".into(),
        ..t.clone()
    })
    .await
    .unwrap();
    let close = store::TunnelClose {
        bytes_up: 10,
        bytes_down: 20,
        reason: "closed".into(),
        resumes: 2,
        replayed_bytes: 4096,
        waited_ms: 1500,
        resume_failure: Some("expired".into()),
    };
    s.close_tunnel("t1", &close).await.unwrap();
    let all = s.list_tunnels(None, None, 10).await.unwrap();
    assert_eq!(
        all.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        ["t2", "t1"]
    );
    assert_eq!(all[0].device_relay.as_deref(), Some("r9"));
    let bobs = s.list_tunnels(Some(bob.id), None, 10).await.unwrap();
    assert_eq!(bobs.len(), 1);
    assert_eq!(
        (
            bobs[0].bytes_up,
            bobs[0].bytes_down,
            bobs[0].close_reason.as_deref()
        ),
        (10, 20, Some("closed"))
    );
    assert_eq!(
        (
            bobs[0].resumes,
            bobs[0].replayed_bytes,
            bobs[0].waited_ms,
            bobs[0].resume_failure.as_deref()
        ),
        (2, 4096, 1500, Some("expired"))
    );
    assert!(bobs[0].closed_at.is_some());
    assert_eq!(s.list_tunnels(None, None, 1).await.unwrap().len(), 1);
    let to_d2 = s.list_tunnels(None, Some(D2), 10).await.unwrap();
    assert_eq!(
        to_d2
            .iter()
            .map(|t| (t.id.as_str(), t.kind.as_str()))
            .collect::<Vec<_>>(),
        [("t2", "terminal")]
    );
    assert_eq!(
        s.list_tunnels(Some(bob.id), Some(D2), 10).await.unwrap(),
        vec![]
    );

    // Ephemeral terminal keys: one device, one login, until the window closes or the
    // session removes its key.
    let now = store::now_ms();
    let key = |id: &str, device: &str, login: &str, expires_at| store::EphemeralKey {
        id: id.into(),
        device_uuid: device.into(),
        login: login.into(),
        user_id: bob.id,
        public_key: format!("ssh-ed25519 AAAA{id}"),
        expires_at,
    };
    s.add_ephemeral_key(&key("e1", D1, "root", now + 60_000))
        .await
        .unwrap();
    s.add_ephemeral_key(&key("e2", D1, "bob", now + 60_000))
        .await
        .unwrap();
    s.add_ephemeral_key(&key("e3", D2, "root", now + 60_000))
        .await
        .unwrap();
    let found = s.ephemeral_keys(D1, "root", now).await.unwrap();
    assert_eq!(
        found,
        vec![(key("e1", D1, "root", now + 60_000), "bob".to_owned())]
    );
    assert_eq!(
        s.ephemeral_keys(D1, "root", now + 60_000).await.unwrap(),
        vec![]
    );
    s.remove_ephemeral_key("e1").await.unwrap();
    assert_eq!(s.ephemeral_keys(D1, "root", now).await.unwrap(), vec![]);
    assert_eq!(s.ephemeral_keys(D1, "bob", now).await.unwrap().len(), 1);
    // Adding a key sweeps out those whose window has closed.
    s.add_ephemeral_key(&key("e4", D1, "root", now - 1))
        .await
        .unwrap();
    s.add_ephemeral_key(&key("e5", D1, "root", now + 60_000))
        .await
        .unwrap();
    assert_eq!(
        s.ephemeral_keys(D1, "root", now - 10).await.unwrap().len(),
        1
    );
    s.remove_ephemeral_key("e2").await.unwrap();
    s.remove_ephemeral_key("e3").await.unwrap();
    s.remove_ephemeral_key("e5").await.unwrap();

    // Deletes cascade; audit rows stay.
    assert!(s.delete_device(D1).await.unwrap());
    assert!(!s.delete_device(D1).await.unwrap());
    assert!(s.delete_fleet(gw.id).await.unwrap());
    assert_eq!(
        s.device(D2).await.unwrap(),
        None,
        "fleet delete takes its devices"
    );
    assert!(s.delete_user(bob.id).await.unwrap());
    assert_eq!(s.list_members(pis.id).await.unwrap(), vec![]);
    assert_eq!(s.api_key_by_hash("hash1").await.unwrap(), None);
    assert_eq!(s.list_tunnels(None, None, 10).await.unwrap().len(), 2);
}

#[tokio::test]
async fn sqlite_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let url = store::sqlite::default_url(dir.path());
    conformance(store::open(&url).await.unwrap()).await;
    // Reopening applies no migration twice and keeps the data.
    let again = store::open(&url).await.unwrap();
    assert_eq!(again.count_users().await.unwrap(), 1);
}

#[tokio::test]
async fn postgres_conformance() {
    let pg = TempPg::start();
    conformance(store::open(&pg.url).await.unwrap()).await;
    let again = store::open(&pg.url).await.unwrap();
    assert_eq!(again.count_users().await.unwrap(), 1);
}

#[tokio::test]
async fn unknown_scheme_is_refused() {
    assert!(matches!(
        store::open("mysql://x").await,
        Err(StoreError::UnsupportedUrl(_))
    ));
}
