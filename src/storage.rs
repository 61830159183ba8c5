//! Blob Storage access: one `BlobStore` over the official `azure_storage_blob` 1.x client.
//!
//! Two ways in, chosen by configuration:
//! - Microsoft Entra ID (`BlobStore::with_credential`), the only one used in Azure;
//! - a storage connection string (`BlobStore::from_connection_string`), for Azurite and local
//!   development. The 1.x SDK has no Shared Key support by design, so the connection string's
//!   account key signs a short-lived account SAS, fresh for every request, in a pipeline policy.
//!   Keeping the SAS out of the client's base URL means no URL we hold or log ever carries it.
//!
//! Every call takes container and blob names, never URLs: URLs from outside (events, the batch
//! service) are first checked by [`BlobStore::locate`] to be in this account.

use std::{collections::HashMap, num::NonZero, sync::Arc, time::Duration as StdDuration};

use async_trait::async_trait;
use azure_core::{
    credentials::{Secret, TokenCredential},
    error::ErrorKind,
    hmac::hmac_sha256,
    http::{
        ClientOptions, Context, Etag, ExponentialRetryOptions, RequestContent, RetryOptions, Url,
        policies::{Policy, PolicyResult},
        request::Request,
    },
    time::{Duration, OffsetDateTime},
};
use azure_storage_blob::{
    BlobServiceClient, BlobServiceClientOptions,
    models::{
        BlobClientDeleteOptions, BlobClientDownloadOptions, BlobClientGetPropertiesResultHeaders,
        BlobContainerClientListBlobsOptions, BlockBlobClientCommitBlockListOptions,
        BlockBlobClientUploadOptions, BlockLookupList, CopyStatus, KeyInfo, ListBlobsIncludeItem,
    },
};
use azure_storage_common::models::UserDelegationKey;
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};

/// What went wrong talking to Blob Storage, sorted by what the caller does about it.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("blob {container}/{name} not found")]
    NotFound { container: String, name: String },
    /// `If-None-Match: *` found the blob already there (409 BlobAlreadyExists).
    #[error("blob {container}/{name} already exists")]
    AlreadyExists { container: String, name: String },
    /// `If-Match` found another ETag (412): someone else wrote first, or the blob changed.
    #[error("blob {container}/{name} changed since it was read (ETag condition not met)")]
    ConditionNotMet { container: String, name: String },
    /// Throttling, 5xx, timeouts, connection failures: worth trying again later.
    #[error("storage is unavailable for {op} on {target}: {message}")]
    Transient {
        op: &'static str,
        target: String,
        message: String,
    },
    #[error("storage refused {op} on {target}: {message}")]
    Failed {
        op: &'static str,
        target: String,
        message: String,
    },
    #[error("invalid storage configuration: {0}")]
    Config(String),
}

impl StorageError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StorageError::Transient { .. })
    }

    fn from_sdk(op: &'static str, container: &str, name: &str, err: azure_core::Error) -> Self {
        let target = if name.is_empty() {
            container.to_string()
        } else {
            format!("{container}/{name}")
        };
        match err.kind() {
            ErrorKind::HttpResponse {
                status, error_code, ..
            } => {
                let code = u16::from(*status);
                let error_code = error_code.clone().unwrap_or_default();
                match code {
                    404 => StorageError::NotFound {
                        container: container.into(),
                        name: name.into(),
                    },
                    409 if error_code == "BlobAlreadyExists" => StorageError::AlreadyExists {
                        container: container.into(),
                        name: name.into(),
                    },
                    412 => StorageError::ConditionNotMet {
                        container: container.into(),
                        name: name.into(),
                    },
                    408 | 429 | 500..=599 => StorageError::Transient {
                        op,
                        target,
                        message: format!("HTTP {code} {error_code}"),
                    },
                    _ => StorageError::Failed {
                        op,
                        target,
                        message: format!("HTTP {code} {error_code}"),
                    },
                }
            }
            // Connection refused, DNS, TLS, timeouts: the request never got an answer. A
            // token the identity endpoint could not issue just now (it is briefly away at a
            // cold start) is worth another try too.
            ErrorKind::Io | ErrorKind::Connection | ErrorKind::Credential => {
                StorageError::Transient {
                    op,
                    target,
                    message: redact(&err.to_string()),
                }
            }
            _ => StorageError::Failed {
                op,
                target,
                message: redact(&err.to_string()),
            },
        }
    }
}

/// Every version of a blob has an ETag, and the handler keys jobs and conditions writes on
/// it: an answer without one (a proxy stripping headers?) must stop the step, not become
/// `""`, which would make every version of a blob one job.
fn required_etag(
    etag: Option<String>,
    op: &'static str,
    container: &str,
    name: &str,
) -> Result<String> {
    etag.filter(|e| !e.is_empty())
        .ok_or_else(|| StorageError::Failed {
            op,
            target: format!("{container}/{name}"),
            message: "the storage service answered without an ETag (a proxy in between \
                      stripping headers?)"
                .into(),
        })
}

/// SDK error texts can quote the request URL; make sure a SAS signature never leaves here.
fn redact(text: &str) -> String {
    match text.find("sig=") {
        Some(at) => {
            let end = text[at..]
                .find(|c: char| c == '&' || c.is_whitespace() || c == '"' || c == '\'')
                .map_or(text.len(), |e| at + e);
            format!("{}sig=REDACTED{}", &text[..at], &text[end..])
        }
        None => text.to_string(),
    }
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// What we need to know of a blob: its identity for idempotency and its size for limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    pub name: String,
    pub etag: String,
    pub size: u64,
    /// Last-Modified (unix seconds, the storage service's clock), where the call returns it:
    /// listings do.
    pub modified: Option<i64>,
}

/// A blob's properties as intake needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobProperties {
    pub info: BlobInfo,
    /// `x-ms-copy-status: pending`: the blob is the destination of a Copy Blob that has not
    /// finished, so its content is not all there yet
    /// (https://learn.microsoft.com/rest/api/storageservices/get-blob-properties).
    pub copy_pending: bool,
}

/// Parsed `DefaultEndpointsProtocol=…;AccountName=…;AccountKey=…;BlobEndpoint=…` or
/// `UseDevelopmentStorage=true`. `Debug` leaves the key out.
#[derive(Clone)]
pub struct ConnectionString {
    pub account_name: String,
    account_key: Secret,
    pub blob_endpoint: Url,
}

impl std::fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionString")
            .field("account_name", &self.account_name)
            .field("blob_endpoint", &self.blob_endpoint.as_str())
            .finish_non_exhaustive()
    }
}

/// The well-known Azurite development account (public, documented by Microsoft).
const DEV_ACCOUNT: &str = "devstoreaccount1";
const DEV_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

impl ConnectionString {
    /// Parses a connection string. Errors name the missing or malformed part, never the key.
    pub fn parse(text: &str) -> Result<Self> {
        let mut parts: HashMap<String, String> = HashMap::new();
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                StorageError::Config(format!(
                    "connection string part `{}` is not KEY=VALUE",
                    part.split('=')
                        .next()
                        .unwrap_or("")
                        .chars()
                        .take(40)
                        .collect::<String>()
                ))
            })?;
            parts.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
        if parts
            .get("usedevelopmentstorage")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            let endpoint = format!("http://127.0.0.1:10000/{DEV_ACCOUNT}");
            return Ok(Self {
                account_name: DEV_ACCOUNT.into(),
                account_key: Secret::new(DEV_KEY.to_string()),
                blob_endpoint: Url::parse(&endpoint).expect("static URL"),
            });
        }
        let account_name = parts
            .get("accountname")
            .cloned()
            .ok_or_else(|| StorageError::Config("connection string has no AccountName".into()))?;
        let key = parts
            .get("accountkey")
            .cloned()
            .ok_or_else(|| StorageError::Config("connection string has no AccountKey".into()))?;
        if base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &key).is_err() {
            return Err(StorageError::Config(
                "connection string AccountKey is not base64".into(),
            ));
        }
        let endpoint = match parts.get("blobendpoint") {
            Some(e) => e.clone(),
            None => {
                let protocol = parts
                    .get("defaultendpointsprotocol")
                    .map_or("https", String::as_str);
                let suffix = parts
                    .get("endpointsuffix")
                    .map_or("core.windows.net", String::as_str);
                format!("{protocol}://{account_name}.blob.{suffix}")
            }
        };
        let blob_endpoint = Url::parse(endpoint.trim_end_matches('/')).map_err(|e| {
            StorageError::Config(format!("connection string BlobEndpoint is not a URL: {e}"))
        })?;
        Ok(Self {
            account_name,
            account_key: Secret::new(key),
            blob_endpoint,
        })
    }

    /// An account SAS for the blob service, all permissions, valid from 5 minutes ago for `ttl`.
    /// Returns the query string (no leading `?`).
    pub fn account_sas(&self, ttl: StdDuration) -> Result<String> {
        let (sv, sp, ss, srt, spr) = ("2022-11-02", "rwdxylacuptfi", "b", "sco", "https,http");
        let now = OffsetDateTime::now_utc();
        let st = sas_time(now - Duration::minutes(5));
        let se = sas_time(now + ttl);
        // String-to-sign for sv >= 2020-12-06; the empty line before the last is the encryption scope.
        let to_sign = format!(
            "{}\n{sp}\n{ss}\n{srt}\n{st}\n{se}\n\n{spr}\n{sv}\n\n",
            self.account_name
        );
        let sig = hmac_sha256(&to_sign, &self.account_key)
            .map_err(|e| StorageError::Config(format!("cannot sign an account SAS: {e}")))?;
        Ok(format!(
            "sv={sv}&ss={ss}&srt={srt}&sp={sp}&st={}&se={}&spr={}&sig={}",
            pct(&st),
            pct(&se),
            pct(spr),
            pct(&sig)
        ))
    }
}

fn sas_time(t: OffsetDateTime) -> String {
    t.format(time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
    ))
    .expect("a UTC time always formats")
}

/// RFC 3986 percent-encoding: unreserved characters pass, everything else is `%XX`.
fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The query parameters an account SAS consists of.
const SAS_PARAMS: [&str; 8] = ["sv", "ss", "srt", "sp", "st", "se", "spr", "sig"];

/// Adds a freshly signed account SAS to every request, so no long-lived SAS sits in a URL.
#[derive(Debug)]
struct AccountSasPolicy {
    conn: ConnectionString,
}

#[async_trait]
impl Policy for AccountSasPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let sas = self
            .conn
            .account_sas(StdDuration::from_secs(3600))
            .map_err(|e| azure_core::Error::with_message(ErrorKind::Credential, e.to_string()))?;
        let url = request.url_mut();
        // A retry sends the same request again: replace the SAS of the last try, do not stack.
        // Raw pairs, so the SDK's own percent-encoding of the other parameters stays as it was.
        let mut query: String = url
            .query()
            .unwrap_or_default()
            .split('&')
            .filter(|pair| {
                let key = pair.split('=').next().unwrap_or_default();
                !pair.is_empty() && !SAS_PARAMS.contains(&key)
            })
            .flat_map(|pair| [pair, "&"])
            .collect();
        query.push_str(&sas);
        url.set_query(Some(&query));
        next[0].send(ctx, request, &next[1..]).await
    }
}

/// How many times the SDK itself retries a failed request. Our callers retry at a coarser level
/// (Event Grid redelivery, the next timer tick), so a few quick tries are enough here; long SDK
/// retries would only hide an outage behind a minute-long wait.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_retries: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_retries: 3 }
    }
}

impl RetryPolicy {
    fn options(self) -> RetryOptions {
        if self.max_retries == 0 {
            return RetryOptions::none();
        }
        RetryOptions::exponential(ExponentialRetryOptions {
            initial_delay: Duration::milliseconds(200),
            max_retries: self.max_retries,
            max_total_elapsed: Duration::seconds(20),
            max_delay: Duration::seconds(5),
        })
    }
}

/// One storage account, addressed by container and blob name.
pub struct BlobStore {
    service: BlobServiceClient,
    /// The account's blob endpoint with no query: safe to log and to compare URLs against.
    account_url: Url,
    /// Only with a connection string: copy sources need their own SAS to be readable.
    conn: Option<ConnectionString>,
    /// With Entra ID: the account name and a cached user delegation key, which signs the
    /// short-lived read SAS a copy source needs.
    delegation: Option<Delegation>,
}

struct Delegation {
    account: String,
    key: tokio::sync::Mutex<Option<UserDelegationKey>>,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("account_url", &self.account_url.as_str())
            .finish_non_exhaustive()
    }
}

impl BlobStore {
    /// Local development and tests (Azurite): the connection string's key signs every request.
    pub fn from_connection_string(text: &str, retry: RetryPolicy) -> Result<Self> {
        let conn = ConnectionString::parse(text)?;
        let options = BlobServiceClientOptions {
            client_options: ClientOptions {
                per_try_policies: vec![Arc::new(AccountSasPolicy { conn: conn.clone() })],
                retry: retry.options(),
                ..Default::default()
            },
            ..Default::default()
        };
        let service = BlobServiceClient::new(conn.blob_endpoint.clone(), None, Some(options))
            .map_err(|e| StorageError::Config(format!("blob endpoint: {e}")))?;
        Ok(Self {
            service,
            account_url: conn.blob_endpoint.clone(),
            conn: Some(conn),
            delegation: None,
        })
    }

    /// Azure: Microsoft Entra ID tokens (the Function App's managed identity).
    pub fn with_credential(
        account_url: Url,
        credential: Arc<dyn TokenCredential>,
        retry: RetryPolicy,
    ) -> Result<Self> {
        let options = BlobServiceClientOptions {
            client_options: ClientOptions {
                retry: retry.options(),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut account_url = account_url;
        account_url.set_query(None);
        let trimmed = account_url.as_str().trim_end_matches('/').to_string();
        let account_url =
            Url::parse(&trimmed).map_err(|e| StorageError::Config(format!("account URL: {e}")))?;
        let service = BlobServiceClient::new(account_url.clone(), Some(credential), Some(options))
            .map_err(|e| StorageError::Config(format!("account URL: {e}")))?;
        // `https://{account}.blob.core.windows.net`; Azurite-style URLs put it in the path.
        let account = match account_url.path().trim_matches('/') {
            "" => account_url
                .host_str()
                .and_then(|h| h.split('.').next())
                .unwrap_or_default()
                .to_string(),
            path => path.split('/').next().unwrap_or_default().to_string(),
        };
        Ok(Self {
            service,
            account_url,
            conn: None,
            delegation: Some(Delegation {
                account,
                key: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// The account's blob endpoint, e.g. `https://acct.blob.core.windows.net` (no credentials).
    pub fn account_url(&self) -> &Url {
        &self.account_url
    }

    /// The public URL of a blob (no credentials): what the batch service is given.
    pub fn blob_url(&self, container: &str, name: &str) -> String {
        let mut url = self.account_url.clone();
        url.path_segments_mut()
            .expect("account URL is a base URL")
            .pop_if_empty()
            .push(container)
            .extend(name.split('/'));
        url.to_string()
    }

    /// The public URL of a container (no credentials).
    pub fn container_url(&self, container: &str) -> String {
        let mut url = self.account_url.clone();
        url.path_segments_mut()
            .expect("account URL is a base URL")
            .pop_if_empty()
            .push(container);
        url.to_string()
    }

    /// Splits a blob URL into (container, blob name) when, and only when, it points into this
    /// storage account. Anything else (another account, another host, a query) is `None`: URLs
    /// from events or the service are never fetched blindly.
    pub fn locate(&self, url: &str) -> Option<(String, String)> {
        let url = Url::parse(url).ok()?;
        if url.scheme() != self.account_url.scheme()
            || !url
                .host_str()?
                .eq_ignore_ascii_case(self.account_url.host_str()?)
            || url.port_or_known_default() != self.account_url.port_or_known_default()
            || url.username() != ""
            || url.password().is_some()
        {
            return None;
        }
        let base: Vec<&str> = self
            .account_url
            .path_segments()
            .map(|s| s.filter(|p| !p.is_empty()).collect())
            .unwrap_or_default();
        let segments: Vec<&str> = url.path_segments()?.collect();
        if segments.len() < base.len() + 2 || segments[..base.len()] != base[..] {
            return None;
        }
        let decode = |s: &str| -> Option<String> {
            percent_decode(s).filter(|d| !d.is_empty() && d != "." && d != "..")
        };
        let container = decode(segments[base.len()])?;
        let name_parts: Option<Vec<String>> = segments[base.len() + 1..]
            .iter()
            .map(|s| decode(s))
            .collect();
        Some((container, name_parts?.join("/")))
    }

    /// [`locate`](Self::locate) for the URL a storage event names. An account with a
    /// hierarchical namespace (ADLS Gen2) names its blobs in events on its Data Lake endpoint,
    /// `{account}.dfs.{suffix}`, with the same container and path as on `{account}.blob.{suffix}`
    /// ("the `url` key contains the path `dfs.core.windows.net`", event-schema-blob-storage,
    /// https://learn.microsoft.com/azure/event-grid/event-schema-blob-storage). That endpoint of
    /// the configured account, and only that one, is read as the blob endpoint; every other
    /// check of `locate` still applies, and nothing is ever requested from the URL itself.
    pub fn locate_event(&self, url: &str) -> Option<(String, String)> {
        let mut parsed = Url::parse(url).ok()?;
        match self.blob_host_of_dfs(parsed.host_str()?) {
            Some(blob_host) => {
                parsed.set_host(Some(&blob_host)).ok()?;
                self.locate(parsed.as_str())
            }
            None => self.locate(url),
        }
    }

    /// This account's blob host, when `host` is its Data Lake twin: `acct.dfs.core.windows.net`
    /// for `acct.blob.core.windows.net`. Endpoints with the account in the path (Azurite, an IP
    /// address) have no twin.
    fn blob_host_of_dfs(&self, host: &str) -> Option<String> {
        let ours = self.account_url.host_str()?;
        let (account, service_and_suffix) = ours.split_once('.')?;
        let suffix = service_and_suffix.strip_prefix("blob.")?;
        let dfs = format!("{account}.dfs.{suffix}");
        host.eq_ignore_ascii_case(&dfs).then(|| ours.to_string())
    }

    pub async fn ensure_container(&self, container: &str) -> Result<()> {
        let client = self.service.blob_container_client(container);
        match client.create(None).await {
            Ok(_) => Ok(()),
            Err(e)
                if u16::from(e.http_status().unwrap_or(azure_core::http::StatusCode::Ok))
                    == 409 =>
            {
                Ok(())
            }
            Err(e) => Err(StorageError::from_sdk("create container", container, "", e)),
        }
    }

    /// The blob's ETag and size, or `None` when it does not exist.
    pub async fn properties(&self, container: &str, name: &str) -> Result<Option<BlobInfo>> {
        Ok(self
            .properties_with_copy(container, name)
            .await?
            .map(|p| p.info))
    }

    /// [`properties`](Self::properties), and whether a copy into the blob is still running.
    pub async fn properties_with_copy(
        &self,
        container: &str,
        name: &str,
    ) -> Result<Option<BlobProperties>> {
        let blob = self.service.blob_client(container, name);
        let sdk = |e| StorageError::from_sdk("read properties", container, name, e);
        match blob.get_properties(None).await {
            Ok(r) => {
                let etag = required_etag(
                    r.etag().map_err(sdk)?.map(|e| e.to_string()),
                    "read properties",
                    container,
                    name,
                )?;
                let size = r.content_length().map_err(sdk)?.unwrap_or(0);
                Ok(Some(BlobProperties {
                    info: BlobInfo {
                        name: name.to_string(),
                        etag,
                        size,
                        modified: None,
                    },
                    copy_pending: matches!(
                        r.copy_status().map_err(sdk)?,
                        Some(CopyStatus::Pending)
                    ),
                }))
            }
            Err(e) => match StorageError::from_sdk("read properties", container, name, e) {
                StorageError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    /// Streams a blob in 1 MiB pieces, one request at a time: memory stays flat whatever the
    /// size. With `if_match`, the download fails with `ConditionNotMet` if the blob is no longer
    /// that version (every ranged request carries the ETag of the first).
    pub async fn download(
        &self,
        container: &str,
        name: &str,
        if_match: Option<&str>,
    ) -> Result<(
        BlobInfo,
        impl Stream<Item = Result<Bytes>> + Send + 'static + use<>,
    )> {
        let blob = self.service.blob_client(container, name);
        let options = BlobClientDownloadOptions {
            parallel: NonZero::new(1),
            partition_size: NonZero::new(1 << 20),
            if_match: if_match.map(Etag::from),
            ..Default::default()
        };
        let res = blob
            .download(Some(options))
            .await
            .map_err(|e| StorageError::from_sdk("download", container, name, e))?;
        let info = BlobInfo {
            name: name.to_string(),
            etag: required_etag(
                res.properties.etag.as_ref().map(|e| e.to_string()),
                "download",
                container,
                name,
            )?,
            size: res.properties.content_length.unwrap_or(0),
            modified: None,
        };
        let (c, n) = (container.to_string(), name.to_string());
        let body = res
            .body
            .map_err(move |e| StorageError::from_sdk("download", &c, &n, e));
        Ok((info, body))
    }

    /// Reads a small blob whole (job records, summaries). `None` when it does not exist.
    pub async fn read(&self, container: &str, name: &str) -> Result<Option<(Bytes, String)>> {
        let (info, body) = match self.download(container, name, None).await {
            Ok(x) => x,
            Err(StorageError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let chunks: Vec<Bytes> = body.try_collect().await?;
        Ok(Some((Bytes::from(chunks.concat()), info.etag)))
    }

    /// Writes a small blob in one request. Returns the new ETag.
    pub async fn write(
        &self,
        container: &str,
        name: &str,
        data: Bytes,
        condition: WriteCondition,
        content_type: &str,
    ) -> Result<String> {
        self.write_with_metadata(
            container,
            name,
            data,
            condition,
            content_type,
            HashMap::new(),
        )
        .await
    }

    /// [`Self::write`], with metadata set in the same request, so that the metadata a listing
    /// returns always belongs to the content beside it.
    pub async fn write_with_metadata(
        &self,
        container: &str,
        name: &str,
        data: Bytes,
        condition: WriteCondition,
        content_type: &str,
        metadata: HashMap<String, String>,
    ) -> Result<String> {
        let blob = self.service.blob_client(container, name);
        let mut options = BlockBlobClientUploadOptions {
            blob_content_type: Some(content_type.to_string()),
            metadata: (!metadata.is_empty()).then_some(metadata),
            ..Default::default()
        };
        match condition {
            WriteCondition::Always => {}
            WriteCondition::IfNotExists => options.if_none_match = Some(Etag::from("*")),
            WriteCondition::IfMatch(etag) => options.if_match = Some(Etag::from(etag)),
        }
        let res = blob
            .upload(RequestContent::from(data.to_vec()), Some(options))
            .await
            .map_err(|e| StorageError::from_sdk("write", container, name, e))?;
        required_etag(res.etag.map(|e| e.to_string()), "write", container, name)
    }

    /// Starts a streamed upload: blocks are staged as they come and committed at the end, so a
    /// file of any size passes through a fixed-size buffer.
    pub fn writer(&self, container: &str, name: &str, content_type: &str) -> BlobWriter {
        BlobWriter {
            client: self
                .service
                .blob_client(container, name)
                .block_blob_client(),
            container: container.to_string(),
            name: name.to_string(),
            content_type: content_type.to_string(),
            buffer: Vec::with_capacity(BLOCK_SIZE),
            block_ids: Vec::new(),
            bytes: 0,
        }
    }

    /// Deletes a blob. `Ok(false)` when it was already gone.
    pub async fn delete(
        &self,
        container: &str,
        name: &str,
        if_match: Option<&str>,
    ) -> Result<bool> {
        let blob = self.service.blob_client(container, name);
        let options = BlobClientDeleteOptions {
            if_match: if_match.map(Etag::from),
            ..Default::default()
        };
        match blob.delete(Some(options)).await {
            Ok(_) => Ok(true),
            Err(e) => match StorageError::from_sdk("delete", container, name, e) {
                StorageError::NotFound { .. } => Ok(false),
                other => Err(other),
            },
        }
    }

    /// Lists blobs under a prefix, page by page (the SDK follows the continuation markers).
    pub fn list(
        &self,
        container: &str,
        prefix: &str,
    ) -> impl Stream<Item = Result<BlobInfo>> + Send + 'static + use<> {
        self.list_entries(container, prefix, false)
            .map_ok(|(info, _)| info)
    }

    /// [`Self::list`] with each blob's metadata, in the same requests (`include=metadata`).
    pub fn list_with_metadata(
        &self,
        container: &str,
        prefix: &str,
    ) -> impl Stream<Item = Result<(BlobInfo, HashMap<String, String>)>> + Send + 'static + use<>
    {
        self.list_entries(container, prefix, true)
    }

    /// One page of [`Self::list`]: at most `max` blobs (5,000 at most, storage's own cap),
    /// from `marker` (the continuation a previous page gave; `None`: the first), and the
    /// continuation for the next page (`None`: this was the last). Storage's markers stay
    /// valid across requests, so a listing can be spread over several invocations.
    pub async fn list_page(
        &self,
        container: &str,
        marker: Option<String>,
        max: u32,
    ) -> Result<(Vec<BlobInfo>, Option<String>)> {
        let client = self.service.blob_container_client(container);
        let options = BlobContainerClientListBlobsOptions {
            maxresults: Some(max.clamp(1, 5000) as i32),
            marker,
            ..Default::default()
        };
        let fail = |e| StorageError::from_sdk("list", container, "", e);
        let mut pages = client.list_blobs(Some(options)).map_err(fail)?.into_pages();
        let Some(page) = pages.try_next().await.map_err(fail)? else {
            return Ok((Vec::new(), None));
        };
        let page = page.into_model().map_err(fail)?;
        let blobs = page
            .blob_items
            .into_iter()
            .map(|item| {
                let props = item.properties.unwrap_or_default();
                let name = item.name.unwrap_or_default();
                Ok(BlobInfo {
                    etag: required_etag(
                        props.etag.map(|e| e.to_string()),
                        "list",
                        container,
                        &name,
                    )?,
                    name,
                    size: props.content_length.unwrap_or(0),
                    modified: props.last_modified.map(|t| t.unix_timestamp()),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((blobs, page.next_marker.filter(|m| !m.is_empty())))
    }

    fn list_entries(
        &self,
        container: &str,
        prefix: &str,
        metadata: bool,
    ) -> impl Stream<Item = Result<(BlobInfo, HashMap<String, String>)>> + Send + 'static + use<>
    {
        let client = self.service.blob_container_client(container);
        let options = BlobContainerClientListBlobsOptions {
            prefix: (!prefix.is_empty()).then(|| prefix.to_string()),
            maxresults: Some(5000),
            include: metadata.then(|| vec![ListBlobsIncludeItem::Metadata]),
            ..Default::default()
        };
        let c = container.to_string();
        let pager = client.list_blobs(Some(options));
        futures::stream::once(async move { pager })
            .map(move |p| p.map_err(|e| StorageError::from_sdk("list", &c, "", e)))
            .map_ok({
                let c = container.to_string();
                move |pager| {
                    let c = c.clone();
                    pager.map(move |item| {
                        let item = item.map_err(|e| StorageError::from_sdk("list", &c, "", e))?;
                        let props = item.properties.unwrap_or_default();
                        let name = item.name.unwrap_or_default();
                        let metadata = item.metadata.and_then(|m| m.values).unwrap_or_default();
                        Ok((
                            BlobInfo {
                                etag: required_etag(
                                    props.etag.map(|e| e.to_string()),
                                    "list",
                                    &c,
                                    &name,
                                )?,
                                name,
                                size: props.content_length.unwrap_or(0),
                                modified: props.last_modified.map(|t| t.unix_timestamp()),
                            },
                            metadata,
                        ))
                    })
                }
            })
            .try_flatten()
    }

    /// Server-side copy within this account: the bytes never pass through this process.
    /// Waits for the copy to finish (same-account copies complete in seconds).
    pub async fn copy(
        &self,
        src_container: &str,
        src_name: &str,
        dst_container: &str,
        dst_name: &str,
    ) -> Result<()> {
        let mut source = Url::parse(&self.blob_url(src_container, src_name))
            .map_err(|e| StorageError::Config(format!("copy source URL: {e}")))?;
        // The copy source is read by the service on our behalf, so it must carry its own
        // authorization: Copy Blob takes the source "authorized via a shared access signature"
        // (https://learn.microsoft.com/rest/api/storageservices/copy-blob, x-ms-copy-source).
        if let Some(conn) = &self.conn {
            source.set_query(Some(&conn.account_sas(StdDuration::from_secs(3600))?));
        } else if let Some(delegation) = &self.delegation {
            let sas = self
                .user_delegation_sas(delegation, src_container, src_name)
                .await?;
            source.set_query(Some(&sas));
        }
        let dst = self.service.blob_client(dst_container, dst_name);
        let res = dst
            .start_copy_from_url(source.to_string(), None)
            .await
            .map_err(|e| StorageError::from_sdk("copy", src_container, src_name, e))?;
        use azure_storage_blob::models::BlobClientStartCopyFromUrlResultHeaders;
        let mut status = res
            .copy_status()
            .map_err(|e| StorageError::from_sdk("copy", dst_container, dst_name, e))?;
        let mut waited = StdDuration::ZERO;
        while matches!(status, Some(CopyStatus::Pending)) {
            if waited > StdDuration::from_secs(120) {
                return Err(StorageError::Transient {
                    op: "copy",
                    target: format!("{dst_container}/{dst_name}"),
                    message: "server-side copy still pending after 120 s".into(),
                });
            }
            tokio::time::sleep(StdDuration::from_millis(250)).await;
            waited += StdDuration::from_millis(250);
            status = dst
                .get_properties(None)
                .await
                .map_err(|e| StorageError::from_sdk("copy", dst_container, dst_name, e))?
                .copy_status()
                .map_err(|e| StorageError::from_sdk("copy", dst_container, dst_name, e))?;
        }
        match status {
            None | Some(CopyStatus::Success) => Ok(()),
            Some(other) => Err(StorageError::Failed {
                op: "copy",
                target: format!("{dst_container}/{dst_name}"),
                message: format!("copy ended as {other:?}"),
            }),
        }
    }
}

impl BlobStore {
    /// A read-only SAS for one blob, valid 30 minutes, signed with a user delegation key
    /// (Entra ID; no account key exists in production). The key is fetched once and reused
    /// until it has less than an hour left; the identity needs
    /// `generateUserDelegationKey`, which Storage Blob Data Contributor/Owner include
    /// (https://learn.microsoft.com/rest/api/storageservices/create-user-delegation-sas and
    /// .../get-user-delegation-key).
    async fn user_delegation_sas(
        &self,
        delegation: &Delegation,
        container: &str,
        name: &str,
    ) -> Result<String> {
        let now = OffsetDateTime::now_utc();
        let mut cached = delegation.key.lock().await;
        let fresh = cached
            .as_ref()
            .and_then(|k| k.signed_expiry)
            .is_some_and(|exp| exp > now + Duration::hours(1));
        if !fresh {
            let info = KeyInfo {
                start: Some(now - Duration::minutes(5)),
                expiry: Some(now + Duration::hours(6)),
                ..Default::default()
            };
            let content = info
                .try_into()
                .map_err(|e: azure_core::Error| StorageError::Config(e.to_string()))?;
            let key = self
                .service
                .get_user_delegation_key(content, None)
                .await
                .map_err(|e| StorageError::from_sdk("get user delegation key", "", "", e))?
                .into_model()
                .map_err(|e| StorageError::from_sdk("get user delegation key", "", "", e))?;
            *cached = Some(key);
        }
        let key = cached.as_ref().expect("set above");
        let sas = azure_storage_sas::SasBuilder::new(
            delegation.account.clone(),
            key,
            now + Duration::minutes(30),
        )
        .map_err(|e| StorageError::Config(format!("user delegation key: {e}")))?
        .start(now - Duration::minutes(5))
        .blob(container, name)
        .read()
        .build();
        Ok(sas)
    }
}

/// Conditions for [`BlobStore::write`].
#[derive(Debug, Clone)]
pub enum WriteCondition {
    Always,
    /// Create only (`If-None-Match: *`); `AlreadyExists` otherwise.
    IfNotExists,
    /// Replace only this version (`If-Match`); `ConditionNotMet` otherwise.
    IfMatch(String),
}

const BLOCK_SIZE: usize = 4 << 20;

/// A streamed upload in 4 MiB blocks; nothing is visible until [`BlobWriter::finish`].
pub struct BlobWriter {
    client: azure_storage_blob::BlockBlobClient,
    container: String,
    name: String,
    content_type: String,
    buffer: Vec<u8>,
    block_ids: Vec<Vec<u8>>,
    bytes: u64,
}

impl BlobWriter {
    pub async fn write(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let room = BLOCK_SIZE - self.buffer.len();
            let take = room.min(data.len());
            self.buffer.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buffer.len() == BLOCK_SIZE {
                self.flush_block().await?;
            }
        }
        Ok(())
    }

    pub fn bytes_written(&self) -> u64 {
        self.bytes + self.buffer.len() as u64
    }

    async fn flush_block(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        // Block IDs must all have the same length within a blob.
        let id = format!("{:08}", self.block_ids.len()).into_bytes();
        let data = std::mem::replace(&mut self.buffer, Vec::with_capacity(BLOCK_SIZE));
        let len = data.len() as u64;
        self.client
            .stage_block(&id, len, RequestContent::from(data), None)
            .await
            .map_err(|e| StorageError::from_sdk("stage block", &self.container, &self.name, e))?;
        self.block_ids.push(id);
        self.bytes += len;
        Ok(())
    }

    /// Commits the blocks; the blob appears whole, replacing any earlier version. Returns its ETag.
    pub async fn finish(mut self) -> Result<String> {
        self.flush_block().await?;
        let list = BlockLookupList {
            latest: Some(self.block_ids.clone()),
            ..Default::default()
        };
        let content = list
            .try_into()
            .map_err(|e: azure_core::Error| StorageError::Config(e.to_string()))?;
        let options = BlockBlobClientCommitBlockListOptions {
            blob_content_type: Some(self.content_type.clone()),
            ..Default::default()
        };
        let res = self
            .client
            .commit_block_list(content, Some(options))
            .await
            .map_err(|e| StorageError::from_sdk("commit", &self.container, &self.name, e))?;
        use azure_storage_blob::models::BlockBlobClientCommitBlockListResultHeaders;
        required_etag(
            res.etag().ok().flatten().map(|e| e.to_string()),
            "commit",
            &self.container,
            &self.name,
        )
    }
}

fn percent_decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> BlobStore {
        BlobStore::from_connection_string(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;",
            RetryPolicy::default(),
        )
        .unwrap()
    }

    #[test]
    fn locate_accepts_only_this_account() {
        let s = store();
        assert_eq!(
            s.locate("http://127.0.0.1:10000/devstoreaccount1/batch-input/a/b%20c.jsonl"),
            Some(("batch-input".into(), "a/b c.jsonl".into()))
        );
        assert_eq!(
            s.locate("http://127.0.0.1:10001/devstoreaccount1/batch-input/x.jsonl"),
            None
        );
        assert_eq!(
            s.locate("http://evil.example/devstoreaccount1/batch-input/x.jsonl"),
            None
        );
        assert_eq!(
            s.locate("http://127.0.0.1:10000/otheraccount/batch-input/x.jsonl"),
            None
        );
        assert_eq!(
            s.locate("http://127.0.0.1:10000/devstoreaccount1/batch-input"),
            None
        );
        assert_eq!(
            s.locate("http://127.0.0.1:10000/devstoreaccount1/batch-input/%2E%2E"),
            None
        );
        assert_eq!(
            s.locate("https://127.0.0.1:10000/devstoreaccount1/batch-input/x.jsonl"),
            None
        );
    }

    #[test]
    fn an_event_on_the_accounts_dfs_endpoint_is_located_on_its_blob_endpoint() {
        let s = BlobStore::with_credential(
            Url::parse("https://my-storage-account.blob.core.windows.net").unwrap(),
            Arc::new(NoToken),
            RetryPolicy::default(),
        )
        .unwrap();
        // The URL of the docs' ADLS Gen2 BlobCreated example, and its blob endpoint twin.
        for url in [
            "https://my-storage-account.dfs.core.windows.net/my-file-system/new-file.txt",
            "https://MY-STORAGE-ACCOUNT.DFS.core.windows.net/my-file-system/new-file.txt",
            "https://my-storage-account.blob.core.windows.net/my-file-system/new-file.txt",
        ] {
            assert_eq!(
                s.locate_event(url),
                Some(("my-file-system".into(), "new-file.txt".into())),
                "{url}"
            );
        }
        // `locate` itself, which also checks what the batch service echoes, keeps to blob URLs.
        assert_eq!(
            s.locate("https://my-storage-account.dfs.core.windows.net/my-file-system/new-file.txt"),
            None
        );
        for url in [
            "https://other-account.dfs.core.windows.net/my-file-system/new-file.txt",
            "https://my-storage-account.dfs.core.chinacloudapi.cn/my-file-system/new-file.txt",
            "https://my-storage-account.dfs.core.windows.net.evil.example/c/new-file.txt",
            "https://my-storage-account.queue.core.windows.net/my-file-system/new-file.txt",
            "https://x.my-storage-account.dfs.core.windows.net/my-file-system/new-file.txt",
            "http://my-storage-account.dfs.core.windows.net/my-file-system/new-file.txt",
            "https://my-storage-account.dfs.core.windows.net:8443/my-file-system/new-file.txt",
            "https://u:p@my-storage-account.dfs.core.windows.net/my-file-system/new-file.txt",
            "https://my-storage-account.dfs.core.windows.net/my-file-system",
            "https://my-storage-account.dfs.core.windows.net/c/%2E%2E",
        ] {
            assert_eq!(s.locate_event(url), None, "{url}");
        }
        // An account named in the path (Azurite) has no dfs twin: its URLs are taken as they are.
        assert_eq!(
            store().locate_event("http://127.0.0.1:10000/devstoreaccount1/batch-input/x.jsonl"),
            Some(("batch-input".into(), "x.jsonl".into()))
        );
        assert_eq!(
            store().locate_event("http://devstoreaccount1.dfs.localhost:10000/batch-input/x.jsonl"),
            None
        );
    }

    /// A credential for building clients that never send.
    #[derive(Debug)]
    struct NoToken;

    #[async_trait]
    impl TokenCredential for NoToken {
        async fn get_token(
            &self,
            _: &[&str],
            _: Option<azure_core::credentials::TokenRequestOptions<'_>>,
        ) -> azure_core::Result<azure_core::credentials::AccessToken> {
            Err(azure_core::Error::with_message(
                ErrorKind::Credential,
                "not in a unit test",
            ))
        }
    }

    #[test]
    fn blob_url_round_trips_through_locate() {
        let s = store();
        let url = s.blob_url("batch-input", "dir/ä b%.jsonl");
        assert_eq!(
            s.locate(&url),
            Some(("batch-input".into(), "dir/ä b%.jsonl".into()))
        );
    }

    #[test]
    fn connection_string_errors_name_the_part_not_the_key() {
        let err = ConnectionString::parse("AccountName=x;AccountKey=!!notbase64!!").unwrap_err();
        assert!(err.to_string().contains("AccountKey is not base64"));
        assert!(!err.to_string().contains("notbase64"));
        let err = ConnectionString::parse("AccountKey=abcd").unwrap_err();
        assert!(err.to_string().contains("AccountName"));
        assert!(
            format!(
                "{:?}",
                ConnectionString::parse("UseDevelopmentStorage=true").unwrap()
            )
            .find("Eby8")
            .is_none()
        );
    }

    /// Stands for the rest of the pipeline: records the URL each try would send.
    #[derive(Debug, Default)]
    struct Capture(std::sync::Mutex<Vec<String>>);

    #[async_trait]
    impl Policy for Capture {
        async fn send(
            &self,
            _: &Context,
            request: &mut Request,
            _: &[Arc<dyn Policy>],
        ) -> PolicyResult {
            self.0.lock().unwrap().push(request.url().to_string());
            Err(azure_core::Error::with_message(ErrorKind::Io, "not sent"))
        }
    }

    #[tokio::test]
    async fn a_retried_request_carries_one_fresh_sas() {
        let conn = ConnectionString::parse("UseDevelopmentStorage=true").unwrap();
        let policy = AccountSasPolicy { conn };
        let capture = Arc::new(Capture::default());
        let next: Vec<Arc<dyn Policy>> = vec![capture.clone()];
        let url = Url::parse(
            "http://127.0.0.1:10000/devstoreaccount1/c?restype=container&comp=list&prefix=a%20b%2F",
        )
        .unwrap();
        let mut request = Request::new(url, azure_core::http::Method::Get);
        for _ in 0..3 {
            let _ = policy.send(&Context::default(), &mut request, &next).await;
        }
        for sent in capture.0.lock().unwrap().iter() {
            assert_eq!(sent.matches("sig=").count(), 1, "{sent}");
            assert!(
                sent.contains("restype=container&comp=list&prefix=a%20b%2F&sv="),
                "{sent}"
            );
        }
    }

    #[test]
    fn redact_hides_signatures() {
        assert_eq!(
            redact("GET http://h/c/b?sv=1&sig=abc%2Fdef&se=2 failed"),
            "GET http://h/c/b?sv=1&sig=REDACTED&se=2 failed"
        );
    }
}
