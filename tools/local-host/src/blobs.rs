//! `upload`, `cat` and `ls`: the few blob operations a local run needs, so scripts need neither
//! the Azure CLI nor a SAS-signing client.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use aoai_blob_batch::storage::{BlobStore, RetryPolicy};
use futures::{StreamExt, TryStreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub fn store(connection_string: &str) -> Result<BlobStore> {
    BlobStore::from_connection_string(connection_string, RetryPolicy::default())
        .map_err(|e| anyhow!("{e}"))
}

/// `CONTAINER/BLOB` → (container, blob name); the name may contain further slashes.
pub fn split_path(path: &str) -> Result<(String, String)> {
    match path.split_once('/') {
        Some((c, b)) if !c.is_empty() && !b.is_empty() => Ok((c.to_string(), b.to_string())),
        _ => bail!("`{path}` is not CONTAINER/BLOB"),
    }
}

fn content_type_for(name: &str) -> &'static str {
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".jsonl") {
        "application/jsonl"
    } else if lower.ends_with(".json") {
        "application/json"
    } else if lower.ends_with(".txt") {
        "text/plain"
    } else {
        "application/octet-stream"
    }
}

/// Streams a local file into a block blob (staged blocks, then PutBlockList, the call that
/// raises BlobCreated in Azure). Creates the container if needed.
pub async fn upload(store: &BlobStore, container: &str, name: &str, file: &Path) -> Result<()> {
    store
        .ensure_container(container)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let mut input = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("cannot read {}", file.display()))?;
    let mut writer = store.writer(container, name, content_type_for(name));
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = input.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        writer
            .write(&buffer[..n])
            .await
            .map_err(|e| anyhow!("{e}"))?;
    }
    let size = writer.bytes_written();
    let etag = writer.finish().await.map_err(|e| anyhow!("{e}"))?;
    println!(
        "uploaded {} → {container}/{name} ({size} bytes, ETag {etag})",
        file.display()
    );
    Ok(())
}

/// Writes a blob's content to stdout.
pub async fn cat(store: &BlobStore, container: &str, name: &str) -> Result<()> {
    let (_, mut body) = store
        .download(container, name, None)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let mut out = tokio::io::stdout();
    while let Some(chunk) = body.next().await {
        out.write_all(&chunk.map_err(|e| anyhow!("{e}"))?).await?;
    }
    out.flush().await?;
    Ok(())
}

/// Lists blobs under a prefix: size, ETag and name, one per line.
pub async fn ls(store: &BlobStore, container: &str, prefix: &str) -> Result<()> {
    let blobs: Vec<_> = store
        .list(container, prefix)
        .try_collect()
        .await
        .map_err(|e| anyhow!("{e}"))?;
    for b in blobs {
        println!("{:>12}  {:<22}  {container}/{}", b.size, b.etag, b.name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            split_path("batch-output/test/summary.json").unwrap(),
            ("batch-output".into(), "test/summary.json".into())
        );
        assert!(split_path("batch-output").is_err());
        assert!(split_path("/x").is_err());
        assert!(split_path("c/").is_err());
    }
}
