//! Basic auth and the request rate limit from the web config, as one axum
//! middleware in front of every endpoint but `/healthz`.
//!
//! bcrypt is slow on purpose (about 70 ms at cost 10), so a client that
//! sends wrong passwords could make the daemon burn a core. Therefore:
//! - A successful verification is remembered (a SHA-256 of the user and
//!   password, never the password; at most [`CACHE_ENTRIES`]), so a
//!   scraper that keeps sending the same credentials costs one hash
//!   lookup per request after the first.
//! - Every other attempt (a new password, a wrong one, an unknown user,
//!   which is checked against a configured hash so it takes as long) runs
//!   bcrypt on the blocking pool, never on the event loop's thread, one at
//!   a time. After an attempt that took `t`, the next one waits until
//!   `BCRYPT_SPACING × t` has passed, so bcrypt takes at most a fifth of
//!   one core however many requests arrive. A request that finds bcrypt
//!   busy or too soon is answered 429 with `Retry-After` at once.
//!
//! `/healthz` stays open so that Kubernetes' HTTP probes, which cannot send
//! credentials, keep working; it says `ok` and nothing else.
use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use axum::{
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use super::web_config::{RateLimit, WebConfig};

/// Verified credentials remembered; past this the cache starts over.
pub const CACHE_ENTRIES: usize = 64;
/// After a bcrypt run of `t`, the next uncached one may start `t × this`
/// later: bcrypt uses at most 1/this of one core.
pub const BCRYPT_SPACING: u32 = 5;

/// The middleware's state: who may in, and how often.
pub struct Gate {
    users: BTreeMap<String, String>,
    headers: Vec<(axum::http::HeaderName, HeaderValue)>,
    verified: Mutex<HashSet<[u8; 32]>>,
    bcrypt: Arc<Mutex<BcryptSlot>>,
    bucket: Option<Mutex<Bucket>>,
}

/// When the next uncached verification may run.
#[derive(Debug)]
struct BcryptSlot {
    busy: bool,
    next_at: Instant,
}

/// The token bucket of `rate_limit`.
struct Bucket {
    limit: RateLimit,
    tokens: f64,
    at: Instant,
}

enum Verdict {
    Allowed,
    Denied,
    /// bcrypt is busy or was used too recently: try again after this.
    Busy(Duration),
}

impl Gate {
    /// The gate for `config`; it lets everything through when the config
    /// has no users, headers or rate limit.
    #[must_use]
    pub fn new(config: &WebConfig) -> Self {
        Self {
            users: config.users.clone(),
            headers: config.headers.clone(),
            verified: Mutex::new(HashSet::new()),
            bcrypt: Arc::new(Mutex::new(BcryptSlot {
                busy: false,
                next_at: Instant::now(),
            })),
            bucket: config.rate_limit.map(|limit| {
                Mutex::new(Bucket {
                    limit,
                    tokens: f64::from(limit.burst),
                    at: Instant::now(),
                })
            }),
        }
    }

    /// Takes a token; `Err` with the wait until the next one.
    fn take_token(&self) -> Result<(), Duration> {
        let Some(bucket) = &self.bucket else {
            return Ok(());
        };
        let mut b = bucket.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let per_token = b.limit.interval.as_secs_f64();
        let refill = now.duration_since(b.at).as_secs_f64() / per_token;
        b.tokens = (b.tokens + refill).min(f64::from(b.limit.burst));
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) * per_token))
        }
    }

    async fn check(&self, authorization: Option<&HeaderValue>) -> Verdict {
        let Some((user, password)) = authorization.and_then(parse_basic) else {
            return Verdict::Denied;
        };
        let key = cache_key(&user, &password);
        if self
            .verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&key)
        {
            return Verdict::Allowed;
        }
        let known = self.users.get(&user);
        // An unknown user is checked against some configured hash, so the
        // answer takes as long as for a known one.
        let Some(hash) = known.or_else(|| self.users.values().next()).cloned() else {
            return Verdict::Denied;
        };
        let guard = match BcryptGuard::take(&self.bcrypt) {
            Ok(guard) => guard,
            Err(wait) => return Verdict::Busy(wait),
        };
        // The guard moves into the blocking task: the slot frees when bcrypt
        // has finished, even if the client has gone away meanwhile.
        let matched = tokio::task::spawn_blocking(move || {
            let matched = bcrypt::verify(password.as_bytes(), &hash).unwrap_or(false);
            drop(guard);
            matched
        })
        .await
        .unwrap_or(false);
        if matched && known.is_some() {
            let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
            if verified.len() >= CACHE_ENTRIES {
                verified.clear();
            }
            verified.insert(key);
            Verdict::Allowed
        } else {
            Verdict::Denied
        }
    }
}

/// The one bcrypt run allowed at a time; records its duration on drop.
struct BcryptGuard {
    slot: Arc<Mutex<BcryptSlot>>,
    started: Instant,
}

impl BcryptGuard {
    fn take(slot: &Arc<Mutex<BcryptSlot>>) -> Result<Self, Duration> {
        let mut s = slot.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if s.busy {
            return Err(Duration::from_secs(1));
        }
        if now < s.next_at {
            return Err(s.next_at - now);
        }
        s.busy = true;
        Ok(Self {
            slot: Arc::clone(slot),
            started: now,
        })
    }
}

impl Drop for BcryptGuard {
    fn drop(&mut self) {
        let took = self.started.elapsed();
        let mut s = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        s.busy = false;
        s.next_at = Instant::now() + took * (BCRYPT_SPACING - 1);
    }
}

/// The user and password of a `Basic` authorization header.
fn parse_basic(value: &HeaderValue) -> Option<(String, String)> {
    let text = value.to_str().ok()?;
    let (scheme, encoded) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

fn cache_key(user: &str, password: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((user.len() as u64).to_le_bytes());
    h.update(user.as_bytes());
    h.update(password.as_bytes());
    h.finalize().into()
}

fn retry_after(wait: Duration) -> HeaderValue {
    HeaderValue::from(wait.as_secs().saturating_add(1))
}

/// The middleware: rate limit and auth for everything but `/healthz`, then
/// the configured response headers on every answer.
pub async fn guard(State(gate): State<Arc<Gate>>, request: Request, next: Next) -> Response {
    let open = request.uri().path() == "/healthz";
    let mut response = if open {
        next.run(request).await
    } else if let Err(wait) = gate.take_token() {
        too_many(wait)
    } else if gate.users.is_empty() {
        next.run(request).await
    } else {
        match gate
            .check(request.headers().get(header::AUTHORIZATION))
            .await
        {
            Verdict::Allowed => next.run(request).await,
            Verdict::Denied => (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Basic realm=\"kmod-monitor\"")],
                "unauthorized\n",
            )
                .into_response(),
            Verdict::Busy(wait) => too_many(wait),
        }
    };
    for (name, value) in &gate.headers {
        response.headers_mut().insert(name.clone(), value.clone());
    }
    response
}

fn too_many(wait: Duration) -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, retry_after(wait))],
        "too many requests\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, password: &str) -> HeaderValue {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        HeaderValue::from_str(&format!("Basic {encoded}")).unwrap_or_else(|e| panic!("{e}"))
    }

    fn gate() -> Gate {
        let hash = bcrypt::hash("right", 4).unwrap_or_else(|e| panic!("{e}"));
        Gate::new(&WebConfig {
            users: [("prometheus".to_owned(), hash)].into(),
            ..WebConfig::default()
        })
    }

    #[tokio::test]
    async fn right_credentials_pass_once_verified_without_bcrypt() {
        let g = gate();
        assert!(matches!(
            g.check(Some(&basic("prometheus", "right"))).await,
            Verdict::Allowed
        ));
        // bcrypt is now spaced out; the cached answer does not need it.
        g.bcrypt
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next_at = Instant::now() + Duration::from_secs(60);
        for _ in 0..100 {
            assert!(matches!(
                g.check(Some(&basic("prometheus", "right"))).await,
                Verdict::Allowed
            ));
        }
    }

    #[tokio::test]
    async fn wrong_passwords_are_spaced_out_not_queued() {
        let g = gate();
        assert!(matches!(
            g.check(Some(&basic("prometheus", "wrong"))).await,
            Verdict::Denied
        ));
        // Straight after a bcrypt run, the next uncached attempt is refused
        // without running bcrypt.
        assert!(matches!(
            g.check(Some(&basic("mallory", "x"))).await,
            Verdict::Busy(_)
        ));
        assert!(matches!(g.check(None).await, Verdict::Denied));
        assert!(matches!(
            g.check(Some(&HeaderValue::from_static("Bearer x"))).await,
            Verdict::Denied
        ));
    }

    #[test]
    fn the_bucket_refills_one_token_per_interval() {
        let g = Gate::new(&WebConfig {
            rate_limit: Some(RateLimit {
                interval: Duration::from_secs(3600),
                burst: 2,
            }),
            ..WebConfig::default()
        });
        assert!(g.take_token().is_ok());
        assert!(g.take_token().is_ok());
        let wait = g
            .take_token()
            .err()
            .unwrap_or_else(|| panic!("a third token"));
        assert!(wait > Duration::from_secs(3500), "{wait:?}");
    }
}
