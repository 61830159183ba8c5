//! Settings, read once at start-up from the environment (app settings in Azure,
//! `local.settings.json` under Core Tools). A missing or malformed setting stops start-up with
//! one line naming it; secrets are never echoed back.

use std::{collections::HashMap, time::Duration};

use url::Url;

/// Every setting the handler reads. The README and `local.settings.json.example` list the same.
pub mod names {
    pub const OPENAI_ENDPOINT: &str = "AZURE_OPENAI_ENDPOINT";
    pub const OPENAI_API_VERSION: &str = "AZURE_OPENAI_API_VERSION";
    pub const OPENAI_API_KEY: &str = "AZURE_OPENAI_API_KEY";
    pub const STORAGE_ACCOUNT_URL: &str = "BATCH_STORAGE_ACCOUNT_URL";
    pub const STORAGE_CONNECTION_STRING: &str = "BATCH_STORAGE_CONNECTION_STRING";
    pub const INPUT_CONTAINER: &str = "BATCH_INPUT_CONTAINER";
    pub const OUTPUT_CONTAINER: &str = "BATCH_OUTPUT_CONTAINER";
    pub const STATE_CONTAINER: &str = "BATCH_STATE_CONTAINER";
    pub const SUBMIT_LEASE_SECONDS: &str = "BATCH_SUBMIT_LEASE_SECONDS";
    pub const CREATE_TIMEOUT_SECONDS: &str = "BATCH_CREATE_TIMEOUT_SECONDS";
    pub const QUEUE_MAX_ATTEMPTS: &str = "BATCH_QUEUE_MAX_ATTEMPTS";
    pub const QUEUE_INITIAL_DELAY_SECONDS: &str = "BATCH_QUEUE_INITIAL_DELAY_SECONDS";
    pub const RESUBMIT_EXPIRED: &str = "BATCH_RESUBMIT_EXPIRED";
    pub const RESUBMIT_CANCELLED: &str = "BATCH_RESUBMIT_CANCELLED";
    pub const MAX_FOLLOWUPS: &str = "BATCH_MAX_FOLLOWUPS";
    pub const SWEEP_INPUTS_PER_TICK: &str = "BATCH_SWEEP_INPUTS_PER_TICK";
    pub const SPLIT_MAX_REQUESTS: &str = "BATCH_SPLIT_MAX_REQUESTS";
    pub const SPLIT_MAX_BYTES: &str = "BATCH_SPLIT_MAX_BYTES";
    pub const ENQUEUED_TOKEN_LIMIT: &str = "BATCH_ENQUEUED_TOKEN_LIMIT";
    pub const MANAGED_IDENTITY_CLIENT_ID: &str = "AZURE_CLIENT_ID";
    pub const WEBHOOK_SECRET: &str = "AZURE_OPENAI_WEBHOOK_SECRET";
    pub const HANDLER_PORT: &str = "FUNCTIONS_CUSTOMHANDLER_PORT";
    /// Test-only: makes the process abort at a named step, to prove crash recovery.
    /// Debug builds only: the release build (the one published) ignores it.
    pub const TEST_FAULT: &str = "BATCH_TEST_FAULT";
    /// Test-only: `1` serves the test hooks (`server`). Debug builds only.
    pub const TEST_HOOKS: &str = "BATCH_TEST_HOOKS";
    /// Test-only: milliseconds every validation of an input waits before it reads the blob,
    /// so a test sees an intake as long as a large file's without uploading one (a
    /// redelivery arriving mid-intake). Debug builds only.
    pub const TEST_VALIDATE_DELAY_MS: &str = "BATCH_TEST_VALIDATE_DELAY_MS";
    /// Test-only: milliseconds a harvest waits once it holds the job, before it touches the
    /// output folder, so a test sees a second harvester (a tick, a webhook) arrive
    /// mid-harvest. Debug builds only.
    pub const TEST_HARVEST_DELAY_MS: &str = "BATCH_TEST_HARVEST_DELAY_MS";
    /// Test-only: the sweep's look-back before its mark, in seconds (default 900), so a test
    /// sees old inputs left alone without waiting a quarter of an hour. Debug builds only.
    pub const TEST_SWEEP_OVERLAP_SECONDS: &str = "BATCH_TEST_SWEEP_OVERLAP_SECONDS";
    /// Test-only: how long a webhook's step may run before the answer goes out, in ms
    /// (`webhook::ANSWER_WITHIN` otherwise). Debug builds only.
    pub const TEST_WEBHOOK_ANSWER_MS: &str = "BATCH_TEST_WEBHOOK_ANSWER_MS";
}

/// Whether this build honours the test-only settings: debug builds (every test's), not the
/// release build a deployment runs, where a stray `BATCH_TEST_FAULT` in the app settings
/// would otherwise abort the app on every invocation.
pub const TEST_SWITCHES_COMPILED: bool = cfg!(debug_assertions);

pub const DEFAULT_API_VERSION: &str = "2025-04-01-preview";

/// The dated api-versions whose Batch create reads its input from a blob (`input_blob`) and
/// writes to a folder (`output_folder`), per the REST specs in Azure/azure-rest-api-specs,
/// `specification/cognitiveservices/data-plane/AzureOpenAI/authoring/` (Batch lives in the
/// authoring spec; the inference spec has none):
/// - `preview/2025-04-01-preview/azureopenai.json`: `BatchCreateRequest` has `input_blob` and
///   `output_folder` (`BatchOutputReference`), `input_file_id` is no longer required;
///   `examples/post_batch_blob.json` creates a batch from a blob;
/// - `stable/2024-10-21/azureopenai.json` (the latest GA version) and
///   `preview/2025-03-01-preview/azureopenai.json`: `BatchCreateRequest` requires
///   `input_file_id` and has no blob fields, nor had the versions before them (Batch came in
///   2024-07-01-preview). Azure answers such a create with an error; our emulator does not.
///
/// No dated version came after 2025-04-01-preview: the v1 API (`v1`, `/openai/v1/batches`)
/// followed, and takes the same fields (the blob storage how-to's REST sample,
/// https://learn.microsoft.com/azure/ai-foundry/openai/how-to/batch-blob-storage).
pub const BLOB_BATCH_API_VERSIONS: &[&str] = &["2025-04-01-preview"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("setting {name} is required: {hint}")]
    Missing {
        name: &'static str,
        hint: &'static str,
    },
    #[error("setting {name} is malformed: {reason}")]
    Malformed { name: &'static str, reason: String },
    /// Well formed, but a value this program cannot work with.
    #[error("setting {name} cannot be used: {reason}")]
    Unsupported { name: &'static str, reason: String },
}

/// Which Azure OpenAI URL style to call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiStyle {
    /// `{endpoint}/openai/batches?api-version=…`
    Classic { api_version: String },
    /// `{endpoint}/openai/v1/batches`
    V1,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageAuth {
    /// Production: Entra ID tokens for this blob endpoint.
    ManagedIdentity { account_url: Url },
    /// Development: Azurite or an account key. Kept out of `Debug`.
    ConnectionString(Secret),
}

/// A string that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The first (usually the only) endpoint of `AZURE_OPENAI_ENDPOINT`: where a job admitted
    /// before the pool existed has its batch.
    pub openai_endpoint: Url,
    /// Every endpoint of `AZURE_OPENAI_ENDPOINT`, in the order given (the first is
    /// `openai_endpoint`): the pool jobs are admitted to.
    pub openai_endpoints: Vec<Url>,
    /// Each deployment's enqueued-token limit, where the operator knows it before the service
    /// says (`BATCH_ENQUEUED_TOKEN_LIMIT`); the service's own figure replaces it once seen.
    pub enqueued_token_limit: Option<u64>,
    pub api_style: ApiStyle,
    pub openai_api_key: Option<Secret>,
    pub managed_identity_client_id: Option<String>,
    pub storage: StorageAuth,
    pub input_container: String,
    pub output_container: String,
    pub state_container: String,
    /// How long a `submitting` claim is honoured before another invocation may take it over.
    pub submit_lease: Duration,
    /// The longest a create call may take; while one may be in flight nobody takes the job over.
    pub create_timeout: Duration,
    /// `token_limit_exceeded` resubmissions before the job is given up as failed.
    pub queue_max_attempts: u32,
    pub queue_initial_delay: Duration,
    /// Resubmit the requests an expired (or cancelled) batch left without an answer.
    pub resubmit_expired: bool,
    pub resubmit_cancelled: bool,
    /// Follow-up batches per input at most, so requests that never finish end the job.
    pub max_followups: u32,
    /// An input beyond either limit is split into parts within them, one batch each.
    /// Defaults: the service's own limits per batch file.
    pub split_limits: crate::validate::Limits,
    /// The webhook signing secrets (`AZURE_OPENAI_WEBHOOK_SECRET`, comma-separated for
    /// rotation), decoded; empty when webhooks are not configured.
    pub webhook_keys: Vec<SigningKey>,
    pub test_fault: Option<String>,
    pub test_validate_delay: Option<Duration>,
    pub test_harvest_delay: Option<Duration>,
    /// How far before its mark the timer's sweep looks again (`poll`): storage's clock on
    /// a blob's Last-Modified, with room for a commit that lands while the listing runs.
    pub sweep_overlap_secs: i64,
    /// How many names of the input container the timer's sweep lists per tick: a larger
    /// container is covered over several ticks, so no tick's cost grows with its history.
    pub sweep_inputs_per_tick: u32,
}

/// A webhook signing secret's key bytes: the base64 after `whsec_`. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(Vec<u8>);

impl SigningKey {
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// Parses `whsec_<base64>`, the form Azure OpenAI shows once when an endpoint is
    /// registered. The error says what is wrong without repeating the value.
    pub fn parse(text: &str) -> Result<Self, String> {
        use base64::Engine;
        let Some(b64) = text.trim().strip_prefix("whsec_") else {
            return Err(
                "a secret does not start with `whsec_` (copy the endpoint's \
                        signing_secret as shown when it was registered)"
                    .to_string(),
            );
        };
        match base64::engine::general_purpose::STANDARD.decode(b64) {
            Ok(key) if !key.is_empty() => Ok(Self(key)),
            Ok(_) => Err("a secret is empty after `whsec_`".to_string()),
            Err(_) => Err("a secret is not base64 after `whsec_`".to_string()),
        }
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_map(&std::env::vars().collect())
    }

    pub fn from_map(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let get = |name: &str| {
            env.get(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };

        let endpoint_text = get(names::OPENAI_ENDPOINT).ok_or(ConfigError::Missing {
            name: names::OPENAI_ENDPOINT,
            hint: "the Azure OpenAI resource URL, e.g. https://my-resource.openai.azure.com",
        })?;
        // Several regions: a comma-separated list, each a resource with the same deployment.
        let mut openai_endpoints: Vec<Url> = Vec::new();
        for text in endpoint_text.split(',').map(str::trim) {
            if text.is_empty() {
                return Err(ConfigError::Malformed {
                    name: names::OPENAI_ENDPOINT,
                    reason: "an empty entry in the comma-separated list".into(),
                });
            }
            let url = parse_http_url(names::OPENAI_ENDPOINT, text)?;
            if openai_endpoints.contains(&url) {
                return Err(ConfigError::Malformed {
                    name: names::OPENAI_ENDPOINT,
                    reason: format!("{url} is listed twice"),
                });
            }
            openai_endpoints.push(url);
        }
        let openai_endpoint = openai_endpoints[0].clone();

        let api_style = match get(names::OPENAI_API_VERSION) {
            None => ApiStyle::Classic {
                api_version: DEFAULT_API_VERSION.to_string(),
            },
            Some(v) if v.eq_ignore_ascii_case("v1") => ApiStyle::V1,
            Some(v) => match BLOB_BATCH_API_VERSIONS
                .iter()
                .find(|known| known.eq_ignore_ascii_case(&v))
            {
                Some(known) => ApiStyle::Classic {
                    api_version: known.to_string(),
                },
                // Any other version would be refused by Azure at the first create, file after
                // file, while our emulator accepts it: say so once, at start-up.
                None => {
                    return Err(ConfigError::Unsupported {
                        name: names::OPENAI_API_VERSION,
                        reason: format!(
                            "`{v}` has no batches from Blob Storage (`input_blob`, \
                             `output_folder`); use {} (`/openai/batches?api-version=…`) or `v1` \
                             (`/openai/v1/batches`)",
                            BLOB_BATCH_API_VERSIONS.join(", ")
                        ),
                    });
                }
            },
        };

        let storage = match (
            get(names::STORAGE_ACCOUNT_URL),
            get(names::STORAGE_CONNECTION_STRING),
        ) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Malformed {
                    name: names::STORAGE_CONNECTION_STRING,
                    reason: format!(
                        "set either {} (managed identity) or {} (development), not both",
                        names::STORAGE_ACCOUNT_URL,
                        names::STORAGE_CONNECTION_STRING
                    ),
                });
            }
            (Some(url), None) => {
                let account_url = parse_http_url(names::STORAGE_ACCOUNT_URL, &url)?;
                if account_url.scheme() != "https" {
                    return Err(ConfigError::Malformed {
                        name: names::STORAGE_ACCOUNT_URL,
                        reason: "managed identity needs an https:// blob endpoint".into(),
                    });
                }
                if account_url.query().is_some() {
                    return Err(ConfigError::Malformed {
                        name: names::STORAGE_ACCOUNT_URL,
                        reason: "must not carry a query (a SAS does not belong here)".into(),
                    });
                }
                StorageAuth::ManagedIdentity { account_url }
            }
            (None, Some(cs)) => {
                crate::storage::ConnectionString::parse(&cs).map_err(|e| {
                    ConfigError::Malformed {
                        name: names::STORAGE_CONNECTION_STRING,
                        reason: e.to_string(),
                    }
                })?;
                StorageAuth::ConnectionString(Secret(cs))
            }
            (None, None) => {
                return Err(ConfigError::Missing {
                    name: names::STORAGE_ACCOUNT_URL,
                    hint: "the blob endpoint, e.g. https://myaccount.blob.core.windows.net \
                           (or BATCH_STORAGE_CONNECTION_STRING for local development)",
                });
            }
        };

        let container = |name: &'static str, default: &str| -> Result<String, ConfigError> {
            let value = get(name).unwrap_or_else(|| default.to_string());
            validate_container_name(&value).map_err(|reason| ConfigError::Malformed {
                name,
                reason: format!("`{value}` is not a valid container name: {reason}"),
            })?;
            Ok(value)
        };
        let input_container = container(names::INPUT_CONTAINER, "batch-input")?;
        let output_container = container(names::OUTPUT_CONTAINER, "batch-output")?;
        let state_container = container(names::STATE_CONTAINER, "batch-jobs")?;
        if state_container == input_container || state_container == output_container {
            return Err(ConfigError::Malformed {
                name: names::STATE_CONTAINER,
                reason: "must differ from the input and output containers".into(),
            });
        }
        if input_container == output_container {
            return Err(ConfigError::Malformed {
                name: names::OUTPUT_CONTAINER,
                reason: "must differ from the input container (results would be taken as inputs)"
                    .into(),
            });
        }

        let number = |name: &'static str, default: u64| -> Result<u64, ConfigError> {
            match get(name) {
                None => Ok(default),
                Some(v) => v.parse::<u64>().map_err(|_| ConfigError::Malformed {
                    name,
                    reason: format!("`{v}` is not a whole number"),
                }),
            }
        };

        let ranged = |name: &'static str,
                      default: u64,
                      range: std::ops::RangeInclusive<u64>,
                      what: &str|
         -> Result<u64, ConfigError> {
            match number(name, default)? {
                v if range.contains(&v) => Ok(v),
                v => Err(ConfigError::Malformed {
                    name,
                    reason: format!(
                        "{v} is outside {}..={} ({what})",
                        range.start(),
                        range.end()
                    ),
                }),
            }
        };
        // A test-only delay in milliseconds: read by debug builds, ignored by the release one.
        let test_delay = |name: &'static str| -> Result<Option<Duration>, ConfigError> {
            match get(name) {
                Some(_) if TEST_SWITCHES_COMPILED => Ok(Some(Duration::from_millis(ranged(
                    name,
                    0,
                    0..=DAY * 1000,
                    "a delay in milliseconds",
                )?))),
                _ => Ok(None),
            }
        };

        let flag = |name: &'static str, default: bool| -> Result<bool, ConfigError> {
            match get(name).map(|v| v.to_ascii_lowercase()) {
                None => Ok(default),
                Some(v) if ["true", "1", "yes", "on"].contains(&v.as_str()) => Ok(true),
                Some(v) if ["false", "0", "no", "off"].contains(&v.as_str()) => Ok(false),
                Some(v) => Err(ConfigError::Malformed {
                    name,
                    reason: format!("`{v}` is not true or false"),
                }),
            }
        };

        Ok(Config {
            openai_endpoint,
            openai_endpoints,
            enqueued_token_limit: match get(names::ENQUEUED_TOKEN_LIMIT) {
                None => None,
                Some(_) => Some(ranged(
                    names::ENQUEUED_TOKEN_LIMIT,
                    0,
                    1..=u64::MAX,
                    "a deployment's enqueued-token limit",
                )?),
            },
            api_style,
            openai_api_key: get(names::OPENAI_API_KEY).map(Secret),
            webhook_keys: match get(names::WEBHOOK_SECRET) {
                None => Vec::new(),
                Some(list) => list
                    .split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(SigningKey::parse)
                    .collect::<Result<_, _>>()
                    .map_err(|reason| ConfigError::Malformed {
                        name: names::WEBHOOK_SECRET,
                        reason,
                    })?,
            },
            managed_identity_client_id: get(names::MANAGED_IDENTITY_CLIENT_ID),
            storage,
            input_container,
            output_container,
            state_container,
            // A lease of 0 would lapse every claim at once, and a count cast down from a
            // huge number would wrap: each number is checked against a sane range.
            submit_lease: Duration::from_secs(ranged(
                names::SUBMIT_LEASE_SECONDS,
                300,
                1..=DAY,
                "a claim must last at least a second",
            )?),
            create_timeout: Duration::from_secs(ranged(
                names::CREATE_TIMEOUT_SECONDS,
                120,
                1..=DAY,
                "a create call needs time to answer",
            )?),
            queue_max_attempts: ranged(
                names::QUEUE_MAX_ATTEMPTS,
                10,
                1..=1000,
                "tries before a quota wait gives up",
            )? as u32,
            queue_initial_delay: Duration::from_secs(ranged(
                names::QUEUE_INITIAL_DELAY_SECONDS,
                300,
                1..=DAY,
                "the first wait for quota",
            )?),
            resubmit_expired: flag(names::RESUBMIT_EXPIRED, true)?,
            resubmit_cancelled: flag(names::RESUBMIT_CANCELLED, false)?,
            max_followups: ranged(
                names::MAX_FOLLOWUPS,
                3,
                0..=100,
                "follow-up batches per input",
            )? as u32,
            split_limits: {
                let service = crate::validate::Limits::default();
                let why = "the service refuses larger batch files";
                crate::validate::Limits {
                    max_lines: ranged(
                        names::SPLIT_MAX_REQUESTS,
                        service.max_lines,
                        1..=service.max_lines,
                        why,
                    )?,
                    max_bytes: ranged(
                        names::SPLIT_MAX_BYTES,
                        service.max_bytes,
                        1..=service.max_bytes,
                        why,
                    )?,
                    ..service
                }
            },
            sweep_inputs_per_tick: ranged(
                names::SWEEP_INPUTS_PER_TICK,
                20_000,
                1..=1_000_000,
                "names of the input container listed per tick",
            )? as u32,
            test_fault: get(names::TEST_FAULT).filter(|_| TEST_SWITCHES_COMPILED),
            test_validate_delay: test_delay(names::TEST_VALIDATE_DELAY_MS)?,
            test_harvest_delay: test_delay(names::TEST_HARVEST_DELAY_MS)?,
            sweep_overlap_secs: match get(names::TEST_SWEEP_OVERLAP_SECONDS) {
                Some(_) if TEST_SWITCHES_COMPILED => ranged(
                    names::TEST_SWEEP_OVERLAP_SECONDS,
                    SWEEP_OVERLAP_SECS,
                    0..=DAY,
                    "seconds",
                )? as i64,
                _ => SWEEP_OVERLAP_SECS as i64,
            },
        })
    }
}

/// The sweep's look-back before its mark: 15 minutes, far beyond the time a listing takes.
const SWEEP_OVERLAP_SECS: u64 = 900;

const DAY: u64 = 24 * 3600;

fn parse_http_url(name: &'static str, text: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(text).map_err(|e| ConfigError::Malformed {
        name,
        reason: format!("not a URL ({e})"),
    })?;
    if url.scheme() != "https" && url.scheme() != "http" {
        return Err(ConfigError::Malformed {
            name,
            reason: format!("scheme `{}` is not http(s)", url.scheme()),
        });
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::Malformed {
            name,
            reason: "must not carry credentials".into(),
        });
    }
    Ok(url)
}

/// Azure's container naming rules: 3–63 characters, lowercase letters, digits and single
/// hyphens, starting and ending with a letter or digit.
fn validate_container_name(name: &str) -> Result<(), &'static str> {
    if !(3..=63).contains(&name.len()) {
        return Err("must be 3 to 63 characters long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("only lowercase letters, digits and hyphens are allowed");
    }
    if name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        return Err("hyphens must sit between letters or digits");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> HashMap<String, String> {
        [
            (names::OPENAI_ENDPOINT, "https://r.openai.azure.com"),
            (
                names::STORAGE_ACCOUNT_URL,
                "https://acct.blob.core.windows.net",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// The settings a user sets: every name in `names` but the test switches and the ones the
    /// platform sets.
    fn user_settings() -> Vec<&'static str> {
        include_str!("config.rs")
            .lines()
            .filter(|l| l.trim_start().starts_with("pub const "))
            .filter_map(|l| l.split('"').nth(1))
            .filter(|n| n.starts_with("BATCH_") || n.starts_with("AZURE_OPENAI_"))
            .filter(|n| !n.starts_with("BATCH_TEST_"))
            .collect()
    }

    #[test]
    fn the_readme_and_the_example_list_every_setting_at_its_default() {
        let names = user_settings();
        assert!(names.len() >= 20, "{names:?}");
        let readme = include_str!("../README.md");
        let example: serde_json::Value =
            serde_json::from_str(include_str!("../local.settings.json.example")).unwrap();
        let values = example["Values"].as_object().unwrap();
        for name in &names {
            assert!(
                readme.contains(&format!("| `{name}` |")),
                "{name} is not in README's settings table"
            );
            assert!(
                values.contains_key(*name),
                "{name} is not in local.settings.json.example"
            );
        }
        // The example's tuning values are the defaults: copying it changes nothing.
        let connection = [
            names::OPENAI_ENDPOINT,
            names::OPENAI_API_KEY,
            names::STORAGE_ACCOUNT_URL,
            names::STORAGE_CONNECTION_STRING,
            names::WEBHOOK_SECRET,
        ];
        let mut env = base();
        for (name, value) in values {
            let value = value.as_str().unwrap();
            if names.contains(&name.as_str())
                && !connection.contains(&name.as_str())
                && !value.is_empty()
            {
                env.insert(name.clone(), value.to_string());
            }
        }
        assert_eq!(
            format!("{:?}", Config::from_map(&env).unwrap()),
            format!("{:?}", Config::from_map(&base()).unwrap()),
            "a value in local.settings.json.example is not the default"
        );
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = Config::from_map(&base()).unwrap();
        assert_eq!(c.input_container, "batch-input");
        assert_eq!(c.output_container, "batch-output");
        assert_eq!(c.state_container, "batch-jobs");
        assert_eq!(
            c.api_style,
            ApiStyle::Classic {
                api_version: "2025-04-01-preview".into()
            }
        );
    }

    #[test]
    fn several_endpoints_make_a_pool_and_a_bad_one_is_named() {
        let mut env = base();
        env.insert(
            names::OPENAI_ENDPOINT.into(),
            "https://east.openai.azure.com, https://west.openai.azure.com/".into(),
        );
        let c = Config::from_map(&env).unwrap();
        let pool: Vec<&str> = c.openai_endpoints.iter().map(Url::as_str).collect();
        assert_eq!(
            pool,
            [
                "https://east.openai.azure.com/",
                "https://west.openai.azure.com/"
            ]
        );
        assert_eq!(c.openai_endpoint.as_str(), "https://east.openai.azure.com/");
        assert_eq!(Config::from_map(&base()).unwrap().openai_endpoints.len(), 1);
        for bad in [
            "https://east.openai.azure.com,",
            "https://a.openai.azure.com,https://a.openai.azure.com",
            "https://a.openai.azure.com,ftp://b",
        ] {
            env.insert(names::OPENAI_ENDPOINT.into(), bad.into());
            let err = Config::from_map(&env).unwrap_err().to_string();
            assert!(err.contains(names::OPENAI_ENDPOINT), "{bad}: {err}");
        }
    }

    #[test]
    fn the_enqueued_token_limit_is_optional_and_checked() {
        assert_eq!(
            Config::from_map(&base()).unwrap().enqueued_token_limit,
            None
        );
        let mut env = base();
        env.insert(names::ENQUEUED_TOKEN_LIMIT.into(), "90000".into());
        assert_eq!(
            Config::from_map(&env).unwrap().enqueued_token_limit,
            Some(90_000)
        );
        for bad in ["0", "-5", "lots"] {
            env.insert(names::ENQUEUED_TOKEN_LIMIT.into(), bad.into());
            let err = Config::from_map(&env).unwrap_err().to_string();
            assert!(err.contains(names::ENQUEUED_TOKEN_LIMIT), "{bad}: {err}");
        }
    }

    #[test]
    fn v1_selects_the_v1_style() {
        let mut env = base();
        env.insert(names::OPENAI_API_VERSION.into(), "v1".into());
        assert_eq!(Config::from_map(&env).unwrap().api_style, ApiStyle::V1);
    }

    #[test]
    fn only_api_versions_whose_batches_read_blobs_are_accepted() {
        for good in ["2025-04-01-preview", "v1", "V1"] {
            let mut env = base();
            env.insert(names::OPENAI_API_VERSION.into(), good.into());
            assert!(Config::from_map(&env).is_ok(), "{good}");
        }
        // Dated versions that exist, with Batch, but whose create takes `input_file_id` only:
        // the latest GA one, and the preview just before blob storage came.
        for bad in ["2024-10-21", "2025-03-01-preview", "2024-07-01-preview"] {
            let mut env = base();
            env.insert(names::OPENAI_API_VERSION.into(), bad.into());
            let err = Config::from_map(&env)
                .expect_err(&format!("{bad} cannot create a batch from a blob"))
                .to_string();
            assert_eq!(err.lines().count(), 1, "{err}");
            for needle in [names::OPENAI_API_VERSION, bad, "2025-04-01-preview", "v1"] {
                assert!(err.contains(needle), "{needle}: {err}");
            }
        }
    }

    #[test]
    fn errors_name_the_setting() {
        let mut env = base();
        env.remove(names::OPENAI_ENDPOINT);
        let err = Config::from_map(&env).unwrap_err().to_string();
        assert!(err.contains("AZURE_OPENAI_ENDPOINT"), "{err}");

        let mut env = base();
        env.insert(names::INPUT_CONTAINER.into(), "Bad_Name".into());
        let err = Config::from_map(&env).unwrap_err().to_string();
        assert!(err.contains("BATCH_INPUT_CONTAINER"), "{err}");

        let mut env = base();
        env.insert(names::OPENAI_API_VERSION.into(), "latest".into());
        let err = Config::from_map(&env).unwrap_err().to_string();
        assert!(err.contains("AZURE_OPENAI_API_VERSION"), "{err}");

        let mut env = base();
        env.remove(names::STORAGE_ACCOUNT_URL);
        let err = Config::from_map(&env).unwrap_err().to_string();
        assert!(err.contains("BATCH_STORAGE_ACCOUNT_URL"), "{err}");
    }

    #[test]
    fn numbers_out_of_their_range_are_refused_by_name() {
        for (name, value) in [
            // Every claim would lapse at once.
            (names::SUBMIT_LEASE_SECONDS, "0"),
            // `as u32` would have wrapped this to 0 attempts.
            (names::QUEUE_MAX_ATTEMPTS, "4294967296"),
            (names::QUEUE_MAX_ATTEMPTS, "0"),
            (names::MAX_FOLLOWUPS, "4294967299"),
            (names::CREATE_TIMEOUT_SECONDS, "0"),
            (names::QUEUE_INITIAL_DELAY_SECONDS, "0"),
        ] {
            let mut env = base();
            env.insert(name.into(), value.into());
            let err = Config::from_map(&env).unwrap_err().to_string();
            assert!(
                err.contains(name) && err.contains("outside"),
                "{name}={value}: {err}"
            );
        }
        let mut env = base();
        env.insert(names::MAX_FOLLOWUPS.into(), "0".into());
        assert_eq!(
            Config::from_map(&env).unwrap().max_followups,
            0,
            "no follow-ups is a choice"
        );
    }

    #[test]
    fn the_test_delays_are_read_in_debug_builds_and_named_when_malformed() {
        let delays = |c: &Config| (c.test_validate_delay, c.test_harvest_delay);
        assert_eq!(delays(&Config::from_map(&base()).unwrap()), (None, None));
        let mut env = base();
        env.insert(names::TEST_VALIDATE_DELAY_MS.into(), "1500".into());
        env.insert(names::TEST_HARVEST_DELAY_MS.into(), "700".into());
        assert_eq!(
            delays(&Config::from_map(&env).unwrap()),
            (
                TEST_SWITCHES_COMPILED.then_some(Duration::from_millis(1500)),
                TEST_SWITCHES_COMPILED.then_some(Duration::from_millis(700))
            )
        );
        for name in [names::TEST_VALIDATE_DELAY_MS, names::TEST_HARVEST_DELAY_MS] {
            let mut env = base();
            env.insert(name.into(), "soon".into());
            if TEST_SWITCHES_COMPILED {
                let err = Config::from_map(&env).unwrap_err().to_string();
                assert!(err.contains(name), "{err}");
            }
        }
    }

    #[test]
    fn split_limits_default_to_the_services_and_stay_within_them() {
        let c = Config::from_map(&base()).unwrap();
        assert_eq!(c.split_limits, crate::validate::Limits::default());

        let mut env = base();
        env.insert(names::SPLIT_MAX_REQUESTS.into(), "10".into());
        assert_eq!(Config::from_map(&env).unwrap().split_limits.max_lines, 10);

        for (name, value) in [
            (names::SPLIT_MAX_REQUESTS, "100001"),
            (names::SPLIT_MAX_REQUESTS, "0"),
            (names::SPLIT_MAX_BYTES, "300MB"),
            (names::SPLIT_MAX_BYTES, "1000000001"),
        ] {
            let mut env = base();
            env.insert(name.into(), value.into());
            let err = Config::from_map(&env).unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn a_bad_connection_string_is_named_but_not_printed() {
        let mut env = base();
        env.remove(names::STORAGE_ACCOUNT_URL);
        env.insert(
            names::STORAGE_CONNECTION_STRING.into(),
            "AccountName=a;AccountKey=%%%secret%%%".into(),
        );
        let err = Config::from_map(&env).unwrap_err().to_string();
        assert!(err.contains("BATCH_STORAGE_CONNECTION_STRING"), "{err}");
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn webhook_secrets_are_a_comma_separated_list_named_when_malformed_never_printed() {
        let c = Config::from_map(&base()).unwrap();
        assert!(c.webhook_keys.is_empty(), "webhooks are optional");

        let mut env = base();
        // base64 of "key-one" and "key-two": a rotation lists the new secret beside the old.
        env.insert(
            names::WEBHOOK_SECRET.into(),
            "whsec_a2V5LW9uZQ==, whsec_a2V5LXR3bw==".into(),
        );
        let keys = Config::from_map(&env).unwrap().webhook_keys;
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[1].bytes(), b"key-two");
        assert_eq!(format!("{keys:?}"), "[SigningKey(..), SigningKey(..)]");

        for bad in ["not-a-whsec-secret", "whsec_%%%secret%%%", "whsec_"] {
            let mut env = base();
            env.insert(names::WEBHOOK_SECRET.into(), bad.into());
            let err = Config::from_map(&env).unwrap_err().to_string();
            assert!(err.contains("AZURE_OPENAI_WEBHOOK_SECRET"), "{err}");
            assert!(
                !err.contains("%%%") && !err.contains("not-a-whsec"),
                "{err}"
            );
        }
    }
}
