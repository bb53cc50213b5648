//! The lines a child process writes, collected as they come.

use super::*;

/// Why an awaited line did not come.
#[derive(Debug)]
pub enum Missing {
    /// Not within the bound.
    TimedOut(Duration),
    /// The writer closed its end first (the process exited).
    Closed,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Missing::TimedOut(limit) => write!(f, "none within {limit:?}"),
            Missing::Closed => f.write_str("the output closed first (the process exited)"),
        }
    }
}

/// Lines a child process writes, collected by a thread and readable as they come.
pub struct Lines {
    rx: Mutex<mpsc::Receiver<String>>,
    all: Arc<Mutex<Vec<String>>>,
}

impl Lines {
    pub fn spawn(reader: impl std::io::Read + Send + 'static, log: Option<PathBuf>) -> Lines {
        let (tx, rx) = mpsc::channel();
        let all = Arc::new(Mutex::new(Vec::new()));
        let keep = all.clone();
        std::thread::spawn(move || {
            let mut file = log.map(|p| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .expect("log file")
            });
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                if let Some(f) = file.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                keep.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Lines {
            rx: Mutex::new(rx),
            all,
        }
    }

    /// Waits for a line containing `needle` and returns it.
    pub fn wait_for(&self, needle: &str) -> String {
        self.wait_for_within(needle, EVENT_TIMEOUT)
    }

    /// Waits up to `limit` for a line containing `needle` and returns it.
    pub fn wait_for_within(&self, needle: &str, limit: Duration) -> String {
        self.find_within(needle, limit).unwrap_or_else(|missing| {
            panic!(
                "no line containing {needle:?}: {missing}; saw:\n{}",
                self.text()
            )
        })
    }

    /// Like [`Lines::wait_for_within`], but says why the line is missing instead of
    /// failing the test.
    pub fn find_within(&self, needle: &str, limit: Duration) -> Result<String, Missing> {
        let rx = self.rx.lock().unwrap();
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => return Err(Missing::TimedOut(limit)),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(Missing::Closed),
            }
        }
    }

    /// Waits (up to `limit`) until the writer has closed its end, so that [`Lines::text`]
    /// holds everything it wrote.
    pub fn wait_closed(&self, limit: Duration) {
        let rx = self.rx.lock().unwrap();
        let deadline = std::time::Instant::now() + limit;
        // Every line is kept in `all` by the reading thread; these are only its echoes.
        while rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .is_ok()
        {}
    }

    /// Everything seen so far.
    pub fn text(&self) -> String {
        self.all.lock().unwrap().join("\n")
    }
}
