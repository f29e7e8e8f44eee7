//! A counting, fault-injecting HTTP proxy in front of moto's EC2 API: the daemon's
//! `aws.endpoint_url` when a sandbox is started with `SandboxOptions::ec2_proxy`.
//!
//! Every request is classified from the wire (the query API's `Action` and form fields,
//! e.g. `InstanceType` or `InstanceMarketOptions.MarketType`), independently of the
//! daemon's own counters, and recorded. A [`Rule`] answers matching requests with an EC2
//! error document instead of forwarding them (the request never reaches moto, as with a
//! real capacity or throttling error); everything else is forwarded unchanged.
//!
//! Tests wait on what the proxy sees, not on the clock: every recorded request wakes
//! [`FaultProxy::wait_calls`] (a `tokio::sync::watch` of the call count), so "the storm
//! has answered 6 requests" or "a throttled RunInstances arrived" are events a test
//! awaits, and a rule can end on an event (`times(n)`, [`FaultProxy::lift`]) instead of
//! after a duration.
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
        Self::throttle_all().for_duration(d)
    }

    /// Every EC2 call is throttled until the rule is lifted ([`FaultProxy::lift`]) or,
    /// with [`Rule::times`], has answered that many: a storm that ends on an event.
    pub fn throttle_all() -> Self {
        Self {
            action: None,
            params: Vec::new(),
            code: REQUEST_LIMIT_EXCEEDED.to_owned(),
            status: 503,
            until: None,
            times: None,
        }
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
    /// The rule that answered (its [`RuleId`]), if one did.
    pub rule: Option<RuleId>,
    /// The SDK's attempt number of this request (`amz-sdk-request: attempt=N`), for
    /// reports.
    pub attempt: Option<u32>,
    /// The SDK's id of the logical call (`amz-sdk-invocation-id`): the same on every retry
    /// the SDK makes of it, so distinct ids count calls the daemon made.
    pub invocation: Option<String>,
}

/// A rule as [`FaultProxy::inject`] numbered it, to lift it or await its answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleId(pub usize);

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
    /// Rules in the order added, each with its id; a lifted rule is removed.
    rules: Mutex<Vec<(RuleId, Rule)>>,
    next_rule: Mutex<usize>,
    calls: Mutex<Vec<Call>>,
    /// The number of calls recorded; bumped after each push so waiters see the call.
    recorded: tokio::sync::watch::Sender<usize>,
}

impl ProxyState {
    fn record(&self, call: Call) {
        let n = {
            let mut calls = lock(&self.calls);
            calls.push(call);
            calls.len()
        };
        self.recorded.send_replace(n);
    }
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
            next_rule: Mutex::new(0),
            calls: Mutex::new(Vec::new()),
            recorded: tokio::sync::watch::Sender::new(0),
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

    /// Adds a rule (checked in the order added; the first match answers); returns its id.
    pub fn inject(&self, rule: Rule) -> RuleId {
        let id = {
            let mut n = lock(&self.state.next_rule);
            *n += 1;
            RuleId(*n)
        };
        lock(&self.state.rules).push((id, rule));
        id
    }

    /// Removes one rule: requests it matched are forwarded (or answered by a later rule)
    /// from now on. Returns the number of calls recorded when it was lifted, so a test can
    /// split [`FaultProxy::calls`] into before and after.
    pub fn lift(&self, id: RuleId) -> usize {
        let mut rules = lock(&self.state.rules);
        rules.retain(|(r, _)| *r != id);
        // Read under the rules lock: no request can be matched against the lifted rule
        // after this count.
        lock(&self.state.calls).len()
    }

    /// Removes every rule: everything is forwarded again.
    pub fn clear(&self) {
        lock(&self.state.rules).clear();
    }

    /// The number of calls recorded so far: an index into [`FaultProxy::calls`] to look
    /// only at what comes after.
    pub fn mark(&self) -> usize {
        lock(&self.state.calls).len()
    }

    /// Waits until `check` finds what it looks for in the calls recorded so far (all of
    /// them, in arrival order), re-checking at every new call: an event wait, with
    /// `timeout` only as a hang guard naming `what`.
    pub async fn wait_calls<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&[Call]) -> Option<T>,
    ) -> Result<T> {
        let mut rx = self.state.recorded.subscribe();
        let wait = async {
            loop {
                rx.borrow_and_update();
                if let Some(v) = check(&lock(&self.state.calls)) {
                    return Ok(v);
                }
                if rx.changed().await.is_err() {
                    anyhow::bail!("the fault proxy stopped while waiting for {what}");
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.with_context(|| {
            format!(
                "timed out after {timeout:?} waiting for {what}; the proxy saw {:?}",
                self.counts()
            )
        })?
    }

    /// Waits until the first call from index `from` on that `pred` accepts; returns its
    /// index and the call.
    pub async fn wait_call(
        &self,
        what: &str,
        timeout: Duration,
        from: usize,
        pred: impl Fn(&Call) -> bool,
    ) -> Result<(usize, Call)> {
        self.wait_calls(what, timeout, |calls| {
            calls
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, c)| pred(c))
                .map(|(i, c)| (i, c.clone()))
        })
        .await
    }

    /// Waits until rule `id`, made with [`Rule::times`]`(n)`, has answered its `n`
    /// requests (the rule is spent: from then on it matches nothing); returns the index
    /// just past its last answer. Requests recorded after that index were not answered
    /// by this rule.
    pub async fn wait_spent(&self, id: RuleId, timeout: Duration) -> Result<usize> {
        let n = lock(&self.state.rules)
            .iter()
            .find(|(r, _)| *r == id)
            .and_then(|(_, rule)| rule.times)
            .map(|left| left + self.answered_by(id))
            .with_context(|| format!("rule {id:?} is not a live rule with a times() limit"))?;
        self.wait_calls(
            &format!("rule {id:?} to answer {n} requests"),
            timeout,
            |calls| {
                let mut seen = 0;
                for (i, c) in calls.iter().enumerate() {
                    if c.rule == Some(id) {
                        seen += 1;
                        if seen == n {
                            return Some(i + 1);
                        }
                    }
                }
                None
            },
        )
        .await
    }

    /// Requests rule `id` has answered so far.
    pub fn answered_by(&self, id: RuleId) -> u64 {
        lock(&self.state.calls)
            .iter()
            .filter(|c| c.rule == Some(id))
            .count() as u64
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

/// The attempt number in the SDK's `amz-sdk-request: attempt=2; max=5` header.
fn sdk_attempt(header: &str) -> Option<u32> {
    header
        .split(';')
        .find_map(|kv| kv.trim().strip_prefix("attempt="))
        .and_then(|n| n.trim().parse().ok())
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
    let attempt = parts
        .headers
        .get("amz-sdk-request")
        .and_then(|v| v.to_str().ok())
        .and_then(sdk_attempt);
    let invocation = parts
        .headers
        .get("amz-sdk-invocation-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut call = Call {
        at: Instant::now(),
        action: params
            .get("Action")
            .cloned()
            .unwrap_or_else(|| "Unknown".into()),
        params,
        injected: None,
        rule: None,
        attempt,
        invocation,
    };
    // Matched and recorded under the rules lock, so `lift` cuts the calls cleanly.
    let fault = {
        let mut rules = lock(&s.rules);
        let now = call.at;
        let fault = rules
            .iter_mut()
            .find(|(_, r)| r.matches(now, &call))
            .map(|(id, r)| {
                if let Some(n) = r.times.as_mut() {
                    *n -= 1;
                }
                (*id, r.code.clone(), r.status)
            });
        if let Some((id, code, _)) = &fault {
            call.injected = Some(code.clone());
            call.rule = Some(*id);
        }
        let action = call.action.clone();
        s.record(call);
        fault.map(|(_, code, status)| (code, status, action))
    };
    if let Some((code, status, action)) = fault {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
        return text_response(
            status,
            ec2_error_body(
                &code,
                &format!("fault injected by the test proxy into {action}"),
            ),
        );
    }

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
            rule: None,
            attempt: None,
            invocation: None,
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

    #[test]
    fn the_sdk_attempt_number_is_read_from_its_header() {
        assert_eq!(sdk_attempt("attempt=1; max=5"), Some(1));
        assert_eq!(
            sdk_attempt("ttl=20250101T000000Z; attempt=3; max=5"),
            Some(3)
        );
        assert_eq!(sdk_attempt("max=5"), None);
    }

    /// Waiters wake on each recorded call; a spent `times(n)` rule is an awaitable event.
    #[tokio::test]
    async fn waits_wake_on_calls_and_a_spent_rule() {
        // Upstream is a closed port: forwarded requests are recorded, then answered 502.
        let proxy = FaultProxy::start("http://127.0.0.1:9").await.unwrap();
        let id = proxy.inject(Rule::throttle_all().times(2));
        let url = proxy.url().to_owned();
        let feeder = tokio::task::spawn_blocking(move || {
            for action in ["DescribeInstances", "RunInstances", "DescribeInstances"] {
                let _ = ureq::post(&url)
                    .set("amz-sdk-request", "attempt=1; max=5")
                    .send_string(&format!("Action={action}"));
            }
        });
        let (i, c) = proxy
            .wait_call("a RunInstances", Duration::from_secs(10), 0, |c| {
                c.action == "RunInstances"
            })
            .await
            .unwrap();
        assert_eq!(
            (i, c.injected.as_deref()),
            (1, Some(REQUEST_LIMIT_EXCEEDED))
        );
        assert_eq!(c.attempt, Some(1));
        assert_eq!(
            proxy.wait_spent(id, Duration::from_secs(10)).await.unwrap(),
            2
        );
        feeder.await.unwrap();
        proxy
            .wait_calls("the third call", Duration::from_secs(10), |c| {
                (c.len() == 3).then_some(())
            })
            .await
            .unwrap();
        let calls = proxy.calls();
        assert!(calls[2].injected.is_none() && calls[2].rule.is_none());
        assert_eq!(proxy.answered_by(id), 2);
        assert_eq!(proxy.lift(id), 3);
    }
}
