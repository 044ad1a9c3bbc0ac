//! The `kmod-monitor` binary: parses flags, validates them with the config
//! file into settings, and runs `run`, `check` or `log verify|show`. Errors
//! become exit code 2 with a message that names the bad input.
use std::{
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use kmod_monitor::{
    check,
    config::{self, EventLogPath, FileConfig, SourceKind},
    daemon::{self, RunSettings},
    forensic::{
        self, EventLogSettings, FsyncPolicy,
        show::{self, Filter, ShowError},
        verify,
    },
    host::{self, HostRoot},
    longhorn::{self, ClusterSettings, LocalInputs, LonghornMode},
    requirements,
    tracker::Tracker,
};
use monitor_common::DEFAULT_RING_BYTES;

#[derive(Parser, Debug)]
#[command(
    name = "kmod-monitor",
    version,
    about = "Watches the kernel modules Longhorn needs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the monitor daemon.
    Run(Box<RunArgs>),
    /// Check the node once (preflight); exit 0 if every group is met, 1 if not, 2 on error.
    Check(CheckArgs),
    /// Query the forensic event log written by `run --event-log`.
    #[command(subcommand)]
    Log(LogCommand),
}

#[derive(Subcommand, Debug)]
enum LogCommand {
    /// Check the hash chain through the files (any order, e.g. events.jsonl*);
    /// exit 0 when intact, 1 naming the first bad FILE:LINE, 2 when a file cannot be read.
    Verify {
        /// Log files: the current one and rotated ones.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Print the records in seq order as a timeline, or as raw JSON lines.
    Show(ShowArgs),
}

#[derive(clap::Args, Debug)]
struct ShowArgs {
    /// Log files: the current one and rotated ones, in any order.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Only records about this module (and snapshots listing it).
    #[arg(long, value_name = "M")]
    module: Option<String>,
    /// Only records at or after T: RFC 3339 UTC, a date, `now` or `10m ago`.
    #[arg(long, value_name = "T")]
    since: Option<String>,
    /// Only records before T (same forms as --since).
    #[arg(long, value_name = "T")]
    until: Option<String>,
    /// Only records of this kind (repeatable), e.g. module_unload.
    #[arg(long, value_name = "K")]
    kind: Vec<String>,
    /// Print the records as they are in the files, one JSON object per line.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct Common {
    /// TOML config file (groups, settings).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Require the V2 data engine (vfio_pci, uio_pci_generic, nvme_tcp, 2 MiB
    /// hugepages), or with =false never; overrides the cluster and the file.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    v2_data_engine: Option<bool>,
    /// Learn V2 enablement from the cluster (Longhorn's v2-data-engine
    /// setting, this node's labels) when running in one [default: auto].
    #[arg(long, value_enum)]
    longhorn: Option<LonghornMode>,
    /// Kubeconfig for --longhorn [default: in-cluster, $KUBECONFIG, ~/.kube/config].
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Namespace of Longhorn's settings [default: longhorn-system].
    #[arg(long, value_name = "NS")]
    longhorn_namespace: Option<String>,
    /// 2 MiB hugepages the V2 data engine needs; 0 = do not check [default: 1024].
    #[arg(long, value_name = "PAGES")]
    v2_hugepages_2mi: Option<u64>,
    /// This node's name: the alerts' `instance` label and the Node whose
    /// labels are watched [default: hostname].
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    node_name: Option<String>,
    /// Read every host path under DIR (container with the host's / mounted there).
    #[arg(long, value_name = "DIR")]
    host_root: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// Address for /status, /healthz [default: 0.0.0.0:9469].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Event source [default: auto = ebpf, else uevent, else poll].
    #[arg(long, value_enum)]
    source: Option<SourceKind>,
    /// Seconds between reconciles against /proc/modules [default: 60].
    #[arg(long, value_name = "SECS")]
    reconcile_interval: Option<u64>,
    /// Seconds between /proc/modules reads for the poll source [default: 1].
    #[arg(long, value_name = "SECS")]
    poll_interval: Option<u64>,
    /// eBPF ring buffer size in bytes (power of two, >= 4096) [default: 262144].
    #[arg(long, value_name = "BYTES")]
    ring_buffer_size: Option<u32>,
    /// Alertmanager base URL to push alerts to (v2 API); repeatable.
    #[arg(long = "alertmanager", value_name = "URL", value_parser = parse_am_url)]
    alertmanager: Vec<reqwest::Url>,
    /// Seconds between re-sends of firing alerts [default: 60].
    #[arg(long, value_name = "SECS")]
    alert_resend_interval: Option<u64>,
    /// Seconds the cluster may be unreadable before the alert fires [default: 300].
    #[arg(long, value_name = "SECS")]
    longhorn_grace: Option<u64>,
    /// Runbook link put on every alert.
    #[arg(long, value_name = "URL")]
    runbook_url: Option<String>,
    /// After attaching, also become this user (NAME, UID or UID:GID); the
    /// event log's directory must then be writable by it.
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// Keep all capabilities after attaching (debugging only; by default
    /// every capability is dropped once the eBPF programs are attached).
    #[arg(long, conflicts_with = "user")]
    keep_privileges: bool,
    /// Forensic event log file; "" for none [default: /var/lib/kmod-monitor/events.jsonl when run as root, else none].
    #[arg(long, value_name = "PATH", overrides_with = "no_event_log")]
    event_log: Option<PathBuf>,
    /// Write no forensic event log (the last of --event-log/--no-event-log wins).
    #[arg(long, overrides_with = "event_log")]
    no_event_log: bool,
    /// When the event log is fsynced [default: interval, at most once a second].
    #[arg(long, value_enum)]
    fsync: Option<FsyncPolicy>,
    /// Rotate the event log before it grows past BYTES (>= 4096) [default: 67108864].
    #[arg(long, value_name = "BYTES")]
    event_log_max_bytes: Option<u64>,
    /// Rotated event log files kept, events.jsonl.1 to .N (>= 1) [default: 5].
    #[arg(long, value_name = "N")]
    event_log_keep: Option<u32>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    #[command(flatten)]
    common: Common,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Load the missing modules now (modprobe) and list the required ones
    /// in /etc/modules-load.d/kmod-monitor.conf so they survive a reboot.
    /// Never touches a file kmod-monitor did not create.
    #[arg(long)]
    fix: bool,
    /// With --fix: print what would be done, change nothing.
    #[arg(long, requires = "fix")]
    dry_run: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Text,
    Json,
}

const DEFAULT_LISTEN: &str = "0.0.0.0:9469";
const DEFAULT_RUNBOOK: &str = "https://github.com/kmod-monitor/kmod-monitor/blob/main/README.md";

fn parse_am_url(s: &str) -> Result<reqwest::Url, String> {
    config::parse_alertmanager_url(s)
}

/// The node's name: flag or $NODE_NAME, then the config, then the host's
/// hostname (under --host-root), then the kernel's.
fn node_name(flag: Option<String>, file: Option<&FileConfig>, host: &HostRoot) -> String {
    flag.filter(|n| !n.trim().is_empty())
        .or_else(|| file.and_then(|f| f.node_name.clone()))
        .or_else(|| {
            std::fs::read_to_string(host.root().join("proc/sys/kernel/hostname"))
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Check(args) => check(&args),
        Command::Log(LogCommand::Verify { paths }) => log_verify(&paths),
        Command::Log(LogCommand::Show(args)) => log_show(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("kmod-monitor: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn load_file(common: &Common) -> anyhow::Result<Option<FileConfig>> {
    common
        .config
        .as_deref()
        .map(config::load_config)
        .transpose()
        .map_err(anyhow::Error::from)
}

fn host_root(common: &Common, file: Option<&FileConfig>) -> HostRoot {
    let dir = common
        .host_root
        .clone()
        .or_else(|| file.and_then(|f| f.host_root.clone()))
        .unwrap_or_else(|| PathBuf::from("/"));
    HostRoot::new(dir)
}

/// The V2 inputs that are not the cluster's.
fn local_inputs(common: &Common, file: Option<&FileConfig>) -> LocalInputs {
    LocalInputs::resolve(common.v2_data_engine, common.v2_hugepages_2mi, file)
}

/// The cluster-watch flags over the config file over defaults.
fn cluster_settings(
    common: &Common,
    file: Option<&FileConfig>,
    grace: Option<u64>,
) -> anyhow::Result<ClusterSettings> {
    Ok(ClusterSettings {
        mode: common
            .longhorn
            .or_else(|| file.and_then(|f| f.longhorn))
            .unwrap_or_default(),
        kubeconfig: common
            .kubeconfig
            .clone()
            .or_else(|| file.and_then(|f| f.kubeconfig.clone())),
        namespace: match &common.longhorn_namespace {
            Some(ns) => {
                anyhow::ensure!(
                    !ns.is_empty()
                        && ns.len() <= 63
                        && ns
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                    "--longhorn-namespace {ns:?}: not a Kubernetes namespace name ([a-z0-9-], 1 to 63 characters)"
                );
                ns.clone()
            }
            None => file
                .and_then(|f| f.longhorn_namespace.clone())
                .unwrap_or_else(|| longhorn::DEFAULT_NAMESPACE.to_owned()),
        },
        grace: match grace {
            Some(v) => secs("--longhorn-grace", v)?,
            None => file
                .and_then(|f| f.longhorn_grace)
                .unwrap_or(Duration::from_secs(300)),
        },
    })
}

fn secs(flag: &str, v: u64) -> anyhow::Result<Duration> {
    anyhow::ensure!(v > 0, "{flag} must be at least 1 second, got 0");
    Ok(Duration::from_secs(v))
}

/// Flags over the config file over defaults.
fn settings(args: RunArgs) -> anyhow::Result<RunSettings> {
    let RunArgs {
        common,
        listen,
        source,
        reconcile_interval,
        poll_interval,
        ring_buffer_size,
        alertmanager,
        alert_resend_interval,
        longhorn_grace,
        runbook_url,
        user,
        keep_privileges,
        event_log,
        no_event_log,
        fsync,
        event_log_max_bytes,
        event_log_keep,
        log_format: _,
    } = args;
    let file = load_file(&common)?;
    let f = file.as_ref();
    let ring = ring_buffer_size
        .or_else(|| f.and_then(|f| f.ring_buffer_size))
        .unwrap_or(DEFAULT_RING_BYTES);
    anyhow::ensure!(
        ring >= 4096 && ring.is_power_of_two(),
        "--ring-buffer-size {ring}: must be a power of two of at least 4096 bytes"
    );
    let host = host_root(&common, f);
    let event_log = event_log_settings(
        EventLogFlags {
            path: event_log,
            off: no_event_log,
            fsync,
            max_bytes: event_log_max_bytes,
            keep: event_log_keep,
        },
        f,
    )?;
    let user = user
        .map(|spec| kmod_monitor::privileges::User::resolve(&spec))
        .transpose()?;
    Ok(RunSettings {
        user,
        keep_privileges,
        event_log,
        alertmanager: if alertmanager.is_empty() {
            f.map(|f| f.alertmanager.clone()).unwrap_or_default()
        } else {
            alertmanager
        },
        alert_resend_interval: match alert_resend_interval {
            Some(v) => secs("--alert-resend-interval", v)?,
            None => f
                .and_then(|f| f.alert_resend_interval)
                .unwrap_or(Duration::from_secs(60)),
        },
        node_name: node_name(common.node_name.clone(), f, &host),
        runbook_url: runbook_url
            .or_else(|| f.and_then(|f| f.runbook_url.clone()))
            .unwrap_or_else(|| DEFAULT_RUNBOOK.to_owned()),
        groups: requirements::resolve(&f.map(|f| f.groups.clone()).unwrap_or_default(), true),
        cluster: cluster_settings(&common, f, longhorn_grace)?,
        v2_local: local_inputs(&common, f),
        hugepages_flag: common.v2_hugepages_2mi,
        listen: match listen.or_else(|| f.and_then(|f| f.listen)) {
            Some(a) => a,
            None => DEFAULT_LISTEN.parse().context("default listen address")?,
        },
        source: source
            .or_else(|| f.and_then(|f| f.source))
            .unwrap_or(SourceKind::Auto),
        host,
        reconcile_interval: match reconcile_interval {
            Some(v) => secs("--reconcile-interval", v)?,
            None => f
                .and_then(|f| f.reconcile_interval)
                .unwrap_or(Duration::from_secs(60)),
        },
        poll_interval: match poll_interval {
            Some(v) => secs("--poll-interval", v)?,
            None => f
                .and_then(|f| f.poll_interval)
                .unwrap_or(Duration::from_secs(1)),
        },
        ring_buffer_bytes: ring,
        config_path: common.config,
    })
}

/// The run flags about the event log.
struct EventLogFlags {
    path: Option<PathBuf>,
    off: bool,
    fsync: Option<FsyncPolicy>,
    max_bytes: Option<u64>,
    keep: Option<u32>,
}

/// Whether this process runs as root (the event log's default depends on it).
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Flags over the config file over defaults; `None` = no event log.
fn event_log_settings(
    flags: EventLogFlags,
    file: Option<&FileConfig>,
) -> anyhow::Result<Option<EventLogSettings>> {
    let EventLogFlags {
        path,
        off,
        fsync,
        max_bytes,
        keep,
    } = flags;
    let max_bytes = max_bytes
        .or_else(|| file.and_then(|f| f.event_log_max_bytes))
        .unwrap_or(forensic::DEFAULT_MAX_BYTES);
    anyhow::ensure!(
        max_bytes >= forensic::MIN_MAX_BYTES,
        "--event-log-max-bytes {max_bytes}: must be at least {} bytes",
        forensic::MIN_MAX_BYTES
    );
    let keep = keep
        .or_else(|| file.and_then(|f| f.event_log_keep))
        .unwrap_or(forensic::DEFAULT_KEEP);
    anyhow::ensure!(
        keep >= 1,
        "--event-log-keep 0: keep at least 1 rotated file"
    );
    let path =
        if off {
            None
        } else if let Some(p) = path {
            if p.as_os_str().is_empty() {
                None
            } else {
                Some(std::path::absolute(&p).with_context(|| {
                    format!("--event-log {}: cannot make it absolute", p.display())
                })?)
            }
        } else {
            match file.and_then(|f| f.event_log.clone()) {
                Some(EventLogPath::Off) => None,
                Some(EventLogPath::At(p)) => Some(p),
                None => is_root().then(|| PathBuf::from(forensic::DEFAULT_PATH)),
            }
        };
    Ok(path.map(|path| EventLogSettings {
        path,
        fsync: fsync
            .or_else(|| file.and_then(|f| f.fsync))
            .unwrap_or_default(),
        max_bytes,
        keep,
    }))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KMOD_MONITOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn run(args: RunArgs) -> anyhow::Result<u8> {
    let format = args.log_format;
    init_logging(format);
    let result = settings(args).and_then(|settings| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        rt.block_on(daemon::run(settings))
    });
    match (result, format) {
        (Ok(()), _) => Ok(0),
        // A log shipper reading JSON lines must see the fatal error as one
        // too, not as a stray text line.
        (Err(e), LogFormat::Json) => {
            tracing::error!(error = %format!("{e:#}"), "kmod-monitor stopped on an error");
            Ok(2)
        }
        (Err(e), LogFormat::Text) => Err(e),
    }
}

/// `check --fix [--dry-run]`: exit 0 when every step succeeded (or, dry
/// run, after printing the plan), 1 when a modprobe failed.
fn fix(
    report: &check::Report,
    boot: &kmod_monitor::remedy::BootFacts,
    host: &HostRoot,
    dry_run: bool,
) -> anyhow::Result<u8> {
    let plan = kmod_monitor::fix::plan(report, &boot.persistence, host)?;
    if dry_run {
        print!("{plan}");
        return Ok(0);
    }
    let root = host.root().to_path_buf();
    // modprobe must act on the host: through chroot when the host's / is
    // mounted elsewhere (a container with --host-root).
    let runner = |argv: &[&str]| {
        let mut cmd = if root == std::path::Path::new("/") {
            let mut c = std::process::Command::new(argv[0]);
            c.args(&argv[1..]);
            c
        } else {
            let mut c = std::process::Command::new("chroot");
            c.arg(&root).args(argv);
            c
        };
        cmd.status()
    };
    let done = kmod_monitor::fix::apply(&plan, host, &runner)?;
    print!("{done}");
    Ok(u8::from(!done.ok()))
}

fn log_verify(paths: &[PathBuf]) -> anyhow::Result<u8> {
    let report = verify::verify(paths)?;
    print!("{report}");
    Ok(report.exit_code())
}

fn log_show(args: ShowArgs) -> anyhow::Result<u8> {
    let ShowArgs {
        paths,
        module,
        since,
        until,
        kind,
        json,
    } = args;
    let now = SystemTime::now();
    let filter = Filter {
        module: module.as_deref().map(show::parse_module).transpose()?,
        since: since
            .as_deref()
            .map(|t| show::parse_time("--since", t, now))
            .transpose()?,
        until: until
            .as_deref()
            .map(|t| show::parse_time("--until", t, now))
            .transpose()?,
        kinds: kind
            .iter()
            .map(|k| show::parse_kind(k))
            .collect::<Result<_, _>>()?,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let warnings = match show::show(&paths, &filter, json, &mut out).and_then(|w| {
        out.flush()?;
        Ok(w)
    }) {
        Ok(w) => w,
        // `log show ... | head`: the reader has what it wanted.
        Err(ShowError::Write(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    for w in warnings {
        eprintln!("kmod-monitor: warning: {w}");
    }
    Ok(0)
}

/// `check`'s one read of the cluster: the view, and a note on how it was
/// read (or why not).
fn read_cluster_once(
    cluster: &ClusterSettings,
    node: &str,
) -> anyhow::Result<(Option<longhorn::ClusterView>, String)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let Some(client) = longhorn::client(cluster).await? else {
            let why = match cluster.mode {
                LonghornMode::Off => "not asked (--longhorn off)",
                LonghornMode::Auto => {
                    "not asked: not in a cluster (no service account, no kubeconfig)"
                }
            };
            return Ok((None, why.to_owned()));
        };
        let target = longhorn::watch::WatchTarget {
            namespace: cluster.namespace.clone(),
            node: node.to_owned(),
        };
        let view = tokio::time::timeout(
            CHECK_CLUSTER_TIMEOUT,
            longhorn::watch::read_once(client, &target),
        )
        .await
        .unwrap_or_else(|_| {
            let r = format!("no answer from the API server within {CHECK_CLUSTER_TIMEOUT:?}");
            longhorn::ClusterView {
                v2_setting: longhorn::Fact::Unknown(r.clone()),
                hugepage_setting: longhorn::Fact::Unknown(r.clone()),
                node_opt_out: longhorn::Fact::Unknown(r),
            }
        });
        Ok((
            Some(view),
            format!("asked (namespace {}, node {node})", cluster.namespace),
        ))
    })
}

/// How long `check` waits for the API server.
const CHECK_CLUSTER_TIMEOUT: Duration = Duration::from_secs(10);

fn check(args: &CheckArgs) -> anyhow::Result<u8> {
    let file = load_file(&args.common)?;
    let host = host_root(&args.common, file.as_ref());
    let f = file.as_ref();
    let local = local_inputs(&args.common, f);
    let cluster = cluster_settings(&args.common, f, None)?;
    let node = node_name(args.common.node_name.clone(), f, &host);
    let (view, cluster_note) = read_cluster_once(&cluster, &node)?;
    let v2 = longhorn::decide_v2(local, view.as_ref());
    let hugepages_on = longhorn::decide_hugepages(&v2, local, view.as_ref());
    let groups = requirements::resolve(
        &f.map(|f| f.groups.clone()).unwrap_or_default(),
        v2.enabled == Some(true),
    );
    let snapshot = host::take_snapshot(&host).context("reading the host")?;
    let tracker = Tracker::new(&snapshot, groups);
    let boot = kmod_monitor::remedy::boot_facts(&host, &snapshot, tracker.groups());
    let mut report = check::evaluate(&snapshot, &tracker, &boot);
    let readiness = longhorn::readiness::read(&host, &snapshot.kernel_release, local.hugepages_2mi);
    let v2_check = longhorn::readiness::judge(v2, hugepages_on, readiness, cluster_note);
    report.met &= v2_check.met;
    report.v2 = Some(v2_check);
    if args.fix {
        return fix(&report, &boot, &host, args.dry_run);
    }
    match args.output {
        Output::Text => print!("{}", check::render_text(&report)),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).context("encoding the report")?
        ),
    }
    Ok(report.exit_code())
}
