//! The HTTP API: idempotency and bad input.

use std::time::Duration;

use serde_json::{Value, json};
use skald_tests::{Setup, TestEnv, order};

async fn count(env: &TestEnv, table: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM {table}");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(&env.dbs.coordinator)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_idempotency_key_gives_one_saga_and_another_body_conflicts() {
    let mut env = TestEnv::start(Setup::default()).await;
    env.seed(&[("dave", 10_000)], &[("sku-1", 10)]).await;
    let body = order("dave", &[("sku-1", 1, 100)]);

    let first = env.post_order(&body, Some("key-1")).await;
    assert_eq!(first.status(), 202);
    let location = first.headers()["location"].to_str().unwrap().to_owned();
    let first: Value = first.json().await.unwrap();
    assert_eq!(location, format!("/v1/orders/{}", first["order_id"].as_str().unwrap()));

    let again = env.post_order(&body, Some("key-1")).await;
    assert_eq!(again.status(), 202);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["order_id"], first["order_id"]);
    assert_eq!(again["saga_id"], first["saga_id"]);

    let other = env
        .post_order(&order("dave", &[("sku-1", 2, 100)]), Some("key-1"))
        .await;
    assert_eq!(other.status(), 409);
    let err: Value = other.json().await.unwrap();
    assert_eq!(err["error"]["code"], "conflict");

    // Concurrent requests with one key: still one saga.
    let racing = order("dave", &[("sku-1", 3, 100)]);
    let replies = futures::future::join_all((0..8).map(|_| env.post_order(&racing, Some("key-2")))).await;
    let mut ids = Vec::new();
    for r in replies {
        assert_eq!(r.status(), 202);
        let v: Value = r.json().await.unwrap();
        ids.push(v["saga_id"].as_str().unwrap().to_owned());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one saga for one key");
    assert_eq!(count(&env, "sagas").await, 2);
    let order_id = skald_tests::parse_uuid(&first["order_id"]);
    assert_eq!(
        env.wait_for_order(order_id, Duration::from_secs(30)).await["status"],
        "APPROVED"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_json_error_and_stores_nothing() {
    let mut env = TestEnv::start(Setup {
        participants: vec![],
        ..Setup::default()
    })
    .await;
    let url = env.url("/v1/orders");
    let send = |body: Vec<u8>, content_type: &'static str| {
        let req = env.http.post(&url).header("content-type", content_type).body(body);
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            (status, v)
        }
    };
    let valid_line = json!({"sku": "s", "quantity": 1, "unit_price_cents": 1});
    let cases: Vec<(&str, Vec<u8>, &str, u16, &str)> = vec![
        ("malformed", b"{\"customer_id\": ".to_vec(), "application/json", 400, "malformed_json"),
        ("not json", b"hello".to_vec(), "application/json", 400, "malformed_json"),
        (
            "missing field",
            json!({"customer_id": "c", "items": [valid_line]}).to_string().into_bytes(),
            "application/json",
            422,
            "validation_failed",
        ),
        (
            "negative quantity",
            json!({"customer_id": "c", "currency": "EUR", "items": [{"sku": "s", "quantity": -2, "unit_price_cents": 1}]})
                .to_string()
                .into_bytes(),
            "application/json",
            422,
            "validation_failed",
        ),
        (
            "empty items",
            json!({"customer_id": "c", "currency": "EUR", "items": []}).to_string().into_bytes(),
            "application/json",
            422,
            "validation_failed",
        ),
        (
            "wrong type",
            json!({"customer_id": 5, "currency": "EUR", "items": [valid_line]}).to_string().into_bytes(),
            "application/json",
            422,
            "validation_failed",
        ),
        (
            "unknown field",
            json!({"customer_id": "c", "currency": "EUR", "items": [valid_line], "extra": 1}).to_string().into_bytes(),
            "application/json",
            422,
            "validation_failed",
        ),
        (
            "too large",
            {
                let mut big = br#"{"customer_id": "c", "currency": "EUR", "items": [], "pad": ""#.to_vec();
                big.extend(std::iter::repeat_n(b'x', 200 * 1024));
                big.extend(br#""}"#);
                big
            },
            "application/json",
            413,
            "payload_too_large",
        ),
        ("not json content type", b"a=b".to_vec(), "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ];
    for (name, body, ct, status, code) in cases {
        let (got, v) = send(body, ct).await;
        assert_eq!(got, status, "{name}: {v}");
        assert_eq!(v["error"]["code"], code, "{name}: {v}");
        assert!(
            v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: {v}"
        );
    }
    let bad_key = env
        .http
        .post(&url)
        .header("Idempotency-Key", "has spaces")
        .json(&order("c", &[("s", 1, 1)]))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_key.status(), 422);
    for table in ["sagas", "orders", "outbox", "idempotency_keys"] {
        assert_eq!(count(&env, table).await, 0, "{table} must stay empty");
    }

    let (s, v) = env.get_json(&format!("/v1/orders/{}", uuid::Uuid::new_v4())).await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")));
    let (s, _) = env.get_json(&format!("/v1/sagas/{}", uuid::Uuid::new_v4())).await;
    assert_eq!(s, 404);
    let (s, v) = env.get_json("/v1/sagas/not-a-uuid").await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_request")));
    let (s, _) = env.get_json("/v1/sagas?status=NOPE").await;
    assert_eq!(s, 400);
    let (s, _) = env.get_json("/v1/sagas?limit=0").await;
    assert_eq!(s, 400);
    let (s, v) = env.get_json("/healthz").await;
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")));
    let (s, v) = env.get_json("/readyz").await;
    assert_eq!(s, 200, "{v}");
    // Operator actions need the bearer token.
    let r = env
        .http
        .post(env.url(&format!("/v1/sagas/{}/retry", uuid::Uuid::new_v4())))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    env.stop().await;
}
