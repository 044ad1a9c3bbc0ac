//! One validator per setting, shared by the command-line flag and the
//! config-file key, so both reject the same values with the same words.
//!
//! Each validator takes the raw value and returns the typed one, or the
//! problem as a sentence fragment without the key: the caller prefixes
//! `--flag VALUE: ` or `config file PATH, line N: key = VALUE: `. Every
//! number is bounded above as well as below, so no value can overflow a
//! timer or an allocation later.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

/// Longest accepted `reconcile_interval`: a day.
pub const MAX_RECONCILE_SECS: u64 = 86_400;
/// Longest accepted `poll_interval`: an hour.
pub const MAX_POLL_SECS: u64 = 3_600;
/// Longest accepted `alert_resend_interval`: a day (Alertmanager resolves
/// an alert that is not re-sent within its `resolve_timeout`).
pub const MAX_RESEND_SECS: u64 = 86_400;
/// Longest accepted `longhorn_grace`: a week.
pub const MAX_GRACE_SECS: u64 = 604_800;
/// The smallest ring buffer accepted: one page.
pub const MIN_RING_BUFFER_SIZE: u32 = 4096;
/// The largest ring buffer accepted: 256 MiB of locked kernel memory.
pub const MAX_RING_BUFFER_SIZE: u32 = 256 * 1024 * 1024;
/// The smallest event-log file before rotation.
pub const MIN_EVENT_LOG_BYTES: u64 = crate::forensic::MIN_MAX_BYTES;
/// The largest event-log file before rotation: 64 GiB.
pub const MAX_EVENT_LOG_BYTES: u64 = 64 * 1024 * 1024 * 1024;
/// Most rotated event-log files kept.
pub const MAX_EVENT_LOG_KEEP: u32 = 1_000;
/// Smallest bound on records waiting for the disk: 64 KiB (a few hundred
/// records).
pub const MIN_EVENT_LOG_BUFFER_BYTES: u64 = 64 * 1024;
/// Largest bound on records waiting for the disk: 1 GiB.
pub const MAX_EVENT_LOG_BUFFER_BYTES: u64 = 1024 * 1024 * 1024;
/// Longest accepted Alertmanager request timeout: two minutes.
pub const MAX_ALERTMANAGER_TIMEOUT_SECS: u64 = 120;
/// Most 2 MiB hugepages that can be required: 1 TiB.
pub const MAX_HUGEPAGES_2MI: u64 = 512 * 1024;
/// Longest accepted `k8s_heartbeat`: a day.
pub const MAX_K8S_HEARTBEAT_SECS: u64 = 86_400;

fn seconds(value: u64, max: u64) -> Result<Duration, String> {
    match value {
        0 => Err("must be at least 1 second".to_owned()),
        v if v > max => Err(format!("must be at most {max} seconds")),
        v => Ok(Duration::from_secs(v)),
    }
}

/// `reconcile_interval` / `--reconcile-interval`.
///
/// # Errors
/// Zero, or more than [`MAX_RECONCILE_SECS`].
pub fn reconcile_interval(secs: u64) -> Result<Duration, String> {
    seconds(secs, MAX_RECONCILE_SECS)
}

/// `poll_interval` / `--poll-interval`.
///
/// # Errors
/// Zero, or more than [`MAX_POLL_SECS`].
pub fn poll_interval(secs: u64) -> Result<Duration, String> {
    seconds(secs, MAX_POLL_SECS)
}

/// `alert_resend_interval` / `--alert-resend-interval`.
///
/// # Errors
/// Zero, or more than [`MAX_RESEND_SECS`].
pub fn alert_resend_interval(secs: u64) -> Result<Duration, String> {
    seconds(secs, MAX_RESEND_SECS)
}

/// `longhorn_grace` / `--longhorn-grace`.
///
/// # Errors
/// Zero, or more than [`MAX_GRACE_SECS`].
pub fn longhorn_grace(secs: u64) -> Result<Duration, String> {
    seconds(secs, MAX_GRACE_SECS)
}

/// `k8s_heartbeat` / `--k8s-heartbeat`.
///
/// # Errors
/// Zero, or more than [`MAX_K8S_HEARTBEAT_SECS`].
pub fn k8s_heartbeat(secs: u64) -> Result<Duration, String> {
    seconds(secs, MAX_K8S_HEARTBEAT_SECS)
}

/// `ring_buffer_size` / `--ring-buffer-size`.
///
/// # Errors
/// Not a power of two between [`MIN_RING_BUFFER_SIZE`] and
/// [`MAX_RING_BUFFER_SIZE`].
pub fn ring_buffer_size(bytes: u32) -> Result<u32, String> {
    if (MIN_RING_BUFFER_SIZE..=MAX_RING_BUFFER_SIZE).contains(&bytes) && bytes.is_power_of_two() {
        Ok(bytes)
    } else {
        Err(format!(
            "must be a power of two of at least {MIN_RING_BUFFER_SIZE} and at most {MAX_RING_BUFFER_SIZE} bytes"
        ))
    }
}

/// `event_log_max_bytes` / `--event-log-max-bytes`.
///
/// # Errors
/// Outside [`MIN_EVENT_LOG_BYTES`]..=[`MAX_EVENT_LOG_BYTES`].
pub fn event_log_max_bytes(bytes: u64) -> Result<u64, String> {
    if (MIN_EVENT_LOG_BYTES..=MAX_EVENT_LOG_BYTES).contains(&bytes) {
        Ok(bytes)
    } else {
        Err(format!(
            "must be at least {MIN_EVENT_LOG_BYTES} and at most {MAX_EVENT_LOG_BYTES} bytes"
        ))
    }
}

/// `event_log_keep` / `--event-log-keep`.
///
/// # Errors
/// Zero, or more than [`MAX_EVENT_LOG_KEEP`].
pub fn event_log_keep(keep: u32) -> Result<u32, String> {
    match keep {
        0 => Err("keep at least 1 rotated file".to_owned()),
        k if k > MAX_EVENT_LOG_KEEP => {
            Err(format!("keep at most {MAX_EVENT_LOG_KEEP} rotated files"))
        }
        k => Ok(k),
    }
}

/// `event_log_buffer_bytes` / `--event-log-buffer-bytes`.
///
/// # Errors
/// Outside [`MIN_EVENT_LOG_BUFFER_BYTES`]..=[`MAX_EVENT_LOG_BUFFER_BYTES`].
pub fn event_log_buffer_bytes(bytes: u64) -> Result<u64, String> {
    if (MIN_EVENT_LOG_BUFFER_BYTES..=MAX_EVENT_LOG_BUFFER_BYTES).contains(&bytes) {
        Ok(bytes)
    } else {
        Err(format!(
            "must be at least {MIN_EVENT_LOG_BUFFER_BYTES} and at most {MAX_EVENT_LOG_BUFFER_BYTES} bytes"
        ))
    }
}

/// `alertmanager_timeout` / `--alertmanager-timeout`.
///
/// # Errors
/// Zero, or more than [`MAX_ALERTMANAGER_TIMEOUT_SECS`].
pub fn alertmanager_timeout(secs: u64) -> Result<Duration, String> {
    seconds(secs, MAX_ALERTMANAGER_TIMEOUT_SECS)
}

/// `v2_hugepages_2mi` / `--v2-hugepages-2mi` (0 = do not check).
///
/// # Errors
/// More than [`MAX_HUGEPAGES_2MI`].
pub fn v2_hugepages_2mi(pages: u64) -> Result<u64, String> {
    if pages > MAX_HUGEPAGES_2MI {
        Err(format!("must be at most {MAX_HUGEPAGES_2MI} pages (1 TiB)"))
    } else {
        Ok(pages)
    }
}

/// `longhorn_version` / `--longhorn-version`: which Longhorn's
/// requirements apply (`1.12`, `v1.10.1`).
///
/// # Errors
/// Not `[v]MAJOR.MINOR[...]`.
pub fn longhorn_version(text: &str) -> Result<crate::requirements::LonghornVersion, String> {
    crate::requirements::LonghornVersion::parse(text)
}

/// `listen` / `--listen`: `IP:port`.
///
/// # Errors
/// Not an IP address and port.
pub fn listen(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .map_err(|e| format!("not an IP address and port ({e})"))
}

/// Text on one line: `node_name`, `runbook_url`.
///
/// # Errors
/// Empty, blank, or with control characters.
pub fn one_line(text: &str) -> Result<String, String> {
    if text.trim().is_empty() || text.chars().any(char::is_control) {
        Err("must be non-empty text on one line".to_owned())
    } else {
        Ok(text.to_owned())
    }
}

/// `longhorn_namespace` / `--longhorn-namespace`: a Kubernetes namespace
/// name (an RFC 1123 label).
///
/// # Errors
/// Not `[a-z0-9]([-a-z0-9]*[a-z0-9])?` of at most 63 characters.
pub fn namespace(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text.len() <= 63
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !text.starts_with('-')
        && !text.ends_with('-');
    if ok {
        Ok(text.to_owned())
    } else {
        Err(
            "not a Kubernetes namespace name (lower-case letters, digits and '-', 1 to 63 characters, starting and ending with a letter or digit)"
                .to_owned(),
        )
    }
}

/// An absolute path without control characters: `host_root`,
/// `kubeconfig`, `event_log`. Flags make a relative path absolute first
/// (relative to the working directory, as a shell user expects); a file
/// must say where it means.
///
/// # Errors
/// Relative, empty, or with control characters.
pub fn absolute_path(path: &Path) -> Result<PathBuf, String> {
    if !path.is_absolute() {
        return Err("is not an absolute path".to_owned());
    }
    if path.to_string_lossy().chars().any(char::is_control) {
        return Err("contains control characters".to_owned());
    }
    Ok(path.to_path_buf())
}

/// Makes a flag's path absolute against the working directory, then checks
/// it like a file's.
///
/// # Errors
/// No working directory, or [`absolute_path`]'s.
pub fn flag_path(path: &Path) -> Result<PathBuf, String> {
    let abs = std::path::absolute(path).map_err(|e| format!("cannot make it absolute: {e}"))?;
    absolute_path(&abs)
}

/// An Alertmanager base URL (`http://host:9093` or https, optionally with
/// a path prefix).
///
/// # Errors
/// Not a URL, not http(s), no host, a query or fragment, or credentials in
/// the URL.
pub fn alertmanager_url(text: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("not a URL ({e})"))?;
    match url.scheme() {
        "http" | "https" => {}
        other => return Err(format!("scheme {other:?} is not http or https")),
    }
    if url.host_str().is_none() {
        return Err("has no host".to_owned());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment".to_owned());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "must not carry credentials (they would show in logs and ps); use alertmanager_basic_auth_* or alertmanager_bearer_token_file"
                .to_owned(),
        );
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_bounded_both_ways() {
        assert_eq!(reconcile_interval(60), Ok(Duration::from_secs(60)));
        assert_eq!(
            reconcile_interval(0).unwrap_err(),
            "must be at least 1 second"
        );
        assert!(
            reconcile_interval(u64::MAX)
                .unwrap_err()
                .contains("at most 86400")
        );
        assert!(poll_interval(3_601).is_err());
        assert!(alert_resend_interval(u64::MAX).is_err());
        assert!(longhorn_grace(MAX_GRACE_SECS).is_ok());
        assert!(longhorn_grace(MAX_GRACE_SECS + 1).is_err());
        assert!(k8s_heartbeat(0).is_err());
        assert!(k8s_heartbeat(MAX_K8S_HEARTBEAT_SECS + 1).is_err());
    }

    #[test]
    fn sizes_are_bounded_both_ways() {
        assert_eq!(ring_buffer_size(4096), Ok(4096));
        for bad in [0, 1000, 2048, 4097, 1 << 30, u32::MAX] {
            assert!(ring_buffer_size(bad).is_err(), "{bad}");
        }
        assert!(event_log_max_bytes(4095).is_err());
        assert!(event_log_max_bytes(u64::MAX).is_err());
        assert_eq!(
            event_log_keep(0).unwrap_err(),
            "keep at least 1 rotated file"
        );
        assert!(event_log_keep(u32::MAX).is_err());
        assert_eq!(v2_hugepages_2mi(0), Ok(0));
        assert!(v2_hugepages_2mi(u64::MAX).is_err());
    }

    #[test]
    fn namespaces_follow_rfc_1123() {
        for ok in ["longhorn-system", "a", "x1", &"a".repeat(63)] {
            assert_eq!(namespace(ok).as_deref(), Ok(ok));
        }
        for bad in ["", "Longhorn", "a_b", "-a", "a-", "a.b", &"a".repeat(64)] {
            assert!(namespace(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn paths_must_be_absolute_and_printable() {
        assert!(absolute_path(Path::new("/host")).is_ok());
        assert_eq!(
            absolute_path(Path::new("host")).unwrap_err(),
            "is not an absolute path"
        );
        assert!(absolute_path(Path::new("/ho\nst")).is_err());
        assert!(flag_path(Path::new("relative")).unwrap().is_absolute());
    }

    #[test]
    fn alertmanager_urls() {
        assert!(alertmanager_url("http://am:9093/prefix").is_ok());
        assert!(alertmanager_url("https://am:9093").is_ok());
        for (bad, problem) in [
            ("ftp://am", "scheme \"ftp\" is not http or https"),
            ("http://u:p@am:9093", "must not carry credentials"),
            ("http://am:9093/?x=1", "must not have a query"),
            ("not a url", "not a URL"),
        ] {
            assert!(
                alertmanager_url(bad).unwrap_err().contains(problem),
                "{bad}"
            );
        }
    }

    #[test]
    fn text_on_one_line() {
        assert_eq!(one_line("node-1").as_deref(), Ok("node-1"));
        assert!(one_line("  ").is_err());
        assert!(one_line("a\u{1b}[2K").is_err());
    }
}
