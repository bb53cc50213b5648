//! Request extractors: the authenticated caller and JSON bodies with our error shape.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};

use super::error::ApiError;
use crate::auth::{authenticate, AuthError, Principal};
use crate::relay::state::Shared;

/// The authenticated caller of an API request (`Authorization: Bearer <API key or JWT>`).
pub struct Caller(pub Principal);

/// The bearer token of a request, if it has one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

impl FromRequestParts<Arc<Shared>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<Shared>,
    ) -> Result<Self, Self::Rejection> {
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let token = bearer(&parts.headers).ok_or(ApiError::Unauthorized)?;
        match authenticate(state.store.as_ref(), &state.jwt, token).await {
            Ok(principal) => {
                state.record_key_use(&principal);
                Ok(Caller(principal))
            }
            Err(AuthError::InvalidToken) => match state.auth_failed(ip) {
                Some(secs) => Err(ApiError::TooManyRequests(secs)),
                None => Err(ApiError::Unauthorized),
            },
            Err(AuthError::Store(e)) => Err(e.into()),
        }
    }
}

impl Caller {
    /// Refuses with 403 unless the caller is an admin.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.0.user.is_admin {
            Ok(())
        } else {
            Err(ApiError::Forbidden("Only admins may do this.".into()))
        }
    }
}

/// A JSON request body; malformed JSON, wrong types and unknown fields answer 400 in our
/// error shape instead of axum's plain-text rejection.
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Json(value)),
            Err(rejection) => Err(ApiError::bad(rejection.body_text())),
        }
    }
}

/// A path parameter; one that does not parse (a non-numeric id) answers 400 in our shape.
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => Err(ApiError::bad(rejection.body_text())),
        }
    }
}
