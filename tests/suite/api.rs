//! The control plane end to end: a real relay process, its REST API, and the CLI.

use crate::common;

use std::os::unix::fs::PermissionsExt;

use common::{limits, pg::TempPg, Api, Relay, World};
use serde_json::json;

#[tokio::test]
async fn bootstrap_admin_and_restart_keep_identity() {
    let mut w = World::new(&limits(""));
    assert!(w.relay.stdout.text().contains("admin.key"));
    let key = w.relay.admin_key();
    assert!(
        !w.relay.stdout.text().contains(&key),
        "the key itself is never printed"
    );
    let mode = std::fs::metadata(w.relay.data_dir.join("admin.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let (status, me) = w.admin.call("GET", "/v1/me", None).await;
    assert_eq!(status, 200);
    assert_eq!(me, json!({"id": 1, "username": "admin", "admin": true}));
    let (status, _) = w
        .admin
        .call("POST", "/v1/fleets", Some(json!({"name": "kept"})))
        .await;
    assert_eq!(status, 201);

    w.relay.restart();
    let admin = Api::new(w.relay.api, &key);
    let (status, fleet) = admin.call("GET", "/v1/fleets/kept", None).await;
    assert_eq!(status, 200, "data survives a restart: {fleet}");
    assert_eq!(
        w.relay.admin_key(),
        key,
        "the admin key is not rotated on restart"
    );
    assert!(!w.relay.stdout.text().contains("admin.key"));
}

#[tokio::test]
async fn bootstrap_key_from_env() {
    let chosen = format!("clk_{}", "ab".repeat(32));
    let w = World::with(
        &limits(""),
        &[],
        &[("CLOUDLINK_BOOTSTRAP_ADMIN_KEY", &chosen)],
    );
    assert_eq!(w.relay.admin_key(), chosen);
    let (status, _) = Api::new(w.relay.api, &chosen)
        .call("GET", "/v1/me", None)
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn print_config_masks_secrets() {
    let out = std::process::Command::new(common::bin())
        .args(["relay", "--print-config", "--jwt-secret", &"s".repeat(40)])
        .args(["--database-url", "postgres://u:hunter2@db/cl"])
        .env("CLOUDLINK_API_LISTEN", "127.0.0.1:9999")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("api_listen = \"127.0.0.1:9999\""), "{text}");
    assert!(
        !text.contains("hunter2") && !text.contains(&"s".repeat(40)),
        "{text}"
    );
    let bad = std::process::Command::new(common::bin())
        .args(["relay", "--print-config", "--database-url", "mysql://x"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("database_url"));
}

#[tokio::test]
async fn errors_have_one_shape_and_the_right_status() {
    let w = World::new(&limits(""));
    let anon = w.admin.as_user("");
    let (status, body) = anon.call("GET", "/v1/me", None).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "unauthorized");
    assert!(body["error"]["message"].as_str().unwrap().ends_with('.'));
    let (status, _) = w
        .admin
        .as_user("clk_wrong")
        .call("GET", "/v1/me", None)
        .await;
    assert_eq!(status, 401);
    let (status, _) = w
        .admin
        .as_user("not.a.jwt")
        .call("GET", "/v1/me", None)
        .await;
    assert_eq!(status, 401);

    let (status, body) = w
        .admin
        .call(
            "POST",
            "/v1/fleets",
            Some(json!({"name": "x", "owner": "me"})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_request"))
    );
    let (status, _) = w
        .admin
        .call("POST", "/v1/fleets", Some(json!({"name": "Bad Name"})))
        .await;
    assert_eq!(status, 400);
    let (status, _) = w
        .admin
        .call("POST", "/v1/fleets", Some(json!({"name": "-leading-dash"})))
        .await;
    assert_eq!(status, 400);
    let (status, _) = w
        .admin
        .call("POST", "/v1/fleets", Some(json!({"name": "a".repeat(64)})))
        .await;
    assert_eq!(status, 400);
    let (status, _) = w
        .admin
        .call(
            "POST",
            "/v1/fleets",
            Some(json!({"name": "ok", "allowed_ports": [0]})),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = w.admin.call("DELETE", "/v1/api-keys/abc", None).await;
    assert_eq!(status, 400);
    let (status, _) = w.admin.call("GET", "/v1/devices/xyz", None).await;
    assert_eq!(status, 400);
    let (status, body) = w.admin.call("GET", "/v1/nothing-here", None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, _) = w.admin.call("PUT", "/v1/me", None).await;
    assert_eq!(status, 405);

    // Malformed JSON.
    let resp = common::http()
        .post(format!("http://{}/v1/fleets", w.relay.api))
        .bearer_auth(w.relay.admin_key())
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");

    let (status, _) = w
        .admin
        .call("POST", "/v1/fleets", Some(json!({"name": "dup"})))
        .await;
    assert_eq!(status, 201);
    let (status, body) = w
        .admin
        .call("POST", "/v1/fleets", Some(json!({"name": "dup"})))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("conflict"))
    );
}

#[tokio::test]
async fn who_may_do_what() {
    let w = World::new(&limits(""));
    let olga = w.admin.as_user(&w.user("olga").await);
    let mike = w.admin.as_user(&w.user("mike").await);
    let sam = w.admin.as_user(&w.user("sam").await);

    // Non-admins cannot make users.
    let (status, _) = olga
        .call("POST", "/v1/users", Some(json!({"username": "eve"})))
        .await;
    assert_eq!(status, 403);
    let (status, _) = w
        .admin
        .call("POST", "/v1/users", Some(json!({"username": "olga"})))
        .await;
    assert_eq!(status, 409);

    // Olga makes a fleet and owns it; adds Mike as a member.
    let (status, _) = olga
        .call(
            "POST",
            "/v1/fleets",
            Some(json!({"name": "pis", "allowed_ports": [22222]})),
        )
        .await;
    assert_eq!(status, 201);
    let (status, _) = olga
        .call(
            "POST",
            "/v1/fleets/pis/members",
            Some(json!({"username": "mike", "role": "member"})),
        )
        .await;
    assert_eq!(status, 201);
    let (status, _) = olga
        .call(
            "POST",
            "/v1/fleets/pis/members",
            Some(json!({"username": "nobody", "role": "member"})),
        )
        .await;
    assert_eq!(status, 404);
    let (status, dev) = olga
        .call(
            "POST",
            "/v1/fleets/pis/devices",
            Some(json!({"name": "pi1"})),
        )
        .await;
    assert_eq!(status, 201);
    let uuid = dev["uuid"].as_str().unwrap().to_owned();
    assert_eq!(uuid.len(), 32);
    assert!(uuid
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert_eq!(dev["key"].as_str().unwrap().len(), 64);

    // Mike sees the fleet and its device but cannot manage them.
    let (status, fleets) = mike.call("GET", "/v1/fleets", None).await;
    assert_eq!((status, fleets.as_array().unwrap().len()), (200, 1));
    let (status, devices) = mike.call("GET", "/v1/devices", None).await;
    assert_eq!(status, 200);
    assert_eq!(devices[0]["uuid"], uuid.as_str());
    assert_eq!(devices[0]["online"], false);
    assert!(
        devices[0].get("key").is_none(),
        "the device key is shown only once"
    );
    let (status, _) = mike.call("GET", &format!("/v1/devices/{uuid}"), None).await;
    assert_eq!(status, 200);
    let (status, _) = mike
        .call("POST", "/v1/fleets/pis/devices", Some(json!({})))
        .await;
    assert_eq!(status, 403);
    let (status, _) = mike
        .call("DELETE", &format!("/v1/devices/{uuid}"), None)
        .await;
    assert_eq!(status, 403);
    let (status, _) = mike
        .call(
            "PATCH",
            "/v1/fleets/pis",
            Some(json!({"allowed_ports": []})),
        )
        .await;
    assert_eq!(status, 403);
    let (status, members) = mike.call("GET", "/v1/fleets/pis/members", None).await;
    assert_eq!((status, members.as_array().unwrap().len()), (200, 2));

    // Sam sees nothing: 404, not 403, for what he may not see.
    let (status, fleets) = sam.call("GET", "/v1/fleets", None).await;
    assert_eq!((status, fleets), (200, json!([])));
    let (status, _) = sam.call("GET", "/v1/fleets/pis", None).await;
    assert_eq!(status, 404);
    let (status, _) = sam.call("GET", &format!("/v1/devices/{uuid}"), None).await;
    assert_eq!(status, 404);
    let (status, _) = sam
        .call("DELETE", &format!("/v1/devices/{uuid}"), None)
        .await;
    assert_eq!(status, 404);
    let (status, _) = sam.call("GET", "/v1/fleets/pis/members", None).await;
    assert_eq!(status, 404);

    // The owner changes ports and removes the member.
    let (status, fleet) = olga
        .call(
            "PATCH",
            "/v1/fleets/pis",
            Some(json!({"allowed_ports": [22222, 80]})),
        )
        .await;
    assert_eq!(
        (status, fleet["allowed_ports"].clone()),
        (200, json!([22222, 80]))
    );
    let (status, _) = olga
        .call("DELETE", "/v1/fleets/pis/members/mike", None)
        .await;
    assert_eq!(status, 204);
    let (status, _) = mike.call("GET", "/v1/fleets/pis", None).await;
    assert_eq!(status, 404);

    // Admins see and do everything; deleting the fleet takes its device.
    let (status, all) = w.admin.call("GET", "/v1/devices", None).await;
    assert_eq!((status, all.as_array().unwrap().len()), (200, 1));
    let (status, _) = w.admin.call("DELETE", "/v1/fleets/pis", None).await;
    assert_eq!(status, 204);
    let (status, _) = olga.call("GET", &format!("/v1/devices/{uuid}"), None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn api_keys_tokens_and_ssh_keys() {
    let w = World::new(&limits(""));
    let bob_key = w.user("bob").await;
    let bob = w.admin.as_user(&bob_key);

    let (status, k) = bob
        .call("POST", "/v1/api-keys", Some(json!({"name": "laptop"})))
        .await;
    assert_eq!(status, 201);
    let second = k["key"].as_str().unwrap().to_owned();
    assert!(second.starts_with("clk_"));
    assert!(second.starts_with(k["prefix"].as_str().unwrap()));
    let (status, keys) = bob.call("GET", "/v1/api-keys", None).await;
    assert_eq!(status, 200);
    assert_eq!(keys.as_array().unwrap().len(), 2);
    assert!(
        !keys.to_string().contains(&second),
        "listings never show secrets"
    );

    // A JWT works like a key.
    let (status, t) = w
        .admin
        .as_user(&second)
        .call("POST", "/v1/auth/token", None)
        .await;
    assert_eq!(status, 200);
    assert!(t["expires_at"].as_str().unwrap().starts_with("20"));
    let jwt = t["token"].as_str().unwrap();
    let (status, me) = w.admin.as_user(jwt).call("GET", "/v1/me", None).await;
    assert_eq!((status, me["username"].as_str()), (200, Some("bob")));

    // Revoking is immediate.
    let id = k["id"].as_i64().unwrap();
    let (status, _) = bob
        .call("DELETE", &format!("/v1/api-keys/{id}"), None)
        .await;
    assert_eq!(status, 204);
    let (status, _) = w.admin.as_user(&second).call("GET", "/v1/me", None).await;
    assert_eq!(status, 401);
    let (status, _) = w
        .admin
        .call("DELETE", &format!("/v1/api-keys/{id}"), None)
        .await;
    assert_eq!(status, 404, "not the admin's key");

    // SSH keys.
    let ed = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAII/Hvbt8FLxaYtdZv3WeFjGcQvtgFIyIyn5kLztvBv4O test@cloudlink";
    let (status, sk) = bob
        .call(
            "POST",
            "/v1/ssh-keys",
            Some(json!({"title": "laptop", "public_key": ed})),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(
        sk["fingerprint"],
        "SHA256:n+342FvzCL/Dhm/r0FfIAXeIBAwnWb3yXuu5ByA+Gfs"
    );
    let (status, _) = bob
        .call(
            "POST",
            "/v1/ssh-keys",
            Some(json!({"title": "again", "public_key": ed})),
        )
        .await;
    assert_eq!(status, 409);
    let (status, _) = bob
        .call(
            "POST",
            "/v1/ssh-keys",
            Some(json!({"title": "junk", "public_key": "ssh-rsa nope"})),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = w
        .admin
        .call(
            "POST",
            "/v1/ssh-keys",
            Some(json!({"title": "same key, other user", "public_key": ed})),
        )
        .await;
    assert_eq!(status, 201);
    let (status, list) = bob.call("GET", "/v1/ssh-keys", None).await;
    assert_eq!((status, list.as_array().unwrap().len()), (200, 1));
    let sid = sk["id"].as_i64().unwrap();
    let (status, _) = w
        .admin
        .call("DELETE", &format!("/v1/ssh-keys/{sid}"), None)
        .await;
    assert_eq!(status, 404);
    let (status, _) = bob
        .call("DELETE", &format!("/v1/ssh-keys/{sid}"), None)
        .await;
    assert_eq!(status, 204);

    // Deleting a user ends their keys.
    let (status, _) = w.admin.call("DELETE", "/v1/users/bob", None).await;
    assert_eq!(status, 204);
    let (status, _) = bob.call("GET", "/v1/me", None).await;
    assert_eq!(status, 401);
    let (status, _) = w.admin.as_user(jwt).call("GET", "/v1/me", None).await;
    assert_eq!(status, 401, "a deleted user's JWT stops working");
}

#[tokio::test]
async fn health_openapi_and_metrics() {
    let w = World::new(&limits(""));
    let http = common::http();
    let get = |path: &str| http.get(format!("http://{}{path}", w.relay.api)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    let doc: serde_json::Value = get("/v1/openapi.json").await.unwrap().json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/users",
        "/v1/me",
        "/v1/api-keys",
        "/v1/api-keys/{id}",
        "/v1/auth/token",
        "/v1/fleets",
        "/v1/fleets/{name}",
        "/v1/fleets/{name}/members",
        "/v1/fleets/{name}/members/{username}",
        "/v1/fleets/{name}/devices",
        "/v1/devices",
        "/v1/devices/{uuid}",
        "/v1/ssh-keys",
        "/v1/ssh-keys/{id}",
        "/v1/tunnels",
        "/healthz",
        "/readyz",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from OpenAPI"
        );
    }
    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    assert!(metrics.contains("cloudlink_api_responses_total"));
}

#[tokio::test]
async fn cli_admin_walkthrough() {
    let w = World::new(&limits(""));
    let key_file = w.relay.data_dir.join("admin.key");
    let out = w.cli_ok(&[
        "login",
        "--api",
        &format!("http://{}", w.relay.api),
        "--key-file",
        key_file.to_str().unwrap(),
    ]);
    assert!(out.contains("admin"));
    let config = w.xdg().join("cloudlink/config.toml");
    let mode = std::fs::metadata(&config).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(w.cli_ok(&["whoami"]).contains("admin"));

    let out = w.cli_ok(&["--json", "user", "create", "carol"]);
    let carol: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(carol["api_key"].as_str().unwrap().starts_with("clk_"));
    assert!(w.cli_ok(&["user", "list"]).contains("carol"));
    w.cli_ok(&["fleet", "create", "pis", "--allow-port", "22222"]);
    assert!(w.cli_ok(&["fleet", "list"]).contains("22222"));
    w.cli_ok(&["fleet", "member", "add", "pis", "carol"]);
    assert!(w
        .cli_ok(&["fleet", "member", "list", "pis"])
        .contains("carol"));
    let out = w.cli_ok(&["--json", "device", "register", "pis", "--name", "pi1"]);
    let dev: serde_json::Value = serde_json::from_str(&out).unwrap();
    let uuid = dev["uuid"].as_str().unwrap();
    let table = w.cli_ok(&["device", "list"]);
    assert!(table.starts_with("UUID") && table.contains(uuid) && table.contains("offline"));
    let out = w.cli_ok(&["--json", "api-key", "create", "ci"]);
    let k: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(w.cli_ok(&["api-key", "list"]).contains("ci"));
    w.cli_ok(&["api-key", "revoke", &k["id"].to_string()]);

    let pubkey = w.dir.path().join("id.pub");
    std::fs::write(&pubkey, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAII/Hvbt8FLxaYtdZv3WeFjGcQvtgFIyIyn5kLztvBv4O me@laptop\n").unwrap();
    assert!(w
        .cli_ok(&["key", "add", pubkey.to_str().unwrap()])
        .contains("SHA256:"));
    assert!(w.cli_ok(&["key", "list"]).contains("me@laptop"));

    // An API error prints its one sentence and fails.
    let (ok, _, err) = w.cli(&["fleet", "create", "pis"]);
    assert!(!ok);
    assert_eq!(err.trim(), "error: Fleet pis already exists.");
    let (ok, _, err) = w.cli(&["device", "rm", "0123456789abcdef0123456789abcdef"]);
    assert!(!ok && err.contains("unknown device"), "{err}");
    w.cli_ok(&["device", "rm", uuid]);
    w.cli_ok(&["fleet", "member", "rm", "pis", "carol"]);
    w.cli_ok(&["fleet", "rm", "pis"]);
    assert!(!w.cli_ok(&["fleet", "list"]).contains("pis"));

    // A wrong key is refused at login and nothing is saved over the good login.
    let (ok, _, err) = w.cli(&[
        "login",
        "--api",
        &format!("http://{}", w.relay.api),
        "--key",
        "clk_bad",
    ]);
    assert!(!ok && err.contains("valid API key"), "{err}");
    assert!(w.cli_ok(&["whoami"]).contains("admin"));
}

#[tokio::test]
async fn secrets_never_reach_the_logs() {
    let w = World::new(&limits(""));
    let mut secrets = vec![w.relay.admin_key()];
    secrets.push(w.user("dora").await);
    let (_, dev) = w.device_in("fleet").await;
    secrets.push(dev);
    let (_, t) = w.admin.call("POST", "/v1/auth/token", None).await;
    secrets.push(t["token"].as_str().unwrap().to_owned());
    // Failed attempts with secrets-shaped junk are logged without the junk.
    let bogus = format!("clk_{}", "f".repeat(64));
    let _ = w.admin.as_user(&bogus).call("GET", "/v1/me", None).await;
    secrets.push(bogus);
    let (_, head) = common::connect_raw(
        w.relay.proxy,
        &format!(
            "CONNECT 0123456789abcdef0123456789abcdef:22 HTTP/1.1\r\nProxy-Authorization: Bearer {}\r\n\r\n",
            secrets[1]
        ),
    )
    .await;
    assert_eq!(common::status_of(&head), 403);
    let mut relay = w.relay;
    relay.stop();
    let log = std::fs::read_to_string(&relay.log_file).unwrap();
    assert!(log.contains("DEBUG"), "the relay ran with debug logs");
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "a secret reached the relay log"
        );
    }
}

/// The store going away: the API answers 503, the relay keeps running, and recovers by
/// itself when the database comes back.
#[tokio::test]
async fn postgres_outage_is_503_then_recovers() {
    let pg = TempPg::start();
    common::require(
        pg.controllable(),
        "a Postgres cluster it starts and stops itself (DATABASE_URL names one it cannot stop)",
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, limits("")).unwrap();
    let relay = Relay::start(
        &dir.path().join("data"),
        &[
            "--config",
            config.to_str().unwrap(),
            "--database-url",
            &pg.url,
        ],
        &[],
    );
    let admin = Api::new(relay.api, &relay.admin_key());
    let (status, _) = admin
        .call("POST", "/v1/fleets", Some(json!({"name": "before"})))
        .await;
    assert_eq!(status, 201);

    pg.stop();
    let (status, body) = admin.call("GET", "/v1/fleets", None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("unavailable"))
    );
    let resp = common::http()
        .get(format!("http://{}/readyz", relay.api))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    let resp = common::http()
        .get(format!("http://{}/healthz", relay.api))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "the process stays up");

    pg.restart();
    let (status, fleets) = admin.call("GET", "/v1/fleets", None).await;
    assert_eq!(status, 200, "recovered without a restart: {fleets}");
    assert_eq!(fleets[0]["name"], "before");
}

#[tokio::test]
async fn migrate_command_prepares_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("new.db").display());
    let run = |url: &str| {
        std::process::Command::new(common::bin())
            .args(["migrate", "--database-url", url])
            .output()
            .unwrap()
    };
    let out = run(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = cloudlink::store::open(&url).await.unwrap();
    assert_eq!(
        store.count_users().await.unwrap(),
        0,
        "migrated, not bootstrapped"
    );
    let bad = run("sqlite:///nonexistent-dir/x/y.db");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("error"));
    {
        let pg = TempPg::start();
        let out = run(&pg.url);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(run(&pg.url).status.success(), "migrating twice is a no-op");
    }
}
