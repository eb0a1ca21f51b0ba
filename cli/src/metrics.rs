//! The Prometheus text endpoint of `pub` and `sub`.

use std::net::SocketAddr;

use anyhow::Result;

/// Serves `render()` as a Prometheus text endpoint (any path) until the process ends.
pub fn serve_metrics(
    address: SocketAddr,
    render: impl Fn() -> String + Send + 'static,
) -> Result<()> {
    let server = tiny_http::Server::http(address)
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {address}: {e}"))?;
    eprintln!("metrics on http://{address}/metrics");
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let content_type = tiny_http::Header::from_bytes(
                &b"Content-Type"[..],
                &b"text/plain; version=0.0.4"[..],
            )
            .ok();
            for request in server.incoming_requests() {
                let mut response = tiny_http::Response::from_string(render());
                if let Some(header) = content_type.clone() {
                    response.add_header(header);
                }
                // A scraper that went away gets nothing; the next scrape is answered.
                let _ = request.respond(response);
            }
        })?;
    Ok(())
}

/// Prometheus text lines for counters: `(name, help, value)`, all with `labels`.
pub fn prometheus(labels: &str, counters: &[(&str, &str, u64)]) -> String {
    let mut out = String::new();
    for (name, help, value) in counters {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {value}\n"
        ));
    }
    out
}
