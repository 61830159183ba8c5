//! Start-up: a missing or malformed setting stops the handler with one line naming it.

use std::process::Command;

fn run(env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_handler"))
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

#[test]
fn each_missing_or_malformed_setting_is_named_in_one_line() {
    let cs = format!(
        "AccountName=devstoreaccount1;AccountKey={KEY};BlobEndpoint=http://127.0.0.1:1/devstoreaccount1"
    );
    let good: Vec<(&str, &str)> = vec![
        ("AZURE_OPENAI_ENDPOINT", "http://127.0.0.1:1"),
        ("BATCH_STORAGE_CONNECTION_STRING", &cs),
        ("FUNCTIONS_CUSTOMHANDLER_PORT", "1"),
    ];
    let cases: Vec<(&str, Option<&str>)> = vec![
        ("AZURE_OPENAI_ENDPOINT", None),
        ("AZURE_OPENAI_ENDPOINT", Some("not a url")),
        ("BATCH_STORAGE_CONNECTION_STRING", None),
        (
            "BATCH_STORAGE_CONNECTION_STRING",
            Some("AccountName=x;AccountKey=***"),
        ),
        ("FUNCTIONS_CUSTOMHANDLER_PORT", None),
        ("FUNCTIONS_CUSTOMHANDLER_PORT", Some("http")),
        ("BATCH_INPUT_CONTAINER", Some("Batch_Input")),
        ("AZURE_OPENAI_API_VERSION", Some("latest")),
    ];
    for (name, value) in cases {
        let mut env: Vec<(&str, &str)> = good.iter().copied().filter(|(k, _)| *k != name).collect();
        if let Some(v) = value {
            env.push((name, v));
        }
        let (code, stdout, stderr) = run(&env);
        assert_ne!(code, 0, "{name}={value:?} should stop start-up");
        let lines: Vec<&str> = stderr.lines().collect();
        // Missing storage settings name the managed-identity one first, with the alternative.
        let expected = if name == "BATCH_STORAGE_CONNECTION_STRING" && value.is_none() {
            "BATCH_STORAGE_ACCOUNT_URL"
        } else {
            name
        };
        assert_eq!(lines.len(), 1, "{name}: {stderr}");
        assert!(lines[0].contains(expected), "{name}: {stderr}");
        assert!(!stderr.contains(KEY) && !stdout.contains(KEY));
    }
}
