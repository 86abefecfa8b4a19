//! How the CLI and the status page show sizes, rates and times, so both
//! say the same thing the same way.

/// `b` bytes in binary units: "512 B", "1.5 MiB".
pub fn human(b: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// A byte-rate limit: "none" for 0.
pub fn limit(bytes_per_sec: u64) -> String {
    if bytes_per_sec == 0 {
        "none".to_string()
    } else {
        format!("{}/s", human(bytes_per_sec))
    }
}

/// Seconds left: "-" when unknown (0).
pub fn eta(secs: u64) -> String {
    if secs > 0 {
        format!("{secs}s")
    } else {
        "-".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_rates_and_times() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 19), "1.5 MiB");
        assert_eq!(limit(0), "none");
        assert_eq!(limit(100 << 20), "100.0 MiB/s");
        assert_eq!(eta(0), "-");
        assert_eq!(eta(42), "42s");
    }
}
