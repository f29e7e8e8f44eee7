//! A counting, fault-injecting HTTP proxy in front of moto's EC2 API: the daemon's
//! `aws.endpoint_url` when a sandbox is started with `SandboxOptions::ec2_proxy`.
//!
//! Every request is classified from the wire (the query API's `Action` and form fields,
//! e.g. `InstanceType` or `InstanceMarketOptions.MarketType`), independently of the
//! daemon's own counters, and recorded. A [`Rule`] answers matching requests with an EC2
//! error document instead of forwarding them (the request never reaches moto, as with a
//! real capacity or throttling error); everything else is forwarded unchanged.
//!
//! Invariant: only what the daemon sends passes through here. The harness's own checks
//! (the emulator, `Sandbox::instances`, teardown) talk to moto directly and are never
//! counted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::Response;
use axum::Router;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// EC2's code for a capacity shortage of one instance type in one zone (on-demand or spot).
pub const INSUFFICIENT_CAPACITY: &str = "InsufficientInstanceCapacity";
/// EC2's throttling code.
pub const REQUEST_LIMIT_EXCEEDED: &str = "RequestLimitExceeded";

/// Which requests a rule answers, with what, and for how long.
#[derive(Debug, Clone)]
pub struct Rule {
    /// `None`: every action.
    pub action: Option<String>,
    /// Form fields that must all be present with these values.
    pub params: Vec<(String, String)>,
    /// The EC2 error code answered.
    pub code: String,
    /// The HTTP status answered (EC2 sends 5xx for capacity, 503 for throttling).
    pub status: u16,
    /// The rule stops matching at this instant (`None`: until cleared).
    pub until: Option<Instant>,
    /// The rule stops matching after this many answers (`None`: unlimited).
    pub times: Option<u64>,
}

impl Rule {
    /// Answers every `action` request with `code` (HTTP 400 unless changed).
    pub fn action(action: &str, code: &str) -> Self {
        Self {
            action: Some(action.to_owned()),
            params: Vec::new(),
            code: code.to_owned(),
            status: 400,
            until: None,
            times: None,
        }
    }

    /// Only requests carrying form field `key=value`.
    pub fn with_param(mut self, key: &str, value: &str) -> Self {
        self.params.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// Only for the next `d`.
    pub fn for_duration(mut self, d: Duration) -> Self {
        self.until = Some(Instant::now() + d);
        self
    }

    /// Only the next `n` matching requests.
    pub fn times(mut self, n: u64) -> Self {
        self.times = Some(n);
        self
    }

    /// RunInstances of this instance type fails as EC2 does when the type has no capacity
    /// (in every zone; add `.with_param("NetworkInterface.1.SubnetId", ..)` for one zone).
    pub fn no_capacity_for_type(instance_type: &str) -> Self {
        Self::action("RunInstances", INSUFFICIENT_CAPACITY)
            .with_param("InstanceType", instance_type)
            .with_status(500)
    }

    /// Spot RunInstances fails for lack of spot capacity; on-demand still works.
    pub fn no_spot_capacity() -> Self {
        Self::action("RunInstances", INSUFFICIENT_CAPACITY)
            .with_param("InstanceMarketOptions.MarketType", "spot")
            .with_status(500)
    }

    /// Every EC2 call is throttled for `d`: a RequestLimitExceeded storm.
    pub fn throttle_everything(d: Duration) -> Self {
        Self {
            action: None,
            params: Vec::new(),
            code: REQUEST_LIMIT_EXCEEDED.to_owned(),
            status: 503,
            until: None,
            times: None,
        }
        .for_duration(d)
    }

    fn matches(&self, now: Instant, call: &Call) -> bool {
        if self.until.is_some_and(|u| now >= u) || self.times == Some(0) {
            return false;
        }
        if self.action.as_deref().is_some_and(|a| a != call.action) {
            return false;
        }
        self.params
            .iter()
            .all(|(k, v)| call.params.get(k).is_some_and(|x| x == v))
    }
}

/// One request as the proxy saw it.
#[derive(Debug, Clone)]
pub struct Call {
    pub at: Instant,
    pub action: String,
    /// Form fields (user data left out: it is large and holds a private key).
    pub params: BTreeMap<String, String>,
    /// The error code answered instead of forwarding, if a rule matched.
    pub injected: Option<String>,
}

impl Call {
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }
    /// RunInstances for the spot market.
    pub fn is_spot(&self) -> bool {
        self.param("InstanceMarketOptions.MarketType") == Some("spot")
    }
}

struct ProxyState {
    upstream: String,
    client: Client<HttpConnector, Full<Bytes>>,
    rules: Mutex<Vec<Rule>>,
    calls: Mutex<Vec<Call>>,
}

/// The running proxy; stops when dropped.
pub struct FaultProxy {
    state: Arc<ProxyState>,
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("url", &self.url)
            .field("upstream", &self.state.upstream)
            .finish()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream` (moto's URL).
    pub async fn start(upstream: &str) -> Result<Self> {
        let state = Arc::new(ProxyState {
            upstream: upstream.trim_end_matches('/').to_owned(),
            client: Client::builder(TokioExecutor::new()).build_http(),
            rules: Mutex::new(Vec::new()),
            calls: Mutex::new(Vec::new()),
        });
        let app = Router::new().fallback(handle).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fault proxy")?;
        let url = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("fault proxy stopped: {e}");
            }
        });
        Ok(Self { state, url, task })
    }

    /// The endpoint to give the daemon.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Adds a rule (checked in the order added; the first match answers).
    pub fn inject(&self, rule: Rule) {
        lock(&self.state.rules).push(rule);
    }

    /// Removes every rule: everything is forwarded again.
    pub fn clear(&self) {
        lock(&self.state.rules).clear();
    }

    /// Every request so far, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.state.calls).clone()
    }

    /// Requests so far, by action (forwarded and answered with a fault alike).
    pub fn counts(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for c in lock(&self.state.calls).iter() {
            *out.entry(c.action.clone()).or_default() += 1;
        }
        out
    }

    /// Requests of this action so far.
    pub fn count(&self, action: &str) -> u64 {
        lock(&self.state.calls)
            .iter()
            .filter(|c| c.action == action)
            .count() as u64
    }

    /// Requests so far answered with an injected fault, by `<action> <error code>`.
    pub fn injected(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for c in lock(&self.state.calls).iter() {
            if let Some(code) = &c.injected {
                *out.entry(format!("{} {code}", c.action)).or_default() += 1;
            }
        }
        out
    }

    /// Requests so far that reached moto, by action.
    pub fn forwarded(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for c in lock(&self.state.calls)
            .iter()
            .filter(|c| c.injected.is_none())
        {
            *out.entry(c.action.clone()).or_default() += 1;
        }
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `application/x-www-form-urlencoded` (also a query string) into pairs.
pub fn parse_form(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An EC2 query-API error document, as EC2 sends it.
pub fn ec2_error_body(code: &str, message: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
         <Message>{message}</Message></Error></Errors><RequestID>flotilla-fault-proxy</RequestID>\
         </Response>"
    )
}

fn text_response(status: StatusCode, body: String) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "text/xml;charset=UTF-8")
        .body(Body::from(body))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

async fn handle(State(s): State<Arc<ProxyState>>, req: Request<Body>) -> Response {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return text_response(
                StatusCode::BAD_REQUEST,
                ec2_error_body("ProxyError", &format!("reading the request: {e}")),
            )
        }
    };
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let mut params: BTreeMap<String, String> = BTreeMap::new();
    if let Some((_, q)) = pq.split_once('?') {
        params.extend(parse_form(q));
    }
    params.extend(parse_form(&String::from_utf8_lossy(&body)));
    params.remove("UserData");
    let mut call = Call {
        at: Instant::now(),
        action: params
            .get("Action")
            .cloned()
            .unwrap_or_else(|| "Unknown".into()),
        params,
        injected: None,
    };
    let fault = {
        let mut rules = lock(&s.rules);
        let now = call.at;
        rules.iter_mut().find(|r| r.matches(now, &call)).map(|r| {
            if let Some(n) = r.times.as_mut() {
                *n -= 1;
            }
            (r.code.clone(), r.status)
        })
    };
    if let Some((code, status)) = fault {
        call.injected = Some(code.clone());
        let action = call.action.clone();
        lock(&s.calls).push(call);
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
        return text_response(
            status,
            ec2_error_body(
                &code,
                &format!("fault injected by the test proxy into {action}"),
            ),
        );
    }
    lock(&s.calls).push(call);

    let mut fwd = hyper::Request::builder()
        .method(parts.method.clone())
        .uri(format!("{}{pq}", s.upstream));
    for (k, v) in parts.headers.iter() {
        if k != "host" {
            fwd = fwd.header(k, v);
        }
    }
    let request = match fwd.body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => {
            return text_response(
                StatusCode::BAD_GATEWAY,
                ec2_error_body("ProxyError", &e.to_string()),
            )
        }
    };
    let resp = match s.client.request(request).await {
        Ok(r) => r,
        Err(e) => {
            return text_response(
                StatusCode::BAD_GATEWAY,
                ec2_error_body("ProxyError", &format!("moto: {e}")),
            )
        }
    };
    let (rparts, rbody) = resp.into_parts();
    let rbody = match rbody.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return text_response(
                StatusCode::BAD_GATEWAY,
                ec2_error_body("ProxyError", &format!("moto's response: {e}")),
            )
        }
    };
    let mut out = Response::builder().status(rparts.status);
    for (k, v) in rparts.headers.iter() {
        if k != "transfer-encoding" && k != "content-length" && k != "connection" {
            out = out.header(k, v);
        }
    }
    out.body(Body::from(rbody))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_fields_are_decoded() {
        let f =
            parse_form("Action=RunInstances&InstanceMarketOptions.MarketType=spot&A=b%2Bc+d&E=%");
        assert_eq!(
            f,
            vec![
                ("Action".into(), "RunInstances".into()),
                ("InstanceMarketOptions.MarketType".into(), "spot".into()),
                ("A".into(), "b+c d".into()),
                ("E".into(), "%".into()),
            ]
        );
    }

    #[test]
    fn rules_match_action_params_and_expire() {
        let now = Instant::now();
        let call = |action: &str, kv: &[(&str, &str)]| Call {
            at: now,
            action: action.into(),
            params: kv
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            injected: None,
        };
        let r = Rule::no_capacity_for_type("t3.micro");
        assert!(r.matches(now, &call("RunInstances", &[("InstanceType", "t3.micro")])));
        assert!(!r.matches(now, &call("RunInstances", &[("InstanceType", "t3.small")])));
        assert!(!r.matches(now, &call("DescribeInstances", &[])));
        let storm = Rule::throttle_everything(Duration::from_secs(5));
        assert!(storm.matches(now, &call("DescribeInstances", &[])));
        assert!(!storm.matches(
            now + Duration::from_secs(6),
            &call("DescribeInstances", &[])
        ));
        let once = Rule::action("TerminateInstances", "X").times(0);
        assert!(!once.matches(now, &call("TerminateInstances", &[])));
    }
}
