//! Forwarding to `cargo lambda watch`: the runner posts each invocation to the Invoke API at
//! `/2015-03-31/functions/{name}/invocations` and reads `X-Amz-Function-Error` as Lambda's Invoke
//! API reports a function error. A stand-in server plays `cargo lambda watch` here.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use shardwise_local::function::{InvokeOutcome, WatchForwarder};

async fn answer(
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = request.uri().path().to_owned();
    let body = request.into_body().collect().await?.to_bytes();
    assert_eq!(path, "/2015-03-31/functions/fraud/invocations");
    if body.as_ref() == b"{\"fail\":true}" {
        let mut response = Response::new(Full::new(Bytes::from_static(
            br#"{"errorType":"TestError","errorMessage":"told to fail"}"#,
        )));
        response
            .headers_mut()
            .insert("x-amz-function-error", "Unhandled".parse().unwrap());
        return Ok(response);
    }
    Ok(Response::new(Full::new(Bytes::from_static(
        br#"{"batchItemFailures":[]}"#,
    ))))
}

#[tokio::test]
async fn invocations_are_forwarded_to_the_invoke_api() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(async move {
        for _ in 0..2 {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(
                http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(answer)),
            );
        }
    });
    let forwarder = WatchForwarder::new("fraud", &address, Duration::from_secs(5));
    assert_eq!(
        forwarder.invoke(b"{}".to_vec()).await,
        InvokeOutcome::Response(br#"{"batchItemFailures":[]}"#.to_vec())
    );
    assert_eq!(
        forwarder.invoke(b"{\"fail\":true}".to_vec()).await,
        InvokeOutcome::FunctionError {
            error_type: "TestError".to_owned(),
            message: "told to fail".to_owned()
        }
    );
    server.abort();
}
