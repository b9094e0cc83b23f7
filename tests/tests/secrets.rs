//! Secrets never show: not in `/readyz`, not in error bodies, not in logs.
//! A RabbitMQ user with a password of its own, a Redis URL with a password
//! and an admin token; every log line of the run (debug level, all crates)
//! is captured and searched for them. A test binary of its own, because it
//! installs the process's log subscriber.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use skald_coordinator::http::{ApiState, router};
use skald_coordinator::participants::BrokerInspector;
use skald_coordinator::store::Store;
use skald_participants::app::Which;
use skald_tests::{Setup, TestEnv, rabbitmqctl};
use uuid::Uuid;

/// Every log line, as written.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Deletes the RabbitMQ user when the test ends, even on failure.
struct User(String);

impl Drop for User {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.0])
            .output();
    }
}

async fn get(http: &reqwest::Client, url: String) -> (u16, String) {
    let resp = http.get(url).send().await.expect("GET");
    (resp.status().as_u16(), resp.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_and_tokens_appear_in_no_answer_and_no_log() {
    let logs = Captured::default();
    let sink = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .init();

    let mut env = TestEnv::start(Setup {
        participants: vec![Which::Order],
        ..Setup::default()
    })
    .await;
    let secret = |what: &str| format!("{what}-{}", &Uuid::new_v4().simple().to_string()[..12]);
    let (amqp_pw, wrong_pw, redis_pw, token) =
        (secret("AmqpPw"), secret("WrongPw"), secret("RedisPw"), secret("Token"));
    let vhost = env.names.id.clone();
    let user = User(format!("{vhost}_user"));
    {
        let (user, vhost, pw) = (user.0.clone(), vhost.clone(), amqp_pw.clone());
        tokio::task::spawn_blocking(move || {
            rabbitmqctl(&["add_user", &user, &pw]);
            rabbitmqctl(&["set_permissions", "-p", &vhost, &user, ".*", ".*", ".*"]);
            rabbitmqctl(&["set_user_tags", &user, "monitoring"]);
        })
        .await
        .unwrap();
    }

    // A coordinator whose AMQP URL carries a password (used for the management API too).
    let mut config = env.coordinator_config.clone();
    config.amqp_url = format!("amqp://{}:{amqp_pw}@127.0.0.1:5672/{vhost}", user.0);
    config.admin_token = Some(token.clone());
    let base = env.start_coordinator(config.clone()).await;
    let mut answers = Vec::new();
    let (status, body) = get(&env.http, format!("{base}/readyz")).await;
    assert_eq!(status, 200, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["status"], "degraded", "{body}");
    answers.push(body);
    let (status, body) = get(&env.http, format!("{base}/v1/participants")).await;
    assert_eq!(status, 200, "{body}");
    let report: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        report["source"], "management_api",
        "the URL's credentials open the management API: {body}"
    );
    answers.push(body);
    let resp = env
        .http
        .post(format!("{base}/v1/sagas/{}/retry", Uuid::now_v7()))
        .bearer_auth(format!("{token}x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    answers.push(resp.text().await.unwrap());

    // The same API with a wrong AMQP password and a Redis password: everything unreachable.
    let pool = skald_wire::db::lazy_pool(&config.database_url, 2).unwrap();
    let store = Store::new(
        pool,
        config.registry().unwrap(),
        Default::default(),
        skald_wire::faults::Faults::parse("", &["coordinator"]).unwrap(),
    );
    let bad_amqp = format!("amqp://{}:{wrong_pw}@127.0.0.1:5672/{vhost}", user.0);
    let (intake, _intake_task) =
        skald_coordinator::intake::OrderIntake::spawn(store.clone(), 8, std::time::Duration::ZERO);
    let state = ApiState {
        store,
        intake,
        broker: BrokerInspector::new(&bad_amqp, None, vec!["order".to_owned()]).unwrap(),
        amqp_url: bad_amqp.into(),
        redis_url: format!("redis://:{redis_pw}@127.0.0.1:6379").into(),
        admin_token: Some(token.as_str().into()),
        body_limit: 1024,
        saga_types: Arc::from(vec!["order".to_owned()]),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bad_base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, router(state)).await });
    let (status, body) = get(&env.http, format!("{bad_base}/readyz")).await;
    assert_eq!(status, 503, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (ready["checks"]["rabbitmq"].as_str(), ready["checks"]["redis"].as_str()),
        (Some("unreachable"), Some("unreachable")),
        "{body}"
    );
    answers.push(body);
    for path in ["/v1/participants", "/v1/dead-letters"] {
        let (status, body) = get(&env.http, format!("{bad_base}{path}")).await;
        assert_eq!(status, 503, "{path}: {body}");
        answers.push(body);
    }
    server.abort();
    env.stop().await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        logs.contains("request failed: service unavailable"),
        "the logs were captured"
    );
    for s in [&amqp_pw, &wrong_pw, &redis_pw, &token] {
        for a in &answers {
            assert!(!a.contains(s.as_str()), "an answer shows a secret: {a}");
        }
        if let Some(line) = logs.lines().find(|l| l.contains(s.as_str())) {
            panic!("a log line shows a secret: {line}");
        }
    }
}
