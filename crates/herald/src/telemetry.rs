use crate::config::{LogConfig, TelemetryConfig};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder once per process.
pub fn metrics() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ];
            // Dispatch has a 25 ms p99 target: its histograms need buckets around it.
            let dispatch = [
                0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02,
                0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ];
            PrometheusBuilder::new()
                .set_buckets(&buckets)
                .ok()?
                .set_buckets_for_metric(Matcher::Prefix("herald_dispatch_".into()), &dispatch)
                .ok()?
                .install_recorder()
                .ok()
                .inspect(|_| described())
        })
        .clone()
}

/// Logs to stderr, and with `telemetry.otlp_endpoint` set also exports spans over
/// OTLP/HTTP. Call inside the tokio runtime: the exporter's batches are sent from a
/// task on it.
pub fn init(log: &LogConfig, telemetry: &TelemetryConfig) -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.filter));
    let endpoint = telemetry.otlp_endpoint.trim();
    if endpoint.is_empty() {
        // No exporter: the log filter stays global, so disabled call sites cost nothing.
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        let _ = if log.json {
            builder.json().try_init()
        } else {
            builder.try_init()
        };
        return Ok(());
    }
    let otel = otel_layer(endpoint, &telemetry.service_name)?;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // The log filter applies to the log only: the trace keeps Herald's spans whatever
    // the log level.
    let fmt = if log.json {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    // A second init keeps the first subscriber, and propagation as it was.
    if tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok()
    {
        herald_trace::enable();
    }
    Ok(())
}

static PROVIDER: OnceLock<opentelemetry_sdk::trace::SdkTracerProvider> = OnceLock::new();

fn otel_layer<S>(endpoint: &str, service: &str) -> anyhow::Result<impl tracing_subscriber::Layer<S>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use anyhow::Context;
    use opentelemetry::trace::TracerProvider;
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
    use tracing_subscriber::Layer;

    // The collector's base URL, as OTEL_EXPORTER_OTLP_ENDPOINT: spans go to /v1/traces.
    let base = endpoint.trim_end_matches('/');
    let url = if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    };
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .context("telemetry HTTP client")?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(url)
        .build()
        .context("invalid configuration: telemetry.otlp_endpoint")?;
    let processor =
        BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("herald");
    let _ = PROVIDER.set(provider);
    // Herald's own spans only: the libraries' (hyper, sqlx, lapin) would swamp the
    // trace, and the exporter's own requests would trace themselves.
    let targets =
        tracing_subscriber::filter::Targets::new().with_target("herald", tracing::Level::INFO);
    Ok(tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(targets))
}

/// Sends the spans still buffered; a no-op without an exporter. The flush blocks, so
/// it runs off the runtime's worker threads.
pub async fn shutdown() {
    if let Some(provider) = PROVIDER.get().cloned() {
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = provider.shutdown() {
                eprintln!("herald: flushing traces: {e}");
            }
        })
        .await;
    }
}

/// Series that alert rules read but that may stay silent for days: exported at 0 from
/// the start, so that `increase()` sees their first step.
fn described() {
    for reason in ["gone", "failing", "manual"] {
        metrics::counter!("herald_webhooks_disabled_total", "reason" => reason).increment(0);
    }
}
