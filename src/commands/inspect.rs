//! `medr1 inspect`: what a checkpoint directory holds, without loading it onto a device.

use std::path::Path;

use anyhow::Context;
use qwen2vl::checkpoint::CheckpointFiles;
use qwen2vl::Qwen2VLConfig;

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

pub fn run(path: &Path) -> anyhow::Result<()> {
    let (dir, config_path) = if path.is_dir() {
        (Some(path), path.join("config.json"))
    } else {
        (None, path.to_path_buf())
    };
    let cfg = Qwen2VLConfig::from_file(&config_path)
        .with_context(|| format!("reading the model config of {}", path.display()))?;
    let t = &cfg.text;
    let v = &cfg.vision;
    println!("config        {}", config_path.display());
    println!(
        "text          {} layers, hidden {}, {} heads / {} kv heads (head dim {}), MLP {}, vocab {}",
        t.num_hidden_layers,
        t.hidden_size,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.head_dim,
        t.intermediate_size,
        t.vocab_size
    );
    println!(
        "              rope theta {}, mrope_section {:?}, rms eps {:e}, tied LM head: {}",
        t.rope_theta, t.mrope_section, t.rms_norm_eps, cfg.tie_word_embeddings
    );
    let attention = match &v.kind {
        qwen2vl::VisionKind::Qwen2VL => "whole-image attention".to_string(),
        qwen2vl::VisionKind::Qwen25VL {
            window_size,
            fullatt_block_indexes,
            ..
        } => format!("{window_size}-pixel windows, whole-image attention in blocks {fullatt_block_indexes:?}"),
    };
    println!(
        "vision        {} blocks, width {}, {} heads, MLP width {}, patch {}x{} (temporal {}), merge {}x{} -> {}; {attention}",
        v.depth,
        v.embed_dim,
        v.num_heads,
        v.mlp_dim(),
        v.patch_size,
        v.patch_size,
        v.temporal_patch_size,
        v.spatial_merge_size,
        v.spatial_merge_size,
        v.hidden_size
    );
    println!(
        "tokens        image {}, video {}, vision start/end {}/{}, eos {:?}",
        cfg.image_token_id,
        cfg.video_token_id,
        cfg.vision_start_token_id,
        cfg.vision_end_token_id,
        cfg.eos_token_ids
    );
    let counts = cfg.parameter_counts();
    println!("parameters    vision {}", thousands(counts.vision));
    println!("              text   {}", thousands(counts.text));
    println!("              head   {}", thousands(counts.lm_head));
    println!("              total  {}", thousands(counts.total()));

    let Some(dir) = dir else {
        return Ok(());
    };
    match CheckpointFiles::open(dir) {
        Ok(files) => {
            let stored: usize = files
                .index
                .values()
                .map(|t| t.shape.iter().product::<usize>())
                .sum();
            println!(
                "weights       {} file(s), {} tensors, {} values",
                files.paths.len(),
                files.index.len(),
                thousands(stored)
            );
            println!("layout        {}", files.layout);
            let dtypes: Vec<String> = files
                .dtype_counts()
                .iter()
                .map(|(d, n)| format!("{d} x{n}"))
                .collect();
            println!("dtypes        {}", dtypes.join(", "));
            if let Some(d) = &cfg.dtype {
                println!("config dtype  {d}");
            }
        }
        Err(e) => println!("weights       none readable: {e}"),
    }
    Ok(())
}
