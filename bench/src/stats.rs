//! Histograms (microseconds) and their JSON summaries.

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// A histogram of microseconds, 1 µs to 1 hour, 3 significant digits.
pub(crate) fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds are valid")
}

/// A histogram as `(value, count)` pairs, for passing between processes.
pub(crate) fn hist_pairs(hist: &Histogram<u64>) -> Vec<(u64, u64)> {
    hist.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

pub(crate) fn hist_from_pairs(pairs: &[(u64, u64)]) -> Histogram<u64> {
    let mut hist = new_hist();
    for (value, count) in pairs {
        let _ = hist.record_n(*value, *count);
    }
    hist
}

/// Quantiles used for the latency-distribution plot.
const PLOT_QUANTILES: &[f64] = &[
    0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0,
];

/// Summary in milliseconds: p50/p90/p99/p999/max plus a quantile table for plots.
pub(crate) fn summary_ms(hist: &Histogram<u64>) -> Value {
    let ms = |us: u64| us as f64 / 1000.0;
    if hist.is_empty() {
        return json!({ "count": 0 });
    }
    let table: Vec<Value> = PLOT_QUANTILES
        .iter()
        .map(|q| json!([q, ms(hist.value_at_quantile(*q))]))
        .collect();
    json!({
        "count": hist.len(),
        "min": ms(hist.min()),
        "mean": hist.mean() / 1000.0,
        "p50": ms(hist.value_at_quantile(0.5)),
        "p90": ms(hist.value_at_quantile(0.9)),
        "p99": ms(hist.value_at_quantile(0.99)),
        "p999": ms(hist.value_at_quantile(0.999)),
        "max": ms(hist.max()),
        "quantiles": table,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip() {
        let mut hist = new_hist();
        for v in [1u64, 5, 5, 1000, 250_000] {
            hist.record(v).expect("in range");
        }
        let back = hist_from_pairs(&hist_pairs(&hist));
        assert_eq!(back.len(), 5);
        assert_eq!(back.value_at_quantile(0.5), hist.value_at_quantile(0.5));
        assert_eq!(back.max(), hist.max());
        let summary = summary_ms(&back);
        assert_eq!(summary["count"], 5);
    }
}
