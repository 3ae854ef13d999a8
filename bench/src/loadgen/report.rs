//! Per-scenario results: counts, bytes and latency percentiles.

use std::time::Duration;

/// What one task measured.
#[derive(Debug, Default)]
pub struct Tally {
    /// Latency of each operation, in microseconds.
    pub latencies: Vec<u64>,
    /// Payload bytes sent plus received.
    pub bytes: u64,
    /// Operations that failed at the RPC level.
    pub errors: u64,
    /// Answers that differed from what was expected.
    pub verify_failures: u64,
    /// The first problem met, for the report.
    pub first_problem: Option<String>,
}

impl Tally {
    /// Records an RPC failure.
    pub fn error(&mut self, what: String) {
        self.errors += 1;
        self.first_problem.get_or_insert(what);
    }

    /// Records a verification failure.
    pub fn mismatch(&mut self, what: String) {
        self.verify_failures += 1;
        self.first_problem.get_or_insert(what);
    }

    /// Adds `other` into this tally.
    pub fn merge(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.bytes += other.bytes;
        self.errors += other.errors;
        self.verify_failures += other.verify_failures;
        if self.first_problem.is_none() {
            self.first_problem = other.first_problem;
        }
    }
}

/// The summary of a scenario.
#[derive(Debug)]
pub struct Report {
    pub scenario: String,
    pub ops: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub mb_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub errors: u64,
    pub verify_failures: u64,
    pub first_problem: Option<String>,
}

impl Report {
    /// Summarises `tally`, measured over `elapsed`.
    pub fn new(scenario: &str, mut tally: Tally, elapsed: Duration) -> Self {
        tally.latencies.sort_unstable();
        let seconds = elapsed.as_secs_f64().max(1e-9);
        let ops = tally.latencies.len() as u64;
        let at = |quantile: f64| -> u64 {
            if tally.latencies.is_empty() {
                return 0;
            }
            let index = ((tally.latencies.len() as f64 * quantile).ceil() as usize)
                .clamp(1, tally.latencies.len());
            tally.latencies[index - 1]
        };
        Self {
            scenario: scenario.to_string(),
            ops,
            seconds,
            ops_per_sec: ops as f64 / seconds,
            mb_per_sec: tally.bytes as f64 / seconds / 1e6,
            p50_us: at(0.50),
            p99_us: at(0.99),
            p999_us: at(0.999),
            errors: tally.errors,
            verify_failures: tally.verify_failures,
            first_problem: tally.first_problem,
        }
    }

    /// One human-readable line.
    pub fn line(&self) -> String {
        let mut line = format!(
            "{:<16} {:>9} ops {:>7.2}s {:>10.1} ops/s {:>9.1} MB/s  p50 {:>8} us  p99 {:>8} us  p999 {:>8} us  errors {}  verify-failures {}",
            self.scenario,
            self.ops,
            self.seconds,
            self.ops_per_sec,
            self.mb_per_sec,
            self.p50_us,
            self.p99_us,
            self.p999_us,
            self.errors,
            self.verify_failures
        );
        if let Some(problem) = &self.first_problem {
            line.push_str(&format!("  first problem: {problem}"));
        }
        line
    }

    /// One JSON object.
    pub fn json(&self) -> String {
        serde_json::json!({
            "scenario": self.scenario,
            "ops": self.ops,
            "seconds": self.seconds,
            "ops_per_sec": self.ops_per_sec,
            "mb_per_sec": self.mb_per_sec,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "p999_us": self.p999_us,
            "errors": self.errors,
            "verify_failures": self.verify_failures,
            "first_problem": self.first_problem,
        })
        .to_string()
    }
}
