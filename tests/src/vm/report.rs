//! The driver's console protocol, read by the host harness: `VMTEST PLAN n`,
//! one `VMTEST PASS name` or `VMTEST FAIL name: why` per scenario, and
//! `VMTEST DONE passed=N failed=M`. Diagnostics go out as `VMTEST LOG` and
//! `VMTEST NOTE` lines, which the harness echoes but does not count.
use std::time::Duration;

/// Counts verdicts and prints them.
#[derive(Default)]
pub struct Report {
    passed: usize,
    failed: usize,
}

/// Makes `text` a single console line.
fn one_line(text: &str) -> String {
    text.split('\n')
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join(" | ")
}

impl Report {
    /// Announces how many scenarios will run.
    pub fn plan(n: usize) {
        println!("VMTEST PLAN {n}");
    }

    /// Records a pass.
    pub fn pass(&mut self, name: &str, took: Duration) {
        self.passed += 1;
        println!("VMTEST PASS {name} ({:.2} s)", took.as_secs_f64());
    }

    /// Records a failure.
    pub fn fail(&mut self, name: &str, why: &str, took: Duration) {
        self.failed += 1;
        println!(
            "VMTEST FAIL {name}: {} ({:.2} s)",
            one_line(why),
            took.as_secs_f64()
        );
    }

    /// A diagnostic line.
    pub fn note(text: &str) {
        println!("VMTEST NOTE {}", one_line(text));
    }

    /// A line of daemon output, verbatim.
    pub fn log(source: &str, line: &str) {
        println!("VMTEST LOG {source}: {line}");
    }

    /// The closing line; returns whether everything passed.
    pub fn done(&self) -> bool {
        println!("VMTEST DONE passed={} failed={}", self.passed, self.failed);
        self.failed == 0
    }
}
