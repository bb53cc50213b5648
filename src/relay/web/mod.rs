//! What the relay serves to browsers: the dashboard's files and the terminal's WebSocket.

pub mod ssh;
pub mod terminal;
