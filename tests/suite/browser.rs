//! The dashboard in a real browser (headless Chromium over WebDriver): log in, see the
//! device online (and another `reconnecting` while its agent is stopped), a terminal to a real sshd (`echo $((6*7))`, resize, exit), a service, the
//! offline message, SSH keys with a GitHub import from a local fake GitHub, what a user of
//! another fleet sees, and the same at a phone-sized window. The screenshot the README shows
//! is written to target/dashboard-terminal.png (scripts/screenshot copies it to docs/).

use crate::common;

use common::browser::{self, Browser};
use common::github::fake_github;
use common::sshd::{self, device_with_sshd};
use common::{limits, World};
use fantoccini::Locator;
use serde_json::json;

/// A relay with a device (real sshd, root logins), an offline device, alice in its fleet
/// and bob in another.
async fn world() -> (
    World,
    String,
    String,
    String,
    String,
    sshd::Sshd,
    common::Agent,
) {
    let github = fake_github().await;
    let w = World::with(
        &limits(""),
        &[
            "--github-keys-url",
            &github,
            "--service-command",
            "sh -c 'echo inside-{service}; exit 5'",
        ],
        &[],
    );
    let (uuid, _, sshd, agent) = device_with_sshd(&w, "pis").await;
    let (offline, _) = w.device_in("pis").await;
    let alice = w.user("alice").await;
    w.admin.add_member("pis", "alice").await;
    let bob = w.user("bob").await;
    w.admin
        .call("POST", "/v1/fleets", Some(json!({"name": "other"})))
        .await;
    w.admin.add_member("other", "bob").await;
    (w, uuid, offline, alice, bob, sshd, agent)
}

/// Opens the device page and a Host OS terminal; waits for the prompt to take a command.
async fn open_terminal(b: &Browser, base: &str, uuid: &str) {
    b.client
        .goto(&format!("{base}#/device/{uuid}"))
        .await
        .unwrap();
    b.find("#start").await.click().await.unwrap();
    b.text_contains("#main", "Connected as root").await;
    b.find(".xterm-helper-textarea").await;
}

/// The `stty size` the shell reports, and the rows the page shows.
async fn stty_size(b: &Browser, marker: &str) -> (u32, u32, u32) {
    b.type_in_terminal(&format!("echo {marker}-$(stty size | tr ' ' x)\n"))
        .await;
    // The echoed command line holds the marker too (and may wrap on a narrow terminal):
    // wait for the line with the answer's digits.
    let (rows, cols) = b
        .text_matching(".xterm-rows", &format!("{marker}-ROWSxCOLS"), |screen| {
            screen
                .lines()
                .filter_map(|l| l.trim().strip_prefix(&format!("{marker}-")))
                .find_map(|rest| {
                    let (r, c) = rest.split_once('x')?;
                    Some((r.trim().parse().ok()?, c.trim().parse().ok()?))
                })
        })
        .await;
    let shown = b
        .js("return document.querySelector('.xterm-rows').children.length")
        .await
        .as_u64()
        .unwrap() as u32;
    (rows, cols, shown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_terminal_keys_and_access_in_chromium() {
    sshd::require();
    browser::require();
    let (w, uuid, offline, alice, bob, _sshd, _agent) = world().await;
    let base = format!("http://{}/", w.relay.api);
    let b = Browser::start(1280, 900).await;

    // The page's own headers: a strict policy, no inline script.
    let resp = common::http().get(&base).send().await.unwrap();
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );

    // Before logging in, only the login form shows: no navigation.
    b.client.goto(&base).await.unwrap();
    b.find("#api-key").await;
    let nav = "return getComputedStyle(document.getElementById('nav')).display";
    assert_eq!(b.js(nav).await, "none");
    b.login(&base, &alice).await;
    assert_eq!(b.js(nav).await, "flex");
    // The key was traded for a token in sessionStorage, never put in the URL.
    let url = b.client.current_url().await.unwrap().to_string();
    assert!(!url.contains(&alice), "{url}");
    let token = b
        .js("return sessionStorage.getItem('cloudlink.token')")
        .await;
    assert!(
        token.as_str().is_some_and(|t| t.starts_with("ey")),
        "{token}"
    );
    let row = format!("#devices tr[data-uuid='{uuid}']");
    b.text_contains(&row, "online").await;
    b.text_contains(&format!("#devices tr[data-uuid='{offline}']"), "offline")
        .await;
    // A device whose link goes silent shows `reconnecting` (PROTOCOL.md §2e, "Presence"):
    // its agent (1 s keep-alive) stops, and within the keep-alive plus 5 s the relay says
    // so; the list shows it at its next refresh. Running again, it is online again.
    let (flaky, flaky_key) = w.device_in("pis").await;
    let config = w.dir.path().join("flaky.toml");
    std::fs::write(&config, "keep_alive_ms = 1000\n").unwrap();
    let flaky_agent = common::Agent::start(
        &w.relay,
        &flaky,
        &flaky_key,
        &["--config", config.to_str().unwrap()],
    );
    let flaky_row = format!("#devices tr[data-uuid='{flaky}']");
    b.text_contains(&flaky_row, "online").await;
    let pid = flaky_agent.pid().unwrap().to_string();
    let signal = |sig: &str| {
        let done = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
        assert!(done.success());
    };
    signal("-STOP");
    let shown = b.text_contains(&flaky_row, "reconnecting").await;
    assert!(
        b.js(&format!(
            "return document.querySelector(\"{flaky_row} td.reconnecting\") !== null"
        ))
        .await
            == true,
        "{shown}"
    );
    signal("-CONT");
    b.text_contains(&flaky_row, "online").await;
    drop(flaky_agent);
    // The filter narrows the list.
    b.find("#filter")
        .await
        .send_keys(&uuid[..10])
        .await
        .unwrap();
    let rows = b
        .js("return document.querySelectorAll('#devices tr').length")
        .await;
    assert_eq!(rows, 1);

    // A terminal to the device's real sshd.
    b.find(&row).await.click().await.unwrap();
    b.text_contains("#status", "online").await;
    let started = std::time::Instant::now();
    b.find("#start").await.click().await.unwrap();
    b.text_contains("#main", "Connected as root").await;
    b.text_contains(".xterm-rows", "root@").await;
    // Reported (README), not asserted: it depends on the machine and the build.
    eprintln!("time to prompt: {} ms", started.elapsed().as_millis());
    b.type_in_terminal("echo $((6*7))\n").await;
    b.text_contains(".xterm-rows", "42").await;
    let (rows, cols, shown) = stty_size(&b, "before").await;
    assert_eq!(rows, shown, "the PTY has the rows the page shows");
    // The window narrows: the terminal refits, and the shell's size follows (asked again
    // until the resize has gone through the relay to sshd, at most ten times).
    b.client.set_window_size(800, 900).await.unwrap();
    let mut after = (rows, cols, shown);
    for i in 0..10 {
        after = stty_size(&b, &format!("after{i}")).await;
        if after.1 != cols {
            break;
        }
    }
    let (rows2, cols2, shown2) = after;
    assert_eq!(rows2, shown2);
    assert!(
        cols2 < cols,
        "stty size did not follow: {cols} then {cols2} columns"
    );
    b.client.set_window_size(1280, 900).await.unwrap();
    b.type_in_terminal("clear; echo $((6*7)) from the browser\n")
        .await;
    b.text_contains(".xterm-rows", "42 from the browser").await;
    let target =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("../dashboard-terminal.png");
    b.screenshot(&target).await;
    // Expand fills the window; Collapse brings it back.
    b.find("#expand").await.click().await.unwrap();
    let expanded = b
        .js("return document.getElementById('terminal-box').classList.contains('expanded')")
        .await;
    assert_eq!(expanded, true);
    b.find("#collapse").await.click().await.unwrap();
    b.type_in_terminal("exit\n").await;
    b.text_contains("#main", "The session ended with status 0.")
        .await;
    // The device page lists the session as a terminal tunnel.
    b.text_contains("#tunnels", "terminal").await;

    // A service.
    b.find("#target")
        .await
        .select_by_value("service")
        .await
        .unwrap();
    b.find("#service").await.send_keys("main").await.unwrap();
    b.find("#start").await.click().await.unwrap();
    b.text_contains(".xterm-rows", "inside-main").await;
    b.text_contains("#main", "The session ended with status 5.")
        .await;

    // The offline device says so.
    b.client
        .goto(&format!("{base}#/device/{offline}"))
        .await
        .unwrap();
    b.text_contains("#status", "offline").await;
    b.find("#start").await.click().await.unwrap();
    b.text_contains("#main", "The device is not connected.")
        .await;

    // SSH keys: import from (the fake) GitHub, remove one, add one by pasting.
    b.client.goto(&format!("{base}#/keys")).await.unwrap();
    b.find("#github-login")
        .await
        .send_keys("octocat")
        .await
        .unwrap();
    b.find("#import-github button").await.click().await.unwrap();
    b.text_contains("#main", "Imported 3 keys; 1 invalid (line 3).")
        .await;
    b.count_becomes("#keys tr", 3).await;
    b.find("#keys tr button").await.click().await.unwrap();
    b.text_contains("#main", "Removed GitHub octocat.").await;
    b.count_becomes("#keys tr", 2).await;
    b.find("#key-title")
        .await
        .send_keys("pasted")
        .await
        .unwrap();
    b.find("#key-text")
        .await
        .send_keys(common::github::ED25519_A)
        .await
        .unwrap();
    b.find("#add-key button").await.click().await.unwrap();
    b.text_contains("#keys", "pasted").await;
    let (_, keys) = w
        .admin
        .as_user(&alice)
        .call("GET", "/v1/ssh-keys", None)
        .await;
    assert_eq!(
        keys.as_array().unwrap().len(),
        3,
        "the page's changes are the API's"
    );

    // Bob, of another fleet, sees neither the device nor a terminal.
    b.find("#logout").await.click().await.unwrap();
    b.login(&base, &bob).await;
    let listed = b
        .js("return document.getElementById('devices').textContent")
        .await;
    assert!(!listed.as_str().unwrap().contains(&uuid), "{listed}");
    b.client
        .goto(&format!("{base}#/device/{uuid}"))
        .await
        .unwrap();
    b.text_contains("#main", "not found").await;
    assert!(b.client.find(Locator::Css("#start")).await.is_err());
    // Admin pages are not offered to him.
    let admin_links = b
        .js("return [...document.querySelectorAll('nav .admin')].filter(a => !a.hidden).length")
        .await;
    assert_eq!(admin_links, 0);
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_terminal_on_a_phone_sized_window() {
    sshd::require();
    browser::require();
    let (w, uuid, _offline, alice, _bob, _sshd, _agent) = world().await;
    let base = format!("http://{}/", w.relay.api);
    let b = Browser::start(390, 844).await;
    b.login(&base, &alice).await;
    b.text_contains(&format!("#devices tr[data-uuid='{uuid}']"), "online")
        .await;
    let overflow = "return document.documentElement.scrollWidth > window.innerWidth";
    assert_eq!(
        b.js(overflow).await,
        false,
        "the device list fits the width"
    );
    open_terminal(&b, &base, &uuid).await;
    b.type_in_terminal("echo $((6*7))\n").await;
    b.text_contains(".xterm-rows", "42").await;
    let (rows, cols, shown) = stty_size(&b, "phone").await;
    assert_eq!(rows, shown);
    assert!(cols < 60, "a phone-width terminal: {cols} columns");
    assert_eq!(
        b.js(overflow).await,
        false,
        "the device page fits the width"
    );
    b.close().await;
}
