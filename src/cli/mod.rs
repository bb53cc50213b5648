//! The user commands: login settings, an API client, and output for people or scripts.

#[cfg(feature = "relay")]
pub mod admin;
#[cfg(feature = "relay")]
mod client;
#[cfg(feature = "relay")]
pub mod connect;
#[cfg(feature = "relay")]
pub mod login;
#[cfg(feature = "relay")]
pub mod resolve;
#[cfg(feature = "relay")]
pub mod settings;
#[cfg(feature = "relay")]
pub mod ssh;
#[cfg(feature = "relay")]
pub mod tunnel;

#[cfg(feature = "relay")]
pub use client::*;
