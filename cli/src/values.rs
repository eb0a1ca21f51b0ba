//! One validation layer for the values every command takes: durations, rates, fractions,
//! speeds and groups. Each is a clap value parser, so a bad value is a usage error (exit 2) with
//! a one-line message naming what is allowed, before any command runs; values that pass cannot
//! make the command panic (a `Duration` from NaN or 1e30 seconds, a zero rate).

use std::net::SocketAddr;

/// Longest duration accepted, in seconds (ten years: longer is a typo).
const MAX_SECONDS: f64 = 315_360_000.0;

/// Seconds: finite, zero or more, at most ten years.
pub(crate) fn seconds(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !value.is_finite() || !(0.0..=MAX_SECONDS).contains(&value) {
        return Err(format!(
            "{text} seconds is out of range (0 to {MAX_SECONDS:.0})"
        ));
    }
    Ok(value)
}

/// Seconds greater than zero (periods, intervals).
pub(crate) fn positive_seconds(text: &str) -> Result<f64, String> {
    let value = seconds(text)?;
    if value < 0.001 {
        return Err(format!("{text} seconds is too short (at least 0.001)"));
    }
    Ok(value)
}

/// A fraction of datagrams or messages: 0 (none) up to, not including, 1.
pub(crate) fn fraction(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a fraction"))?;
    if !(0.0..1.0).contains(&value) {
        return Err(format!("{text} must be in [0, 1) (0.1 is 10 %)"));
    }
    Ok(value)
}

/// A rate per second: 1 or more.
pub(crate) fn rate(text: &str) -> Result<u64, String> {
    let value: u64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number per second"))?;
    if value == 0 {
        return Err("a rate of 0 never sends anything: give 1 or more per second".into());
    }
    Ok(value)
}

/// A rate that fits the snapshotter's counter: 1 to 2^32 - 1 per second.
pub(crate) fn rate_u32(text: &str) -> Result<u32, String> {
    let value = rate(text)?;
    u32::try_from(value).map_err(|_| format!("{text} per second is more than 4294967295"))
}

/// A playback speed: a finite factor from 0.000001 to 1 000 000.
pub(crate) fn speed(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a speed factor"))?;
    if !value.is_finite() || !(1e-6..=1e6).contains(&value) {
        return Err(format!(
            "speed {text} is out of range (0.000001 to 1000000)"
        ));
    }
    Ok(value)
}

/// A multicast group: `ADDRESS:PORT` (IPv6 in brackets), a multicast address, a port other
/// than 0.
pub(crate) fn group(text: &str) -> Result<SocketAddr, String> {
    let address: SocketAddr = text.trim().parse().map_err(|_| {
        format!("{text:?} is not ADDRESS:PORT (e.g. 239.255.1.1:7000 or [ff15::1]:7000)")
    })?;
    if !address.ip().is_multicast() {
        return Err(format!(
            "{} is not a multicast address (IPv4 224.0.0.0/4, IPv6 ff00::/8)",
            address.ip()
        ));
    }
    if address.port() == 0 {
        return Err(format!("{text}: a group needs a port other than 0"));
    }
    Ok(address)
}

/// A unicast address to bind or reach: `ADDRESS:PORT`, port other than 0.
pub(crate) fn endpoint(text: &str) -> Result<SocketAddr, String> {
    let address: SocketAddr = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not ADDRESS:PORT (e.g. 10.0.0.1:7190)"))?;
    if address.port() == 0 {
        return Err(format!("{text}: the port must not be 0"));
    }
    Ok(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_that_would_panic_are_refused() {
        for bad in ["nan", "inf", "-1", "1e30", "-0.5", "abc", ""] {
            assert!(seconds(bad).is_err(), "{bad}");
        }
        assert_eq!(seconds("2.5"), Ok(2.5));
        assert_eq!(seconds("0"), Ok(0.0));
        assert!(positive_seconds("0").is_err());
        // Whatever passes converts to a Duration without panicking.
        for good in ["0", "0.001", "315360000"] {
            let _ = std::time::Duration::from_secs_f64(seconds(good).unwrap());
        }
    }

    #[test]
    fn fractions_rates_and_speeds_have_ranges() {
        for bad in ["1", "2", "-0.1", "nan", "NaN"] {
            assert!(fraction(bad).is_err(), "{bad}");
        }
        assert_eq!(fraction("0.2"), Ok(0.2));
        assert!(rate("0").is_err());
        assert!(rate("-5").is_err());
        assert!(rate_u32("5000000000").is_err());
        assert_eq!(rate("20000"), Ok(20_000));
        for bad in ["1e-300", "0", "inf", "nan", "-2"] {
            assert!(speed(bad).is_err(), "{bad}");
        }
        assert_eq!(speed("2"), Ok(2.0));
    }

    #[test]
    fn groups_say_what_is_wrong() {
        assert!(group("239.255.1.1").unwrap_err().contains("ADDRESS:PORT"));
        assert!(group("10.0.0.1:7000")
            .unwrap_err()
            .contains("not a multicast"));
        assert!(group("239.255.1.1:0").unwrap_err().contains("port"));
        assert!(group("[ff15::1]:7000").is_ok());
        assert!(endpoint("10.0.0.1:0").is_err());
    }
}
