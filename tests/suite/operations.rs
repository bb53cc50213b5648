//! What operators run against a relay: the OpenAPI document through a real validator, a
//! real `/metrics` scrape through promtool (with running tunnels counted), the alert rules'
//! own unit tests, `--metrics-listen`, JSON logs that name the tunnel, and
//! `cloudlink healthcheck` for relay and agent.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::{echo_server, limits, require_tool, tunnel, Agent, Relay, World};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs a program; returns (success, stdout + stderr).
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let (ok, out, err) = run_split(program, args, stdin);
    (ok, format!("{out}{err}"))
}

/// Runs a program; returns (success, stdout, stderr).
fn run_split(program: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let mut pipe = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        pipe.write_all(text.as_bytes()).unwrap();
    }
    drop(pipe);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A file of the repository.
fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

async fn get(url: &str) -> (u16, String) {
    let response = common::http().get(url).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// The value of one series in a scrape (first match of the exact series text).
fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{series} not in the scrape:\n{scrape}"))
}

#[tokio::test]
async fn the_openapi_document_passes_a_real_validator() {
    require_tool("openapi-spec-validator");
    let w = World::new(&limits(""));
    let (status, doc) = get(&format!("http://{}/v1/openapi.json", w.relay.api)).await;
    assert_eq!(status, 200);
    let file = w.dir.path().join("openapi.json");
    std::fs::write(&file, &doc).unwrap();
    let (ok, out) = run("openapi-spec-validator", &[file.to_str().unwrap()], None);
    assert!(ok, "openapi-spec-validator: {out}");
    // What was wrong before: a query parameter declared as a path parameter.
    let doc: Value = serde_json::from_str(&doc).unwrap();
    let params = &doc["paths"]["/v1/tunnels"]["get"]["parameters"];
    assert!(
        params
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["in"] == "query"),
        "{params}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_scrape_is_clean_and_counts_running_tunnels() {
    require_tool("promtool");
    let w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let mut agent = Agent::start(&w.relay, &uuid, &key, &[]);
    let port = echo_server().await;
    let url = format!("http://{}/metrics", w.relay.api);

    // A tunnel that is still open has its bytes counted.
    let mut s = tunnel(w.relay.proxy, &w.relay.admin_key(), &uuid, port).await;
    let payload = vec![7u8; 300_000];
    s.write_all(&payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).await.unwrap();
    let (_, scrape) = get(&url).await;
    assert_eq!(sample(&scrape, "cloudlink_tunnels_open"), 1.0);
    assert!(sample(&scrape, "cloudlink_tunnel_bytes_total{direction=\"up\"}") >= 300_000.0);
    assert!(sample(&scrape, "cloudlink_tunnel_bytes_total{direction=\"down\"}") >= 300_000.0);
    assert_eq!(
        sample(
            &scrape,
            "cloudlink_tunnel_setup_seconds_count{route=\"local\"}"
        ),
        1.0
    );
    drop(s);
    // Its clean end takes the FINs and their acks both ways (PROTOCOL.md §2e): let it
    // finish before the device goes, or the tunnel would wait for the device to return.
    let closed = common::poll(common::TRANSFER_TIMEOUT, || async {
        let (_, scrape) = get(&url).await;
        (sample(&scrape, "cloudlink_tunnels_open") == 0.0).then_some(())
    })
    .await;
    assert!(closed.is_some(), "the closed tunnel is still counted open");

    // The device goes away: its link's end is counted by reason. A killed agent says
    // nothing; the relay sees it gone at the QUIC idle timeout (30 s), so wait past that.
    agent.kill();
    let scrape = common::poll(common::TRANSFER_TIMEOUT, || async {
        let (_, scrape) = get(&url).await;
        let ended: f64 = cloudlink::relay::metrics::DISCONNECT_REASONS
            .iter()
            .map(|r| {
                sample(
                    &scrape,
                    &format!("cloudlink_device_disconnects_total{{reason=\"{r}\"}}"),
                )
            })
            .sum();
        (ended >= 1.0 && sample(&scrape, "cloudlink_tunnels_open") == 0.0).then_some(scrape)
    })
    .await;
    let scrape = match scrape {
        Some(scrape) => scrape,
        None => panic!("no disconnect counted:\n{}", get(&url).await.1),
    };
    assert_eq!(
        sample(
            &scrape,
            &format!(
                "cloudlink_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    assert!(sample(&scrape, "process_resident_memory_bytes") > 0.0);
    assert!(
        sample(
            &scrape,
            "cloudlink_store_query_seconds_count{op=\"device_access\"}"
        ) >= 1.0
    );
    assert_eq!(
        sample(&scrape, "cloudlink_store_errors_total{kind=\"database\"}"),
        0.0
    );
    assert_eq!(sample(&scrape, "cloudlink_ready"), 1.0);

    let (ok, out) = run("promtool", &["check", "metrics"], Some(&scrape));
    assert!(
        ok && out.trim().is_empty(),
        "promtool check metrics:\n{out}"
    );
}

#[test]
fn the_alert_rules_load_and_pass_their_unit_tests() {
    require_tool("promtool");
    let dir = repo("deploy/prometheus");
    let (ok, out) = run(
        "promtool",
        &["check", "rules", dir.join("alerts.yml").to_str().unwrap()],
        None,
    );
    assert!(ok, "promtool check rules:\n{out}");
    assert!(out.contains("8 rules found"), "{out}");
    let (ok, out) = run(
        "promtool",
        &[
            "test",
            "rules",
            dir.join("alerts.test.yml").to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "promtool test rules:\n{out}");
}

#[tokio::test]
async fn metrics_listen_moves_metrics_off_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(
        &dir.path().join("data"),
        &["--metrics-listen", "127.0.0.1:0"],
        &[],
    );
    let metrics = relay.metrics.expect("the metrics listener is reported");
    let (status, body) = get(&format!("http://{metrics}/metrics")).await;
    assert_eq!(status, 200);
    assert!(body.contains("cloudlink_build_info"), "{body}");
    let (status, _) = get(&format!("http://{}/metrics", relay.api)).await;
    assert_eq!(status, 404, "/metrics is still on the API");
    let (status, _) = get(&format!("http://{}/healthz", relay.api)).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_name_the_tunnel_user_and_device() {
    let w = World::with(&limits(""), &["--log-format", "json"], &[]);
    let (uuid, key) = w.device_in("pis").await;
    let _agent = Agent::start(&w.relay, &uuid, &key, &[]);
    let port = echo_server().await;
    let mut s = tunnel(w.relay.proxy, &w.relay.admin_key(), &uuid, port).await;
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).await.unwrap();
    drop(s);
    let line = w.relay.stderr.wait_for("tunnel closed");
    let event: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(event["fields"]["message"], "tunnel closed", "{event}");
    let span = &event["span"];
    assert_eq!(span["name"], "tunnel", "{event}");
    assert_eq!(span["user"], "admin", "{event}");
    assert_eq!(span["device"], uuid.as_str(), "{event}");
    assert!(
        span["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{event}"
    );
    // Every line of the run is JSON, stdout's announcements included: a log shipper
    // reading the container's output reads nothing else. (The harness found the
    // addresses in the JSON listening line.)
    let stdout = w.relay.stdout.text();
    let announced: Vec<Value> = stdout.lines().map(json_or_panic).collect();
    assert!(
        announced
            .iter()
            .any(|e| e["fields"]["message"] == "bootstrap admin key written"
                && e["fields"]["path"]
                    .as_str()
                    .is_some_and(|p| p.ends_with("admin.key"))),
        "{stdout}"
    );
    assert!(
        announced
            .iter()
            .any(|e| e["fields"]["message"] == "relay listening"
                && e["fields"]["proxy"] == w.relay.proxy.to_string()
                && e["level"] == "INFO"),
        "{stdout}"
    );
    for line in w.relay.stderr.text().lines() {
        json_or_panic(line);
    }
    // The agent likewise (a second one for the device, which takes over).
    let agent = Agent::start(&w.relay, &uuid, &key, &["--log-format", "json"]);
    for line in agent.stderr.text().lines() {
        json_or_panic(line);
    }
}

fn json_or_panic(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// Under `--log-format json` the lines a role writes outside its logger are JSON too: a
/// warning about `RUST_LOG`, and the error it exits with (here: a port already taken),
/// for the relay and for the agent.
#[test]
fn json_logs_hold_warnings_and_fatal_errors_too() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let data = dir.path().join("data");
    let relay = Command::new(common::bin())
        .args(["--log-format", "json", "relay", "--data-dir"])
        .arg(&data)
        .args(["--api-listen", &taken, "--proxy-listen", "127.0.0.1:0"])
        .args(["--device-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "cloudlink=loud")
        .output()
        .unwrap();
    let agent = Command::new(common::bin())
        .args([
            "agent",
            "--log-format",
            "json",
            "--uuid",
            "0123456789abcdef",
        ])
        .args(["--relay", "127.0.0.1:1"])
        .env_remove("CLOUDLINK_DEVICE_KEY")
        .env("RUST_LOG", "cloudlink=loud")
        .output()
        .unwrap();
    for (role, out) in [("relay", relay), ("agent", agent)] {
        assert!(!out.status.success(), "{role} started");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<Value> = stderr.lines().map(json_or_panic).collect();
        assert!(
            String::from_utf8_lossy(&out.stdout).lines().all(|l| {
                json_or_panic(l);
                true
            }),
            "{role}"
        );
        assert!(
            lines.iter().any(|e| e["level"] == "WARN"
                && e["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("RUST_LOG"))),
            "{role}: {stderr}"
        );
        let last = lines
            .last()
            .unwrap_or_else(|| panic!("{role}: nothing on stderr"));
        assert_eq!(last["level"], "ERROR", "{role}: {stderr}");
        assert!(
            last["fields"]["message"].as_str().is_some(),
            "{role}: {stderr}"
        );
    }
}

/// Runs `cloudlink healthcheck ARGS` with only `env` set; returns (success, output).
fn healthcheck(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(common::bin())
        .arg("healthcheck")
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_checks_the_relay_over_http_and_tls_and_the_agents_link() {
    let mut w = World::new(&limits(""));
    let api = w.relay.api.to_string();
    let api_tls = w.relay.api_tls.unwrap().to_string();
    let data = w.relay.data_dir.to_str().unwrap().to_owned();
    let env = [
        ("CLOUDLINK_API_LISTEN", api.as_str()),
        ("CLOUDLINK_API_TLS_LISTEN", api_tls.as_str()),
        ("CLOUDLINK_DATA_DIR", data.as_str()),
    ];
    let (ok, out) = healthcheck(&[], &env);
    assert!(ok, "{out}");
    assert!(
        out.contains("ready") && out.contains("https://localhost:"),
        "{out}"
    );

    // TLS aware: a relay serving another certificate than its own fails the check.
    let other = tempfile::tempdir().unwrap();
    let stranger = Relay::start(&other.path().join("data"), &[], &[]);
    let (ok, out) = healthcheck(
        &["relay"],
        &[
            ("CLOUDLINK_API_LISTEN", api.as_str()),
            ("CLOUDLINK_API_TLS_LISTEN", api_tls.as_str()),
            ("CLOUDLINK_DATA_DIR", stranger.data_dir.to_str().unwrap()),
        ],
    );
    assert!(!ok, "a certificate the relay does not own passed: {out}");

    // The agent: healthy while its link is up, not once the relay is gone.
    let (uuid, key) = w.device_in("pis").await;
    let status = w.dir.path().join("agent-status");
    let status_arg = status.to_str().unwrap().to_owned();
    let mut agent = Agent::start(&w.relay, &uuid, &key, &["--status-file", &status_arg]);
    let agent_env = [("CLOUDLINK_AGENT_STATUS_FILE", status_arg.as_str())];
    let (ok, out) = healthcheck(&[], &agent_env);
    assert!(ok && out.starts_with("agent: up "), "{out}");
    // Stopped (it tells its devices), the relay is gone for good: the link stays down.
    w.relay.stop();
    let down = common::poll(common::EVENT_TIMEOUT, || async {
        let (ok, out) = healthcheck(&["agent"], &agent_env);
        (!ok).then_some(out)
    })
    .await;
    let out =
        down.unwrap_or_else(|| panic!("still healthy: {}", healthcheck(&["agent"], &agent_env).1));
    assert!(out.contains("not up"), "{out}");
    let (ok, out) = healthcheck(&["relay"], &env);
    assert!(!ok, "{out}");
    agent.kill();
}

/// The number after `key: ` in the first line that has it.
fn number_after(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(key)?
                .trim()
                .trim_matches('"')
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
}

#[test]
fn the_kubernetes_base_renders_and_validates_against_the_schemas() {
    require_tool("kubectl");
    require_tool("kubernetes-validate");
    let (ok, rendered, err) = run_split(
        "kubectl",
        &["kustomize", repo("deploy/k8s").to_str().unwrap()],
        None,
    );
    assert!(ok, "kubectl kustomize: {err}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, &rendered).unwrap();
    let (ok, out) = run(
        "kubernetes-validate",
        &["--strict", file.to_str().unwrap()],
        None,
    );
    assert!(ok, "kubernetes-validate:\n{out}");
    for kind in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ConfigMap",
        "Secret",
    ] {
        assert!(rendered.contains(&format!("kind: {kind}\n")), "no {kind}");
    }
    for wanted in [
        "replicas: 3",
        "readOnlyRootFilesystem: true",
        "runAsNonRoot: true",
        "path: /readyz",
        "path: /healthz",
        "clusterIP: None",
        "emptyDir:",
    ] {
        assert!(rendered.contains(wanted), "rendered base lacks {wanted:?}");
    }
    assert!(
        rendered.contains("CLOUDLINK_BOOTSTRAP_ADMIN_KEY:"),
        "no bootstrap key secret"
    );
    // SIGTERM drains for the shutdown grace; the kubelet's SIGKILL comes after.
    let grace = number_after(&rendered, "CLOUDLINK_SHUTDOWN_GRACE:");
    let termination = number_after(&rendered, "terminationGracePeriodSeconds:");
    assert!(
        termination > grace,
        "{termination} s is not above the {grace} s grace"
    );
    // The peer port is only on the headless Service.
    let peer_services = rendered
        .split("\n---\n")
        .filter(|doc| doc.contains("kind: Service\n") && doc.contains("port: 7000"))
        .collect::<Vec<_>>();
    assert_eq!(peer_services.len(), 1);
    assert!(peer_services[0].contains("clusterIP: None"));

    // The validator does reject a broken manifest (so its pass above means something).
    std::fs::write(&file, rendered.replace("replicas: 3", "replicas: three")).unwrap();
    let (ok, _) = run(
        "kubernetes-validate",
        &["--strict", file.to_str().unwrap()],
        None,
    );
    assert!(!ok, "kubernetes-validate passed replicas: three");
}

#[test]
fn the_systemd_units_verify_and_are_sandboxed() {
    require_tool("systemd-analyze");
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let installed = "/usr/local/bin/cloudlink";
    assert!(
        readme.contains(&format!("target/release/cloudlink {installed}")),
        "the README no longer installs to {installed}"
    );
    let dir = tempfile::tempdir().unwrap();
    for (unit, most) in [
        ("deploy/relay/cloudlink-relay.service", 3.0),
        ("deploy/device/cloudlink-agent.service", 3.0),
    ] {
        let text = std::fs::read_to_string(repo(unit)).unwrap();
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap();
        assert!(exec.starts_with(installed), "{unit}: {exec}");
        // verify checks that the binary exists: this test's, at the README's path's place.
        let name = Path::new(unit).file_name().unwrap();
        let copy = dir.path().join(name);
        std::fs::write(&copy, text.replace(installed, common::bin())).unwrap();
        let (ok, out) = run("systemd-analyze", &["verify", copy.to_str().unwrap()], None);
        assert!(
            ok && out.trim().is_empty(),
            "{unit}: systemd-analyze verify:\n{out}"
        );
        let (_, out) = run(
            "systemd-analyze",
            &["security", "--offline=yes", copy.to_str().unwrap()],
            None,
        );
        let exposure: f64 = out
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split(": ").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{unit}: no exposure level in:\n{out}"));
        assert!(exposure <= most, "{unit}: exposure {exposure} > {most}");
    }
    // The socket unit that binds 22 and 443 for the relay verifies beside its service.
    let socket = "deploy/relay/cloudlink-relay.socket";
    let copy = dir.path().join("cloudlink-relay.socket");
    std::fs::copy(repo(socket), &copy).unwrap();
    let (ok, out) = run("systemd-analyze", &["verify", copy.to_str().unwrap()], None);
    assert!(
        ok && out.trim().is_empty(),
        "{socket}: systemd-analyze verify:\n{out}"
    );
    let text = std::fs::read_to_string(repo(socket)).unwrap();
    for port in ["0.0.0.0:22", "0.0.0.0:443"] {
        assert!(
            text.contains(&format!("ListenStream={port}")),
            "{socket} binds no {port}"
        );
    }
}

/// A self-signed certificate for `localhost` written to `dir/NAME.{crt,key}`.
fn certificate(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// Whether a new TLS connection to the API at `addr` verifies against `ca` alone.
async fn trusted_by(addr: std::net::SocketAddr, ca: &Path) -> bool {
    let url = format!("https://localhost:{}/healthz", addr.port());
    let client = cloudlink::tls_client::http_client_builder(
        &url,
        cloudlink::tls_client::Trust::CaFile(ca),
        std::time::Duration::from_secs(10),
    )
    .unwrap()
    .resolve("localhost", addr)
    .build()
    .unwrap();
    client.get(&url).send().await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_reloads_on_change_and_sighup_without_dropping_tunnels() {
    let dir = tempfile::tempdir().unwrap();
    let (first, first_key) = certificate(dir.path(), "first");
    let served = dir.path().join("served.crt");
    let served_key = dir.path().join("served.key");
    std::fs::copy(&first, &served).unwrap();
    std::fs::copy(&first_key, &served_key).unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, limits("tls_reload_check_ms = 100")).unwrap();
    let relay = Relay::start(
        &dir.path().join("data"),
        &[
            "--config",
            config.to_str().unwrap(),
            "--tls-cert",
            served.to_str().unwrap(),
            "--tls-key",
            served_key.to_str().unwrap(),
        ],
        &[],
    );
    let api = common::Api::new(relay.api, &relay.admin_key());
    let (uuid, key) = api.register_device("pis").await;
    let agent = Agent::spawn_with(&[relay.device.to_string()], &first, &uuid, &key, &[], &[]);
    agent.stderr.wait_for("connected to relay");
    let port = echo_server().await;
    let mut open = tunnel(relay.proxy, &relay.admin_key(), &uuid, port).await;
    let api_tls = relay.api_tls.unwrap();
    assert!(trusted_by(api_tls, &first).await);

    // New files: new handshakes get the new certificate, the open tunnel and the device's
    // QUIC link (made under the old one) carry on.
    let (second, second_key) = certificate(dir.path(), "second");
    std::fs::copy(&second_key, &served_key).unwrap();
    std::fs::copy(&second, &served).unwrap();
    relay.stderr.wait_for("TLS certificate reloaded");
    assert!(trusted_by(api_tls, &second).await);
    assert!(!trusted_by(api_tls, &first).await);
    open.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    open.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");
    assert!(!agent.stderr.text().contains("relay link down"));

    // A half-written pair is refused and the served certificate kept.
    std::fs::write(&served_key, "not a key").unwrap();
    relay.stderr.wait_for("TLS certificate not reloaded");
    assert!(trusted_by(api_tls, &second).await);

    // SIGHUP reloads at once.
    let (third, third_key) = certificate(dir.path(), "third");
    std::fs::copy(&third, &served).unwrap();
    std::fs::copy(&third_key, &served_key).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &relay.pid().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    relay.stderr.wait_for("on_signal=true");
    assert!(trusted_by(api_tls, &third).await);
    open.write_all(b"and still").await.unwrap();
    let mut back = [0u8; 9];
    open.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"and still");
}

#[tokio::test]
async fn audit_rows_past_the_retention_are_deleted_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, limits("audit_prune_batch = 2")).unwrap();
    let config = config.to_str().unwrap().to_owned();
    // First at the default retention (90 days): nothing here is that old, so the rows
    // written below stay until the relay restarts with a day's retention.
    let mut relay = Relay::start(&dir.path().join("data"), &["--config", &config], &[]);
    let store = cloudlink::store::open(&cloudlink::store::sqlite::default_url(&relay.data_dir))
        .await
        .unwrap();
    let now = cloudlink::store::now_ms();
    for (i, age_hours) in [49, 48, 30, 26, 25, 2, 0].into_iter().enumerate() {
        let opened = now - age_hours * 3_600_000;
        let row = common::tunnel_row(&format!("t{i}"), 1, "admin", "d", opened);
        store.open_tunnel(&row).await.unwrap();
    }
    drop(store);
    // The relay prunes at start and every minute.
    relay.stop();
    let relay = Relay::start(
        &dir.path().join("data"),
        &["--config", &config, "--audit-retention", "1d"],
        &[],
    );
    relay
        .stderr
        .wait_for("deleted audit rows past the retention period rows=5");
    let api = common::Api::new(relay.api, &relay.admin_key());
    let (status, rows) = api.call("GET", "/v1/tunnels", None).await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["t6", "t5"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_the_relay_runs_restores_into_a_new_relay() {
    let w = World::new(&limits(""));
    let bob = w.user("bob").await;
    let (uuid, key) = w.device_in("pis").await;
    let backup = w.dir.path().join("backup.db");
    let data = w.relay.data_dir.to_str().unwrap().to_owned();
    let (ok, out) = run(
        common::bin(),
        &["backup", backup.to_str().unwrap(), "--data-dir", &data],
        None,
    );
    assert!(ok, "{out}");
    // Never over an existing file; never a Postgres store (pg_dump does that).
    let (ok, out) = run(
        common::bin(),
        &["backup", backup.to_str().unwrap(), "--data-dir", &data],
        None,
    );
    assert!(!ok && out.contains("exists"), "{out}");
    let (ok, out) = run(
        common::bin(),
        &[
            "backup",
            w.dir.path().join("pg.db").to_str().unwrap(),
            "--database-url",
            "postgres://localhost/cloudlink",
        ],
        None,
    );
    assert!(!ok && out.contains("pg_dump"), "{out}");

    // A new relay on the copy: the same users, keys and devices.
    let other = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", backup.display());
    let restored = Relay::start(&other.path().join("data"), &["--database-url", &url], &[]);
    assert!(
        !other.path().join("data/admin.key").exists(),
        "the restored store was bootstrapped again"
    );
    let as_bob = common::Api::new(restored.api, &bob);
    let (status, me) = as_bob.call("GET", "/v1/me", None).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["username"], "bob");
    let admin = common::Api::new(restored.api, &w.relay.admin_key());
    let (status, device) = admin
        .call("GET", &format!("/v1/devices/{uuid}"), None)
        .await;
    assert_eq!(status, 200, "{device}");
    let _agent = Agent::start(&restored, &uuid, &key, &[]);
}
