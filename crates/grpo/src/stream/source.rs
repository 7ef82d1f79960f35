//! Where a run's prompts come from: records held as text, each prompt's pixels made when it
//! is used ([`RecordPrompts`]), or prompts already prepared in memory (`Vec<PromptInput>`,
//! for tests and small programs).

use std::path::PathBuf;
use std::sync::Arc;

use medvqa::{PromptTemplate, VqaRecord};
use qwen2vl::processor::{Processor, ProcessorError};

use crate::learner::PromptInput;
use crate::prompt::prepare_prompt_with;

/// A prompt that could not be prepared, naming its record and image.
#[derive(Debug, thiserror::Error)]
#[error("record {id}: image {image}: {source}")]
pub struct PromptError {
    pub id: String,
    pub image: String,
    #[source]
    pub source: ProcessorError,
}

/// Prompts by index. Shared by the threads that prepare them ahead of use.
pub trait PromptSource: Send + Sync {
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The record behind prompt `i` (cheap: no image is read).
    fn record(&self, i: usize) -> &VqaRecord;

    /// Prompt `i`, ready for the model.
    fn prepare(&self, i: usize) -> Result<PromptInput, PromptError>;
}

/// Prompts made in memory beforehand; `prepare` hands out a copy.
impl PromptSource for Vec<PromptInput> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn record(&self, i: usize) -> &VqaRecord {
        &self[i].record
    }

    fn prepare(&self, i: usize) -> Result<PromptInput, PromptError> {
        Ok(self[i].clone())
    }
}

/// Records whose prompts are made on use: the image is read, optionally resized to a fixed
/// size first (`resize`, Pillow's bicubic, as Med-R1 pre-resizes its images), then run
/// through the processor. Nothing of a prompt outlives its use.
pub struct RecordPrompts {
    pub records: Vec<VqaRecord>,
    pub template: PromptTemplate,
    pub processor: Arc<Processor>,
    pub image_root: PathBuf,
    /// `(width, height)` every image is resized to before the processor, or none.
    pub resize: Option<(usize, usize)>,
}

impl PromptSource for RecordPrompts {
    fn len(&self) -> usize {
        self.records.len()
    }

    fn record(&self, i: usize) -> &VqaRecord {
        &self.records[i]
    }

    fn prepare(&self, i: usize) -> Result<PromptInput, PromptError> {
        let r = &self.records[i];
        prepare_prompt_with(
            r,
            &self.template,
            &self.processor,
            &self.image_root,
            self.resize,
        )
        .map_err(|source| PromptError {
            id: r.id.clone(),
            image: r.image.clone(),
            source,
        })
    }
}

/// A shared source is a source.
impl<T: PromptSource + ?Sized> PromptSource for Arc<T> {
    fn len(&self) -> usize {
        (**self).len()
    }

    fn record(&self, i: usize) -> &VqaRecord {
        (**self).record(i)
    }

    fn prepare(&self, i: usize) -> Result<PromptInput, PromptError> {
        (**self).prepare(i)
    }
}
