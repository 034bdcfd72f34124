//! Demo credentials of any tenant marked `demo = true`: generated on first start, kept in the data dir so a restart prints the same tokens.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::Context;

use crate::tenant::{Secret, TenantConfig};

/// File in the data dir holding generated demo tokens, one `KEY=TOKEN` line each.
pub const DEMO_TOKENS_FILE: &str = "demo-tokens";
/// `bytes` random bytes from the kernel.
pub fn random_bytes(bytes: usize) -> anyhow::Result<Vec<u8>> {
    let mut out = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut out))
        .context("reading /dev/urandom")?;
    Ok(out)
}

/// A fresh bearer token: 24 random bytes, URL-safe base64 (32 characters).
pub fn random_token() -> anyhow::Result<String> {
    use base64::Engine;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes(24)?))
}

/// Writes `text` to `path` through a temp file and rename, so a crash leaves the old or the new.
fn write_atomically(path: &Path, text: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Fills in the tokens of demo tenants: reused from the data dir, generated where missing
/// (and then saved). Returns the lines to print before the ready line.
pub fn fill_demo_tokens(
    data_dir: &Path,
    tenants: &mut [TenantConfig],
) -> anyhow::Result<Vec<String>> {
    if !tenants.iter().any(|t| t.demo) {
        return Ok(Vec::new());
    }
    let path = data_dir.join(DEMO_TOKENS_FILE);
    let mut saved = BTreeMap::new();
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let (key, token) = line
                    .split_once('=')
                    .with_context(|| format!("{}: bad line {line:?}", path.display()))?;
                saved.insert(key.to_owned(), token.to_owned());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let before = saved.clone();
    let mut lines = Vec::new();
    for tenant in tenants.iter_mut().filter(|t| t.demo) {
        for agent in &mut tenant.agent {
            let key = format!("{}/agent/{}", tenant.name, agent.name);
            let token = match &agent.token {
                Some(t) => t.expose().to_owned(),
                None => match saved.get(&key) {
                    Some(t) => t.clone(),
                    None => random_token()?,
                },
            };
            saved.insert(key, token.clone());
            agent.token = Some(Secret::new(token.clone()));
            lines.push(format!(
                "kefu demo agent={} groups={} token={token}",
                agent.name,
                agent.groups.join(",")
            ));
        }
        for integration in &mut tenant.integration {
            let key = format!("{}/integration/{}", tenant.name, integration.name);
            let token = match &integration.token {
                Some(t) => t.expose().to_owned(),
                None => match saved.get(&key) {
                    Some(t) => t.clone(),
                    None => random_token()?,
                },
            };
            saved.insert(key, token.clone());
            integration.token = Some(Secret::new(token.clone()));
            lines.push(format!("kefu demo integration token={token}"));
        }
    }
    if saved != before {
        let text: String = saved.iter().map(|(k, t)| format!("{k}={t}\n")).collect();
        write_atomically(&path, text.as_bytes())?;
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Flags, load};

    #[test]
    fn demo_tokens_persist_across_starts() {
        let dir = tempfile::tempdir().unwrap();
        let mut tenants = load(&Flags::default()).unwrap().tenants;
        let first = fill_demo_tokens(dir.path(), &mut tenants).unwrap();
        assert!(
            first
                .iter()
                .any(|l| l.starts_with("kefu demo agent=alice groups=sales,support token="))
        );
        assert!(
            first
                .iter()
                .any(|l| l.starts_with("kefu demo integration token="))
        );
        let mut again = load(&Flags::default()).unwrap().tenants;
        let second = fill_demo_tokens(dir.path(), &mut again).unwrap();
        assert_eq!(first, second);
    }
}
