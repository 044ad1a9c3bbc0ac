//! `cargo xtask test`: the one command that runs every test. Setup, format
//! check, clippy, the workspace's cargo tests, then the VM tests on every
//! kernel. It stops at the first failing step and always ends with a
//! summary whose last line is `N passed, N failed`.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{arch::Arch, binaries, cmd, dirs, setup, vm_test};

/// Counts from cargo test's `test result:` lines.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TestCounts {
    /// Tests that passed.
    pub passed: usize,
    /// Tests that failed.
    pub failed: usize,
    /// Tests marked #[ignore].
    pub ignored: usize,
}

impl TestCounts {
    /// Adds one `test result: ok. 3 passed; 0 failed; 1 ignored; ...` line.
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<usize>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// The eBPF program's crate, which only builds for bpfel-unknown-none.
const EBPF_PACKAGE: &str = "monitor-ebpf";

struct Step {
    name: String,
    ok: bool,
    duration: Duration,
    detail: String,
}

/// Runs every test (what kernels skip for the CI budget only with `full`); `Err` if
/// any step failed.
pub fn test(full: bool) -> Result<()> {
    let start = Instant::now();
    let mut steps: Vec<Step> = Vec::new();
    let mut passed = 0usize;
    let mut failed = 0usize;

    let result = run_steps(&mut steps, &mut passed, &mut failed, full);
    if result.is_err() {
        // A failed step that counted no test failure (fmt, clippy, a build)
        // still has to show up in the count.
        if failed == 0 {
            failed = 1;
        }
    }

    println!();
    println!("==== kmod-monitor test summary ====");
    for step in &steps {
        println!(
            "{:<20} {:<4} {:>7.1} s  {}",
            step.name,
            if step.ok { "ok" } else { "FAIL" },
            step.duration.as_secs_f64(),
            step.detail
        );
    }
    if let Err(err) = &result {
        println!("stopped: {err:#}");
    }
    println!("total time {:.1} s", start.elapsed().as_secs_f64());
    println!("{passed} passed, {failed} failed");
    result
}

fn timed<T>(
    steps: &mut Vec<Step>,
    name: &str,
    f: impl FnOnce() -> Result<(T, String)>,
) -> Result<T> {
    println!("==== {name} ====");
    let start = Instant::now();
    let result = f();
    let duration = start.elapsed();
    match result {
        Ok((value, detail)) => {
            steps.push(Step {
                name: name.to_owned(),
                ok: true,
                duration,
                detail,
            });
            Ok(value)
        }
        Err(err) => {
            steps.push(Step {
                name: name.to_owned(),
                ok: false,
                duration,
                detail: format!("{err:#}"),
            });
            Err(err.context(format!("step `{name}` failed")))
        }
    }
}

/// A cargo command for the suite's steps. The suite builds once and runs,
/// so incremental compilation's caches (gigabytes for the workspace's test
/// binaries) only cost disk; off unless the caller set it.
fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(dirs::workspace_root());
    if std::env::var_os("CARGO_INCREMENTAL").is_none() {
        cmd.env("CARGO_INCREMENTAL", "0");
    }
    cmd
}

fn run_steps(
    steps: &mut Vec<Step>,
    passed: &mut usize,
    failed: &mut usize,
    full: bool,
) -> Result<()> {
    timed(steps, "setup", || {
        setup::setup().map(|()| ((), String::new()))
    })?;
    timed(steps, "fmt", || {
        cmd::run(cargo().args(["fmt", "--all", "--", "--check"])).map(|()| ((), String::new()))
    })?;
    timed(steps, "clippy", || {
        // Not one `--workspace` run: feature unification would give the
        // eBPF crate monitor-common's `user` feature (aya, so std) and a
        // second panic handler. Like aya's own CI, lint the userspace
        // crates together and the eBPF crate alone, for its real target
        // (the pinned nightly, as its build is).
        cmd::run(cargo().args([
            "clippy",
            "--workspace",
            "--exclude",
            EBPF_PACKAGE,
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
        let toolchain = dirs::ebpf_toolchain()?;
        cmd::run(
            cmd::new(
                "rustup",
                [
                    "run",
                    toolchain.as_str(),
                    "cargo",
                    "clippy",
                    "--package",
                    EBPF_PACKAGE,
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--",
                    "-D",
                    "warnings",
                ],
            )
            .current_dir(dirs::workspace_root()),
        )
        .map(|()| ((), String::new()))
    })?;

    let mut counts = TestCounts::default();
    let cargo_test = timed(steps, "cargo test", || {
        let ok = run_counting(cargo().args(["test", "--workspace"]), &mut counts)?;
        let detail = format!(
            "{} passed, {} failed, {} ignored",
            counts.passed, counts.failed, counts.ignored
        );
        if ok {
            Ok(((), detail))
        } else {
            Err(anyhow!("cargo test --workspace failed ({detail})"))
        }
    });
    *passed += counts.passed;
    *failed += counts.failed;
    cargo_test?;

    // The static daemons the image and the VMs carry, each checked for its
    // ELF machine, static linkage and embedded eBPF object.
    timed(steps, "static build", || {
        let mut built = Vec::new();
        for arch in Arch::ALL {
            binaries::build_static_daemon(arch)?;
            built.push(arch.name());
        }
        Ok((
            (),
            format!(
                "{}: static, right ELF machine, eBPF object embedded",
                built.join(" and ")
            ),
        ))
    })?;

    let vm_start = Instant::now();
    let outcomes = vm_test::vm_test(&vm_test::Options {
        archs: Vec::new(),
        kernels: Vec::new(),
        scenarios: Vec::new(),
        full,
        refresh_kernels: false,
        timeout: 600,
    });
    let outcomes = match outcomes {
        Ok(outcomes) => outcomes,
        Err(err) => {
            steps.push(Step {
                name: "vm-test".to_owned(),
                ok: false,
                duration: Duration::ZERO,
                detail: format!("{err:#}"),
            });
            return Err(err.context("step `vm-test` failed"));
        }
    };
    // What the kernels did not use went into building the static binaries.
    let kernels_time: Duration = outcomes.iter().map(|o| o.duration).sum();
    steps.push(Step {
        name: "vm-test build".to_owned(),
        ok: true,
        duration: vm_start.elapsed().saturating_sub(kernels_time),
        detail: "guest drivers, busybox".to_owned(),
    });
    let mut all_ok = true;
    for o in &outcomes {
        *passed += o.passed;
        *failed += o.failed.len() + o.problems.len();
        all_ok &= o.ok();
        let mut detail = format!(
            "{} passed, {} failed [{}]",
            o.passed,
            o.failed.len(),
            o.release.as_deref().unwrap_or("kernel not fetched")
        );
        for (name, _) in &o.failed {
            detail.push_str(&format!("; FAIL {name}"));
        }
        for p in &o.problems {
            detail.push_str(&format!("; {p}"));
        }
        if !o.skipped.is_empty() {
            detail.push_str(&format!("; not run here: {}", o.skipped.join(" ")));
        }
        steps.push(Step {
            name: format!("vm-test {}", o.label()),
            ok: o.ok(),
            duration: o.duration,
            detail,
        });
    }
    if !all_ok {
        bail!(
            "vm-test failed on {}",
            outcomes
                .iter()
                .filter(|o| !o.ok())
                .map(vm_test::Outcome::label)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Runs `cmd`, echoing its stdout and counting its `test result:` lines.
fn run_counting(cmd: &mut Command, counts: &mut TestCounts) -> Result<bool> {
    let text = cmd::describe(cmd);
    println!("+ {text}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{text}`"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("stdout of `{text}` was not captured"))?;
    for line in BufReader::new(stdout).lines() {
        let line = line.with_context(|| format!("reading the output of `{text}`"))?;
        println!("{line}");
        counts.add_line(&line);
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{text}`"))?;
    Ok(status.success())
}

#[cfg(test)]
mod tests {
    use super::TestCounts;

    #[test]
    fn sums_cargo_test_result_lines() {
        let mut c = TestCounts::default();
        c.add_line("test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        c.add_line("test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.20s");
        c.add_line("running 5 tests");
        c.add_line("test foo ... ok");
        assert_eq!(
            c,
            TestCounts {
                passed: 15,
                failed: 2,
                ignored: 1
            }
        );
    }
}
