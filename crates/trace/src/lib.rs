//! `herald-trace`: carries one trace across the process boundaries an event crosses (the
//! request, the outbox row, RabbitMQ's headers) as a W3C `traceparent`.
//!
//! Off until [`enable`] is called (the process exports traces): then every helper here
//! returns at once, so an installation without a collector pays one relaxed load per
//! call and writes nothing.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The AMQP header (and outbox column value) that carries the context.
pub const HEADER: &str = "traceparent";

static ON: AtomicBool = AtomicBool::new(false);

/// Turns propagation on; called once the OpenTelemetry layer is installed.
pub fn enable() {
    ON.store(true, Ordering::Relaxed);
}

/// Whether traces are exported by this process.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// A span only when tracing is on: off, callers get [`Span::none`] and build nothing.
pub fn span(make: impl FnOnce() -> Span) -> Span {
    if enabled() {
        make()
    } else {
        Span::none()
    }
}

/// The `traceparent` of the current span, if tracing is on and the span is sampled
/// into a trace.
pub fn current() -> Option<String> {
    if !enabled() {
        return None;
    }
    of(&Span::current())
}

/// The `traceparent` of `span`.
pub fn of(span: &Span) -> Option<String> {
    if !enabled() || span.is_none() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut out = One(None);
    TraceContextPropagator::new().inject_context(&cx, &mut out);
    out.0
}

/// Makes `traceparent` (from a header or a row) the parent of `span`. A missing or
/// malformed value leaves `span` the root of a trace of its own.
pub fn set_parent(span: &Span, traceparent: Option<&str>) {
    let Some(tp) = traceparent.filter(|_| enabled() && !span.is_none()) else {
        return;
    };
    let cx = TraceContextPropagator::new().extract(&One(Some(tp.to_owned())));
    if cx.span().span_context().is_valid() {
        // Fails only for a span that has already started a child; ours are fresh.
        let _ = span.set_parent(cx);
    }
}

/// The `traceparent` among AMQP headers (as `herald-bus` hands them over).
pub fn from_headers(headers: &[(String, String)]) -> Option<&str> {
    if !enabled() {
        return None;
    }
    headers
        .iter()
        .find(|(k, _)| k == HEADER)
        .map(|(_, v)| v.as_str())
}

/// Adds the current span's `traceparent` to outgoing AMQP headers.
pub fn inject(headers: &mut Vec<(String, String)>) {
    if let Some(tp) = current() {
        headers.push((HEADER.to_owned(), tp));
    }
}

/// A carrier of the one header the W3C propagator reads and writes.
struct One(Option<String>);

impl Injector for One {
    fn set(&mut self, key: &str, value: String) {
        if key == HEADER {
            self.0 = Some(value);
        }
    }
}

impl Extractor for One {
    fn get(&self, key: &str) -> Option<&str> {
        (key == HEADER).then_some(self.0.as_deref()).flatten()
    }

    fn keys(&self) -> Vec<&str> {
        vec![HEADER]
    }
}
