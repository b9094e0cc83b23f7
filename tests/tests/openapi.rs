//! The OpenAPI document against the running coordinator: schemathesis
//! generates requests from `GET /v1/openapi.json` (valid and invalid ones)
//! and checks that no answer is a server error and every answer matches
//! its documented schema. Needs schemathesis: `scripts/install-test-tools.sh`.
//! `SCHEMATHESIS_MAX_EXAMPLES` (default 10) and `SCHEMATHESIS_MAX_TIME`
//! (seconds, default 30) bound the run.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use skald_tests::{ADMIN_TOKEN, Setup, TestEnv};

/// `$SCHEMATHESIS`, else the virtualenv that scripts/install-test-tools.sh makes.
fn schemathesis() -> PathBuf {
    if let Some(p) = std::env::var_os("SCHEMATHESIS") {
        return p.into();
    }
    let venv = std::env::var_os("SKALD_VENV").unwrap_or_else(|| "/opt/skald-venv".into());
    PathBuf::from(venv).join("bin/schemathesis")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_keeps_to_its_openapi_document() {
    let tool = schemathesis();
    assert!(
        tool.exists(),
        "schemathesis not found at {}: run scripts/install-test-tools.sh (or set SCHEMATHESIS)",
        tool.display()
    );
    let t0 = Instant::now();
    let mut env = TestEnv::start(Setup::default()).await;
    env.seed(&[("c-1", 1_000_000)], &[("sku-1", 1_000)]).await;

    let (status, doc) = env.get_json("/v1/openapi.json").await;
    assert_eq!(status, 200);
    assert!(doc["paths"]["/v1/orders"]["post"].is_object(), "{doc}");
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");

    let work = std::env::temp_dir().join(format!("{}-schemathesis", env.names.id));
    std::fs::create_dir_all(&work).unwrap();
    let schema_url = env.url("/v1/openapi.json");
    let base_url = env.base_url.clone();
    // Bounded so that the test takes under a minute; raise them for a deeper run.
    let max_examples = std::env::var("SCHEMATHESIS_MAX_EXAMPLES").unwrap_or_else(|_| "10".to_owned());
    let max_time = std::env::var("SCHEMATHESIS_MAX_TIME").unwrap_or_else(|_| "30".to_owned());
    println!("environment ready in {:.1?}", t0.elapsed());
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(tool)
            .current_dir(&work) // its .hypothesis/ cache goes there
            .env("NO_COLOR", "1")
            .args([
                "run",
                &schema_url,
                "--url",
                &base_url,
                "--checks",
                "not_a_server_error,response_schema_conformance",
                "--max-examples",
                &max_examples,
                "--max-time",
                &max_time,
                "--seed",
                "20250101",
                "--workers",
                "2",
                "--request-timeout",
                "10",
                "--header",
                &format!("Authorization: Bearer {ADMIN_TOKEN}"),
                "--suppress-health-check",
                "all",
            ])
            .output()
            .expect("schemathesis runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("schemathesis took {:.1?}\n{stdout}\n{stderr}", started.elapsed());
    assert!(
        out.status.success(),
        "schemathesis found problems (exit {:?}):\n{stdout}\n{stderr}",
        out.status.code()
    );
    // It did test something: the orders it posted exist.
    let (_, page) = env.get_json("/v1/sagas?limit=1").await;
    assert!(page["sagas"].as_array().is_some_and(|s| !s.is_empty()), "{page}");
    let t1 = Instant::now();
    env.stop().await;
    println!("stopped in {:.1?}", t1.elapsed());
}
