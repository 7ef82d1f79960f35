//! From a data record to model input: the record's image through the processor, its problem
//! through a prompt template and the chat template.

use std::path::Path;

use medvqa::{PromptTemplate, VqaRecord};
use qwen2vl::processor::{
    load_image, pil_bicubic_resize, preprocess_rgb, to_rgb, Message, Processor, ProcessorError,
};

use crate::learner::PromptInput;

/// Builds the prompt of `record` with its image read from under `data_root`.
pub fn prepare_prompt(
    record: &VqaRecord,
    template: &PromptTemplate,
    processor: &Processor,
    data_root: &Path,
) -> Result<PromptInput, ProcessorError> {
    prepare_prompt_with(record, template, processor, data_root, None)
}

/// [`prepare_prompt`], the image first resized to `resize = (width, height)` with Pillow's
/// bicubic filter (what `Image.resize` does by default), as when a data set's images were
/// resized on disk before training.
pub fn prepare_prompt_with(
    record: &VqaRecord,
    template: &PromptTemplate,
    processor: &Processor,
    data_root: &Path,
    resize: Option<(usize, usize)>,
) -> Result<PromptInput, ProcessorError> {
    let img = to_rgb(&load_image(&data_root.join(&record.image))?);
    let img = match resize {
        Some((w, h)) if (w, h) != (img.width, img.height) => pil_bicubic_resize(&img, w, h),
        _ => img,
    };
    let processed = preprocess_rgb(&img, &processor.image)?;
    let text = template.render(&record.problem());
    let ids = processor.prompt_ids(
        &[Message::user_with_image(text.clone())],
        std::slice::from_ref(&processed),
    )?;
    Ok(PromptInput {
        text,
        ids,
        images: vec![processed],
        record: record.clone(),
    })
}
