//! The Prometheus text endpoint of `pub` and `sub`.

use std::net::SocketAddr;

use anyhow::Result;

/// Serves `render()` as a Prometheus text endpoint (any path, GET) until the process ends.
pub fn serve_metrics(
    address: SocketAddr,
    render: impl Fn() -> String + Send + Sync + 'static,
) -> Result<()> {
    let listener = std::net::TcpListener::bind(address)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {address}: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let render = std::sync::Arc::new(render);
    let app = axum::Router::new().fallback(axum::routing::get(move || {
        let render = std::sync::Arc::clone(&render);
        async move {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4",
                )],
                render(),
            )
        }
    }));
    eprintln!("metrics on http://{address}/metrics");
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => {
                        if let Err(error) = axum::serve(listener, app).await {
                            eprintln!("metrics endpoint stopped: {error}");
                        }
                    }
                    Err(error) => eprintln!("metrics endpoint stopped: {error}"),
                }
            });
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
