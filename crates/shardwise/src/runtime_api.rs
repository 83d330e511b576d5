//! Our own client of the Lambda Runtime API, so that an event body goes from the socket to the
//! parser once and into a buffer that lives as long as the process.
//!
//! # Why not `lambda_runtime`
//! `lambda_runtime::run(service_fn(..))` hands the handler a `LambdaEvent<T>`: even with
//! `T = Box<RawValue>`, serde_json first validates the whole body and copies it into the box,
//! and only then does our own parser ([`crate::event`]) read it again. Both the collected body and
//! the box are event-sized and freed after every invocation; glibc hands allocations that large
//! back to the kernel and faults them in again next time, which measured ~2,800 page faults per
//! invocation of a 3,000-record (5.7 MB) event. `lambda_runtime` 1.5 shows the raw body
//! (`LambdaInvocation.body: Bytes`) only to tower layers *outside* its private response service,
//! and such a layer must still hand the inner service something it deserializes again: there is
//! no seam through which to skip the copy. The contract is small, so we speak it ourselves.
//!
//! # What this module does
//! [`RuntimeApiClient`] keeps **one** persistent HTTP/1.1 keep-alive connection to the Runtime API
//! and reconnects once when Lambda or the emulator closed it. Its address is what
//! `AWS_LAMBDA_RUNTIME_API` holds (the caller reads the variable, this module reads no
//! environment): `host:port` in Lambda and the local runner, but a URL with a base path from
//! `cargo lambda watch` (`http://127.0.0.1:9000/.rt/<function>`), which `lambda_runtime` also
//! accepts; the paths below then follow that base. The four calls:
//!
//! | call | request |
//! |---|---|
//! | [`next`](RuntimeApiClient::next) | `GET /2018-06-01/runtime/invocation/next`, a long poll (no timeout) |
//! | [`respond`](RuntimeApiClient::respond) | `POST /2018-06-01/runtime/invocation/{id}/response`, the result |
//! | [`fail`](RuntimeApiClient::fail) | `POST /2018-06-01/runtime/invocation/{id}/error` |
//! | [`init_error`](RuntimeApiClient::init_error) | `POST /2018-06-01/runtime/init/error` |
//!
//! `next` appends the body to the caller's `Vec<u8>` after clearing it, so its capacity is reused
//! by every invocation, reserved up front from `Content-Length`. hyper reads the socket into its
//! own read buffer (bounded, reused) and each body frame is copied once from there into that
//! vector: the only copy before the parser. The invocation's headers become
//! an [`InvocationContext`]: `Lambda-Runtime-Aws-Request-Id` and `Lambda-Runtime-Deadline-Ms`
//! are required (without them the invocation can be neither answered nor timed),
//! `Lambda-Runtime-Invoked-Function-Arn`, `Lambda-Runtime-Trace-Id`,
//! `Lambda-Runtime-Client-Context` and `Lambda-Runtime-Cognito-Identity` are carried as they come.
//! Errors go as `{"errorType": …, "errorMessage": …}` with the header
//! `Lambda-Runtime-Function-Error-Type: <errorType>`. Any answer but 2xx is
//! [`RuntimeApiError::Status`] (Lambda answers 413 to a response above its payload limit, 400,
//! 403 or 500 otherwise).
//!
//! # X-Ray
//! Lambda's other runtimes set `_X_AMZN_TRACE_ID` to the invocation's trace id before calling the
//! handler. We do not: `std::env::set_var` is `unsafe` in edition 2024 (it races with any thread
//! reading the environment) and the workspace forbids `unsafe`. The trace id is
//! [`InvocationContext::xray_trace_id`] instead; whatever needs it is handed it.
//!
//! # Loop
//! The owner of the process writes the loop: `next`, handle the body, `respond` or `fail`, again
//! (`crate::runtime::serve`). A 413 from `respond` is answered with `fail`, and so is an
//! invocation whose headers are unusable but whose request id is not
//! ([`RuntimeApiError::InvalidInvocation`]); any other error means the connection or the
//! contract is broken, and exiting lets Lambda start a fresh sandbox (it fails the invocation as
//! `Runtime.ExitError`). A call whose future is dropped
//! midway leaves hyper to close the connection; the next call opens a new one.

use std::fmt;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderMap, HeaderValue, USER_AGENT};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const NEXT_PATH: &str = "/2018-06-01/runtime/invocation/next";
const INIT_ERROR_PATH: &str = "/2018-06-01/runtime/init/error";
const INVOCATION_PREFIX: &str = "/2018-06-01/runtime/invocation/";

/// The invocation's request id; required.
pub const REQUEST_ID_HEADER: &str = "Lambda-Runtime-Aws-Request-Id";
/// The invocation's deadline in epoch milliseconds (`cargo lambda watch`: the timeout); required.
pub const DEADLINE_HEADER: &str = "Lambda-Runtime-Deadline-Ms";
pub const FUNCTION_ARN_HEADER: &str = "Lambda-Runtime-Invoked-Function-Arn";
pub const TRACE_ID_HEADER: &str = "Lambda-Runtime-Trace-Id";
pub const CLIENT_CONTEXT_HEADER: &str = "Lambda-Runtime-Client-Context";
pub const COGNITO_IDENTITY_HEADER: &str = "Lambda-Runtime-Cognito-Identity";
/// Sent with `/error` and `/init/error`: the `errorType`, which Lambda reports without parsing
/// the body.
pub const FUNCTION_ERROR_TYPE_HEADER: &str = "Lambda-Runtime-Function-Error-Type";

/// How much of a refusal's body an error keeps: Lambda's are one short JSON object.
const ERROR_BODY_LIMIT: usize = 1024;

/// What one invocation's `/next` headers say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InvocationContext {
    /// `Lambda-Runtime-Aws-Request-Id`: where the answer goes. Only URL-safe characters
    /// (letters, digits, `-._~`), so it goes into the answer's path as it is.
    pub request_id: String,
    /// `Lambda-Runtime-Deadline-Ms` as sent: epoch milliseconds from Lambda, the timeout itself
    /// from `cargo lambda watch` (see [`crate::runtime::deadline_epoch_ms`]).
    pub deadline_ms: u64,
    /// `Lambda-Runtime-Invoked-Function-Arn`; empty when absent (nothing here depends on it).
    pub invoked_function_arn: String,
    /// `Lambda-Runtime-Trace-Id`: the X-Ray trace header (not put in `_X_AMZN_TRACE_ID`, see the
    /// module docs).
    pub xray_trace_id: Option<String>,
    /// `Lambda-Runtime-Client-Context` (mobile SDK invocations).
    pub client_context: Option<String>,
    /// `Lambda-Runtime-Cognito-Identity` (mobile SDK invocations).
    pub cognito_identity: Option<String>,
}

impl InvocationContext {
    fn from_headers(headers: &HeaderMap) -> Result<Self, RuntimeApiError> {
        let text = |name: &'static str| headers.get(name).and_then(|v| v.to_str().ok());
        // Optional headers are kept even when not visible ASCII: they are passed on, not parsed.
        let lossy = |name: &'static str| {
            headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let request_id = text(REQUEST_ID_HEADER)
            .filter(|id| is_request_id(id))
            .ok_or(RuntimeApiError::InvalidHeader {
                header: REQUEST_ID_HEADER,
            })?;
        let deadline_ms = text(DEADLINE_HEADER)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| RuntimeApiError::InvalidInvocation {
                request_id: request_id.to_owned(),
                header: DEADLINE_HEADER,
            })?;
        Ok(Self {
            request_id: request_id.to_owned(),
            deadline_ms,
            invoked_function_arn: lossy(FUNCTION_ARN_HEADER).unwrap_or_default(),
            xray_trace_id: lossy(TRACE_ID_HEADER),
            client_context: lossy(CLIENT_CONTEXT_HEADER),
            cognito_identity: lossy(COGNITO_IDENTITY_HEADER),
        })
    }
}

/// A request id goes into a URL path unescaped, so only RFC 3986's unreserved characters are
/// accepted (Lambda's are UUIDs): anything else could address another path.
fn is_request_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// Why a call to the Runtime API failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeApiError {
    /// No TCP connection to the Runtime API.
    #[error("cannot connect to the Lambda Runtime API at {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    /// The HTTP/1.1 handshake on a new connection failed.
    #[error("HTTP/1.1 handshake with the Lambda Runtime API at {address}: {source}")]
    Handshake {
        address: String,
        #[source]
        source: hyper::Error,
    },
    /// The address is neither `host:port` nor an `http://host:port[/base]` URL.
    #[error("{0:?} is not a Runtime API address (host:port or http://host:port/base)")]
    InvalidAddress(String),
    /// HTTP failed on the connection: the handshake, the request, or reading the answer.
    #[error("{method} {path} on the Lambda Runtime API: {source}")]
    Http {
        method: Method,
        path: String,
        #[source]
        source: hyper::Error,
    },
    /// The Runtime API refused the call (413: the response is above Lambda's payload limit).
    #[error("{method} {path}: the Lambda Runtime API answered {status}: {body}")]
    Status {
        method: Method,
        path: String,
        status: StatusCode,
        /// The start of the answer's body, for the log.
        body: String,
    },
    /// The next invocation lacks a header the contract requires, or its value is unusable, and
    /// cannot even be answered (its request id is the header at fault).
    #[error("the next invocation has no valid {header} header")]
    InvalidHeader { header: &'static str },
    /// The next invocation (with a usable request id) lacks another header the contract
    /// requires: it can be failed, and the loop go on.
    #[error("invocation {request_id} has no valid {header} header")]
    InvalidInvocation {
        request_id: String,
        header: &'static str,
    },
    /// A request id handed to `respond` or `fail` that cannot go into a URL path as it is.
    #[error("{0:?} is not a Lambda request id (letters, digits and -._~ only)")]
    InvalidRequestId(String),
    /// An error type that cannot be sent as the `Lambda-Runtime-Function-Error-Type` header.
    #[error("error type {0:?} cannot be sent as a header value")]
    InvalidErrorType(String),
    #[error("cannot encode the error body: {0}")]
    EncodeError(#[from] serde_json::Error),
}

impl RuntimeApiError {
    /// The refusal's status, when the Runtime API answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of the Lambda Runtime API over one keep-alive HTTP/1.1 connection.
///
/// Calls take `&mut self`: the contract is one request at a time, and one connection serves it.
pub struct RuntimeApiClient {
    /// `host:port`: where to connect, and the `Host` header.
    address: String,
    host: HeaderValue,
    /// Empty in Lambda; `/.rt/<function>` under `cargo lambda watch`. No trailing slash.
    base_path: String,
    next_uri: Uri,
    init_error_uri: Uri,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl fmt::Debug for RuntimeApiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeApiClient")
            .field("address", &self.address)
            .field("connected", &self.sender.is_some())
            .finish()
    }
}

impl RuntimeApiClient {
    /// Connect to the Runtime API at `address`: what `AWS_LAMBDA_RUNTIME_API` holds, `host:port`
    /// or `http://host:port[/base]`.
    ///
    /// Connecting at once makes an unreachable API an error of the init phase, not of the first
    /// invocation.
    pub async fn connect(address: &str) -> Result<Self, RuntimeApiError> {
        let invalid = || RuntimeApiError::InvalidAddress(address.to_owned());
        let (authority, base_path) = split_address(address).ok_or_else(invalid)?;
        let host = HeaderValue::from_str(authority).map_err(|_| invalid())?;
        let uri = |path: &str| Uri::try_from(format!("{base_path}{path}")).map_err(|_| invalid());
        let mut client = Self {
            address: authority.to_owned(),
            host,
            base_path: base_path.to_owned(),
            next_uri: uri(NEXT_PATH)?,
            init_error_uri: uri(INIT_ERROR_PATH)?,
            sender: None,
        };
        client.sender = Some(client.open().await?);
        Ok(client)
    }

    /// The `host:port` this client connects to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Wait for the next invocation (no timeout: Lambda freezes the process inside this call
    /// between invocations). Its body replaces `body`'s contents, its headers are returned.
    ///
    /// The body is read into `body` even when a required header is missing, so the connection
    /// stays usable; the error names the header.
    pub async fn next(&mut self, body: &mut Vec<u8>) -> Result<InvocationContext, RuntimeApiError> {
        body.clear();
        let request = self.request(Method::GET, self.next_uri.clone(), Bytes::new());
        let response = self.send(request).await?;
        let (parts, incoming) = response.into_parts();
        let path = self.next_uri.path();
        if !parts.status.is_success() {
            return Err(status_error(Method::GET, path, parts.status, incoming).await);
        }
        if let Some(length) = content_length(&parts.headers) {
            // One allocation of the right size the first time, none afterwards. Should the
            // reservation fail, the body still arrives and the vector grows as it does.
            let _ = body.try_reserve(length);
        }
        append_body(incoming, body)
            .await
            .map_err(|source| RuntimeApiError::Http {
                method: Method::GET,
                path: path.to_owned(),
                source,
            })?;
        InvocationContext::from_headers(&parts.headers)
    }

    /// Answer invocation `request_id` with `body` (the handler's JSON result).
    ///
    /// `body` is copied once into the request: hyper's connection task needs an owned body, and
    /// responses are small (a batch response names failures only).
    pub async fn respond(&mut self, request_id: &str, body: &[u8]) -> Result<(), RuntimeApiError> {
        let uri = self.invocation_uri(request_id, "response")?;
        let request = self.request(Method::POST, uri, Bytes::copy_from_slice(body));
        self.post(request).await
    }

    /// Fail invocation `request_id`: Lambda reports `error_type` as the invocation's
    /// `FunctionError` (and the event source mapping retries or bisects the batch).
    pub async fn fail(
        &mut self,
        request_id: &str,
        error_type: &str,
        error_message: &str,
    ) -> Result<(), RuntimeApiError> {
        let uri = self.invocation_uri(request_id, "error")?;
        self.post_error(uri, error_type, error_message).await
    }

    /// Report that the function could not start; Lambda then fails the pending invocation with
    /// this error and starts a fresh sandbox, so the process should exit afterwards.
    pub async fn init_error(
        &mut self,
        error_type: &str,
        error_message: &str,
    ) -> Result<(), RuntimeApiError> {
        self.post_error(self.init_error_uri.clone(), error_type, error_message)
            .await
    }

    async fn post_error(
        &mut self,
        uri: Uri,
        error_type: &str,
        error_message: &str,
    ) -> Result<(), RuntimeApiError> {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct ErrorBody<'a> {
            error_type: &'a str,
            error_message: &'a str,
        }
        let header = HeaderValue::from_str(error_type)
            .map_err(|_| RuntimeApiError::InvalidErrorType(error_type.to_owned()))?;
        let body = serde_json::to_vec(&ErrorBody {
            error_type,
            error_message,
        })?;
        let mut request = self.request(Method::POST, uri, Bytes::from(body));
        request
            .headers_mut()
            .insert(FUNCTION_ERROR_TYPE_HEADER, header);
        self.post(request).await
    }

    fn invocation_uri(&self, request_id: &str, kind: &str) -> Result<Uri, RuntimeApiError> {
        if !is_request_id(request_id) {
            return Err(RuntimeApiError::InvalidRequestId(request_id.to_owned()));
        }
        let base = &self.base_path;
        Uri::try_from(format!("{base}{INVOCATION_PREFIX}{request_id}/{kind}"))
            .map_err(|_| RuntimeApiError::InvalidRequestId(request_id.to_owned()))
    }

    fn request(&self, method: Method, uri: Uri, body: Bytes) -> Request<Full<Bytes>> {
        let has_body = !body.is_empty();
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        // hyper's connection-level client sends what it is given: HTTP/1.1 requires `Host`.
        headers.insert(HOST, self.host.clone());
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("shardwise/", env!("CARGO_PKG_VERSION"))),
        );
        if has_body {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        request
    }

    /// Send a POST and read its (short) answer to the end, so the connection is free again.
    async fn post(&mut self, request: Request<Full<Bytes>>) -> Result<(), RuntimeApiError> {
        let path = request.uri().path().to_owned();
        let response = self.send(request).await?;
        let (parts, incoming) = response.into_parts();
        if !parts.status.is_success() {
            return Err(status_error(Method::POST, &path, parts.status, incoming).await);
        }
        let mut answer = Vec::new();
        append_body(incoming, &mut answer)
            .await
            .map_err(|source| RuntimeApiError::Http {
                method: Method::POST,
                path,
                source,
            })
    }

    /// Send on the connection, opening a new one when it was closed: before sending, or when
    /// hyper hands the request back unsent. At most one new connection per call, so a Runtime
    /// API that closes every connection is an error, not a loop.
    async fn send(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, RuntimeApiError> {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let usable = match self.sender.as_mut() {
            Some(sender) => sender.ready().await.is_ok(),
            None => false,
        };
        let (mut sender, fresh) = match self.sender.take() {
            Some(sender) if usable => (sender, false),
            _ => (self.open().await?, true),
        };
        let result = match sender.try_send_request(request).await {
            Ok(response) => Ok(response),
            Err(mut error) => match error.take_message() {
                Some(request) if !fresh => {
                    tracing::debug!(%path, "Runtime API connection closed; reconnecting");
                    sender = self.open().await?;
                    sender.send_request(request).await
                }
                _ => Err(error.into_error()),
            },
        };
        // Kept even after an error: a closed sender fails `ready` next time and is replaced.
        self.sender = Some(sender);
        result.map_err(|source| RuntimeApiError::Http {
            method,
            path,
            source,
        })
    }

    async fn open(&self) -> Result<SendRequest<Full<Bytes>>, RuntimeApiError> {
        let stream =
            TcpStream::connect(&self.address)
                .await
                .map_err(|source| RuntimeApiError::Connect {
                    address: self.address.clone(),
                    source,
                })?;
        // Requests are small and answered at once: no waiting for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let (sender, connection) =
            http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|source| RuntimeApiError::Handshake {
                    address: self.address.clone(),
                    source,
                })?;
        // The connection's I/O runs in its own task, which ends when the connection closes or
        // the sender is dropped (the client replaced or gone).
        let address = self.address.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%address, %error, "Runtime API connection ended");
            }
        });
        Ok(sender)
    }
}

/// `host:port` and the base path (empty, or starting with `/` and without a trailing one) of a
/// Runtime API address. Only plain `http://`: the Runtime API is always on the local host.
fn split_address(address: &str) -> Option<(&str, &str)> {
    let rest = match address.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some(_) => return None,
        None => address,
    };
    let (authority, base_path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, ""),
    };
    let valid = !authority.is_empty()
        && authority.bytes().all(|b| b.is_ascii_graphic())
        && !authority.contains(['@', '?', '#'])
        && !base_path.contains(['?', '#']);
    valid.then(|| (authority, base_path.trim_end_matches('/')))
}

fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Append every data frame of `incoming` to `buffer` (trailers, which Lambda does not send, are
/// ignored).
async fn append_body(mut incoming: Incoming, buffer: &mut Vec<u8>) -> Result<(), hyper::Error> {
    while let Some(frame) = incoming.frame().await {
        if let Ok(data) = frame?.into_data() {
            buffer.extend_from_slice(&data);
        }
    }
    Ok(())
}

/// The error of a refused call, with the start of the answer's body (read to the end so the
/// connection can serve the next call).
async fn status_error(
    method: Method,
    path: &str,
    status: StatusCode,
    incoming: Incoming,
) -> RuntimeApiError {
    let mut answer = Vec::new();
    let _ = append_body(incoming, &mut answer).await;
    answer.truncate(ERROR_BODY_LIMIT);
    RuntimeApiError::Status {
        method,
        path: path.to_owned(),
        status,
        body: String::from_utf8_lossy(&answer).into_owned(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use hyper::server::conn::http1 as server_http1;
    use hyper::service::service_fn;
    use tokio::net::TcpListener;

    use super::*;

    /// One request as the test server received it.
    #[derive(Debug, Clone)]
    pub(crate) struct Received {
        pub(crate) method: Method,
        pub(crate) path: String,
        pub(crate) headers: HeaderMap,
        pub(crate) body: Vec<u8>,
    }

    impl Received {
        pub(crate) fn header(&self, name: &str) -> Option<&str> {
            self.headers.get(name).and_then(|v| v.to_str().ok())
        }
    }

    /// A scripted answer: status, headers, body.
    #[derive(Debug, Clone)]
    pub(crate) struct Answer {
        pub(crate) status: u16,
        pub(crate) headers: Vec<(&'static str, String)>,
        pub(crate) body: Vec<u8>,
    }

    pub(crate) fn accepted() -> Answer {
        Answer {
            status: 202,
            headers: vec![],
            body: br#"{"status":"OK"}"#.to_vec(),
        }
    }

    pub(crate) fn invocation(id: &str, deadline: &str, body: &[u8]) -> Answer {
        Answer {
            status: 200,
            headers: vec![
                ("lambda-runtime-aws-request-id", id.to_owned()),
                ("lambda-runtime-deadline-ms", deadline.to_owned()),
                (
                    "lambda-runtime-invoked-function-arn",
                    "arn:aws:lambda:us-east-1:000000000000:function:f".to_owned(),
                ),
                (
                    "lambda-runtime-trace-id",
                    "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1".to_owned(),
                ),
                ("content-type", "application/json".to_owned()),
            ],
            body: body.to_vec(),
        }
    }

    /// A Runtime API stand-in on 127.0.0.1:0: answers requests from a script, in order, and
    /// records each request and each accepted connection.
    pub(crate) struct TestServer {
        pub(crate) address: String,
        connections: Arc<AtomicUsize>,
        received: Arc<Mutex<Vec<Received>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl TestServer {
        pub(crate) async fn start(script: Vec<Answer>, keep_alive: bool) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap().to_string();
            let connections = Arc::new(AtomicUsize::new(0));
            let received = Arc::new(Mutex::new(Vec::new()));
            let script = Arc::new(Mutex::new(VecDeque::from(script)));
            let (accepts, log) = (connections.clone(), received.clone());
            let task = tokio::spawn(async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    accepts.fetch_add(1, Ordering::SeqCst);
                    let (script, log) = (script.clone(), log.clone());
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (script, log) = (script.clone(), log.clone());
                        async move {
                            let (parts, incoming) = request.into_parts();
                            let body = incoming.collect().await?.to_bytes().to_vec();
                            log.lock().unwrap().push(Received {
                                method: parts.method,
                                path: parts.uri.path().to_owned(),
                                headers: parts.headers,
                                body,
                            });
                            let answer = script.lock().unwrap().pop_front().unwrap_or(Answer {
                                status: 410,
                                headers: vec![],
                                body: b"script exhausted".to_vec(),
                            });
                            let mut response = Response::new(Full::new(Bytes::from(answer.body)));
                            *response.status_mut() = StatusCode::from_u16(answer.status).unwrap();
                            for (name, value) in answer.headers {
                                response
                                    .headers_mut()
                                    .insert(name, HeaderValue::from_str(&value).unwrap());
                            }
                            Ok::<_, hyper::Error>(response)
                        }
                    });
                    tokio::spawn(
                        server_http1::Builder::new()
                            .keep_alive(keep_alive)
                            .serve_connection(TokioIo::new(stream), service),
                    );
                }
            });
            Self {
                address,
                connections,
                received,
                task,
            }
        }

        pub(crate) fn received(&self) -> Vec<Received> {
            self.received.lock().unwrap().clone()
        }

        fn connections(&self) -> usize {
            self.connections.load(Ordering::SeqCst)
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    #[tokio::test]
    async fn two_invocations_on_one_connection_into_one_buffer() {
        let first: Vec<u8> = (0..100_000).map(|i| b'a' + (i % 26) as u8).collect();
        let second = br#"{"Records":[]}"#;
        let server = TestServer::start(
            vec![
                invocation(
                    "8476a536-e9f4-11e8-9739-2dfe598c3fcd",
                    "1542409706888",
                    &first,
                ),
                accepted(),
                invocation(
                    "a1b2c3d4-0000-4000-8000-000000000002",
                    "1542409707000",
                    second,
                ),
                accepted(),
            ],
            true,
        )
        .await;
        let mut client = RuntimeApiClient::connect(&server.address).await.unwrap();
        let mut body = Vec::new();

        let context = client.next(&mut body).await.unwrap();
        assert_eq!(
            context,
            InvocationContext {
                request_id: "8476a536-e9f4-11e8-9739-2dfe598c3fcd".to_owned(),
                deadline_ms: 1_542_409_706_888,
                invoked_function_arn: "arn:aws:lambda:us-east-1:000000000000:function:f".to_owned(),
                xray_trace_id: Some(
                    "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1".to_owned()
                ),
                client_context: None,
                cognito_identity: None,
            }
        );
        assert_eq!(body, first);
        // Reserved once from Content-Length, not grown by doubling.
        assert_eq!(body.capacity(), first.len());
        let (capacity, address) = (body.capacity(), body.as_ptr());
        client
            .respond(&context.request_id, br#"{"batchItemFailures":[]}"#)
            .await
            .unwrap();

        let context = client.next(&mut body).await.unwrap();
        assert_eq!(context.request_id, "a1b2c3d4-0000-4000-8000-000000000002");
        assert_eq!(body, second, "a shorter second body replaces the first");
        assert_eq!(body.capacity(), capacity, "the buffer keeps its capacity");
        assert_eq!(body.as_ptr(), address, "and its allocation");
        client.respond(&context.request_id, b"{}").await.unwrap();

        assert_eq!(server.connections(), 1, "one keep-alive connection");
        let received = server.received();
        let calls: Vec<(Method, &str)> = received
            .iter()
            .map(|r| (r.method.clone(), r.path.as_str()))
            .collect();
        assert_eq!(
            calls,
            [
                (Method::GET, "/2018-06-01/runtime/invocation/next"),
                (
                    Method::POST,
                    "/2018-06-01/runtime/invocation/8476a536-e9f4-11e8-9739-2dfe598c3fcd/response"
                ),
                (Method::GET, "/2018-06-01/runtime/invocation/next"),
                (
                    Method::POST,
                    "/2018-06-01/runtime/invocation/a1b2c3d4-0000-4000-8000-000000000002/response"
                ),
            ]
        );
        assert_eq!(received[1].body, br#"{"batchItemFailures":[]}"#);
        assert_eq!(received[1].header("content-type"), Some("application/json"));
        assert_eq!(received[0].header("host"), Some(server.address.as_str()));
        assert!(
            received[0]
                .header("user-agent")
                .is_some_and(|a| a.starts_with("shardwise/"))
        );
        assert!(received[0].body.is_empty());
    }

    #[tokio::test]
    async fn errors_carry_the_type_header_and_the_json_body() {
        let server = TestServer::start(vec![accepted(), accepted()], true).await;
        let mut client = RuntimeApiClient::connect(&server.address).await.unwrap();
        client
            .fail(
                "req-1",
                "MalformedEvent",
                "expected `\"Records\"` at line 1",
            )
            .await
            .unwrap();
        client
            .init_error("Runtime.InitError", "SHARDWISE_TABLE is not set")
            .await
            .unwrap();

        let received = server.received();
        assert_eq!(received[0].method, Method::POST);
        assert_eq!(
            received[0].path,
            "/2018-06-01/runtime/invocation/req-1/error"
        );
        assert_eq!(
            received[0].header("lambda-runtime-function-error-type"),
            Some("MalformedEvent")
        );
        assert_eq!(received[0].header("content-type"), Some("application/json"));
        let body: serde_json::Value = serde_json::from_slice(&received[0].body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "errorType": "MalformedEvent",
                "errorMessage": "expected `\"Records\"` at line 1",
            })
        );
        assert_eq!(received[1].method, Method::POST);
        assert_eq!(received[1].path, "/2018-06-01/runtime/init/error");
        assert_eq!(
            received[1].header("lambda-runtime-function-error-type"),
            Some("Runtime.InitError")
        );
        let body: serde_json::Value = serde_json::from_slice(&received[1].body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "errorType": "Runtime.InitError",
                "errorMessage": "SHARDWISE_TABLE is not set",
            })
        );
        assert_eq!(server.connections(), 1);
    }

    #[tokio::test]
    async fn a_missing_or_invalid_header_is_named() {
        let mut no_id = invocation("x", "1542409706888", b"{}");
        no_id.headers.remove(0);
        let server = TestServer::start(
            vec![
                no_id,
                invocation("req-1", "soon", b"{}"),
                invocation("../../init/error", "1542409706888", b"{}"),
                invocation("req-3", "1542409706888", br#"{"ok":1}"#),
            ],
            true,
        )
        .await;
        let mut client = RuntimeApiClient::connect(&server.address).await.unwrap();
        let mut body = Vec::new();
        let error = client.next(&mut body).await.unwrap_err();
        assert!(
            matches!(error, RuntimeApiError::InvalidHeader { header } if header == REQUEST_ID_HEADER),
            "{error:?}"
        );
        assert!(error.to_string().contains("Lambda-Runtime-Aws-Request-Id"));
        let error = client.next(&mut body).await.unwrap_err();
        assert!(
            matches!(error, RuntimeApiError::InvalidInvocation { header, .. } if header == DEADLINE_HEADER),
            "{error:?}"
        );
        assert!(error.to_string().contains("Lambda-Runtime-Deadline-Ms"));
        let error = client.next(&mut body).await.unwrap_err();
        assert!(
            matches!(error, RuntimeApiError::InvalidHeader { header } if header == REQUEST_ID_HEADER),
            "a request id that would leave its path: {error:?}"
        );
        // The bodies were read: the connection still serves the next invocation.
        let context = client.next(&mut body).await.unwrap();
        assert_eq!(context.request_id, "req-3");
        assert_eq!(body, br#"{"ok":1}"#);
        assert_eq!(server.connections(), 1);

        let error = client.respond("a/b", b"{}").await.unwrap_err();
        assert!(
            matches!(error, RuntimeApiError::InvalidRequestId(_)),
            "{error:?}"
        );
        let error = client.fail("req-3", "Bad\nType", "m").await.unwrap_err();
        assert!(
            matches!(error, RuntimeApiError::InvalidErrorType(_)),
            "{error:?}"
        );
        assert_eq!(server.received().len(), 4, "refused locally, nothing sent");
    }

    #[tokio::test]
    async fn a_refusal_is_an_error_with_status_and_path() {
        let too_large = Answer {
            status: 413,
            headers: vec![],
            body: br#"{"errorMessage":"Exceeded maximum allowed payload size (6291556 bytes).","errorType":"RequestEntityTooLarge"}"#.to_vec(),
        };
        let server_error = Answer {
            status: 500,
            headers: vec![],
            body: b"{}".to_vec(),
        };
        let server = TestServer::start(vec![too_large, server_error, accepted()], true).await;
        let mut client = RuntimeApiClient::connect(&server.address).await.unwrap();

        let error = client.respond("req-1", b"{}").await.unwrap_err();
        let RuntimeApiError::Status {
            method,
            path,
            status,
            body,
        } = &error
        else {
            panic!("{error:?}");
        };
        assert_eq!(method, Method::POST);
        assert_eq!(path, "/2018-06-01/runtime/invocation/req-1/response");
        assert_eq!(*status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(body.contains("RequestEntityTooLarge"));
        assert_eq!(error.status(), Some(StatusCode::PAYLOAD_TOO_LARGE));
        assert!(error.to_string().contains("413"));

        let error = client.next(&mut Vec::new()).await.unwrap_err();
        assert!(
            matches!(&error, RuntimeApiError::Status { status, path, .. }
                if *status == StatusCode::INTERNAL_SERVER_ERROR && path == NEXT_PATH),
            "{error:?}"
        );
        // After refusals the connection still works.
        client
            .fail("req-1", "Function.ResponseTooLarge", "413")
            .await
            .unwrap();
        assert_eq!(server.connections(), 1);
    }

    #[tokio::test]
    async fn a_closed_connection_is_reopened() {
        // The server closes each connection after its answer.
        let server = TestServer::start(
            vec![invocation("req-1", "1", b"{}"), accepted(), accepted()],
            false,
        )
        .await;
        let mut client = RuntimeApiClient::connect(&server.address).await.unwrap();
        let mut body = Vec::new();
        let context = client.next(&mut body).await.unwrap();
        client.respond(&context.request_id, b"{}").await.unwrap();
        client.init_error("Runtime.InitError", "m").await.unwrap();
        assert_eq!(server.received().len(), 3);
        assert_eq!(server.connections(), 3);
    }

    #[tokio::test]
    async fn an_unreachable_api_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        drop(listener);
        let error = RuntimeApiClient::connect(&address).await.unwrap_err();
        assert!(
            matches!(&error, RuntimeApiError::Connect { address: a, .. } if *a == address),
            "{error:?}"
        );
        for invalid in ["", "https://127.0.0.1:9001", "http:///path", "a b:1"] {
            let error = RuntimeApiClient::connect(invalid).await.unwrap_err();
            assert!(
                matches!(error, RuntimeApiError::InvalidAddress(_)),
                "{invalid}: {error:?}"
            );
        }
    }

    #[test]
    fn addresses_of_lambda_and_cargo_lambda() {
        assert_eq!(
            split_address("127.0.0.1:9001"),
            Some(("127.0.0.1:9001", ""))
        );
        assert_eq!(
            split_address("http://127.0.0.1:9000/.rt/fraud"),
            Some(("127.0.0.1:9000", "/.rt/fraud"))
        );
        assert_eq!(
            split_address("HTTP://localhost:9000/"),
            Some(("localhost:9000", ""))
        );
        assert_eq!(split_address("https://127.0.0.1:9000"), None);
    }

    #[tokio::test]
    async fn a_base_path_prefixes_every_call() {
        let server = TestServer::start(
            vec![
                invocation("req-1", "600000", b"{}"),
                accepted(),
                accepted(),
                accepted(),
            ],
            true,
        )
        .await;
        let address = format!("http://{}/.rt/echo/", server.address);
        let mut client = RuntimeApiClient::connect(&address).await.unwrap();
        assert_eq!(client.address(), server.address);
        let context = client.next(&mut Vec::new()).await.unwrap();
        assert_eq!(context.deadline_ms, 600_000);
        client.respond("req-1", b"{}").await.unwrap();
        client.fail("req-1", "E", "m").await.unwrap();
        client.init_error("E", "m").await.unwrap();
        let paths: Vec<String> = server.received().into_iter().map(|r| r.path).collect();
        assert_eq!(
            paths,
            [
                "/.rt/echo/2018-06-01/runtime/invocation/next",
                "/.rt/echo/2018-06-01/runtime/invocation/req-1/response",
                "/.rt/echo/2018-06-01/runtime/invocation/req-1/error",
                "/.rt/echo/2018-06-01/runtime/init/error",
            ]
        );
        assert_eq!(
            server.received()[0].header("host"),
            Some(server.address.as_str())
        );
    }

    /// Why an example handler refused an event.
    #[derive(Debug, thiserror::Error)]
    enum ExampleError {
        #[error("the event is not JSON: {0}")]
        NotJson(#[from] serde_json::Error),
    }

    /// The kind of loop a bootstrap runs over the client: one buffer for every event, one for
    /// every answer, an error answered as the invocation's `/error`.
    async fn example_loop(
        client: &mut RuntimeApiClient,
        handle: impl Fn(&[u8], &mut Vec<u8>) -> Result<(), ExampleError>,
    ) -> Result<(), RuntimeApiError> {
        let mut event = Vec::new();
        let mut answer = Vec::new();
        loop {
            let context = client.next(&mut event).await?;
            answer.clear();
            match handle(&event, &mut answer) {
                Ok(()) => client.respond(&context.request_id, &answer).await?,
                Err(error) => {
                    let error_type = match error {
                        ExampleError::NotJson(_) => "NotJson",
                    };
                    client
                        .fail(&context.request_id, error_type, &error.to_string())
                        .await?;
                }
            }
        }
    }

    #[tokio::test]
    async fn an_example_invocation_loop() {
        let server = TestServer::start(
            vec![
                invocation("req-1", "1", br#"{"Records":[1,2,3]}"#),
                accepted(),
                invocation("req-2", "1", b"not json"),
                accepted(),
                invocation("req-3", "1", br#"{"Records":[]}"#),
                accepted(),
                // then the script is exhausted: 410, which ends the loop
            ],
            true,
        )
        .await;
        let mut client = RuntimeApiClient::connect(&server.address).await.unwrap();
        let count = |event: &[u8], answer: &mut Vec<u8>| -> Result<(), ExampleError> {
            let value: serde_json::Value = serde_json::from_slice(event)?;
            let records = value["Records"].as_array().map_or(0, Vec::len);
            serde_json::to_writer(answer, &serde_json::json!({ "records": records }))?;
            Ok(())
        };
        let end = example_loop(&mut client, count).await.unwrap_err();
        assert_eq!(end.status(), Some(StatusCode::GONE));

        let received = server.received();
        let answers: Vec<(&str, &[u8], Option<&str>)> = received
            .iter()
            .filter(|r| r.method == Method::POST)
            .map(|r| {
                (
                    r.path.as_str(),
                    r.body.as_slice(),
                    r.header("lambda-runtime-function-error-type"),
                )
            })
            .collect();
        assert_eq!(answers.len(), 3);
        assert_eq!(
            answers[0],
            (
                "/2018-06-01/runtime/invocation/req-1/response",
                &br#"{"records":3}"#[..],
                None
            )
        );
        assert_eq!(answers[1].0, "/2018-06-01/runtime/invocation/req-2/error");
        assert_eq!(answers[1].2, Some("NotJson"));
        assert_eq!(
            answers[2],
            (
                "/2018-06-01/runtime/invocation/req-3/response",
                &br#"{"records":0}"#[..],
                None
            )
        );
        assert_eq!(server.connections(), 1);
    }
}
