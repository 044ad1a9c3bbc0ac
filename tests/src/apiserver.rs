//! A real Kubernetes control plane for one test: etcd and kube-apiserver,
//! built by `cargo xtask setup` from the Go modules pinned in
//! `tests/k8s-servers/` (see xtask/src/k8s.rs), started on free loopback
//! ports in a temporary directory, and killed and removed by a drop guard.
//!
//! What it sets up, as a cluster would have it:
//! - certificates made here with rcgen (a CA, the serving certificate for
//!   127.0.0.1, an admin client certificate in `system:masters`) and a
//!   service-account issuer with its own signing key, so ServiceAccount
//!   tokens come from the TokenRequest API;
//! - `--authorization-mode=Node,RBAC`, so the daemon's token can do exactly
//!   what the shipped `rbac.yaml` grants;
//! - an audit log of the daemon's ServiceAccount's requests (Metadata
//!   level), so a test counts the lists and watches it made;
//! - stopping and starting the apiserver on the same port with the same etcd
//!   data (the API down, then up), and cutting its connections while it
//!   runs (every watch ends mid-stream, with no outage).
//!
//! etcd serves plain HTTP on loopback; its JSON gateway is how a test
//! compacts the history. Each test gets its own control plane: a start
//! takes a few seconds, and a shared one could not be stopped at the end of
//! the test binary (Rust runs no destructor for statics) nor be restarted
//! by one test under another.
use std::{
    env, fmt, fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::{free_port, workspace_dir};

/// Longhorn's namespace, where the shipped Role reads its settings.
pub const LONGHORN_NAMESPACE: &str = "longhorn-system";
/// The daemon's ServiceAccount as `monitor/deploy/kubernetes` ships it.
pub const SERVICE_ACCOUNT_NAMESPACE: &str = "kmod-monitor";
pub const SERVICE_ACCOUNT: &str = "kmod-monitor";
/// The user name its token authenticates as.
pub const SERVICE_ACCOUNT_USER: &str = "system:serviceaccount:kmod-monitor:kmod-monitor";
/// The field manager of every write the harness makes.
const FIELD_MANAGER: &str = "kmod-monitor-tests";

/// How long etcd or an apiserver may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long one harness request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The Go module the servers are built from, relative to the workspace.
const MODULE_DIR: &str = "tests/k8s-servers";

/// `${XDG_CACHE_HOME:-~/.cache}/kmod-monitor/k8s/<kubernetes version>/bin`,
/// where `cargo xtask setup` puts the binaries (xtask/src/dirs.rs).
fn bin_dir() -> PathBuf {
    let go_mod = workspace_dir().join(MODULE_DIR).join("go.mod");
    let text =
        fs::read_to_string(&go_mod).unwrap_or_else(|e| panic!("reading {}: {e}", go_mod.display()));
    let version = text
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("k8s.io/kubernetes"))
                .then(|| words.next())
                .flatten()
        })
        .unwrap_or_else(|| panic!("{} pins no k8s.io/kubernetes version", go_mod.display()));
    let cache = match env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(
            env::var_os("HOME").unwrap_or_else(|| panic!("neither XDG_CACHE_HOME nor HOME is set")),
        )
        .join(".cache"),
    };
    cache.join("kmod-monitor/k8s").join(version).join("bin")
}

fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: `cargo xtask setup` builds it from {MODULE_DIR}",
        path.display()
    );
    path
}

/// A child process killed (SIGKILL) and reaped on drop; its output goes to
/// a log file that failure messages quote.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: String, program: &Path, args: &[String], log: PathBuf) -> Self {
        let file =
            fs::File::create(&log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let err = file
            .try_clone()
            .unwrap_or_else(|e| panic!("cloning the handle of {}: {e}", log.display()));
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        Self { name, child, log }
    }

    /// The last lines of its log, for messages.
    fn tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!(
            "--- last lines of {} ({}) ---\n{}\n--- end ---",
            self.name,
            self.log.display(),
            lines[from..].join("\n")
        )
    }

    /// Panics with its log if it has exited.
    #[track_caller]
    fn assert_running(&mut self, while_doing: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited ({status}) while {while_doing}\n{}",
                self.name,
                self.tail()
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Never panic here: this also runs while a failed test unwinds.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fail(what: &str, e: rcgen::Error) -> ! {
    panic!("rcgen: {what}: {e}")
}

/// The files of the cluster's PKI.
struct Pki {
    ca: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    admin_cert: PathBuf,
    admin_key: PathBuf,
    sa_key: PathBuf,
    sa_pub: PathBuf,
}

impl Pki {
    /// A CA, the serving certificate (127.0.0.1, localhost and the in-cluster
    /// names), an admin client certificate (`system:masters`) and the
    /// service-account signing key, all ECDSA P-256.
    fn generate(dir: &Path) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let key = || KeyPair::generate().unwrap_or_else(|e| fail("generating a key", e));
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            path
        };

        let mut ca_params = CertificateParams::new(Vec::<String>::new())
            .unwrap_or_else(|e| fail("CA parameters", e));
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "kmod-monitor-tests-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, key())
            .unwrap_or_else(|e| fail("self-signing the CA", e));

        let mut serving = CertificateParams::new(
            [
                "127.0.0.1",
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ]
            .map(str::to_owned)
            .to_vec(),
        )
        .unwrap_or_else(|e| fail("serving certificate parameters", e));
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_key = key();
        let serving_cert = serving
            .signed_by(&serving_key, &ca)
            .unwrap_or_else(|e| fail("signing the serving certificate", e));

        // The user name is the CN, the groups the Os.
        let mut admin = CertificateParams::new(Vec::<String>::new())
            .unwrap_or_else(|e| fail("admin certificate parameters", e));
        admin
            .distinguished_name
            .push(DnType::CommonName, "kmod-monitor-tests-admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_key = key();
        let admin_cert = admin
            .signed_by(&admin_key, &ca)
            .unwrap_or_else(|e| fail("signing the admin certificate", e));

        let sa = key();
        Self {
            ca: write("ca.crt", ca.pem()),
            serving_cert: write("apiserver.crt", serving_cert.pem()),
            serving_key: write("apiserver.key", serving_key.serialize_pem()),
            admin_cert: write("admin.crt", admin_cert.pem()),
            admin_key: write("admin.key", admin_key.serialize_pem()),
            sa_pub: write("service-account.pub", sa.public_key_pem()),
            sa_key: write("service-account.key", sa.serialize_pem()),
        }
    }
}

/// How the control plane runs.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// The apiserver's watch cache (on in every real cluster). Off, every
    /// watch is served by etcd itself, so compacting etcd is what expires
    /// an old resourceVersion (with the cache on, the cache's own window
    /// expires it first, and compaction plays no part).
    pub watch_cache: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self { watch_cache: true }
    }
}

/// etcd and kube-apiserver, with the admin's credentials.
pub struct ControlPlane {
    options: Options,
    etcd: Proc,
    etcd_url: String,
    /// The apiserver's port, the same across restarts.
    port: u16,
    /// The running apiserver, if any.
    apiserver: Option<Proc>,
    /// How many apiservers were started, to name their logs.
    started: u32,
    pki: Pki,
    admin_kubeconfig: PathBuf,
    admin: ureq::Agent,
    // Last, so the processes are gone before their directory is removed.
    dir: TempDir,
}

impl fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "control plane at {} (etcd {}, dir {})",
            self.url(),
            self.etcd_url,
            self.dir.path().display()
        )
    }
}

impl ControlPlane {
    /// Starts etcd and one apiserver with the default [`Options`] and
    /// waits until both are ready.
    #[must_use]
    pub fn start() -> Self {
        Self::start_with(Options::default())
    }

    /// Starts etcd and one apiserver and waits until both are ready.
    ///
    /// # Panics
    /// When a binary is missing or a server does not become ready.
    #[must_use]
    pub fn start_with(options: Options) -> Self {
        let begun = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("kmod-monitor-k8s-")
            .tempdir()
            .unwrap_or_else(|e| panic!("creating the control plane's directory: {e}"));
        let pki = Pki::generate(dir.path());
        let (etcd, etcd_url) = start_etcd(dir.path());
        let port = free_port();
        let admin_kubeconfig = dir.path().join("admin.kubeconfig");
        let admin = agent(&pki, true);
        let mut plane = Self {
            options,
            etcd,
            etcd_url,
            port,
            apiserver: None,
            started: 0,
            pki,
            admin_kubeconfig,
            admin,
            dir,
        };
        plane.write_kubeconfig(
            &plane.admin_kubeconfig.clone(),
            &format!(
                "client-certificate: {}\n    client-key: {}",
                plane.pki.admin_cert.display(),
                plane.pki.admin_key.display()
            ),
        );
        plane.start_apiserver();
        eprintln!(
            "control plane ready in {:.1} s: {plane:?}",
            begun.elapsed().as_secs_f64()
        );
        plane
    }

    /// `https://127.0.0.1:PORT`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The scratch directory (removed with the control plane).
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The admin's kubeconfig (client certificate in `system:masters`).
    #[must_use]
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    fn write_kubeconfig(&self, path: &Path, user: &str) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
             users:\n- name: user\n  user:\n    {user}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: user\n\
             current-context: test\n",
            self.url(),
            self.pki.ca.display()
        );
        fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// Starts the apiserver on its port (after [`stop_apiserver`]: the same
    /// port and etcd data) and waits until it is ready.
    ///
    /// [`stop_apiserver`]: Self::stop_apiserver
    ///
    /// # Panics
    /// When it exits or is not ready in time.
    pub fn start_apiserver(&mut self) {
        assert!(self.apiserver.is_none(), "the apiserver is already running");
        let begun = Instant::now();
        self.started += 1;
        let n = self.started;
        let dir = self.dir.path();
        let audit_policy = dir.join("audit-policy.yaml");
        fs::write(
            &audit_policy,
            format!(
                "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\n\
                 rules:\n- level: Metadata\n  users: [\"{SERVICE_ACCOUNT_USER}\"]\n- level: None\n"
            ),
        )
        .unwrap_or_else(|e| panic!("writing {}: {e}", audit_policy.display()));
        let path = |p: &Path| p.display().to_string();
        let mut args = vec![
            format!("--etcd-servers={}", self.etcd_url),
            "--bind-address=127.0.0.1".to_owned(),
            format!("--secure-port={}", self.port),
            // Written into the `kubernetes` Service's endpoints only; an
            // RFC 5737 documentation address, where nothing is ever sent
            // (the default would be this machine's own interface).
            "--advertise-address=192.0.2.1".to_owned(),
            format!("--tls-cert-file={}", path(&self.pki.serving_cert)),
            format!("--tls-private-key-file={}", path(&self.pki.serving_key)),
            format!("--client-ca-file={}", path(&self.pki.ca)),
            "--authorization-mode=Node,RBAC".to_owned(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_owned(),
            format!("--service-account-key-file={}", path(&self.pki.sa_pub)),
            format!(
                "--service-account-signing-key-file={}",
                path(&self.pki.sa_key)
            ),
            "--service-cluster-ip-range=10.96.0.0/16".to_owned(),
            // Compaction only when a test asks for it.
            "--etcd-compaction-interval=0".to_owned(),
            format!("--watch-cache={}", self.options.watch_cache),
            format!("--audit-policy-file={}", path(&audit_policy)),
            format!(
                "--audit-log-path={}",
                path(&dir.join(format!("audit-{n}.log")))
            ),
            format!("--cert-dir={}", path(&dir.join(format!("certs-{n}")))),
            "--profiling=false".to_owned(),
        ];
        args.push("--v=1".to_owned());
        let mut proc = Proc::spawn(
            format!("kube-apiserver #{n}"),
            &binary("kube-apiserver"),
            &args,
            dir.join(format!("kube-apiserver-{n}.log")),
        );
        let deadline = begun + READY_TIMEOUT;
        loop {
            proc.assert_running("starting");
            if self.ready() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver #{n} not ready after {READY_TIMEOUT:?}\n{}",
                proc.tail()
            );
            thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "kube-apiserver #{n} ready in {:.1} s",
            begun.elapsed().as_secs_f64()
        );
        self.apiserver = Some(proc);
    }

    /// Whether the apiserver answers `/readyz` with 200.
    fn ready(&self) -> bool {
        self.admin
            .get(format!("{}/readyz", self.url()))
            .call()
            .is_ok_and(|r| r.status() == 200)
    }

    /// Kills the apiserver (etcd keeps the data): the API is down.
    pub fn stop_apiserver(&mut self) {
        assert!(self.apiserver.is_some(), "no apiserver is running");
        self.apiserver = None;
    }

    /// Cuts every open connection to the apiserver, as a load balancer
    /// that drops them (an idle timeout, its own restart) would: the kernel
    /// destroys the sockets (`ss -K`, root and `CONFIG_INET_DIAG_DESTROY`),
    /// while the apiserver keeps running. Every open watch ends mid-stream;
    /// a client that reconnects finds the same server, ready.
    ///
    /// # Panics
    /// When `ss` fails or cuts nothing.
    pub fn cut_connections(&self) {
        let port = self.port.to_string();
        let out = Command::new("ss")
            .args(["-K", "-t", "-n", "dst", "127.0.0.1", "dport", "=", &port])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("starting ss (iproute2): {e}"));
        let listed = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && listed.lines().count() > 1,
            "ss -K cut no connection to port {port} ({}): {listed}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The last log lines of the running apiserver and etcd, for messages.
    #[must_use]
    pub fn logs(&self) -> String {
        let mut text: Vec<String> = self.apiserver.iter().map(Proc::tail).collect();
        text.push(self.etcd.tail());
        text.join("\n")
    }

    /// An admin request: `(status, body)`.
    ///
    /// # Panics
    /// When the request cannot be made (the API is down).
    #[track_caller]
    pub fn request(&self, method: &str, path: &str, body: Option<(&str, &Value)>) -> (u16, Value) {
        request(&self.admin, method, &format!("{}{path}", self.url()), body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{self:?}"))
    }

    /// Server-side apply of `object` at `path` as the harness's field
    /// manager (forcing conflicts: the harness is the only writer).
    ///
    /// # Panics
    /// Unless it answers 200 or 201.
    #[track_caller]
    pub fn apply(&self, path: &str, object: &Value) {
        let (code, body) = self.request(
            "PATCH",
            &format!("{path}?fieldManager={FIELD_MANAGER}&force=true"),
            Some(("application/apply-patch+yaml", object)),
        );
        assert!(
            code == 200 || code == 201,
            "applying {path} answered {code}: {body}"
        );
    }

    /// Deletes `path`.
    ///
    /// # Panics
    /// Unless it answers 200 or 202.
    #[track_caller]
    pub fn delete(&self, path: &str) {
        let (code, body) = self.request("DELETE", path, None);
        assert!(
            code == 200 || code == 202,
            "deleting {path} answered {code}: {body}"
        );
    }

    /// Creates namespace `name`.
    pub fn namespace(&self, name: &str) {
        self.apply(
            &format!("/api/v1/namespaces/{name}"),
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
        );
    }

    /// Sets Longhorn's setting `name` in `longhorn-system` to `value`.
    pub fn set_setting(&self, name: &str, value: &str) {
        self.apply(
            &setting_path(name),
            &json!({
                "apiVersion": "longhorn.io/v1beta2",
                "kind": "Setting",
                "metadata": {"name": name, "namespace": LONGHORN_NAMESPACE},
                "value": value,
            }),
        );
    }

    /// Creates or replaces Node `name` with exactly `labels` (the ones the
    /// harness set before and left out are removed, as apply does).
    pub fn set_node(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
            .collect();
        self.apply(
            &format!("/api/v1/nodes/{name}"),
            &json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": labels},
            }),
        );
    }

    /// Sets Node `name`'s `status.capacity["hugepages-2Mi"]` to `quantity`,
    /// as the kubelet registers its hugepage pool (a merge patch of the
    /// status subresource).
    ///
    /// # Panics
    /// Unless the API answers 200.
    #[track_caller]
    pub fn set_node_hugepages(&self, name: &str, quantity: &str) {
        let (code, body) = self.request(
            "PATCH",
            &format!("/api/v1/nodes/{name}/status"),
            Some((
                "application/merge-patch+json",
                &json!({"status": {"capacity": {"hugepages-2Mi": quantity}}}),
            )),
        );
        assert!(
            code == 200,
            "patching {name}'s capacity answered {code}: {body}"
        );
    }

    /// Runs `kubectl ARGS` as the admin; panics unless it exits 0.
    #[track_caller]
    pub fn kubectl(&self, args: &[&str]) -> Output {
        let out = self.kubectl_with(&self.admin_kubeconfig, args, None);
        assert!(
            out.status.success(),
            "kubectl {} failed ({}):\n{}{}\n{self:?}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        out
    }

    /// Runs `kubectl ARGS` with `kubeconfig`, `stdin` as its input, and its
    /// discovery cache in the scratch directory; any exit status.
    ///
    /// # Panics
    /// When kubectl cannot be started.
    pub fn kubectl_with(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("kubectl-cache"))
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting kubectl (`cargo xtask setup` installs it): {e}"));
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap_or_else(|| unreachable!())
                .write_all(input)
                .unwrap_or_else(|e| panic!("writing to kubectl: {e}"));
        }
        child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("waiting for kubectl: {e}"))
    }

    /// Installs CRDs from `tests/k8s/crds/` by file name
    /// ([`LONGHORN_CRD`], [`PROMETHEUS_OPERATOR_CRDS`]) and waits until
    /// they are established.
    pub fn install_crds(&self, files: &[&str]) {
        let mut args = vec!["apply", "--server-side"];
        let paths: Vec<String> = files
            .iter()
            .map(|f| crds_dir().join(f).display().to_string())
            .collect();
        for path in &paths {
            args.extend(["-f", path.as_str()]);
        }
        self.kubectl(&args);
        args.splice(
            ..2,
            ["wait", "--for=condition=Established", "--timeout=60s"],
        );
        self.kubectl(&args);
    }

    /// Applies `monitor/deploy/kubernetes` with server-side apply, as
    /// shipped (namespace, ServiceAccount, RBAC, DaemonSet, Service,
    /// ServiceMonitor, PrometheusRule, ConfigMap). Needs `longhorn-system`
    /// and the CRDs.
    pub fn apply_shipped_manifests(&self) {
        let dir = workspace_dir().join("monitor/deploy/kubernetes");
        self.kubectl(&["apply", "--server-side", "-k", &dir.display().to_string()]);
    }

    /// Applies, with server-side apply and exactly as shipped, what gives
    /// the daemon its identity and rights: `namespace.yaml`,
    /// `serviceaccount.yaml` (into `kmod-monitor`, as the kustomization puts
    /// it) and `rbac.yaml`. Needs `longhorn-system`, where the Role lives.
    pub fn apply_daemon_rbac(&self) {
        let dir = workspace_dir().join("monitor/deploy/kubernetes");
        let file = |name: &str| dir.join(name).display().to_string();
        self.kubectl(&[
            "apply",
            "--server-side",
            "-f",
            &file("namespace.yaml"),
            "-f",
            &file("rbac.yaml"),
        ]);
        self.kubectl(&[
            "apply",
            "--server-side",
            "--namespace",
            SERVICE_ACCOUNT_NAMESPACE,
            "-f",
            &file("serviceaccount.yaml"),
        ]);
    }

    /// A kubeconfig holding a fresh token (TokenRequest API, one hour) of
    /// the shipped ServiceAccount.
    #[must_use]
    pub fn service_account_kubeconfig(&self) -> PathBuf {
        self.token_kubeconfig(SERVICE_ACCOUNT_NAMESPACE, SERVICE_ACCOUNT)
    }

    /// A kubeconfig holding a fresh token (TokenRequest API, one hour) of
    /// ServiceAccount `namespace/name`.
    ///
    /// # Panics
    /// When the TokenRequest fails (no such ServiceAccount).
    #[must_use]
    pub fn token_kubeconfig(&self, namespace: &str, name: &str) -> PathBuf {
        let (code, body) = self.request(
            "POST",
            &format!("/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"),
            Some((
                "application/json",
                &json!({
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenRequest",
                    "spec": {"expirationSeconds": 3600},
                }),
            )),
        );
        assert_eq!(code, 201, "TokenRequest answered {code}: {body}");
        let token = body["status"]["token"]
            .as_str()
            .unwrap_or_else(|| panic!("TokenRequest without status.token: {body}"));
        let path = self
            .dir
            .path()
            .join(format!("{namespace}.{name}.kubeconfig"));
        self.write_kubeconfig(&path, &format!("token: {token}"));
        path
    }

    /// The audit events of the daemon's ServiceAccount so far, from every
    /// apiserver started (one audit log each), in order.
    #[must_use]
    pub fn audit_events(&self) -> Vec<Value> {
        (1..=self.started)
            .flat_map(|n| {
                let path = self.dir.path().join(format!("audit-{n}.log"));
                fs::read_to_string(&path)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect::<Vec<Value>>()
            })
            .collect()
    }

    /// How many `verb` requests for `resource` the daemon made so far,
    /// refused ones included. A watch counts once it started streaming
    /// (its `ResponseStarted` event: it is still open, or was); any other
    /// request once it completed.
    #[must_use]
    pub fn daemon_requests(&self, verb: &str, resource: &str) -> usize {
        let stage = if verb == "watch" {
            "ResponseStarted"
        } else {
            "ResponseComplete"
        };
        self.audit_events()
            .iter()
            .filter(|e| {
                e["verb"] == verb && e["objectRef"]["resource"] == resource && e["stage"] == stage
            })
            .count()
    }

    /// Every completed request of the daemon so far (a watch once it
    /// started streaming), from the audit logs, in order.
    #[must_use]
    pub fn daemon_calls(&self) -> Vec<Call> {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        self.audit_events()
            .iter()
            .filter(|e| {
                let stage = if e["verb"] == "watch" {
                    "ResponseStarted"
                } else {
                    "ResponseComplete"
                };
                e["stage"] == stage
            })
            .map(|e| Call {
                verb: text(&e["verb"]),
                group: text(&e["objectRef"]["apiGroup"]),
                resource: text(&e["objectRef"]["resource"]),
                subresource: text(&e["objectRef"]["subresource"]),
                namespace: text(&e["objectRef"]["namespace"]),
                code: e["responseStatus"]["code"]
                    .as_u64()
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or_default(),
                at: humantime::parse_rfc3339_weak(
                    e["requestReceivedTimestamp"].as_str().unwrap_or_default(),
                )
                .unwrap_or_else(|err| {
                    panic!("audit event without a good requestReceivedTimestamp ({err}): {e}")
                }),
            })
            .collect()
    }

    /// Node `name` as the admin reads it.
    ///
    /// # Panics
    /// Unless it answers 200.
    #[must_use]
    #[track_caller]
    pub fn node(&self, name: &str) -> Value {
        let (code, body) = self.request("GET", &format!("/api/v1/nodes/{name}"), None);
        assert_eq!(code, 200, "GET node {name}: {body}");
        body
    }

    /// Writes `conditions` into Node `name`'s status as the kubelet does:
    /// a strategic merge patch of `nodes/status` (merged by `type`) under
    /// the field manager `kubelet`.
    ///
    /// # Panics
    /// Unless it answers 200.
    #[track_caller]
    pub fn kubelet_status(&self, name: &str, conditions: &Value) {
        let (code, body) = self.request(
            "PATCH",
            &format!("/api/v1/nodes/{name}/status?fieldManager=kubelet"),
            Some((
                "application/strategic-merge-patch+json",
                &json!({"status": {"conditions": conditions}}),
            )),
        );
        assert_eq!(code, 200, "kubelet status patch of {name}: {body}");
    }

    /// The events.k8s.io/v1 Events about Node `name` (in `default`).
    #[must_use]
    #[track_caller]
    pub fn node_events(&self, name: &str) -> Vec<Value> {
        let (code, body) = self.request(
            "GET",
            "/apis/events.k8s.io/v1/namespaces/default/events",
            None,
        );
        assert_eq!(code, 200, "listing events: {body}");
        body["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["regarding"]["kind"] == "Node" && e["regarding"]["name"] == name)
            .cloned()
            .collect()
    }

    /// Compacts etcd's history up to its current revision (physically), so
    /// a watch from any older resourceVersion that etcd serves gets 410.
    /// Returns that revision.
    ///
    /// # Panics
    /// When etcd does not answer as expected.
    pub fn compact_etcd(&self) -> u64 {
        let http: ureq::Agent = ureq::Agent::config_builder()
            .proxy(None)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build()
            .into();
        let status = request(
            &http,
            "POST",
            &format!("{}/v3/maintenance/status", self.etcd_url),
            Some(("application/json", &json!({}))),
        )
        .unwrap_or_else(|e| panic!("etcd status: {e}"));
        let revision: u64 = status.1["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("etcd status without header.revision: {status:?}"));
        let compacted = request(
            &http,
            "POST",
            &format!("{}/v3/kv/compaction", self.etcd_url),
            Some((
                "application/json",
                &json!({"revision": revision.to_string(), "physical": true}),
            )),
        )
        .unwrap_or_else(|e| panic!("etcd compaction: {e}"));
        assert_eq!(compacted.0, 200, "etcd compaction: {compacted:?}");
        revision
    }
}

/// One request of the daemon, as the audit log has it.
#[derive(Clone, Debug)]
pub struct Call {
    pub verb: String,
    /// `""` for the core group.
    pub group: String,
    pub resource: String,
    /// `status` for `nodes/status`; `""` for none.
    pub subresource: String,
    pub namespace: String,
    /// The answer's status code.
    pub code: u16,
    /// When the apiserver received it.
    pub at: std::time::SystemTime,
}

impl Call {
    /// `verb group/resource/subresource`, for messages and tallies.
    #[must_use]
    pub fn what(&self) -> String {
        let mut text = format!("{} ", self.verb);
        if !self.group.is_empty() {
            text.push_str(&self.group);
            text.push('/');
        }
        text.push_str(&self.resource);
        if !self.subresource.is_empty() {
            text.push('/');
            text.push_str(&self.subresource);
        }
        text
    }
}

/// The apiserver path of Longhorn setting `name`.
#[must_use]
pub fn setting_path(name: &str) -> String {
    format!("/apis/longhorn.io/v1beta2/namespaces/{LONGHORN_NAMESPACE}/settings/{name}")
}

/// The RoleBinding that lets the daemon read Longhorn's settings.
pub const SETTINGS_ROLEBINDING: &str = "/apis/rbac.authorization.k8s.io/v1/namespaces/longhorn-system/rolebindings/kmod-monitor-longhorn-settings";

/// The shipped RBAC manifest.
#[must_use]
pub fn rbac_yaml() -> PathBuf {
    workspace_dir().join("monitor/deploy/kubernetes/rbac.yaml")
}

/// Longhorn's Setting CRD, in [`crds_dir`].
pub const LONGHORN_CRD: &str = "longhorn-settings.yaml";
/// prometheus-operator's ServiceMonitor and PrometheusRule CRDs, which the
/// shipped kustomization needs.
pub const PROMETHEUS_OPERATOR_CRDS: &[&str] = &[
    "monitoring.coreos.com_servicemonitors.yaml",
    "monitoring.coreos.com_prometheusrules.yaml",
];

/// `tests/k8s/crds/`.
#[must_use]
pub fn crds_dir() -> PathBuf {
    workspace_dir().join("tests/k8s/crds")
}

/// An HTTPS agent trusting only the cluster's CA, presenting the admin's
/// certificate when `admin`.
fn agent(pki: &Pki, admin: bool) -> ureq::Agent {
    use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};
    let read = |p: &Path| fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    let ca = Certificate::from_pem(&read(&pki.ca))
        .unwrap_or_else(|e| panic!("parsing {}: {e}", pki.ca.display()));
    let mut tls = TlsConfig::builder().root_certs(RootCerts::Specific(Arc::new(vec![ca])));
    if admin {
        let cert = Certificate::from_pem(&read(&pki.admin_cert))
            .unwrap_or_else(|e| panic!("parsing {}: {e}", pki.admin_cert.display()));
        let key = PrivateKey::from_pem(&read(&pki.admin_key))
            .unwrap_or_else(|e| panic!("parsing {}: {e}", pki.admin_key.display()));
        tls = tls.client_cert(Some(ClientCert::new_with_certs(&[cert], key)));
    }
    ureq::Agent::config_builder()
        .tls_config(tls.build())
        // Never send loopback requests to an HTTP_PROXY from the env.
        .proxy(None)
        .http_status_as_error(false)
        .timeout_global(Some(REQUEST_TIMEOUT))
        .build()
        .into()
}

/// `method url` with an optional `(content type, JSON body)`: the status and
/// the body as JSON (`Value::String` when it is not JSON).
fn request(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    body: Option<(&str, &Value)>,
) -> Result<(u16, Value), ureq::Error> {
    let builder = ureq::http::Request::builder().method(method).uri(url);
    let mut response = match body {
        Some((content_type, value)) => agent.run(
            builder
                .header("Content-Type", content_type)
                .body(value.to_string())
                .map_err(ureq::Error::Http)?,
        )?,
        None => agent.run(builder.body(()).map_err(ureq::Error::Http)?)?,
    };
    let code = response.status().as_u16();
    let text = response.body_mut().read_to_string()?;
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((code, value))
}

/// Starts etcd on free loopback ports in `dir/etcd` and waits for /health.
fn start_etcd(dir: &Path) -> (Proc, String) {
    const ATTEMPTS: u32 = 5;
    let http: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into();
    for attempt in 1..=ATTEMPTS {
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let args = [
            "--name=test".to_owned(),
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls={url}"),
            format!("--advertise-client-urls={url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=test={peer_url}"),
            // A test's data need not survive a power cut.
            "--unsafe-no-fsync=true".to_owned(),
            "--log-level=warn".to_owned(),
        ];
        let mut etcd = Proc::spawn(
            "etcd".to_owned(),
            &binary("etcd"),
            &args,
            dir.join(format!("etcd-{attempt}.log")),
        );
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = etcd.child.try_wait() {
                let log = etcd.tail();
                assert!(
                    log.contains("address already in use") && attempt < ATTEMPTS,
                    "etcd exited ({status}) while starting\n{log}"
                );
                break;
            }
            let healthy = http
                .get(format!("{url}/health"))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_to_string().ok())
                .is_some_and(|b| b.contains("\"health\":\"true\""));
            if healthy {
                return (etcd, url);
            }
            assert!(
                Instant::now() < deadline,
                "etcd not healthy after {READY_TIMEOUT:?}\n{}",
                etcd.tail()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
    unreachable!("the last attempt either returns or panics")
}
