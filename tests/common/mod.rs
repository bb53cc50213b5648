//! Helpers shared by the end-to-end tests: real relays, agents and databases on port 0.
#![allow(dead_code)]

pub mod pg;
