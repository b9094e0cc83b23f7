//! Logging and tracing set-up shared by every binary.
//!
//! - Logs: `RUST_LOG` filters, `LOG_FORMAT=json` for JSON lines, on stderr.
//!   Spans carry the saga id, step, attempt and kind as fields, so every log
//!   line inside them does too.
//! - Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, spans of target
//!   [`crate::trace::TARGET`] and the coordinator's after-the-fact spans are
//!   exported over OTLP HTTP/protobuf by a batch processor; off otherwise.
//!   [`Telemetry::shutdown`] flushes them (call it on graceful shutdown).
//!   The export filter is independent of `RUST_LOG`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::trace::{SagaIdGenerator, TARGET};

static OTEL_ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (a tracer provider is installed).
pub fn otel_enabled() -> bool {
    OTEL_ENABLED.load(Ordering::Relaxed)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// How to set telemetry up; [`Options::from_env`] reads the environment.
#[derive(Debug, Clone)]
pub struct Options {
    /// `service.name` of exported spans, unless `OTEL_SERVICE_NAME` is set.
    pub service_name: String,
    /// Used when `RUST_LOG` is unset.
    pub default_filter: String,
    pub json: bool,
    /// Export traces. `Some(None)`: to the endpoint named by the standard
    /// `OTEL_EXPORTER_OTLP_*` variables; `Some(Some(url))`: to `url` + `/v1/traces`.
    pub otlp: Option<Option<String>>,
}

impl Options {
    pub fn from_env(service_name: &str, default_filter: &str) -> Self {
        let set = |v: Result<String, std::env::VarError>| v.is_ok_and(|v| !v.trim().is_empty());
        let otlp = set(std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT"))
            || set(std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"));
        Self {
            service_name: service_name.to_owned(),
            default_filter: default_filter.to_owned(),
            json: std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json")),
            otlp: otlp.then_some(None),
        }
    }
}

/// Keeps the tracer provider alive; [`Telemetry::shutdown`] flushes it.
#[must_use = "call shutdown() on graceful shutdown so that buffered spans are exported"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans buffered so far (blocks until the exporter answers).
    pub fn flush(&self) {
        if let Some(provider) = &self.provider
            && let Err(e) = provider.force_flush()
        {
            tracing::warn!(error = %e, "flushing spans failed");
        }
    }

    /// Exports the spans still buffered (bounded wait) and stops the exporter.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(provider) = self.provider.take() {
            OTEL_ENABLED.store(false, Ordering::Relaxed);
            if let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(5)) {
                eprintln!("telemetry: flushing spans failed: {e}");
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Installs the global subscriber from the environment. Call once, at start-up.
/// An unusable OTLP configuration is reported on stderr and export stays off.
pub fn init(service_name: &str, default_filter: &str) -> Telemetry {
    match init_with(Options::from_env(service_name, default_filter)) {
        Ok(t) => t,
        Err(e) => {
            // The endpoint may be in the message: no credentials in logs.
            eprintln!(
                "telemetry: {}; traces are not exported",
                crate::db::redact(&e.to_string())
            );
            init_with(Options {
                otlp: None,
                ..Options::from_env(service_name, default_filter)
            })
            .unwrap_or(Telemetry { provider: None })
        }
    }
}

/// Installs the global subscriber (and tracer provider) as `options` say.
/// If a subscriber is already installed, it is left in place.
pub fn init_with(options: Options) -> Result<Telemetry, Error> {
    let provider = match &options.otlp {
        Some(endpoint) => Some(provider(&options.service_name, endpoint.as_deref())?),
        None => None,
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&options.default_filter));
    let fmt = if options.json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).boxed()
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("skald"))
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                meta.target() == TARGET || (meta.is_event() && *meta.level() <= tracing::Level::WARN)
            }))
    });
    // Saga spans are always on for logs too, whatever RUST_LOG says: their
    // fields (saga id, step, attempt) then label every log line inside them.
    let saga_spans = tracing_subscriber::filter::filter_fn(|meta| meta.is_span() && meta.target() == TARGET);
    let installed = tracing_subscriber::registry()
        .with(fmt.with_filter(filter.or(saga_spans)))
        .with(otel)
        .try_init()
        .is_ok();
    if let Some(p) = &provider
        && installed
    {
        opentelemetry::global::set_tracer_provider(p.clone());
        OTEL_ENABLED.store(true, Ordering::Relaxed);
    }
    Ok(Telemetry {
        provider: provider.filter(|_| installed),
    })
}

fn provider(service_name: &str, endpoint: Option<&str>) -> Result<SdkTracerProvider, Error> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary);
    if let Some(base) = endpoint {
        exporter = exporter.with_endpoint(format!("{}/v1/traces", base.trim_end_matches('/')));
    }
    let exporter = exporter.build()?;
    let resource = if std::env::var_os("OTEL_SERVICE_NAME").is_some() {
        Resource::builder().build()
    } else {
        Resource::builder().with_service_name(service_name.to_owned()).build()
    };
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_id_generator(SagaIdGenerator::default())
        .with_resource(resource)
        .build())
}

/// One line for an error and its causes, without the repetition that comes
/// from errors that also print their source.
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Outer(#[source] Inner);
    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner;

    #[test]
    fn one_line_does_not_repeat_causes() {
        assert_eq!(super::one_line(&Outer(Inner)), "outer: inner");
    }
}
