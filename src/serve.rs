//! `shimcheck serve`: the always-on loop. It samples on its own `--interval` with the same
//! sampler and owner cache as `--watch`, runs the detector over its window, and publishes each
//! sample as Prometheus metrics, the `ports --by pair -o json` report and a health state. An
//! HTTP server (hyper, on its own thread) answers from the latest publication only, so a
//! scrape never triggers a sample and a slow or hostile client never delays one;
//! `--textfile` writes the metrics for node_exporter after every sample.
//!
//! Input: `ServeArgs`. Output: HTTP answers, a textfile, errors on stderr. Ends with exit 0 on
//! SIGTERM or SIGINT.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use http_body_util::Full;
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{ACCEPT, ALLOW, CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Serialize, Serializer};

use crate::aggregate::{self, Group, GroupBy, KeptGroups, Query, Report};
use crate::cli::ServeArgs;
use crate::detect::{Digest, History, MIN_RISES};
use crate::join::Joined;
use crate::model::{StateSet, TcpState};
use crate::render;
use crate::render::metrics::{self, SocketCounts};
use crate::sample::{Look, Mode, Sampler, Taken};

/// Failed samples in a row after which /healthz answers 503.
pub const UNHEALTHY_AFTER: u32 = 3;
/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 128;
/// A client must send a request's headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this long, however busy: idle keep-alive connections cannot
/// pile up.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// The largest request head read (headers beyond it get 431).
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Groups in /report: `--by pair` has a group per client port of every server whose clients
/// are elsewhere, so the whole list grows with the sockets; `total_groups` says how many
/// there were.
pub const REPORT_TOP: usize = 500;
/// The sampling threads' nice value: a sample uses every core for a moment, and a scrape
/// arriving then should not wait for it (the HTTP thread keeps the default priority).
const SAMPLER_NICE: i32 = 10;

/// What a scrape is answered from: replaced whole after every sample.
#[derive(Debug, Default)]
pub struct Publication {
    /// Text format 0.0.4 and OpenMetrics; empty before the first sample.
    text: Bytes,
    openmetrics: Bytes,
    /// The latest report.
    report: ReportBody,
    /// A sample is in and sampling has not failed `UNHEALTHY_AFTER` times in a row.
    healthy: bool,
    /// Why /healthz says 503.
    status: String,
}

impl Publication {
    /// What serve answers from after a sample attempt: both encodings of the metrics, the
    /// latest report as JSON, and the health that `health.samples` and `failing` (the failed
    /// attempts in a row) give.
    pub fn new(
        encoded: metrics::Encoded,
        report: ReportBody,
        health: &metrics::SamplerHealth,
        failing: u32,
    ) -> Publication {
        let status = if failing >= UNHEALTHY_AFTER {
            format!("the last {failing} samples failed (see shimcheck's stderr)")
        } else if health.samples == 0 {
            "no sample yet".to_string()
        } else {
            "ok".to_string()
        };
        Publication {
            text: Bytes::from(encoded.text),
            openmetrics: Bytes::from(encoded.openmetrics),
            report,
            healthy: health.samples > 0 && failing < UNHEALTHY_AFTER,
            status,
        }
    }
}

/// A report as `/report` answers it: written as JSON the first time it is asked for, once per
/// sample (most samples nobody asks: Prometheus scrapes `/metrics`).
#[derive(Debug, Default)]
pub struct ReportBody {
    report: Option<Arc<Report<SharedGroups>>>,
    json: OnceLock<Bytes>,
}

impl ReportBody {
    /// A report to write when asked.
    fn of(report: Report<SharedGroups>) -> ReportBody {
        ReportBody {
            report: Some(Arc::new(report)),
            json: OnceLock::new(),
        }
    }

    /// The report as JSON; empty before the first sample.
    fn json(&self) -> Bytes {
        self.json
            .get_or_init(|| {
                let written = self
                    .report
                    .as_ref()
                    .map(|r| serde_json::to_vec_pretty(&**r));
                // A report is plain data: writing it to memory cannot fail.
                Bytes::from(written.and_then(Result::ok).unwrap_or_default())
            })
            .clone()
    }
}

impl From<Vec<u8>> for ReportBody {
    /// A report written already, as JSON.
    fn from(json: Vec<u8>) -> ReportBody {
        ReportBody {
            report: None,
            json: OnceLock::from(Bytes::from(json)),
        }
    }
}

/// The groups of a report, shared by the samples where nothing moved (which reuse them) and
/// the publications that answer with them.
#[derive(Debug, Clone)]
pub struct SharedGroups(Arc<Vec<Group>>);

impl Serialize for SharedGroups {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// The latest publication: the sampling thread replaces it, each request reads it.
pub type Shared = Arc<RwLock<Arc<Publication>>>;

/// What `/report` answers: ESTABLISHED sockets by (process, remote endpoint), the largest
/// `REPORT_TOP` pairs.
pub fn report_query() -> Query {
    Query {
        group_by: GroupBy::Pair,
        states: [TcpState::Established].into_iter().collect(),
        port: None,
        pid: None,
        process: None,
        top: Some(REPORT_TOP),
        fold: false,
    }
}

/// Runs `shimcheck serve` until SIGTERM or SIGINT; returns 0 findings (its exit status is 0:
/// findings go to Prometheus, not to the exit code).
pub fn run(args: &ServeArgs, err: &mut dyn Write) -> anyhow::Result<usize> {
    let interval: Duration = args.interval.into();
    if interval.is_zero() {
        bail!("--interval must be longer than 0 (try 15s or 1m)");
    }
    if args.max_series == 0 {
        bail!("--max-series must be at least 1");
    }
    let listen = args.listen_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    // The handler also wakes this thread, which sleeps between samples until the next one
    // is due or a signal comes: no polling.
    let sleeper = std::thread::current();
    ctrlc::set_handler(move || {
        flag.store(true, Ordering::SeqCst);
        sleeper.unpark();
    })
    .context("cannot install the SIGTERM/SIGINT handler")?;
    let shared: Shared = Arc::new(RwLock::new(Arc::new(Publication {
        status: "no sample yet".into(),
        ..Publication::default()
    })));
    let server = match listen {
        Some(addr) => Some(Server::start(addr, Arc::clone(&shared))?),
        None => None,
    };
    // This thread samples from here on, and the scan threads it starts inherit its priority.
    // Failing to lower it costs only scrape latency under load: not worth refusing to run.
    let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), SAMPLER_NICE);
    let result = sample_loop(args, interval, &shared, &stop, err);
    if let Some(server) = server {
        server.stop();
    }
    result.map(|()| 0)
}

/// A new sample and the loop's report of it.
struct Kept {
    taken: Taken,
    report: Report<SharedGroups>,
}

/// Samples until `stop`, publishing after every attempt.
fn sample_loop(
    args: &ServeArgs,
    interval: Duration,
    shared: &Shared,
    stop: &AtomicBool,
    err: &mut dyn Write,
) -> anyhow::Result<()> {
    let cfg = args.detect_config();
    let states: StateSet = [TcpState::Established, TcpState::CloseWait]
        .into_iter()
        .collect();
    let query = report_query();
    let mut sampler = Sampler::open(&args.node, Mode::Incremental);
    let mut history = History::new(cfg.window, MIN_RISES);
    let mut health = metrics::SamplerHealth {
        interval,
        last_sample: None,
        samples: 0,
        errors: 0,
    };
    let mut families = metrics::Families::default();
    // The last report: published again, with the metrics of a failed attempt, until the next.
    let mut report: Option<Report<SharedGroups>> = None;
    let mut failing = 0u32;
    let mut warned = render::WarnedOnce::default();
    // The last new sample and what was made of it: what a look that saw nothing move reuses.
    let mut kept: Option<Kept> = None;
    // The groups, the detector's digest and the metrics' counts of the last new sample,
    // brought up to date where the sockets lent by an event-kept table changed.
    let mut groups = KeptGroups::default();
    let mut digest: Option<Digest> = None;
    let mut counts: Option<SocketCounts> = None;
    while !stop.load(Ordering::SeqCst) {
        let tick = Instant::now();
        // A new sample replaces the last: drop it first, never hold two.
        let looked = match sampler.look(states, || kept.take().map(|k| k.taken.sample.sockets)) {
            Ok(Look::Same(moved)) => match kept.take() {
                Some(mut k) => {
                    if k.taken.sample.apply(moved) {
                        // A holder exited: the same sockets, other owners; every stage again.
                        Ok((k.taken, None))
                    } else {
                        Ok((k.taken, Some(k.report)))
                    }
                }
                // No sample to reuse yet (the first look always dumps): take one.
                None => sampler.sample(states).map(|t| (t, None)),
            },
            Ok(Look::New(taken)) => Ok((taken, None)),
            Err(e) => Err(e),
        };
        match looked {
            Ok((
                Taken {
                    mut sample,
                    topology,
                    edits,
                },
                last,
            )) => {
                let mut r = match last {
                    // Nothing moved but time: the groups, the digest and the socket counts
                    // stand, the findings and the idle connections are judged anew, without
                    // a pass over the sockets.
                    Some(mut last) => {
                        history.observe_same(sample.taken_at);
                        last.taken_at = aggregate::rfc3339(sample.taken_at);
                        last
                    }
                    None => {
                        let joined = Joined::with_topology_of(&sample, &topology);
                        let (mut r, _) = groups.report(&joined, &query, edits.as_deref(), false);
                        if !args.report_cmdline {
                            r.drop_cmdlines();
                        }
                        let r = r.with_groups(|g| SharedGroups(Arc::new(g)));
                        // The history counts the digest's pairs: no second pass.
                        let edits = edits.as_deref();
                        let mut d = Digest::update(digest.take(), &joined, &groups, edits);
                        history.observe_digest(&d, &joined, &groups, edits);
                        // Where the collector aged tcp_info clocks instead of reading them,
                        // those a growth finding is judged by are read again (clocks a reuse
                        // brought forward, `tcp_info_age_ms`, are exact: nothing moved).
                        let wanted = match sample.tcp_info_age_ms {
                            0 => history.clocks_wanted(&d, &cfg),
                            _ => Vec::new(),
                        };
                        let mut kept =
                            SocketCounts::update(counts.take(), &joined, &cfg, &groups, edits);
                        if !wanted.is_empty() {
                            drop(joined);
                            sampler.fresh_clocks(&mut sample, &wanted);
                            let joined = Joined::with_topology_of(&sample, &topology);
                            d.recount(&joined, &wanted);
                            kept.recount(&joined, &wanted);
                        }
                        (digest, counts) = (Some(d), Some(kept));
                        r
                    }
                };
                if let Some(d) = &digest {
                    r.findings = d.findings(&sample, Some(&history), &cfg);
                }
                if let Some(counts) = &counts {
                    families = metrics::families_of(&sample, counts, &r.findings, args.max_series);
                }
                // A closed stderr must not stop the agent: logging is best effort.
                let _ = warned.print_new(err, &r.warnings);
                health.samples += 1;
                health.last_sample = Some((sample.taken_at, tick.elapsed()));
                failing = 0;
                let taken = Taken {
                    sample,
                    topology,
                    edits,
                };
                report = Some(r.clone());
                kept = Some(Kept { taken, report: r });
            }
            Err(e) => {
                health.errors += 1;
                failing += 1;
                let _ = writeln!(err, "shimcheck: error: sample failed: {e:#}");
            }
        }
        let encoded = metrics::encode(&families, &health)
            .map_err(|_| anyhow::anyhow!("cannot encode the metrics"))?;
        if let Some(path) = &args.textfile {
            let written = crate::atomic::replace(path, |w| w.write_all(encoded.text.as_bytes()));
            if let Err(e) = written {
                let _ = writeln!(err, "shimcheck: error: textfile: {e:#}");
            }
        }
        let body = report.clone().map(ReportBody::of).unwrap_or_default();
        let publication = Arc::new(Publication::new(encoded, body, &health, failing));
        if let Ok(mut slot) = shared.write() {
            *slot = publication;
        }
        while !stop.load(Ordering::SeqCst) {
            match interval.checked_sub(tick.elapsed()) {
                Some(left) if !left.is_zero() => std::thread::park_timeout(left),
                _ => break,
            }
        }
    }
    Ok(())
}

/// The HTTP server's thread and the way to stop it.
struct Server {
    shutdown: tokio::sync::watch::Sender<bool>,
    thread: std::thread::JoinHandle<()>,
}

impl Server {
    /// Binds `addr` now (so a port in use fails the command at once) and serves from
    /// `shared` on a thread of its own.
    fn start(addr: SocketAddr, shared: Shared) -> anyhow::Result<Server> {
        let listener = std::net::TcpListener::bind(addr).with_context(|| {
            format!(
                "cannot listen on {addr} (another process may use it; choose one with --listen)"
            )
        })?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the HTTP server's runtime")?;
        let (shutdown, on_shutdown) = tokio::sync::watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || runtime.block_on(accept_loop(listener, shared, on_shutdown)))
            .context("cannot start the HTTP server's thread")?;
        Ok(Server { shutdown, thread })
    }

    fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.thread.join();
    }
}

async fn accept_loop(
    listener: std::net::TcpListener,
    shared: Shared,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // At the connection limit, stop accepting: new clients wait in the accept queue
        // until a connection ends (each lives at most CONNECTION_LIFETIME).
        let slot = tokio::select! {
            _ = shutdown.changed() => return,
            slot = Arc::clone(&slots).acquire_owned() => slot,
        };
        let Ok(slot) = slot else { return };
        let stream = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of fds or a connection reset before accept: try again shortly.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            serve_connection(stream, shared).await;
            drop(slot);
        });
    }
}

/// Serves one HTTP/1 connection on `io`, a TCP stream or any other byte stream: each request
/// is answered from the latest publication in `shared` when it arrives. Returns when the
/// connection ends: the client closed it, a malformed request was answered with an error, its
/// headers came too slowly or were too large, or it reached its 30 s lifetime. It needs a
/// tokio runtime with the time driver enabled (its timeouts).
pub async fn serve_connection<I>(io: I, shared: Shared)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let service = service_fn(move |req| {
        let publication = shared.read().map(|p| Arc::clone(&p)).unwrap_or_default();
        async move { Ok::<_, Infallible>(respond(&req, &publication)) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        // A client may close its sending side once its request is out (`nc -N`, some
        // HTTP/1.0 clients): it still gets its answers, and the connection ends after them.
        .half_close(true)
        .serve_connection(TokioIo::new(io), service);
    let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
}

/// Answers one request from the latest publication. A request with a body (serve reads none)
/// is the connection's last: skipping an unread chunked body, hyper (1.12) reads the next
/// request while this answer may still be unsent, and a malformed or cut-off request there
/// tore the answer (its 400 inside the body, or the rest of the body dropped).
fn respond(req: &Request<Incoming>, p: &Publication) -> Response<Full<Bytes>> {
    let mut r = answer(req, p);
    if !req.body().is_end_stream() {
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// What a request is answered, by path and method.
fn answer(req: &Request<Incoming>, p: &Publication) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/report" | "/healthz") {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /report or /healthz\n",
        );
    }
    if req.method() != Method::GET {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    match path {
        "/healthz" if p.healthy => plain(StatusCode::OK, "ok\n"),
        "/healthz" => plain(StatusCode::SERVICE_UNAVAILABLE, &format!("{}\n", p.status)),
        // Before the first attempt; after it, failures are in the metrics themselves.
        _ if p.text.is_empty() => plain(StatusCode::SERVICE_UNAVAILABLE, "no sample yet\n"),
        "/report" => body(p.report.json(), "application/json"),
        _ if wants_openmetrics(req) => {
            body(p.openmetrics.clone(), metrics::OPENMETRICS_CONTENT_TYPE)
        }
        _ => body(p.text.clone(), metrics::TEXT_CONTENT_TYPE),
    }
}

/// True when the scraper's `Accept` names OpenMetrics (Prometheus asks for it first and
/// falls back to 0.0.4).
fn wants_openmetrics(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

fn body(bytes: Bytes, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(bytes));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut r = body(
        Bytes::copy_from_slice(text.as_bytes()),
        "text/plain; charset=utf-8",
    );
    *r.status_mut() = status;
    r
}
