//! The daemon's HTTP API from the guest's side, over ureq (plain HTTP, no
//! TLS): `/healthz` for readiness and `/status` for everything else, with
//! polling helpers that retry every 20 ms instead of sleeping blindly.
use std::{
    thread,
    time::{Duration, Instant},
};

use crate::status::Status;

/// Where the daemon listens in the guest.
pub const LISTEN: &str = "127.0.0.1:9469";
/// How often to poll.
pub const POLL_EVERY: Duration = Duration::from_millis(20);
/// How long a state change may take to show up in `/status`.
pub const CHANGE_WITHIN: Duration = Duration::from_secs(5);

/// A client for one daemon address.
pub struct Api {
    agent: ureq::Agent,
    base: String,
}

impl Api {
    /// A client for `http://LISTEN`.
    pub fn new() -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(3)))
            .http_status_as_error(false)
            .build();
        Self {
            agent: config.into(),
            base: format!("http://{LISTEN}"),
        }
    }

    /// `GET path`: status code and body.
    fn get(&self, path: &str) -> Result<(u16, String), String> {
        let url = format!("{}{path}", self.base);
        let mut response = self
            .agent
            .get(&url)
            .call()
            .map_err(|e| format!("GET {url}: {e}"))?;
        let code = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("GET {url}: reading the body: {e}"))?;
        Ok((code, body))
    }

    /// `GET /metrics`, which must answer 200 in OpenMetrics.
    pub fn metrics(&self) -> Result<String, String> {
        match self.get("/metrics")? {
            (200, body) => Ok(body),
            (code, body) => Err(format!("GET /metrics answered {code}: {}", body.trim())),
        }
    }

    /// `GET /healthz`'s status code.
    pub fn healthz(&self) -> Result<u16, String> {
        self.get("/healthz").map(|(code, _)| code)
    }

    /// `GET /status`, which must answer 200 with the documented JSON.
    pub fn status(&self) -> Result<Status, String> {
        let (code, body) = self.get("/status")?;
        if code != 200 {
            return Err(format!("GET /status answered {code}: {}", body.trim()));
        }
        serde_json::from_str(&body).map_err(|e| {
            format!(
                "GET /status: the JSON does not match the contract: {e}; body: {}",
                body.trim()
            )
        })
    }

    /// Polls `/status` until `done` holds, for up to [`CHANGE_WITHIN`].
    /// `done` returns `Err` when the document lacks what it looks for.
    pub fn wait_for(
        &self,
        what: &str,
        done: impl Fn(&Status) -> Result<bool, String>,
    ) -> Result<Status, String> {
        let start = Instant::now();
        let mut last = String::from("no answer yet");
        while start.elapsed() < CHANGE_WITHIN {
            match self.status() {
                Ok(status) => match done(&status) {
                    Ok(true) => return Ok(status),
                    Ok(false) => last = status.summary(),
                    Err(e) => last = e,
                },
                Err(e) => last = e,
            }
            thread::sleep(POLL_EVERY);
        }
        Err(format!(
            "{what} did not show in /status within {} s; last: {last}",
            CHANGE_WITHIN.as_secs()
        ))
    }
}
