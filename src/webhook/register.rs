//! `handler webhook register`: registers function-webhook's URL with Azure OpenAI
//! (`POST {endpoint}/openai/v1/dashboard/webhook_endpoints`, MicrosoftDocs/azure-ai-docs
//! `how-to-webhooks-content.md`) for the four `batch.*` events.
//!
//! The service shows an endpoint's signing secret once, in this answer. It is not printed (no
//! secret goes to a terminal or a log): it is added to a file, created readable by its owner
//! only, whose content is the value of the app setting `AZURE_OPENAI_WEBHOOK_SECRET` (secrets
//! comma-separated: one per region's endpoint, or the old and the new while rotating).

use std::{io::Write, path::Path, sync::Arc};

use azure_core::credentials::TokenCredential;
use serde_json::{Value, json};
use url::Url;

use crate::config::Secret;

/// The events a batch job can end with.
pub const BATCH_EVENTS: [&str; 4] = [
    "batch.completed",
    "batch.failed",
    "batch.cancelled",
    "batch.expired",
];

const SCOPE: &str = "https://cognitiveservices.azure.com/.default";

pub enum Credential {
    ApiKey(Secret),
    Entra(Arc<dyn TokenCredential>),
}

/// What the service answered, without the secret.
#[derive(Debug)]
pub struct Registered {
    pub id: String,
    pub secret_hint: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("{endpoint}: {message}")]
    Service { endpoint: String, message: String },
    #[error("cannot write the secret file {path}: {message}")]
    File { path: String, message: String },
}

/// Registers `url` with the Azure OpenAI resource at `endpoint`; the signing secret goes into
/// `secret_file`.
pub async fn register(
    endpoint: &Url,
    credential: &Credential,
    name: &str,
    url: &str,
    secret_file: &Path,
) -> Result<Registered, RegisterError> {
    let service = |message: String| RegisterError::Service {
        endpoint: endpoint.to_string(),
        message,
    };
    let target = endpoint
        .join("openai/v1/dashboard/webhook_endpoints")
        .map_err(|e| service(e.to_string()))?;
    let mut req = reqwest::Client::new().post(target).json(&json!({
        "name": name,
        "url": url,
        "event_types": BATCH_EVENTS,
    }));
    req = match credential {
        Credential::ApiKey(key) => req.header("api-key", key.expose()),
        Credential::Entra(cred) => {
            let token = cred
                .get_token(&[SCOPE], None)
                .await
                .map_err(|e| service(format!("no Entra ID token (run `az login`): {e}")))?;
            req.bearer_auth(token.token.secret())
        }
    };
    let resp = req
        .send()
        .await
        .map_err(|e| service(format!("no answer: {}", e.without_url())))?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let message = body["error"]["message"]
            .as_str()
            .or_else(|| body["message"].as_str())
            .unwrap_or("(no message)");
        return Err(service(format!("HTTP {}: {message}", status.as_u16())));
    }
    let secret = body["signing_secret"]
        .as_str()
        .filter(|s| s.starts_with("whsec_"))
        .ok_or_else(|| service("the answer has no signing_secret".to_string()))?;
    append_secret(secret_file, secret)?;
    Ok(Registered {
        id: body["id"].as_str().unwrap_or_default().to_string(),
        secret_hint: body["signing_secret_hint"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    })
}

/// Adds `secret` to the comma-separated list in `path` (created with mode 0600).
fn append_secret(path: &Path, secret: &str) -> Result<(), RegisterError> {
    let err = |e: std::io::Error| RegisterError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(err(e)),
    };
    let value = if existing.is_empty() {
        secret.to_string()
    } else {
        format!("{existing},{secret}")
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(err)?;
    file.write_all(value.as_bytes()).map_err(err)?;
    Ok(())
}
