//! Latency histograms, error counters and their printed and JSON forms.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use switchboard_client::ClientError;

/// Highest latency a histogram tells apart: one hour, in microseconds.
const MAX_MICROS: u64 = 3_600_000_000;

/// A latency histogram in microseconds (1 us to one hour), 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid fixed histogram bounds")
}

/// Record a duration (microseconds, at least 1; longer than an hour counts as one).
pub fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let micros = u64::try_from(latency.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    histogram.saturating_record(micros);
}

/// Percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl LatencySummary {
    pub fn of(histogram: &Histogram<u64>) -> LatencySummary {
        if histogram.is_empty() {
            return LatencySummary::default();
        }
        let ms = |micros: u64| micros as f64 / 1_000.0;
        LatencySummary {
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p90_ms: ms(histogram.value_at_quantile(0.90)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
            mean_ms: histogram.mean() / 1_000.0,
        }
    }
}

/// Histograms shared by the tasks of a run. One lock for all: a record takes
/// nanoseconds and a run makes at most tens of thousands per second.
#[derive(Debug)]
pub struct Latencies {
    inner: Mutex<LatencyHistograms>,
}

#[derive(Debug, Clone)]
pub struct LatencyHistograms {
    /// Intended send time to receipt by the peer's session.
    pub e2e: Histogram<u64>,
    /// Intended send time to receipt by the sender's own session.
    pub echo: Histogram<u64>,
    /// Intended send time to the accepted ack.
    pub ack: Histogram<u64>,
}

/// Which histogram a sample goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Latency {
    E2e,
    Echo,
    Ack,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            inner: Mutex::new(LatencyHistograms {
                e2e: histogram(),
                echo: histogram(),
                ack: histogram(),
            }),
        }
    }
}

impl Latencies {
    pub fn record(&self, which: Latency, latency: Duration) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let histogram = match which {
            Latency::E2e => &mut inner.e2e,
            Latency::Echo => &mut inner.echo,
            Latency::Ack => &mut inner.ack,
        };
        record(histogram, latency);
    }

    pub fn snapshot(&self) -> LatencyHistograms {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Counts of errors by label (server error code, `timeout`, `closed`, ...).
#[derive(Debug, Default)]
pub struct ErrorCounts {
    inner: Mutex<BTreeMap<String, u64>>,
}

impl ErrorCounts {
    pub fn add(&self, label: impl Into<String>) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *inner.entry(label.into()).or_default() += 1;
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A short, stable label for an error: the server's error code, or the kind of
/// client-side failure (with the HTTP status for a refused upgrade).
pub fn error_label(error: &ClientError) -> String {
    match error {
        ClientError::Server { code, .. } => code.as_str().to_owned(),
        ClientError::Timeout => "timeout".into(),
        ClientError::Closed { reason, .. } if reason.contains("slow_consumer") => {
            "closed_slow_consumer".into()
        }
        ClientError::Closed { .. } => "closed".into(),
        ClientError::Connect {
            status: Some(status),
            ..
        } => format!("connect_http_{status}"),
        ClientError::Connect { status: None, .. } => "connect_failed".into(),
        ClientError::Protocol(_) => "protocol".into(),
    }
}

/// A fixed-width table of latency summaries.
pub fn latency_table(rows: &[(&str, LatencySummary)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  {:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max"
    );
    for (name, s) in rows {
        let _ = writeln!(
            out,
            "  {:<22} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            name, s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_client::ErrorCode;

    #[test]
    fn percentiles_come_out_in_milliseconds() {
        let mut h = histogram();
        for ms in 1..=100u64 {
            record(&mut h, Duration::from_millis(ms));
        }
        let s = LatencySummary::of(&h);
        assert_eq!(s.count, 100);
        assert!((s.p50_ms - 50.0).abs() < 0.1, "{s:?}");
        assert!((s.p99_ms - 99.0).abs() < 0.1, "{s:?}");
        assert!((s.max_ms - 100.0).abs() < 0.1, "{s:?}");
        assert_eq!(LatencySummary::of(&histogram()), LatencySummary::default());
    }

    #[test]
    fn errors_are_labelled_by_code_or_kind() {
        let server = ClientError::Server {
            code: ErrorCode::RateLimited,
            message: "slow down".into(),
            retry_after_ms: 0,
        };
        assert_eq!(error_label(&server), "rate_limited");
        assert_eq!(error_label(&ClientError::Timeout), "timeout");
        let refused = ClientError::Connect {
            status: Some(401),
            reason: "expired".into(),
        };
        assert_eq!(error_label(&refused), "connect_http_401");
        let counts = ErrorCounts::default();
        counts.add("timeout");
        counts.add("timeout");
        assert_eq!(counts.snapshot().get("timeout"), Some(&2));
    }
}
