//! The storage code path used in Azure: Microsoft Entra ID bearer tokens, no account key.
//! Azurite over HTTPS with `--oauth basic` accepts an unsigned token with the storage
//! audience, so the same `BlobStore` calls the Function App makes run here for real,
//! including the server-side copy whose source is authorized by a user delegation SAS.

mod support;

use std::sync::Arc;

use aoai_blob_batch::storage::{BlobStore, RetryPolicy, StorageError, WriteCondition};
use azure_core::{
    credentials::{AccessToken, Secret, TokenCredential, TokenRequestOptions},
    time::{Duration, OffsetDateTime},
};
use futures::TryStreamExt;
use support::*;

/// Stands in for the managed identity: a token Azurite's OAuth mode accepts (it checks the
/// issuer, audience and times, not the signature).
#[derive(Debug)]
struct FakeManagedIdentity;

#[async_trait::async_trait]
impl TokenCredential for FakeManagedIdentity {
    async fn get_token(
        &self,
        scopes: &[&str],
        _: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        assert_eq!(scopes, ["https://storage.azure.com/.default"]);
        let now = OffsetDateTime::now_utc();
        let exp = now + Duration::hours(1);
        let claims = serde_json::json!({
            "aud": "https://storage.azure.com",
            "iss": "https://sts.windows.net/00000000-0000-0000-0000-000000000000/",
            "iat": now.unix_timestamp() - 60, "nbf": now.unix_timestamp() - 60, "exp": exp.unix_timestamp(),
            "oid": "11111111-1111-1111-1111-111111111111",
            "tid": "00000000-0000-0000-0000-000000000000"
        });
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwt = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(claims.to_string().as_bytes())
        );
        Ok(AccessToken::new(Secret::new(jwt), exp))
    }
}

#[tokio::test]
async fn the_managed_identity_path_reads_writes_and_copies() {
    let dir = tempfile::tempdir().unwrap();
    let (azurite, cert) = azurite_https_oauth(dir.path());
    // The only test in this binary: trusting the test certificate cannot affect another test.
    unsafe { std::env::set_var("SSL_CERT_FILE", &cert) };

    let url = url::Url::parse(&format!(
        "https://127.0.0.1:{}/devstoreaccount1",
        azurite.port
    ))
    .unwrap();
    let store = BlobStore::with_credential(
        url,
        Arc::new(FakeManagedIdentity),
        RetryPolicy { max_retries: 0 },
    )
    .unwrap();

    store.ensure_container("batch-output").await.unwrap();
    store.ensure_container("batch-jobs").await.unwrap();
    let etag = store
        .write(
            "batch-jobs",
            "active/a.json",
            "{}".into(),
            WriteCondition::IfNotExists,
            "application/json",
        )
        .await
        .unwrap();
    assert!(matches!(
        store
            .write(
                "batch-jobs",
                "active/a.json",
                "{}".into(),
                WriteCondition::IfNotExists,
                "application/json"
            )
            .await,
        Err(StorageError::AlreadyExists { .. })
    ));
    assert!(matches!(
        store
            .write(
                "batch-jobs",
                "active/a.json",
                "{}".into(),
                WriteCondition::IfMatch("\"0x0\"".into()),
                "application/json"
            )
            .await,
        Err(StorageError::ConditionNotMet { .. })
    ));
    store
        .write(
            "batch-jobs",
            "active/a.json",
            "{\"v\":2}".into(),
            WriteCondition::IfMatch(etag),
            "application/json",
        )
        .await
        .unwrap();

    // A service output folder moved into place: copy (source authorized by a user delegation
    // SAS, since there is no account key), then delete.
    let mut w = store.writer("batch-output", "0f1e/results.jsonl", "application/jsonl");
    w.write(b"{\"custom_id\":\"a\"}\n").await.unwrap();
    w.finish().await.unwrap();
    store
        .copy(
            "batch-output",
            "0f1e/results.jsonl",
            "batch-output",
            "x/results.jsonl",
        )
        .await
        .unwrap();
    assert!(
        store
            .delete("batch-output", "0f1e/results.jsonl", None)
            .await
            .unwrap()
    );
    let (copied, _) = store
        .read("batch-output", "x/results.jsonl")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&copied[..], b"{\"custom_id\":\"a\"}\n");

    let names: Vec<String> = store
        .list("batch-output", "")
        .map_ok(|b| b.name)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(names, ["x/results.jsonl"]);
}
