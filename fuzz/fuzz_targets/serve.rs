//! Fuzz target: `serve`'s HTTP handling (hyper's HTTP/1 server with serve's own service, as
//! `serve::serve_connection` runs it for every TCP connection) on the raw bytes a client sends,
//! after which the client closes its sending side. The connection is in memory, on one
//! current-thread runtime whose clock only moves when every task waits (so a timeout would
//! fire at once instead of stalling the fuzzer), and answers from one fixed publication: a
//! sample of a busy node (`busy_node`), published as serve publishes a sample, its bodies
//! large enough (metrics 56 kB, report 150 kB) that answers outgrow hyper's 16 KiB buffer and
//! the in-memory connection's 64 KiB.
//!
//! Checked on every input: the connection ends on the client's EOF, no timeout needed; what
//! comes back is a sequence of well-formed HTTP/1.x responses with exact `Content-Length`s
//! (only the last may be cut short, see `split_responses`); a 200 carries one of the
//! publication's bodies with its content type; 405 says `Allow: GET`; an error hyper answers
//! (400, 431, ...) has no body and ends the connection, as does `Connection: close`. For the
//! requests at the start of the input that are plainly well-formed (see `Request::parse`),
//! each is answered in order as docs/metrics.md promises: /metrics, /report and /healthz to
//! GET, OpenMetrics when `Accept` names it, 404 for other paths, 405 for other methods, no
//! body for HEAD, 431 for headers over 16 KiB.
#![no_main]

use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use shimcheck::detect::DetectConfig;
use shimcheck::join::Joined;
use shimcheck::render::metrics::{
    self, OPENMETRICS_CONTENT_TYPE, SamplerHealth, TEXT_CONTENT_TYPE,
};
use shimcheck::serve::{self, Publication, Shared};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

/// Request headers larger than this are refused with 431 (docs/metrics.md).
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Headers hyper parses in one request; more are refused with 431 too.
const MAX_HEADERS: usize = 100;

/// The publication and the bodies it answers with.
struct Fixed {
    shared: Shared,
    text: Vec<u8>,
    openmetrics: Vec<u8>,
    report: Vec<u8>,
}

static FIXED: LazyLock<Fixed> = LazyLock::new(|| {
    let sample = shimcheck::snapshot::read_from(busy_node().as_bytes(), "busy_node")
        .expect("the generated snapshot reads");
    let joined = Joined::new(&sample);
    let cfg = DetectConfig::default();
    let findings = shimcheck::detect::findings(&joined, None, &cfg);
    let families = metrics::families(&joined, &findings, &cfg, 500);
    let health = SamplerHealth {
        interval: Duration::from_secs(15),
        last_sample: Some((sample.taken_at, Duration::from_millis(20))),
        samples: 1,
        errors: 0,
    };
    let encoded = metrics::encode(&families, &health).expect("the metrics encode");
    let mut report = shimcheck::ports_report(&sample, &serve::report_query());
    report.findings = findings;
    let mut json = Vec::new();
    shimcheck::render::json::render(&report, &mut json).expect("the report renders");
    let (text, openmetrics) = (encoded.text.clone(), encoded.openmetrics.clone());
    let publication = Publication::new(encoded, json.clone().into(), &health, 0);
    Fixed {
        shared: Arc::new(RwLock::new(Arc::new(publication))),
        text: text.into_bytes(),
        openmetrics: openmetrics.into_bytes(),
        report: json,
    }
});

/// A snapshot (docs/snapshot.md) of a node where 250 services each hold 8 connections to a
/// database of their own elsewhere, half of them idle for an hour, and one listens.
fn busy_node() -> String {
    let mut processes = Vec::new();
    let mut sockets = Vec::new();
    let mut inode = 10_000;
    for service in 0..250u32 {
        let pid = 1000 + service;
        processes.push(format!(
            r#"{{"pid": {pid}, "comm": "svc-{service}", "cmdline": "/usr/bin/svc-{service} --db 10.9.{service}.1:5432", "uid": 1000, "unit": "svc-{service}.service", "pod": null, "container_id": null}}"#
        ));
        for conn in 0..8u32 {
            inode += 1;
            let idle_ms = if conn % 2 == 0 { 3_600_000 } else { 40 };
            sockets.push(format!(
                r#"{{"state": "established", "local": "10.0.0.1:{port}", "remote": "10.9.{service}.1:5432", "inode": {inode}, "cookie": {inode}, "uid": 1000, "recv_q": 0, "send_q": 0, "tcp_info": {{"last_data_sent_ms": {idle_ms}, "last_data_recv_ms": {idle_ms}, "last_ack_recv_ms": {idle_ms}, "bytes_acked": 4096, "bytes_received": 8192}}, "netns": 4026531833, "cgroup_id": 1, "owners": [{pid}]}}"#,
                port = 33_000 + service * 8 + conn,
            ));
        }
    }
    sockets.push(
        r#"{"state": "listen", "local": "0.0.0.0:8080", "remote": "0.0.0.0:0", "inode": 567, "cookie": 1, "uid": 0, "recv_q": 0, "send_q": 128, "tcp_info": null, "netns": 4026531833, "cgroup_id": 1, "owners": [1000]}"#
            .to_string(),
    );
    format!(
        r#"{{"schema_version": 1, "kind": "shimcheck-snapshot", "taken_at": "2026-11-26T00:53:39Z", "taken_at_ms": 1795654419267, "hostname": "fuzz", "host": {{"port_range": [32768, 60999], "fds": {{}}}}, "processes": [{}], "sockets": [{}], "scan": {{"scanned": 250, "denied": 0, "vanished": 0, "unreadable": 0, "first_unreadable": null}}, "warnings": [], "own_netns": 4026531833, "netns_names": {{"4026531833": "host"}}, "cgroup_places": {{}}}}"#,
        processes.join(", "),
        sockets.join(", ")
    )
}

static RUNTIME: LazyLock<Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime")
});

fuzz_target!(|data: &[u8]| {
    let fixed = &*FIXED;
    let (output, waited) = RUNTIME.block_on(exchange(data, &fixed.shared));
    assert!(
        waited.is_zero(),
        "the connection waited {waited:?} for a timer after the client's EOF"
    );
    let responses = split_responses(data, &output, fixed);
    check_promises(data, &responses, fixed);
});

/// Runs one connection: the client sends `data`, closes its sending side and reads until the
/// server closes. Returns what it read and how long the (paused) clock moved meanwhile.
async fn exchange(data: &[u8], shared: &Shared) -> (Vec<u8>, Duration) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (mut from_server, mut to_server) = tokio::io::split(client);
    let started = tokio::time::Instant::now();
    let serving = serve::serve_connection(server, Arc::clone(shared));
    let sending = async {
        // The server may close first (an error answer): the rest is not wanted then.
        if to_server.write_all(data).await.is_ok() {
            let _ = to_server.shutdown().await;
        }
    };
    let receiving = async {
        let mut out = Vec::new();
        let _ = from_server.read_to_end(&mut out).await;
        out
    };
    let ((), (), output) = tokio::join!(serving, sending, receiving);
    (output, started.elapsed())
}

/// One response as it came back.
struct Response<'a> {
    status: u16,
    headers: Vec<(String, &'a str)>,
    body: &'a [u8],
    /// The body stops short of its `Content-Length` (see `split_responses`).
    cut: bool,
}

impl Response<'_> {
    /// The values of header `name` (lower case).
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .collect()
    }

    fn content_type(&self) -> &str {
        self.header("content-type").first().copied().unwrap_or("")
    }

    /// It says the connection ends after it.
    fn closes(&self) -> bool {
        self.header("connection")
            .iter()
            .any(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// Splits the output into responses, checking each is well-formed and one serve or hyper can
/// give. A response to a HEAD request has a `Content-Length` but no body: such a response is
/// recognised by the next response (or the end) following its head directly, which only a
/// body starting with "HTTP/1." could fake, and none does.
///
/// The last answer may be cut short, head or body: after a request with an `Upgrade` header,
/// hyper (1.12) ends the connection without sending what it still holds once the client's
/// side is done (EOF, a malformed request or body). What arrives must still be the start of a
/// right answer, and `check_promises` accepts no cut answer to a well-formed request.
fn split_responses<'a>(input: &[u8], output: &'a [u8], fixed: &Fixed) -> Vec<Response<'a>> {
    let mut responses = Vec::new();
    let mut rest = output;
    while !rest.is_empty() {
        let Some(end) = find(rest, b"\r\n\r\n") else {
            assert!(
                rest.starts_with(b"HTTP/1.") || b"HTTP/1.".starts_with(rest),
                "not a response: {:?}",
                show(rest)
            );
            break;
        };
        let head = std::str::from_utf8(&rest[..end])
            .unwrap_or_else(|_| panic!("a response head that is not ASCII: {:?}", show(rest)));
        rest = &rest[end + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status = parse_status_line(status_line)
            .unwrap_or_else(|| panic!("not an HTTP/1.x status line: {status_line:?}"));
        let mut headers = Vec::new();
        for line in lines {
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("a response header line without ':': {line:?}"));
            assert!(
                !name.is_empty() && name.bytes().all(is_tchar),
                "a response header name that is not a token: {line:?}"
            );
            headers.push((name.to_ascii_lowercase(), value.trim_matches([' ', '\t'])));
        }
        let mut response = Response {
            status,
            headers,
            body: &[],
            cut: false,
        };
        assert!(
            response.header("transfer-encoding").is_empty(),
            "a chunked response; serve's bodies all have a known length: {head:?}"
        );
        let lengths = response.header("content-length");
        assert_eq!(lengths.len(), 1, "not one Content-Length: {head:?}");
        let length: usize = lengths[0]
            .parse()
            .unwrap_or_else(|_| panic!("a Content-Length that is not a number: {head:?}"));
        let bodiless = rest.is_empty() || rest.starts_with(b"HTTP/1.");
        if length > 0 && !bodiless {
            response.cut = rest.len() < length;
            let taken = length.min(rest.len());
            response.body = &rest[..taken];
            rest = &rest[taken..];
        }
        check_response(&response, head, length, fixed);
        responses.push(response);
    }
    // An error hyper answers closes the connection, and so does an answer that says so:
    // nothing may follow them.
    let last = |r: &Response<'_>| is_hyper_error(r.status) || r.closes();
    if let Some(i) = responses.iter().position(last) {
        assert_eq!(
            i + 1,
            responses.len(),
            "answers after a {} to {:?}",
            responses[i].status,
            show(input)
        );
    }
    responses
}

/// The checks that hold for a response whatever the request.
fn check_response(r: &Response<'_>, head: &str, length: usize, fixed: &Fixed) {
    let full = r.body.len() == length || r.cut;
    match r.status {
        200 => {
            // Only GET is answered 200, so the body is always there.
            assert!(full, "a 200 without its body: {head:?}");
            let expected: &[u8] = match r.content_type() {
                TEXT_CONTENT_TYPE => &fixed.text,
                OPENMETRICS_CONTENT_TYPE => &fixed.openmetrics,
                "application/json" => &fixed.report,
                t if t.starts_with("text/plain") => b"ok\n",
                t => panic!("a 200 of an unknown content type {t:?}: {head:?}"),
            };
            assert!(
                length == expected.len() && expected.starts_with(r.body),
                "a 200 with another body: {head:?}"
            );
        }
        404 | 405 => {
            assert!(
                r.content_type().starts_with("text/plain"),
                "a {} that is not text: {head:?}",
                r.status
            );
            if r.status == 405 {
                assert_eq!(
                    r.header("allow"),
                    ["GET"],
                    "a 405 without Allow: GET: {head:?}"
                );
            }
        }
        s if is_hyper_error(s) => assert_eq!(length, 0, "an error with a body: {head:?}"),
        s => panic!("status {s}: neither serve nor hyper's errors give it: {head:?}"),
    }
}

/// A status hyper answers by itself (a request it cannot read); serve's own are 200, 404,
/// 405 and, before the first sample, 503.
fn is_hyper_error(status: u16) -> bool {
    (400..600).contains(&status) && !matches!(status, 404 | 405 | 503)
}

/// The checks of docs/metrics.md for the requests at the start of the input that
/// `Request::parse` takes: each is answered, in order, as promised.
fn check_promises(input: &[u8], responses: &[Response<'_>], fixed: &Fixed) {
    let mut rest = input;
    let mut answered = responses.iter();
    while let Some((req, len)) = Request::parse(rest) {
        rest = &rest[len..];
        let got = answered
            .next()
            .unwrap_or_else(|| panic!("no answer to {req:?} in {:?}", show(input)));
        let context = || format!("{req:?} in {:?}", show(input));
        if req.head_len > MAX_HEAD_BYTES || req.headers > MAX_HEADERS {
            assert_eq!(got.status, 431, "{}", context());
            return;
        }
        let (status, body): (u16, Option<&[u8]>) =
            if !matches!(req.path, "/metrics" | "/report" | "/healthz") {
                (404, None)
            } else if req.method != "GET" {
                (405, None)
            } else {
                match req.path {
                    "/healthz" => (200, Some(b"ok\n")),
                    "/report" => (200, Some(&fixed.report)),
                    _ if req.openmetrics => (200, Some(&fixed.openmetrics)),
                    _ => (200, Some(&fixed.text)),
                }
            };
        assert_eq!(got.status, status, "{}", context());
        assert!(!got.cut, "a cut answer to {}", context());
        if let Some(body) = body {
            assert!(got.body == body, "another body for {}", context());
        }
        if req.method == "HEAD" {
            assert!(got.body.is_empty(), "a body for {}", context());
        } else if status != 200 {
            assert!(!got.body.is_empty(), "no body for {}", context());
        }
        if req.http10 {
            // Without keep-alive, an HTTP/1.0 request is the connection's last.
            return;
        }
        if req.close {
            assert!(got.closes(), "no Connection: close for {}", context());
            return;
        }
    }
}

/// A request that is well-formed beyond doubt: a token method (not CONNECT), a path of plain
/// URI characters, HTTP/1.0 or 1.1, headers of visible ASCII that say nothing of a body or of
/// the connection (no Content-Length, Transfer-Encoding, Expect, Upgrade..., and Connection
/// only as `close`), CRLF line ends. Hyper must read such a request and hand it to serve (or
/// refuse it as too large); anything else ends the comparison.
#[derive(Debug)]
struct Request<'a> {
    method: &'a str,
    /// The target up to its query.
    path: &'a str,
    http10: bool,
    /// It says `Connection: close`.
    close: bool,
    /// An `Accept` names OpenMetrics.
    openmetrics: bool,
    head_len: usize,
    headers: usize,
}

impl<'a> Request<'a> {
    /// The request at the start of `input` and its length, if it is one.
    fn parse(input: &'a [u8]) -> Option<(Request<'a>, usize)> {
        let end = find(input, b"\r\n\r\n")?;
        let head = std::str::from_utf8(&input[..end]).ok()?;
        let mut lines = head.split("\r\n");
        let mut parts = lines.next()?.split(' ');
        let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some()
            || method.is_empty()
            || !method.bytes().all(is_tchar)
            || method == "CONNECT"
            || !target.starts_with('/')
            || !target.bytes().all(is_plain_uri_char)
        {
            return None;
        }
        let http10 = match version {
            "HTTP/1.1" => false,
            "HTTP/1.0" => true,
            _ => return None,
        };
        let mut openmetrics = false;
        let mut close = false;
        let mut headers = 0;
        for line in lines {
            let (name, value) = line.split_once(':')?;
            if name.is_empty()
                || !name.bytes().all(is_tchar)
                || !value
                    .bytes()
                    .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
            {
                return None;
            }
            let name = name.to_ascii_lowercase();
            if name == "connection" {
                if !value
                    .trim_matches([' ', '\t'])
                    .eq_ignore_ascii_case("close")
                {
                    return None;
                }
                close = true;
            } else if matches!(
                name.as_str(),
                "content-length"
                    | "transfer-encoding"
                    | "expect"
                    | "upgrade"
                    | "te"
                    | "trailer"
                    | "keep-alive"
                    | "proxy-connection"
            ) {
                return None;
            }
            openmetrics |= name == "accept" && value.contains("application/openmetrics-text");
            headers += 1;
        }
        let path = target.split_once('?').map_or(target, |(path, _)| path);
        let head_len = end + 4;
        let request = Request {
            method,
            path,
            http10,
            close,
            openmetrics,
            head_len,
            headers,
        };
        Some((request, head_len))
    }
}

/// `HTTP/1.x NNN reason` → NNN.
fn parse_status_line(line: &str) -> Option<u16> {
    let rest = line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| line.strip_prefix("HTTP/1.0 "))?;
    let (code, reason) = rest.split_at_checked(3)?;
    if !code.bytes().all(|b| b.is_ascii_digit()) || !(reason.is_empty() || reason.starts_with(' '))
    {
        return None;
    }
    let code: u16 = code.parse().ok()?;
    (100..600).contains(&code).then_some(code)
}

/// A token character (RFC 9110 `tchar`).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A character of a path or query that no URI parser could doubt (RFC 3986 unreserved and
/// sub-delims, ':', '@', '/', '?').
fn is_plain_uri_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?".contains(&b)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Bytes for a failure message, cut to a readable length.
fn show(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(600)]).into_owned();
    if bytes.len() > 600 {
        format!("{text}... ({} bytes)", bytes.len())
    } else {
        text
    }
}
