//! From a data record to model input: the record's image through the processor, its problem
//! through a prompt template and the chat template.

use std::path::Path;

use medvqa::{PromptTemplate, VqaRecord};
use qwen2vl::processor::{load_image, preprocess, Message, Processor, ProcessorError};

use crate::learner::PromptInput;

/// Builds the prompt of `record` with its image read from under `data_root`.
pub fn prepare_prompt(
    record: &VqaRecord,
    template: &PromptTemplate,
    processor: &Processor,
    data_root: &Path,
) -> Result<PromptInput, ProcessorError> {
    let img = load_image(&data_root.join(&record.image))?;
    let processed = preprocess(&img, &processor.image)?;
    let text = template.render(&record.problem());
    let ids = processor.prompt_ids(
        &[Message::user_with_image(text.clone())],
        std::slice::from_ref(&processed),
    )?;
    Ok(PromptInput {
        text,
        ids,
        patch_dim: processor.image.patch_dim(),
        pixels: processed.pixel_values,
        grids: vec![processed.grid],
        record: record.clone(),
    })
}
