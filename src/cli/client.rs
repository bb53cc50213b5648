//! The relay's REST API from the CLI's side, and output for people or scripts.

use anyhow::{anyhow, Context, Result};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::settings::Settings;

/// Talks to a relay's REST API with the logged-in key.
pub struct ApiClient {
    /// The HTTP client.
    http: reqwest::Client,
    /// Base URL, without a trailing slash.
    base: String,
    /// The API key or token sent as `Authorization: Bearer`.
    token: String,
}

impl ApiClient {
    /// A client for `base` authenticating with `token`, trusting the CA file `ca` (or the
    /// system's roots) for an `https://` base. It goes through the `HTTPS_PROXY` /
    /// `HTTP_PROXY` of the environment unless `no_proxy`.
    pub fn new(
        base: &str,
        token: &str,
        ca: Option<&std::path::Path>,
        no_proxy: bool,
    ) -> Result<ApiClient> {
        let trust = match ca {
            Some(ca) => crate::tls_client::Trust::CaFile(ca),
            None => crate::tls_client::Trust::System,
        };
        let mut builder = crate::tls_client::http_client_builder(
            base,
            trust,
            std::time::Duration::from_secs(30),
        )?;
        if no_proxy {
            builder = builder.no_proxy();
        }
        let http = builder
            .build()
            .map_err(|e| anyhow!("cannot set up the HTTP client: {e}"))?;
        Ok(ApiClient {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        })
    }

    /// A client from the saved login.
    pub fn from_settings(settings: &Settings) -> Result<ApiClient> {
        ApiClient::new(&settings.api, &settings.key, settings.ca.as_deref(), false)
    }

    /// The API base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request and decodes the JSON answer; an API error becomes its one sentence.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<T> {
        let bytes = self.send(method, path, body).await?;
        serde_json::from_slice(&bytes).with_context(|| format!("unexpected answer from {path}"))
    }

    /// Sends `body` (one of the API's request types, `proto::api`) and reads the answer.
    pub async fn send_body<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let body = serde_json::to_value(body).context("cannot encode the request")?;
        self.call(method, path, Some(&body)).await
    }

    /// Sends a request whose answer has no body (204).
    pub async fn call_empty(&self, method: Method, path: &str) -> Result<()> {
        self.send(method, path, None).await.map(drop)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<bytes::Bytes> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| {
            anyhow!(
                "cannot reach the relay API at {}: {}",
                self.base,
                crate::tls_client::explain(&e)
            )
        })?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| anyhow!("the relay API at {} broke off: {e}", self.base))?;
        if status.is_success() {
            return Ok(bytes);
        }
        Err(api_error(status, &bytes))
    }
}

/// An answer other than success from the relay's API: its status and its one sentence.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiFailure {
    /// The HTTP status.
    pub status: StatusCode,
    /// The API's sentence, or a description of what came back instead.
    pub message: String,
}

impl ApiFailure {
    /// The status of `e` when it is an API answer (not a network failure).
    pub fn status_of(e: &anyhow::Error) -> Option<StatusCode> {
        e.downcast_ref::<ApiFailure>().map(|f| f.status)
    }
}

/// The one sentence of an API error body, or a description of what came back instead.
fn api_error(status: StatusCode, body: &[u8]) -> anyhow::Error {
    #[derive(serde::Deserialize)]
    struct Body {
        error: Detail,
    }
    #[derive(serde::Deserialize)]
    struct Detail {
        message: String,
    }
    let mut message = match serde_json::from_slice::<Body>(body) {
        Ok(b) => b.error.message,
        Err(_) => format!("the relay answered {status}"),
    };
    if status == StatusCode::UNAUTHORIZED {
        message.push_str(
            " The relay does not accept your saved API key (revoked, expired or from another \
             relay): log in again with `cloudlink login`.",
        );
    }
    ApiFailure { status, message }.into()
}

/// `path?k=v&…` with the values percent-encoded.
pub fn with_query(path: &str, pairs: &[(&str, &str)]) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        query.append_pair(k, v);
    }
    format!("{path}?{}", query.finish())
}

/// `--json`, for a command whose output is data.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct JsonArg {
    /// Print results (and errors) as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

impl Output {
    /// Prints `rows` as JSON, or as a table with `headers` and the cells `cells` picks.
    pub fn list<T: Serialize>(
        self,
        rows: &[T],
        headers: &[&str],
        cells: impl Fn(&T) -> Vec<String>,
    ) -> Result<()> {
        match self {
            Output::Json => println!("{}", serde_json::to_string_pretty(rows)?),
            Output::Table => print_table(headers, rows.iter().map(cells).collect()),
        }
        Ok(())
    }

    /// Prints one record as JSON, or as `key: value` lines.
    pub fn record<T: Serialize>(self, value: &T, fields: &[(&str, String)]) -> Result<()> {
        match self {
            Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
            Output::Table => {
                let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
                for (k, v) in fields {
                    println!("{k:width$}  {v}");
                }
            }
        }
        Ok(())
    }
}

/// Prints rows under headers, each column as wide as its widest cell.
pub fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}
