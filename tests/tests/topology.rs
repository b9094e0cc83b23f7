//! The docker-compose topology run without Docker (`scripts/run-topology.sh`):
//! two coordinators, two order participants, one payment, one inventory as
//! separate processes, the demo client against them, the invariant check,
//! and a clean exit of every process on SIGTERM.

use std::path::Path;
use std::process::Command;

#[test]
fn the_compose_topology_runs_without_docker_and_keeps_the_invariants() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("bash")
        .arg(root.join("scripts/run-topology.sh"))
        .args(["--orders", "150", "--concurrency", "16"])
        .current_dir(&root)
        .output()
        .expect("run scripts/run-topology.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "topology run failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("topology up"), "{stdout}");
}
