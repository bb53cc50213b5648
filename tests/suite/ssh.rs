//! SSH with cloud keys, end to end: OpenSSH's `ssh` and `sshd`, the relay and the agent.
//!
//! The device's sshd asks `cloudlink agent authorized-keys %u` for the keys of the local
//! login name; the test logs in as `root` (the one account sure to exist), so the cloud user
//! is called `root` too.

use crate::common;

use common::sshd::ssh_opts;
use common::{cli_in, limits, sshd, Agent, World};
use serde_json::json;

/// Runs `cloudlink device ssh` with `script` on stdin; returns (success, stdout, stderr).
fn device_ssh(
    xdg: &std::path::Path,
    uuid: &str,
    port: u16,
    key: &std::path::Path,
    login: Option<&str>,
    script: &str,
) -> (bool, String, String) {
    let port = port.to_string();
    let mut args = vec!["device", "ssh", uuid, "--port", &port];
    if let Some(login) = login {
        args.extend(["-l", login]);
    }
    args.push("--");
    let opts = ssh_opts(key);
    args.extend(opts.iter().map(String::as_str));
    cli_in(xdg, &args, Some(script.as_bytes()))
}

/// A cloud user `name` logged in with its own CLI profile, who adds a new key pair with
/// `cloudlink key add`; returns that profile's directory, the private key and the key's id.
async fn cloud_user_with_key(
    w: &World,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let api_key = w.user(name).await;
    let xdg = w.dir.path().join(format!("xdg-{name}"));
    w.login_in(&xdg, &api_key);
    let keys = w.dir.path().join(format!("keys-{name}"));
    std::fs::create_dir_all(&keys).unwrap();
    let (key, key_id) = add_key(&xdg, &keys, "ed25519");
    (xdg, key, key_id)
}

/// Makes a key pair of `kind` in `dir` and adds it with `cloudlink key add` in the
/// profile `xdg`; returns the private key and the key's id.
fn add_key(
    xdg: &std::path::Path,
    dir: &std::path::Path,
    kind: &str,
) -> (std::path::PathBuf, String) {
    let key = sshd::user_key_of(dir, kind);
    let pubkey = key.with_extension("pub");
    let (ok, out, err) = cli_in(
        xdg,
        &["--json", "key", "add", pubkey.to_str().unwrap()],
        None,
    );
    assert!(ok, "{err}");
    let key_id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"].to_string();
    (key, key_id)
}

// Multi-threaded: the test waits on child processes while the sshd listener keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_with_cloud_keys_through_relay_and_agent() {
    sshd::require();
    let w = World::new(&limits(""));
    let (uuid, device_key) = w.device_in("pis").await;
    let (s, _) = w
        .admin
        .call("POST", "/v1/fleets", Some(json!({"name": "other"})))
        .await;
    assert_eq!(s, 201);
    let sshd = sshd::Sshd::start(w.relay.api, &uuid, &device_key).await;
    let _agent = Agent::start(
        &w.relay,
        &uuid,
        &device_key,
        &["--allow-port", &sshd.port.to_string()],
    );

    // The cloud user `root` adds their key with the CLI, and belongs to another fleet only.
    let (root_xdg, key, key_id) = cloud_user_with_key(&w, "root").await;
    w.admin.add_member("other", "root").await;

    // The admin reaches the device; sshd refuses root, whose fleet this is not.
    w.login(&w.relay.admin_key());
    let (ok, _, err) = device_ssh(
        &w.xdg(),
        &uuid,
        sshd.port,
        &key,
        Some("root"),
        "echo hi; exit\n",
    );
    assert!(!ok, "a user of another fleet logged in");
    assert!(err.contains("Permission denied"), "{err}\n{}", sshd.log());

    // Made a member, root logs in; the command runs on the "device".
    w.admin.add_member("pis", "root").await;
    let (ok, out, err) = device_ssh(
        &w.xdg(),
        &uuid,
        sshd.port,
        &key,
        Some("root"),
        "echo via-relay-$((40 + 2)); exit\n",
    );
    assert!(ok, "ssh failed: {err}\n{}", sshd.log());
    assert_eq!(out.trim(), "via-relay-42");

    // Root's own CLI login: the login name defaults to the cloud username.
    let (ok, out, err) = device_ssh(&root_xdg, &uuid, sshd.port, &key, None, "whoami\n");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "root");

    // `device tunnel` plus plain ssh works the same.
    let specs = [format!("{}:0", sshd.port)];
    let (mut tunnel, _lines, local) =
        common::device_tunnel(&w.xdg(), &uuid, &specs, std::process::Stdio::inherit());
    let local = local[0];
    let out = std::process::Command::new("ssh")
        .args(ssh_opts(&key))
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args([
            "-p",
            &local.port().to_string(),
            "root@127.0.0.1",
            "echo plain-ssh",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "plain-ssh");
    let _ = tunnel.kill();
    let _ = tunnel.wait();

    // The device's host key is remembered per uuid; a changed key is refused loudly.
    sshd.write_config("host_b");
    let (ok, _, err) = device_ssh(&w.xdg(), &uuid, sshd.port, &key, Some("root"), "exit\n");
    assert!(!ok);
    assert!(
        err.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
            || err.contains("Host key verification failed"),
        "{err}"
    );
    sshd.write_config("host_a");

    // After `cloudlink key rm` the login fails at once.
    let (ok, _, err) = cli_in(&root_xdg, &["key", "rm", &key_id], None);
    assert!(ok, "{err}");
    let (ok, _, err) = device_ssh(&w.xdg(), &uuid, sshd.port, &key, Some("root"), "exit\n");
    assert!(!ok, "a removed key still logs in");
    assert!(err.contains("Permission denied"), "{err}");
}

const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAII/Hvbt8FLxaYtdZv3WeFjGcQvtgFIyIyn5kLztvBv4O test@cloudlink";

/// Runs `cloudlink agent authorized-keys` with an agent config; returns (success, stdout).
fn authorized_keys(config: &std::path::Path, user: &str) -> (bool, String, String) {
    let out = std::process::Command::new(common::bin())
        .args(["agent", "authorized-keys", user, "--config"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorized_keys_answers_only_for_users_who_may_reach_the_device() {
    let mut w = World::new(&limits(""));
    let (uuid, device_key) = w.device_in("pis").await;
    let (_, other_key) = w.device_in("other").await;
    let alice = w.admin.as_user(&w.user("alice").await);
    let (s, k) = alice
        .call(
            "POST",
            "/v1/ssh-keys",
            Some(json!({"title": "t", "public_key": ED25519})),
        )
        .await;
    assert_eq!(s, 201);
    w.admin.add_member("pis", "alice").await;

    // The device API, as balenaOS's stock script calls it.
    let device = |key: &str| w.admin.as_user(key);
    let (s, body) = device(&device_key)
        .call("GET", "/auth/v1/public-keys/alice", None)
        .await;
    assert_eq!(
        (s, body.as_str().unwrap()),
        (200, format!("{ED25519}\n").as_str())
    );
    let (s, body) = device(&other_key)
        .call("GET", "/auth/v1/public-keys/alice", None)
        .await;
    assert_eq!(
        (s, body.as_str().unwrap()),
        (200, ""),
        "not alice's fleet: no keys"
    );
    let (s, body) = device(&device_key)
        .call("GET", "/auth/v1/public-keys/nobody", None)
        .await;
    assert_eq!(
        (s, body.as_str().unwrap()),
        (200, ""),
        "no such user: same empty answer"
    );
    let (s, _) = device("wrong")
        .call("GET", "/auth/v1/public-keys/alice", None)
        .await;
    assert_eq!(s, 401);
    let (s, _) = device(&w.relay.admin_key())
        .call("GET", "/auth/v1/public-keys/alice", None)
        .await;
    assert_eq!(s, 401, "a user's key is not a device key");

    // The agent command prints exactly the keys.
    let config = w.dir.path().join("agent.toml");
    let cache = w.dir.path().join("keys-cache");
    // Over the HTTPS API, trusting the relay's certificate as the device link does.
    let api_port = w.relay.api_tls.expect("HTTPS API").port();
    let ca = w.relay.cert();
    let write = |cache_dir: Option<&std::path::Path>| {
        let mut text = format!(
            "api = \"https://localhost:{api_port}\"\nca = \"{}\"\nuuid = \"{uuid}\"\n\
             key = \"{device_key}\"\nauthorized_keys_timeout_secs = 2\n",
            ca.display()
        );
        if let Some(dir) = cache_dir {
            text.push_str(&format!(
                "authorized_keys_cache_dir = \"{}\"\n",
                dir.display()
            ));
        }
        std::fs::write(&config, text).unwrap();
    };
    write(None);
    let (ok, out, _) = authorized_keys(&config, "alice");
    assert!(ok);
    assert_eq!(out, format!("{ED25519}\n"));
    let (ok, out, _) = authorized_keys(&config, "../etc/passwd");
    assert!(ok && out.is_empty());
    // Without the CA the relay is not trusted: no keys, and the reason is said.
    let untrusting = w.dir.path().join("agent-untrusting.toml");
    std::fs::write(
        &untrusting,
        format!(
            "api = \"https://localhost:{api_port}\"\nuuid = \"{uuid}\"\n\
             key = \"{device_key}\"\n"
        ),
    )
    .unwrap();
    let (ok, out, err) = authorized_keys(&untrusting, "alice");
    assert!(!ok && out.is_empty());
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // Revocation is prompt: membership removed, then re-added, then the key removed.
    let (s, _) = w
        .admin
        .call("DELETE", "/v1/fleets/pis/members/alice", None)
        .await;
    assert_eq!(s, 204);
    assert_eq!(authorized_keys(&config, "alice").1, "");
    w.admin.add_member("pis", "alice").await;
    write(Some(&cache));
    assert_eq!(authorized_keys(&config, "alice").1, format!("{ED25519}\n"));

    // The relay goes away: with the cache configured, the last good answer is served…
    w.relay.stop();
    let (ok, out, err) = authorized_keys(&config, "alice");
    assert!(ok, "{err}");
    assert_eq!(out, format!("{ED25519}\n"));
    // …without it, the command fails closed: no keys, a message on stderr, a failure code.
    write(None);
    let (ok, out, err) = authorized_keys(&config, "alice");
    assert!(!ok);
    assert!(out.is_empty());
    assert!(err.contains("cannot reach the relay"), "{err}");

    // Back up, a removed key is gone from the very next answer.
    w.relay.restart();
    let (s, _) = alice
        .call("DELETE", &format!("/v1/ssh-keys/{}", k["id"]), None)
        .await;
    assert_eq!(s, 204);
    assert_eq!(authorized_keys(&config, "alice").1, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_logins_answer_every_user_who_may_reach_the_device() {
    const ED25519_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFyLreSuR5YxOlt0757aSI/evzptYczk1HjS8BFScZ/A";
    const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBLJiakeNo6367eo9DmcxFARDDSkr1+lGrgvyGAM0LLXHKupGeiSrq9I8jTda3bzo4snOHhKOn7Jxt34vXqwbnAg=";
    let w = World::new(&limits(""));
    let (uuid, device_key) = w.device_in("pis").await;
    let _ = w.device_in("other").await;
    for (user, fleet, key) in [
        ("alice", "pis", ED25519),
        ("bob", "pis", ED25519_B),
        ("carol", "other", ECDSA),
    ] {
        let api = w.admin.as_user(&w.user(user).await);
        let (s, _) = api
            .call(
                "POST",
                "/v1/ssh-keys",
                Some(json!({"title": "t", "public_key": key})),
            )
            .await;
        assert_eq!(s, 201);
        w.admin.add_member(fleet, user).await;
    }
    let body = |s: &str| s.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    let expected = format!("{} alice\n{} bob\n", body(ED25519), body(ED25519_B));

    let config = w.dir.path().join("agent.toml");
    let write = |root_login: &str| {
        std::fs::write(
            &config,
            format!(
                "api = \"http://{}\"\nuuid = \"{uuid}\"\nkey = \"{device_key}\"\n{root_login}",
                w.relay.api
            ),
        )
        .unwrap()
    };
    // Off (the default): `root` is only a cloud user named root, and there is none.
    write("");
    assert_eq!(
        authorized_keys(&config, "root"),
        (true, String::new(), String::new())
    );
    write("root_login = \"fleet-members\"\n");
    let (ok, out, err) = authorized_keys(&config, "root");
    assert!(ok, "{err}");
    assert_eq!(
        out, expected,
        "fleet members' keys, each named; not carol's"
    );
    // Other accounts keep the per-user mapping.
    assert_eq!(authorized_keys(&config, "alice").1, format!("{ED25519}\n"));
    // The fleet's port rule applies as to a CONNECT: no 22222, no keys.
    let (s, _) = w
        .admin
        .call(
            "PATCH",
            "/v1/fleets/pis",
            Some(json!({"allowed_ports": [80]})),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(authorized_keys(&config, "root").1, "");
    // A bad setting is refused, not guessed at.
    write("root_login = \"everyone\"\n");
    let (ok, out, err) = authorized_keys(&config, "root");
    assert!(!ok && out.is_empty() && err.contains("root_login"), "{err}");
}

/// An ssh_config for the gateway tests: `-F` reaches the ProxyJump hop too, where `-o`
/// options given on the command line do not.
pub fn jump_config(dir: &std::path::Path, key: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("jump_config");
    std::fs::write(
        &path,
        format!(
            "Host *\n  IdentityFile {}\n  IdentitiesOnly yes\n  BatchMode yes\n  \
             StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  \
             ConnectTimeout 20\n",
            key.display()
        ),
    )
    .unwrap();
    path
}

/// Runs `ssh -J` through the gateway at `gateway` as cloud user `user` to `target`, with
/// `command`; returns (success, stdout, stderr).
fn jump(
    config: &std::path::Path,
    gateway: std::net::SocketAddr,
    user: &str,
    target: &str,
    command: &str,
) -> (bool, String, String) {
    let out = std::process::Command::new("ssh")
        .args(["-F", config.to_str().unwrap()])
        .args(["-J", &format!("{user}@{gateway}")])
        .args(["-p", "22222", target, command])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// Multi-threaded: the test waits on child processes while the sshd listener keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxyjump_through_the_gateway_with_cloud_keys() {
    sshd::require();
    let w = World::with(&limits(""), &["--ssh-listen", "127.0.0.1:0"], &[]);
    let gateway = w
        .relay
        .ssh
        .expect("the relay says where the gateway listens");
    let (uuid, _, sshd, _agent) = sshd::device_with_sshd(&w, "pis").await;
    let (s, _) = w
        .admin
        .call("POST", "/v1/fleets", Some(json!({"name": "other"})))
        .await;
    assert_eq!(s, 201);

    // The cloud user `root`, with a key, in another fleet only.
    let (root_xdg, key, key_id) = cloud_user_with_key(&w, "root").await;
    w.admin.add_member("other", "root").await;
    let config = jump_config(w.dir.path(), &key);
    let target = format!("root@{uuid}.balena");

    // Not their fleet: the gateway lets them in but the jump to the device is refused,
    // as an unknown device would be.
    let (ok, _, err) = jump(&config, gateway, "root", &target, "echo hi");
    assert!(!ok, "a user of another fleet jumped to the device");
    // OpenSSH's -W reports a refused channel in these words only.
    assert!(err.contains("stdio forwarding failed"), "{err}");
    let unknown = format!("root@{}.balena", "0".repeat(32));
    let (ok, _, err_unknown) = jump(&config, gateway, "root", &unknown, "echo hi");
    assert!(!ok);
    assert_eq!(
        err_unknown, err,
        "an unknown device reads like a forbidden one"
    );

    // A wrong cloud username with the same key does not log in at all.
    let (ok, _, err) = jump(&config, gateway, "nobody", &target, "echo hi");
    assert!(!ok, "an unknown user logged in to the gateway");
    assert!(err.contains("Permission denied"), "{err}");

    // A member now: ssh -J reaches the device's sshd, end to end; the command's exit
    // status comes back.
    w.admin.add_member("pis", "root").await;
    let (ok, out, err) = jump(&config, gateway, "root", &target, "echo jumped-$((40 + 2))");
    assert!(ok, "ssh -J failed: {err}\n{}", sshd.log());
    assert_eq!(out.trim(), "jumped-42");
    let (ok, _, _) = jump(&config, gateway, "root", &target, "exit 3");
    assert!(!ok, "the device's exit status is lost");

    // scp -J, 8 MiB each way, byte for byte (the inner session is end to end). `-O`: the
    // test device's sshd has no sftp subsystem, so scp uses its own protocol.
    let data = common::random_bytes(8 << 20, 25);
    let here = w.dir.path().join("up.bin");
    std::fs::write(&here, &data).unwrap();
    let there = w.dir.path().join("on-device.bin");
    let back = w.dir.path().join("down.bin");
    let scp = |from: String, to: String| {
        let out = std::process::Command::new("scp")
            .args(["-F", config.to_str().unwrap()])
            .args(["-J", &format!("root@{gateway}")])
            .args(["-O", "-P", "22222", "-q", &from, &to])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "scp {from} {to}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    scp(
        here.display().to_string(),
        format!("{target}:{}", there.display()),
    );
    scp(
        format!("{target}:{}", there.display()),
        back.display().to_string(),
    );
    assert!(
        std::fs::read(&back).unwrap() == data,
        "scp -J changed the bytes"
    );

    // sftp -J (the device's sshd has the sftp subsystem) and rsync over ssh -J.
    let sftp_back = w.dir.path().join("sftp-back.bin");
    let batch = w.dir.path().join("sftp-batch");
    std::fs::write(
        &batch,
        format!(
            "put {} {there}.sftp\nget {there}.sftp {}\n",
            here.display(),
            sftp_back.display(),
            there = there.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new("sftp")
        .args(["-F", config.to_str().unwrap()])
        .args(["-J", &format!("root@{gateway}")])
        .args(["-P", "22222", "-q", "-b", batch.to_str().unwrap(), &target])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sftp -J: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(&sftp_back).unwrap() == data,
        "sftp -J changed the bytes"
    );
    let rsync_back = w.dir.path().join("rsync-back.bin");
    let rsh = format!("ssh -F {} -J root@{gateway} -p 22222", config.display());
    for (from, to) in [
        (
            here.display().to_string(),
            format!("{target}:{}.rsync", there.display()),
        ),
        (
            format!("{target}:{}.rsync", there.display()),
            rsync_back.display().to_string(),
        ),
    ] {
        let out = std::process::Command::new("rsync")
            .args(["-e", &rsh, "-q", &from, &to])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rsync {from} {to}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        std::fs::read(&rsync_back).unwrap() == data,
        "rsync changed the bytes"
    );

    // A short uuid names the device as the full one does.
    let short = format!("root@{}.balena", &uuid[..8]);
    let (ok, out, err) = jump(&config, gateway, "root", &short, "echo short");
    assert!(ok, "ssh -J to a short uuid: {err}");
    assert_eq!(out.trim(), "short");

    // The audit log names the jump.
    let (s, body) = w.admin.call("GET", "/v1/tunnels", None).await;
    assert_eq!(s, 200);
    assert!(
        body.to_string().contains("\"jump\""),
        "no audit row of kind jump: {body}"
    );

    // An open session is cut when its key is removed (revalidation, within seconds).
    let mut open = std::process::Command::new("ssh")
        .args(["-F", config.to_str().unwrap()])
        .args(["-J", &format!("root@{gateway}")])
        .args(["-p", "22222", &target, "echo open; sleep 60"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = common::Lines::spawn(open.stdout.take().unwrap(), None);
    lines.wait_for("open");
    let (ok, _, err) = cli_in(&root_xdg, &["key", "rm", &key_id], None);
    assert!(ok, "{err}");
    let ended = common::poll(std::time::Duration::from_secs(20), || {
        let done = open.try_wait().ok().flatten().is_some();
        async move { done.then_some(()) }
    })
    .await;
    if ended.is_none() {
        let _ = open.kill();
    }
    let _ = open.wait();
    assert!(ended.is_some(), "a removed key's jump session stayed open");
    let (ok, _, err) = jump(&config, gateway, "root", &target, "echo hi");
    assert!(!ok, "a removed key still logs in to the gateway");
    assert!(err.contains("Permission denied"), "{err}");
}

/// Plain `ssh` to the gateway itself as `user`; returns (success, stderr).
fn gateway_login(
    config: &std::path::Path,
    gateway: std::net::SocketAddr,
    user: &str,
) -> (bool, String) {
    let out = std::process::Command::new("ssh")
        .args(["-F", config.to_str().unwrap()])
        .args(["-p", &gateway.port().to_string()])
        .arg(format!("{user}@{}", gateway.ip()))
        .arg("true")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_throttles_failed_logins_and_says_what_it_serves() {
    sshd::require();
    let w = World::with(
        "[limits]\nauth_failures_per_minute = 2\n",
        &["--ssh-listen", "127.0.0.1:0"],
        &[],
    );
    let gateway = w
        .relay
        .ssh
        .expect("the relay says where the gateway listens");
    let (_, key, _) = cloud_user_with_key(&w, "root").await;
    let config = jump_config(w.dir.path(), &key);

    // Two connections that never log in are two failed attempts, then the address is
    // throttled: its next wrong key ends the connection at once.
    for _ in 0..2 {
        let (ok, err) = gateway_login(&config, gateway, "nobody");
        assert!(!ok);
        assert!(err.contains("Permission denied"), "{err}");
    }
    let (ok, err) = gateway_login(&config, gateway, "nobody");
    assert!(!ok);
    assert!(
        !err.contains("Permission denied"),
        "a throttled address went on trying: {err}"
    );

    // A valid key still logs in from that address; a command the gateway does not serve
    // is refused, saying what it serves.
    let (ok, err) = gateway_login(&config, gateway, "root");
    assert!(!ok, "the gateway ran a command of its own");
    assert!(err.contains("usage: host <device>"), "{err}");
}

/// `ssh` to the gateway itself as `user` with `command` (balena's `host …`/`enter …`),
/// `stdin` piped in, `tty` forcing a PTY (`-tt`); returns (exit code, stdout, stderr).
pub fn gateway_run(
    config: &std::path::Path,
    gateway: std::net::SocketAddr,
    user: &str,
    command: &str,
    stdin: &str,
    tty: bool,
) -> (i32, String, String) {
    use std::io::Write;
    let mut cmd = std::process::Command::new("ssh");
    cmd.args(["-F", config.to_str().unwrap()]);
    if tty {
        cmd.arg("-tt");
    }
    let mut child = cmd
        .args(["-p", &gateway.port().to_string()])
        .arg(format!("{user}@{}", gateway.ip()))
        .arg(command)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What the gateway tests start from: a relay (the harness gives it a gateway on port 0),
/// a device with a real sshd in fleet `pis`, and the cloud user `root`, a member, with a
/// key and an ssh_config for it. Bind `w` and `_agent` where it is taken apart: a field
/// left to `..` is dropped at once, and with it the relay or the device.
struct GatewayWorld {
    w: World,
    gateway: std::net::SocketAddr,
    uuid: String,
    sshd: sshd::Sshd,
    _agent: Agent,
    root_xdg: std::path::PathBuf,
    key: std::path::PathBuf,
    config: std::path::PathBuf,
}

async fn gateway_world() -> GatewayWorld {
    sshd::require();
    let w = World::new(&limits(""));
    let gateway = w
        .relay
        .ssh
        .expect("the relay says where the gateway listens");
    let (uuid, _, sshd, agent) = sshd::device_with_sshd(&w, "pis").await;
    let (root_xdg, key, _) = cloud_user_with_key(&w, "root").await;
    w.admin.add_member("pis", "root").await;
    let config = jump_config(w.dir.path(), &key);
    GatewayWorld {
        w,
        gateway,
        uuid,
        sshd,
        _agent: agent,
        root_xdg,
        key,
        config,
    }
}

// Multi-threaded: the test waits on child processes while the sshd listener keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_enter_sessions_through_the_gateway() {
    let GatewayWorld {
        w,
        gateway,
        uuid,
        sshd,
        root_xdg,
        config,
        _agent,
        ..
    } = gateway_world().await;
    let run = |command: &str, stdin: &str, tty: bool| {
        gateway_run(&config, gateway, "root", command, stdin, tty)
    };

    // A command after the uuid runs on the device's host OS as given; its stdout, stderr
    // and exit status come back apart.
    let (code, out, err) = run(
        &format!("host {uuid} echo out-$((6*7)); echo err >&2; exit 4"),
        "",
        false,
    );
    assert_eq!((code, out.trim()), (4, "out-42"), "{err}\n{}", sshd.log());
    assert_eq!(err.trim(), "err");
    // Piped: the shell reads its commands from stdin, without a PTY.
    let (code, out, err) = run(
        &format!("host {uuid}"),
        "tty || echo piped-$((1+1)); exit 6\n",
        false,
    );
    assert_eq!(code, 6, "{err}");
    assert!(
        out.contains("not a tty") && out.contains("piped-2"),
        "{out}"
    );
    // With a PTY (`ssh -t`, as the balena CLI runs it): the shell has a terminal.
    let (code, out, err) = run(&format!("host {uuid}"), "tty; exit 7\n", true);
    assert_eq!(code, 7, "{err}");
    assert!(out.contains("/dev/pts/"), "{out}");

    // A short uuid and a device name name the device too (a name here reaches admission,
    // which says the device has never connected).
    let (code, out, err) = run(&format!("host {} echo short", &uuid[..8]), "", false);
    assert_eq!((code, out.trim()), (0, "short"), "{err}");
    let (s, named) = w
        .admin
        .call(
            "POST",
            "/v1/fleets/pis/devices",
            Some(json!({"name": "pi-kitchen"})),
        )
        .await;
    assert_eq!(s, 201, "{named}");
    let (code, _, err) = run("host pi-kitchen true", "", false);
    assert_eq!(code, 1);
    assert!(err.contains("never connected"), "{err}");

    // The balena CLI's way into a service: find the container with `host … ps`, then
    // `enter` it; the container id is checked before it reaches the device.
    let ps = r#""$(if [ -f /usr/bin/balena ]; then echo "balena"; else echo "docker"; fi)" ps --format "{{.ID}} {{.Names}}""#;
    let (code, out, err) = run(&format!("host {uuid} {ps}"), "", false);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!("{} main_1_1_localrelease", sshd::CONTAINER)
    );
    let (code, out, err) = run(
        &format!("enter {uuid} {}", sshd::CONTAINER),
        "echo in-container; exit 9\n",
        false,
    );
    assert_eq!(code, 9, "{err}");
    assert!(
        err.contains("tty=no") && out.contains("in-container"),
        "{out}\n{err}"
    );
    let (code, out, err) = run(
        &format!("enter {uuid} {}", sshd::CONTAINER),
        "exit 3\n",
        true,
    );
    assert_eq!(code, 3, "{out}\n{err}");
    assert!(
        out.contains("tty=yes"),
        "a PTY session entered without one: {out}"
    );
    let (code, _, err) = run(&format!("enter {uuid} deadbeef0000"), "", false);
    assert_eq!(code, 1);
    assert!(err.contains("No such container"), "{err}");
    let (code, _, err) = run(&format!("enter {uuid} $(id)"), "", false);
    assert_eq!(code, 2);
    assert!(err.contains("not a container id"), "{err}");
    let (code, _, err) = run("uptime", "", false);
    assert_eq!(code, 2);
    assert!(err.contains("usage: host <device>"), "{err}");

    // RSA and ECDSA keys log in as Ed25519 ones do.
    for kind in ["rsa", "ecdsa"] {
        let dir = w.dir.path().join(kind);
        std::fs::create_dir_all(&dir).unwrap();
        let (other, _) = add_key(&root_xdg, &dir, kind);
        let config = jump_config(&dir, &other);
        let (code, out, err) = gateway_run(
            &config,
            gateway,
            "root",
            &format!("host {uuid} echo {kind}"),
            "",
            false,
        );
        assert_eq!((code, out.trim()), (0, kind), "{kind}: {err}");
    }

    // Another fleet's user is refused, and an unknown device reads the same.
    let (_, bob_key, _) = cloud_user_with_key(&w, "bob").await;
    let bob = jump_config(bob_key.parent().unwrap(), &bob_key);
    let (code, _, err) = gateway_run(
        &bob,
        gateway,
        "bob",
        &format!("host {uuid} true"),
        "",
        false,
    );
    assert_eq!(code, 1);
    assert!(err.contains("You may not reach that device"), "{err}");
    let unknown = "0".repeat(32);
    let (_, _, err_unknown) = gateway_run(
        &bob,
        gateway,
        "bob",
        &format!("host {unknown} true"),
        "",
        false,
    );
    assert_eq!(
        err_unknown, err,
        "an unknown device reads like a forbidden one"
    );
    let (_, _, err_name) = gateway_run(
        &bob,
        gateway,
        "bob",
        &format!("host {} true", &uuid[..8]),
        "",
        false,
    );
    assert_eq!(
        err_name, err,
        "another fleet's short uuid reads like an unknown one"
    );

    // The audit log and the metrics name the kind.
    let (s, body) = w.admin.call("GET", "/v1/tunnels", None).await;
    assert_eq!(s, 200);
    assert!(body.to_string().contains("\"ssh-gateway\""), "{body}");
    let metrics = reqwest::get(format!("http://{}/metrics", w.relay.api))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.lines().any(|l| l
            .starts_with("cloudlink_tunnels_admitted_total{kind=\"ssh-gateway\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );

    // An open session is cut when the user leaves the fleet, with a line saying so.
    let err = session_until_cut(&config, gateway, &uuid, || async {
        let (s, _) = w
            .admin
            .call("DELETE", "/v1/fleets/pis/members/root", None)
            .await;
        assert_eq!(s, 204);
    })
    .await;
    assert!(err.contains("access to this device has ended"), "{err}");
}

/// Opens `host <uuid>` through the gateway as `root`, waits until it runs, then `revoke`s
/// something; returns the session's stderr once it has ended (it must end within 20 s).
pub async fn session_until_cut<F, Fut>(
    config: &std::path::Path,
    gateway: std::net::SocketAddr,
    uuid: &str,
    revoke: F,
) -> String
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut open = std::process::Command::new("ssh")
        .args(["-F", config.to_str().unwrap()])
        .args(["-p", &gateway.port().to_string()])
        .arg(format!("root@{}", gateway.ip()))
        .arg(format!("host {uuid} echo open; sleep 60"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = common::Lines::spawn(open.stdout.take().unwrap(), None);
    lines.wait_for("open");
    revoke().await;
    let ended = common::poll(std::time::Duration::from_secs(20), || {
        let done = open.try_wait().ok().flatten();
        async move { done }
    })
    .await;
    if ended.is_none() {
        let _ = open.kill();
    }
    let out = open.wait_with_output().unwrap();
    assert!(ended.is_some(), "a revoked gateway session stayed open");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Drives `ssh -t` to the gateway in a real terminal (Python's `pty`, which sets its size
/// as a terminal emulator would): checks the size the shell sees, resizes the terminal,
/// interrupts a foreground program with Ctrl-C, and exits with a status. Prints the
/// terminal's output; exits with ssh's status, or 100 + the step that timed out.
const PTY_DRIVER: &str = r#"
import os, pty, sys, time, fcntl, termios, struct, select
def size(fd, rows, cols):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
pid, fd = pty.fork()
if pid == 0:
    size(0, 30, 100)
    os.execvp("ssh", ["ssh"] + sys.argv[1:])
seen = b""
def read(limit, needle=None):
    global seen
    end = time.time() + limit
    while time.time() < end and not (needle and needle in seen):
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                return False
            if not chunk:
                return False
            seen += chunk
            sys.stdout.buffer.write(chunk); sys.stdout.flush()
    return True
def until(step, needle, typed, every=2.0, tries=10):
    for _ in range(tries):
        if typed:
            os.write(fd, typed)
        read(every, needle)
        if needle in seen:
            return
    sys.exit(100 + step)
until(1, b"30 100", b"stty size\r")
size(fd, 40, 120)
until(2, b"40 120", b"stty size\r")
until(3, b"sleeping-now", b"sh -c 'echo sleep''ing-now; exec sleep 600'\r", tries=1, every=10)
os.write(fd, b"\x03")
until(4, b"back-5", b"echo back-$((2+3))\r")
os.write(fd, b"exit 7\r")
while read(1, b"\xff\xff"):
    pass
_, status = os.waitpid(pid, 0)
sys.exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 99)
"#;

// Multi-threaded: the test waits on a child process while the sshd listener keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interactive_gateway_session_resizes_and_takes_ctrl_c() {
    let GatewayWorld {
        w: _w,
        gateway,
        uuid,
        sshd,
        config,
        _agent,
        ..
    } = gateway_world().await;
    let out = std::process::Command::new("python3")
        .args(["-c", PTY_DRIVER])
        .args(["-F", config.to_str().unwrap(), "-t"])
        .args(["-p", &gateway.port().to_string()])
        .arg(format!("root@{}", gateway.ip()))
        .arg(format!("host {uuid}"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(7),
        "the session did not end as typed (100 + n: step n timed out):\n{screen}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        sshd.log()
    );
}

/// Binds a listening socket on 127.0.0.1:0 and runs the command after it with that socket
/// as fd 3 and `LISTEN_FDS`/`LISTEN_PID` set, as systemd's socket activation does;
/// `{inherited}` in the arguments becomes the socket's address.
const SOCKET_ACTIVATE: &str = r#"
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", 0))
s.listen(128)
addr = "%s:%d" % s.getsockname()
os.dup2(s.fileno(), 3)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
args = [a.replace("{inherited}", addr) for a in sys.argv[1:]]
os.execvp(args[0], args)
"#;

// Multi-threaded: the test waits on child processes while the sshd listener keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_on_a_socket_systemd_binds_for_it() {
    sshd::require();
    // The wrapper keeps the socket open as fd 3, so a relay that bound the address itself
    // would fail to start: address in use.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, limits("")).unwrap();
    let relay = common::Relay::start_wrapped(
        &dir.path().join("data"),
        &[
            "--config",
            config.to_str().unwrap(),
            "--ssh-listen",
            "{inherited}",
        ],
        &[],
        &["python3", "-c", SOCKET_ACTIVATE],
    );
    let gateway = relay.ssh.expect("the relay says where the gateway listens");
    let admin = common::Api::new(relay.api, &relay.admin_key());
    let w = World { dir, relay, admin };
    let (uuid, _, sshd, _agent) = sshd::device_with_sshd(&w, "pis").await;
    let (_, key, _) = cloud_user_with_key(&w, "root").await;
    w.admin.add_member("pis", "root").await;
    let config = jump_config(w.dir.path(), &key);
    let (code, out, err) = gateway_run(
        &config,
        gateway,
        "root",
        &format!("host {uuid} echo handed-over"),
        "",
        false,
    );
    assert_eq!(
        (code, out.trim()),
        (0, "handed-over"),
        "{err}\n{}",
        sshd.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_learns_the_gateway_and_ssh_config_pins_its_host_key() {
    let GatewayWorld {
        w,
        gateway,
        uuid,
        sshd,
        root_xdg,
        key,
        _agent,
        ..
    } = gateway_world().await;

    // Logged in with nothing but the API: the relay says where its proxy and gateway are.
    let api_key = {
        let (s, body) = w
            .admin
            .call("POST", "/v1/api-keys", Some(json!({"name": "probe"})))
            .await;
        assert_eq!(s, 201, "{body}");
        body["key"].as_str().unwrap().to_owned()
    };
    let xdg = w.dir.path().join("xdg-discover");
    let api = format!("http://{}", w.relay.api);
    let (ok, _, err) = cli_in(&xdg, &["login", "--api", &api, "--key", &api_key], None);
    assert!(ok, "{err}");
    let (ok, out, err) = cli_in(&xdg, &["--json", "whoami"], None);
    assert!(ok, "{err}");
    let me: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(me["proxy"], w.relay.proxy.to_string(), "{me}");
    assert_eq!(me["proxy_tls"], false, "{me}");
    assert_eq!(me["ssh_gateway"], gateway.to_string(), "{me}");
    let (s, endpoints) = w.admin.call("GET", "/v1/endpoints", None).await;
    assert_eq!(s, 200);
    assert_eq!(
        me["ssh_gateway_fingerprint"], endpoints["ssh_gateway"]["fingerprint"],
        "{endpoints}"
    );

    // `ssh-config` as root: plain `ssh <uuid>.balena`, the gateway's key pinned.
    let (ok, snippet, err) = cli_in(&root_xdg, &["ssh-config"], None);
    assert!(ok, "{err}");
    assert!(snippet.contains("ProxyJump cloudlink-default"), "{snippet}");
    let known = w.dir.path().join("known_hosts");
    let write = |snippet: &str| {
        let path = w.dir.path().join("ssh_config");
        std::fs::write(
            &path,
            format!(
                "{snippet}Host *\n  IdentityFile {}\n  IdentitiesOnly yes\n  BatchMode yes\n  \
                 UserKnownHostsFile {}\n  StrictHostKeyChecking accept-new\n  \
                 LogLevel ERROR\n  ConnectTimeout 20\n",
                key.display(),
                known.display()
            ),
        )
        .unwrap();
        path
    };
    let ssh = |config: &std::path::Path| {
        std::process::Command::new("ssh")
            .args([
                "-F",
                config.to_str().unwrap(),
                &format!("{uuid}.balena"),
                "echo via-config",
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let out = ssh(&write(&snippet));
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        sshd.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "via-config");
    // Another key where the gateway's should be: ssh refuses the gateway.
    let other = sshd::user_key_of(&w.dir.path().join("keys-root"), "ecdsa");
    let other = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let host_key = endpoints["ssh_gateway"]["host_key"].as_str().unwrap();
    assert!(snippet.contains(host_key), "{snippet}");
    let forged = snippet.replace(host_key, other.trim());
    let out = ssh(&write(&forged));
    assert!(
        !out.status.success(),
        "ssh took a gateway key it was not given"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Host key verification failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An SSH client that sends what OpenSSH's does not: a `signal` request.
struct AnyHost;

impl russh::client::Handler for AnyHost {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

// Multi-threaded: sshd's accept loop runs in this runtime while the test waits on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_request_reaches_the_device_s_sshd() {
    let GatewayWorld {
        w: _w,
        gateway,
        uuid,
        sshd,
        key,
        _agent,
        ..
    } = gateway_world().await;

    let config = std::sync::Arc::new(russh::client::Config::default());
    let mut session = russh::client::connect(config, gateway, AnyHost)
        .await
        .unwrap();
    let key = russh::keys::load_secret_key(&key, None).unwrap();
    let auth = session
        .authenticate_publickey(
            "root",
            russh::keys::PrivateKeyWithHashAlg::new(std::sync::Arc::new(key), None),
        )
        .await
        .unwrap();
    assert!(auth.success(), "the gateway refused the key");
    let mut channel = session.channel_open_session().await.unwrap();
    channel
        .exec(true, format!("host {uuid} echo started; exec sleep 60"))
        .await
        .unwrap();
    let started = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(msg) = channel.wait().await {
            if let russh::ChannelMsg::Data { data } = msg {
                if String::from_utf8_lossy(&data).contains("started") {
                    return true;
                }
            }
        }
        false
    })
    .await;
    assert_eq!(
        started,
        Ok(true),
        "the command never started\n{}",
        sshd.log()
    );
    channel.signal(russh::Sig::TERM).await.unwrap();
    // The device's sshd takes the request (OpenSSH delivers it only to sessions it runs
    // with privilege separation, which a root login in this test's inetd-mode sshd is not,
    // so the log line is where it shows).
    let reached = common::poll(std::time::Duration::from_secs(20), || {
        let log = sshd.log();
        async move { log.contains("session_signal_req").then_some(()) }
    })
    .await;
    assert!(
        reached.is_some(),
        "no signal request reached sshd:\n{}",
        sshd.log()
    );
    let _ = channel.close().await;
}
