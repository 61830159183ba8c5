//! Blob URLs as the service reads and writes them: `{account endpoint}/{container}/{blob path}`
//! (Blob Storage's "Naming and Referencing Containers, Blobs, and Metadata",
//! https://learn.microsoft.com/rest/api/storageservices/naming-and-referencing-containers--blobs--and-metadata:
//! "Blob and container names are passed to the Blob service within a URL. Certain characters
//! must be percent-encoded").
//!
//! Written here, not borrowed from the handler's `BlobStore::locate` / `blob_url`: the handler
//! builds every `input_blob` it sends with those, so an emulator that parsed them back with
//! the same code would agree with any bug in them (a name encoded one wrong way and decoded the
//! same wrong way) and no test could see it. `BlobStore` stays the emulator's storage I/O only.

use azure_core::http::Url;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

/// What a path segment keeps unencoded: RFC 3986 §2.3's unreserved characters. Everything
/// else, `/` inside a segment, `%`, `?`, `#`, space and every non-ASCII byte included, is
/// percent-encoded as UTF-8, the form the storage docs prefer.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The one storage account the emulated service can reach with its identity.
#[derive(Debug, Clone)]
pub struct Account {
    /// The blob endpoint, e.g. `https://acct.blob.core.windows.net` or, with the account in
    /// the path as Azurite has it, `http://127.0.0.1:10000/devstoreaccount1`.
    endpoint: Url,
}

/// Why a URL does not name a blob (or folder) of this account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotHere {
    /// Not an `http(s)` URL at all.
    NotAUrl,
    /// Another account, host, port or scheme: the service's identity has no access there.
    OtherAccount,
    /// This account, but no container (and, for a blob, no blob name) in the path.
    NoContainer,
}

impl Account {
    pub fn new(endpoint: &Url) -> Self {
        let mut endpoint = endpoint.clone();
        endpoint.set_query(None);
        endpoint.set_fragment(None);
        Self { endpoint }
    }

    /// The URL of blob `name` in `container`: each `/`-separated segment encoded on its own,
    /// so the delimiter stays a delimiter and nothing else can end the path.
    pub fn blob_url(&self, container: &str, name: &str) -> String {
        let mut url = self.base();
        for segment in std::iter::once(container).chain(name.split('/')) {
            url.push('/');
            url.extend(utf8_percent_encode(segment, SEGMENT));
        }
        url
    }

    /// The (container, blob name) a blob URL names in this account. The URL is read as any
    /// HTTP client sends it: a `?` starts the query and a `#` the fragment, neither of which is
    /// part of the name (an unencoded `#` in a name cuts it short there); the host is compared
    /// case-insensitively (DNS names are); the path after the container is percent-decoded
    /// into the name.
    pub fn locate_blob(&self, url: &str) -> Result<(String, String), NotHere> {
        let (container, name) = self.locate(url)?;
        match name {
            Some(name) if !name.is_empty() => Ok((container, name)),
            _ => Err(NotHere::NoContainer),
        }
    }

    /// The (container, folder) a container or folder URL names in this account; the folder
    /// has no leading or trailing `/` and is empty for the container itself. A query (a SAS)
    /// or fragment is refused: the service writes with its own identity.
    pub fn locate_folder(&self, url: &str) -> Result<(String, String), NotHere> {
        let parsed = parse(url)?;
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(NotHere::OtherAccount);
        }
        let (container, folder) = self.locate(url)?;
        Ok((
            container,
            folder.unwrap_or_default().trim_matches('/').to_string(),
        ))
    }

    fn locate(&self, url: &str) -> Result<(String, Option<String>), NotHere> {
        let url = parse(url)?;
        let same_host = match (url.host_str(), self.endpoint.host_str()) {
            (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
            _ => false,
        };
        if url.scheme() != self.endpoint.scheme()
            || !same_host
            || url.port_or_known_default() != self.endpoint.port_or_known_default()
            || !url.username().is_empty()
            || url.password().is_some()
        {
            return Err(NotHere::OtherAccount);
        }
        // The endpoint's own path (Azurite's `/devstoreaccount1`) must lead the URL's.
        let prefix = self.endpoint.path().trim_end_matches('/');
        let rest = url
            .path()
            .strip_prefix(prefix)
            .filter(|r| r.is_empty() || r.starts_with('/'))
            .ok_or(NotHere::OtherAccount)?;
        let rest = rest.strip_prefix('/').unwrap_or(rest);
        let (container, name) = match rest.split_once('/') {
            Some((c, n)) => (c, Some(n)),
            None => (rest, None),
        };
        let container = decode(container);
        if container.is_empty() {
            return Err(NotHere::NoContainer);
        }
        Ok((container, name.map(decode)))
    }

    /// The endpoint as a string prefix, without a trailing `/`.
    fn base(&self) -> String {
        self.endpoint.as_str().trim_end_matches('/').to_string()
    }
}

fn parse(url: &str) -> Result<Url, NotHere> {
    Url::parse(url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .ok_or(NotHere::NotAUrl)
}

fn decode(text: &str) -> String {
    percent_decode_str(text).decode_utf8_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn azure() -> Account {
        Account::new(&Url::parse("https://acct.blob.core.windows.net").unwrap())
    }

    fn azurite() -> Account {
        Account::new(&Url::parse("http://127.0.0.1:10000/devstoreaccount1").unwrap())
    }

    /// Names a user may give their inputs, each with what the URL must carry for it.
    const NAMES: &[(&str, &str)] = &[
        ("plain.jsonl", "plain.jsonl"),
        ("with space.jsonl", "with%20space.jsonl"),
        ("100%.jsonl", "100%25.jsonl"),
        ("50%25off.jsonl", "50%2525off.jsonl"),
        (
            "été/日本語.jsonl",
            "%C3%A9t%C3%A9/%E6%97%A5%E6%9C%AC%E8%AA%9E.jsonl",
        ),
        ("a#b.jsonl", "a%23b.jsonl"),
        ("what?.jsonl", "what%3F.jsonl"),
        ("q?x=1&y=2.jsonl", "q%3Fx%3D1%26y%3D2.jsonl"),
        ("deep/er/still/x.jsonl", "deep/er/still/x.jsonl"),
        ("a+b;c=d@e.jsonl", "a%2Bb%3Bc%3Dd%40e.jsonl"),
        ("tilde~dash-under_dot.jsonl", "tilde~dash-under_dot.jsonl"),
    ];

    #[test]
    fn names_round_trip_through_their_urls() {
        for account in [azure(), azurite()] {
            for (name, encoded) in NAMES {
                let url = account.blob_url("batch-input", name);
                assert_eq!(
                    url,
                    format!("{}/batch-input/{encoded}", account.base()),
                    "{name}"
                );
                assert_eq!(
                    account.locate_blob(&url),
                    Ok(("batch-input".to_string(), name.to_string())),
                    "{url}"
                );
            }
        }
    }

    #[test]
    fn urls_are_read_as_an_http_client_sends_them() {
        let host = "https://acct.blob.core.windows.net";
        for (path, name) in [
            // An unencoded `#` or `?` ends the path: the name is what comes before.
            ("/in/a#b.jsonl", "a"),
            ("/in/what?.jsonl", "what"),
            // Encoded in another (equivalent) way than ours: still the same blob.
            ("/in/a%2fb%20c.jsonl", "a/b c.jsonl"),
            ("/in/x.jsonl", "x.jsonl"),
        ] {
            assert_eq!(
                azure().locate_blob(&format!("{host}{path}")),
                Ok(("in".to_string(), name.to_string())),
                "{path}"
            );
        }
        // The host is a DNS name: any case names the same account; the default port is it.
        for url in [
            "HTTPS://ACCT.Blob.Core.Windows.NET/in/x.jsonl",
            "https://acct.blob.core.windows.net:443/in/x.jsonl",
        ] {
            assert_eq!(
                azure().locate_blob(url),
                Ok(("in".into(), "x.jsonl".into()))
            );
        }
    }

    #[test]
    fn other_accounts_and_non_blobs_are_refused() {
        let a = azure();
        for url in [
            "https://other.blob.core.windows.net/in/x.jsonl",
            "http://acct.blob.core.windows.net/in/x.jsonl",
            "https://acct.blob.core.windows.net:8443/in/x.jsonl",
            "https://user:pw@acct.blob.core.windows.net/in/x.jsonl",
            "https://acct.blob.core.windows.net.evil.example/in/x.jsonl",
        ] {
            assert_eq!(a.locate_blob(url), Err(NotHere::OtherAccount), "{url}");
        }
        for url in ["not a url", "ftp://acct.blob.core.windows.net/in/x"] {
            assert_eq!(a.locate_blob(url), Err(NotHere::NotAUrl), "{url}");
        }
        for url in [
            "https://acct.blob.core.windows.net/",
            "https://acct.blob.core.windows.net/in",
            "https://acct.blob.core.windows.net/in/",
        ] {
            assert_eq!(a.locate_blob(url), Err(NotHere::NoContainer), "{url}");
        }
        // With the account in the path (Azurite), another account is another path.
        let z = azurite();
        for url in [
            "http://127.0.0.1:10000/otheraccount/in/x.jsonl",
            "http://127.0.0.1:10000/devstoreaccount1x/in/x.jsonl",
            "http://127.0.0.1:10001/devstoreaccount1/in/x.jsonl",
        ] {
            assert_eq!(z.locate_blob(url), Err(NotHere::OtherAccount), "{url}");
        }
    }

    #[test]
    fn folders_are_containers_or_paths_in_them() {
        let z = azurite();
        let base = "http://127.0.0.1:10000/devstoreaccount1";
        assert_eq!(
            z.locate_folder(&format!("{base}/out")),
            Ok(("out".into(), String::new()))
        );
        assert_eq!(
            z.locate_folder(&format!("{base}/out/runs/2026%20q1/")),
            Ok(("out".into(), "runs/2026 q1".into()))
        );
        assert_eq!(z.locate_folder(base), Err(NotHere::NoContainer));
        assert_eq!(
            z.locate_folder(&format!("{base}/out?sv=x")),
            Err(NotHere::OtherAccount),
            "a SAS is not how the service writes"
        );
    }
}
