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

/// Removes ANSI CSI sequences (`ESC [ ... letter`) such as colours.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
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

    /// A line of daemon output, without terminal colour codes.
    pub fn log(source: &str, line: &str) {
        println!("VMTEST LOG {source}: {}", strip_ansi(line));
    }

    /// The closing line; returns whether everything passed.
    pub fn done(&self) -> bool {
        println!("VMTEST DONE passed={} failed={}", self.passed, self.failed);
        self.failed == 0
    }
}

#[cfg(test)]
mod tests {
    use super::{one_line, strip_ansi};

    #[test]
    fn colour_codes_are_removed() {
        let line = "\u{1b}[2m2026-11-25T12:39:35Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m source\u{1b}[2m=\u{1b}[0mebpf";
        assert_eq!(strip_ansi(line), "2026-11-25T12:39:35Z  INFO source=ebpf");
    }

    #[test]
    fn reasons_become_one_line() {
        assert_eq!(one_line("a\nb  \nc"), "a | b | c");
    }
}
