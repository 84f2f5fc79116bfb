//! What a host keeps for its next start: each Violin's spec as this host last applied
//! it, one JSON file per Violin under `RUN_DIR/violins/`, written atomically.

use crate::config::HostConfig;
use crate::spec::Violin;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

fn dir(cfg: &HostConfig) -> PathBuf {
    cfg.run_dir.join("violins")
}

pub fn save(cfg: &HostConfig, v: &Violin) -> Result<()> {
    let dir = dir(cfg);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".{}.json", v.name));
    std::fs::write(&tmp, serde_json::to_vec_pretty(v)?)?;
    std::fs::rename(&tmp, dir.join(format!("{}.json", v.name)))?;
    Ok(())
}

/// Forgets a Violin that was removed (a crash after this point does not bring it back).
pub fn forget(cfg: &HostConfig, name: &str) {
    let _ = std::fs::remove_file(dir(cfg).join(format!("{name}.json")));
}

/// Every saved spec, in name order, each read or with why it could not be.
pub fn load_all(cfg: &HostConfig) -> Vec<(PathBuf, Result<Violin>)> {
    let Ok(rd) = std::fs::read_dir(dir(cfg)) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let r = load(&f);
            (f, r)
        })
        .collect()
}

fn load(f: &Path) -> Result<Violin> {
    let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", f.display()))
}
