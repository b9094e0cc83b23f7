//! The operators' HTTP views: dead letters, participant queues, readiness,
//! saga filters and paging, the dashboard's files.

use std::time::Duration;

use serde_json::Value;
use skald_participants::app::Which;
use skald_tests::{ADMIN_TOKEN, Setup, TestEnv, eventually, order, publish_raw};
use skald_wire::contract::COMMANDS_EXCHANGE;
use uuid::Uuid;

use crate::messaging::command;

const WITHIN: Duration = Duration::from_secs(30);

async fn post(env: &TestEnv, base: &str, path: &str, token: Option<&str>) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut req = env.http.post(format!("{base}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("POST");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, resp.json().await.unwrap_or(Value::Null), headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_browsed_over_http_and_replayed_by_an_operator_only() {
    let mut env = TestEnv::start(Setup {
        participants: vec![Which::Payment],
        ..Setup::default()
    })
    .await;
    env.seed(&[("liam", 1_000)], &[]).await;
    let (conn, _ch) = env.amqp().await;
    let order_id = Uuid::now_v7();
    let message_id = Uuid::now_v7();
    let body = command(Uuid::now_v7(), order_id, 1, "action", "liam", 150);
    skald_tests::publish_dead_letter(
        &conn,
        message_id,
        "payment",
        "ChargePayment",
        "a <b>poison</b> pill",
        body,
    )
    .await;

    for _ in 0..2 {
        let (status, v) = env.get_json("/v1/dead-letters").await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["truncated"], false);
        let letters = v["dead_letters"].as_array().unwrap();
        assert_eq!(letters.len(), 1, "listing consumes nothing: {v}");
        let l = &letters[0];
        assert_eq!(l["message_id"], message_id.to_string());
        assert_eq!(l["message_type"], "ChargePayment");
        assert_eq!(l["reason"], "a <b>poison</b> pill");
        assert_eq!(l["original_queue"], "skald.payment.commands");
        assert_eq!(l["original_exchange"], COMMANDS_EXCHANGE);
        assert!(l["body"].as_str().unwrap().contains("liam"));
    }
    let (status, v) = env.get_json("/v1/dead-letters?limit=0").await;
    assert_eq!((status, v["error"]["code"].as_str()), (400, Some("bad_request")));

    let base = env.base_url.clone();
    let replay = format!("/v1/dead-letters/{message_id}/replay");
    let (status, v, headers) = post(&env, &base, &replay, None).await;
    assert_eq!((status, v["error"]["code"].as_str()), (401, Some("unauthorized")));
    assert_eq!(headers["www-authenticate"], "Bearer");
    assert_eq!(post(&env, &base, &replay, Some("wrong-token")).await.0, 401);
    // A coordinator without ADMIN_TOKEN refuses every operator action.
    let mut open = env.coordinator_config.clone();
    open.admin_token = None;
    let open_base = env.start_coordinator(open).await;
    let (status, v, _) = post(&env, &open_base, &replay, Some(ADMIN_TOKEN)).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("operator_actions_disabled"))
    );
    assert!(env.payments(order_id).await.is_empty(), "nothing was replayed yet");

    let (status, v, _) = post(&env, &base, &replay, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["dead_letter"]["message_id"], message_id.to_string());
    assert_ne!(v["new_message_id"], message_id.to_string());
    eventually("the replayed charge", WITHIN, || async {
        (env.payments(order_id).await == vec![("CHARGED".to_owned(), 150)]).then_some(())
    })
    .await;
    // The replayed letter is gone. (The payment's reply names a saga this
    // coordinator never ran, so the coordinator may dead-letter that reply.)
    let (_, v) = env.get_json("/v1/dead-letters").await;
    let ids: Vec<&str> = v["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["message_id"].as_str().unwrap())
        .collect();
    assert!(
        !ids.contains(&message_id.to_string().as_str()),
        "replayed letters leave the queue: {v}"
    );
    let (status, v, _) = post(&env, &base, &replay, Some(ADMIN_TOKEN)).await;
    assert_eq!((status, v["error"]["code"].as_str()), (404, Some("not_found")));
    env.stop().await;
}

fn queue<'a>(report: &'a Value, participant: &str) -> &'a Value {
    report["queues"]
        .as_array()
        .and_then(|qs| qs.iter().find(|q| q["participant"] == participant))
        .unwrap_or(&Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_participants_panel_and_readyz_show_queues_without_consumers() {
    let mut env = TestEnv::start(Setup {
        participants: vec![Which::Order, Which::Payment],
        ..Setup::default()
    })
    .await;
    let (_conn, ch) = env.amqp().await;
    for _ in 0..3 {
        let body = command(Uuid::now_v7(), Uuid::now_v7(), 1, "action", "mia", 10);
        publish_raw(&ch, COMMANDS_EXCHANGE, "inventory", "ReserveStock", &body).await;
    }

    // The management API refreshes its figures every few seconds.
    let report = eventually("the management API's view", WITHIN, || async {
        let (status, v) = env.get_json("/v1/participants").await;
        assert_eq!(status, 200, "{v}");
        let settled = queue(&v, "inventory")["ready"] == 3
            && queue(&v, "order")["consumers"].as_u64() >= Some(1)
            && queue(&v, "payment")["consumers"].as_u64() >= Some(1);
        settled.then_some(v)
    })
    .await;
    assert_eq!(
        report["source"], "management_api",
        "is the management plugin enabled? `rabbitmq-plugins enable rabbitmq_management`, as .ci/run does: {report}"
    );
    let inventory = queue(&report, "inventory");
    assert_eq!(inventory["queue"], "skald.inventory.commands");
    assert_eq!(
        (inventory["consumers"].as_u64(), inventory["unacked"].as_u64()),
        (Some(0), Some(0))
    );

    let (status, ready) = env.get_json("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["status"], "degraded");
    assert_eq!(
        ready["queues_without_consumers"],
        serde_json::json!(["skald.inventory.commands"])
    );
    assert_eq!(ready["checks"]["rabbitmq"], "ok");

    // Without the management API: a passive declare, exact but without unacked.
    let mut no_management = env.coordinator_config.clone();
    no_management.amqp_management_url = Some("http://127.0.0.1:9".to_owned());
    let base = env.start_coordinator(no_management).await;
    let v: Value = env
        .http
        .get(format!("{base}/v1/participants"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["source"], "amqp", "{v}");
    assert!(v["management_error"].as_str().unwrap().contains("127.0.0.1:9"), "{v}");
    assert_eq!(queue(&v, "inventory")["ready"], 3);
    assert_eq!(queue(&v, "inventory")["unacked"], Value::Null);
    assert!(queue(&v, "order")["consumers"].as_u64() >= Some(1));

    env.start_participant(Which::Inventory).await;
    eventually("readyz ready once inventory consumes", WITHIN, || async {
        let (status, v) = env.get_json("/readyz").await;
        (status == 200 && v["status"] == "ready").then_some(())
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_are_filtered_and_paged_and_the_dashboard_is_served() {
    let mut env = TestEnv::start(Setup {
        participants: vec![],
        ..Setup::default()
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(env.place_order(&order(&format!("c-{i}"), &[("sku-1", 1, 100)])).await.1);
    }
    let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    let listed = |v: &Value| -> Vec<String> {
        v["sagas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["saga_id"].as_str().unwrap().to_owned())
            .collect()
    };

    let (_, v) = env.get_json("/v1/sagas?status=RUNNING&saga_type=order&status=").await;
    assert_eq!(
        v["error"]["code"], "bad_request",
        "a repeated parameter is refused: {v}"
    );
    let (_, v) = env
        .get_json("/v1/sagas?status=RUNNING&saga_type=order&created_before=2999-01-01T00:00:00Z")
        .await;
    assert_eq!(listed(&v), ids);
    assert_eq!(v["sagas"][0]["current_step"], "create_order");
    let (_, v) = env.get_json("/v1/sagas?saga_type=payroll").await;
    assert_eq!(listed(&v), Vec::<String>::new());
    let (_, v) = env.get_json("/v1/sagas?created_after=2999-01-01T00:00:00Z").await;
    assert_eq!(listed(&v), Vec::<String>::new());
    let (_, v) = env.get_json("/v1/sagas?status=&saga_type=&limit=").await;
    assert_eq!(listed(&v), ids, "empty parameters count as absent");

    // Newest first, two at a time.
    let mut newest_first = Vec::new();
    let mut after = String::new();
    loop {
        let (status, v) = env
            .get_json(&format!("/v1/sagas?order=desc&limit=2&after={after}"))
            .await;
        assert_eq!(status, 200, "{v}");
        newest_first.extend(listed(&v));
        match v["next"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    let mut reversed = ids.clone();
    reversed.reverse();
    assert_eq!(newest_first, reversed);

    for bad in [
        "limit=0",
        "limit=501",
        "limit=ten",
        "status=LOST",
        "order=sideways",
        "after=nope",
        "created_after=yesterday",
    ] {
        let (status, v) = env.get_json(&format!("/v1/sagas?{bad}")).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "{bad}: {v}"
        );
    }

    let (status, v) = env.get_json("/v1/stats").await;
    assert_eq!(status, 200);
    assert_eq!(v["by_status"]["RUNNING"], 5, "{v}");
    assert_eq!(v["by_status"]["STUCK"], 0);
    assert_eq!(v["total"], 5);
    assert_eq!(v["saga_types"], serde_json::json!(["order"]));

    let (status, v) = env.get_json("/v1/nowhere").await;
    assert_eq!((status, v["error"]["code"].as_str()), (404, Some("not_found")));
    let resp = env.http.delete(env.url("/v1/sagas")).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "method_not_allowed"
    );

    let page = env.http.get(env.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe"), "{csp}");
    let html = page.text().await.unwrap();
    for asset in ["/dashboard/app.js", "/dashboard/app.css"] {
        assert!(html.contains(asset), "the page loads {asset}");
        let resp = env.http.get(env.url(asset)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{asset}");
    }
    let js = env
        .http
        .get(env.url("/dashboard/app.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!js.contains("innerHTML"), "values go into the page as text only");
    env.stop().await;
}
