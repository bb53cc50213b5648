//! Settings in layers, for both roles: defaults < TOML file < environment and flags.
//!
//! Each setting is declared once, as a field of its role's config struct with its value in
//! that struct's `Default`. The flags (clap reads each flag's environment variable too) are
//! a struct of `Option`s that serializes only what was given, under the config's key
//! names; [`layer`] lays that over the file's table, key by key (tables merged, anything
//! else replaced), and deserializes the config from the result. Nothing lists the
//! settings a second time to copy them across.

use serde::de::DeserializeOwned;
use serde::Serialize;
use toml::{Table, Value};

/// The config `file` (a TOML table; empty for none) with `given` laid over it, keys the
/// config struct does not know being errors. Keys absent from both take the struct's
/// defaults (its `#[serde(default)]`).
pub fn layer<T: DeserializeOwned>(file: Table, given: &impl Serialize) -> Result<T, String> {
    let given = Table::try_from(given).map_err(|e| format!("cannot read the flags: {e}"))?;
    let mut merged = file;
    merge(&mut merged, given);
    T::deserialize(Value::Table(merged)).map_err(|e| e.to_string())
}

/// Lays `top` over `base`: a table meets a table key by key; any other value replaces.
fn merge(base: &mut Table, top: Table) {
    for (key, value) in top {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(under)), Value::Table(over)) => merge(under, over),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// For flags that are only ever switched on: serialized when on, so that leaving one out
/// keeps the file's value.
pub fn is_false(on: &bool) -> bool {
    !*on
}

/// Holds each `[default: X]` a flag's help states against the one declaration: given as
/// that flag, `X` must load the same settings as giving nothing. `prose` names the flags
/// whose stated default is a description ("the QUIC address's TCP twin"); each of them
/// must indeed not load as the default, so the list cannot go stale. Returns how many
/// flags were checked. For the roles' tests.
#[cfg(test)]
pub fn check_stated_defaults<A, C>(load: impl Fn(&A) -> C, prose: &[&str]) -> usize
where
    A: clap::Args + clap::FromArgMatches,
    C: PartialEq + std::fmt::Debug,
{
    let command = A::augment_args(clap::Command::new("role").no_binary_name(true));
    let none = load(
        &A::from_arg_matches(&command.clone().get_matches_from(Vec::<String>::new())).unwrap(),
    );
    let mut checked = 0;
    for arg in command.get_arguments() {
        let (Some(long), Some(help)) = (arg.get_long(), arg.get_help()) else {
            continue;
        };
        let help = help.to_string();
        let Some(stated) = help
            .split_once("[default: ")
            .and_then(|(_, rest)| rest.split_once(']'))
            .map(|(stated, _)| stated.to_owned())
        else {
            continue;
        };
        let given = command
            .clone()
            .try_get_matches_from([format!("--{long}"), stated.clone()])
            .ok()
            .and_then(|m| A::from_arg_matches(&m).ok())
            .map(|args| load(&args));
        let same = given.as_ref() == Some(&none);
        if prose.contains(&long) {
            assert!(
                !same,
                "--{long}'s default {stated:?} is a value now: drop it from `prose`"
            );
        } else {
            assert!(
                same,
                "--{long} says [default: {stated}], but giving that loads {given:?}, not the \
                 default {none:?}"
            );
            checked += 1;
        }
    }
    checked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, serde::Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Config {
        name: String,
        port: u16,
        inner: Inner,
    }

    #[derive(Debug, PartialEq, serde::Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        a: u32,
        b: u32,
    }

    impl Default for Inner {
        fn default() -> Self {
            Inner { a: 1, b: 2 }
        }
    }

    // No `skip_serializing_if` needed: TOML leaves out a `None` field of a struct.
    #[derive(Serialize, Default)]
    struct Flags {
        port: Option<u16>,
        inner: InnerFlags,
    }

    #[derive(Serialize, Default)]
    struct InnerFlags {
        b: Option<u32>,
    }

    #[test]
    fn flags_win_per_key_and_tables_merge() {
        let file: Table =
            toml::from_str("name = \"f\"\nport = 1\n[inner]\na = 10\nb = 20\n").unwrap();
        let flags = Flags {
            port: Some(2),
            inner: InnerFlags { b: Some(30) },
        };
        let c: Config = layer(file, &flags).unwrap();
        assert_eq!(
            c,
            Config {
                name: "f".into(),
                port: 2,
                inner: Inner { a: 10, b: 30 },
            }
        );
    }

    #[test]
    fn nothing_given_keeps_the_file_and_the_defaults() {
        let file: Table = toml::from_str("[inner]\nb = 5\n").unwrap();
        let c: Config = layer(file, &Flags::default()).unwrap();
        assert_eq!(c.port, 0);
        assert_eq!(c.inner, Inner { a: 1, b: 5 });
    }

    #[test]
    fn unknown_keys_are_errors() {
        let file: Table = toml::from_str("nmae = \"x\"\n").unwrap();
        let err = layer::<Config>(file, &Flags::default()).unwrap_err();
        assert!(err.contains("nmae"), "{err}");
    }
}
