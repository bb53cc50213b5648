//! `POST /v1/ssh-keys/import` and `cloudlink key import --github`, against a local fake
//! GitHub (`--github-keys-url`): added, duplicate and invalid lines, an unknown login, a bad
//! login, and the bounds (no redirects, 5 s, 64 KiB).

use crate::common;

use std::time::{Duration, Instant};

use common::github::{fake_github, ECDSA, ED25519_A, ED25519_B};
use common::{limits, Api, World};
use serde_json::json;

/// `POST /v1/ssh-keys/import` for `login` as `api`'s user.
async fn import(api: &Api, login: &str) -> (u16, serde_json::Value) {
    api.call(
        "POST",
        "/v1/ssh-keys/import",
        Some(json!({ "github": login })),
    )
    .await
}

#[tokio::test]
async fn github_keys_are_imported_once_with_invalid_lines_reported() {
    let github = fake_github().await;
    let w = World::with(&limits(""), &["--github-keys-url", &github], &[]);
    let bob = w.admin.as_user(&w.user("bob").await);
    let (status, _) = bob
        .call(
            "POST",
            "/v1/ssh-keys",
            Some(json!({"title": "laptop", "public_key": ED25519_A})),
        )
        .await;
    assert_eq!(status, 201);

    let (status, r) = import(&bob, "octocat").await;
    assert_eq!(status, 200, "{r}");
    let added: Vec<&str> = r["added"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["public_key"].as_str().unwrap())
        .collect();
    assert_eq!(added, [ED25519_B, ECDSA]);
    assert_eq!(r["added"][0]["title"], "GitHub octocat");
    assert_eq!(
        r["duplicates"],
        json!(["SHA256:n+342FvzCL/Dhm/r0FfIAXeIBAwnWb3yXuu5ByA+Gfs"])
    );
    assert_eq!(r["invalid"][0]["line"], 3);
    assert!(
        r["invalid"][0]["error"]
            .as_str()
            .unwrap()
            .contains("not an OpenSSH public key"),
        "{r}"
    );
    let (_, list) = bob.call("GET", "/v1/ssh-keys", None).await;
    assert_eq!(list.as_array().unwrap().len(), 3);

    // Again: nothing new, every key a duplicate; a key twice in one answer is added once.
    let (status, r) = import(&bob, "octocat").await;
    assert_eq!((status, r["added"].as_array().unwrap().len()), (200, 0));
    assert_eq!(r["duplicates"].as_array().unwrap().len(), 3);
    let carol = w.admin.as_user(&w.user("carol").await);
    let (status, r) = import(&carol, "dupes").await;
    assert_eq!(status, 200);
    assert_eq!(r["added"].as_array().unwrap().len(), 1);
    assert_eq!(r["duplicates"].as_array().unwrap().len(), 1);

    // Without a token, nothing is fetched.
    let (status, _) = import(&w.admin.as_user("clk_nobody"), "octocat").await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn github_import_refuses_what_it_should() {
    let github = fake_github().await;
    let w = World::with(&limits(""), &["--github-keys-url", &github], &[]);
    let bob = w.admin.as_user(&w.user("bob").await);

    for login in [
        "",
        "a/b",
        "../octocat",
        "octo.cat",
        "a?b",
        "x-x-x-x-x-x-x-x-x-x-x-x-x-x-x-x-x-x-x-x-",
    ] {
        let (status, body) = import(&bob, login).await;
        assert_eq!(status, 400, "{login:?}: {body}");
        assert!(body.to_string().contains("not a GitHub login"), "{body}");
    }
    let (status, body) = import(&bob, "ghost").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["message"], "GitHub has no user \"ghost\".");
    for (login, says) in [
        ("moved", "redirect, which is not followed"),
        ("huge", "larger than 65536 bytes"),
        ("flaky", "500"),
    ] {
        let (status, body) = import(&bob, login).await;
        assert_eq!(status, 502, "{login}: {body}");
        assert_eq!(body["error"]["code"], "bad_gateway");
        assert!(body.to_string().contains(says), "{login}: {body}");
    }
    let started = Instant::now();
    let (status, body) = import(&bob, "slow").await;
    assert_eq!(status, 502, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the 5 s bound held: {:?}",
        started.elapsed()
    );
    let (_, list) = bob.call("GET", "/v1/ssh-keys", None).await;
    assert_eq!(list, json!([]), "a refused import adds nothing");

    // A relay pointed at nothing: a clear 502, not a hang.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let w2 = World::with(&limits(""), &["--github-keys-url", &url], &[]);
    let (status, body) = import(&w2.admin, "octocat").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.to_string().contains("Cannot fetch the keys"), "{body}");
}

// Multi-threaded: the CLI runs as a blocking child process while the fake GitHub answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_key_import_github() {
    let github = fake_github().await;
    let w = World::with(&limits(""), &["--github-keys-url", &github], &[]);
    w.login(&w.relay.admin_key());
    let (ok, out, err) = w.cli(&["key", "import", "--github", "octocat"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("GitHub octocat") && out.contains("SHA256:"),
        "{out}"
    );
    assert_eq!(out.lines().count(), 1 + 3, "a header and three keys: {out}");
    assert!(err.contains("skipped line 3 of octocat's keys"), "{err}");
    assert!(
        err.contains("added 3 of octocat's keys (0 already yours, 1 invalid)"),
        "{err}"
    );
    let (ok, _, err) = w.cli(&["key", "import", "--github", "octocat"]);
    assert!(
        ok && err.contains("added 0 of octocat's keys (3 already yours"),
        "{err}"
    );
    let (ok, _, err) = w.cli(&["key", "import", "--github", "ghost"]);
    assert!(!ok);
    assert_eq!(err.trim(), "error: GitHub has no user \"ghost\".");
}
