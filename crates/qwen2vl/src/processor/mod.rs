//! Qwen2VLProcessor: images -> `pixel_values` + grids, chat messages -> token ids with each
//! `<|image_pad|>` expanded to the image's merged-patch count.

mod byte_tokenizer;
mod chat;
mod image;
mod resize;
mod template;
mod tokenizer;

pub use self::image::{
    load_image, patchify, preprocess, preprocess_rgb, resize_for_model, smart_resize, to_rgb,
    ImageProcessorConfig, ProcessedImage,
};
pub use byte_tokenizer::{byte_tokenizer_json, BYTE_SPECIAL_BASE, QWEN_SPECIAL_TOKENS};
pub use chat::{render_chat, Content, ContentItem, Message, DEFAULT_SYSTEM};
pub use resize::{pil_bicubic_resize, Rgb8};
pub use template::{check_chat_template, checkpoint_chat_template, QWEN_VL_CHAT_TEMPLATE};
pub use tokenizer::TextTokenizer;

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("{file}: {message}")]
    Config { file: String, message: String },
    #[error("image: {0}")]
    Image(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("prompt: {0}")]
    Prompt(String),
}

/// Tokenizer + image settings of one checkpoint.
pub struct Processor {
    pub tokenizer: TextTokenizer,
    pub image: ImageProcessorConfig,
    pub image_pad_id: u32,
    pub video_pad_id: u32,
}

impl Processor {
    pub fn new(
        tokenizer: TextTokenizer,
        image: ImageProcessorConfig,
    ) -> Result<Self, ProcessorError> {
        let id = |t: &str| {
            tokenizer.token_id(t).ok_or_else(|| {
                ProcessorError::Tokenizer(format!(
                    "the tokenizer has no `{t}` token: not a Qwen2-VL tokenizer"
                ))
            })
        };
        let image_pad_id = id("<|image_pad|>")?;
        let video_pad_id = id("<|video_pad|>")?;
        Ok(Self {
            tokenizer,
            image,
            image_pad_id,
            video_pad_id,
        })
    }

    /// `tokenizer.json` and (when present) `preprocessor_config.json` of a checkpoint
    /// directory; its chat template, when it ships one, must be the one medr1 renders.
    pub fn from_dir(dir: &Path) -> Result<Self, ProcessorError> {
        let image = Self::image_config_of(dir)?;
        let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"))?;
        Self::new(tokenizer, image)
    }

    /// The image settings of a checkpoint directory (its `preprocessor_config.json`, Qwen2-VL's
    /// without one), once its chat template, if it ships one, is found to be medr1's.
    pub fn image_config_of(dir: &Path) -> Result<ImageProcessorConfig, ProcessorError> {
        check_chat_template(dir)?;
        let pp = dir.join("preprocessor_config.json");
        if pp.is_file() {
            ImageProcessorConfig::from_file(&pp)
        } else {
            Ok(ImageProcessorConfig::default())
        }
    }

    /// Token ids of a rendered chat whose `<|image_pad|>` placeholders stand for images of
    /// `image_tokens[k]` merged patches each (`t*h*w/merge²`), in order.
    pub fn expand_ids(
        &self,
        rendered: &str,
        image_tokens: &[usize],
    ) -> Result<Vec<u32>, ProcessorError> {
        let ids = self.tokenizer.encode(rendered)?;
        let placeholders = ids.iter().filter(|&&i| i == self.image_pad_id).count();
        if placeholders != image_tokens.len() {
            return Err(ProcessorError::Prompt(format!(
                "the prompt has {placeholders} image placeholder(s) but {} image(s) were given",
                image_tokens.len()
            )));
        }
        let mut out = Vec::with_capacity(ids.len() + image_tokens.iter().sum::<usize>());
        let mut next = image_tokens.iter();
        for id in ids {
            if id == self.image_pad_id {
                let n = *next.next().expect("counted above");
                out.extend(std::iter::repeat_n(id, n));
            } else {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Chat messages + their images -> model input ids (generation prompt appended).
    pub fn prompt_ids(
        &self,
        messages: &[Message],
        images: &[ProcessedImage],
    ) -> Result<Vec<u32>, ProcessorError> {
        let merge = self.image.merge_size;
        let counts: Vec<usize> = images.iter().map(|i| i.num_tokens(merge)).collect();
        self.expand_ids(&render_chat(messages, true, false), &counts)
    }
}
