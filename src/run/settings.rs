//! What made a run's reusable parts: the settings behind its synthetic data, its warm start
//! and the run itself, compared when they are reused, so that a changed setting is never
//! silently ignored. Settings are compared as flattened `key = value` pairs.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};

use crate::config::RunConfig;

/// Dotted keys and their values (as TOML text) of a TOML table.
fn flatten(table: &toml::Table, prefix: &str, out: &mut BTreeMap<String, String>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => flatten(t, &key, out),
            other => {
                out.insert(key, other.to_string());
            }
        }
    }
}

fn pairs(text: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let table: toml::Table = toml::from_str(text)?;
    let mut out = BTreeMap::new();
    flatten(&table, "", &mut out);
    Ok(out)
}

/// `key: old -> new` for every key whose value differs, that `keep` selects.
pub fn differences(
    old: &str,
    new: &str,
    keep: impl Fn(&str) -> bool,
) -> anyhow::Result<Vec<String>> {
    let (old, new) = (pairs(old)?, pairs(new)?);
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let none = "(unset)".to_string();
    Ok(keys
        .into_iter()
        .filter(|k| keep(k))
        .filter_map(|k| {
            let (a, b) = (old.get(k).unwrap_or(&none), new.get(k).unwrap_or(&none));
            (a != b).then(|| format!("{k}: {a} -> {b}"))
        })
        .collect())
}

/// The settings that make the synthetic data set.
pub fn synthetic_data(cfg: &RunConfig) -> String {
    let mut s = cfg.data.synthetic.clone();
    s.seed = Some(s.seed.unwrap_or(cfg.seed));
    toml::to_string(&s).expect("serialisable")
}

/// The settings that make the SFT warm start: the model, the data and the SFT itself.
pub fn warm_start(cfg: &RunConfig) -> String {
    let mut c = cfg.clone();
    c.sft.seed = Some(c.sft.seed.unwrap_or(cfg.seed));
    let mut t = toml::Table::new();
    t.insert(
        "model".into(),
        toml::Value::try_from(&c.model).expect("serialisable"),
    );
    t.insert(
        "data".into(),
        toml::Value::try_from(&c.data).expect("serialisable"),
    );
    t.insert(
        "sft".into(),
        toml::Value::try_from(&c.sft).expect("serialisable"),
    );
    if let Some(toml::Value::Table(d)) = t.get_mut("data") {
        // How data is fed, and what is evaluated, do not change what SFT learns.
        for key in [
            "prefetch",
            "workers",
            "test",
            "eval_modalities",
            "max_eval",
            "eval_template",
        ] {
            d.remove(key);
        }
    }
    if let Some(toml::Value::Table(s)) = t.get_mut("sft") {
        s.remove("warm_start");
    }
    toml::to_string(&t).expect("serialisable")
}

/// Checks `dir/settings.toml` (written with what was made in `dir`) against `expected`;
/// writes it when absent (what earlier versions made is taken as it is).
pub fn check_reuse(dir: &Path, what: &str, expected: &str) -> anyhow::Result<()> {
    let path = dir.join("settings.toml");
    let Ok(recorded) = std::fs::read_to_string(&path) else {
        return record(dir, expected);
    };
    let diff = differences(&recorded, expected, |_| true)
        .with_context(|| format!("{} is not readable", path.display()))?;
    if !diff.is_empty() {
        bail!(
            "{} was made with other settings than this run's, so it cannot be reused:\n  {}\n\
             start over with `--force` (the old run is moved aside), or choose another `name`",
            what,
            diff.join("\n  ")
        );
    }
    Ok(())
}

/// Records the settings that made what is in `dir`.
pub fn record(dir: &Path, settings: &str) -> anyhow::Result<()> {
    super::guard::write_atomic(&dir.join("settings.toml"), settings)
}

/// Settings newer than some runs' `config.toml`, with the value that does what runs made
/// before them did: a key a run did not record is compared with this value.
const LEGACY: &[(&str, &str)] = &[("data.resize", "[]"), ("data.skip_invalid", "false")];

/// `(refused, allowed)`: the differences between a run's recorded config and a resumed
/// run's, split by [`may_change_on_resume`].
pub fn resume_differences(old: &str, new: &str) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let mut old_table: toml::Table = toml::from_str(old)?;
    for (key, value) in LEGACY {
        let (section, name) = key.split_once('.').expect("dotted");
        if let Some(toml::Value::Table(t)) = old_table.get_mut(section) {
            if !t.contains_key(name) {
                let v: toml::Table = toml::from_str(&format!("v = {value}")).expect("valid");
                t.insert(name.to_string(), v["v"].clone());
            }
        }
    }
    let old = toml::to_string(&old_table)?;
    Ok((
        differences(&old, new, |k| !may_change_on_resume(k))?,
        differences(&old, new, may_change_on_resume)?,
    ))
}

/// Keys a resumed run may change: how long it runs, how it is logged, checkpointed and
/// evaluated, where and how fast it computes. Everything else continues the same run only
/// when unchanged.
pub fn may_change_on_resume(key: &str) -> bool {
    const FREE: &[&str] = &[
        "grpo.steps",
        "grpo.epochs",
        "grpo.max_bad_steps",
        "data.prefetch",
        "data.workers",
        "device",
        "runs_dir",
    ];
    FREE.contains(&key) || key.starts_with("eval.") || key.starts_with("checkpoint.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_list_changed_added_and_removed_keys() {
        let old = "a = 1\n[g]\nlr = 1e-6\nsteps = 10\n";
        let new = "a = 1\nb = true\n[g]\nlr = 2e-6\nsteps = 20\n";
        let all = differences(old, new, |_| true).unwrap();
        assert_eq!(all.len(), 3, "{all:?}");
        assert_eq!(all[0], "b: (unset) -> true");
        assert!(all[1].starts_with("g.lr: "), "{all:?}");
        assert_eq!(all[2], "g.steps: 10 -> 20");
        let kept = differences(old, new, |k| k != "g.steps").unwrap();
        assert_eq!(kept.len(), 2);
        assert!(may_change_on_resume("grpo.steps") && may_change_on_resume("eval.every"));
        assert!(
            !may_change_on_resume("grpo.learning_rate")
                && !may_change_on_resume("model.tiny.layers")
        );
    }

    #[test]
    fn a_run_recorded_before_a_setting_existed_resumes_with_its_old_behaviour() {
        let old = "seed = 0\n[data]\nmax_eval = 0\n[grpo]\nsteps = 10\n";
        let same = "seed = 0\n[data]\nmax_eval = 0\nresize = []\nskip_invalid = false\n\
                    [grpo]\nsteps = 20\nepochs = 0.0\n";
        let (refused, allowed) = resume_differences(old, same).unwrap();
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(allowed.len(), 2, "{allowed:?}");
        let resized = same.replace("resize = []", "resize = [384, 384]");
        let (refused, _) = resume_differences(old, &resized).unwrap();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(refused[0].starts_with("data.resize: []"), "{refused:?}");
    }
}
