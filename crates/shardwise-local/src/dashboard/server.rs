//! The dashboard's HTTP server (hyper, HTTP/1.1, loopback only): the page, its JSON and its
//! event stream. The page is one file compiled into the binary, and its content security
//! policy lets it load nothing from anywhere else.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame as BodyFrame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::{Dashboard, RunState};
use crate::now_ms;

const PAGE: &str = include_str!("page.html");
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; img-src data:; connect-src 'self'";
/// A comment line on an idle event stream, so proxies and browsers keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

type Body = BoxBody<Bytes, Infallible>;

#[derive(Debug, thiserror::Error)]
#[error("dashboard: cannot listen on {address}: {source}")]
pub struct BindError {
    address: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Listen on `address`, serve `dashboard` there and sample it once a second until its run
/// stops; returns the address bound (the port chosen when `address` has port 0).
pub async fn start(
    address: SocketAddr,
    dashboard: Arc<Dashboard>,
) -> Result<SocketAddr, BindError> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| BindError { address, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| BindError { address, source })?;
    let _ = dashboard.address.set(bound);
    tokio::spawn(accept(listener, dashboard.clone()));
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Bounded: ends with the run (`Dashboard::stop` takes the last sample).
        loop {
            every.tick().await;
            if dashboard.frames().borrow().state == RunState::Stopped {
                return;
            }
            dashboard.sample(now_ms());
        }
    });
    Ok(bound)
}

async fn accept(listener: TcpListener, dashboard: Arc<Dashboard>) {
    // Unbounded by design: serves until the process exits.
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "dashboard: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let dashboard = dashboard.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let dashboard = dashboard.clone();
                async move { Ok::<_, Infallible>(route(&dashboard, &request)) }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "dashboard: connection ended");
            }
        });
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).boxed());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

fn route(dashboard: &Arc<Dashboard>, request: &Request<Incoming>) -> Response<Body> {
    if request.method() != Method::GET {
        return full(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "the dashboard only answers GET\n",
        );
    }
    match request.uri().path() {
        "/" | "/index.html" => {
            let mut response = full(StatusCode::OK, "text/html; charset=utf-8", PAGE);
            response.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                header::HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            );
            response
        }
        "/api/snapshot" => full(
            StatusCode::OK,
            "application/json",
            dashboard.snapshot_json(),
        ),
        "/api/events" => events(dashboard),
        "/favicon.ico" => full(StatusCode::NO_CONTENT, "image/x-icon", Bytes::new()),
        other => full(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            format!("{other}: not here; try / (the page), /api/snapshot or /api/events\n"),
        ),
    }
}

fn event(name: &str, json: &str) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {json}\n\n"))
}

/// `snapshot` (with history) first, then each frame as it is published: `tick`, and `stopped`
/// to end the stream.
fn events(dashboard: &Arc<Dashboard>) -> Response<Body> {
    // Subscribed before the snapshot is taken: no frame falls between the two.
    let mut frames = dashboard.frames();
    frames.mark_unchanged();
    let first = event("snapshot", &dashboard.snapshot_json());
    let already_stopped = frames.borrow().state == RunState::Stopped;
    let stream = futures::stream::unfold(
        (Some(first), frames, already_stopped),
        |(first, mut frames, done)| async move {
            if let Some(first) = first {
                return Some((Ok(BodyFrame::data(first)), (None, frames, done)));
            }
            if done {
                return None;
            }
            match tokio::time::timeout(KEEP_ALIVE, frames.changed()).await {
                Ok(Ok(())) => {
                    let frame = frames.borrow_and_update().clone();
                    let stopped = frame.state == RunState::Stopped;
                    let json = serde_json::to_string(&*frame)
                        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
                    let name = if stopped { "stopped" } else { "tick" };
                    Some((
                        Ok(BodyFrame::data(event(name, &json))),
                        (None, frames, stopped),
                    ))
                }
                Ok(Err(_)) => None,
                Err(_) => Some((
                    Ok(BodyFrame::data(Bytes::from_static(b": keep-alive\n\n"))),
                    (None, frames, false),
                )),
            }
        },
    );
    let mut response = Response::new(StreamBody::new(stream).boxed());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

/// After [`Dashboard::stop`]: give open pages up to `limit` to receive the last frame before
/// the process exits (each event stream ends once it has sent it).
pub async fn flush(dashboard: &Dashboard, limit: Duration) {
    let give_up = tokio::time::Instant::now() + limit;
    while dashboard.followers() > 0 && tokio::time::Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::dashboard::FunctionFeed;
    use crate::stats::MappingStats;

    async fn get(address: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_the_page_the_json_and_the_stream_until_stopped() {
        let dashboard = Dashboard::new(None, now_ms());
        let address = start("127.0.0.1:0".parse().unwrap(), dashboard.clone())
            .await
            .unwrap();
        let page = get(address, "/").await;
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(page.contains("content-security-policy: default-src 'none'"));
        assert!(page.contains("/api/events"));
        let stats = Arc::new(MappingStats::default());
        dashboard.attach(
            vec![FunctionFeed {
                name: "fraud".into(),
                stats: stats.clone(),
                log_file: None,
            }],
            4,
            now_ms(),
        );
        MappingStats::add(&stats.records_out, 12);
        dashboard.sample(now_ms());
        let json = get(address, "/api/snapshot").await;
        assert!(json.contains("\"records_out\":12"), "{json}");
        assert!(json.contains("\"state\":\"running\""), "{json}");

        let reader = tokio::spawn(get(address, "/api/events"));
        // The stream is open once the server counts it as a follower.
        while dashboard.followers() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        MappingStats::add(&stats.records_out, 1);
        dashboard.stop(now_ms());
        flush(&dashboard, Duration::from_secs(5)).await;
        let stream = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .unwrap()
            .unwrap();
        assert!(stream.contains("text/event-stream"), "{stream}");
        let snapshot = stream.find("event: snapshot").unwrap();
        let stopped = stream.find("event: stopped").unwrap();
        assert!(snapshot < stopped);
        assert!(stream[stopped..].contains("\"records_out\":13"));
        assert!(get(address, "/nope").await.starts_with("HTTP/1.1 404"));
    }
}
