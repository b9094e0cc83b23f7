//! The dashboard in a real browser: a STUCK saga is found in the list,
//! opened, and retried with the admin token (a wrong one first), and the
//! other views render, with hostile text shown as text. The browser part is
//! tests/browser/dashboard.mjs (playwright-core driving Debian's chromium);
//! `scripts/install-test-tools.sh` installs both.
//!
//! `SKALD_DASHBOARD_SCREENSHOT=path` keeps the screenshot there (that is how
//! docs/dashboard.png is made); otherwise it goes to a temporary file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use skald_participants::app::Which;
use skald_tests::{ADMIN_TOKEN, Setup, TestEnv, order};
use uuid::Uuid;

const WITHIN: Duration = Duration::from_secs(30);

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_finds_a_stuck_saga_and_retries_it_in_the_dashboard() {
    let dir = browser_dir();
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    assert!(
        dir.join("node_modules/playwright-core").exists() && Path::new(&chromium).exists(),
        "playwright-core (tests/browser/node_modules) or {chromium} is missing: run scripts/install-test-tools.sh"
    );

    let mut env = TestEnv::start(Setup::stuck_without_payment()).await;
    env.seed(&[("nora", 10_000), ("otto", 100)], &[("sku-1", 50), ("sku-2", 50)])
        .await;
    let (_, stuck) = env.place_order(&order("nora", &[("sku-1", 1, 400)])).await;
    env.wait_for_saga(stuck, "STUCK", WITHIN).await;

    // The payment service is back; a few more sagas for the list.
    env.start_participant(Which::Payment).await;
    let mut others = Vec::new();
    for body in [
        order("nora", &[("sku-1", 2, 1250), ("sku-2", 1, 500)]),
        order("otto", &[("sku-2", 1, 9_900)]),
        order("nora", &[("sku-2", 3, 700)]),
    ] {
        others.push(env.place_order(&body).await.0);
    }
    for o in others {
        env.wait_for_order(o, WITHIN).await;
    }
    // A dead letter whose text is hostile: the page must show it as text.
    let (conn, _ch) = env.amqp().await;
    skald_tests::publish_dead_letter(
        &conn,
        Uuid::now_v7(),
        "payment",
        "ChargePayment",
        "<script>window.__xss = true</script> undecodable command",
        br#"{"note": "<img src=x onerror=\"window.__xss = true\">"}"#.to_vec(),
    )
    .await;

    let screenshot = match std::env::var_os("SKALD_DASHBOARD_SCREENSHOT") {
        Some(p) => PathBuf::from(p),
        None => std::env::temp_dir().join(format!("{}-dashboard.png", env.names.id)),
    };
    let _ = std::fs::remove_file(&screenshot);
    let run = tokio::process::Command::new("node")
        .arg("dashboard.mjs")
        .current_dir(&dir)
        .env("SKALD_URL", &env.base_url)
        .env("SKALD_SAGA_ID", stuck.to_string())
        .env("SKALD_TOKEN", ADMIN_TOKEN)
        .env("SKALD_SCREENSHOT", &screenshot)
        .env("CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the browser script finishes within 3 minutes")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\n{stderr}");
    assert!(out.status.success(), "dashboard.mjs failed:\n{stdout}\n{stderr}");
    let size = std::fs::metadata(&screenshot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "screenshot {} missing or empty", screenshot.display());

    // What the browser did happened: the retried saga compensated for good.
    let saga = env.saga(stuck).await;
    assert_eq!(saga["status"], "COMPENSATED", "{saga}");
    assert_eq!(env.balance("nora").await, 10_000 - 3_000 - 2_100);
    let report = env.verify().await;
    assert!(report.ok(), "{:?}", report.violations);
    env.stop().await;
}
