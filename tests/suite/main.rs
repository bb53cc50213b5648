//! The end-to-end tests: real relays, agents, sshd, Postgres, browsers and Docker-free
//! loopback services. One test binary for all of them, so that the shared helpers in
//! `common` compile and link once instead of once per file (a clean CI build spent minutes
//! on that). `tests/alloc.rs` stays apart: it installs a counting global allocator.

mod common;

mod api;
mod balena_cli;
mod browser;
mod cli;
mod cluster;
mod crash;
mod faults;
mod field;
mod github_import;
mod hardening;
mod layers;
mod memory;
mod operations;
mod ssh;
mod store;
mod tcp_link;
mod terminal;
mod tunnel;
