//! Fetching a GitHub user's public SSH keys (`https://github.com/<login>.keys`) for
//! `POST /v1/ssh-keys/import`, within fixed bounds: no redirects, 5 s, 64 KiB.

use std::time::Duration;

use crate::tls_client::{self, Trust};

/// The whole exchange, connect to last byte.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// The most of an answer we read.
pub const MAX_BYTES: usize = 64 * 1024;

/// Why GitHub's keys could not be had.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GithubError {
    /// The login breaks GitHub's rules, so no request is made.
    #[error("{0:?} is not a GitHub login (1 to 39 letters, digits and hyphens)")]
    BadLogin(String),
    /// GitHub has no such user.
    #[error("GitHub has no user {0:?}")]
    UnknownLogin(String),
    /// Anything else: unreachable, slow, too large, a redirect, an odd status.
    #[error("cannot fetch the keys of {login:?} from {url}: {reason}")]
    Fetch {
        /// The login asked for.
        login: String,
        /// The address fetched.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

/// Whether `login` meets GitHub's rules: `^[A-Za-z0-9-]{1,39}$`.
pub fn is_valid_login(login: &str) -> bool {
    (1..=39).contains(&login.len())
        && login
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Fetches `<base>/<login>.keys` and returns its text.
pub async fn fetch_keys(base: &str, login: &str) -> Result<String, GithubError> {
    if !is_valid_login(login) {
        return Err(GithubError::BadLogin(login.to_owned()));
    }
    let url = format!("{}/{login}.keys", base.trim_end_matches('/'));
    let fail = |reason: String| GithubError::Fetch {
        login: login.to_owned(),
        url: url.clone(),
        reason,
    };
    let client = tls_client::http_client_builder(&url, Trust::System, TIMEOUT)
        .map_err(|e| fail(e.to_string()))?
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| fail(tls_client::chain(&e)))?;
    let mut resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| fail(tls_client::chain(&e)))?;
    let status = resp.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err(GithubError::UnknownLogin(login.to_owned()));
    }
    if status.is_redirection() {
        return Err(fail(format!(
            "it answered {status}, a redirect, which is not followed"
        )));
    }
    if !status.is_success() {
        return Err(fail(format!("it answered {status}")));
    }
    if resp.content_length().is_some_and(|n| n > MAX_BYTES as u64) {
        return Err(fail(format!("the answer is larger than {MAX_BYTES} bytes")));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| fail(tls_client::chain(&e)))?
    {
        if body.len() + chunk.len() > MAX_BYTES {
            return Err(fail(format!("the answer is larger than {MAX_BYTES} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|_| fail("the answer is not UTF-8 text".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_follow_githubs_rules() {
        for ok in ["octocat", "a", "A-b-9", &"x".repeat(39)] {
            assert!(is_valid_login(ok), "{ok}");
        }
        for bad in [
            "",
            &"x".repeat(40),
            "a/b",
            "../etc",
            "a.b",
            "a b",
            "ü",
            "a?x=1",
        ] {
            assert!(!is_valid_login(bad), "{bad}");
        }
    }
}
