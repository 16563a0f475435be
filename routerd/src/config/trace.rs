//! `[trace]` and sglang-router's `--enable-trace` / `--otlp-traces-endpoint`: OpenTelemetry
//! traces (docs/tracing.md).

use std::time::Duration;

use serde::Serialize;

use super::raw::RawTrace;
use super::{layered, At, Builder, Flags};

/// How spans reach the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TraceProtocol {
    /// OTLP/gRPC (port 4317 by convention), as sglang-router exports.
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (`POST .../v1/traces`, port 4318 by convention).
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// `[trace]`, when traces are on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceConfig {
    /// The collector: `http(s)://HOST:PORT` for gRPC; the full `.../v1/traces` URL for HTTP.
    pub endpoint: String,
    pub protocol: TraceProtocol,
    pub service_name: String,
    /// Share of new traces kept; a client's `traceparent` decides for its own traces.
    pub sample_ratio: f64,
    /// Spans waiting for export at most; beyond it new spans are dropped.
    pub max_queue_size: usize,
    pub max_export_batch_size: usize,
    #[serde(serialize_with = "super::ser::duration")]
    pub schedule_delay: Duration,
}

impl Builder<'_> {
    pub(super) fn trace(&mut self, t: RawTrace, f: &Flags) -> Option<TraceConfig> {
        let enabled = f.enable_trace || t.enabled.unwrap_or(false);
        let endpoint = layered(
            f.otlp_traces_endpoint.clone(),
            "--otlp-traces-endpoint",
            t.endpoint.as_ref(),
            // sglang-router's default: a collector on this host.
            "localhost:4317".to_owned(),
        );
        let env = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").ok();
        let protocol = match (&f.otlp_traces_protocol, &t.protocol, env) {
            (Some(p), _, _) => (p.clone(), At::flag("--otlp-traces-protocol")),
            (None, Some(p), _) => (p.get_ref().clone(), At::span(p)),
            (None, None, Some(p)) => (p, At::default()),
            (None, None, None) => ("grpc".to_owned(), At::default()),
        };
        let protocol = match protocol.0.trim() {
            "grpc" => TraceProtocol::Grpc,
            "http/protobuf" | "http" => TraceProtocol::HttpProtobuf,
            other => {
                let msg = format!("{other:?} is not an OTLP protocol: grpc or http/protobuf");
                self.error("trace.protocol", &protocol.1, msg);
                TraceProtocol::Grpc
            }
        };
        let endpoint = match normalize(&endpoint.0, protocol) {
            Ok(e) => e,
            Err(msg) => {
                if enabled {
                    self.error("trace.endpoint", &endpoint.1, msg);
                }
                String::new()
            }
        };
        let ratio = layered(None, "", t.sample_ratio.as_ref(), 1.0);
        let sample_ratio = self.fraction("trace.sample_ratio", ratio, 1.0);
        let queue = t.max_queue_size.as_ref().map(|v| (*v.get_ref() as usize, At::span(v)));
        let max_queue_size = queue.map_or(2048, |q| self.count("trace.max_queue_size", q, 2048));
        let batch = t.max_export_batch_size.as_ref().map(|v| (*v.get_ref() as usize, At::span(v)));
        let max_export_batch_size =
            batch.map_or(512, |b| self.count("trace.max_export_batch_size", b, 512));
        let schedule_delay = self.duration(
            "trace.schedule_delay",
            None,
            t.schedule_delay,
            Duration::from_millis(500),
        );
        let service_name = t.service_name.unwrap_or_else(|| "routerd".to_owned());
        enabled.then_some(TraceConfig {
            endpoint,
            protocol,
            service_name,
            sample_ratio,
            max_queue_size,
            max_export_batch_size,
            schedule_delay,
        })
    }
}

/// The collector's URL as the exporter wants it: sglang-router's `HOST:PORT` form gets
/// `http://`; an HTTP endpoint without a path gets `/v1/traces`.
fn normalize(raw: &str, protocol: TraceProtocol) -> Result<String, String> {
    let raw = raw.trim();
    let url = if raw.contains("://") { raw.to_owned() } else { format!("http://{raw}") };
    let uri: http::Uri = url.parse().map_err(|_| format!("{raw:?} is not HOST:PORT or a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(format!("{raw:?} is not HOST:PORT or an http(s):// URL"));
    }
    if protocol == TraceProtocol::HttpProtobuf && uri.scheme_str() == Some("https") {
        // The HTTP exporter's client here speaks plain HTTP only.
        return Err(format!(
            "{raw:?}: TLS to the collector is over gRPC only; use protocol grpc, or a plain \
             http:// collector (a local agent or sidecar)"
        ));
    }
    if uri.port_u16().is_none() {
        return Err(format!(
            "{raw:?} has no port (the collector's is 4317 for gRPC, 4318 for HTTP)"
        ));
    }
    Ok(match protocol {
        TraceProtocol::HttpProtobuf if uri.path() == "/" => {
            format!("{}/v1/traces", url.trim_end_matches('/'))
        }
        _ => url,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_take_sglang_router_form_and_urls() {
        let g = TraceProtocol::Grpc;
        let h = TraceProtocol::HttpProtobuf;
        assert_eq!(normalize("localhost:4317", g).unwrap(), "http://localhost:4317");
        assert_eq!(normalize("https://otel:4317", g).unwrap(), "https://otel:4317");
        assert_eq!(normalize("10.0.0.5:4318", h).unwrap(), "http://10.0.0.5:4318/v1/traces");
        let custom = "http://c:4318/otlp/v1/traces";
        assert_eq!(normalize(custom, h).unwrap(), custom);
        assert!(normalize("localhost", g).unwrap_err().contains("no port"));
        assert!(normalize("ftp://x:1", g).is_err());
        assert!(normalize("https://c:4318", h).unwrap_err().contains("gRPC only"));
    }
}
