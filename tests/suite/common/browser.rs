//! Headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`):
//! a chromedriver process of the test's own, and a fantoccini client.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Long enough for a debug-build relay and a cold Chromium on two busy cores.
pub const WAIT: Duration = Duration::from_secs(30);

/// Requires Debian's chromium and chromium-driver (see [`super::require`]).
pub fn require() {
    let ok = Path::new(CHROMIUM).is_file() && Path::new(CHROMEDRIVER).is_file();
    super::require(ok, &format!("{CHROMIUM} and {CHROMEDRIVER}"));
}

/// A chromedriver and one browser session; both end when this is dropped.
pub struct Browser {
    driver: Child,
    pub client: Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and a headless Chromium of
    /// `width` × `height`.
    pub async fn start(width: u32, height: u32) -> Browser {
        // chromedriver takes no port 0: take a free one from the kernel, then hand it over.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        // Ready when it says so on stdout.
        let stdout = driver.stdout.take().unwrap();
        let lines = super::Lines::spawn(stdout, None);
        lines.wait_for("started successfully");
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage",
                    format!("--user-data-dir={}", profile.path().display()),
                    format!("--window-size={width},{height}"),
                ]
            }
        });
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps.as_object().unwrap().clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a WebDriver session");
        Browser {
            driver,
            client,
            _profile: profile,
        }
    }

    /// Waits for the element `css`.
    pub async fn find(&self, css: &str) -> Element {
        self.client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
    }

    /// Waits until the text of `css` contains `text`; returns the whole text.
    pub async fn text_contains(&self, css: &str, text: &str) -> String {
        self.text_matching(css, &format!("{text:?}"), |t| {
            t.contains(text).then(|| t.to_owned())
        })
        .await
    }

    /// Waits until `found` finds what it looks for in the text of `css` (`what` names it
    /// in the failure); returns what it found.
    pub async fn text_matching<T>(
        &self,
        css: &str,
        what: &str,
        found: impl Fn(&str) -> Option<T>,
    ) -> T {
        let deadline = std::time::Instant::now() + WAIT;
        let mut last = String::new();
        while std::time::Instant::now() < deadline {
            if let Ok(el) = self.client.find(Locator::Css(css)).await {
                if let Ok(t) = el.text().await {
                    if let Some(value) = found(&t) {
                        return value;
                    }
                    last = t;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{css} never showed {what}; it said {last:?}");
    }

    /// Waits until `n` elements match `css` (a list the page re-renders after a request).
    pub async fn count_becomes(&self, css: &str, n: usize) {
        let script = format!("return document.querySelectorAll({css:?}).length");
        let deadline = std::time::Instant::now() + WAIT;
        let mut last = serde_json::Value::Null;
        while std::time::Instant::now() < deadline {
            last = self.js(&script).await;
            if last == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{css} never matched {n} elements; last {last}");
    }

    /// Runs a script in the page and returns its value.
    pub async fn js(&self, script: &str) -> serde_json::Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    /// Logs in with an API key on the dashboard at `base`.
    pub async fn login(&self, base: &str, key: &str) {
        self.client.goto(base).await.unwrap();
        self.find("#api-key").await.send_keys(key).await.unwrap();
        self.find("#login button[type=submit]")
            .await
            .click()
            .await
            .unwrap();
        self.find("#devices").await;
    }

    /// Types into the open terminal.
    pub async fn type_in_terminal(&self, text: &str) {
        self.find(".xterm-helper-textarea")
            .await
            .send_keys(text)
            .await
            .unwrap();
    }

    /// Saves a PNG of the window.
    pub async fn screenshot(&self, path: &Path) {
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// Ends the session and the driver.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
