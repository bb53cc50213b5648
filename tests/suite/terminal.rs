//! The browser terminal's WebSocket end to end (PROTOCOL.md §5), without the browser: a real
//! relay, agent and OpenSSH sshd whose keys come from `cloudlink agent authorized-keys`.
//! The browser itself drives the same path in tests/browser.rs.

use crate::common;

use common::sshd::device_with_sshd;
use common::terminal::{url, Term};
use common::{limits, sshd, Agent, World};
use serde_json::json;

// Multi-threaded: sshd's accept loop runs in this runtime while the test waits on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_opens_a_root_shell_with_a_session_key() {
    sshd::require();
    let w = World::with(
        &limits(""),
        &["--service-command", "sh -c 'echo inside-{service}; exit 5'"],
        &[],
    );
    let (uuid, device_key, sshd, _agent) = device_with_sshd(&w, "pis").await;
    let alice_key = w.user("alice").await;
    w.admin.add_member("pis", "alice").await;

    // Alice has no SSH key of her own: the session's key is all it takes.
    let mut t = Term::open(w.relay.api, &uuid, None, &alice_key).await;
    let started = t.expect_control("started").await;
    assert_eq!(started["login"], "root", "{}", sshd.log());
    t.type_in("echo $((6*7))\r").await;
    t.expect_output("42").await;
    t.send_json(json!({"type": "resize", "cols": 100, "rows": 30}))
        .await;
    t.type_in("stty size\r").await;
    t.expect_output("30 100").await;
    // sshd took the session key as a public-key login for root.
    let log = sshd.log();
    assert!(log.contains("Accepted publickey for root"), "{log}");

    // The key was offered for this login only until the relay had logged in.
    let device = w.admin.as_user(&device_key);
    let (s, keys) = device
        .call("GET", "/auth/v1/public-keys/root?all_members=true", None)
        .await;
    assert_eq!(s, 200);
    assert!(
        !keys.as_str().unwrap().contains("cloudlink terminal"),
        "the session key outlived its login: {keys}"
    );

    // Ctrl-C reaches the foreground program through the PTY. It is sent once that program
    // runs: the marker comes from the foreground child itself (bash gives a child the
    // terminal before it runs), not from the shell's own `echo`, after which a Ctrl-C could
    // land while bash was still starting `sleep` with SIGINT ignored, and be lost. The
    // quotes keep the typed echo from matching.
    t.type_in("sh -c 'echo sleep''ing-now; exec sleep 600'\r")
        .await;
    t.expect_output("sleeping-now").await;
    t.type_in("\u{3}").await;
    // The next line once the shell prompts again, as a person types it: bash may drop
    // what arrives while it recovers from the interrupted job.
    let prompted = t
        .until(|t| {
            t.output
                .rsplit("sleeping-now")
                .next()
                .is_some_and(|after| after.contains("# "))
        })
        .await;
    assert!(prompted, "no prompt after Ctrl-C: {:?}", t.output);
    t.type_in("echo after-ctrl-c-$((1+1))\r").await;
    t.expect_output("after-ctrl-c-2").await;

    t.type_in("exit 3\r").await;
    let exit = t.expect_control("exit").await;
    assert_eq!(exit["status"], 3);
    t.expect_closed().await;

    // The audit log has it, as a terminal to 22222.
    let alice = w.admin.as_user(&alice_key);
    let found = common::eventually(std::time::Duration::from_secs(10), || {
        let alice = alice.clone();
        let uuid = uuid.clone();
        async move {
            let (_, rows) = alice
                .call("GET", &format!("/v1/tunnels?device={uuid}"), None)
                .await;
            rows.as_array().is_some_and(|rows| {
                rows.iter().any(|r| {
                    r["kind"] == "terminal" && r["port"] == 22222 && r["closed_at"].is_string()
                })
            })
        }
    })
    .await;
    assert!(found.is_some(), "no closed terminal row in the audit log");

    // A service: the relay's service command runs in a PTY instead of a shell.
    let mut t = Term::open(w.relay.api, &uuid, Some("main"), &alice_key).await;
    t.expect_output("inside-main").await;
    assert_eq!(t.expect_control("exit").await["status"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_refusals_say_why() {
    sshd::require();
    let w = World::new(&limits(""));
    let (uuid, _, _sshd, _agent) = device_with_sshd(&w, "pis").await;
    let (offline, _) = w.device_in("pis").await;
    let alice_key = w.user("alice").await;
    w.admin.add_member("pis", "alice").await;
    let bob_key = w.user("bob").await;
    w.admin
        .call("POST", "/v1/fleets", Some(json!({"name": "other"})))
        .await;
    w.admin.add_member("other", "bob").await;

    let refusal = |uuid: String, token: String| {
        let api = w.relay.api;
        async move {
            let mut t = Term::open(api, &uuid, None, &token).await;
            let error = t.expect_control("error").await;
            t.expect_closed().await;
            (
                error["code"].as_str().unwrap().to_owned(),
                error["message"].as_str().unwrap().to_owned(),
            )
        }
    };
    let (code, message) = refusal(offline.clone(), alice_key.clone()).await;
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("offline", "The device is not connected.")
    );
    let (code, _) = refusal(uuid.clone(), bob_key.clone()).await;
    assert_eq!(code, "forbidden", "another fleet's user");
    let (code, _) = refusal(uuid.clone(), "clk_wrong".into()).await;
    assert_eq!(code, "unauthorized");
    // A token that would add lines to the tunnel's CONNECT head is refused as it is.
    let (code, _) = refusal(uuid.clone(), format!("{alice_key}\r\n\r\nSSH-2.0-x")).await;
    assert_eq!(code, "unauthorized");

    // The first message must be the auth message.
    let mut t = Term::connect(&url(w.relay.api, &uuid, None)).await;
    t.type_in("ls\r").await;
    assert_eq!(t.expect_control("error").await["code"], "bad_request");

    // Bad requests are refused before the upgrade.
    let api = common::Api::new(w.relay.api, &alice_key);
    let (s, _) = api
        .call(
            "GET",
            &format!("/v1/devices/{uuid}/terminal?service=a;id"),
            None,
        )
        .await;
    assert_eq!(s, 400);
    let (s, _) = api
        .call("GET", &format!("/v1/devices/{uuid}/terminal"), None)
        .await;
    assert_eq!(s, 400, "not a WebSocket upgrade");
    // Another site's page cannot open one with the user's browser.
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url(
            w.relay.api,
            &uuid,
            None,
        ))
        .unwrap();
    request
        .headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!(
            "a cross-origin upgrade was not refused: {:?}",
            other.map(|_| ())
        ),
    }

    // A login the device's sshd does not take: a device whose agent announces no login
    // (so the user's own name, `alice`, which has no account there).
    let (plain, plain_key) = w.device_in("pis").await;
    let plain_sshd = sshd::Sshd::start(w.relay.api, &plain, &plain_key).await;
    let config = w.dir.path().join("agent-plain.toml");
    std::fs::write(&config, format!("ssh_port = {}\n", plain_sshd.port)).unwrap();
    let _plain_agent = Agent::start(
        &w.relay,
        &plain,
        &plain_key,
        &["--config", config.to_str().unwrap()],
    );
    let (code, message) = refusal(plain.clone(), alice_key.clone()).await;
    assert_eq!(code, "refused", "{message}");
    assert!(message.contains("refused the login as alice"), "{message}");
    // The per-user mapping: a cloud user named like a local account (here `root`, the one
    // sure to exist) gets a shell there, with the session key from the per-user lookup.
    let root_key = w.user("root").await;
    w.admin.add_member("pis", "root").await;
    let mut t = Term::open(w.relay.api, &plain, None, &root_key).await;
    assert_eq!(t.expect_control("started").await["login"], "root");
    t.type_in("echo per-user-$((6*7)); exit\r").await;
    t.expect_output("per-user-42").await;
    assert_eq!(t.expect_control("exit").await["status"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminals_count_as_tunnels_and_end_when_access_ends() {
    sshd::require();
    let w = World::new(&limits("tunnels_per_user_device = 1"));
    let (uuid, _, _sshd, _agent) = device_with_sshd(&w, "pis").await;
    let alice_key = w.user("alice").await;
    w.admin.add_member("pis", "alice").await;

    let mut first = Term::open(w.relay.api, &uuid, None, &alice_key).await;
    first.expect_control("started").await;
    let mut second = Term::open(w.relay.api, &uuid, None, &alice_key).await;
    assert_eq!(
        second.expect_control("error").await["code"],
        "too_many_requests"
    );

    // Removed from the fleet, alice's open terminal is cut within the 5 s promised (with
    // slack for a loaded machine), and told why.
    let removed = std::time::Instant::now();
    let (s, _) = w
        .admin
        .call("DELETE", "/v1/fleets/pis/members/alice", None)
        .await;
    assert_eq!(s, 204);
    let error = first.expect_control("error").await;
    assert_eq!(error["code"], "revoked", "{error}");
    assert!(
        removed.elapsed() < std::time::Duration::from_secs(15),
        "cut after {:?}",
        removed.elapsed()
    );
    first.expect_closed().await;
}
