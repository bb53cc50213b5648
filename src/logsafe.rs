//! The one path by which text a peer sent reaches a log line.
//!
//! Agents, CONNECT clients and API callers choose some of the strings the relay logs (a
//! hello's `agent` field, a target, a username). Written raw, a newline would forge a log
//! line and an ESC would drive the operator's terminal. [`Peer`] escapes every control
//! character and bounds the length, so a log line is exactly one line of what we wrote.

use std::fmt::{self, Write};

/// The most characters of one peer-supplied value that reach a log line.
pub const MAX_LOGGED_CHARS: usize = 200;

/// Peer-supplied text, escaped for a log line: control characters (C0, DEL, C1) as
/// `\n`, `\r`, `\t` or `\u{..}`, backslashes doubled, at most [`MAX_LOGGED_CHARS`]
/// characters followed by `…` when cut.
#[derive(Clone, Copy)]
pub struct Peer<'a>(pub &'a str);

impl fmt::Display for Peer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.0.chars().enumerate() {
            if i == MAX_LOGGED_CHARS {
                return f.write_char('…');
            }
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                '\\' => f.write_str("\\\\")?,
                c if c.is_control() => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Peer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// A secret that never shows itself in `Debug`, logs or `--print-config`.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_forge_lines_or_drive_terminals() {
        let forged = "agent/1\n2026-11-26T00:00:00Z  INFO forged line\x1b[31m\u{9b}\\";
        let shown = Peer(forged).to_string();
        assert!(!shown.chars().any(char::is_control), "{shown}");
        assert_eq!(
            shown,
            "agent/1\\n2026-11-26T00:00:00Z  INFO forged line\\u{1b}[31m\\u{9b}\\\\"
        );
        assert_eq!(Peer("plain ünïcode").to_string(), "plain ünïcode");
    }

    #[test]
    fn long_values_are_cut() {
        let long = "a".repeat(10_000);
        let shown = Peer(&long).to_string();
        assert_eq!(shown.chars().count(), MAX_LOGGED_CHARS + 1);
        assert!(shown.ends_with('…'));
    }
}
