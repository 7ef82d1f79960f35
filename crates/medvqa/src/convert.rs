//! Writing records in Med-R1's format, and converting OmniMedVQA items to it.

use std::path::Path;

use serde_json::{json, Value};

use crate::error::DataError;
use crate::record::VqaRecord;
use crate::rng::Rng;

/// A record as Med-R1's trainer reads it (`image`, `problem`, `solution`), plus the fields
/// medr1 keeps with it (`id`, `modality`, `question_type`, `dataset`).
pub fn to_med_r1_json(r: &VqaRecord) -> Value {
    let mut v = json!({
        "image": r.image,
        "problem": r.problem(),
        "solution": r.solution(),
        "id": r.id,
    });
    let map = v.as_object_mut().expect("object literal");
    if let Some(m) = r.modality {
        map.insert("modality".into(), json!(m.name()));
    }
    if let Some(q) = r.question_type {
        map.insert("question_type".into(), json!(q.name()));
    }
    if let Some(d) = &r.dataset {
        map.insert("dataset".into(), json!(d));
    }
    v
}

/// Writes records as a Med-R1 JSON list, through a temporary file renamed into place.
pub fn write_med_r1(
    records: &[VqaRecord],
    path: &Path,
    extra: impl Fn(&VqaRecord, &mut Value),
) -> Result<(), DataError> {
    let list: Vec<Value> = records
        .iter()
        .map(|r| {
            let mut v = to_med_r1_json(r);
            extra(r, &mut v);
            v
        })
        .collect();
    let body = serde_json::to_string_pretty(&list).expect("serialisable");
    let tmp = path.with_extension("json.partial");
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(&tmp, body).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// OmniMedVQA items keep their option order unless `shuffle_seed` is given; then each record's
/// options are shuffled by a generator seeded from the seed and the record's position, and the
/// seed is written into every output record (`option_shuffle_seed`) so the shuffle can be
/// reproduced.
pub fn convert_omnimed(
    records: &[VqaRecord],
    shuffle_seed: Option<u64>,
    out: &Path,
) -> Result<Vec<VqaRecord>, DataError> {
    let converted: Vec<VqaRecord> = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut r = r.clone();
            if let Some(seed) = shuffle_seed {
                let mut order: Vec<usize> = (0..r.options.len()).collect();
                Rng::new(seed.wrapping_add(i as u64)).shuffle(&mut order);
                r.options = order
                    .iter()
                    .map(|&k| records[i].options[k].clone())
                    .collect();
                r.answer = order
                    .iter()
                    .position(|&k| k == records[i].answer)
                    .expect("a permutation");
            }
            r
        })
        .collect();
    write_med_r1(&converted, out, |_, v| {
        if let Some(seed) = shuffle_seed {
            v["option_shuffle_seed"] = json!(seed);
        }
    })?;
    Ok(converted)
}
