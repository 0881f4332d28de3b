//! The one table the comparison bench prints: a row per proxy and size,
//! with the same columns whatever was measured (a cell that could not be
//! measured says why instead of leaving a gap), and the pure arithmetic
//! behind its cells.

use std::fmt::Write as _;
use std::time::Duration;

/// The columns, in order. Later issues add rows, never columns in between,
/// so tables of different runs line up.
pub const COLUMNS: [&str; 12] = [
    "services",
    "proxy",
    "cold start",
    "programming p50",
    "p90",
    "p99",
    "own sync metric (mean, syncs)",
    "first svc p50 / p99",
    "last svc p50 / p99",
    "CPU",
    "peak RSS",
    "API bytes",
];

/// One cell's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cell {
    Value(String),
    /// The row's time budget ran out before this was measured, or the proxy
    /// never finished its cold start.
    Timeout,
    /// Nothing to report (e.g. the proxy exposes no such metric).
    Missing,
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cell::Value(text) => f.write_str(text),
            Cell::Timeout => f.write_str("timeout"),
            Cell::Missing => f.write_str("–"),
        }
    }
}

/// One proxy at one size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub services: usize,
    pub proxy: String,
    pub cold_start: Cell,
    pub programming: [Cell; 3],
    pub own_sync: Cell,
    pub first_service: Cell,
    pub last_service: Cell,
    pub cpu: Cell,
    pub peak_rss: Cell,
    pub api_bytes: Cell,
}

impl Row {
    /// A row whose every measurement is `cell` (e.g. all timed out).
    pub fn filled(services: usize, proxy: &str, cell: Cell) -> Row {
        Row {
            services,
            proxy: proxy.to_owned(),
            cold_start: cell.clone(),
            programming: [cell.clone(), cell.clone(), cell.clone()],
            own_sync: cell.clone(),
            first_service: cell.clone(),
            last_service: cell.clone(),
            cpu: cell.clone(),
            peak_rss: cell.clone(),
            api_bytes: cell,
        }
    }

    fn cells(&self) -> Vec<String> {
        let mut cells = vec![self.services.to_string(), self.proxy.clone()];
        cells.push(self.cold_start.to_string());
        cells.extend(self.programming.iter().map(Cell::to_string));
        for cell in [
            &self.own_sync,
            &self.first_service,
            &self.last_service,
            &self.cpu,
            &self.peak_rss,
            &self.api_bytes,
        ] {
            cells.push(cell.to_string());
        }
        cells
    }
}

/// The table as Markdown: a header, the alignment line (numbers right), and
/// one line per row.
pub fn render(rows: &[Row]) -> String {
    let mut out = format!("| {} |\n", COLUMNS.join(" | "));
    out.push_str("|---:|---|");
    out.push_str(&"---:|".repeat(COLUMNS.len() - 2));
    out.push('\n');
    for row in rows {
        let _ = writeln!(out, "| {} |", row.cells().join(" | "));
    }
    out
}

/// The nearest-rank percentile `p` (0–100) of `samples`, which need not be
/// sorted; None when there are none.
pub fn percentile(samples: &[Duration], p: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// A duration as milliseconds: one decimal below 10 ms, none above.
pub fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// A longer duration: milliseconds below 10 s, seconds above.
pub fn elapsed(d: Duration) -> String {
    if d < Duration::from_secs(10) {
        ms(d)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// `p50 / p99` of connect times in microseconds, or Missing without samples.
pub fn p50_p99_us(samples: &[Duration]) -> Cell {
    match (percentile(samples, 50.0), percentile(samples, 99.0)) {
        (Some(p50), Some(p99)) => {
            Cell::Value(format!("{} µs / {} µs", p50.as_micros(), p99.as_micros()))
        }
        _ => Cell::Missing,
    }
}

/// The p50, p90 and p99 cells of `samples` (Missing without samples).
pub fn p50_p90_p99(samples: &[Duration]) -> [Cell; 3] {
    [50.0, 90.0, 99.0].map(|p| percentile(samples, p).map_or(Cell::Missing, |d| Cell::Value(ms(d))))
}

/// A byte count in KiB below 10 MiB, MiB above.
pub fn bytes(n: u64) -> String {
    let kib = n as f64 / 1024.0;
    if kib < 10.0 * 1024.0 {
        format!("{kib:.0} KiB")
    } else {
        format!("{:.1} MiB", kib / 1024.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|&v| Duration::from_millis(v)).collect()
    }

    #[test]
    fn percentiles_are_nearest_rank_of_unsorted_samples() {
        let samples = millis(&[50, 10, 40, 20, 30, 100, 90, 80, 70, 60]);
        assert_eq!(percentile(&samples, 50.0), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&samples, 90.0), Some(Duration::from_millis(90)));
        assert_eq!(percentile(&samples, 99.0), Some(Duration::from_millis(100)));
        assert_eq!(percentile(&samples, 0.0), Some(Duration::from_millis(10)));
        assert_eq!(
            percentile(&millis(&[7]), 99.0),
            Some(Duration::from_millis(7))
        );
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn every_row_has_every_column_and_says_why_a_cell_is_empty() {
        let mut row = Row::filled(1000, "planproxy nftables", Cell::Missing);
        row.cold_start = Cell::Value(elapsed(Duration::from_millis(321)));
        row.programming = p50_p90_p99(&millis(&[5, 15, 25]));
        row.api_bytes = Cell::Value(bytes(3 * 1024 * 1024));
        let timed_out = Row::filled(10_000, "kube-proxy iptables", Cell::Timeout);
        let table = render(&[row, timed_out]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        for line in &lines {
            assert_eq!(line.matches('|').count(), COLUMNS.len() + 1, "{line}");
        }
        assert_eq!(
            lines[2],
            "| 1000 | planproxy nftables | 321 ms | 15 ms | 25 ms | 25 ms | – | – | – | – | – | 3072 KiB |"
        );
        assert!(lines[3].starts_with("| 10000 | kube-proxy iptables | timeout | timeout |"));
    }

    #[test]
    fn units_switch_where_the_digits_would_mislead() {
        assert_eq!(ms(Duration::from_micros(9_640)), "9.6 ms");
        assert_eq!(ms(Duration::from_micros(964_400)), "964 ms");
        assert_eq!(elapsed(Duration::from_millis(94_000)), "94.0 s");
        assert_eq!(bytes(20 * 1024 * 1024), "20.0 MiB");
        assert_eq!(
            p50_p99_us(&[Duration::from_micros(110), Duration::from_micros(300)]),
            Cell::Value("110 µs / 300 µs".into())
        );
    }
}
