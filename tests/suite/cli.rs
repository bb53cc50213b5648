//! The CLI as a balena user meets it: balena's flags and device forms, logins and profiles,
//! and errors that name the cause and the fix. Every error here is provoked for real (a
//! typo'd uuid, a revoked key, a busy port, an untrusted certificate …) and its text checked.

use crate::common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use common::sshd::ssh_opts;
use common::{bin, cli_env, cli_in, limits, sshd, World};
use serde_json::{json, Value};

/// `cloudlink device ssh TARGET FLAGS -- <key options>` with `script` on stdin.
fn device_ssh(
    xdg: &Path,
    target: &str,
    flags: &[&str],
    key: &Path,
    script: &str,
) -> (bool, String, String) {
    let mut args = vec!["device", "ssh", target];
    args.extend_from_slice(flags);
    args.push("--");
    let opts = ssh_opts(key);
    args.extend(opts.iter().map(String::as_str));
    cli_in(xdg, &args, Some(script.as_bytes()))
}

/// A port on loopback that nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// `device tunnel` that must fail before listening: its error, after checking it never
/// printed a listening line.
fn tunnel_refused(xdg: &Path, target: &str, port: &str) -> String {
    let (ok, out, err) = cli_in(xdg, &["device", "tunnel", target, "-p", port], None);
    assert!(!ok, "device tunnel {target} -p {port} ran: {out}");
    assert!(!out.contains("Listening"), "listened before failing: {out}");
    err
}

// Multi-threaded: the test waits on child processes while the sshd listener keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balena_forms_and_errors_that_name_the_cause() {
    sshd::require();
    let w = World::new(&limits(""));
    let (uuid, _key, sshd, _agent) = sshd::device_with_sshd(&w, "pis").await;
    w.login(&w.relay.admin_key());
    let key = sshd::user_key(w.dir.path());
    let pubkey = key.with_extension("pub");
    // balena's `key add NAME FILE`.
    w.cli_ok(&["key", "add", "laptop", pubkey.to_str().unwrap()]);

    // A short uuid, with balena's -p; the login name is root (root logins for members).
    let short = &uuid[..8];
    let (ok, out, err) = device_ssh(
        &w.xdg(),
        short,
        &["-p", "22222", "-l", "root"],
        &key,
        "echo short-$((40 + 2)); exit\n",
    );
    assert!(ok, "ssh by short uuid failed: {err}\n{}", sshd.log());
    assert_eq!(out.trim(), "short-42");
    // -v reaches ssh; -t forces a terminal (ssh says it cannot, stdin being a pipe).
    let (ok, _, err) = device_ssh(&w.xdg(), short, &["-v", "-t", "-l", "root"], &key, "exit\n");
    assert!(ok, "{err}");
    assert!(err.contains("debug1:"), "-v did not reach ssh: {err}");
    assert!(
        err.contains("Pseudo-terminal will not be allocated"),
        "-t did not reach ssh: {err}"
    );
    // --noproxy: an HTTP proxy in the environment that goes nowhere is ignored.
    let dead_proxy = format!("http://127.0.0.1:{}", closed_port());
    let mut args = vec!["device", "ssh", short, "--noproxy", "-l", "root", "--"];
    let opts = ssh_opts(&key);
    args.extend(opts.iter().map(String::as_str));
    let env = [
        ("HTTP_PROXY", dead_proxy.as_str()),
        ("http_proxy", &dead_proxy),
        ("HTTPS_PROXY", &dead_proxy),
        ("https_proxy", &dead_proxy),
    ];
    let (ok, out, err) = cli_env(&w.xdg(), &args, &env, Some(b"echo no-proxy\n"));
    assert!(ok, "--noproxy: {err}");
    assert_eq!(out.trim(), "no-proxy");
    let without: Vec<&str> = args.iter().copied().filter(|a| *a != "--noproxy").collect();
    let (ok, _, err) = cli_env(&w.xdg(), &without, &env, Some(b"echo x\n"));
    assert!(!ok, "the dead proxy was not used without --noproxy");
    assert!(err.contains("cannot reach the relay API"), "{err}");
    // The tunnel itself goes through HTTPS_PROXY, as the agent's TCP link does.
    let (ok, _, err) = cli_env(&w.xdg(), &without, &env[2..], Some(b"echo x\n"));
    assert!(!ok, "HTTPS_PROXY was not used for the tunnel");
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.contains("cannot reach the relay proxy") && last.contains("cannot reach the proxy"),
        "{err}"
    );

    // sshd refusing every key: which key file was offered, and that it is no cloud key.
    let stranger = w.dir.path().join("stranger");
    std::fs::create_dir(&stranger).unwrap();
    let stranger = sshd::user_key(&stranger);
    let (ok, _, err) = device_ssh(&w.xdg(), short, &["-l", "root"], &stranger, "exit\n");
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "sshd on device {uuid} refused every key offered for login root"
        )) && err.contains(&format!("offered {}", stranger.display()))
            && err.contains("not one of your cloud keys")
            && err.contains("cloudlink key add"),
        "{err}"
    );

    // Names: unique, ambiguous (names are not unique), and the other forms of `device`.
    let register = |fleet: &'static str, name: &'static str| {
        let admin = &w.admin;
        async move {
            let (s, d) = admin
                .call(
                    "POST",
                    &format!("/v1/fleets/{fleet}/devices"),
                    Some(json!({ "name": name })),
                )
                .await;
            assert_eq!(s, 201, "{d}");
            d["uuid"].as_str().unwrap().to_owned()
        }
    };
    let kitchen = register("pis", "kitchen").await;
    let out = w.cli_ok(&["device", "show", "kitchen", "--json"]);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["uuid"],
        kitchen
    );
    let (s, _) = w
        .admin
        .call("POST", "/v1/fleets", Some(json!({"name": "other"})))
        .await;
    assert_eq!(s, 201);
    let kitchen2 = register("other", "kitchen").await;
    let (ok, _, err) = w.cli(&["device", "show", "kitchen"]);
    assert!(!ok);
    assert!(
        err.contains("\"kitchen\" matches 2 devices")
            && err.contains(&kitchen)
            && err.contains(&kitchen2),
        "{err}"
    );

    // A typo'd uuid is unknown, the same for show, ssh and tunnel; ssh never starts.
    let typo = format!(
        "{}{}",
        &uuid[..31],
        if uuid.ends_with('0') { '1' } else { '0' }
    );
    let unknown = format!("unknown device \"{typo}\"");
    let (ok, _, err) = w.cli(&["device", "show", &typo]);
    assert!(!ok && err.contains(&unknown), "{err}");
    let (ok, _, err) = device_ssh(&w.xdg(), &typo, &[], &key, "exit\n");
    assert!(!ok && err.contains(&unknown), "{err}");
    assert!(!err.contains("kex_exchange_identification"), "{err}");
    assert!(tunnel_refused(&w.xdg(), &typo, "22222").contains(&unknown));
    // A device in someone else's fleet reads exactly like one that does not exist.
    let bob = w.user("bob").await;
    let bob_xdg = w.dir.path().join("xdg-bob");
    w.login_in(&bob_xdg, &bob);
    let err = tunnel_refused(&bob_xdg, &uuid, "22222");
    assert!(
        err.contains(&format!("unknown device \"{uuid}\"")),
        "another fleet's device was told apart: {err}"
    );

    // Offline: said before listening, with since when.
    let err = tunnel_refused(&w.xdg(), &kitchen, "22222");
    assert!(
        err.contains(&format!("device {kitchen} (kitchen) is offline"))
            && err.contains("never connected"),
        "{err}"
    );

    // A port the fleet does not allow: named, with what is allowed.
    w.cli_ok(&["fleet", "ports", "pis", "22222"]);
    let err = tunnel_refused(&w.xdg(), short, "8080");
    assert!(
        err.contains(&format!(
            "port 8080 of device {uuid} is not allowed: fleet pis allows only port 22222"
        )),
        "{err}"
    );
    w.cli_ok(&["fleet", "ports", "pis"]);

    // A closed port: the tunnel listens (the device is fine), and each connection says why.
    let closed = closed_port().to_string();
    let mut tunnel = Command::new(bin())
        .args(["device", "tunnel", short, "-p", &format!("{closed}:0")])
        .env("XDG_CONFIG_HOME", w.xdg())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = common::Lines::spawn(tunnel.stdout.take().unwrap(), None);
    let errors = common::Lines::spawn(tunnel.stderr.take().unwrap(), None);
    let line = lines.wait_for("Listening on");
    let local: std::net::SocketAddr = line.split_whitespace().nth(2).unwrap().parse().unwrap();
    let mut conn = std::net::TcpStream::connect(local).unwrap();
    let mut sink = Vec::new();
    let _ = conn.read_to_end(&mut sink);
    errors.wait_for(&format!("port {closed} of device {uuid} is closed"));
    let _ = tunnel.kill();
    let _ = tunnel.wait();
    // The same through ssh's ProxyCommand: our sentence comes last, after ssh's.
    let (ok, _, err) = device_ssh(&w.xdg(), short, &["-p", &closed], &key, "exit\n");
    assert!(!ok);
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("error: port {closed} of device {uuid} is closed")),
        "{err}"
    );

    // A revoked key: `device tunnel` says so before listening.
    let out = w.cli_ok(&["api-key", "create", "ci", "--json"]);
    let ci: Value = serde_json::from_str(&out).unwrap();
    let ci_xdg = w.dir.path().join("xdg-ci");
    w.login_in(&ci_xdg, ci["key"].as_str().unwrap());
    w.cli_ok(&["api-key", "revoke", &ci["id"].to_string()]);
    let err = tunnel_refused(&ci_xdg, short, "22222");
    assert!(
        err.contains("does not accept your saved API key") && err.contains("cloudlink login"),
        "{err}"
    );
}

#[test]
fn logins_profiles_and_json_errors() {
    let w = World::new(&limits(""));
    let xdg = w.xdg();
    let api = format!("http://{}", w.relay.api);
    let proxy = w.relay.proxy.to_string();
    let admin_key = w.relay.admin_key();
    let login = |profile: &str, key_flag: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>| {
        let mut args = vec![
            "--profile",
            profile,
            "login",
            "--api",
            &api,
            "--proxy",
            &proxy,
        ];
        args.extend_from_slice(key_flag);
        cli_env(&xdg, &args, env, stdin)
    };

    // No key, no terminal: what to give instead.
    let (ok, _, err) = login("default", &[], &[], None);
    assert!(!ok);
    assert!(
        err.contains("no API key: give --key KEY, --key - (read from stdin)"),
        "{err}"
    );
    // --key - reads stdin.
    let (ok, out, err) = login(
        "default",
        &["--key", "-"],
        &[],
        Some(format!("{admin_key}\n").as_bytes()),
    );
    assert!(ok, "{err}");
    assert!(out.contains("profile") && out.contains("default"), "{out}");
    // CLOUDLINK_API_KEY, into a second profile.
    let bob = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(w.user("bob"));
    let (ok, _, err) = login("second", &[], &[("CLOUDLINK_API_KEY", bob.as_str())], None);
    assert!(ok, "{err}");
    // The environment gives way to a flag instead of conflicting with it.
    let key_file = w.relay.data_dir.join("admin.key");
    let (ok, out, err) = login(
        "fourth",
        &["--key-file", key_file.to_str().unwrap()],
        &[("CLOUDLINK_API_KEY", "clk_not_this_one")],
        None,
    );
    assert!(ok && out.contains("admin"), "{out}{err}");
    let (ok, _, err) = w.cli(&["--profile", "fourth", "logout"]);
    assert!(ok, "{err}");
    // Asked on a terminal, without echo (`script` gives the CLI a terminal).
    let command = format!(
        "{} --profile third login --api {api} --proxy {proxy}",
        bin()
    );
    let mut script = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("XDG_CONFIG_HOME", &xdg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (util-linux) runs");
    // Typed once the prompt is up (echo is off by then); script passes it to the terminal.
    let mut stdout = script.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("API key:") {
        let n = stdout.read(&mut chunk).unwrap();
        assert!(n > 0, "no prompt: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&chunk[..n]);
    }
    let mut stdin = script.stdin.take().unwrap();
    stdin
        .write_all(format!("{admin_key}\n").as_bytes())
        .unwrap();
    stdout.read_to_end(&mut seen).unwrap();
    let status = script.wait().unwrap();
    drop(stdin);
    let shown = String::from_utf8_lossy(&seen).into_owned();
    assert!(status.success(), "{shown}");
    assert!(shown.contains("API key:"), "{shown}");
    assert!(!shown.contains(&admin_key), "the key was echoed: {shown}");

    // whoami names the relay and the profile; CLOUDLINK_PROFILE chooses one.
    let (ok, out, err) = cli_env(&xdg, &["whoami"], &[("CLOUDLINK_PROFILE", "second")], None);
    assert!(ok, "{err}");
    assert!(
        out.contains("bob") && out.contains("second") && out.contains(&api),
        "{out}"
    );
    let out = w.cli_ok(&["--profile", "third", "whoami", "--json"]);
    let me: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (me["profile"].as_str(), me["api"].as_str()),
        (Some("third"), Some(api.as_str()))
    );

    // A second login over a profile says what it replaced.
    let (ok, _, err) = login("second", &["--key", &admin_key], &[], None);
    assert!(ok, "{err}");
    assert!(
        err.contains("replaced profile second's login (bob at"),
        "{err}"
    );

    // logout, and what a logged-out profile says.
    let out = w.cli_ok(&["--profile", "second", "logout"]);
    assert!(out.contains("logged out of"), "{out}");
    let (ok, _, err) = w.cli(&["--profile", "second", "whoami"]);
    assert!(!ok);
    assert!(
        err.contains("not logged in (profile second)")
            && err.contains("saved profiles: default, third"),
        "{err}"
    );

    // --json: errors are JSON too, and only data commands take it.
    let (ok, _, err) = w.cli(&["--profile", "second", "whoami", "--json"]);
    assert!(!ok);
    let e: Value = serde_json::from_str(err.trim()).expect("a JSON error");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not logged in"));
    let (ok, _, err) = w.cli(&["device", "tunnel", "x", "-p", "1", "--json"]);
    assert!(!ok && err.contains("unexpected argument '--json'"), "{err}");
    let (ok, _, err) = w.cli(&["--json", "healthcheck"]);
    assert!(
        !ok && err.contains("--json applies to commands that print data"),
        "{err}"
    );
    // `fleets` is `fleet list`.
    assert_eq!(w.cli_ok(&["fleets"]), w.cli_ok(&["fleet", "list"]));

    // A login file from before profiles is the default profile, and is kept as such.
    let old_xdg = w.dir.path().join("xdg-old");
    std::fs::create_dir_all(old_xdg.join("cloudlink")).unwrap();
    std::fs::write(
        old_xdg.join("cloudlink/config.toml"),
        format!(
            "api = \"{api}\"\nproxy = \"{proxy}\"\nkey = \"{admin_key}\"\nusername = \"admin\"\n"
        ),
    )
    .unwrap();
    let (ok, out, err) = cli_in(&old_xdg, &["whoami"], None);
    assert!(ok && out.contains("default"), "{out}{err}");
    let (ok, _, err) = cli_in(
        &old_xdg,
        &[
            "--profile",
            "new",
            "login",
            "--api",
            &api,
            "--proxy",
            &proxy,
            "--key",
            &admin_key,
        ],
        None,
    );
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(old_xdg.join("cloudlink/config.toml")).unwrap();
    assert!(
        text.contains("[profiles.default]") && text.contains("[profiles.new]"),
        "{text}"
    );
}

#[test]
fn keys_from_files_and_stdin_and_never_a_private_key() {
    let w = World::new(&limits(""));
    w.login(&w.relay.admin_key());
    let dir = w.dir.path().join("keys");
    std::fs::create_dir(&dir).unwrap();
    let a = sshd::user_key(&dir);
    // `key add NAME` reads stdin; the older `key add FILE --title T` still works.
    let b_dir = dir.join("b");
    std::fs::create_dir(&b_dir).unwrap();
    let b = sshd::user_key(&b_dir);
    let public_a = std::fs::read(a.with_extension("pub")).unwrap();
    let (ok, _, err) = cli_in(&w.xdg(), &["key", "add", "from-stdin"], Some(&public_a));
    assert!(ok, "{err}");
    w.cli_ok(&[
        "key",
        "add",
        b.with_extension("pub").to_str().unwrap(),
        "--title",
        "old-form",
    ]);
    let keys: Vec<Value> = serde_json::from_str(&w.cli_ok(&["key", "list", "--json"])).unwrap();
    let titles: Vec<&str> = keys.iter().map(|k| k["title"].as_str().unwrap()).collect();
    assert_eq!(titles, ["from-stdin", "old-form"]);

    // A private key is refused before anything is sent: this login's relay is a closed
    // port, so sending would have failed differently.
    let offline = w.dir.path().join("xdg-offline");
    std::fs::create_dir_all(offline.join("cloudlink")).unwrap();
    std::fs::write(
        offline.join("cloudlink/config.toml"),
        format!(
            "[profiles.default]\napi = \"http://127.0.0.1:{}\"\nkey = \"clk_x\"\n",
            closed_port()
        ),
    )
    .unwrap();
    for (args, stdin) in [
        (vec!["key", "add", "oops", a.to_str().unwrap()], None),
        (vec!["key", "add", "oops"], Some(std::fs::read(&a).unwrap())),
    ] {
        let (ok, _, err) = cli_in(&offline, &args, stdin.as_deref());
        assert!(!ok);
        assert!(
            err.contains("holds a PRIVATE key; it was not sent"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn network_tls_and_startup_failures_say_what_to_do() {
    let w = World::new(&limits(""));
    let xdg = w.dir.path().join("xdg-errors");
    // An API nobody listens on: the OS's own words.
    let (ok, _, err) = cli_in(
        &xdg,
        &[
            "login",
            "--api",
            &format!("http://127.0.0.1:{}", closed_port()),
            "--key",
            "clk_x",
        ],
        None,
    );
    assert!(!ok);
    assert!(err.contains("Connection refused"), "{err}");
    // The relay's self-signed certificate without --ca: the fix is named.
    let tls = w.relay.api_tls.expect("the test relay serves HTTPS");
    let key = w.relay.admin_key();
    let (ok, _, err) = cli_in(
        &xdg,
        &[
            "login",
            "--api",
            &format!("https://localhost:{}", tls.port()),
            "--key",
            &key,
        ],
        None,
    );
    assert!(!ok);
    assert!(
        err.contains("UnknownIssuer") && err.contains("pass --ca FILE"),
        "{err}"
    );
    let cert = w.relay.cert();
    let (ok, _, err) = cli_in(
        &xdg,
        &[
            "login",
            "--api",
            &format!("https://localhost:{}", tls.port()),
            "--ca",
            cert.to_str().unwrap(),
            "--key",
            &key,
        ],
        None,
    );
    assert!(ok, "with --ca: {err}");

    // The agent without --ca says the same in its log.
    let (uuid, device_key) = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(w.device_in("pis"));
    let mut agent = Command::new(bin())
        .args([
            "agent",
            "--relay",
            &w.relay.device.to_string(),
            "--server-name",
            "localhost",
        ])
        .args(["--transport", "quic"])
        .env("CLOUDLINK_DEVICE_UUID", &uuid)
        .env("CLOUDLINK_DEVICE_KEY", &device_key)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = common::Lines::spawn(agent.stderr.take().unwrap(), None);
    let line = lines.wait_for("relay link down");
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        line.contains("UnknownIssuer") && line.contains("pass --ca FILE"),
        "{line}"
    );

    // A second relay on the first one's ports: the cause once, and no data dir left.
    let data = w.dir.path().join("second-relay");
    let api = w.relay.api.to_string();
    let (ok, err) = relay_start(&data, &api, &[], ("NO_COLOR", "1"));
    assert!(!ok);
    assert!(
        err.contains(&format!("cannot listen for the API on {}", w.relay.api)),
        "{err}"
    );
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
    assert!(!data.exists(), "a failed start left {}", data.display());
    // Other failed starts leave nothing either: a certificate file that is not there
    // (found before anything is written), and a bad bootstrap key (found once the store
    // exists in the new data dir, which goes again).
    let missing = w.dir.path().join("missing.pem");
    let missing = missing.to_str().unwrap();
    for (extra, env, says) in [
        (
            vec!["--tls-cert", missing, "--tls-key", missing],
            ("NO_COLOR", "1"),
            "missing.pem",
        ),
        (
            vec![],
            ("CLOUDLINK_BOOTSTRAP_ADMIN_KEY", "not-a-key"),
            "CLOUDLINK_BOOTSTRAP_ADMIN_KEY must start with clk_",
        ),
    ] {
        let (ok, err) = relay_start(&data, "127.0.0.1:0", &extra, env);
        assert!(!ok && err.contains(says), "{extra:?}: {err}");
        assert!(
            !data.exists(),
            "{extra:?}: a failed start left {}",
            data.display()
        );
    }
}

/// `cloudlink relay` on `data`, its API on `api` and every other listener on port 0, with
/// `extra` flags and one environment variable; returns (success, stderr) once it exits.
fn relay_start(data: &Path, api: &str, extra: &[&str], env: (&str, &str)) -> (bool, String) {
    let out = Command::new(bin())
        .args([
            "relay",
            "--data-dir",
            data.to_str().unwrap(),
            "--api-listen",
            api,
        ])
        .args([
            "--proxy-listen",
            "127.0.0.1:0",
            "--device-listen",
            "127.0.0.1:0",
        ])
        .args([
            "--device-tcp-listen",
            "127.0.0.1:0",
            "--api-tls-listen",
            "127.0.0.1:0",
        ])
        .args(["--proxy-tls-listen", "127.0.0.1:0"])
        .args(extra)
        .env(env.0, env.1)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `shell -c script`; returns stdout, failing the test on a non-zero exit.
fn shell(program: &str, script: &str) -> String {
    let out = Command::new(program).args(["-c", script]).output().unwrap();
    assert!(
        out.status.success(),
        "{program} -c {script:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn completions_load_in_their_shells_and_man_pages_render() {
    let dir = tempfile::tempdir().unwrap();
    let write = |shell: &str| {
        let out = Command::new(bin())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success());
        let path = dir.path().join(format!("cloudlink.{shell}"));
        std::fs::write(&path, out.stdout).unwrap();
        path.display().to_string()
    };
    // bash: what completing `cloudlink device s` offers.
    let bash = write("bash");
    let offered = shell(
        "bash",
        &format!(
            "source {bash}; COMP_WORDS=(cloudlink device s); COMP_CWORD=2; \
             _cloudlink cloudlink s device; echo \"${{COMPREPLY[@]}}\""
        ),
    );
    assert_eq!(
        offered.split_whitespace().collect::<Vec<_>>(),
        ["ssh", "show"]
    );
    // fish: the same question, asked of fish itself.
    common::require_tool("fish");
    {
        let fish = write("fish");
        let offered = shell(
            "fish",
            &format!("source {fish}; complete -C 'cloudlink device ssh --no'"),
        );
        assert!(offered.contains("--noproxy"), "{offered}");
    }
    // zsh: the completion function loads under compinit.
    common::require_tool("zsh");
    {
        let zsh = write("zsh");
        let found = shell(
            "zsh",
            &format!("autoload -Uz compinit && compinit -u -D; source {zsh}; whence -w _cloudlink"),
        );
        assert!(found.contains("_cloudlink: function"), "{found}");
    }
    // Man pages: one per command, rendered by man.
    let pages = dir.path().join("man");
    let out = Command::new(bin())
        .args(["manpages", pages.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    for page in [
        "cloudlink.1",
        "cloudlink-device-ssh.1",
        "cloudlink-agent-authorized-keys.1",
    ] {
        assert!(pages.join(page).is_file(), "{page} missing");
    }
    common::require_tool("man");
    {
        let shown = shell(
            "sh",
            &format!("man -l {}", pages.join("cloudlink-device-ssh.1").display()),
        );
        assert!(
            shown.contains("--noproxy") && shown.contains("short uuid"),
            "{shown}"
        );
    }
}
