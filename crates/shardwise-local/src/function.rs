//! Running the real function binaries: the runner serves the Lambda Runtime API and starts one
//! process per function instance, as Lambda starts one sandbox per concurrent invocation.
//!
//! Each instance gets its own loopback port, so the runner always knows which process holds an
//! invocation: when a process exits mid-invocation (a crash, `std::process::exit`, an OOM kill)
//! that invocation fails as `Runtime.ExitError` and the instance is started again — Lambda's
//! behaviour. When an invocation outlives its deadline the process is killed (Lambda stops the
//! sandbox at the timeout) and the invocation fails as `Sandbox.Timedout`.
//!
//! Alternatively, [`Invoker::Watch`] forwards invocations to a running `cargo lambda watch`
//! (its Invoke API emulation), for a rebuild-on-save loop.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;

/// What the runner needs to start a function.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    pub name: String,
    pub binary: PathBuf,
    /// Extra environment (the template's variables, the local backends).
    pub env: Vec<(String, String)>,
    pub memory_mb: u32,
    pub timeout: Duration,
    /// Where the processes' stdout and stderr go (appended); `None` discards them.
    pub log_file: Option<PathBuf>,
    /// Where each process is recorded so that the next runner can stop it if this one dies
    /// ([`crate::sandbox`]); `None` records nothing.
    pub sandbox_dir: Option<PathBuf>,
}

/// How one invocation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvokeOutcome {
    /// `/response`: the function's result payload.
    Response(Vec<u8>),
    /// `/error` (or an Invoke API answer flagged `X-Amz-Function-Error`).
    FunctionError { error_type: String, message: String },
    /// No answer before the deadline; the instance was stopped.
    Timeout,
    /// The process exited during the invocation (or could not be started).
    Crashed(String),
}

impl InvokeOutcome {
    /// Lambda's `errorType` for failures (what the on-failure record's `functionError` says).
    pub fn error_type(&self) -> Option<&str> {
        match self {
            Self::Response(_) => None,
            Self::FunctionError { error_type, .. } => Some(error_type),
            Self::Timeout => Some("Sandbox.Timedout"),
            Self::Crashed(_) => Some("Runtime.ExitError"),
        }
    }
}

struct Invocation {
    request_id: String,
    deadline_ms: i64,
    body: Bytes,
    reply: oneshot::Sender<InvokeOutcome>,
}

/// State shared by one instance's Runtime API server and the pool.
struct InstanceApi {
    function_arn: String,
    queue: Mutex<mpsc::Receiver<Invocation>>,
    inflight: std::sync::Mutex<HashMap<String, oneshot::Sender<InvokeOutcome>>>,
    init_errors: AtomicU64,
    process: std::sync::Mutex<ProcessStart>,
}

/// The current process of an instance: its pid, when it was spawned, when it first asked for an
/// invocation. Only read by [`ProcessPool::process`] (benchmarks read `/proc/<pid>` counters and
/// the start-up time); the pool itself never needs it.
#[derive(Debug, Default)]
struct ProcessStart {
    pid: Option<u32>,
    spawned: Option<std::time::Instant>,
    first_next: Option<std::time::Instant>,
}

/// What [`ProcessPool::process`] tells about an instance's current process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceProcess {
    pub pid: u32,
    /// From just before `spawn` to the process's first `GET /invocation/next` reaching the
    /// server: exec, the function's init (config, clients) and its first connection. `None`
    /// until it asks.
    pub start_to_first_next: Option<Duration>,
}

impl std::fmt::Debug for InstanceApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceApi")
            .field("function_arn", &self.function_arn)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response
}

fn trace_id() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "Root=1-{secs:08x}-{:024x};Parent={:016x};Sampled=0",
        rand::random::<u128>() >> 32,
        rand::random::<u64>()
    )
}

/// A request id in Lambda's format (a random UUID v4).
pub fn request_id() -> String {
    let n: u128 = rand::random();
    let n = (n & !(0xf000u128 << 64)) | (0x4000u128 << 64);
    let n = (n & !(0xc000u128 << 48)) | (0x8000u128 << 48);
    let hex = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

async fn serve(
    api: Arc<InstanceApi>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = request.uri().path().to_owned();
    let Some(rest) = path.strip_prefix("/2018-06-01/runtime/") else {
        return Ok(text(StatusCode::NOT_FOUND, "unknown path"));
    };
    if rest == "invocation/next" {
        {
            let mut process = lock(&api.process);
            if process.first_next.is_none() {
                process.first_next = Some(std::time::Instant::now());
            }
        }
        // Long poll, as Lambda's: the process waits here between invocations.
        let next = api.queue.lock().await.recv().await;
        let Some(invocation) = next else {
            return Ok(text(StatusCode::GONE, "runner stopping"));
        };
        lock(&api.inflight).insert(invocation.request_id.clone(), invocation.reply);
        let mut response = Response::new(Full::new(invocation.body));
        let headers = response.headers_mut();
        let pairs = [
            ("lambda-runtime-aws-request-id", invocation.request_id),
            (
                "lambda-runtime-deadline-ms",
                invocation.deadline_ms.to_string(),
            ),
            (
                "lambda-runtime-invoked-function-arn",
                api.function_arn.clone(),
            ),
            ("lambda-runtime-trace-id", trace_id()),
            ("content-type", "application/json".to_owned()),
        ];
        for (name, value) in pairs {
            if let Ok(value) = hyper::header::HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
        return Ok(response);
    }
    if rest == "init/error" {
        api.init_errors.fetch_add(1, Ordering::Relaxed);
        return Ok(text(StatusCode::ACCEPTED, "{\"status\":\"OK\"}"));
    }
    let Some(rest) = rest.strip_prefix("invocation/") else {
        return Ok(text(StatusCode::NOT_FOUND, "unknown path"));
    };
    let Some((id, kind)) = rest.split_once('/') else {
        return Ok(text(StatusCode::NOT_FOUND, "unknown path"));
    };
    let (id, kind) = (id.to_owned(), kind.to_owned());
    let error_type_header = request
        .headers()
        .get("lambda-runtime-function-error-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = request.into_body().collect().await?.to_bytes();
    let Some(reply) = lock(&api.inflight).remove(&id) else {
        return Ok(text(
            StatusCode::BAD_REQUEST,
            "{\"errorType\":\"InvalidRequestID\",\"errorMessage\":\"unknown or finished request id\"}",
        ));
    };
    let outcome = match kind.as_str() {
        "response" => InvokeOutcome::Response(body.to_vec()),
        "error" => {
            let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            InvokeOutcome::FunctionError {
                error_type: parsed
                    .get("errorType")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
                    .or(error_type_header)
                    .unwrap_or_else(|| "Unhandled".to_owned()),
                message: parsed
                    .get("errorMessage")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned(),
            }
        }
        _ => return Ok(text(StatusCode::NOT_FOUND, "unknown path")),
    };
    let _ = reply.send(outcome);
    Ok(text(StatusCode::ACCEPTED, "{\"status\":\"OK\"}"))
}

/// One instance: a port, its server, its process (restarted when it exits).
#[derive(Debug)]
struct Instance {
    sender: mpsc::Sender<Invocation>,
    api: Arc<InstanceApi>,
    /// Tells the supervisor to kill the current process (after a timeout).
    kill: mpsc::Sender<()>,
    tasks: Vec<JoinHandle<()>>,
}

/// A fixed set of instances of one function.
#[derive(Debug)]
pub struct ProcessPool {
    spec: FunctionSpec,
    instances: Vec<Instance>,
    idle_tx: mpsc::UnboundedSender<usize>,
    idle_rx: Mutex<mpsc::UnboundedReceiver<usize>>,
    starts: Arc<AtomicU64>,
}

/// Errors starting a pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{0}: cannot bind a loopback port: {1}")]
    Bind(String, std::io::Error),
    #[error("function binary {0} does not exist (build it first)")]
    MissingBinary(String),
}

impl ProcessPool {
    /// Start `instances` processes of `spec`, each against its own Runtime API port.
    pub async fn start(spec: FunctionSpec, instances: usize) -> Result<Self, PoolError> {
        if !spec.binary.exists() {
            return Err(PoolError::MissingBinary(spec.binary.display().to_string()));
        }
        let (idle_tx, idle_rx) = mpsc::unbounded_channel();
        let starts = Arc::new(AtomicU64::new(0));
        let mut list = Vec::with_capacity(instances);
        for index in 0..instances.max(1) {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|e| PoolError::Bind(spec.name.clone(), e))?;
            let port = listener
                .local_addr()
                .map_err(|e| PoolError::Bind(spec.name.clone(), e))?
                .port();
            let (sender, receiver) = mpsc::channel(1);
            let api = Arc::new(InstanceApi {
                function_arn: format!(
                    "arn:aws:lambda:us-east-1:000000000000:function:{}",
                    spec.name
                ),
                queue: Mutex::new(receiver),
                inflight: std::sync::Mutex::new(HashMap::new()),
                init_errors: AtomicU64::new(0),
                process: std::sync::Mutex::new(ProcessStart::default()),
            });
            let server_api = api.clone();
            let server = tokio::spawn(async move {
                // Bounded by the pool's life: the task is aborted when the pool is dropped.
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let api = server_api.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req| serve(api.clone(), req));
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            let (kill_tx, kill_rx) = mpsc::channel(4);
            let supervisor = tokio::spawn(supervise(
                spec.clone(),
                index,
                port,
                api.clone(),
                kill_rx,
                starts.clone(),
            ));
            list.push(Instance {
                sender,
                api,
                kill: kill_tx,
                tasks: vec![server, supervisor],
            });
            let _ = idle_tx.send(index);
        }
        Ok(Self {
            spec,
            instances: list,
            idle_tx,
            idle_rx: Mutex::new(idle_rx),
            starts,
        })
    }

    pub fn spec(&self) -> &FunctionSpec {
        &self.spec
    }

    /// Process starts so far (initial starts plus restarts).
    pub fn starts(&self) -> u64 {
        self.starts.load(Ordering::Relaxed)
    }

    /// The current process of instance `index` (`0..instances`); `None` before it is spawned.
    pub fn process(&self, index: usize) -> Option<InstanceProcess> {
        let process = lock(&self.instances.get(index)?.api.process);
        Some(InstanceProcess {
            pid: process.pid?,
            start_to_first_next: process
                .spawned
                .zip(process.first_next)
                .map(|(spawned, first)| first.saturating_duration_since(spawned)),
        })
    }

    pub fn init_errors(&self) -> u64 {
        self.instances
            .iter()
            .map(|i| i.api.init_errors.load(Ordering::Relaxed))
            .sum()
    }

    /// Invoke the function with `payload` on the next free instance.
    pub async fn invoke(&self, payload: Vec<u8>) -> InvokeOutcome {
        let index = {
            let mut idle = self.idle_rx.lock().await;
            match idle.recv().await {
                Some(index) => index,
                None => return InvokeOutcome::Crashed("pool closed".to_owned()),
            }
        };
        let outcome = self.invoke_on(index, payload).await;
        let _ = self.idle_tx.send(index);
        outcome
    }

    async fn invoke_on(&self, index: usize, payload: Vec<u8>) -> InvokeOutcome {
        let Some(instance) = self.instances.get(index) else {
            return InvokeOutcome::Crashed("no instance".to_owned());
        };
        let request_id = request_id();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let timeout_ms = i64::try_from(self.spec.timeout.as_millis()).unwrap_or(i64::MAX);
        let (reply, answer) = oneshot::channel();
        let invocation = Invocation {
            request_id: request_id.clone(),
            deadline_ms: now_ms.saturating_add(timeout_ms),
            body: Bytes::from(payload),
            reply,
        };
        if instance.sender.send(invocation).await.is_err() {
            return InvokeOutcome::Crashed("instance stopped".to_owned());
        }
        // The clock starts when the invocation is queued; a process that is still starting up
        // spends its init time inside the deadline, as a cold start does (Lambda gives init its
        // own 10 s, which we fold into the first invoke's timeout).
        match tokio::time::timeout(self.spec.timeout + Duration::from_millis(200), answer).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => InvokeOutcome::Crashed("the process exited during the invocation".into()),
            Err(_) => {
                lock(&instance.api.inflight).remove(&request_id);
                let _ = instance.kill.send(()).await;
                InvokeOutcome::Timeout
            }
        }
    }
}

impl Drop for ProcessPool {
    fn drop(&mut self) {
        for instance in &self.instances {
            for task in &instance.tasks {
                task.abort();
            }
        }
    }
}

/// Keep one process of an instance running: start it, wait for it to exit (or a kill request),
/// fail its in-flight invocation, start it again after a short pause. Bounded: the task is
/// aborted with the pool, and restarts are spaced out.
async fn supervise(
    spec: FunctionSpec,
    index: usize,
    port: u16,
    api: Arc<InstanceApi>,
    mut kill: mpsc::Receiver<()>,
    starts: Arc<AtomicU64>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut command = tokio::process::Command::new(&spec.binary);
        command
            .env("AWS_LAMBDA_RUNTIME_API", format!("127.0.0.1:{port}"))
            .env("AWS_LAMBDA_FUNCTION_NAME", &spec.name)
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env(
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                spec.memory_mb.to_string(),
            )
            .env(
                "AWS_LAMBDA_LOG_GROUP_NAME",
                format!("/aws/lambda/{}", spec.name),
            )
            .env(
                "AWS_LAMBDA_LOG_STREAM_NAME",
                format!("local/[$LATEST]instance-{index}"),
            )
            .env("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand")
            .env("_HANDLER", "bootstrap")
            .env("AWS_EXECUTION_ENV", "AWS_Lambda_provided.al2023")
            .kill_on_drop(true)
            .stdin(std::process::Stdio::null());
        if std::env::var_os("AWS_REGION").is_none() {
            command.env("AWS_REGION", "us-east-1");
        }
        for (key, value) in &spec.env {
            command.env(key, value);
        }
        match log_stdio(spec.log_file.as_ref()) {
            Some((out, err)) => {
                command.stdout(out).stderr(err);
            }
            None => {
                command
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null());
            }
        }
        starts.fetch_add(1, Ordering::Relaxed);
        let started = tokio::time::Instant::now();
        let sandbox = spec
            .sandbox_dir
            .as_deref()
            .map(|dir| crate::sandbox::SandboxFile::new(dir, &spec.name, index));
        // Reset before spawning, so the new process's first `/next` cannot be lost to the reset.
        *lock(&api.process) = ProcessStart {
            pid: None,
            spawned: Some(std::time::Instant::now()),
            first_next: None,
        };
        let spawn = command.spawn();
        lock(&api.process).pid = spawn.as_ref().ok().and_then(tokio::process::Child::id);
        match spawn {
            Ok(mut child) => {
                if let (Some(sandbox), Some(pid)) = (&sandbox, child.id()) {
                    sandbox.record(pid);
                }
                tokio::select! {
                    _ = child.wait() => {}
                    _ = kill.recv() => {
                        let _ = child.kill().await;
                    }
                }
                if let Some(sandbox) = &sandbox {
                    sandbox.clear();
                }
            }
            Err(error) => {
                tracing::error!(function = %spec.name, %error, "cannot start the function process");
            }
        }
        // Whatever this process held is lost: fail it so the mapping retries.
        let lost: Vec<_> = lock(&api.inflight).drain().collect();
        for (_, reply) in lost {
            let _ = reply.send(InvokeOutcome::Crashed(
                "the function process exited during the invocation".to_owned(),
            ));
        }
        // A process that dies at once (bad configuration) is restarted ever more slowly.
        if started.elapsed() > Duration::from_secs(2) {
            backoff = Duration::from_millis(50);
        } else {
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        tokio::time::sleep(backoff).await;
    }
}

fn log_stdio(path: Option<&PathBuf>) -> Option<(std::process::Stdio, std::process::Stdio)> {
    let path = path?;
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .ok()?;
    let other = file.try_clone().ok()?;
    Some((file.into(), other.into()))
}

/// Forwards invocations to `cargo lambda watch`'s Invoke API emulation.
#[derive(Debug)]
pub struct WatchForwarder {
    name: String,
    address: String,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    timeout: Duration,
}

impl WatchForwarder {
    /// `address`: `127.0.0.1:9000` (where `cargo lambda watch` listens).
    pub fn new(name: &str, address: &str, timeout: Duration) -> Self {
        Self {
            name: name.to_owned(),
            address: address.to_owned(),
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build_http(),
            timeout,
        }
    }

    pub async fn invoke(&self, payload: Vec<u8>) -> InvokeOutcome {
        let uri = format!(
            "http://{}/2015-03-31/functions/{}/invocations",
            self.address, self.name
        );
        let request = match Request::post(uri)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(payload)))
        {
            Ok(request) => request,
            Err(e) => return InvokeOutcome::Crashed(e.to_string()),
        };
        let response = match tokio::time::timeout(self.timeout, self.client.request(request)).await
        {
            Err(_) => return InvokeOutcome::Timeout,
            Ok(Err(e)) => return InvokeOutcome::Crashed(format!("cargo lambda watch: {e}")),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        let function_error = response
            .headers()
            .get("x-amz-function-error")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = match response.into_body().collect().await {
            Ok(body) => body.to_bytes().to_vec(),
            Err(e) => return InvokeOutcome::Crashed(e.to_string()),
        };
        if function_error.is_some() || !status.is_success() {
            let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            return InvokeOutcome::FunctionError {
                error_type: parsed
                    .get("errorType")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
                    .or(function_error)
                    .unwrap_or_else(|| "Unhandled".to_owned()),
                message: parsed
                    .get("errorMessage")
                    .and_then(|v| v.as_str())
                    .map_or_else(
                        || String::from_utf8_lossy(&body).into_owned(),
                        str::to_owned,
                    ),
            };
        }
        InvokeOutcome::Response(body)
    }
}

/// How a function is reached.
#[derive(Debug)]
pub enum Invoker {
    Processes(ProcessPool),
    Watch(WatchForwarder),
}

impl Invoker {
    pub async fn invoke(&self, payload: Vec<u8>) -> InvokeOutcome {
        match self {
            Self::Processes(pool) => pool.invoke(payload).await,
            Self::Watch(forwarder) => forwarder.invoke(payload).await,
        }
    }

    pub fn starts(&self) -> u64 {
        match self {
            Self::Processes(pool) => pool.starts(),
            Self::Watch(_) => 0,
        }
    }

    /// Where the function's output goes (its EMF metric lines among it), when the runner
    /// started its processes.
    pub fn log_file(&self) -> Option<&std::path::Path> {
        match self {
            Self::Processes(pool) => pool.spec().log_file.as_deref(),
            Self::Watch(_) => None,
        }
    }
}
