//! Alertmanager stand-ins, for what the real one cannot do on demand:
//! - [`Hung`] accepts connections and never answers (a hung replica);
//! - [`BearerEndpoint`] answers `POST /api/v2/alerts` with 200 only when
//!   the `Authorization: Bearer` header carries the token it expects now
//!   (Alertmanager 0.25's web config checks basic auth, not bearer
//!   tokens, which a proxy in front of it would check).
//!
//! Both run on a thread of their own on a free loopback port and stop when
//! dropped.
use std::{
    io::Read as _,
    net::{TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

/// How often a stand-in's thread checks whether it should stop.
const TICK: Duration = Duration::from_millis(20);

/// A listener that accepts every connection, reads what it is sent, and
/// never answers.
pub struct Hung {
    port: u16,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Hung {
    /// Starts it on a free loopback port.
    ///
    /// # Panics
    /// When no port can be bound.
    #[must_use]
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("binding the hung listener: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("the hung listener's address: {e}"))
            .port();
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("making the hung listener non-blocking: {e}"));
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepted, stop) = (Arc::clone(&accepted), Arc::clone(&stop));
            thread::spawn(move || {
                // Held open, never written to, until the stand-in stops.
                let mut open: Vec<TcpStream> = Vec::new();
                let mut scratch = [0_u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let _ = stream.set_nonblocking(true);
                            accepted.fetch_add(1, Ordering::Relaxed);
                            open.push(stream);
                        }
                        Err(_) => thread::sleep(TICK),
                    }
                    for s in &mut open {
                        let _ = s.read(&mut scratch);
                    }
                }
            })
        };
        Self {
            port,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    /// Its base URL.
    #[must_use]
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Connections accepted so far.
    #[must_use]
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Hung {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One POST the bearer endpoint received.
#[derive(Clone, Debug)]
pub struct Received {
    /// Whether it carried the expected token.
    pub authorized: bool,
    /// The JSON body.
    pub body: String,
}

/// `POST /api/v2/alerts` that demands a bearer token.
pub struct BearerEndpoint {
    port: u16,
    token: Arc<Mutex<String>>,
    received: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl BearerEndpoint {
    /// Starts it on a free loopback port, expecting `token`.
    ///
    /// # Panics
    /// When no port can be bound.
    #[must_use]
    pub fn start(token: &str) -> Self {
        let server = tiny_http::Server::http("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("starting the bearer endpoint: {e}"));
        let port = server
            .server_addr()
            .to_ip()
            .unwrap_or_else(|| panic!("the bearer endpoint has no IP address"))
            .port();
        let token = Arc::new(Mutex::new(token.to_owned()));
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (token, received, stop) =
                (Arc::clone(&token), Arc::clone(&received), Arc::clone(&stop));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(Some(mut request)) = server.recv_timeout(TICK) else {
                        continue;
                    };
                    let expected = format!("Bearer {}", lock(&token));
                    let authorized = request
                        .headers()
                        .iter()
                        .any(|h| h.field.equiv("Authorization") && h.value.as_str() == expected);
                    let mut body = String::new();
                    let _ = request.as_reader().read_to_string(&mut body);
                    let right_place = *request.method() == tiny_http::Method::Post
                        && request.url() == "/api/v2/alerts";
                    let code = match (right_place, authorized) {
                        (false, _) => 404,
                        (true, false) => 401,
                        (true, true) => 200,
                    };
                    if right_place {
                        lock(&received).push(Received { authorized, body });
                    }
                    let _ = request.respond(tiny_http::Response::empty(code));
                }
            })
        };
        Self {
            port,
            token,
            received,
            stop,
            thread: Some(thread),
        }
    }

    /// Its base URL.
    #[must_use]
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Expect `token` from now on (a rotated credential).
    pub fn set_token(&self, token: &str) {
        token.clone_into(&mut lock(&self.token));
    }

    /// Every POST so far.
    #[must_use]
    pub fn received(&self) -> Vec<Received> {
        lock(&self.received).clone()
    }

    /// Polls until `ok` holds for the POSTs received; returns them.
    ///
    /// # Panics
    /// After `timeout`, with what was received.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.received();
            if ok(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; received:\n{got:#?}"
            );
            thread::sleep(TICK);
        }
    }
}

impl Drop for BearerEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
