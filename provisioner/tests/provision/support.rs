//! Test support: a private moto server, a counting and fault-injecting proxy in front of
//! it, a stub of GitLab's runner API, the binary under test, and AWS clients that talk
//! to moto directly (so the checks themselves are never counted).
//!
//! Everything listens on 127.0.0.1 and lives as long as its handle.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

pub const REGION: &str = "us-east-1";
/// The AWS secret key the tool is given: it must never show up in any output.
pub const AWS_SECRET: &str = "SECRETaccessKEYthatMUSTneverBEprinted0";
/// The GitLab access token the tool is given: same rule.
pub const GITLAB_TOKEN: &str = "glpat-STUBaccessTOKENneverPRINTED";
/// An AMI moto lists (x86_64, root device /dev/xvda).
pub const AMI: &str = "ami-03c3da4cfa8e8943a";
/// moto's account.
pub const ACCOUNT: &str = "123456789012";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `moto_server`, with one fix: moto evaluates bucket policies on object requests but
/// ignores `Bool` conditions (and treats a statement whose condition does not hold as a
/// denial), so the stack's `DenyInsecureTransport` statement would refuse every object
/// request. The plain-HTTP requests to this moto stand in for the TLS ones the tool
/// makes to AWS: `aws:SecureTransport` is true, `Bool` is evaluated, and a statement
/// whose condition does not hold does not apply (as in IAM). It also loads
/// `client_vpn_model.py`: AWS Client VPN, which moto does not implement (see that file
/// for what it models and what not). And it adds IAM's `AddClientIDToOpenIDConnectProvider`
/// and `RemoveClientIDFromOpenIDConnectProvider` (an OIDC provider's audiences), which
/// moto lacks: adding one twice is a no-op, removing an absent one too, as in IAM.
const MOTO_WRAPPER: &str = r#"
import sys
import client_vpn_model
from moto.core.responses import EmptyResult
from moto.iam import access_control, policy_conditions
from moto.iam.responses import IamResponse

def add_client_id_to_open_id_connect_provider(self):
    p = self.backend.get_open_id_connect_provider(self._get_param("OpenIDConnectProviderArn"))
    client_id = self._get_param("ClientID")
    if client_id not in p.client_id_list:
        p.client_id_list.append(client_id)
    return EmptyResult()

def remove_client_id_from_open_id_connect_provider(self):
    p = self.backend.get_open_id_connect_provider(self._get_param("OpenIDConnectProviderArn"))
    client_id = self._get_param("ClientID")
    p.client_id_list = [c for c in p.client_id_list if c != client_id]
    return EmptyResult()

IamResponse.add_client_id_to_open_id_connect_provider = add_client_id_to_open_id_connect_provider
IamResponse.remove_client_id_from_open_id_connect_provider = remove_client_id_from_open_id_connect_provider

def bool_equals(expected, actual):
    wanted = expected if isinstance(expected, list) else [expected]
    return str(actual).lower() in [str(w).lower() for w in wanted]

policy_conditions.CONDITION_OPERATIONS.setdefault("Bool", bool_equals)
statement = access_control.IAMPolicyStatement
original = statement.is_action_permitted

def is_action_permitted(self, action, resource="*", principal=None, incoming_condition_values=None):
    values = {"aws:SecureTransport": "true", **(incoming_condition_values or {})}
    if self._statement.get("Condition") and not self._check_conditions(values):
        return access_control.PermissionResult.NEUTRAL
    return original(self, action, resource, principal, values)

statement.is_action_permitted = is_action_permitted
from moto.server import main
sys.exit(main())
"#;

/// A moto server on 127.0.0.1; killed on drop.
pub struct Moto {
    child: Child,
    pub url: String,
}

impl Moto {
    pub async fn start(dir: &Path) -> Moto {
        let venv = std::env::var_os("FLOTILLA_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/root/.cache/flotilla/venv"));
        let bin = venv.join("bin/moto_server");
        assert!(
            bin.exists(),
            "{} not found: install moto[server] there or set FLOTILLA_VENV",
            bin.display()
        );
        let port = free_port();
        let log = std::fs::File::create(dir.join("moto.log")).unwrap();
        let wrapper = dir.join("moto_server_tls.py");
        std::fs::write(&wrapper, MOTO_WRAPPER).unwrap();
        std::fs::write(
            dir.join("client_vpn_model.py"),
            include_str!("client_vpn_model.py"),
        )
        .unwrap();
        let child = Command::new(venv.join("bin/python3"))
            .arg(&wrapper)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start moto_server");
        let moto = Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let started = Instant::now();
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "moto did not start; see {}",
                dir.join("moto.log").display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        moto
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One AWS request as the proxy saw it.
#[derive(Debug, Clone)]
pub struct Call {
    pub op: String,
    pub write: bool,
    /// The `x-amz-expected-bucket-owner` header (S3 calls).
    pub bucket_owner: Option<String>,
    /// The request body (not kept for S3, whose bodies are objects).
    pub body: String,
}

/// How an injected fault behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request never reaches moto; the client gets an error.
    Reject,
    /// The request reaches moto (the write happens) but the client gets an error.
    LoseResponse,
    /// Like `Reject`, with this AWS error code (e.g. SSM's `InvalidInstanceId`).
    RejectWith(&'static str),
}

#[derive(Default)]
struct ProxyState {
    upstream: String,
    calls: Mutex<Vec<Call>>,
    writes: AtomicU64,
    /// Fail the write with this 1-based number (0: never).
    fail_nth_write: AtomicU64,
    /// Fail a call of this operation after letting this many through.
    fail_op: Mutex<Option<(String, u32)>>,
    fault: Mutex<Option<Fault>>,
}

/// A counting, fault-injecting HTTP proxy in front of moto: the tool's
/// `AWS_ENDPOINT_URL`. Requests are classified from the wire (query `Action`, JSON
/// `X-Amz-Target`, S3 method), independently of the tool's own counters.
pub struct Proxy {
    state: Arc<ProxyState>,
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        let state = Arc::new(ProxyState {
            upstream: upstream.to_owned(),
            ..Default::default()
        });
        let app = Router::new().fallback(proxy).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Proxy { state, url, task }
    }

    /// Calls seen since the last reset.
    pub fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap().clone()
    }

    /// S3 calls that did not name the expected bucket owner `account` (CreateBucket, a
    /// `PUT /<bucket>` without a query, has no such parameter and is left out).
    pub fn s3_calls_without_owner(&self, account: &str) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.op.starts_with("s3:"))
            .filter(|c| {
                let create = c.op.starts_with("s3:PUT /")
                    && c.op.ends_with('?')
                    && c.op[8..].trim_end_matches(['/', '?']).matches('/').count() == 0;
                !create
            })
            .filter(|c| c.bucket_owner.as_deref() != Some(account))
            .map(|c| c.op)
            .collect()
    }

    pub fn writes(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.write)
            .map(|c| c.op)
            .collect()
    }

    pub fn reset(&self) {
        self.state.calls.lock().unwrap().clear();
        self.state.writes.store(0, Ordering::SeqCst);
        self.state.fail_nth_write.store(0, Ordering::SeqCst);
        *self.state.fail_op.lock().unwrap() = None;
        *self.state.fault.lock().unwrap() = None;
    }

    /// Makes the `n`th write (1-based) from now fail.
    pub fn fail_nth_write(&self, n: u64, fault: Fault) {
        self.reset();
        self.state.fail_nth_write.store(n, Ordering::SeqCst);
        *self.state.fault.lock().unwrap() = Some(fault);
    }

    /// Makes the first call of this operation (e.g. `ssm:PutParameter`) fail.
    pub fn fail_op(&self, op: &str, fault: Fault) {
        self.fail_op_after(op, 0, fault);
    }

    /// Lets `skip` calls of this operation through, then makes the next one fail.
    pub fn fail_op_after(&self, op: &str, skip: u32, fault: Fault) {
        self.reset();
        *self.state.fail_op.lock().unwrap() = Some((op.to_owned(), skip));
        *self.state.fault.lock().unwrap() = Some(fault);
    }
}

fn service_of(headers: &HeaderMap) -> String {
    // Authorization: AWS4-HMAC-SHA256 Credential=AKID/20260101/us-east-1/ec2/aws4_request, ...
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|a| a.split("Credential=").nth(1))
        .and_then(|c| c.split('/').nth(3))
        .unwrap_or("unknown")
        .to_owned()
}

fn classify(method: &str, path_and_query: &str, headers: &HeaderMap, body: &[u8]) -> Call {
    let service = service_of(headers);
    let bucket_owner = headers
        .get("x-amz-expected-bucket-owner")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let is_read = |action: &str| {
        ["Describe", "Get", "List", "Head"]
            .iter()
            .any(|p| action.starts_with(p))
    };
    if service == "s3" {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let keys: Vec<&str> = query
            .split('&')
            .filter(|q| !q.is_empty())
            .map(|q| q.split('=').next().unwrap_or(q))
            .collect();
        return Call {
            op: format!("s3:{method} {path}?{}", keys.join("&")),
            write: !matches!(method, "GET" | "HEAD"),
            bucket_owner,
            body: String::new(),
        };
    }
    let text = String::from_utf8_lossy(body).into_owned();
    if let Some(target) = headers.get("x-amz-target").and_then(|v| v.to_str().ok()) {
        let action = target.rsplit('.').next().unwrap_or(target);
        return Call {
            op: format!("{service}:{action}"),
            write: !is_read(action),
            bucket_owner,
            body: text,
        };
    }
    let action = text
        .split('&')
        .find_map(|kv| kv.strip_prefix("Action="))
        .unwrap_or("Unknown")
        .to_owned();
    Call {
        write: !is_read(&action),
        op: format!("{service}:{action}"),
        bucket_owner,
        body: text,
    }
}

fn fault_response(service: &str, code: &str) -> Response {
    let message = "fault injected by the test proxy";
    let (content_type, body) = match service {
        "ssm" => (
            "application/x-amz-json-1.1",
            json!({"__type": code, "message": message}).to_string(),
        ),
        "s3" => (
            "application/xml",
            format!("<Error><Code>{code}</Code><Message>{message}</Message></Error>"),
        ),
        "ec2" => (
            "text/xml",
            format!(
                "<Response><Errors><Error><Code>{code}</Code><Message>{message}\
                 </Message></Error></Errors><RequestID>x</RequestID></Response>"
            ),
        ),
        _ => (
            "text/xml",
            format!(
                "<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code>\
                 <Message>{message}</Message></Error><RequestId>x</RequestId></ErrorResponse>"
            ),
        ),
    };
    Response::builder()
        .status(StatusCode::BAD_REQUEST)
        .header("content-type", content_type)
        .body(Body::from(body))
        .unwrap()
}

async fn proxy(State(s): State<Arc<ProxyState>>, req: Request<Body>) -> Response {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let call = classify(parts.method.as_str(), &pq, &parts.headers, &body);
    let mut inject = None;
    if call.write {
        let n = s.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if s.fail_nth_write.load(Ordering::SeqCst) == n {
            inject = *s.fault.lock().unwrap();
        }
    }
    {
        let mut op = s.fail_op.lock().unwrap();
        if let Some((name, skip)) = op.as_mut() {
            if *name == call.op {
                if *skip == 0 {
                    *op = None;
                    inject = *s.fault.lock().unwrap();
                } else {
                    *skip -= 1;
                }
            }
        }
    }
    s.calls.lock().unwrap().push(call);
    let service = service_of(&parts.headers);
    match inject {
        Some(Fault::Reject) => return fault_response(&service, "InjectedFault"),
        Some(Fault::RejectWith(code)) => return fault_response(&service, code),
        _ => {}
    }
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut fwd = hyper::Request::builder()
        .method(parts.method.clone())
        .uri(format!("{}{pq}", s.upstream));
    for (k, v) in parts.headers.iter() {
        if k != "host" {
            fwd = fwd.header(k, v);
        }
    }
    let resp = client
        .request(fwd.body(Full::new(body)).unwrap())
        .await
        .expect("moto answers");
    let (rparts, rbody) = resp.into_parts();
    let rbody = rbody.collect().await.unwrap().to_bytes();
    if inject == Some(Fault::LoseResponse) {
        return fault_response(&service, "InjectedFault");
    }
    let mut out = Response::builder().status(rparts.status);
    for (k, v) in rparts.headers.iter() {
        out = out.header(k, v);
    }
    out.body(Body::from(rbody)).unwrap()
}

/// One runner in the GitLab stub.
#[derive(Debug, Clone)]
pub struct StubRunner {
    pub id: u64,
    pub description: String,
    pub tags: Vec<String>,
    pub run_untagged: bool,
    pub runner_type: String,
    pub token: String,
}

#[derive(Default)]
struct GitlabState {
    runners: Mutex<BTreeMap<u64, StubRunner>>,
    next: AtomicU64,
    /// Every runner token ever handed out (none may ever be printed).
    issued: Mutex<Vec<String>>,
    requests: Mutex<Vec<String>>,
}

/// A stub of GitLab's runner API on 127.0.0.1, requiring [`GITLAB_TOKEN`].
pub struct GitlabStub {
    state: Arc<GitlabState>,
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GitlabStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Shared = State<Arc<GitlabState>>;

/// Logs the request; the 401 response when the access token is wrong.
fn unauthorized(s: &GitlabState, h: &HeaderMap, what: String) -> Option<Response> {
    s.requests.lock().unwrap().push(what);
    if h.get("private-token").and_then(|v| v.to_str().ok()) == Some(GITLAB_TOKEN) {
        None
    } else {
        Some(
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({"message": "401 Unauthorized"})),
            )
                .into_response(),
        )
    }
}

fn runner_json(r: &StubRunner) -> Value {
    json!({
        "id": r.id, "description": r.description, "runner_type": r.runner_type,
        "tag_list": r.tags, "run_untagged": r.run_untagged, "active": true,
    })
}

fn new_token(s: &GitlabState) -> String {
    let n = s.next.fetch_add(1, Ordering::SeqCst) + 1;
    let t = format!("glrt-STUBrunnerTOKEN{n:04}secret");
    s.issued.lock().unwrap().push(t.clone());
    t
}

async fn create_runner(State(s): Shared, h: HeaderMap, Json(body): Json<Value>) -> Response {
    if let Some(r) = unauthorized(&s, &h, "POST /user/runners".into()) {
        return r;
    }
    let Some(runner_type) = body["runner_type"].as_str() else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "runner_type is missing"})),
        )
            .into_response();
    };
    let token = new_token(&s);
    let id = 100 + s.next.load(Ordering::SeqCst);
    let r = StubRunner {
        id,
        description: body["description"].as_str().unwrap_or_default().into(),
        tags: body["tag_list"]
            .as_str()
            .unwrap_or_default()
            .split(',')
            .filter(|t| !t.is_empty())
            .map(String::from)
            .collect(),
        run_untagged: body["run_untagged"].as_bool().unwrap_or(false),
        runner_type: runner_type.into(),
        token: token.clone(),
    };
    s.runners.lock().unwrap().insert(id, r);
    (
        StatusCode::CREATED,
        Json(json!({"id": id, "token": token, "token_expires_at": null})),
    )
        .into_response()
}

async fn get_runner(State(s): Shared, h: HeaderMap, UrlPath(id): UrlPath<u64>) -> Response {
    if let Some(r) = unauthorized(&s, &h, format!("GET /runners/{id}")) {
        return r;
    }
    match s.runners.lock().unwrap().get(&id) {
        Some(r) => Json(runner_json(r)).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"message": "404 Not found"})),
        )
            .into_response(),
    }
}

async fn delete_runner(State(s): Shared, h: HeaderMap, UrlPath(id): UrlPath<u64>) -> Response {
    if let Some(r) = unauthorized(&s, &h, format!("DELETE /runners/{id}")) {
        return r;
    }
    match s.runners.lock().unwrap().remove(&id) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"message": "404 Not found"})),
        )
            .into_response(),
    }
}

async fn list_runners(
    State(s): Shared,
    h: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    if let Some(r) = unauthorized(&s, &h, "GET /runners".into()) {
        return r;
    }
    let list: Vec<Value> = s
        .runners
        .lock()
        .unwrap()
        .values()
        .filter(|r| q.get("type").is_none_or(|t| *t == r.runner_type))
        .map(runner_json)
        .collect();
    Json(Value::Array(list)).into_response()
}

async fn reset_token(State(s): Shared, h: HeaderMap, UrlPath(id): UrlPath<u64>) -> Response {
    if let Some(r) = unauthorized(
        &s,
        &h,
        format!("POST /runners/{id}/reset_authentication_token"),
    ) {
        return r;
    }
    if !s.runners.lock().unwrap().contains_key(&id) {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"message": "404 Not found"})),
        )
            .into_response();
    }
    let token = new_token(&s);
    s.runners.lock().unwrap().get_mut(&id).unwrap().token = token.clone();
    (
        StatusCode::CREATED,
        Json(json!({"token": token, "token_expires_at": null})),
    )
        .into_response()
}

impl GitlabStub {
    pub async fn start() -> GitlabStub {
        let state = Arc::new(GitlabState::default());
        let app = Router::new()
            .route("/api/v4/user/runners", post(create_runner))
            .route("/api/v4/runners", get(list_runners))
            .route(
                "/api/v4/runners/{id}",
                get(get_runner).delete(delete_runner),
            )
            .route(
                "/api/v4/runners/{id}/reset_authentication_token",
                post(reset_token),
            )
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        GitlabStub { state, url, task }
    }

    pub fn runners(&self) -> Vec<StubRunner> {
        self.state
            .runners
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect()
    }

    pub fn issued_tokens(&self) -> Vec<String> {
        self.state.issued.lock().unwrap().clone()
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.requests.lock().unwrap().clone()
    }
}

/// What one run of the binary printed.
#[derive(Debug)]
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs `flotilla-provision --stack <stack> <args>` against `endpoint`, with the GitLab
/// token in the environment when `token` is set. Inherited AWS settings are cleared so
/// nothing but the given endpoint can be reached.
pub async fn run(stack: &Path, endpoint: &str, token: bool, args: &[&str]) -> Run {
    run_exe(
        Path::new(env!("CARGO_BIN_EXE_flotilla-provision")),
        stack,
        endpoint,
        token,
        args,
    )
    .await
}

/// [`run`] with another copy of the binary (to control what lies next to it).
pub async fn run_exe(exe: &Path, stack: &Path, endpoint: &str, token: bool, args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("--stack").arg(stack).args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") || k == "GITLAB_TOKEN" || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ACCESS_KEY_ID", "AKIDFLOTILLATEST")
        .env("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
        .env("AWS_REGION", REGION)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws-credentials",
        )
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null());
    if token {
        cmd.env("GITLAB_TOKEN", GITLAB_TOKEN);
    }
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .expect("flotilla-provision finished within 5 minutes")
        .expect("run flotilla-provision");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// AWS clients straight to moto (not through the proxy).
pub struct Clients {
    pub ec2: aws_sdk_ec2::Client,
    pub iam: aws_sdk_iam::Client,
    pub s3: aws_sdk_s3::Client,
    pub ssm: aws_sdk_ssm::Client,
}

impl Clients {
    pub async fn new(moto: &str) -> Clients {
        let creds = aws_sdk_ec2::config::Credentials::new("AKIDCHECK", "check", None, None, "test");
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(moto)
            .region(aws_config::Region::new(REGION))
            .credentials_provider(creds)
            .load()
            .await;
        Clients {
            ec2: aws_sdk_ec2::Client::new(&conf),
            iam: aws_sdk_iam::Client::new(&conf),
            s3: aws_sdk_s3::Client::new(&conf),
            ssm: aws_sdk_ssm::Client::new(&conf),
        }
    }
}

/// A stack file for tests: VPC and subnets inside 127.0.0.0/8 (octet `n` keeps stacks
/// sharing one moto apart), GitLab at `gitlab`.
pub fn stack_toml(name: &str, n: u8, gitlab: &str) -> String {
    format!(
        r#"# test stack
name = "{name}"

[network]
cidr = "127.{n}.0.0/16"
zones = ["us-east-1a", "us-east-1b"]
public_subnets = ["127.{n}.0.0/24", "127.{n}.1.0/24"]
private_subnets = ["127.{n}.16.0/20", "127.{n}.32.0/20"]

[bucket]
name = "{name}-cache"
expire_days = 7

[runner_hosts]
ami = "{AMI}"
instance_type = "t3.small"
flotilla_url = "https://downloads.example.com/flotilla"
flotilla_sha256 = "{sum}"

[gitlab]
url = "{gitlab}"
runner_type = "instance_type"
tags = ["flotilla", "test"]

[fleet]
default_class = "small"

[fleet.classes.small]
ami = "{AMI}"
instance_types = ["t3.medium", "t3a.medium"]
root_volume_gb = 20
idle_count = 1
"#,
        sum = "ab".repeat(32),
    )
}

/// The same stack without `runner_hosts.flotilla_url`: apply uploads the binary given
/// with `--flotilla-bin`.
pub fn self_install_stack_toml(name: &str, n: u8, gitlab: &str) -> String {
    let text = stack_toml(name, n, gitlab);
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("flotilla_url") && !l.starts_with("flotilla_sha256"))
        .collect();
    kept.join("\n") + "\n"
}

/// A stand-in flotilla binary: a 64-bit little-endian ELF header for x86_64 (the test
/// AMI's architecture) or arm64, then `version`. Returns its path and SHA-256.
pub fn fake_flotilla(dir: &Path, file: &str, arch: &str, version: &str) -> (PathBuf, String) {
    let machine: u16 = if arch == "arm64" { 183 } else { 62 };
    let mut bytes = vec![0u8; 64];
    bytes[..4].copy_from_slice(b"\x7fELF");
    bytes[4] = 2;
    bytes[5] = 1;
    bytes[6] = 1;
    bytes[16] = 2;
    bytes[18..20].copy_from_slice(&machine.to_le_bytes());
    bytes.extend_from_slice(format!("flotilla {version}\n").as_bytes());
    bytes.extend(std::iter::repeat_n(0x5a, 100_000));
    let path = dir.join(file);
    std::fs::write(&path, &bytes).unwrap();
    use sha2::Digest;
    (path, hex::encode(sha2::Sha256::digest(&bytes)))
}

pub fn write_stack(dir: &Path, file: &str, text: &str) -> PathBuf {
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    path
}

/// Asserts no secret appears in any of the texts.
pub fn assert_no_secrets(texts: &[&str], extra: &[String]) {
    let mut secrets = vec![AWS_SECRET.to_owned(), GITLAB_TOKEN.to_owned()];
    secrets.extend(extra.iter().cloned());
    for t in texts {
        for s in &secrets {
            assert!(
                !t.contains(s.as_str()),
                "a secret ({}...) was printed",
                &s[..8]
            );
        }
    }
}
