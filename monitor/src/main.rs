//! The `kmod-monitor` binary: parses the command line and dispatches to
//! `run`, `check` or `log verify|show`. Errors become exit code 2 with a
//! message that names the bad input; settings are resolved in
//! [`kmod_monitor::config::settings`], never here.
use std::{io::Write as _, path::PathBuf, process::ExitCode, time::SystemTime};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kmod_monitor::{
    check,
    config::{
        flags::{CheckFlags, LogFormat, RunFlags},
        settings,
    },
    daemon, fix,
    forensic::{
        show::{self, Filter, ShowError},
        verify,
    },
};

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
    Run(Box<RunFlags>),
    /// Check the node once (preflight); exit 0 if every group is met, 1 if not, 2 on error.
    Check(CheckFlags),
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(flags) => run(*flags),
        Command::Check(flags) if flags.fix => {
            fix::command(&flags.common, flags.dry_run, flags.output)
        }
        Command::Check(flags) => check::command(&flags.common, flags.output),
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

fn run(flags: RunFlags) -> anyhow::Result<u8> {
    let format = flags.log_format;
    init_logging(format);
    let result = settings::load_file(&flags.common)
        .map_err(anyhow::Error::from)
        .and_then(|file| settings::resolve_run(&flags, file).map_err(anyhow::Error::from))
        .and_then(|settings| {
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

fn log_verify(paths: &[PathBuf]) -> anyhow::Result<u8> {
    let report = verify::verify(paths)?;
    // A tampered file's hashes and members are quoted in the verdict.
    for line in report.to_string().lines() {
        println!("{}", show::escape_controls(line));
    }
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
