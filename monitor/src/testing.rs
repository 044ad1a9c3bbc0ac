//! Test support shared by the unit tests and the integration-test crate
//! (feature `test-support`): short constructors for validated values.
//! Nothing here is used by the daemon itself.
use crate::names::ModuleName;

/// A module name known to be valid; panics otherwise (test input).
///
/// # Panics
/// When `s` is not a valid module name.
#[must_use]
pub fn name(s: &str) -> ModuleName {
    ModuleName::parse(s).unwrap_or_else(|e| panic!("test module name {s:?}: {e}"))
}
