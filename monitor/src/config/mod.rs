//! Configuration: the command-line flags, the TOML config file, and the
//! one resolver that turns both into the settings the program runs on.
//!
//! - [`flags`]: the flags as clap parses them (every one optional).
//! - [`mod@file`]: the config file, parsed and checked key by key, with errors
//!   that name the file, line and column.
//! - [`validate`]: one validator per setting, shared by flag and key.
//! - [`settings`]: flag over file over default, once, for `run`, `check`
//!   and SIGHUP alike; the `DEFAULT_…` constants `--help` shows.
pub mod file;
pub mod flags;
pub mod settings;
pub mod validate;

pub use file::{ConfigError, ConfigProblem, EventLogPath, FileConfig, load_config, parse_config};
pub use settings::{CommonSettings, Inputs, Reload, RunSettings, SettingsError};
