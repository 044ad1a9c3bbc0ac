//! A fake Kubernetes API server for tests: Longhorn Settings and Nodes over real list+watch.
//!
//! A small HTTP/1.1 server on `std::net`, one thread per connection. It
//! does not use tiny_http because tiny_http 0.12 holds back a chunked body
//! until 8 KiB have built up (so a watch would not stream live), cannot close
//! one connection mid-stream, and keeps answering kept-alive connections
//! after its `Server` is dropped.
//!
//! Behaviour copied from a real apiserver: one resourceVersion counter for
//! every kind; watch events replayed from the retained history and then
//! streamed live; 410 Expired sent as an `ERROR` event in a 200 stream;
//! `BOOKMARK`s only on watches that set `allowWatchBookmarks=true`;
//! `timeoutSeconds`; `fieldSelector` (`metadata.name`, `metadata.namespace`)
//! and equality `labelSelector`s, including `ADDED`/`DELETED` when an object
//! starts or stops matching; `Status` bodies for 401/403/404; the bearer
//! token checked on every request; no event for an update that changes
//! nothing. Every other path, discovery included, gets a 404.
use std::{
    collections::BTreeMap,
    fs,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, RecvTimeoutError, Sender},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// Longhorn's namespace, the default.
pub const NAMESPACE: &str = "longhorn-system";
/// The bearer token in [`FakeKubeApi::write_kubeconfig`]; any other gets 401.
pub const TOKEN: &str = "test-token";
/// The user named in 403 messages: the daemon's ServiceAccount.
const USER: &str = "system:serviceaccount:kmod-monitor:kmod-monitor";
/// The watch length when a client sets no `timeoutSeconds`.
const DEFAULT_WATCH_SECS: u64 = 1800;
/// How often an idle watch checks whether its client went away.
const TICK: Duration = Duration::from_millis(100);
/// The longest request line or header line accepted, and the most headers.
const MAX_LINE: u64 = 16 * 1024;
const MAX_HEADERS: usize = 100;

/// A resource kind served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `settings.longhorn.io/v1beta2`, namespaced.
    Setting,
    /// Core v1 `Node`, cluster-scoped.
    Node,
}

impl Kind {
    /// apiVersion, kind, resource (plural) and API group.
    const fn names(self) -> (&'static str, &'static str, &'static str, &'static str) {
        match self {
            Self::Setting => ("longhorn.io/v1beta2", "Setting", "settings", "longhorn.io"),
            Self::Node => ("v1", "Node", "nodes", ""),
        }
    }

    /// `settings.longhorn.io`, `nodes`: how messages name the resource.
    fn qualified(self) -> String {
        match self.names() {
            (_, _, resource, "") => resource.to_owned(),
            (_, _, resource, group) => format!("{resource}.{group}"),
        }
    }
}

/// How requests for one kind are answered, lists, gets and watches alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Normal,
    /// 403: RBAC does not allow it.
    Forbidden,
    /// 404: no such resource (for settings: the Longhorn CRD is missing).
    NotFound,
}

/// One request as received, rejected ones included (not malformed ones).
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Still URL-encoded, without the `?`.
    pub query: String,
    /// `watch=true` or `watch=1`.
    pub watch: bool,
    pub at: Instant,
}

/// One committed change, as the watch cache keeps it.
struct Change {
    rv: u64,
    kind: Kind,
    event: &'static str,
    object: Value,
    /// Before a `MODIFIED`: to tell when it starts or stops matching.
    prev: Option<Value>,
}

/// An open watch stream.
struct Watch {
    id: u64,
    kind: Kind,
    selector: Selector,
    bookmarks: bool,
    /// `Some(line)` to send, `None` to end cleanly; dropped, it cuts.
    tx: Sender<Option<String>>,
    socket: TcpStream,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// A watch from an older resourceVersion gets 410 Expired.
    floor: u64,
    objects: BTreeMap<(Kind, String), Value>,
    history: Vec<Change>,
    modes: BTreeMap<Kind, Mode>,
    watches: Vec<Watch>,
    conns: BTreeMap<u64, TcpStream>,
    requests: Vec<Request>,
    next_id: u64,
}

impl State {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Stores `next` as `kind`/`name` (`None`: deletes it) at a new
    /// resourceVersion, keeps the change and sends it to matching watches.
    fn commit(&mut self, kind: Kind, name: &str, next: Option<Value>) {
        let key = (kind, name.to_owned());
        let (event, mut object, prev) = match (self.objects.remove(&key), next) {
            (None, Some(o)) => ("ADDED", o, None),
            (Some(p), Some(o)) => ("MODIFIED", o, Some(p)),
            (Some(p), None) => ("DELETED", p, None),
            (None, None) => return,
        };
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if event != "DELETED" {
            self.objects.insert(key, object.clone());
        }
        let change = Change {
            rv: self.rv,
            kind,
            event,
            object,
            prev,
        };
        for w in self.watches.iter().filter(|w| w.kind == kind) {
            if let Some(line) = project(&change, &w.selector) {
                let _ = w.tx.send(Some(line));
            }
        }
        self.history.push(change);
    }
}

struct Shared {
    ns: String,
    port: u16,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The fake apiserver. Dropping it stops it and joins its threads.
pub struct FakeKubeApi {
    shared: Arc<Shared>,
    /// The accept thread and its stop flag, while listening.
    listening: Mutex<Option<(Arc<AtomicBool>, JoinHandle<()>)>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl FakeKubeApi {
    /// Listening now on `127.0.0.1:<free port>`, namespace `longhorn-system`.
    #[must_use]
    pub fn start() -> Self {
        let api = Self::reserve();
        api.listen();
        api
    }

    /// A free port chosen, not listened on yet: connections are refused until
    /// [`listen`](Self::listen).
    #[must_use]
    pub fn reserve() -> Self {
        Self::reserve_in(NAMESPACE)
    }

    /// Like [`reserve`](Self::reserve), serving settings in `namespace`.
    #[must_use]
    pub fn reserve_in(namespace: &str) -> Self {
        // A real cluster's counter is never near zero, and "0" means "any"
        // to a watch.
        let state = State {
            rv: 10,
            ..State::default()
        };
        let shared = Shared {
            ns: namespace.to_owned(),
            port: crate::free_port(),
            state: Mutex::new(state),
        };
        Self {
            shared: Arc::new(shared),
            listening: Mutex::new(None),
            threads: Arc::default(),
        }
    }

    /// Starts listening on the port; a no-op when already listening.
    ///
    /// # Panics
    /// When the port cannot be bound within 5 s (something else took it).
    pub fn listen(&self) {
        let mut listening = lock(&self.listening);
        if listening.is_some() {
            return;
        }
        let port = self.port();
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", port))
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
            {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("fake kube-apiserver: binding port {port}: {e}; retrying");
                    thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("fake kube-apiserver: binding 127.0.0.1:{port}: {e}"),
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (shared, threads, flag) = (
            Arc::clone(&self.shared),
            Arc::clone(&self.threads),
            Arc::clone(&stop),
        );
        let thread = thread::spawn(move || accept_loop(&listener, &flag, &shared, &threads));
        *listening = Some((stop, thread));
    }

    /// Closes the listening socket (connections are refused) and every open
    /// connection, cutting watches mid-stream. [`listen`](Self::listen)
    /// starts it again on the same port.
    pub fn stop(&self) {
        if let Some((stop, thread)) = lock(&self.listening).take() {
            stop.store(true, Ordering::SeqCst);
            let _ = thread.join();
        }
        let mut st = self.shared.lock();
        st.watches.clear();
        for conn in st.conns.values() {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }

    #[must_use]
    pub fn port(&self) -> u16 {
        self.shared.port
    }

    /// `http://127.0.0.1:PORT`
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }

    /// Writes `dir/kubeconfig`: cluster [`url`](Self::url), bearer token
    /// [`TOKEN`], the namespace as the context's; returns its path.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user:\n    token: {TOKEN}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {}\n\
             current-context: fake\npreferences: {{}}\n",
            self.url(),
            self.namespace()
        );
        fs::create_dir_all(dir)
            .and_then(|()| fs::write(&path, text))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.shared.ns
    }

    /// Creates (`ADDED`) or updates (`MODIFIED`, generation + 1) a Setting.
    /// Its current value again changes nothing: no event, as for real.
    pub fn set_setting(&self, name: &str, value: &str) {
        let mut st = self.shared.lock();
        let next = match st.objects.get(&(Kind::Setting, name.to_owned())) {
            Some(old) if old["value"] == value => return,
            Some(old) => {
                let mut o = old.clone();
                let generation = o["metadata"]["generation"].as_u64().unwrap_or(0);
                o["metadata"]["generation"] = json!(generation + 1);
                o["value"] = json!(value);
                o
            }
            None => json!({
                "apiVersion": "longhorn.io/v1beta2", "kind": "Setting",
                "metadata": {"name": name, "namespace": self.shared.ns, "uid": uid(st.id()),
                             "generation": 1, "creationTimestamp": "2026-11-25T10:00:00Z"},
                "value": value, "status": {"applied": true},
            }),
        };
        st.commit(Kind::Setting, name, Some(next));
    }

    /// Deletes a Setting (`DELETED`); a no-op when there is none.
    pub fn delete_setting(&self, name: &str) {
        self.shared.lock().commit(Kind::Setting, name, None);
    }

    /// Creates or updates Node `name` with exactly `labels` plus
    /// `kubernetes.io/hostname=<name>`; no event when they are unchanged.
    pub fn set_node(&self, name: &str, labels: &[(&str, &str)]) {
        let mut map =
            serde_json::Map::from_iter([("kubernetes.io/hostname".to_owned(), json!(name))]);
        map.extend(labels.iter().map(|(k, v)| ((*k).to_owned(), json!(v))));
        let labels = Value::Object(map);
        let mut st = self.shared.lock();
        let next = match st.objects.get(&(Kind::Node, name.to_owned())) {
            Some(old) if old["metadata"]["labels"] == labels => return,
            Some(old) => {
                let mut o = old.clone();
                o["metadata"]["labels"] = labels;
                o
            }
            None => json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "uid": uid(st.id()),
                             "creationTimestamp": "2026-11-25T10:00:00Z", "labels": labels},
                "spec": {}, "status": {},
            }),
        };
        st.commit(Kind::Node, name, Some(next));
    }

    /// How `kind` is served from the next request on. Entering a failure
    /// mode ends that kind's watches (cleanly) so clients come back to it.
    pub fn set_mode(&self, kind: Kind, mode: Mode) {
        let mut st = self.shared.lock();
        st.modes.insert(kind, mode);
        if mode != Mode::Normal {
            for w in st.watches.iter().filter(|w| w.kind == kind) {
                let _ = w.tx.send(None);
            }
            st.watches.retain(|w| w.kind != kind);
        }
    }

    /// Closes every open watch's connection mid-stream (no final chunk).
    pub fn cut_watches(&self) {
        for w in self.shared.lock().watches.drain(..) {
            let _ = w.socket.shutdown(Shutdown::Both);
        }
    }

    /// Drops the retained history, as a compaction does. The resourceVersion
    /// also moves on by one (something else in the cluster changed), so any
    /// resourceVersion a client holds is now too old: its next watch gets 410
    /// Expired and it has to relist. Open watches go on.
    pub fn expire_history(&self) {
        let mut st = self.shared.lock();
        st.history.clear();
        st.rv += 1;
        st.floor = st.rv;
    }

    /// Sends a `BOOKMARK` at the current resourceVersion on every open watch
    /// that asked for bookmarks.
    pub fn bookmark(&self) {
        let st = self.shared.lock();
        for w in st.watches.iter().filter(|w| w.bookmarks) {
            let _ = w.tx.send(Some(bookmark(w.kind, st.rv, false)));
        }
    }

    /// Every request so far, oldest first.
    #[must_use]
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// The watch streams of `kind` open now.
    #[must_use]
    pub fn open_watches(&self, kind: Kind) -> usize {
        self.shared
            .lock()
            .watches
            .iter()
            .filter(|w| w.kind == kind)
            .count()
    }

    /// Waits until at least `n` watches of `kind` are open.
    ///
    /// # Panics
    /// After `timeout`, listing the requests received.
    #[track_caller]
    pub fn wait_for_watches(&self, kind: Kind, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.open_watches(kind) < n {
            if Instant::now() >= deadline {
                let requests = self.requests();
                panic!("< {n} {kind:?} watches open after {timeout:?}; requests: {requests:#?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FakeKubeApi {
    fn drop(&mut self) {
        self.stop();
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
    }
}

/// A UID shaped like Kubernetes' (a v4 UUID), unique per object.
fn uid(n: u64) -> String {
    format!("3f6c2a9e-8d41-4b7a-9c25-{n:012x}")
}

fn accept_loop(
    listener: &TcpListener,
    stop: &AtomicBool,
    shared: &Arc<Shared>,
    threads: &Mutex<Vec<JoinHandle<()>>>,
) {
    while !stop.load(Ordering::SeqCst) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                if e.kind() != io::ErrorKind::WouldBlock {
                    eprintln!("fake kube-apiserver: accept: {e}");
                }
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let (Ok(()), Ok(clone)) = (stream.set_nonblocking(false), stream.try_clone()) else {
            continue;
        };
        let mut st = shared.lock();
        let id = st.id();
        st.conns.insert(id, clone);
        drop(st);
        let shared = Arc::clone(shared);
        let handle = thread::spawn(move || {
            serve_connection(&shared, stream);
            shared.lock().conns.remove(&id);
        });
        let mut threads = lock(threads);
        threads.retain(|t| !t.is_finished());
        threads.push(handle);
    }
}

/// A request head.
struct Incoming {
    method: String,
    path: String,
    query: String,
    close: bool,
    auth: Option<String>,
}

/// `None`: the connection is over (EOF, I/O error); `Some`: malformed.
type ReadFail = Option<String>;

fn read_line(reader: &mut BufReader<TcpStream>) -> Result<String, ReadFail> {
    let mut buf = Vec::new();
    match reader.by_ref().take(MAX_LINE).read_until(b'\n', &mut buf) {
        Ok(_) if buf.ends_with(b"\n") => {}
        Ok(n) if n as u64 == MAX_LINE => return Err(Some("line too long".into())),
        _ => return Err(None),
    }
    let line = String::from_utf8(buf).map_err(|_| Some("request head is not UTF-8".to_owned()))?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Result<Incoming, ReadFail> {
    let mut line = String::new();
    while line.is_empty() {
        line = read_line(reader)?;
    }
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version @ ("HTTP/1.1" | "HTTP/1.0")] = parts[..] else {
        return Err(Some(format!("malformed request line {line:?}")));
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (method, path, query) = (method.to_owned(), path.to_owned(), query.to_owned());
    let mut rq = Incoming {
        method,
        path,
        query,
        close: version == "HTTP/1.0",
        auth: None,
    };
    let mut length = 0;
    for _ in 0..MAX_HEADERS {
        let header = read_line(reader)?;
        if header.is_empty() {
            let body = io::copy(&mut reader.by_ref().take(length), &mut io::sink());
            return if body.ok() == Some(length) {
                Ok(rq)
            } else {
                Err(None)
            };
        }
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| format!("malformed header {header:?}"))?;
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                length = value
                    .parse()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?
            }
            "transfer-encoding" => {
                return Err(Some("chunked request bodies are not supported".into()));
            }
            "connection" => rq.close = value.to_ascii_lowercase().contains("close"),
            "authorization" => rq.auth = Some(value.to_owned()),
            _ => {}
        }
    }
    Err(Some("too many headers".into()))
}

fn serve_connection(shared: &Shared, stream: TcpStream) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let (mut reader, mut out) = (BufReader::new(read_half), stream);
    loop {
        let keep = match read_request(&mut reader) {
            Ok(rq) => match handle(shared, &mut out, &rq) {
                Ok(keep) => keep && !rq.close,
                Err((code, body)) => respond(&mut out, code, &body, rq.close),
            },
            Err(None) => false,
            Err(Some(message)) => {
                eprintln!("fake kube-apiserver: bad request: {message}");
                respond(&mut out, 400, &bad_request(&message).1, true)
            }
        };
        if !keep {
            break;
        }
    }
    let _ = out.shutdown(Shutdown::Both);
}

/// What a path names.
struct Target {
    kind: Kind,
    /// `None`: cluster-scoped, or settings in all namespaces.
    ns: Option<String>,
    name: Option<String>,
}

fn route(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path
        .strip_prefix('/')?
        .trim_end_matches('/')
        .split('/')
        .collect();
    let (kind, ns, name) = match segments[..] {
        ["api", "v1", "nodes", ref name @ ..] if name.len() <= 1 => {
            (Kind::Node, None, name.first())
        }
        ["apis", "longhorn.io", "v1beta2", "settings"] => (Kind::Setting, None, None),
        [
            "apis",
            "longhorn.io",
            "v1beta2",
            "namespaces",
            ref ns,
            "settings",
            ref name @ ..,
        ] if name.len() <= 1 => (Kind::Setting, Some(ns), name.first()),
        _ => return None,
    };
    let owned = |s: Option<&&str>| s.map(|s| (*s).to_owned());
    Some(Target {
        kind,
        ns: owned(ns),
        name: owned(name),
    })
}

/// An error answer: status code and `Status` body.
type Failure = (u16, Value);

fn bad_request(message: &str) -> Failure {
    (400, status(400, "BadRequest", message, &Value::Null))
}

fn no_resource() -> Failure {
    let message = "the server could not find the requested resource";
    (404, status(404, "NotFound", message, &json!({})))
}

/// The objects of `kind` that `selector` matches.
fn matching<'a>(
    st: &'a State,
    kind: Kind,
    selector: &'a Selector,
) -> impl Iterator<Item = &'a Value> {
    let objects = st.objects.iter().filter(move |((k, _), _)| *k == kind);
    objects.map(|(_, o)| o).filter(|o| selector.matches(o))
}

/// Answers one request: `Ok` whether the connection may carry another.
fn handle(shared: &Shared, out: &mut TcpStream, rq: &Incoming) -> Result<bool, Failure> {
    let params = parse_query(&rq.query);
    let watch = params
        .as_ref()
        .is_ok_and(|p| matches!(p.get("watch").map(String::as_str), Some("true" | "1")));
    let (method, path, query) = (rq.method.clone(), rq.path.clone(), rq.query.clone());
    shared.lock().requests.push(Request {
        method,
        path,
        query,
        watch,
        at: Instant::now(),
    });
    if rq.auth.as_deref() != Some(&format!("Bearer {TOKEN}")) {
        return Err((
            401,
            status(401, "Unauthorized", "Unauthorized", &Value::Null),
        ));
    }
    let Some(target) = route(&rq.path) else {
        eprintln!(
            "fake kube-apiserver: 404 for {} {}?{}",
            rq.method, rq.path, rq.query
        );
        return Err(no_resource());
    };
    if rq.method != "GET" {
        let message = "the server does not allow this method on the requested resource";
        return Err((405, status(405, "MethodNotAllowed", message, &json!({}))));
    }
    let kind = target.kind;
    let mode = shared.lock().modes.get(&kind).copied().unwrap_or_default();
    match mode {
        Mode::Normal => {}
        Mode::NotFound => return Err(no_resource()),
        Mode::Forbidden => {
            let verb = if target.name.is_some() {
                "get"
            } else if watch {
                "watch"
            } else {
                "list"
            };
            return Err((403, forbidden(&target, verb)));
        }
    }
    let params = params.map_err(|m| bad_request(&m))?;
    let selector = Selector::parse(&params, target.ns.as_deref()).map_err(|m| bad_request(&m))?;
    let (api_version, kind_name, resource, group) = kind.names();
    if let Some(name) = &target.name {
        let found = shared
            .lock()
            .objects
            .get(&(kind, name.clone()))
            .filter(|o| selector.matches(o))
            .cloned();
        let Some(object) = found else {
            let message = format!("{} \"{name}\" not found", kind.qualified());
            let details = json!({"name": name, "group": group, "kind": resource});
            return Err((404, status(404, "NotFound", &message, &details)));
        };
        return Ok(respond(out, 200, &object, false));
    }
    if watch {
        return serve_watch(shared, out, kind, selector, &params);
    }
    let st = shared.lock();
    let mut items: Vec<Value> = matching(&st, kind, &selector).cloned().collect();
    if kind == Kind::Node {
        // A real apiserver leaves these out of a built-in kind's list items.
        for map in items.iter_mut().filter_map(Value::as_object_mut) {
            map.remove("apiVersion");
            map.remove("kind");
        }
    }
    let list = json!({"apiVersion": api_version, "kind": format!("{kind_name}List"),
                      "metadata": {"resourceVersion": st.rv.to_string()}, "items": items});
    drop(st);
    Ok(respond(out, 200, &list, false))
}

/// Streams a watch: `Ok` whether the connection may carry another request.
fn serve_watch(
    shared: &Shared,
    out: &mut TcpStream,
    kind: Kind,
    selector: Selector,
    params: &BTreeMap<String, String>,
) -> Result<bool, Failure> {
    let param = |key: &str| params.get(key).map_or("", String::as_str);
    let timeout = match param("timeoutSeconds") {
        "" => DEFAULT_WATCH_SECS,
        secs => secs
            .parse()
            .map_err(|_| bad_request("invalid timeoutSeconds"))?,
    };
    let from = match param("resourceVersion") {
        "" | "0" => None,
        rv => Some(
            rv.parse::<u64>()
                .map_err(|_| bad_request(&format!("invalid resourceVersion {rv:?}")))?,
        ),
    };
    let socket = out.try_clone().map_err(|e| bad_request(&e.to_string()))?;
    let (tx, rx) = mpsc::channel();
    let mut st = shared.lock();
    if let Some(rv) = from.filter(|rv| *rv < st.floor) {
        // 410: a 200 stream with only an ERROR event.
        let message = format!("too old resource version: {rv} ({})", st.floor);
        drop(st);
        let error = event_line("ERROR", &status(410, "Expired", &message, &Value::Null));
        let head = watch_head(out) && write_chunk(out, &error);
        return Ok(head && write_chunk(out, ""));
    }
    let first: Vec<String> = match from {
        Some(rv) => {
            let changes = st.history.iter().filter(|c| c.kind == kind && c.rv > rv);
            changes.filter_map(|c| project(c, &selector)).collect()
        }
        // "Start at most recent" or "any": the current state, as ADDED.
        None => {
            let objects = matching(&st, kind, &selector);
            let mut lines: Vec<String> = objects.map(|o| event_line("ADDED", o)).collect();
            if param("sendInitialEvents") == "true" {
                lines.push(bookmark(kind, st.rv, true));
            }
            lines
        }
    };
    let (id, bookmarks) = (st.id(), param("allowWatchBookmarks") == "true");
    st.watches.push(Watch {
        id,
        kind,
        selector,
        bookmarks,
        tx,
        socket,
    });
    drop(st);
    let mut ok = watch_head(out);
    for line in &first {
        ok = ok && write_chunk(out, line);
    }
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let clean = ok
        && loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break true;
            }
            match rx.recv_timeout(left.min(TICK)) {
                Ok(Some(line)) if write_chunk(out, &line) => {}
                Ok(Some(_)) | Err(RecvTimeoutError::Disconnected) => break false,
                Ok(None) => break true,
                Err(RecvTimeoutError::Timeout) if client_gone(out) => break false,
                Err(RecvTimeoutError::Timeout) => {}
            }
        };
    shared.lock().watches.retain(|w| w.id != id);
    // A clean end sends the final chunk; after a cut or a write error the
    // connection is closed without one.
    Ok(clean && write_chunk(out, ""))
}

/// Writes the head of a watch response.
fn watch_head(out: &mut TcpStream) -> bool {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: no-cache, private\r\n\
                Transfer-Encoding: chunked\r\n\r\n";
    out.write_all(head.as_bytes()).is_ok()
}

/// Writes one chunk (an empty one ends the body) and flushes it.
fn write_chunk(out: &mut TcpStream, data: &str) -> bool {
    let chunk = format!("{:x}\r\n{data}\r\n", data.len());
    out.write_all(chunk.as_bytes())
        .and_then(|()| out.flush())
        .is_ok()
}

/// Whether the peer closed the connection (checked while a watch is idle).
fn client_gone(socket: &TcpStream) -> bool {
    if socket.set_nonblocking(true).is_err() {
        return true;
    }
    let gone = match socket.peek(&mut [0; 1]) {
        Ok(n) => n == 0,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    };
    gone || socket.set_nonblocking(false).is_err()
}

/// Writes a JSON response: whether the connection may carry another.
fn respond(out: &mut TcpStream, code: u16, body: &Value, close: bool) -> bool {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let body = body.to_string();
    let connection = if close { "Connection: close\r\n" } else { "" };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nCache-Control: no-cache, private\r\n\
         Content-Length: {}\r\n{connection}\r\n",
        body.len()
    );
    let written = out
        .write_all(format!("{head}{body}").as_bytes())
        .and_then(|()| out.flush());
    written.is_ok() && !close
}

/// A `metav1.Status` failure; `details` left out when null.
fn status(code: u16, reason: &str, message: &str, details: &Value) -> Value {
    let mut s = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": message, "reason": reason, "code": code});
    if !details.is_null() {
        s["details"] = details.clone();
    }
    s
}

/// The apiserver's 403 for the daemon's ServiceAccount.
fn forbidden(target: &Target, verb: &str) -> Value {
    let (_, _, resource, group) = target.kind.names();
    let object = match &target.name {
        Some(name) => format!("{} \"{name}\"", target.kind.qualified()),
        None => target.kind.qualified(),
    };
    let scope = match &target.ns {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_owned(),
    };
    let message = format!(
        "{object} is forbidden: User \"{USER}\" cannot {verb} resource \"{resource}\" in API group \"{group}\" {scope}"
    );
    let mut details = json!({"kind": resource});
    if let Some(name) = &target.name {
        details["name"] = json!(name);
    }
    if !group.is_empty() {
        details["group"] = json!(group);
    }
    status(403, "Forbidden", &message, &details)
}

fn event_line(event: &str, object: &Value) -> String {
    format!("{}\n", json!({"type": event, "object": object}))
}

fn bookmark(kind: Kind, rv: u64, initial_events_end: bool) -> String {
    let (api_version, kind_name, ..) = kind.names();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"apiVersion": api_version, "kind": kind_name, "metadata": metadata}),
    )
}

/// The event a watch with `selector` sees for `change`, if any: an object
/// that starts matching is `ADDED`, one that stops matching `DELETED` (as
/// it was, at the new resourceVersion).
fn project(change: &Change, selector: &Selector) -> Option<String> {
    let now = selector.matches(&change.object);
    let before = change.prev.as_ref().is_some_and(|p| selector.matches(p));
    match (change.event, before, now) {
        ("MODIFIED", false, true) => Some(event_line("ADDED", &change.object)),
        ("MODIFIED", true, false) => {
            let mut gone = change.prev.clone().unwrap_or_default();
            gone["metadata"]["resourceVersion"] = json!(change.rv.to_string());
            Some(event_line("DELETED", &gone))
        }
        (event, _, true) => Some(event_line(event, &change.object)),
        _ => None,
    }
}

/// The query parameters, URL-decoded; a repeated one keeps its last value.
fn parse_query(query: &str) -> Result<BTreeMap<String, String>, String> {
    let pairs = query.split('&').filter(|p| !p.is_empty());
    pairs
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            decode(k)
                .zip(decode(v))
                .ok_or_else(|| format!("malformed query parameter {pair:?}"))
        })
        .collect()
}

/// Percent-decoding, `+` as a space; `None` when malformed.
fn decode(s: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(s.len());
    let mut it = s.bytes();
    while let Some(b) = it.next() {
        bytes.push(match b {
            b'+' => b' ',
            b'%' => {
                u8::from_str_radix(std::str::from_utf8(&[it.next()?, it.next()?]).ok()?, 16).ok()?
            }
            b => b,
        });
    }
    String::from_utf8(bytes).ok()
}

/// Requirements that must all hold: `(label, key, equal, value)`, a label's
/// or else a `metadata` field's. From `fieldSelector` (`metadata.name`,
/// `metadata.namespace`), equality-based `labelSelector` terms, and the
/// namespace of the path.
struct Selector(Vec<(bool, String, bool, String)>);

impl Selector {
    fn parse(params: &BTreeMap<String, String>, ns: Option<&str>) -> Result<Self, String> {
        let mut reqs: Vec<_> = ns
            .map(|ns| (false, "namespace".to_owned(), true, ns.to_owned()))
            .into_iter()
            .collect();
        for (param, label) in [("fieldSelector", false), ("labelSelector", true)] {
            let terms = params
                .get(param)
                .map_or("", String::as_str)
                .split(',')
                .map(str::trim);
            for term in terms.filter(|t| !t.is_empty()) {
                let (key, equal, value) = match term.split_once("!=") {
                    Some((k, v)) => (k, false, v),
                    None => term
                        .split_once('=')
                        .map(|(k, v)| (k, true, v.strip_prefix('=').unwrap_or(v)))
                        .ok_or_else(|| {
                            format!("{param} {term:?}: the fake apiserver takes only =, == and !=")
                        })?,
                };
                let key = match (label, key) {
                    (true, _) => key,
                    (false, "metadata.name" | "metadata.namespace") => &key["metadata.".len()..],
                    (false, _) => return Err(format!("field label not supported: {key}")),
                };
                reqs.push((label, key.to_owned(), equal, value.to_owned()));
            }
        }
        Ok(Self(reqs))
    }

    fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(label, key, equal, value)| {
            let meta = &object["metadata"];
            let actual = if *label {
                &meta["labels"][key]
            } else {
                &meta[key]
            };
            // `k!=v` holds without a `k`; a Node's namespace is "".
            (actual.as_str().unwrap_or("") == value) == *equal
        })
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: &str = "/apis/longhorn.io/v1beta2/namespaces/longhorn-system/settings";
    type Stream = BufReader<ureq::BodyReader<'static>>;

    fn call(
        api: &FakeKubeApi,
        path: &str,
    ) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .proxy(None)
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        let url = format!("{}{path}", api.url());
        agent
            .get(url)
            .header("Authorization", "Bearer test-token")
            .call()
    }

    fn get(api: &FakeKubeApi, path: &str) -> (u16, Value) {
        let mut r = call(api, path).unwrap();
        let body = r.body_mut().read_to_string().unwrap();
        (r.status().as_u16(), serde_json::from_str(&body).unwrap())
    }

    fn watch(api: &FakeKubeApi, path: &str) -> Stream {
        let r = call(api, path).unwrap();
        assert_eq!(r.status().as_u16(), 200);
        BufReader::new(r.into_body().into_reader())
    }

    /// The next event: its type and object.
    fn next(stream: &mut Stream) -> (String, Value) {
        let mut line = String::new();
        stream.read_line(&mut line).unwrap();
        let mut e: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        (e["type"].as_str().unwrap().to_owned(), e["object"].take())
    }

    fn at_end(stream: &mut Stream) -> bool {
        matches!(stream.read_line(&mut String::new()), Ok(0))
    }

    fn rv(object: &Value) -> u64 {
        object["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn list_get_watch_bookmark_delete() {
        let api = FakeKubeApi::start();
        api.set_setting("v2-data-engine", "false");
        let query = "?&limit=500&resourceVersion=0&resourceVersionMatch=NotOlderThan";
        let (code, list) = get(&api, &format!("{SETTINGS}{query}"));
        assert_eq!((code, &list["kind"]), (200, &json!("SettingList")));
        let item = &list["items"][0];
        assert_eq!(
            (&item["value"], &item["metadata"]["namespace"]),
            (&json!("false"), &json!(NAMESPACE))
        );
        let (code, one) = get(&api, &format!("{SETTINGS}/v2-data-engine"));
        assert_eq!((code, &one["status"]["applied"]), (200, &json!(true)));
        assert_eq!(get(&api, &format!("{SETTINGS}/nope")).0, 404);

        let query = format!(
            "?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion={}",
            rv(&list)
        );
        let mut w = watch(&api, &format!("{SETTINGS}{query}"));
        api.wait_for_watches(Kind::Setting, 1, Duration::from_secs(2));
        api.set_setting("v2-data-engine", "false"); // unchanged: no event
        api.set_setting("v2-data-engine", "true");
        let (ty, object) = next(&mut w);
        assert_eq!(
            (ty.as_str(), &object["value"]),
            ("MODIFIED", &json!("true"))
        );
        assert_eq!(object["metadata"]["generation"], 2);
        assert!(rv(&object) > rv(&list));
        api.bookmark();
        let (ty, object) = next(&mut w);
        assert_eq!(
            (ty.as_str(), &object["kind"]),
            ("BOOKMARK", &json!("Setting"))
        );
        assert_eq!(rv(&object), api.shared.lock().rv);
        api.delete_setting("v2-data-engine");
        assert_eq!(next(&mut w).0, "DELETED");

        // Replayed from the list's resourceVersion: the two changes since.
        let mut w = watch(
            &api,
            &format!("{SETTINGS}?watch=1&resourceVersion={}", rv(&list)),
        );
        assert_eq!([next(&mut w).0, next(&mut w).0], ["MODIFIED", "DELETED"]);
        let requests = api.requests();
        assert_eq!(requests.iter().filter(|r| r.watch).count(), 2);
        assert!(requests[0].query.contains("limit=500") && !requests[0].watch);
    }

    #[test]
    fn expired_history_is_410_in_the_stream() {
        let api = FakeKubeApi::start();
        api.set_setting("a", "1");
        let list = get(&api, SETTINGS).1;
        api.expire_history();
        let mut w = watch(
            &api,
            &format!("{SETTINGS}?watch=true&resourceVersion={}", rv(&list)),
        );
        let (ty, status) = next(&mut w);
        assert_eq!(
            (ty.as_str(), &status["code"], &status["reason"]),
            ("ERROR", &json!(410), &json!("Expired"))
        );
        assert!(at_end(&mut w));
        assert_eq!(api.open_watches(Kind::Setting), 0);
        // After a relist, the watch works.
        let list = get(&api, SETTINGS).1;
        let _w = watch(
            &api,
            &format!("{SETTINGS}?watch=true&resourceVersion={}", rv(&list)),
        );
        api.wait_for_watches(Kind::Setting, 1, Duration::from_secs(2));
    }

    #[test]
    fn failure_modes() {
        let api = FakeKubeApi::start();
        let mut w = watch(&api, &format!("{SETTINGS}?watch=true&resourceVersion=5"));
        api.wait_for_watches(Kind::Setting, 1, Duration::from_secs(2));
        api.set_mode(Kind::Setting, Mode::Forbidden);
        assert!(
            at_end(&mut w),
            "entering a failure mode ends the kind's watches"
        );
        let (code, body) = get(&api, SETTINGS);
        assert_eq!((code, &body["reason"]), (403, &json!("Forbidden")));
        let message = "settings.longhorn.io is forbidden: User \"system:serviceaccount:kmod-monitor:kmod-monitor\" \
                       cannot list resource \"settings\" in API group \"longhorn.io\" in the namespace \"longhorn-system\"";
        assert_eq!(body["message"], message);
        assert_eq!(
            body["details"],
            json!({"group": "longhorn.io", "kind": "settings"})
        );
        assert_eq!(
            get(&api, &format!("{SETTINGS}?watch=true&resourceVersion=5")).0,
            403
        );
        assert_eq!(get(&api, "/api/v1/nodes").0, 200);
        api.set_mode(Kind::Node, Mode::Forbidden);
        let message = get(&api, "/api/v1/nodes").1["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            message
                .ends_with("cannot list resource \"nodes\" in API group \"\" at the cluster scope")
        );
        api.set_mode(Kind::Setting, Mode::NotFound);
        let (code, body) = get(&api, SETTINGS);
        assert_eq!(
            (code, &body["message"]),
            (
                404,
                &json!("the server could not find the requested resource")
            )
        );
        api.set_mode(Kind::Setting, Mode::Normal);
        assert_eq!(get(&api, SETTINGS).0, 200);
    }

    #[test]
    fn node_selectors() {
        let api = FakeKubeApi::start();
        api.set_node(
            "node-1",
            &[("node.longhorn.io/create-default-disk", "true")],
        );
        api.set_node("node-2", &[]);
        let (code, list) = get(
            &api,
            "/api/v1/nodes?&fieldSelector=metadata.name%3Dnode-1&limit=500",
        );
        assert_eq!((code, &list["kind"]), (200, &json!("NodeList")));
        assert_eq!(list["items"].as_array().map(Vec::len), Some(1));
        assert_eq!(
            list["items"][0]["metadata"]["labels"]["kubernetes.io/hostname"],
            "node-1"
        );
        let query = format!(
            "?watch=true&fieldSelector=metadata.name%3Dnode-1&resourceVersion={}",
            rv(&list)
        );
        let mut w = watch(&api, &format!("/api/v1/nodes{query}"));
        api.wait_for_watches(Kind::Node, 1, Duration::from_secs(2));
        api.set_node("node-2", &[("x", "y")]);
        api.set_node("node-1", &[("x", "y")]);
        let (ty, object) = next(&mut w);
        assert_eq!(
            (ty.as_str(), &object["metadata"]["name"]),
            ("MODIFIED", &json!("node-1"))
        );
        // A label selector: node-1 stops matching, so it is DELETED to this watch.
        let mut w = watch(&api, "/api/v1/nodes?watch=true&labelSelector=x%3Dy");
        assert_eq!([next(&mut w).0, next(&mut w).0], ["ADDED", "ADDED"]);
        api.set_node("node-1", &[]);
        let (ty, object) = next(&mut w);
        assert_eq!(
            (ty.as_str(), &object["metadata"]["labels"]["x"]),
            ("DELETED", &json!("y"))
        );
        assert_eq!(
            get(&api, "/api/v1/nodes?labelSelector=x%3Dy").1["items"]
                .as_array()
                .map(Vec::len),
            Some(1)
        );
        assert_eq!(get(&api, "/api/v1/nodes?fieldSelector=spec.foo%3D1").0, 400);
    }

    #[test]
    fn cut_watches_timeouts_and_gone_clients_end_streams() {
        let api = FakeKubeApi::start();
        let mut w = watch(&api, &format!("{SETTINGS}?watch=true&resourceVersion=0"));
        api.wait_for_watches(Kind::Setting, 1, Duration::from_secs(2));
        let started = Instant::now();
        api.cut_watches();
        assert!(
            w.read_line(&mut String::new()).is_err(),
            "a cut is not a clean end"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(api.open_watches(Kind::Setting), 0);
        let mut w = watch(&api, &format!("{SETTINGS}?watch=true&timeoutSeconds=1"));
        let started = Instant::now();
        assert!(at_end(&mut w));
        assert!(started.elapsed() >= Duration::from_millis(900));
        drop(watch(&api, "/api/v1/nodes?watch=true"));
        thread::sleep(TICK * 3);
        assert_eq!(api.open_watches(Kind::Node), 0);
    }

    #[test]
    fn reserve_listen_stop() {
        let api = FakeKubeApi::reserve();
        assert!(call(&api, SETTINGS).is_err(), "refused before listen()");
        api.listen();
        api.listen();
        assert_eq!(get(&api, SETTINGS).0, 200);
        let mut w = watch(&api, &format!("{SETTINGS}?watch=true"));
        api.wait_for_watches(Kind::Setting, 1, Duration::from_secs(2));
        api.stop();
        assert!(w.read_line(&mut String::new()).is_err());
        assert_eq!(api.open_watches(Kind::Setting), 0);
        assert!(call(&api, SETTINGS).is_err(), "refused after stop()");
        api.listen();
        assert_eq!(get(&api, SETTINGS).0, 200);
        let dir = tempfile::tempdir().unwrap();
        let text = fs::read_to_string(api.write_kubeconfig(dir.path())).unwrap();
        assert!(
            text.contains(&format!("server: {}", api.url())) && text.contains("token: test-token")
        );
    }

    #[test]
    fn bad_requests() {
        let api = FakeKubeApi::start();
        let mut s = TcpStream::connect(("127.0.0.1", api.port())).unwrap();
        s.write_all(b"GARBAGE\r\n\r\n").unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 400 "), "{reply}");
        let r = ureq::get(format!("{}{SETTINGS}", api.url()))
            .config()
            .http_status_as_error(false)
            .build();
        assert_eq!(r.call().unwrap().status().as_u16(), 401, "no token");
        let (code, body) = get(&api, "/apis");
        assert_eq!((code, &body["reason"]), (404, &json!("NotFound")));
        assert_eq!(
            get(&api, &format!("{SETTINGS}?watch=true&resourceVersion=abc")).0,
            400
        );
        assert_eq!(get(&api, &format!("{SETTINGS}?watch=true&x=%zz")).0, 400);
        assert_eq!(
            api.requests().len(),
            4,
            "the malformed request is not recorded"
        );
    }
}
