//! `medr1 export`: a LoRA adapter on its base, written as one merged checkpoint
//! (`--merge`) or again as a PEFT adapter directory in transformers 5.x's module layout (an
//! adapter saved against transformers 4.x's layout loads either way; this rewrites it).

use std::path::PathBuf;

use anyhow::{bail, Context};
use burn::tensor::backend::Backend;
use clap::Args;
use qwen2vl::checkpoint::{load_adapter, save_adapter};
use qwen2vl::{load_model, save_model, SaveDtype};

use crate::backend::{dispatch, BackendTask, DeviceKind};

#[derive(Args)]
pub struct ExportArgs {
    /// The base checkpoint directory the adapter was trained on.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where to write; must not exist yet, or be empty.
    #[arg(long)]
    pub out: PathBuf,
    /// Write the base with the adapter folded into its weights: a full checkpoint that loads
    /// without PEFT (plus the base's tokenizer and processor files).
    #[arg(long)]
    pub merge: bool,
    /// Storage dtype of a merged checkpoint: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Where the merge is computed (the CPU is plenty: one matrix product per adapter).
    #[arg(long, value_enum, default_value_t = DeviceKind::Flex)]
    pub device: DeviceKind,
}

pub fn run(a: ExportArgs) -> anyhow::Result<()> {
    let dtype = match a.dtype.as_str() {
        "f32" => SaveDtype::F32,
        "bf16" => SaveDtype::BF16,
        other => bail!("--dtype {other:?}: expected f32 or bf16"),
    };
    if a.out.exists() {
        let empty = a.out.is_dir()
            && std::fs::read_dir(&a.out)
                .with_context(|| format!("reading {}", a.out.display()))?
                .next()
                .is_none();
        if !empty {
            bail!(
                "{} already exists and is not empty: export writes to a new directory",
                a.out.display()
            );
        }
    }
    dispatch(a.device, Task(a, dtype))?
}

struct Task(ExportArgs, SaveDtype);

impl BackendTask for Task {
    type Output = anyhow::Result<()>;

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let Task(a, dtype) = self;
        let (base, _) = load_model::<B>(&a.model, &device)
            .with_context(|| format!("the base model {}", a.model.display()))?;
        let (adapted, cfg) = load_adapter(base, &a.adapter)
            .with_context(|| format!("the adapter {}", a.adapter.display()))?;
        let modules = adapted
            .projections()
            .iter()
            .filter(|(_, p)| p.lora.is_some())
            .count();
        if a.merge {
            save_model(&adapted.merge_adapters(), &a.out, dtype)?;
            for f in [
                "tokenizer.json",
                "tokenizer_config.json",
                "preprocessor_config.json",
                "chat_template.json",
                "chat_template.jinja",
            ] {
                let from = a.model.join(f);
                if from.is_file() {
                    std::fs::copy(&from, a.out.join(f)).with_context(|| {
                        format!("copying {} to {}", from.display(), a.out.display())
                    })?;
                }
            }
            eprintln!(
                "wrote {}: the base with LoRA r {} merged into {modules} modules",
                a.out.display(),
                cfg.r
            );
        } else {
            save_adapter(&adapted, &cfg, a.model.to_str(), &a.out)?;
            eprintln!(
                "wrote the adapter ({modules} modules) to {}",
                a.out.display()
            );
        }
        Ok(())
    }
}
