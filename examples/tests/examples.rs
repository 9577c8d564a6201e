//! Runs each example as a user would, and checks it ended well: `cargo
//! test` builds the examples (to `target/<profile>/examples/`) before it
//! runs the tests.

use std::path::PathBuf;
use std::process::Command;

/// The built example `name`, beside this test's own executable.
fn example(name: &str) -> PathBuf {
    let test = std::env::current_exe().expect("the test's path");
    let profile = test
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = profile.join("examples").join(name);
    assert!(path.exists(), "{} is not built", path.display());
    path
}

/// Runs example `name` with `env`, and returns its standard output.
fn run(name: &str, env: &[(&str, &str)]) -> String {
    let output = Command::new(example(name))
        .env_remove("KAFKA_BROKERS")
        .envs(env.iter().copied())
        .output()
        .expect("the example runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    assert!(
        output.status.success(),
        "example {name} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    stdout
}

#[test]
fn consumer_on_the_embedded_cluster() {
    let out = run("consumer", &[]);
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

#[test]
fn consumer_on_the_real_broker() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let out = run("consumer", &[("KAFKA_BROKERS", kafka.brokers())]);
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

#[test]
fn outbox_on_the_embedded_cluster() {
    let out = run("outbox", &[]);
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

#[test]
fn outbox_on_the_real_broker() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let out = run("outbox", &[("KAFKA_BROKERS", kafka.brokers())]);
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

#[test]
fn processor_on_the_real_broker() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let out = run("processor", &[("KAFKA_BROKERS", kafka.brokers())]);
    assert!(out.contains("3 duplicates dropped"), "{out}");
    assert!(out.trim_end().ends_with("ok"), "{out}");
}
