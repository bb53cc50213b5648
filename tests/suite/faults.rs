//! Store faults from outside: a full disk under a running relay (a real, small tmpfs in a
//! mount namespace of the relay's own), and the relay's open-files limit.

use crate::common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::json;

/// Requires root, for the mount namespace the full-disk test makes (see [`require`]).
fn require_mount() {
    require(
        is_root(),
        "root (a private mount namespace with a small tmpfs)",
    );
}

/// A relay whose data directory is a fresh `size` tmpfs, mounted in a private mount
/// namespace that only the relay sees (so nothing of the machine's fills up).
fn relay_on_small_fs(dir: &Path, size: &str) -> Relay {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let config = dir.join("relay.toml");
    std::fs::write(&config, limits("")).unwrap();
    let script =
        format!("mount -t tmpfs -o size={size},mode=0700 cloudlink-test \"$0\" && exec \"$@\"");
    let mut relay = Relay::start_wrapped(
        &data,
        &["--config", config.to_str().unwrap()],
        &[],
        &[
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            data.to_str().unwrap(),
        ],
    );
    // From here, the data directory is read through the relay's own mount namespace.
    let pid = relay.pid().expect("relay running");
    relay.data_dir =
        PathBuf::from(format!("/proc/{pid}/root")).join(data.strip_prefix("/").unwrap());
    relay
}

/// A file in the relay's data directory (on its tmpfs).
fn inside(relay: &Relay, name: &str) -> PathBuf {
    relay.data_dir.join(name)
}

/// Fills the filesystem holding `path` to the last byte.
fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).expect("create the filler");
    let block = vec![0xa5u8; 64 * 1024];
    loop {
        if let Err(e) = file.write_all(&block) {
            assert_eq!(e.raw_os_error(), Some(28), "expected ENOSPC, got {e}");
            break;
        }
    }
    // Also the last partial block.
    let _ = file.write_all(&[0u8; 512]);
    let _ = file.sync_all();
}

async fn status_of_get(api: std::net::SocketAddr, path: &str) -> u16 {
    http()
        .get(format!("http://{api}{path}"))
        .send()
        .await
        .expect("API reachable")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_never_lies_and_heals_by_itself() {
    require_mount();
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_on_small_fs(dir.path(), "16m");
    let admin = Api::new(relay.api, &relay.admin_key());
    // A key that has never been used: its first use wants to write `last_used`.
    let (status, fresh) = admin
        .call("POST", "/v1/api-keys", Some(json!({"name": "fresh"})))
        .await;
    assert_eq!(status, 201, "{fresh}");
    let fresh_key = fresh["key"].as_str().unwrap().to_owned();
    let (uuid, key) = admin.register_device("pis").await;
    let _agent = Agent::start(&relay, &uuid, &key, &[]);
    let echo = echo_server().await;
    assert_eq!(status_of_get(relay.api, "/readyz").await, 200);

    let filler = inside(&relay, "filler");
    fill(&filler);

    // A write either fails in the one error shape or is really stored: never a 2xx for
    // data not kept. (SQLite may still fit a write into WAL space it already holds, so
    // some writes can succeed; those must be there.)
    let mut refused = Vec::new();
    let mut stored = Vec::new();
    for i in 0..5 {
        let name = format!("probe{i}");
        let (status, body) = admin
            .call("POST", "/v1/api-keys", Some(json!({ "name": name })))
            .await;
        match status {
            201 => stored.push(name),
            503 => {
                assert_eq!(body["error"]["code"], "unavailable", "{body}");
                refused.push(name);
            }
            other => panic!("a write on a full disk answered {other}: {body}"),
        }
    }
    let listed = key_names(&admin).await;
    for name in &stored {
        assert!(
            listed.contains(name),
            "{name} answered 201 but is not stored: {listed:?}"
        );
    }
    for name in &refused {
        assert!(
            !listed.contains(name),
            "{name} answered 503 but is stored: {listed:?}"
        );
    }
    assert!(
        !refused.is_empty(),
        "every write succeeded on a full disk: the disk was not full"
    );
    assert_eq!(
        status_of_get(relay.api, "/readyz").await,
        503,
        "ready on a full disk"
    );
    assert_eq!(
        status_of_get(relay.api, "/healthz").await,
        200,
        "the process is up"
    );

    // A valid key still authenticates: recording its use is not worth refusing it.
    let user = admin.as_user(&fresh_key);
    let (status, me) = user.call("GET", "/v1/me", None).await;
    assert_eq!(status, 200, "{me}");
    let mut s = tunnel(relay.proxy, &fresh_key, &uuid, echo).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
    drop(s);

    // Space comes back: the relay heals by itself, without a restart.
    std::fs::remove_file(&filler).unwrap();
    let healed = eventually(Duration::from_secs(20), || async {
        admin
            .call("POST", "/v1/api-keys", Some(json!({"name": "after"})))
            .await
            .0
            == 201
    })
    .await;
    assert!(
        healed.is_some(),
        "writes still fail 20 s after space was freed"
    );
    eprintln!("writes worked again {healed:?} after space was freed");
    assert_eq!(status_of_get(relay.api, "/readyz").await, 200);
    let names = key_names(&admin).await;
    assert!(names.iter().any(|n| n == "after"), "{names:?}");
    for name in &refused {
        assert!(
            !names.contains(name),
            "a refused write was stored after all: {names:?}"
        );
    }
}

async fn key_names(api: &Api) -> Vec<String> {
    let (status, keys) = api.call("GET", "/v1/api-keys", None).await;
    assert_eq!(status, 200, "{keys}");
    keys.as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap().to_owned())
        .collect()
}

/// The relay raises its open-files limit to the hard limit, so a few hundred silent
/// connections under a low soft limit do not make it deaf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_raises_its_open_files_limit() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, limits("")).unwrap();
    let relay = Relay::start_wrapped(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
        &[],
        &["prlimit", "--nofile=128:4096"],
    );
    let line = relay.stderr.wait_for("open-files limit");
    assert!(line.contains("open_files=4096"), "{line}");
    assert!(line.contains("was=128"), "{line}");
    // More silent connections than the soft limit it started with.
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(tokio::net::TcpStream::connect(relay.api).await.unwrap());
    }
    assert_eq!(status_of_get(relay.api, "/healthz").await, 200);
    drop(silent);
}
