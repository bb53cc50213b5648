//! The API's one error type and its stable JSON body.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::store::StoreError;

/// Everything an API handler can answer besides success.
///
/// The client sees a status, a stable snake_case code and one sentence; causes that are not
/// the client's business (database errors) are logged here once and never sent.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or a value is invalid.
    #[error("{0}")]
    BadRequest(String),
    /// No token, or one that proves nobody.
    #[error("a valid API key or token is required")]
    Unauthorized,
    /// Authenticated, but this action is not theirs to take.
    #[error("{0}")]
    Forbidden(String),
    /// No such thing, or the caller may not see it.
    #[error("{0}")]
    NotFound(String),
    /// The thing exists already.
    #[error("{0}")]
    Conflict(String),
    /// The endpoint exists but not with this method.
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    /// Too many failed authentications from this address.
    #[error("too many failed attempts; try again in {0} seconds")]
    TooManyRequests(u64),
    /// A service the relay asked on the caller's behalf failed (GitHub, for key imports).
    #[error("{0}")]
    BadGateway(String),
    /// The store cannot be reached.
    #[error("the relay's store is unavailable; try again shortly")]
    Unavailable,
    /// The relay is draining (shutting down): use another relay.
    #[error("this relay is draining; use another one")]
    Draining,
    /// A bug or broken database; details are in the relay's log.
    #[error("internal error")]
    Internal,
}

#[derive(Serialize, utoipa::ToSchema)]
/// The body of every error response.
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
/// What went wrong.
pub struct ErrorDetail {
    /// Stable, machine-readable: `bad_request`, `unauthorized`, `forbidden`, `not_found`,
    /// `conflict`, `method_not_allowed`, `too_many_requests`, `bad_gateway`, `unavailable`,
    /// `draining`, `internal`.
    pub code: &'static str,
    /// One sentence for people.
    pub message: String,
}

impl ApiError {
    /// The status and code this error answers with.
    pub fn status_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_requests"),
            ApiError::BadGateway(_) => (StatusCode::BAD_GATEWAY, "bad_gateway"),
            ApiError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
            ApiError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// A 400 whose message is `message`.
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError::BadRequest(message.into())
    }

    /// A 404 saying `what` does not exist (or is not visible, which reads the same).
    pub fn not_found(what: impl std::fmt::Display) -> ApiError {
        ApiError::NotFound(format!("{what} not found."))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => ApiError::Conflict("That already exists.".into()),
            StoreError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "store unavailable");
                ApiError::Unavailable
            }
            other => {
                tracing::error!(error = %other, "store error");
                ApiError::Internal
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_code();
        let mut message = self.to_string();
        if !message.ends_with('.') {
            message.push('.');
        }
        if let Some(first) = message.get(..1) {
            message = first.to_uppercase() + &message[1..];
        }
        let body = ErrorBody {
            error: ErrorDetail { code, message },
        };
        let mut response = (status, axum::Json(body)).into_response();
        match &self {
            ApiError::Unauthorized => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"cloudlink\""),
                );
            }
            ApiError::TooManyRequests(secs) => {
                if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                    response.headers_mut().insert(header::RETRY_AFTER, v);
                }
            }
            _ => {}
        }
        response
    }
}
