//! Trace propagation and OTLP export, end to end.
//!
//! A test binary of its own (the tracing subscriber and the tracer provider
//! are global to a process). A tiny OTLP/HTTP collector decodes what Skald
//! exports; spy queues bound next to the real ones receive a copy of every
//! command and reply, so their `traceparent` headers can be checked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::Value;
use skald_tests::{Setup, TestEnv, eventually, header, order, parse_uuid, take_messages};
use skald_wire::Kind;
use skald_wire::contract::{COMMANDS_EXCHANGE, HEADER_TRACEPARENT, REPLIES_EXCHANGE, REPLIES_ROUTING_KEY};
use skald_wire::telemetry::{Options, init_with};
use skald_wire::trace::{Role, parse_traceparent, saga_span_id, span_id, traceparent};

const WITHIN: Duration = Duration::from_secs(60);

type Collected = Arc<Mutex<Vec<Span>>>;

/// An OTLP/HTTP trace receiver on a free port: returns its base URL.
async fn collector(spans: Collected) -> String {
    let app = Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let spans = spans.clone();
            async move {
                let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                    return StatusCode::BAD_REQUEST;
                };
                let mut all = spans.lock().unwrap();
                for rs in request.resource_spans {
                    for ss in rs.scope_spans {
                        all.extend(ss.spans);
                    }
                }
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn kind_of(v: &Value) -> Kind {
    v["kind"].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_per_saga_linked_by_traceparent_and_exported_over_otlp() {
    let spans: Collected = Arc::default();
    let endpoint = collector(spans.clone()).await;
    // LOG_FORMAT and RUST_LOG apply as in the binaries.
    let telemetry = init_with(Options {
        otlp: Some(Some(endpoint)),
        ..Options::from_env("skald-tracing-test", "warn")
    })
    .expect("telemetry");
    assert!(skald_wire::telemetry::otel_enabled());

    let mut env = TestEnv::start(Setup::default()).await;
    env.seed(&[("rich", 100_000), ("poor", 10)], &[("sku-a", 100)]).await;
    // Spy queues get a copy of every command and every reply.
    let (conn, ch) = env.amqp().await;
    for (queue, exchange, keys) in [
        ("spy.commands", COMMANDS_EXCHANGE, vec!["order", "payment", "inventory"]),
        ("spy.replies", REPLIES_EXCHANGE, vec![REPLIES_ROUTING_KEY]),
    ] {
        ch.queue_declare(queue.into(), QueueDeclareOptions::default(), FieldTable::default())
            .await
            .unwrap();
        for key in keys {
            ch.queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        }
    }

    let (_, completed) = env.place_order(&order("rich", &[("sku-a", 1, 100)])).await;
    let (_, compensated) = env.place_order(&order("poor", &[("sku-a", 1, 100)])).await;
    assert_eq!(env.wait_for_saga_final(completed, WITHIN).await["status"], "COMPLETED");
    assert_eq!(
        env.wait_for_saga_final(compensated, WITHIN).await["status"],
        "COMPENSATED"
    );

    // Commands: 4 actions, then create + charge (refused) + the compensation of create.
    let commands = take_messages(&ch, "spy.commands", 7, WITHIN).await;
    let replies = take_messages(&ch, "spy.replies", 7, WITHIN).await;
    let _ = conn.close(200, "done".into()).await;
    for (body, headers) in &commands {
        let saga = parse_uuid(&body["saga_id"]);
        let (step, attempt) = (body["step"].as_str().unwrap(), body["attempt"].as_u64().unwrap() as u32);
        let tp = header(headers, HEADER_TRACEPARENT).expect("command has a traceparent");
        assert!(tp.starts_with(&format!("00-{}-", saga.simple())), "{tp}");
        assert!(tp.ends_with("-01"), "{tp}");
        assert_eq!(
            tp,
            traceparent(saga, span_id(saga, step, attempt, kind_of(body), Role::Attempt))
        );
    }

    // Replies: same trace; their parent is the participant's span, which is a
    // child of the command's (the coordinator's attempt span).
    let mut expected_participant_spans = HashMap::new();
    for (body, headers) in &replies {
        let saga = parse_uuid(&body["saga_id"]);
        let tp = header(headers, HEADER_TRACEPARENT).expect("reply has a traceparent");
        let parent = parse_traceparent(&tp).expect("valid traceparent");
        assert_eq!(parent.trace_id().to_bytes(), *saga.as_bytes(), "{tp}");
        let (step, attempt) = (body["step"].as_str().unwrap(), body["attempt"].as_u64().unwrap() as u32);
        let attempt_span = span_id(saga, step, attempt, kind_of(body), Role::Attempt);
        expected_participant_spans.insert(parent.span_id().to_bytes(), (saga, attempt_span, step.to_owned()));
    }
    assert_eq!(expected_participant_spans.len(), 7, "one participant span per command");

    // Exported spans: the coordinator's attempt spans (ids as in the
    // commands' traceparent) under the saga's root span, and the
    // participants' spans under them.
    let (expected, sent) = (&expected_participant_spans, &commands);
    let by_id = eventually("every span to be exported", WITHIN, || {
        let spans = spans.clone();
        let telemetry = &telemetry;
        async move {
            tokio::task::block_in_place(|| telemetry.flush());
            let all = spans.lock().unwrap().clone();
            let by_id: HashMap<Vec<u8>, Span> = all.into_iter().map(|s| (s.span_id.clone(), s)).collect();
            let roots = [completed, compensated]
                .iter()
                .all(|s| by_id.contains_key(saga_span_id(*s).to_bytes().as_slice()));
            let participants = expected.keys().all(|id| by_id.contains_key(id.as_slice()));
            let attempts = sent.iter().all(|(b, _)| {
                let saga = parse_uuid(&b["saga_id"]);
                let id = span_id(
                    saga,
                    b["step"].as_str().unwrap(),
                    b["attempt"].as_u64().unwrap() as u32,
                    kind_of(b),
                    Role::Attempt,
                );
                by_id.contains_key(id.to_bytes().as_slice())
            });
            (roots && participants && attempts).then_some(by_id)
        }
    })
    .await;

    for saga in [completed, compensated] {
        let root = &by_id[saga_span_id(saga).to_bytes().as_slice()];
        assert_eq!(root.trace_id, saga.as_bytes().to_vec());
        assert!(root.parent_span_id.is_empty(), "the saga span is the root");
        assert_eq!(root.name, "saga order");
    }
    for (body, _) in &commands {
        let saga = parse_uuid(&body["saga_id"]);
        let step = body["step"].as_str().unwrap();
        let kind = kind_of(body);
        let id = span_id(
            saga,
            step,
            body["attempt"].as_u64().unwrap() as u32,
            kind,
            Role::Attempt,
        );
        let span = &by_id[id.to_bytes().as_slice()];
        assert_eq!(span.trace_id, saga.as_bytes().to_vec());
        assert_eq!(span.parent_span_id, saga_span_id(saga).to_bytes().to_vec());
        assert_eq!(span.name, format!("{step} {}", kind.as_str()));
        assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
    }
    for (id, (saga, attempt_span, _step)) in &expected_participant_spans {
        let span = &by_id[id.as_slice()];
        assert_eq!(span.trace_id, saga.as_bytes().to_vec());
        assert_eq!(&span.parent_span_id, &attempt_span.to_bytes().to_vec(), "{}", span.name);
        let participant = span.name.split(' ').next().unwrap();
        assert!(
            ["order", "payment", "inventory"].contains(&participant),
            "{}",
            span.name
        );
        let saga_attr = span.attributes.iter().find(|kv| kv.key == "saga_id");
        assert!(
            saga_attr.is_some(),
            "participant span records the saga id: {:?}",
            span.attributes
        );
    }
    // Every exported span of a saga carries its id as the trace id.
    let trace_ids: Vec<Vec<u8>> = [completed, compensated].iter().map(|s| s.as_bytes().to_vec()).collect();
    let per_saga = by_id.values().filter(|s| trace_ids.contains(&s.trace_id)).count();
    assert_eq!(per_saga, 2 + 7 + 7, "root + attempt + participant spans");

    env.stop().await;
    tokio::task::block_in_place(|| telemetry.shutdown());
}
