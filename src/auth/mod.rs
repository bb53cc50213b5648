//! Who is calling ([`authenticate`]) and what they may reach ([`policy`]).

#[cfg(feature = "relay")]
pub mod policy;
#[cfg(feature = "relay")]
mod principal;
pub mod ssh_keys;
#[cfg(feature = "relay")]
pub mod tokens;

#[cfg(feature = "relay")]
pub use principal::*;
