//! A throwaway Postgres cluster per test, from `initdb`/`pg_ctl` in a temp dir.
//!
//! It listens only on a Unix socket in its own directory, so there is no port to collide on.
//! `initdb` refuses to run as root; as root the cluster is made and run as `nobody`.
//! With `DATABASE_URL` set, a fresh database is created there instead.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::is_root;

/// A running throwaway cluster (or a fresh database on `DATABASE_URL`).
pub struct TempPg {
    /// The database URL for the store.
    pub url: String,
    cluster: Option<Cluster>,
}

struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    run_as_nobody: bool,
}

fn postgres_bin_dir() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            candidates.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
        }
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev());
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    candidates
        .into_iter()
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
}

impl Cluster {
    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        if self.run_as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
                .arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    fn pg_ctl(&self, args: &[&str]) {
        let status = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("pg_ctl runs");
        assert!(status.success(), "pg_ctl {args:?} failed");
    }
}

impl TempPg {
    /// Starts a cluster (or a fresh database on `DATABASE_URL`'s server); fails the test
    /// when Postgres is not installed (see [`super::require`]).
    pub fn start() -> TempPg {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            return TempPg::fresh_database(&url);
        }
        let bin = postgres_bin_dir();
        super::require(bin.is_some(), "PostgreSQL (initdb, pg_ctl)");
        let bin = bin.unwrap();
        let run_as_nobody = is_root();
        let dir = tempfile::Builder::new()
            .prefix("cloudlink-pg-")
            .tempdir()
            .expect("temp dir");
        if run_as_nobody {
            // 65534 is nobody/nogroup on Debian.
            std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).expect("chown");
        }
        let cluster = Cluster {
            dir,
            bin,
            run_as_nobody,
        };
        let status = cluster
            .command("initdb")
            .args(["-A", "trust", "-U", "cloudlink", "--no-sync", "-D"])
            .arg(cluster.data())
            .stdout(std::process::Stdio::null())
            .status()
            .expect("initdb runs");
        assert!(status.success(), "initdb failed");
        let url = format!(
            "postgres://cloudlink@localhost/postgres?host={}",
            cluster.socket_dir().display()
        );
        let pg = TempPg {
            url,
            cluster: Some(cluster),
        };
        pg.start_server();
        pg
    }

    fn fresh_database(base: &str) -> TempPg {
        let name = format!("cloudlink_test_{}", hex_id());
        let status = Command::new("psql")
            .arg(base)
            .args(["-q", "-c", &format!("CREATE DATABASE {name}")])
            .status()
            .expect("psql runs");
        assert!(
            status.success(),
            "cannot create a test database on DATABASE_URL"
        );
        let (head, query) = match base.split_once('?') {
            Some((h, q)) => (h, format!("?{q}")),
            None => (base, String::new()),
        };
        let root = head.rsplit_once('/').map(|(r, _)| r).unwrap_or(head);
        TempPg {
            url: format!("{root}/{name}{query}"),
            cluster: None,
        }
    }

    fn start_server(&self) {
        let Some(c) = &self.cluster else { return };
        let options = format!(
            "-c listen_addresses='' -c unix_socket_directories={} -c fsync=off",
            c.socket_dir().display()
        );
        // -w waits until the server accepts connections: readiness without sleeping.
        c.pg_ctl(&["-w", "-o", &options, "-l", "/dev/null", "start"]);
    }

    /// Stops the server (the data stays), to test a store that goes away.
    pub fn stop(&self) {
        if let Some(c) = &self.cluster {
            c.pg_ctl(&["-w", "-m", "fast", "stop"]);
        }
    }

    /// Starts it again after [`TempPg::stop`].
    pub fn restart(&self) {
        self.start_server();
    }

    /// Runs `statement` with psql as the cluster's superuser in `database`; its output.
    /// Only on a cluster this test started ([`TempPg::controllable`]).
    pub fn sql(&self, database: &str, statement: &str) -> String {
        let c = self.cluster.as_ref().expect("a cluster this test started");
        let out = c
            .command("psql")
            .args(["-X", "-q", "-t", "-A", "-U", "cloudlink", "-h"])
            .arg(c.socket_dir())
            .args(["-d", database, "-c", statement])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql {statement:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether stop/restart are possible (not on an outside `DATABASE_URL`).
    pub fn controllable(&self) -> bool {
        self.cluster.is_some()
    }
}

impl Drop for TempPg {
    fn drop(&mut self) {
        if let Some(c) = &self.cluster {
            let _ = c
                .command("pg_ctl")
                .arg("-D")
                .arg(c.data())
                .args(["-m", "immediate", "stop"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn hex_id() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", nanos, std::process::id())
}
