//! Finding a pretrained model: a local Hugging Face model folder, or a hub id (`org/name`,
//! optionally `org/name@revision`) resolved through the hub cache that `transformers` and
//! `huggingface-cli` fill (`$HF_HOME/hub/models--org--name/snapshots/<commit>/…`). With
//! `HF_HUB_OFFLINE=1` only the cache is consulted; otherwise missing files are downloaded into
//! it.

use anyhow::{bail, Result};
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// The weights: one file, or the index of a sharded checkpoint (naming its shards).
const WEIGHTS: [&str; 2] = ["model.safetensors", "model.safetensors.index.json"];
/// Files fetched when present.
const OPTIONAL: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
];

/// The folder holding `config.json` and the weights (`model.safetensors`, or a sharded
/// checkpoint's `model.safetensors.index.json` and shards) for `spec`.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        if !path.join("config.json").is_file() {
            bail!(
                "{} is not a Hugging Face model folder: it has no config.json",
                path.display()
            );
        }
        if !WEIGHTS.iter().any(|f| path.join(f).is_file()) {
            bail!(
                "{} is not a Hugging Face model folder: it has no model.safetensors (nor a \
                 sharded checkpoint's model.safetensors.index.json)",
                path.display()
            );
        }
        return Ok(path.to_path_buf());
    }
    let looks_like_id = !spec.starts_with(['.', '/', '~'])
        && spec.split('@').next().unwrap_or("").split('/').count() <= 2
        && !spec.is_empty();
    if !looks_like_id {
        bail!("no model folder at {spec}");
    }
    let (id, revision) = match spec.split_once('@') {
        Some((id, rev)) => (id, rev),
        None => (spec, "main"),
    };
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string());
    let cache = Cache::from_env();
    let cached = cache.repo(repo.clone());
    if let Some(config) = cached.get("config.json") {
        if WEIGHTS.iter().any(|f| cached.get(f).is_some()) {
            return Ok(config
                .parent()
                .expect("a cached file has a folder")
                .to_path_buf());
        }
    }
    let hub = cache.path().display().to_string();
    if offline() {
        bail!(
            "model {spec} is not in the Hugging Face cache at {hub} (or lacks config.json / \
             model.safetensors) and HF_HUB_OFFLINE=1 forbids downloading it; run \
             `huggingface-cli download {id}` where the hub is reachable, point HF_HOME at a cache \
             that has it, or give a local model folder"
        );
    }
    download(repo, &hub).map_err(|e| {
        anyhow::anyhow!(
            "model {spec} is not in the Hugging Face cache at {hub} and downloading it failed: \
             {e}; check the id, the network, or give a local model folder"
        )
    })
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

fn download(repo: Repo, hub: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()?;
    let remote = api.repo(repo);
    let config = remote.get("config.json")?;
    if remote.get(WEIGHTS[0]).is_err() {
        // A sharded checkpoint: the index, then every shard it names.
        let index = remote.get(WEIGHTS[1])?;
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)?;
        let mut shards: Vec<&str> = (v["weight_map"].as_object().into_iter())
            .flat_map(|m| m.values().filter_map(|s| s.as_str()))
            .collect();
        shards.sort();
        shards.dedup();
        for s in shards {
            remote.get(s)?;
        }
    }
    for f in OPTIONAL {
        // Not every model has every file; the ones it has are fetched.
        let _ = remote.get(f);
    }
    eprintln!("downloaded into the Hugging Face cache at {hub}");
    Ok(config
        .parent()
        .expect("a cached file has a folder")
        .to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache laid out as the hub client writes it.
    fn fake_cache(root: &Path, id: &str, files: &[&str]) -> PathBuf {
        let repo = root.join(format!("hub/models--{}", id.replace('/', "--")));
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), commit).unwrap();
        let snap = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        for f in files {
            std::fs::write(snap.join(f), "{}").unwrap();
        }
        snap
    }

    // One test: it sets process-wide environment variables.
    #[test]
    fn resolves_folders_and_the_hub_cache() {
        let dir = tempfile::tempdir().unwrap();
        let snap = fake_cache(
            dir.path(),
            "acme/tiny-gpt",
            &["config.json", "model.safetensors", "tokenizer.json"],
        );
        fake_cache(dir.path(), "acme/no-weights", &["config.json"]);
        let sharded = fake_cache(
            dir.path(),
            "acme/sharded",
            &["config.json", "model.safetensors.index.json"],
        );
        unsafe {
            std::env::set_var("HF_HOME", dir.path());
            std::env::set_var("HF_HUB_OFFLINE", "1");
        }
        assert_eq!(resolve("acme/tiny-gpt").unwrap(), snap);
        assert_eq!(resolve(snap.to_str().unwrap()).unwrap(), snap);
        assert_eq!(resolve("acme/sharded").unwrap(), sharded);
        assert_eq!(resolve(sharded.to_str().unwrap()).unwrap(), sharded);

        let e = resolve("acme/missing").unwrap_err().to_string();
        assert!(
            e.contains("not in the Hugging Face cache") && e.contains("HF_HUB_OFFLINE"),
            "{e}"
        );
        let e = resolve("acme/no-weights").unwrap_err().to_string();
        assert!(e.contains("model.safetensors"), "{e}");
        let e = resolve(dir.path().join("hub").to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no config.json"), "{e}");
        let e = resolve("./nowhere").unwrap_err().to_string();
        assert!(e.contains("no model folder at ./nowhere"), "{e}");
    }
}
