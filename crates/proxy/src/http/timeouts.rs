//! The connection manager's timers, as Envoy arms them. A stream's: its idle timeout
//! (`stream_idle_timeout`, or the route's `idle_timeout`), its duration limit
//! (`common_http_protocol_options.max_stream_duration`, or the route's
//! `max_stream_duration.max_stream_duration`) and the time allowed to receive the whole request
//! (`request_timeout`). A connection's: `common_http_protocol_options.idle_timeout` and
//! `max_connection_duration` (both drain the connection), and `request_headers_timeout` (an
//! HTTP/1 request whose headers do not arrive in time is answered 408 and the connection closed).

use super::Outcome;
use pilotfish_api::pb::envoy::config::route::v3::RouteAction;
use pilotfish_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// When a stream last moved (a body frame either way), and whether its request is all in.
pub(crate) struct Activity {
    began: Instant,
    /// Nanoseconds from `began` to the last activity.
    last: AtomicU64,
    request_done: AtomicBool,
}

impl Activity {
    pub fn new() -> Activity {
        Activity {
            began: Instant::now(),
            last: AtomicU64::new(0),
            request_done: AtomicBool::new(false),
        }
    }

    pub fn touch(&self) {
        self.last
            .store(self.began.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn request_complete(&self) {
        self.request_done.store(true, Ordering::Relaxed);
    }

    pub fn request_done(&self) -> bool {
        self.request_done.load(Ordering::Relaxed)
    }

    fn last(&self) -> Instant {
        self.began + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

/// A stream's limits, once its route is known.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Limits {
    pub idle: Option<Duration>,
    pub duration: Option<Duration>,
    pub request: Option<Duration>,
}

/// Which of a stream's timers fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Expired {
    Idle,
    Duration,
    Request,
}

/// A zero duration turns a timer off.
fn some(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

impl Limits {
    /// The connection manager's limits (Envoy's defaults: streams idle for 5 minutes are
    /// ended; no duration or request limit), a route's own taking their place.
    pub fn of(hcm: &HttpConnectionManager, route: Option<&RouteAction>) -> Limits {
        let d = |v: Option<&pilotfish_api::pb::google::protobuf::Duration>, default| {
            some(crate::duration(v, default))
        };
        let mut idle = d(hcm.stream_idle_timeout.as_ref(), Duration::from_secs(300));
        let mut duration = d(
            hcm.common_http_protocol_options
                .as_ref()
                .and_then(|o| o.max_stream_duration.as_ref()),
            Duration::ZERO,
        );
        if let Some(a) = route {
            if let Some(t) = &a.idle_timeout {
                idle = d(Some(t), Duration::ZERO);
            }
            if let Some(t) = a
                .max_stream_duration
                .as_ref()
                .and_then(|m| m.max_stream_duration.as_ref())
            {
                duration = d(Some(t), Duration::ZERO);
            }
        }
        Limits {
            idle,
            duration,
            request: d(hcm.request_timeout.as_ref(), Duration::ZERO),
        }
    }

    /// The earliest deadline: the request's only until it is all in and the response has not
    /// begun, as Envoy disarms it.
    fn next(&self, a: &Activity, response_started: bool) -> Option<(Instant, Expired)> {
        let mut best: Option<(Instant, Expired)> = None;
        let mut offer = |at: Instant, which| {
            if best.is_none_or(|(b, _)| at < b) {
                best = Some((at, which));
            }
        };
        if let Some(t) = self.idle {
            offer(a.last() + t, Expired::Idle);
        }
        if let Some(t) = self.duration {
            offer(a.began + t, Expired::Duration);
        }
        if let (Some(t), false, false) = (self.request, response_started, a.request_done()) {
            offer(a.began + t, Expired::Request);
        }
        best
    }

    /// Runs `fut` (the stream until its response headers) unless a timer fires first.
    pub async fn race<F: Future>(&self, a: &Activity, fut: F) -> Result<F::Output, Expired> {
        tokio::pin!(fut);
        loop {
            let Some((at, _)) = self.next(a, false) else {
                return Ok(fut.await);
            };
            tokio::select! {
                biased;
                out = &mut fut => return Ok(out),
                _ = tokio::time::sleep_until(at) => {
                    // Activity since the timer was set moves the idle deadline on.
                    if let Some((at, which)) = self.next(a, false) {
                        if at <= Instant::now() {
                            return Err(which);
                        }
                    }
                }
            }
        }
    }
}

impl Expired {
    /// Envoy's local reply: 408 while the request is still coming in, else 504.
    pub fn reply(self, request_done: bool) -> Outcome {
        let status = if request_done && self != Expired::Request {
            504
        } else {
            408
        };
        match self {
            Expired::Idle => Outcome::local(status, "stream timeout", Some("SI"), self.details()),
            Expired::Duration => {
                Outcome::local(status, "downstream duration timeout", None, self.details())
            }
            Expired::Request => Outcome::local(status, "request timeout", None, self.details()),
        }
    }

    pub fn details(self) -> &'static str {
        match self {
            Expired::Idle => "stream_idle_timeout",
            Expired::Duration => "max_duration_timeout",
            Expired::Request => "request_overall_timeout",
        }
    }

    pub fn flag(self) -> Option<&'static str> {
        (self == Expired::Idle).then_some("SI")
    }
}

/// A response body's timers: idle and duration go on after the headers; when one fires the
/// stream is reset (HTTP/1: the connection is closed).
pub(crate) struct BodyTimer {
    pub limits: Limits,
    pub activity: Arc<Activity>,
    sleep: Pin<Box<Sleep>>,
}

impl BodyTimer {
    pub fn new(limits: Limits, activity: Arc<Activity>) -> Option<BodyTimer> {
        let (at, _) = limits.next(&activity, true)?;
        Some(BodyTimer {
            limits,
            activity,
            sleep: Box::pin(tokio::time::sleep_until(at)),
        })
    }

    /// Which timer has fired, if one has; otherwise the waker is registered for the next.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Option<Expired> {
        loop {
            let (at, which) = self.limits.next(&self.activity, true)?;
            if at <= Instant::now() {
                return Some(which);
            }
            if self.sleep.deadline() != at {
                self.sleep.as_mut().reset(at);
            }
            if self.sleep.as_mut().poll(cx).is_pending() {
                return None;
            }
        }
    }
}

/// The streams open on one downstream connection, and since when it has had none.
pub(crate) struct ConnStreams {
    began: Instant,
    active: AtomicUsize,
    /// Streams it has carried.
    pub requests: AtomicU64,
    /// Told when a stream reaches max_requests_per_connection.
    limit_reached: tokio::sync::Notify,
    /// The connection is an upgraded one (websocket, CONNECT) now: no more HTTP on it.
    upgraded: AtomicBool,
    /// Nanoseconds from `began` to when the last stream ended.
    idle_since: AtomicU64,
}

impl ConnStreams {
    pub fn new() -> Arc<ConnStreams> {
        Arc::new(ConnStreams {
            began: Instant::now(),
            active: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            limit_reached: tokio::sync::Notify::new(),
            upgraded: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
        })
    }

    /// Counts a stream open until the slot is dropped.
    pub fn open(self: &Arc<Self>) -> StreamSlot {
        self.active.fetch_add(1, Ordering::Relaxed);
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        StreamSlot(self.clone(), n)
    }

    pub fn busy(&self) -> bool {
        self.active.load(Ordering::Relaxed) > 0
    }

    /// When the connection will have been idle for `t`, if it is idle now.
    fn idle_deadline(&self, t: Duration) -> Option<Instant> {
        (!self.busy())
            .then(|| self.began + Duration::from_nanos(self.idle_since.load(Ordering::Relaxed)) + t)
    }
}

/// A stream's place on its connection: the connection, and which stream it is (1 for the
/// first).
pub(crate) struct StreamSlot(Arc<ConnStreams>, u64);

impl StreamSlot {
    /// Which of its connection's streams this is.
    pub fn index(&self) -> u64 {
        self.1
    }

    /// This stream is at (or past) the last its connection may carry: drain the connection.
    pub fn limit_reached(&self) {
        self.0.limit_reached.notify_one();
    }

    /// The connection carries an upgraded stream from now on (no more HTTP requests on it).
    pub fn upgraded(&self) {
        self.0.upgraded.store(true, Ordering::Relaxed);
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let c = &self.0;
        c.idle_since
            .store(c.began.elapsed().as_nanos() as u64, Ordering::Relaxed);
        c.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's own limits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnLimits {
    pub idle: Option<Duration>,
    pub max_duration: Option<Duration>,
    pub drain: Duration,
    pub request_headers: Option<Duration>,
    /// Streams a connection carries before it is drained (max_requests_per_connection).
    pub max_requests: Option<u64>,
}

/// Why a connection was drained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Drain {
    Idle,
    MaxDuration,
    MaxRequests,
}

impl ConnLimits {
    /// Envoy's defaults: an idle connection is drained after an hour, a drain lasts 5 s.
    pub fn of(hcm: &HttpConnectionManager) -> ConnLimits {
        let common = hcm.common_http_protocol_options.as_ref();
        ConnLimits {
            idle: some(crate::duration(
                common.and_then(|o| o.idle_timeout.as_ref()),
                Duration::from_secs(3600),
            )),
            max_duration: some(crate::duration(
                common.and_then(|o| o.max_connection_duration.as_ref()),
                Duration::ZERO,
            )),
            drain: crate::duration(hcm.drain_timeout.as_ref(), Duration::from_secs(5)),
            request_headers: some(crate::duration(
                hcm.request_headers_timeout.as_ref(),
                Duration::ZERO,
            )),
            max_requests: common
                .and_then(|o| o.max_requests_per_connection)
                .map(|v| v.value as u64)
                .filter(|n| *n > 0),
        }
    }

    /// Waits until the connection is to be drained (idle too long, or at its age limit).
    pub async fn drain_due(&self, streams: &ConnStreams) -> Drain {
        let end = self.max_duration.map(|d| streams.began + d);
        loop {
            let idle = self.idle.and_then(|t| streams.idle_deadline(t));
            let now = Instant::now();
            if end.is_some_and(|e| e <= now) {
                return Drain::MaxDuration;
            }
            if idle.is_some_and(|i| i <= now) {
                return Drain::Idle;
            }
            if self
                .max_requests
                .is_some_and(|m| streams.requests.load(Ordering::Relaxed) >= m)
            {
                return Drain::MaxRequests;
            }
            // Busy connections are looked at again at most every idle period, and when a
            // stream reaches the request limit.
            let wake = [idle, end, self.idle.map(|t| now + t)]
                .into_iter()
                .flatten()
                .min();
            let sleep = async {
                match wake {
                    Some(w) => tokio::time::sleep_until(w).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = sleep => {}
                _ = streams.limit_reached.notified() => {}
            }
        }
    }
}

/// An HTTP/1 downstream connection under `request_headers_timeout`: the timer starts with the
/// first byte of a request and stops when its headers are complete (the stream opens); if it
/// fires, Envoy's 408 is written and the connection ends.
pub(crate) struct HeadersTimeout<T> {
    pub inner: T,
    pub streams: Arc<ConnStreams>,
    pub timeout: Duration,
    /// Armed while a request's headers are coming in.
    timer: Option<Pin<Box<Sleep>>>,
    /// The reply still to write once the timer has fired; then end of stream.
    reply: Option<(Vec<u8>, usize)>,
    /// HTTP/2 (by its preface) is left alone.
    off: bool,
    first: bool,
    /// The server header of the reply.
    server: String,
    pub fired: Arc<AtomicBool>,
}

impl<T> HeadersTimeout<T> {
    pub fn new(
        inner: T,
        streams: Arc<ConnStreams>,
        timeout: Duration,
        server: String,
    ) -> HeadersTimeout<T> {
        HeadersTimeout {
            server,
            inner,
            streams,
            timeout,
            timer: None,
            reply: None,
            off: false,
            first: true,
            fired: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Envoy's reply when a request's headers take too long.
pub(crate) fn request_header_timeout_reply(server: &str) -> Vec<u8> {
    let body = "request header timeout";
    format!(
        "HTTP/1.1 408 Request Timeout\r\ncontent-length: {}\r\ncontent-type: text/plain\r\ndate: {}\r\nserver: {server}\r\nconnection: close\r\n\r\n{body}",
        body.len(),
        httpdate::fmt_http_date(std::time::SystemTime::now()),
    )
    .into_bytes()
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeadersTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some((bytes, at)) = &mut this.reply {
            while *at < bytes.len() {
                match Pin::new(&mut this.inner).poll_write(cx, &bytes[*at..]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                    Poll::Ready(Ok(n)) => *at += n,
                    Poll::Pending => return Poll::Pending,
                }
            }
            let _ = Pin::new(&mut this.inner).poll_flush(cx);
            return Poll::Ready(Ok(()));
        }
        // An upgraded connection (websocket, CONNECT) carries no more request headers.
        if this.off || this.streams.upgraded.load(Ordering::Relaxed) {
            this.timer = None;
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if this.streams.busy() {
            this.timer = None;
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let got = &buf.filled()[before..];
            if this.first && !got.is_empty() {
                this.first = false;
                if got.starts_with(b"PRI * HTTP/2.0") {
                    this.off = true;
                    return r;
                }
            }
            if !got.is_empty() && this.timer.is_none() && !this.streams.busy() {
                this.timer = Some(Box::pin(tokio::time::sleep(this.timeout)));
            }
            return r;
        }
        if let Some(t) = &mut this.timer {
            if t.as_mut().poll(cx).is_ready() && !this.streams.busy() {
                this.timer = None;
                this.fired.store(true, Ordering::Relaxed);
                this.reply = Some((request_header_timeout_reply(&this.server), 0));
                cx.waker().wake_by_ref();
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HeadersTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
